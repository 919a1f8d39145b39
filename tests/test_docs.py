"""Every command and Python block of the README and of docs/ runs, as shown.

Fenced ``bash`` blocks are commands, one a line; ``python`` blocks run in order in one
namespace per document; ``text`` blocks (synopses) are not run. Each document runs in an empty
directory of its own. Hub ids stand for local models, so nothing reads the network: the bundled
all-MiniLM-L6-v2 for its own id, tiny seeded fixtures for the others (``STAND_INS``).

The README's first command converts the bundled MiniLM at S=128 in a fresh process, as a user on
a fresh clone runs it: only milpasses' own lines on stderr, the PSNR table and the paths last.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import transformers as hf

from milpasses.bundled import bundled_model_dir
from milpasses.cli import main
from milpasses.simulator import load_program
from tests.convert_helpers import save_fixture

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
#: hub id -> (fixture family, head class) standing for it
FIXTURE_STAND_INS = {
    "google-bert/bert-base-uncased": ("bert", hf.BertForMaskedLM),
    "distilbert/distilbert-base-uncased": ("distilbert", None),
    "google/vit-base-patch16-224": ("vit", hf.ViTForImageClassification),
}
FENCE = re.compile(r"^```(\S*)[ \t]*(\S*)\n(.*?)^```", re.M | re.S)


def fenced_blocks(path: Path) -> list[tuple[str, str, str]]:
    """(language, qualifier, text) of each fenced block."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(path.read_text())]


def setup_commands() -> list[str]:
    """The README's two set-up commands: the first lines of its first block."""
    language, _, text = fenced_blocks(ROOT / "README.md")[0]
    assert language == "bash"
    return text.splitlines()[:2]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    models = tmp_path_factory.mktemp("stand-ins")
    paths = {MINILM_ID: str(bundled_model_dir())}
    for hub_id, (family, head) in FIXTURE_STAND_INS.items():
        paths[hub_id] = str(save_fixture(models / family, family, head))
    return paths


def _replace(text: str, stand_ins: dict[str, str]) -> str:
    for hub_id, path in stand_ins.items():
        text = text.replace(hub_id, path)
    return text


