"""ane::attention_to_einsum: rewrites, leaves alone, preserves numerics, counts."""

from collections import Counter

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb

from milpasses import ane_pipeline
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

B, S, H, D = 2, 6, 2, 4
C = H * D
rng = np.random.default_rng(0)
X = rng.standard_normal((B, S, C)).astype(np.float32)
MASK = np.where(np.arange(S) < np.array([[S], [3]]), 0.0, -1e4).astype(np.float32).reshape(B, 1, 1, S)
WEIGHTS = {n: (rng.standard_normal((C, C)).astype(np.float32) * 0.3, rng.standard_normal(C).astype(np.float32))
           for n in "qkv"}
HEAD_GAMMA, HEAD_BETA = (rng.standard_normal(D).astype(np.float32) for _ in range(2))
PASS = "ane::attention_to_einsum"
TO_CONV = "ane::linear_to_conv"


def _heads(t, perm):
    return mb.transpose(x=mb.reshape(x=t, shape=[B, S, H, D]), perm=perm)


def _projection(x, name):
    weight, bias = WEIGHTS[name]
    return mb.linear(x=x, weight=weight, bias=bias)


def _int8_projection(x, name):
    """The projection with its weight stored as int8 per output channel, as ct.optimize.coreml writes it."""
    weight, bias = WEIGHTS[name]
    scale = np.abs(weight).max(axis=1, keepdims=True) / 127
    data = np.round(weight / scale).astype(np.int8)
    return mb.linear(x=x, weight=mb.constexpr_blockwise_shift_scale(data=data, scale=scale), bias=bias)


def attention(x, mask, scores_then=None, softmax_axis=-1, value_scale=None, projection=_projection):
    """Multi-head attention in the torch frontend's form; the keyword arguments break it."""
    q = _heads(projection(x, "q"), [0, 2, 1, 3])
    k = _heads(projection(x, "k"), [0, 2, 3, 1])
    v = _heads(projection(x, "v"), [0, 2, 1, 3])
    if value_scale == "layer_norm":
        v = mb.layer_norm(x=v, axes=[-2])
    elif value_scale == "head_norms":  # Persimmon's q/k LayerNorms over head_dim (K is (B, H, d, S))
        q = mb.layer_norm(x=q, axes=[-1], gamma=HEAD_GAMMA, beta=HEAD_BETA, epsilon=1e-5)
        k = mb.layer_norm(x=k, axes=[-2], epsilon=1e-5)
    elif value_scale is not None:
        v = mb.mul(x=v, y=np.float32(value_scale))
    scores = mb.add(x=mb.mul(x=mb.matmul(x=q, y=k), y=np.float32(D ** -0.5)), y=mask)
    if scores_then is not None:
        scores = scores_then(scores)
    weights = mb.softmax(x=scores, axis=softmax_axis)
    out = mb.transpose(x=mb.matmul(x=weights, y=v), perm=[0, 2, 1, 3])
    return mb.reshape(x=out, shape=[B, S, C])


def torch_attention(x, mask):
    t = {n: torch.from_numpy(x) @ torch.from_numpy(w).T + torch.from_numpy(b) for n, (w, b) in WEIGHTS.items()}
    q, k, v = (t[n].reshape(B, S, H, D).transpose(1, 2) for n in "qkv")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(mask))
    return out.transpose(1, 2).reshape(B, S, C).numpy()


def _program(**breakage):
    return mil_program(lambda x, mask: attention(x, mask, **breakage), x=X, mask=MASK)


def _main_ops(program):
    return list(program.functions["main"].operations)


def test_split_einsum_rewrites_each_head_and_computes_what_torch_does():
    program = _program()
    _, after, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS)
    np.testing.assert_allclose(next(iter(after.values())), torch_attention(X, MASK), rtol=1e-4, atol=1e-5)
    counts = Counter(op_types(program))
    assert counts["einsum"] == 2 * H and counts["softmax"] == H and counts["conv"] == 3
    assert counts["matmul"] == counts["reshape"] == counts["mul"] == 0  # the scale went into the Q conv
    assert counts["split"] == 3 and counts["concat"] == 1
    ops = _main_ops(program)
    assert all(op.inputs["axis"].val == 1 for op in ops if op.op_type == "softmax")
    assert {op.inputs["equation"].val for op in ops if op.op_type == "einsum"} == {"nchw,nwhu->nchu"}
    key_transposes = [op for op in ops if op.op_type == "transpose" and op.inputs["perm"].val.tolist() == [0, 3, 2, 1]]
    assert len(key_transposes) == 1
    assert dict(reports[PASS].rewritten) == {"attention": 1}
    assert reports[PASS].sites_skipped == 0


