"""A cost model of MIL ops on Apple chips: FLOPs, bytes moved, estimated time.

Per op on its predicted device: ``max(FLOPs / (efficiency x peak), DRAM bytes / bandwidth)``
plus a fixed cost per op that does work, and per program a cost per device partition and per
switch between devices. Peaks and bandwidths are Apple's published figures (``chips``); the
few parameters no public spec gives are fitted to published on-device latencies by
``benchmarks/calibration.py``, which also reports how well each point is predicted by a fit
that leaves it out. ``PARAMETERS`` lists every value with where it came from; it is a model,
not a measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.analyze.chips import CHIPS, DEFAULT_CHIP, GIGA, TERA, Chip  # noqa: F401  (used as cost.CHIPS)
from milpasses.analyze.rules import ANE, CPU, GPU
from milpasses.weights import compressed_bytes, is_decompressed

ANE_ROW_ALIGNMENT = 64  # bytes: the ANE stores the last axis contiguous, padded to 64 bytes (Apple)

# Off-ANE CPU throughput is not in Apple's table: a round figure for a few performance cores
# running fp32 NEON, used for every chip (only input preparation runs there in practice).
CPU_FLOPS = 0.2 * TERA


@dataclass(frozen=True)
class CostParameters:
    """The model's free numbers. ``PARAMETER_SOURCES`` says where each value comes from."""

    ane_efficiency: float  # share of the ANE's fp16 peak an op reaches
    gpu_efficiency: float  # share of the GPU's peak an op reaches through Core ML
    op_seconds: float  # fixed cost of every op that does work (scheduling, synchronisation)
    on_chip_bytes: int  # an ANE activation at most this large stays on chip: no DRAM traffic
    dispatch_seconds: float  # per device partition submitted
    switch_seconds: float  # per hand-over between devices

    def replace(self, **changes) -> "CostParameters":
        return CostParameters(**{f.name: changes.get(f.name, getattr(self, f.name)) for f in fields(self)})


#: The values in use: the fit of ``benchmarks/calibration.py`` on every point of its set, to two
#: significant figures (tests/test_calibration_log.py checks them against benchmarks/logs/calibration.json).
PARAMETERS = CostParameters(
    ane_efficiency=0.33,
    gpu_efficiency=0.39,
    op_seconds=0.5e-6,
    on_chip_bytes=2**20,
    dispatch_seconds=0.1e-3,
    switch_seconds=0.1e-3,
)
#: Which parameters ``benchmarks/calibration.py`` fits; the others are fixed from public sources.
FITTED = ("ane_efficiency", "gpu_efficiency", "op_seconds")
PARAMETER_SOURCES = {
    "ane_efficiency": "fitted to 16 published measurements from 5 sources (benchmarks/calibration.py; "
                      "leave-one-out median error 1.17x, worst 2.38x, as in benchmarks/logs/calibration.json)",
    "gpu_efficiency": "fitted, with the above, to hft2ane's ANE-vs-GPU speed-ups on M1 (benchmarks/calibration.py)",
    "op_seconds": "fitted with the above (benchmarks/calibration.py); small: the ANE fuses most elementwise ops",
    "on_chip_bytes": "assumed: 1 MiB of on-chip buffer, the order of what Apple's per-head split aims to stay "
                     "within (one head's S=512 score tile is 0.5 MiB); not published, not fitted",
    "dispatch_seconds": "about 0.1 ms per ANE dispatch (community measurement on M4)",
    "switch_seconds": "assumed equal to a dispatch (a hand-over waits for the other device's submission)",
}


#: The assumed costs a speed-up depends on when a rewrite changes the number of device
#: partitions; ``analyze --compare`` sets each to 0 and to twice its value in turn.
SENSITIVITY = ("dispatch_seconds", "switch_seconds")
SENSITIVITY_FACTORS = (0.0, 2.0)


def sensitivity_variants(parameters: CostParameters = PARAMETERS) -> dict[str, CostParameters]:
    """{"dispatch_seconds x0": parameters with that one value scaled, ...} for each of ``SENSITIVITY``."""
    return {f"{name} x{factor:g}": parameters.replace(**{name: factor * getattr(parameters, name)})
            for name in SENSITIVITY for factor in SENSITIVITY_FACTORS}


def parameter_lines(parameters: CostParameters = PARAMETERS) -> list[str]:
    units = {"ane_efficiency": ("{:.2f}", 1), "gpu_efficiency": ("{:.2f}", 1), "op_seconds": ("{:.1f} us", 1e6),
             "on_chip_bytes": ("{:.0f} KiB", 1 / 1024), "dispatch_seconds": ("{:.2f} ms", 1e3),
             "switch_seconds": ("{:.2f} ms", 1e3)}
    lines = []
    for name, (fmt, scale) in units.items():
        lines.append(f"{name} = {fmt.format(getattr(parameters, name) * scale)}: {PARAMETER_SOURCES[name]}")
    return lines