def _commands(text: str) -> list[str]:
    lines = [line.split("  #")[0].strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("document", DOCUMENTS, ids=[p.name for p in DOCUMENTS])
def test_every_block_runs(document, stand_ins, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{document.stem}"}
    for language, qualifier, text in fenced_blocks(document):
        if language == "text":
            continue
        assert language in ("bash", "python"), f"{document.name}: a {language!r} block no test runs"
        if language == "python":
            exec(compile(_replace(text, stand_ins), f"{document.name} block", "exec"), namespace)
            continue
        for command in _commands(text):
            if command in setup_commands():
                continue  # test_readme_first_command and .ci/run run these
            words = shlex.split(_replace(command, stand_ins))
            assert words[0] == "milpasses" and not {"|", ">", "&&", ";"} & set(words), command
            code = main(words[1:])
            err = capsys.readouterr().err
            if qualifier == "macos-only" and sys.platform != "darwin":
                assert code == 2 and "macOS" in err, (command, err)
            else:
                assert code == 0, (command, err)


def test_readme_starts_with_the_set_up_commands_and_the_drop_in_within_30_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    first, second = setup_commands()
    assert lines[3:5] == [first, second]
    # CI runs the second verbatim; the first sets up the same way (pip's -q aside), then converts.
    assert second in (ROOT / ".ci" / "run").read_text()
    setup = second.rsplit(" && ", 1)[0]
    assert first.startswith(setup.replace("pip install -q ", "pip install ") + " && .venv/bin/milpasses convert")
    drop_in = next(i for i, line in enumerate(lines) if "pass_pipeline=ane_pipeline()" in line)
    assert drop_in < 30 and "compute_units=ct.ComputeUnit.CPU_AND_NE" in lines[drop_in]


def test_readme_first_command_prints_only_milpasses_lines_and_ends_with_psnr_and_paths(tmp_path):
    """The conversion part of the README's first command, in a fresh process as on a fresh clone
    (the set-up part is .ci/run's)."""
    first, _ = setup_commands()
    words = shlex.split(first.rsplit(" && ", 1)[1])
    assert words[:2] == [".venv/bin/milpasses", "convert"]
    done = subprocess.run([sys.executable, "-m", "milpasses.cli", *words[1:]], cwd=tmp_path,
                          capture_output=True, text=True)
    print(done.stderr + done.stdout)  # the first command's whole output, shown with -s or on failure
    assert done.returncode == 0
    assert [line.split(" ... ")[0] for line in done.stderr.splitlines()] == [
        "milpasses: loading the model", "milpasses: reading the model (torch.jit.trace)",
        "milpasses: converting with ane_pipeline()",
        "milpasses: verifying: simulating the program at 128, beside a DEFAULT-pipeline conversion for comparison"]
    out = done.stdout.splitlines()
    assert out[-8] == "output               seq_len  PSNR dB  vs PyTorch fp32 (simulated)"
    assert [line.split()[0] for line in out[-7:-5]] == ["last_hidden_state", "sentence_embedding"]
    assert all(float(line.split()[2]) >= 60 and line.endswith("ok") for line in out[-7:-5])
    assert out[-5].split()[:3] == ["sentence_embedding", "128", "cosine"] and float(out[-5].split()[3]) > 0.9999
    assert out[-4:] == ["", "wrote all-MiniLM-L6-v2.mlpackage", "      all-MiniLM-L6-v2.report.json",
                        "      all-MiniLM-L6-v2.report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "all-MiniLM-L6-v2.mlpackage", "all-MiniLM-L6-v2.report.json", "all-MiniLM-L6-v2.report.md"]
    program = load_program(tmp_path / "all-MiniLM-L6-v2.mlpackage").functions["main"]
    assert [v.name for v in program.outputs] == ["last_hidden_state", "sentence_embedding"]
    assert "linear" not in [op.op_type for op in program.operations]
    report = json.loads((tmp_path / "all-MiniLM-L6-v2.report.json").read_text())
    assert report["model"] == "all-MiniLM-L6-v2 (bundled)" and report["verified"]
    passes = {p["pass"]: p for p in report["passes"]}
    assert passes["ane::linear_to_conv"]["rewritten"] == {"linear": 36}  # 6 layers x (Q, K, V, O, up, down)
    assert report["ops_before"]["linear"] == 36
    assert report["package_bytes"] > 40 * 2**20  # 22.7 M fp16 weights
    assert "| sentence_embedding | 128 |" in (tmp_path / "all-MiniLM-L6-v2.report.md").read_text()


#: The README's DistilBERT-base figures, each checked against the conversion that measures it.
DISTILBERT_FIGURES = re.compile(
    r"On stock DistilBERT-base at S=128 the result has no `linear` or `matmul` left: (?P<conv>\d+) conv, "
    r"(?P<einsum>\d+) einsum, (?P<softmax>\d+) softmax over axis 1, (?P<layer_norm>\d+) layer_norm over axis 1, "
    r"(?P<ops>\d+) ops in all \(DEFAULT: (?P<default_ops>\d+); Apple's hand-written model: \d+\) with "
    r"(?P<layout>\d+) layout ops, at (?P<psnr>[\d.]+) dB fp16 PSNR against torch \(DEFAULT: (?P<default_psnr>[\d.]+) dB\)")
#: docs/passes.md's count of the layout ops left in the same conversion.
PASSES_LAYOUT_FIGURE = re.compile(r"On stock DistilBERT-base at S=128 only (\d+) layout ops remain")
#: A printed PSNR is rounded to 0.1 dB; the simulation's own run-to-run spread is far below this.
PSNR_TOLERANCE_DB = 0.15


def _one_line(path: Path) -> str:
    return " ".join(path.read_text().split())


def test_distilbert_figures_in_the_readme_and_the_passes_doc_are_the_measured_ones():
    from collections import Counter

    from fixtures.families import distilbert_base_converted
    from milpasses.passes.shared.bc1s import LAYOUT_OPS
    from milpasses.simulator import psnr, simulate

    figures = DISTILBERT_FIGURES.search(_one_line(ROOT / "README.md"))
    assert figures, "the README's DistilBERT-base sentence changed shape: update DISTILBERT_FIGURES with it"
    measured = {}
    for pipeline in ("ane", "default"):
        mlmodel, inputs, expected, _ = distilbert_base_converted(pipeline)
        operations = mlmodel._mil_program.functions["main"].operations
        counts = Counter(op.op_type for op in operations if op.op_type != "const")
        valid = inputs["attention_mask"].astype(bool)
        measured[pipeline] = (counts, sum(counts[t] for t in LAYOUT_OPS),
                              psnr(expected[valid], simulate(mlmodel, inputs)["last_hidden_state"][valid]))
    (counts, layout, ane_psnr), (default_counts, _, default_psnr) = measured["ane"], measured["default"]
    for op in ("conv", "einsum", "softmax", "layer_norm"):
        assert int(figures[op]) == counts[op], op
    assert int(figures["ops"]) == sum(counts.values()) and int(figures["default_ops"]) == sum(default_counts.values())
    assert int(figures["layout"]) == layout
    assert abs(float(figures["psnr"]) - ane_psnr) <= PSNR_TOLERANCE_DB
    assert abs(float(figures["default_psnr"]) - default_psnr) <= PSNR_TOLERANCE_DB
    (passes_layout,) = PASSES_LAYOUT_FIGURE.findall(_one_line(ROOT / "docs" / "passes.md"))
    assert int(passes_layout) == layout
