"""ane::finite_masks: out-of-fp16-range mask constants become finite; nothing else changes."""

import logging

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses.simulator import simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, run_passes

PASS = "ane::finite_masks"
FLOAT32_MIN = np.finfo(np.float32).min
SCORES = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float16)
KEEP = np.array([[True, False, True], [False, False, False]])  # the second row is fully masked


def masked_softmax(fill):
    def build(scores, keep):
        return mb.softmax(x=mb.select(cond=keep, a=scores, b=np.float16(fill)), axis=-1)

    return build


def _constants(program):
    return [op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"]


@pytest.mark.parametrize("fill", [-np.inf, FLOAT32_MIN], ids=["-inf", "float32_min"])
def test_mask_fill_becomes_finite_and_fully_masked_rows_stop_being_nan(fill):
    program = mil_program(masked_softmax(fill), scores=SCORES, keep=KEEP)
    before = simulate(program, {"scores": SCORES, "keep": KEEP})
    reports = run_passes(program, PASS)
    after = simulate(program, {"scores": SCORES, "keep": KEEP})
    (probabilities_before,), (probabilities_after,) = before.values(), after.values()
    assert np.isnan(probabilities_before[1]).all()
    np.testing.assert_array_equal(probabilities_after[0], probabilities_before[0])  # unmasked: same
    np.testing.assert_allclose(probabilities_after[1], [1 / 3] * 3, rtol=1e-3)  # uniform, as PyTorch
    assert -1e4 in [float(v) for v in _constants(program) if np.ndim(v) == 0]
    assert dict(reports[PASS].rewritten) == {"mask constant": 1}
    assert op_types(program) == ["select", "softmax"]


def test_additive_mask_into_softmax_is_rewritten():
    mask = np.array([0.0, FLOAT32_MIN, 0.0], np.float32)
    scores = SCORES.astype(np.float32)
    program = mil_program(lambda scores: mb.softmax(x=mb.add(x=scores, y=mask), axis=-1), scores=scores)
    before = simulate(program, {"scores": scores})
    run_passes(program, PASS)
    after = simulate(program, {"scores": scores})
    np.testing.assert_array_equal(list(after.values())[0], list(before.values())[0])
    assert any(np.array_equal(v, [0.0, -1e4, 0.0]) for v in _constants(program))


def test_clip_bounds_become_the_fp16_limits():
    x = np.array([1.0, -2.0], np.float32)
    program = mil_program(lambda x: mb.clip(x=x, alpha=-np.inf, beta=np.float32(1e30)), x=x)
    run_passes(program, PASS)
    (clip,) = [op for op in program.functions["main"].operations if op.op_type == "clip"]
    assert (clip.inputs["alpha"].val, clip.inputs["beta"].val) == (-65504.0, 65504.0)


def test_a_mask_that_is_already_finite_stays_as_it_is():
    program = mil_program(masked_softmax(-1e4), scores=SCORES, keep=KEEP)
    constants = [np.copy(v) for v in _constants(program)]
    reports = run_passes(program, PASS)
    assert all(np.array_equal(a, b) for a, b in zip(_constants(program), constants))
    assert reports[PASS].sites_rewritten == 0 and reports[PASS].sites_skipped == 0


def test_a_large_weight_is_reported_not_clipped(caplog):
    weight = np.array([1.0, 1e5], np.float32)
    x = np.ones(2, np.float32)
    program = mil_program(lambda x: mb.mul(x=x, y=weight, name="scaled"), x=x)
    with caplog.at_level(logging.WARNING, logger="milpasses.passes"):
        reports = run_passes(program, PASS)
    assert any(np.array_equal(v, weight) for v in _constants(program))
    assert "beyond the fp16 range" in caplog.text and "['mul']" in caplog.text
    assert dict(reports[PASS].skipped) == {"constant beyond fp16 range that is not a mask": 1}


def test_an_infinite_constant_that_never_reaches_a_softmax_is_not_a_mask():
    x = np.ones(3, np.float32)
    program = mil_program(lambda x: mb.add(x=x, y=np.array([0.0, -np.inf, 1.0], np.float32)), x=x)
    reports = run_passes(program, PASS)
    assert reports[PASS].sites_rewritten == 0


def test_disabled_pass_changes_nothing():
    program = mil_program(masked_softmax(-np.inf), scores=SCORES, keep=KEEP)
    reports = run_passes(program, PASS, enabled=False)
    assert np.isnan(list(simulate(program, {"scores": SCORES, "keep": KEEP}).values())[0]).any()
    assert reports[PASS].sites_rewritten == 0


@pytest.mark.parametrize("value", [0.0, -70000.0, "low"])
def test_mask_value_must_be_finite_in_fp16_and_vanish_in_exp(value):
    from milpasses import ane_pipeline

    with pytest.raises(ValueError):
        ane_pipeline(mask_value=value)


def test_a_mask_under_sinks_and_the_row_maximum_is_rewritten():
    """GPT-OSS: sinks are concatenated to the masked scores, and the row maximum (torch's max,
    whose unused argmax the frontend keeps) is subtracted before the softmax. Found by the fuzzer:
    the reduce_max and the dead argmax kept a float32-min causal mask, inf in fp16."""
    causal = np.array([[0.0, FLOAT32_MIN], [0.0, 0.0]], np.float32)
    scores = np.array([[[1.0, 2.0], [0.5, -1.0]]], np.float32)

    def build(scores):
        masked = mb.add(x=scores, y=causal)
        joined = mb.concat(values=[masked, np.full((1, 2, 1), 0.3, np.float32)], axis=-1)
        mb.reduce_argmax(x=joined, axis=-1, keep_dims=True)
        shifted = mb.sub(x=joined, y=mb.reduce_max(x=joined, axes=[-1], keep_dims=True))
        return mb.slice_by_index(x=mb.softmax(x=shifted, axis=-1), begin=[0, 0, 0], end=[1, 2, 2])

    program = mil_program(build, scores=scores)
    before = simulate(program, {"scores": scores})
    reports = run_passes(program, PASS)
    after = simulate(program, {"scores": scores})
    assert dict(reports[PASS].rewritten) == {"mask constant": 1}
    assert all(np.isfinite(v).all() for v in _constants(program) if v is not None)
    np.testing.assert_allclose(*after.values(), *before.values(), rtol=1e-6)


def test_a_float32_min_floor_on_the_scores_becomes_the_fp16_limit():
    """XGLM: max(scores + mask, finfo.min) before the softmax. Found by the device-limit check
    (tests/test_attention_families.py): the floor was -inf in the fp16 program."""
    scores = np.array([[1.0, 2.0, -3.0], [0.5, -1.0, 2.0]], np.float32)
    mask = np.array([[0.0, -1e4, 0.0], [0.0, 0.0, 0.0]], np.float32)  # already finite

    def build(scores):
        floored = mb.maximum(x=mb.add(x=scores, y=mask), y=np.float32(FLOAT32_MIN))
        return mb.softmax(x=floored, axis=-1)

    program = mil_program(build, scores=scores)
    before = simulate(program, {"scores": scores})
    reports = run_passes(program, PASS)
    after = simulate(program, {"scores": scores})
    assert dict(reports[PASS].rewritten) == {"mask constant": 1}
    assert -65504.0 in [float(v) for v in _constants(program) if np.ndim(v) == 0]
    np.testing.assert_allclose(*after.values(), *before.values(), rtol=1e-6)
