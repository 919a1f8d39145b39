"""The Apple chips the cost model knows: ANE fp16 peak, DRAM bandwidth and GPU peak (no heavy
imports, so the command line can list them before it loads coremltools)."""

from __future__ import annotations

from dataclasses import dataclass

GIGA, TERA = 1e9, 1e12


@dataclass(frozen=True)
class Chip:
    name: str
    ane_fp16_flops: float  # peak, FLOP/s
    dram_bytes_per_s: float
    is_mac: bool
    gpu_flops: float  # peak, FLOP/s
    bandwidth_derived: bool = False  # not published by Apple: derived from the memory type
    gpu_published: bool = True  # Apple quoted the GPU's TFLOPS; else a community figure


# ANE peak and DRAM bandwidth: Apple's launch figures for each chip. Apple quotes
# A17 Pro / M4 in int8-counted TOPS: fp16 is taken as half. A17 Pro's bandwidth is not published:
# taken as A16's (same LPDDR5 generation), marked derived. GPU peaks: Apple's launch
# figures for M1 (2.6 TFLOPS) and M2 (3.6); the others are community figures for the shipping
# core counts (marked), used only when an op is predicted on the GPU.
CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip("A14", 11 * TERA, 34 * GIGA, False, 0.8 * TERA, bandwidth_derived=True, gpu_published=False),
    Chip("M1", 11 * TERA, 68 * GIGA, True, 2.6 * TERA),
    Chip("A15", 15.8 * TERA, 34 * GIGA, False, 1.1 * TERA, bandwidth_derived=True, gpu_published=False),
    Chip("M2", 15.8 * TERA, 100 * GIGA, True, 3.6 * TERA),
    Chip("A16", 17 * TERA, 51 * GIGA, False, 1.8 * TERA, bandwidth_derived=True, gpu_published=False),
    Chip("M3", 18 * TERA, 100 * GIGA, True, 4.1 * TERA, gpu_published=False),
    Chip("A17Pro", 35 / 2 * TERA, 51 * GIGA, False, 2.1 * TERA, bandwidth_derived=True, gpu_published=False),
    Chip("M4", 38 / 2 * TERA, 120 * GIGA, True, 4.3 * TERA, gpu_published=False),
]}
DEFAULT_CHIP = "A15"
