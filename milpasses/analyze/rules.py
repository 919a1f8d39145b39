"""Rules that predict where Core ML will run a MIL op: the ANE, the GPU or the CPU.

Apple publishes no list of what the Neural Engine runs, and says support changes with chip,
OS and tensor size. Each rule here is a heuristic from public sources (Apple's documents and
code, reverse engineering, community measurements) with its confidence, its source and the scope where it is known to hold; none of them is certain.
A rule is a function ``rule(op, context) -> Prediction | None``: None when it does not apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import coremltools as ct
import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.weights import is_decompressed

ANE, GPU, CPU = "ANE", "GPU", "CPU"

# Confidence tags, strongest first.
DOCUMENTED = "documented"  # Apple said it: docs, the 2022 article, Apple's own code
REVERSE_ENGINEERED = "reverse-engineered"  # measured on the hardware or read out of the driver
COMMUNITY = "community"  # reported by users; plausible, unverified

APPLE_ARTICLE = "Apple, 'Deploying Transformers on the Apple Neural Engine' (2022)"

IPHONE_WEIGHT_LIMIT = 10**9  # about 1 GB per model on iPhone (Apple)
MAC_WEIGHT_LIMIT = 2 * 2**30  # a weight file over 2 GiB is refused on macOS (community)
MACOS27_WEIGHT_LIMIT = 2**30  # from macOS 27, a model over 1 GiB of weights runs on the CPU
MAX_ANE_DIMENSION = 16384
MAX_ANE_RANK = 5

GATHER_SCATTER = frozenset({
    "gather", "gather_nd", "gather_along_axis", "scatter", "scatter_nd", "scatter_along_axis",
})
CONTROL_FLOW = frozenset({"cond", "while_loop"})
ACTIVATION_PRODUCTS = frozenset({"matmul", "einsum"})


@dataclass(frozen=True)
class Prediction:
    device: str
    reason: str
    confidence: str
    source: str
    scope: str = "all chips and deployment targets"
    rule: str = ""


@dataclass(frozen=True)
class Context:
    """What a rule may need beyond the op: the program's deployment target, the chip being
    predicted for, the model's total weight bytes and whether its inputs are enumerated."""

    opset: object = ct.target.iOS16
    is_mac: bool = False
    weight_bytes: int = 0
    enumerated_inputs: frozenset = field(default_factory=frozenset)


def activation_vars(op) -> list:
    """The op's non-constant inputs and all its outputs."""
    inputs = [v for v in op.get_flattened_inputs() if v.val is None]
    return inputs + list(op.outputs)


def _tensors(vars_):
    return [v for v in vars_ if types.is_tensor(v.sym_type)]


def fp32_compute(op, context: Context) -> Prediction | None:
    if not any(v.dtype == types.fp32 for v in activation_vars(op)):
        return None
    return Prediction(GPU, "computes in fp32; the ANE computes in fp16 only", DOCUMENTED, APPLE_ARTICLE,
                      rule="fp32_compute")


def _state_write_offsets(op) -> list:
    """The run-time begin/end of a ``slice_update`` into what ``read_state`` read (a KV cache
    written at the step's position): index operands, not int32 data; ANEMLL runs this write
    on the ANE (community: ANEMLL's KV-cache state)."""
    x = op.inputs.get("x") if op.op_type == "slice_update" else None
    if x is None or x.op is None or x.op.op_type != "read_state":
        return []
    return [op.inputs[name] for name in ("begin", "end") if name in op.inputs]


def int32_tensors(op, context: Context) -> Prediction | None:
    wide_ints = (types.int32, types.int64, types.uint32, types.uint64)
    offsets = _state_write_offsets(op)
    if not any(v.dtype in wide_ints for v in activation_vars(op) if not any(v is o for o in offsets)):
        return None
    return Prediction(CPU, "reads or writes a 32/64-bit integer tensor; the ANE has no int32 arithmetic or casts",
                      REVERSE_ENGINEERED, "int32 arithmetic and casts run off the ANE (reverse-engineered; Apple's Core AI Neural Engine rules: fp16, int8 or int16 only)", rule="int32_tensors")


def rank_above_five(op, context: Context) -> Prediction | None:
    ranks = [len(v.shape) for v in _tensors(activation_vars(op))]
    if not ranks or max(ranks) <= MAX_ANE_RANK:
        return None
    return Prediction(CPU, f"a rank-{max(ranks)} tensor; the ANE takes rank 5 at most (rank 4 preferred)",
                      DOCUMENTED, "Apple ml-ane-transformers code and article", rule="rank_above_five")


def dimension_above_limit(op, context: Context) -> Prediction | None:
    dims = [int(d) for v in _tensors(activation_vars(op)) for d in v.shape if isinstance(d, (int, np.integer))]
    if not dims or max(dims) <= MAX_ANE_DIMENSION:
        return None
    return Prediction(GPU, f"a dimension of {max(dims)} exceeds the ANE's {MAX_ANE_DIMENSION}; split the op",
                      REVERSE_ENGINEERED, "espresso log 'Output blob dimensions exceed ANE limit'; Whisper/Anemll",
                      scope="at least A14/M1; newer chips may allow more", rule="dimension_above_limit")


