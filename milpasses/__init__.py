"""milpasses: MIL graph passes that put transformer models on the Apple Neural Engine."""

from milpasses import frontend  # noqa: F401  (installs torch op converters coremltools lacks)
from milpasses.fp16_check import check_fp16
from milpasses.passes import last_reports
from milpasses.pipeline import ane_pipeline
from milpasses.simulator import psnr, simulate

__version__ = "0.1.0"

__all__ = ["ane_pipeline", "check_fp16", "last_reports", "psnr", "simulate", "__version__"]
