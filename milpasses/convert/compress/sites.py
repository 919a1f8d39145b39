"""Where compression applies and how: the weight-reading ops and their roles, lookup tables
and int8 scales written by ``ct.optimize.coreml``, and the record of what was done."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SMALL_WEIGHT_ELEMENTS = 4096
EMBEDDING_MIN_BITS = 6
#: palettize4's lookup tables (``milpasses.convert.compress`` says what chose them).
TABLE_ROWS = 16
PALETTIZE4_TABLES = {"granularity": "per_grouped_channel", "group_size": TABLE_ROWS, "channel_axis": 0}
SENSITIVITY_PROJECTIONS = 8
#: palettize4's widths: 4 bits, and wider tables where they remove the most output noise per byte
#: (measured layer by layer on the calibration inputs), within a mean of PALETTIZE4_MEAN_BITS.
WIDENED_BITS = (4, 6, 8)
PALETTIZE4_MEAN_BITS = 5.0


@dataclass
class CompressionRecord:
    """What compression did, for the report: bits per compressed weight, bytes before and after."""

    scheme: str
    bits: dict[str, int] = field(default_factory=dict)  # weight-reading op -> bits (8 for int8)
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    calibration: str = ""
    plan: list[dict] = field(default_factory=list)  # auto: per-layer sensitivity and choice

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "bits": self.bits, "weight_bytes_before": self.weight_bytes_before,
                "weight_bytes_after": self.weight_bytes_after, "calibration": self.calibration,
                "plan": self.plan}


@dataclass(frozen=True)
class WeightSite:
    """An op computing with a large constant weight: a conv (a linear layer), a gather (an
    embedding table), a linear or a matmul by a constant."""

    op_name: str
    role: str  # "body", "embedding" or "head"
    elements: int


_WEIGHT_INPUT = {"conv": "weight", "linear": "weight", "gather": "x", "matmul": "y"}


def weight_sites(program) -> list[WeightSite]:
    """The ops whose weights compression touches, in program order, each with its role."""
    function = program.functions["main"]
    found = []
    for op in function.operations:
        name = _WEIGHT_INPUT.get(op.op_type)
        var = op.inputs.get(name) if name else None
        if var is None or var.op is None or var.op.op_type != "const" or var.val is None:
            continue
        if not np.issubdtype(np.asarray(var.val).dtype, np.floating) or var.val.size <= SMALL_WEIGHT_ELEMENTS:
            continue
        found.append((op, var))
    table_rows = {int(var.shape[0]) for op, var in found if op.op_type == "gather"}
    sites = []
    for op, var in found:
        if op.op_type == "gather":
            role = "embedding"
        elif int(var.shape[0 if op.op_type in ("conv", "linear") else -1]) in table_rows:
            role = "head"
        else:
            role = "body"
        sites.append(WeightSite(op.name, role, int(var.val.size)))
    return sites


def uniform_bits(sites: list[WeightSite], bits: int) -> dict[str, int]:
    """``bits`` for every weight; the embedding table and LM head two bits wider (6 at least, 8 at
    most); docs/cli.md gives the cosine this buys on MiniLM."""
    return {s.op_name: bits if s.role == "body" else min(8, max(bits + 2, EMBEDDING_MIN_BITS)) for s in sites}


def palettized(mlmodel, bits: dict[str, int]):
    """``mlmodel`` with each named op's weight in lookup tables of ``bits[op]`` bits: one per
    :data:`TABLE_ROWS` output channels below 8 bits, one per tensor at 8 and for embedding tables."""
    import coremltools.optimize.coreml as cto

    ops = {op.name: op for op in mlmodel._mil_program.functions["main"].operations}
    op_types = {name: op.op_type for name, op in ops.items()}

    def tables(name, n):
        # ct.optimize.coreml leaves a gathered table uncompressed when asked for grouped tables.
        # One table per tensor is clustered optimally (OptimalTable); a grouped table keeps
        # coremltools' k-means: the optimal one takes seconds per group.
        if n >= 8 or op_types.get(name) == "gather":
            return {"granularity": "per_tensor", "mode": "custom", "lut_function": OptimalTable(n)}
        return {"granularity": "per_grouped_channel", "group_size": TABLE_ROWS, "channel_axis": 0, "nbits": n}

    configs = {_weight_const(ops[name]): cto.OpPalettizerConfig(weight_threshold=SMALL_WEIGHT_ELEMENTS,
                                                               **tables(name, n))
               for name, n in bits.items()}
    return cto.palettize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))


class OptimalTable:
    """A lookup table of ``2**bits`` values by optimal one-dimensional k-means (coremltools' own
    kmeans1d), for ``ct.optimize.coreml``'s custom mode. Its k-means mode uses kmeans1d only for
    fp16 tensors of 10,000 elements or more; smaller tensors get scikit-learn's k-means with a
    loose tolerance and one start, which costs small tensors accuracy (docs/cli.md). A class, not
    a closure: the tables of a tensor's groups may be computed in worker processes."""

    def __init__(self, bits: int):
        self.bits = bits

    def __call__(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from coremltools.models.neural_network.quantization_utils import _get_kmeans_lookup_table_and_weight

        table, indices = _get_kmeans_lookup_table_and_weight(self.bits, weight, force_kmeans1d=True)
        return table.astype(weight.dtype), np.asarray(indices, dtype=np.uint8)


def _weight_const(op) -> str:
    """The name of the const op holding ``op``'s weight: configs name the constant, since one
    named by its reader would apply to every constant that op reads (a bias another op shares)."""
    return op.inputs[_WEIGHT_INPUT[op.op_type]].op.name


def int8_quantized(mlmodel, names):
    """``mlmodel`` with the named ops' weights int8, symmetric, one scale per output channel."""
    import coremltools.optimize.coreml as cto

    config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                         weight_threshold=SMALL_WEIGHT_ELEMENTS)
    ops = {op.name: op for op in mlmodel._mil_program.functions["main"].operations}
    configs = {_weight_const(ops[name]): config for name in names}
    return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(op_name_configs=configs))
