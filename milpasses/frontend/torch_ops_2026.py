"""Converters (and fixes of coremltools' own) for the torch ops that current transformers families
trip on in coremltools 9.0's torch frontend, as the coverage sweep (docs/coverage.md) found them.

Missing ops are installed as in ``torch_ops``; a fix replaces coremltools' converter under the
name coremltools looks the op up by, and hands the inputs coremltools converts right back to it.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch import ops as upstream
from coremltools.converters.mil.frontend.torch.ops import _get_inputs, promote_input_dtypes
from coremltools.converters.mil.mil import Var, types

from milpasses.frontend.registry import install, install_fix
from milpasses.frontend.torch_ops import new_filled

#: Torch op kinds that milpasses converts or fixes here, with the reason for each.
INSTALLED: dict[str, str] = {}

_INT32_MAX = np.iinfo(np.int32).max


def _graph_nodes(graph):
    for node in graph.nodes:
        yield node
        for block in node.blocks:
            yield from _graph_nodes(block)


def _link(node) -> tuple:
    """The (index, end, step) a select or slice node contributes to coremltools' fused copy."""
    if node.kind == "select":
        return node.inputs[2], None, None
    return node.inputs[2], node.inputs[3], node.inputs[4]


def _assignment_chain(context, node) -> list | None:
    """The select/slice nodes an in-place copy writes through, from the graph. coremltools'
    fusing pass keeps each link's index but drops its dim; the links are found again as the
    chain of selects and slices from the copied tensor with those indices. None if there is none."""
    wanted = [tuple(node.inputs[i:i + 3]) for i in range(2, len(node.inputs), 3)]
    candidates = [n for n in _graph_nodes(context.torch_graph) if n.kind in ("select", "slice")]
    chains = []

    def extend(tensor, chain):
        if len(chain) == len(wanted):
            chains.append(chain)
            return
        for candidate in candidates:
            if candidate.inputs[0] == tensor and _link(candidate) == wanted[len(chain)]:
                extend(candidate.outputs[0], chain + [candidate])

    extend(node.inputs[0], [])
    axes = {tuple(_chain_axes(context, chain, context[node.inputs[0]].rank)) for chain in chains}
    if len(axes) > 1:
        raise ValueError(f"in-place copy '{node.name}': its select/slice chain is ambiguous in the graph "
                         f"(it could index axes {sorted(axes)})")
    return chains[0] if chains else None


def _chain_axes(context, chain, rank: int) -> list[int]:
    """The axes of the copied tensor that each select/slice of ``chain`` indexes (a select
    removes its axis from those the next link counts in)."""
    remaining = list(range(rank))
    axes = []
    for link in chain:
        dim = int(context[link.inputs[1]].val)
        axis = remaining[dim % len(remaining)]
        axes.append(axis)
        if link.kind == "select":
            remaining.remove(axis)
    return axes


def _index_vector(values: list):
    """Per-axis slice bounds (ints or scalar Vars) as one int32 vector for slice_update."""
    if not any(isinstance(v, Var) for v in values):
        return np.array(values, dtype=np.int32)
    return mb.concat(values=[mb.reshape(x=mb.cast(x=v, dtype="int32"), shape=[1]) if isinstance(v, Var)
                             else np.array([v], np.int32) for v in values], axis=0)


def _bound(var):
    """A slice bound: its constant int, its Var if dynamic, or None if open (absent or past int32)."""
    if var is None:
        return None
    if var.val is None:
        return var
    value = int(var.val)
    return None if abs(value) >= _INT32_MAX else value