def test_scale_folds_into_a_compressed_q_projection_which_stays_compressed():
    program = mil_program(lambda x, mask: attention(x, mask, projection=_int8_projection), opset=ct.target.iOS18,
                          x=X, mask=MASK)
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS)
    assert dict(reports[PASS].rewritten) == {"attention": 1} and "mul" not in op_types(program)
    convs = [op for op in _main_ops(program) if op.op_type == "conv"]
    assert len(convs) == 3 and all(c.inputs["weight"].op.op_type == "constexpr_blockwise_shift_scale" for c in convs)
    dense = [op for op in _main_ops(program) if op.op_type == "const" and op.outputs[0].shape == (C, C, 1, 1)
             and np.issubdtype(op.outputs[0].val.dtype, np.floating)]
    assert dense == [], "a compressed weight was materialised"


def test_scale_stays_a_multiply_when_q_is_not_a_conv_output():
    program = _program()
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, PASS)
    assert Counter(op_types(program))["mul"] == 1 and "matmul" not in op_types(program)
    assert dict(reports[PASS].rewritten) == {"attention, scale as a multiply": 1}


def test_batched_mode_keeps_heads_together_in_one_einsum_pair():
    program = _program()
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS, mode="batched")
    counts = Counter(op_types(program))
    assert counts["einsum"] == 2 and counts["softmax"] == 1 and counts["matmul"] == 0
    assert reports[PASS].rewritten["attention"] == 1


@pytest.mark.parametrize("chunk, pieces", [(4, 2), (3, 2), (6, 1), (7, 1)])
def test_split_einsum_v2_chunks_queries_and_computes_the_remainder(chunk, pieces):
    program = _program()
    rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS, mode="split_einsum_v2", query_chunk=chunk)
    counts = Counter(op_types(program))
    assert counts["softmax"] == H * pieces and counts["einsum"] == 2 * H * pieces


def test_per_query_mask_is_cut_with_the_query_chunks():
    causal = np.triu(np.full((S, S), -1e4, dtype=np.float32), 1).reshape(1, 1, S, S)
    program = mil_program(lambda x, mask: attention(x, mask), x=X, mask=np.broadcast_to(causal, (B, 1, S, S)).copy())
    inputs = {"x": X, "mask": np.broadcast_to(causal, (B, 1, S, S)).copy()}
    rewritten_matches_original(program, inputs, TO_CONV, PASS, mode="split_einsum_v2", query_chunk=4)
    assert Counter(op_types(program))["softmax"] == 2 * H


def test_off_mode_changes_nothing():
    program = _program()
    run_passes(program, TO_CONV)
    before = op_types(program)
    reports = run_passes(program, PASS, mode="off")
    assert op_types(program) == before and not reports[PASS].rewritten


@pytest.mark.parametrize("variation", [
    {"scores_then": lambda s: mb.mul(x=s, y=np.float32(2.0))},  # a scale after the mask
    {"scores_then": lambda s: mb.mul(x=mb.tanh(x=mb.real_div(x=s, y=np.float32(3.0))), y=np.float32(3.0))},
    {"scores_then": lambda s: mb.clip(x=s, alpha=-50.0, beta=50.0)},
    {"value_scale": 2.0},
    {"value_scale": "head_norms"},
], ids=["scale_after_mask", "soft_cap", "clip", "scaled_values", "q_and_k_layer_norms"])
def test_score_epilogues_and_scaled_values_are_carried_per_head(variation):
    program = _program(**variation)
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS)
    assert reports[PASS].sites_rewritten == 1 and "matmul" not in op_types(program)


