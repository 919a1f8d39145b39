"""benchmarks/logs/calibration.json: its leave-one-out fit recomputed from its committed per-point
inputs (no conversion), its bars, and the figures cost.py and docs/analyze.md quote from it."""

import json
from pathlib import Path

import pytest

from benchmarks import calibration
from milpasses.analyze import cost as C

ROOT = Path(__file__).resolve().parent.parent
LOG = json.loads(calibration.LOG.read_text())


def test_the_inputs_hold_todays_chips_fixed_parameters_neutral_start_and_points():
    fixed = calibration.fixed_inputs()
    for key in fixed:
        assert LOG["inputs"][key] == fixed[key], f"{key} changed since the calibration ran: run it again"
    left_out = {entry.split(": ")[0] for entry in LOG["left_out"]}  # "name on chip: why"
    assert [(p["name"], p["chip"], p["measured"]) for p in LOG["inputs"]["points"]] == [
        (p.name, p.chip, p.measured) for p in calibration.POINTS if f"{p.name} on {p.chip}" not in left_out]


def test_the_leave_one_out_fit_recomputed_from_the_inputs_is_the_committed_one():
    recomputed, committed = calibration.calibrate(LOG["inputs"]), LOG["results"]
    assert recomputed["fitted"] == pytest.approx(committed["fitted"], rel=1e-9)
    for mine, theirs in zip(recomputed["points"], committed["points"], strict=True):
        assert mine["name"] == theirs["name"]
        assert [mine[k] for k in ("fit_all", "leave_one_out", "error")] == pytest.approx(
            [theirs[k] for k in ("fit_all", "leave_one_out", "error")], rel=1e-9)
    assert (recomputed["median_error"], recomputed["worst_error"]) == pytest.approx(
        (committed["median_error"], committed["worst_error"]), rel=1e-9)
    assert recomputed["bars"] == committed["bars"] == calibration.BARS


def test_the_committed_leave_one_out_errors_meet_the_bars():
    results = LOG["results"]
    assert results["median_error"] <= calibration.BARS["median_error"]
    assert results["worst_error"] <= calibration.BARS["worst_error"]
    assert results["passed"]


def test_cost_py_and_the_docs_quote_the_committed_figures():
    results = LOG["results"]
    for name, value in results["fitted"].items():
        assert getattr(C.PARAMETERS, name) == pytest.approx(float(f"{value:.2g}")), name  # two significant figures
    figures = f"median error {results['median_error']:.2f}x, worst {results['worst_error']:.2f}x"
    assert f"leave-one-out {figures}" in C.PARAMETER_SOURCES["ane_efficiency"]
    assert f"Leave-one-out: {figures}" in " ".join((ROOT / "docs" / "analyze.md").read_text().split())
