"""Sample inputs, for tracing and for verification: the model's own tokenizer on real sentences
(question/context pairs for question answering), padded to the sequence length, or seeded
images; seeded token ids, every other row padded, when the model came without a tokenizer."""

from __future__ import annotations

import math

import numpy as np

#: Verification pairs for question answering: (question, context).
SAMPLE_QUESTIONS = (
    ("Where do transformers run fastest?", "On the Neural Engine, when laid out channels-first."),
    ("What converts PyTorch models?", "coremltools converts them to Core ML."),
)

#: Rows verified at each length (at least this many, in whole batches).
VERIFIED_ROWS = 4


def verification_rows(batch: int) -> int:
    return batch * max(1, math.ceil(VERIFIED_ROWS / batch))


def sample_inputs(loaded, task_name: str, rows: int, length: int | None) -> tuple[dict[str, np.ndarray], str]:
    """``rows`` inputs for the loaded model at sequence ``length``, and a description of them."""
    if loaded.modality == "vision":
        return _vision_samples(loaded.model.config, rows)
    return _text_samples(loaded.tokenizer, loaded.input_names, rows, length, task_name,
                         loaded.model.config.vocab_size)


def as_tensors(inputs: dict[str, np.ndarray]):
    """Numpy inputs as the positional torch tensors the traced module takes (integers as int64)."""
    import torch

    return tuple(torch.from_numpy(v.astype(np.int64) if v.dtype.kind in "iu" else v) for v in inputs.values())


def _text_samples(tokenizer, names: tuple[str, ...], rows: int, seq_len: int, task_name: str,
                  vocab_size: int) -> tuple[dict[str, np.ndarray], str]:
    from milpasses.bundled import SAMPLE_SENTENCES

    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if task_name == "question-answering":
            pairs = [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(rows)]
            batch = tokenizer([q for q, _ in pairs], [c for _, c in pairs], padding="max_length",
                              max_length=seq_len, truncation=True, return_tensors="np")
            what = "question/context pairs"
        else:
            sentences = [SAMPLE_SENTENCES[i % len(SAMPLE_SENTENCES)] for i in range(rows)]
            batch = tokenizer(sentences, padding="max_length", max_length=seq_len, truncation=True,
                              return_tensors="np")
            what = "real sentences"
        inputs = {}
        for name in names:
            value = batch[name] if name in batch else np.zeros_like(batch["input_ids"])
            inputs[name] = value.astype(np.int32)
        return inputs, f"{rows} {what}, tokenized by the model's tokenizer, padded to the sequence length"
    rng = np.random.default_rng(0)
    ids = rng.integers(3, max(vocab_size, 4), size=(rows, seq_len)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1::2, max(1, seq_len // 2):] = 0  # every other row padded to half length
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return ({n: inputs[n] for n in names},
            f"{rows} rows of seeded token ids (no tokenizer found), every other row padded")


def _vision_samples(config, rows: int) -> tuple[dict[str, np.ndarray], str]:
    rng = np.random.default_rng(0)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    pixels = rng.standard_normal((rows, getattr(config, "num_channels", 3), size, size)).astype(np.float32)
    return {"pixel_values": pixels}, f"{rows} seeded N(0, 1) images of {size}x{size}"
