"""Exporting models to ONNX for the frontend's tests and benchmark, and the ONNX route's pieces.

``torch.onnx.export`` with the TorchScript exporter (``dynamo=False``): it runs offline here and
writes the opset asked for; the batch and sequence axes of text inputs are exported dynamic.
"""

from collections import Counter

import coremltools as ct
import numpy as np
import onnx
import onnxruntime
import torch

from fixtures.families import FAMILIES, build_model, sample_inputs, valid_tokens
from milpasses.convert.coreml import histogram
from milpasses.frontend.onnx.load import load_onnx
from milpasses.frontend.onnx.translate import to_program
from milpasses.pipeline import ane_pipeline
from milpasses.simulator import Simulator, psnr
from milpasses.frontend.tracing import LastHiddenState

#: Ops whose count may differ from the torch route's, and why: the ONNX graph declares float32
#: outputs, kept float32 (one cast after the fp16 body), and the padding mask is cast to bool in a
#: different place than the torch frontend casts it (one cast fewer for the text families).
ALLOWED_DIFFERENCES = {"cast": 1}


def export(model: torch.nn.Module, inputs: dict[str, np.ndarray], path, opset: int = 17, dynamic: bool = True):
    examples = tuple(torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v) for v in inputs.values())
    axes = {n: {0: "batch", 1: "sequence"} for n, v in inputs.items() if v.dtype == np.int32} if dynamic else None
    with torch.no_grad():
        torch.onnx.export(model, examples, str(path), dynamo=False, input_names=list(inputs),
                          output_names=["last_hidden_state"], opset_version=opset, dynamic_axes=axes)
    return path


def export_family(name: str, path, opset: int = 17):
    inputs = sample_inputs(name)
    export(LastHiddenState(build_model(name), tuple(inputs)).eval(), inputs, path, opset,
           dynamic=FAMILIES[name].kind == "text")
    return inputs


def onnx_ops(path) -> dict[str, int]:
    return dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))


def convert_onnx_file(path, inputs: dict[str, np.ndarray], precision: str = "fp16"):
    """The ane_pipeline() conversion of the ONNX model at ``path``, at the shapes of ``inputs``."""
    source = load_onnx(path)
    program = to_program(source.model, {k: v.shape for k, v in inputs.items()}, ct.target.iOS16)
    return ct.convert(program, convert_to="mlprogram", pass_pipeline=ane_pipeline(), skip_model_load=True,
                      minimum_deployment_target=ct.target.iOS16,
                      compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32)


def psnr_against_onnxruntime(mlmodel, path, inputs: dict[str, np.ndarray]) -> float:
    """PSNR of the simulated program against ONNX Runtime on the valid tokens of ``inputs``."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {k: v.astype(np.int64) if v.dtype == np.int32 else v for k, v in inputs.items()})[0]
    simulated = Simulator(mlmodel._mil_program).run(inputs)["last_hidden_state"]
    valid = valid_tokens(inputs)
    return psnr(expected[valid], simulated[valid])


def histogram_difference(onnx_route, torch_route) -> dict[str, int]:
    """ONNX route minus torch route, per op type that differs."""
    ours, theirs = histogram(onnx_route._mil_program), histogram(torch_route._mil_program)
    return {op: ours.get(op, 0) - theirs.get(op, 0) for op in sorted(set(ours) | set(theirs))
            if ours.get(op, 0) != theirs.get(op, 0)}


def within_allowed(difference: dict[str, int]) -> bool:
    return all(abs(n) <= ALLOWED_DIFFERENCES.get(op, 0) for op, n in difference.items())
