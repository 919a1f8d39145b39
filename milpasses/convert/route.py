"""The one route of a conversion: options, load, to MIL, convert, compress, verify, report.

Each kind of model is a :class:`Source` (a Hugging Face model by trace or ``torch.export``, an
ONNX graph, a causal LM's KV-cache steps); it loads the model, hands the route the functions its
frontend produced, and verifies the package against its own reference. The route runs the stages
in order, times them, converts every function at the one ``ct.convert`` call site
(:mod:`milpasses.convert.coreml`), stamps the package's metadata, and turns any failure into a
:class:`~milpasses.errors.ConversionError` naming the stage and the model.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from milpasses.console import Console
from milpasses.convert.coreml import Converted, assemble, convert_function, histogram, remove_with
from milpasses.frontend.function import Function
from milpasses.convert.options import Options
from milpasses.convert.report import ConversionReport
from milpasses.errors import ConversionError, LibraryFailure, first_line


class Stages:
    """Runs the stages: shows each on the console, records its seconds, and names it in any failure."""

    def __init__(self, console: Console, model_class: str = "the model"):
        self.console, self.seconds, self.model_class = console, {}, model_class

    @contextmanager
    def stage(self, key: str, description: str, steps: int | None = None):
        started = time.perf_counter()
        with self.guard(key), self.console.stage(description, steps) as step:
            yield step
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started

    @contextmanager
    def guard(self, key: str):
        """Any failure but a ConversionError becomes one, naming the stage and the model."""
        try:
            yield
        except ConversionError:
            raise
        except Exception as error:  # a library's or our own failure: one line, never a traceback
            raise LibraryFailure(f"{key} failed on {self.model_class}: {type(error).__name__}: "
                                 f"{first_line(error)}") from error


class Source:
    """A kind of model on the route. Subclasses fill in each stage."""

    description = ""  # how the report names the model
    model_class = "the model"  # named in errors
    task = ""  # how the report names what the package computes
    frontend = "torch.jit.trace"  # what reads the model for coremltools
    default_function: str | None = None  # of a multifunction package; None: the first

    def load(self) -> None:
        raise NotImplementedError

    def functions(self, stages: Stages) -> list[Function]:
        """What ``ct.convert`` reads, one per function of the package (the frontend's work)."""
        raise NotImplementedError

    def compress(self, converted: list[Converted], stages: Stages) -> list[Converted]:
        return converted

    def report(self, converted: list[Converted]) -> ConversionReport:
        raise NotImplementedError

    def baseline(self) -> Function | None:
        """The function converted with DEFAULT for the report's op comparison; None for none."""
        return None

    def verifying(self, mlmodel) -> tuple[str, int | None]:
        """What verification does, as the console shows it, and its steps (None: unknown)."""
        raise NotImplementedError

    def verify(self, mlmodel, converted: list[Converted], report: ConversionReport, step) -> None:
        """Fill the report's verification; ``step`` is called after each of the steps."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        return {}


def source_for(model, options: Options) -> Source:
    """The kind of ``model``: an ONNX graph, a causal LM converted with its KV cache, or a
    Hugging Face model for its task."""
    from milpasses.frontend.onnx.load import is_onnx

    if is_onnx(model):
        if options.compression is not None:
            raise ConversionError("--compress does not apply to ONNX models yet: convert without it")
        if options.frontend != "trace":
            raise ConversionError("--frontend applies to PyTorch models; an ONNX model is read by the ONNX frontend")
        from milpasses.convert.onnx_model import OnnxModel

        return OnnxModel(model, options)
    if options.generation is not None:
        from milpasses.convert.text_generation import CausalLMSteps

        return CausalLMSteps(model, options)
    from milpasses.convert.hugging_face import HuggingFaceModel

    return HuggingFaceModel(model, options)


def run(model, options: Options, console: Console, workdir: Path | None = None):
    """Convert ``model`` and verify it; returns ``(mlmodel, report)``. Packages of several functions
    are written in ``workdir`` (the caller's), else in a temporary directory that lives as long as
    the returned MLModel."""
    import milpasses
    from milpasses.convert.coreml import default_histogram, pipeline_for

    pipeline_for(options)  # a bad pipeline option fails before the model loads
    source = source_for(model, options)
    stages = Stages(console)
    with stages.stage("load", "loading the model"):
        source.load()
    stages.model_class = source.model_class
    with stages.stage("trace", f"reading the model ({source.frontend})"):
        functions = source.functions(stages)
    described = "" if len(functions) == 1 else f" ({', '.join(f.name for f in functions)})"
    with stages.stage("convert", f"converting with ane_pipeline(){described}"):
        # A function of a multifunction package is never run on its own: not loaded.
        converted = [convert_function(f, options, source.model_class, load=len(functions) == 1) for f in functions]
    converted = source.compress(converted, stages)
    if len(converted) == 1:
        mlmodel = converted[0].mlmodel
    else:
        with stages.stage("package", "writing the functions into one package"):
            directory = Path(tempfile.mkdtemp(prefix="milpasses-") if workdir is None else workdir)
            mlmodel = assemble(converted, directory / "model.mlpackage", source.default_function)
            if workdir is None:
                remove_with(mlmodel, directory)
    with stages.guard("report"):
        report = source.report(converted)
    report.passes = [entry for item in converted for entry in item.passes]
    report.ops_after = histogram(converted[-1 if source.default_function else 0].program)
    baseline_function = source.baseline()
    # DEFAULT's histogram is pure-Python pass work; verification is mostly torch or ONNX Runtime
    # arithmetic, which releases the GIL: run side by side, they share the cores.
    with stages.guard("verify"):
        description, steps = source.verifying(mlmodel)
    with ThreadPoolExecutor(max_workers=1) as pool, stages.stage("verify", description, steps) as step:
        baseline = None if baseline_function is None else pool.submit(default_histogram, baseline_function, options)
        source.verify(mlmodel, converted, report, step)
        if baseline is not None:
            try:
                report.ops_before, stages.seconds["baseline"] = baseline.result()
            except Exception as error:  # the comparison is not the conversion: say why it is missing
                report.samples += f"; no DEFAULT comparison (it failed: {first_line(error)})"
    report.seconds = {k: round(v, 3) for k, v in stages.seconds.items()}
    _stamp(mlmodel, source, options, report, milpasses.__version__)
    return mlmodel, report


def _stamp(mlmodel, source: Source, options: Options, report: ConversionReport, version: str) -> None:
    metadata = {"milpasses.version": version, "milpasses.task": source.task,
                "milpasses.source_model": source.description, "milpasses.options": json.dumps(report.options),
                **source.metadata()}
    mlmodel.user_defined_metadata.update(metadata)
    mlmodel.short_description = f"{source.description} ({source.task}), converted for the ANE by milpasses"