ASSUMPTIONS = (
    "per op: time = max(FLOPs / (efficiency x peak), DRAM bytes / bandwidth) + a fixed cost per op that "
    "does work; views and copies that only move size-1 axes are free",
    "ANE peak is Apple's fp16 figure (int8-counted TOPS halved for A17 Pro/M4); bandwidths marked * in "
    "milpasses.analyze.chips are derived, not published; GPU peaks are Apple's for M1/M2, community figures elsewhere",
    f"CPU {CPU_FLOPS / TERA:g} TFLOPS on every chip (a round guess); every device shares the DRAM bandwidth",
    "every weight is read from DRAM once per inference; a gather reads only the rows it looks up",
    "on the ANE an activation no larger than the on-chip buffer stays on chip (Apple splits attention per "
    "head for this); larger ones are written to and read from DRAM; off the ANE every activation moves",
    f"on the ANE the last axis of every activation is padded to {ANE_ROW_ALIGNMENT} bytes (Apple)",
    "reshape/squeeze/expand_dims are free when the ANE's padded layout does not change; "
    "transpose is a copy unless it only moves size-1 axes",
    "on the ANE, linear/matmul/layer_norm/softmax/reductions over the last (width) axis of a "
    "rank >= 3 activation pay one relayout (read + write through DRAM, however small) of their input "
    "and output, because the ANE reduces over channels (Apple's channels-first principle; the cost "
    "is our assumption)",
    "a fixed cost per device partition and per switch between devices",
    "per-op FLOPs: 2 per multiply-add; elementwise 1 per output; gelu 8, softmax 5, "
    "layer_norm 8 per element",
    "a flexible (symbolic) dimension is counted as 1",
    "the parameters, each with its source: " + "; ".join(parameter_lines()),
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
    """A float tensor known at compile time, compressed or not; integer constants (axes, shapes,
    perms) are parameters."""
    known = var.val is not None or is_decompressed(var)
    return known and types.is_tensor(var.sym_type) and types.is_float(var.dtype)


def dense_bytes(var) -> int:
    return _elements(var) * _itemsize(var)


def weight_bytes(var) -> int:
    """Bytes a weight is read as: a compressed one at its stored size (the ANE expands
    palettized and int8 weights as it reads them)."""
    return compressed_bytes(var) if is_decompressed(var) else dense_bytes(var)


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
    tensors: tuple = ()  # the size of each activation read or written (activation_bytes is their sum)
    relayout_tensors: tuple = ()  # the sizes of the input and output a relayout copies
    launches: int = 0  # 1 for an op that does work, 0 for a free view

    @property
    def bytes(self) -> int:
        return self.activation_bytes + self.weight_bytes + self.relayout_bytes

    def dram_bytes(self, device: str, parameters: CostParameters = None) -> int:
        """Bytes that cross DRAM: weights, activations too large to stay on chip, and their relayouts."""
        if device != ANE:
            return self.bytes
        limit = (parameters or PARAMETERS).on_chip_bytes
        spilled = sum(t for t in self.tensors if t > limit)
        relayout = self.relayout_bytes  # a relayout goes through DRAM, however small the tensor
        return self.weight_bytes + spilled + relayout

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "OpCost":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


FREE = OpCost(0, 0, 0, 0)


def _gathered_weight_bytes(op) -> int:
    table, out = op.inputs.get("x"), op.outputs[0]
    if table is None or not is_weight(table):
        return 0
    return dense_bytes(out) * weight_bytes(table) // max(dense_bytes(table), 1)  # the rows read, as stored


def op_cost(op, device: str) -> OpCost:
    size = padded_bytes if device == ANE else dense_bytes
    if op.op_type in VIEW_OPS and (device != ANE or _layout_unchanged_on_ane(op)):
        return FREE
    if op.op_type == "transpose" and _transpose_is_view(op):
        return FREE
    inputs = op.get_flattened_inputs()
    activations = [v for v in inputs if v.val is None and not is_decompressed(v) and types.is_tensor(v.sym_type)]
    tensors = tuple(size(v) for v in activations) + tuple(size(v) for v in op.outputs if types.is_tensor(v.sym_type))
    if op.op_type in ("gather", "gather_nd", "gather_along_axis"):
        weights = _gathered_weight_bytes(op)
    else:
        weights = sum(weight_bytes(v) for v in inputs if is_weight(v))
    relayout_tensors = ()
    if device == ANE and op.op_type in LAST_AXIS_REDUCERS and _reduces_last_axis(op) and activations:
        relayout_tensors = (size(activations[0]), size(op.outputs[0]))
    return OpCost(flops(op), sum(tensors), weights, 2 * sum(relayout_tensors), tensors, relayout_tensors, 1)


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


def op_seconds(cost: OpCost, device: str, chip: Chip, parameters: CostParameters = None) -> float:
    parameters = parameters or PARAMETERS
    if not cost.launches:
        return 0.0
    peak = {ANE: chip.ane_fp16_flops * parameters.ane_efficiency,
            GPU: chip.gpu_flops * parameters.gpu_efficiency, CPU: CPU_FLOPS}[device]
    memory = cost.dram_bytes(device, parameters) / chip.dram_bytes_per_s
    return max(cost.flops / peak, memory) + cost.launches * parameters.op_seconds


def partition_seconds(partitions: int, parameters: CostParameters = None) -> tuple[float, float]:
    """(dispatch, switch) seconds for a program cut into ``partitions`` device partitions."""
    parameters = parameters or PARAMETERS
    return partitions * parameters.dispatch_seconds, max(partitions - 1, 0) * parameters.switch_seconds
