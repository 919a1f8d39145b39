"""numpy implementations of MIL ops, keyed by op type.

Each implementation takes the op's inputs as keyword arguments, named as in the op's
coremltools definition, with the op's declared defaults already filled in by the
simulator, and returns one array or a list of arrays (one per output). Floating point
inputs arrive as float32; the simulator rounds results to each output's dtype.

An op whose every step rounds differently on the device has a device form beside its storage
form (``DEVICE_IMPLEMENTATIONS``), which ``numerics="device"`` runs for ops with fp16 outputs: it
takes an :class:`~milpasses.simulator.fp16.Fp16Arithmetic` first and rounds each step with it.
An op missing there (elementwise ops) rounds once in both numerics, as the device does.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch

OP_IMPLEMENTATIONS: dict = {}
DEVICE_IMPLEMENTATIONS: dict = {}


def implements(*op_types):
    def register(function):
        for op_type in op_types:
            OP_IMPLEMENTATIONS[op_type] = function
        return function

    return register


def device_form(*op_types):
    def register(function):
        for op_type in op_types:
            DEVICE_IMPLEMENTATIONS[op_type] = function
        return function

    return register


def _axes(value, rank):
    if value is None:
        return tuple(range(rank))
    return tuple(int(a) % rank for a in np.atleast_1d(value))


def _tensor(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _optional_tensor(x):
    return None if x is None else _tensor(np.asarray(x, dtype=np.float32))


def _torch_unary(function):
    return lambda x: function(_tensor(x)).numpy()


def _mil_dtype_to_numpy(name: str):
    return {"fp16": np.float32, "fp32": np.float32, "fp64": np.float32, "int8": np.int8, "uint8": np.uint8,
            "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "int64": np.int32,
            "bool": np.bool_}[str(name)]


# ----------------------------------------------------------------------------- elementwise

_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum, "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _function in _BINARY.items():
    implements(_name)(lambda x, y, _f=_function: _f(x, y))


@implements("real_div")
def real_div(x, y):
    return np.true_divide(x, y)


_UNARY = {
    "abs": np.abs, "acos": np.arccos, "asin": np.arcsin, "atan": np.arctan, "atanh": np.arctanh,
    "ceil": np.ceil, "cos": np.cos, "cosh": np.cosh, "exp": np.exp, "exp2": np.exp2, "floor": np.floor,
    "round": np.round, "sign": np.sign, "sin": np.sin, "sinh": np.sinh, "sqrt": np.sqrt,
    "square": np.square, "tan": np.tan, "tanh": np.tanh, "logical_not": np.logical_not,
    "identity": lambda x: x, "erf": _torch_unary(torch.special.erf),
    "relu": lambda x: np.maximum(x, 0), "sigmoid": _torch_unary(torch.sigmoid),
    "silu": _torch_unary(torch.nn.functional.silu), "softsign": lambda x: x / (1 + np.abs(x)),
}
for _name, _function in _UNARY.items():
    implements(_name)(lambda x, _f=_function: _f(x))


@implements("rsqrt")
def rsqrt(x, epsilon):
    return 1.0 / np.sqrt(x + np.float32(epsilon))


@implements("inverse")
def inverse(x, epsilon):
    return 1.0 / (x + np.float32(epsilon))


@implements("log")
def log(x, epsilon):
    return np.log(x + np.float32(epsilon))


@implements("clip")
def clip(x, alpha, beta):
    return np.minimum(np.maximum(x, alpha), beta)


@implements("threshold")
def threshold(x, alpha):
    return np.maximum(x, alpha)


@implements("cast")
def cast(x, dtype):
    return np.asarray(x).astype(_mil_dtype_to_numpy(dtype))


# ----------------------------------------------------------------------------- activations


@implements("gelu")
def gelu(x, mode="EXACT"):
    approximate = {"EXACT": "none", "TANH_APPROXIMATION": "tanh"}.get(str(mode))
    tensor = _tensor(x)
    if approximate is not None:
        return torch.nn.functional.gelu(tensor, approximate=approximate).numpy()
    if str(mode) == "SIGMOID_APPROXIMATION":
        return (tensor * torch.sigmoid(1.702 * tensor)).numpy()
    raise ValueError(f"unknown gelu mode {mode!r}")


@implements("relu6")
def relu6(x):
    return np.clip(x, 0, 6)


@implements("leaky_relu")
def leaky_relu(x, alpha):
    return np.where(x >= 0, x, x * alpha)


@implements("elu")
def elu(x, alpha):
    return np.where(x > 0, x, alpha * np.expm1(x))


@implements("softplus")
def softplus(x):
    return _torch_unary(torch.nn.functional.softplus)(x)


@implements("sigmoid_hard")
def sigmoid_hard(x, alpha, beta):
    return np.clip(alpha * x + beta, 0, 1)


@implements("clamped_relu")
def clamped_relu(x, alpha, beta):
    return np.minimum(np.where(x >= 0, x, alpha * x), beta)


@implements("linear_activation")
def linear_activation(x, alpha, beta):
    return alpha * x + beta


@implements("softmax")
def softmax(x, axis):
    shifted = x - np.max(x, axis=int(axis), keepdims=True)
    exponent = np.exp(shifted)
    return exponent / np.sum(exponent, axis=int(axis), keepdims=True)


def _softmax_device(fp16, x, axis):
    shifted = fp16.round(x - x.amax(axis, keepdim=True), "max subtraction")
    exponent = fp16.round(torch.exp(shifted), "exp")
    return fp16.round(exponent / fp16.reduce(exponent, (axis,), True, "sum of exponents"), "division")


@device_form("softmax")
def softmax_device(fp16, x, axis):
    return _softmax_device(fp16, _tensor(x), int(axis)).numpy()


# ----------------------------------------------------------------------------- linear algebra


# Products go through torch: its CPU GEMM is several times faster than numpy's here, which keeps
# a base-sized model's simulation within a small factor of its torch forward.


@implements("linear")
def linear(x, weight, bias=None):
    return torch.nn.functional.linear(_tensor(x), _tensor(weight), None if bias is None else _tensor(bias)).numpy()


@device_form("linear")
def linear_device(fp16, x, weight, bias=None):
    return fp16.contract([(_tensor(x), _tensor(weight))], "...k,nk->...n", _optional_tensor(bias), "output").numpy()


def _matmul_operands(x, y, transpose_x, transpose_y):
    x, y = _tensor(x), _tensor(y)
    if transpose_x:
        x = x.transpose(-1, -2)
    if transpose_y:
        y = y.transpose(-1, -2)
    return x, y


@implements("matmul")
def matmul(x, y, transpose_x=False, transpose_y=False):
    return torch.matmul(*_matmul_operands(x, y, transpose_x, transpose_y)).numpy()


@device_form("matmul")
def matmul_device(fp16, x, y, transpose_x=False, transpose_y=False):
    x, y = _matmul_operands(x, y, transpose_x, transpose_y)
    out = fp16.contract([(x.unsqueeze(0) if x.ndim == 1 else x, y.unsqueeze(-1) if y.ndim == 1 else y)],
                        "...ij,...jk->...ik", None, "output")
    if y.ndim == 1:  # torch.matmul's vector operands: a vector y drops the last axis, a vector x the one before
        out = out.squeeze(-1)
    if x.ndim == 1:
        out = out.squeeze(-1 if y.ndim == 1 else -2)
    return out.numpy()


@implements("einsum")
def einsum(values, equation):
    return torch.einsum(str(equation), *[_tensor(v) for v in values]).numpy()


@device_form("einsum")
def einsum_device(fp16, values, equation):
    a, b = (_tensor(v) for v in values)
    return fp16.contract([(a, b)], str(equation), None, "output").numpy()


def _conv_padding(spatial, kernel, strides, dilations, pad_type, pad):
    """Per spatial axis (begin, end) padding, as MIL's conv defines each pad_type."""
    pad_type = str(pad_type)
    if pad_type == "valid":
        return [(0, 0)] * len(spatial)
    if pad_type == "custom":
        pad = [int(p) for p in pad]
        return list(zip(pad[0::2], pad[1::2]))
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if pad_type == "same" else (large, small))
    return pads


