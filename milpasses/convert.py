"""``convert()``: a Hugging Face model to an ANE-ready ML Program, verified by simulation.

The model (a hub id, a local directory, a loaded ``PreTrainedModel``, or by default the bundled
all-MiniLM-L6-v2) is loaded with the Auto class of its task in eager attention, traced, and
converted with ``ane_pipeline()``. The converted program is then simulated on sample inputs
(the model's own tokenizer on real sentences, or seeded images) and compared with the PyTorch
fp32 model, output by output. Everything done is recorded in a :class:`ConversionReport`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

DEFAULT_MIN_PSNR_DB = 60.0
DEFAULT_SEQ_LEN = 128
TARGETS = ("iOS16", "iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")
ATTENTION_MODES = ("split_einsum", "split_einsum_v2", "batched", "off")
BUNDLED_NAME = "all-MiniLM-L6-v2"


class ConversionError(ValueError):
    """What the user asked for cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class Task:
    auto_class: str
    outputs: tuple[str, ...]
    modality: str | None  # "text", "vision", or None: the model's own
    token_outputs: tuple[str, ...] = ()  # outputs with one row per token (compared on real tokens)


TASKS = {
    "feature-extraction": Task("AutoModel", ("last_hidden_state", "pooler_output"), None, ("last_hidden_state",)),
    "image-feature-extraction": Task("AutoModel", ("last_hidden_state", "pooler_output"), "vision"),
    "fill-mask": Task("AutoModelForMaskedLM", ("logits",), "text", ("logits",)),
    "text-classification": Task("AutoModelForSequenceClassification", ("logits",), "text"),
    "token-classification": Task("AutoModelForTokenClassification", ("logits",), "text", ("logits",)),
    "question-answering": Task("AutoModelForQuestionAnswering", ("start_logits", "end_logits"), "text",
                               ("start_logits", "end_logits")),
    "image-classification": Task("AutoModelForImageClassification", ("logits",), "vision"),
    "text-generation": Task("AutoModelForCausalLM", ("logits",), "text", ("logits",)),
}

#: Verification pairs for question answering: (question, context).
SAMPLE_QUESTIONS = (
    ("Where do transformers run fastest?", "On the Neural Engine, when laid out channels-first."),
    ("What converts PyTorch models?", "coremltools converts them to Core ML."),
)


