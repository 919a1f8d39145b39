"""An ONNX model at several sequence lengths (``--seq-lens``): one function per length in an iOS18
multifunction package, each verified against ONNX Runtime, each rewritten as the torch route
rewrites the model at one length; and the requests it refuses (exit 2, nothing written)."""

import json

import coremltools as ct
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures.families import convert as torch_convert
from fixtures.families import valid_tokens
from milpasses.cli import main
from milpasses.convert import convert, save
from milpasses.convert.coreml import histogram
from milpasses.pipeline import ane_pipeline
from milpasses.simulator import Simulator, load_program, psnr
from tests.onnx_helpers import ALLOWED_DIFFERENCES, export_family

LENGTHS = (8, 16)


def test_bert_at_two_lengths_is_one_package_verified_and_rewritten_at_each(tmp_path, capsys):
    path = tmp_path / "bert.onnx"
    inputs = export_family("bert", path)
    batch = len(inputs["input_ids"])
    mlmodel, report = convert(str(path), seq_lens=list(LENGTHS), batch=batch, target="iOS18")

    psnr_by_length = {e["seq_len"]: e["psnr_db"] for e in report.psnr if e["output"] == "last_hidden_state"}
    assert set(psnr_by_length) == set(LENGTHS) and min(psnr_by_length.values()) >= 60, psnr_by_length
    assert report.inputs["input_ids"] == [[batch, n] for n in LENGTHS]

    # Each length's program is the torch route's at one length (same target): same op histogram,
    # same sites rewritten.
    torch_ops = histogram(torch_convert("bert", "fp16", ane_pipeline(), target=ct.target.iOS18)._mil_program)
    names = [f"seq_len_{n}" for n in LENGTHS]
    assert list(report.functions) == names
    for name in names:
        ops = report.functions[name]["ops"]
        difference = {op: ops.get(op, 0) - torch_ops.get(op, 0) for op in set(ops) | set(torch_ops)}
        assert all(abs(n) <= ALLOWED_DIFFERENCES.get(op, 0) for op, n in difference.items()), (name, difference)
        assert report.functions[name]["sites_rewritten"] == report.functions[names[0]]["sites_rewritten"]
    assert report.functions[names[0]]["sites_rewritten"]["ane::attention_to_einsum"] == 2  # both layers

    # The saved package: both functions, the first length the default, each computing ONNX Runtime's result.
    package, _, _ = save(mlmodel, report, tmp_path / "bert.mlpackage")
    description = mlmodel.get_spec().description
    assert [f.name for f in description.functions] == names and description.defaultFunctionName == names[0]
    program = load_program(str(package))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for length, name in zip(LENGTHS, names):
        ids = rng.integers(3, 90, size=(batch, length)).astype(np.int32)
        mask = np.ones((batch, length), np.int32)
        mask[-1, length // 2:] = 0
        feeds = {"input_ids": ids, "attention_mask": mask}
        expected = session.run(None, {k: v.astype(np.int64) for k, v in feeds.items()})[0]
        simulated = Simulator(program, name).run(feeds)["last_hidden_state"]
        valid = valid_tokens(feeds)
        assert psnr(expected[valid], simulated[valid]) >= 60

    # analyze reads the default function (the first length) unless --function names another.
    for arguments, length in (([], LENGTHS[0]), (["--function", names[1]], LENGTHS[1])):
        assert main(["analyze", str(package), "--json", *arguments]) == 0
        (analysis,) = json.loads(capsys.readouterr().out)["analyses"].values()
        assert analysis["ops"][0]["input_shapes"][0] == [str(batch), str(length)]


def _graph(input_dims) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((4, 4), np.float32), "weight")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, input_dims)], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dims, target, expected", [
    (["batch", 4], "iOS18", "--seq-lens contradicts"),
    (["batch", "sequence", 4], "iOS16", "--seq-lens on an ONNX model needs --target iOS18"),
])
def test_seq_lens_refused_is_one_line_exit_2_nothing_written(dims, target, expected, tmp_path, capsys):
    path, out = tmp_path / "model.onnx", tmp_path / "out"
    onnx.save(_graph(dims), str(path))
    out.mkdir()
    assert main(["convert", str(path), "--seq-lens", "8,16", "--target", target,
                 "-o", str(out / "m.mlpackage"), "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error
    assert list(out.iterdir()) == []


def test_seeded_ids_stay_in_an_embedding_read_through_a_reshape(tmp_path):
    """GPT-2's export reshapes input_ids before its embedding: seeded ids must still fit the
    table (ONNX Runtime refuses an id past it), at every length."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32), "table")
    keep = numpy_helper.from_array(np.array([0, -1], np.int64), "keep")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["input_ids", "keep"], ["ids"]),
         helper.make_node("Gather", ["table", "ids"], ["embedded"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("embedded", TensorProto.FLOAT, ["batch", "sequence", 4])], [table, keep])
    path = tmp_path / "embedding.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _, report = convert(str(path), seq_lens=[4, 8], target="iOS18")
    assert report.passed and sorted(e["seq_len"] for e in report.psnr) == [4, 8], report.psnr