@implements("conv")
def conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    spatial = x.shape[2:]
    rank = len(spatial)
    strides = [int(s) for s in (strides if strides is not None else [1] * rank)]
    dilations = [int(d) for d in (dilations if dilations is not None else [1] * rank)]
    padding = _conv_padding(spatial, weight.shape[2:], strides, dilations, pad_type, pad)
    tensor = _tensor(x)
    torch_pad = [p for begin_end in reversed(padding) for p in begin_end]
    if any(torch_pad):
        tensor = torch.nn.functional.pad(tensor, torch_pad)
    function = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[rank]
    out = function(
        tensor,
        _tensor(weight),
        None if bias is None else _tensor(bias),
        stride=strides, dilation=dilations, groups=int(groups),
    )
    return out.numpy()


@device_form("conv")
def conv_device(fp16, x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    """Each kernel tap is a contraction over input channels, all taps adding into one accumulator."""
    spatial, kernel = x.shape[2:], weight.shape[2:]
    rank = len(spatial)
    strides = [int(s) for s in (strides if strides is not None else [1] * rank)]
    dilations = [int(d) for d in (dilations if dilations is not None else [1] * rank)]
    padding = _conv_padding(spatial, kernel, strides, dilations, pad_type, pad)
    padded = torch.nn.functional.pad(_tensor(x), [p for begin_end in reversed(padding) for p in begin_end])
    out_spatial = [(size - (k - 1) * d - 1) // s + 1
                   for size, k, d, s in zip(padded.shape[2:], kernel, dilations, strides)]
    batch, groups, out_channels = x.shape[0], int(groups), weight.shape[0]
    per_group = _tensor(weight).reshape(groups, out_channels // groups, weight.shape[1], *kernel)
    terms = []
    for tap in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(t * d, t * d + (n - 1) * s + 1, s)
                       for t, d, s, n in zip(tap, dilations, strides, out_spatial))
        taps = padded[(slice(None), slice(None)) + window].reshape(batch, groups, weight.shape[1], -1)
        terms.append((taps, per_group[(slice(None),) * 3 + tap]))
    bias = None if bias is None else _optional_tensor(bias).reshape(1, groups, out_channels // groups, 1)
    out = fp16.contract(terms, "ngcl,goc->ngol", bias, "output")
    return out.reshape(batch, out_channels, *out_spatial).numpy()


@implements("scaled_dot_product_attention")
def scaled_dot_product_attention(query, key, value, attn_mask=None):
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.float32(math.sqrt(query.shape[-1]))
    if attn_mask is not None:
        if attn_mask.dtype == np.bool_:
            scores = np.where(attn_mask, scores, -np.inf)
        else:
            scores = scores + attn_mask
    return np.matmul(softmax(scores, -1), value)


@device_form("scaled_dot_product_attention")
def scaled_dot_product_attention_device(fp16, query, key, value, attn_mask=None):
    query, key, value = _tensor(query), _tensor(key), _tensor(value)
    scores = fp16.contract([(query, key)], "...id,...jd->...ij", None, "scores")
    scale = fp16.round(torch.tensor(1.0 / math.sqrt(query.shape[-1])), "scale")
    scores = fp16.round(scores * scale, "scaled scores")
    if attn_mask is not None:
        mask = _tensor(attn_mask)
        scores = torch.where(mask, scores, -torch.inf) if mask.dtype == torch.bool else fp16.round(scores + mask, "mask")
    return fp16.contract([(_softmax_device(fp16, scores, -1), value)], "...ij,...jd->...id", None, "output").numpy()


# ----------------------------------------------------------------------------- normalisation


@implements("layer_norm")
def layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    axes = _axes(list(axes), x.ndim)
    mean = np.mean(x, axis=axes, keepdims=True)
    centred = x - mean
    variance = np.mean(np.square(centred), axis=axes, keepdims=True)
    out = centred / np.sqrt(variance + np.float32(epsilon))
    # gamma and beta have the shape of the normalised axes: broadcast them over the others.
    affine_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    if gamma is not None:
        out = out * np.reshape(gamma, affine_shape)
    if beta is not None:
        out = out + np.reshape(beta, affine_shape)
    return out


def _normalised_device(fp16, x, axes):
    """``x - mean`` and the variance over ``axes``, each step rounded to fp16."""
    count = math.prod(x.shape[a] for a in axes)
    mean = fp16.round(fp16.reduce(x, axes, True, "sum") / count, "mean")
    centred = fp16.round(x - mean, "centring")
    squares = fp16.round(centred * centred, "squares")
    variance = fp16.round(fp16.reduce(squares, axes, True, "sum of squares") / count, "variance")
    return centred, variance


def _rsqrt_scaled_device(fp16, centred, variance, epsilon):
    epsilon = fp16.round(torch.tensor(float(epsilon)), "epsilon")
    scale = fp16.round(torch.rsqrt(fp16.round(variance + epsilon, "variance + epsilon")), "rsqrt")
    return fp16.round(centred * scale, "normalisation")


def _affine_device(fp16, out, gamma, beta, shape):
    if gamma is not None:
        out = fp16.round(out * _tensor(np.reshape(gamma, shape)), "gamma")
    if beta is not None:
        out = fp16.round(out + _tensor(np.reshape(beta, shape)), "beta")
    return out


@device_form("layer_norm")
def layer_norm_device(fp16, x, axes, gamma=None, beta=None, epsilon=1e-5):
    axes = _axes(list(axes), x.ndim)
    centred, variance = _normalised_device(fp16, _tensor(x), axes)
    out = _rsqrt_scaled_device(fp16, centred, variance, epsilon)
    affine_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return _affine_device(fp16, out, gamma, beta, affine_shape).numpy()


@implements("batch_norm")
def batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    shape = [1, -1] + [1] * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + np.float32(epsilon))
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


@implements("instance_norm")
def instance_norm(x, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(2, x.ndim))
    mean = np.mean(x, axis=axes, keepdims=True)
    variance = np.var(x, axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(variance + np.float32(epsilon))
    shape = [1, -1] + [1] * (x.ndim - 2)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


@device_form("instance_norm")
def instance_norm_device(fp16, x, gamma=None, beta=None, epsilon=1e-5):
    centred, variance = _normalised_device(fp16, _tensor(x), tuple(range(2, x.ndim)))
    out = _rsqrt_scaled_device(fp16, centred, variance, epsilon)
    return _affine_device(fp16, out, gamma, beta, [1, -1] + [1] * (x.ndim - 2)).numpy()


# ----------------------------------------------------------------------------- reductions

_REDUCTIONS = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod,
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(np.square(x), axis=axis, keepdims=keepdims),
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_log_sum": lambda x, axis, keepdims: np.log(np.sum(x, axis=axis, keepdims=keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.sum(np.exp(x), axis=axis, keepdims=keepdims)),
}
for _name, _function in _REDUCTIONS.items():
    implements(_name)(
        lambda x, axes=None, keep_dims=False, _f=_function: _f(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))
    )


