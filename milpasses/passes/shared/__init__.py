"""What the passes share: matching helpers, the per-op axis rules, the (B, C, 1, S) boundaries,
compressed weights.

Nothing here imports a pass."""
