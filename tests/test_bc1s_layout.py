"""ane::bc1s_layout: the body runs in (B, C, 1, S), boundaries only at the region's edges."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

rng = np.random.default_rng(0)
C = 4
W1, W2 = (rng.standard_normal((C, C)).astype(np.float32) for _ in range(2))
G = rng.standard_normal(C).astype(np.float32)
X = rng.standard_normal((2, 5, C)).astype(np.float32)
PASSES = ("ane::linear_to_conv", "ane::bc1s_layout")
ENTER, LEAVE = ["transpose", "expand_dims"], ["squeeze", "transpose"]


def _ops(program, op_type):
    return [op for op in program.functions["main"].operations if op.op_type == op_type]


def residual_block(x):
    h = mb.add(x=x, y=mb.linear(x=x, weight=W1))
    n = mb.layer_norm(x=h, axes=[-1], gamma=G, beta=G)
    return mb.linear(x=mb.gelu(x=n, mode="TANH_APPROXIMATION"), weight=W2)


def rms_norm(x):
    variance = mb.reduce_mean(x=mb.pow(x=x, y=2.0), axes=[-1], keep_dims=True)
    scale = mb.rsqrt(x=mb.add(x=variance, y=1e-6))
    return mb.linear(x=mb.mul(x=mb.mul(x=x, y=scale), y=G), weight=W1)


def channel_slicing(x):
    a, b = mb.split(x=mb.linear(x=x, weight=W1), num_splits=2, axis=-1)
    joined = mb.concat(values=[b, a, b], axis=-1)
    window = mb.slice_by_index(x=joined, begin=[0, 0, 1], end=[0, 0, 5], end_mask=[True, True, False])
    return mb.linear(x=window, weight=W2)


def test_residual_block_runs_between_one_enter_and_one_leave():
    program = mil_program(residual_block, x=X)
    _, _, reports = rewritten_matches_original(program, {"x": X}, *PASSES)
    assert op_types(program) == ENTER + ["conv", "add", "layer_norm", "gelu", "conv"] + LEAVE
    (norm,) = _ops(program, "layer_norm")
    assert norm.inputs["axes"].val.tolist() == [1] and norm.inputs["x"].rank == 4
    np.testing.assert_array_equal(norm.inputs["gamma"].val, G)
    report = reports["ane::bc1s_layout"]
    assert dict(report.rewritten) == {"sunk add": 1, "sunk layer_norm": 1, "sunk gelu": 1,
                                      "cancelled boundary": 1, "merged duplicate boundary": 1}
    assert (report.ops_before, report.ops_after) == (13, 9)


def test_rms_norm_chain_reduces_over_the_channel_axis():
    program = mil_program(rms_norm, x=X)
    _, _, reports = rewritten_matches_original(program, {"x": X}, *PASSES)
    assert op_types(program) == ENTER + ["pow", "reduce_mean", "add", "rsqrt", "mul", "mul", "conv"] + LEAVE
    (mean,) = _ops(program, "reduce_mean")
    assert mean.inputs["axes"].val.tolist() == [1] and mean.outputs[0].shape == (2, 1, 1, 5)
    (weight_mul,) = [op for op in _ops(program, "mul") if op.inputs["y"].val is not None]
    assert weight_mul.inputs["y"].val.shape == (1, C, 1, 1)
    assert reports["ane::bc1s_layout"].rewritten["hoisted mul"] == 2


def test_split_concat_and_slice_move_to_the_channel_axis():
    program = mil_program(channel_slicing, x=X)
    rewritten_matches_original(program, {"x": X}, *PASSES)
    assert op_types(program) == ENTER + ["conv", "split", "concat", "slice_by_index", "conv"] + LEAVE
    assert _ops(program, "split")[0].inputs["axis"].val == 1
    assert _ops(program, "concat")[0].inputs["axis"].val == 1


def test_sequence_axis_concat_moves_to_the_last_axis():
    cls = rng.standard_normal((2, 1, C)).astype(np.float32)

    def prepend_token(x):
        return mb.linear(x=mb.concat(values=[cls, mb.linear(x=x, weight=W1)], axis=1), weight=W2)

    program = mil_program(prepend_token, x=X)
    rewritten_matches_original(program, {"x": X}, *PASSES)
    assert _ops(program, "concat")[0].inputs["axis"].val == 3
    assert op_types(program).count("transpose") == 2


LEFT_ALONE = [
    ("layer_norm over axes other than the last",
     lambda x: mb.layer_norm(x=mb.linear(x=x, weight=W1), axes=[1, 2]), "layer_norm"),
    ("output is not rank 3", lambda x: mb.reduce_sum(x=mb.linear(x=x, weight=W1), axes=[-1]), "reduce_sum"),
    ("operand of rank 1, 2 or above 3",
     lambda x: mb.add(x=mb.linear(x=x, weight=W1), y=mb.reduce_mean(x=x, axes=[0])), "add"),
    ("interleaved concat",
     lambda x: mb.concat(values=[mb.linear(x=x, weight=W1), x], axis=-1, interleave=True), "concat"),
    ("'cast' is not carried through the layout", lambda x: mb.cast(x=mb.linear(x=x, weight=W1), dtype="fp16"), "cast"),
]


@pytest.mark.parametrize("reason, build, op_type", LEFT_ALONE, ids=[c[0] for c in LEFT_ALONE])
def test_an_op_it_cannot_carry_stays_behind_the_boundary(reason, build, op_type):
    program = mil_program(build, x=X)
    _, _, reports = rewritten_matches_original(program, {"x": X}, *PASSES)
    (kept,) = _ops(program, op_type)
    assert all(v.rank <= 3 for v in kept.outputs)
    assert op_types(program)[:len(ENTER) + 1 + len(LEAVE)] == ENTER + ["conv"] + LEAVE
    assert dict(reports["ane::bc1s_layout"].skipped) == {reason: 1}
    assert reports["ane::bc1s_layout"].sites_rewritten == 0


def test_disabled_layout_keeps_each_conv_boundary():
    program = mil_program(residual_block, x=X)
    run_passes(program, "ane::linear_to_conv")
    reports = run_passes(program, "ane::bc1s_layout", enabled=False)
    assert op_types(program).count("transpose") == 4
    assert reports["ane::bc1s_layout"].sites_rewritten == 0


def test_model_output_keeps_its_name_shape_and_dtype():
    program = mil_program(residual_block, x=X)
    name = program.functions["main"].outputs[0].name
    run_passes(program, *PASSES)
    (output,) = program.functions["main"].outputs
    assert (output.name, output.shape) == (name, (2, 5, C))
