"""Text generation with a KV cache: the traced step of any Hugging Face causal LM, and the
host loop that drives its converted ``prefill`` and ``decode`` functions."""
