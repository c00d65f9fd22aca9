"""The ar-reference family: an autoregressive reference model trained here."""
