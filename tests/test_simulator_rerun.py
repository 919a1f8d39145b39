"""Simulator.rerun: a run with one constant replaced, recomputing only what that constant changes."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import Simulator
from milpasses.simulator.core import SimulationError
from tests.helpers import mil_program

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 8)).astype(np.float32)
W1, W2 = RNG.normal(size=(8, 8)).astype(np.float32), RNG.normal(size=(8, 8)).astype(np.float32)


def _two_branches(x):
    left = mb.relu(x=mb.matmul(x=x, y=W1, name="left_matmul"), name="left")
    right = mb.sigmoid(x=mb.matmul(x=x, y=W2, name="right_matmul"), name="right")
    return mb.add(x=left, y=right, name="out")


def _weight_name(simulator, reader):
    op = next(op for op in simulator.function.operations if op.name == reader)
    return op.inputs["y"].name


def test_rerun_equals_a_full_run_with_the_constant_replaced_and_runs_only_what_it_changes(monkeypatch):
    simulator = Simulator(mil_program(_two_branches, x=X), emulate_fp16=False)
    values = simulator.values({"x": X})
    replaced = {_weight_name(simulator, "right_matmul"): W2 * 0.5}
    expected = simulator.run({"x": X}, constants=replaced)

    executed = []
    execute = Simulator._execute
    monkeypatch.setattr(Simulator, "_execute", lambda self, op, env: executed.append(op.name) or execute(self, op, env))
    actual = simulator.rerun(values, replaced)

    assert executed == ["right_matmul", "right", "out"]
    np.testing.assert_array_equal(actual["out"], expected["out"])
    assert not np.allclose(actual["out"], simulator.run({"x": X})["out"])


def test_rerun_with_nothing_replaced_runs_nothing_and_gives_the_run(monkeypatch):
    simulator = Simulator(mil_program(_two_branches, x=X), emulate_fp16=False)
    values = simulator.values({"x": X})
    monkeypatch.setattr(Simulator, "_execute", lambda self, op, env: pytest.fail(f"{op.name} ran again"))
    np.testing.assert_array_equal(simulator.rerun(values, {})["out"], values["out"])


def test_rerun_refuses_a_function_with_state():
    import coremltools as ct
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec(shape=(2, 8)), mb.StateTensorSpec(shape=(2, 8), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def accumulate(x, cache):
        total = mb.add(x=mb.read_state(input=cache), y=mb.cast(x=x, dtype="fp16"))
        mb.coreml_update_state(state=cache, value=total)
        return total

    simulator = Simulator(accumulate)
    values = simulator.values({"x": X}, state=simulator.make_state())
    with pytest.raises(SimulationError, match="state"):
        simulator.rerun(values, {})
