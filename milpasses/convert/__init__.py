"""``convert()``: a Hugging Face model to an ANE-ready ML Program, verified by simulation.

A conversion goes through these stages, one module each, in this order:

- ``options``: what may be asked for (tasks, targets, precisions, attention modes), checked first;
- ``load``: the model in eager attention, its tokenizer, its inputs and lengths;
- ``samples``: inputs for tracing and verifying (real sentences, question/context pairs, images);
- ``trace``: the module ``torch.jit.trace`` records, with the task's outputs;
- ``coreml``: ``ct.convert`` with ``ane_pipeline()``, and DEFAULT's op counts for comparison;
- ``compress``: weights palettized or quantized in NE-valid forms (data-aware 4-bit before
  tracing; the others after converting; ``auto`` chooses bits per layer by simulation);
- ``verify``: the converted program simulated against the PyTorch fp32 model;
- ``report``: :class:`ConversionReport`, printed and written;
- ``saving``: the package and its reports, named after it, staged and renamed.

This module runs them (:func:`convert`) and holds the public names. It stays light: torch and
coremltools are imported when :func:`convert` runs.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

from milpasses.console import Console, as_console
from milpasses.convert.options import (
    ATTENTION_MODES,
    BUNDLED_NAME,
    DEFAULT_MIN_PSNR_DB,
    DEFAULT_SEQ_LEN,
    PRECISIONS,
    TARGETS,
    TASKS,
    Task,
)
from milpasses.errors import ConversionError, LibraryFailure
from milpasses.convert.report import ConversionReport
from milpasses.convert.samples import SAMPLE_QUESTIONS
from milpasses.convert.saving import check_output, report_paths, save

__all__ = ["ATTENTION_MODES", "BUNDLED_NAME", "DEFAULT_MIN_PSNR_DB", "DEFAULT_SEQ_LEN", "PRECISIONS",
           "SAMPLE_QUESTIONS", "TARGETS", "TASKS", "ConversionError", "ConversionReport", "LibraryFailure",
           "Task", "check_output", "convert", "report_paths", "save"]


def convert(model=None, task: str = "feature-extraction", seq_len: int | None = None,
            seq_lens: list[int] | tuple[int, ...] | None = None, batch: int = 1,
            attention: str | None = None, target: str | None = None, precision: str = "fp16",
            offline: bool = False, trust_remote_code: bool = False,
            min_psnr_db: float | None = None, compress: str | None = None, calibration=None,
            progress: Console | Callable[[str], None] | None = None, check_passes: bool = False,
            context: int | None = None, prefill_chunk: int | None = None, kv_cache: str = "io",
            all_logits: bool = False):
    """Convert ``model`` for the ANE and verify it; returns ``(mlmodel, report)``.

    ``model`` is a hub id, a local directory, a loaded ``PreTrainedModel``, None for the
    bundled all-MiniLM-L6-v2 (always offline), or an ONNX model (a ``.onnx`` file, or a directory
    holding ``model.onnx``), verified against ONNX Runtime (``milpasses.onnx``; ``task`` does not
    apply: the outputs are the graph's). ``seq_lens`` (several lengths) gives the sequence
    inputs ``ct.EnumeratedShapes`` (an ONNX model: one function per length, ``seq_len_16``..., in
    an iOS18 multifunction package); ``seq_len`` one fixed length (128 by default). ``attention``
    is handed to ``ane_pipeline`` only when given. ``progress`` shows the stages: a
    :class:`milpasses.console.Console`, or a function called with each stage's description.
    ``target`` is the minimum deployment target, iOS16 by default (iOS18 for text generation).
    ``check_passes`` converts with ``ane_pipeline(check=True)``: each pass is simulated before and
    after it runs, a pass that changes the function stops the conversion (a ConversionError
    naming it), and each pass's entry in the report carries its check.
    ``compress`` is one of ``palettize8``, ``palettize6``, ``palettize4`` (data-aware, calibrated
    on the verification samples or on ``calibration``, a file of texts, one a line), ``int8`` or
    ``auto`` (bits per layer, the smallest weights keeping every output at ``min_psnr_db``).
    ``min_psnr_db`` defaults to 60 dB, or 40 dB (Apple's acceptance level for 4-bit) when
    compressing. Raises :class:`ConversionError` for anything the user can fix; the report's
    ``passed`` says whether every output reached ``min_psnr_db``.

    With ``context`` (``task="text-generation"``) the result is a KV-cache decoder: one package
    with ``prefill`` (``prefill_chunk`` tokens, 64 or the context) and ``decode`` functions,
    the cache as inputs and outputs (``kv_cache="io"``) or as Core ML state (``"state"``), the
    prefill returning its last token's logits (every token's with ``all_logits``), verified by
    greedy decoding against Hugging Face ``generate`` (see :mod:`milpasses.convert.generation`).
    """
    import milpasses
    from milpasses.convert import compress as compressing
    from milpasses.convert import coreml, load, trace, verify
    from milpasses.convert.options import check_options
    from milpasses.onnx.load import is_onnx

    scheme = compressing.check_scheme(compress)
    compressing.check_target(scheme, target)
    texts = compressing.check_calibration(calibration, scheme)
    if min_psnr_db is None:
        min_psnr_db = DEFAULT_MIN_PSNR_DB if scheme is None else compressing.DEFAULT_COMPRESSED_MIN_PSNR_DB
    if context is not None or prefill_chunk is not None or kv_cache != "io" or all_logits:
        from milpasses.convert.generation import check_generation_options, convert_generation

        if context is None:
            raise ConversionError("--prefill-chunk, --kv-cache and --all-logits need --context (the KV cache's length)")
        if check_passes or scheme is not None:
            raise ConversionError("--check-passes and --compress do not apply to text generation yet: convert "
                                  "without them")
        chunk = check_generation_options(task, context, prefill_chunk, kv_cache, seq_len, seq_lens, batch, target)
        options = check_options(task, 1, None, 1, attention, "iOS18", precision, offline, trust_remote_code,
                                min_psnr_db)
        return convert_generation(model, context, chunk, kv_cache, options, min_psnr_db, as_console(progress),
                                  _stage, all_logits)
    options = check_options(task, seq_len, seq_lens, batch, attention, target or "iOS16", precision, offline,
                            trust_remote_code, min_psnr_db, check_passes)
    pipeline = coreml.pipeline_for(options)
    console, seconds = as_console(progress), {}
    if is_onnx(model):
        from milpasses.onnx.convert import convert_onnx

        if scheme is not None:
            raise ConversionError("--compress does not apply to ONNX models yet: convert without it")

        mlmodel, report = convert_onnx(model, options, lambda: coreml.pipeline_for(options),
                                       lambda *stage: _stage(console, seconds, *stage))
        report.seconds = {k: round(v, 3) for k, v in seconds.items()}
        return mlmodel, report

    with _stage(console, seconds, "load", "loading the model"):
        loaded = load.load(model, options)
    compression = None if scheme is None else compressing.Compression(scheme)
    traced_model = None
    if scheme == "palettize4":
        with _stage(console, seconds, "calibrate", "palettizing to 4 bits, calibrated (sensitive k-means)"):
            traced_model = compressing.calibrated_palettization(loaded, options, texts, compression)
    with _stage(console, seconds, "trace", "tracing"):
        traced = trace.trace(loaded, options, traced_model)
    with _stage(console, seconds, "convert", "converting with ane_pipeline()"):
        mlmodel = coreml.convert_traced(traced, pipeline, options, loaded.model.config.model_type)
    if scheme is not None:
        with _stage(console, seconds, "compress", f"compressing ({scheme})"):
            mlmodel = compressing.compress(mlmodel, scheme, compression, traced, loaded, options)
    recorded = options.recorded(takes_images=loaded.modality == "vision")
    report = ConversionReport(model=loaded.description, task=task, inputs=traced.shapes,
                              outputs=traced.output_names, options=recorded, min_psnr_db=min_psnr_db,
                              passes=pipeline.reports.as_dicts(),
                              ops_after=coreml.histogram(mlmodel._mil_program),
                              compression=None if compression is None else compression.as_dict())

    # DEFAULT's histogram is pure-Python pass work; the verification is mostly torch arithmetic,
    # which releases the GIL. Run side by side, they share the cores.
    lengths = verify.verified_lengths(loaded.lengths)
    described = ", ".join(str(n) for n in lengths) if lengths != [None] else "the sample images"
    with _stage(console, seconds, "verify", f"verifying: simulating the program at {described}, beside a "
                f"DEFAULT-pipeline conversion for comparison", verify.simulation_steps(lengths, batch)) as step:
        with ThreadPoolExecutor(max_workers=1) as pool:
            baseline = pool.submit(coreml.default_histogram, traced, options)
            verify.verify(mlmodel, traced, loaded, options, lengths, report, step)
            report.ops_before, seconds["baseline"] = baseline.result()
    report.seconds = {k: round(seconds[k], 3) for k in ("load", "calibrate", "trace", "convert", "compress",
                                                         "baseline", "verify") if k in seconds}

    mlmodel.user_defined_metadata["milpasses.version"] = milpasses.__version__
    mlmodel.user_defined_metadata["milpasses.task"] = task
    mlmodel.user_defined_metadata["milpasses.source_model"] = loaded.description
    mlmodel.user_defined_metadata["milpasses.options"] = json.dumps(recorded)
    mlmodel.short_description = f"{loaded.description} ({task}), converted for the ANE by milpasses"
    return mlmodel, report


@contextmanager
def _stage(console: Console, seconds: dict, key: str, description: str, steps: int | None = None):
    started = time.perf_counter()
    with console.stage(description, steps) as step:
        yield step
    seconds[key] = time.perf_counter() - started
