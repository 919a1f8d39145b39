"""Verifying: the converted program, simulated, against the PyTorch fp32 model.

At each verified length the sample rows run through the reference module at once (rows do not
interact) and through the simulated program a batch at a time; each output's PSNR is recorded,
per-token outputs on real tokens only. Below the threshold the program is screened with
``check_fp16``. On macOS, Core ML's own prediction is compared too; elsewhere the report says
it was skipped.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch

from milpasses.convert.load import LoadedModel
from milpasses.convert.options import Options
from milpasses.errors import first_line
from milpasses.convert.report import ConversionReport
from milpasses.convert.samples import as_tensors, sample_inputs, verification_rows
from milpasses.convert.trace import Traced
from milpasses.simulator import SimulationError, Simulator, psnr
from milpasses.simulator.fp16_check import check_fp16


#: Outputs compared by cosine similarity too (what a sentence-embedding search ranks by).
EMBEDDING_OUTPUTS = ("sentence_embedding",)


def worst_cosine(reference: np.ndarray, actual: np.ndarray) -> float:
    """The lowest cosine similarity between a row of ``reference`` and the same row of ``actual``."""
    reference = reference.reshape(len(reference), -1).astype(np.float64)
    actual = actual.reshape(len(actual), -1).astype(np.float64)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(actual, axis=1)
    return float(np.min(np.sum(reference * actual, axis=1) / np.maximum(norms, 1e-30)))


def verified_lengths(lengths: tuple) -> list:
    """Every enumerated length, or the smallest and largest when there are more than three."""
    return list(lengths) if len(lengths) <= 3 else [lengths[0], lengths[-1]]


def simulation_steps(lengths: list, batch: int) -> int:
    """How many simulator runs :func:`verify` makes (the length of its progress bar)."""
    return len(lengths) * (verification_rows(batch) // batch)


def verify(mlmodel, traced: Traced, loaded: LoadedModel, options: Options, lengths: list,
           report: ConversionReport, step: Callable[[], None]) -> None:
    """Fill ``report``'s PSNR, samples, fp16 findings and device check; ``step`` is called after
    each simulator run."""
    try:
        first_inputs = _compare(mlmodel, traced, loaded, options, lengths, report, step)
    except SimulationError as error:
        report.verification_error = str(error)
        report.device_check = "MLModel.predict not run: the simulation failed first"
        return
    if not report.passed:
        report.fp16_findings = [str(f) for f in check_fp16(mlmodel._mil_program, first_inputs)]
    report.device_check = _device_check(mlmodel, traced, first_inputs)


def _compare(mlmodel, traced: Traced, loaded: LoadedModel, options: Options, lengths: list,
             report: ConversionReport, step) -> dict[str, np.ndarray]:
    """Simulate the program at each length, record PSNR per output; returns the first inputs run."""
    simulator = Simulator(mlmodel._mil_program)
    batch, token_outputs = options.batch, options.spec.token_outputs
    first_inputs = None
    for length in lengths:
        inputs, report.samples = sample_inputs(loaded, options.task, verification_rows(batch), length)
        rows = len(next(iter(inputs.values())))
        with torch.no_grad():
            expected = traced.reference(*as_tensors(inputs))
        expected = expected if isinstance(expected, tuple) else (expected,)
        simulated = {n: [] for n in traced.output_names}
        for start in range(0, rows, batch):
            chunk = {k: v[start:start + batch] for k, v in inputs.items()}
            first_inputs = first_inputs or chunk
            for name, value in simulator.run(chunk).items():
                simulated[name].append(value)
            step()
        valid = inputs["attention_mask"].astype(bool) if "attention_mask" in inputs else None
        for name, reference in zip(traced.output_names, expected):
            want, got = reference.numpy(), np.concatenate(simulated[name])
            if name in token_outputs and valid is not None:
                want, got = want[valid], got[valid]
            report.psnr.append({"output": name, "seq_len": length, "psnr_db": round(psnr(want, got), 2)})
            if name in EMBEDDING_OUTPUTS:
                report.cosine.append({"output": name, "seq_len": length, "worst_cosine": round(worst_cosine(want, got), 5)})
    return first_inputs


def _device_check(mlmodel, traced: Traced, inputs: dict[str, np.ndarray]) -> str:
    """On macOS, Core ML's own prediction against PyTorch; elsewhere, say that it was skipped."""
    if sys.platform != "darwin":
        return "MLModel.predict skipped: Core ML runs only on macOS (the simulated PSNR is the check here)"
    try:
        predicted = mlmodel.predict({k: v.astype(np.int32) if v.dtype.kind in "iu" else v for k, v in inputs.items()})
    except Exception as error:  # Core ML's runtime reports its failures in many types
        return f"MLModel.predict failed: {first_line(error)}"
    with torch.no_grad():
        expected = traced.reference(*as_tensors(inputs))
    expected = expected if isinstance(expected, tuple) else (expected,)
    scores = [f"{n} {psnr(e.numpy(), predicted[n]):.1f} dB" for n, e in zip(traced.output_names, expected)]
    return "MLModel.predict (CPU_AND_NE) against PyTorch fp32: " + ", ".join(scores)
