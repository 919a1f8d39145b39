"""Converting: ``ct.convert`` of the traced module with ``ane_pipeline()``, and the DEFAULT
pipeline's op histogram of the same module, for the report's comparison.

Compute units are CPU_AND_NE. Off macOS the model is not loaded (Core ML's runtime is absent).
The comparison program is converted in fp32 to ``milinternal``: that skips the fp16 casting
passes, the costliest part, and changes the counts by at most one op (the cast of a float
input; measured on all fixture families), against the cost of a second fp16 conversion.
"""

from __future__ import annotations

import re
import sys
import time
from collections import Counter

import coremltools as ct
import numpy as np

from milpasses.convert.options import Options
from milpasses.errors import ConversionError, LibraryFailure, first_line
from milpasses.convert.trace import Traced
from milpasses.passes.translation_check import TranslationError
from milpasses.pipeline import ane_pipeline


def pipeline_for(options: Options) -> ct.PassPipeline:
    """``ane_pipeline()`` for the options, built first so a bad option fails before loading."""
    try:
        return ane_pipeline(check=options.check_passes,
                            **({} if options.attention is None else {"attention": options.attention}))
    except ValueError as error:
        raise ConversionError(f"this milpasses has no attention={options.attention!r}: {error}") from error


def convert_traced(traced: Traced, pipeline: ct.PassPipeline, options: Options, model_type: str):
    try:
        return ct.convert(traced.module, convert_to="mlprogram", pass_pipeline=pipeline,
                          compute_units=ct.ComputeUnit.CPU_AND_NE, skip_model_load=sys.platform != "darwin",
                          **_common(traced, options))
    except TranslationError as error:
        raise ConversionError(f"the per-pass check stopped the conversion: {error} (a milpasses bug: please "
                              f"report it; without the check the package would compute something else)") from error
    except (RuntimeError, NotImplementedError, ValueError) as error:
        raise _frontend_error(error, model_type) from error


def default_histogram(traced: Traced, options: Options) -> tuple[dict[str, int], float]:
    """The op histogram of a DEFAULT-pipeline fp32 conversion, and the seconds it took."""
    started = time.perf_counter()
    program = ct.convert(traced.module, convert_to="milinternal", pass_pipeline=ct.PassPipeline.DEFAULT,
                         **{**_common(traced, options), "compute_precision": ct.precision.FLOAT32})
    return histogram(program), time.perf_counter() - started


def histogram(program) -> dict[str, int]:
    """Non-const op counts of a MIL program, most frequent first."""
    counts = Counter(op.op_type for op in program.functions["main"].operations if op.op_type != "const")
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _common(traced: Traced, options: Options) -> dict:
    """The ``ct.convert`` arguments both conversions share: typed inputs, named outputs, target, precision."""
    if "pixel_values" in traced.shapes:
        (shape,) = traced.shapes["pixel_values"]
        inputs = [ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)]
    else:
        batch = options.batch
        if options.enumerated:
            shape = ct.EnumeratedShapes(shapes=[(batch, n) for n in options.lengths],
                                        default=(batch, traced.trace_length))
        else:
            shape = (batch, options.lengths[0])
        inputs = [ct.TensorType(name=name, shape=shape, dtype=np.int32) for name in traced.shapes]
    return dict(inputs=inputs, outputs=[ct.TensorType(name=n) for n in traced.output_names],
                minimum_deployment_target=getattr(ct.target, options.target),
                compute_precision=ct.precision.FLOAT16 if options.precision == "fp16" else ct.precision.FLOAT32)


def _frontend_error(error: Exception, model_type: str) -> ConversionError:
    """The torch op coremltools cannot convert, named; other conversion failures as they are."""
    match = re.search(r"convert function for op '([^']+)' not implemented", str(error))
    if match:
        return ConversionError(f"coremltools cannot convert the torch op '{match.group(1)}' that {model_type} "
                               f"uses; this architecture is not supported yet")
    return LibraryFailure(f"coremltools could not convert {model_type}: {first_line(error)}")
