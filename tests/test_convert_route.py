"""The conversion route: both torch frontends, per-function pass reports, caller-owned package
directories, and every failure one line (exit 2, nothing written)."""

import gc
from pathlib import Path

import pytest
import transformers as hf

from milpasses.cli import main
from milpasses.convert import ConversionError, Options, convert
from tests.convert_helpers import save_fixture


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_fixture(tmp_path_factory.mktemp("models") / "bert", "bert")


@pytest.fixture(scope="module")
def llama_lm_dir(tmp_path_factory):
    return save_fixture(tmp_path_factory.mktemp("models") / "llama", "llama", hf.LlamaForCausalLM)


def test_the_export_frontend_gives_the_trace_frontends_program(bert_dir):
    _, traced = convert(str(bert_dir), seq_len=8, offline=True)
    _, exported = convert(str(bert_dir), seq_len=8, offline=True, frontend="export")
    last_hidden_state = {e["output"]: e["psnr_db"] for e in exported.psnr}["last_hidden_state"]
    assert last_hidden_state >= 60.0 and exported.psnr == traced.psnr
    assert exported.options["frontend"] == "export" and "frontend" not in traced.options
    difference = {op: exported.ops_after.get(op, 0) - traced.ops_after.get(op, 0)
                  for op in set(exported.ops_after) | set(traced.ops_after)}
    assert sum(abs(n) for n in difference.values()) <= 2, difference
    attention = {r["pass"]: r for r in exported.passes}["ane::attention_to_einsum"]
    assert sum(attention["rewritten"].values()) == 2


def test_the_export_frontend_takes_one_length(bert_dir):
    with pytest.raises(ConversionError, match="--frontend export converts one sequence length"):
        convert(str(bert_dir), seq_lens=[8, 16], target="iOS18", offline=True, frontend="export")


def test_options_are_checked_once_into_typed_sub_objects(tmp_path):
    options = Options.check(task="text-generation", context=32, prefill_chunk=8, kv_cache="state")
    assert options.target == "iOS18" and options.generation.prefill_chunk == 8 and options.compression is None
    texts = tmp_path / "texts.txt"
    texts.write_text("one\n\ntwo\n")
    compressed = Options.check(compress="palettize4", calibration=str(texts), target="iOS18")
    assert compressed.compression.calibration == ("one", "two") and compressed.min_psnr_db == 40.0
    with pytest.raises(ConversionError, match="unknown frontend 'jit'"):
        Options.check(frontend="jit")


def test_a_package_of_two_functions_lives_in_the_callers_directory_or_as_long_as_its_model(llama_lm_dir, tmp_path):
    options = Options.check(task="text-generation", context=16, prefill_chunk=4, offline=True)
    _, report = convert(str(llama_lm_dir), options, workdir=tmp_path)
    assert (tmp_path / "model.mlpackage").is_dir() and not report.verification_error  # tokens as generate
    functions = {entry["function"] for entry in report.passes}
    assert functions == {"prefill", "decode"}
    mlmodel, _ = convert(str(llama_lm_dir), options)
    directory = Path(mlmodel.package_path).parent
    assert directory.is_dir()
    del mlmodel
    gc.collect()
    assert not directory.exists()


def test_a_failure_inside_a_stage_is_one_line_naming_the_stage_and_the_model(bert_dir, tmp_path, capsys,
                                                                            monkeypatch):
    from milpasses.convert import verify

    def broken(*args, **kwargs):
        raise KeyError("an unforeseen key")

    monkeypatch.setattr(verify, "verify", broken)
    output = tmp_path / "out" / "bert.mlpackage"
    output.parent.mkdir()
    assert main(["convert", str(bert_dir), "--seq-len", "8", "--offline", "-o", str(output)]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("milpasses: error:")]
    assert error == ["milpasses: error: verify failed on BertModel: KeyError: 'an unforeseen key'"]
    assert list(output.parent.iterdir()) == []


def test_generate_on_a_broken_package_is_one_line(tmp_path, capsys):
    package = tmp_path / "broken.mlpackage"
    package.mkdir()
    (package / "Manifest.json").write_text("{not json")
    assert main(["generate", str(package), "hello"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("milpasses: error:")]
    assert len(error) == 1 and str(package) in error[0]
