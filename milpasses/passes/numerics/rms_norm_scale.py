"""``ane::rms_norm_scale``: RMSNorm squares activations scaled to at most 1, so fp16 never overflows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from milpasses.passes.base import AnePass, register
from milpasses.passes.shared.matching import NoMatch, constant_value, single_consumer

@dataclass(frozen=True)
class RmsNormChain:
    """``x * rsqrt(reduce_mean(x ** 2) + eps)`` as the torch frontend emits it."""

    x: object
    power: object
    mean: object
    add_eps: object
    eps: float
    rsqrt: object
    scale_mul: object  # mul(x, rsqrt(...)) in either operand order


def _other_operand(op, var):
    x, y = op.inputs["x"], op.inputs["y"]
    return y if x is var else x if y is var else None


def match_rms_norm(power) -> RmsNormChain | NoMatch:
    if power.op_type != "pow" or constant_value(power.inputs["y"]) is None:
        return NoMatch("not a square")
    if float(np.asarray(constant_value(power.inputs["y"]))) != 2.0:
        return NoMatch("power other than 2")
    x = power.inputs["x"]
    mean = single_consumer(power.outputs[0])
    if mean is None or mean.op_type != "reduce_mean" or not constant_value(mean.inputs.get("keep_dims")):
        return NoMatch("square not averaged with keep_dims")
    add_eps = single_consumer(mean.outputs[0])
    eps = None if add_eps is None or add_eps.op_type != "add" else constant_value(_other_operand(add_eps, mean.outputs[0]))
    if eps is None or np.size(eps) != 1:
        return NoMatch("mean not followed by a constant epsilon")
    rsqrt = single_consumer(add_eps.outputs[0])
    if rsqrt is None or rsqrt.op_type != "rsqrt":
        return NoMatch("no rsqrt of the variance")
    scale_mul = single_consumer(rsqrt.outputs[0])
    if scale_mul is None or scale_mul.op_type != "mul" or _other_operand(scale_mul, rsqrt.outputs[0]) is not x:
        return NoMatch("rsqrt does not scale the same activation")
    return RmsNormChain(x, power, mean, add_eps, float(np.asarray(eps)), rsqrt, scale_mul)


@register
class rms_norm_scale(AnePass):
    """
    Divide the activation by its own largest magnitude (when that exceeds 1) before an RMSNorm
    squares it, with the epsilon and the resulting factor scaled to match, so that ``x ** 2``
    never leaves fp16's range.

    Why: fp16's largest value is 65504, so ``x * x`` overflows to inf once ``|x| > 256``, which
    residual streams reach in real models (T5, Llama, Qwen, Gemma); the mean square is then
    inf, its rsqrt 0, and the norm outputs zeros. RMSNorm is invariant to the scale:
    ``x * rsqrt(mean((x/m)**2) + eps/m**2) / m == x * rsqrt(mean(x**2) + eps)``. With
    ``m = max(max|x|, 1)`` every scaled square is at most 1, and activations already below 1
    are left as they are. A constant ``m`` would be cheaper but has no right value: one large
    enough for big activations pushes the squares of small ones into fp16's subnormals
    (measured: dividing by 16 costs the T5 fixture 7.7 dB). The cost is one channel
    reduction and a few elementwise ops per norm, the same lowering coremltools uses for its
    own RMSNorm op; elementwise ops run on the ANE next to the norm's own reduction.

    .. code-block::

        Given:
            %ms = reduce_mean(x=pow(x=%x, y=2.0), axes=[-1], keep_dims=True)
            %r  = rsqrt(x=add(x=%ms, y=1e-6))
            %y  = mul(x=%x, y=%r)
        Result:
            %m  = maximum(x=reduce_max(x=abs(x=%x), axes=[-1], keep_dims=True), y=1.0)
            %i  = real_div(x=1.0, y=%m)
            %ms = reduce_mean(x=pow(x=mul(x=%x, y=%i), y=2.0), axes=[-1], keep_dims=True)
            %r  = rsqrt(x=add(x=%ms, y=mul(x=mul(x=%i, y=%i), y=1e-6)))
            %y  = mul(x=%x, y=mul(x=%r, y=%i))

    Does not fire when: the power is not a constant 2; the square has other readers or is
    not averaged with ``keep_dims``; the epsilon is not a scalar constant; the rsqrt does not
    multiply the same activation that was squared, or any link has several readers.

    Options:

    - ``enabled`` (default true).
    """

    def run(self, block) -> None:
        self.rewrite_each(block, ("pow",), match_rms_norm, self._rewrite)

    def _rewrite(self, block, chain: RmsNormChain) -> None:
        dtype = np.float16 if types.builtin_to_string(chain.x.dtype) == "fp16" else np.float32
        name = chain.power.name
        axes = [int(a) for a in constant_value(chain.mean.inputs["axes"])]
        with mb.set_before_op(before_op=chain.power):
            peak = mb.reduce_max(x=mb.abs(x=chain.x, name=f"{name}_abs"), axes=axes, keep_dims=True,
                                 name=f"{name}_peak")
            inverse = mb.real_div(x=dtype(1.0), y=mb.maximum(x=peak, y=dtype(1.0), name=f"{name}_divisor"),
                                  name=f"{name}_inverse")
            scaled = mb.mul(x=chain.x, y=inverse, name=f"{name}_scaled_input")
            square = mb.pow(x=scaled, y=dtype(2.0), name=f"{name}_scaled")
        block.replace_uses_of_var_after_op(anchor_op=chain.power, old_var=chain.power.outputs[0], new_var=square)
        with mb.set_before_op(before_op=chain.add_eps):
            eps = mb.mul(x=mb.mul(x=inverse, y=inverse, name=f"{name}_inverse_squared"), y=dtype(chain.eps),
                         name=f"{name}_eps")
            shifted = mb.add(x=chain.mean.outputs[0], y=eps, name=f"{chain.add_eps.name}_scaled")
        block.replace_uses_of_var_after_op(anchor_op=chain.add_eps, old_var=chain.add_eps.outputs[0], new_var=shifted)
        with mb.set_before_op(before_op=chain.scale_mul):
            factor = mb.mul(x=chain.rsqrt.outputs[0], y=inverse, name=f"{chain.rsqrt.name}_unscaled")
            normed = mb.mul(x=chain.x, y=factor, name=f"{chain.scale_mul.name}_scaled")
        block.replace_uses_of_var_after_op(
            anchor_op=chain.scale_mul, old_var=chain.scale_mul.outputs[0], new_var=normed
        )
        self.remove_dead(block, [chain.scale_mul, chain.add_eps, chain.power])
        self.report.rewritten["rms_norm"] += 1
