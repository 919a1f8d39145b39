"""The simulator's weight decompression ops against coremltools' own materialisation, value for value."""

import functools

import numpy as np
import pytest
import torch
import coremltools as ct
import coremltools.optimize.coreml as cto
from coremltools.converters.mil import Builder as mb

from milpasses import check_fp16
from milpasses.simulator import Simulator, is_decompression, psnr, simulate
from milpasses.simulator.fp16_check import RECOMPRESS
from tests.helpers import mil_program

# ct.optimize.coreml's schemes, each with the deployment target that gives its op forms.
_SCHEMES = {
    "palettize8 per tensor, iOS16": (ct.target.iOS16, cto.OpPalettizerConfig(nbits=8, weight_threshold=1)),
    "palettize4 per tensor, iOS16": (ct.target.iOS16, cto.OpPalettizerConfig(nbits=4, weight_threshold=1)),
    "int8 per channel, iOS16": (ct.target.iOS16, cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", weight_threshold=1)),
    "uint8 affine per channel, iOS16": (ct.target.iOS16, cto.OpLinearQuantizerConfig(
        mode="linear", dtype="uint8", weight_threshold=1)),
    "palettize6 per tensor": (ct.target.iOS18, cto.OpPalettizerConfig(nbits=6, weight_threshold=1)),
    "palettize4 grouped 16": (ct.target.iOS18, cto.OpPalettizerConfig(
        nbits=4, granularity="per_grouped_channel", group_size=16, weight_threshold=1)),
    "palettize4 per-channel scale": (ct.target.iOS18, cto.OpPalettizerConfig(
        nbits=4, enable_per_channel_scale=True, weight_threshold=1)),
    "palettize2 vector 2": (ct.target.iOS18, cto.OpPalettizerConfig(
        nbits=2, cluster_dim=2, weight_threshold=1)),
    "int8 per channel": (ct.target.iOS18, cto.OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", weight_threshold=1)),
    "int4 per block 16": (ct.target.iOS18, cto.OpLinearQuantizerConfig(
        mode="linear", dtype="int4", granularity="per_block", block_size=16, weight_threshold=1)),
}


@functools.lru_cache(maxsize=None)
def _converted(target):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.GELU(), torch.nn.Linear(48, 32)).eval()
    example = torch.randn(1, 4, 32)
    mlmodel = ct.convert(torch.jit.trace(module, example), inputs=[ct.TensorType(name="x", shape=example.shape)],
                         convert_to="mlprogram", minimum_deployment_target=target, skip_model_load=True)
    return mlmodel, module, example


def _compressed(target, config):
    mlmodel, module, example = _converted(target)
    compress = cto.palettize_weights if isinstance(config, cto.OpPalettizerConfig) else cto.linear_quantize_weights
    return compress(mlmodel, cto.OptimizationConfig(global_config=config)), module, example


def _materialised(op):
    """coremltools' value of a decompression op; one fed by another (a lookup table scaled per
    channel) through its ``decompress`` with the feeding op's value, as its own inference skips those."""
    if all(var.val is not None for var in op.inputs.values()):
        return op.materialized_val_inference()
    arguments = []
    for name in op.input_spec.input_types:
        var = op.inputs.get(name)
        arguments.append(None if var is None else var.val if var.val is not None else _materialised(var.op))
    return type(op).decompress(*arguments)


@pytest.mark.parametrize("scheme", list(_SCHEMES))
def test_decompressed_weights_equal_coremltools_materialisation(scheme):
    mlmodel, module, example = _compressed(*_SCHEMES[scheme])
    program = mlmodel._mil_program
    simulator = Simulator(program)
    decompressions = [op for op in program.functions["main"].operations if is_decompression(op)]
    assert decompressions, f"{scheme} compressed nothing"
    for op in decompressions:
        expected = _materialised(op)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for var, value in zip(op.outputs, expected):
            as_stored = np.asarray(value).astype(np.float16 if var.dtype == ct.converters.mil.mil.types.fp16
                                                  else np.asarray(value).dtype)
            np.testing.assert_array_equal(simulator.constant(var), as_stored.astype(simulator.constant(var).dtype),
                                          err_msg=f"{scheme}: {op.op_type} '{op.name}'")
    # and the program runs on them, near the module (2-bit vectors are the coarsest scheme here)
    (output,) = simulate(program, {"x": example.numpy()}).values()
    assert psnr(module(example).detach().numpy(), output) > 10


def test_check_fp16_sees_a_weight_that_decompresses_past_fp16():
    x = np.ones((1, 4), np.float16)

    def program(x):
        weight = mb.constexpr_blockwise_shift_scale(
            data=np.full((4, 4), 127, np.int8), scale=np.full((4, 1), 1000.0, np.float16), name="weight")
        return mb.linear(x=x, weight=weight)

    findings = check_fp16(mil_program(program, opset=ct.target.iOS18, x=x), {"x": x})
    assert (findings[0].op, findings[0].kind, findings[0].fix) == ("weight", "overflow", RECOMPRESS)
