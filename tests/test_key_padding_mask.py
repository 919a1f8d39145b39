"""ane::key_padding_mask: a mask equal for every query is built as (B, 1, 1, Sk); others stay."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.simulator import psnr, simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::key_padding_mask"
B, H, S = 2, 3, 6
SCORES = np.random.default_rng(0).standard_normal((B, H, S, S)).astype(np.float32)
KEY_VALID = np.array([[True] * S, [True] * 4 + [False] * 2]).reshape(B, 1, 1, S)


def hf_style_mask(query_rows: np.ndarray, bias=None):
    """transformers' shape: logical_and of a (1, 1, S, 1) query constant with the (B, 1, 1, S)
    key mask, then a select between two (B, 1, S, S) constants, added to the scores."""
    def build(scores, key_valid):
        keep = mb.logical_and(x=query_rows, y=key_valid)
        mask = mb.select(cond=keep, a=np.zeros((B, 1, S, S), np.float32),
                         b=np.full((B, 1, S, S), -1e4, np.float32), name="mask")
        summed = mb.add(x=scores, y=mask)
        if bias is not None:
            summed = mb.add(x=summed, y=bias)
        return mb.softmax(x=summed, axis=-1)

    return mil_program(build, scores=SCORES, key_valid=KEY_VALID)


def mask_shapes(program):
    return [tuple(op.outputs[0].shape) for op in program.functions["main"].operations
            if op.op_type in ("select", "logical_and")]


def test_a_padding_mask_becomes_one_query_row_with_the_same_probabilities():
    program = hf_style_mask(np.ones((1, 1, S, 1), bool))
    _, _, reports = rewritten_matches_original(program, {"scores": SCORES, "key_valid": KEY_VALID}, PASS)
    assert mask_shapes(program) == [(B, 1, 1, S), (B, 1, 1, S)]
    assert op_types(program) == ["logical_and", "select", "add", "softmax"]
    assert dict(reports[PASS].rewritten) == {"key-only mask": 1}


def test_a_causal_mask_is_left_alone():
    program = hf_style_mask(np.tril(np.ones((S, S), bool)).reshape(1, 1, S, S))
    reports = run_passes(program, PASS)
    assert mask_shapes(program) == [(B, 1, S, S), (B, 1, S, S)]
    assert dict(reports[PASS].skipped) == {
        "the mask depends on the query position (a causal or sliding-window mask)": 1}


def test_a_mask_that_is_a_model_input_is_left_alone():
    mask = np.zeros((B, 1, S, S), np.float32)
    program = mil_program(lambda scores, mask: mb.softmax(x=mb.add(x=scores, y=mask), axis=-1),
                          scores=SCORES, mask=mask)
    reports = run_passes(program, PASS)
    assert reports[PASS].sites_rewritten == 0
    assert "the mask is a model input: its rows cannot be proven equal" in reports[PASS].skipped


def test_a_mask_read_by_something_else_is_left_alone():
    def build(scores, key_valid):
        keep = mb.logical_and(x=np.ones((1, 1, S, 1), bool), y=key_valid)
        mask = mb.select(cond=keep, a=np.zeros((B, 1, S, S), np.float32), b=np.full((B, 1, S, S), -1e4, np.float32))
        return mb.softmax(x=mb.add(x=scores, y=mask), axis=-1), mb.relu(x=mask)

    program = mil_program(build, scores=SCORES, key_valid=KEY_VALID)
    reports = run_passes(program, PASS)
    assert reports[PASS].sites_rewritten == 0
    assert mask_shapes(program)[-1] == (B, 1, S, S)


def test_a_mask_from_a_non_elementwise_op_is_left_alone():
    def build(scores, key_valid):
        rows = mb.tile(x=mb.cast(x=key_valid, dtype="fp32"), reps=[1, 1, S, 1])
        return mb.softmax(x=mb.add(x=scores, y=mb.mul(x=mb.sub(x=rows, y=np.float32(1)), y=np.float32(1e4))),
                          axis=-1)

    program = mil_program(build, scores=SCORES, key_valid=KEY_VALID)
    reports = run_passes(program, PASS)
    assert reports[PASS].sites_rewritten == 0
    assert "the query axis comes from 'tile', not an elementwise op" in reports[PASS].skipped


def test_disabled_pass_changes_nothing():
    program = hf_style_mask(np.ones((1, 1, S, 1), bool))
    reports = run_passes(program, PASS, enabled=False)
    assert mask_shapes(program) == [(B, 1, S, S), (B, 1, S, S)]
    assert reports[PASS].sites_rewritten == 0


@pytest.mark.parametrize("name", ["distilbert", "gpt2", "qwen2"])
def test_fixture_families_padded_batch_against_torch(name):
    """Padded batches: fp32 exact, fp16 >= 60 dB; no S x S mask unless the model is causal."""
    inputs = F.sample_inputs(name)
    expected = F.torch_reference(name, inputs)
    valid = F.valid_tokens(inputs)
    causal = name in ("gpt2", "llama", "qwen2")
    for precision, floor in (("fp32", 100.0), ("fp16", 60.0)):
        pipeline = ane_pipeline()
        mlmodel = F.convert(name, precision, pass_pipeline=pipeline)
        actual = simulate(mlmodel, inputs)["last_hidden_state"]
        assert psnr(expected[valid], actual[valid]) >= floor
        report = pipeline.reports[PASS]
        assert report.sites_rewritten == (0 if causal else 1)
        square = [op for op in mlmodel._mil_program.functions["main"].operations
                  if op.op_type in ("select", "logical_and") and op.outputs[0].shape[-2:] == (F.SEQ_LEN, F.SEQ_LEN)]
        assert bool(square) == causal
