"""The ``analyze --html`` page as a real browser lays it out (Debian's Chromium, headless): the
execution strip's switch labels never overlap, and the summary opens the page, before the
per-op lists."""

import html
import itertools
import json
import re
import shutil
import subprocess

import pytest

from fixtures import families as F
from milpasses import ane_pipeline
from milpasses.analyze import render
from milpasses.analyze.chips import CHIPS
from milpasses.analyze.cost import OpCost
from milpasses.analyze.report import Analysis, OpRecord
from milpasses.analyze.rules import ANE, CPU, GPU, Prediction
from milpasses.cli import main

# Without the background-networking flags Chromium keeps calling out to a closed network.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1024")

# Appended to the page under test: once it is laid out, writes the boxes the assertions need into
# the DOM, which --dump-dom prints.
MEASURE = """<script>
const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right, top: r.top, bottom: r.bottom}; };
const summary = document.getElementById('summary');
const measurements = {
  strips: [...document.querySelectorAll('svg.execution')].map(svg => ({
    box: box(svg),
    switches: [...svg.querySelectorAll('g.switch')].map(g => ({
      title: g.querySelector('title').textContent,
      line: box(g.querySelector('line')),
      label: g.querySelector('text') && box(g.querySelector('text')),
    })),
  })),
  summary: summary && {box: box(summary),
                       rows: [...summary.querySelectorAll('tr')].map(r => [...r.cells].map(c => c.textContent))},
  sections: [...document.querySelectorAll('section:not(#summary)')].map(box),
  per_op: [...document.querySelectorAll('svg.ops')].map(box),
};
const out = document.createElement('pre');
out.id = 'measurements';
out.textContent = JSON.stringify(measurements);
document.body.appendChild(out);
</script>"""


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Chromium is not installed; these tests lay the page out in it. Install it with "
                    "`apt-get install -y --no-install-recommends chromium` (as .ci/run does)", pytrace=False)
    return found


def measure(page: str, tmp_path) -> dict:
    """Lay ``page`` out in headless Chromium and return what MEASURE found."""
    path = tmp_path / "measured.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    result = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                             "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measurements">(.*?)</pre>', result.stdout, re.S)
    assert found, f"Chromium printed no measurements (exit {result.returncode}): {result.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def _intersect(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def overlapping_labels(strip: dict) -> list[tuple[int, int]]:
    labelled = [(i, s["label"]) for i, s in enumerate(strip["switches"]) if s["label"]]
    return [(i, j) for (i, a), (j, b) in itertools.combinations(labelled, 2) if _intersect(a, b)]


def lines_through_labels(strip: dict) -> list[tuple[int, int]]:
    """(switch, label it crosses): a vertical line's box is zero wide, so it meets a label's box
    only by running through it."""
    return [(i, j) for i, s in enumerate(strip["switches"]) for j, t in enumerate(strip["switches"])
            if i != j and t["label"] and _intersect(s["line"], t["label"])]


def assert_labels_apart(strip: dict) -> None:
    labels = [s["label"] for s in strip["switches"] if s["label"]]
    assert labels, "no switch is labelled"
    assert all(b["right"] - b["left"] > 10 and b["bottom"] - b["top"] > 5 for b in labels), labels  # really drawn
    assert all(b["left"] >= strip["box"]["left"] and b["right"] <= strip["box"]["right"]
               and b["top"] >= strip["box"]["top"] for b in labels), "a label is cut off by the strip's edge"
    assert overlapping_labels(strip) == []
    assert lines_through_labels(strip) == []


def assert_summary_opens_the_page(measured: dict) -> list[list[str]]:
    summary = measured["summary"]
    assert summary is not None, "the page has no #summary"
    assert summary["box"]["bottom"] <= min(s["top"] for s in measured["sections"])
    assert measured["per_op"] and summary["box"]["bottom"] <= min(b["top"] for b in measured["per_op"])
    assert summary["box"]["top"] < 1024, "the summary is not on the first screen"
    return summary["rows"]


