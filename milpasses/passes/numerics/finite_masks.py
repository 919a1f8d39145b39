"""``ane::finite_masks``: mask constants that fp16 would turn into inf become finite."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.base import AnePass, logger, register
from milpasses.passes.shared.matching import NoMatch, is_dead

FP16_MAX = 65504.0
#: Apple's mask value in ml-ane-transformers: exp(-1e4) is 0 in fp16 and fp32 alike, so a
#: masked position contributes exactly nothing to a softmax, and -1e4 plus any score is finite.
DEFAULT_MASK_VALUE = -1e4

#: Ops a mask constant feeds directly.
MASK_CONSUMERS = {"select", "fill", "band_part", "clip"}
#: A floor or ceiling on the scores on their way into a softmax (XGLM clamps its masked scores
#: at float32's min, so that min + min cannot make -inf): bounded at +-65504 like clip's.
SCORE_FLOORS = {"maximum", "minimum"}
#: Ops that carry a mask on its way into a softmax (arithmetic and layout). ``reduce_max`` is the
#: row maximum a softmax's input is shifted by (GPT-OSS subtracts it after concatenating its
#: sinks): a softmax is unchanged by that shift, whatever the masked values are.
MASK_CARRIERS = {"add", "sub", "mul", "select", "cast", "reshape", "transpose", "expand_dims", "squeeze",
                 "tile", "concat", "slice_by_index", "slice_by_size", "reduce_max"}
_SEARCH_DEPTH = 8


@dataclass(frozen=True)
class MaskConstant:
    op: object  # the const op
    value: np.ndarray
    out_of_range: np.ndarray  # boolean mask of the values fp16 cannot hold
    feeds_clip: bool


def _out_of_range(value: np.ndarray) -> np.ndarray:
    return ~np.isfinite(value) | (np.abs(value) > FP16_MAX)


def _reaches_softmax(var, depth: int = 0) -> bool:
    """Every path from ``var`` through mask-carrying ops ends in a softmax."""
    if depth > _SEARCH_DEPTH or not var.child_ops:
        return False
    for op in var.child_ops:
        if op.op_type == "softmax" or is_dead(op):
            continue
        if op.op_type not in MASK_CARRIERS or not all(_reaches_softmax(o, depth + 1) for o in op.outputs):
            return False
    return True


def match_mask_constant(op) -> MaskConstant | NoMatch:
    value = op.outputs[0].val
    if value is None or not np.issubdtype(np.asarray(value).dtype, np.floating):
        return NoMatch("not a float constant")
    value = np.asarray(value)
    if value.size == 0 or -FP16_MAX <= value.min() and value.max() <= FP16_MAX:  # NaN fails both
        return NoMatch("every value fits fp16")
    out_of_range = _out_of_range(value)
    var = op.outputs[0]
    consumers = var.child_ops
    if not consumers:
        return NoMatch("constant is unused")
    for consumer in consumers:
        if consumer.op_type in MASK_CONSUMERS:
            continue
        if consumer.op_type in SCORE_FLOORS and all(_reaches_softmax(o) for o in consumer.outputs):
            continue
        if consumer.op_type in MASK_CARRIERS and all(_reaches_softmax(o) for o in consumer.outputs):
            continue
        return NoMatch("constant beyond fp16 range that is not a mask")
    return MaskConstant(op, value, out_of_range, any(c.op_type in {"clip"} | SCORE_FLOORS for c in consumers))


@register
class finite_masks(AnePass):
    """
    Replace mask and fill constants that fp16 cannot hold (-inf, +inf, float32's min or max,
    anything beyond +-65504) with finite, fp16-safe values.

    Why: the ANE computes in fp16 only. PyTorch masks with ``finfo(float32).min`` or ``-inf``,
    which the fp16 cast turns into ``-inf``; a row whose every position is masked then
    softmaxes to NaN (``-inf - -inf``), and the NaN spreads to valid tokens through the next
    layer's attention. Apple's ANE code masks with -1e4 for this reason.

    .. code-block::

        Given:
            %m = select(cond=%keep, a=0.0, b=-3.4e38)      # every value beyond fp16 range
            %s = softmax(x=add(x=%scores, y=%m), axis=-1)
        Result:
            %m = select(cond=%keep, a=0.0, b=-1e4)
            %s = softmax(x=add(x=%scores, y=%m), axis=-1)

    A masked position adds ``-1e4``, whose exponential is 0 in fp16 and fp32, so every query
    with at least one unmasked key computes exactly what it did. A query whose every key is
    masked (a padded token outside a sliding window) softmaxes its raw scores instead of the
    uniform row PyTorch's finfo.min gives: a padding output, finite, that no valid token reads.

    It fires on a float constant with values beyond the fp16 range when every op reading it is
    a ``select``, ``fill``, ``band_part`` or ``clip``, or carries it (add, sub, mul, layout ops,
    the row maximum) only into a ``softmax``, or is a ``maximum``/``minimum`` bound on scores
    going only into a softmax. Negative values become ``mask_value``, positive ones its
    negation; for ``clip`` bounds and score floors they become +-65504, the fp16 limits, which
    clip nothing an fp16 tensor can hold (and below which a score's exponential is 0).

    Does not fire on other constants beyond the fp16 range (weights, scales): those are
    reported at warning level, never silently clipped.

    Options:

    - ``enabled`` (default true);
    - ``mask_value`` (default -1e4): the finite value that replaces a negative mask value.
    """

    def __init__(self):
        self._mask_value = DEFAULT_MASK_VALUE

    @property
    def mask_value(self) -> float:
        return self._mask_value

    @mask_value.setter
    def mask_value(self, value) -> None:
        number = float(value)
        if not (-FP16_MAX <= number <= -100.0):
            raise ValueError(
                f"option 'mask_value' must lie in [-65504, -100] so that it is finite in fp16 and its "
                f"exponential is 0, got {value!r}"
            )
        self._mask_value = number

    def run(self, block) -> None:
        for op in list(block.operations):
            if op.op_type != "const":
                continue
            site = match_mask_constant(op)
            if site:
                self._rewrite(block, site)
            elif site.reason == "constant beyond fp16 range that is not a mask":
                logger.warning(
                    "%s: constant '%s' has values beyond the fp16 range (|x| > 65504) and feeds %s; "
                    "an fp16 program will hold inf there",
                    self.pass_id, op.name, sorted({c.op_type for c in op.outputs[0].child_ops}),
                )
                self.skip(op.name, site.reason)

    def _rewrite(self, block, site: MaskConstant) -> None:
        limit = FP16_MAX if site.feeds_clip else abs(self.mask_value)
        value = np.where(site.out_of_range, np.where(site.value < 0, -limit, limit), site.value).astype(site.value.dtype)
        old = site.op.outputs[0]
        with mb.set_before_op(before_op=site.op):
            new = mb.const(val=value, name=f"{site.op.name}_finite")
        block.replace_uses_of_var_after_op(anchor_op=site.op, old_var=old, new_var=new)
        block.remove_ops([site.op])
        self.report.rewritten["mask constant"] += 1