def _arg_reduction(function):
    def reduce(x, axis=-1, keep_dims=False, output_dtype="int32"):
        out = function(x, axis=int(axis))
        return np.expand_dims(out, int(axis)) if keep_dims else out

    return reduce



def _mean_device(fp16, x, dims, keep):
    count = math.prod(x.shape[d] for d in dims)
    return fp16.round(fp16.reduce(x, dims, keep, "sum") / count, "mean")


def _sum_of_squares_device(fp16, x, dims, keep):
    return fp16.reduce(fp16.round(x * x, "squares"), dims, keep, "sum of squares")


_DEVICE_REDUCTIONS = {
    "reduce_sum": lambda fp16, x, dims, keep: fp16.reduce(x, dims, keep, "sum"),
    "reduce_mean": _mean_device,
    "reduce_prod": lambda fp16, x, dims, keep: fp16.reduce(x, dims, keep, "product", combine=torch.mul),
    "reduce_sum_square": _sum_of_squares_device,
    "reduce_l1_norm": lambda fp16, x, dims, keep: fp16.reduce(x.abs(), dims, keep, "sum"),
    "reduce_l2_norm": lambda fp16, x, dims, keep: fp16.round(torch.sqrt(_sum_of_squares_device(fp16, x, dims, keep)), "sqrt"),
    "reduce_log_sum": lambda fp16, x, dims, keep: fp16.round(torch.log(fp16.reduce(x, dims, keep, "sum")), "log"),
    "reduce_log_sum_exp": lambda fp16, x, dims, keep: fp16.round(
        torch.log(fp16.reduce(fp16.round(torch.exp(x), "exp"), dims, keep, "sum of exponents")), "log"),
}
for _name, _function in _DEVICE_REDUCTIONS.items():
    device_form(_name)(
        lambda fp16, x, axes=None, keep_dims=False, _f=_function:
            _f(fp16, _tensor(x), _axes(axes, x.ndim), bool(keep_dims)).numpy()
    )


