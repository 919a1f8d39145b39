"""Run converted MIL programs on Linux, where Core ML itself cannot run."""

from milpasses.simulator.fp16 import DeviceNumerics, InternalOverflow
from milpasses.simulator.core import (
    InputMismatchError,
    RangeObserver,
    SimulationError,
    Simulator,
    UnsupportedOpError,
    device_numerics,
    is_decompression,
    load_program,
    psnr,
    simulate,
)

__all__ = [
    "DeviceNumerics", "InputMismatchError", "InternalOverflow", "RangeObserver", "SimulationError", "Simulator",
    "UnsupportedOpError", "device_numerics", "is_decompression", "load_program", "psnr", "simulate",
]
