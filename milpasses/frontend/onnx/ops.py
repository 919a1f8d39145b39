"""One small translator per ONNX op: ONNX node -> MIL ops, in the forms coremltools' torch
frontend emits for the same computation (``linear`` for a matmul by a constant, ``layer_norm``,
``softmax``, ``gather`` for embeddings, ``expand_dims``/``tile`` for broadcasts), so the ``ane::``
passes, written against the torch frontend's programs, find the same patterns.

A translator takes the conversion context, the node, its inputs (a MIL ``Var``, a numpy constant,
or None for an omitted optional input) and its attributes, and returns its outputs. Nodes whose
inputs are all constants never reach a translator: they are evaluated at conversion
(:mod:`milpasses.frontend.onnx.translate`).
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var, types

TRANSLATORS: dict = {}


def translates(*op_types):
    def register(function):
        for op_type in op_types:
            TRANSLATORS[op_type] = function
        return function
    return register


def shape_of(value) -> tuple[int, ...]:
    return tuple(int(d) for d in (value.shape if isinstance(value, Var) else np.shape(value)))


def as_var(value):
    """A MIL var for ``value``: constants become ``const`` ops, int64 as int32 and float64 as
    float32 (MIL's tensors have neither)."""
    if isinstance(value, Var):
        return value
    array = np.asarray(value)
    if array.dtype == np.int64:
        array = array.astype(np.int32)
    elif array.dtype == np.float64:
        array = array.astype(np.float32)
    return mb.const(val=array)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes_input(node_inputs, attrs, position: int = 1):
    """Axes given as an attribute (older opsets) or as a constant input (newer ones)."""
    if len(node_inputs) > position and node_inputs[position] is not None:
        return [int(a) for a in np.asarray(node_inputs[position]).reshape(-1)]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


# -- elementwise ---------------------------------------------------------------------------

_BINARY = {"Add": mb.add, "Sub": mb.sub, "Mul": mb.mul, "Pow": mb.pow, "Equal": mb.equal,
           "Less": mb.less, "LessOrEqual": mb.less_equal, "Greater": mb.greater,
           "GreaterOrEqual": mb.greater_equal, "And": mb.logical_and, "Or": mb.logical_or,
           "Xor": mb.logical_xor, "Min": mb.minimum, "Max": mb.maximum}


@translates(*_BINARY)
def binary(ctx, node, inputs, attrs):
    if node.op_type in ("Min", "Max") and len(inputs) != 2:
        ctx.unsupported(node, "Min/Max of other than two inputs")
    x, y = inputs
    if node.op_type == "Pow" and not isinstance(y, Var) and isinstance(x, Var) and not _is_int(x):
        y = np.asarray(y, np.float32)  # ONNX lets the exponent's type differ; MIL's pow does not
    return _BINARY[node.op_type](x=as_var(x), y=as_var(y))


@translates("Div")
def div(ctx, node, inputs, attrs):
    x, y = inputs
    producer = ctx.producer(y)
    # torch's rsqrt exports as Sqrt then 1 / it; the torch frontend's form is one rsqrt, and the
    # ane:: passes read the variance's single reader, so the sqrt goes when nothing else reads it.
    if not isinstance(x, Var) and np.size(x) == 1 and np.all(np.asarray(x) == 1) \
            and producer is not None and producer.op_type == "sqrt" and ctx.readers(node.input[1]) == 1:
        return _rsqrt_of(producer)
    if _is_int(x) or (not isinstance(x, Var) and np.asarray(x).dtype.kind in "iu"):
        # ONNX truncates, MIL floors: the same on the non-negative index arithmetic exporters write.
        return mb.floor_div(x=as_var(x), y=as_var(y))
    return mb.real_div(x=as_var(x), y=as_var(y))


def _rsqrt_of(sqrt_op):
    result = mb.rsqrt(x=sqrt_op.x)
    sqrt_op.enclosing_block.remove_ops([sqrt_op])
    return result


_UNARY = {"Sqrt": mb.sqrt, "Erf": mb.erf, "Tanh": mb.tanh, "Sigmoid": mb.sigmoid, "Relu": mb.relu,
          "Abs": mb.abs, "Exp": mb.exp, "Log": mb.log, "Sin": mb.sin, "Cos": mb.cos, "Ceil": mb.ceil,
          "Floor": mb.floor, "Sign": mb.sign, "Not": mb.logical_not, "Reciprocal": mb.inverse,
          "Softplus": mb.softplus, "Round": mb.round}


@translates(*_UNARY)
def unary(ctx, node, inputs, attrs):
    producer = ctx.producer(inputs[0])
    if node.op_type == "Not" and producer is not None and producer.op_type == "equal" \
            and ctx.readers(node.input[0]) == 1:
        # torch's != exports as Not(Equal); the torch frontend's form is one not_equal.
        result = mb.not_equal(x=producer.x, y=producer.y)
        producer.enclosing_block.remove_ops([producer])
        return result
    if node.op_type == "Reciprocal" and producer is not None and producer.op_type == "sqrt" \
            and ctx.readers(node.input[0]) == 1:
        return _rsqrt_of(producer)  # the dynamo exporter's rsqrt
    return _UNARY[node.op_type](x=inputs[0])


@translates("Neg")
def neg(ctx, node, inputs, attrs):
    return mb.mul(x=inputs[0], y=np.array(-1, dtype=np.int32 if _is_int(inputs[0]) else np.float32))


@translates("Identity")
def identity(ctx, node, inputs, attrs):
    return inputs[0]


@translates("Gelu")
def gelu(ctx, node, inputs, attrs):
    return mb.gelu(x=inputs[0], mode="TANH_APPROXIMATION" if attrs.get("approximate") == "tanh" else "EXACT")


@translates("Clip")
def clip(ctx, node, inputs, attrs):
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if low is not None:
        x = mb.maximum(x=x, y=as_var(low))
    if high is not None:
        x = mb.minimum(x=x, y=as_var(high))
    return x


@translates("Where")
def where(ctx, node, inputs, attrs):
    cond, a, b = inputs
    if not isinstance(a, Var) and not isinstance(b, Var):
        # MIL's select takes its output shape from a and b alone; cond's shape must come from one of them.
        a = np.broadcast_to(a, np.broadcast_shapes(shape_of(cond), np.shape(a), np.shape(b)))
    return mb.select(cond=as_var(cond), a=as_var(a), b=as_var(b))


_CASTS = {1: "fp32", 10: "fp16", 11: "fp32", 6: "int32", 7: "int32", 9: "bool", 2: "int32", 3: "int32"}


@translates("Cast")
def cast(ctx, node, inputs, attrs):
    target = _CASTS.get(attrs["to"])
    if target is None:
        ctx.unsupported(node, f"Cast to ONNX type {attrs['to']}")
    x = inputs[0]
    return x if types.builtin_to_string(x.dtype) == target else mb.cast(x=x, dtype=target)


def _is_int(x) -> bool:
    return isinstance(x, Var) and x.dtype.__name__.startswith(("int", "uint"))


# -- linear algebra --------------------------------------------------------------------------

@translates("MatMul")
def matmul(ctx, node, inputs, attrs):
    x, y = inputs
    if isinstance(x, Var) and not isinstance(y, Var) and np.ndim(y) == 2:
        # The torch frontend's form of nn.Linear; the Add of a bias after it is fused by DEFAULT.
        return mb.linear(x=x, weight=np.ascontiguousarray(np.asarray(y, np.float32).T))
    return mb.matmul(x=as_var(x), y=as_var(y))


@translates("Gemm")
def gemm(ctx, node, inputs, attrs):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = mb.transpose(x=a, perm=[1, 0])
    if not isinstance(b, Var) and (c is None or not isinstance(c, Var)):
        weight = np.asarray(b, np.float32) * alpha
        weight = weight if attrs.get("transB", 0) else weight.T
        bias = None if c is None else np.broadcast_to(np.asarray(c, np.float32) * beta, weight.shape[:1])
        return mb.linear(x=a, weight=np.ascontiguousarray(weight),
                         **({} if bias is None else {"bias": np.ascontiguousarray(bias)}))
    product = mb.matmul(x=as_var(a), y=as_var(b), transpose_y=bool(attrs.get("transB", 0)))
    if alpha != 1.0:
        product = mb.mul(x=product, y=np.float32(alpha))
    if c is not None:
        product = mb.add(x=product, y=as_var(np.asarray(c) * beta) if not isinstance(c, Var) else c)
    return product


@translates("Conv")
def conv(ctx, node, inputs, attrs):
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if isinstance(weight, Var) or (bias is not None and isinstance(bias, Var)):
        ctx.unsupported(node, "Conv with a weight computed at run time")
    spatial = np.ndim(weight) - 2
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        ctx.unsupported(node, f"Conv with auto_pad={attrs['auto_pad']}")
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    custom = [p for i in range(spatial) for p in (pads[i], pads[i + spatial])]
    return mb.conv(x=x, weight=np.asarray(weight, np.float32), bias=None if bias is None else np.asarray(bias, np.float32),
                   strides=list(attrs.get("strides", [1] * spatial)), pad_type="custom", pad=custom,
                   dilations=list(attrs.get("dilations", [1] * spatial)), groups=attrs.get("group", 1))


# -- normalisation and reductions ----------------------------------------------------------------

@translates("LayerNormalization")
def layer_norm(ctx, node, inputs, attrs):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    if len(node.output) > 1 and any(node.output[1:]):
        ctx.unsupported(node, "LayerNormalization with its mean or inverse deviation as outputs")
    rank = x.rank
    axes = list(range(_axis(attrs.get("axis", -1), rank), rank))
    return mb.layer_norm(x=x, axes=axes, gamma=None if scale is None else as_var(scale),
                         beta=None if bias is None else as_var(bias), epsilon=np.float32(attrs.get("epsilon", 1e-5)))


@translates("SimplifiedLayerNormalization", "RMSNormalization")
def rms_norm(ctx, node, inputs, attrs):
    # The torch frontend's RMSNorm: x * rsqrt(mean(x ** 2) + eps) * scale.
    x, scale = inputs[0], inputs[1]
    axes = list(range(_axis(attrs.get("axis", -1), x.rank), x.rank))
    mean = mb.reduce_mean(x=mb.pow(x=x, y=np.float32(2.0)), axes=axes, keep_dims=True)
    normed = mb.mul(x=x, y=mb.rsqrt(x=mb.add(x=mean, y=np.float32(attrs.get("epsilon", 1e-5)))))
    return mb.mul(x=normed, y=as_var(scale))


_REDUCE = {"ReduceMean": mb.reduce_mean, "ReduceSum": mb.reduce_sum, "ReduceMax": mb.reduce_max,
           "ReduceMin": mb.reduce_min, "ReduceProd": mb.reduce_prod}


@translates(*_REDUCE)
def reduce(ctx, node, inputs, attrs):
    axes = _axes_input(inputs, attrs)
    if axes is None:
        if attrs.get("noop_with_empty_axes", 0):
            return inputs[0]
        axes = list(range(inputs[0].rank))
    return _REDUCE[node.op_type](x=inputs[0], axes=axes, keep_dims=bool(attrs.get("keepdims", 1)))


@translates("Softmax")
def softmax(ctx, node, inputs, attrs):
    return mb.softmax(x=inputs[0], axis=attrs.get("axis", -1))


@translates("CumSum")
def cumsum(ctx, node, inputs, attrs):
    return mb.cumsum(x=inputs[0], axis=int(np.asarray(inputs[1])), exclusive=bool(attrs.get("exclusive", 0)),
                     reverse=bool(attrs.get("reverse", 0)))


# -- shapes and indexing -------------------------------------------------------------------------

@translates("Shape")
def shape(ctx, node, inputs, attrs):
    dims = np.array(shape_of(inputs[0]), dtype=np.int64)
    return dims[attrs.get("start", 0):attrs.get("end", len(dims))]


@translates("Size")
def size(ctx, node, inputs, attrs):
    return np.array(int(np.prod(shape_of(inputs[0]))), dtype=np.int64)


@translates("Reshape")
def reshape(ctx, node, inputs, attrs):
    x, target = inputs
    target = [int(d) for d in np.asarray(target)]
    if not attrs.get("allowzero", 0):
        target = [shape_of(x)[i] if d == 0 else d for i, d in enumerate(target)]
    return _reshape(x, target)


def _reshape(x, target):
    if list(shape_of(x)) == list(np.empty(shape_of(x)).reshape(target).shape):
        return x
    return mb.reshape(x=x, shape=np.array(target, dtype=np.int32))


@translates("Flatten")
def flatten(ctx, node, inputs, attrs):
    dims = shape_of(inputs[0])
    axis = _axis(attrs.get("axis", 1), len(dims))
    return _reshape(inputs[0], [int(np.prod(dims[:axis])), int(np.prod(dims[axis:]))])


@translates("Transpose")
def transpose(ctx, node, inputs, attrs):
    perm = attrs.get("perm") or list(reversed(range(inputs[0].rank)))
    return mb.transpose(x=inputs[0], perm=list(perm))


@translates("Unsqueeze")
def unsqueeze(ctx, node, inputs, attrs):
    axes = _axes_input(inputs, attrs)
    rank = inputs[0].rank + len(axes)
    return mb.expand_dims(x=inputs[0], axes=sorted(_axis(a, rank) for a in axes))


@translates("Squeeze")
def squeeze(ctx, node, inputs, attrs):
    axes = _axes_input(inputs, attrs)
    return mb.squeeze(x=inputs[0], **({} if axes is None else {"axes": axes}))


@translates("Concat")
def concat(ctx, node, inputs, attrs):
    values = [as_var(v) for v in inputs if 0 not in shape_of(v)]
    return values[0] if len(values) == 1 else mb.concat(values=values, axis=attrs["axis"])


@translates("Split")
def split(ctx, node, inputs, attrs):
    x = inputs[0]
    axis = _axis(attrs.get("axis", 0), x.rank)
    sizes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if sizes is None:
        count, length = len(node.output), shape_of(x)[axis]
        chunk = -(-length // count)
        sizes = [min(chunk, length - i * chunk) for i in range(count)]
    return list(mb.split(x=x, split_sizes=[int(s) for s in np.asarray(sizes)], axis=axis))


@translates("Slice")
def slice_(ctx, node, inputs, attrs):
    x = inputs[0]
    dims = shape_of(x)
    starts, ends = np.asarray(inputs[1]).reshape(-1), np.asarray(inputs[2]).reshape(-1)
    axes = np.asarray(inputs[3]).reshape(-1) if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
    steps = np.asarray(inputs[4]).reshape(-1) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    begin, end, stride = [0] * len(dims), list(dims), [1] * len(dims)
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis = _axis(int(axis), len(dims))
        if step < 0:
            ctx.unsupported(node, "Slice with a negative step")
        begin[axis], end[axis], _ = slice(int(start), int(stop), int(step)).indices(dims[axis])
        stride[axis] = int(step)
    if begin == [0] * len(dims) and end == list(dims) and stride == [1] * len(dims):
        return x
    return mb.slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(end, np.int32),
                             stride=np.array(stride, np.int32))


@translates("Gather")
def gather(ctx, node, inputs, attrs):
    data, indices = inputs
    axis = _axis(attrs.get("axis", 0), len(shape_of(data)))
    if not isinstance(indices, Var):
        indices = np.asarray(indices)
        length = shape_of(data)[axis]
        indices = np.where(indices < 0, indices + length, indices)
        if indices.ndim == 0:
            # The torch frontend's select: a slice that drops the axis.
            rank = data.rank
            axis = _axis(axis, rank)
            begin, end = [0] * rank, list(shape_of(data))
            begin[axis], end[axis] = int(indices), int(indices) + 1
            squeeze_mask = [i == axis for i in range(rank)]
            return mb.slice_by_index(x=data, begin=np.array(begin, np.int32), end=np.array(end, np.int32),
                                     squeeze_mask=squeeze_mask)
    if isinstance(data, Var) and not isinstance(indices, Var):
        positions = np.take(np.arange(np.prod(shape_of(data))).reshape(shape_of(data)), indices, axis=axis)
        if np.array_equal(positions.reshape(-1), np.arange(positions.size)) and positions.size == np.prod(shape_of(data)):
            # Every element once, in order: a reshape (as ane::gather_to_reshape makes of the torch
            # frontend's gathers), which also spares a bool mask the casts MIL's gather needs.
            return _reshape(data, list(positions.shape))
    data = as_var(data)
    if data.dtype == types.bool:  # MIL gathers numbers only
        return mb.cast(x=mb.gather(x=mb.cast(x=data, dtype="int32"), indices=as_var(indices), axis=axis), dtype="bool")
    return mb.gather(x=data, indices=as_var(indices), axis=axis)


@translates("GatherND")
def gather_nd(ctx, node, inputs, attrs):
    data, indices = as_var(inputs[0]), as_var(inputs[1])
    batch_dims = attrs.get("batch_dims", 0)
    if data.dtype == types.bool:  # MIL gathers numbers only
        gathered = mb.gather_nd(x=mb.cast(x=data, dtype="int32"), indices=indices, batch_dims=batch_dims)
        return mb.cast(x=gathered, dtype="bool")
    return mb.gather_nd(x=data, indices=indices, batch_dims=batch_dims)


@translates("GatherElements")
def gather_elements(ctx, node, inputs, attrs):
    return mb.gather_along_axis(x=as_var(inputs[0]), indices=as_var(inputs[1]), axis=attrs.get("axis", 0))


@translates("Expand")
def expand(ctx, node, inputs, attrs):
    x, target = inputs
    x = as_var(x)
    target = [int(d) for d in np.asarray(target)]
    out = np.broadcast_shapes(shape_of(x), tuple(target))
    if len(out) > x.rank:
        x = mb.expand_dims(x=x, axes=list(range(len(out) - x.rank)))
    reps = [o // d if d != o else 1 for d, o in zip(shape_of(x), out)]
    return x if all(r == 1 for r in reps) else mb.tile(x=x, reps=reps)


@translates("Tile")
def tile(ctx, node, inputs, attrs):
    return mb.tile(x=inputs[0], reps=[int(r) for r in np.asarray(inputs[1])])


@translates("Range")
def range_(ctx, node, inputs, attrs):
    return mb.range_1d(start=as_var(inputs[0]), end=as_var(inputs[1]), step=as_var(inputs[2]))


@translates("Trilu")
def trilu(ctx, node, inputs, attrs):
    x = inputs[0]
    k = int(np.asarray(inputs[1])) if len(inputs) > 1 and inputs[1] is not None else 0
    rows, cols = shape_of(x)[-2:]
    keep = np.triu(np.ones((rows, cols), bool), k) if attrs.get("upper", 1) else np.tril(np.ones((rows, cols), bool), k)
    zero = np.zeros((), np.int32 if _is_int(x) else np.float32)
    return mb.select(cond=keep, a=x, b=zero)
