"""Simulator speed: the fp16 simulation of a DistilBERT-base-sized program against the torch
fp32 forward of the same model, timed side by side in one run. Bar: ratio <= 3.

    python benchmarks/simulator_speed.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import transformers as hf

import milpasses.frontend  # noqa: F401  (frontend converters)
from milpasses.simulator import Simulator, psnr
from milpasses.convert.coreml import convert_traced
from milpasses.frontend.tracing import LastHiddenState

SEQ_LEN = 128
BAR = 3.0


def distilbert_base() -> torch.nn.Module:
    """Stock DistilBERT-base shape (hidden 768, 6 layers, 12 heads), seeded random weights."""
    torch.manual_seed(0)
    config = hf.DistilBertConfig()
    config._attn_implementation = "eager"
    return hf.DistilBertModel(config).eval()


def best_of(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = distilbert_base()
    rng = np.random.default_rng(0)
    inputs = {
        "input_ids": rng.integers(0, model.config.vocab_size, (1, SEQ_LEN)).astype(np.int32),
        "attention_mask": np.ones((1, SEQ_LEN), np.int32),
    }
    tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}
    with torch.no_grad():
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), tuple(tensors.values()))
    mlmodel = convert_traced(traced, inputs)
    simulator = Simulator(mlmodel)  # constants are prepared once, as a device loads weights once

    def torch_forward():
        with torch.no_grad():
            return model(**tensors).last_hidden_state

    expected = torch_forward().numpy()
    actual = simulator.run(inputs)["last_hidden_state"]
    torch_best, torch_median = best_of(torch_forward, args.repeats)
    sim_best, sim_median = best_of(lambda: simulator.run(inputs), args.repeats)

    ratio = sim_best / torch_best
    print(f"DistilBERT-base, B=1, S={SEQ_LEN}, {torch.get_num_threads()} torch threads, best of {args.repeats}")
    print(f"  torch fp32 forward      {torch_best * 1e3:8.1f} ms (median {torch_median * 1e3:.1f})")
    print(f"  simulated fp16 program  {sim_best * 1e3:8.1f} ms (median {sim_median * 1e3:.1f})")
    print(f"  PSNR of the simulation against torch: {psnr(expected, actual):.1f} dB")
    print(f"  ratio simulation / torch: {ratio:.2f}  (bar <= {BAR}: {'PASS' if ratio <= BAR else 'FAIL'})")


if __name__ == "__main__":
    main()
