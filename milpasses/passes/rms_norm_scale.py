"""``ane::rms_norm_scale``: RMSNorm squares scaled-down activations, so fp16 never overflows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from milpasses.passes.base import AnePass, parse_bool, register
from milpasses.passes.matching import NoMatch, constant_value, single_consumer

#: The smallest positive fp16 value. In an fp16 program the rescaled epsilon is kept at least
#: this large, as coremltools' fp16 cast itself does for scalars that would underflow to 0, so
#: that a row of zeros still divides by a finite number.
FP16_TINY = float(np.float16(2.0**-24))


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
    Scale the activation down by a constant power of two before an RMSNorm squares it, with
    the epsilon and the resulting factor scaled to match, so that ``x ** 2`` stays within fp16.

    Why: fp16's largest value is 65504, so ``x * x`` overflows to inf once ``|x| > 256``,
    which a residual stream reaches in real models (T5, Llama, Qwen, Gemma). Dividing by
    ``s`` before squaring is exact for a power of two, and RMSNorm is invariant to it:
    ``x * rsqrt(mean((x/s)**2) + eps/s**2) / s == x * rsqrt(mean(x**2) + eps)``. It costs two
    elementwise multiplies per norm, which the ANE runs fused with its neighbours; a
    data-dependent scale (max|x|, as coremltools' own RMSNorm lowering does) would add a
    reduction per norm instead.

    .. code-block::

        Given:
            %sq = pow(x=%x, y=2.0)
            %ms = reduce_mean(x=%sq, axes=[-1], keep_dims=True)
            %r  = rsqrt(x=add(x=%ms, y=1e-6))
            %y  = mul(x=%x, y=%r)
        Result:
            %xs = mul(x=%x, y=0.25)                        # 1/s, s = 4
            %sq = pow(x=%xs, y=2.0)
            %ms = reduce_mean(x=%sq, axes=[-1], keep_dims=True)
            %r  = rsqrt(x=add(x=%ms, y=6.25e-8))          # eps / s**2
            %y  = mul(x=%x, y=mul(x=%r, y=0.25))          # the factor s * r, times 1/s

    With ``s = 4`` the square stays finite for ``|x| < 1024``. A larger ``s`` reaches further but
    costs accuracy: squares of small activations fall into fp16's subnormals (measured on the
    fixtures: s=16 costs T5 7.7 dB and Qwen2 1.7 dB; s=4 costs nothing). In fp16 the scaled epsilon is
    kept at least 2**-24, the smallest fp16 value (coremltools' fp16 cast does the same for
    the fp32 programs this pass usually sees), so that a row of zeros still gives zeros rather
    than ``0 * inf``.

    Does not fire when: the power is not a constant 2; the square has other readers or is
    not averaged with ``keep_dims``; the epsilon is not a scalar constant; the rsqrt does not
    multiply the same activation that was squared, or any link has several readers.

    Options:

    - ``enabled`` (default true);
    - ``scale`` (default 4): ``s``, a power of two from 2 to 2**10.
    """

    def __init__(self):
        self._enabled = True
        self._scale = 4.0

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value) -> None:
        self._enabled = parse_bool(value, "enabled")

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value) -> None:
        number = float(value)
        if number not in [2.0**k for k in range(1, 11)]:
            raise ValueError(f"option 'scale' must be a power of two from 2 to 1024, got {value!r}")
        self._scale = number

    def run(self, block) -> None:
        if not self.enabled:
            return
        for op in list(block.operations):
            if op.op_type != "pow" or op.enclosing_block is None:
                continue
            chain = match_rms_norm(op)
            if not chain:
                self.skip(op.name, chain.reason)
                continue
            self._rewrite(block, chain)

    def _rewrite(self, block, chain: RmsNormChain) -> None:
        is_fp16 = types.builtin_to_string(chain.x.dtype) == "fp16"
        dtype = np.float16 if is_fp16 else np.float32
        eps = max(chain.eps / self.scale**2, FP16_TINY) if is_fp16 else chain.eps / self.scale**2
        with mb.set_before_op(before_op=chain.power):
            scaled = mb.mul(x=chain.x, y=dtype(1.0 / self.scale), name=f"{chain.power.name}_scaled_input")
            square = mb.pow(x=scaled, y=dtype(2.0), name=f"{chain.power.name}_scaled")
        block.replace_uses_of_var_after_op(anchor_op=chain.power, old_var=chain.power.outputs[0], new_var=square)
        with mb.set_before_op(before_op=chain.add_eps):
            shifted = mb.add(x=chain.mean.outputs[0], y=dtype(eps), name=f"{chain.add_eps.name}_scaled")
        block.replace_uses_of_var_after_op(anchor_op=chain.add_eps, old_var=chain.add_eps.outputs[0], new_var=shifted)
        with mb.set_before_op(before_op=chain.scale_mul):
            # rsqrt now returns s times the original factor: fold 1/s into that factor rather
            # than multiply the scaled input, whose small values would lose bits as subnormals.
            factor = mb.mul(x=chain.rsqrt.outputs[0], y=dtype(1.0 / self.scale), name=f"{chain.rsqrt.name}_unscaled")
            normed = mb.mul(x=chain.x, y=factor, name=f"{chain.scale_mul.name}_scaled")
        block.replace_uses_of_var_after_op(
            anchor_op=chain.scale_mul, old_var=chain.scale_mul.outputs[0], new_var=normed
        )
        self.remove_ops_and_their_constants(block, [chain.scale_mul, chain.add_eps, chain.power])
        self.report.rewritten["rms_norm"] += 1
