"""``ane::bc1s_layout``: run the body of the model in (B, C, 1, S), between the region's boundaries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared import axis_rules
from milpasses.passes.shared.bc1s import (
    BC1S_MAP,
    constant_to_bc1s,
    enter,
    entered_from,
    is_boundary_op,
    leave,
    left_from,
)
from milpasses.passes.shared.matching import (
    BINARY,
    REDUCTIONS,
    UNARY,
    NoMatch,
    constant_value,
    is_activation,
    is_block_output,
    rank,
)

BOUNDARY_OPS = ("transpose", "squeeze", "expand_dims")

#: The op types carried through the layout (their tensor inputs and axes: ``axis_rules``).
CARRIED = UNARY | BINARY | REDUCTIONS | {"select", "layer_norm", "softmax", "concat", "split", "slice_by_index",
                                         "slice_by_size"}


@dataclass(frozen=True)
class CarriedOp:
    """An op that can run in (B, C, 1, S): its rank-3 tensor operands and its new parameters."""

    op: object
    operands: tuple  # (input name, var or list of vars)
    parameters: dict  # input name -> value in the (B, C, 1, S) form


def _parameters(op) -> dict | NoMatch:
    """The op's parameters in (B, C, 1, S) form, or why it cannot be carried."""
    axes = axis_rules.axes(op)
    # Stricter than the op needs: gamma and beta are carried unchanged, right only for a norm over C alone.
    if op.op_type == "layer_norm" and axes != [2]:
        return NoMatch("layer_norm over axes other than the last")
    if axes is None:
        return NoMatch("reduction over every axis")
    # Stricter than the op needs (unmerge_leading_axes carries it): interleaving in (B, C, 1, S) is untested here.
    if axis_rules.interleaves(op):
        return NoMatch("interleaved concat")
    if op.op_type == "slice_by_index" and axis_rules.drops_axes(op):
        return NoMatch("slice squeezes an axis")
    return axis_rules.parameters(op, BC1S_MAP)


def _operand_ok(var) -> bool:
    """A tensor operand can be carried: a constant of rank <= 3, a scalar, or a rank-3 activation."""
    if constant_value(var) is not None:
        return np.ndim(constant_value(var)) <= 3
    return rank(var) in (0, 3)


def match_carried(op) -> CarriedOp | NoMatch:
    if op.op_type not in CARRIED:
        return NoMatch(f"'{op.op_type}' is not carried through the layout")
    if any(rank(out) != 3 for out in op.outputs):
        return NoMatch("output is not rank 3")
    operands = tuple((name, op.inputs[name]) for name in axis_rules.tensor_inputs(op.op_type) if name in op.inputs)
    flat = axis_rules.tensor_operands(op)
    if axis_rules.axes(op) != [] and any(rank(v) != 3 for v in flat):  # its axis parameters name rank-3 axes
        return NoMatch("operand is not rank 3")
    if not all(_operand_ok(v) for v in flat):
        return NoMatch("operand of rank 1, 2 or above 3")
    if not any(is_activation(v) for v in flat):
        return NoMatch("no activation operand")
    parameters = _parameters(op)
    if isinstance(parameters, NoMatch):
        return parameters
    return CarriedOp(op, operands, parameters)


def _enter_consumers(var) -> list:
    """The rank-3 enter boundaries that read ``var``: (transpose, expand_dims) pairs."""
    pairs = []
    for transpose in var.child_ops:
        for expand in transpose.outputs[0].child_ops:
            if entered_from(expand.outputs[0]) is var:
                pairs.append((transpose, expand))
    return pairs


def _only_entered(var) -> bool:
    """Every reader of ``var`` is an enter boundary, and there is at least one."""
    if is_block_output(var) or not var.child_ops:
        return False
    for transpose in var.child_ops:
        out = transpose.outputs[0]
        if is_block_output(out) or not out.child_ops:
            return False
        if any(entered_from(expand.outputs[0]) is not var for expand in out.child_ops):
            return False
    return True


def _needs_entry(var) -> bool:
    """A full-width activation that would need an enter boundary. A (B, S, 1) operand, such as
    a padding mask or an RMS statistic, is not counted: entering it moves S values, not S * C."""
    if constant_value(var) is not None or rank(var) == 0 or left_from(var) is not None:
        return False
    return var.shape[-1] != 1


