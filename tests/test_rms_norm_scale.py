"""ane::rms_norm_scale: RMSNorm stays exact and stops overflowing fp16."""

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from fixtures import families as F
from milpasses import ane_pipeline
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
    assert op_types(program) == ["abs", "reduce_max", "maximum", "real_div", "mul", "pow", "reduce_mean",
                                 "mul", "mul", "add", "rsqrt", "mul", "mul", "mul"]
    (peak,) = [op for op in program.functions["main"].operations if op.op_type == "reduce_max"]
    assert peak.inputs["axes"].val.tolist() == [-1] and peak.inputs["keep_dims"].val
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


def test_disabled_pass_changes_nothing():
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    program = mil_program(rms_norm(), x=x)
    before = op_types(program)
    assert run_passes(program, PASS, enabled=False)[PASS].sites_rewritten == 0
    assert op_types(program) == before


@pytest.mark.parametrize("name", ["llama", "qwen2", "t5_encoder"])
def test_family_with_a_residual_stream_near_300_keeps_its_fp16_accuracy(name):
    """The overflow stress on whole models: embeddings scaled to mean |x| = 300."""
    inputs = F.sample_inputs(name)
    valid = F.valid_tokens(inputs)
    model = F.build_model(name)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings.mul_(300.0 / embeddings.abs().mean())
    expected = F.torch_reference(name, inputs, model)[valid]
    guarded = simulate(F.convert(name, "fp16", pass_pipeline=ane_pipeline(), model=model), inputs)
    unguarded = simulate(F.convert(name, "fp16", pass_pipeline=ane_pipeline(guard_rms_norm=False), model=model),
                         inputs)
    unstressed = psnr(F.torch_reference(name, inputs)[valid],
                      simulate(F.convert(name, "fp16", pass_pipeline=ane_pipeline()), inputs)["last_hidden_state"][valid])
    assert np.isfinite(guarded["last_hidden_state"]).all()
    assert psnr(expected, guarded["last_hidden_state"][valid]) >= unstressed - 1.0
    assert psnr(expected, unguarded["last_hidden_state"][valid]) < 20.0
