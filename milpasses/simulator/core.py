"""Execute a MIL program on numpy inputs, emulating the device's fp16.

Core ML cannot run on Linux, so every numeric claim milpasses makes comes from
here. In storage numerics (the default) each op computes in float32 (or its
integer/bool dtype) and its result is rounded to the op's declared output dtype, so
an fp16 program stores fp16 values between ops, overflows to inf past 65504 and
propagates NaN as the device would, while the arithmetic runs at float32 speed.
Device numerics also round every step inside an fp16 op and apply the Neural
Engine's limits (:mod:`milpasses.simulator.fp16`).
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
from coremltools.converters.mil.mil import Program, types

from milpasses.simulator.fp16 import FP16_SMALLEST_NORMAL, DeviceNumerics, Fp16Arithmetic, InternalOverflow
from milpasses.simulator.ops import DEVICE_IMPLEMENTATIONS, OP_IMPLEMENTATIONS


class SimulationError(RuntimeError):
    """The simulator cannot run this program or these inputs."""


class UnsupportedOpError(SimulationError):
    def __init__(self, op):
        self.op_type = op.op_type
        self.op_name = op.name
        super().__init__(
            f"the simulator has no implementation of MIL op '{op.op_type}' (op '{op.name}'); "
            f"add one to milpasses/simulator/ops.py"
        )


class InputMismatchError(SimulationError, ValueError):
    pass


Observer = Callable[[object, list], None]
"""Called as ``observer(op, outputs)`` after each non-const op, outputs as numpy arrays; a
weight decompression op (``constexpr_*``) is reported with its decompressed weights."""


def is_decompression(op) -> bool:
    """A ``constexpr_*`` op: compressed weights Core ML expands once, when it loads the model."""
    return op.op_type.startswith("constexpr_")


def _storage_dtype(builtin) -> np.dtype:
    """float16 values live in float32 arrays (already rounded); everything else as declared."""
    if types.is_float(builtin):
        return np.dtype(np.float32)
    return np.dtype(types.nptype_from_builtin(builtin))


def _dtype_kind(dtype) -> str:
    """Float, integer (signed or not) or bool: inputs may differ in width, not in kind."""
    kind = np.dtype(dtype).kind
    return "i" if kind == "u" else kind


def _declared_dtype(builtin) -> np.dtype:
    return np.dtype(types.nptype_from_builtin(builtin))


def _to_storage(value, builtin, round_fp16: bool = True, flush_subnormals: bool = False) -> np.ndarray:
    value = np.asarray(value)
    if builtin == types.fp16 and round_fp16:
        with np.errstate(over="ignore", invalid="ignore"):
            rounded = value.astype(np.float16).astype(np.float32)
        if flush_subnormals:
            rounded[np.abs(rounded) < FP16_SMALLEST_NORMAL] = 0.0
        return rounded
    dtype = _storage_dtype(builtin)
    if value.dtype == dtype:
        return value
    with np.errstate(over="ignore", invalid="ignore"):
        return value.astype(dtype)


def _static_shape(var) -> tuple | None:
    shape = var.shape
    if any(not isinstance(d, (int, np.integer)) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def device_numerics(numerics) -> DeviceNumerics | None:
    """None for "storage", the model of the device for "device" or a :class:`DeviceNumerics`."""
    if isinstance(numerics, DeviceNumerics):
        return numerics
    if numerics == "storage":
        return None
    if numerics == "device":
        return DeviceNumerics()
    raise ValueError(f"numerics must be 'storage', 'device' or a DeviceNumerics, not {numerics!r}")


def load_program(model) -> Program:
    """A MIL ``Program`` from a Program, an ``MLModel`` or a saved ``.mlpackage`` path."""
    if isinstance(model, Program):
        return model
    if isinstance(model, (str, PathLike)):
        return _program_from_package(Path(model))
    if hasattr(model, "get_spec"):
        spec = model.get_spec()
        _require_ml_program(spec)
        program = getattr(model, "_mil_program", None)
        return program if program is not None else _program_from_spec(spec, model.weights_dir)
    raise TypeError(
        f"cannot simulate a {type(model).__name__}: pass a coremltools Program, an MLModel "
        f"or the path of a saved .mlpackage"
    )


def _program_from_package(path: Path) -> Program:
    import coremltools as ct

    if not path.exists():
        raise FileNotFoundError(f"no Core ML package at {path}")
    if path.suffix != ".mlpackage" or not path.is_dir():
        raise ValueError(f"{path} is not an .mlpackage directory")
    model = ct.models.MLModel(str(path), skip_model_load=True)
    return _program_from_spec(model.get_spec(), model.weights_dir)


def _require_ml_program(spec) -> None:
    kind = spec.WhichOneof("Type")
    if kind != "mlProgram":
        raise ValueError(
            f"only ML Program models can be simulated; this one is a '{kind}' model "
            f"(convert with convert_to='mlprogram')"
        )


def _program_from_spec(spec, weights_dir) -> Program:
    from coremltools.converters.mil.frontend.milproto.load import load

    _require_ml_program(spec)
    return load(spec, spec.specificationVersion, file_weights_dir=weights_dir or "")


class Simulator:
    """Runs one function of a MIL program. Constants are prepared once, at construction."""

    def __init__(self, model, function_name: str = "main", emulate_fp16: bool = True,
                 numerics: str | DeviceNumerics = "storage"):
        """``emulate_fp16=False`` runs an fp16 program with float32 storage: the same program,
        its fp16 constants included, but without fp16's rounding and range.

        ``numerics="storage"`` rounds each fp16 op's output only; ``"device"`` (or a
        :class:`DeviceNumerics`) also rounds every step inside an fp16 op (products, partial
        sums, softmax and norm steps), makes matmul-class outputs past 32752 inf and flushes
        subnormals, and records each overflow inside an op in :attr:`overflows`."""
        self.emulate_fp16 = emulate_fp16
        self.device = device_numerics(numerics)
        if self.device is not None and not emulate_fp16:
            raise ValueError("device numerics emulate fp16: they cannot run with emulate_fp16=False")
        self.overflows: list[InternalOverflow] = []
        """The overflows inside fp16 ops (device numerics) of the runs since the last :meth:`run`
        or :meth:`values` began."""
        program = load_program(model)
        if function_name not in program.functions:
            raise SimulationError(
                f"the program has no function '{function_name}'; it has {sorted(program.functions)}"
            )
        self.function = program.functions[function_name]
        self._states = {name: var for name, var in self.function.inputs.items() if types.is_state(var.sym_type)}
        self._constants = {}
        for op in self.function.operations:
            if op.op_type == "const":
                var = op.outputs[0]
                self._constants[var.name] = self._store(var.val, var.dtype)
            elif is_decompression(op):
                self._execute(op, self._constants)

    def _store(self, value, builtin) -> np.ndarray:
        flush = self.device is not None and self.device.flush_subnormals
        return _to_storage(value, builtin, self.emulate_fp16, flush)

    def constant(self, var) -> np.ndarray | None:
        """The value of a const's or a decompression op's output (decompressed), else None."""
        return self._constants.get(var.name)

    @property
    def expected_inputs(self) -> dict[str, tuple]:
        return {
            name: (var.shape, types.builtin_to_string(var.dtype))
            for name, var in self.function.inputs.items() if name not in self._states
        }

    @property
    def state_shapes(self) -> dict[str, tuple]:
        """The function's states (iOS18 ``StateType``), by name: they are not inputs."""
        return {name: tuple(int(d) for d in var.shape) for name, var in self._states.items()}

    def make_state(self) -> dict[str, np.ndarray]:
        """Fresh state for :meth:`run`, zeros, as ``MLModel.make_state()`` gives. It persists
        across calls (and across functions of one program that declare the same states)."""
        return {name: self._store(np.zeros(var.shape, np.float32), var.dtype)
                for name, var in self._states.items()}

    def _check_state(self, state) -> dict[str, np.ndarray]:
        if not self._states:
            if state is not None:
                raise InputMismatchError("the function keeps no state: call run() without state=")
            return {}
        if state is None:
            raise InputMismatchError(f"the function keeps state {sorted(self._states)}: pass "
                                     f"state=simulator.make_state(), as MLModel.predict takes model.make_state()")
        for name, shape in self.state_shapes.items():
            if name not in state or tuple(state[name].shape) != shape:
                raise InputMismatchError(f"state '{name}' must be an array of shape {shape}; "
                                         f"make it with make_state()")
        # The arrays themselves, not copies: coreml_update_state writes into them.
        return {name: state[name] for name in self._states}

    def _expectations(self) -> str:
        return ", ".join(
            f"{name}: shape {tuple(shape)} {dtype}" for name, (shape, dtype) in self.expected_inputs.items()
        )

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected = {name: var for name, var in self.function.inputs.items() if name not in self._states}
        missing = [n for n in expected if n not in inputs]
        unknown = [n for n in inputs if n not in expected]
        if missing or unknown:
            raise InputMismatchError(
                f"input names do not match: missing {missing}, unexpected {unknown}; "
                f"the program expects {self._expectations()}"
            )
        checked = {}
        for name, var in expected.items():
            value = np.asarray(inputs[name])
            want = _declared_dtype(var.dtype)
            if _dtype_kind(value.dtype) != _dtype_kind(want):
                raise InputMismatchError(
                    f"input '{name}' has dtype {value.dtype}, the program expects "
                    f"{types.builtin_to_string(var.dtype)}; expected inputs: {self._expectations()}"
                )
            shape = var.shape
            fits = len(shape) == value.ndim and all(
                not isinstance(d, (int, np.integer)) or d == s for d, s in zip(shape, value.shape)
            )
            if not fits:
                raise InputMismatchError(
                    f"input '{name}' has shape {value.shape}, the program expects {tuple(shape)}; "
                    f"expected inputs: {self._expectations()}"
                )
            checked[name] = self._store(value, var.dtype)
        return checked

    def run(self, inputs: Mapping[str, np.ndarray], observer: Observer | None = None,
            constants: Mapping[str, np.ndarray] | None = None,
            state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The outputs on ``inputs``; ``constants`` replaces constants' values by var name (what a
        program computes with one weight changed, without building another program). A function
        with states needs ``state`` (from :meth:`make_state`), which the run updates in place."""
        return self._outputs(self.values(inputs, observer, constants, state))

    def values(self, inputs: Mapping[str, np.ndarray], observer: Observer | None = None,
               constants: Mapping[str, np.ndarray] | None = None,
               state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every value of a :meth:`run`, by var name, for :meth:`rerun`."""
        self.overflows = []
        env = dict(self._constants)
        if constants:
            env.update(constants)
        env.update(self._check_inputs(inputs))
        env.update(self._check_state(state))
        for op in self.function.operations:
            if op.op_type == "const":
                continue
            if is_decompression(op):
                if observer is not None:
                    observer(op, [env[var.name] for var in op.outputs])
                continue
            outputs = self._execute(op, env)
            if observer is not None:
                observer(op, outputs)
        return env

    def rerun(self, values: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs of the run whose :meth:`values` are given, with ``constants`` replaced:
        only the ops that read a replaced constant, directly or through other ops, run again
        (what one changed weight changes costs the ops after its reader, not the whole program)."""
        if self._states:
            raise SimulationError("rerun does not apply to a function with state: its run changed the state")
        env, changed = dict(values), set(constants)
        env.update(constants)
        for op in self.function.operations:
            if op.op_type == "const" or is_decompression(op):
                continue
            read = (v for var in op.inputs.values() for v in (var if isinstance(var, (list, tuple)) else [var]))
            if any(v.name in changed for v in read):
                self._execute(op, env)
                changed.update(var.name for var in op.outputs)
        return self._outputs(env)

    def _outputs(self, env) -> dict[str, np.ndarray]:
        return {
            var.name: env[var.name].astype(_declared_dtype(var.dtype), copy=False)
            for var in self.function.outputs
        }

    def _execute(self, op, env) -> list[np.ndarray]:
        implementation = OP_IMPLEMENTATIONS.get(op.op_type)
        if implementation is None:
            raise UnsupportedOpError(op)
        args = {name: value for name, value in op.default_inputs().items()}
        for name, var in op.inputs.items():
            args[name] = [self._value(v, env) for v in var] if isinstance(var, (list, tuple)) else self._value(var, env)
        device_form = self._device_form(op)
        with np.errstate(all="ignore"):
            if device_form is None:
                results = implementation(**args)
            else:
                arithmetic = Fp16Arithmetic(self.device)
                results = device_form(arithmetic, **args)
                self.overflows.extend(InternalOverflow(op.name, op.op_type, step, peak, limit)
                                      for step, peak, limit in arithmetic.overflowed)
        if not isinstance(results, (list, tuple)):
            results = [results]
        stored = []
        for var, value in zip(op.outputs, results):
            value = self._store(value, var.dtype)
            shape = _static_shape(var)
            if shape is not None and value.shape != shape:
                raise SimulationError(
                    f"op '{op.name}' ({op.op_type}) produced shape {value.shape}, its declared output "
                    f"shape is {shape}: the simulator's implementation of '{op.op_type}' is wrong here"
                )
            env[var.name] = value
            stored.append(value)
        return stored

    def _device_form(self, op):
        """The op's device form, in device numerics, for an op that computes in fp16."""
        if self.device is None or op.outputs[0].dtype != types.fp16:
            return None
        return DEVICE_IMPLEMENTATIONS.get(op.op_type)

    def _value(self, var, env):
        value = env.get(var.name)
        if value is None:
            if var.val is None:
                raise SimulationError(f"variable '{var.name}' is used before it is computed")
            value = self._store(var.val, var.dtype)
        return value


def simulate(model, inputs: Mapping[str, np.ndarray], observer: Observer | None = None,
             function_name: str = "main", state: dict[str, np.ndarray] | None = None,
             numerics: str | DeviceNumerics = "storage") -> dict[str, np.ndarray]:
    """Run ``model`` (a Program, MLModel or .mlpackage path) on numpy ``inputs``.

    Returns the program's outputs by name, in their declared dtypes. ``numerics`` is
    "storage" (fp16 at op outputs) or "device" (fp16 at every step inside an op too), see
    :class:`Simulator`.
    """
    return Simulator(model, function_name, numerics=numerics).run(inputs, observer, state=state)


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB: ``20 * log10(max|reference| / RMSE)``.

    Infinite when the two are equal. Any inf or NaN in ``actual`` gives ``-inf``, so a
    broken output can never pass a threshold.
    """
    reference = np.asarray(reference, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if reference.shape != actual.shape:
        raise ValueError(f"psnr needs equal shapes, got {reference.shape} and {actual.shape}")
    if not np.all(np.isfinite(actual)):
        return -math.inf
    rmse = float(np.sqrt(np.mean((reference - actual) ** 2)))
    peak = float(np.max(np.abs(reference)))
    if rmse == 0.0:
        return math.inf
    return 20.0 * math.log10(peak / rmse) if peak > 0 else -math.inf


class RangeObserver:
    """Records each op's output range and the first op whose output holds inf or NaN."""

    def __init__(self):
        self.records: list[dict] = []
        self.first_nonfinite: dict | None = None

    def __call__(self, op, outputs: Iterable[np.ndarray]) -> None:
        for var, value in zip(op.outputs, outputs):
            if not np.issubdtype(value.dtype, np.floating) or value.size == 0:
                continue
            finite = np.isfinite(value)
            all_finite = bool(finite.all())
            magnitudes = np.abs(value if all_finite else value[finite])
            record = {
                "op": op.name,
                "op_type": op.op_type,
                "output": var.name,
                "dtype": types.builtin_to_string(var.dtype),
                "max_abs": float(magnitudes.max()) if magnitudes.size else math.nan,
                "min": float(value[finite].min()) if magnitudes.size else math.nan,
                "max": float(value[finite].max()) if magnitudes.size else math.nan,
                "inf_count": int(np.isinf(value).sum()),
                "nan_count": int(np.isnan(value).sum()),
            }
            self.records.append(record)
            if self.first_nonfinite is None and not all_finite:
                self.first_nonfinite = record
