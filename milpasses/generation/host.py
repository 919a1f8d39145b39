"""The host side of generation: the cache, chunked prefill, decode steps, and token choice.

A converted step is any callable ``run(function, inputs) -> outputs`` over numpy arrays, where
``function`` is ``"prefill"`` or ``"decode"``: the simulator on Linux, ``MLModel`` on macOS. For
a ``state`` package it also has ``make_state()`` and takes ``run(function, inputs, state=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from milpasses.frontend.generation_step import CacheShape


class ContextFullError(ValueError):
    """The prompt and the tokens asked for do not fit in the converted context."""


@dataclass
class Sampling:
    """Greedy unless ``top_k`` or ``top_p`` is given; then seeded sampling at ``temperature``."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.top_k is None and self.top_p is None

    def chooser(self) -> Callable[[np.ndarray], int]:
        if self.greedy:
            return lambda logits: int(np.argmax(logits))
        rng = np.random.default_rng(self.seed)

        def choose(logits: np.ndarray) -> int:
            scaled = logits.astype(np.float64) / max(self.temperature, 1e-6)
            order = np.argsort(-scaled)
            if self.top_k is not None:
                order = order[: self.top_k]
            probabilities = np.exp(scaled[order] - scaled[order[0]])
            probabilities /= probabilities.sum()
            if self.top_p is not None:
                # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
                keep = int(np.searchsorted(np.cumsum(probabilities), self.top_p) + 1)
                order, probabilities = order[:keep], probabilities[:keep] / probabilities[:keep].sum()
            return int(order[rng.choice(len(order), p=probabilities)])

        return choose


@dataclass
class Step:
    """One generated token and the logits it was chosen from."""

    token: int
    logits: np.ndarray
    position: int  # the position the token will take


class KVCache:
    """The host's copy of the cache (``io`` packages), (layers, Hkv*d, 1, context) for K and
    for V, fp16: it goes in with every step, and the step's new K and V are written into it."""

    def __init__(self, shape: CacheShape):
        self.shape = shape
        self.keys = np.zeros(shape.array_shape(), dtype=np.float16)
        self.values = np.zeros(shape.array_shape(), dtype=np.float16)

    def run(self, run, function: str, inputs: dict) -> dict:
        return run(function, {**inputs, "key_cache": self.keys, "value_cache": self.values})

    def write(self, position: int, outputs: dict, count: int) -> None:
        self.keys[..., position:position + count] = outputs["new_keys"][..., :count]
        self.values[..., position:position + count] = outputs["new_values"][..., :count]


class StateCache:
    """The cache as the package's state (``state`` packages): made once by the runner
    (``MLModel.make_state()`` on macOS), passed to every step, written by the steps themselves."""

    def __init__(self, run):
        self.state = run.make_state()

    def run(self, run, function: str, inputs: dict) -> dict:
        return run(function, inputs, state=self.state)

    def write(self, position: int, outputs: dict, count: int) -> None:
        pass  # the step wrote its K and V into the state


def cache_bytes_per_token(layers: int, channels: int, context: int) -> dict[str, int]:
    """Bytes of cache that cross the model's boundary per decoded token, fp16: as inputs and
    outputs (io) the whole cache goes in and the token's K and V come out; as state only the
    token's K and V are written in place."""
    entry = 2 * layers * channels * 2
    return {"io": entry * context + entry, "state": entry}


def joined_logits(outputs: dict) -> np.ndarray:
    """The step's ``logits``, or its parts ``logits_0, logits_1, ...`` joined on the vocabulary
    axis in order (a vocabulary wider than the ANE's 16384 leaves the package in parts)."""
    if "logits" in outputs:
        return np.asarray(outputs["logits"], dtype=np.float32)
    parts = [outputs[f"logits_{i}"] for i in range(len(outputs)) if f"logits_{i}" in outputs]
    if not parts:
        raise KeyError(f"the step returned no logits: its outputs are {sorted(outputs)}")
    return np.concatenate([np.asarray(part, dtype=np.float32) for part in parts], axis=-1)


def run_step(run, function: str, tokens: np.ndarray, position: int, cache, count: int | None = None) -> np.ndarray:
    """One step at ``position``, its first ``count`` tokens' K and V kept; its logits."""
    outputs = cache.run(run, function, {"input_ids": tokens.astype(np.int32)[None, :],
                                        "position": np.array([position], dtype=np.int32)})
    cache.write(position, outputs, len(tokens) if count is None else count)
    return joined_logits(outputs)


def prefill(run, prompt: list[int], cache, chunk: int) -> np.ndarray:
    """The prompt's K and V through ``prefill`` in chunks of ``chunk``; the logits of its last token.

    Every chunk is full: a remainder is run as the chunk that ends with the prompt (its first
    tokens, already cached, are computed again from the same cache and written unchanged), so
    the last token is the chunk's last, whose logits the package returns, and no step writes
    past the prompt. A prompt shorter than one chunk is run padded, and its last token then
    again through ``decode`` for its logits (unless the package returns every token's)."""
    if len(prompt) < chunk:
        tokens = np.zeros(chunk, dtype=np.int32)
        tokens[:len(prompt)] = prompt
        logits = run_step(run, "prefill", tokens, 0, cache, len(prompt))
        if logits.shape[1] == chunk:  # a package converted with all_logits
            return logits[0, len(prompt) - 1]
        return run_step(run, "decode", np.array(prompt[-1:]), len(prompt) - 1, cache)[0, -1]
    starts = list(range(0, len(prompt) - chunk + 1, chunk))
    if starts[-1] + chunk < len(prompt):
        starts.append(len(prompt) - chunk)
    for start in starts:
        logits = run_step(run, "prefill", np.asarray(prompt[start:start + chunk]), start, cache)
    return logits[0, -1]


def generate_ids(run, prompt: list[int], shape: CacheShape, chunk: int, max_new_tokens: int,
                 sampling: Sampling | None = None, stop_ids=(), kv_cache: str = "io") -> Iterator[Step]:
    """Tokens as they come: prefill, then one ``decode`` step per token after the first.
    ``kv_cache`` is the package's cache mode: ``io`` (the host keeps the cache) or ``state``."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) > shape.context:
        raise ContextFullError(f"the prompt has {len(prompt)} tokens but the model was converted for a context of "
                               f"{shape.context}; shorten it or convert with a larger --context")
    choose = (sampling or Sampling()).chooser()
    cache = StateCache(run) if kv_cache == "state" else KVCache(shape)
    logits = prefill(run, prompt, cache, chunk)
    position = len(prompt)
    stop_ids = set(stop_ids)
    for produced in range(max_new_tokens):
        token = choose(logits)
        yield Step(token, logits, position)
        if token in stop_ids or produced == max_new_tokens - 1:
            return
        if position >= shape.context:
            raise ContextFullError(f"the context of {shape.context} tokens is full after {produced + 1} new tokens; "
                                   f"convert with a larger --context or ask for fewer tokens")
        logits = run_step(run, "decode", np.array([token]), position, cache)[0, -1]
        position += 1
