"""What a conversion may be asked for, checked once, in one place, before any slow work.

:meth:`Options.check` takes what ``convert()`` and the command line take and returns a frozen
:class:`Options`, with text generation and compression as sub-objects; every later stage reads
the checked values and checks nothing again.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from milpasses.errors import ConversionError

DEFAULT_MIN_PSNR_DB = 60.0
DEFAULT_COMPRESSED_MIN_PSNR_DB = 40.0  # Apple's acceptance level for 4-bit palettization
DEFAULT_SEQ_LEN = 128
DEFAULT_PREFILL_CHUNK = 64
TARGETS = ("iOS16", "iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")
ATTENTION_MODES = ("split_einsum", "split_einsum_v2", "batched", "off")
FRONTENDS = ("trace", "export")
KV_CACHE_MODES = ("io", "state")
SCHEMES = ("palettize8", "palettize6", "palettize4", "int8", "auto")
BUNDLED_NAME = "all-MiniLM-L6-v2"
_PER_BLOCK = re.compile(r"(u?int4|int8[-_]?block|block|per[-_]?block|c4w|w4a16)", re.IGNORECASE)


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


@dataclass(frozen=True)
class Generation:
    """A KV-cache decoder: ``prefill`` of ``prefill_chunk`` tokens and ``decode`` of one, over a
    cache of ``context`` positions kept as inputs and outputs (``io``) or as Core ML state."""

    context: int
    prefill_chunk: int
    kv_cache: str = "io"
    all_logits: bool = False  # prefill returns every token's logits, not only the last one's


@dataclass(frozen=True)
class Compression:
    """A weight compression scheme, and the texts palettize4 calibrates on (None: the samples)."""

    scheme: str
    calibration: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Options:
    """A checked request. ``lengths`` are the sequence lengths, sorted (one unless enumerated)."""

    task: str = "feature-extraction"
    lengths: tuple[int, ...] = (DEFAULT_SEQ_LEN,)
    batch: int = 1
    attention: str | None = None
    target: str = "iOS16"
    precision: str = "fp16"
    offline: bool = False
    trust_remote_code: bool = False
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    check_passes: bool = False  # ane_pipeline(check=True): each pass simulated before and after
    frontend: str = "trace"  # how a torch model reaches coremltools: torch.jit.trace or torch.export
    lengths_given: bool = False  # False: the default length, which images and fixed-shape graphs ignore
    batch_given: bool = False  # False: batch 1 by default, which a fixed-shape graph overrides
    generation: Generation | None = None
    compression: Compression | None = None

    @property
    def spec(self) -> Task:
        return TASKS[self.task]

    @property
    def enumerated(self) -> bool:
        return len(self.lengths) > 1

    @classmethod
    def check(cls, task: str = "feature-extraction", seq_len: int | None = None, seq_lens=None,
              batch: int | None = None, attention: str | None = None, target: str | None = None,
              precision: str = "fp16", offline: bool = False, trust_remote_code: bool = False,
              min_psnr_db: float | None = None, compress: str | None = None, calibration=None,
              check_passes: bool = False, context: int | None = None, prefill_chunk: int | None = None,
              kv_cache: str = "io", all_logits: bool = False, frontend: str = "trace") -> Options:
        """The options of ``convert()``'s keywords, or a ConversionError naming the first wrong one
        and what to do."""
        if task not in TASKS:
            raise ConversionError(f"unknown task '{task}'; the tasks are {', '.join(TASKS)}")
        for value, name, choices in ((attention, "attention", ATTENTION_MODES), (target, "target", TARGETS),
                                     (precision, "precision", PRECISIONS), (frontend, "frontend", FRONTENDS),
                                     (kv_cache, "kv_cache", KV_CACHE_MODES)):
            if value is not None and value not in choices:
                raise ConversionError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}")
        if seq_len is not None and seq_lens is not None:
            raise ConversionError("give seq_len or seq_lens, not both")
        lengths = sorted(set(seq_lens)) if seq_lens is not None else [seq_len or DEFAULT_SEQ_LEN]
        if not lengths or any(not _positive(n) for n in lengths) or not (batch is None or _positive(batch)):
            raise ConversionError("sequence lengths and batch must be positive integers")
        if check_passes and len(lengths) > 1:
            raise ConversionError("the per-pass check simulates the program at one shape: give one sequence "
                                  "length (seq_len), not several, with check_passes")
        compression = _compression(compress, calibration)
        generation = _generation(task, context, prefill_chunk, kv_cache, all_logits, seq_len, seq_lens, batch, target)
        if generation is not None:
            if check_passes or compression is not None:
                raise ConversionError("--check-passes and --compress do not apply to text generation yet: convert "
                                      "without them")
            target = "iOS18"
        target = target or "iOS16"
        if compression is not None and compression.scheme not in ("int8", "palettize8") and target != "iOS18":
            raise ConversionError(f"--compress {compression.scheme} needs --target iOS18 (a lookup table per "
                                  f"group of channels is an iOS18 form)")
        if min_psnr_db is None:
            min_psnr_db = DEFAULT_MIN_PSNR_DB if compression is None else DEFAULT_COMPRESSED_MIN_PSNR_DB
        if generation is not None:
            lengths = [1]  # the steps' shapes come from the context and the chunk
        return cls(task=task, lengths=tuple(lengths), batch=batch or 1, attention=attention, target=target,
                   precision=precision, offline=offline, trust_remote_code=trust_remote_code,
                   min_psnr_db=float(min_psnr_db), check_passes=check_passes, frontend=frontend,
                   lengths_given=seq_len is not None or seq_lens is not None, batch_given=batch is not None,
                   generation=generation, compression=compression)

    def recorded(self, takes_images: bool = False, lengths: bool = True) -> dict:
        """The options as the report and the package's metadata record them."""
        options: dict = {"task": self.task}
        if self.generation is not None:
            options.update(asdict(self.generation))
        elif lengths and not takes_images:
            options.update({"seq_lens": list(self.lengths)} if self.enumerated else {"seq_len": self.lengths[0]})
        if self.generation is None:
            options["batch"] = self.batch
        options.update(attention=self.attention, target=self.target, precision=self.precision, offline=self.offline,
                       compute_units="CPU_AND_NE")
        if self.frontend != "trace":
            options["frontend"] = self.frontend
        if self.check_passes:
            options["check_passes"] = True
        return options


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _compression(scheme: str | None, calibration) -> Compression | None:
    if scheme is None:
        if calibration is not None:
            raise ConversionError("--calibration is read by --compress palettize4 only (the data-aware scheme)")
        return None
    if scheme not in SCHEMES:
        if _PER_BLOCK.search(scheme):
            raise ConversionError(
                f"compression '{scheme}' is per-block integer quantization, which the Neural Engine does not run "
                f"(Core ML computes it wrong or moves it off the NE: coremltools #2510); use int8 (one scale per "
                f"output channel) or palettize4/palettize6 (lookup tables)")
        raise ConversionError(f"unknown compression '{scheme}'; choose one of {', '.join(SCHEMES)}")
    return Compression(scheme, _calibration_texts(calibration, scheme))