@dataclass
class ConversionReport:
    model: str
    task: str
    inputs: dict[str, list[list[int]]]  # input name -> its shapes (several with --seq-lens)
    outputs: list[str]
    options: dict
    samples: str = ""
    ops_before: dict[str, int] = field(default_factory=dict)  # DEFAULT pipeline, fp32 program
    ops_after: dict[str, int] = field(default_factory=dict)  # ane_pipeline
    passes: list[dict] = field(default_factory=list)
    psnr: list[dict] = field(default_factory=list)  # {"output", "seq_len", "psnr_db"}
    device_check: str = ""
    verification_error: str = ""  # why the program could not be simulated, if it could not
    fp16_findings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    package_bytes: int | None = None
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB

    @property
    def worst_psnr_db(self) -> float:
        return min((entry["psnr_db"] for entry in self.psnr), default=-math.inf)

    @property
    def passed(self) -> bool:
        return not self.verification_error and self.worst_psnr_db >= self.min_psnr_db

    def failure(self) -> str:
        """Why verification failed, in one line ("" when it passed)."""
        if self.verification_error:
            return f"the converted program could not be simulated: {self.verification_error}"
        if not self.passed:
            worst = min(self.psnr, key=lambda entry: entry["psnr_db"])
            length = "" if worst["seq_len"] is None else f" at sequence length {worst['seq_len']}"
            return (f"PSNR of {worst['output']}{length} is {worst['psnr_db']:.1f} dB, below "
                    f"{self.min_psnr_db:g} dB")
        return ""

    def as_dict(self) -> dict:
        from milpasses import __version__

        return {
            "milpasses_version": __version__, "model": self.model, "task": self.task,
            "inputs": self.inputs, "outputs": self.outputs, "options": self.options,
            "samples": self.samples, "ops_before": self.ops_before, "ops_after": self.ops_after,
            "passes": self.passes,
            "psnr": [{**e, "psnr_db": _json_number(e["psnr_db"])} for e in self.psnr],
            "min_psnr_db": self.min_psnr_db, "verified": self.passed,
            "verification_error": self.verification_error,
            "device_check": self.device_check, "fp16_findings": self.fp16_findings,
            "seconds": self.seconds, "package_bytes": self.package_bytes,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        """The plain-text summary the CLI prints."""
        lines = [f"model    {self.model}", f"task     {self.task}",
                 "inputs   " + ", ".join(f"{n} {' | '.join(_shape(s) for s in shapes)}"
                                        for n, shapes in self.inputs.items()),
                 f"options  {_options_text(self.options)}",
                 f"samples  {self.samples}", "",
                 f"{'output':<20} {'seq_len':>7} {'PSNR dB':>8}  vs PyTorch fp32 (simulated)"]
        for entry in self.psnr:
            verdict = "ok" if entry["psnr_db"] >= self.min_psnr_db else f"BELOW {self.min_psnr_db:g}"
            seq_len = "-" if entry["seq_len"] is None else entry["seq_len"]
            lines.append(f"{entry['output']:<20} {seq_len:>7} {entry['psnr_db']:>8.1f}  {verdict}")
        if self.verification_error:
            lines.append(f"verification could not run: {self.verification_error}")
        lines += ["", f"device   {self.device_check}"]
        if self.fp16_findings:
            lines.append(f"fp16 check: {len(self.fp16_findings)} finding(s)")
            lines += [f"  {finding}" for finding in self.fp16_findings]
        lines.append("")
        lines.append("ops (non-const)  DEFAULT (fp32) -> ane_pipeline: "
                     f"{sum(self.ops_before.values())} -> {sum(self.ops_after.values())}; "
                     + ", ".join(f"{op} {self.ops_before.get(op, 0)}->{self.ops_after.get(op, 0)}"
                                 for op in _changed_ops(self.ops_before, self.ops_after)))
        for report in self.passes:
            skipped = "; ".join(f"{reason} x{n}" for reason, n in report["skipped"].items())
            lines.append(f"{report['pass']}: {sum(report['rewritten'].values())} sites rewritten, "
                         f"{sum(report['skipped'].values())} left alone"
                         + (f" ({skipped})" if skipped else ""))
        lines.append("")
        lines.append("seconds  " + ", ".join(f"{stage} {s:.1f}" for stage, s in self.seconds.items()))
        if self.package_bytes is not None:
            lines.append(f"package  {self.package_bytes / 2**20:.1f} MiB")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"# {self.model} ({self.task})", "",
                 f"Converted by milpasses with `ane_pipeline()`; verification {verdict} "
                 f"(threshold {self.min_psnr_db:g} dB).", "",
                 "## Shapes and options", "", "| input | shapes |", "|---|---|"]
        lines += [f"| {n} | {', '.join(_shape(s) for s in shapes)} |" for n, shapes in self.inputs.items()]
        lines += ["", "| option | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.options.items()]
        lines += ["", "## PSNR against PyTorch fp32 (simulated program)", "", f"Samples: {self.samples}", "",
                  "| output | seq_len | PSNR dB |", "|---|---|---|"]
        lines += [f"| {e['output']} | {e['seq_len'] if e['seq_len'] is not None else '-'} | {e['psnr_db']:.1f} |"
                  for e in self.psnr]
        if self.verification_error:
            lines += ["", f"Verification could not run: {self.verification_error}"]
        lines += ["", f"Device check: {self.device_check}", ""]
        if self.fp16_findings:
            lines += ["fp16 check findings:", ""] + [f"- {f}" for f in self.fp16_findings] + [""]
        lines += ["## Op histogram (non-const ops)", "",
                  "DEFAULT: coremltools' default pipeline on the same traced model, counted on its fp32 "
                  "program (the fp16 casting passes add at most a cast of a float input).", "",
                  "| op | DEFAULT | ane_pipeline |", "|---|---|---|"]
        for op in sorted(set(self.ops_before) | set(self.ops_after)):
            lines.append(f"| {op} | {self.ops_before.get(op, 0)} | {self.ops_after.get(op, 0)} |")
        lines += ["", "## Passes", "", "| pass | rewritten | left alone (why) |", "|---|---|---|"]
        for report in self.passes:
            rewritten = ", ".join(f"{k} x{n}" for k, n in report["rewritten"].items()) or "-"
            skipped = ", ".join(f"{k} x{n}" for k, n in report["skipped"].items()) or "-"
            lines.append(f"| {report['pass']} | {rewritten} | {skipped} |")
        lines += ["", "## Time and size", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {s:.2f} |" for stage, s in self.seconds.items()]
        if self.package_bytes is not None:
            lines += ["", f"Package size: {self.package_bytes / 2**20:.1f} MiB"]
        return "\n".join(lines) + "\n"


def _json_number(value: float):
    return value if math.isfinite(value) else str(value)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)


def _changed_ops(before: dict, after: dict) -> list[str]:
    return [op for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]


def _histogram(program) -> dict[str, int]:
    counts = Counter(op.op_type for op in program.functions["main"].operations if op.op_type != "const")
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ----------------------------------------------------------------------------------- loading


def _is_local_path(model: str) -> bool:
    """A string that can only mean a directory: absolute, relative with ./ or ~, or existing.
    Anything else of the form ``name`` or ``org/name`` is a hub id."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
            or model.count("/") > 1)


def _load(model, task_name: str, offline: bool, trust_remote_code: bool):
    """(model, tokenizer or None, source directory or None, description, whether the pooler's
    weights are missing) for ``model``."""
    import transformers

    task = TASKS[task_name]
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if not isinstance(model, transformers.PreTrainedModel):
            raise ConversionError(f"cannot convert a {type(model).__name__}: pass a transformers "
                                  f"PreTrainedModel, a hub id or a model directory")
        model.config._attn_implementation = "eager"
        return model.eval(), None, None, type(model).__name__, False

    if model is None:
        from milpasses.bundled import bundled_model_dir

        source, description, offline = str(bundled_model_dir()), f"{BUNDLED_NAME} (bundled)", True
    else:
        source = description = os.fspath(model)
        if _is_local_path(source):
            source = os.path.expanduser(source)
            if not os.path.isdir(source):
                raise ConversionError(f"no model directory at {source}: give a directory holding "
                                      f"config.json and model.safetensors, or a hub id")
    loading = dict(local_files_only=offline, trust_remote_code=trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **loading)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load model '{description}': {_first_line(error)}") from error
    auto_class = _model_class(transformers, config, task_name)
    try:
        loaded, info = auto_class.from_pretrained(source, attn_implementation="eager", use_safetensors=True,
                                                  output_loading_info=True, **loading)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ConversionError(f"{config.model_type} has no {task_name} head in transformers; "
                                  f"choose another --task") from error
        raise ConversionError(f"cannot load model '{description}': {_first_line(error)}") from error
    except OSError as error:
        raise ConversionError(f"cannot load model '{description}': {_first_line(error)}"
                              + (" (--offline: only local files are read)" if offline else "")) from error
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
    if missing:
        raise ConversionError(
            f"'{description}' has no trained weights for the {task_name} head ({len(missing)} missing, "
            f"e.g. {missing[0]}); choose the task its checkpoint was trained for")
    loaded.config.use_cache = False
    loaded.eval()
    untrained_pooler = any(k.startswith("pooler.") for k in info.get("missing_keys", ()))
    tokenizer = None
    if _modality(loaded, task) == "text":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **loading)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # verification falls back to seeded token ids, and says so
    return loaded, tokenizer, source, description, untrained_pooler


def _model_class(transformers, config, task_name: str):
    """The Auto class of the task; for feature extraction from a model with two towers or an
    encoder-decoder, the class of the part that extracts features (CLIPVisionModel, T5EncoderModel)."""
    task = TASKS[task_name]
    if task.auto_class != "AutoModel":
        return getattr(transformers, task.auto_class)
    family = type(config).__name__.removesuffix("Config")
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        if task_name != "image-feature-extraction":
            raise ConversionError(f"{config.model_type} has a text and a vision tower: choose "
                                  f"--task image-feature-extraction to convert the vision tower")
        tower = getattr(transformers, type(config.vision_config).__name__.removesuffix("Config") + "Model", None)
        if tower is None:
            raise ConversionError(f"transformers has no vision model class for {config.model_type}")
        return tower
    saved_as_encoder = any(name.endswith("EncoderModel") for name in getattr(config, "architectures", None) or ())
    if getattr(config, "is_encoder_decoder", False) or saved_as_encoder:
        encoder = getattr(transformers, f"{family}EncoderModel", None)
        if encoder is None:
            raise ConversionError(f"{config.model_type} is an encoder-decoder model and transformers has no "
                                  f"{family}EncoderModel to extract features with")
        return encoder
    return transformers.AutoModel


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _modality(model, task: Task) -> str:
    if task.modality is not None:
        return task.modality
    return "vision" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"


def _sentence_pooling(source: str | None):
    """The sentence-transformers pooling described by ``modules.json``, or None."""
    from milpasses.tracing import SentencePooling

    if source is None or not (Path(source) / "modules.json").is_file():
        return None
    modules = json.loads((Path(source) / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if m["type"].endswith(".Pooling")), None)
    if pooling is None:
        return None
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ConversionError(f"sentence-transformers module(s) {unsupported} are not supported; "
                              f"milpasses converts Transformer + Pooling (+ Normalize)")
    settings = json.loads((Path(source) / pooling["path"] / "config.json").read_text())
    modes = tuple(mode for mode in SentencePooling.MODES if settings.get(f"pooling_mode_{mode}"))
    try:
        return SentencePooling(modes, normalize="Normalize" in kinds)
    except ValueError as error:
        raise ConversionError(str(error)) from error


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _uses_token_type_ids(model, tokenizer) -> bool:
    import inspect

    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    segments = getattr(model.config, "type_vocab_size", 0) or 0
    produced = tokenizer is None or "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return accepts and segments > 1 and produced


def _is_causal(model, input_names: tuple[str, ...]) -> bool:
    """Whether attention is causal: changing the last token leaves the first token's output alone."""
    import torch

    ids = torch.full((1, 4), 5, dtype=torch.long)
    changed = ids.clone()
    changed[0, -1] = 6
    extra = {"attention_mask": torch.ones_like(ids)} if "attention_mask" in input_names else {}
    with torch.no_grad():
        first = [model(input_ids=x, **extra)[0][0, 0] for x in (ids, changed)]
    return bool(torch.equal(first[0], first[1]))


# ------------------------------------------------------------------------------ sample inputs


def _text_samples(tokenizer, names: tuple[str, ...], rows: int, seq_len: int, task_name: str,
                  vocab_size: int) -> tuple[dict[str, np.ndarray], str]:
    from milpasses.bundled import SAMPLE_SENTENCES

    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if task_name == "question-answering":
            pairs = [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(rows)]
            batch = tokenizer([q for q, _ in pairs], [c for _, c in pairs], padding="max_length",
                              max_length=seq_len, truncation=True, return_tensors="np")
            what = "question/context pairs"
        else:
            sentences = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(rows)]
            batch = tokenizer(sentences, padding="max_length", max_length=seq_len, truncation=True,
                              return_tensors="np")
            what = "real sentences"
        inputs = {}
        for name in names:
            value = batch[name] if name in batch else np.zeros_like(batch["input_ids"])
            inputs[name] = value.astype(np.int32)
        return inputs, f"{rows} {what}, tokenized by the model's tokenizer, padded to the sequence length"
    rng = np.random.default_rng(0)
    ids = rng.integers(3, max(vocab_size, 4), size=(rows, seq_len)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, max(1, seq_len // 2):] = 0  # every other row padded to half length
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return ({n: inputs[n] for n in names},
            f"{rows} rows of seeded token ids (no tokenizer found), every other row padded")


def _vision_samples(config, rows: int) -> tuple[dict[str, np.ndarray], str]:
    rng = np.random.default_rng(0)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    pixels = rng.standard_normal((rows, getattr(config, "num_channels", 3), size, size)).astype(np.float32)
    return {"pixel_values": pixels}, f"{rows} seeded N(0, 1) images of {size}x{size}"


# ---------------------------------------------------------------------------------- convert


def convert(model=None, task: str = "feature-extraction", seq_len: int | None = None,
            seq_lens: list[int] | tuple[int, ...] | None = None, batch: int = 1,
            attention: str | None = None, target: str = "iOS16", precision: str = "fp16",
            offline: bool = False, trust_remote_code: bool = False,
            min_psnr_db: float = DEFAULT_MIN_PSNR_DB, progress: Callable[[str], None] | None = None):
    """Convert ``model`` for the ANE and verify it; returns ``(mlmodel, report)``.

    ``model`` is a hub id, a local directory, a loaded ``PreTrainedModel``, or None for the
    bundled all-MiniLM-L6-v2 (always offline). ``seq_lens`` (several lengths) gives the sequence
    inputs ``ct.EnumeratedShapes``; ``seq_len`` one fixed length (128 by default). ``attention``
    is handed to ``ane_pipeline`` only when given. Raises :class:`ConversionError` for anything
    the user can fix; the report's ``passed`` says whether every output reached ``min_psnr_db``.
    """
    import coremltools as ct
    import torch

    import milpasses
    from milpasses.passes import last_reports
    from milpasses.pipeline import ane_pipeline
    from milpasses.tracing import TaskOutputs

    say = progress or (lambda message: None)
    lengths = _check_options(task, seq_len, seq_lens, batch, attention, target, precision)
    try:
        pipeline = ane_pipeline(**({} if attention is None else {"attention": attention}))
    except ValueError as error:
        raise ConversionError(f"this milpasses has no attention={attention!r}: {error}") from error
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    say("loading the model")
    hf_model, tokenizer, source, description, untrained_pooler = _load(model, task, offline, trust_remote_code)
    spec = TASKS[task]
    modality = _modality(hf_model, spec)
    seconds["load"] = time.perf_counter() - started

    output_names = list(spec.outputs)
    pooling = _sentence_pooling(source) if task == "feature-extraction" and modality == "text" else None
    if pooling is not None:
        output_names = ["last_hidden_state", "sentence_embedding"]
    if modality == "vision":
        if seq_len is not None or seq_lens is not None:
            raise ConversionError("--seq-len and --seq-lens apply to text models; this one takes images")
        input_names = ("pixel_values",)
        lengths = [None]
    else:
        maximum = _max_positions(hf_model.config)
        if maximum is not None and max(lengths) > maximum:
            raise ConversionError(f"sequence length {max(lengths)} is above the model's maximum of {maximum} "
                                  f"positions: choose --seq-len at most {maximum}")
        input_names = ("input_ids", "attention_mask")
        if _uses_token_type_ids(hf_model, tokenizer):
            input_names += ("token_type_ids",)
    dynamic = len(lengths) > 1
    if dynamic and len(input_names) > 1 and target not in ("iOS18",):
        raise ConversionError(f"--seq-lens needs --target iOS18 for this model: Core ML before iOS 18 allows "
                              f"one input with enumerated shapes, and it has {len(input_names)} "
                              f"({', '.join(input_names)})")

    def samples_at(length):
        rows = batch * max(1, math.ceil(4 / batch))
        if modality == "vision":
            return _vision_samples(hf_model.config, rows)
        return _text_samples(tokenizer, input_names, rows, length, task, hf_model.config.vocab_size)

    started = time.perf_counter()
    say("tracing")
    probe_inputs, _ = samples_at(lengths[0])
    with torch.no_grad():
        raw = hf_model(**dict(zip(input_names, _tensors({k: v[:batch] for k, v in probe_inputs.items()}))))
    output_names = [n for n in output_names if n == "sentence_embedding"
                    or (getattr(raw, n, None) is not None and not (n == "pooler_output" and untrained_pooler))]

    trace_length = lengths[len(lengths) // 2] if dynamic else lengths[0]
    causal = dynamic and _is_causal(hf_model, input_names)
    traced_module = TaskOutputs(hf_model, input_names, tuple(output_names), pooling, mask_4d=dynamic,
                                causal=causal).eval()
    # The reference is the model as transformers runs it, with its own 2-D mask handling.
    reference_module = TaskOutputs(hf_model, input_names, tuple(output_names), pooling).eval()
    example, _ = samples_at(trace_length)
    example = {k: v[:batch] for k, v in example.items()}
    with torch.no_grad():
        # No check_trace: re-running the module to compare is what the verification does, better.
        traced = torch.jit.trace(traced_module, _tensors(example), check_trace=False)
    seconds["trace"] = time.perf_counter() - started

    if modality == "vision":
        shape = list(example["pixel_values"].shape)
        ct_inputs = [ct.TensorType(name="pixel_values", shape=shape, dtype=np.float32)]
        shapes = {"pixel_values": [shape]}
    else:
        if dynamic:
            enumerated = ct.EnumeratedShapes(shapes=[(batch, n) for n in lengths], default=(batch, trace_length))
            ct_inputs = [ct.TensorType(name=n, shape=enumerated, dtype=np.int32) for n in input_names]
        else:
            ct_inputs = [ct.TensorType(name=n, shape=(batch, lengths[0]), dtype=np.int32) for n in input_names]
        shapes = {n: [[batch, length] for length in lengths] for n in input_names}
    common = dict(inputs=ct_inputs, outputs=[ct.TensorType(name=n) for n in output_names],
                  minimum_deployment_target=getattr(ct.target, target),
                  compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)

    started = time.perf_counter()
    say("converting with ane_pipeline()")
    try:
        mlmodel = ct.convert(traced, convert_to="mlprogram", pass_pipeline=pipeline,
                             compute_units=ct.ComputeUnit.CPU_AND_NE, skip_model_load=sys.platform != "darwin",
                             **common)
    except (RuntimeError, NotImplementedError, ValueError) as error:
        raise _frontend_error(error, hf_model.config.model_type) from error
    seconds["convert"] = time.perf_counter() - started
    passes = [report.as_dict() for report in last_reports().values()]

    options = {"task": task, "seq_lens" if dynamic else "seq_len": lengths if dynamic else lengths[0],
               "batch": batch, "attention": attention, "target": target, "precision": precision,
               "offline": offline, "compute_units": "CPU_AND_NE"}
    if modality == "vision":
        options.pop("seq_len")
    report = ConversionReport(model=description, task=task, inputs=shapes, outputs=output_names,
                              options=options, min_psnr_db=min_psnr_db, passes=passes,
                              ops_after=_histogram(mlmodel._mil_program))

    # The DEFAULT pipeline's histogram, for the report, is pure-Python pass work; the verification
    # is mostly torch arithmetic, which releases the GIL. Run side by side, they share the cores.
    # The baseline program is fp32: that skips the fp16 casting passes, the costliest part, and
    # changes its counts by at most one op (the cast of a float input; measured on all fixture
    # families), against the cost of a second fp16 conversion.
    verify_lengths = lengths if len(lengths) <= 3 else [lengths[0], lengths[-1]]
    say(f"verifying: simulating the converted program at {', '.join(str(n) for n in verify_lengths)}, "
        f"and counting the ops of a DEFAULT-pipeline conversion for comparison")
    with ThreadPoolExecutor(max_workers=1) as pool:
        baseline = pool.submit(_timed, ct.convert, traced, convert_to="milinternal",
                               pass_pipeline=ct.PassPipeline.DEFAULT, **{**common, "compute_precision": ct.precision.FLOAT32})
        started = time.perf_counter()
        _verify(mlmodel, reference_module, spec, output_names, verify_lengths, samples_at, batch, report)
        default_program, seconds["baseline"] = baseline.result()
        seconds["verify"] = time.perf_counter() - started  # wall time, the baseline's included
    report.ops_before = _histogram(default_program)
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}

    mlmodel.user_defined_metadata["milpasses.version"] = milpasses.__version__
    mlmodel.user_defined_metadata["milpasses.task"] = task
    mlmodel.user_defined_metadata["milpasses.source_model"] = description
    mlmodel.user_defined_metadata["milpasses.options"] = json.dumps(options)
    mlmodel.short_description = f"{description} ({task}), converted for the ANE by milpasses"
    return mlmodel, report


def _timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def _check_options(task, seq_len, seq_lens, batch, attention, target, precision) -> list[int]:
    if task not in TASKS:
        raise ConversionError(f"unknown task '{task}'; the tasks are {', '.join(TASKS)}")
    for value, name, choices in ((attention, "attention", ATTENTION_MODES), (target, "target", TARGETS),
                                 (precision, "precision", PRECISIONS)):
        if value is not None and value not in choices:
            raise ConversionError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}")
    if seq_len is not None and seq_lens is not None:
        raise ConversionError("give seq_len or seq_lens, not both")
    lengths = sorted(set(seq_lens)) if seq_lens is not None else [seq_len or DEFAULT_SEQ_LEN]
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths) or not isinstance(batch, int) or batch < 1:
        raise ConversionError("sequence lengths and batch must be positive integers")
    return lengths


