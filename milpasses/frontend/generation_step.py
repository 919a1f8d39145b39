"""One KV-cache step of any Hugging Face causal LM, as a module ``torch.jit.trace`` records.

The step takes ``input_ids`` (1, Q), ``position`` (1,) (the position of its first token) and the
cache of every layer in the ANE's sequence-last layout, ``key_cache`` and ``value_cache`` of shape
(layers, Hkv*d, 1, context): slot j holds position j, and slots from ``position`` on are ignored.
It returns the logits of its last token (of all Q with ``all_logits``) and the Q tokens' new K
(after rotary) and V in the same layout, (layers, Hkv*d, 1, Q); the host writes them into slots
``position ..``. :class:`KVCacheStateStep` is the same step with the cache kept as the model's
state (iOS18 ``StateType``): it writes the new K and V into its cache itself.

No family-specific code: transformers' attention layers call ``cache.update(new_k, new_v, layer)``
and attend over what it returns, so :class:`StepCache` returns the cache concatenated with the
new keys, and records the new ones. The mask is handed to the model already built (transformers
passes a 4-D mask through as it is; models with several kinds of layer take one per kind), from
the position, in-graph: cache slot j is seen by query i when j < position and, in a sliding
layer, position + i - j < window; the new tokens see each other causally.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from milpasses.frontend.function import Function
from milpasses.frontend.tracing import MASK_VALUE


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: int
    head_dim: int
    context: int

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim

    def array_shape(self, length: int | None = None) -> tuple[int, int, int, int]:
        return (self.layers, self.channels, 1, self.context if length is None else length)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def cache_shape(model, context: int) -> CacheShape:
    """The cache a causal LM needs at ``context``, from its config (the generic field names
    transformers normalises every config to)."""
    config = _text_config(model.config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if getattr(config, "multi_query", False):
        kv_heads = 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return CacheShape(config.num_hidden_layers, kv_heads, head_dim, context)


class StepCache(Cache):
    """The cache the model sees during one traced step: ``update`` returns the layer's cache
    with the new keys appended (keys first, then the step's tokens) and keeps the new ones."""

    def __init__(self, key_cache: torch.Tensor, value_cache: torch.Tensor, shape: CacheShape):
        # Cache.__init__ builds per-layer storage this cache does not use.
        self.layers = []
        self.shape = shape
        self.key_cache = key_cache
        self.value_cache = value_cache
        self.new_keys: list[torch.Tensor | None] = [None] * shape.layers
        self.new_values: list[torch.Tensor | None] = [None] * shape.layers

    def _heads(self, cache: torch.Tensor, layer: int) -> torch.Tensor:
        # (1, Hkv*d, 1, C) -> (1, Hkv, C, d), the layout transformers' attention reads.
        s = self.shape
        return cache[layer:layer + 1].reshape(1, s.kv_heads, s.head_dim, s.context).transpose(2, 3)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_keys[layer_idx] = key_states
        self.new_values[layer_idx] = value_states
        keys = torch.cat([self._heads(self.key_cache, layer_idx).to(key_states.dtype), key_states], dim=2)
        values = torch.cat([self._heads(self.value_cache, layer_idx).to(value_states.dtype), value_states], dim=2)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.shape.context

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        return self.shape.context + query_length, 0

    @property
    def is_compileable(self) -> bool:
        return False

    def stacked(self, states: list[torch.Tensor]) -> torch.Tensor:
        """(1, Hkv, Q, d) per layer -> (layers, Hkv*d, 1, Q)."""
        s = self.shape
        return torch.cat([t.transpose(2, 3).reshape(1, s.channels, 1, t.shape[2]) for t in states], dim=0)


def step_mask(position: torch.Tensor, query_length: int, context: int, window: int | None) -> torch.Tensor:
    """The additive (1, 1, Q, context + Q) mask of one step, finite, from its first position."""
    queries = torch.arange(query_length)[:, None]
    slots = torch.arange(context)[None, :]
    query_positions = position + queries
    seen_cache = (slots < position).expand(query_length, context)
    seen_new = torch.arange(query_length)[None, :] <= queries
    if window is not None:
        seen_cache = seen_cache & (query_positions - slots < window)
        seen_new = seen_new & (queries - torch.arange(query_length)[None, :] < window)
    seen = torch.cat([seen_cache, seen_new], dim=1)
    return torch.where(seen, 0.0, MASK_VALUE)[None, None]


def sliding_window(model) -> int | None:
    config = _text_config(model.config)
    return getattr(config, "sliding_window", None) or getattr(config, "attention_window_size", None)


class RotaryTables(torch.nn.Module):
    """A rotary embedding module answering from cos/sin tables computed once, in float32, for
    every position of the context: transformers' own module would compute the angles from the
    run-time positions in the program's fp16, where position * frequency loses its fraction
    (at position 1000 the angle is off by up to 0.25 rad)."""

    def __init__(self, rotary: torch.nn.Module, context: int):
        super().__init__()
        self.rotary = rotary
        self.last_position = context - 1
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(context)[None])
        self.register_buffer("cos_table", cos[0].float(), persistent=False)
        self.register_buffer("sin_table", sin[0].float(), persistent=False)

    def forward(self, x, position_ids, *args, **kwargs):
        if args or kwargs:  # a variant the tables were not computed for (a per-layer-type rotary)
            return self.rotary(x, position_ids, *args, **kwargs)
        # minimum, not clamp: coremltools turns clamp into a float clip, and indices stay integers.
        positions = torch.minimum(position_ids[0], torch.tensor(self.last_position))
        cos = torch.index_select(self.cos_table, 0, positions)[None]
        sin = torch.index_select(self.sin_table, 0, positions)[None]
        return cos.to(x.dtype), sin.to(x.dtype)


