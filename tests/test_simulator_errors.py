"""One test per error the simulator can raise: each names the problem and what to do."""

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import InputMismatchError, SimulationError, UnsupportedOpError, simulate
from milpasses.simulator import ops
from tests.helpers import mil_program

X = np.zeros((2, 3), np.float32)


def _double(x):
    return mb.add(x=x, y=x, name="double")


def test_unknown_op_names_its_type_and_the_op():
    program = mil_program(lambda x: mb.reverse(x=x, axes=[-1], name="order"), x=X)
    with pytest.raises(UnsupportedOpError, match=r"MIL op 'reverse' \(op 'order'\)"):
        simulate(program, {"x": X})


def test_wrong_input_name_lists_what_the_program_expects():
    with pytest.raises(InputMismatchError, match=r"missing \['x'\], unexpected \['y'\].*x: shape \(2, 3\) fp32"):
        simulate(mil_program(_double, x=X), {"y": X})


def test_wrong_input_shape_lists_what_the_program_expects():
    with pytest.raises(InputMismatchError, match=r"'x' has shape \(3, 2\), the program expects \(2, 3\)"):
        simulate(mil_program(_double, x=X), {"x": X.T})


def test_wrong_input_dtype_lists_what_the_program_expects():
    with pytest.raises(InputMismatchError, match=r"'x' has dtype int32, the program expects fp32"):
        simulate(mil_program(_double, x=X), {"x": X.astype(np.int32)})


def test_wrong_output_shape_from_an_implementation_is_caught(monkeypatch):
    monkeypatch.setitem(ops.OP_IMPLEMENTATIONS, "add", lambda x, y: np.concatenate([x, y]))
    with pytest.raises(SimulationError, match=r"op 'double' \(add\) produced shape \(4, 3\).*\(2, 3\)"):
        simulate(mil_program(_double, x=X), {"x": X})


def test_missing_function_lists_the_functions():
    with pytest.raises(SimulationError, match=r"no function 'decode'; it has \['main'\]"):
        simulate(mil_program(_double, x=X), {"x": X}, function_name="decode")


def test_object_that_is_no_model():
    with pytest.raises(TypeError, match="pass a coremltools Program, an MLModel or the path"):
        simulate(42, {"x": X})


def test_missing_package_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Core ML package at"):
        simulate(tmp_path / "absent.mlpackage", {"x": X})


def test_path_that_is_not_a_package(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"is not an \.mlpackage directory"):
        simulate(path, {"x": X})


def test_neuralnetwork_model_is_refused():
    traced = torch.jit.trace(torch.nn.ReLU().eval(), torch.zeros(2, 3))
    model = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(2, 3))], convert_to="neuralnetwork",
                       skip_model_load=True)
    with pytest.raises(ValueError, match="only ML Program models can be simulated.*'neuralNetwork'"):
        simulate(model, {"x": X})
