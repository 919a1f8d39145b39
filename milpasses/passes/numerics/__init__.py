"""Passes that keep fp16 arithmetic finite and accurate."""