def _all_inputs(op) -> list:
    flat = []
    for var in op.inputs.values():
        flat.extend(var if isinstance(var, (list, tuple)) else [var])
    return flat


def _new_entries(op) -> set:
    """The activation operands of ``op`` that would each need an enter boundary."""
    return {id(v) for v in axis_rules.tensor_operands(op) if _needs_entry(v)}


def _entry_points(op, found: set) -> set:
    """The vars where the region would have to be entered if ``op``, and every carried op that
    feeds only it, were moved into (B, C, 1, S): hoisting is worth it when there is one."""
    for var in axis_rules.tensor_operands(op):
        if not _needs_entry(var):
            continue
        producer = var.op
        if producer is not None and len(var.child_ops) == 1 and not is_block_output(var) and match_carried(producer):
            _entry_points(producer, found)
        else:
            found.add(id(var))
    return found


@register
class bc1s_layout(AnePass):
    """
    Carry the model's body in the ANE's ``(B, C, 1, S)`` layout from where the region starts
    (after the embedding gather or the patch conv) to where it ends (the model's outputs, or
    an op milpasses does not understand, such as attention until it is rewritten).

    Why: the ANE stores the last axis contiguously and pads it to 64 bytes, and every layout
    change is a memory copy. ``ane::linear_to_conv`` leaves each conv between an enter and a
    leave boundary; this pass moves those boundaries outward through every op that can run
    in the new layout, cancelling a leave against the next enter, until they stand only at the
    region's edges. Two moves, applied until nothing changes:

    - sink a leave through an op that reads it: the op is rebuilt on ``(B, C, 1, S)``;
    - hoist an enter above an op all of whose readers enter: the op is rebuilt the same way.

    .. code-block::

        Given (one residual step between two convs):
            %a = transpose(x=squeeze(x=%conv1, axes=[2]), perm=[0, 2, 1])     # leave
            %r = add(x=%a, y=%h)                                              # %h: (B, S, C)
            %n = layer_norm(x=%r, axes=[-1], gamma=g, beta=b)
            %e = expand_dims(x=transpose(x=%n, perm=[0, 2, 1]), axes=[2])     # enter
            %conv2 = conv(x=%e, ...)
        Result:
            %r = add(x=%conv1, y=expand_dims(x=transpose(x=%h, perm=[0, 2, 1]), axes=[2]))
            %n = layer_norm(x=%r, axes=[1], gamma=g, beta=b)
            %conv2 = conv(x=%n, ...)

    Carried: elementwise unary and binary ops and activations (gelu in every mode, silu, relu,
    sigmoid, tanh, erf, ...), ``select``, ``layer_norm`` over the last axis (becomes axis 1,
    gamma and beta unchanged), reductions with ``keep_dims`` (the RMSNorm chains), ``softmax``,
    and ``concat``, ``split``, ``slice_by_index`` and ``slice_by_size`` on any axis. Constant
    operands are rearranged at compile time.

    Does not fire on an op when: it is of another type; an output is not rank 3; an operand is
    an activation of rank 1, 2 or above 3; a layer_norm normalises other axes than the last; a
    slice squeezes an axis; a concat interleaves; hoisting it would turn one boundary into
    several full-width ones.

    Options:

    - ``enabled`` (default true): when false every conv keeps its own boundaries, which
      isolates the cost of the layout for comparison.
    """

    def run(self, block) -> None:
        self._unrewritten = {}  # op name -> why it stays outside the region, reported once
        changed = True
        while changed:
            changed = self._sink_leaves(block)
            changed = self._hoist_enters(block) or changed
        self._merge_duplicate_enters(block)
        self._remove_dead_boundaries(block)
        for name, reason in self._unrewritten.items():
            self.skip(name, reason)

    def _merge_duplicate_enters(self, block) -> None:
        """Keep the first enter of each var; the later ones read it instead (it comes before them)."""
        first = {}
        for op in list(block.operations):
            if op.op_type != "expand_dims" or op.enclosing_block is None:
                continue
            source = entered_from(op.outputs[0])
            if source is None:
                continue
            if id(source) not in first:
                first[id(source)] = op.outputs[0]
                continue
            block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=first[id(source)])
            self._remove_dead(block, [op])
            self.report.rewritten["merged duplicate boundary"] += 1

    def _sink_leaves(self, block) -> bool:
        changed = False
        for op in list(block.operations):
            if op.enclosing_block is None:
                continue
            if op.op_type == "expand_dims":
                changed = self._cancel(block, op) or changed
                continue
            if not any(left_from(v) is not None for v in _all_inputs(op)) or is_boundary_op(op):
                continue
            site = match_carried(op)
            if not site:
                self._unrewritten[op.name] = site.reason
                continue
            self._unrewritten.pop(op.name, None)
            with mb.set_before_op(before_op=op):
                carried = self._carry(site)
                left = [leave(v, 3, f"{out.name}_left") for v, out in zip(carried, op.outputs)]
            for old, new in zip(op.outputs, left):
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=old, new_var=new)
            self._remove_dead(block, [op])
            self.report.rewritten["sunk " + op.op_type] += 1
            changed = True
        return changed

    def _hoist_enters(self, block) -> bool:
        changed = False
        for op in reversed(list(block.operations)):
            if op.enclosing_block is None or op.op_type not in CARRIED or len(op.outputs) != 1:
                continue
            if not _only_entered(op.outputs[0]):
                continue
            site = match_carried(op)
            if not site:
                self._unrewritten[op.name] = site.reason
                continue
            if len(_new_entries(op)) > 1 and len(_entry_points(op, set())) > 1:
                self._unrewritten[op.name] = "hoisting would split one boundary into several"
                continue
            self._unrewritten.pop(op.name, None)
            with mb.set_before_op(before_op=op):
                (carried,) = self._carry(site)
            expands = [expand for _, expand in _enter_consumers(op.outputs[0])]
            for expand in expands:
                block.replace_uses_of_var_after_op(anchor_op=expand, old_var=expand.outputs[0], new_var=carried)
            self._remove_dead(block, expands + [op])
            self.report.rewritten["hoisted " + op.op_type] += 1
            changed = True
        return changed

    def _cancel(self, block, expand) -> bool:
        """enter(leave(%x)) is %x."""
        entered = entered_from(expand.outputs[0])
        source = left_from(entered) if entered is not None else None
        if source is None:
            return False
        block.replace_uses_of_var_after_op(anchor_op=expand, old_var=expand.outputs[0], new_var=source)
        self._remove_dead(block, [expand])
        self.report.rewritten["cancelled boundary"] += 1
        return True

    def _in_bc1s(self, var):
        """``var`` (B, S, C) as a (B, C, 1, S) operand: a constant rearranged, a leave undone,
        an existing enter reused, or a new enter."""
        value = constant_value(var)
        if value is not None:
            return constant_to_bc1s(value) if np.ndim(value) else var
        if rank(var) == 0:
            return var
        source = left_from(var)
        if source is not None:
            return source
        return enter(var, var.name)

    def _carry(self, site: CarriedOp) -> list:
        """Build the op in (B, C, 1, S) before the original; return its outputs."""
        op = site.op
        arguments = dict(op.inputs)
        for name, var in site.operands:
            arguments[name] = [self._in_bc1s(v) for v in var] if isinstance(var, (list, tuple)) else self._in_bc1s(var)
        arguments.update(site.parameters)
        result = getattr(mb, op.op_type)(**arguments, name=f"{op.name}_bc1s")
        return list(result) if isinstance(result, (list, tuple)) else [result]

    def _remove_dead(self, block, ops) -> None:
        """Remove ops nobody reads, then the boundary ops that only fed them."""
        for op in ops:
            if op.enclosing_block is None or any(v.child_ops or is_block_output(v) for v in op.outputs):
                continue
            feeding = [v.op for v in op.inputs.values() if not isinstance(v, (list, tuple)) and v.op is not None]
            self.remove_dead(block, [op])
            self._remove_dead(block, [f for f in feeding if f.op_type in BOUNDARY_OPS])

    def _remove_dead_boundaries(self, block) -> None:
        self._remove_dead(block, [op for op in reversed(block.operations) if op.op_type in BOUNDARY_OPS])
