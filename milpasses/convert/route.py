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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from milpasses.console import Console
from milpasses.convert.coreml import assemble, convert_function, histogram, remove_with
from milpasses.convert.options import Options
from milpasses.convert.report import ConversionReport
from milpasses.convert.source import Source, Stages
from milpasses.errors import ConversionError, first_line


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
    default = source.default_function or converted[0].function.name
    report.ops_after = histogram(next(c for c in converted if c.function.name == default).program)
    with stages.guard("baseline"):
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
