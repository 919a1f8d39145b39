"""The real all-MiniLM-L6-v2 weights, on real sentences, through the simulator."""

import coremltools as ct
import numpy as np
import pytest
import torch

from milpasses.bundled import SAMPLE_SENTENCES, load_bundled
from milpasses.simulator import psnr, simulate
from milpasses.tracing import LastHiddenState


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
    mlmodel = ct.convert(
        traced,
        inputs=[ct.TensorType(name=k, shape=v.shape, dtype=np.int32) for k, v in inputs.items()],
        outputs=[ct.TensorType(name="last_hidden_state")],
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS16,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
    )
    return mlmodel, inputs, expected


def test_minilm_fp16_padded_batch_reaches_60_db(minilm_case):
    mlmodel, inputs, expected = minilm_case
    actual = simulate(mlmodel, inputs)["last_hidden_state"]
    assert psnr(expected, actual) >= 60.0


def test_minilm_saved_package_simulates_like_the_in_memory_program(minilm_case, tmp_path):
    mlmodel, inputs, expected = minilm_case
    path = tmp_path / "minilm.mlpackage"
    mlmodel.save(str(path))
    from_package = simulate(path, inputs)["last_hidden_state"]
    np.testing.assert_array_equal(from_package, simulate(mlmodel, inputs)["last_hidden_state"])
