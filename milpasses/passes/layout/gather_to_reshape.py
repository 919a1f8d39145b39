"""``ane::gather_to_reshape``: a gather that reads every element in order is a reshape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared.matching import NoMatch, has_static_shape, is_activation, rank


@dataclass(frozen=True)
class OrderedGather:
    op: object
    shape: tuple


def match_ordered_gather(op) -> OrderedGather | NoMatch:
    source, indices = op.inputs["x"], op.inputs["indices"]
    if not is_activation(source):
        return NoMatch("gathers from a constant table (a lookup, not a relayout)")
    if indices.val is None:
        return NoMatch("the indices are computed at run time")
    if "batch_dims" in op.inputs and int(op.inputs["batch_dims"].val) != 0:
        return NoMatch("batch_dims is not 0")
    if not (has_static_shape(source) and has_static_shape(op.outputs[0])):
        return NoMatch("a shape is not fixed")
    index = np.asarray(indices.val)
    if index.ndim == 0 or index.shape[-1] != rank(source):
        return NoMatch("the indices do not address single elements")
    size = int(np.prod(source.shape, dtype=np.int64))
    positions = index.reshape(-1, rank(source)).astype(np.int64)
    if positions.shape[0] != size or (positions < 0).any() or (positions >= np.asarray(source.shape)).any():
        return NoMatch("the indices do not read every element once")
    if not np.array_equal(np.ravel_multi_index(tuple(positions.T), source.shape), np.arange(size)):
        return NoMatch("the indices reorder the elements")
    return OrderedGather(op, tuple(int(d) for d in op.outputs[0].shape))


@register
class gather_to_reshape(AnePass):
    """
    Replace a ``gather_nd`` whose constant indices read every element of its input once, in
    order, with a ``reshape``.

    Why: a gather runs on the CPU (Apple's DistilBERT: its CPU ops are the gathers), so one in
    the middle of a program splits it into more device partitions, each with a dispatch and a
    hand-over. Hugging Face's masking utilities index the (B, S) padding mask with a grid of
    (batch, key) positions, which is only a reshape to (B, 1, 1, S); as a reshape it stays on
    the ANE and the mask is built beside the model's other input preparation.

    .. code-block::

        Given:
            %m = gather_nd(x=%mask, indices=const(B, 1, 1, S, 2: [[b, k] ...]), batch_dims=0)
        Result:
            %m = reshape(x=%mask, shape=[B, 1, 1, S])

    Does not fire when the indices are computed at run time, reorder, repeat or skip elements,
    address slices rather than elements, when batch_dims is not 0, or on a lookup in a
    constant table (an embedding).

    Options: ``enabled`` (default true).
    """

    def run(self, block) -> None:
        self.rewrite_each(block, {"gather_nd"}, match_ordered_gather, self._rewrite)

    def _rewrite(self, block, site: OrderedGather) -> None:
        op = site.op
        with mb.set_before_op(before_op=op):
            reshaped = mb.reshape(x=op.inputs["x"], shape=list(site.shape), name=f"{op.name}_reshape")
        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=reshaped)
        self.remove_dead(block, [op])
        self.report.rewritten["ordered gather"] += 1
