"""What each op type does to the axes of its tensor operands, stated once per op type.

Four passes ask it. ``ane::bc1s_layout``: can the op run on a (B, S, C) tensor carried as
(B, C, 1, S), and with which axis parameters? ``ane::unmerge_leading_axes``: can it run on
(A, B, ...) instead of the merged view (A*B, ...), and with which? The attention transport rules
(``head_rules``): which inputs carry the heads, and which axes does the op work across?
``ane::split_wide_outputs``: where does the op take the channel axis, kept whole? Which op
types a pass carries stays the pass's own choice; this module only says what each op does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from milpasses.passes.shared.matching import BINARY, REDUCTIONS, UNARY, as_list, constant_value, rank

#: Elementwise ops of one tensor: the activations, ``cast``, and what rotary tables are computed with.
ELEMENTWISE = UNARY | {"cast", "sin", "cos", "sign", "log", "floor", "ceil", "round"}
#: Every reduction over given axes.
ALL_REDUCTIONS = REDUCTIONS | {"reduce_prod", "reduce_log_sum", "reduce_log_sum_exp"}


@dataclass(frozen=True)
class AxisMap:
    """Where a rewrite puts each axis of a tensor: axis ``a`` becomes axis ``to[a]`` of the
    rewritten tensor of rank ``rank`` (negative counts from its end), or, where ``to[a]`` is None,
    the axes ``split`` (in order) that it is split into. A rewritten axis nothing maps to is a new
    unit axis."""

    to: tuple
    rank: int
    split: tuple = ()

    def axis(self, axis) -> int | None:
        return self.to[int(axis) % len(self.to)]

    def axes(self, axes) -> list:
        """A set of axes, ascending in the rewritten tensor."""
        return sorted((self.axis(a) for a in axes), key=lambda a: a % self.rank)

    def vector(self, values, unit) -> list:
        """Per-axis settings, with ``unit`` on the new unit axes."""
        rewritten = [unit] * self.rank
        for axis, value in enumerate(np.asarray(values).tolist()):
            rewritten[self.axis(axis) % self.rank] = value
        return rewritten

    def perm(self, perm) -> list:
        """A transpose's perm; a split axis must stay where it is."""
        return [new for p in perm for new in (self.split if self.axis(p) is None else (self.axis(p) % self.rank,))]


class AxisRule:
    """An op that works on no axis in particular: each output element reads the elements at
    its own index (after broadcasting)."""

    tensors = ("x",)  # the inputs holding tensors whose axes the op works on; the others are parameters
    verb = "works across"  # what the op does to the axes :meth:`axes` names, for the reasons passes give

    def operand_rank(self, op) -> int:
        return rank(as_list(op.inputs[self.tensors[0]])[0])

    def axes(self, op) -> list | None:
        """The axes of the tensor operands the op works across, ascending; None for every axis."""
        return []

    def parameters(self, op, axis_map: AxisMap) -> dict:
        """The op's axis parameters on its operands rewritten by ``axis_map``. The caller has
        checked that :meth:`axes` are all kept whole by the map."""
        return {}

    def drops_axes(self, op) -> bool:
        """The output has fewer axes than the operands."""
        return False

    def interleaves(self, op) -> bool:
        """The op interleaves its operands' elements along its axis instead of joining them."""
        return False

    def follow(self, op, operand, axis: int) -> int | None:
        """The output axis that axis ``axis`` of the tensor operand ``operand`` becomes, its
        elements kept in order and apart from the other axes', or None when the op works across
        it. Broadcasting aligns the operand's axes with the output's last ones."""
        worked = self.axes(op)
        if worked is None or axis in worked:
            return None
        if self.drops_axes(op):
            return axis - sum(a < axis for a in worked)
        return axis + rank(op.outputs[0]) - rank(operand)


class Broadcast(AxisRule):
    tensors = ("x", "y")


class Select(AxisRule):
    tensors = ("cond", "a", "b")


class Linear(AxisRule):
    """Contracts the last axis with its weight; the maps it is asked about keep the last axis last."""

    def axes(self, op):
        return [self.operand_rank(op) - 1]


class Matmul(AxisRule):
    """Contracts the last axis of ``x`` with the second-to-last of ``y``, broadcasting the axes
    before them; the passes judge it by its operands, not by an axis parameter."""

    tensors = ("x", "y")

    def axes(self, op):
        return None


class Reduction(AxisRule):
    """Reduces its ``axes`` (every axis when absent); ``keep_dims`` keeps them as unit axes."""

    def axes(self, op):
        axes = op.inputs.get("axes")
        if axes is None:
            return None
        return sorted(int(a) % self.operand_rank(op) for a in constant_value(axes))

    def parameters(self, op, axis_map):
        return {"axes": axis_map.axes(self.axes(op))}

    def drops_axes(self, op):
        return not constant_value(op.inputs.get("keep_dims"))


class LayerNorm(Reduction):
    """Normalises over its ``axes``; its output keeps every axis."""

    def drops_axes(self, op):
        return False


class OneAxis(AxisRule):
    """Works along the one axis of its ``axis`` input (softmax, split, gather, concat)."""

    def axes(self, op):
        return [int(constant_value(op.inputs["axis"])) % self.operand_rank(op)]

    def parameters(self, op, axis_map):
        return {"axis": axis_map.axis(self.axes(op)[0])}

    def follow(self, op, operand, axis):
        (worked,) = self.axes(op)
        if axis == worked:
            return None
        # A gather's index axes replace the gathered one: only the axes after it move.
        return axis if axis < worked else axis + rank(op.outputs[0]) - rank(operand)


