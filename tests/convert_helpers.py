"""Tiny seeded fixture models saved as Hugging Face model directories, with a tiny tokenizer."""

import json
import re

import transformers as hf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from fixtures import families as F
from milpasses.bundled import SAMPLE_SENTENCES
from milpasses.convert import SAMPLE_QUESTIONS

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer() -> hf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the verification sentences, within the fixtures' vocabulary."""
    texts = list(SAMPLE_SENTENCES) + [t for pair in SAMPLE_QUESTIONS for t in pair]
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = {token: i for i, token in enumerate(SPECIAL + words[:F.VOCAB - len(SPECIAL)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.BertProcessing(("[SEP]", vocab["[SEP]"]), ("[CLS]", vocab["[CLS]"]))
    return hf.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def save_fixture(directory, family: str, model_class=None, sentence_pooling: str | None = None, **config_fields):
    """Save the family's seeded model (with ``model_class``'s head) and, for text, the tiny
    tokenizer; ``sentence_pooling`` (e.g. "mean_tokens") adds sentence-transformers files."""
    model = F.build_model(family, model_class, **config_fields)
    model.save_pretrained(directory)
    if F.FAMILIES[family].kind == "text":
        tiny_tokenizer().save_pretrained(directory)
    if sentence_pooling:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
        (directory / "modules.json").write_text(json.dumps(modules))
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{sentence_pooling}": True}))
    return directory


def assert_generate_streams_hugging_faces_text(capsys, package, source, prompt="the cat sat on the mat", tokens=6):
    """``milpasses generate PACKAGE PROMPT`` prints the greedy continuation Hugging Face
    ``generate`` gives the GPT-2 fixture saved in ``source``, decoded."""
    import torch

    from milpasses.cli import main

    capsys.readouterr()
    assert main(["generate", str(package), prompt, "--max-new-tokens", str(tokens)]) == 0
    streamed = capsys.readouterr().out
    tokenizer = hf.AutoTokenizer.from_pretrained(source)
    model = hf.GPT2LMHeadModel.from_pretrained(source, attn_implementation="eager").eval()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert streamed.strip() == tokenizer.decode(expected, skip_special_tokens=True).strip()
