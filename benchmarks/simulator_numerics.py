"""PSNR against torch of every fixture family, MiniLM and DistilBERT-base, in the simulator's
storage numerics (fp16 at op outputs) and device numerics (fp16 at every step inside an op,
the Neural Engine's matmul limit), after ``ane_pipeline()`` and after DEFAULT.
Bar: DistilBERT-base and MiniLM >= 60 dB in device numerics after ``ane_pipeline()``.

    python benchmarks/simulator_numerics.py [--only NAME ...] [--reduction-accumulator fp16|fp32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.bundled import SAMPLE_SENTENCES, load_bundled
from milpasses.convert.coreml import convert_traced
from milpasses.frontend.tracing import LastHiddenState
from milpasses.simulator import DeviceNumerics, psnr, simulate

BAR_DB = 60.0
BARRED = ("distilbert_base", "minilm")


def family_case(name):
    """(ane program, DEFAULT program, inputs, torch's output, valid-token index) of a fixture family."""
    inputs = F.sample_inputs(name)
    return F.converted_ane(name, "fp16"), F.converted(name, "fp16"), inputs, F.torch_reference(name, inputs), \
        F.valid_tokens(inputs)


def minilm_case():
    model, tokenizer = load_bundled()
    batch = tokenizer(list(SAMPLE_SENTENCES), padding=True, return_tensors="np")
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}
    with torch.no_grad():
        expected = model(**tensors).last_hidden_state.numpy()
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), tuple(tensors.values()))
    ane = convert_traced(traced, inputs, pass_pipeline=ane_pipeline())
    return ane, convert_traced(traced, inputs), inputs, expected, F.valid_tokens(inputs)


def distilbert_base_case():
    ane, inputs, expected, _ = F.distilbert_base_converted("ane")
    default = F.distilbert_base_converted("default")[0]
    return ane, default, inputs, expected, F.valid_tokens(inputs)


def measure(program, inputs, expected, valid, numerics) -> float:
    actual = simulate(program, inputs, numerics=numerics)["last_hidden_state"]
    return psnr(expected[valid], actual[valid])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="rows to measure (family names, minilm, distilbert_base)")
    parser.add_argument("--reduction-accumulator", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--matmul-accumulator", default="fp32", choices=["fp16", "fp32"])
    args = parser.parse_args()
    device = DeviceNumerics(matmul_accumulator=args.matmul_accumulator,
                            reduction_accumulator=args.reduction_accumulator)

    cases = {name: (lambda name=name: family_case(name)) for name in F.FAMILIES}
    cases["minilm"] = minilm_case
    cases["distilbert_base"] = distilbert_base_case
    names = args.only or list(cases)

    print(f"device numerics: {device}")
    print(f"{'family':16} {'storage ane':>12} {'storage DEF':>12} {'device ane':>11} {'device DEF':>11} {'seconds':>8}")
    failures = []
    for name in names:
        ane, default, inputs, expected, valid = cases[name]()
        start = time.perf_counter()
        row = [measure(program, inputs, expected, valid, numerics)
               for numerics in ("storage", device) for program in (ane, default)]
        print(f"{name:16} " + " ".join(f"{value:{w}.1f}" for value, w in zip(row, (12, 12, 11, 11)))
              + f" {time.perf_counter() - start:8.1f}", flush=True)
        if name in BARRED and row[2] < BAR_DB:
            failures.append(f"{name} {row[2]:.1f} dB")
    if any(name in BARRED for name in names):
        verdict = "PASS" if not failures else "FAIL: " + ", ".join(failures)
        print(f"bar: DistilBERT-base and MiniLM >= {BAR_DB:.0f} dB in device numerics after ane_pipeline(): {verdict}")


if __name__ == "__main__":
    main()
