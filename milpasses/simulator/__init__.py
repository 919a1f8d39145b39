"""Run converted MIL programs on Linux, where Core ML itself cannot run."""

from milpasses.simulator.core import (
    InputMismatchError,
    RangeObserver,
    SimulationError,
    Simulator,
    UnsupportedOpError,
    is_decompression,
    load_program,
    psnr,
    simulate,
)

__all__ = [
    "InputMismatchError", "RangeObserver", "SimulationError", "Simulator", "UnsupportedOpError",
    "is_decompression", "load_program", "psnr", "simulate",
]
