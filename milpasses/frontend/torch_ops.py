"""Converters for torch ops that coremltools' torch frontend lacks.

They are installed through coremltools' torch op registry (``register_torch_op``),
the documented extension point, when milpasses is imported. A converter is only
installed for an op the frontend does not already convert, so no existing
conversion changes; reloading milpasses replaces its own converters and nothing else.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE
from coremltools.converters.mil.mil import types

from milpasses.frontend.registry import install

#: Torch op kinds that milpasses converts, with the reason each is missing upstream.
INSTALLED: dict[str, str] = {}


def _numpy_dtype_for(dtype_var, like_var) -> type:
    """The numpy dtype Core ML can hold for a torch dtype argument (64-bit narrowed to 32)."""
    if dtype_var is not None and dtype_var.val is not None:
        dtype = NUM_TO_NUMPY_DTYPE[int(dtype_var.val)]
    else:
        dtype = types.nptype_from_builtin(like_var.dtype)
    return {np.int64: np.int32, np.float64: np.float32}.get(dtype, dtype)


def new_filled(context, node, fill: int) -> None:
    """``tensor.new_ones`` / ``new_zeros(size, dtype=...)``: a tensor of ``size`` filled with
    ``fill``, in ``dtype`` or else the tensor's own dtype; ``size`` may be ``()`` or dynamic."""
    inputs = _get_inputs(context, node, min_expected=2)
    like, size = inputs[0], inputs[1]
    # TorchScript passes the dtype positionally, torch.export as a keyword
    dtype_var = inputs[2] if len(inputs) > 2 else _get_kwinputs(context, node, "dtype", default=[None])[0]
    dtype = _numpy_dtype_for(dtype_var, like)
    if isinstance(size, (list, tuple)):
        if all(s.val is not None for s in size):
            size = np.array([int(s.val) for s in size], dtype=np.int32)
        else:
            size = mb.concat(values=list(size), axis=0)
    elif size.val is not None:
        size = np.asarray(size.val, dtype=np.int32).reshape(-1)
    if isinstance(size, np.ndarray):
        result = mb.const(val=np.full(tuple(size), fill, dtype=dtype), name=node.name)
    else:
        result = mb.fill(shape=size, value=dtype(fill), name=node.name)
    context.add(result)


def new_ones(context, node):
    """``tensor.new_ones(size, dtype=...)``: transformers' masking utilities call it with
    ``size=()`` and ``dtype=torch.bool`` while building attention masks."""
    new_filled(context, node, fill=1)


def histc(context, node):
    """``torch.histc(x, bins, min, max)``: mixture-of-experts routing counts the tokens sent to
    each expert with it (transformers' ``grouped_mm`` experts, with bins = experts, min 0 and
    max = experts - 1). Torch's semantics: ``bins`` equal-width bins over [min, max], values
    outside it not counted, a value equal to max in the last bin; the counts have x's dtype.
    Only constant bounds with min < max are converted (min == max means "the data's own range",
    which would need the data)."""
    inputs = _get_inputs(context, node, expected=4)
    x, bins, low, high = inputs
    if any(v.val is None for v in (bins, low, high)):
        raise ValueError(f"histc '{node.name}': bins, min and max must be constants to convert")
    bins, low, high = int(bins.val), float(low.val), float(high.val)
    if bins < 1 or not low < high:
        raise ValueError(f"histc '{node.name}' with bins={bins}, min={low}, max={high} is not converted: "
                         "it needs bins >= 1 and min < max (min == max would take the range from the data)")
    dtype = types.nptype_from_builtin(x.dtype)
    flat = mb.reshape(x=x, shape=[-1, 1])
    if dtype != np.float32:
        flat = mb.cast(x=flat, dtype="fp32")
    # The bin of each value, in torch's order ((x - min) / (max - min) * bins); max itself belongs
    # to the last bin. A value within rounding of an inner bin edge may land on either side of it.
    position = mb.mul(x=mb.real_div(x=mb.sub(x=flat, y=np.float32(low)), y=np.float32(high - low)),
                      y=np.float32(bins))
    index = mb.minimum(x=mb.floor(x=position), y=np.float32(bins - 1))
    inside = mb.logical_and(x=mb.greater_equal(x=flat, y=np.float32(low)), y=mb.less_equal(x=flat, y=np.float32(high)))
    hits = mb.logical_and(x=mb.equal(x=index, y=np.arange(bins, dtype=np.float32).reshape(1, bins)), y=inside)
    counts = mb.reduce_sum(x=mb.cast(x=hits, dtype="fp32"), axes=[0], keep_dims=False,
                           name=node.name if dtype == np.float32 else node.name + "_fp32")
    if dtype != np.float32:
        counts = mb.cast(x=counts, dtype=types.builtin_to_string(x.dtype), name=node.name)
    context.add(counts)


