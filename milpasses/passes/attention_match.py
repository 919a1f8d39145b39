"""Recognising the attention core as the torch frontend emits it. Nothing here mutates a program.

The frontend's multi-head attention is, per block::

    q, k, v: (B, S, C)                  projections (1x1 convs by now, left to rank 3)
    reshape to (B, S, H, d), transpose to (B, H, S, d)   [rotary, GQA repeat, K^T on the way]
    scores = matmul(q, k^T) * scale (+ mask) (+ bias)    softmax over the last axis
    out    = matmul(weights, v), transpose to (B, S, H, d), reshape to (B, S, C)

The matcher walks up from each ``softmax`` (and from iOS18's ``scaled_dot_product_attention``)
and records what it found: for q, k and v a :class:`HeadView` naming the rank-3 tensor the heads
are cut from; the additive terms; the scale; and the (B, S, C) var the block's result replaces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.passes.matching import (
    NoMatch,
    constant_value,
    is_activation,
    is_static,
    rank,
    same_length,
    single_consumer,
)

#: Labels of a head view's axes: batch, head, sequence, head channel.
HEADS_FIRST = ("b", "h", "s", "d")  # (B, H, S, d): q and v as matmul operands
KEY_TRANSPOSED = ("b", "h", "d", "s")  # (B, H, d, S): k as the right operand of q @ k^T
SOURCE_SPLIT = ("b", "s", "h", "d")  # (B, S, H, d): the reshape of a (B, S, C) projection


@dataclass(frozen=True)
class Rotary:
    """Rotary position embedding ``x * cos + rotate_half(x) * sin`` on a (B, H, S, d) view."""

    cos: np.ndarray  # (S, d)
    sin: np.ndarray  # (S, d)


@dataclass(frozen=True)
class HeadView:
    """A (B, H, S, d) view of the heads of a rank-3 ``source`` (B, S, heads * head_dim)."""

    source: object
    heads: int
    head_dim: int
    scale: float = 1.0  # constant factors met between the source and the attention
    rotary: Rotary | None = None
    repeats: int = 1  # grouped-query attention: each source head serves this many query heads

    @property
    def seq_len(self) -> int:
        return self.source.shape[1]


@dataclass(frozen=True)
class AttentionSite:
    query: HeadView
    key: HeadView
    value: HeadView
    terms: tuple  # additive vars broadcasting against the (B, H, Sq, Sk) scores
    scale: float  # applied to q . k before the terms are added
    output: object  # the (B, Sq, C) var the rewritten attention replaces
    anchor: object  # the op producing ``output``
    matched_ops: tuple  # ops of the original attention core, dead once ``output`` is replaced

    @property
    def heads(self) -> int:
        return self.query.heads


def _scalar(var) -> float | None:
    value = constant_value(var)
    if value is None or np.asarray(value).size != 1:
        return None
    return float(np.asarray(value).reshape(()))


def _positive_axes(perm, length: int) -> list[int]:
    return [int(p) % length for p in perm]


def _scaling(op):
    """If ``op`` multiplies an activation by a scalar constant (``mul`` either way round, or
    ``real_div`` by the constant): (factor, the activation), else None."""
    if op.op_type not in ("mul", "real_div"):
        return None
    x, y = op.inputs["x"], op.inputs["y"]
    if _scalar(y) is not None and is_activation(x):
        return (_scalar(y) if op.op_type == "mul" else 1.0 / _scalar(y)), x
    if op.op_type == "mul" and _scalar(x) is not None and is_activation(y):
        return _scalar(x), y
    return None


def _other_operand(op, var):
    """For a binary op with ``var`` as one operand, the other one."""
    x, y = op.inputs["x"], op.inputs["y"]
    return y if x is var else x


def _half_of(op, x) -> str | None:
    """'lo' or 'hi' if ``op`` slices the first or second half of ``x``'s last axis, else None."""
    if op.op_type != "slice_by_index" or op.inputs["x"] is not x:
        return None
    out = op.outputs[0]
    d = x.shape[-1]
    if not is_static(d) or d % 2 or out.shape[-1] != d // 2:
        return None
    if not all(same_length(a, b) for a, b in zip(out.shape[:-1], x.shape[:-1])):
        return None
    stride = constant_value(op.inputs.get("stride"))
    if stride is not None and any(int(s) != 1 for s in stride):
        return None
    begin = constant_value(op.inputs["begin"])
    if begin is None or any(int(b) for b in begin[:-1]):
        return None
    return {0: "lo", d // 2: "hi"}.get(int(begin[-1]))


def _rotary_input(add_op):
    """If ``add_op`` is ``x * cos + rotate_half(x) * sin`` on (B, H, S, d): (x, Rotary), else None.

    ``rotate_half(x)`` is ``concat([-x[..., d/2:], x[..., :d/2]], axis=-1)``, as HF's Llama and
    Qwen write it; other rotations (interleaved pairs) are not recognised. Where every cos is 1
    (a single position 0) DEFAULT has already removed ``x * cos``, leaving ``x`` itself.
    """
    terms = [add_op.inputs["x"], add_op.inputs["y"]]
    for first, second in (terms, terms[::-1]):
        found = _rotary_parts(first, second.op, add_op)
        if found is not None:
            return found
    return None


def _constant_and_activation(mul_op):
    x, y = mul_op.inputs["x"], mul_op.inputs["y"]
    if constant_value(x) is not None and is_activation(y):
        return constant_value(x), y
    if constant_value(y) is not None and is_activation(x):
        return constant_value(y), x
    return None, None


def _rotary_parts(cos_term, sin_mul, add_op):
    if sin_mul is None or sin_mul.op_type != "mul":
        return None
    cos_mul = cos_term.op
    if cos_mul is not None and cos_mul.op_type == "mul":
        cos, x = _constant_and_activation(cos_mul)
    else:
        cos, x, cos_mul = None, cos_term, add_op
    sin, rotated = _constant_and_activation(sin_mul)
    if sin is None or x is None or rank(x) != 4 or rotated.op is None:
        return None
    concat = rotated.op
    values = concat.inputs.get("values") if concat.op_type == "concat" else None
    if values is None or len(values) != 2 or int(constant_value(concat.inputs["axis"])) % 4 != 3:
        return None
    negated, lo = values
    if negated.op is None or negated.op.op_type != "mul" or lo.op is None or _half_of(lo.op, x) != "lo":
        return None
    minus_one, hi = _constant_and_activation(negated.op)
    if minus_one is None or np.asarray(minus_one).size != 1 or float(np.asarray(minus_one).reshape(())) != -1.0:
        return None
    if hi.op is None or _half_of(hi.op, x) != "hi":
        return None
    seq_len, head_dim = x.shape[2], x.shape[3]
    if not is_static(seq_len):
        return None  # the tables are computed at run time for flexible lengths
    cos = np.ones((seq_len, head_dim), dtype=np.float32) if cos is None else cos
    tables = []
    for table in (cos, sin):
        table = np.asarray(table, dtype=np.float32)
        if table.ndim > 4 or any(int(n) != 1 for n in table.shape[:-2]) or table.shape[-2:] != (seq_len, head_dim):
            return None
        tables.append(table.reshape(seq_len, head_dim))
    users = {id(op) for op in x.child_ops}
    if users != {id(cos_mul), id(lo.op), id(hi.op)}:
        return None
    return x, Rotary(*tables)


def _repeated_heads(reshape_op):
    """If ``reshape_op`` ends HF's ``repeat_kv`` (expand_dims, tile, reshape): (x, repeats)."""
    tile = reshape_op.inputs["x"].op
    if tile is None or tile.op_type != "tile" or single_consumer(tile.outputs[0]) is None:
        return None
    expand = tile.inputs["x"].op
    if expand is None or expand.op_type != "expand_dims" or single_consumer(expand.outputs[0]) is None:
        return None
    axes = constant_value(expand.inputs["axes"])
    reps = constant_value(tile.inputs["reps"])
    if axes is None or [int(a) % 5 for a in axes] != [2] or reps is None:
        return None
    reps = [int(r) for r in reps]
    if len(reps) != 5 or reps[:2] != [1, 1] or reps[3:] != [1, 1]:
        return None
    x = expand.inputs["x"]
    b, heads, s, d = x.shape
    expected = (b, heads * reps[2], s, d)
    if not all(same_length(a, e) for a, e in zip(reshape_op.outputs[0].shape, expected)):
        return None
    return x, reps[2]


def trace_heads(var, labels) -> HeadView | NoMatch:
    """Walk up from ``var`` (an attention operand whose axes are ``labels``) to the rank-3
    tensor its heads are cut from, through transposes, scalar scales, single-value concats,
    rotary embedding and grouped-query repeats. Every op passed must have one consumer."""
    labels = tuple(labels)
    scale, rotary, repeats = 1.0, None, 1
    shared = None  # the rotary input, read by the rotation's three ops
    while True:
        op = var.op
        if op is None:
            return NoMatch("an attention operand is a program input")
        if op.op_type == "reshape" and rank(op.inputs["x"]) == 3 and labels == SOURCE_SPLIT:
            source = op.inputs["x"]
            b, s, heads, d = var.shape
            if not (is_static(heads) and is_static(d) and is_static(source.shape[2])):
                return NoMatch("the head split has a dynamic head count or size")
            if source.shape[2] != heads * d or not (same_length(source.shape[0], b) and same_length(source.shape[1], s)):
                return NoMatch("the head split is not (B, S, C) -> (B, S, H, d)")
            if single_consumer(source) is None:
                return NoMatch("a projection feeding attention has other consumers")
            return HeadView(source, heads, d, scale, rotary, repeats)
        if var is not shared and single_consumer(var) is None:
            return NoMatch(f"'{op.op_type}' inside the attention has several consumers")
        if op.op_type == "transpose":
            perm = _positive_axes(constant_value(op.inputs["perm"]), 4)
            before = [None] * 4
            for out_axis, in_axis in enumerate(perm):
                before[in_axis] = labels[out_axis]
            labels, var = tuple(before), op.inputs["x"]
        elif _scaling(op) is not None:
            factor, var = _scaling(op)
            scale *= factor
        elif op.op_type == "concat" and len(op.inputs["values"]) == 1:
            var = op.inputs["values"][0]
        elif op.op_type == "add" and rotary is None and labels == HEADS_FIRST:
            found = _rotary_input(op)
            if found is None:
                return NoMatch("an add on an attention operand is not a rotary embedding")
            var, rotary = found
            shared = var
        elif op.op_type == "reshape" and repeats == 1 and labels == HEADS_FIRST and rank(op.inputs["x"]) == 5:
            found = _repeated_heads(op)
            if found is None:
                return NoMatch("a rank-5 reshape on an attention operand is not a head repeat")
            var, repeats = found
        else:
            return NoMatch(f"'{op.op_type}' on an attention operand is not understood")


def _scores_chain(softmax_op):
    """From the softmax input up to ``q @ k^T``: (matmul, scale, terms, ops) or NoMatch."""
    var, scale, terms, ops = softmax_op.inputs["x"], 1.0, [], []
    while True:
        op = var.op
        if op is None:
            return NoMatch("softmax input is a program input")
        if single_consumer(var) is None:
            return NoMatch("attention scores have several consumers")
        ops.append(op)
        if op.op_type == "matmul":
            return op, scale, terms, ops
        if _scaling(op) is not None:
            factor, var = _scaling(op)
            scale *= factor
        elif op.op_type == "add":
            if scale != 1.0:
                return NoMatch("the scores are scaled after a mask or bias is added")
            chain = [v for v in (op.inputs["x"], op.inputs["y"]) if _leads_to_scores(v)]
            if len(chain) != 1:
                return NoMatch("cannot tell the scores from the additive term")
            var = chain[0]
            terms.append(_other_operand(op, var))
        else:
            return NoMatch(f"'{op.op_type}' between the scores and the softmax is not understood")


def _leads_to_scores(var) -> bool:
    """Whether ``var`` is the scores themselves: a matmul of two activations, reached only
    through scalar scales and adds (a mask or bias never is)."""
    op = var.op
    while op is not None:
        if op.op_type == "matmul":
            return is_activation(op.inputs["x"]) and is_activation(op.inputs["y"])
        if _scaling(op) is not None:
            op = _scaling(op)[1].op
        elif op.op_type == "add":
            return any(_leads_to_scores(v) for v in (op.inputs["x"], op.inputs["y"]))
        else:
            return False
    return False


def _output_chain(matmul_op):
    """From ``weights @ v`` (B, H, Sq, d) down to the reshape to (B, Sq, C): (output, ops)."""
    var, labels, ops = matmul_op.outputs[0], HEADS_FIRST, []
    while True:
        op = single_consumer(var)
        if op is None:
            return NoMatch("the attention output has several consumers")
        ops.append(op)
        if op.op_type == "transpose":
            perm = _positive_axes(constant_value(op.inputs["perm"]), 4)
            labels, var = tuple(labels[p] for p in perm), op.outputs[0]
        elif op.op_type == "reshape" and labels == SOURCE_SPLIT and rank(op.outputs[0]) == 3:
            b, s, heads, d = var.shape
            merged = op.outputs[0].shape
            if merged[2] != heads * d or not (same_length(merged[0], b) and same_length(merged[1], s)):
                return NoMatch("the heads are not merged back to (B, S, C)")
            return op.outputs[0], ops
        else:
            return NoMatch(f"'{op.op_type}' after the attention output is not understood")


def _check_terms(terms):
    """The adds that produced the scores already proved each term broadcasts against them;
    the rewrite needs each term's rank and, to cut it per head, its head axis."""
    for term in terms:
        if rank(term) > 4 or (rank(term) == 4 and not is_static(term.shape[1])):
            return NoMatch("a mask or bias is not a tensor of rank <= 4 with a known head axis")
    return None


def _assemble(operands, key_labels, terms, scale, output, ops) -> AttentionSite | NoMatch:
    """The site, from the (q, k, v) operand vars of the attention core, once their heads are traced."""
    q, k, v = operands
    query, key, value = trace_heads(q, HEADS_FIRST), trace_heads(k, key_labels), trace_heads(v, HEADS_FIRST)
    for view in (query, key, value):
        if not view:
            return view
    if key.source is value.source:
        return NoMatch("key and value share one projection")
    if not (query.head_dim == key.head_dim == value.head_dim):
        return NoMatch("q, k and v head sizes differ")
    if key.heads != value.heads or key.repeats != value.repeats:
        return NoMatch("k and v have different heads")
    if query.repeats != 1 or key.heads * key.repeats != query.heads:
        return NoMatch("q, k and v heads do not agree")
    if value.rotary is not None or value.scale != 1.0:
        return NoMatch("v is rotated or scaled")
    if not same_length(query.source.shape[0], key.source.shape[0]):
        return NoMatch("q and k batch sizes differ")
    failed = _check_terms(terms)
    if failed is not None:
        return failed
    output_var, output_ops = output
    total = scale * query.scale * key.scale
    return AttentionSite(query, key, value, tuple(terms), total, output_var, output_var.op, tuple(ops) + tuple(output_ops))


def match_attention(softmax_op) -> AttentionSite | NoMatch:
    """The attention block whose softmax is ``softmax_op``, or why it is not one."""
    x = softmax_op.inputs["x"]
    if rank(x) != 4:
        return NoMatch("softmax input is not a rank-4 tensor")
    if int(constant_value(softmax_op.inputs["axis"])) % 4 != 3:
        return NoMatch("softmax is not over the last axis")
    chain = _scores_chain(softmax_op)
    if not chain:
        return chain
    scores, scale, terms, ops = chain
    weights_user = single_consumer(softmax_op.outputs[0])
    if weights_user is None or weights_user.op_type != "matmul" or weights_user.inputs["x"] is not softmax_op.outputs[0]:
        return NoMatch("the softmax does not feed one matmul with the values")
    if any(constant_value(weights_user.inputs[f]) for f in ("transpose_x", "transpose_y")):
        return NoMatch("the weights-by-values matmul transposes an operand")
    if constant_value(scores.inputs["transpose_x"]):
        return NoMatch("the scores matmul transposes q")
    key_labels = HEADS_FIRST if constant_value(scores.inputs["transpose_y"]) else KEY_TRANSPOSED
    output = _output_chain(weights_user)
    if not output:
        return output
    operands = (scores.inputs["x"], scores.inputs["y"], weights_user.inputs["y"])
    return _assemble(operands, key_labels, terms, scale, output, ops + [softmax_op, weights_user])


def match_sdpa(op) -> AttentionSite | NoMatch:
    """iOS18's ``scaled_dot_product_attention(query, key, value, attn_mask)`` on (B, H, S, d)."""
    if rank(op.inputs["query"]) != 4:
        return NoMatch("scaled_dot_product_attention on tensors of rank other than 4")
    mask = op.inputs.get("attn_mask")
    if mask is not None and types.is_bool(mask.dtype):
        return NoMatch("a boolean attn_mask is not rewritten")
    output = _output_chain(op)
    if not output:
        return output
    operands = (op.inputs["query"], op.inputs["key"], op.inputs["value"])
    scale = 1.0 / math.sqrt(op.inputs["query"].shape[-1])
    return _assemble(operands, HEADS_FIRST, [] if mask is None else [mask], scale, output, [op])