@pytest.mark.parametrize("breakage, reason", [
    ({"softmax_axis": -2}, "softmax is not over the last axis"),
    ({"scores_then": lambda s: mb.cumsum(x=s, axis=-1)}, "'cumsum' between the scores and the softmax has no rule"),
    ({"value_scale": "layer_norm"}, "'layer_norm' over axes other than head_dim"),
])
def test_leaves_alone_what_it_does_not_fully_recognise(breakage, reason):
    program = _program(**breakage)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before
    assert [r.split(" (at ")[0] for r in reports[PASS].skipped] == [reason]


def test_leaves_alone_scores_read_twice():
    def attention_with_scores_out(x, mask):
        kept = []
        out = attention(x, mask, scores_then=lambda s: kept.append(s) or s)
        return out, kept[0]

    program = mil_program(attention_with_scores_out, x=X, mask=MASK)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before
    assert dict(reports[PASS].skipped) == {"attention scores have several consumers": 1}


# Llama-style: rotary embedding on q and k, two K/V heads shared by four query heads.
Q_HEADS, KV_HEADS = 4, 2
POSITIONS = np.arange(S, dtype=np.float32)[:, None] / 10.0 ** (np.arange(D // 2, dtype=np.float32) / (D // 2))
ANGLES = np.concatenate([POSITIONS, POSITIONS], axis=-1)
COS, SIN = np.cos(ANGLES).reshape(1, 1, S, D), np.sin(ANGLES).reshape(1, 1, S, D)
XQ = rng.standard_normal((B, S, Q_HEADS * D)).astype(np.float32)
XKV = rng.standard_normal((B, S, KV_HEADS * D)).astype(np.float32)


def _rotate(t):
    first = mb.slice_by_index(x=t, begin=[0, 0, 0, 0], end=[0, 0, 0, D // 2], end_mask=[True, True, True, False])
    second = mb.slice_by_index(x=t, begin=[0, 0, 0, D // 2], end=[0, 0, 0, D], end_mask=[True, True, True, True])
    rotated = mb.concat(values=[mb.mul(x=second, y=np.float32(-1.0)), first], axis=-1)
    return mb.add(x=mb.mul(x=t, y=COS), y=mb.mul(x=rotated, y=SIN))


def _repeat_kv(t):
    tiled = mb.tile(x=mb.expand_dims(x=t, axes=[2]), reps=[1, 1, Q_HEADS // KV_HEADS, 1, 1])
    return mb.reshape(x=tiled, shape=[B, Q_HEADS, S, D])


def grouped_rotary_attention(q, k, v):
    def split_heads(t, heads):
        return mb.transpose(x=mb.reshape(x=t, shape=[B, S, heads, D]), perm=[0, 2, 1, 3])

    query = _rotate(split_heads(q, Q_HEADS))
    key = _repeat_kv(_rotate(split_heads(k, KV_HEADS)))
    value = _repeat_kv(split_heads(v, KV_HEADS))
    scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=np.float32(D ** -0.5))
    out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=value)
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, Q_HEADS * D])


@pytest.mark.parametrize("mode", ["split_einsum", "batched"])
def test_rotary_and_grouped_query_attention_are_rewritten_exactly(mode):
    program = mil_program(grouped_rotary_attention, q=XQ, k=XKV, v=XKV)
    _, _, reports = rewritten_matches_original(program, {"q": XQ, "k": XKV, "v": XKV}, PASS, mode=mode)
    counts = Counter(op_types(program))
    assert counts["matmul"] == counts["tile"] == counts["slice_by_index"] == 0
    assert dict(reports[PASS].rewritten) == {"attention (grouped-query), scale as a multiply": 1}
    if mode == "split_einsum":
        einsums = [op for op in _main_ops(program) if op.op_type == "einsum"]
        assert len(einsums) == 2 * Q_HEADS
        # Query heads 0 and 1 read K/V head 0, heads 2 and 3 read head 1: no repeated copy.
        assert len({op.inputs["values"][0].name for op in einsums}) == 2 * KV_HEADS


XFUSED = rng.standard_normal((B, S, (Q_HEADS + 2) * D)).astype(np.float32)


def multi_query_unit_axis_attention(x):
    """GPT-BigCode's form: the fused QKV gets a unit axis, (B, 1, S, C), before it is split;
    one K/V head is given its own unit axis and tiled to every query head."""
    q, k, v = mb.split(x=mb.expand_dims(x=x, axes=[1]), split_sizes=[Q_HEADS * D, D, D], axis=3)
    query = mb.transpose(x=mb.reshape(x=q, shape=[B, S, Q_HEADS, D]), perm=[0, 2, 1, 3])
    key, value = (mb.reshape(x=mb.tile(x=mb.expand_dims(x=t, axes=[2]), reps=[1, 1, Q_HEADS, 1, 1]),
                             shape=[B, Q_HEADS, S, D]) for t in (k, v))
    scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=np.float32(D ** -0.5))
    out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=value)
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, Q_HEADS * D])


