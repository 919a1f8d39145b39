"""The coverage sweep's per-architecture record (benchmarks/coverage.py), on architectures whose
outcome is known: BERT and Llama are rewritten in full, Whisper takes audio and is not swept."""

import importlib.util
from pathlib import Path

import pytest
from transformers import GPT2Config

_spec = importlib.util.spec_from_file_location("coverage_sweep", Path(__file__).parents[1] / "benchmarks" / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)


@pytest.mark.parametrize("name, kind", [("bert", "attention"), ("llama", "attention (grouped-query)")])
def test_a_known_architecture_converts_with_every_attention_block_rewritten(name, kind):
    record = coverage.sweep_one(name)
    assert record["failure"] is None
    assert record["built"] and record["traced"] and record["default_converts"] and record["ane_converts"]
    assert record["parameters"] < coverage.MAX_PARAMETERS
    assert record["attention_blocks"] == coverage.LAYERS == record["attention_rewritten"]
    assert record["rewritten_kinds"] == {kind: coverage.LAYERS}
    assert record["all_attention_rewritten"] and record["attention_skip_reasons"] == {}
    assert record["default"]["matmul"] == 2 * coverage.LAYERS  # scores and output per block, before
    assert record["ane"]["matmul"] == 0 and record["ane"]["linear"] == 0
    assert record["ane"]["layout_ops"] < record["default"]["layout_ops"]
    assert record["psnr_default"] >= 55 and record["psnr_ane"] >= 55


def test_an_architecture_that_cannot_be_swept_is_recorded_with_its_reason_not_raised():
    record = coverage.sweep_one("whisper")
    assert not record["built"] and not record["default_converts"]
    assert record["failure"]["stage"] == "build"
    assert "input_features" in record["failure"]["message"]


def test_sizes_reach_a_config_under_its_own_field_names():
    kwargs = coverage._config_kwargs(GPT2Config, GPT2Config())
    assert kwargs["n_embd"] == coverage.HIDDEN and kwargs["n_layer"] == coverage.LAYERS
    assert kwargs["n_head"] == coverage.HEADS and kwargs["vocab_size"] == coverage.VOCAB
    assert kwargs["bos_token_id"] < coverage.VOCAB and kwargs["eos_token_id"] < coverage.VOCAB


def test_totals_count_only_architectures_with_attention_in_the_rewritten_share():
    records = [
        {"built": True, "traced": True, "default_converts": True, "ane_converts": True, "attention_blocks": 2,
         "all_attention_rewritten": True, "psnr_ane": 70.0},
        {"built": True, "traced": True, "default_converts": True, "ane_converts": True, "attention_blocks": 2,
         "all_attention_rewritten": False, "psnr_ane": 50.0},
        {"built": True, "traced": True, "default_converts": True, "ane_converts": True, "attention_blocks": 0,
         "all_attention_rewritten": None, "psnr_ane": 80.0},
        {"built": False, "traced": False, "default_converts": False, "ane_converts": False},
    ]
    totals = coverage.totals(records)
    assert totals["tried"] == 4 and totals["built"] == 3 and totals["default_converts"] == 3
    assert totals["default_converts_with_attention"] == 2 and totals["every_attention_block_rewritten"] == 1
    assert totals["every_attention_block_rewritten_percent"] == 50.0 and totals["ane_psnr_at_least_60"] == 2
