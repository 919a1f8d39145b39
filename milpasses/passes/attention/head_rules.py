"""Transport rules: how each op type of an attention operand's path is carried per head.

One rule per op type, at a glance:

============================  =================================================================
op type                       carried as
============================  =================================================================
transpose                     a new order of the axes' roles; nothing emitted
reshape                       refactors channel axes (head splits, GQA merges, flattening pairs);
                              batch and sequence axes must pass unchanged
expand_dims, squeeze          adds or drops a size-1 channel axis
tile                          repeats channel entries (GQA/MQA): the repeats are never copied
gather                        constant indices on a channel axis (Falcon picks its K/V head)
slice_by_index, slice_by_size a channel range or stride (partial and interleaved rotary, fused
                              QKV cut by slices, MQA's one K/V head); strided reads of head_dim
                              ask for a head order (evens, then odds: the Q/K projections' rows
                              are permuted to it, so the reads are contiguous)
split                         several channel ranges (fused QKV)
concat, stack                 joins channel maps (rotate_half, partial rotary's pass-through);
                              one value is the identity
elementwise unary             one op on the materialised channels
elementwise binary            one op; a constant is laid out at compile time (per-head tables
                              repeated per head); a run-time table is laid out once and shared;
                              a per-head statistic is broadcast back by a grouped conv
reduction over head_dim       reduce_mean/sum: one grouped conv; others: per head, then concat
============================  =================================================================

Scalar factors stay pending on the form (``scale``) through the ops they commute with, so a
``q / sqrt(d)`` costs nothing: it reaches the scores and is folded into the Q projection.
Each rule returns the output forms, or a NoMatch naming what it cannot carry.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from milpasses.passes.attention.head_form import (
    BATCH,
    CHANNEL,
    SEQ,
    HeadForm,
    constant_to_form,
    materialise,
    materialised,
)
from milpasses.passes.shared import axis_rules
from milpasses.passes.shared.matching import BINARY, NoMatch, constant_value, is_static, rank, scalar_value

#: Every elementwise op of one tensor but ``cast``: heads are carried as floats, and a cast may leave them.
UNARY = axis_rules.ELEMENTWISE - {"cast"}
#: Reductions that commute with a scalar factor (sum(x * c) == sum(x) * c).
LINEAR_REDUCTIONS = {"reduce_mean": "mean", "reduce_sum": "sum"}


def _channel_position(form: HeadForm, axis: int) -> int | None:
    """Which channel axis (0 = outermost) tensor axis ``axis`` is, or None for batch/sequence."""
    if form.axes[axis] != CHANNEL:
        return None
    return form.channel_axes().index(axis)


# --- layout rules: they only rearrange the channel map ------------------------------------------

def transpose(op, forms, builder):
    form = forms[0]
    perm = axis_rules.perm(op)
    axes = [form.axes[p] for p in perm]
    channel_order = [form.channel_axes().index(p) for p in perm if form.axes[p] == CHANNEL]
    return form.with_channels(axes, np.transpose(form.src, channel_order), np.transpose(form.chan, channel_order))


def reshape(op, forms, builder):
    form = forms[0]
    before = list(op.inputs["x"].shape)
    after = list(op.outputs[0].shape)
    groups = _reshape_groups(before, after)
    if groups is None:
        return NoMatch("a reshape on an attention operand has dynamic or unmatched sizes")
    axes = []
    for ins, outs in groups:
        roles = [form.axes[i] for i in ins]
        if set(roles) == {CHANNEL}:
            axes.extend([CHANNEL] * len(outs))
        elif len(ins) == 1 and len(outs) == 1:
            axes.append(roles[0])
        else:
            carried = _unit_channels_around(roles, [before[i] for i in ins], [after[j] for j in outs])
            if carried is None:
                return NoMatch("a reshape on an attention operand mixes heads with the batch or sequence")
            axes.extend(carried)
    shape = [after[i] for i, role in enumerate(axes) if role == CHANNEL]
    if int(np.prod(shape)) != form.src.size:
        return NoMatch("a reshape on an attention operand changes the number of channels")
    return form.with_channels(axes, form.src.reshape(shape), form.chan.reshape(shape))


def _unit_channels_around(roles, sizes_in, sizes_out):
    """The output roles of a reshape group that only drops or adds size-1 channel axes around
    one batch or sequence axis (longer than 1), or None. A sequence of one token (a decode
    step) among unit axes takes the last of them, the (B, C, 1, S) place of the sequence."""
    kept = [(role, size) for role, size in zip(roles, sizes_in) if not (role == CHANNEL and size == 1)]
    if SEQ in roles and BATCH not in roles and set(sizes_in) == set(sizes_out) == {1}:
        return [CHANNEL] * (len(sizes_out) - 1) + [SEQ]
    if len(kept) != 1 or kept[0][0] == CHANNEL or kept[0][1] == 1:
        return None
    role, size = kept[0]
    if sorted(sizes_out)[:-1] != [1] * (len(sizes_out) - 1) or max(sizes_out) != size:
        return None
    return [role if out == size else CHANNEL for out in sizes_out]


def _reshape_groups(before, after):
    """Pair runs of input axes with runs of output axes of equal size; a symbolic size must
    pass through alone."""
    groups, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        if not (is_static(before[i]) and is_static(after[j])):
            if is_static(before[i]) or is_static(after[j]):
                return None
            groups.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs, size_in, size_out = [i], [j], before[i], after[j]
        i, j = i + 1, j + 1
        while size_in != size_out:
            if size_in < size_out and i < len(before) and is_static(before[i]):
                size_in *= before[i]
                ins.append(i)
                i += 1
            elif size_out < size_in and j < len(after) and is_static(after[j]):
                size_out *= after[j]
                outs.append(j)
                j += 1
            else:
                return None
        groups.append((ins, outs))
    if any(before[k] != 1 for k in range(i, len(before))) or any(after[k] != 1 for k in range(j, len(after))):
        return None
    if not groups:
        return None
    groups[-1][0].extend(range(i, len(before)))
    groups[-1][1].extend(range(j, len(after)))
    return groups


def expand_dims(op, forms, builder):
    form = forms[0]
    out_rank = rank(op.outputs[0])
    inserted = axis_rules.axes(op)
    axes, old = [], iter(form.axes)
    for i in range(out_rank):
        axes.append(CHANNEL if i in inserted else next(old))
    shape = [1 if i in inserted else None for i in range(out_rank) if axes[i] == CHANNEL]
    sizes = iter(form.channel_shape)
    shape = [s if s is not None else next(sizes) for s in shape]
    return form.with_channels(axes, form.src.reshape(shape), form.chan.reshape(shape))


def squeeze(op, forms, builder):
    form = forms[0]
    shape = op.inputs["x"].shape
    dropped = axis_rules.axes(op)
    if any(form.axes[a] != CHANNEL for a in dropped):
        return NoMatch("a squeeze drops the batch or sequence axis of an attention operand")
    keep = [i for i in range(len(shape)) if i not in dropped]
    channel_shape = [shape[i] for i in keep if form.axes[i] == CHANNEL]
    return form.with_channels([form.axes[i] for i in keep], form.src.reshape(channel_shape),
                              form.chan.reshape(channel_shape))


def tile(op, forms, builder):
    form = forms[0]
    reps = [int(r) for r in constant_value(op.inputs["reps"])]
    if any(r != 1 for r, role in zip(reps, form.axes) if role != CHANNEL):
        return NoMatch("a tile repeats the batch or sequence of an attention operand")
    channel_reps = [r for r, role in zip(reps, form.axes) if role == CHANNEL]
    return form.with_channels(form.axes, np.tile(form.src, channel_reps), np.tile(form.chan, channel_reps))


def slice_by_index(op, forms, builder):
    form = forms[0]
    shape = op.inputs["x"].shape
    n = len(shape)

    def vector(name, default):
        var = op.inputs.get(name)
        return [default] * n if var is None else list(np.asarray(constant_value(var)).tolist())

    begin, end, stride = vector("begin", 0), vector("end", 0), vector("stride", 1)
    begin_mask, end_mask, squeeze_mask = vector("begin_mask", False), vector("end_mask", False), vector("squeeze_mask", False)
    index = []
    for axis in range(n):
        size = shape[axis]
        if form.axes[axis] != CHANNEL:
            full = (begin_mask[axis] or begin[axis] == 0) and (end_mask[axis] or end[axis] == size) and stride[axis] == 1
            if not full or squeeze_mask[axis]:
                return NoMatch("a slice cuts the batch or sequence of an attention operand")
            continue
        lo = None if begin_mask[axis] else begin[axis]
        hi = None if end_mask[axis] else end[axis]
        index.append(lo if squeeze_mask[axis] else slice(lo, hi, stride[axis]))
        if axis == form.channel_axes()[-1] and not squeeze_mask[axis]:
            builder.note_slice(size, range(size)[lo:hi:stride[axis]])
    axes = [role for axis, role in enumerate(form.axes) if not squeeze_mask[axis]]
    index = tuple(index)
    return form.with_channels(axes, form.src[index], form.chan[index])


def slice_by_size(op, forms, builder):
    form = forms[0]
    shape = op.inputs["x"].shape
    begin = [int(b) for b in constant_value(op.inputs["begin"])]
    size = [int(s) for s in constant_value(op.inputs["size"])]
    index = []
    for axis, role in enumerate(form.axes):
        stop = shape[axis] if size[axis] == -1 else begin[axis] + size[axis]
        if role != CHANNEL:
            if begin[axis] != 0 or (size[axis] != -1 and size[axis] != shape[axis]):
                return NoMatch("a slice cuts the batch or sequence of an attention operand")
            continue
        index.append(slice(begin[axis], stop))
        if axis == form.channel_axes()[-1]:
            builder.note_slice(shape[axis], range(begin[axis], stop))
    return form.with_channels(form.axes, form.src[tuple(index)], form.chan[tuple(index)])


def split(op, forms, builder):
    form = forms[0]
    (axis,) = axis_rules.axes(op)
    position = _channel_position(form, axis)
    if form.axes[axis] == SEQ:
        return _split_sequence(op, form, axis, builder)
    if position is None:
        return NoMatch("a split cuts the batch of an attention operand")
    results, lo = [], 0
    for out in op.outputs:
        hi = lo + out.shape[axis]
        index = (slice(None),) * position + (slice(lo, hi),)
        if axis == form.channel_axes()[-1]:
            builder.note_slice(form.channel_shape[position], range(lo, hi))
        results.append(form.with_channels(form.axes, form.src[index], form.chan[index]))
        lo = hi
    return results


def _split_sequence(op, form, axis, builder):
    """A split of the sequence (DINOv3 rotates its patch tokens, not its class token): the
    channels are materialised once and cut on the (B, C, 1, S) sequence axis."""
    sizes = [out.shape[axis] for out in op.outputs]
    if not all(is_static(size) for size in sizes):
        return NoMatch("a split of the sequence of an attention operand into sizes known only at run time")
    x = materialise(form, builder, f"{op.name}_in", apply_scale=False)
    pieces = builder.split(x=x, split_sizes=sizes, axis=3, name=f"{op.name}_seq")
    return [replace(materialised(piece, form), seq=size, scale=form.scale) for piece, size in zip(pieces, sizes)]


def _concat_sequence(op, forms, builder):
    """Sequence pieces joined again: each materialised in its channel order, then concatenated
    on the (B, C, 1, S) sequence axis."""
    first = forms[0]
    if any(f.axes != first.axes or f.channel_shape != first.channel_shape for f in forms):
        return NoMatch("a concat of sequence pieces with different head layouts")
    if not all(is_static(f.seq) for f in forms):
        return NoMatch("a concat of sequence pieces of lengths known only at run time")
    orders = _common_orders(forms)
    pieces = [materialise(replace(f, orders=orders), builder, f"{op.name}_{i}") for i, f in enumerate(forms)]
    out = builder.concat(values=pieces, axis=3, name=f"{op.name}_seq")
    return replace(materialised(out, replace(first, orders=orders)), seq=sum(int(f.seq) for f in forms), scale=1.0,
                   linear=all(f.linear for f in forms), roots=frozenset().union(*(f.roots for f in forms)))


def gather(op, forms, builder):
    """A gather with constant indices on a channel axis picks heads (Falcon's one K/V head)."""
    form = forms[0]
    indices = constant_value(op.inputs["indices"])
    (axis,) = axis_rules.axes(op)
    position = _channel_position(form, axis)
    batch_dims = constant_value(op.inputs.get("batch_dims"))
    if indices is None or position is None or (batch_dims is not None and int(batch_dims) != 0):
        return NoMatch("a gather on an attention operand is not by constant indices on a channel axis")
    indices = np.asarray(indices, dtype=np.int64) % form.channel_shape[position]
    axes = list(form.axes[:axis]) + [CHANNEL] * indices.ndim + list(form.axes[axis + 1:])
    return form.with_channels(axes, np.take(form.src, indices, axis=position), np.take(form.chan, indices, axis=position))


def _joined(forms, join, axes, builder, name):
    """Forms of one channel map made of several: sources merged; pending scales that differ
    are applied first (rotate_half joins -x2 with x1)."""
    if len({f.scale for f in forms}) != 1:
        forms = [f if f.scale == 1.0 else materialised(materialise(f, builder, f"{name}_{i}"), f)
                 for i, f in enumerate(forms)]
    sources, srcs = [], []
    for f in forms:
        remap = []
        for s in f.sources:
            if s not in sources:
                sources.append(s)
            remap.append(sources.index(s))
        srcs.append(np.asarray(remap, dtype=np.int64)[f.src])
    first = forms[0]
    return HeadForm(tuple(axes), join(srcs), join([f.chan for f in forms]), tuple(sources), first.batch,
                    first.seq, first.scale, all(f.linear for f in forms), frozenset().union(*(f.roots for f in forms)),
                    _common_orders(forms))


def _common_orders(forms) -> tuple:
    """The head orders forms computed together share: the first operand's that has any."""
    return next((f.orders for f in forms if f.orders), ())


def concat(op, forms, builder):
    if len(forms) == 1:
        return forms[0]
    if any(f is None for f in forms):
        return NoMatch("a concat joins an attention operand with another tensor")
    if axis_rules.interleaves(op):
        return NoMatch("an interleaved concat on an attention operand")
    (axis,) = axis_rules.axes(op)
    position = _channel_position(forms[0], axis)
    if forms[0].axes[axis] == SEQ:
        return _concat_sequence(op, forms, builder)
    if position is None:
        return NoMatch("a concat joins attention operands on the batch axis")
    return _joined(forms, lambda arrays: np.concatenate(arrays, axis=position), forms[0].axes, builder, op.name)


def stack(op, forms, builder):
    if any(f is None for f in forms):
        return NoMatch("a stack joins an attention operand with another tensor")
    (axis,) = axis_rules.axes(op)
    axes = list(forms[0].axes)
    axes.insert(axis, CHANNEL)
    position = sum(role == CHANNEL for role in axes[:axis])
    return _joined(forms, lambda arrays: np.stack(arrays, axis=position), axes, builder, op.name)


# --- computing rules: one op on the materialised channels ---------------------------------------

def unary(op, forms, builder):
    form = forms[0]
    x = materialise(form, builder, f"{op.name}_in")
    arguments = {k: v for k, v in op.inputs.items() if k != "x"}
    out = getattr(builder, op.op_type)(x=x, **arguments, name=f"{op.name}_heads")
    return replace(materialised(out, form), linear=False)


def binary(op, forms, builder, externals):
    """An elementwise binary op with one or two operands from the region."""
    x_form, y_form = forms
    kind = op.op_type
    if any(f is not None and len(f.axes) != rank(op.outputs[0]) for f in forms):
        return NoMatch(f"'{kind}' broadcasts an attention operand to a higher rank")
    if x_form is not None and y_form is not None:
        return _binary_of_forms(op, x_form, y_form, builder)
    form, other_name = (x_form, "y") if x_form is not None else (y_form, "x")
    out_axes = form.axes
    other = op.inputs[other_name]
    factor = scalar_value(other)
    if factor is not None and (kind == "mul" or (kind == "real_div" and other_name == "y")):
        return replace(form, scale=form.scale * (factor if kind == "mul" else 1.0 / factor))
    value = constant_value(other)
    if value is not None:
        laid_out = constant_to_form(value, form, out_axes)
    else:
        laid_out = externals.lay_out(other, form, out_axes, builder, f"{op.name}_{other_name}")
    if isinstance(laid_out, NoMatch):
        return laid_out
    # A pending scale passes through a product, and through a division by the other operand.
    keeps_scale = kind == "mul" or (kind == "real_div" and other_name == "y")
    x = materialise(form, builder, f"{op.name}_in", apply_scale=not keeps_scale)
    operands = {"x": x, "y": laid_out} if other_name == "y" else {"x": laid_out, "y": x}
    out = getattr(builder, kind)(**operands, name=f"{op.name}_heads")
    return replace(materialised(out, form), scale=form.scale if keeps_scale else 1.0,
                   linear=form.linear and keeps_scale)


def _binary_of_forms(op, x_form, y_form, builder):
    kind = op.op_type
    orders = _common_orders([x_form, y_form])
    x_form, y_form = replace(x_form, orders=orders), replace(y_form, orders=orders)
    if x_form.channel_shape == y_form.channel_shape:
        full = x_form
        x = materialise(x_form, builder, f"{op.name}_x", apply_scale=kind not in ("mul", "real_div"))
        y = materialise(y_form, builder, f"{op.name}_y", apply_scale=kind not in ("mul", "real_div"))
    else:
        full, small = (x_form, y_form) if x_form.channels > y_form.channels else (y_form, x_form)
        widened = broadcast_channels(small, full, builder, f"{op.name}_widened")
        if isinstance(widened, NoMatch):
            return widened
        x_var = materialise(full, builder, f"{op.name}_full", apply_scale=kind not in ("mul", "real_div"))
        x, y = (x_var, widened) if full is x_form else (widened, x_var)
    out = getattr(builder, kind)(x=x, y=y, name=f"{op.name}_heads")
    scale = 1.0
    if kind == "mul":
        scale = x_form.scale * y_form.scale
    elif kind == "real_div":
        scale = x_form.scale / y_form.scale
    linear = kind in ("add", "sub") and x_form.linear and y_form.linear
    result = materialised(out, full)
    return replace(result, scale=scale, linear=linear, roots=x_form.roots | y_form.roots)


def broadcast_channels(small: HeadForm, full: HeadForm, builder, name: str):
    """``small`` (size 1 on trailing channel axes) repeated to ``full``'s channels by a grouped
    conv of ones: each outer group's value is copied to the group's inner channels."""
    shape_small, shape_full = small.channel_shape, full.channel_shape
    if len(shape_small) != len(shape_full):
        return NoMatch("per-head statistics do not align with the heads")
    kept = 0
    while kept < len(shape_full) and shape_small[kept] == shape_full[kept]:
        kept += 1
    if any(n != 1 for n in shape_small[kept:]):
        if any(s not in (1, f) for s, f in zip(shape_small, shape_full)):
            return NoMatch("a per-head operand does not broadcast against the heads")
        # Shared by every head on an outer axis (a rotary table computed from run-time
        # positions): its channel map is repeated, so the gather reads each head's copy.
        repeated = small.with_channels(full.axes, np.broadcast_to(small.src, shape_full),
                                       np.broadcast_to(small.chan, shape_full))
        return materialise(repeated, builder, f"{name}_repeated")
    groups = int(np.prod(shape_small))
    repeat = full.channels // groups
    x = materialise(small, builder, f"{name}_in")
    weight = np.ones((groups * repeat, 1, 1, 1), dtype=np.float32)
    return builder.conv(x=x, weight=weight, groups=groups, name=name)


def reduction(op, forms, builder):
    form = forms[0]
    axes = axis_rules.axes(op)
    if axes is None:
        return NoMatch("a reduction over every axis of an attention operand")
    channel = form.channel_axes()
    if len(axes) != 1 or axes[0] != channel[-1]:
        return NoMatch(f"'{op.op_type}' over an axis other than head_dim")
    keep = constant_value(op.inputs.get("keep_dims"))
    inner = form.channel_shape[-1]
    groups = form.channels // inner
    x = materialise(form, builder, f"{op.name}_in", apply_scale=op.op_type not in LINEAR_REDUCTIONS)
    shape = form.channel_shape[:-1] + (1,)
    if op.op_type in LINEAR_REDUCTIONS:
        weight = np.full((groups, inner, 1, 1), 1.0 / inner if op.op_type == "reduce_mean" else 1.0, dtype=np.float32)
        out = builder.conv(x=x, weight=weight, groups=groups, name=f"{op.name}_heads")
        scale, linear = form.scale, form.linear
    else:
        parts = builder.split(x=x, num_splits=groups, axis=1, name=f"{op.name}_split") if groups > 1 else [x]
        reduced = [getattr(builder, op.op_type)(x=p, axes=[1], keep_dims=True, name=f"{op.name}_h{i}")
                   for i, p in enumerate(parts)]
        out = reduced[0] if groups == 1 else builder.concat(values=reduced, axis=1, name=f"{op.name}_heads")
        scale, linear = 1.0, False
    axes_out = list(form.axes)
    if not keep:
        del axes_out[axes[0]]
        shape = shape[:-1]
    result = materialised(out, form, shape, axes_out)
    return replace(result, scale=scale, linear=linear)


def layer_norm(op, forms, builder):
    """A LayerNorm over head_dim (Persimmon's q/k norms): one ``layer_norm`` over the channels of
    each head, gamma and beta in the head's channel order. Spelled out in primitive ops (means by
    grouped convs, centring, square, rsqrt, ...) every step would round to fp16, where DEFAULT's
    one fused op rounds once: 1 to 1.5 dB of PSNR lost on the fuzzer's q/k LayerNorm cases."""
    form = forms[0]
    axes = axis_rules.axes(op)
    if axes != [form.channel_axes()[-1]]:
        return NoMatch("'layer_norm' over axes other than head_dim")
    if any(name in op.inputs and constant_value(op.inputs[name]) is None for name in ("gamma", "beta")):
        return NoMatch("'layer_norm' with a gamma or beta computed at run time")
    inner = form.channel_shape[-1]
    groups = form.channels // inner
    order = form.last_axis_order()
    per_head = {}
    for name in ("gamma", "beta"):
        value = constant_value(op.inputs[name]) if name in op.inputs else None
        if value is not None:
            value = np.broadcast_to(np.asarray(value, dtype=np.float32).ravel(), (inner,))
            per_head[name] = np.ascontiguousarray(value if order is None else value[order])
    epsilon = np.float32(constant_value(op.inputs["epsilon"]) if "epsilon" in op.inputs else 1e-5)
    x = materialise(form, builder, f"{op.name}_in")
    heads = builder.split(x=x, num_splits=groups, axis=1, name=f"{op.name}_split") if groups > 1 else [x]
    normed = [builder.layer_norm(x=head, axes=[1], epsilon=epsilon, name=f"{op.name}_h{i}", **per_head)
              for i, head in enumerate(heads)]
    out = normed[0] if groups == 1 else builder.concat(values=normed, axis=1, name=f"{op.name}_heads")
    return replace(materialised(out, form), scale=1.0, linear=False)


#: op type -> rule(op, forms, builder[, externals]). Forms are the region operands in input
#: order (None for a constant or an activation from outside the region).
RULES = {
    "transpose": transpose,
    "reshape": reshape,
    "expand_dims": expand_dims,
    "squeeze": squeeze,
    "tile": tile,
    "slice_by_index": slice_by_index,
    "slice_by_size": slice_by_size,
    "split": split,
    "gather": gather,
    "concat": concat,
    "stack": stack,
    "layer_norm": layer_norm,
    **{kind: unary for kind in UNARY},
    **{kind: binary for kind in BINARY},
    **{kind: reduction for kind in axis_rules.ALL_REDUCTIONS},
}

#: The inputs of each op type that may carry region tensors; the others are parameters.
TENSOR_INPUTS = {kind: axis_rules.tensor_inputs(kind) for kind in RULES}


def apply(op, forms, builder, externals):
    """The output forms of ``op`` (a list, one per output) or a NoMatch."""
    rule = RULES[op.op_type]
    result = rule(op, forms, builder, externals) if rule is binary else rule(op, forms, builder)
    if isinstance(result, NoMatch):
        return result
    return result if isinstance(result, list) else [result]

