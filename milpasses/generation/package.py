"""A text-generation package (``prefill`` and ``decode`` functions sharing one copy of the
weights) run in the simulator, and its check: greedy tokens from the package against Hugging
Face ``generate``, and each step's logits against torch's and against its DEFAULT twin's (the
same steps converted by coremltools' DEFAULT pipeline, fed the same tokens)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from milpasses.generation.host import KVCache, Sampling, StateCache, generate_ids, prefill, run_step
from milpasses.frontend.generation_step import cache_shape

FUNCTIONS = ("prefill", "decode")
#: A divergence where torch's top-2 logits are closer than this many fp16 spacings is a near tie.
NEAR_TIE_SPACINGS = 4
#: How far a package's worst step may fall below its DEFAULT twin's (the same steps rounded in
#: DEFAULT's op order): 11 of the 13 fixture families measure -0.5 to +2.2 dB against their twins.
TWIN_ALLOWANCE_DB = 1.0


class SimulatedPackage:
    """``run(function, inputs[, state])`` over a package's functions, simulated (Linux or macOS)."""

    def __init__(self, package):
        from milpasses.simulator import Simulator, load_program

        program = load_program(package)
        self.simulators = {name: Simulator(program, name) for name in FUNCTIONS}

    def make_state(self) -> dict:
        """The cache state of a ``state`` package, zeros; both functions read and write it."""
        return self.simulators["decode"].make_state()

    def __call__(self, function: str, inputs: dict, state: dict | None = None) -> dict:
        return self.simulators[function].run(inputs, state=state)


@dataclass
class PromptCheck:
    prompt: str
    expected: list[int]  # Hugging Face generate, greedy
    produced: list[int]
    psnr_db: list[float] = field(default_factory=list)  # per step, against torch fed the same tokens
    margin_at_divergence: float | None = None  # torch's top-2 logit gap where the tokens diverge
    fp16_spacing: float | None = None  # the fp16 spacing of torch's largest logit there
    default_psnr_db: list[float] | None = None  # per step, the DEFAULT twin fed the same tokens

    @property
    def near_tie(self) -> bool:
        """The divergence is at a step where torch's two best tokens are closer than a few fp16
        steps of the logits: any fp16 program picks either, so it is not an error."""
        return self.margin_at_divergence is not None and self.margin_at_divergence < NEAR_TIE_SPACINGS * self.fp16_spacing

    @property
    def matched(self) -> int:
        """Tokens equal to Hugging Face's before the first divergence."""
        for i, (a, b) in enumerate(zip(self.expected, self.produced)):
            if a != b:
                return i
        return min(len(self.expected), len(self.produced))

    @property
    def first_divergence(self) -> int | None:
        return None if self.matched == len(self.expected) == len(self.produced) else self.matched

    @property
    def worst_psnr_db(self) -> float:
        return min(self.psnr_db, default=-math.inf)

    @property
    def default_worst_psnr_db(self) -> float | None:
        return None if self.default_psnr_db is None else min(self.default_psnr_db, default=-math.inf)

    @property
    def within_twin(self) -> bool:
        """The worst step is at most ``TWIN_ALLOWANCE_DB`` below the DEFAULT twin's (True with no twin)."""
        twin = self.default_worst_psnr_db
        return twin is None or self.worst_psnr_db >= twin - TWIN_ALLOWANCE_DB

    def as_dict(self) -> dict:
        worst, twin = self.worst_psnr_db, self.default_worst_psnr_db
        return {"prompt": self.prompt, "tokens": len(self.expected), "matched": self.matched,
                "first_divergence": self.first_divergence, "near_tie": self.near_tie,
                "margin_at_divergence": self.margin_at_divergence,
                "expected": self.expected, "produced": self.produced,
                "psnr_db": [round(p, 2) for p in self.psnr_db],
                "worst_psnr_db": _rounded(worst),
                **({} if twin is None else {"default_psnr_db": [round(p, 2) for p in self.default_psnr_db],
                                            "default_worst_psnr_db": _rounded(twin)})}


def check_prompt(run, model, prompt_ids: list[int], context: int, prefill_chunk: int, new_tokens: int,
                 label: str = "", kv_cache: str = "io", twin=None) -> PromptCheck:
    """``new_tokens`` greedy tokens from ``run`` against Hugging Face ``generate`` on the same
    prompt, and each step's logits against the torch model fed the tokens the package chose.
    Both stop after the model's end-of-sequence token, as both generate loops do (forcing
    ``generate`` on with ``min_new_tokens`` would ban that token there, and the package's
    greedy choice of it would read as a divergence). ``twin``, a runner of the same steps
    converted otherwise (the DEFAULT pipeline's package), is fed the same tokens and scored on
    the same steps."""
    from milpasses.simulator import psnr

    shape = cache_shape(model, context)
    steps = list(generate_ids(run, prompt_ids, shape, prefill_chunk, new_tokens, Sampling(),
                              stop_ids=_eos_ids(model), kv_cache=kv_cache))
    produced = [s.token for s in steps]
    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=_pad_id(model))[0, len(prompt_ids):].tolist()
        logits = model(torch.tensor([prompt_ids + produced[:-1]])).logits[0].float().numpy()
    psnrs = [psnr(logits[len(prompt_ids) - 1 + i], step.logits) for i, step in enumerate(steps)]
    check = PromptCheck(label, expected, produced, psnrs)
    if twin is not None:
        twin_logits = forced_step_logits(twin, prompt_ids, produced, shape, prefill_chunk, kv_cache)
        check.default_psnr_db = [psnr(logits[len(prompt_ids) - 1 + i], step) for i, step in enumerate(twin_logits)]
    if check.first_divergence is not None and check.first_divergence < len(produced):
        reference = logits[len(prompt_ids) - 1 + check.first_divergence]
        best = np.sort(reference)[-2:]
        check.margin_at_divergence = float(best[1] - best[0])
        check.fp16_spacing = float(np.spacing(np.float16(np.abs(reference).max())))
    return check


def forced_step_logits(run, prompt_ids: list[int], tokens: list[int], shape, prefill_chunk: int,
                       kv_cache: str = "io") -> list[np.ndarray]:
    """The logits of each step that chose ``tokens`` after the prompt, ``run`` fed those tokens
    whatever it would choose: the prompt's last logits, then one decode step per token but the last."""
    cache = StateCache(run) if kv_cache == "state" else KVCache(shape)
    logits = [prefill(run, prompt_ids, cache, prefill_chunk)]
    for position, token in enumerate(tokens[:-1], start=len(prompt_ids)):
        logits.append(run_step(run, "decode", np.array([token]), position, cache)[0, -1])
    return logits


def _rounded(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _pad_id(model) -> int:
    config = model.generation_config
    for candidate in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0
