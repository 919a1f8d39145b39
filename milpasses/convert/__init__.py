"""``convert()``: a model to an ANE-ready ML Program, verified by simulation.

One route (:mod:`milpasses.convert.route`) runs every conversion, in this order:

- ``options``: what may be asked for, checked once (:class:`Options`, generation and
  compression as sub-objects);
- load: the model and what it takes (``load`` for Hugging Face models, ``onnx_model`` for ONNX
  graphs, ``text_generation`` for a causal LM's KV-cache steps);
- to MIL: the frontends beneath the route (``milpasses.frontend``: torch.jit.trace,
  torch.export, ONNX, the generation step);
- ``coreml``: the one ``ct.convert`` call, with ``ane_pipeline()``, per function;
- ``compress``: weights palettized or quantized in NE-valid forms;
- verify: the converted program simulated against its reference (PyTorch fp32, ONNX Runtime,
  Hugging Face ``generate``);
- ``report``: :class:`ConversionReport`, printed and written;
- ``saving``: the package and its reports, named after it, staged and renamed.

This module holds the public names. It stays light: torch and coremltools are imported when
:func:`convert` runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from milpasses.console import Console, as_console
from milpasses.convert.options import (
    ATTENTION_MODES,
    BUNDLED_NAME,
    DEFAULT_COMPRESSED_MIN_PSNR_DB,
    DEFAULT_MIN_PSNR_DB,
    DEFAULT_SEQ_LEN,
    FRONTENDS,
    KV_CACHE_MODES,
    PRECISIONS,
    SCHEMES,
    TARGETS,
    TASKS,
    Compression,
    Generation,
    Options,
    Task,
)
from milpasses.convert.report import ConversionReport
from milpasses.convert.samples import SAMPLE_QUESTIONS
from milpasses.convert.saving import check_output, report_paths, save
from milpasses.errors import ConversionError, LibraryFailure

__all__ = ["ATTENTION_MODES", "BUNDLED_NAME", "DEFAULT_COMPRESSED_MIN_PSNR_DB", "DEFAULT_MIN_PSNR_DB",
           "DEFAULT_SEQ_LEN", "FRONTENDS", "KV_CACHE_MODES", "PRECISIONS", "SAMPLE_QUESTIONS", "SCHEMES", "TARGETS",
           "TASKS", "Compression", "ConversionError", "ConversionReport", "Generation", "LibraryFailure", "Options",
           "Task", "check_output", "convert", "report_paths", "save"]


def convert(model=None, options: Options | None = None, *, progress: Console | Callable[[str], None] | None = None,
            workdir: str | Path | None = None, **keywords):
    """Convert ``model`` for the ANE and verify it; returns ``(mlmodel, report)``.

    ``model`` is a hub id, a local directory, a loaded ``PreTrainedModel``, None for the
    bundled all-MiniLM-L6-v2 (always offline), or an ONNX model (a ``.onnx`` file, or a directory
    holding ``model.onnx``), verified against ONNX Runtime (``task`` does not apply: the outputs
    are the graph's, at the graph's own static shapes). ``options`` is a checked :class:`Options`;
    or give its keywords (:meth:`Options.check`) directly:

    - ``task`` ("feature-extraction"), ``seq_len`` (128) or ``seq_lens`` (several lengths:
      ``ct.EnumeratedShapes``; an ONNX model: one function per length, ``seq_len_16``..., in an
      iOS18 multifunction package), ``batch`` (1);
    - ``frontend``: ``"trace"`` (``torch.jit.trace``) or ``"export"`` (``torch.export``);
    - ``attention`` (handed to ``ane_pipeline`` only when given), ``target`` (iOS16; iOS18 for
      text generation), ``precision`` ("fp16"), ``offline``, ``trust_remote_code``;
    - ``check_passes``: each ``ane::`` pass simulated before and after it runs; one that changes
      the function stops the conversion, and each pass's report entry carries its check;
    - ``compress``: ``palettize8``, ``palettize6``, ``palettize4`` (data-aware, calibrated on the
      verification samples or on ``calibration``, a file of texts, one a line), ``int8`` or ``auto``
      (bits per layer, the smallest weights keeping every output at ``min_psnr_db``);
    - ``min_psnr_db``: 60 dB, or 40 dB (Apple's acceptance level for 4-bit) when compressing;
    - ``context`` (``task="text-generation"``): a KV-cache decoder, one package with ``prefill``
      (``prefill_chunk`` tokens, 64 or the context) and ``decode`` functions, the cache as inputs
      and outputs (``kv_cache="io"``) or as Core ML state (``"state"``), the prefill returning its
      last token's logits (every token's with ``all_logits``), verified by greedy decoding against
      Hugging Face ``generate``.

    ``progress`` shows the stages: a :class:`milpasses.console.Console`, or a function called with
    each stage's description. A package of several functions is written in ``workdir`` when given,
    else in a temporary directory that lives as long as the returned MLModel. Raises
    :class:`ConversionError` for anything the user can fix or a library fails on, naming the
    stage and the model; the report's ``passed`` says whether every output reached ``min_psnr_db``.
    """
    from milpasses.convert.route import run

    if options is None:
        options = Options.check(**keywords)
    elif keywords:
        raise ConversionError(f"give options or keywords, not both (got {', '.join(sorted(keywords))})")
    return run(model, options, as_console(progress), None if workdir is None else Path(workdir))
