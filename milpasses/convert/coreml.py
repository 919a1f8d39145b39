"""Converting: the one place milpasses calls ``ct.convert``, with the one pipeline builder.

A frontend hands the route :class:`Function` records (what ``ct.convert`` reads: a traced
module, an exported program or a MIL program, with typed inputs, outputs and states); each is
converted with its own ``ane_pipeline()``, so its pass reports are its own. Several functions
become one iOS18 multifunction package sharing weights. Compute units are CPU_AND_NE; off macOS
the model is not loaded (Core ML's runtime is absent).

The comparison program is converted in fp32 to ``milinternal``: that skips the fp16 casting
passes, the costliest part, and changes the counts by at most one op (the cast of a float input).
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import coremltools as ct

from milpasses.convert.options import Options
from milpasses.errors import ConversionError, LibraryFailure, first_line
from milpasses.frontend.function import Function
from milpasses.passes.translation_check import TranslationError
from milpasses.pipeline import ane_pipeline


@dataclass
class Converted:
    """A function converted with ``ane_pipeline()``, and what each pass did to it."""

    function: Function
    mlmodel: object
    passes: list[dict]

    @property
    def program(self):
        return self.mlmodel._mil_program


def pipeline_for(options: Options):
    """``ane_pipeline()`` for the options, new for each conversion (it files that conversion's reports)."""
    try:
        return ane_pipeline(check=options.check_passes, split_wide_outputs=options.generation is not None,
                            **({} if options.attention is None else {"attention": options.attention}))
    except ValueError as error:
        raise ConversionError(f"this milpasses has no attention={options.attention!r}: {error}") from error


def convert_function(function: Function, options: Options, model_class: str, load: bool = True) -> Converted:
    """``function`` converted with ``ane_pipeline()``; loaded by Core ML (macOS only) when ``load``."""
    pipeline = pipeline_for(options)
    try:
        mlmodel = to_mlprogram(function, pipeline, getattr(ct.target, options.target), options.precision, load)
    except TranslationError as error:
        raise ConversionError(f"the per-pass check stopped the conversion: {error} (a milpasses bug: please "
                              f"report it; without the check the package would compute something else)") from error
    except ConversionError:
        raise
    except Exception as error:  # coremltools' frontends fail in many types
        raise frontend_error(error, model_class) from error
    return Converted(function, mlmodel, [{"function": function.name, **entry} if function.name != "main" else entry
                                         for entry in pipeline.reports.as_dicts()])


def default_histogram(function: Function, options: Options) -> tuple[dict[str, int], float]:
    """The op histogram of a DEFAULT-pipeline fp32 conversion of ``function``, and the seconds it took."""
    started = time.perf_counter()
    program = _ct_convert(function, getattr(ct.target, options.target), "fp32", ct.PassPipeline.DEFAULT, "milinternal")
    return histogram(program), time.perf_counter() - started


def to_mlprogram(function: Function, pipeline, target=None, precision: str = "fp16", load: bool = False,
                 compute_units=ct.ComputeUnit.CPU_AND_NE):
    """``function`` converted to an ML Program with ``pipeline`` (DEFAULT when None) for ``target``
    (iOS16 when None); loaded by Core ML only when ``load`` and on macOS."""
    return _ct_convert(function, target or ct.target.iOS16, precision, pipeline or ct.PassPipeline.DEFAULT,
                       "mlprogram", skip_model_load=not load or sys.platform != "darwin", compute_units=compute_units)


def convert_traced(traced, inputs: dict, precision: str = "fp16", pass_pipeline=None, target=None,
                   compute_units=None, output_name: str = "last_hidden_state"):
    """``ct.convert`` a traced module (or exported program) to an ML Program whose inputs are
    named and typed like the numpy ``inputs`` and whose single output is ``output_name``. The
    DEFAULT pipeline unless ``pass_pipeline`` is given; iOS16 unless ``target`` is. The model is
    not loaded (Core ML's runtime exists only on macOS)."""
    function = Function("main", traced, [ct.TensorType(name=k, shape=v.shape, dtype=v.dtype) for k, v in inputs.items()],
                        [ct.TensorType(name=output_name)])
    return to_mlprogram(function, pass_pipeline, target, precision, compute_units=compute_units or ct.ComputeUnit.ALL)


def _ct_convert(function: Function, target, precision: str, pipeline, convert_to: str,
                skip_model_load: bool = True, compute_units=ct.ComputeUnit.CPU_AND_NE):
    extra = {"compute_units": compute_units, "skip_model_load": skip_model_load} if convert_to == "mlprogram" else {}
    return ct.convert(function.model, convert_to=convert_to, pass_pipeline=pipeline, inputs=function.inputs,
                      outputs=function.outputs, states=function.states or None,
                      minimum_deployment_target=target,
                      compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                      **extra)


def histogram(program) -> dict[str, int]:
    """Non-const op counts of a MIL program's main (or only) function, most frequent first."""
    function = program.functions.get("main") or next(iter(program.functions.values()))
    counts = Counter(op.op_type for op in function.operations if op.op_type != "const")
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def assemble(converted: list[Converted], package: Path, default: str | None = None):
    """The functions written to ``package`` as one iOS18 multifunction package (weights shared;
    ``default`` the default function, else the first), and its ``MLModel``."""
    write_multifunction({item.function.name: item.mlmodel for item in converted}, package, default)
    return ct.models.MLModel(str(package), skip_model_load=True)


def write_multifunction(mlmodels: dict, package: Path, default: str | None = None) -> None:
    """Write the named ML Programs to ``package`` as the functions of one multifunction package."""
    staging = Path(package).parent / f".{Path(package).name}.functions"
    descriptor = ct.utils.MultiFunctionDescriptor()
    try:
        for name, mlmodel in mlmodels.items():
            path = staging / f"{name}.mlpackage"
            mlmodel.save(str(path))
            descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
        descriptor.default_function_name = default or next(iter(mlmodels))
        ct.utils.save_multifunction(descriptor, str(package))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # each function's own copy of the weights, now shared


def remove_with(mlmodel, directory: Path) -> None:
    """Remove ``directory`` once ``mlmodel``, which reads it, is gone."""
    weakref.finalize(mlmodel, shutil.rmtree, str(directory), True)


def frontend_error(error: Exception, model_class: str) -> ConversionError:
    """The torch op coremltools cannot convert, named; other conversion failures as they are."""
    match = re.search(r"convert function for op '([^']+)' not implemented", str(error))
    if match:
        return ConversionError(f"converting {model_class}: coremltools cannot convert the torch op '{match.group(1)}' "
                               f"it uses; this architecture is not supported yet")
    return LibraryFailure(f"converting {model_class}: coremltools failed: {first_line(error)}")
