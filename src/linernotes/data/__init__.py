"""Manifest, audio I/O, features with padding masks, and the torch dataset."""
