"""macOS only: the device and cost Core ML itself plans for each op (coremltools' MLComputePlan),
to set beside the predictions. Core ML's runtime does not exist elsewhere."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

DEVICE_NAMES = {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", "MLNeuralEngineComputeDevice": "ANE"}


class PlanUnavailable(RuntimeError):
    """MLComputePlan cannot run here."""


def require_macos() -> None:
    if sys.platform != "darwin":
        raise PlanUnavailable(
            f"--device needs macOS: Core ML's MLComputePlan runs only there (this is {sys.platform}); "
            f"drop --device to get the predictions alone")


def device_plan(package: Path, compute_units: str = "ALL") -> dict[str, tuple[str | None, float | None]]:
    """{first output name of each op: (preferred device, estimated share of the model's cost)}
    for the ``main`` function of a saved ``.mlpackage``, from Core ML's compute plan. ``ALL``
    compute units by default, as the predictions assume (fp32 ops go to the GPU)."""
    require_macos()
    import coremltools as ct
    from coremltools.models.compute_plan import MLComputePlan

    with tempfile.TemporaryDirectory(prefix="milpasses-plan-") as scratch:
        compiled = ct.models.utils.compile_model(str(package), str(Path(scratch) / "model.mlmodelc"))
        plan = MLComputePlan.load_from_path(compiled, compute_units=getattr(ct.ComputeUnit, compute_units))
        program = plan.model_structure.program
        if program is None:
            raise PlanUnavailable(f"{package} is not an ML Program")
        result = {}
        for operation in program.functions["main"].block.operations:
            if not operation.outputs:
                continue
            usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
            cost = plan.get_estimated_cost_for_mlprogram_operation(operation)
            device = None if usage is None else DEVICE_NAMES.get(type(usage.preferred_compute_device).__name__)
            result[operation.outputs[0].name] = (device, None if cost is None else cost.weight)
        return result


def agreement(predicted: dict[str, str], planned: dict[str, tuple[str | None, float | None]]) -> tuple[int, int]:
    """(ops where the prediction matches Core ML's plan, ops Core ML placed on a device)."""
    compared = [(device, planned[name][0]) for name, device in predicted.items()
                if name in planned and planned[name][0] is not None]
    return sum(a == b for a, b in compared), len(compared)