def gather_scatter(op, context: Context) -> Prediction | None:
    if op.op_type not in GATHER_SCATTER:
        return None
    return Prediction(CPU, f"{op.op_type} (an indexed lookup) runs on the CPU", DOCUMENTED,
                      "Apple's DistilBERT: its 4 CPU ops of 606 are the embedding gathers",
                      scope="newer OS versions may keep small-table gathers on the ANE (community)",
                      rule="gather_scatter")


def runtime_offset_slice(op, context: Context) -> Prediction | None:
    offsets = {"slice_by_index": ("begin", "end"), "slice_by_size": ("begin", "size")}.get(op.op_type)
    if offsets is None or all(op.inputs[name].val is not None for name in offsets if name in op.inputs):
        return None
    return Prediction(CPU, "a slice whose offsets are computed at run time", COMMUNITY,
                      "slices at run-time offsets run on the CPU (Apple's DistilBERT report; community)", rule="runtime_offset_slice")


def control_flow(op, context: Context) -> Prediction | None:
    if op.op_type not in CONTROL_FLOW:
        return None
    return Prediction(CPU, f"control flow ({op.op_type}) runs on the CPU", DOCUMENTED, APPLE_ARTICLE,
                      rule="control_flow")


def flexible_shape(op, context: Context) -> Prediction | None:
    symbolic = [v.name for v in _tensors(activation_vars(op)) if any(not isinstance(d, (int, np.integer)) for d in v.shape)]
    if not symbolic:
        return None
    if context.enumerated_inputs:
        return None  # EnumeratedShapes compile one static program per shape
    return Prediction(GPU, "a shape only known at run time (RangeDim flexible input)", COMMUNITY,
                      "RangeDim usually falls off the ANE; EnumeratedShapes can stay (coremltools' flexible-shapes guide)",
                      rule="flexible_shape")


def activation_matmul_before_ios16(op, context: Context) -> Prediction | None:
    if op.op_type not in ACTIVATION_PRODUCTS or context.opset >= ct.target.iOS16:
        return None
    operands = [op.inputs.get(n) for n in ("x", "y")] if op.op_type == "matmul" else list(op.inputs["values"])
    if sum(v is not None and v.val is None for v in operands) < 2:
        return None
    return Prediction(GPU, f"{op.op_type} of two activations; the ANE runs these from iOS16 on",
                      DOCUMENTED, APPLE_ARTICLE + ": its einsums run on the ANE from iOS16",
                      scope=f"deployment targets before iOS16 (this program: {context.opset.name})",
                      rule="activation_matmul_before_ios16")


WEIGHT_FIX = ("compress the weights (milpasses convert --compress palettize6, palettize4 or auto) "
              "or split the model into parts that each fit")


def weights_too_large(op, context: Context) -> Prediction | None:
    """Weights (as stored: compressed ones at their compressed size) past what the OS keeps on
    the NE: 2 GiB on a Mac, 1 GiB from macOS 27, about 1 GB per model on iPhone."""
    reads_weights = any(types.is_tensor(v.sym_type) and types.is_float(v.dtype)
                        and (v.val is not None or is_decompressed(v)) for v in op.get_flattened_inputs())
    if not reads_weights:
        return None
    size = context.weight_bytes
    if context.is_mac and size > MAC_WEIGHT_LIMIT:
        return Prediction(GPU, f"model weights {size / 2**30:.2f} GiB exceed the 2 GiB a Mac loads; fix: {WEIGHT_FIX}",
                          COMMUNITY, "a weight file over 2 GiB is refused on macOS (community: eeANE)", scope="Mac",
                          rule="weights_too_large")
    if context.is_mac and size > MACOS27_WEIGHT_LIMIT:
        return Prediction(CPU, f"model weights {size / 2**30:.2f} GiB exceed 1 GiB: from macOS 27 such a model runs "
                          f"on the CPU; fix: {WEIGHT_FIX}", COMMUNITY,
                          "issue 13: macOS 27 moves models above 1 GiB of weights off the NE", scope="Mac, macOS 27",
                          rule="weights_too_large")
    if not context.is_mac and size > IPHONE_WEIGHT_LIMIT:
        return Prediction(GPU, f"model weights {size / 1e9:.2f} GB exceed about 1 GB per model on iPhone; "
                          f"fix: {WEIGHT_FIX}", DOCUMENTED, APPLE_ARTICLE, scope="iPhone (A-series)",
                          rule="weights_too_large")
    return None


#: Every rule, in the order their device wins when several apply.
RULES = (
    control_flow,
    gather_scatter,
    runtime_offset_slice,
    int32_tensors,
    rank_above_five,
    fp32_compute,
    flexible_shape,
    dimension_above_limit,
    activation_matmul_before_ios16,
    weights_too_large,
)

DEFAULT_PREDICTION = Prediction(
    ANE, "no known constraint moves it off the ANE", COMMUNITY,
    "Core ML prefers the ANE for fp16 ops it supports (" + APPLE_ARTICLE + ")", rule="default")


def predict(op, context: Context) -> list[Prediction]:
    """Every rule that applies to ``op``, the deciding one first; the ANE default when none does."""
    return [p for p in (rule(op, context) for rule in RULES) if p is not None] or [DEFAULT_PREDICTION]
