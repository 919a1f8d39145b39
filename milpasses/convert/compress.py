"""Compressing: weights palettized or quantized in forms the Neural Engine runs.

- ``palettize8`` / ``palettize6``: lookup tables of 256 or 64 values (``ct.optimize.coreml``'s
  k-means, after conversion). At 6 bits (and 4) one table per 16 output channels: per tensor,
  6 bits missed the 0.995 sentence-embedding cosine on MiniLM (0.9937), and a 64-entry table
  per 16 rows of 384 channels adds 3% to their indices. At 8 bits one per tensor (a 256-entry
  table per 16 rows would add 8%), by optimal 1-D k-means (see :class:`OptimalTable`). A scale
  per output row (iOS18) lifted the worst fixture family (qwen2, 44.3 to 46.7 dB) but cost
  MiniLM 2.5 dB at 8 bits (56.6 to 54.1, and coremltools then left its embedding table
  uncompressed) and 2.4 dB at 4, so it is not used.
- ``palettize4``: data-aware, before tracing. Each linear layer's output noise at 4, 6 and 8
  bits is measured alone on the calibration inputs (the verification samples, or
  ``--calibration FILE`` of texts); layers start at 4 bits and the widenings that remove the
  most noise per byte are taken up to a mean of :data:`PALETTIZE4_MEAN_BITS`. Then coremltools'
  ``optimize.torch`` sensitive k-means (SKM) palettizes each at its width, weighting each weight
  by how much the outputs move with it. The converted program carries the compressed weights
  through ``ane_pipeline()``. A table per 16 output channels: on MiniLM it gains 2.7 dB over
  one table per tensor at the same package size; the widening 4.0 dB more (38.4 dB), at 35% of
  the fp16 weights instead of 32%. Grouped tables need iOS18.
- ``int8``: symmetric, one scale per output channel (the quantization the NE runs correctly).
- ``auto``: bits per layer from {8, 6, 4}, chosen by simulation (:mod:`milpasses.convert.auto`).

Per-block integer weights are refused: Core ML runs them wrong or off the Neural Engine
(coremltools #2510). Weights of :data:`SMALL_WEIGHT_ELEMENTS` elements or fewer (norm gains, biases,
small tables) stay fp16; the token embedding table and an LM head (a projection to as many
channels as the table has rows) get two bits more than the body, 6 at least (ANEMLL keeps its
LM head at LUT6 beside LUT4 layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milpasses.errors import ConversionError

SCHEMES = ("palettize8", "palettize6", "palettize4", "int8", "auto")
SMALL_WEIGHT_ELEMENTS = 4096
EMBEDDING_MIN_BITS = 6
#: palettize4's lookup tables (see the module docstring for the measurement behind the choice).
TABLE_ROWS = 16
PALETTIZE4_TABLES = {"granularity": "per_grouped_channel", "group_size": TABLE_ROWS, "channel_axis": 0}
SENSITIVITY_PROJECTIONS = 8
#: palettize4's widths: 4 bits, and wider tables where they remove the most output noise per byte
#: (measured layer by layer on the calibration inputs), within a mean of PALETTIZE4_MEAN_BITS.
WIDENED_BITS = (4, 6, 8)
PALETTIZE4_MEAN_BITS = 5.0
DEFAULT_COMPRESSED_MIN_PSNR_DB = 40.0  # Apple's acceptance level for 4-bit palettization
_PER_BLOCK = re.compile(r"(u?int4|int8[-_]?block|block|per[-_]?block|c4w|w4a16)", re.IGNORECASE)


def check_scheme(scheme: str | None) -> str | None:
    """The scheme, or a ConversionError saying why it cannot be used and what to use instead."""
    if scheme is None or scheme in SCHEMES:
        return scheme
    if _PER_BLOCK.search(scheme):
        raise ConversionError(
            f"compression '{scheme}' is per-block integer quantization, which the Neural Engine does not run "
            f"(Core ML computes it wrong or moves it off the NE: coremltools #2510); use int8 (one scale per "
            f"output channel) or palettize4/palettize6 (lookup tables)")
    raise ConversionError(f"unknown compression '{scheme}'; choose one of {', '.join(SCHEMES)}")


def check_target(scheme: str | None, target: str) -> None:
    if scheme not in (None, "int8", "palettize8") and target != "iOS18":
        raise ConversionError(f"--compress {scheme} needs --target iOS18 (a lookup table per group of channels "
                              f"is an iOS18 form)")


def check_calibration(path, scheme: str | None) -> tuple[str, ...] | None:
    """The calibration texts of ``path`` (one per non-empty line), checked before any slow work."""
    if path is None:
        return None
    if scheme not in ("palettize4",):
        raise ConversionError("--calibration is read by --compress palettize4 only (the data-aware scheme)")
    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"calibration file {file} does not exist; give a text file, one sample a line")
    texts = tuple(line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip())
    if not texts:
        raise ConversionError(f"calibration file {file} has no text; give one sample a line")
    return texts


@dataclass
class Compression:
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
    most): at 6 bits everywhere MiniLM's sentence-embedding cosine is 0.9948, with the table at 8
    it clears 0.995."""
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
    loose tolerance and one start, which cost the fixtures up to 3 dB at 8 bits (bert 48.8 to
    51.8 dB). A class, not a closure: the tables of a tensor's groups
    may be computed in worker processes."""

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


def compress(mlmodel, scheme: str, compression: Compression, traced, loaded, options):
    """The converted model compressed by ``scheme`` (palettize4's weights arrive compressed
    already); records the weight bytes before and after in ``compression``."""
    from milpasses.weights import dense_bytes, stored_bytes

    compression.weight_bytes_before = dense_bytes(mlmodel._mil_program.functions["main"])
    sites = weight_sites(mlmodel._mil_program)
    if scheme == "int8":
        compression.bits = {s.op_name: 8 for s in sites}
        mlmodel = int8_quantized(mlmodel, [s.op_name for s in sites])
    elif scheme == "auto":
        from milpasses.convert import auto

        compression.bits, compression.plan = auto.plan(mlmodel, sites, traced, loaded, options)
        mlmodel = palettized(mlmodel, compression.bits)
    elif scheme == "palettize4":
        tables = {s.op_name: EMBEDDING_MIN_BITS for s in sites if s.role == "embedding"}
        compression.bits.update(tables)
        mlmodel = palettized(mlmodel, tables) if tables else mlmodel
    else:
        compression.bits = uniform_bits(sites, int(scheme.removeprefix("palettize")))
        mlmodel = palettized(mlmodel, compression.bits)
    compression.weight_bytes_after = stored_bytes(mlmodel._mil_program.functions["main"])
    return mlmodel


# ----------------------------------------------------------------------------- data-aware 4-bit


def calibration_inputs(loaded, options, texts: tuple[str, ...] | None) -> tuple[list[dict], str]:
    """Batches of one row each for calibration: the user's texts tokenized, else the verification samples."""
    from milpasses.convert.samples import as_tensors, sample_inputs, verification_rows

    length = loaded.lengths[-1]
    if texts is not None:
        if loaded.tokenizer is None:
            raise ConversionError("--calibration texts need the model's tokenizer, and this model has none")
        batch = loaded.tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                                 return_tensors="np")
        inputs = {n: (batch[n] if n in batch else np.zeros_like(batch["input_ids"])).astype(np.int32)
                  for n in loaded.input_names}
        what = f"{len(texts)} texts from the calibration file"
    else:
        inputs, _ = sample_inputs(loaded, options.task, verification_rows(options.batch), length)
        what = "the verification samples"
    tensors = dict(zip(inputs, as_tensors(inputs)))
    rows = len(next(iter(tensors.values())))
    return [{k: v[i:i + 1] for k, v in tensors.items()} for i in range(rows)], what


