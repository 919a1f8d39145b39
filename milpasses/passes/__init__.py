"""The milpasses graph passes, registered with coremltools in the ``ane`` namespace on import."""

from milpasses.passes import bc1s_layout, finite_masks, linear_to_conv  # noqa: F401  (registration)
from milpasses.passes.report import PassReport, last_reports

__all__ = ["PassReport", "last_reports"]
