"""Small ONNX graphs through the frontend: the torch frontend's op forms come out, and the
simulated program computes what ONNX Runtime computes."""

import coremltools as ct
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from milpasses.frontend.onnx.fusions import fuse_layer_norms, fuse_tanh_gelus
from milpasses.frontend.onnx.translate import UnsupportedOp, to_program
from milpasses.simulator import Simulator, psnr

X = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)


def _graph(nodes, constants, output_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                              [helper.make_tensor_value_info("y", output_type, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_onnxruntime(model: onnx.ModelProto) -> np.ndarray:
    return onnxruntime.InferenceSession(model.SerializeToString()).run(None, {"x": X})[0]


def _translated(model: onnx.ModelProto, expected=None):
    """(the op types of the translated program, its output on X, ONNX Runtime's output on X, or
    ``expected``: ONNX Runtime's output of the graph before a fusion)."""
    expected = _run_onnxruntime(model) if expected is None else expected
    program = to_program(model, {"x": X.shape}, ct.target.iOS16)
    ops = [op.op_type for op in program.functions["main"].operations if op.op_type != "const"]
    return ops, Simulator(program).run({"x": X})["y"], expected


def test_decomposed_layer_norm_becomes_one_layer_norm():
    f32 = np.float32
    model = _graph([helper.make_node("ReduceMean", ["x"], ["m"], axes=[-1]), helper.make_node("Sub", ["x", "m"], ["d"]),
                    helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
                    helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["s"]),
                    helper.make_node("Div", ["d", "s"], ["n"]), helper.make_node("Mul", ["n", "gamma"], ["g"]),
                    helper.make_node("Add", ["g", "beta"], ["y"])],
                   {"two": f32(2), "eps": f32(1e-5), "gamma": np.linspace(0.5, 1.5, 8, dtype=f32),
                    "beta": np.linspace(-1, 1, 8, dtype=f32)})
    expected = _run_onnxruntime(model)
    assert fuse_layer_norms(model) == 1
    ops, got, expected = _translated(model, expected)
    assert ops == ["layer_norm"] and psnr(expected, got) > 100


@pytest.mark.parametrize("half_first", [False, True])
def test_tanh_gelu_written_out_becomes_one_gelu(half_first):
    f32 = np.float32
    cube = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"])]
    body = [helper.make_node("Mul", ["c", "x3"], ["cx3"]), helper.make_node("Add", ["x", "cx3"], ["inner"]),
            helper.make_node("Mul", ["k", "inner"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["t"]),
            helper.make_node("Add", ["one", "t"], ["t1"])]
    tail = ([helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "t1"], ["y"])] if half_first
            else [helper.make_node("Mul", ["x", "t1"], ["xt"]), helper.make_node("Mul", ["xt", "half"], ["y"])])
    model = _graph(cube + body + tail, {"c": f32(0.044715), "k": f32(0.7978846), "one": f32(1), "half": f32(0.5)})
    expected = _run_onnxruntime(model)
    assert fuse_tanh_gelus(model) == 1
    ops, got, expected = _translated(model, expected)
    assert ops == ["gelu"] and psnr(expected, got) > 100


def test_rsqrt_and_not_equal_take_the_torch_frontends_forms():
    model = _graph([helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"]),
                    helper.make_node("Div", ["one", "s"], ["r"]), helper.make_node("Equal", ["r", "r"], ["e"]),
                    helper.make_node("Not", ["e"], ["y"])], {"one": np.float32(1)}, TensorProto.BOOL)
    ops, got, expected = _translated(model)
    assert ops == ["abs", "rsqrt", "not_equal"] and np.array_equal(got, expected)


def test_matmul_by_a_constant_is_a_linear_and_shape_arithmetic_is_folded():
    weight = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Shape", ["h"], ["shape"]),
                    helper.make_node("Gather", ["shape", "zero"], ["b"]), helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
                    helper.make_node("Concat", ["b1", "minus_one"], ["target"], axis=0),
                    helper.make_node("Reshape", ["h", "target"], ["y"])],
                   {"w": weight, "zero": np.int64(0), "axes": np.array([0]), "minus_one": np.array([-1])})
    ops, got, expected = _translated(model)
    assert ops == ["linear", "reshape"] and psnr(expected, got) > 100


def test_an_op_without_a_translator_names_itself_and_its_node():
    model = _graph([helper.make_node("Hardmax", ["x"], ["y"], name="head/Hardmax")], {})
    with pytest.raises(UnsupportedOp, match=r"'head/Hardmax' has op type Hardmax"):
        to_program(model, {"x": X.shape}, ct.target.iOS16)
