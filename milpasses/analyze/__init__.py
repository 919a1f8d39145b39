"""``milpasses analyze``: predict where each op of a Core ML program runs (ANE, GPU, CPU) and
why, with a roofline latency estimate per Apple chip.

``analyze`` and ``Analysis`` load on first use, so the command line can build its options
without importing coremltools."""

import importlib

__all__ = ["Analysis", "analyze"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("milpasses.analyze.report"), name)
    raise AttributeError(f"module 'milpasses.analyze' has no attribute {name!r}")
