"""The torch side of conversion: what coremltools' torch frontend lacks, and the modules that
turn Hugging Face models into something it can read.

Importing this package installs the missing op converters (``torch_ops``, ``torch_ops_2026``,
which also fixes a few of coremltools' own) through coremltools'
own registry, so a plain ``ct.convert`` of a traced model gains them too.
"""

from milpasses.frontend import export  # noqa: F401  (installs the torch.export route's converters)
from milpasses.frontend import torch_ops_2026  # noqa: F401  (installs the 2026 families' converters and fixes)
from milpasses.frontend.torch_ops import INSTALLED

__all__ = ["INSTALLED"]