def _calibration_texts(path, scheme: str) -> tuple[str, ...] | None:
    """The calibration texts of ``path`` (one per non-empty line)."""
    if path is None:
        return None
    if scheme != "palettize4":
        raise ConversionError("--calibration is read by --compress palettize4 only (the data-aware scheme)")
    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"calibration file {file} does not exist; give a text file, one sample a line")
    texts = tuple(line.strip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip())
    if not texts:
        raise ConversionError(f"calibration file {file} has no text; give one sample a line")
    return texts


def _generation(task: str, context, prefill_chunk, kv_cache: str, all_logits: bool, seq_len, seq_lens, batch,
                target: str | None) -> Generation | None:
    """The KV-cache decoder asked for with ``context``, or None."""
    if context is None:
        if prefill_chunk is not None or kv_cache != "io" or all_logits:
            raise ConversionError("--prefill-chunk, --kv-cache and --all-logits need --context (the KV cache's length)")
        return None
    if task != "text-generation":
        raise ConversionError(f"--context applies to --task text-generation, not {task}")
    if seq_len is not None or seq_lens is not None:
        raise ConversionError("--seq-len and --seq-lens do not apply with --context: the prefill chunk "
                              "(--prefill-chunk) and the context fix the shapes")
    if batch not in (None, 1):
        raise ConversionError("a KV-cache decoder is converted for batch 1")
    if target not in (None, "iOS18"):
        # Two functions sharing one copy of the weights (multifunction) and Core ML states are
        # both iOS18 features; two separate packages would store the weights twice.
        raise ConversionError(f"text generation needs --target iOS18 (multifunction packages and states are iOS18 "
                              f"features), got --target {target}: convert with --target iOS18 or without --target")
    if not _positive(context) or context < 2:
        raise ConversionError(f"--context must be an integer of at least 2, got {context}")
    chunk = min(DEFAULT_PREFILL_CHUNK, context) if prefill_chunk is None else prefill_chunk
    if not _positive(chunk):
        raise ConversionError(f"--prefill-chunk must be a positive integer, got {prefill_chunk}")
    if chunk > context:
        raise ConversionError(f"--prefill-chunk {chunk} is larger than --context {context}: choose a chunk of at "
                              f"most {context}")
    return Generation(context, chunk, kv_cache, bool(all_logits))
