"""Unlearning: of one query (attribution) and of a forget set (opt-out)."""
