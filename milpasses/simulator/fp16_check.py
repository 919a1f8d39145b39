"""Screen a program for fp16 trouble: the ops where inf or NaN first appear, or precision is lost.

The program is simulated twice on the same inputs: as the device runs it (fp16 storage) and
as the same program with float32 storage. Each finding is the op where a problem starts (its
inputs were clean), named with the milpasses pass that fixes it, where one does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.simulator import Simulator, is_decompression, load_program, psnr

DEFAULT_MIN_PSNR_DB = 40.0
NO_PASS = "none in milpasses: keep this op in fp32 (coremltools' FP16ComputePrecision op_selector)"
RECOMPRESS = ("recompress this weight so it decompresses inside fp16's range (its scales or lookup table "
              "exceed 65504), or leave it uncompressed")


@dataclass(frozen=True)
class Finding:
    op: str
    op_type: str
    kind: str  # "nan", "inf" (from a constant), "overflow" or "precision"
    detail: str
    fix: str

    def __str__(self) -> str:
        return f"{self.kind} at {self.op_type} '{self.op}': {self.detail}; fix: {self.fix}"


def _fix_for(op, kind: str, constant) -> str:
    if is_decompression(op):
        return RECOMPRESS
    constants = [value for value in map(constant, op.get_flattened_inputs()) if value is not None]
    has_unsafe_constant = any(
        np.issubdtype(np.asarray(c).dtype, np.floating) and not np.isfinite(np.asarray(c, dtype=np.float16)).all()
        for c in constants
    )
    if op.op_type == "softmax" or has_unsafe_constant:
        return "ane::finite_masks"
    if kind == "overflow" and op.op_type in ("pow", "mul", "square") and _feeds_mean(op):
        return "ane::rms_norm_scale"
    return NO_PASS


def _feeds_mean(op) -> bool:
    return any(child.op_type == "reduce_mean" for out in op.outputs for child in out.child_ops)


def sample_inputs(model, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for a program with static input shapes: N(0, 1) floats, ones for an
    ``attention_mask``, and small integers (token ids) for other integer inputs."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, var in load_program(model).functions["main"].inputs.items():
        shape = tuple(int(d) for d in var.shape)
        dtype = types.nptype_from_builtin(var.dtype)
        if np.issubdtype(dtype, np.floating):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif name == "attention_mask":
            inputs[name] = np.ones(shape, dtype)
        else:
            inputs[name] = rng.integers(0, 100, shape).astype(dtype)
    return inputs


def check_fp16(model, inputs: dict[str, np.ndarray] | None = None,
               min_psnr_db: float = DEFAULT_MIN_PSNR_DB, numerics="storage") -> list[Finding]:
    """Findings for ``model`` (a Program, MLModel or .mlpackage path) on ``inputs`` (sample
    inputs when None), in program order. ``numerics="device"`` simulates the device run in the
    simulator's device numerics, where an op whose value overflows fp16 inside it (a reduction's
    sum, a norm's squares, a matmul past the Neural Engine's limit) is an overflow finding."""
    program = load_program(model)
    inputs = sample_inputs(program) if inputs is None else inputs
    observed: dict[str, tuple] = {}

    def record(slot):
        def observer(op, outputs):
            for var, value in zip(op.outputs, outputs):
                if np.issubdtype(value.dtype, np.floating):
                    observed.setdefault(var.name, [None, None])[slot] = value
        return observer

    device = Simulator(program, numerics=numerics)
    device.run(inputs, record(0))
    internal = {}
    for overflow in device.overflows:
        internal.setdefault(overflow.op, overflow)

    def constant(var):
        """A constant input's value as the device holds it, a compressed weight decompressed."""
        value = device.constant(var)
        return var.val if value is None else value

    Simulator(program, emulate_fp16=False).run(inputs, record(1))
    quality = {name: _quality(device, reference) for name, (device, reference) in observed.items()}

    findings = []
    for op in program.functions["main"].operations:
        for var in op.outputs:
            if var.name not in quality:
                continue
            upstream = [quality[v.name] for v in op.get_flattened_inputs() if v.name in quality]
            finding = _finding(op, quality[var.name], upstream, min_psnr_db, constant, internal.get(op.name))
            if finding is not None:
                findings.append(finding)
    return findings


def _quality(device: np.ndarray, reference: np.ndarray) -> dict:
    reference_finite = np.isfinite(reference)
    return {
        "nan": bool(np.isnan(device).any()),
        "inf": bool(np.isinf(device).any()),
        "reference_finite": bool(reference_finite.all()),
        "psnr": psnr(reference, device) if reference_finite.all() else float("nan"),
        "max_abs": float(np.max(np.abs(reference[reference_finite]), initial=0.0)),
    }


def _finding(op, quality: dict, upstream: list[dict], min_psnr_db: float, constant,
             internal_overflow) -> Finding | None:
    if internal_overflow is not None and not any(q["inf"] or q["nan"] for q in upstream):
        detail = (f"overflows inside the op: its {internal_overflow.step} reaches {internal_overflow.peak:.4g}, "
                  f"past {internal_overflow.limit:.6g}")
        return Finding(op.name, op.op_type, "overflow", detail, _fix_for(op, "overflow", constant))
    if quality["nan"] and not any(q["nan"] for q in upstream):
        return Finding(op.name, op.op_type, "nan", "NaN first appears here", _fix_for(op, "nan", constant))
    if quality["inf"] and not any(q["inf"] or q["nan"] for q in upstream):
        if quality["reference_finite"]:
            detail = (f"overflows fp16: the fp32-storage run peaks at {quality['max_abs']:.4g}, "
                      f"fp16 holds at most 65504")
            return Finding(op.name, op.op_type, "overflow", detail, _fix_for(op, "overflow", constant))
        return Finding(op.name, op.op_type, "inf", "inf first appears here, from an infinite constant",
                       _fix_for(op, "inf", constant))
    clean_inputs = all(q["psnr"] >= min_psnr_db for q in upstream)
    if quality["psnr"] < min_psnr_db and clean_inputs and not (quality["nan"] or quality["inf"]):
        return Finding(op.name, op.op_type, "precision",
                       f"PSNR {quality['psnr']:.1f} dB against the fp32-storage run (below {min_psnr_db} dB)",
                       _fix_for(op, "precision", constant))
    return None
