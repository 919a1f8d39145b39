"""Running one milpasses pass on a small program, and reading what came out."""

import copy

import numpy as np
from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

import milpasses.passes  # noqa: F401  (registers the ane:: passes, so a test file runs on its own)
from milpasses.simulator import simulate


def run_passes(program, *pass_ids, **options):
    """Apply the passes in order, each a fresh instance (options as ``pass_option=value`` for
    every pass that has it); return the reports, by pass id."""
    reports = {}
    for pass_id in pass_ids:
        graph_pass = type(PASS_REGISTRY[pass_id])()
        for name, value in options.items():
            if hasattr(graph_pass, name):
                setattr(graph_pass, name, value)
        graph_pass(program)
        reports[pass_id] = graph_pass.report
    return reports


def op_types(program) -> list[str]:
    return [op.op_type for op in program.functions["main"].operations if op.op_type != "const"]


def rewritten_matches_original(program, inputs, *pass_ids, **options):
    """Simulate the program before and after the passes; return (before, after, reports)."""
    before = simulate(copy.deepcopy(program), inputs)
    reports = run_passes(program, *pass_ids, **options)
    after = simulate(program, inputs)
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].shape == before[name].shape and after[name].dtype == before[name].dtype
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5)
    return before, after, reports
