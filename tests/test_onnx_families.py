"""Fixture families exported to ONNX at test time and converted back by the ONNX frontend: the
same ane_pipeline() program as the torch route's (op histograms), >= 60 dB against ONNX Runtime.

A representative subset (LayerNorm and erf GELU; GPT-2's Gemm, Split and tanh GELU; Llama's
RMSNorm, rotary, grouped-query heads and causal mask; ViT's patch Conv); every family is in
``benchmarks/onnx_families.py``. Exported by the TorchScript exporter, and Llama by the dynamo
exporter too.
"""

import functools

import pytest

from fixtures.families import convert
from milpasses.pipeline import ane_pipeline
from tests.onnx_helpers import (convert_onnx_file, export_family, histogram_difference, psnr_against_onnxruntime,
                                within_allowed)


@functools.lru_cache(maxsize=None)
def torch_route(name: str):
    return convert(name, "fp16", ane_pipeline())


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "vit"])
def test_family_converts_like_the_torch_route(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    inputs = export_family(name, path)
    mlmodel = convert_onnx_file(path, inputs)
    assert psnr_against_onnxruntime(mlmodel, path, inputs) >= 60
    difference = histogram_difference(mlmodel, torch_route(name))
    assert within_allowed(difference), difference


def test_opset_14_layer_norm_written_out_is_fused_back(tmp_path):
    path = tmp_path / "bert14.onnx"
    inputs = export_family("bert", path, opset=14)
    mlmodel = convert_onnx_file(path, inputs)
    ops = [op.op_type for op in mlmodel._mil_program.functions["main"].operations]
    assert ops.count("layer_norm") == 5 and "sqrt" not in ops and "pow" not in ops
    assert psnr_against_onnxruntime(mlmodel, path, inputs) >= 60


def test_dynamo_exported_llama_converts_like_the_torch_route(tmp_path):
    """torch's other exporter (opset 18, ReduceMean axes as an input, GatherND for the mask,
    Reciprocal for rsqrt) reaches the same program."""
    import numpy as np
    import torch

    from fixtures.families import build_model, sample_inputs
    from milpasses.frontend.tracing import LastHiddenState

    path, inputs = tmp_path / "llama.onnx", sample_inputs("llama")
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    torch.onnx.export(LastHiddenState(build_model("llama"), tuple(inputs)).eval(), examples, str(path), dynamo=True,
                      input_names=list(inputs), output_names=["last_hidden_state"], external_data=False)
    mlmodel = convert_onnx_file(path, inputs)
    assert psnr_against_onnxruntime(mlmodel, path, inputs) >= 60
    difference = histogram_difference(mlmodel, torch_route("llama"))
    assert within_allowed(difference), difference
