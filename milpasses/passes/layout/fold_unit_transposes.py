"""``ane::fold_unit_transposes``: a transpose that only moves size-1 axes joins the reshape
that made its input, through the elementwise ops between them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared.matching import (
    BINARY,
    LOGICAL,
    UNARY,
    RELABELLING,
    NoMatch,
    constant_value,
    has_static_shape,
    is_block_output,
    single_consumer,
)

#: Ops that compute each element from the same element of their operands, so that with one
#: activation operand (the others constants) they commute with any relabelling of axes.
ELEMENTWISE = UNARY | BINARY | LOGICAL | {"cast", "select"}


@dataclass(frozen=True)
class UnitTranspose:
    transpose: object
    reshape: object  # the first of the reshapes (expand_dims, squeezes) the chain starts from
    chain: tuple  # elementwise ops from the reshape's output to the transpose's input, in order


def _moves_only_unit_axes(transpose) -> bool:
    """The transpose keeps the order of the axes longer than 1: it is a reshape."""
    shape = transpose.inputs["x"].shape
    perm = [int(p) for p in constant_value(transpose.inputs["perm"])]
    kept = [axis for axis in perm if shape[axis] != 1]
    return kept == sorted(kept)


def _activation_operand(op):
    """The one operand of an elementwise ``op`` that is not a constant, or None."""
    activations = [v for v in op.inputs.values() if isinstance(v, (list, tuple)) or constant_value(v) is None]
    return activations[0] if len(activations) == 1 and not isinstance(activations[0], (list, tuple)) else None


def _relabelled_constant(value, perm: list):
    """A constant operand transposed like the chain it is read by (after broadcasting its
    rank up), so that it still meets each element where it did."""
    value = np.asarray(value)
    if value.ndim == 0:
        return None
    return np.transpose(value.reshape((1,) * (len(perm) - value.ndim) + value.shape), perm)


def match_unit_transpose(transpose) -> UnitTranspose | NoMatch | None:
    """The site, why it cannot be folded, or None for a transpose that really moves data (no
    candidate at all: K's transposes and the region's boundaries are not reported)."""
    x = transpose.inputs["x"]
    if not has_static_shape(x) or not _moves_only_unit_axes(transpose):
        return None
    chain, var = [], x
    while var.op is not None and var.op.op_type in ELEMENTWISE:
        operand = _activation_operand(var.op)
        if operand is None:
            return NoMatch(f"'{var.op.op_type}' reads more than one tensor")
        if var.rank != x.rank or any(np.ndim(constant_value(v)) > x.rank for v in var.op.inputs.values()
                                     if constant_value(v) is not None):
            return NoMatch(f"'{var.op.op_type}' changes the rank")
        if single_consumer(var) is None:
            return NoMatch(f"'{var.name}' has other readers")
        chain.insert(0, var.op)
        var = operand
    if var.op is None or var.op.op_type not in RELABELLING:
        return NoMatch("no reshape above the transpose")
    if single_consumer(var) is None or is_block_output(var):
        return NoMatch(f"'{var.name}' has other readers")
    top = var.op
    while (above := top.inputs["x"].op) is not None and above.op_type in RELABELLING and single_consumer(above.outputs[0]):
        top = above
    return UnitTranspose(transpose, top, tuple(chain))


@register
class fold_unit_transposes(AnePass):
    """
    Fold a ``transpose`` that only moves size-1 axes into the ``reshape`` (or ``expand_dims``,
    ``squeeze``) its input comes from, through the elementwise ops between them: one layout op
    instead of two.

    Why: every layout op is a memory copy on the ANE (Apple's principle 3). Such a transpose
    keeps the order of the elements, so it is a reshape; elementwise ops do not care about the
    shape they run on, so the chain can run on the already-relabelled tensor. It appears where
    ``ane::attention_to_einsum`` turns a key-only padding mask keys-first, whether the mask was
    shaped by a reshape (BERT's) or by ``unsqueeze`` (a decode step's mask built from the position).

    .. code-block::

        Given:
            %r = reshape(x=%mask, shape=[2, 1, 1, 8])                  # %mask: (2, 8)
            %m = select(cond=cast(x=%r, dtype="bool"), a=0.0, b=-1e4)
            %k = transpose(x=%m, perm=[0, 3, 1, 2])                    # (2, 8, 1, 1)
        Result:
            %r = reshape(x=%mask, shape=[2, 8, 1, 1])
            %k = select(cond=cast(x=%r, dtype="bool"), a=0.0, b=-1e4)

    Constants the chain reads are transposed with it at compile time.

    Does not fire when: the transpose moves an axis longer than 1 or its input's shape is not
    known; no reshape, expand_dims or squeeze is above it; an op between that op and the
    transpose is not elementwise, reads another tensor than the chain, or changes the rank;
    the reshape's output or any value in the chain
    has other readers.

    Options:

    - ``enabled`` (default true).
    """

    def run(self, block) -> None:
        self.rewrite_each(block, ("transpose",), match_unit_transpose, self._rewrite)

    def _rewrite(self, block, site: UnitTranspose) -> None:
        out = site.transpose.outputs[0]
        perm = [int(p) for p in constant_value(site.transpose.inputs["perm"])]
        with mb.set_before_op(before_op=site.transpose):
            var = mb.reshape(x=site.reshape.inputs["x"], shape=list(out.shape), name=f"{site.reshape.name}_relabelled")
            for op in site.chain:
                arguments = {}
                for name, value in op.inputs.items():
                    constant = constant_value(value)
                    relabelled = None if constant is None else _relabelled_constant(constant, perm)
                    arguments[name] = var if constant is None else value if relabelled is None else relabelled
                var = getattr(mb, op.op_type)(**arguments, name=f"{op.name}_relabelled")
        block.replace_uses_of_var_after_op(anchor_op=site.transpose, old_var=out, new_var=var)
        self.remove_dead(block, [site.transpose])
        self.report.rewritten["transpose folded into a reshape"] += 1
