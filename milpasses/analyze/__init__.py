"""``milpasses analyze``: predict where each op of a Core ML program runs (ANE, GPU, CPU) and
why, with a roofline latency estimate per Apple chip."""

from milpasses.analyze.report import Analysis, analyze

__all__ = ["Analysis", "analyze"]