def _grouped_mm(context, node):
    """``torch._grouped_mm(x, weights, offs)`` with x (rows, in), weights (groups, in, out) and
    offs the cumulative row counts of the groups: rows ``offs[g-1]:offs[g]`` are multiplied by
    ``weights[g]``, rows past ``offs[-1]`` give zeros. transformers' ``grouped_mm`` experts run
    every expert's projection through it, with the rows sorted by expert.

    The groups are data, so the conversion multiplies every row by every group's weights and
    keeps, per row, its group's result. With constant weights that is one ``linear`` whose
    outputs are the groups' outputs side by side, which milpasses then runs as a 1x1 conv; each
    row's group is found by comparing its index with ``offs`` (the routing stays on the CPU)."""
    inputs = _get_inputs(context, node, min_expected=3)
    x, weights, offsets = inputs[0], inputs[1], inputs[2]
    bias = inputs[3] if len(inputs) > 3 else None
    if offsets is None or x.rank != 2 or weights.rank != 3:
        raise ValueError(f"_grouped_mm '{node.name}': only a 2-D input by 3-D grouped weights with offsets "
                         f"converts (got ranks {x.rank} and {weights.rank})")
    groups, size_in, size_out = weights.shape
    if any(not isinstance(d, (int, np.integer)) for d in (groups, size_in, size_out)):
        raise ValueError(f"_grouped_mm '{node.name}': the grouped weights need a fixed shape, got {weights.shape}")
    if weights.val is not None:
        stacked = np.transpose(np.asarray(weights.val), (0, 2, 1)).reshape(groups * size_out, size_in)
        every = mb.linear(x=x, weight=stacked.astype(types.nptype_from_builtin(x.dtype)))  # (rows, groups * out)
        every = mb.reshape(x=every, shape=[-1, groups, size_out])
    else:
        every = mb.transpose(x=mb.matmul(x=mb.expand_dims(x=x, axes=[0]), y=weights), perm=[1, 0, 2])
    rows = mb.range_1d(start=np.int32(0), end=mb.gather(x=mb.shape(x=x), indices=np.int32(0)), step=np.int32(1))
    ends = mb.cast(x=offsets, dtype="int32")
    group = mb.reduce_sum(x=mb.cast(x=mb.greater_equal(x=mb.expand_dims(x=rows, axes=[1]), y=mb.expand_dims(x=ends, axes=[0])),
                                    dtype="int32"), axes=[1], keep_dims=True)  # (rows, 1): the offsets at or before
    one_hot = mb.cast(x=mb.equal(x=group, y=np.arange(groups, dtype=np.int32).reshape(1, groups)),
                      dtype=types.builtin_to_string(x.dtype))  # (rows, groups); all zero past the last group
    result = mb.reduce_sum(x=mb.mul(x=every, y=mb.expand_dims(x=one_hot, axes=[2])), axes=[1], keep_dims=False)
    if bias is not None:
        result = mb.add(x=result, y=mb.matmul(x=one_hot, y=bias))
    context.add(mb.identity(x=result, name=node.name))


def _upstream(name: str):
    """coremltools' own converter of ``name``, for the ops below that are spellings of it."""
    return _TORCH_OPS_REGISTRY.name_to_func_mapping[name]


def view_as(context, node):
    """``x.view_as(other)``: ``x`` reshaped to ``other``'s shape, as coremltools' ``reshape_as``
    (BEiT-style relative position biases use it)."""
    _upstream("reshape_as")(context, node)


def multiply(context, node):
    """``torch.multiply``, the alias of ``torch.mul`` (ConvBERT's convolution heads use it)."""
    _upstream("mul")(context, node)


def _bit(x, position: int):
    """Bit ``position`` (0 to 30) of the int32 ``x`` in two's complement, as 0 or 1: floor
    division by a power of two is an arithmetic shift, and a floored mod 2 keeps the lowest bit."""
    return mb.mod(x=mb.floor_div(x=x, y=np.int32(1 << position)), y=np.int32(2))


def bitwise_or(context, node):
    """``a | b``: a logical or of bool tensors (CPM-Ant and transformers' ``or_masks`` combine
    attention masks with it), and torch's bitwise or where an operand is an integer (CPM-Ant's
    int32 context mask | a bool mask). Core ML has no bitwise ops, so integers are taken bit by bit."""
    x, y = _get_inputs(context, node, expected=2)
    if types.is_bool(x.dtype) and types.is_bool(y.dtype):
        _upstream("logical_or")(context, node)
        return
    if not all(types.is_int(v.dtype) or types.is_bool(v.dtype) for v in (x, y)):
        raise NotImplementedError(f"'|' ('{node.name}') is defined for bool and integer tensors, got "
                                  f"{types.builtin_to_string(x.dtype)} and {types.builtin_to_string(y.dtype)}")
    if types.is_bool(y.dtype):
        x, y = y, x
    y = mb.cast(x=y, dtype="int32")
    if types.is_bool(x.dtype):
        # y | flag sets y's lowest bit where flag is set: y + flag * (1 - lowest bit of y)
        flag = mb.cast(x=x, dtype="int32")
        context.add(mb.add(x=y, y=mb.mul(x=flag, y=mb.sub(x=np.int32(1), y=_bit(y, 0))), name=node.name))
        return
    x = mb.cast(x=x, dtype="int32")
    negative = mb.logical_or(x=mb.less(x=x, y=np.int32(0)), y=mb.less(x=y, y=np.int32(0)))
    # The sign bit first (-2**31), then bits 0 to 30: no partial sum leaves int32.
    result = mb.mul(x=mb.cast(x=negative, dtype="int32"), y=np.int32(-(1 << 31)))
    for position in range(31):
        either = mb.maximum(x=_bit(x, position), y=_bit(y, position))
        result = mb.add(x=result, y=mb.mul(x=either, y=np.int32(1 << position)))
    context.add(mb.identity(x=result, name=node.name))


