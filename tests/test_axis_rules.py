"""The per-op axis rules: an op rebuilt on the rewritten tensor with the remapped axis parameters
computes the rewritten result of the original op."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from milpasses.passes.attention import head_rules
from milpasses.passes.layout import bc1s_layout, unmerge_leading_axes
from milpasses.passes.shared import axis_rules
from milpasses.passes.shared.bc1s import BC1S_MAP
from milpasses.simulator import simulate
from tests.helpers import mil_program

X = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)  # (B, S, C)
MERGED = np.random.default_rng(1).standard_normal((6, 5, 4)).astype(np.float32)  # (A*B, S, d), A = 2

SHARED_SITES = [  # op type, its axis parameters: each works off axis 0
    ("softmax", {"axis": -1}),
    ("reduce_sum", {"axes": [2, 1], "keep_dims": True}),
    ("layer_norm", {"axes": [-1]}),
    ("concat", {"axis": 1, "interleave": False}),
    ("split", {"axis": -1, "num_splits": 2}),
]
BC1S_SITES = SHARED_SITES + [
    ("slice_by_index", {"begin": [0, 1, 0], "end": [0, 5, 3], "stride": [1, 2, 1], "begin_mask": [True, False, False],
                        "end_mask": [True, False, False]}),
    ("slice_by_size", {"begin": [0, 2, 1], "size": [-1, 3, 2]}),
]
UNMERGED_SITES = SHARED_SITES + [("transpose", {"perm": [0, 2, 1]})]


def _run(op_type, arguments, x):
    tensors = {"values": [x, x]} if op_type == "concat" else {"x": x}
    program = mil_program(lambda x: getattr(mb, op_type)(**tensors, **arguments), x=x)
    outputs = simulate(program, {"x": x})
    function = program.functions["main"]
    return function.find_ops(op_type=op_type)[0], [outputs[v.name] for v in function.outputs]


def _carried_matches(op_type, arguments, x, axis_map, rewrite):
    op, expected = _run(op_type, arguments, x)
    _, actual = _run(op_type, {**arguments, **axis_rules.parameters(op, axis_map)}, rewrite(x))
    for want, got in zip(expected, actual, strict=True):
        np.testing.assert_allclose(got, rewrite(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op_type, arguments", BC1S_SITES, ids=[s[0] for s in BC1S_SITES])
def test_an_op_carried_in_bc1s_gives_the_original_result_in_bc1s(op_type, arguments):
    _carried_matches(op_type, arguments, X, BC1S_MAP, lambda v: np.expand_dims(np.transpose(v, (0, 2, 1)), 2))


@pytest.mark.parametrize("op_type, arguments", UNMERGED_SITES, ids=[s[0] for s in UNMERGED_SITES])
def test_an_op_run_on_the_unmerged_tensor_gives_the_original_result_unmerged(op_type, arguments):
    _carried_matches(op_type, arguments, MERGED, unmerge_leading_axes.unmerged_axes(3),
                     lambda v: v.reshape((2, v.shape[0] // 2) + v.shape[1:]))


def test_what_each_op_does_to_its_axes():
    def op(op_type, **arguments):
        return _run(op_type, arguments, X)[0]

    assert axis_rules.axes(op("reduce_mean", axes=[-1, 0])) == [0, 2]
    assert axis_rules.axes(op("reduce_max")) is None  # every axis
    assert axis_rules.drops_axes(op("reduce_max", axes=[1])) and not axis_rules.drops_axes(op("softmax", axis=1))
    assert axis_rules.axes(op("transpose", perm=[1, 0, 2])) == [0, 1]
    assert axis_rules.op_rule(op("transpose", perm=[1, 0, 2])).verb == "moves"
    assert axis_rules.interleaves(op("concat", axis=0, interleave=True))
    assert axis_rules.drops_axes(op("slice_by_index", begin=[0, 0, 0], end=[1, 6, 4], squeeze_mask=[True, False, False]))
    assert axis_rules.axes(op("relu")) == [] and axis_rules.tensor_inputs("select") == ("cond", "a", "b")


def test_where_each_op_takes_an_axis_of_its_operand():
    def follow(op_type, operand_axis, /, **arguments):
        found = _run(op_type, arguments, X)[0]
        operand = found.inputs["values"][0] if op_type == "concat" else found.inputs["x"]
        return axis_rules.follow(found, operand, operand_axis)

    assert follow("transpose", 2, perm=[0, 2, 1]) == 1
    assert follow("reshape", 2, shape=[12, 4]) == 1 and follow("reshape", 2, shape=[1, 2, 6, 1, 4]) == 4
    assert follow("reshape", 1, shape=[2, 24]) is None  # S merged with C
    assert follow("expand_dims", 2, axes=[0, 2]) == 4 and follow("squeeze", 2, axes=None) == 2
    assert follow("reduce_sum", 2, axes=[1]) == 1 and follow("reduce_sum", 2, axes=[1], keep_dims=True) == 2
    assert follow("reduce_sum", 2, axes=[2]) is None and follow("reduce_max", 2) is None
    assert follow("softmax", 2, axis=1) == 2 and follow("softmax", 2, axis=-1) is None
    assert follow("gather", 2, indices=np.array([[0, 1]], np.int32), axis=1) == 3
    assert follow("concat", 2, axis=1) == 2 and follow("slice_by_size", 0, begin=[0, 0, 0], size=[1, 6, 4]) is None
    assert follow("relu", 1) == 1 and follow("matmul", 0, y=np.ones((4, 3), np.float32)) is None


def test_every_op_type_the_passes_carry_has_a_rule_with_their_tensor_inputs():
    carried = bc1s_layout.CARRIED | unmerge_leading_axes.CARRIED | set(head_rules.RULES)
    assert carried <= set(axis_rules.RULES)
    assert head_rules.TENSOR_INPUTS["add"] == ("x", "y") and head_rules.TENSOR_INPUTS["stack"] == ("values",)
