"""milpasses: MIL graph passes that put transformer models on the Apple Neural Engine."""

from milpasses import frontend  # noqa: F401  (installs torch op converters coremltools lacks)
from milpasses.simulator import psnr, simulate

__version__ = "0.1.0"

__all__ = ["psnr", "simulate", "__version__"]
