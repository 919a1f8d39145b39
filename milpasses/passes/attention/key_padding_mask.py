"""``ane::key_padding_mask``: a mask that depends on the keys only is built as (B, 1, 1, Sk)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared.matching import BINARY, LOGICAL, NoMatch, is_activation, rank

#: Ops that compute each output element from the elements at the same (broadcast) position of
#: their inputs: evaluating them on one query row gives that row of their result.
ELEMENTWISE = LOGICAL | (BINARY - {"pow"}) | {"select", "cast"}
_MAX_OPS = 16  # mask-building chains are a handful of ops; a longer one is not a mask we know
QUERY_AXIS = -2  # attention scores are (B, H, Sq, Sk): queries on axis -2, keys (the softmax axis) on -1


@dataclass(frozen=True)
class KeyMask:
    mask: object  # the (B, 1, Sq, Sk) var the additive terms read
    ops: tuple  # the ops that carry the query axis, in program order
    query_length: int


def _query_size(var) -> int:
    """The size of ``var`` on the query axis once broadcast to rank 4 (1 when it has no such axis)."""
    return int(var.shape[QUERY_AXIS]) if rank(var) >= 2 else 1


def _rows_equal(value: np.ndarray) -> bool:
    """Every slice of a constant along the query axis is the same."""
    value = np.asarray(value)
    return bool(np.array_equal(value, np.broadcast_to(np.take(value, [0], axis=QUERY_AXIS), value.shape)))


def _additive_softmax_term(add_op, mask) -> bool:
    """``add_op`` adds ``mask`` to scores of the same query length, and only softmaxes over the
    last (key) axis read the sum."""
    others = [v for v in (add_op.inputs["x"], add_op.inputs["y"]) if v is not mask]
    if len(others) != 1 or rank(others[0]) != 4 or others[0].shape[QUERY_AXIS] != mask.shape[QUERY_AXIS]:
        return False
    readers = add_op.outputs[0].child_ops
    return bool(readers) and all(r.op_type == "softmax" and int(r.inputs["axis"].val) in (-1, 3) for r in readers)


def match_key_mask(mask) -> KeyMask | NoMatch:
    """Prove that the additive mask ``mask`` (B, 1, Sq, Sk) has the same value for every query."""
    if rank(mask) != 4 or not isinstance(mask.shape[QUERY_AXIS], (int, np.integer)):
        return NoMatch("the mask is not rank 4 with a fixed query length")
    query_length = int(mask.shape[QUERY_AXIS])
    if query_length == 1:
        return NoMatch("the mask already has one query row")
    if mask.op is None:
        return NoMatch("the mask is a model input: its rows cannot be proven equal")
    if not all(c.op_type == "add" and _additive_softmax_term(c, mask) for c in mask.child_ops):
        return NoMatch("the mask is read by something other than an additive term of a softmax over the keys")
    carriers, pending = {}, [mask]
    while pending:
        var = pending.pop()
        op = var.op
        if op is None:
            return NoMatch("a model input with a query axis feeds the mask")
        if op.name in carriers:
            continue
        if op.op_type not in ELEMENTWISE:
            return NoMatch(f"the query axis comes from '{op.op_type}', not an elementwise op")
        carriers[op.name] = op
        if len(carriers) > _MAX_OPS:
            return NoMatch(f"the mask is built by more than {_MAX_OPS} ops")
        for value in op.inputs.values():
            if not hasattr(value, "shape") or _query_size(value) == 1:
                continue
            if _query_size(value) != query_length:
                return NoMatch("an operand's query axis differs from the mask's")
            if is_activation(value):
                pending.append(value)
            elif not _rows_equal(value.val):
                return NoMatch("the mask depends on the query position (a causal or sliding-window mask)")
    block = mask.op.enclosing_block
    order = {id(op): i for i, op in enumerate(block.operations)}
    return KeyMask(mask, tuple(sorted(carriers.values(), key=lambda op: order[id(op)])), query_length)


@register
class key_padding_mask(AnePass):
    """
    Build an attention mask that depends on the keys only as (B, 1, 1, Sk), not (B, 1, Sq, Sk).

    Why: Hugging Face's masking utilities expand a (B, S) padding mask to a (B, 1, S, S) tensor
    (a gather, a logical_and with a (1, 1, S, 1) constant, a select between two (B, 1, S, S)
    constants) although every query row of it is the same. Apple's recipe adds a (B, Sk, 1, 1)
    padding mask: S times smaller, computed once, and broadcast over the queries by the add.
    ``ane::attention_to_einsum`` turns a (B, 1, 1, Sk) term into that keys-first form.

    .. code-block::

        Given:
            %keep = logical_and(x=const(1, 1, S, 1: all true), y=%key_valid)   # (B, 1, S, S)
            %mask = select(cond=%keep, a=const(B, 1, S, S: 0), b=const(B, 1, S, S: -1e4))
            %p = softmax(x=add(x=%scores, y=%mask), axis=-1)
        Result:
            %keep = logical_and(x=const(1, 1, 1, 1: true), y=%key_valid)       # (B, 1, 1, S)
            %mask = select(cond=%keep, a=const(B, 1, 1, S: 0), b=const(B, 1, 1, S: -1e4))
            %p = softmax(x=add(x=%scores, y=%mask), axis=-1)

    It proves the mask is the same for every query: every op that carries the query axis
    (axis -2) is elementwise, every constant it reads is equal along that axis, and every other
    operand has one row there. It then rebuilds those ops on one query row; the adds broadcast.

    Does not fire when the mask depends on the query position (causal, sliding window, T5 and
    ALiBi-style biases), is a model input, comes from a non-elementwise op, or is read by
    anything but an add whose sum goes only to softmaxes over the last axis.

    Options: ``enabled`` (default true).
    """

    def run(self, block) -> None:
        masks = {}
        for op in block.operations:
            if op.op_type != "softmax":
                continue
            summed = op.inputs["x"].op
            if summed is None or summed.op_type != "add":
                continue
            for operand in (summed.inputs["x"], summed.inputs["y"]):
                # a mask is shared by the heads (axis 1 of one); per-head terms are biases, not masks
                if is_activation(operand) and rank(operand) == 4 and operand.shape[1] == 1:
                    masks.setdefault(operand.name, operand)
        for mask in masks.values():
            if mask.op is not None and mask.op.enclosing_block is None:
                continue  # removed by an earlier rewrite
            site = match_key_mask(mask)
            if not site:
                self.skip(mask.name, site.reason)
                continue
            self._rewrite(block, site)

    def _rewrite(self, block, site: KeyMask) -> None:
        rebuilt = {}
        last = site.ops[-1]
        with mb.set_before_op(before_op=last):
            for op in site.ops:
                arguments = {}
                for name, value in op.inputs.items():
                    if id(value) in rebuilt:
                        arguments[name] = rebuilt[id(value)]
                    elif not is_activation(value):
                        constant = value.val
                        if isinstance(constant, np.ndarray) and constant.ndim >= 2 \
                                and constant.shape[QUERY_AXIS] == site.query_length:
                            constant = np.take(constant, [0], axis=QUERY_AXIS)
                        arguments[name] = constant
                    else:
                        arguments[name] = value
                new = getattr(mb, op.op_type)(**arguments, name=f"{op.name}_keys_only")
                rebuilt[id(op.outputs[0])] = new
        # the adds broadcast the one row: their results keep their shapes
        block.replace_uses_of_var_after_op(anchor_op=last, old_var=site.mask, new_var=rebuilt[id(site.mask)],
                                           no_check_var_types=True)
        self.remove_dead(block, [last])
        self.report.rewritten["key-only mask"] += 1
