"""``milpasses analyze``: table, JSON and HTML outputs, --compare, and clear refusals."""

import json
import sys

import coremltools as ct
import numpy as np
import pytest
import torch

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.analyze import analyze, compute_plan, render
from milpasses.cli import main
from milpasses.simulator import load_program

on_macos = sys.platform == "darwin"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The tiny DistilBERT fixture through ane_pipeline(), saved as an .mlpackage."""
    path = tmp_path_factory.mktemp("analyze") / "distilbert.mlpackage"
    F.convert("distilbert", "fp16", pass_pipeline=ane_pipeline(), batch=1).save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    """A tiny seeded DistilBERT saved as a Hugging Face model directory (no hub access)."""
    path = tmp_path_factory.mktemp("hf") / "tiny-distilbert"
    F.build_model("distilbert").save_pretrained(str(path))
    return path


def test_terminal_table_has_a_line_per_op_and_a_summary(package, capsys):
    assert main(["analyze", str(package)]) == 0
    out = capsys.readouterr().out
    ops = [op for op in load_program(package).functions["main"].operations if op.op_type != "const"]
    for op in ops:
        assert f"{op.name} " in out or op.name[:48] in out
    assert "gather" in out and "CPU*" in out  # the embedding lookup, in the input stage
    for heading in ("predicted on the ANE:", "device partitions:", "estimated latency per chip:", "assumptions"):
        assert heading in out


def test_json_parses_and_accounts_for_every_op(package, capsys):
    assert main(["analyze", str(package), "--json", "--chip", "M4"]) == 0
    document = json.loads(capsys.readouterr().out)
    (analysis,) = document["analyses"].values()
    ops = [op for op in load_program(package).functions["main"].operations if op.op_type != "const"]
    assert [o["name"] for o in analysis["ops"]] == [op.name for op in ops]
    assert analysis["chip"] == "M4"
    assert all(o["predictions"][0]["confidence"] in ("documented", "reverse-engineered", "community")
               for o in analysis["ops"])
    summary = analysis["summary"]
    assert summary["estimated_seconds"] == pytest.approx(summary["estimated_seconds_by_chip"]["M4"])
    assert summary["estimated_seconds"] == pytest.approx(
        sum(o["estimated_seconds"] for o in analysis["ops"]) + summary["dispatch_seconds"] + summary["switch_seconds"])
    assert analysis["assumptions"]


def test_html_picture_is_written_once_and_never_over_a_users_file(package, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["analyze", str(package), "--html", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<script" not in text
    assert text.count('<rect class="op"') == len(analyze(package).ops)
    page.write_text("mine")
    capsys.readouterr()
    assert main(["analyze", str(package), "--html", str(page)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert page.read_text() == "mine"
    assert main(["analyze", str(package), "--html", str(page), "--overwrite"]) == 0
    assert "<svg" in page.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]  # no staging file left


def test_compare_converts_a_model_directory_both_ways(hf_model_dir, tmp_path, capsys):
    page = tmp_path / "compare.html"
    assert main(["analyze", str(hf_model_dir), "--compare", "--seq-len", "16", "--json", "--html", str(page)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert set(document["analyses"]) == {"DEFAULT", "ane_pipeline()"}
    default_ops = {o["type"] for o in document["analyses"]["DEFAULT"]["ops"]}
    pipeline_ops = {o["type"] for o in document["analyses"]["ane_pipeline()"]["ops"]}
    assert "linear" in default_ops and "conv" in pipeline_ops and "linear" not in pipeline_ops
    by_chip = {name: document["analyses"][name]["summary"]["estimated_seconds_by_chip"]
               for name in ("DEFAULT", "ane_pipeline()")}
    assert document["speedup"] == pytest.approx(
        {chip: by_chip["DEFAULT"][chip] / by_chip["ane_pipeline()"][chip] for chip in by_chip["DEFAULT"]})
    assert page.read_text().count("<svg") == 6  # execution strip, per layer and per op, for each conversion


def test_compare_prints_the_predicted_speedup_for_the_bundled_model(capsys):
    assert main(["analyze", "--compare", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2 (bundled)" in out
    assert "predicted speed-up of ane_pipeline(): A14 " in out


@pytest.mark.parametrize("argument, message", [
    ("absent.mlpackage", "no Core ML package at"),
    ("model.mlmodel", "is an .mlmodel"),
])
def test_missing_or_wrong_kind_of_package(tmp_path, capsys, argument, message):
    (tmp_path / "model.mlmodel").write_bytes(b"not a model")
    assert main(["analyze", str(tmp_path / argument)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_corrupt_package_is_a_one_line_error(tmp_path, capsys):
    broken = tmp_path / "broken.mlpackage"
    broken.mkdir()
    (broken / "Manifest.json").write_text("{not json")
    assert main(["analyze", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("milpasses: error: cannot") and len(err.strip().splitlines()) == 1


def test_directory_that_is_neither_a_package_nor_a_model(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not an .mlpackage, nor a Hugging Face model directory" in capsys.readouterr().err


def test_compare_needs_a_model_not_a_package(package, capsys):
    assert main(["analyze", str(package), "--compare"]) == 2
    assert "--compare converts a model twice" in capsys.readouterr().err


def test_a_neuralnetwork_model_is_refused():
    traced = torch.jit.trace(torch.nn.Linear(4, 2).eval(), torch.zeros(1, 4))
    model = ct.convert(traced, inputs=[ct.TensorType(shape=(1, 4), dtype=np.float32)],
                       convert_to="neuralnetwork", skip_model_load=True)
    with pytest.raises(ValueError, match="only ML Program"):
        analyze(model)


@pytest.mark.skipif(on_macos, reason="the guard is for systems without Core ML's runtime")
def test_device_is_refused_off_macos_before_any_work(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "absent.mlpackage"), "--device"]) == 2
    err = capsys.readouterr().err
    assert "--device needs macOS" in err and sys.platform in err


@pytest.mark.skipif(not on_macos, reason="MLComputePlan needs macOS (Core ML's runtime)")
def test_device_shows_core_ml_plan_beside_predictions(package, capsys):
    assert main(["analyze", str(package), "--device"]) == 0
    out = capsys.readouterr().out
    assert "MLComputePlan" in out and "agreement with MLComputePlan:" in out


def test_plan_columns_and_agreement_rate_from_a_given_plan(package):
    analysis = analyze(package)
    first, second = analysis.ops[0], analysis.ops[1]
    planned = {first.output_name: (first.device, 0.25), second.output_name: ("GPU", 0.5), "a_const": (None, None)}
    text = render.table(analysis, planned)
    assert "MLComputePlan" in text.splitlines()[0] and "0.2500" in text
    predicted = {r.output_name: r.device for r in analysis.ops}
    assert compute_plan.agreement(predicted, planned) == (1 if second.device != "GPU" else 2, 2)


def test_picture_has_a_bar_per_layer_half_whose_times_add_up(package):
    analysis = analyze(package)
    segments = render.layer_segments(analysis)
    kinds = [kind for kind, _ in segments]
    assert kinds.count("attention") == kinds.count("feed-forward") == F.LAYERS
    assert sum(len(piece) for _, piece in segments) == len(analysis.ops)
    page = render.html_page({"ane": analysis})
    assert page.count("attention (") == F.LAYERS and "Per layer" in page


def test_picture_opens_with_the_execution_strip_and_its_switches(package):
    analysis = analyze(package)
    page = render.html_page({"ane": analysis})
    strip, layers = page.index('class="strip"'), page.index("Per layer")
    assert strip < layers  # above the per-layer bars
    assert page.count('<rect class="strip"') == len(analysis.ops)
    assert page.count('<g class="switch">') == len(analysis.partitions) - 1 == len(analysis.switches())
    order = analysis.execution_order()
    assert sorted(r.name for r in order) == sorted(r.name for r in analysis.ops)
    first_after_switch = [order[i].device for i, _, _ in analysis.switches()]
    assert first_after_switch == [device for device, _ in analysis.partitions[1:]]
    assert f"{len(analysis.partitions)} device partitions" in page
