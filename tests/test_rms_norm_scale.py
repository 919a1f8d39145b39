"""ane::rms_norm_scale: RMSNorm stays exact and stops overflowing fp16."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import psnr, simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::rms_norm_scale"
rng = np.random.default_rng(0)
GAIN = (1 + 0.1 * rng.standard_normal(8)).astype(np.float32)


def rms_norm(eps=1e-6, multiply_other=False, dtype=np.float32):
    def build(x):
        mean_square = mb.reduce_mean(x=mb.pow(x=x, y=dtype(2.0)), axes=[-1], keep_dims=True)
        scale = mb.rsqrt(x=mb.add(x=mean_square, y=dtype(eps)))
        return mb.mul(x=mb.mul(x=mb.relu(x=x) if multiply_other else x, y=scale), y=GAIN.astype(dtype))

    return build


def test_chain_is_rescaled_and_numerics_kept():
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    program = mil_program(rms_norm(), x=x)
    _, _, reports = rewritten_matches_original(program, {"x": x}, PASS)
    assert op_types(program) == ["mul", "pow", "reduce_mean", "add", "rsqrt", "mul", "mul", "mul"]
    (eps_add,) = [op for op in program.functions["main"].operations if op.op_type == "add"]
    assert eps_add.inputs["y"].val == pytest.approx(1e-6 / 16)
    assert dict(reports[PASS].rewritten) == {"rms_norm": 1}


def test_residual_stream_near_300_breaks_fp16_only_without_the_guard():
    """The overflow stress: x ** 2 > 65504 in fp16 once |x| > 256; the overflowed mean square
    is inf, its rsqrt 0, and the norm's output collapses to zeros."""
    x16 = (300 * rng.standard_normal((2, 3, 8))).astype(np.float16)
    x32 = x16.astype(np.float32)
    (expected,) = simulate(mil_program(rms_norm(), x=x32), {"x": x32}).values()
    unguarded = mil_program(rms_norm(dtype=np.float16), x=x16)
    (broken,) = simulate(unguarded, {"x": x16}).values()
    run_passes(unguarded, PASS)
    (fixed,) = simulate(unguarded, {"x": x16}).values()
    assert np.isfinite(expected).all() and psnr(expected, broken) < 10.0
    assert np.isfinite(fixed).all()
    assert psnr(expected, fixed) >= 60.0  # fp16 rounding only: the fp32 program's own PSNR is inf


def test_a_row_of_zeros_stays_zero():
    x = np.zeros((1, 2, 8), np.float16)
    program = mil_program(rms_norm(dtype=np.float16), x=x)
    run_passes(program, PASS)
    (out,) = simulate(program, {"x": x}).values()
    np.testing.assert_array_equal(out, 0)


LEFT_ALONE = [
    ("rsqrt does not scale the same activation", rms_norm(multiply_other=True)),
    ("power other than 2", lambda x: mb.pow(x=x, y=3.0)),
    ("square not averaged with keep_dims", lambda x: mb.reduce_mean(x=mb.pow(x=x, y=2.0), axes=[-1])),
]


@pytest.mark.parametrize("reason, build", LEFT_ALONE, ids=[c[0] for c in LEFT_ALONE])
def test_other_patterns_are_left_exactly_as_they_were(reason, build):
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    program = mil_program(build, x=x)
    before = op_types(program)
    _, _, reports = rewritten_matches_original(program, {"x": x}, PASS)
    assert op_types(program) == before
    assert dict(reports[PASS].skipped) == {reason: 1}


def test_disabled_and_bad_scale():
    from milpasses import ane_pipeline

    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    program = mil_program(rms_norm(), x=x)
    assert run_passes(program, PASS, enabled=False)[PASS].sites_rewritten == 0
    with pytest.raises(ValueError, match="power of two"):
        ane_pipeline(rms_norm_scale=10)