def _tensors(inputs: dict[str, np.ndarray]):
    import torch

    return tuple(torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v) for v in inputs.values())


def _frontend_error(error: Exception, model_type: str) -> ConversionError:
    """The torch op coremltools cannot convert, named; other conversion failures as they are."""
    match = re.search(r"convert function for op '([^']+)' not implemented", str(error))
    if match:
        return ConversionError(f"coremltools cannot convert the torch op '{match.group(1)}' that {model_type} "
                               f"uses; this architecture is not supported yet")
    return ConversionError(f"coremltools could not convert {model_type}: {_first_line(error)}")


def _verify(mlmodel, reference_module, task: Task, output_names, lengths, samples_at, batch,
            report: ConversionReport) -> None:
    from milpasses.fp16_check import check_fp16
    from milpasses.simulator import SimulationError

    try:
        first_inputs = _compare(mlmodel, reference_module, task, output_names, lengths, samples_at, batch, report)
    except SimulationError as error:
        report.verification_error = str(error)
        report.device_check = "MLModel.predict not run: the simulation failed first"
        return
    if not report.passed:
        report.fp16_findings = [str(f) for f in check_fp16(mlmodel._mil_program, first_inputs)]
    report.device_check = _device_check(mlmodel, reference_module, first_inputs, output_names)


