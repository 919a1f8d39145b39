"""Compressed weights: a weight that a decompression op (``constexpr_*``) produces, reshaped,
transposed or scaled by rewriting its compressed inputs, never by materialising it.

``ct.optimize.coreml`` (or a model palettized in torch and converted) stores a weight as indices
and a lookup table, or integers and scales; Core ML expands it when it loads the model. A pass
that needs the weight in another shape (a linear's ``(C_out, C_in)`` as a conv's
``(C_out, C_in, 1, 1)``) or scaled (an attention scale folded into the Q projection) rewrites
the compressed form, so the package keeps its size.

Matching and rewriting stay apart: :func:`read` and the transforms work on numpy arrays only and
return a :class:`Compressed` plan or a :class:`NoMatch`; :func:`build` emits the ops.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.shared.matching import NoMatch


@dataclass(frozen=True)
class Compressed:
    """A decompression op to build: its type and inputs, each an array, a scalar or a nested
    :class:`Compressed` (a lookup table that is itself scaled per channel, say)."""

    op_type: str
    inputs: dict
    shape: tuple  # of the decompressed weight

    @property
    def rank(self) -> int:
        return len(self.shape)


def is_compressed(var) -> bool:
    """Whether ``var`` is the output of a weight decompression op."""
    return var is not None and var.op is not None and var.op.op_type.startswith("constexpr_")


def read(var) -> Compressed | NoMatch:
    """The plan that rebuilds ``var``'s decompression op (and the ones feeding it) unchanged."""
    op = var.op
    if not is_compressed(var):
        return NoMatch("not the output of a weight decompression op")
    if op.op_type not in _FORMS:
        return NoMatch(f"{op.op_type} weights cannot be rewritten compressed")
    inputs = {}
    for name, input_var in op.inputs.items():
        if input_var.val is not None:
            inputs[name] = input_var.val
            continue
        nested = read(input_var)
        if not nested:
            return nested
        inputs[name] = nested
    return Compressed(op.op_type, inputs, tuple(int(d) for d in var.shape))


def _form(plan: Compressed) -> str:
    """The op's form: iOS16's lookup table keeps packed indices and an explicit shape."""
    if plan.op_type == "constexpr_lut_to_dense":
        return "lut16" if "shape" in plan.inputs else "lut18"
    return plan.op_type


def _axis(value, rank: int) -> int:
    return int(value) % rank


def _map_arrays(plan: Compressed, names, function) -> Compressed | NoMatch:
    """``plan`` with ``function`` applied to each of ``names`` present: arrays directly, nested
    plans through the same transform (``function`` handles both)."""
    inputs = dict(plan.inputs)
    for name in names:
        if inputs.get(name) is None:
            continue
        result = function(inputs[name])
        if isinstance(result, NoMatch):
            return result
        inputs[name] = result
    return replace(plan, inputs=inputs)


def expanded(plan: Compressed, at: int, count: int) -> Compressed | NoMatch:
    """The weight with ``count`` unit axes inserted at position ``at``."""

    def insert(value):
        if isinstance(value, Compressed):
            return expanded(value, at, count)
        return value.reshape(value.shape[:at] + (1,) * count + value.shape[at:])

    form = _form(plan)
    shape = plan.shape[:at] + (1,) * count + plan.shape[at:]
    if form == "lut16":
        result = replace(plan, inputs={**plan.inputs, "shape": np.array(shape, np.uint32)})
    elif form == "lut18":
        result = _map_arrays(plan, ("indices", "lut"), insert)
        vector_axis = plan.inputs.get("vector_axis")
        if result and vector_axis is not None:
            shifted = _axis(vector_axis, plan.rank)
            result.inputs["vector_axis"] = np.int32(shifted + count if shifted >= at else shifted)
    elif form == "constexpr_blockwise_shift_scale":
        result = _map_arrays(plan, ("data", "scale", "offset"), insert)
    elif form == "constexpr_affine_dequantize":
        result = _map_arrays(plan, ("quantized_data",), insert)
        axis = _axis(plan.inputs["axis"], plan.rank)
        if result:
            result.inputs["axis"] = np.int32(axis + count if axis >= at else axis)
    elif form == "constexpr_cast":
        result = _map_arrays(plan, ("source_val",), insert)
    else:
        return NoMatch(f"{plan.op_type} weights cannot be reshaped compressed")
    return replace(result, shape=shape) if result else result


