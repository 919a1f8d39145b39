"""Matching helpers shared by the passes. Nothing here mutates a program."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import types


#: Op families, by how their outputs relate to their inputs.
#: Elementwise ops of one tensor (their other inputs are parameters).
UNARY = frozenset({"gelu", "silu", "relu", "relu6", "sigmoid", "tanh", "erf", "rsqrt", "sqrt", "exp", "square",
                   "abs", "inverse", "clip", "softsign", "leaky_relu", "elu", "softplus", "identity"})
#: Elementwise arithmetic of two broadcast tensors.
BINARY = frozenset({"add", "sub", "mul", "real_div", "maximum", "minimum", "pow"})
#: Elementwise logic and comparisons (bool results or operands).
LOGICAL = frozenset({"logical_and", "logical_or", "logical_xor", "logical_not",
                     "equal", "not_equal", "less", "less_equal", "greater", "greater_equal"})
#: Reductions over given axes.
#: Ops that only relabel their input's shape, keeping the order of its elements.
RELABELLING = frozenset({"reshape", "expand_dims", "squeeze"})
REDUCTIONS = frozenset({"reduce_mean", "reduce_sum", "reduce_max", "reduce_min", "reduce_sum_square",
                        "reduce_l2_norm"})


@dataclass(frozen=True)
class NoMatch:
    """Why a site was left alone. Falsy, so ``if not match:`` reads naturally."""

    reason: str

    def __bool__(self) -> bool:
        return False


def is_dead(op) -> bool:
    """Nothing reads ``op``'s outputs (DEFAULT's dead-code elimination runs after the ``ane::``
    passes, so dead ops are still there: torch's ``max`` leaves an unused argmax beside the
    values). A dead reader cannot observe a rewrite."""
    return all(not o.child_ops and o not in op.enclosing_block.outputs for o in op.outputs)


def constant_value(var) -> np.ndarray | None:
    """The value of a var that is known at compile time, else None."""
    return None if var is None else var.val


def scalar_value(var) -> float | None:
    """The value of a compile-time constant holding one element, else None."""
    value = constant_value(var)
    return float(np.asarray(value).reshape(())) if value is not None and np.size(value) == 1 else None


def is_activation(var) -> bool:
    return var is not None and var.val is None


def is_float_tensor(var) -> bool:
    return types.is_tensor(var.sym_type) and types.is_float(var.dtype)


def rank(var) -> int:
    return len(var.shape) if types.is_tensor(var.sym_type) else 0


def has_static_shape(var) -> bool:
    return all(is_static(d) for d in var.shape)


def is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer))


def same_length(a, b) -> bool:
    """Two dims that are equal, or both symbolic (flexible shapes give every op its own
    symbol; the ops between them are what proves they agree)."""
    return a == b if is_static(a) and is_static(b) else not (is_static(a) or is_static(b))


def single_consumer(var):
    """The one op that reads ``var``, or None when there are several or it is a block output."""
    children = var.child_ops
    if len(children) != 1 or is_block_output(var):
        return None
    return children[0]


def is_block_output(var) -> bool:
    block = var.op.enclosing_block if var.op is not None else None
    return block is not None and var in block.outputs


def op_with(var, op_type: str, **constant_inputs):
    """The op producing ``var`` if it is an ``op_type`` whose named inputs hold these constants."""
    op = var.op if var is not None else None
    if op is None or op.op_type != op_type:
        return None
    for name, expected in constant_inputs.items():
        value = constant_value(op.inputs.get(name))
        if value is None or np.asarray(value).tolist() != expected:
            return None
    return op


def as_list(value) -> list:
    """An op input as a list of vars: a tuple input (concat's values) as it is, one var alone."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def relabels_below(var) -> list:
    """The reshape-like ops that read ``var`` one after another, each the only reader of the
    one before (``expand_dims`` into ``reshape``...): what one reshape of ``var`` can replace."""
    chain = []
    while (reader := single_consumer(var)) is not None and reader.op_type in RELABELLING:
        chain.append(reader)
        var = reader.outputs[0]
    return chain
