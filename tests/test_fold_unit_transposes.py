"""ane::fold_unit_transposes: a transpose of size-1 axes joins the reshape above it; others stay."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.simulator import simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::fold_unit_transposes"
MASK = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=np.float32)
KEYS_FIRST = [0, 3, 1, 2]


def padding_mask(mask, perm=KEYS_FIRST, shape=(2, 1, 1, 6), other=None):
    """transformers' key padding mask, turned keys-first as attention_to_einsum does."""
    keep = mb.cast(x=mb.reshape(x=mask, shape=list(shape)), dtype="bool")
    # transformers' select fills a full-shape constant per branch; a per-key bias checks that
    # constants are relabelled with the chain.
    zeros, bias = np.zeros(shape, np.float32), np.linspace(-1.0, 1.0, np.prod(shape), dtype=np.float32).reshape(shape)
    additive = mb.select(cond=mb.logical_and(x=np.ones((1, 1, 1, 1), bool), y=keep), a=zeros, b=np.full(shape, -1e4, np.float32))
    additive = mb.add(x=additive, y=bias)
    if other is not None:
        additive = mb.add(x=additive, y=other)
    return mb.transpose(x=additive, perm=perm)


def test_the_keys_first_mask_is_one_reshape():
    program = mil_program(lambda mask: padding_mask(mask), mask=MASK)
    _, after, reports = rewritten_matches_original(program, {"mask": MASK}, PASS)
    assert op_types(program) == ["reshape", "cast", "logical_and", "select", "add"]
    assert list(after.values())[0].shape == (2, 6, 1, 1)
    assert dict(reports[PASS].rewritten) == {"transpose folded into a reshape": 1}


def test_a_transpose_of_a_reshape_alone_folds_too():
    program = mil_program(lambda mask: mb.transpose(x=mb.reshape(x=mask, shape=[2, 1, 6]), perm=[0, 2, 1]), mask=MASK)
    rewritten_matches_original(program, {"mask": MASK}, PASS)
    assert op_types(program) == ["reshape"]


def test_a_mask_unsqueezed_by_expand_dims_folds_into_one_reshape():
    """A decode step's mask: built per key from the position, unsqueezed, then turned keys-first."""
    def build(mask):
        additive = mb.select(cond=mb.cast(x=mask, dtype="bool"), a=np.zeros((1, 6), np.float32),
                             b=np.full((1, 6), -1e4, np.float32))
        return mb.transpose(x=mb.expand_dims(x=additive, axes=[1, 2]), perm=KEYS_FIRST)

    row = MASK[:1]
    program = mil_program(build, mask=row)
    _, after, reports = rewritten_matches_original(program, {"mask": row}, PASS)
    assert op_types(program) == ["cast", "select", "reshape"]
    assert list(after.values())[0].shape == (1, 6, 1, 1)
    assert dict(reports[PASS].rewritten) == {"transpose folded into a reshape": 1}


def test_a_transpose_that_moves_data_is_no_candidate():
    program = mil_program(lambda mask: padding_mask(mask, perm=[0, 1, 3, 2], shape=(2, 1, 2, 3)), mask=MASK)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before and not reports[PASS].rewritten and not reports[PASS].skipped


LEFT_ALONE = [
    ("'add' reads more than one tensor", lambda mask, bias: padding_mask(mask, other=bias),
     {"mask": MASK, "bias": MASK.reshape(2, 1, 1, 6)}),
    ("no reshape above the transpose", lambda x: mb.transpose(x=mb.relu(x=x), perm=[0, 2, 1]),
     {"x": MASK.reshape(2, 6, 1)}),
]


@pytest.mark.parametrize("reason, build, inputs", LEFT_ALONE, ids=[case[0] for case in LEFT_ALONE])
def test_a_transpose_that_is_not_a_relabelled_reshape_is_left_alone(reason, build, inputs):
    program = mil_program(build, **inputs)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before
    assert reports[PASS].skipped[reason] == 1 and not reports[PASS].rewritten


def test_a_chain_with_another_reader_is_left_alone():
    def build(mask):
        keep = mb.cast(x=mb.reshape(x=mask, shape=[2, 1, 1, 6]), dtype="fp32")
        return mb.transpose(x=keep, perm=KEYS_FIRST), mb.relu(x=keep)

    program = mil_program(build, mask=MASK)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before and not reports[PASS].rewritten


def test_distilbert_keeps_one_layout_op_for_its_padding_mask():
    inputs = F.sample_inputs("distilbert")
    expected = F.torch_reference("distilbert", inputs)
    pipeline = ane_pipeline()
    mlmodel = F.convert("distilbert", "fp32", pass_pipeline=pipeline)
    assert dict(pipeline.reports[PASS].rewritten) == {"transpose folded into a reshape": 1}
    ops = mlmodel._mil_program.functions["main"].operations
    transposes = [op for op in ops if op.op_type == "transpose"]
    assert len(transposes) == 2 + F.LAYERS  # the region's enter and leave, one K per block
    valid = F.valid_tokens(inputs)
    actual = simulate(mlmodel, inputs)["last_hidden_state"]
    assert np.max(np.abs(actual[valid] - expected[valid])) / np.max(np.abs(expected[valid])) < 1e-5