def _output_projection_loss():
    """A loss for sensitivity: the outputs projected on a random direction, new each call.
    The square of its gradient is, in expectation, the diagonal of J^T J, how much the outputs
    move with each weight, which is what an output-matching loss weighs; a loss against the
    model's own outputs would have zero gradient at its own weights."""
    import torch

    generator = torch.Generator().manual_seed(0)

    def loss(model, data):
        outputs = model(**data)
        tensors = outputs if isinstance(outputs, (tuple, list)) else tuple(outputs.values())
        return sum((t * torch.randn(t.shape, generator=generator)).sum()
                   for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())

    return loss


def _float_outputs(outputs) -> list:
    import torch

    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    tensors = outputs if isinstance(outputs, (tuple, list)) else tuple(outputs.values())
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _grouped_tables(weight, bits: int, iterations: int = 16):
    """``weight`` (out, in) through a lookup table of ``2**bits`` values per :data:`TABLE_ROWS`
    output rows, by a few Lloyd iterations from evenly spaced values, all groups at once. A cheap
    probe of how much a layer's outputs suffer at a width (coremltools' optimal 1-D k-means
    takes seconds per group); the weights converted are clustered by coremltools."""
    import torch

    rows = weight.shape[0]
    groups = -(-rows // TABLE_ROWS)
    padded = torch.nn.functional.pad(weight.detach().reshape(rows, -1), (0, 0, 0, groups * TABLE_ROWS - rows))
    values, order = padded.reshape(groups, -1).sort(dim=1)
    levels = 2 ** bits
    low, high = values[:, :1], values[:, -1:]
    centroids = low + (high - low) * (torch.arange(levels) + 0.5) / levels
    for step in range(iterations + 1):
        centroids = centroids.sort(dim=1).values
        index = torch.searchsorted(((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous(), values)
        if step == iterations:
            break
        sums = torch.zeros_like(centroids).scatter_add_(1, index, values)
        counts = torch.zeros_like(centroids).scatter_add_(1, index, torch.ones_like(values))
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    restored = torch.empty_like(values).scatter_(1, order, torch.gather(centroids, 1, index))
    return restored.reshape(groups * TABLE_ROWS, -1)[:rows].reshape(weight.shape)


def layer_noise(model, forward, batches, names: list[str], widths=WIDENED_BITS) -> dict[tuple[str, int], float]:
    """Per linear layer and width, the output noise when that layer alone is palettized (plain
    optimal k-means, a table per :data:`TABLE_ROWS` rows), in fp32 PyTorch on the calibration
    batches: each output ``forward`` returns, its squared error relative to its peak, summed.
    Noise from different layers adds, so this ranks where wider tables buy the most."""
    import torch

    modules = dict(model.named_modules())
    batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    with torch.no_grad():
        reference = _float_outputs(forward(batch))
        peaks = [float(r.abs().max()) ** 2 or 1.0 for r in reference]
        noise = {}
        for name in names:
            weight = modules[name].weight
            original = weight.detach().clone()
            for bits in widths:
                weight.copy_(_grouped_tables(original, bits))
                outputs = _float_outputs(forward(batch))
                noise[name, bits] = sum(float(((o - r) ** 2).mean()) / p for o, r, p in zip(outputs, reference, peaks))
            weight.copy_(original)
    return noise


def widened_layers(noise: dict[tuple[str, int], float], elements: dict[str, int]) -> dict[str, int]:
    """Bits per layer: 4 everywhere, then the step (4 to 6, 6 to 8) that removes the most noise
    per added byte, while the layers' mean stays within :data:`PALETTIZE4_MEAN_BITS`."""
    bits = {name: WIDENED_BITS[0] for name in elements}
    budget = sum(elements.values()) * (PALETTIZE4_MEAN_BITS - WIDENED_BITS[0])
    while True:
        steps = []
        for name, width in bits.items():
            if width == WIDENED_BITS[-1]:
                continue
            wider = WIDENED_BITS[WIDENED_BITS.index(width) + 1]
            cost = elements[name] * (wider - width)
            if cost <= budget:
                steps.append(((noise[name, width] - noise[name, wider]) / cost, name, wider, cost))
        if not steps:
            return bits
        _, name, wider, cost = max(steps)
        if noise[name, bits[name]] <= noise[name, wider]:
            return bits
        bits[name], budget = wider, budget - cost


def calibrated_palettization(loaded, options, texts, compression: Compression):
    """A copy of the torch model with its linear layers palettized to 4 bits by sensitive
    k-means (an LM head at :data:`EMBEDDING_MIN_BITS`); embedding tables are left to
    :func:`compress`, after conversion."""
    import torch
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    batches, compression.calibration = calibration_inputs(loaded, options, texts)
    model = loaded.model
    vocab = getattr(model.config, "vocab_size", None)
    wide = {"n_bits": EMBEDDING_MIN_BITS, "granularity": "per_tensor"}
    names, body = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            names[name] = None  # palettized after conversion: SKM's weighted k-means takes minutes on a vocabulary
        elif isinstance(module, torch.nn.Linear):
            if module.weight.numel() <= SMALL_WEIGHT_ELEMENTS:
                names[name] = None
            elif module.weight.shape[0] == vocab:
                names[name] = wide
            else:
                body[name] = module.weight.numel()
    # the noise of the outputs converted (a sentence embedding, not an unused pooler)
    from milpasses.convert.trace import _outputs
    from milpasses.frontend.tracing import TaskOutputs

    with torch.no_grad():
        produced = model(**batches[0])
    selected = TaskOutputs(model, loaded.input_names, tuple(_outputs(loaded, options, produced)), loaded.pooling).eval()
    noise = layer_noise(model, lambda batch: selected(*(batch[n] for n in loaded.input_names)), batches, list(body))
    bits = widened_layers(noise, body)
    names.update({name: {"n_bits": n, **PALETTIZE4_TABLES} for name, n in bits.items()})
    # each sample seen under several random directions: one direction per sample estimates the
    # squared-gradient sensitivity too noisily to weigh k-means by
    batches = [batch for batch in batches for _ in range(SENSITIVITY_PROJECTIONS)]
    config = SKMPalettizerConfig.from_dict({"module_name_configs": names, "calibration_nsamples": len(batches)})
    with torch.enable_grad():
        compressed = SKMPalettizer(model, config).compress(dataloader=batches, loss_fn=_output_projection_loss())
    compressed.eval()
    compression.bits = {name: spec["n_bits"] for name, spec in names.items() if spec is not None}
    return compressed
