"""Compressing: weights palettized or quantized in forms the Neural Engine runs.

- ``palettize8`` / ``palettize6``: lookup tables of 256 or 64 values (``ct.optimize.coreml``'s
  k-means, after conversion): at 6 bits one table per 16 output channels, at 8 one per tensor by
  optimal 1-D k-means (:class:`~milpasses.convert.compress.sites.OptimalTable`); no scale per
  output row.
- ``palettize4``: data-aware, before tracing. Each linear layer's output noise at 4, 6 and 8
  bits is measured alone on the calibration inputs (the verification samples, or
  ``--calibration FILE`` of texts); layers start at 4 bits and the widenings that remove the
  most noise per byte are taken up to a mean of :data:`PALETTIZE4_MEAN_BITS`. Then coremltools'
  ``optimize.torch`` sensitive k-means (SKM) palettizes each at its width, a table per 16 output
  channels, weighting each weight by how much the outputs move with it. The converted program
  carries the compressed weights through ``ane_pipeline()``. Grouped tables need iOS18.
- ``int8``: symmetric, one scale per output channel (the quantization the NE runs correctly).
- ``auto``: bits per layer from {8, 6, 4}, chosen by simulation (:mod:`milpasses.convert.compress.auto`).

Per-block integer weights are refused: Core ML runs them wrong or off the Neural Engine
(coremltools #2510). Weights of :data:`SMALL_WEIGHT_ELEMENTS` elements or fewer (norm gains, biases,
small tables) stay fp16; the token embedding table and an LM head (a projection to as many
channels as the table has rows) get two bits more than the body, 6 at least (ANEMLL keeps its
LM head at LUT6 beside LUT4 layers). The measurements behind each choice are in docs/cli.md
("Compression").
"""

from __future__ import annotations

from milpasses.convert.compress import auto
from milpasses.convert.compress.calibrated import calibrated_palettization, widened_layers
from milpasses.convert.compress.sites import (
    EMBEDDING_MIN_BITS,
    PALETTIZE4_MEAN_BITS,
    CompressionRecord,
    int8_quantized,
    palettized,
    uniform_bits,
    weight_sites,
)

__all__ = ["EMBEDDING_MIN_BITS", "PALETTIZE4_MEAN_BITS", "CompressionRecord", "calibrated_palettization", "compress",
           "palettized", "uniform_bits", "weight_sites", "widened_layers"]


def compress(mlmodel, scheme: str, compression: CompressionRecord, traced, loaded, options):
    """The converted model compressed by ``scheme`` (palettize4's weights arrive compressed
    already); records the weight bytes before and after in ``compression``."""
    from milpasses.weights import dense_bytes, stored_bytes

    compression.weight_bytes_before = dense_bytes(mlmodel._mil_program.functions["main"])
    sites = weight_sites(mlmodel._mil_program)
    if scheme == "int8":
        compression.bits = {s.op_name: 8 for s in sites}
        mlmodel = int8_quantized(mlmodel, [s.op_name for s in sites])
    elif scheme == "auto":
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
