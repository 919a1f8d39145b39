"""The host side of generation: the cache, chunked prefill, decode steps, and token choice.

A converted step is any callable ``run(function, inputs) -> outputs`` over numpy arrays, where
``function`` is ``"prefill"`` or ``"decode"``: the simulator on Linux, ``MLModel`` on macOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from milpasses.generation.step import CacheShape


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
    """The host's copy of the cache, (layers, Hkv*d, 1, context) for K and for V, fp16."""

    def __init__(self, shape: CacheShape):
        self.shape = shape
        self.keys = np.zeros(shape.array_shape(), dtype=np.float16)
        self.values = np.zeros(shape.array_shape(), dtype=np.float16)

    def write(self, position: int, new_keys: np.ndarray, new_values: np.ndarray, count: int) -> None:
        self.keys[..., position:position + count] = new_keys[..., :count]
        self.values[..., position:position + count] = new_values[..., :count]


def cache_bytes_per_token(layers: int, channels: int, context: int) -> dict[str, int]:
    """Bytes of cache that cross the model's boundary per decoded token, fp16: as inputs and
    outputs (io) the whole cache goes in and the token's K and V come out; as state only the
    token's K and V are written in place."""
    entry = 2 * layers * channels * 2
    return {"io": entry * context + entry, "state": entry}


def run_step(run, function: str, tokens: np.ndarray, position: int, cache: KVCache):
    outputs = run(function, {"input_ids": tokens.astype(np.int32)[None, :],
                             "position": np.array([position], dtype=np.int32),
                             "key_cache": cache.keys, "value_cache": cache.values})
    return outputs["logits"], outputs["new_keys"], outputs["new_values"]


def prefill(run, prompt: list[int], cache: KVCache, chunk: int) -> np.ndarray:
    """The prompt through ``prefill`` in chunks of ``chunk`` (the last padded), its K and V
    written; the logits of its last token."""
    position, last = 0, None
    while position < len(prompt):
        count = min(chunk, len(prompt) - position)
        tokens = np.zeros(chunk, dtype=np.int32)
        tokens[:count] = prompt[position:position + count]
        logits, new_keys, new_values = run_step(run, "prefill", tokens, position, cache)
        cache.write(position, new_keys, new_values, count)
        last = np.asarray(logits, dtype=np.float32)[0, count - 1]
        position += count
    return last


def generate_ids(run, prompt: list[int], shape: CacheShape, chunk: int, max_new_tokens: int,
                 sampling: Sampling | None = None, stop_ids=()) -> Iterator[Step]:
    """Tokens as they come: prefill, then one ``decode`` step per token after the first."""
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) > shape.context:
        raise ContextFullError(f"the prompt has {len(prompt)} tokens but the model was converted for a context of "
                               f"{shape.context}; shorten it or convert with a larger --context")
    choose = (sampling or Sampling()).chooser()
    cache = KVCache(shape)
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
        step_logits, new_keys, new_values = run_step(run, "decode", np.array([token]), position, cache)
        cache.write(position, new_keys, new_values, 1)
        logits = np.asarray(step_logits, dtype=np.float32)[0, 0]
        position += 1
