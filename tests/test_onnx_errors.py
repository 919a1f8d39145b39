"""Bad ONNX inputs to ``milpasses convert``: a one-line error naming the problem, exit 2, nothing
written; and their good twins (external data present, names Core ML renames) converted."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from milpasses.cli import main


def _model(op_type: str = "Relu", opset: int = 17, **attributes) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["h"]), helper.make_node(op_type, ["h"], ["y"], **attributes)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _not_onnx(directory):
    path = directory / "model.onnx"
    path.write_text("this is not a protobuf\n" * 10)
    return path


def _external_data_missing(directory):
    path = directory / "model.onnx"
    onnx.save(_model(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (directory / "model.onnx.data").unlink()
    return path


def _unsupported_op(directory):
    path = directory / "model.onnx"
    onnx.save(_model("Hardmax"), str(path))
    return path


def _old_opset(directory):
    path = directory / "model.onnx"
    onnx.save(_model(opset=12), str(path))
    return path


@pytest.mark.parametrize("make, expected", [
    (_not_onnx, "is not an ONNX model"),
    (_external_data_missing, "external data of"),
    (_unsupported_op, "Hardmax"),
    (_old_opset, "opset 12; milpasses reads opsets 14 to"),
])
def test_bad_onnx_input_is_one_line_exit_2_nothing_written(make, expected, tmp_path, capsys):
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    model_dir.mkdir()
    out_dir.mkdir()
    path = make(model_dir)
    assert main(["convert", str(path), "-o", str(out_dir / "m.mlpackage"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error
    assert list(out_dir.iterdir()) == []


def test_unsupported_op_names_the_node(tmp_path, capsys):
    path = _unsupported_op(tmp_path)
    assert main(["convert", str(tmp_path), "-o", str(tmp_path / "m.mlpackage"), "--quiet"]) == 2
    assert "node 'y' has op type Hardmax" in capsys.readouterr().err
    assert not (tmp_path / "m.mlpackage").exists() and path.exists()


def test_directory_with_external_data_converts(tmp_path, capsys):
    """The good twin of the missing-data case: the same directory, its data file kept."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(_model(), str(model_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    output = tmp_path / "m.mlpackage"
    assert main(["convert", str(model_dir), "-o", str(output), "--batch", "2", "--quiet"]) == 0
    report = json.loads((tmp_path / "m.report.json").read_text())
    assert report["inputs"] == {"x": [[2, 4]]} and report["outputs"] == ["y"] and report["verified"]
    assert output.is_dir() and capsys.readouterr().err == ""


def test_names_core_ml_does_not_allow_are_renamed_and_verified(tmp_path):
    graph = _model().graph
    graph.input[0].name, graph.node[0].input[0] = "input:0", "input:0"
    graph.output[0].name, graph.node[1].output[0] = "/model/y.1", "/model/y.1"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "odd.onnx"))
    assert main(["convert", str(tmp_path / "odd.onnx"), "-o", str(tmp_path / "odd.mlpackage"), "--quiet"]) == 0
    report = json.loads((tmp_path / "odd.report.json").read_text())
    assert report["inputs"] == {"input_0": [[1, 4]]} and report["outputs"] == ["_model_y_1"] and report["verified"]
    assert "renamed: input:0 -> input_0, /model/y.1 -> _model_y_1" in report["samples"]