def many_short_partitions() -> Analysis:
    """100 one-microsecond ops in runs of 1 to 3 across all three devices, then 20 long ANE ops:
    74 switches crowded into the strip's first tenth."""
    cycle = [ANE, CPU, ANE, GPU]
    records = [OpRecord(f"op{i}", f"op{i}", "add", ((1, 64),), ((1, 64),),
                        (Prediction(cycle[i // (1 + i % 3) % 4] if i < 100 else ANE, "test", "community", "test"),),
                        OpCost(0, 0, 0, 0), 1e-6 if i < 100 else 1e-4, False) for i in range(120)]
    partitions = [(device, [r.name for r in run]) for device, run in itertools.groupby(records, lambda r: r.device)]
    analysis = Analysis(CHIPS["A15"], "iOS16", records, partitions)
    analysis.latency_by_chip = {chip: analysis.latency for chip in CHIPS}
    return analysis


def test_the_measurement_finds_overlapping_labels(tmp_path):
    switches = "".join(
        f'<g class="switch"><title>switch {i}</title><line x1="{x}" y1="0" x2="{x}" y2="40" stroke="black"/>'
        f'<text x="{x + 2}" y="10" font-size="10">ANE→CPU</text></g>' for i, x in enumerate((10, 30)))
    page = f'<!DOCTYPE html><html><body><svg class="execution" width="200" height="40">{switches}</svg></body></html>'
    (strip,) = measure(page, tmp_path)["strips"]
    assert overlapping_labels(strip) == [(0, 1)]
    assert lines_through_labels(strip) == [(1, 0)]


def test_strip_labels_stay_apart_with_many_short_partitions(tmp_path):
    analysis = many_short_partitions()
    assert len(analysis.switches()) == 74
    (strip,) = measure(render.html_page({"many short partitions": analysis}), tmp_path)["strips"]
    assert len(strip["switches"]) == 74
    assert_labels_apart(strip)
    labelled = sum(s["label"] is not None for s in strip["switches"])
    assert render.SWITCH_LABEL_ROWS <= labelled < 74  # a staircase of labels, the rest as ticks
    assert all(re.match(r"switch (ANE|GPU|CPU)→(ANE|GPU|CPU): ", s["title"]) for s in strip["switches"])


def test_switch_label_rows_form_a_staircase_then_give_up():
    assert render.switch_label_rows([0, 5, 10, 15, 200], [50] * 5, rows=3) == [2, 1, 0, None, 2]


def test_compared_page_opens_with_speedups_and_partitions(tmp_path, capsys):
    model_dir = tmp_path / "tiny-distilbert"
    F.build_model("distilbert").save_pretrained(str(model_dir))
    page = tmp_path / "compare.html"
    assert main(["analyze", str(model_dir), "--compare", "--seq-len", "16", "--json", "--html", str(page)]) == 0
    document = json.loads(capsys.readouterr().out)
    measured = measure(page.read_text(), tmp_path)
    rows = {row[0]: row[1:] for row in assert_summary_opens_the_page(measured)}
    assert rows[""] == ["DEFAULT", "ane_pipeline()", "speed-up of ane_pipeline()"]
    partitions = [len(document["analyses"][label]["summary"]["partitions"]) for label in ("DEFAULT", "ane_pipeline()")]
    assert rows["device partitions"][:2] == [str(count) for count in partitions]
    for chip, speedup in document["speedup"].items():
        assert rows[f"latency {chip}"][2] == f"{speedup:.2f}x"
    for strip in measured["strips"]:
        if strip["switches"]:
            assert_labels_apart(strip)


def test_package_page_opens_with_latency_per_chip_and_partitions(tmp_path, capsys):
    package, page = tmp_path / "distilbert.mlpackage", tmp_path / "package.html"
    F.convert("distilbert", "fp16", pass_pipeline=ane_pipeline(), batch=1).save(str(package))
    assert main(["analyze", str(package), "--json", "--html", str(page)]) == 0
    (summary,) = json.loads(capsys.readouterr().out)["analyses"].values()
    rows = {row[0]: row[1:] for row in assert_summary_opens_the_page(measure(page.read_text(), tmp_path))}
    assert rows[""] == [str(package)]
    assert rows["device partitions"] == [str(len(summary["summary"]["partitions"]))]
    for chip, seconds in summary["summary"]["estimated_seconds_by_chip"].items():
        assert rows[f"latency {chip}"] == [f"{seconds * 1e3:.2f} ms"]
