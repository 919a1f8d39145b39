"""Conversion cost of ane_pipeline() against DEFAULT: wall time and peak RSS, side by side in
one run, on a DistilBERT-base-sized model and a 24-layer BERT-large-shaped one (S=128, random
seeded weights). Bars: time <= 1.5x, peak RSS <= 1.2x. Also prints the ane:: pass times at 6
and 24 layers, which should grow linearly with depth.

On DistilBERT-base it also times the form written by hand for the ANE, as Apple's 2022 article
describes (``apple_form.py``: the same weights in (B, C, 1, S), per-head einsums), through
DEFAULT: what the same layout costs to convert without milpasses.

    python benchmarks/conversion_cost.py [--models distilbert-base,bert-large]

Each conversion runs in a fresh child process so that its peak RSS is its own; the children
alternate, and the best of ``--repeats`` runs of each is compared, since one run on a shared
2-core machine varies by +-20%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SEQ_LEN = 128
TIME_BAR, RSS_BAR = 1.5, 1.2
#: run name -> (how the model is written, the pipeline it is converted with)
RUNS = {"default": ("transformers", "DEFAULT"), "ane": ("transformers", "ane_pipeline()"),
        "hand-written": ("by hand, ANE form", "DEFAULT")}


def build(model_name: str):
    import torch
    import transformers as hf

    torch.manual_seed(0)
    if model_name == "distilbert-base":
        config = hf.DistilBertConfig()  # hidden 768, 6 layers, 12 heads
        model_class = hf.DistilBertModel
    else:
        config = hf.BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                               intermediate_size=4096)
        model_class = hf.BertModel
    config._attn_implementation = "eager"
    return model_class(config).eval()


def child(model_name: str, run: str) -> None:
    import numpy as np
    import torch

    import milpasses
    import milpasses.frontend  # noqa: F401  (DEFAULT needs the converters too)
    from milpasses.convert.coreml import convert_traced
    from milpasses.frontend.tracing import LastHiddenState

    model = build(model_name)
    inputs = {"input_ids": np.zeros((1, SEQ_LEN), np.int32), "attention_mask": np.ones((1, SEQ_LEN), np.int32)}
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    module = LastHiddenState(model, tuple(inputs)).eval()
    if run == "hand-written":
        sys.path.insert(0, str(Path(__file__).parent))
        from apple_form import from_distilbert

        module = from_distilbert(model)
    with torch.no_grad():
        traced = torch.jit.trace(module, examples)
    pipeline = milpasses.ane_pipeline() if run == "ane" else None  # None: DEFAULT
    started = time.perf_counter()
    program = convert_traced(traced, inputs, pass_pipeline=pipeline)._mil_program
    seconds = time.perf_counter() - started
    pass_seconds = {k: r.seconds for k, r in pipeline.reports.items()} if run == "ane" else {}
    print(json.dumps({
        "convert_seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pass_seconds": pass_seconds,
        "ops": sum(op.op_type != "const" for op in program.functions["main"].operations),
    }))


def measure(model_name: str, run: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", model_name, run],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def verdict(ratio: float, bar: float) -> str:
    return f"bar <= {bar}: {'PASS' if ratio <= bar else 'FAIL'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="distilbert-base,bert-large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    layers = {"distilbert-base": 6, "bert-large": 24}
    for model_name in args.models.split(","):
        # The hand-written form exists for DistilBERT only (Apple's article).
        runs = {run: [] for run in RUNS if run != "hand-written" or model_name == "distilbert-base"}
        for _ in range(args.repeats):
            for run in runs:
                runs[run].append(measure(model_name, run))
        best = {run: min(results, key=lambda r: r["convert_seconds"]) for run, results in runs.items()}
        default, ane = best["default"], best["ane"]
        print(f"{model_name} ({layers[model_name]} layers, S={SEQ_LEN}, fp16, best of {args.repeats})")
        print(f"  {'model written':<20} {'pipeline':<15} {'convert':>8} {'x DEFAULT':>9} {'peak RSS':>9} {'ops':>5}")
        for run, result in best.items():
            written, pipeline = RUNS[run]
            print(f"  {written:<20} {pipeline:<15} {result['convert_seconds']:7.1f}s "
                  f"{result['convert_seconds'] / default['convert_seconds']:8.2f}x "
                  f"{result['peak_rss_mib']:5.0f} MiB {result['ops']:5d}")
        time_ratio = ane["convert_seconds"] / default["convert_seconds"]
        rss_ratio = ane["peak_rss_mib"] / default["peak_rss_mib"]
        print(f"  ane_pipeline time {time_ratio:.2f}x DEFAULT ({verdict(time_ratio, TIME_BAR)}), "
              f"peak RSS {rss_ratio:.2f}x ({verdict(rss_ratio, RSS_BAR)})")
        pass_total = sum(ane["pass_seconds"].values())
        print(f"  ane:: passes  {pass_total:.2f} s in all, {pass_total / layers[model_name] * 1e3:.1f} ms per layer: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in ane["pass_seconds"].items()))


if __name__ == "__main__":
    main()
