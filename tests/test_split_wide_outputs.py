"""ane::split_wide_outputs: a conv wider than the ANE's largest dimension leaves the program in
parts; a text-generation package of a 40000-word vocabulary decodes like Hugging Face with none
of its ops above 16384."""

import copy

import numpy as np
import pytest
import torch
import transformers as hf
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import get_new_symbol

from fixtures.families import build_model
from milpasses import ane_pipeline
from milpasses.analyze import analyze
from milpasses.convert import convert
from milpasses.convert.coreml import convert_traced
from milpasses.generation.host import joined_logits
from milpasses.passes.layout.split_wide_outputs import part_bounds
from milpasses.pipeline import ANE_PASSES, SPLIT_WIDE_OUTPUTS
from milpasses.simulator import load_program, simulate
from tests.helpers import mil_program
from tests.passes_helpers import op_types, run_passes

PASS = "ane::split_wide_outputs"
RNG = np.random.default_rng(0)
X = RNG.standard_normal((1, 8, 1, 3)).astype(np.float32)
WEIGHT = RNG.standard_normal((10, 8, 1, 1)).astype(np.float32)
BIAS = RNG.standard_normal(10).astype(np.float32)
PER_CHANNEL = RNG.standard_normal((1, 10, 1, 1)).astype(np.float32)
HEAD = ["conv", "mul", "tanh", "mul", "squeeze", "transpose", "reshape"]


def head(x, weight=WEIGHT, tail=lambda v: v):
    """An LM head in (B, C, 1, S) with Gemma's softcap and the exit to (S, C); ``tail`` runs before the exit."""
    logits = mb.conv(x=x, weight=weight, bias=BIAS)
    logits = mb.mul(x=mb.tanh(x=mb.mul(x=logits, y=PER_CHANNEL)), y=np.float32(30.0))
    logits = tail(logits)
    logits = mb.transpose(x=mb.squeeze(x=logits, axes=[2]), perm=[0, 2, 1])
    return mb.reshape(x=logits, shape=[-1, logits.shape[-1]], name="logits")


def test_parts_are_near_equal_and_in_order():
    assert part_bounds(40000, 16384) == ((0, 13334), (13334, 26667), (26667, 40000))
    assert part_bounds(32768, 16384) == ((0, 16384), (16384, 32768))
    assert part_bounds(10, 4) == ((0, 4), (4, 7), (7, 10))


def test_a_wide_head_leaves_in_parts_each_its_own_output():
    program = mil_program(lambda x: head(x), x=X)
    before = simulate(copy.deepcopy(program), {"x": X})["logits"]
    reports = run_passes(program, PASS, max_channels=4)
    assert op_types(program) == HEAD * 3
    convs = [op for op in program.functions["main"].operations if op.op_type == "conv"]
    assert [op.outputs[0].shape[1] for op in convs] == [4, 3, 3]
    after = simulate(program, {"x": X})
    assert list(after) == ["logits_0", "logits_1", "logits_2"]
    assert [after[name].shape for name in after] == [(3, 4), (3, 3), (3, 3)]
    np.testing.assert_array_equal(np.concatenate(list(after.values()), axis=-1), before)
    assert dict(reports[PASS].rewritten) == {"conv split in 3 outputs": 1} and not reports[PASS].skipped


def test_a_conv_no_wider_than_the_limit_is_no_candidate():
    program = mil_program(lambda x: head(x), x=X)
    reports = run_passes(program, PASS, max_channels=10)
    assert op_types(program) == HEAD
    assert not reports[PASS].rewritten and not reports[PASS].skipped


@pytest.mark.parametrize("build, reason", [
    (lambda x: (head(x, tail=lambda v: v), mb.reduce_max(x=x, axes=[1])), None),  # control: a second output is fine
    (lambda x: head(x, tail=lambda v: mb.softmax(x=v, axis=1)), "'softmax' works across the channel axis"),
    (lambda x: head(x, tail=lambda v: mb.reduce_sum(x=v, axes=[1], keep_dims=True)), "'reduce_sum' works across"),
    (lambda x: head(x, tail=lambda v: mb.add(x=v, y=mb.conv(x=x, weight=WEIGHT))), "'add' reads another tensor"),
    (lambda x: head(x, tail=lambda v: mb.add(x=v, y=np.ones((1, 10, 1, 3), np.float32))),
     "'add' reads a constant that is neither scalar nor per channel"),
    (lambda x: head(x, tail=lambda v: mb.gather(x=v, indices=[0, 1], axis=3)), "'gather' between the conv"),
    (lambda x: mb.reshape(x=mb.conv(x=x, weight=WEIGHT), shape=[30], name="logits"),
     "'reshape' works across the channel axis"),
    (lambda x: head(x, tail=lambda v: mb.reduce_max(x=v, axes=[3], keep_dims=True)), None),  # over S: carried
])
def test_what_it_cannot_prove_it_leaves_alone(build, reason):
    program = mil_program(build, x=X)
    before = op_types(program)
    reports = run_passes(program, PASS, max_channels=4)
    if reason is None:  # the head splits; the second output is another conv's, read by a reduction
        assert reports[PASS].rewritten
        return
    assert op_types(program) == before
    assert not reports[PASS].rewritten
    assert any(reason in skipped for skipped in reports[PASS].skipped), reports[PASS].skipped