def _internal_op_tensor_inplace_copy(context, node):
    """``x[..., a:b].copy_(y)`` and ``x[i, ..., a:b:s] = y``: coremltools fuses the select/slice
    chain and the copy into this op but drops each link's dim, then reads link k as indexing axis k
    (DeepSeek-V3's ``key_states[..., :nope].copy_(k_nope)`` becomes a slice of the batch axis, and
    fails on the update's shape). This finds the dims in the graph: a chain on the leading axes in
    order is coremltools' reading and goes to its converter; any other is assigned on its own axes.
    Either way the chain's views (``freqs_t = freqs[0]`` in Qwen3-VL's interleaved M-RoPE) are bound
    to views of the updated tensor afterwards, as torch's views see the write."""
    chain = _assignment_chain(context, node)
    data, updates = context[node.inputs[0]], context[node.inputs[1]]
    axes = _chain_axes(context, chain, data.rank) if chain is not None else None
    if axes is None or axes == list(range(len(axes))):
        upstream._internal_op_tensor_inplace_copy(context, node)
    else:
        if len(set(axes)) < len(axes):
            raise ValueError(f"in-place copy '{node.name}': the chain slices axis {axes} more than once; not converted")
        rank = data.rank
        begin, end, stride = [0] * rank, [0] * rank, [1] * rank
        begin_mask, end_mask, squeeze_mask = [True] * rank, [True] * rank, [False] * rank
        for link, axis in zip(chain, axes):
            start = _bound(context[link.inputs[2]])
            if start is not None:
                begin[axis], begin_mask[axis] = start, False
            if link.kind == "select":
                squeeze_mask[axis], end_mask[axis] = True, False
                continue
            stop = _bound(context[link.inputs[3]])
            if stop is not None:
                end[axis], end_mask[axis] = stop, False
            step = context[link.inputs[4]]
            stride[axis] = 1 if step is None else int(step.val)
        data, updates = promote_input_dtypes([data, updates])
        context.add(upstream._translate_torch_tensor_assign(
            x=data, updates=updates, begin=_index_vector(begin), end=_index_vector(end), stride=stride,
            begin_mask=begin_mask, end_mask=end_mask, squeeze_mask=squeeze_mask, name=node.name))
    if chain is not None:
        _rebind_views(context, chain, context[node.name])


def _rebind_views(context, chain, updated) -> None:
    """Bind each select/slice output of ``chain`` to the same view of ``updated``."""
    view = updated
    for link in chain:
        dim = int(context[link.inputs[1]].val) % view.rank
        if link.kind == "select":
            view = mb.gather(x=view, indices=mb.cast(x=context[link.inputs[2]], dtype="int32"), axis=dim)
        else:
            begin, end = [0] * view.rank, [0] * view.rank
            begin_mask, end_mask, stride = [True] * view.rank, [True] * view.rank, [1] * view.rank
            start, stop, step = _bound(context[link.inputs[2]]), _bound(context[link.inputs[3]]), context[link.inputs[4]]
            if start is not None:
                begin[dim], begin_mask[dim] = start, False
            if stop is not None:
                end[dim], end_mask[dim] = stop, False
            stride[dim] = 1 if step is None else int(step.val)
            view = mb.slice_by_index(x=view, begin=_index_vector(begin), end=_index_vector(end), stride=stride,
                                     begin_mask=begin_mask, end_mask=end_mask)
        context.add(view, torch_name=link.outputs[0], override=True)


def scatter(context, node):
    """``x.scatter_(dim, index, value)`` / ``scatter(dim, index, src)``: torch takes the value in x's
    dtype; coremltools fills an int value (``group_mask.scatter_(1, group_idx, 1)`` in GLM-4-MoE-style
    routers) as int32 and scatter_along_axis then refuses fp32 data. Matching dtypes go to coremltools."""
    inputs = _get_inputs(context, node, expected=(4, 5))
    data, axis, indices, updates = inputs[:4]
    if updates.dtype == data.dtype:
        upstream.scatter(context, node)
        return
    dtype = types.nptype_from_builtin(data.dtype)
    if updates.rank == 0 and updates.val is not None:
        updates = mb.fill(shape=mb.shape(x=indices), value=dtype(updates.val))
    else:
        updates = mb.cast(x=updates, dtype=types.builtin_to_string(data.dtype))
    mode = inputs[4].val if len(inputs) > 4 else "update"
    mode = {"multiply": "mul"}.get(mode, mode)
    context.add(mb.scatter_along_axis(data=data, indices=indices, updates=updates, axis=int(axis.val),
                                      mode=mode, name=node.name))


def new_zeros(context, node):
    """``tensor.new_zeros(size, dtype=...)``: coremltools fills fp32 zeros whatever the dtype, and
    fails on ``size=()`` (transformers' ``or_masks`` starts from ``new_zeros((), dtype=torch.bool)``,
    in GIT); torch's zeros have the given dtype, else the tensor's."""
    new_filled(context, node, fill=0)


