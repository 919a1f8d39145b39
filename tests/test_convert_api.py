"""``milpasses.convert.convert``: every task path on tiny fixture models, shapes, metadata, errors."""

import json

import numpy as np
import pytest
import torch
import transformers as hf

from fixtures import families as F
from milpasses.convert import ConversionError, convert, save
from milpasses.simulator import load_program, psnr, simulate
from tests.convert_helpers import save_fixture, tiny_tokenizer

SEQ_LEN = 16
# The fixtures' random weights (std 0.2) put fp16 logits and poolers of a converted program at
# 59-71 dB on the DEFAULT pipeline too; the 60 dB default is for trained checkpoints (MiniLM,
# tests/test_cli.py). 55 dB still fails a wrong layout or mask by tens of dB.
FIXTURE_MIN_PSNR_DB = 55.0

# (family, head class, task, the outputs HF names for it)
TASK_CASES = [
    ("bert", None, "feature-extraction", ["last_hidden_state", "pooler_output"]),
    ("bert", hf.BertForMaskedLM, "fill-mask", ["logits"]),
    ("distilbert", hf.DistilBertForSequenceClassification, "text-classification", ["logits"]),
    ("bert", hf.BertForTokenClassification, "token-classification", ["logits"]),
    ("bert", hf.BertForQuestionAnswering, "question-answering", ["start_logits", "end_logits"]),
    ("gpt2", hf.GPT2LMHeadModel, "text-generation", ["logits"]),
    ("llama", hf.LlamaForCausalLM, "text-generation", ["logits"]),
    ("vit", hf.ViTForImageClassification, "image-classification", ["logits"]),
    ("clip_vision", None, "feature-extraction", ["last_hidden_state", "pooler_output"]),
    ("t5_encoder", None, "feature-extraction", ["last_hidden_state"]),
]


@pytest.mark.parametrize("family, head, task, outputs", TASK_CASES,
                         ids=[f"{c[2]}-{c[0]}" for c in TASK_CASES])
def test_each_task_converts_with_hf_names_and_verifies(tmp_path, family, head, task, outputs):
    directory = save_fixture(tmp_path / family, family, head)
    seq_len = None if F.FAMILIES[family].kind == "vision" else SEQ_LEN
    mlmodel, report = convert(str(directory), task=task, seq_len=seq_len, offline=True, min_psnr_db=FIXTURE_MIN_PSNR_DB)
    program = load_program(mlmodel).functions["main"]
    assert [v.name for v in program.outputs] == outputs
    assert report.outputs == outputs
    assert report.passed, report.psnr
    assert {e["output"] for e in report.psnr} == set(outputs)
    if F.FAMILIES[family].kind == "text":
        assert "input_ids" in program.inputs and "attention_mask" in program.inputs
        assert ("token_type_ids" in program.inputs) == (family == "bert")
        assert "tokenizer" in report.samples
    else:
        assert list(program.inputs) == ["pixel_values"]
    assert "linear" not in report.ops_after and report.ops_after.get("conv", 0) > 0


def test_a_dual_encoder_converts_its_vision_tower(tmp_path):
    vision = F.FAMILIES["clip_vision"].build_config()
    text = dict(vocab_size=F.VOCAB, hidden_size=F.HIDDEN, num_hidden_layers=1, num_attention_heads=F.HEADS,
                intermediate_size=F.FFN)
    torch.manual_seed(F.SEED)
    hf.CLIPModel(hf.CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=16)
                 ).save_pretrained(tmp_path / "clip")
    with pytest.raises(ConversionError, match="choose --task image-feature-extraction"):
        convert(str(tmp_path / "clip"), offline=True)
    mlmodel, report = convert(str(tmp_path / "clip"), task="image-feature-extraction", offline=True,
                              min_psnr_db=FIXTURE_MIN_PSNR_DB)
    assert report.outputs == ["last_hidden_state", "pooler_output"] and report.passed, report.psnr
    assert list(load_program(mlmodel).functions["main"].inputs) == ["pixel_values"]


def test_question_answering_matches_pytorch_on_the_saved_package(tmp_path):
    """The package on disk, simulated on inputs of our own, against the PyTorch model."""
    directory = save_fixture(tmp_path / "qa", "bert", hf.BertForQuestionAnswering)
    mlmodel, report = convert(str(directory), task="question-answering", seq_len=SEQ_LEN, batch=2, offline=True,
                              min_psnr_db=FIXTURE_MIN_PSNR_DB)
    save(mlmodel, report, tmp_path / "qa.mlpackage")
    batch = tiny_tokenizer()(["what converts pytorch models?"] * 2, ["coremltools converts them.", "core ml."],
                             padding="max_length", max_length=SEQ_LEN, return_tensors="np")
    inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    model = hf.AutoModelForQuestionAnswering.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()})
    actual = simulate(tmp_path / "qa.mlpackage", inputs)
    valid = inputs["attention_mask"].astype(bool)
    for name in ("start_logits", "end_logits"):
        assert psnr(getattr(expected, name).numpy()[valid], actual[name][valid]) >= FIXTURE_MIN_PSNR_DB


