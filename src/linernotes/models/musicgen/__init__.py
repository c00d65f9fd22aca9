"""The musicgen family: a user's transformers MusicGen folder (and its fine-tunes)."""
