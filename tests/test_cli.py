"""``milpasses convert``: writes a verified package, refuses bad input without losing anything."""

import pytest

from milpasses.cli import main
from milpasses.simulator import load_program


def test_convert_writes_a_verified_package(tmp_path, capsys):
    output = tmp_path / "minilm.mlpackage"
    assert main(["convert", "-o", str(output), "--seq-len", "16"]) == 0
    program = load_program(output).functions["main"]
    assert program.outputs[0].name == "last_hidden_state"
    assert "conv" in [op.op_type for op in program.operations]
    assert "linear" not in [op.op_type for op in program.operations]
    out = capsys.readouterr().out
    assert "ane::linear_to_conv: 36 sites rewritten" in out  # 6 layers x (Q, K, V, O, up, down)
    assert "fp16 check: 0 finding(s)" in out
    psnr_db = float(out.split("PSNR ")[1].split(" dB")[0])
    assert psnr_db >= 60.0
    assert [p.name for p in tmp_path.iterdir()] == ["minilm.mlpackage"]  # no staging left behind


def test_existing_output_is_refused_and_kept(tmp_path, capsys):
    output = tmp_path / "taken.mlpackage"
    output.mkdir()
    (output / "mine.txt").write_text("user data")
    assert main(["convert", "-o", str(output), "--seq-len", "16"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (output / "mine.txt").read_text() == "user data"


def test_missing_output_directory(tmp_path, capsys):
    assert main(["convert", "-o", str(tmp_path / "absent" / "m.mlpackage"), "--seq-len", "16"]) == 2
    assert "cannot write to" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def test_output_must_be_a_package(tmp_path, capsys):
    assert main(["convert", "-o", str(tmp_path / "m.mlmodel")]) == 2
    assert "must end in .mlpackage" in capsys.readouterr().err


def test_sequence_longer_than_the_model_allows(tmp_path, capsys):
    assert main(["convert", "-o", str(tmp_path / "m.mlpackage"), "--seq-len", "4096"]) == 2
    assert "above the model's maximum of 512" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_positive_sequence_length_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--seq-len", "0"])
    assert exit_info.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err
