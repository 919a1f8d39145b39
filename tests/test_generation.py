"""KV-cache text generation: the traced step against the Hugging Face forward, the cache
attention rewritten per head, and greedy decoding through the simulated two-function package
against Hugging Face ``generate``."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
import transformers as hf

from fixtures.families import build_model
from milpasses.cli import main
from milpasses.convert import ConversionError, convert
from milpasses.generation.host import ContextFullError, KVCache, Sampling, generate_ids, prefill
from milpasses.convert.text_generation import build_package
from milpasses.generation.package import TWIN_ALLOWANCE_DB, PromptCheck, SimulatedPackage, check_prompt
from milpasses.convert.text_generation import convert_step
from milpasses.frontend.generation_step import KVCacheStep
from milpasses.pipeline import ane_pipeline
from tests.convert_helpers import assert_generate_streams_hugging_faces_text, save_fixture

CONTEXT, CHUNK = 32, 8
PROMPT = [5, 17, 42, 8, 9, 33, 71, 12, 4, 60, 23]  # 11 tokens: one chunk of 8 and a remainder of 3
CAUSAL_LM = {"llama": hf.LlamaForCausalLM, "gpt2": hf.GPT2LMHeadModel, "qwen2": hf.Qwen2ForCausalLM,
             "gemma2": hf.Gemma2ForCausalLM}


def _torch_runner(model, all_logits=False):
    """The step run by torch, as the host loop calls a converted one."""
    steps = {}

    def run(function, inputs):
        length = inputs["input_ids"].shape[1]
        step = steps.setdefault(length, KVCacheStep(model, CONTEXT, all_logits).eval())
        with torch.no_grad():
            out = step(*(torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
                         for v in inputs.values()))
        return dict(zip(("logits", "new_keys", "new_values"), (t.numpy() for t in out)))

    return run


@pytest.mark.parametrize("family", sorted(CAUSAL_LM))
def test_chunked_prefill_through_the_step_gives_the_model_logits(family):
    """Gemma 2's window of 4 slides over the cache; the last chunk is padded."""
    model = build_model(family, CAUSAL_LM[family])
    cache = KVCache(KVCacheStep(model, CONTEXT).shape)
    cache.keys, cache.values = cache.keys.astype(np.float32), cache.values.astype(np.float32)
    last = prefill(_torch_runner(model), PROMPT, cache, CHUNK)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0, -1].numpy()
    np.testing.assert_allclose(last, expected, atol=1e-4)


@pytest.mark.parametrize("all_logits", [False, True])
def test_prefill_returns_the_last_token_logits_unless_asked_for_all(all_logits):
    """The default step runs the LM head on its last token only; a prompt shorter than a chunk
    then gets its last token's logits from decode, and the host's answer is the same."""
    model = build_model("llama", hf.LlamaForCausalLM)
    step = KVCacheStep(model, CONTEXT, all_logits=all_logits)
    run = _torch_runner(model, all_logits)
    cache = KVCache(step.shape)
    inputs = {"input_ids": np.array([PROMPT[:CHUNK]], np.int32), "position": np.array([0], np.int32),
              "key_cache": cache.keys, "value_cache": cache.values}
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT[:CHUNK]])).logits.numpy()
        short = model(torch.tensor([PROMPT[:5]])).logits[0, -1].numpy()
    logits = run("prefill", inputs)["logits"]
    np.testing.assert_allclose(logits, expected if all_logits else expected[:, -1:], atol=1e-4)
    cache.keys, cache.values = cache.keys.astype(np.float32), cache.values.astype(np.float32)  # no fp16 rounding
    np.testing.assert_allclose(prefill(run, PROMPT[:5], cache, CHUNK), short, atol=1e-4)


def test_greedy_tokens_through_the_torch_step_equal_generate():
    model = build_model("qwen2", hf.Qwen2ForCausalLM)
    check = check_prompt(_torch_runner(model), model, PROMPT, CONTEXT, CHUNK, 16)
    # The host keeps the cache in fp16, as the device does: that rounding alone costs ~60 dB.
    assert check.produced == check.expected and check.worst_psnr_db > 55


