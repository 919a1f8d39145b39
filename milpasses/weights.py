"""Weights as a Core ML package stores them: a compressed weight counts its indices, tables and
scales at their own widths (4-bit indices as half a byte each), not its decompressed size."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import types


def stored_bits(var) -> int:
    """Bits a constant var occupies as stored: its element count times its element width."""
    dtype = var.dtype
    if types.is_tensor(var.sym_type):
        dtype = var.sym_type.get_primitive()
    if types.is_sub_byte(dtype):
        width = dtype.get_bitwidth()
    elif dtype == types.str:
        return 0
    else:
        width = 8 * np.dtype(types.nptype_from_builtin(dtype)).itemsize
    return width * int(np.prod(var.shape)) if var.shape else width


def weight_ops(function) -> list:
    """The const ops a function computes with (its weights), compressed parts included."""
    return [op for op in function.operations if op.op_type == "const" and op.outputs[0].child_ops]


def stored_bytes(function) -> int:
    """Bytes of all the function's constants as stored."""
    return sum(stored_bits(op.outputs[0]) for op in weight_ops(function)) // 8




def dense_bytes(function) -> int:
    """Bytes of the function's constants were every compressed weight stored dense."""
    total = 0
    for op in function.operations:
        outputs_read = [v for v in op.outputs if any(not c.op_type.startswith("constexpr_") for c in v.child_ops)]
        if op.op_type == "const" or op.op_type.startswith("constexpr_"):
            total += sum(stored_bits(v) for v in outputs_read) // 8
    return total


def is_decompressed(var) -> bool:
    """Whether ``var`` is a weight a decompression op (``constexpr_*``) expands when the model loads."""
    return var is not None and var.op is not None and var.op.op_type.startswith("constexpr_")


def compressed_bytes(var) -> int:
    """Bytes of the indices, tables and scales a decompressed weight is stored as."""
    bits = 0
    for input_var in var.op.get_flattened_inputs():
        bits += compressed_bytes(input_var) * 8 if is_decompressed(input_var) else stored_bits(input_var)
    return bits // 8
