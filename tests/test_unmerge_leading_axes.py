"""ane::unmerge_leading_axes: rewrites, leaves alone, preserves numerics, counts."""

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol

from fixtures import families as F
from milpasses.passes.report import PassReports
from milpasses.pipeline import INSERT_BEFORE
from milpasses.simulator import simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::unmerge_leading_axes"
rng = np.random.default_rng(0)
X = rng.standard_normal((2, 8, 32)).astype(np.float32)
W_UP = rng.standard_normal((64, 32)).astype(np.float32)
W_DOWN = rng.standard_normal((32, 64)).astype(np.float32)
GAMMA = rng.standard_normal(32).astype(np.float32)
PER_ROW = rng.standard_normal((16, 32)).astype(np.float32)


def opt_feed_forward(x):
    rows = mb.reshape(x=x, shape=[-1, 32])
    normed = mb.layer_norm(x=rows, axes=[-1], gamma=GAMMA, beta=GAMMA)
    up = mb.relu(x=mb.linear(x=normed, weight=W_UP))
    return mb.reshape(x=mb.add(x=rows, y=mb.linear(x=up, weight=W_DOWN)), shape=[2, 8, 32])


def _non_const_ops(program):
    return [op for op in program.functions["main"].operations if op.op_type != "const"]


def test_feed_forward_on_flattened_rows_runs_on_the_rank3_tensor():
    program = mil_program(opt_feed_forward, x=X)
    _, _, reports = rewritten_matches_original(program, {"x": X}, PASS)
    assert op_types(program) == ["layer_norm", "linear", "relu", "linear", "add"]
    assert all(op.outputs[0].rank == 3 for op in _non_const_ops(program))
    assert dict(reports[PASS].rewritten) == {"merged region": 1, "op unmerged": 5, "reshape removed": 2}
    assert reports[PASS].ops_removed == 2 and not reports[PASS].skipped


def test_every_rule_and_a_second_root_preserve_numerics():
    weight = rng.standard_normal((32, 8)).astype(np.float32)
    keep = rng.standard_normal((16, 8)) > 0

    def rows_everywhere(x, y):
        rows = mb.reshape(x=x, shape=[16, 32])  # known sizes: N = B * S
        centred = mb.sub(x=rows, y=mb.reduce_mean(x=rows, axes=[1], keep_dims=True))
        scaled = mb.add(x=mb.mul(x=mb.softmax(x=centred, axis=-1), y=PER_ROW), y=GAMMA[None])
        left, right = mb.split(x=mb.real_div(x=scaled, y=2.0), num_splits=2, axis=-1)
        joined = mb.concat(values=[right, left], axis=1)
        both = mb.add(x=joined, y=mb.reshape(x=y, shape=[-1, 32]))  # another flatten joins
        picked = mb.select(cond=keep, a=mb.matmul(x=both, y=weight), b=0.0)
        return mb.reshape(x=mb.cast(x=mb.cast(x=picked, dtype="fp16"), dtype="fp32"), shape=[2, 8, 8])

    inputs = {"x": X, "y": rng.standard_normal((2, 8, 32)).astype(np.float32)}
    program = mil_program(rows_everywhere, **inputs)
    _, _, reports = rewritten_matches_original(program, inputs, PASS)
    assert "reshape" not in op_types(program)
    assert all(v.rank == 3 for op in _non_const_ops(program) for v in op.outputs)
    assert dict(reports[PASS].rewritten) == {"merged region": 1, "op unmerged": 13, "reshape removed": 3}


HEADS_IN = {name: rng.standard_normal((2, 4, 8, 8)).astype(np.float32) for name in ("q", "k", "v")}
ALIBI = rng.standard_normal((8, 1, 8)).astype(np.float32)  # a bias per (batch, head), as Bloom's


def bmm_attention(q, k, v):
    """Attention as XGLM and GPT-NeoX-Japanese write it: heads merged with the batch, (B*H, S, d),
    Q scaled and K transposed after the merge (so neither merge reads the other's op directly)."""
    merged = [mb.reshape(x=t, shape=[8, 8, 8]) for t in (q, k, v)]
    scores = mb.matmul(x=mb.mul(x=merged[0], y=0.35), y=mb.transpose(x=merged[1], perm=[0, 2, 1]))
    weights = mb.softmax(x=mb.add(x=scores, y=ALIBI), axis=-1)
    return mb.reshape(x=mb.matmul(x=weights, y=merged[2]), shape=[2, 4, 8, 8])


def test_attention_on_heads_merged_with_the_batch_runs_on_rank4_heads():
    program = mil_program(bmm_attention, **HEADS_IN)
    _, _, reports = rewritten_matches_original(program, HEADS_IN, PASS)
    assert op_types(program) == ["mul", "transpose", "matmul", "add", "softmax", "matmul"]
    assert all(op.outputs[0].rank == 4 for op in _non_const_ops(program))
    assert dict(reports[PASS].rewritten) == {"merged region": 1, "op unmerged": 6, "reshape removed": 4}
    assert not reports[PASS].skipped


