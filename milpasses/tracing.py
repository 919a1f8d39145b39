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