OP_IMPLEMENTATIONS["reduce_argmax"] = _arg_reduction(np.argmax)
OP_IMPLEMENTATIONS["reduce_argmin"] = _arg_reduction(np.argmin)


# ----------------------------------------------------------------------------- tensor layout


@implements("reshape")
def reshape(x, shape):
    shape = [int(s) for s in np.atleast_1d(shape)]
    if len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@implements("transpose")
def transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@implements("expand_dims")
def expand_dims(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in np.atleast_1d(axes)))


@implements("squeeze")
def squeeze(x, axes=None):
    if axes is None:
        return np.squeeze(x)
    return np.squeeze(x, axis=_axes(axes, x.ndim))


@implements("tile")
def tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


@implements("fill")
def fill(shape, value=0.0):
    return np.full([int(s) for s in np.atleast_1d(shape)], value)


@implements("fill_like")
def fill_like(ref_tensor, value=0.0):
    return np.full(ref_tensor.shape, value)


@implements("concat")
def concat(values, axis, interleave=False):
    if values[0].ndim == 0:  # MIL concatenates scalars into a vector (shape arithmetic does)
        return np.stack(values)
    axis = int(axis) % values[0].ndim
    if not interleave:
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] = shape[axis] * len(values)
    return stacked.reshape(shape)