def _compare(mlmodel, reference_module, task: Task, output_names, lengths, samples_at, batch,
             report: ConversionReport) -> dict[str, np.ndarray]:
    """Simulate the program at each length, record PSNR per output; returns the first inputs run."""
    import torch

    from milpasses.simulator import Simulator, psnr

    simulator = Simulator(mlmodel._mil_program)
    first_inputs = None
    for length in lengths:
        inputs, report.samples = samples_at(length)
        rows = len(next(iter(inputs.values())))
        with torch.no_grad():  # the reference takes every row at once: rows do not interact
            expected = reference_module(*_tensors(inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        simulated = {n: [] for n in output_names}
        for start in range(0, rows, batch):
            chunk = {k: v[start:start + batch] for k, v in inputs.items()}
            first_inputs = first_inputs or chunk
            for name, value in simulator.run(chunk).items():
                simulated[name].append(value)
        valid = inputs["attention_mask"].astype(bool) if "attention_mask" in inputs else None
        for name, reference in zip(output_names, expected):
            want, got = reference.numpy(), np.concatenate(simulated[name])
            if name in task.token_outputs and valid is not None:
                want, got = want[valid], got[valid]
            report.psnr.append({"output": name, "seq_len": length, "psnr_db": round(psnr(want, got), 2)})
    return first_inputs


def _device_check(mlmodel, reference_module, inputs, output_names) -> str:
    """On macOS, Core ML's own prediction against PyTorch; elsewhere, say that it was skipped."""
    if sys.platform != "darwin":
        return "MLModel.predict skipped: Core ML runs only on macOS (the simulated PSNR above is the check here)"
    import torch

    from milpasses.simulator import psnr

    try:
        predicted = mlmodel.predict({k: v.astype(np.int32) if v.dtype.kind in "iu" else v for k, v in inputs.items()})
    except Exception as error:  # Core ML's runtime reports its failures in many types
        return f"MLModel.predict failed: {_first_line(error)}"
    with torch.no_grad():
        expected = reference_module(*_tensors(inputs))
    expected = expected if isinstance(expected, tuple) else (expected,)
    scores = [f"{n} {psnr(e.numpy(), predicted[n]):.1f} dB" for n, e in zip(output_names, expected)]
    return "MLModel.predict (CPU_AND_NE) against PyTorch fp32: " + ", ".join(scores)


# -------------------------------------------------------------------------------------- save


def report_paths(output: Path) -> tuple[Path, Path]:
    return output.parent / "report.json", output.parent / "report.md"


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output that cannot or must not be written, before any slow work."""
    if output.suffix != ".mlpackage":
        raise ConversionError(f"the output must end in .mlpackage, got {output}")
    if not overwrite:
        taken = [p for p in (output, *report_paths(output)) if p.exists()]
        if taken:
            raise ConversionError(f"{' and '.join(str(p) for p in taken)} already "
                                  f"{'exists' if len(taken) == 1 else 'exist'}; pass --overwrite to replace")
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        raise ConversionError(f"cannot write to {output.parent}: choose a writable directory with -o")


def save(mlmodel, report: ConversionReport, output, overwrite: bool = False) -> None:
    """Write the package, report.json and report.md beside it. Each is written in a staging
    directory beside the destination and then renamed, so none is ever half-written."""
    import shutil
    import tempfile

    output = Path(output)
    check_output(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".milpasses-", dir=output.parent))
    try:
        package = staging / output.name
        mlmodel.save(str(package))
        report.package_bytes = sum(f.stat().st_size for f in package.rglob("*") if f.is_file())
        json_path, markdown_path = report_paths(output)
        (staging / json_path.name).write_text(report.to_json() + "\n")
        (staging / markdown_path.name).write_text(report.to_markdown())
        if output.exists():
            shutil.rmtree(output)
        os.replace(package, output)
        os.replace(staging / json_path.name, json_path)
        os.replace(staging / markdown_path.name, markdown_path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
