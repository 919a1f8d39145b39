"""ONNX graphs exported with static shapes (batch 2, sequence 16, no dynamic axes) from families
no other test names: converted at the graph's own shapes and verified against ONNX Runtime; a
--batch or --seq-len that contradicts the graph is a one-line error, exit 2, nothing written."""

import functools

import pytest
import torch
import transformers as hf

from milpasses.cli import main
from milpasses.convert import convert
from milpasses.frontend.tracing import LastHiddenState

BATCH, SEQ_LEN = 2, 16
SMALL = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=99,
             max_position_embeddings=64)
FAMILIES = {
    "ernie": (hf.ErnieConfig, hf.ErnieModel, {}),
    "megatron_bert": (hf.MegatronBertConfig, hf.MegatronBertModel, {}),
    "data2vec_text": (hf.Data2VecTextConfig, hf.Data2VecTextModel, {}),
    "olmo": (hf.OlmoConfig, hf.OlmoModel, {"num_key_value_heads": 2}),
}


@functools.lru_cache(maxsize=None)
def exported(name: str, directory) -> str:
    config_class, model_class, extra = FAMILIES[name]
    torch.manual_seed(0)
    config = config_class(**SMALL, **extra)
    config._attn_implementation = "eager"
    model = LastHiddenState(model_class(config).eval(), ("input_ids", "attention_mask")).eval()
    ids = torch.randint(3, SMALL["vocab_size"], (BATCH, SEQ_LEN))
    mask = torch.ones(BATCH, SEQ_LEN, dtype=torch.long)
    mask[1, SEQ_LEN // 2:] = 0
    path = directory / f"{name}.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (ids, mask), str(path), dynamo=False, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17)  # no dynamic_axes: static shapes
    return str(path)


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    return tmp_path_factory.mktemp("static-onnx")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_static_shape_graph_converts_at_its_own_shapes(name, directory):
    _, report = convert(exported(name, directory))
    assert report.inputs == {"input_ids": [[BATCH, SEQ_LEN]], "attention_mask": [[BATCH, SEQ_LEN]]}
    assert report.options["batch"] == BATCH and report.options["seq_len"] == SEQ_LEN
    assert report.passed and report.worst_psnr_db >= 60.0


@pytest.mark.parametrize("flags, named", [(["--batch", "1"], "--batch 1 contradicts"),
                                          (["--seq-len", "32"], "--seq-len 32 contradicts")])
def test_contradicting_shape_flags_are_one_line_errors(flags, named, directory, tmp_path, capsys):
    output = tmp_path / "out.mlpackage"
    status = main(["convert", exported("ernie", directory), "-o", str(output), *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and named in error[-1] and "fixed" in error[-1]
    assert list(tmp_path.iterdir()) == []


def test_flags_that_agree_with_the_graph_are_accepted(directory):
    _, report = convert(exported("ernie", directory), batch=BATCH, seq_len=SEQ_LEN)
    assert report.passed
