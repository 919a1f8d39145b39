"""``ane::split_wide_outputs``: a conv wider than the ANE's largest dimension, whose channels
leave the program as one output, becomes several convs each leaving as its own output."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.input_types import TensorType
from coremltools.converters.mil.mil import Block

from milpasses.passes.base import AnePass, PositiveIntOption, register
from milpasses.passes.shared import axis_rules
from milpasses.passes.shared.matching import (
    BINARY,
    NoMatch,
    constant_value,
    has_static_shape,
    is_block_output,
    rank,
)

#: The ANE's largest tensor dimension (espresso: "Output blob dimensions exceed ANE limit").
MAX_ANE_CHANNELS = 16384
#: The op types carried from the conv to the output, each only where the axis-rule registry says
#: it keeps the channel axis whole: elementwise ops, arithmetic with a constant, relabelling, and
#: reductions and softmax over other axes.
CARRIED = (axis_rules.ELEMENTWISE | BINARY | axis_rules.ALL_REDUCTIONS
           | {"softmax", "transpose", "reshape", "squeeze", "expand_dims"})


@dataclass(frozen=True)
class WideOutput:
    conv: object
    chain: tuple  # (op, the var of the chain it reads, the channel axis of that var), conv to output
    output: object  # the program output the channels leave by
    parts: tuple  # (first channel, end) of each part, in order


def part_bounds(channels: int, max_channels: int) -> tuple:
    """The fewest near-equal parts of at most ``max_channels`` (the first ones one longer)."""
    count = -(-channels // max_channels)
    edges = np.cumsum([0] + [channels // count + (i < channels % count) for i in range(count)])
    return tuple((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]))


def _per_channel(value, out_rank: int, channel_axis: int) -> bool:
    """A constant operand broadcast to the output reads one value, or one per channel."""
    shape = (1,) * (out_rank - np.ndim(value)) + np.shape(value)
    return all(size == 1 for axis, size in enumerate(shape) if axis != channel_axis)


def _carried_step(op, var, axis: int) -> int | NoMatch:
    """The channel axis of ``op``'s output when it reads ``var`` (channels on ``axis``) and
    treats every channel apart; else why it cannot be carried."""
    if op.op_type not in CARRIED:
        return NoMatch(f"'{op.op_type}' between the conv and the output is not carried")
    if len(op.outputs) != 1 or not has_static_shape(op.outputs[0]):
        return NoMatch(f"'{op.op_type}' has a symbolic shape")
    for operand in axis_rules.tensor_operands(op):
        if operand is var:
            continue
        value = constant_value(operand)
        if value is None:
            return NoMatch(f"'{op.op_type}' reads another tensor")
        if not _per_channel(value, rank(op.outputs[0]), axis + rank(op.outputs[0]) - rank(var)):
            return NoMatch(f"'{op.op_type}' reads a constant that is neither scalar nor per channel")
    if any(constant_value(v) is None for v in axis_rules.parameter_vars(op)):
        return NoMatch(f"'{op.op_type}' has a parameter known only at run time")
    following = axis_rules.follow(op, var, axis)
    if following is None:
        return NoMatch(f"'{op.op_type}' {axis_rules.op_rule(op).verb} the channel axis")
    return following


def match_wide_output(conv, max_channels: int) -> WideOutput | NoMatch | None:
    """The site, why it cannot be split, or None for a conv no wider than ``max_channels``."""
    weight = conv.inputs["weight"]
    if weight.shape[0] <= max_channels:
        return None
    if constant_value(weight) is None:
        return NoMatch("the weight is not a constant")
    if int(constant_value(conv.inputs.get("groups")) or 1) != 1:
        return NoMatch("grouped conv")
    if not has_static_shape(conv.outputs[0]):
        return NoMatch("the conv's output has a symbolic shape")
    chain, var, axis = [], conv.outputs[0], 1
    while not is_block_output(var):
        if len(var.child_ops) != 1:
            return NoMatch(f"'{var.name}' has {len(var.child_ops)} readers, not one op on the way to an output")
        op = var.child_ops[0]
        following = _carried_step(op, var, axis)
        if isinstance(following, NoMatch):
            return following
        chain.append((op, var, axis))
        var, axis = op.outputs[0], following
    if var.child_ops or list(var.op.enclosing_block.outputs).count(var) != 1:
        return NoMatch(f"'{var.name}' is read beside being the program output")
    return WideOutput(conv, tuple(chain), var, part_bounds(int(weight.shape[0]), max_channels))


def _channel_slice(value, out_rank: int, channel_axis: int, first: int, end: int):
    """The part's channels of a per-channel constant; a scalar or a one-value one as it is."""
    value = np.asarray(value)
    axis = channel_axis - (out_rank - value.ndim)
    if axis < 0 or value.shape[axis] == 1:
        return value
    return np.take(value, np.arange(first, end), axis=axis)


