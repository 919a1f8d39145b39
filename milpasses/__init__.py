"""milpasses: MIL graph passes that put transformer models on the Apple Neural Engine.

The public names load on first use, so that ``import milpasses`` (and the command line, before
it has read its options) does not import coremltools and torch. Whatever converts a model
(``ane_pipeline()``, ``milpasses.frontend.tracing``, ``milpasses.convert``) first installs the torch
op converters coremltools lacks (``milpasses.frontend``).
"""

import importlib

__version__ = "0.1.0"

_HOMES = {
    "ane_pipeline": "milpasses.pipeline",
    "check_fp16": "milpasses.simulator.fp16_check",
    "generate": "milpasses.generation.api",
    "psnr": "milpasses.simulator",
    "simulate": "milpasses.simulator",
}

__all__ = sorted(_HOMES) + ["__version__"]


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'milpasses' has no attribute {name!r}")
