"""The per-pass translation check: a pass's result must compute what its input computed.

With ``check=True`` every ``ane::`` pass simulates the program before and after it rewrites, on
the same seeded inputs, and stops the conversion with :class:`TranslationError` (naming the
pass, what it rewrote, and the error) when the two differ. This is translation validation in the
manner of Alive2, one program at a time: it proves nothing about other inputs, but a rewrite that
changes the numbers is caught on the pass that made it, not at the end of the pipeline.

The program is still fp32 when the ``ane::`` passes run (the fp16 cast comes later), so the bar
is tight. Inputs are drawn to be meaningful: an integer input read as indices by a ``gather``
(token ids) takes values inside the table it indexes, an input named like a mask is a padding
mask (the first row whole, each later row shorter, never empty), other integer inputs are 0 or 1
and float inputs are standard normal.

The ``ane::`` passes run one after another, so a pass usually starts from the program the previous
one's check has just simulated: its "before" is taken from that simulation when the program's
fingerprint (every op, its wiring, output types and constant values) is unchanged.
"""

from __future__ import annotations

import math
import weakref
import zlib

import numpy as np
from coremltools.converters.mil.mil import types

SEED = 0
#: Largest output difference a pass may make, relative to the output's largest magnitude: float32
#: reassociation (einsum per head, a reordered sum) stays near 1e-6.
MAX_RELATIVE_ERROR = 1e-4


class TranslationError(RuntimeError):
    """A pass changed what the program computes."""


def _concrete_shape(var) -> tuple[int, ...]:
    shape = tuple(var.shape)
    if any(not isinstance(d, (int, np.integer)) for d in shape):
        raise TranslationError(
            f"the per-pass check needs fixed input shapes; input '{var.name}' has shape {shape} "
            f"(convert at one sequence length to check the passes)")
    return tuple(int(d) for d in shape)


def _index_bound(var) -> int | None:
    """The size of the table a ``gather`` reads with ``var`` as indices, if one does."""
    for op in var.child_ops:
        if op.op_type == "gather" and op.inputs.get("indices") is var and op.x.shape:
            axis = int(op.axis.val) if op.axis is not None and op.axis.val is not None else 0
            size = op.x.shape[axis]
            if isinstance(size, (int, np.integer)):
                return int(size)
    return None


