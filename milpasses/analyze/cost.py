"""A roofline cost model of MIL ops on Apple chips: FLOPs, bytes moved, estimated time.

Every number here is an assumption, listed in ``ASSUMPTIONS`` and printed with each estimate.
The model answers "which program should be faster, and roughly by how much"; it is not a
measurement and is not fitted to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.analyze.chips import CHIPS, DEFAULT_CHIP, GIGA, TERA, Chip  # noqa: F401  (used as cost.CHIPS)
from milpasses.analyze.rules import ANE, CPU, GPU

ANE_ROW_ALIGNMENT = 64  # bytes: the ANE stores the last axis contiguous, padded to 64 bytes (Apple)

# Off-ANE throughput is not in Apple's table; these are round figures for a few performance
# cores running fp32 NEON (CPU) and a phone-class GPU, used for every chip.
CPU_FLOPS = 0.2 * TERA
GPU_FLOPS = 1.0 * TERA
DISPATCH_SECONDS = 0.1e-3  # per device partition submitted (ANE_NOTES: ~0.1 ms per ANE dispatch, M4, community)
SWITCH_SECONDS = 0.1e-3  # per hand-over between devices (assumed: a dispatch's order)

ASSUMPTIONS = (
    "roofline per op: time = max(FLOPs / peak, bytes / DRAM bandwidth) on its predicted device",
    "ANE peak is Apple's fp16 figure (int8-counted TOPS halved for A17 Pro/M4); "
    "bandwidths marked * in ANE_NOTES are derived, not published",
    f"CPU {CPU_FLOPS / TERA:g} TFLOPS and GPU {GPU_FLOPS / TERA:g} TFLOPS on every chip (round guesses), "
    "same DRAM bandwidth as the ANE",
    "every weight is read from DRAM once per inference; a gather reads only the rows it looks up",
    "every activation is read from and written to DRAM (worst case: nothing stays on chip)",
    f"on the ANE the last axis of every activation is padded to {ANE_ROW_ALIGNMENT} bytes (Apple)",
    "reshape/squeeze/expand_dims are free when the ANE's padded layout does not change; "
    "transpose is a copy unless it only moves size-1 axes",
    "on the ANE, linear/matmul/layer_norm/softmax/reductions over the last (width) axis of a "
    "rank >= 3 activation pay one relayout (read + write) of their input and output, because the "
    "ANE reduces over channels (Apple's channels-first principle; the cost is our assumption)",
    f"{DISPATCH_SECONDS * 1e3:g} ms per device partition and {SWITCH_SECONDS * 1e3:g} ms per "
    "switch between devices (ANE_NOTES, community, M4)",
    "per-op FLOPs: 2 per multiply-add; elementwise 1 per output; gelu 8, softmax 5, "
    "layer_norm 8 per element",
    "a flexible (symbolic) dimension is counted as 1",
)

VIEW_OPS = frozenset({"reshape", "squeeze", "expand_dims", "identity", "reshape_like"})
LAST_AXIS_REDUCERS = frozenset({
    "linear", "matmul", "layer_norm", "softmax", "reduce_mean", "reduce_sum", "reduce_max",
    "reduce_min", "reduce_l2_norm", "reduce_prod", "reduce_log_sum_exp",
})
PER_ELEMENT_FLOPS = {"gelu": 8, "softmax": 5, "layer_norm": 8, "instance_norm": 8, "batch_norm": 2,
                     "silu": 4, "sigmoid": 4, "tanh": 4, "exp": 4, "erf": 4, "rsqrt": 2, "sqrt": 2}
NO_COMPUTE = VIEW_OPS | frozenset({
    "transpose", "concat", "split", "slice_by_index", "slice_by_size", "gather", "gather_nd",
    "gather_along_axis", "tile", "pad", "const", "cast", "stack", "shape",
})


def _is_static_tensor(var) -> bool:
    return types.is_tensor(var.sym_type) and all(isinstance(d, (int, np.integer)) for d in var.shape)


def _elements(var) -> int:
    if not types.is_tensor(var.sym_type):
        return 1
    return int(np.prod([d if isinstance(d, (int, np.integer)) else 1 for d in var.shape], dtype=np.int64))


def _itemsize(var) -> int:
    if var.dtype == types.bool:
        return 1
    return np.dtype(types.nptype_from_builtin(var.dtype)).itemsize


def is_weight(var) -> bool:
    """A float tensor known at compile time; integer constants (axes, shapes, perms) are parameters."""
    return var.val is not None and types.is_tensor(var.sym_type) and types.is_float(var.dtype)


def dense_bytes(var) -> int:
    return _elements(var) * _itemsize(var)


def padded_bytes(var) -> int:
    """Bytes the ANE stores: the last axis rounded up to a multiple of 64 bytes."""
    if not types.is_tensor(var.sym_type) or len(var.shape) == 0:
        return ANE_ROW_ALIGNMENT
    shape = [d if isinstance(d, (int, np.integer)) else 1 for d in var.shape]
    row = math.ceil(shape[-1] * _itemsize(var) / ANE_ROW_ALIGNMENT) * ANE_ROW_ALIGNMENT
    return int(np.prod(shape[:-1], dtype=np.int64)) * row


def _layout_unchanged_on_ane(op) -> bool:
    """A view on the ANE: the padded bytes are laid out as the dense ones, or the last axis stays."""
    source, result = op.inputs["x"], op.outputs[0]
    if not (_is_static_tensor(source) and _is_static_tensor(result)):
        return False
    same_last = len(source.shape) and len(result.shape) and source.shape[-1] == result.shape[-1]
    both_dense = padded_bytes(source) == dense_bytes(source) and padded_bytes(result) == dense_bytes(result)
    return bool(same_last or both_dense)


def _transpose_is_view(op) -> bool:
    shape, perm = op.inputs["x"].shape, [int(p) for p in op.inputs["perm"].val]
    moved = [a for a in perm if shape[a] != 1]
    return moved == sorted(moved)


def flops(op) -> int:
    """Floating-point operations (a multiply-add counts 2)."""
    kind = op.op_type
    out = op.outputs[0] if op.outputs else None
    if kind in NO_COMPUTE or out is None:
        return 0
    if kind == "conv":
        weight = op.inputs["weight"]
        taps = int(np.prod(weight.shape[1:]))  # input channels per group x kernel size
        return 2 * _elements(out) * taps + (_elements(out) if op.inputs.get("bias") is not None else 0)
    if kind == "linear":
        reduced = op.inputs["weight"].shape[-1]
        return 2 * _elements(out) * reduced + (_elements(out) if op.inputs.get("bias") is not None else 0)
    if kind == "matmul":
        x = op.inputs["x"]
        transpose_x = bool(op.inputs["transpose_x"].val) if "transpose_x" in op.inputs else False
        reduced = x.shape[-2] if transpose_x and len(x.shape) > 1 else x.shape[-1]
        return 2 * _elements(out) * int(reduced)
    if kind == "einsum":
        return 2 * _einsum_iterations(op)
    if kind.startswith("reduce_"):
        return _elements(op.inputs["x"])
    return PER_ELEMENT_FLOPS.get(kind, 1) * _elements(out)


def _einsum_iterations(op) -> int:
    operands, result = op.inputs["equation"].val.replace(" ", "").split("->")
    sizes = {}
    for letters, var in zip(operands.split(","), op.inputs["values"]):
        for letter, size in zip(letters, var.shape):
            sizes[letter] = max(sizes.get(letter, 1), int(size))
    return int(np.prod(list(sizes.values()), dtype=np.int64))


@dataclass(frozen=True)
class OpCost:
    flops: int
    activation_bytes: int  # activations read and written, padded on the ANE
    weight_bytes: int  # constants read
    relayout_bytes: int  # extra traffic for a last-axis reduction on the ANE

    @property
    def bytes(self) -> int:
        return self.activation_bytes + self.weight_bytes + self.relayout_bytes


def _gathered_weight_bytes(op) -> int:
    table, out = op.inputs.get("x"), op.outputs[0]
    return dense_bytes(out) if table is not None and table.val is not None else 0


def op_cost(op, device: str) -> OpCost:
    size = padded_bytes if device == ANE else dense_bytes
    if op.op_type in VIEW_OPS and (device != ANE or _layout_unchanged_on_ane(op)):
        return OpCost(0, 0, 0, 0)
    if op.op_type == "transpose" and _transpose_is_view(op):
        return OpCost(0, 0, 0, 0)
    inputs = op.get_flattened_inputs()
    activations = [v for v in inputs if v.val is None and types.is_tensor(v.sym_type)]
    moved = sum(size(v) for v in activations) + sum(size(v) for v in op.outputs if types.is_tensor(v.sym_type))
    if op.op_type in ("gather", "gather_nd", "gather_along_axis"):
        weights = _gathered_weight_bytes(op)
    else:
        weights = sum(dense_bytes(v) for v in inputs if is_weight(v))
    relayout = 0
    if device == ANE and op.op_type in LAST_AXIS_REDUCERS and _reduces_last_axis(op):
        relayout = 2 * (size(activations[0]) + size(op.outputs[0])) if activations else 0
    return OpCost(flops(op), moved, weights, relayout)


def _reduces_last_axis(op) -> bool:
    x = op.inputs.get("x")
    if x is None or not types.is_tensor(x.sym_type) or len(x.shape) < 3:
        return False
    rank = len(x.shape)
    if op.op_type in ("linear", "matmul"):
        transpose_x = "transpose_x" in op.inputs and bool(op.inputs["transpose_x"].val)
        return not transpose_x
    axes = op.inputs.get("axes") if "axes" in op.inputs else op.inputs.get("axis")
    if axes is None or axes.val is None:
        return op.op_type != "softmax"  # reductions default to every axis; softmax to the last
    return rank - 1 in [int(a) % rank for a in np.atleast_1d(axes.val)]


def op_seconds(cost: OpCost, device: str, chip: Chip) -> float:
    peak = {ANE: chip.ane_fp16_flops, GPU: GPU_FLOPS, CPU: CPU_FLOPS}[device]
    return max(cost.flops / peak, cost.bytes / chip.dram_bytes_per_s)