def transposed(plan: Compressed) -> Compressed | NoMatch:
    """The weight with axes 0 and 1 swapped (a rank-2 weight transposed)."""

    def swap(value):
        if isinstance(value, Compressed):
            return transposed(value)
        return np.swapaxes(value, 0, 1)

    def swapped_axis(axis) -> np.int32:
        axis = _axis(axis, plan.rank)
        return np.int32(1 - axis if axis < 2 else axis)

    form = _form(plan)
    if plan.rank < 2:
        return NoMatch(f"a rank-{plan.rank} compressed weight is not transposed")
    if form == "lut18":
        result = _map_arrays(plan, ("indices", "lut"), swap)
        if result and plan.inputs.get("vector_axis") is not None:
            result.inputs["vector_axis"] = swapped_axis(plan.inputs["vector_axis"])
    elif form == "constexpr_blockwise_shift_scale":
        result = _map_arrays(plan, ("data", "scale", "offset"), swap)
    elif form == "constexpr_affine_dequantize":
        result = _map_arrays(plan, ("quantized_data",), swap)
        if result:
            result.inputs["axis"] = swapped_axis(plan.inputs["axis"])
    elif form == "constexpr_cast":
        result = _map_arrays(plan, ("source_val",), swap)
    else:
        return NoMatch(f"{plan.op_type} ({form}) weights cannot be transposed compressed: their indices are packed")
    return replace(result, shape=(plan.shape[1], plan.shape[0]) + plan.shape[2:]) if result else result


def rows_scaled(plan: Compressed, lo: int, hi: int, factor: float) -> Compressed | NoMatch:
    """The weight with rows (axis 0) ``lo``..``hi`` multiplied by ``factor``, by scaling the
    lookup table entries or quantisation scales those rows alone use."""
    form = _form(plan)
    if form == "lut18":
        return _scaled_blocks(plan, "lut", plan.inputs["indices"].shape[0], lo, hi, factor)
    if form == "constexpr_blockwise_shift_scale":
        return _scaled_blocks(plan, "scale", plan.inputs["data"].shape[0], lo, hi, factor)
    if form == "lut16":
        if (lo, hi) != (0, int(plan.inputs["shape"][0])):
            return NoMatch("rows share one lookup table with rows outside the range")
        return replace(plan, inputs={**plan.inputs, "lut": _times(plan.inputs["lut"], factor)})
    if form == "constexpr_affine_dequantize":
        scale = np.asarray(plan.inputs["scale"])
        rows = int(plan.inputs["quantized_data"].shape[0])
        if scale.ndim == 1 and _axis(plan.inputs["axis"], plan.rank) == 0:
            scale = scale.copy()
            scale[lo:hi] = _times(scale[lo:hi], factor)
        elif (lo, hi) == (0, rows):
            scale = _times(scale, factor)
        else:
            return NoMatch("rows share one quantisation scale with rows outside the range")
        return replace(plan, inputs={**plan.inputs, "scale": scale})
    if form == "constexpr_cast":
        source = np.array(plan.inputs["source_val"], copy=True)
        source[lo:hi] = _times(source[lo:hi], factor)
        return replace(plan, inputs={**plan.inputs, "source_val": source})
    return NoMatch(f"{plan.op_type} weights cannot be scaled compressed")


def _times(values, factor: float) -> np.ndarray:
    values = np.asarray(values)
    return (values.astype(np.float32) * np.float32(factor)).astype(values.dtype)


def _scaled_blocks(plan: Compressed, name: str, rows: int, lo: int, hi: int, factor: float):
    """Scale entries ``lo / block .. hi / block`` of input ``name``, whose axis 0 gives one entry
    per block of ``rows / len`` rows (a lookup table per row group, a scale per row block)."""
    value = plan.inputs[name]
    entries = _leading(value)
    block = rows // entries
    if lo % block or hi % block:
        return NoMatch(f"rows {lo}..{hi} share a {name} with rows outside them (blocks of {block} rows)")
    if isinstance(value, Compressed):
        scaled = rows_scaled(value, lo // block, hi // block, factor)
        if not scaled:
            return scaled
    else:
        if not np.issubdtype(value.dtype, np.floating):
            return NoMatch(f"an integer {name} cannot be scaled")
        scaled = np.array(value, copy=True)
        scaled[lo // block:hi // block] = _times(scaled[lo // block:hi // block], factor)
    return replace(plan, inputs={**plan.inputs, name: scaled})


def _leading(value) -> int:
    """The size of axis 0 of an array, or of the tensor a nested plan decompresses to."""
    return int(value.shape[0]) if isinstance(value, Compressed) else int(np.shape(value)[0])


def build(plan: Compressed, name: str):
    """Emit ``plan``'s ops (at the builder's current insertion point); returns the weight var."""
    inputs = {}
    for key, value in plan.inputs.items():
        if value is None:
            continue
        inputs[key] = build(value, f"{name}_{key}") if isinstance(value, Compressed) else value
    return getattr(mb, plan.op_type)(name=name, **inputs)


_FORMS = ("constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "constexpr_affine_dequantize",
          "constexpr_cast")