@implements("stack")
def stack(values, axis):
    return np.stack(values, axis=int(axis))


@implements("split")
def split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is not None:
        boundaries = np.cumsum([int(s) for s in split_sizes])[:-1]
    else:
        boundaries = int(num_splits)
    return np.split(x, boundaries, axis=axis)


def _index(rank, begin, end, stride, begin_mask, end_mask, squeeze_mask) -> tuple:
    """The numpy index of MIL's strided slice (slice_by_index, slice_update)."""
    stride = stride if stride is not None else [1] * rank
    begin_mask = begin_mask if begin_mask is not None else [False] * rank
    end_mask = end_mask if end_mask is not None else [False] * rank
    squeeze_mask = squeeze_mask if squeeze_mask is not None else [False] * rank
    index = []
    for axis in range(rank):
        step = int(stride[axis])
        start = None if begin_mask[axis] else int(begin[axis])
        stop = None if end_mask[axis] else int(end[axis])
        if squeeze_mask[axis]:
            index.append(int(begin[axis]))
        else:
            index.append(slice(start, stop, step))
    return tuple(index)


@implements("slice_by_index")
def slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    return x[_index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)]


@implements("slice_update")
def slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """``x`` with its strided slice replaced by ``update`` (begin/end may be computed at run time)."""
    index = _index(x.ndim, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    updated = np.array(x, copy=True)
    if updated[index].shape != np.shape(update):
        raise ValueError(f"slice_update: the slice {index} of a {x.shape} tensor has shape "
                         f"{updated[index].shape}, the update {np.shape(update)}")
    updated[index] = update
    return updated


@implements("read_state")
def read_state(input):
    # A copy: a later coreml_update_state writes into the state itself.
    return np.array(input, copy=True)


@implements("coreml_update_state")
def coreml_update_state(state, value):
    state[...] = value
    return value


@implements("slice_by_size")
def slice_by_size(x, begin, size):
    index = tuple(
        slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size)
    )
    return x[index]


@implements("pad")
def pad(x, pad, mode="constant", constant_val=0.0):
    pad = [int(p) for p in pad]
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + list(zip(pad[0::2], pad[1::2]))
    mode = str(mode)
    if mode == "constant":
        return np.pad(x, pairs, mode="constant", constant_values=constant_val)
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@implements("band_part")
def band_part(x, lower=-1, upper=-1):
    rows, cols = x.shape[-2], x.shape[-1]
    offset = np.arange(rows)[:, None] - np.arange(cols)[None, :]
    keep = np.ones((rows, cols), dtype=bool)
    if int(lower) >= 0:
        keep &= offset <= int(lower)
    if int(upper) >= 0:
        keep &= -offset <= int(upper)
    return np.where(keep, x, np.zeros((), dtype=x.dtype))


@implements("cumsum")
def cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    data = np.flip(x, axis) if reverse else x
    out = np.cumsum(data, axis=axis, dtype=data.dtype)
    if exclusive:
        out = out - data
    return np.flip(out, axis) if reverse else out


@implements("range_1d")
def range_1d(start, end, step):
    return np.arange(start, end, step)


@implements("shape")
def shape(x):
    return np.array(x.shape, dtype=np.int32)


@implements("select")
def select(cond, a, b):
    return np.where(cond, a, b)


