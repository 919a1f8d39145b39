"""The (B, C, 1, S) layout and the boundary ops that enter and leave it.

A rank-3 activation ``(B, S, C)`` is carried as ``(B, C, 1, S)``; a rank-2 ``(N, C)`` as
``(1, C, 1, N)``. Entering is a transpose then an expand_dims, leaving is a squeeze then a
transpose, always in these exact forms, so that the passes can recognise (and cancel) the
boundaries they made themselves.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.shared.axis_rules import AxisMap
from milpasses.passes.shared.matching import op_with, rank

#: Where each axis of a rank-3 (B, S, C) tensor lives in (B, C, 1, S).
BC1S_MAP = AxisMap(to=(0, 3, 1), rank=4)

_ENTER = {3: ([0, 2, 1], [2]), 2: ([1, 0], [0, 2])}  # rank -> (transpose perm, expand axes)


def enter(x, name: str):
    """Build ``x`` (B, S, C) or (N, C) as (B, C, 1, S). Call inside ``mb.set_before_op``."""
    perm, axes = _ENTER[rank(x)]
    transposed = mb.transpose(x=x, perm=perm, name=f"{name}_to_bc1s_transpose")
    return mb.expand_dims(x=transposed, axes=axes, name=f"{name}_to_bc1s")


def leave(x, to_rank: int, name: str):
    """Build ``x`` (B, C, 1, S) back in its rank-``to_rank`` form, the inverse of :func:`enter`."""
    perm, axes = _ENTER[to_rank]
    squeezed = mb.squeeze(x=x, axes=axes, name=f"{name}_from_bc1s_squeeze")
    return mb.transpose(x=squeezed, perm=perm, name=name)


def left_from(var):
    """If ``var`` is the output of a rank-3 :func:`leave`, the (B, C, 1, S) var it left from."""
    transpose = op_with(var, "transpose", perm=[0, 2, 1])
    if transpose is None:
        return None
    squeeze = op_with(transpose.inputs["x"], "squeeze", axes=[2])
    if squeeze is None or rank(squeeze.inputs["x"]) != 4:
        return None
    return squeeze.inputs["x"]


def entered_from(var):
    """If ``var`` is the output of a rank-3 :func:`enter`, the (B, S, C) var that entered."""
    expand = op_with(var, "expand_dims", axes=[2])
    if expand is None:
        return None
    transpose = op_with(expand.inputs["x"], "transpose", perm=[0, 2, 1])
    if transpose is None or rank(transpose.inputs["x"]) != 3:
        return None
    return transpose.inputs["x"]


def constant_to_bc1s(value: np.ndarray) -> np.ndarray:
    """A constant that broadcasts against (B, S, C), rearranged to broadcast against (B, C, 1, S)."""
    value = np.asarray(value)
    if value.ndim == 0:
        return value
    as_rank3 = value.reshape((1,) * (3 - value.ndim) + value.shape)
    return np.expand_dims(np.transpose(as_rank3, (0, 2, 1)), 2)


LAYOUT_OPS = ("transpose", "reshape", "expand_dims", "squeeze")


def is_boundary_op(op) -> bool:
    """One of the two ops of an enter or a leave of a rank-3 activation."""
    out = op.outputs[0]
    if op.op_type == "expand_dims":
        return entered_from(out) is not None
    if op.op_type == "squeeze":
        return any(left_from(t.outputs[0]) is not None for t in out.child_ops)
    if op.op_type == "transpose":
        return left_from(out) is not None or any(entered_from(e.outputs[0]) is not None for e in out.child_ops)
    return False


def layout_census(function) -> dict[str, int]:
    """Layout ops of a function: those of rank-3 region boundaries, and all others."""
    census = {"boundary": 0, "other": 0}
    for op in function.operations:
        if op.op_type in LAYOUT_OPS:
            census["boundary" if is_boundary_op(op) else "other"] += 1
    return census