def test_heads_split_after_a_unit_axis_and_one_tiled_kv_head_are_rewritten_exactly():
    program = mil_program(multi_query_unit_axis_attention, x=XFUSED)
    _, _, reports = rewritten_matches_original(program, {"x": XFUSED}, PASS)
    counts = Counter(op_types(program))
    assert counts["matmul"] == counts["tile"] == counts["reshape"] == 0
    assert dict(reports[PASS].rewritten) == {"attention (grouped-query), scale as a multiply": 1}


PATCH_TABLE = rng.standard_normal((S - 1, D)).astype(np.float32)


def patch_only_attention(x, mask):
    """DINOv3's form: a per-position table multiplies every token but the first (the class
    token), cut off the sequence and joined back."""
    def patches_scaled(t):
        cls, patches = mb.split(x=t, split_sizes=[1, S - 1], axis=-2)
        return mb.concat(values=[cls, mb.mul(x=patches, y=PATCH_TABLE)], axis=-2)

    q = patches_scaled(_heads(_projection(x, "q"), [0, 2, 1, 3]))
    k = patches_scaled(_heads(_projection(x, "k"), [0, 2, 1, 3]))
    v = _heads(_projection(x, "v"), [0, 2, 1, 3])
    scores = mb.add(x=mb.mul(x=mb.matmul(x=q, y=k, transpose_y=True), y=np.float32(D ** -0.5)), y=mask)
    out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, C])


def test_a_table_on_part_of_the_sequence_is_carried_by_sequence_splits():
    program = mil_program(patch_only_attention, x=X, mask=MASK)
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS)
    assert reports[PASS].sites_rewritten == 1 and "matmul" not in op_types(program)
    sequence_cuts = [op for op in _main_ops(program) if op.op_type == "split" and op.inputs["axis"].val == 3
                     and [out.shape[3] for out in op.outputs] == [1, S - 1]]
    assert len(sequence_cuts) == 2  # Q's and K's, on the (B, C, 1, S) sequence axis


def test_ios18_scaled_dot_product_attention_is_rewritten():
    def sdpa(x, mask):
        q, k, v = (_heads(_projection(x, n), [0, 2, 1, 3]) for n in "qkv")
        out = mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=mask)
        return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, C])

    program = mil_program(sdpa, opset=ct.target.iOS18, x=X, mask=MASK)
    _, after, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS)
    np.testing.assert_allclose(next(iter(after.values())), torch_attention(X, MASK), rtol=1e-4, atol=1e-5)
    assert "scaled_dot_product_attention" not in op_types(program)
    assert reports[PASS].rewritten["sdpa attention"] == 1


@pytest.mark.parametrize("options, message", [
    ({"attention": "fast"}, "option 'mode' must be one of"),
    ({"query_chunk": 0}, "option 'query_chunk' must be a positive integer"),
    ({"query_chunk": "many"}, "option 'query_chunk' must be a positive integer"),
])
def test_bad_options_are_refused_when_the_pipeline_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        ane_pipeline(**options)


def test_pipeline_options_reach_the_pass_and_do_not_leak_into_the_next_pipeline():
    batched = ane_pipeline(attention="batched", query_chunk=64)
    assert {o.option_name: o.option_val for o in batched.get_options(PASS)} == {
        "mode": "batched", "query_chunk": 64, "reports": batched.reports}
    fresh = ane_pipeline()
    assert [(o.option_name, o.option_val) for o in fresh.get_options(PASS)] == [("reports", fresh.reports)]


