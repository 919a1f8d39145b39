"""ane::linear_to_conv: rewrites, leaves alone, preserves numerics, counts."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

rng = np.random.default_rng(0)
W = rng.standard_normal((6, 4)).astype(np.float32)
B = rng.standard_normal(6).astype(np.float32)
X3 = rng.standard_normal((2, 5, 4)).astype(np.float32)
X2 = X3[0]
BOUNDED_CONV = ["transpose", "expand_dims", "conv", "squeeze", "transpose"]
PASS = "ane::linear_to_conv"


@pytest.mark.parametrize("x", [X3, X2], ids=["rank3", "rank2"])
def test_linear_becomes_a_1x1_conv_with_its_bias(x):
    program = mil_program(lambda x: mb.relu(x=mb.linear(x=x, weight=W, bias=B)), x=x)
    _, _, reports = rewritten_matches_original(program, {"x": x}, PASS)
    assert op_types(program) == BOUNDED_CONV + ["relu"]
    conv = next(op for op in program.functions["main"].operations if op.op_type == "conv")
    assert conv.inputs["weight"].val.shape == (6, 4, 1, 1)
    np.testing.assert_array_equal(conv.inputs["bias"].val, B)
    assert conv.inputs["x"].shape == ((2, 4, 1, 5) if x.ndim == 3 else (1, 4, 1, 5))
    assert dict(reports[PASS].rewritten) == {"linear": 1}
    assert reports[PASS].ops_before == 2 and reports[PASS].ops_after == 6


def test_matmul_by_a_constant_becomes_a_conv_with_the_transposed_weight():
    program = mil_program(lambda x: mb.matmul(x=x, y=W.T.copy()), x=X3)
    _, _, reports = rewritten_matches_original(program, {"x": X3}, PASS)
    assert op_types(program) == BOUNDED_CONV
    conv = next(op for op in program.functions["main"].operations if op.op_type == "conv")
    np.testing.assert_array_equal(conv.inputs["weight"].val[:, :, 0, 0], W)
    assert dict(reports[PASS].rewritten) == {"matmul": 1}


def test_gpt2_flatten_around_the_linear_is_folded_away():
    def gpt2_conv1d(x):
        flat = mb.reshape(x=x, shape=[10, 4])
        return mb.reshape(x=mb.linear(x=flat, weight=W, bias=B), shape=[2, 5, 6])

    program = mil_program(gpt2_conv1d, x=X3)
    rewritten_matches_original(program, {"x": X3}, PASS)
    assert op_types(program) == BOUNDED_CONV


def test_flatten_from_a_rank4_source_becomes_one_reshape_to_rank3():
    heads = X3.reshape(2, 5, 2, 2)

    def attention_output(x):
        flat = mb.reshape(x=x, shape=[10, 4])
        return mb.reshape(x=mb.linear(x=flat, weight=W), shape=[2, 5, 6])

    program = mil_program(attention_output, x=heads)
    rewritten_matches_original(program, {"x": heads}, PASS)
    assert op_types(program) == ["reshape"] + BOUNDED_CONV


LEFT_ALONE = [
    ("matmul has no constant right operand", lambda x, y: mb.matmul(x=x, y=y),
     {"x": X3, "y": rng.standard_normal((2, 4, 3)).astype(np.float32)}),
    ("matmul has no constant right operand", lambda x: mb.matmul(x=W, y=x), {"x": X2.T.copy()}),
    ("matmul transposes its activation", lambda x: mb.matmul(x=x, y=W.copy(), transpose_x=True),
     {"x": rng.standard_normal((6, 5)).astype(np.float32)}),
    ("matmul constant has rank 3, not 2", lambda x: mb.matmul(x=x, y=np.ones((2, 4, 3), np.float32)),
     {"x": X3}),
    ("activation of rank 4, not 2 or 3", lambda x: mb.linear(x=x, weight=W), {"x": X3[None]}),
]


@pytest.mark.parametrize("reason, build, inputs", LEFT_ALONE, ids=[c[0] for c in LEFT_ALONE])
def test_unrecognised_sites_are_left_exactly_as_they_were(reason, build, inputs):
    program = mil_program(build, **inputs)
    before = op_types(program)
    _, _, reports = rewritten_matches_original(program, inputs, PASS)
    assert op_types(program) == before
    assert dict(reports[PASS].skipped) == {reason: 1}
    assert reports[PASS].sites_rewritten == 0


def test_include_matmul_false_leaves_matmuls():
    program = mil_program(lambda x: mb.matmul(x=mb.linear(x=x, weight=W), y=W), x=X3)
    reports = run_passes(program, PASS, include_matmul=False)
    assert op_types(program) == BOUNDED_CONV + ["matmul"]
    assert dict(reports[PASS].rewritten) == {"linear": 1}


def test_a_program_with_several_functions_is_left_alone():
    program = mil_program(lambda x: mb.linear(x=x, weight=W), x=X3)
    program.add_function("second", program.functions["main"])
    reports = run_passes(program, PASS)
    assert op_types(program) == ["linear"]
    assert list(reports[PASS].skipped) == ["the program has functions ['main', 'second'], not one 'main'"]


# ----------------------------------------------------------------------------- compressed weights

import copy  # noqa: E402

import coremltools as ct  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from milpasses.simulator import simulate  # noqa: E402

XH = rng.standard_normal((1, 5, 16)).astype(np.float16)
INDICES4 = rng.integers(0, 16, (8, 16)).astype(types.np_uint4_dtype)
GROUPED_LUT = rng.standard_normal((2, 1, 16, 1)).astype(np.float16)  # a table per 4 rows


def _lut_weight():
    return mb.constexpr_lut_to_dense(indices=INDICES4, lut=GROUPED_LUT, name="weight")


def _channel_scaled_lut_weight():
    lut = mb.constexpr_blockwise_shift_scale(data=rng.standard_normal((8, 1, 16, 1)).astype(np.float16),
                                             scale=rng.uniform(0.5, 2, (8, 1, 1, 1)).astype(np.float16))
    return mb.constexpr_lut_to_dense(indices=INDICES4, lut=lut, name="weight")


def _vector_lut_weight():
    indices = rng.integers(0, 4, (8, 8)).astype(types.np_uint2_dtype)
    return mb.constexpr_lut_to_dense(indices=indices, lut=rng.standard_normal((1, 1, 4, 2)).astype(np.float16),
                                     vector_axis=1, name="weight")


def _int8_weight():
    return mb.constexpr_blockwise_shift_scale(data=rng.integers(-127, 128, (8, 16)).astype(np.int8),
                                              scale=rng.uniform(0.01, 0.02, (8, 1)).astype(np.float16), name="weight")


def _compressed_rewrite(build, x=XH):
    program = mil_program(build, opset=ct.target.iOS18, x=x)
    before = simulate(copy.deepcopy(program), {"x": x})
    reports = run_passes(program, PASS)
    (after,), (expected,) = simulate(program, {"x": x}).values(), before.values()
    np.testing.assert_allclose(after, expected, rtol=2e-3, atol=2e-3)
    return program, reports[PASS]


def _conv_weight_op(program):
    conv = next(op for op in program.functions["main"].operations if op.op_type == "conv")
    return conv.inputs["weight"].op


@pytest.mark.parametrize("weight", [_lut_weight, _channel_scaled_lut_weight, _vector_lut_weight, _int8_weight],
                         ids=["grouped lut", "lut scaled per channel", "vector lut", "int8 per channel"])
def test_linear_with_a_compressed_weight_becomes_a_conv_reading_it_compressed(weight):
    program, report = _compressed_rewrite(lambda x: mb.linear(x=x, weight=weight()))
    decompressions = [t for t in op_types(program) if t.startswith("constexpr_")]
    assert [t for t in op_types(program) if not t.startswith("constexpr_")] == BOUNDED_CONV
    assert len(decompressions) == (2 if weight is _channel_scaled_lut_weight else 1), "the old weight was kept"
    weight_op = _conv_weight_op(program)
    assert weight_op.op_type.startswith("constexpr_") and weight_op.outputs[0].shape == (8, 16, 1, 1)
    stored = [op.outputs[0].shape for op in program.functions["main"].operations
              if op.op_type == "const" and types.is_float(op.outputs[0].dtype)]
    assert (8, 16, 1, 1) not in stored and (8, 16) not in stored, "the weight was materialised"
    assert dict(report.rewritten) == {"linear": 1}


def test_matmul_by_a_compressed_weight_takes_it_transposed_and_compressed():
    transposed = rng.integers(0, 16, (16, 8)).astype(types.np_uint4_dtype)
    lut = rng.standard_normal((1, 2, 16, 1)).astype(np.float16)
    program, report = _compressed_rewrite(
        lambda x: mb.matmul(x=x, y=mb.constexpr_lut_to_dense(indices=transposed, lut=lut)))
    weight_op = _conv_weight_op(program)
    assert weight_op.op_type == "constexpr_lut_to_dense" and weight_op.inputs["lut"].shape == (2, 1, 1, 1, 16, 1)
    assert dict(report.rewritten) == {"matmul": 1}


def test_a_compressed_weight_other_ops_read_is_left_alone():
    def shared(x):
        weight = _int8_weight()
        return mb.add(x=mb.linear(x=x, weight=weight), y=mb.reduce_sum(x=weight, axes=[1]))

    program, report = _compressed_rewrite(shared)
    assert "linear" in op_types(program)
    assert any("store it twice" in reason for reason in report.skipped)
