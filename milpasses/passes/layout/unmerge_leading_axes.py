"""``ane::unmerge_leading_axes``: work on a view whose first two axes are merged, such as
(B*S, C) token rows or (B*H, S, d) attention heads, runs on the unmerged tensor itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared import axis_rules
from milpasses.passes.shared.axis_rules import AxisMap, parameter_vars, tensor_operands
from milpasses.passes.shared.matching import (
    BINARY,
    REDUCTIONS,
    UNARY,
    NoMatch,
    as_list,
    constant_value,
    has_static_shape,
    is_block_output,
    is_static,
    rank,
    same_length,
)

_UPSTREAM_DEPTH = 4  # ops between a merge and the region op that reads it, walking up

#: The op types with a rule to run on the unmerged tensor (their tensor inputs and axes: ``axis_rules``).
CARRIED = UNARY | BINARY | REDUCTIONS | {"cast", "select", "linear", "matmul", "layer_norm", "softmax", "concat",
                                         "split", "transpose"}


@dataclass(frozen=True)
class MergedRegion:
    """Ops that run on views whose axis 0 merges the leading (A, B) of their sources."""

    leading: tuple  # (A, B)
    roots: tuple  # reshape ops (A, B, ...) -> (A*B, ...), in block order
    ops: tuple  # the ops on the merged views, in block order
    exits: tuple  # reshape ops (A*B, ...) -> (A, B, ...), in block order


def unmerged_axes(view_rank: int) -> AxisMap:
    """Axis 0 of a merged view split into (A, B); the others kept, named from the end."""
    return AxisMap(to=(None,) + tuple(range(1 - view_rank, 0)), rank=view_rank + 1, split=(0, 1))


def _view_rank(op) -> int:
    """The rank of the op's merged views (the matcher has checked that they agree)."""
    return max(rank(v) for v in tensor_operands(op) if constant_value(v) is None)


def _matmul_parameter(op) -> dict | NoMatch:
    x, y = op.inputs["x"], op.inputs["y"]
    if constant_value(x) is not None:
        return NoMatch("matmul of a constant by the merged view")
    if rank(x) == 2:  # token rows: only a weight on the right keeps the rows apart
        if constant_value(op.inputs["transpose_x"]):
            return NoMatch("matmul transposes the merged axis")
        if constant_value(y) is None or np.ndim(constant_value(y)) != 2:
            return NoMatch("matmul of rows by something other than a rank-2 constant")
    elif constant_value(y) is not None and np.ndim(constant_value(y)) > rank(x) - 1:
        return NoMatch("matmul by a constant with its own merged axis")
    return {}


def _parameters(op) -> dict | NoMatch:
    """The op's parameters on the unmerged tensor, or why it does not commute with the merge."""
    kind = op.op_type
    if len({rank(v) for v in tensor_operands(op) if constant_value(v) is None}) != 1:
        return NoMatch(f"'{kind}' reads merged views of different ranks")
    if kind == "linear" and _view_rank(op) != 2:
        return NoMatch("linear on a merged view of rank 3 (MIL's linear takes rank <= 3)")
    if kind == "matmul":
        return _matmul_parameter(op)
    if axis_rules.drops_axes(op):
        return NoMatch(f"'{kind}' drops the reduced axis (keep_dims false)")
    axes = axis_rules.axes(op)
    if axes is None:
        return NoMatch(f"'{kind}' works over every axis, the merged one included")
    if 0 in axes:
        return NoMatch(f"'{kind}' {axis_rules.op_rule(op).verb} the merged axis (axis 0)")
    return axis_rules.parameters(op, unmerged_axes(_view_rank(op)))


def merged_leading(op) -> tuple | NoMatch | None:
    """If ``op`` reshapes (A, B, ...) to (A*B, ...), the (A, B) it merges, or a NoMatch when that
    merge cannot be proven; None when ``op`` is no such reshape at all."""
    if op.op_type != "reshape":
        return None
    x, out = op.inputs["x"], op.outputs[0]
    if rank(x) < 3 or rank(out) != rank(x) - 1:
        return None
    if not all(same_length(a, b) for a, b in zip(x.shape[2:], out.shape[1:])):
        return None
    target = constant_value(op.inputs["shape"])
    if target is None:
        return NoMatch("merge of leading axes with a shape known only at run time")
    target = [int(t) for t in np.asarray(target).tolist()]
    trailing = x.shape[2:]
    if target[0] == -1 and all(is_static(d) for d in trailing) and target[1:] == list(trailing):
        return tuple(x.shape[:2])
    if has_static_shape(x) and has_static_shape(out) and out.shape[0] == x.shape[0] * x.shape[1]:
        return tuple(x.shape[:2])
    return NoMatch("reshape not proven to merge the two leading axes")


def _exit_problem(op, leading) -> str | None:
    """Why a reshape of a merged view is not a provable unmerge to (A, B, ...), or None."""
    x, out = op.inputs["x"], op.outputs[0]
    if constant_value(op.inputs["shape"]) is None:
        return "merged view reshaped to a shape known only at run time"
    if rank(out) != rank(x) + 1 or not has_static_shape(out) or not all(is_static(d) for d in leading):
        return "merged view reshaped to other than a known (A, B, ...)"
    if tuple(out.shape[:2]) != tuple(leading) or tuple(out.shape[2:]) != tuple(x.shape[1:]):
        return f"merged view reshaped to {tuple(out.shape)}, not (A, B, ...) with (A, B) = {tuple(leading)}"
    return None