DP = 16  # head_dim long enough that half of a partial rotary is a run worth a split
PAIR_ANGLES = np.repeat(np.outer(np.arange(S), 1.0 / 10000 ** (np.arange(0, DP, 2) / DP)), 2, axis=1)
PAIR_COS, PAIR_SIN = (f(PAIR_ANGLES).astype(np.float32).reshape(1, 1, S, DP) for f in (np.cos, np.sin))
XQKV = rng.standard_normal((B, S, 3 * H * DP)).astype(np.float32)
FUSED = rng.standard_normal((3 * H * DP, 3 * H * DP)).astype(np.float32) * 0.3


def _rotate_every_two(t, cos, sin, rotary=DP):
    """GPT-J's rotary on the first ``rotary`` channels of each head: pairs (x0, x1) -> (-x1, x0)."""
    def channels(lo, hi, stride=1):
        return mb.slice_by_index(x=t, begin=[0, 0, 0, lo], end=[0, 0, 0, hi], stride=[1, 1, 1, stride],
                                 end_mask=[True, True, True, False])
    part = channels(0, rotary)
    evens, odds = channels(0, rotary, 2), channels(1, rotary, 2)
    pairs = mb.stack(values=[mb.mul(x=odds, y=np.float32(-1.0)), evens], axis=-1)
    rotated = mb.reshape(x=pairs, shape=[B, H, S, rotary])
    turned = mb.add(x=mb.mul(x=part, y=cos), y=mb.mul(x=rotated, y=sin))
    return turned if rotary == DP else mb.concat(values=[turned, channels(rotary, DP)], axis=-1)


def interleaved_rotary_attention(x, cos, sin, rotary=DP):
    """A fused QKV projection cut in three, GPT-J's interleaved rotary on q and k."""
    q, k, v = (mb.transpose(x=mb.reshape(x=t, shape=[B, S, H, DP]), perm=[0, 2, 1, 3])
               for t in mb.split(x=mb.linear(x=x, weight=FUSED), num_splits=3, axis=-1))
    query, key = (_rotate_every_two(t, cos, sin, rotary) for t in (q, k))
    scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=np.float32(DP ** -0.5))
    out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
    return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, H * DP])


@pytest.mark.parametrize("rotary", [DP, DP // 2], ids=["full", "partial"])
@pytest.mark.parametrize("tables", ["constant", "run-time"])
def test_interleaved_rotary_becomes_a_permutation_of_the_projection_rows(rotary, tables):
    cos, sin = PAIR_COS[..., :rotary], PAIR_SIN[..., :rotary]
    if tables == "constant":
        program = mil_program(lambda x: interleaved_rotary_attention(x, cos, sin, rotary), x=XQKV)
        inputs = {"x": XQKV}
    else:
        program = mil_program(lambda x, cos, sin: interleaved_rotary_attention(x, cos, sin, rotary),
                              x=XQKV, cos=cos, sin=sin)
        inputs = {"x": XQKV, "cos": cos, "sin": sin}
    _, _, reports = rewritten_matches_original(program, inputs, TO_CONV, PASS)
    assert dict(reports[PASS].rewritten) == {"attention, head order folded into the Q/K projections": 1}
    convs = [op for op in _main_ops(program) if op.op_type == "conv"]
    # The projection, and for run-time tables one channel permutation of each (shared by every head);
    # no per-head selection conv gathers even and odd channels.
    assert len(convs) == (1 if tables == "constant" else 3)
    assert all(op.inputs["groups"].val == 1 for op in convs)
    assert "slice_by_index" not in op_types(program) and "stack" not in op_types(program)


def test_a_projection_shared_with_the_values_is_not_permuted():
    def one_root_for_q_k_and_v(x):
        fused = mb.reshape(x=mb.linear(x=x, weight=FUSED), shape=[B, S, 3, H, DP])
        q, k, v = (mb.squeeze(x=t, axes=[0])
                   for t in mb.split(x=mb.transpose(x=fused, perm=[2, 0, 3, 1, 4]), num_splits=3, axis=0))
        query, key = (_rotate_every_two(t, PAIR_COS, PAIR_SIN) for t in (q, k))
        scores = mb.matmul(x=query, y=key, transpose_y=True)
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
        return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, H * DP])

    program = mil_program(one_root_for_q_k_and_v, x=XQKV)
    _, _, reports = rewritten_matches_original(program, {"x": XQKV}, TO_CONV, PASS)
    assert dict(reports[PASS].rewritten) == {"attention": 1}


