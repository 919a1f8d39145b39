"""``ane::unflatten_tokens``: per-token work on a flattened (B*S, C) view runs on (B, S, C) itself."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.bc1s_layout import BINARY, REDUCTIONS, UNARY
from milpasses.passes.matching import (
    NoMatch,
    as_list,
    constant_value,
    has_static_shape,
    is_block_output,
    is_static,
    rank,
    same_length,
)

ROW_WISE_UNARY = UNARY | {"cast"}

#: The inputs of each op type that hold token rows; every other input is a parameter, unchanged.
TENSOR_INPUTS = {
    **{op_type: ("x",) for op_type in ROW_WISE_UNARY | REDUCTIONS},
    **{op_type: ("x", "y") for op_type in BINARY},
    "select": ("cond", "a", "b"),
    "linear": ("x",),
    "matmul": ("x",),
    "layer_norm": ("x",),
    "softmax": ("x",),
    "concat": ("values",),
    "split": ("x",),
}


@dataclass(frozen=True)
class FlattenedRegion:
    """Ops that run on (N, C) rows flattened from (B, S, C), and the reshapes around them."""

    tokens: tuple  # (B, S)
    roots: tuple  # reshape ops (B, S, C) -> (N, C), in block order
    ops: tuple  # the ops on the rows, in block order
    exits: tuple  # reshape ops (N, C') -> (B, S, C'), in block order


def _is_last_axis(axis) -> bool:
    return int(axis) in (1, -1)


def _last_axis_parameter(op, name: str) -> dict | NoMatch:
    if not _is_last_axis(constant_value(op.inputs[name])):
        return NoMatch(f"'{op.op_type}' works across the token rows (axis 0)")
    return {name: -1}


def _last_axes_parameter(op) -> dict | NoMatch:
    axes = op.inputs.get("axes")
    if axes is None:
        return NoMatch(f"'{op.op_type}' works over every axis, the token rows included")
    axes = constant_value(axes)
    if axes is None or len(axes) != 1 or not _is_last_axis(axes[0]):
        return NoMatch(f"'{op.op_type}' works across the token rows (axis 0)")
    return {"axes": [-1]}


def _parameters(op) -> dict | NoMatch:
    """The op's parameters on (B, S, C) rows, or why it does not commute with the flatten."""
    kind = op.op_type
    if kind in ROW_WISE_UNARY or kind in BINARY or kind in ("select", "linear"):
        return {}
    if kind == "matmul":
        if constant_value(op.inputs["transpose_x"]):
            return NoMatch("matmul transposes the token rows")
        weight = constant_value(op.inputs["y"])
        if weight is None or np.ndim(weight) != 2:
            return NoMatch("matmul of token rows by something other than a rank-2 constant")
        return {}
    if kind in REDUCTIONS:
        if not constant_value(op.inputs.get("keep_dims")):
            return NoMatch(f"'{kind}' drops the reduced axis (keep_dims false)")
        return _last_axes_parameter(op)
    if kind == "layer_norm":
        return _last_axes_parameter(op)
    if kind in ("softmax", "concat", "split"):
        return _last_axis_parameter(op, "axis")
    return NoMatch(f"'{kind}' reads token rows and has no rule to run on (B, S, C)")


def flatten_tokens(op) -> tuple | NoMatch | None:
    """If ``op`` reshapes (B, S, C) to (N, C), the (B, S) it merges, or a NoMatch when that
    merge cannot be proven; None when ``op`` is no such reshape at all."""
    if op.op_type != "reshape":
        return None
    x, out = op.inputs["x"], op.outputs[0]
    if rank(x) != 3 or rank(out) != 2 or not same_length(x.shape[-1], out.shape[-1]):
        return None
    target = constant_value(op.inputs["shape"])
    if target is None:
        return NoMatch("flatten of (B, S, C) with a shape known only at run time")
    batch, seq, channels = x.shape
    target = [int(t) for t in np.asarray(target).tolist()]
    if target[0] == -1 and is_static(channels) and target[1] == channels:
        return batch, seq
    if has_static_shape(x) and has_static_shape(out) and out.shape == (batch * seq, channels):
        return batch, seq
    return NoMatch("reshape to (N, C) not proven to merge (B, S)")