@pytest.mark.parametrize("read, reason", [
    ("head", "'head' has 2 readers, not one op on the way to an output"),
    ("logits", "'logits' is read beside being the program output"),
])
def test_a_value_read_beside_the_head_is_left_alone(read, reason):
    def build(x):
        values = {"head": mb.conv(x=x, weight=WEIGHT, name="head")}
        values["logits"] = mb.squeeze(x=values["head"], axes=[2], name="logits")
        return values["logits"], mb.reduce_max(x=values[read], axes=[1])

    program = mil_program(build, x=X)
    reports = run_passes(program, PASS, max_channels=4)
    assert op_types(program) == ["conv", "squeeze", "reduce_max"]
    assert dict(reports[PASS].skipped) == {reason: 1}


def test_a_weight_known_only_at_run_time_is_left_alone():
    program = mil_program(lambda x, w: head(x, weight=w), x=X, w=WEIGHT)
    reports = run_passes(program, PASS, max_channels=4)
    assert dict(reports[PASS].skipped) == {"the weight is not a constant": 1}


def test_a_symbolic_length_is_left_alone():
    program = mb.program(input_specs=[mb.TensorSpec(shape=(1, 8, 1, get_new_symbol()))])(
        lambda x: mb.squeeze(x=mb.conv(x=x, weight=WEIGHT), axes=[2], name="logits"))
    reports = run_passes(program, PASS, max_channels=4)
    assert dict(reports[PASS].skipped) == {"the conv's output has a symbolic shape": 1}


def test_it_runs_only_when_asked_after_the_layout_passes():
    assert SPLIT_WIDE_OUTPUTS not in ane_pipeline().passes
    passes = ane_pipeline(split_wide_outputs=True).passes
    assert passes[passes.index(ANE_PASSES[-1]) + 1] == SPLIT_WIDE_OUTPUTS
    with pytest.raises(ValueError, match="max_channels' needs split_wide_outputs=True"):
        ane_pipeline(max_channels=4)
    with pytest.raises(ValueError, match="'max_channels' must be a positive integer"):
        ane_pipeline(split_wide_outputs=True, max_channels=0)


class SoftcappedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, hidden):
        return torch.tanh(self.head(hidden) / 30.0) * 30.0


def test_a_converted_head_in_parts_joins_to_torchs_logits():
    module, hidden = SoftcappedHead().eval(), torch.randn(1, 3, 8)
    pipeline = ane_pipeline(split_wide_outputs=True, max_channels=4, check=True)
    mlmodel = convert_traced(torch.jit.trace(module, hidden), {"hidden": hidden.numpy()}, precision="fp32",
                             pass_pipeline=pipeline, output_name="logits")
    assert pipeline.reports[PASS].check["passed"]  # the per-pass check joins the parts to compare
    outputs = simulate(mlmodel._mil_program, {"hidden": hidden.numpy()})
    assert sorted(outputs) == ["logits_0", "logits_1", "logits_2"]
    assert [op for op in op_types(mlmodel._mil_program) if op == "conv"] == ["conv"] * 3
    np.testing.assert_allclose(joined_logits(outputs)[0], module(hidden)[0].detach().numpy(), rtol=1e-5, atol=1e-5)


def test_joined_logits_keeps_the_vocabulary_order():
    parts = {"logits_1": np.full((1, 1, 2), 1.0), "logits_0": np.full((1, 1, 3), 0.0), "new_keys": np.zeros(1)}
    np.testing.assert_array_equal(joined_logits(parts), [[[0, 0, 0, 1, 1]]])
    with pytest.raises(KeyError, match="no logits"):
        joined_logits({"new_keys": np.zeros(1)})


@pytest.fixture(scope="module")
def wide_llama():
    return build_model("llama", hf.LlamaForCausalLM, vocab_size=40000)


@pytest.mark.parametrize("kv_cache", ["io", "state"])
def test_a_40000_word_decoder_decodes_like_generate_with_nothing_above_16384(wide_llama, kv_cache, tmp_path):
    mlmodel, report = convert(wide_llama, task="text-generation", context=32, prefill_chunk=8, kv_cache=kv_cache,
                              workdir=tmp_path)
    assert not report.verification_error
    for check in report.generation["prompts"]:
        assert check["matched"] == check["tokens"] == 16
    assert report.generation["logits"] == ["logits_0", "logits_1", "logits_2"]
    assert mlmodel.user_defined_metadata["milpasses.logits"] == "logits_0,logits_1,logits_2"
    assert "logits in 3 parts (logits_0, logits_1, logits_2)" in report.table()
    decode = analyze(mlmodel.package_path, function_name="decode")
    widest = max(d for record in decode.ops for shape in (*record.input_shapes, *record.output_shapes)
                 for d in shape if isinstance(d, int))
    assert widest <= 16384
    assert [device for device, _ in decode.partitions] == ["CPU", "ANE"]
    assert all(p.rule != "dimension_above_limit" for record in decode.ops for p in record.predictions)
    prefill = load_program(mlmodel.package_path).functions["prefill"]
    assert [v.name for v in prefill.outputs][:3] == report.generation["logits"]  # the prefill's head splits too