class Concat(OneAxis):
    tensors = ("values",)

    def interleaves(self, op):
        return bool(constant_value(op.inputs.get("interleave")))


class Stack(AxisRule):
    """Joins its operands along a new axis of the output, at ``axis``."""

    tensors = ("values",)

    def axes(self, op):
        return [int(constant_value(op.inputs["axis"])) % (self.operand_rank(op) + 1)]

    def follow(self, op, operand, axis):
        return axis if axis < self.axes(op)[0] else axis + 1


class Transpose(AxisRule):
    verb = "moves"

    def perm(self, op) -> list:
        return [int(p) % self.operand_rank(op) for p in constant_value(op.inputs["perm"])]

    def axes(self, op):
        return [axis for axis, p in enumerate(self.perm(op)) if p != axis]

    def parameters(self, op, axis_map):
        return {"perm": axis_map.perm(self.perm(op))}

    def follow(self, op, operand, axis):
        return self.perm(op).index(axis)


class PerAxis(AxisRule):
    """Takes a setting for every axis (slices, tile): ``VECTORS`` are those inputs, each with
    the setting that leaves a unit axis as it is."""

    VECTORS: dict = {}

    def axes(self, op):
        return list(range(self.operand_rank(op)))

    def parameters(self, op, axis_map):
        return {name: axis_map.vector(constant_value(op.inputs[name]), unit)
                for name, unit in self.VECTORS.items() if op.inputs.get(name) is not None}


class SliceByIndex(PerAxis):
    VECTORS = {"begin": 0, "end": 1, "stride": 1, "begin_mask": True, "end_mask": True}

    def drops_axes(self, op):
        squeeze = op.inputs.get("squeeze_mask")
        return squeeze is not None and any(constant_value(squeeze))


class SliceBySize(PerAxis):
    VECTORS = {"begin": 0, "size": -1}


class Tile(PerAxis):
    VECTORS = {"reps": 1}


class Reshape(AxisRule):
    """Relabels the shape, keeping the order of the elements: every axis may change."""

    def axes(self, op):
        return None

    def follow(self, op, operand, axis):
        """The output axis of the same length with as many elements before it: in row-major
        order every element of the axis keeps its neighbours. None for a symbolic shape."""
        before, after = operand.shape, op.outputs[0].shape
        if not all(isinstance(d, (int, np.integer)) for d in (*before, *after)):
            return None
        leading = int(np.prod(before[:axis]))
        for candidate, length in enumerate(after):
            if length == before[axis] and int(np.prod(after[:candidate])) == leading:
                return candidate
        return None


class ExpandDims(AxisRule):
    """Inserts unit axes at ``axes``, counted in the output."""

    def axes(self, op):
        out_rank = rank(op.outputs[0])
        return sorted(int(a) % out_rank for a in constant_value(op.inputs["axes"]))

    def follow(self, op, operand, axis):
        kept = [a for a in range(rank(op.outputs[0])) if a not in self.axes(op)]
        return kept[axis]


class Squeeze(AxisRule):
    """Drops its unit ``axes`` (every unit axis when absent)."""

    def axes(self, op):
        shape = op.inputs["x"].shape
        axes = op.inputs.get("axes")
        if axes is None:
            return [axis for axis, size in enumerate(shape) if size == 1]
        return sorted(int(a) % len(shape) for a in constant_value(axes))

    def drops_axes(self, op):
        return True


RULES: dict = {}


def register(rule: AxisRule, *op_types: str) -> None:
    for op_type in op_types:
        if op_type in RULES:
            raise ValueError(f"an axis rule for '{op_type}' is already registered")
        RULES[op_type] = rule


register(AxisRule(), *ELEMENTWISE)
register(Broadcast(), *BINARY)
register(Select(), "select")
register(Linear(), "linear")
register(Matmul(), "matmul")
register(Reduction(), *ALL_REDUCTIONS)
register(LayerNorm(), "layer_norm")
register(OneAxis(), "softmax", "split", "gather")
register(Concat(), "concat")
register(Stack(), "stack")
register(Transpose(), "transpose")
register(SliceByIndex(), "slice_by_index")
register(SliceBySize(), "slice_by_size")
register(Tile(), "tile")
register(Reshape(), "reshape")
register(ExpandDims(), "expand_dims")
register(Squeeze(), "squeeze")


def op_rule(op) -> AxisRule:
    return RULES[op.op_type]


def tensor_inputs(op_type: str) -> tuple:
    return RULES[op_type].tensors


def tensor_operands(op) -> list:
    """The vars of ``op``'s tensor inputs, in input order (a concat's values one by one)."""
    return [v for name in tensor_inputs(op.op_type) for v in as_list(op.inputs.get(name))]


def parameter_vars(op) -> list:
    """The vars of every other input of ``op``."""
    return [v for name, value in op.inputs.items() if name not in tensor_inputs(op.op_type) for v in as_list(value)]


def axes(op) -> list | None:
    return op_rule(op).axes(op)


def parameters(op, axis_map: AxisMap) -> dict:
    return op_rule(op).parameters(op, axis_map)


def drops_axes(op) -> bool:
    return op_rule(op).drops_axes(op)


def interleaves(op) -> bool:
    return op_rule(op).interleaves(op)


def follow(op, operand, axis: int) -> int | None:
    return op_rule(op).follow(op, operand, axis)


def perm(op) -> list:
    return RULES["transpose"].perm(op)
