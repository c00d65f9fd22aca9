"""Is the attribution right? Consistency, leave-K-out, LDS, opt-out audits, normalisation."""