# ----------------------------------------------------------------------------- gathers


def _per_batch(function, x, indices, batch_dims):
    """Apply ``function(x_b, indices_b)`` for each index over the leading ``batch_dims`` axes."""
    if batch_dims == 0:
        return function(x, indices)
    batch_shape = x.shape[:batch_dims]
    flat_x = x.reshape((-1,) + x.shape[batch_dims:])
    flat_indices = indices.reshape((-1,) + indices.shape[batch_dims:])
    out = np.stack([function(xb, ib) for xb, ib in zip(flat_x, flat_indices)])
    return out.reshape(batch_shape + out.shape[1:])


@implements("gather")
def gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    axis = int(axis) % x.ndim
    batch_dims = int(batch_dims)
    return _per_batch(lambda xb, ib: np.take(xb, ib, axis=axis - batch_dims), x, indices, batch_dims)


@implements("gather_nd")
def gather_nd(x, indices, batch_dims=0, validate_indices=False):
    def take(xb, ib):
        return xb[tuple(np.moveaxis(ib, -1, 0))]

    return _per_batch(take, x, indices.astype(np.int64), int(batch_dims))


@implements("gather_along_axis")
def gather_along_axis(x, indices, axis=0, validate_indices=False):
    axis = int(axis) % x.ndim
    return np.take_along_axis(x, np.where(indices < 0, indices + x.shape[axis], indices), axis=axis)


# ----------------------------------------------------------------------------- sorting, scatter


def _order(x, axis, ascending):
    """Stable sort order along ``axis``: equal values keep their index order, as torch's stable sorts do."""
    return np.argsort(x if ascending else -x, axis=int(axis), kind="stable")


@implements("argsort")
def argsort(x, axis=-1, ascending=False):
    return _order(x, axis, ascending).astype(np.int32)


@implements("topk")
def topk(x, k=1, axis=-1, ascending=False, sort=True, return_indices=True, output_indices_dtype="int32"):
    """The k largest (smallest when ascending) along ``axis``, and their indices as iOS17's
    ``output_indices_dtype`` says (int32 or uint16); values only when ``return_indices`` is false."""
    axis = int(axis) % x.ndim
    indices = np.take(_order(x, axis, ascending), np.arange(int(k)), axis=axis)
    values = np.take_along_axis(x, indices, axis=axis)
    if not return_indices:
        return values
    return [values, indices.astype(_mil_dtype_to_numpy(output_indices_dtype))]


_SCATTER_MODES = {
    "add": np.add.at, "sub": np.subtract.at, "mul": np.multiply.at, "div": np.divide.at,
    "max": np.maximum.at, "min": np.minimum.at,
}


@implements("scatter_nd")
def scatter_nd(data, indices, updates, mode="add", validate_indices=False):
    """``data`` with ``updates`` written (or combined by ``mode``) at the index tuples in the last
    axis of ``indices``; repeated indices accumulate, except in "update" mode where one wins."""
    return _scattered(data, tuple(np.moveaxis(indices.astype(np.int64), -1, 0)), updates, mode)


@implements("scatter")
def scatter(data, indices, updates, axis=0, mode="add", validate_indices=False):
    """``data`` with slice ``i`` of ``updates`` along ``axis`` written (or combined by ``mode``) at
    index ``indices[i]`` of that axis; repeated indices accumulate, except in "update" mode."""
    axis = int(axis) % data.ndim
    where = (slice(None),) * axis + (np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64),)
    return _scattered(data, where, updates, mode)


@implements("scatter_along_axis")
def scatter_along_axis(data, indices, updates, axis=0, mode="add", validate_indices=False):
    """``data`` with each element of ``updates`` written (or combined by ``mode``) at the position
    along ``axis`` that ``indices`` gives, its other coordinates its own (put_along_axis)."""
    axis = int(axis) % data.ndim
    grid = list(np.indices(indices.shape, sparse=True))
    grid[axis] = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
    return _scattered(data, tuple(grid), updates, mode)


def _scattered(data, where: tuple, updates, mode) -> np.ndarray:
    """``data`` with ``updates`` written at the numpy index ``where``, or combined by ``mode``."""
    out = np.array(data, copy=True)
    if str(mode) == "update":
        out[where] = updates
    else:
        _SCATTER_MODES[str(mode)](out, where, updates)
    return out