def test_sentence_transformers_pooling_is_an_output(tmp_path):
    directory = save_fixture(tmp_path / "st", "bert", sentence_pooling="mean_tokens")
    mlmodel, report = convert(str(directory), seq_len=SEQ_LEN, offline=True)
    assert report.outputs == ["last_hidden_state", "sentence_embedding"]
    inputs = {k: v for k, v in _tokens(SEQ_LEN, token_type_ids=True).items()}
    embedding = simulate(mlmodel, inputs)["sentence_embedding"]
    model = hf.AutoModel.from_pretrained(directory, attn_implementation="eager")
    with torch.no_grad():
        hidden = model(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in inputs.items()}).last_hidden_state
    mask = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert psnr(expected, embedding) >= 60.0
    assert np.allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-2)


def test_a_loaded_model_without_tokenizer_verifies_on_seeded_ids():
    model = F.build_model("distilbert")
    mlmodel, report = convert(model, seq_len=SEQ_LEN, min_psnr_db=FIXTURE_MIN_PSNR_DB)
    assert report.model == "DistilBertModel"
    assert "seeded token ids" in report.samples and report.passed


def test_enumerated_sequence_lengths_verify_at_each_length(tmp_path):
    directory = save_fixture(tmp_path / "gpt2", "gpt2", hf.GPT2LMHeadModel)
    mlmodel, report = convert(str(directory), task="text-generation", seq_lens=[8, 24], target="iOS18", offline=True,
                              min_psnr_db=FIXTURE_MIN_PSNR_DB)
    for description in mlmodel.get_spec().description.input:
        enumerated = description.type.multiArrayType.enumeratedShapes.shapes
        assert sorted(tuple(s.shape) for s in enumerated) == [(1, 8), (1, 24)]
    assert sorted(e["seq_len"] for e in report.psnr) == [8, 24]
    assert report.passed, report.psnr
    assert report.options["seq_lens"] == [8, 24]


def test_enumerated_lengths_keep_attention_in_per_head_einsums(tmp_path):
    directory = save_fixture(tmp_path / "bert", "bert")
    _, report = convert(str(directory), seq_lens=[8, 16], target="iOS18", offline=True,
                        min_psnr_db=FIXTURE_MIN_PSNR_DB)
    assert report.passed, report.psnr
    passes = {p["pass"]: p for p in report.passes}
    assert passes["ane::attention_to_einsum"]["rewritten"]["attention"] == F.LAYERS
    assert "matmul" not in report.ops_after and report.ops_after["einsum"] == 2 * F.LAYERS * F.HEADS


def test_metadata_records_version_task_source_and_options(tmp_path):
    directory = save_fixture(tmp_path / "bert", "bert")
    mlmodel, report = convert(str(directory), seq_len=8, target="iOS17", offline=True)
    metadata = mlmodel.user_defined_metadata
    assert metadata["milpasses.version"] == "0.1.0"
    assert metadata["milpasses.task"] == "feature-extraction"
    assert metadata["milpasses.source_model"] == str(directory)
    assert json.loads(metadata["milpasses.options"])["target"] == "iOS17"
    assert mlmodel.get_spec().specificationVersion == 8  # iOS17
    assert report.seconds.keys() == {"load", "trace", "convert", "baseline", "verify"}
    assert report.ops_before["linear"] > 0 and "linear" not in report.ops_after


@pytest.mark.parametrize("kwargs, message", [
    (dict(task="summarization"), "unknown task 'summarization'"),
    (dict(seq_len=2048), "above the model's maximum of 1024"),
    (dict(seq_lens=[8, 16]), "--seq-lens needs --target iOS18"),
    (dict(task="fill-mask"), "no trained weights for the fill-mask head"),
    (dict(task="image-classification"), "has no image-classification head"),
    (dict(attention="fast"), "unknown attention 'fast'"),
])
def test_bad_requests_are_conversion_errors(tmp_path_factory, kwargs, message):
    directory = tmp_path_factory.getbasetemp() / "bert-base"
    if not directory.exists():
        save_fixture(directory, "bert")
    with pytest.raises(ConversionError, match=message):
        convert(str(directory), offline=True, **kwargs)


def test_a_program_the_simulator_cannot_run_fails_verification_and_says_why(monkeypatch):
    from milpasses.simulator.ops import OP_IMPLEMENTATIONS

    monkeypatch.delitem(OP_IMPLEMENTATIONS, "conv")
    _, report = convert(F.build_model("bert"), seq_len=8)
    assert not report.passed and report.psnr == []
    assert "no implementation of MIL op 'conv'" in report.failure()


def test_missing_model_directory(tmp_path):
    with pytest.raises(ConversionError, match="no model directory at"):
        convert(str(tmp_path / "absent"))


def test_unconvertible_torch_op_is_named(tmp_path, monkeypatch):
    from coremltools.converters.mil.frontend.torch.ops import _TORCH_OPS_REGISTRY

    monkeypatch.delitem(_TORCH_OPS_REGISTRY.name_to_func_mapping, "gelu")
    with pytest.raises(ConversionError, match="cannot convert the torch op 'gelu'"):
        convert(F.build_model("bert"), seq_len=8)


def _tokens(seq_len, token_type_ids=False):
    batch = tiny_tokenizer()(["hello world.", "a short one."], padding="max_length", max_length=seq_len,
                             return_tensors="np")
    names = ("input_ids", "attention_mask") + (("token_type_ids",) if token_type_ids else ())
    return {k: batch[k][:1].astype(np.int32) for k in names}