def _exit_problem(op, tokens) -> str | None:
    """Why a reshape of token rows is not a provable unflatten to (B, S, C'), or None."""
    x, out = op.inputs["x"], op.outputs[0]
    if constant_value(op.inputs["shape"]) is None:
        return "token rows reshaped to a shape known only at run time"
    if rank(out) != 3 or not has_static_shape(out) or not all(is_static(d) for d in tokens):
        return "token rows reshaped to other than a known (B, S, C')"
    if tuple(out.shape[:2]) != tuple(tokens) or out.shape[2] != x.shape[-1]:
        return f"token rows reshaped to {tuple(out.shape)}, not (B, S, C') with (B, S) = {tuple(tokens)}"
    return None


def _constant_on_tokens(value, rows, tokens) -> np.ndarray | None | NoMatch:
    """A constant operand as it broadcasts against (B, S, C): None when it stays as it is
    (rank <= 1, or one row), reshaped to (B, S, k) when it has a value per row."""
    value = np.asarray(value)
    if value.ndim <= 1 or (value.ndim == 2 and value.shape[0] == 1 and not same_length(1, rows)):
        return None
    if value.ndim == 2 and same_length(value.shape[0], rows):
        return value.reshape(list(tokens) + [value.shape[1]])
    return NoMatch(f"a constant of shape {value.shape} broadcasts the token rows to rank {value.ndim}")


def _operands(op) -> list:
    return [v for name in TENSOR_INPUTS[op.op_type] for v in as_list(op.inputs.get(name))]


def _parameter_vars(op) -> list:
    return [v for name, value in op.inputs.items() if name not in TENSOR_INPUTS[op.op_type] for v in as_list(value)]


def match_region(root) -> FlattenedRegion | NoMatch:
    """Grow the region of token rows from the flatten ``root``; never mutates."""
    tokens = flatten_tokens(root)
    if tokens is None:
        return NoMatch("not a flatten of (B, S, C)")
    if isinstance(tokens, NoMatch):
        return tokens
    rows = root.outputs[0].shape[0]
    roots, ops, exits = {id(root): root}, {}, {}
    region_vars = {id(root.outputs[0])}
    pending = [root.outputs[0]]
    while pending:
        var = pending.pop()
        if is_block_output(var):
            return NoMatch(f"token rows '{var.name}' are a block output")
        for consumer in var.child_ops:
            if id(consumer) in ops or id(consumer) in exits:
                continue
            if consumer.op_type == "reshape" and consumer.inputs["x"] is var:
                problem = _exit_problem(consumer, tokens)
                if not problem and id(var.op) in roots and is_block_output(consumer.outputs[0]):
                    problem = "a block output undoes a flatten with nothing between"
                if problem:
                    return NoMatch(problem)
                exits[id(consumer)] = consumer
                continue
            if consumer.op_type not in TENSOR_INPUTS:
                return NoMatch(f"'{consumer.op_type}' reads token rows and has no rule to run on (B, S, C)")
            parameters = _parameters(consumer)
            if isinstance(parameters, NoMatch):
                return parameters
            for operand in _operands(consumer):
                value = constant_value(operand)
                if value is not None:
                    on_tokens = _constant_on_tokens(value, rows, tokens)
                    if isinstance(on_tokens, NoMatch):
                        return on_tokens
                    continue
                joined = flatten_tokens(operand.op) if operand.op is not None else None
                if joined and tuple(joined) == tuple(tokens) and id(operand.op) not in roots:
                    roots[id(operand.op)] = operand.op
                    region_vars.add(id(operand))
                    pending.append(operand)
            for out in consumer.outputs:
                if rank(out) != 2 or not same_length(out.shape[0], rows):
                    return NoMatch(f"'{consumer.op_type}' gives {tuple(out.shape)}, not token rows")
                region_vars.add(id(out))
                pending.append(out)
            ops[id(consumer)] = consumer
    for op in ops.values():
        if any(id(v) in region_vars for v in _parameter_vars(op)):
            return NoMatch(f"'{op.op_type}' reads token rows as a parameter")
        outside = [v for v in _operands(op) if constant_value(v) is None and id(v) not in region_vars]
        if outside:
            return NoMatch(f"'{op.op_type}' mixes token rows with '{outside[0].name}' from outside the region")
    if not exits:
        return NoMatch("token rows are never reshaped back to (B, S, C')")
    order = {id(op): i for i, op in enumerate(root.enclosing_block.operations)}

    def in_order(found):
        return tuple(sorted(found.values(), key=lambda op: order[id(op)]))

    return FlattenedRegion(tuple(tokens), in_order(roots), in_order(ops), in_order(exits))


