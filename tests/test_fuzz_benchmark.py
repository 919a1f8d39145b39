"""benchmarks/fuzz.py's log: a long run kept across sessions (read back, refused when it would be
overwritten, summarised); the drawing itself is tests/test_fuzz.py's."""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest

from fixtures.fuzz import Case

_spec = importlib.util.spec_from_file_location("fuzz_benchmark", Path(__file__).parents[1] / "benchmarks" / "fuzz.py")
fuzz_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_benchmark)


def _record(index, session=1, failure=None, **case_fields):
    record = {"index": index, "session": session, "seed": session - 1, "commit": "abc1234",
              "case": asdict(Case(**case_fields)), "seconds": 6.0}
    if failure:
        record["failure"] = {"mode": "batched", "signature": failure, "message": failure}
    else:
        record["outcomes"] = {mode: {"rewritten": 1, "left_alone": {}, "fp32_relative_error": 1e-7,
                                     "fp16_psnr_db": 65.0, "default_psnr_db": None} for mode in ("split_einsum", "off")}
    return record


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_a_line_cut_short_by_a_killed_run_is_cut_off(tmp_path):
    log = tmp_path / "log.jsonl"
    _write(log, [_record(1), _record(2, seed=5)], tail='{"index": 3, "sess')
    assert [r["index"] for r in fuzz_benchmark.read_log(log)] == [1, 2]
    assert log.read_text().endswith("}\n") and len(log.read_text().splitlines()) == 2


def test_a_log_broken_in_its_middle_is_refused_and_left_as_it_is(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    _write(log, [_record(1)], tail="not json\n" + json.dumps(_record(2, seed=5)) + "\n")
    before = log.read_text()
    with pytest.raises(SystemExit) as exit_info:
        fuzz_benchmark.main(["--log", str(log), "--summary"])
    assert exit_info.value.code == 2 and "line 2 is not JSON" in capsys.readouterr().err
    assert log.read_text() == before


def test_an_existing_log_is_never_started_over(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    _write(log, [_record(1)])
    before = log.read_text()
    with pytest.raises(SystemExit) as exit_info:
        fuzz_benchmark.main(["--log", str(log), "--examples", "3"])
    assert exit_info.value.code == 2 and "pass --resume" in capsys.readouterr().err
    assert log.read_text() == before


def test_a_resumed_run_that_has_its_models_draws_none_and_summarises_the_log(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    _write(log, [_record(1), _record(2, session=2, seed=7),
                 _record(3, session=2, failure="AssertionError: batched: fp16 PSNR # dB", seed=9, batch=3)])
    assert fuzz_benchmark.main(["--log", str(log), "--resume", "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 models" in out and "3 models in 2 session(s)" in out and "2 passed, 1 failed" in out
    assert "split_einsum     2 models passed, attention sites rewritten 2" in out
    assert "FAILED x1: AssertionError: batched: fp16 PSNR # dB" in out and "first at model 3 (batched): batch=3, seed=9" in out
    assert len(log.read_text().splitlines()) == 3
