"""``milpasses convert``: writes a verified package and its reports, refuses bad input without
leaving anything behind."""

import json
import subprocess
import sys

import pytest

from milpasses.cli import main
from tests.convert_helpers import save_fixture


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_fixture(tmp_path_factory.mktemp("models") / "bert", "bert")


def test_json_prints_the_report_alone(tmp_path, bert_dir, capsys):
    output = tmp_path / "bert.mlpackage"
    assert main(["convert", str(bert_dir), "-o", str(output), "--seq-len", "8", "--offline", "--json",
                 "--min-psnr", "55"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["task"] == "feature-extraction" and report["inputs"]["input_ids"] == [[1, 8]]
    assert report == json.loads((tmp_path / "bert.report.json").read_text())
    assert captured.err == ""


def test_strict_below_the_threshold_fails_and_writes_nothing(tmp_path, bert_dir, capsys):
    output = tmp_path / "bert.mlpackage"
    code = main(["convert", str(bert_dir), "-o", str(output), "--seq-len", "8", "--offline", "--quiet",
                 "--strict", "--min-psnr", "1000"])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "below 1000 dB; nothing written (--strict)" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_below_the_threshold_without_strict_warns(tmp_path, bert_dir, capsys):
    output = tmp_path / "bert.mlpackage"
    assert main(["convert", str(bert_dir), "-o", str(output), "--seq-len", "8", "--offline", "--quiet",
                 "--min-psnr", "1000"]) == 0
    assert "warning: verification failed: PSNR of pooler_output at sequence length 8 is" in capsys.readouterr().err
    assert json.loads((tmp_path / "bert.report.json").read_text())["verified"] is False


@pytest.mark.parametrize("taken", ["taken.mlpackage", "taken.report.json", "taken.report.md"])
def test_existing_output_or_report_is_refused_and_kept(tmp_path, capsys, taken):
    (tmp_path / taken).mkdir() if taken.endswith(".mlpackage") else (tmp_path / taken).write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["convert", "-o", str(tmp_path / "taken.mlpackage")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_overwrite_replaces_package_and_reports(tmp_path, bert_dir):
    output = tmp_path / "bert.mlpackage"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    (tmp_path / "bert.report.json").write_text("old")
    assert main(["convert", str(bert_dir), "-o", str(output), "--seq-len", "8", "--offline", "--quiet",
                 "--overwrite", "--min-psnr", "55"]) == 0
    assert not (output / "stale.txt").exists()
    assert json.loads((tmp_path / "bert.report.json").read_text())["verified"] is True


@pytest.mark.parametrize("arguments, message", [
    (["MODEL", "--seq-len", "4096"], "above the model's maximum of 1024"),
    (["MODEL", "--task", "fill-mask"], "no trained weights for the fill-mask head"),
    (["MODEL", "--task", "image-classification"], "has no image-classification head"),
    (["MODEL", "--seq-lens", "8,16"], "--seq-lens needs --target iOS18"),
    (["ABSENT"], "no model directory at"),
    (["nobody-here/no-such-model"], "cannot load model 'nobody-here/no-such-model'"),
    (["-o", "OUT/absent/m.mlpackage"], "cannot write to"),
    (["-o", "OUT/m.mlmodel"], "must end in .mlpackage"),
    (["MODEL", "--compress", "int4"], "per-block integer quantization, which the Neural Engine does not run"),
    (["MODEL", "--compress", "zip"], "unknown compression 'zip'"),
    (["MODEL", "--compress", "palettize4", "--target", "iOS18", "--calibration", "ABSENT"], "does not exist"),
    (["MODEL", "--compress", "palettize4"], "needs --target iOS18"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, bert_dir, capsys, arguments, message):
    arguments = [a.replace("MODEL", str(bert_dir)).replace("ABSENT", str(tmp_path / "absent"))
                 .replace("OUT", str(tmp_path)) for a in arguments]
    if not any(a.startswith("-o") for a in arguments):
        arguments += ["-o", str(tmp_path / "m.mlpackage")]
    assert main(["convert", *arguments, "--offline"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("milpasses: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_unconvertible_torch_op_is_named(tmp_path, bert_dir, capsys, monkeypatch):
    """An architecture using a torch op coremltools lacks (here: gelu, unregistered for the test)."""
    from coremltools.converters.mil.frontend.torch.ops import _TORCH_OPS_REGISTRY

    monkeypatch.delitem(_TORCH_OPS_REGISTRY.name_to_func_mapping, "gelu")
    assert main(["convert", str(bert_dir), "-o", str(tmp_path / "m.mlpackage"), "--seq-len", "8",
                 "--offline", "--quiet"]) == 2
    assert "cannot convert the torch op 'gelu'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arguments, message", [
    (["--seq-len", "0"], "must be a positive integer"),
    (["--seq-lens", "64,abc"], "two or more distinct positive integers"),
    (["--seq-lens", "64"], "two or more distinct positive integers"),
    (["--seq-len", "8", "--seq-lens", "8,16"], "not allowed with argument"),
    (["--task", "summarization"], "invalid choice: 'summarization'"),
    (["--attention", "fast"], "invalid choice: 'fast'"),
    (["--target", "iOS15"], "invalid choice: 'iOS15'"),
    (["--precision", "int8"], "invalid choice: 'int8'"),
])
def test_bad_option_values_are_usage_errors(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_quiet_prints_nothing_at_all_from_a_fresh_process(tmp_path, bert_dir):
    # A fresh interpreter: the notices coremltools and transformers log while being imported
    # would show here, and --quiet promises errors only.
    output = tmp_path / "bert.mlpackage"
    done = subprocess.run([sys.executable, "-m", "milpasses.cli", "convert", str(bert_dir), "-o", str(output),
                           "--seq-len", "8", "--offline", "--quiet", "--min-psnr", "50"], capture_output=True, text=True, cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert output.is_dir()


def test_two_conversions_into_one_folder_keep_their_own_reports(tmp_path, bert_dir):
    for name, seq_len in (("short", "8"), ("long", "16")):
        assert main(["convert", str(bert_dir), "-o", str(tmp_path / f"{name}.mlpackage"), "--seq-len", seq_len,
                     "--offline", "--quiet", "--min-psnr", "55"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "long.mlpackage", "long.report.json", "long.report.md", "short.mlpackage", "short.report.json",
        "short.report.md"]
    for name, seq_len in (("short", 8), ("long", 16)):
        assert json.loads((tmp_path / f"{name}.report.json").read_text())["inputs"]["input_ids"] == [[1, seq_len]]
        assert f"| input_ids | 1x{seq_len} |" in (tmp_path / f"{name}.report.md").read_text()


def test_verbose_shows_the_libraries_output_beside_the_stage_lines(tmp_path, bert_dir, capsys, monkeypatch):
    """Without --verbose the same output is held back: tests/test_docs.py runs the README's first
    command in a fresh process and finds only milpasses' lines."""
    from coremltools.converters.mil.frontend.torch import ops

    def noisy(context, node):  # a library talking during the conversion, as coremltools' own converters do
        print("a library's notice", file=sys.stderr)
        return gelu(context, node)

    gelu = ops._TORCH_OPS_REGISTRY.name_to_func_mapping["gelu"]
    monkeypatch.setitem(ops._TORCH_OPS_REGISTRY.name_to_func_mapping, "gelu", noisy)
    assert main(["convert", str(bert_dir), "--seq-len", "8", "--offline", "--min-psnr", "55",
                 "-o", str(tmp_path / "loud.mlpackage"), "--verbose"]) == 0
    captured = capsys.readouterr()
    assert "a library's notice" in captured.err and "Running MIL ane pipeline" in captured.err
    stages = [line.split(" ... ")[0] for line in captured.err.splitlines() if line.startswith("milpasses: ")]
    assert stages == ["milpasses: loading the model", "milpasses: reading the model (torch.jit.trace)",
                      "milpasses: converting with ane_pipeline()",
                      "milpasses: verifying: simulating the program at 8, beside a DEFAULT-pipeline conversion for "
                      "comparison"]
    assert captured.out.splitlines()[-3:] == [f"wrote {tmp_path / 'loud.mlpackage'}",
                                              f"      {tmp_path / 'loud.report.json'}",
                                              f"      {tmp_path / 'loud.report.md'}"]


def test_a_library_failure_shows_what_the_library_printed(tmp_path, bert_dir, capsys, monkeypatch):
    from coremltools.converters.mil.frontend.torch import ops

    def broken(context, node):
        print("coremltools was here", file=sys.stderr)
        raise RuntimeError("something inside coremltools broke")

    monkeypatch.setitem(ops._TORCH_OPS_REGISTRY.name_to_func_mapping, "gelu", broken)
    assert main(["convert", str(bert_dir), "-o", str(tmp_path / "m.mlpackage"), "--seq-len", "8",
                 "--offline"]) == 2
    err = capsys.readouterr().err.splitlines()
    failure = next(i for i, line in enumerate(err) if line.startswith("milpasses: error:"))
    assert "converting BertModel: coremltools failed: something inside coremltools broke" in err[failure]
    assert any("coremltools was here" in line for line in err[failure + 1:])
    assert list(tmp_path.iterdir()) == []


def test_verbose_and_quiet_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--verbose", "--quiet"])
    assert "choose one" in capsys.readouterr().err


def test_the_options_are_read_before_any_library_is_imported():
    """So that --help is quick and the libraries' import notices can be held back."""
    probe = ("import sys, milpasses, milpasses.convert, milpasses.cli; milpasses.cli.build_parser(); "
             "print(sorted({'torch', 'coremltools', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