SINKS = rng.standard_normal(H).astype(np.float32)


def sink_attention(x, mask, keep):
    """GPT-OSS's attention sinks: one learnt logit per head joins each query's scores, the
    scores are shifted by their maximum, and the sink's column is dropped after the softmax."""
    q = _heads(_projection(x, "q"), [0, 2, 1, 3])
    k = _heads(_projection(x, "k"), [0, 2, 3, 1])
    v = _heads(_projection(x, "v"), [0, 2, 1, 3])
    scores = mb.add(x=mb.mul(x=mb.matmul(x=q, y=k), y=np.float32(D ** -0.5)), y=mask)
    sinks = np.broadcast_to(SINKS.reshape(1, H, 1, 1), (B, H, S, 1)).copy()
    joined = mb.concat(values=[scores, sinks], axis=-1)
    shifted = mb.sub(x=joined, y=mb.reduce_max(x=joined, axes=[-1], keep_dims=True))
    weights = mb.slice_by_index(x=mb.softmax(x=shifted, axis=-1), begin=[0, 0, 0, keep[0]],
                                end=[B, H, S, keep[1]])
    out = mb.transpose(x=mb.matmul(x=weights, y=v), perm=[0, 2, 1, 3])
    return mb.reshape(x=out, shape=[B, S, C])


@pytest.mark.parametrize("mode", ["split_einsum", "batched"])
def test_attention_sinks_join_the_keys_and_leave_after_the_softmax(mode):
    program = mil_program(lambda x, mask: sink_attention(x, mask, (0, S)), x=X, mask=MASK)
    _, _, reports = rewritten_matches_original(program, {"x": X, "mask": MASK}, TO_CONV, PASS, mode=mode)
    assert reports[PASS].sites_rewritten == 1
    counts = Counter(op_types(program))
    assert counts["matmul"] == counts["reduce_max"] == 0
    softmaxes = [op for op in _main_ops(program) if op.op_type == "softmax"]
    assert all(op.inputs["axis"].val == 1 and op.outputs[0].shape[1] == S + 1 for op in softmaxes)


def test_sinks_whose_column_is_not_the_one_dropped_are_left_alone():
    program = mil_program(lambda x, mask: sink_attention(x, mask, (1, S + 1)), x=X, mask=MASK)
    reports = run_passes(program, TO_CONV, PASS)
    assert reports[PASS].sites_rewritten == 0
    assert list(reports[PASS].skipped) == ["the extra key columns are not dropped before the values"]


QG = rng.standard_normal((2 * C, C)).astype(np.float32) * 0.3


def gated_attention(x, shared_projection):
    """Qwen3-Next's gated output: o * sigmoid(gate) per head before the merge. The gate comes
    from a projection of its own, or shares Q's (each head's q and gate cut from one row)."""
    if shared_projection:
        both = mb.reshape(x=mb.linear(x=x, weight=QG), shape=[B, S, H, 2 * D])
        q, gate = mb.split(x=both, num_splits=2, axis=-1)
        q = mb.transpose(x=q, perm=[0, 2, 1, 3])
    else:
        q = _heads(_projection(x, "q"), [0, 2, 1, 3])
        gate = mb.reshape(x=mb.linear(x=x, weight=QG[:C]), shape=[B, S, H, D])
    k = _heads(_projection(x, "k"), [0, 2, 3, 1])
    v = _heads(_projection(x, "v"), [0, 2, 1, 3])
    scores = mb.mul(x=mb.matmul(x=q, y=k), y=np.float32(D ** -0.5))
    out = mb.transpose(x=mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v), perm=[0, 2, 1, 3])
    return mb.reshape(x=mb.mul(x=out, y=mb.sigmoid(x=gate)), shape=[B, S, C])