def _constant_unmerged(op, value, merged, leading) -> np.ndarray | None | NoMatch:
    """A constant operand of ``op`` as it broadcasts against the unmerged tensor: None when it
    stays as it is (a matmul's weight, checked by its rule; or it does not reach axis 0, or is
    1 there), reshaped to (A, B, ...) when it has a value per merged index."""
    value, var_rank = np.asarray(value), _view_rank(op)
    if op.op_type == "matmul" or value.ndim < var_rank or (value.ndim == var_rank and value.shape[0] == 1 and not same_length(1, merged)):
        return None
    if value.ndim == var_rank and same_length(value.shape[0], merged):
        return value.reshape(list(leading) + list(value.shape[1:]))
    return NoMatch(f"a constant of shape {value.shape} broadcasts the merged view to rank {value.ndim}")


def _upstream_merge(var, leading, depth: int = 0):
    """The merge of the same (A, B) that ``var`` is computed from through ops with a rule (K's
    transpose before the scores matmul), or None. The region then grows forward from it too."""
    op = var.op
    if op is None or depth > _UPSTREAM_DEPTH:
        return None
    merged = merged_leading(op)
    if merged is not None:
        return op if merged and tuple(merged) == tuple(leading) else None
    if op.op_type not in CARRIED:
        return None
    for operand in tensor_operands(op):
        if constant_value(operand) is None:
            found = _upstream_merge(operand, leading, depth + 1)
            if found is not None:
                return found
    return None


def match_region(root) -> MergedRegion | NoMatch:
    """Grow the region of merged views from the reshape ``root``; never mutates."""
    leading = merged_leading(root)
    if leading is None:
        return NoMatch("not a merge of two leading axes")
    if isinstance(leading, NoMatch):
        return leading
    merged = root.outputs[0].shape[0]
    roots, ops, exits = {id(root): root}, {}, {}
    region_vars = {id(root.outputs[0])}
    pending = [root.outputs[0]]
    while pending:
        var = pending.pop()
        if is_block_output(var):
            return NoMatch(f"merged view '{var.name}' is a block output")
        for consumer in var.child_ops:
            if id(consumer) in ops or id(consumer) in exits:
                continue
            if consumer.op_type == "reshape" and consumer.inputs["x"] is var:
                problem = _exit_problem(consumer, leading)
                if not problem and id(var.op) in roots and is_block_output(consumer.outputs[0]):
                    problem = "a block output undoes a merge with nothing between"
                if problem:
                    return NoMatch(problem)
                exits[id(consumer)] = consumer
                continue
            if consumer.op_type not in CARRIED:
                return NoMatch(f"'{consumer.op_type}' reads a merged view and has no rule to run on the "
                               "unmerged tensor")
            parameters = _parameters(consumer)
            if isinstance(parameters, NoMatch):
                return parameters
            for operand in tensor_operands(consumer):
                value = constant_value(operand)
                if value is not None:
                    unmerged = _constant_unmerged(consumer, value, merged, leading)
                    if isinstance(unmerged, NoMatch):
                        return unmerged
                    continue
                joined = _upstream_merge(operand, leading)
                if joined is not None and id(joined) not in roots:
                    roots[id(joined)] = joined
                    region_vars.add(id(joined.outputs[0]))
                    pending.append(joined.outputs[0])
            for out in consumer.outputs:
                if rank(out) < 2 or not same_length(out.shape[0], merged):
                    return NoMatch(f"'{consumer.op_type}' gives {tuple(out.shape)}, not a merged view")
                region_vars.add(id(out))
                pending.append(out)
            ops[id(consumer)] = consumer
    for op in ops.values():
        if any(id(v) in region_vars for v in parameter_vars(op)):
            return NoMatch(f"'{op.op_type}' reads a merged view as a parameter")
        outside = [v for v in tensor_operands(op) if constant_value(v) is None and id(v) not in region_vars]
        if outside:
            return NoMatch(f"'{op.op_type}' mixes a merged view with '{outside[0].name}' from outside the region")
    if not exits:
        return NoMatch("merged views are never reshaped back to (A, B, ...)")
    order = {id(op): i for i, op in enumerate(root.enclosing_block.operations)}

    def in_order(found):
        return tuple(sorted(found.values(), key=lambda op: order[id(op)]))

    return MergedRegion(tuple(leading), in_order(roots), in_order(ops), in_order(exits))


