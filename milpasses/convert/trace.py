"""Reading a Hugging Face model for coremltools: the module ``torch.jit.trace`` records (or
``torch.export`` exports, with ``frontend="export"``), with the task's outputs, and the
reference the converted program is compared with.

The traced module takes positional tensors and returns the outputs the model really produces
for the task (``pooler_output`` only when the checkpoint trained a pooler), plus
``sentence_embedding`` for a sentence-transformers model. With enumerated lengths the mask
enters as an additive 4-D mask, built without shape arithmetic (``milpasses.frontend.tracing``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from milpasses.convert.load import LoadedModel, is_causal
from milpasses.convert.options import Options
from milpasses.errors import ConversionError
from milpasses.convert.samples import as_tensors, sample_inputs, verification_rows
from milpasses.frontend.tracing import TaskOutputs


@dataclass
class Traced:
    module: object  # a torch.jit.ScriptModule, or a torch.export ExportedProgram
    reference: torch.nn.Module  # the model as transformers runs it, with its own 2-D mask handling
    output_names: list[str]
    shapes: dict[str, list[list[int]]]  # input name -> its shapes (several with enumerated lengths)
    trace_length: int | None  # the length traced at (the default of enumerated shapes)


def trace(loaded: LoadedModel, options: Options, model=None) -> Traced:
    """Trace ``model`` (the loaded model when None; its compressed copy when compressing before
    tracing); the reference stays the loaded model, so verification measures against fp32."""
    names, lengths, batch = loaded.input_names, loaded.lengths, options.batch
    model = loaded.model if model is None else model

    def first_batch(length):
        inputs, _ = sample_inputs(loaded, options.task, verification_rows(batch), length)
        return {k: v[:batch] for k, v in inputs.items()}

    with torch.no_grad():
        produced = loaded.model(**dict(zip(names, as_tensors(first_batch(lengths[0])))))
    output_names = _outputs(loaded, options, produced)

    trace_length = lengths[len(lengths) // 2] if options.enumerated else lengths[0]
    causal = options.enumerated and is_causal(loaded.model, names)
    module = TaskOutputs(model, names, tuple(output_names), loaded.pooling, mask_4d=options.enumerated,
                         causal=causal).eval()
    reference = TaskOutputs(loaded.model, names, tuple(output_names), loaded.pooling).eval()
    example = first_batch(trace_length)
    if options.frontend == "export":
        from milpasses.frontend.export import export

        if options.enumerated:
            raise ConversionError("--frontend export converts one sequence length: give --seq-len, or use the "
                                  "trace frontend for --seq-lens")
        traced = export(module, as_tensors(example))
    else:
        with torch.no_grad():
            # No check_trace: re-running the module to compare is what the verification does, better.
            traced = torch.jit.trace(module, as_tensors(example), check_trace=False)
    if loaded.modality == "vision":
        shapes = {"pixel_values": [list(example["pixel_values"].shape)]}
    else:
        shapes = {n: [[batch, length] for length in lengths] for n in names}
    return Traced(traced, reference, output_names, shapes, trace_length)


def _outputs(loaded: LoadedModel, options: Options, produced) -> list[str]:
    """The task's outputs the model produces; a sentence-transformers model's embedding instead
    of the pooler."""
    if loaded.pooling is not None:
        return ["last_hidden_state", "sentence_embedding"]
    return [name for name in options.spec.outputs
            if getattr(produced, name, None) is not None
            and not (name == "pooler_output" and loaded.untrained_pooler)]