@pytest.mark.parametrize("shared_projection", [False, True], ids=["own projection", "shared with q"])
def test_an_output_gate_cut_into_heads_is_applied_to_the_merged_heads(shared_projection):
    program = mil_program(lambda x: gated_attention(x, shared_projection), x=X)
    _, _, reports = rewritten_matches_original(program, {"x": X}, TO_CONV, PASS)
    # q's scale cannot fold into a projection the gate also reads.
    kind = "attention, scale as a multiply" if shared_projection else "attention"
    assert dict(reports[PASS].rewritten) == {kind: 1}
    counts = Counter(op_types(program))
    assert counts["matmul"] == counts["reshape"] == 0 and counts["sigmoid"] == 1


def test_an_output_gate_not_cut_into_heads_is_left_alone():
    def gated_by_an_input(x, gate):
        q = _heads(_projection(x, "q"), [0, 2, 1, 3])
        k = _heads(_projection(x, "k"), [0, 2, 3, 1])
        v = _heads(_projection(x, "v"), [0, 2, 1, 3])
        out = mb.transpose(x=mb.matmul(x=mb.softmax(x=mb.matmul(x=q, y=k), axis=-1), y=v), perm=[0, 2, 1, 3])
        return mb.reshape(x=mb.mul(x=out, y=gate), shape=[B, S, C])

    gate = rng.standard_normal((B, S, H, D)).astype(np.float32)
    program = mil_program(gated_by_an_input, x=X, gate=gate)
    reports = run_passes(program, TO_CONV, PASS)
    assert reports[PASS].sites_rewritten == 0
    assert list(reports[PASS].skipped) == ["'mul' gates the attention output with a tensor not cut into heads"]


def test_an_operand_read_outside_the_attention_leaves_it_alone():
    """The rotated keys also feed another output: rewriting would keep their computation alive
    on projection rows the rewrite permutes, so the block is left as it was."""
    def attention_and_shifted_keys(x):
        q, k, v = (mb.transpose(x=mb.reshape(x=t, shape=[B, S, H, DP]), perm=[0, 2, 1, 3])
                   for t in mb.split(x=mb.linear(x=x, weight=FUSED), num_splits=3, axis=-1))
        query, key = (_rotate_every_two(t, PAIR_COS, PAIR_SIN) for t in (q, k))
        scores = mb.mul(x=mb.matmul(x=query, y=key, transpose_y=True), y=np.float32(DP ** -0.5))
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
        merged = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, H * DP])
        return merged, mb.add(x=key, y=np.float32(1.0))

    program = mil_program(attention_and_shifted_keys, x=XQKV)
    _, _, reports = rewritten_matches_original(program, {"x": XQKV}, TO_CONV, PASS)
    assert not reports[PASS].rewritten
    assert any("consumers outside it" in reason for reason in reports[PASS].skipped)
    assert "matmul" in op_types(program)


def test_an_operand_read_only_by_a_dead_op_is_rewritten():
    """An exporter's unused transpose of K (T5's ONNX export has one) reads the region, but
    nothing reads its result: no one can see the rewrite, so the block is still rewritten."""
    def attention_and_unused_keys(x):
        q, k, v = (mb.transpose(x=mb.reshape(x=t, shape=[B, S, H, DP]), perm=[0, 2, 1, 3])
                   for t in mb.split(x=mb.linear(x=x, weight=FUSED), num_splits=3, axis=-1))
        mb.transpose(x=k, perm=[0, 1, 3, 2])
        scores = mb.mul(x=mb.matmul(x=q, y=k, transpose_y=True), y=np.float32(DP ** -0.5))
        out = mb.matmul(x=mb.softmax(x=scores, axis=-1), y=v)
        return mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[B, S, H * DP])

    program = mil_program(attention_and_unused_keys, x=XQKV)
    _, _, reports = rewritten_matches_original(program, {"x": XQKV}, TO_CONV, PASS)
    assert reports[PASS].sites_rewritten == 1 and not reports[PASS].skipped
    assert "matmul" not in op_types(program)
