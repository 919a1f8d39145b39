"""``ane::linear_to_conv``: every linear layer becomes a 1x1 convolution on (B, C, 1, S)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, BoolOption, register
from milpasses.passes.shared import compressed
from milpasses.passes.shared.bc1s import enter, leave
from milpasses.passes.shared.matching import (
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
    weight: np.ndarray | compressed.Compressed  # (C_out, C_in); a compressed one already (C_out, C_in, 1, 1)
    bias: np.ndarray | None
    output: object  # the var the conv result replaces
    flatten: object = None  # the reshape (B, S, C) -> (B*S, C) folded away, if any
    unflatten: object = None  # the reshape (B*S, C_out) -> (B, S, C_out) folded away, if any


def _conv_weight(var, transpose: bool):
    """A constant or compressed (C_out, C_in) weight (transposed first if ``transpose``) in the
    conv's (C_out, C_in, 1, 1), or NoMatch. A compressed weight stays compressed, and only a
    weight nothing else reads is taken, so its stored bytes are not duplicated."""
    weight = constant_value(var)
    if weight is not None:
        if weight.ndim != 2:
            return NoMatch(f"constant has rank {weight.ndim}, not 2")
        weight = weight.T if transpose else weight
        return weight.reshape(weight.shape + (1, 1))
    if not compressed.is_compressed(var):
        return NoMatch("weight is neither a constant nor a compressed constant")
    if len(var.child_ops) != 1:
        return NoMatch("compressed weight is read by other ops too; rewriting it would store it twice")
    plan = compressed.read(var)
    if plan and plan.rank != 2:
        return NoMatch(f"compressed weight has rank {plan.rank}, not 2")
    if plan and transpose:
        plan = compressed.transposed(plan)
    return compressed.expanded(plan, 2, 2) if plan else plan


def _as_linear(op):
    """(x, conv weight (C_out, C_in, 1, 1), bias) of a linear or a matmul by a constant, or NoMatch."""
    if op.op_type == "linear":
        weight, bias = _conv_weight(op.inputs["weight"], transpose=False), op.inputs.get("bias")
        if isinstance(weight, NoMatch):
            return NoMatch(f"linear {weight.reason}")
        if bias is not None and constant_value(bias) is None:
            return NoMatch("linear bias is not a constant")
        return op.inputs["x"], weight, None if bias is None else constant_value(bias)
    x, y = op.inputs["x"], op.inputs["y"]
    if constant_value(y) is None and not compressed.is_compressed(y):
        return NoMatch("matmul has no constant right operand")
    if not is_activation(x):
        return NoMatch("matmul of two constants")
    if constant_value(op.inputs["transpose_x"]):
        return NoMatch("matmul transposes its activation")
    weight = _conv_weight(y, transpose=not constant_value(op.inputs["transpose_y"]))
    if isinstance(weight, NoMatch):
        return NoMatch(f"matmul {weight.reason}")
    return x, weight, None


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

    A weight that arrives compressed (a ``constexpr_*`` decompression op: palettized or
    quantized) stays compressed: the conv reads a decompression op rebuilt in the conv's
    ``(C_out, C_in, 1, 1)`` shape from the same indices, tables and scales (transposed for a
    matmul), never the dense weight (``milpasses/passes/compressed.py``).

    Does not fire when: the weight or bias is not a constant (or a compressed weight that
    other ops read too, or whose form cannot be reshaped compressed, like iOS16's packed
    lookup table under a matmul's transpose); the matmul has no constant right
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
        with mb.set_before_op(before_op=anchor):
            weight = site.weight
            if isinstance(weight, compressed.Compressed):
                weight = compressed.build(weight, f"{site.op.name}_conv_weight")
            entered = enter(x, site.op.name)
            conv = mb.conv(x=entered, weight=weight, bias=site.bias, name=f"{site.op.name}_conv")
            result = leave(conv, rank(x), site.op.name + "_out")
        block.replace_uses_of_var_after_op(anchor_op=site.unflatten or site.op, old_var=output, new_var=result,
                                           force_replace=isinstance(site.weight, compressed.Compressed))
        removed = [o for o in (site.unflatten, site.op, site.flatten) if o is not None]
        self.remove_dead(block, removed)
        self.report.rewritten["matmul" if site.op.op_type == "matmul" else "linear"] += 1
