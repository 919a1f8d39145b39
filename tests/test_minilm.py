"""The real all-MiniLM-L6-v2 weights, on real sentences, through the simulator."""

import numpy as np
import pytest
import torch

from milpasses import ane_pipeline
from milpasses.analyze import analyze
from milpasses.bundled import SAMPLE_SENTENCES, load_bundled
from milpasses.simulator import psnr, simulate
from milpasses.convert.coreml import convert_traced
from milpasses.frontend.tracing import LastHiddenState


@pytest.fixture(scope="module")
def minilm_case():
    model, tokenizer = load_bundled()
    batch = tokenizer(list(SAMPLE_SENTENCES), padding=True, return_tensors="np")
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    assert (inputs["attention_mask"] == 0).any(), "the sample batch must be padded"
    with torch.no_grad():
        tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}
        expected = model(**tensors).last_hidden_state.numpy()
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), tuple(tensors.values()))
    return traced, inputs, expected


@pytest.fixture(scope="module")
def minilm_default(minilm_case):
    traced, inputs, expected = minilm_case
    return convert_traced(traced, inputs), inputs, expected


def test_minilm_fp16_padded_batch_reaches_60_db(minilm_default):
    mlmodel, inputs, expected = minilm_default
    actual = simulate(mlmodel, inputs)["last_hidden_state"]
    assert psnr(expected, actual) >= 60.0


@pytest.fixture(scope="module")
def minilm_ane(minilm_case):
    traced, inputs, _ = minilm_case
    return convert_traced(traced, inputs, pass_pipeline=ane_pipeline())


def test_minilm_after_ane_pipeline_loses_at_most_1_db(minilm_case, minilm_default, minilm_ane):
    _, inputs, expected = minilm_case
    default = psnr(expected, simulate(minilm_default[0], inputs)["last_hidden_state"])
    ane = psnr(expected, simulate(minilm_ane, inputs)["last_hidden_state"])
    assert ane >= default - 1.0 and ane >= 60.0


def test_minilm_runs_as_an_input_stage_then_the_ane_with_a_key_only_mask(minilm_case, minilm_ane):
    _, inputs, _ = minilm_case
    length = inputs["input_ids"].shape[1]
    analysis = analyze(minilm_ane._mil_program, "A15")
    assert [device for device, _ in analysis.partitions] == ["CPU", "ANE"]
    mask_tensors = [shape for r in analysis.ops if r.input_stage for shape in r.output_shapes]
    assert mask_tensors and all(list(shape).count(length) <= 1 for shape in mask_tensors)  # no Sq x Sk mask


def test_minilm_saved_package_simulates_like_the_in_memory_program(minilm_default, tmp_path):
    mlmodel, inputs, expected = minilm_default
    path = tmp_path / "minilm.mlpackage"
    mlmodel.save(str(path))
    from_package = simulate(path, inputs)["last_hidden_state"]
    np.testing.assert_array_equal(from_package, simulate(mlmodel, inputs)["last_hidden_state"])
