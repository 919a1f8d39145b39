"""ane::gather_from_transposed_table: a table lookup turned channels-first reads the table
stored transposed; lookups it cannot prove are left alone, with their reason."""

import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

import coremltools as ct
from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::gather_from_transposed_table"
TABLE = np.linspace(-1.0, 1.0, 10 * 6, dtype=np.float32).reshape(10, 6)
POSITIONS = np.array([3, 0, 9, 4], dtype=np.int32)
IDS = POSITIONS.reshape(1, 4)


def rows_channels_first(positions, table=TABLE):
    """A rotary or position table looked up by position and turned into (1, C, 1, S)."""
    rows = mb.expand_dims(x=mb.gather(x=table, indices=positions, axis=0), axes=[0])  # (1, S, C)
    return mb.expand_dims(x=mb.transpose(x=rows, perm=[0, 2, 1]), axes=[2])


def lookup(positions):
    return rows_channels_first(positions)


def test_the_lookup_reads_the_transposed_table_with_no_transpose():
    program = mil_program(lookup, opset=ct.target.iOS18, positions=POSITIONS)
    _, after, reports = rewritten_matches_original(program, {"positions": POSITIONS}, PASS)
    assert op_types(program) == ["gather", "reshape"]
    assert list(after.values())[0].shape == (1, 6, 1, 4)
    gather = next(op for op in program.functions["main"].operations if op.op_type == "gather")
    assert gather.inputs["x"].shape == (6, 10) and int(gather.inputs["axis"].val) == 1
    assert dict(reports[PASS].rewritten) == {"lookup from a transposed table": 1}


def test_a_token_embedding_of_one_sequence_is_rewritten_too():
    def embed(ids):
        return mb.transpose(x=mb.gather(x=TABLE, indices=ids, axis=0), perm=[0, 2, 1])  # (1, C, S)

    program = mil_program(embed, ids=IDS)
    rewritten_matches_original(program, {"ids": IDS}, PASS)
    assert op_types(program) == ["gather", "reshape"]


def _batch_of_sequences(ids):
    return mb.transpose(x=mb.gather(x=TABLE, indices=ids, axis=0), perm=[0, 2, 1])  # (B, C, S)


def _tied_table(positions):
    """One table read by the lookup and by something else (a tied LM head's weight)."""
    table = mb.const(val=TABLE)
    return rows_channels_first(positions, table), mb.mul(x=table, y=2.0)


def _columns(positions):
    columns = mb.gather(x=np.ascontiguousarray(TABLE.T), indices=positions, axis=1)  # (C, S)
    return mb.transpose(x=mb.expand_dims(x=columns, axes=[0]), perm=[0, 2, 1])


def _rows_read_elsewhere(positions):
    rows = mb.gather(x=TABLE, indices=positions, axis=0)
    return mb.transpose(x=mb.expand_dims(x=rows, axes=[0]), perm=[0, 2, 1]), mb.relu(x=rows)


def _merged_axes(ids):
    rows = mb.reshape(x=mb.gather(x=TABLE, indices=ids, axis=0), shape=[2, 2, 6])
    return mb.transpose(x=rows, perm=[2, 0, 1])


LEFT_ALONE = [
    ("the transpose does not put the row's channels before every looked-up axis", _batch_of_sequences,
     {"ids": POSITIONS.reshape(2, 2)}),
    ("the table has other readers: transposing it would store it twice", _tied_table, {"positions": POSITIONS}),
    ("the lookup is not along the table's rows", _columns, {"positions": POSITIONS}),
    ("the lookup or a reshape after it has other readers", _rows_read_elsewhere, {"positions": POSITIONS}),
    ("a reshape between the lookup and the transpose merges or splits axes", _merged_axes, {"ids": IDS}),
]


@pytest.mark.parametrize("reason, build, inputs", LEFT_ALONE, ids=[case[0] for case in LEFT_ALONE])
def test_a_lookup_it_cannot_prove_is_left_alone(reason, build, inputs):
    program = mil_program(build, **inputs)
    before = op_types(program)
    reports = run_passes(program, PASS)
    assert op_types(program) == before
    assert reports[PASS].skipped[reason] == 1 and not reports[PASS].rewritten


def test_a_transpose_of_a_computed_tensor_is_no_candidate():
    program = mil_program(lambda x: mb.transpose(x=mb.relu(x=x), perm=[1, 0]), x=TABLE)
    reports = run_passes(program, PASS)
    assert op_types(program) == ["relu", "transpose"] and not reports[PASS].skipped
