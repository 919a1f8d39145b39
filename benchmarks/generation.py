"""Text generation with a KV cache, per fixture family and three decoder families no test names
(OLMo, Granite, SmolLM3, built tiny as the fixtures are): greedy tokens from the simulated
prefill + decode package against Hugging Face ``generate`` on two prompts, the worst step's
logits PSNR beside its DEFAULT twin's (the same steps converted by coremltools' DEFAULT
pipeline, fed the same tokens; a gap beyond 1 dB is flagged), each function's op counts and
the package's size; then simulated decode ms/token
against torch's own forward with its DynamicCache (CPU), as a ratio; and the analyze estimate
of decode tokens/s with the bytes the cache costs per token in io and in state. Every family runs
in each cache mode asked for (io and state by default: the tests run state on Llama and GPT-2
only). Then the package size: a fixture whose weights dominate (hidden 256, 4 layers), its
two-function package against a single-function (decode only) package, weight file and total.

    PYTHONPATH=. python benchmarks/generation.py [--families gpt2,llama,...] [--kv-cache io,state]
        [--llama-1b]   # also analyze a Llama-3.2-1B-shaped decode function (random weights; slow)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from pathlib import Path

import coremltools as ct
import numpy as np
import torch
import transformers as hf

from fixtures.families import _DECODER, SEED, build_model, causal_lm_families, perturb_parameters
from milpasses.analyze import analyze
from milpasses.generation.host import KVCache, StateCache, cache_bytes_per_token, run_step
from milpasses.convert.text_generation import build_package
from milpasses.generation.package import TWIN_ALLOWANCE_DB, SimulatedPackage, check_prompt
from milpasses.convert.text_generation import convert_step
from milpasses.frontend.generation_step import cache_shape
from milpasses.pipeline import ane_pipeline

#: Decoder families no test names, as tiny as the fixtures' (config class, model class, fields).
UNTESTED = {
    "olmo": (hf.OlmoConfig, hf.OlmoForCausalLM, dict(num_key_value_heads=2)),
    "granite": (hf.GraniteConfig, hf.GraniteForCausalLM,
                dict(num_key_value_heads=2, embedding_multiplier=12.0, residual_multiplier=0.22,
                     attention_multiplier=0.125, logits_scaling=8.0)),
    "smollm3": (hf.SmolLM3Config, hf.SmolLM3ForCausalLM,
                dict(num_key_value_heads=2, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
}
#: Every causal-LM fixture family, a Mistral-like model with a window in every layer, and the untested ones.
CAUSAL_LM = {**causal_lm_families(), "mistral_like": hf.MistralForCausalLM,
             **{name: model_class for name, (_, model_class, _) in UNTESTED.items()}}
CONTEXT, CHUNK = 64, 16
PROMPTS = ([5, 17, 42, 8, 9, 33, 71, 12, 4, 60, 23, 19, 88, 41, 7, 30, 52, 11, 64],  # a chunk and a remainder
           [7, 3, 91, 26, 45])
LAYOUT = {"transpose", "reshape", "expand_dims", "squeeze", "slice_by_index", "split", "concat", "tile"}
DECODE_STEPS = 24


def _model(family: str):
    if family == "mistral_like":  # a window everywhere, as Mistral's config has it
        config = hf.MistralConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                  max_position_embeddings=1024)
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        return hf.MistralForCausalLM(config).eval()
    if family in UNTESTED:
        config_class, model_class, fields = UNTESTED[family]
        config = config_class(**_DECODER, **fields)
        config._attn_implementation = "eager"
        torch.manual_seed(SEED)
        model = model_class(config).eval()
        perturb_parameters(model, torch.Generator().manual_seed(SEED), 0.2)
        return model
    return build_model(family, CAUSAL_LM[family])


def _torch_decode_ms(model, prompt, steps) -> float:
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
    return (time.perf_counter() - started) / steps * 1e3


def _simulated_decode_ms(run, shape, steps, kv_cache: str) -> float:
    cache = StateCache(run) if kv_cache == "state" else KVCache(shape)
    started = time.perf_counter()
    for position in range(steps):
        run_step(run, "decode", np.array([5]), position, cache)
    return (time.perf_counter() - started) / steps * 1e3


def family_row(family: str, directory: Path, kv_cache: str) -> dict:
    model = _model(family)
    path = directory / f"{family}-{kv_cache}.mlpackage"
    programs, _ = build_package(model, CONTEXT, CHUNK, ane_pipeline, path, kv_cache=kv_cache)
    twin_path = directory / f"{family}-{kv_cache}-default.mlpackage"
    build_package(model, CONTEXT, CHUNK, lambda: ct.PassPipeline.DEFAULT, twin_path, kv_cache=kv_cache)
    run = SimulatedPackage(path)
    checks = [check_prompt(run, model, p, CONTEXT, CHUNK, 16, kv_cache=kv_cache, twin=SimulatedPackage(twin_path))
              for p in PROMPTS]
    ops = {name: Counter(op.op_type for op in p.functions["main"].operations if op.op_type != "const")
           for name, p in programs.items()}
    shape = cache_shape(model, CONTEXT)
    simulated = _simulated_decode_ms(run, shape, DECODE_STEPS, kv_cache)
    torch_ms = _torch_decode_ms(model, PROMPTS[0], DECODE_STEPS)
    decode = analyze(path, function_name="decode")
    return {
        "family": f"{family} {kv_cache}",
        "matched": " ".join(f"{c.matched}/{len(c.expected)}" + (" (tie)" if c.near_tie else "") for c in checks),
        "worst_db": min(c.worst_psnr_db for c in checks),
        "against_twin": " ".join(f"{c.worst_psnr_db:.1f}/{c.default_worst_psnr_db:.1f}" + ("" if c.within_twin else "!")
                                 for c in checks),
        "ops": {name: (sum(c.values()), c["matmul"] + c["linear"], c["reshape"], sum(c[k] for k in LAYOUT))
                for name, c in ops.items()},
        "package_kib": _package_bytes(path) / 1024, "weights_kib": _weight_bytes(path) / 1024,
        "ratio": simulated / torch_ms, "simulated_ms": simulated, "torch_ms": torch_ms,
        "tokens_per_s": 1.0 / decode.latency, "cache": cache_bytes_per_token(shape.layers, shape.channels, shape.context),
    }


def _package_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _weight_bytes(path: Path) -> int:
    return (path / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size


def package_sizes(directory: Path) -> dict:
    """A Llama whose weights outweigh its program text (hidden 256, 4 layers, vocab 2048):
    the prefill + decode package against the decode function alone."""
    config = hf.LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(config).eval()
    both, single = directory / "size-both.mlpackage", directory / "size-decode.mlpackage"
    build_package(model, CONTEXT, CHUNK, ane_pipeline, both)
    convert_step(model, CONTEXT, 1, ane_pipeline()).save(str(single))
    return {"both": (_weight_bytes(both), _package_bytes(both)), "single": (_weight_bytes(single), _package_bytes(single)),
            "parameters": sum(p.numel() for p in model.parameters())}


def llama_1b_tokens_per_second() -> float:
    config = hf.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                            tie_word_embeddings=True, rope_theta=500000.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = hf.LlamaForCausalLM(config).eval()
    # The decode function alone, the one the estimate reads: converting prefill too (as
    # build_package does) took more than the 24 GiB of this machine.
    decode = convert_step(model, 512, 1, ane_pipeline())
    del model
    analysis = analyze(decode._mil_program, chip="A17Pro")
    return 1.0 / analysis.latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(CAUSAL_LM))
    parser.add_argument("--kv-cache", default="io,state")
    parser.add_argument("--llama-1b", action="store_true")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp())
    print(f"context {CONTEXT}, prefill chunk {CHUNK}, fp16; ops: total, matmul+linear, reshape, layout")
    print(f"worst dB: the package's worst step; per prompt, worst/DEFAULT: the package's worst step and its DEFAULT "
          f"twin's on the same tokens (! more than {TWIN_ALLOWANCE_DB:g} dB below it)")
    print(f"{'family':<19} {'tokens':<18} {'worst dB':>8} {'worst/DEFAULT':<22} {'prefill ops':<20} {'decode ops':<20} "
          f"{'pkg KiB':>8} {'wts KiB':>8} {'sim/torch':>9} {'est tok/s':>9}")
    for family in args.families.split(","):
        for kv_cache in args.kv_cache.split(","):
            _print_row(family_row(family, directory, kv_cache))
    sizes = package_sizes(directory)
    (both_weights, both_total), (single_weights, single_total) = sizes["both"], sizes["single"]
    print(f"package size, Llama hidden 256 x 4 layers ({sizes['parameters'] / 1e6:.2f} M parameters, fp16): "
          f"prefill+decode weights {both_weights / 1024:.0f} KiB, total {both_total / 1024:.0f} KiB; decode alone "
          f"weights {single_weights / 1024:.0f} KiB, total {single_total / 1024:.0f} KiB; ratio weights "
          f"{both_weights / single_weights:.3f}, total {both_total / single_total:.3f} (bar: within 1.05)")
    if args.llama_1b:
        print(f"Llama-3.2-1B shape, context 512, A17 Pro estimate: {llama_1b_tokens_per_second():.1f} tok/s "
              f"with fp16 weights (ExecuTorch, 4-bit weights (c4w), iPhone 15 Pro: ~30 tok/s)")


def _print_row(row: dict) -> None:
    ops = {k: "/".join(str(n) for n in v) for k, v in row["ops"].items()}
    print(f"{row['family']:<19} {row['matched']:<18} {row['worst_db']:>8.1f} {row['against_twin']:<22} {ops['prefill']:<20} {ops['decode']:<20} "
          f"{row['package_kib']:>8.0f} {row['weights_kib']:>8.0f} {row['ratio']:>9.1f} {row['tokens_per_s']:>9.0f}"
          f"   (decode {row['simulated_ms']:.1f} ms simulated vs {row['torch_ms']:.2f} ms torch; cache bytes/token "
          f"io {row['cache']['io']}, state {row['cache']['state']})")

if __name__ == "__main__":
    main()