def padding_mask(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A (B, S) padding mask: row 0 whole, each later row shorter (row b keeps S >> b tokens,
    at least one), so padding is exercised without an empty row."""
    mask = np.ones(shape, dtype=dtype)
    if len(shape) == 2:
        for row in range(1, shape[0]):
            mask[row, max(1, shape[1] >> row):] = 0
    return mask


def seeded_inputs(function) -> dict[str, np.ndarray]:
    """Seeded inputs for every input of a MIL function (see the module's docstring)."""
    rng = np.random.default_rng(SEED)
    inputs = {}
    for name, var in function.inputs.items():
        shape = _concrete_shape(var)
        dtype = types.nptype_from_builtin(var.dtype)
        bound = _index_bound(var)
        if "mask" in name.lower():
            inputs[name] = padding_mask(shape, dtype)
        elif types.is_float(var.dtype):
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        elif types.is_int(var.dtype) and bound is not None:
            inputs[name] = rng.integers(0, bound, size=shape).astype(dtype)
        else:
            inputs[name] = rng.integers(0, 2, size=shape).astype(dtype)
    return inputs


def _valid_positions(inputs: dict[str, np.ndarray], output: np.ndarray):
    """Where an output means something: a padded token's row of a per-token output is undefined
    (a sliding window can mask every key it sees, and ``finite_masks`` rightly changes what such
    a row computes), so a per-token output, one whose leading axes are the mask's, is compared on
    real tokens only."""
    masks = [m for n, m in inputs.items() if "mask" in n.lower() and m.ndim == 2]
    if len(masks) == 1 and output.shape[:2] == masks[0].shape:
        return masks[0].astype(bool)
    return ...


def _joined(outputs: dict[str, np.ndarray], name: str, shape: tuple) -> np.ndarray:
    """Output ``name``, or its parts ``name_0, name_1, ...`` (ane::split_wide_outputs) joined
    on the one axis where they are shorter than it."""
    if name in outputs:
        return outputs[name]
    parts = [outputs[f"{name}_{i}"] for i in range(len(outputs)) if f"{name}_{i}" in outputs]
    (axis,) = [a for a, (part, whole) in enumerate(zip(parts[0].shape, shape)) if part != whole]
    return np.concatenate(parts, axis=axis)


def difference(inputs: dict[str, np.ndarray], before: dict[str, np.ndarray],
               after: dict[str, np.ndarray]) -> dict:
    """The largest absolute and relative difference over the outputs, where ``before`` is
    finite; an output finite before and not after counts as an infinite difference."""
    worst = {"max_abs_error": 0.0, "max_rel_error": 0.0, "output": None}
    for name, expected in before.items():
        where = _valid_positions(inputs, expected)
        expected = np.asarray(expected[where], dtype=np.float64)
        actual = np.asarray(_joined(after, name, np.shape(before[name]))[where], dtype=np.float64)
        finite = np.isfinite(expected)
        if not np.all(np.isfinite(actual[finite])):
            abs_error = rel_error = math.inf
        elif finite.any():
            abs_error = float(np.max(np.abs(actual[finite] - expected[finite])))
            peak = float(np.max(np.abs(expected[finite])))
            rel_error = abs_error / peak if peak > 0 else (0.0 if abs_error == 0 else math.inf)
        else:
            abs_error = rel_error = 0.0
        if rel_error >= worst["max_rel_error"]:
            worst = {"max_abs_error": abs_error, "max_rel_error": rel_error, "output": name}
    return worst


def _describe(report) -> str:
    rewritten = ", ".join(f"{kind} x{n}" for kind, n in report.rewritten.items()) or "no site reported"
    return f"sites rewritten: {rewritten}"


def _ops(block):
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _ops(inner)


def _var(var) -> tuple:
    """A var by name and identity: names alone may repeat."""
    if isinstance(var, (list, tuple)):
        return tuple(_var(v) for v in var)
    return var.name, id(var)


def fingerprint(function) -> tuple:
    """Everything a simulation of ``function`` depends on: its inputs and outputs, and each op's
    type, wiring, output types and (for a constant) value."""
    parts = [tuple((name, str(var.sym_type)) for name, var in function.inputs.items()),
             _var(list(function.outputs))]
    for op in _ops(function):
        parts.append((op.op_type, op.name, tuple((k, _var(v)) for k, v in op.inputs.items()),
                      tuple((_var(v), str(v.sym_type)) for v in op.outputs), tuple(_var(list(b.outputs)) for b in op.blocks)))
        if op.op_type == "const":
            value = np.ascontiguousarray(op.outputs[0].val)
            parts.append((value.dtype.str, value.shape, zlib.crc32(value.view(np.uint8)) if value.dtype != object
                          else repr(value.tolist())))
    return tuple(parts)


class _LastSimulation:
    """The program the previous check simulated after its pass: a weak reference, its
    fingerprint, the inputs and the outputs."""
    program = None
    fingerprint = None
    inputs = None
    outputs = None


class PassCheck:
    """Simulates the main function before a pass runs, and compares after."""

    def __init__(self, prog):
        from milpasses.simulator import simulate

        self._simulate = simulate
        self.prog = prog
        last = _LastSimulation
        current = fingerprint(prog.functions["main"])
        if last.program is not None and last.program() is prog and last.fingerprint == current:
            self.inputs, self.before = last.inputs, last.outputs
        else:
            self.inputs = seeded_inputs(prog.functions["main"])
            self.before = simulate(prog, self.inputs)

    def verify(self, report) -> None:
        """Record the comparison on ``report`` and raise if the pass changed the function."""
        after = self._simulate(self.prog, self.inputs)
        result = difference(self.inputs, self.before, after)
        result["passed"] = result["max_rel_error"] < MAX_RELATIVE_ERROR
        report.check = result
        if not result["passed"]:
            raise TranslationError(
                f"{report.pass_id} changed what the program computes: output '{result['output']}' differs by "
                f"{result['max_abs_error']:.3g} (relative {result['max_rel_error']:.3g}, the bar is "
                f"{MAX_RELATIVE_ERROR:g}) on seeded inputs; {_describe(report)}")
        last = _LastSimulation
        last.program, last.fingerprint = weakref.ref(self.prog), fingerprint(self.prog.functions["main"])
        last.inputs, last.outputs = self.inputs, after
