"""The bundled all-MiniLM-L6-v2 exported to ONNX (with its tokenizer) and converted by
``milpasses convert DIRECTORY``: the same ane_pipeline() program as the torch route's, >= 60 dB
against ONNX Runtime and against the directory's PyTorch model on real sentences."""

import json

import numpy as np
import pytest
import torch

from milpasses import ane_pipeline
from milpasses.bundled import load_bundled
from milpasses.cli import main
from milpasses.convert.coreml import histogram
from milpasses.convert.coreml import convert_traced
from milpasses.frontend.tracing import LastHiddenState
from tests.onnx_helpers import export, within_allowed

SEQ_LEN = 32


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    model, tokenizer = load_bundled()
    directory = tmp_path_factory.mktemp("minilm-onnx")
    batch = tokenizer(["Hello world."], padding="max_length", max_length=SEQ_LEN, return_tensors="np")
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask")}
    export(LastHiddenState(model, tuple(inputs)).eval(), inputs, directory / "model.onnx")
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)  # an optimum-style directory: the Hugging Face model beside its export
    return model, inputs, directory


def test_minilm_directory_converts_like_the_torch_route(minilm, tmp_path, capsys):
    model, inputs, directory = minilm
    output = tmp_path / "minilm.mlpackage"
    assert main(["convert", str(directory), "-o", str(output), "--seq-len", str(SEQ_LEN), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"] == "ONNX Runtime" and report["verified"]
    assert report["inputs"] == {"input_ids": [[1, SEQ_LEN]], "attention_mask": [[1, SEQ_LEN]]}
    assert report["samples"].startswith("4 real sentences") and report["psnr"][0]["psnr_db"] >= 60
    assert "also compared with the directory's PyTorch model (BertModel" in report["samples"]
    against_torch = [e for e in report["psnr"] if e["output"] == "last_hidden_state vs PyTorch"]
    assert len(against_torch) == 1 and against_torch[0]["psnr_db"] >= 60
    assert output.is_dir() and (tmp_path / "minilm.report.md").is_file()

    with torch.no_grad():
        traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(),
                                 tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values()))
    torch_route = histogram(convert_traced(traced, inputs, pass_pipeline=ane_pipeline())._mil_program)
    difference = {op: n - torch_route.get(op, 0) for op, n in report["ops_after"].items() if n != torch_route.get(op, 0)}
    difference.update({op: -n for op, n in torch_route.items() if op not in report["ops_after"]})
    assert within_allowed(difference), difference
    assert report["ops_after"]["einsum"] == 6 * 12 * 2  # every head of every layer, as from torch