def test_the_check_stops_both_loops_at_the_end_of_sequence_token():
    model = build_model("qwen2", hf.Qwen2ForCausalLM)
    greedy = check_prompt(_torch_runner(model), model, PROMPT, CONTEXT, CHUNK, 16).produced
    model.generation_config.eos_token_id = greedy[5]  # the sixth greedy token ends the sequence
    check = check_prompt(_torch_runner(model), model, PROMPT, CONTEXT, CHUNK, 16)
    stop = greedy.index(greedy[5]) + 1
    assert check.produced == check.expected == greedy[:stop] and check.first_divergence is None


def test_the_twin_rule_allows_the_allowance_below_the_default_twin_and_no_more():
    tokens = [3, 4]
    assert PromptCheck("p", tokens, tokens, [60.0, 50.2], default_psnr_db=[61.0, 51.0]).within_twin
    assert not PromptCheck("p", tokens, tokens, [60.0, 49.8], default_psnr_db=[61.0, 51.0]).within_twin
    assert PromptCheck("p", tokens, tokens, [60.0, 49.8]).within_twin  # no twin: no twin rule


def test_decode_step_attends_over_the_cache_per_head():
    pipeline = ane_pipeline()
    mlmodel = convert_step(build_model("llama", hf.LlamaForCausalLM), CONTEXT, 1, pipeline)
    report = pipeline.reports["ane::attention_to_einsum"]
    assert report.sites_rewritten == 2 and not report.skipped
    ops = [op for op in mlmodel._mil_program.functions["main"].operations]
    counts = Counter(op.op_type for op in ops)
    assert counts["matmul"] == counts["linear"] == 0 and counts["einsum"] == 16
    assert all(int(op.inputs["axis"].val) % 4 == 1 for op in ops if op.op_type == "softmax")
    assert max(len(v.shape) for op in ops for v in op.outputs) <= 5
    # The new K and V go to the host straight from the per-head region's (B, C, 1, S) tensors.
    # The one transpose per block turns the sequence-last cache keys-first; the embedding, the
    # rotary tables, the mask and the logits cross the boundary by reshapes that only move unit
    # axes (the tables are looked up transposed), so no reshape moves data.
    assert counts["transpose"] == 2
    for op in ops:
        if op.op_type == "reshape":
            assert [d for d in op.inputs["x"].shape if d != 1] == [d for d in op.outputs[0].shape if d != 1]


@pytest.fixture(scope="module")
def llama_package(tmp_path_factory):
    model = build_model("llama", hf.LlamaForCausalLM)
    path = tmp_path_factory.mktemp("generation") / "llama.mlpackage"
    programs, _ = build_package(model, CONTEXT, CHUNK, ane_pipeline, path)
    return model, path, programs


def test_simulated_package_decodes_greedily_like_generate(llama_package):
    model, path, _ = llama_package
    check = check_prompt(SimulatedPackage(path), model, PROMPT, CONTEXT, CHUNK, 16)
    assert check.produced == check.expected
    # fp16 logits of this tiny model sit near 3: a spacing of 0.002, so about 60 dB per step
    # (DEFAULT's fp16 program measures 58-66 dB here too).
    assert check.worst_psnr_db > 55


