"""Stock DistilBERT-base through ane_pipeline(): the form Apple wrote by hand, reached by passes."""

from collections import Counter

import numpy as np
import pytest

from fixtures import families as F
from milpasses.analyze import analyze
from milpasses.passes.shared.bc1s import LAYOUT_OPS, layout_census
from milpasses.simulator import psnr, simulate

SEQ_LEN = 128
#: Apple's hand-written ANE DistilBERT, through the same coremltools pipeline (benchmarks/apple_form.py).
APPLE_NON_CONST_OPS = 538


@pytest.fixture(scope="module")
def distilbert():
    return F.distilbert_base_converted("ane", SEQ_LEN, valid_tokens=100)


def test_the_body_has_no_matmul_linear_or_reshape_and_attention_is_per_head(distilbert):
    mlmodel, _, _, config = distilbert
    ops = [op for op in mlmodel._mil_program.functions["main"].operations if op.op_type != "const"]
    counts = Counter(op.op_type for op in ops)
    assert counts["matmul"] == counts["linear"] == 0
    reshapes = [op for op in ops if op.op_type == "reshape"]
    # two, both in the input stage: the (B, S) padding mask to keys-first (B, S, 1, 1)
    # (transformers indexed it with a gather_nd), and the embedding rows, looked up channels-first
    # in the transposed table as (C, B, S), to (B, C, 1, S). Neither moves the sequence axis.
    assert sorted(op.outputs[0].shape for op in reshapes) == sorted([(1, config.dim, 1, SEQ_LEN), (1, SEQ_LEN, 1, 1)])
    softmaxes = [op for op in ops if op.op_type == "softmax"]
    assert len(softmaxes) == config.n_layers * config.n_heads == 72
    assert all(op.inputs["axis"].val == 1 for op in softmaxes)
    norms = [op for op in ops if op.op_type == "layer_norm"]
    assert len(norms) == 13 and all(op.inputs["axes"].val.tolist() == [1] for op in norms)
    assert len(ops) <= APPLE_NON_CONST_OPS


def test_layout_ops_are_the_two_boundaries_one_key_transpose_per_block_and_the_mask(distilbert):
    # MIL's einsum contracts axis -1 of one operand with axis -3 of the other, so K must be
    # transposed once per block (Apple's recipe does the same); the shared padding mask is
    # reshaped from its (B, S) input straight to keys-first (B, S, 1, 1), one op; the embeddings
    # enter by one reshape of rows looked up channels-first, so only the exit is a boundary.
    # Everything else stays in (B, C, 1, S). Issue 11's bar was 11 layout ops.
    mlmodel, _, _, config = distilbert
    function = mlmodel._mil_program.functions["main"]
    layout = [op for op in function.operations if op.op_type in LAYOUT_OPS]
    assert layout_census(function)["boundary"] == 2
    assert len(layout) == 2 + 1 + config.n_layers + 1 == 10


def test_fp16_output_matches_torch_on_the_valid_tokens(distilbert):
    mlmodel, inputs, expected, _ = distilbert
    actual = simulate(mlmodel, inputs)["last_hidden_state"]
    valid = inputs["attention_mask"].astype(bool)
    assert np.all(np.isfinite(actual))
    assert psnr(expected[valid], actual[valid]) >= 60.0


def test_one_input_stage_then_the_ane_and_no_query_by_key_mask(distilbert):
    mlmodel, _, _, _ = distilbert
    analysis = analyze(mlmodel._mil_program, "A15")
    assert [device for device, _ in analysis.partitions] == ["CPU", "ANE"]
    assert all(analysis.ops[[r.name for r in analysis.ops].index(name)].input_stage
               for name in analysis.partitions[0][1])
    mask_tensors = [shape for r in analysis.ops if r.input_stage for shape in r.output_shapes]
    assert mask_tensors and all(list(shape).count(SEQ_LEN) <= 1 for shape in mask_tensors)  # no Sq x Sk mask