@register
class split_wide_outputs(AnePass):
    """
    Split a ``conv`` with more than ``max_channels`` output channels, whose result leaves the
    program as one output through ops that treat each channel apart, into convs of at most
    ``max_channels`` channels, each carried to its own output: the output ``<name>`` becomes
    ``<name>_0 .. <name>_{k-1}``, in channel order, and the caller joins them.

    Why: the ANE takes no tensor dimension above 16384 (espresso logs "Output blob dimensions
    exceed ANE limit"; ANEMLL's and the Whisper ports' LM heads are split for it), so the LM head
    of every current vocabulary (49k to 262k) would run on the GPU, a partition of its own.
    Joining the parts in the program would bring the wide dimension back; the host joins them.

    .. code-block::

        Given (a decode step's LM head, vocabulary 40000, max_channels 16384):
            %head = conv(x=%h, weight=W, bias=b)                    # W: (40000, C, 1, 1)
            %logits = reshape(x=%head, shape=[1, 1, 40000])         # a program output
        Result (three near-equal parts):
            %head_0 = conv(x=%h, weight=W[:13334], bias=b[:13334])
            %logits_0 = reshape(x=%head_0, shape=[1, 1, 13334])    # a program output
            %head_1 = conv(x=%h, weight=W[13334:26667], bias=b[13334:26667])
            %logits_1 = reshape(x=%head_1, shape=[1, 1, 13333])    # a program output
            %head_2 = ...                                           # %logits_2

    Carried between the conv and the output, each where the axis-rule registry says it keeps the
    channel axis whole and apart from the others: elementwise ops and activations (softcapping's
    ``tanh``), ``cast``, arithmetic with a scalar or per-channel constant (sliced with the
    channels), ``transpose``, ``reshape``, ``squeeze``, ``expand_dims``, and reductions and
    ``softmax`` over other axes than the channels.

    Does not fire when: the weight is not a constant (a compressed weight included); the conv is
    grouped; a shape is symbolic; a value on the way has another reader, or the output is read
    too; an op on the way is of another type, reads another tensor or a constant that is neither
    scalar nor per channel, or works across the channels (a reduction, a softmax, a reshape that
    merges them with another axis).

    Not in ``ane_pipeline()`` unless asked (``split_wide_outputs=True``): it changes the
    program's outputs. It runs after ``ane::fold_unit_transposes``, on the exit the layout passes
    leave, and renames the output's entry in the function's output types.

    Options:

    - ``enabled`` (default true);
    - ``max_channels`` (default 16384): the widest part.
    """

    max_channels = PositiveIntOption(MAX_ANE_CHANNELS)

    def run(self, block) -> None:
        self.rewrite_each(block, ("conv",), lambda conv: match_wide_output(conv, self.max_channels), self._rewrite)

    def _rewrite(self, block, site: WideOutput) -> None:
        conv, output = site.conv, site.output
        weight, bias = constant_value(conv.inputs["weight"]), constant_value(conv.inputs.get("bias"))
        parts = []
        with mb.set_before_op(before_op=output.op):  # after every input of the chain
            for index, (first, end) in enumerate(site.parts):
                arguments = {**conv.inputs, "weight": weight[first:end]}
                if bias is not None:
                    arguments["bias"] = bias[first:end]
                var = mb.conv(**arguments, name=f"{conv.name}_{index}")
                for op, read, axis in site.chain:
                    var = self._carry(op, read, axis, var, first, end)
                var.set_name(f"{output.name}_{index}")
                Block._copy_scope_info(output, var)  # the new ops inherit the output's torch scope
                parts.append(var)
        position = list(block.outputs).index(output)
        block.set_outputs(list(block.outputs[:position]) + parts + list(block.outputs[position + 1:]))
        if block.output_types:
            named = block.output_types[position]
            block.set_output_types(block.output_types[:position] + [
                TensorType(name=part.name, dtype=named.dtype) for part in parts] + block.output_types[position + 1:])
        self.remove_dead(block, [output.op])
        self.report.rewritten[f"conv split in {len(parts)} outputs"] += 1

    @staticmethod
    def _carry(op, read, axis: int, var, first: int, end: int):
        """``op`` rebuilt on the part ``var`` (channels ``first:end`` of ``read``, on ``axis``)."""
        out = op.outputs[0]
        out_axis = axis_rules.follow(op, read, axis)
        arguments = {}
        for name, value in op.inputs.items():
            if value is read:
                arguments[name] = var
            elif name in axis_rules.tensor_inputs(op.op_type):
                arguments[name] = _channel_slice(constant_value(value), rank(out), axis + rank(out) - rank(read),
                                                 first, end)
            else:
                arguments[name] = value
        if op.op_type == "reshape":
            shape = list(out.shape)
            shape[out_axis] = end - first
            arguments["shape"] = shape
        return getattr(mb, op.op_type)(**arguments, name=f"{op.name}_{first}")