@register
class unflatten_tokens(AnePass):
    """
    Run per-token work that the model does on a flattened ``(B*S, C)`` view on the
    ``(B, S, C)`` tensor itself, and drop the flatten and the reshapes back.

    Why: ``ane::linear_to_conv`` and ``ane::bc1s_layout`` carry rank-3 ``(B, S, C)``
    activations in the ANE's ``(B, C, 1, S)`` layout; a rank-2 view of the same tokens breaks
    that region, so the model leaves the layout and enters it again around the view, each a
    memory copy (Apple's principle 3: minimise reshapes and transposes). OPT runs its
    feed-forward this way. Every op on the rows is per token, so it commutes with the flatten.

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

    The region starts at a reshape of ``(B, S, C)`` to ``(N, C)`` proven to merge B and S (a
    constant target ``[-1, C]``, or known sizes with ``N = B * S``) and grows through the
    readers of the rows; another such flatten of a tensor with the same (B, S) read by a region
    op joins it. It ends at reshapes to ``(B, S, C')`` with a constant target. Rules: elementwise
    unary ops and ``cast``; elementwise binary ops and ``select`` (a constant of rank <= 1 or
    shape ``(1, C)`` stays, one of ``(N, k)`` is reshaped to ``(B, S, k)`` at compile time);
    ``linear``; ``matmul`` by a rank-2 constant; ``layer_norm``, reductions with ``keep_dims``,
    ``softmax``, ``concat`` and ``split``, each over the last axis only.

    Does not fire (the whole region is left as it is) when: a value on the rows is a block
    output, or read by an op without a rule, or as a parameter (a weight, a shape); an op works
    across the rows (axis 0), or a reduction drops its axis; an op mixes the rows with an
    activation from outside the region; a constant would broadcast the rows to rank 3; a
    reshape of the rows does not give (B, S, C') with the flatten's B and S as known sizes;
    the flatten's target shape is known only at run time, or does not provably merge (B, S).

    Options:

    - ``enabled`` (default true).
    """

    def run(self, block) -> None:
        for op in list(block.operations):
            if op.enclosing_block is None or flatten_tokens(op) is None:
                continue  # removed with a region already rewritten, or no flatten at all
            region = match_region(op)
            if not region:
                self.skip(op.name, region.reason)  # each flatten of a region is a site left alone
                continue
            self._rewrite(block, region)

    def _rewrite(self, block, region: FlattenedRegion) -> None:
        rows = region.roots[0].outputs[0].shape[0]
        unflattened = {id(root.outputs[0]): root.inputs["x"] for root in region.roots}

        def on_tokens(var):
            value = constant_value(var)
            if value is None:
                return unflattened[id(var)]
            reshaped = _constant_on_tokens(value, rows, region.tokens)
            return var if reshaped is None else reshaped

        for op in region.ops:
            arguments = dict(op.inputs)
            for name in TENSOR_INPUTS[op.op_type]:
                if name in arguments:
                    value = arguments[name]
                    arguments[name] = (
                        [on_tokens(v) for v in value] if isinstance(value, (list, tuple)) else on_tokens(value)
                    )
            arguments.update(_parameters(op))
            with mb.set_before_op(before_op=op):
                result = getattr(mb, op.op_type)(**arguments, name=f"{op.name}_tokens")
            for old, new in zip(op.outputs, as_list(result)):
                unflattened[id(old)] = new
        for unflatten in region.exits:
            block.replace_uses_of_var_after_op(
                anchor_op=unflatten, old_var=unflatten.outputs[0], new_var=unflattened[id(unflatten.inputs["x"])]
            )
        self.remove_dead(block, list(region.roots) + list(region.ops) + list(region.exits))
        self.report.rewritten["flattened region"] += 1
        self.report.rewritten["op moved to (B, S, C)"] += len(region.ops)
        self.report.rewritten["reshape removed"] += len(region.roots) + len(region.exits)