def test_package_shares_one_copy_of_the_weights(llama_package, tmp_path):
    model, path, _ = llama_package
    single = tmp_path / "decode.mlpackage"
    convert_step(model, CONTEXT, 1, ane_pipeline()).save(str(single))
    # The two programs' text is stored per function; in this tiny model it outweighs the weights.
    weights = lambda p: (p / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size  # noqa: E731
    assert weights(path) <= 1.05 * weights(single)


def test_host_loop_samples_reproducibly_and_stops(llama_package):
    model, path, _ = llama_package
    run, shape = SimulatedPackage(path), KVCacheStep(model, CONTEXT).shape
    sampling = Sampling(top_k=5, top_p=0.9, temperature=0.8, seed=3)
    first = [s.token for s in generate_ids(run, PROMPT, shape, CHUNK, 4, sampling)]
    again = [s.token for s in generate_ids(run, PROMPT, shape, CHUNK, 4, Sampling(top_k=5, top_p=0.9,
                                                                                   temperature=0.8, seed=3))]
    assert first == again
    greedy_first = next(generate_ids(run, PROMPT, shape, CHUNK, 16)).token
    assert [s.token for s in generate_ids(run, PROMPT, shape, CHUNK, 16, Sampling(), {greedy_first})] == [greedy_first]
    with pytest.raises(ContextFullError, match="context of 32 tokens is full"):
        list(generate_ids(run, PROMPT, shape, CHUNK, CONTEXT))
    with pytest.raises(ContextFullError, match="prompt has 33 tokens"):
        list(generate_ids(run, [5] * 33, shape, CHUNK, 1))


@pytest.mark.parametrize("arguments, message", [
    (dict(context=8, prefill_chunk=16), "larger than --context 8"),
    (dict(context=4096), "above the model's maximum of 1024 positions"),
    (dict(context=32, kv_cache="paged"), "unknown kv_cache 'paged'"),
    (dict(context=32, target="iOS17"), "needs --target iOS18"),
])
def test_bad_generation_requests_are_refused(arguments, message):
    with pytest.raises(ConversionError, match=message):
        convert(build_model("llama", hf.LlamaForCausalLM), task="text-generation", **arguments)


def test_a_model_without_a_causal_head_is_refused():
    with pytest.raises(ConversionError, match="no causal language-model head"):
        convert(build_model("llama"), task="text-generation", context=32)


def test_cli_writes_a_verified_two_function_package(tmp_path, capsys):
    source = save_fixture(tmp_path / "models" / "gpt2", "gpt2", hf.GPT2LMHeadModel)
    output = tmp_path / "gpt2.mlpackage"
    code = main(["convert", str(source), "--task", "text-generation", "--context", "32", "--prefill-chunk", "8",
                 "--offline", "--quiet", "-o", str(output), "--min-psnr", "55"])
    assert code == 0
    report = json.loads((tmp_path / "gpt2.report.json").read_text())
    assert set(report["generation"]["functions"]) == {"prefill", "decode"}
    attention = {entry["function"]: entry for entry in report["passes"] if entry["pass"] == "ane::attention_to_einsum"}
    assert set(attention) == {"prefill", "decode"}  # each function's own passes, not the last conversion's
    assert all(sum(entry["rewritten"].values()) == 2 for entry in attention.values())
    for check in report["generation"]["prompts"]:
        assert check["first_divergence"] is None or check["near_tie"]
        # held to the DEFAULT pipeline's package, converted beside it and fed the same tokens
        assert len(check["default_psnr_db"]) == len(check["psnr_db"])
        assert check["worst_psnr_db"] >= check["default_worst_psnr_db"] - TWIN_ALLOWANCE_DB
    assert report["verified"]
    bad = main(["convert", str(source), "--task", "text-generation", "--context", "8", "--prefill-chunk", "9",
                "--offline", "--quiet", "-o", str(tmp_path / "bad.mlpackage")])
    assert bad == 2 and not (tmp_path / "bad.mlpackage").exists()

    # milpasses generate streams the package's greedy continuation: Hugging Face's, decoded.
    assert_generate_streams_hugging_faces_text(capsys, output, source)
    assert main(["generate", str(output), "word " * 40]) == 2
    assert "context" in capsys.readouterr().err


def test_analyze_reads_the_decode_function_and_prices_the_cache(llama_package, capsys):
    _, path, _ = llama_package
    assert main(["analyze", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generation (decode, 1 token(s) per call, context 32, cache as io)" in out
    # 2 layers x 16 channels, fp16, K and V: 128 bytes per position; io moves the whole cache.
    assert "io 4,224" in out and "state 128" in out
