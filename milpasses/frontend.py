"""Converters for torch ops that coremltools' torch frontend lacks.

They are installed through coremltools' torch op registry (``register_torch_op``),
the documented extension point, when milpasses is imported. A converter is only
installed for an op the frontend does not already convert, so no existing
conversion changes; reloading milpasses replaces its own converters and nothing else.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import (
    _TORCH_OPS_REGISTRY,
    register_torch_op,
)
from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE
from coremltools.converters.mil.mil import types

#: Torch op kinds that milpasses converts, with the reason each is missing upstream.
INSTALLED: dict[str, str] = {}


def _numpy_dtype_for(dtype_var, like_var) -> type:
    """The numpy dtype Core ML can hold for a torch dtype argument (64-bit narrowed to 32)."""
    if dtype_var is not None and dtype_var.val is not None:
        dtype = NUM_TO_NUMPY_DTYPE[int(dtype_var.val)]
    else:
        dtype = types.nptype_from_builtin(like_var.dtype)
    return {np.int64: np.int32, np.float64: np.float32}.get(dtype, dtype)


def new_ones(context, node):
    """``tensor.new_ones(size, dtype=...)``: transformers' masking utilities call it with
    ``size=()`` and ``dtype=torch.bool`` while building attention masks."""
    inputs = _get_inputs(context, node, min_expected=2)
    like, size = inputs[0], inputs[1]
    dtype = _numpy_dtype_for(inputs[2] if len(inputs) > 2 else None, like)
    if isinstance(size, (list, tuple)):
        if all(s.val is not None for s in size):
            size = np.array([int(s.val) for s in size], dtype=np.int32)
        else:
            size = mb.concat(values=list(size), axis=0)
    elif size.val is not None:
        size = np.asarray(size.val, dtype=np.int32).reshape(-1)
    if isinstance(size, np.ndarray):
        result = mb.const(val=np.ones(tuple(size), dtype=dtype), name=node.name)
    else:
        result = mb.fill(shape=size, value=dtype(1), name=node.name)
    context.add(result)


def _install(converter, why: str) -> None:
    name = converter.__name__
    existing = _TORCH_OPS_REGISTRY.name_to_func_mapping.get(name)
    if existing is not None and existing.__module__ != __name__:
        return  # coremltools converts it itself: leave its converter in charge
    register_torch_op(converter, override=existing is not None)
    INSTALLED[name] = why


_install(new_ones, "transformers >= 5 masking utilities; missing in coremltools 9.0")
