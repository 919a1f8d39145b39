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


def convert_traced(traced, inputs: dict, precision: str = "fp16", pass_pipeline=None, target=None,
                   compute_units=None, output_name: str = "last_hidden_state"):
    """``ct.convert`` a traced module to an ML Program whose inputs are named and typed like the
    numpy ``inputs`` and whose single output is ``output_name``. The DEFAULT pipeline unless
    ``pass_pipeline`` is given; iOS16 unless ``target`` is. The model is not loaded (Core ML's
    runtime exists only on macOS)."""
    import coremltools as ct

    return ct.convert(
        traced,
        inputs=[ct.TensorType(name=k, shape=v.shape, dtype=v.dtype) for k, v in inputs.items()],
        outputs=[ct.TensorType(name=output_name)],
        convert_to="mlprogram",
        minimum_deployment_target=target or ct.target.iOS16,
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        compute_units=compute_units or ct.ComputeUnit.ALL,
        pass_pipeline=pass_pipeline or ct.PassPipeline.DEFAULT,
        skip_model_load=True,
    )
