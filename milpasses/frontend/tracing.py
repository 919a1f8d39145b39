"""Turning Hugging Face models into modules ``torch.jit.trace`` can take."""

from __future__ import annotations

import torch


class LastHiddenState(torch.nn.Module):
    """A HF model called with positional tensors, bound to ``input_names``, returning
    ``last_hidden_state`` alone: tracing needs positional inputs and a tensor output."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)

    def forward(self, *tensors):
        return self.model(**dict(zip(self.input_names, tensors))).last_hidden_state


#: An additive mask value fp16 holds: -inf or float32's min would make fully masked rows NaN.
MASK_VALUE = -1e4


class SentencePooling(torch.nn.Module):
    """A sentence-transformers Pooling (+ Normalize) module over ``last_hidden_state``: the
    modes of its ``1_Pooling/config.json`` that are set, concatenated in its order."""

    MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")

    def __init__(self, modes: tuple[str, ...], normalize: bool):
        super().__init__()
        unknown = sorted(set(modes) - set(self.MODES))
        if unknown or not modes:
            raise ValueError(f"unsupported sentence-transformers pooling mode(s) {unknown or modes}; "
                             f"supported: {list(self.MODES)}")
        self.modes = tuple(modes)
        self.normalize = normalize

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        counts = torch.clamp(mask.sum(1), min=1e-9)
        pooled = []
        for mode in self.modes:
            if mode == "cls_token":
                pooled.append(hidden[:, 0])
            elif mode == "max_tokens":
                pooled.append(torch.where(mask > 0, hidden, torch.full_like(hidden, MASK_VALUE)).max(1).values)
            else:
                summed = (hidden * mask).sum(1)
                pooled.append(summed / counts if mode == "mean_tokens" else summed / torch.sqrt(counts))
        embedding = torch.cat(pooled, dim=-1)
        return torch.nn.functional.normalize(embedding, p=2.0, dim=-1) if self.normalize else embedding


def additive_mask(attention_mask: torch.Tensor, causal: bool, dtype=torch.float32) -> torch.Tensor:
    """A (B, 1, S, S) additive mask from a (B, S) padding mask, built without shape arithmetic
    (cumsum positions instead of arange), so a program with enumerated sequence lengths keeps
    the mask in a few elementwise ops instead of transformers' dynamic masking code."""
    keep = attention_mask[:, None, None, :].to(dtype)
    if causal:
        positions = torch.cumsum(torch.ones_like(attention_mask), dim=1)
        keep = keep * (positions[:, None, :, None] >= positions[:, None, None, :]).to(dtype)
    return (1.0 - keep) * MASK_VALUE


class TaskOutputs(torch.nn.Module):
    """A HF model called with positional tensors bound to ``input_names``, returning the named
    fields of its output (a tensor, or a tuple of them), plus ``sentence_embedding`` when a
    ``pooling`` module is given. With ``mask_4d`` the 2-D ``attention_mask`` is handed to the
    model as an additive 4-D mask (see :func:`additive_mask`)."""

    def __init__(self, model: torch.nn.Module, input_names: tuple[str, ...], output_names: tuple[str, ...],
                 pooling: SentencePooling | None = None, mask_4d: bool = False, causal: bool = False):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.mask_4d = mask_4d
        self.causal = causal

    def forward(self, *tensors):
        arguments = dict(zip(self.input_names, tensors))
        padding_mask = arguments.get("attention_mask")
        if self.mask_4d:
            arguments["attention_mask"] = additive_mask(padding_mask, self.causal)
        result = self.model(**arguments)
        outputs = []
        for name in self.output_names:
            if name == "sentence_embedding":
                outputs.append(self.pooling(result.last_hidden_state, padding_mask))
            else:
                outputs.append(getattr(result, name))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
