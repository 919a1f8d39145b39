"""Passes that carry activations in the ANE's (B, C, 1, S) layout and remove the layout ops around it."""
