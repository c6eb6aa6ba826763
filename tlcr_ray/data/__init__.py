"""Preference pairs (load, split prompt/response, partition 20/40/40) and joint tokenization."""
