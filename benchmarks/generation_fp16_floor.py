"""How far below 60 dB fp16 storage alone puts a causal LM's logits, per decode step.

For each family: the simulated package's worst per-step logits PSNR (fp16, as the device
runs it), the same package with fp32 arithmetic (its fp16 weights and tables kept), and two
floors computed by torch in fp32 on the same tokens: every parameter rounded to fp16, then
the rotary tables rounded too (the package stores them in fp16). No fp16 program can beat the
floor that rounds everything it must store, so a family below 60 dB there fails the issue's
60 dB bar for a reason no conversion can remove.

    PYTHONPATH=. python benchmarks/generation_fp16_floor.py [--families llama,qwen2]  # default: every family
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.generation import CAUSAL_LM, CHUNK, CONTEXT, PROMPTS, _model
from fixtures.fp16_floor import rounded_to_fp16, worst_step_floor_db
from milpasses.convert.text_generation import build_package
from milpasses.generation.package import FUNCTIONS, SimulatedPackage, check_prompt
from milpasses.pipeline import ane_pipeline
from milpasses.simulator import Simulator, load_program


class _Package(SimulatedPackage):
    """The package simulated with fp16 rounding (as the device runs it) or without it."""

    def __init__(self, path: Path, emulate_fp16: bool):
        program = load_program(path)
        self.simulators = {name: Simulator(program, name, emulate_fp16=emulate_fp16) for name in FUNCTIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(CAUSAL_LM))
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp())
    print("worst step over 2 prompts x 16 greedy tokens, logits PSNR in dB against torch fp32")
    print(f"{'family':<10} {'package fp16':>12} {'fp32 math':>10} {'floor: weights':>15} {'+ rotary tables':>16}")
    for family in args.families.split(","):
        model = _model(family)
        path = directory / f"{family}.mlpackage"
        build_package(model, CONTEXT, CHUNK, ane_pipeline, path)
        worst = {}
        for emulate in (True, False):
            checks = [check_prompt(_Package(path, emulate), model, p, CONTEXT, CHUNK, 16) for p in PROMPTS]
            worst[emulate] = min(c.worst_psnr_db for c in checks)
            if emulate:
                produced = [c.produced for c in checks]
        floors = [min(worst_step_floor_db(model, rounded, p, t) for p, t in zip(PROMPTS, produced))
                  for rounded in (rounded_to_fp16(model, False), rounded_to_fp16(model))]
        print(f"{family:<10} {worst[True]:>12.1f} {worst[False]:>10.1f} {floors[0]:>15.1f} {floors[1]:>16.1f}")


if __name__ == "__main__":
    main()