def tensor_split(context, node):
    """``torch.tensor_split(x, sections or indices, dim)``: Mamba-style mixers split off the part
    of the sequence that does not fill a chunk. Needs a fixed size along ``dim``; an empty part
    (the split at the end of the sequence) is a zero-length slice."""
    inputs = _get_inputs(context, node, min_expected=2)
    x, split = inputs[0], inputs[1]
    dim = int(inputs[2].val) % x.rank if len(inputs) > 2 else 0
    size = x.shape[dim]
    if not isinstance(size, (int, np.integer)):
        raise ValueError(f"tensor_split '{node.name}' needs a fixed size along dim {dim}, got {x.shape}")
    values = [int(v.val) for v in split] if isinstance(split, (list, tuple)) else np.atleast_1d(split.val).tolist()
    if isinstance(split, (list, tuple)) or np.ndim(split.val) == 1:
        bounds = [min(max(i + size if i < 0 else i, 0), size) for i in values]
    else:
        sections = int(values[0])
        bounds = list(np.cumsum([size // sections + (1 if part < size % sections else 0) for part in range(sections)]))[:-1]
    starts, ends = [0] + bounds, bounds + [size]
    parts = []
    for index, (start, end) in enumerate(zip(starts, ends)):
        begin, stop = [0] * x.rank, list(x.shape)
        begin[dim], stop[dim] = start, max(start, end)
        parts.append(mb.slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(stop, np.int32),
                                       name=f"{node.name}_{index}"))
    context.add(tuple(parts), torch_name=node.name)


def bucketize(context, node):
    """``torch.bucketize(x, boundaries, right=...)``: the index of each value's bucket among sorted
    boundaries, as the number of boundaries below it (or at or below it with ``right=True``).
    Idefics3 / SmolVLM place patches on their position-embedding grid with it."""
    inputs = _get_inputs(context, node, min_expected=2)
    x, boundaries = inputs[0], inputs[1]
    right = len(inputs) > 3 and bool(inputs[3].val)
    if boundaries.rank != 1:
        raise ValueError(f"bucketize '{node.name}' needs 1-D boundaries, got rank {boundaries.rank}")
    below = mb.greater_equal if right else mb.greater
    passed = below(x=mb.expand_dims(x=x, axes=[-1]), y=boundaries)
    context.add(mb.reduce_sum(x=mb.cast(x=passed, dtype="int32"), axes=[-1], keep_dims=False, name=node.name))


def polar(context, node):
    """``torch.polar(abs, angle)``: the complex ``abs * (cos(angle) + i sin(angle))`` (Llama 4's
    rotary frequencies ``freqs_cis``), in coremltools' complex dialect."""
    magnitude, angle = _get_inputs(context, node, expected=2)
    context.add(mb.complex(real_data=mb.mul(x=magnitude, y=mb.cos(x=angle)),
                           imag_data=mb.mul(x=magnitude, y=mb.sin(x=angle))), node.name)


def index_add(context, node):
    """``x.index_add(dim, index, source, alpha=1)``: rows of ``source`` added into ``x`` at ``index``
    along ``dim``, repeats accumulating (JetMoE gathers its experts' outputs with it). Source and
    alpha are taken in x's dtype, as torch does."""
    inputs = _get_inputs(context, node, min_expected=4)
    x, dim, index, source = inputs[:4]
    source = mb.cast(x=source, dtype=types.builtin_to_string(x.dtype))
    if len(inputs) > 4 and inputs[4] is not None and inputs[4].val != 1:
        source = mb.mul(x=source, y=types.nptype_from_builtin(x.dtype)(inputs[4].val))
    context.add(mb.scatter(data=x, indices=mb.cast(x=index, dtype="int32"), updates=source, axis=int(dim.val),
                           mode="add", name=node.name))


def _constant_ints(value) -> list[int] | None:
    """A size, stride or offset argument as a list of ints, None if any part is not a constant."""
    parts = value if isinstance(value, (list, tuple)) else [value]
    if any(part.val is None for part in parts):
        return None
    return [int(v) for part in parts for v in np.atleast_1d(part.val)]


def as_strided(context, node):
    """``x.as_strided(size, stride, offset)`` where the result is a view that a reshape, a slice and
    a transpose of x make: the strides, largest first, each divide the one before and the axes do
    not overlap. x is taken as contiguous (the graph keeps no strides; Longformer-style chunking
    takes it of a fresh ``view``). Overlapping windows and repeats (a stride 0) are refused."""
    inputs = _get_inputs(context, node, min_expected=3)
    x, size, stride = inputs[0], _constant_ints(inputs[1]), _constant_ints(inputs[2])
    offset = _constant_ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else [0]
    if None in (size, stride, offset) or any(not isinstance(d, (int, np.integer)) for d in x.shape):
        raise ValueError(f"as_strided '{node.name}' needs a fixed input shape and constant size, stride and offset")
    offset = offset[0]
    count = int(np.prod(x.shape))
    axes = sorted((axis for axis in range(len(size)) if size[axis] != 1), key=lambda axis: -stride[axis])
    refusal = f"as_strided '{node.name}' (size {size}, stride {stride}, offset {offset}) is not a reshape, slice or transpose of its input: "
    if any(stride[axis] <= 0 for axis in axes):
        raise ValueError(refusal + "a stride of 0 repeats elements")
    for outer, inner in zip(axes, axes[1:]):
        if stride[outer] % stride[inner] or size[inner] * stride[inner] > stride[outer]:
            raise ValueError(refusal + f"the windows of axes {outer} and {inner} overlap or interleave")
    if offset + sum((size[a] - 1) * stride[a] for a in axes) >= count:
        raise ValueError(refusal + "it reads past the input's end")
    flat = mb.reshape(x=x, shape=[-1])
    if not axes:
        context.add(mb.reshape(x=mb.slice_by_index(x=flat, begin=[offset], end=[offset + 1]), shape=size, name=node.name))
        return
    # Lay the elements from offset out on a grid whose axes step by the strides, then cut each axis to its size.
    grid = [size[axes[0]]] + [stride[outer] // stride[inner] for outer, inner in zip(axes, axes[1:])] + [stride[axes[-1]]]
    length = int(np.prod(grid))
    window = mb.slice_by_index(x=flat, begin=[offset], end=[min(offset + length, count)])
    if offset + length > count:  # the last row runs past the end: pad it with elements it never reads
        window = mb.pad(x=window, pad=np.array([0, offset + length - count], np.int32))
    cut = mb.slice_by_index(x=mb.reshape(x=window, shape=grid), begin=[0] * len(grid),
                            end=[size[a] for a in axes] + [1])
    ordered = mb.transpose(x=mb.reshape(x=cut, shape=[size[a] for a in axes]), perm=list(np.argsort(axes)))
    context.add(mb.reshape(x=ordered, shape=size, name=node.name))


def _install(converter, why: str, name: str | None = None) -> None:
    install(converter, why, INSTALLED, name)


def _fix(converter, why: str, name: str | None = None) -> None:
    install_fix(converter, why, INSTALLED, name)


_fix(_internal_op_tensor_inplace_copy, "coremltools 9.0 drops the dims of x[..., a:b].copy_(y)'s slices and "
     "assigns along the leading axes (DeepSeek-V3, Qwen3-VL), and leaves the chain's views stale")
_fix(scatter, "coremltools 9.0 fills an int scatter_ value as int32 into fp data, which scatter_along_axis "
     "refuses (MoE group masks)")
_fix(new_zeros, "coremltools 9.0 makes fp32 zeros whatever the dtype and fails on size () (or_masks)")
_fix(new_zeros, "as new_zeros, whose alias it is in coremltools 9.0", name="new_empty")
_install(tensor_split, "torch.tensor_split (Mamba-style chunked scans); missing in coremltools 9.0")
_install(bucketize, "torch.bucketize (Idefics3 patch positions); missing in coremltools 9.0")
_install(polar, "torch.polar (Llama 4 rotary frequencies); missing in coremltools 9.0")
_install(index_add, "Tensor.index_add (JetMoE expert outputs); missing in coremltools 9.0")
_install(as_strided, "Tensor.as_strided where a reshape/slice/transpose view (Longformer chunks); "
         "missing in coremltools 9.0")
