"""Conversion cost of ane_pipeline() against DEFAULT: wall time and peak RSS, side by side in
one run, on a DistilBERT-base-sized model and a 24-layer BERT-large-shaped one (S=128, random
seeded weights). Bars: time <= 1.25x, peak RSS <= 1.2x. Also prints the ane:: pass times at 6
and 24 layers, which should grow linearly with depth.

    python benchmarks/conversion_cost.py [--models distilbert-base,bert-large]

Each conversion runs in a fresh child process so that its peak RSS is its own; DEFAULT and
ane children alternate, and the best of ``--repeats`` runs of each is compared, since one run
on a shared 2-core machine varies by +-20%.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SEQ_LEN = 128
TIME_BAR, RSS_BAR = 1.25, 1.2


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


def child(model_name: str, pipeline_name: str) -> None:
    import numpy as np
    import torch

    import milpasses
    import milpasses.frontend  # noqa: F401  (DEFAULT needs the converters too)
    from milpasses.tracing import LastHiddenState, convert_traced

    model = build(model_name)
    inputs = {"input_ids": np.zeros((1, SEQ_LEN), np.int32), "attention_mask": np.ones((1, SEQ_LEN), np.int32)}
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    with torch.no_grad():
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), examples)
    pipeline = milpasses.ane_pipeline() if pipeline_name == "ane" else None  # None: DEFAULT
    started = time.perf_counter()
    convert_traced(traced, inputs, pass_pipeline=pipeline)
    seconds = time.perf_counter() - started
    pass_seconds = {k: r.seconds for k, r in milpasses.last_reports().items()} if pipeline_name == "ane" else {}
    print(json.dumps({
        "convert_seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "pass_seconds": pass_seconds,
    }))


def measure(model_name: str, pipeline_name: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", model_name, pipeline_name],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="distilbert-base,bert-large")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PIPELINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    layers = {"distilbert-base": 6, "bert-large": 24}
    for model_name in args.models.split(","):
        runs = {"default": [], "ane": []}
        for _ in range(args.repeats):
            for pipeline_name in runs:
                runs[pipeline_name].append(measure(model_name, pipeline_name))
        default, ane = (min(runs[p], key=lambda r: r["convert_seconds"]) for p in ("default", "ane"))
        time_ratio = ane["convert_seconds"] / default["convert_seconds"]
        rss_ratio = ane["peak_rss_mib"] / default["peak_rss_mib"]
        pass_total = sum(ane["pass_seconds"].values())
        print(f"{model_name} ({layers[model_name]} layers, S={SEQ_LEN}, fp16, best of {args.repeats})")
        print(f"  convert time  DEFAULT {default['convert_seconds']:7.1f} s   ane {ane['convert_seconds']:7.1f} s"
              f"   ratio {time_ratio:.2f} (bar <= {TIME_BAR}: {'PASS' if time_ratio <= TIME_BAR else 'FAIL'})")
        print(f"  peak RSS      DEFAULT {default['peak_rss_mib']:7.0f} MiB ane {ane['peak_rss_mib']:7.0f} MiB"
              f" ratio {rss_ratio:.2f} (bar <= {RSS_BAR}: {'PASS' if rss_ratio <= RSS_BAR else 'FAIL'})")
        print(f"  ane:: passes  {pass_total:.2f} s in all, {pass_total / layers[model_name] * 1e3:.1f} ms per layer: "
              + ", ".join(f"{k} {v:.2f} s" for k, v in ane["pass_seconds"].items()))


if __name__ == "__main__":
    main()
