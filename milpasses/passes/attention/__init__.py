"""Passes that find multi-head attention and rewrite it per head, and the masks it reads."""