@register
class unmerge_leading_axes(AnePass):
    """
    Run the work a model does on a view whose first two axes are merged, ``(B*S, C)`` token
    rows or ``(B*H, S, d)`` attention heads, on the unmerged tensor itself, and drop the merge
    and the reshapes back.

    Why: ``ane::linear_to_conv`` and ``ane::bc1s_layout`` carry rank-3 ``(B, S, C)``
    activations in the ANE's ``(B, C, 1, S)`` layout, and ``ane::attention_to_einsum`` reads
    attention on rank-4 ``(B, H, S, d)`` heads. A merged view breaks both: the model leaves the
    layout and enters it again around it (Apple's principle 3: minimise reshapes and
    transposes), and attention written as batched matmuls on ``(B*H, S, d)`` is not found.
    OPT runs its feed-forward on token rows; older encoder-decoders (Marian, M2M100, ...)
    compute attention with ``bmm`` on merged heads. Every op on the view works per merged
    index, so it commutes with the merge.

    .. code-block::

        Given:
            %f = reshape(x=%h, shape=[-1, 32])                    # %h: (2, 8, 32) -> (16, 32)
            %n = layer_norm(x=%f, axes=[-1], gamma=g, beta=b)
            %u = relu(x=linear(x=%n, weight=W1, bias=b1))         # (16, 64)
            %r = add(x=%f, y=linear(x=%u, weight=W2, bias=b2))    # (16, 32)
            %o = reshape(x=%r, shape=[2, 8, 32])
        Result:
            %n = layer_norm(x=%h, axes=[-1], gamma=g, beta=b)
            %u = relu(x=linear(x=%n, weight=W1, bias=b1))         # (2, 8, 64)
            %o = add(x=%h, y=linear(x=%u, weight=W2, bias=b2))    # (2, 8, 32)

        Given (heads merged with the batch):
            %q = reshape(x=%qh, shape=[8, 8, 8])                  # %qh: (2, 4, 8, 8)
            %k = reshape(x=%kh, shape=[8, 8, 8])
            %s = softmax(x=matmul(x=%q, y=%k, transpose_y=True), axis=-1)
            %a = reshape(x=%s, shape=[2, 4, 8, 8])
        Result:
            %s = softmax(x=matmul(x=%qh, y=%kh, transpose_y=True), axis=-1)

    The region starts at a reshape of ``(A, B, ...)`` to ``(A*B, ...)`` proven to merge the two
    leading axes (a constant target ``[-1, ...]``, or known sizes with the product) and grows
    through the readers of the view; another such merge with the same (A, B) that a region op
    reads, directly or through ops with a rule (K transposed after its merge), joins it. It
    ends at reshapes back to ``(A, B, ...)`` with a constant target. Rules:
    elementwise unary ops and ``cast``; elementwise binary ops and ``select`` (a constant that
    does not reach axis 0, or is 1 there, stays; one with a value per merged index is reshaped
    at compile time); ``linear``; ``matmul`` (token rows by a rank-2 constant only; batched
    views by each other or by a constant); ``layer_norm``, reductions with ``keep_dims``,
    ``softmax``, ``concat``, ``split`` and ``transpose``, each off axis 0.

    Does not fire (the whole region is left as it is) when: a view is a block output, or read
    by an op without a rule, or as a parameter (a weight, a shape); an op works across axis 0,
    or a reduction drops its axis; an op mixes a view with an activation from outside the
    region; a constant would broadcast a view to a higher rank; a reshape of a view does not
    give (A, B, ...) with the merge's A and B as known sizes; the merge's target shape is
    known only at run time, or does not provably merge the two leading axes.

    Options:

    - ``enabled`` (default true).
    """

    def run(self, block) -> None:
        for op in list(block.operations):
            if op.enclosing_block is None or merged_leading(op) is None:
                continue  # removed with a region already rewritten, or no merge at all
            region = match_region(op)
            if not region:
                self.skip(op.name, region.reason)  # each merge of a region is a site left alone
                continue
            self._rewrite(block, region)

    def _rewrite(self, block, region: MergedRegion) -> None:
        merged = region.roots[0].outputs[0].shape[0]
        unmerged = {id(root.outputs[0]): root.inputs["x"] for root in region.roots}

        def operand(op, var):
            value = constant_value(var)
            if value is None:
                return unmerged[id(var)]
            reshaped = _constant_unmerged(op, value, merged, region.leading)
            return var if reshaped is None else reshaped

        for op in region.ops:
            arguments = dict(op.inputs)
            for name in axis_rules.tensor_inputs(op.op_type):
                if name in arguments:
                    value = arguments[name]
                    arguments[name] = ([operand(op, v) for v in value] if isinstance(value, (list, tuple))
                                       else operand(op, value))
            arguments.update(_parameters(op))
            with mb.set_before_op(before_op=op):
                result = getattr(mb, op.op_type)(**arguments, name=f"{op.name}_unmerged")
            for old, new in zip(op.outputs, as_list(result)):
                unmerged[id(old)] = new
        for exit_op in region.exits:
            block.replace_uses_of_var_after_op(
                anchor_op=exit_op, old_var=exit_op.outputs[0], new_var=unmerged[id(exit_op.inputs["x"])]
            )
        self.remove_dead(block, list(region.roots) + list(region.ops) + list(region.exits))
        self.report.rewritten["merged region"] += 1
        self.report.rewritten["op unmerged"] += len(region.ops)
        self.report.rewritten["reshape removed"] += len(region.roots) + len(region.exits)
