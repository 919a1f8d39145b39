"""``--kv-cache state``: the simulator's state ops against torch, and a state package (the
cache updated in place by both functions) decoding like Hugging Face ``generate``.

Here Llama (a package, the host loop), GPT-2 (``milpasses convert`` and ``milpasses generate``)
and Gemma 2 (sliding window, soft caps) at a context the state pads; every causal-LM family
decodes in state mode in ``test_generation_families.py``, and ``benchmarks/generation.py`` runs
them all (and a Mistral-like window everywhere) on two prompts."""

import json
import platform
from collections import Counter

import coremltools as ct
import numpy as np
import pytest
import torch
import transformers as hf

from fixtures.families import build_model
from milpasses.cli import main
from milpasses.generation.api import CoreMLPackage
from milpasses.generation.host import ContextFullError, generate_ids
from milpasses.convert.text_generation import build_package
from milpasses.generation.package import SimulatedPackage, check_prompt
from milpasses.frontend.generation_step import cache_shape, state_slots
from milpasses.pipeline import ane_pipeline
from milpasses.simulator import InputMismatchError, Simulator
from tests.convert_helpers import assert_generate_streams_hugging_faces_text, save_fixture

CONTEXT, CHUNK = 40, 8  # a context that is no multiple of 32: the state is padded to 64 slots
PROMPTS = ([5, 17, 42, 8, 9, 33, 71, 12, 4, 60, 23],  # a chunk and a remainder
           [7, 3, 91, 26, 45])  # shorter than a chunk


class RunningWrite(torch.nn.Module):
    """Writes its input into a buffer at a run-time position and returns what it read before."""

    def __init__(self):
        super().__init__()
        self.register_buffer("memory", torch.zeros(1, 4, 1, 32, dtype=torch.float16))

    def forward(self, x, position):
        before = self.memory * 2
        start = position[0].to(torch.long)
        self.memory[:, :, :, start:start + x.shape[3]] = x.to(torch.float16)
        return before


def test_state_ops_persist_across_calls_like_torch_buffers():
    module = RunningWrite().eval()
    examples = (torch.zeros(1, 4, 1, 3), torch.zeros(1, dtype=torch.int32))
    traced = torch.jit.trace(module, examples, check_trace=False)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4, 1, 3), dtype=np.float16),
                                         ct.TensorType(name="position", shape=(1,), dtype=np.int32)],
                         states=[ct.StateType(wrapped_type=ct.TensorType(shape=(1, 4, 1, 32), dtype=np.float16),
                                              name="memory")],
                         outputs=[ct.TensorType(name="before", dtype=np.float16)], convert_to="mlprogram",
                         minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
    ops = Counter(op.op_type for op in mlmodel._mil_program.functions["main"].operations)
    assert ops["read_state"] == ops["slice_update"] == ops["coreml_update_state"] == 1
    simulator = Simulator(mlmodel)
    assert simulator.state_shapes == {"memory": (1, 4, 1, 32)} and "memory" not in simulator.expected_inputs
    state = simulator.make_state()
    reference = RunningWrite().eval()
    rng = np.random.default_rng(0)
    for position in (0, 3, 29):  # the last write ends at the buffer's end
        x = rng.standard_normal((1, 4, 1, 3)).astype(np.float16)
        inputs = {"x": x, "position": np.array([position], np.int32)}
        got = simulator.run(inputs, state=state)["before"]
        with torch.no_grad():
            expected = reference(torch.from_numpy(x), torch.tensor([position], dtype=torch.int32)).numpy()
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(state["memory"], reference.memory.numpy())
    with pytest.raises(InputMismatchError, match="pass state=simulator.make_state()"):
        simulator.run(inputs)


@pytest.fixture(scope="module")
def llama_state_package(tmp_path_factory):
    model = build_model("llama", hf.LlamaForCausalLM)
    path = tmp_path_factory.mktemp("generation-state") / "llama.mlpackage"
    programs, reports = build_package(model, CONTEXT, CHUNK, ane_pipeline, path, kv_cache="state")
    return model, path, programs, reports["decode"]["ane::attention_to_einsum"]