def _resize_matrix(in_size: int, out_size: int, align_corners: bool, antialias: bool, scale) -> np.ndarray:
    """The (out_size, in_size) matrix of torch's bicubic resize along one axis, taken from torch
    itself (each input position resized as a one-hot column), so edge clamping, align_corners and
    antialiasing are exactly torch's. Bicubic resizing is separable: a 2-D resize is one such
    matrix per axis."""
    import torch

    # Two identical columns, kept at width 2: torch's antialiased kernel mishandles width 1.
    columns = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, in_size, 1).repeat(1, 1, 1, 2)
    resize = {"size": (out_size, 2)} if scale is None else {"scale_factor": (float(scale), 1.0)}
    resized = torch.nn.functional.interpolate(columns, mode="bicubic", align_corners=align_corners,
                                              antialias=antialias, **resize)
    return resized[..., 0].reshape(in_size, out_size).T.numpy()


def _bicubic(context, node, antialias: bool):
    inputs = _get_inputs(context, node)
    x, size, align_corners = inputs[0], inputs[1], bool(inputs[2].val)
    if x.rank != 4 or any(not isinstance(d, (int, np.integer)) for d in x.shape[2:]):
        raise ValueError(f"bicubic resize '{node.name}' needs a 4-D input with a fixed height and width, got {x.shape}")
    height, width = int(x.shape[2]), int(x.shape[3])
    scales = [None, None]
    if size is not None and not (isinstance(size, (list, tuple)) and not size):
        values = [s.val for s in size] if isinstance(size, (list, tuple)) else list(np.atleast_1d(size.val))
        if any(v is None for v in values):
            raise ValueError(f"bicubic resize '{node.name}' needs a constant output size")
        out_height, out_width = (int(v) for v in values)
    else:
        given = inputs[3:]
        scales = list(given[0].val) if len(given) == 1 else [given[0].val, given[1].val]
        if any(s is None for s in scales):
            raise ValueError(f"bicubic resize '{node.name}' needs a constant output size or scale")
        out_height, out_width = int(np.floor(height * scales[0])), int(np.floor(width * scales[1]))
    dtype = types.nptype_from_builtin(x.dtype)
    rows = _resize_matrix(height, out_height, align_corners, antialias, scales[0]).astype(dtype)
    columns = _resize_matrix(width, out_width, align_corners, antialias, scales[1]).T.astype(dtype)
    resized = mb.matmul(x=rows, y=mb.matmul(x=x, y=columns))  # rows @ x @ columns, per image and channel
    context.add(mb.identity(x=resized, name=node.name))


def upsample_bicubic2d(context, node):
    """``F.interpolate(x, mode="bicubic")`` with a fixed input and output size: one constant
    matrix per axis (ViT-style position embeddings resized to the image, DINOv2). Constant
    embeddings fold away at conversion."""
    _bicubic(context, node, antialias=False)


def _upsample_bicubic2d_aa(context, node):
    """The antialiased ``F.interpolate(x, mode="bicubic", antialias=True)``, as ``upsample_bicubic2d``."""
    _bicubic(context, node, antialias=True)


def log_sigmoid(context, node):
    """``F.logsigmoid(x)`` as ``-softplus(-x)``, which stays finite for large |x| (gated
    attention and routing in some 2025 families use it)."""
    (x,) = _get_inputs(context, node, expected=1)
    context.add(mb.mul(x=mb.softplus(x=mb.mul(x=x, y=np.float32(-1.0))), y=np.float32(-1.0), name=node.name))


def _install(converter, why: str, name: str | None = None) -> None:
    install(converter, why, INSTALLED, name)


_install(new_ones, "transformers >= 5 masking utilities; missing in coremltools 9.0")
_install(_grouped_mm, "transformers >= 5 grouped_mm mixture-of-experts projections; missing in coremltools 9.0")
_install(view_as, "Tensor.view_as; missing in coremltools 9.0 (it has reshape_as)")
_install(multiply, "torch.multiply, the alias of mul; missing in coremltools 9.0")
_install(bitwise_or, "'|' on bool masks and integers; missing in coremltools 9.0 (it has logical_or)", name="or")
_install(upsample_bicubic2d, "bicubic F.interpolate (position embeddings resized to the image); missing in coremltools 9.0")
_install(_upsample_bicubic2d_aa, "antialiased bicubic F.interpolate; missing in coremltools 9.0")
_install(log_sigmoid, "F.logsigmoid; missing in coremltools 9.0")
_install(histc, "transformers >= 5 mixture-of-experts routing (tokens per expert); missing in coremltools 9.0")
