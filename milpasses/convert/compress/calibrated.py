"""palettize4, data-aware: each linear layer's output noise measured alone at 4, 6 and 8 bits on
the calibration inputs, widths chosen within a mean, then coremltools' sensitive k-means."""

from __future__ import annotations

import numpy as np

from milpasses.convert.compress.sites import (
    EMBEDDING_MIN_BITS,
    PALETTIZE4_MEAN_BITS,
    PALETTIZE4_TABLES,
    SENSITIVITY_PROJECTIONS,
    TABLE_ROWS,
    WIDENED_BITS,
    CompressionRecord,
)
from milpasses.convert.compress import sites
from milpasses.errors import ConversionError


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


def calibrated_palettization(loaded, options, texts, compression: CompressionRecord):
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
            if module.weight.numel() <= sites.SMALL_WEIGHT_ELEMENTS:
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
