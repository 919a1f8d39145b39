"""``ane::linear_to_conv``: every linear layer becomes a 1x1 convolution on (B, C, 1, S)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, BoolOption, register
from milpasses.passes.layout import enter, leave
from milpasses.passes.matching import (
    NoMatch,
    constant_value,
    has_static_shape,
    is_activation,
    is_float_tensor,
    rank,
    single_consumer,
)


@dataclass(frozen=True)
class LinearSite:
    """A recognised linear layer: ``out = x @ weight.T + bias`` with constant weight and bias."""

    op: object
    x: object  # the activation, rank 2 or 3
    weight: np.ndarray  # (C_out, C_in)
    bias: np.ndarray | None
    output: object  # the var the conv result replaces
    flatten: object = None  # the reshape (B, S, C) -> (B*S, C) folded away, if any
    unflatten: object = None  # the reshape (B*S, C_out) -> (B, S, C_out) folded away, if any


def _as_linear(op):
    """(x, weight (C_out, C_in), bias) of a linear or a matmul by a constant, or NoMatch."""
    if op.op_type == "linear":
        weight, bias = constant_value(op.inputs["weight"]), op.inputs.get("bias")
        if weight is None:
            return NoMatch("linear weight is not a constant")
        if bias is not None and constant_value(bias) is None:
            return NoMatch("linear bias is not a constant")
        return op.inputs["x"], weight, None if bias is None else constant_value(bias)
    x, y = op.inputs["x"], op.inputs["y"]
    if constant_value(y) is None:
        return NoMatch("matmul has no constant right operand")
    if not is_activation(x):
        return NoMatch("matmul of two constants")
    if constant_value(op.inputs["transpose_x"]):
        return NoMatch("matmul transposes its activation")
    weight = constant_value(y)
    if weight.ndim != 2:
        return NoMatch(f"matmul constant has rank {weight.ndim}, not 2")
    return x, (weight if constant_value(op.inputs["transpose_y"]) else weight.T), None


def _flattened(x, output):
    """The reshapes around a linear that flatten (B, S, C) to (B*S, C) and restore it, as
    GPT-2's Conv1D emits them: (flatten, unflatten), or (None, None)."""
    flatten, unflatten = x.op, single_consumer(output)
    if flatten is None or flatten.op_type != "reshape" or single_consumer(x) is None:
        return None, None
    if unflatten is None or unflatten.op_type != "reshape":
        return None, None
    restored = unflatten.outputs[0]
    if not (has_static_shape(x) and has_static_shape(restored) and rank(restored) == 3):
        return None, None
    if restored.shape[0] * restored.shape[1] != x.shape[0]:
        return None, None
    return flatten, unflatten


def match_linear(op) -> LinearSite | NoMatch:
    if op.op_type not in ("linear", "matmul"):
        return NoMatch("not a linear or matmul")
    parts = _as_linear(op)
    if not parts:
        return parts
    x, weight, bias = parts
    if not is_float_tensor(x) or rank(x) not in (2, 3):
        return NoMatch(f"activation of rank {rank(x)}, not 2 or 3")
    if weight.shape[1] != x.shape[-1]:
        return NoMatch("weight does not match the activation's channels")
    output = op.outputs[0]
    flatten, unflatten = (None, None) if rank(x) == 3 else _flattened(x, output)
    return LinearSite(op, x, weight, bias, output, flatten, unflatten)


@register
class linear_to_conv(AnePass):
    """
    Rewrite each ``linear``, and each ``matmul`` whose right operand is a constant, as a 1x1
    ``conv`` on the ANE's channels-first ``(B, C, 1, S)`` layout.

    Why: the ANE's preferred data format is 4-D channels-first with the sequence on the last
    axis, and its convolution engine is where linear layers run fastest (Apple, "Deploying
    Transformers on the Apple Neural Engine", principle 1). A ``(B, S, C)`` linear pads C to 64
    bytes per token; the 1x1 conv does not.

    .. code-block::

        Given:
            %y = linear(x=%x, weight=W, bias=b)          # %x: (B, S, C_in), W: (C_out, C_in)
        Result:
            %t = transpose(x=%x, perm=[0, 2, 1])          # (B, C_in, S)
            %e = expand_dims(x=%t, axes=[2])              # (B, C_in, 1, S)
            %c = conv(x=%e, weight=W[:, :, None, None], bias=b)
            %s = squeeze(x=%c, axes=[2])
            %y = transpose(x=%s, perm=[0, 2, 1])          # (B, S, C_out)

    ``matmul(x=%x, y=W)`` becomes the same conv with weight ``W.T``. A rank-2 activation
    ``(N, C)`` is carried as ``(1, C, 1, N)``; when it is a ``(B, S, C)`` flattened by a reshape
    that a second reshape undoes (GPT-2's Conv1D), both reshapes are folded away. The
    boundary transposes are for ``ane::bc1s_layout`` to cancel between layers.

    Does not fire when: the weight or bias is not a constant; the matmul has no constant right
    operand, or transposes its activation; the activation is not a float tensor of rank 2 or 3.

    Options:

    - ``enabled`` (default true);
    - ``include_matmul`` (default true): also rewrite ``matmul`` by a constant.
    """

    include_matmul = BoolOption()

    def run(self, block) -> None:
        wanted = ("linear", "matmul") if self.include_matmul else ("linear",)
        self.rewrite_each(block, wanted, match_linear, self._rewrite)

    def _rewrite(self, block, site: LinearSite) -> None:
        anchor = site.flatten or site.op
        x = site.flatten.inputs["x"] if site.flatten else site.x
        output = site.unflatten.outputs[0] if site.unflatten else site.output
        if site.flatten and rank(x) != 3:
            with mb.set_before_op(before_op=anchor):
                x = mb.reshape(x=x, shape=list(output.shape[:2]) + [site.x.shape[-1]], name=f"{site.op.name}_unflatten")
        weight = site.weight.reshape(site.weight.shape + (1, 1))
        with mb.set_before_op(before_op=anchor):
            entered = enter(x, site.op.name)
            conv = mb.conv(x=entered, weight=weight, bias=site.bias, name=f"{site.op.name}_conv")
            result = leave(conv, rank(x), site.op.name + "_out")
        block.replace_uses_of_var_after_op(anchor_op=site.unflatten or site.op, old_var=output, new_var=result)
        removed = [o for o in (site.unflatten, site.op, site.flatten) if o is not None]
        self.remove_dead(block, removed)
        self.report.rewritten["matmul" if site.op.op_type == "matmul" else "linear"] += 1
