"""``--compress auto``: bits per layer from {8, 6, 4}, the fewest weight bytes that keep every
output at the PSNR floor.

Each weight is palettized at each width once (``ct.optimize.coreml``'s k-means, per tensor);
its sensitivity is measured by simulation, that weight alone compressed, as the noise power it
adds to each output against PyTorch fp32 on the verification samples. Noise from different
layers adds (their errors are independent), so a plan's PSNR is predicted from the sum. Widths
are then lowered greedily, most bytes saved per share of the noise budget first, and the final
plan is simulated whole; while it misses the floor, the last lowering is undone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from milpasses.convert.compress.sites import EMBEDDING_MIN_BITS, WeightSite, palettized
from milpasses.convert.samples import as_tensors, sample_inputs, verification_rows
from milpasses.simulator import Simulator

WIDTHS = (8, 6, 4)
_WEIGHT_INPUT = {"conv": "weight", "linear": "weight", "gather": "x", "matmul": "y"}


def _weight_var(function, op_name: str):
    op = next(op for op in function.operations if op.name == op_name)
    return op.inputs[_WEIGHT_INPUT[op.op_type]]


def _stored_bytes(site: WeightSite, bits: int) -> float:
    return site.elements * bits / 8 + 2 * 2 ** bits


class _Measure:
    """Noise power per output of the fp16 program with some weights replaced, against fp32 torch."""

    def __init__(self, mlmodel, traced, loaded, options):
        self.simulator = Simulator(mlmodel._mil_program)
        inputs, _ = sample_inputs(loaded, options.task, verification_rows(options.batch), loaded.lengths[0])
        with torch.no_grad():
            expected = traced.reference(*as_tensors(inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        self.batch = options.batch
        self.inputs = inputs
        valid = inputs["attention_mask"].astype(bool) if "attention_mask" in inputs else None
        self.selection = {n: valid if n in options.spec.token_outputs and valid is not None else None
                          for n in traced.output_names}
        self.reference = {n: self._select(n, e.numpy().astype(np.float64)) for n, e in zip(traced.output_names, expected)}
        self.peak = {n: float(np.max(np.abs(r))) for n, r in self.reference.items()}
        self.values = None  # every value of the unchanged program's run on each batch

    def _select(self, name, value):
        return value if self.selection[name] is None else value[self.selection[name]]

    def noise(self, constants=None) -> dict[str, float]:
        """With ``constants``, only what they change is simulated again: the values of the
        unchanged program's runs are kept from the first call."""
        rows = len(next(iter(self.inputs.values())))
        if self.values is None:
            self.values = [self.simulator.values({k: v[start:start + self.batch] for k, v in self.inputs.items()})
                           for start in range(0, rows, self.batch)]
        outputs = {n: [] for n in self.reference}
        for values in self.values:
            for name, value in self.simulator.rerun(values, constants or {}).items():
                outputs[name].append(value)
        return {n: float(np.mean((self._select(n, np.concatenate(outputs[n]).astype(np.float64)) - r) ** 2))
                for n, r in self.reference.items()}

    def psnr(self, noise: dict[str, float]) -> float:
        """The worst output's PSNR for these noise powers."""
        return min(20 * math.log10(self.peak[n] / math.sqrt(max(p, 1e-30))) for n, p in noise.items())


def plan(mlmodel, sites: list[WeightSite], traced, loaded, options) -> tuple[dict[str, int], list[dict]]:
    """Bits per weight-reading op, and per layer its measured PSNR at each width and its choice."""
    floor = options.min_psnr_db
    function = mlmodel._mil_program.functions["main"]
    names = {s.op_name: _weight_var(function, s.op_name).name for s in sites}
    decompressed = {}
    for bits in WIDTHS:
        compressed = palettized(mlmodel, {s.op_name: bits for s in sites})
        simulator = Simulator(compressed._mil_program)
        weights = {s.op_name: _weight_var(compressed._mil_program.functions["main"], s.op_name) for s in sites}
        decompressed[bits] = {op: simulator.constant(var) for op, var in weights.items()}
    measure = _Measure(mlmodel, traced, loaded, options)
    base = measure.noise()
    added = {}  # (op, bits) -> per-output added noise power
    for site in sites:
        for bits in WIDTHS:
            noise = measure.noise({names[site.op_name]: decompressed[bits][site.op_name]})
            added[site.op_name, bits] = {n: max(noise[n] - base[n], 0.0) for n in noise}
    budget = {n: measure.peak[n] ** 2 / 10 ** (floor / 10) - base[n] for n in base}

    def predicted(choice):
        return {n: base[n] + sum(added[op, b][n] for op, b in choice.items()) for n in base}

    def within(choice):
        return all(v <= base[n] + budget[n] for n, v in predicted(choice).items())

    lowest = {s.op_name: (WIDTHS[-1] if s.role == "body" else EMBEDDING_MIN_BITS) for s in sites}
    by_name = {s.op_name: s for s in sites}
    choice = {s.op_name: WIDTHS[0] for s in sites}
    lowered = []
    while True:
        best = None
        for op, bits in choice.items():
            if bits <= lowest[op]:
                continue
            lower = WIDTHS[WIDTHS.index(bits) + 1]
            trial = {**choice, op: lower}
            if not within(trial):
                continue
            saved = _stored_bytes(by_name[op], bits) - _stored_bytes(by_name[op], lower)
            cost = max((added[op, lower][n] - added[op, bits][n]) / max(budget[n], 1e-30) for n in base)
            score = saved / max(cost, 1e-12)
            if best is None or score > best[0]:
                best = (score, op, lower)
        if best is None:
            break
        lowered.append((best[1], choice[best[1]]))
        choice[best[1]] = best[2]
    while lowered:
        overrides = {names[op]: decompressed[bits][op] for op, bits in choice.items()}
        if measure.psnr(measure.noise(overrides)) >= floor:
            break
        op, bits = lowered.pop()
        choice[op] = bits
    report = [{"op": s.op_name, "role": s.role, "elements": s.elements, "bits": choice[s.op_name],
               "psnr_db_alone": {b: round(measure.psnr({n: base[n] + added[s.op_name, b][n] for n in base}), 2)
                                 for b in WIDTHS}} for s in sites]
    return choice, report
