"""fp16 arithmetic as the Neural Engine does it, for the simulator's ``numerics="device"``.

Storage numerics round each fp16 op's output only; device numerics also round every value an fp16
op computes on the way (products, partial sums, softmax and norm steps) and apply the Neural
Engine's own limits. What the model assumes, and its public sources:

* Matmul, linear, conv and einsum round each product to fp16 and add the products in a wide
  (fp32-class) accumulator: ANEForge's measurements (docs/developer/numerics.md in
  github.com/sbryngelson/ANEForge) find a dot of 16384 ones bit-exact, where an fp16 running sum
  stalls at 2048, and name the rounding of products, not the running sum, as where precision goes.
* Their output becomes +-inf past 32752 (fp16_max / 2), whatever the contraction length:
  ANEForge issue #115 and docs/numeric-cliffs.md, measured on M2 Pro and M5. The device does not
  clamp there: a finite result turns infinite.
* Reductions (reduce_*, softmax's sum, a norm's mean and variance) add in fp16, one element at a
  time along the reduced axes: the same ANEForge page finds reduce_sum "accumulates narrow (fp16)",
  unlike matmul. The order of the device's additions is not public; a running sum is the
  pessimistic order.
* Subnormal fp16 values are flushed to zero: ANEForge pull request #263 measures sqrt(0 + eps)
  as 0 on the device for every eps below fp16's smallest normal, 6.1e-5.

Each choice is a field of :class:`DeviceNumerics`, so a measurement on hardware can replace it.
Transcendentals (exp, rsqrt, erf) are modelled as correctly rounded: the device's own
approximations are not public.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

FP16_MAX = 65504.0
FP16_SMALLEST_NORMAL = 2.0 ** -14
ANE_MATMUL_OUTPUT_LIMIT = 32752.0
# A product chunk holds at most this many elements (output elements x contraction chunk).
_PRODUCT_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class DeviceNumerics:
    """What ``numerics="device"`` assumes of the Neural Engine (see the module docstring).

    ``matmul_accumulator``: "fp32" (wide, the default) or "fp16" (each partial sum rounded) for
    matmul, linear, conv and einsum. ``reduction_accumulator``: "fp16" (the default) or "fp32"
    for reductions, softmax and norms. ``matmul_output_limit``: the magnitude past which a
    matmul-class output becomes inf. ``flush_subnormals``: fp16 subnormals read as zero.
    """

    matmul_accumulator: str = "fp32"
    reduction_accumulator: str = "fp16"
    matmul_output_limit: float = ANE_MATMUL_OUTPUT_LIMIT
    flush_subnormals: bool = True

    def __post_init__(self):
        for name in ("matmul_accumulator", "reduction_accumulator"):
            if getattr(self, name) not in ("fp16", "fp32"):
                raise ValueError(f"{name} must be 'fp16' or 'fp32', not {getattr(self, name)!r}")


@dataclass(frozen=True)
class InternalOverflow:
    """A step inside one op whose fp16 value overflowed to inf from finite operands."""

    op: str
    op_type: str
    step: str
    peak: float  # the largest finite magnitude the step computed before rounding (inf: past a limit)
    limit: float = FP16_MAX

    def __str__(self) -> str:
        return (f"{self.op_type} '{self.op}' overflows fp16 inside the op at its {self.step} "
                f"(peak {self.peak:.4g}, limit {self.limit:.6g})")


@dataclass
class Fp16Arithmetic:
    """fp16 steps on float32 torch tensors that hold fp16 values; records each step that overflows."""

    numerics: DeviceNumerics
    overflowed: list = field(default_factory=list)  # (step, peak, limit)

    def flush(self, rounded: torch.Tensor) -> torch.Tensor:
        if not self.numerics.flush_subnormals:
            return rounded
        return torch.where(rounded.abs() < FP16_SMALLEST_NORMAL, torch.zeros((), dtype=rounded.dtype), rounded)

    def round(self, value: torch.Tensor, step: str) -> torch.Tensor:
        """``value`` rounded to fp16; a finite value that becomes inf is recorded as ``step``."""
        rounded = self.flush(value.to(torch.float16).to(torch.float32))
        if not bool(torch.isinf(rounded).any()):
            return rounded
        overflow = torch.isinf(rounded) & torch.isfinite(value)
        if bool(overflow.any()):
            self.overflowed.append((step, float(value[overflow].abs().max()), FP16_MAX))
        return rounded

    def saturate(self, value: torch.Tensor, step: str) -> torch.Tensor:
        """A matmul-class output: rounded to fp16, inf past the Neural Engine's output limit."""
        rounded = self.round(value, step)
        limit = self.numerics.matmul_output_limit
        past = torch.isfinite(rounded) & (rounded.abs() > limit)
        if bool(past.any()):
            self.overflowed.append((step, float(rounded[past].abs().max()), limit))
            rounded = torch.where(past, torch.sign(rounded) * torch.inf, rounded)
        return rounded

    def reduce(self, x: torch.Tensor, dims: tuple, keepdim: bool, step: str, combine=torch.add) -> torch.Tensor:
        """``x`` combined along ``dims`` (a sum unless ``combine`` says otherwise), accumulated as
        ``reduction_accumulator`` says: an fp16 running value, or fp32 rounded once at the end."""
        dims = tuple(d % x.ndim for d in dims)
        flat = x.movedim(dims, tuple(range(len(dims)))).reshape(-1, *_kept_shape(x, dims))
        if self.numerics.reduction_accumulator == "fp32":
            total = flat.sum(0) if combine is torch.add else flat.prod(0)
            return self.round(_restore(total, x, dims, keepdim), step)
        total = flat[0]
        for row in flat[1:]:
            total = self.round(combine(total, row), step)
        return _restore(total, x, dims, keepdim)

    def contract(self, terms, equation: str, bias: torch.Tensor | None, step: str) -> torch.Tensor:
        """The sum over ``terms`` of ``einsum(equation, a, b)``, each product rounded to fp16 and
        added in ``matmul_accumulator``; ``bias`` joins the accumulator; the output saturates."""
        inputs, output = equation.replace(" ", "").split("->")
        left, right = inputs.split(",")
        contracted = "".join(sorted(set(left + right) - set(output) - {"."}))
        leading = contracted[0]
        products = f"{left},{right}->{output}{contracted}"
        wide = self.numerics.matmul_accumulator == "fp32"
        total = None
        for a, b in terms:
            length = a.shape[_axis(left, leading, a.ndim)]
            out_size = torch.einsum(equation, a.narrow(_axis(left, leading, a.ndim), 0, 1),
                                    b.narrow(_axis(right, leading, b.ndim), 0, 1)).numel()
            chunk = max(1, _PRODUCT_CHUNK_ELEMENTS // max(out_size, 1))
            for start in range(0, length, chunk):
                size = min(chunk, length - start)
                product = torch.einsum(products, a.narrow(_axis(left, leading, a.ndim), start, size),
                                       b.narrow(_axis(right, leading, b.ndim), start, size))
                product = self.round(product, "products")
                steps = product.reshape(*product.shape[: product.ndim - len(contracted)], -1)
                if wide:
                    partial = steps.sum(-1)
                    total = partial if total is None else total + partial
                    continue
                for index in range(steps.shape[-1]):
                    total = steps[..., index] if total is None else self.round(total + steps[..., index], "partial sums")
        if bias is not None:
            total = total + bias if wide else self.round(total + bias, "partial sums")
        return self.saturate(total, step)


def _axis(subscripts: str, letter: str, rank: int) -> int:
    """The axis of ``letter`` in an operand's einsum subscripts, "..." standing for the rest."""
    if "..." not in subscripts:
        return subscripts.index(letter)
    before, after = subscripts.split("...")
    if letter in before:
        return before.index(letter)
    return rank - len(after) + after.index(letter)


def _kept_shape(x: torch.Tensor, dims: tuple) -> list:
    return [size for axis, size in enumerate(x.shape) if axis not in dims]


def _restore(total: torch.Tensor, x: torch.Tensor, dims: tuple, keepdim: bool) -> torch.Tensor:
    if not keepdim:
        return total
    return total.reshape([1 if axis in dims else size for axis, size in enumerate(x.shape)])
