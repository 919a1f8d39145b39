"""What a frontend hands the route: one function of the package, as ``ct.convert`` reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Function:
    """One function of the package: the model coremltools reads (a traced ScriptModule, an
    ExportedProgram or a MIL Program) with its typed inputs, outputs and states (``ct.TensorType``,
    ``ct.StateType``); None where the model carries its own (a MIL Program)."""

    name: str  # "main", or the function's name in a multifunction package
    model: object
    inputs: list | None
    outputs: list | None
    states: list = field(default_factory=list)
