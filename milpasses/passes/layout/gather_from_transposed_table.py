"""``ane::gather_from_transposed_table``: a lookup in a constant table whose rows are then
turned channels-first reads the transposed table instead, so no transpose runs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared.matching import (
    RELABELLING,
    NoMatch,
    constant_value,
    has_static_shape,
    relabels_below,
    single_consumer,
)


@dataclass(frozen=True)
class TableLookup:
    transpose: object
    gather: object  # gather(x=<constant (N, D) table>, indices, axis=0)
    relabels: tuple  # reshape-like ops from the gather's output to the transpose's input, in order
    after: tuple  # reshape-like ops reading the transpose's output one after another


def _long_axes(shape) -> list[int]:
    return [d for d in shape if d != 1]


def _axis(value, rank: int) -> int:
    return int(value) % rank


def _transposed_order(transpose) -> list[int]:
    """For each axis longer than 1 of the transpose's output, its position among its input's
    axes longer than 1."""
    shape = transpose.inputs["x"].shape
    long_positions = {axis: i for i, axis in enumerate(a for a in range(len(shape)) if shape[a] != 1)}
    perm = [int(p) for p in constant_value(transpose.inputs["perm"])]
    return [long_positions[axis] for axis in perm if shape[axis] != 1]


def match_table_lookup(transpose) -> TableLookup | NoMatch | None:
    """The site, why it cannot be rewritten, or None when the transpose does not read a lookup
    in a constant table (no candidate)."""
    var, relabels = transpose.inputs["x"], []
    while var.op is not None and var.op.op_type in RELABELLING:
        relabels.insert(0, var.op)
        var = var.op.inputs["x"]
    gather = var.op
    if gather is None or gather.op_type != "gather" or np.ndim(constant_value(gather.inputs["x"])) != 2:
        return None
    table, indices = gather.inputs["x"], gather.inputs["indices"]
    if _axis(constant_value(gather.inputs["axis"]), 2) != 0 or int(constant_value(gather.inputs.get("batch_dims")) or 0):
        return NoMatch("the lookup is not along the table's rows")
    chain = [gather.outputs[0], *(op.outputs[0] for op in relabels), transpose.outputs[0]]
    if not all(has_static_shape(v) for v in chain):
        return NoMatch("a shape between the lookup and the transpose is not known")
    if any(_long_axes(op.inputs["x"].shape) != _long_axes(op.outputs[0].shape) for op in relabels):
        return NoMatch("a reshape between the lookup and the transpose merges or splits axes")
    if any(single_consumer(v) is None for v in chain[:-1]):
        return NoMatch("the lookup or a reshape after it has other readers")
    if len(table.child_ops) != 1:
        return NoMatch("the table has other readers: transposing it would store it twice")
    # Label the lookup's long axes: the indices' long axes in order, then the row (when longer than 1).
    looked_up = len(_long_axes(indices.shape))
    labels = list(range(looked_up)) + ([looked_up] if table.shape[1] != 1 else [])
    order = [labels[i] for i in _transposed_order(transpose)]
    wanted = ([looked_up] if table.shape[1] != 1 else []) + list(range(looked_up))
    if order != wanted:
        return NoMatch("the transpose does not put the row's channels before every looked-up axis")
    after = relabels_below(transpose.outputs[0])
    if not all(has_static_shape(op.outputs[0]) for op in after):
        return NoMatch("a shape after the transpose is not known")
    return TableLookup(transpose, gather, tuple(relabels), tuple(after))


@register
class gather_from_transposed_table(AnePass):
    """
    Look rows up in the transposed table when the rows are turned channels-first right after
    the lookup: the gather returns the (B, C, 1, S) order directly, and the transpose goes.

    Why: every transpose is a memory copy on the ANE (Apple's principle 3). A token embedding,
    a learned position table or a decode step's rotary tables indexed by position produce
    (S, C) rows that ``ane::bc1s_layout`` then turns into (1, C, 1, S) with a transpose. The
    table is a constant, so it can be stored transposed at compile time, and a lookup along
    its columns returns (C, S) at once; one reshape (it only adds unit axes) finishes it, in
    place of the reshapes, expand_dims and squeezes around the transpose.

    .. code-block::

        Given:
            %rows = gather(x=%table, indices=%positions, axis=0)        # %table: (64, 8) const
            %r = expand_dims(x=%rows, axes=[0])                           # (1, S, 8)
            %t = transpose(x=%r, perm=[0, 2, 1])                          # (1, 8, S)
            %bc1s = expand_dims(x=%t, axes=[2])                           # (1, 8, 1, S)
        Result:
            %cols = gather(x=%table_T, indices=%positions, axis=1)      # %table_T: (8, 64) const
            %bc1s = reshape(x=%cols, shape=[1, 8, 1, S])

    Does not fire when: the table is not a 2-D constant (a compressed table stays as it is),
    or has other readers (a tied LM head: it would be stored twice); the lookup is not along
    the table's rows; a shape on the way is not known; an op between the lookup and the
    transpose is not a reshape that only adds or drops unit axes, or has other readers; the
    transpose's output does not keep the row's channels first and the looked-up axes in their
    order (a batch of several sequences, whose batch axis must stay in front, is left alone).

    Options:

    - ``enabled`` (default true).
    """

    def run(self, block) -> None:
        self.rewrite_each(block, ("transpose",), match_table_lookup, self._rewrite)

    def _rewrite(self, block, site: TableLookup) -> None:
        gather = site.gather
        out = (site.after[-1] if site.after else site.transpose).outputs[0]
        table = np.ascontiguousarray(constant_value(gather.inputs["x"]).T)
        # batch_dims and validate_indices exist from iOS16 / iOS17 on: passed on as they were.
        extra = {name: gather.inputs[name] for name in ("batch_dims", "validate_indices") if name in gather.inputs}
        with mb.set_before_op(before_op=out.op):
            columns = mb.gather(x=table, indices=gather.inputs["indices"], axis=1, **extra,
                                name=f"{gather.name}_transposed_table")
            var = mb.reshape(x=columns, shape=list(out.shape), name=f"{site.transpose.name}_relabelled")
        block.replace_uses_of_var_after_op(anchor_op=out.op, old_var=out, new_var=var)
        self.remove_dead(block, [out.op])
        self.report.rewritten["lookup from a transposed table"] += 1
