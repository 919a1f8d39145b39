"""The Apple chips the cost model knows: ANE fp16 peak and DRAM bandwidth (no heavy imports, so
the command line can list them before it loads coremltools)."""

from __future__ import annotations

from dataclasses import dataclass

GIGA, TERA = 1e9, 1e12


@dataclass(frozen=True)
class Chip:
    name: str
    ane_fp16_flops: float  # peak, FLOP/s
    dram_bytes_per_s: float
    is_mac: bool
    bandwidth_derived: bool = False  # not published by Apple: derived from the memory type


# ANE peak and DRAM bandwidth from the roofline table in shared/ANE_NOTES.md. Apple quotes
# A17 Pro / M4 in int8-counted TOPS: fp16 is taken as half. A17 Pro's bandwidth is not in the
# table: taken as A16's (same LPDDR5 generation), marked derived.
CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip("A14", 11 * TERA, 34 * GIGA, False, bandwidth_derived=True),
    Chip("M1", 11 * TERA, 68 * GIGA, True),
    Chip("A15", 15.8 * TERA, 34 * GIGA, False, bandwidth_derived=True),
    Chip("M2", 15.8 * TERA, 100 * GIGA, True),
    Chip("A16", 17 * TERA, 51 * GIGA, False, bandwidth_derived=True),
    Chip("M3", 18 * TERA, 100 * GIGA, True),
    Chip("A17Pro", 35 / 2 * TERA, 51 * GIGA, False, bandwidth_derived=True),
    Chip("M4", 38 / 2 * TERA, 120 * GIGA, True),
]}
DEFAULT_CHIP = "A15"