def _rotary_modules(model: torch.nn.Module, context: int) -> list:
    """(parent, name, module, tables) for every rotary module of ``model``: transformers names
    them ``*RotaryEmbedding`` and calls them with ``(x, position_ids)``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding"):
                try:
                    found.append((parent, name, child, RotaryTables(child, context)))
                except TypeError:
                    continue  # its forward takes other arguments: left as it is
    return found


@contextlib.contextmanager
def _swapped(swaps):
    """The rotary modules replaced by their tables for one call, the model restored after."""
    for parent, name, _, tables in swaps:
        setattr(parent, name, tables)
    try:
        yield
    finally:
        for parent, name, module, _ in swaps:
            setattr(parent, name, module)


class KVCacheStep(torch.nn.Module):
    """``(input_ids, position, key_cache, value_cache) -> (logits, new_keys, new_values)``.

    ``logits`` is the last token's (1, 1, vocab), the LM head run on that token only; with
    ``all_logits``, every token's (1, Q, vocab)."""

    def __init__(self, model: torch.nn.Module, context: int, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.all_logits = all_logits
        self.rotary = _rotary_modules(model, context)
        self.shape = cache_shape(model, context)
        config = _text_config(model.config)
        self.layer_types = tuple(getattr(config, "layer_types", None) or ())
        self.window = sliding_window(model)
        self.max_position = getattr(config, "max_position_embeddings", None)

    def masks(self, position, query_length):
        context = self.shape.context
        full = step_mask(position, query_length, context, None)
        if not self.layer_types:
            # A model with one kind of layer and a window everywhere (Mistral) slides in every layer.
            uses_window = self.window is not None and getattr(_text_config(self.model.config), "use_sliding_window", True)
            return step_mask(position, query_length, context, self.window) if uses_window else full
        masks = {}
        for kind in set(self.layer_types):
            masks[kind] = step_mask(position, query_length, context, self.window) if "sliding" in kind else full
        return masks

    def forward(self, input_ids, position, key_cache, value_cache):
        query_length = input_ids.shape[1]
        position = position.to(torch.long)
        position_ids = (position + torch.arange(query_length))[None, :]
        if self.max_position is not None:
            # The padded tail of a last prefill chunk may run past the model's positions; its
            # outputs are never read, but a position-embedding lookup must stay in range.
            position_ids = torch.minimum(position_ids, torch.tensor(self.max_position - 1))
        cache = StepCache(key_cache, value_cache, self.shape)
        # transformers' causal LMs take logits_to_keep: the LM head then runs on the last token only.
        keep = {} if self.all_logits else {"logits_to_keep": 1}
        with _swapped(self.rotary):
            output = self.model(input_ids=input_ids.to(torch.long), position_ids=position_ids,
                                attention_mask=self.masks(position, query_length), cache=cache, use_cache=True,
                                **keep)
        logits = output.logits if self.all_logits else output.logits[:, -1:]
        return logits, cache.stacked(cache.new_keys), cache.stacked(cache.new_values)


#: The ANE fails on a state whose contiguous (last) axis is not a multiple of 32 (coremltools
#: #2631, a community report): a state cache's context axis is rounded up to one.
STATE_AXIS_MULTIPLE = 32


def state_slots(context: int) -> int:
    """The slots of a state cache for ``context`` positions: the slots past the context are
    never attended (the mask hides every slot from ``position`` on) nor written by the host."""
    return -(-context // STATE_AXIS_MULTIPLE) * STATE_AXIS_MULTIPLE


class KVCacheStateStep(torch.nn.Module):
    """``(input_ids, position) -> logits``, the cache in the registered buffers ``key_cache`` and
    ``value_cache`` (fp16, (layers, Hkv*d, 1, slots)), which coremltools' torch frontend turns
    into states: the step attends over what it reads (the same per-head region as the I/O step)
    and then writes its tokens' K and V at ``position ..`` with a slice assignment, which becomes
    ``slice_update`` + ``coreml_update_state``. The host keeps ``position + Q <= slots``."""

    def __init__(self, model: torch.nn.Module, context: int, all_logits: bool = False):
        super().__init__()
        self.step = KVCacheStep(model, state_slots(context), all_logits)
        self.shape = self.step.shape
        self.register_buffer("key_cache", torch.zeros(self.shape.array_shape(), dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(self.shape.array_shape(), dtype=torch.float16))

    def forward(self, input_ids, position):
        logits, new_keys, new_values = self.step(input_ids, position, self.key_cache, self.value_cache)
        start = position[0].to(torch.long)
        end = start + input_ids.shape[1]
        self.key_cache[:, :, :, start:end] = new_keys.to(torch.float16)
        self.value_cache[:, :, :, start:end] = new_values.to(torch.float16)
        return logits


def step_examples(shape: CacheShape, query_length: int, kv_cache: str = "io") -> dict:
    """Example inputs of a step of ``query_length`` tokens, as numpy arrays keyed by input name
    (a state step's cache is its state, not an input)."""
    import numpy as np

    examples = {"input_ids": np.zeros((1, query_length), dtype=np.int32),
                "position": np.zeros((1,), dtype=np.int32)}
    if kv_cache == "io":
        examples["key_cache"] = np.zeros(shape.array_shape(), dtype=np.float16)
        examples["value_cache"] = np.zeros(shape.array_shape(), dtype=np.float16)
    return examples


def step_module(model, context: int, kv_cache: str = "io", all_logits: bool = False) -> torch.nn.Module:
    step = KVCacheStateStep if kv_cache == "state" else KVCacheStep
    return step(model, context, all_logits).eval()


def trace_step(model, context: int, query_length: int, kv_cache: str = "io",
               all_logits: bool = False) -> torch.jit.ScriptModule:
    step = step_module(model, context, kv_cache, all_logits)
    examples = step_examples(step.shape, query_length, kv_cache)
    tensors = tuple(torch.from_numpy(v.astype("float32") if v.dtype.kind == "f" else v) for v in examples.values())
    with torch.no_grad():
        return torch.jit.trace(step, tensors, check_trace=False)


def step_function(model, context: int, query_length: int, kv_cache: str = "io", all_logits: bool = False,
                  precision: str = "fp16", name: str = "main") -> Function:
    """The traced step of ``query_length`` tokens with its typed inputs and outputs: fp16 cache
    inputs and new K/V outputs (``io``), or fp16 cache states updated in place (``state``)."""
    import coremltools as ct
    import numpy as np

    traced = trace_step(model, context, query_length, kv_cache, all_logits)
    shape = cache_shape(model, state_slots(context) if kv_cache == "state" else context)
    examples = step_examples(shape, query_length, kv_cache)
    outputs = [ct.TensorType(name="logits", dtype=np.float16 if precision == "fp16" else np.float32)]
    states = []
    if kv_cache == "io":
        outputs += [ct.TensorType(name="new_keys", dtype=np.float16), ct.TensorType(name="new_values", dtype=np.float16)]
    else:
        # Core ML states are fp16 only; their names are the buffers'.
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape.array_shape(), dtype=np.float16), name=name)
                  for name in ("key_cache", "value_cache")]
    inputs = [ct.TensorType(name=k, shape=v.shape, dtype=v.dtype) for k, v in examples.items()]
    return Function(name, traced, inputs, outputs, states)