def test_state_package_decodes_greedily_like_generate(llama_state_package):
    model, path, _, _ = llama_state_package
    run = SimulatedPackage(path)
    checks = [check_prompt(run, model, prompt, CONTEXT, CHUNK, 16, kv_cache="state") for prompt in PROMPTS]
    assert all(check.produced == check.expected for check in checks)
    # fp16 logits of this tiny model sit near 3: a spacing of 0.002, about 60 dB per step.
    assert checks[0].worst_psnr_db > 55
    # Positions up to context - 1: the host stops at the converted context, not at the padded slots.
    shape = cache_shape(model, CONTEXT)
    with pytest.raises(ContextFullError, match="context of 40 tokens is full"):
        list(generate_ids(run, PROMPTS[0], shape, CHUNK, CONTEXT, kv_cache="state"))


@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML runs only on macOS")
def test_core_ml_shares_one_state_between_the_functions_like_the_simulator(llama_state_package):
    model, path, _, _ = llama_state_package
    check = check_prompt(CoreMLPackage(path), model, PROMPTS[0], CONTEXT, CHUNK, 16, kv_cache="state")
    assert check.produced == check.expected


def test_state_functions_keep_the_ane_form(llama_state_package):
    _, _, programs, decode_attention = llama_state_package
    assert decode_attention.sites_rewritten == 2 and not decode_attention.skipped
    for name, program in programs.items():
        function = program.functions["main"]
        # Padded to a multiple of 32 on the contiguous axis (coremltools #2631).
        for state in ("key_cache", "value_cache"):
            assert tuple(function.inputs[state].shape) == (2, 16, 1, state_slots(CONTEXT)) == (2, 16, 1, 64)
        ops = list(function.operations)
        counts = Counter(op.op_type for op in ops)
        assert counts["read_state"] == counts["slice_update"] == counts["coreml_update_state"] == 2, name
        assert counts["matmul"] == counts["linear"] == 0 and counts["einsum"] == 16
        for op in ops:  # a reshape may only add or drop unit axes: none moves data
            if op.op_type == "reshape":
                assert [d for d in op.inputs["x"].shape if d != 1] == [d for d in op.outputs[0].shape if d != 1]
        assert all(int(op.inputs["axis"].val) % 4 == 1 for op in ops if op.op_type == "softmax")
        assert max(len(v.shape) for op in ops for v in op.outputs) <= 5
        # Only the last token's logits, prefill included (the LM head runs on one token).
        assert [o.name for o in function.outputs] == ["logits"] and tuple(function.outputs[0].shape[:2]) == (1, 1)


def test_analyze_counts_a_state_cache_as_state(llama_state_package, capsys):
    _, path, _, _ = llama_state_package
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "context 64, cache as state" in out and "this package: state" in out
    # The cache write's run-time offsets are index operands, not int32 data: it stays on the ANE.
    writes = [line for line in out.splitlines() if " slice_update " in line]
    assert len(writes) == 2 and all(" ANE " in line for line in writes)


def test_cli_converts_and_generates_with_a_state_cache(tmp_path, capsys):
    source = save_fixture(tmp_path / "models" / "gpt2", "gpt2", hf.GPT2LMHeadModel)
    output = tmp_path / "gpt2.mlpackage"
    assert main(["convert", str(source), "--task", "text-generation", "--context", "32", "--prefill-chunk", "8",
                 "--kv-cache", "state", "--offline", "--quiet", "-o", str(output), "--min-psnr", "55"]) == 0
    report = json.loads((tmp_path / "gpt2.report.json").read_text())
    assert report["generation"]["kv_cache"] == "state" and report["verified"]
    for check in report["generation"]["prompts"]:
        assert check["tokens"] == 16 and (check["first_divergence"] is None or check["near_tie"])

    assert_generate_streams_hugging_faces_text(capsys, output, source)


def test_sliding_window_state_package_decodes_like_generate(tmp_path):
    """Gemma 2 in state mode: a window of 4 in every other layer (shorter than the prompt, so
    the in-graph mask drops cached slots that stay in the state), soft-capped scores and logits."""
    model = build_model("gemma2", hf.Gemma2ForCausalLM)
    path = tmp_path / "gemma2.mlpackage"
    build_package(model, CONTEXT, CHUNK, ane_pipeline, path, kv_cache="state")
    check = check_prompt(SimulatedPackage(path), model, PROMPTS[0], CONTEXT, CHUNK, 8, kv_cache="state")
    assert check.produced == check.expected and check.worst_psnr_db > 55