def _symbolic_program(build):
    spec = mb.TensorSpec(shape=(2, get_new_symbol(), 32))
    return mb.program(input_specs=[spec], opset_version=ct.target.iOS16)(build)


def _rows(x):
    return mb.reshape(x=x, shape=[-1, 32], name="rows")


def _block_output_rows(x):
    rows = _rows(x)
    return rows, mb.reshape(x=mb.relu(x=rows), shape=[2, 8, 32])


def _across_rows(x):
    rows = _rows(x)
    return mb.reshape(x=mb.add(x=rows, y=mb.reduce_sum(x=rows, axes=[0], keep_dims=True)), shape=[2, 8, 32])


LEFT_ALONE = [
    ("merged view 'rows' is a block output", _block_output_rows),
    ("'transpose' moves the merged axis (axis 0)",
     lambda x: mb.reshape(x=mb.transpose(x=_rows(x), perm=[1, 0]), shape=[2, 16, 16])),
    ("'reduce_sum' works across the merged axis (axis 0)", _across_rows),
    ("'reduce_sum' drops the reduced axis (keep_dims false)",
     lambda x: mb.reshape(x=mb.reduce_sum(x=_rows(x), axes=[-1]), shape=[2, 8])),
    ("merged view reshaped to (4, 4, 32), not (A, B, ...) with (A, B) = (2, 8)",
     lambda x: mb.reshape(x=mb.relu(x=_rows(x)), shape=[4, 4, 32])),
    ("a constant of shape (2, 16, 32) broadcasts the merged view to rank 3",
     lambda x: mb.reshape(x=mb.add(x=_rows(x), y=np.ones((2, 16, 32), np.float32)), shape=[4, 8, 32])),
    ("'add' mixes a merged view with 'y' from outside the region",
     lambda x, y: mb.reshape(x=mb.add(x=_rows(x), y=y), shape=[2, 8, 32])),
    ("matmul transposes the merged axis",
     lambda x: mb.reshape(x=mb.matmul(x=_rows(x), y=np.ones((16, 16), np.float32), transpose_x=True),
                          shape=[2, 16, 16])),
]


@pytest.mark.parametrize("reason, build", LEFT_ALONE, ids=[c[0] for c in LEFT_ALONE])
def test_a_region_that_breaks_a_precondition_is_left_exactly_as_it_was(reason, build):
    inputs = {"x": X, "y": PER_ROW} if "'y'" in reason else {"x": X}
    program = mil_program(build, **inputs)
    before = op_types(program)
    _, _, reports = rewritten_matches_original(program, inputs, PASS)
    assert op_types(program) == before
    assert dict(reports[PASS].skipped) == {reason: 1} and not reports[PASS].rewritten


@pytest.mark.parametrize("reason, shape", [
    ("merge of leading axes with a shape known only at run time", None),
    ("reshape not proven to merge the two leading axes", [16, 32]),
])
def test_a_flatten_that_cannot_be_proven_is_left_alone(reason, shape):
    def build(x):
        target = shape if shape is not None else mb.concat(
            values=[mb.mul(x=mb.slice_by_index(x=mb.shape(x=x), begin=[1], end=[2]), y=2), [32]], axis=0)
        return mb.relu(x=mb.reshape(x=x, shape=target))

    program = _symbolic_program(build)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before
    assert dict(reports[PASS].skipped) == {reason: 1}


def test_disabled_does_nothing():
    program = mil_program(opt_feed_forward, x=X)
    before = op_types(program)
    reports = run_passes(program, PASS, enabled=False)
    assert op_types(program) == before and reports[PASS].sites_rewritten == 0


def test_opt_feed_forwards_leave_no_flatten_and_match_torch():
    pipeline = ct.PassPipeline.DEFAULT
    pipeline.insert_pass(pipeline.passes.index(INSERT_BEFORE), PASS)
    reports = PassReports()
    pipeline.set_options(PASS, {"reports": reports})
    converted = F.convert("opt", "fp32", pass_pipeline=pipeline)
    report = reports[PASS]
    assert dict(report.rewritten) == {"merged region": F.LAYERS, "op unmerged": 5 * F.LAYERS,
                                      "reshape removed": 2 * F.LAYERS}
    ops = converted._mil_program.functions["main"].operations
    assert not [op for op in ops if op.op_type in ("layer_norm", "linear") and op.inputs["x"].rank == 2]
    inputs = F.sample_inputs("opt")
    valid = F.valid_tokens(inputs)
    expected = F.torch_reference("opt", inputs)[valid]
    actual = simulate(converted, inputs)["last_hidden_state"][valid]
    assert np.max(np.abs(actual - expected)) / np.max(np.abs(expected)) < 1e-5
