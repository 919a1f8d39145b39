"""ane::gather_to_reshape: an in-order constant-index gather_nd becomes a reshape; others stay."""

import numpy as np
from coremltools.converters.mil import Builder as mb

from tests.helpers import mil_program
from tests.passes_helpers import op_types, rewritten_matches_original, run_passes

PASS = "ane::gather_to_reshape"
MASK = np.arange(12, dtype=np.float32).reshape(2, 6)


def grid(batch=2, keys=6):
    """transformers' padding-mask index: [b, k] for every (b, 0, 0, k)."""
    b, k = np.meshgrid(np.arange(batch), np.arange(keys), indexing="ij")
    return np.stack([b, k], axis=-1).reshape(batch, 1, 1, keys, 2).astype(np.int32)


def gather_program(indices):
    return mil_program(lambda mask: mb.gather_nd(x=mask, indices=indices), mask=MASK)


def test_an_in_order_gather_becomes_a_reshape():
    program = gather_program(grid())
    before, after, reports = rewritten_matches_original(program, {"mask": MASK}, PASS)
    assert op_types(program) == ["reshape"]
    assert list(after.values())[0].shape == (2, 1, 1, 6)
    assert dict(reports[PASS].rewritten) == {"ordered gather": 1}


def test_a_reordering_gather_is_left_alone():
    reversed_keys = grid()[..., ::-1, :].copy()
    program = gather_program(reversed_keys)
    reports = run_passes(program, PASS)
    assert op_types(program) == ["gather_nd"]
    assert dict(reports[PASS].skipped) == {"the indices reorder the elements": 1}


def test_a_repeating_gather_is_left_alone():
    program = gather_program(np.concatenate([grid(), grid()], axis=1))
    reports = run_passes(program, PASS)
    assert op_types(program) == ["gather_nd"]
    assert dict(reports[PASS].skipped) == {"the indices do not read every element once": 1}


def test_a_slice_gather_and_runtime_indices_and_table_lookups_are_left_alone():
    rows = mil_program(lambda mask: mb.gather_nd(x=mask, indices=np.array([[0], [1]], np.int32)), mask=MASK)
    runtime = mil_program(lambda mask, idx: mb.gather_nd(x=mask, indices=idx), mask=MASK, idx=grid())
    lookup = mil_program(lambda ids: mb.gather_nd(x=MASK, indices=ids), ids=grid())
    reasons = [dict(run_passes(p, PASS)[PASS].skipped) for p in (rows, runtime, lookup)]
    assert reasons == [{"the indices do not address single elements": 1}, {"the indices are computed at run time": 1},
                       {"gathers from a constant table (a lookup, not a relayout)": 1}]
    assert all(op_types(p) == ["gather_nd"] for p in (rows, runtime, lookup))