# ----------------------------------------------------------------------------- weight decompression
# The constexpr ops coremltools' ``ct.optimize.coreml`` writes: compressed weights that Core ML
# decompresses when it loads the model. Inputs arrive already unpacked to one integer per element
# (coremltools' loader expands sub-byte types), except the iOS16 forms, which keep their packed bytes.


def _unpack_bits(packed, nbits: int, count: int) -> np.ndarray:
    """Unsigned ``nbits``-wide integers packed into bytes from each byte's least significant bit up."""
    bits = np.unpackbits(np.asarray(packed).astype(np.uint8), bitorder="little")[: nbits * count]
    weights = (1 << np.arange(nbits, dtype=np.int64))
    return (bits.reshape(count, nbits).astype(np.int64) * weights).sum(axis=1)


def _along(vector, rank: int, axis: int) -> np.ndarray:
    """A scalar or a per-``axis`` vector shaped to broadcast against a rank-``rank`` tensor."""
    vector = np.asarray(vector, dtype=np.float32)
    if vector.ndim == 0:
        return vector
    shape = [1] * rank
    shape[axis] = vector.size
    return vector.reshape(shape)


@implements("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    """iOS16: ``scale * (quantized_data - zero_point)``, scale and zero point scalars or vectors along ``axis``."""
    rank = quantized_data.ndim
    axis = int(axis) % rank
    return _along(scale, rank, axis) * (quantized_data.astype(np.float32) - _along(zero_point, rank, axis))


@implements("constexpr_cast")
def constexpr_cast(source_val, output_dtype):
    return source_val.astype(_mil_dtype_to_numpy(output_dtype))


def _block_repeat(values, shape) -> np.ndarray:
    """``values`` with each element repeated over its block: block size ``shape[i] / values.shape[i]``."""
    for axis, (full, blocks) in enumerate(zip(shape, values.shape)):
        if full != blocks:
            values = np.repeat(values, full // blocks, axis=axis)
    return values


@implements("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data, scale, offset=None):
    """iOS18: ``scale * (data - offset)``, one scale (and offset) per block; a block spans
    ``data.shape[i] / scale.shape[i]`` elements along axis i."""
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _block_repeat(offset.astype(np.float32), data.shape)
    return _block_repeat(scale, data.shape) * values


@implements("constexpr_lut_to_dense")
def constexpr_lut_to_dense(lut, indices, shape=None, vector_axis=None):
    """Palettized weights: each index replaced by its entry of a lookup table.

    iOS16 (``shape`` given): one table of scalars, indices packed ``log2(len(lut))`` bits each.
    iOS18: ``lut`` has the rank of ``indices`` plus two, ``(groups..., palettes, vector)``; along
    axis i one table serves ``indices.shape[i] / lut.shape[i]`` consecutive elements, and each
    index stands for ``vector`` consecutive elements along ``vector_axis``.
    """
    if shape is not None:
        count = int(np.prod(shape))
        nbits = int(round(math.log2(lut.size)))
        return lut[_unpack_bits(indices, nbits, count)].reshape(tuple(int(d) for d in shape))
    rank = indices.ndim
    group_shape, (palettes, vector) = lut.shape[:rank], lut.shape[rank:]
    group_coordinates = [
        (np.arange(n) // (n // g)).reshape([-1 if a == axis else 1 for a in range(rank)])
        for axis, (n, g) in enumerate(zip(indices.shape, group_shape))
    ]
    group = np.ravel_multi_index(np.broadcast_arrays(*group_coordinates), group_shape)
    entries = lut.reshape(-1, palettes, vector)[group, indices.astype(np.int64)]  # indices.shape + (vector,)
    if vector == 1:
        return entries[..., 0]
    axis = int(vector_axis) % rank
    entries = np.moveaxis(entries, -1, axis + 1)
    out_shape = list(indices.shape)
    out_shape[axis] *= vector
    return entries.reshape(out_shape)


@implements("constexpr_sparse_to_dense")
def constexpr_sparse_to_dense(nonzero_data, mask, shape=None):
    """Zeros, with ``nonzero_data`` written in order where the mask is set. iOS16 packs the mask
    one bit per element (``shape`` given); iOS18 gives it as a tensor."""
    if shape is not None:
        mask = _unpack_bits(mask, 1, int(np.prod(shape))).reshape(tuple(int(d) for d in shape))
    dense = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    dense[mask != 0] = nonzero_data
    return dense
