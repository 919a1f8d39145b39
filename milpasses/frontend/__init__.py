"""The torch side of conversion: what coremltools' torch frontend lacks, and the modules that
turn Hugging Face models into something it can read.

Importing this package installs the missing op converters (``torch_ops``) through coremltools'
own registry, so a plain ``ct.convert`` of a traced model gains them too.
"""

from milpasses.frontend import export  # noqa: F401  (installs the torch.export route's converters)
from milpasses.frontend.torch_ops import INSTALLED

__all__ = ["INSTALLED"]
