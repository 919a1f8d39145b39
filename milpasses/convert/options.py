"""What a conversion may be asked for, and the checks made before any slow work."""

from __future__ import annotations

from dataclasses import dataclass

from milpasses.errors import ConversionError

DEFAULT_MIN_PSNR_DB = 60.0
DEFAULT_SEQ_LEN = 128
TARGETS = ("iOS16", "iOS17", "iOS18")
PRECISIONS = ("fp16", "fp32")
ATTENTION_MODES = ("split_einsum", "split_einsum_v2", "batched", "off")
BUNDLED_NAME = "all-MiniLM-L6-v2"


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
class Options:
    """A checked request. ``lengths`` are the sequence lengths, sorted (one unless enumerated)."""

    task: str
    lengths: tuple[int, ...]
    batch: int
    attention: str | None
    target: str
    precision: str
    offline: bool
    trust_remote_code: bool
    min_psnr_db: float
    lengths_given: bool  # False: the default length, which a model taking images ignores
    check_passes: bool = False  # ane_pipeline(check=True): each pass simulated before and after

    @property
    def spec(self) -> Task:
        return TASKS[self.task]

    @property
    def enumerated(self) -> bool:
        return len(self.lengths) > 1

    def recorded(self, takes_images: bool) -> dict:
        """The options as the report and the package's metadata record them."""
        options: dict = {"task": self.task}
        if not takes_images:
            options.update({"seq_lens": list(self.lengths)} if self.enumerated else {"seq_len": self.lengths[0]})
        options.update(batch=self.batch, attention=self.attention, target=self.target, precision=self.precision,
                       offline=self.offline, compute_units="CPU_AND_NE")
        if self.check_passes:
            options["check_passes"] = True
        return options


def check_options(task: str, seq_len: int | None, seq_lens, batch: int, attention: str | None, target: str,
                  precision: str, offline: bool, trust_remote_code: bool, min_psnr_db: float,
                  check_passes: bool = False) -> Options:
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
    if check_passes and len(lengths) > 1:
        raise ConversionError("the per-pass check simulates the program at one shape: give one sequence length "
                              "(seq_len), not several, with check_passes")
    return Options(task, tuple(lengths), batch, attention, target, precision, offline, trust_remote_code, min_psnr_db,
                   lengths_given=seq_len is not None or seq_lens is not None, check_passes=check_passes)
