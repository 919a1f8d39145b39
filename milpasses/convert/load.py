"""Loading: the model in eager attention, its tokenizer, and what it takes as input.

A model is a hub id, a local directory, a loaded ``PreTrainedModel``, or None for the bundled
all-MiniLM-L6-v2 (always offline). Weights load from safetensors only. What the model takes
(input names, sequence lengths) is settled here, against the model's own limits.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from milpasses.convert.options import BUNDLED_NAME, TASKS, Options, Task
from milpasses.errors import ConversionError, first_line
from milpasses.frontend.tracing import SentencePooling


@dataclass
class LoadedModel:
    model: transformers.PreTrainedModel
    tokenizer: object | None  # None: verification uses seeded token ids, and says so
    description: str  # how the report names the model
    modality: str  # "text" or "vision"
    input_names: tuple[str, ...]
    lengths: tuple[int | None, ...]  # the sequence lengths to convert at; (None,) for images
    pooling: SentencePooling | None  # a sentence-transformers model's pooling, as an extra output
    untrained_pooler: bool  # the checkpoint has no pooler weights: pooler_output is not an output


def load(model, options: Options) -> LoadedModel:
    hf_model, tokenizer, source, description, untrained_pooler = load_pretrained(model, options)
    task = options.spec
    modality = _modality(hf_model, task)
    pooling = sentence_pooling(source) if options.task == "feature-extraction" and modality == "text" else None
    if modality == "vision":
        if options.lengths_given:
            raise ConversionError("--seq-len and --seq-lens apply to text models; this one takes images")
        return LoadedModel(hf_model, tokenizer, description, modality, ("pixel_values",), (None,), pooling,
                           untrained_pooler)
    maximum = max_positions(hf_model.config)
    if maximum is not None and max(options.lengths) > maximum:
        raise ConversionError(f"sequence length {max(options.lengths)} is above the model's maximum of {maximum} "
                              f"positions: choose --seq-len at most {maximum}")
    input_names = ("input_ids", "attention_mask")
    if _uses_token_type_ids(hf_model, tokenizer):
        input_names += ("token_type_ids",)
    if options.enumerated and options.target != "iOS18":
        raise ConversionError(f"--seq-lens needs --target iOS18 for this model: Core ML before iOS 18 allows "
                              f"one input with enumerated shapes, and it has {len(input_names)} "
                              f"({', '.join(input_names)})")
    return LoadedModel(hf_model, tokenizer, description, modality, input_names, options.lengths, pooling,
                       untrained_pooler)


def is_causal(model, input_names: tuple[str, ...]) -> bool:
    """Whether attention is causal: changing the last token leaves the first token's output alone."""
    ids = torch.full((1, 4), 5, dtype=torch.long)
    changed = ids.clone()
    changed[0, -1] = 6
    extra = {"attention_mask": torch.ones_like(ids)} if "attention_mask" in input_names else {}
    with torch.no_grad():
        first = [model(input_ids=x, **extra)[0][0, 0] for x in (ids, changed)]
    return bool(torch.equal(first[0], first[1]))


def sentence_pooling(source: str | None) -> SentencePooling | None:
    """The sentence-transformers pooling described by ``modules.json``, or None."""
    if source is None or not (Path(source) / "modules.json").is_file():
        return None
    modules = json.loads((Path(source) / "modules.json").read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = next((m for m in modules if m["type"].endswith(".Pooling")), None)
    if pooling is None:
        return None
    unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if unsupported:
        raise ConversionError(f"sentence-transformers module(s) {unsupported} are not supported; "
                              f"milpasses converts Transformer + Pooling (+ Normalize)")
    settings = json.loads((Path(source) / pooling["path"] / "config.json").read_text())
    modes = tuple(mode for mode in SentencePooling.MODES if settings.get(f"pooling_mode_{mode}"))
    try:
        return SentencePooling(modes, normalize="Normalize" in kinds)
    except ValueError as error:
        raise ConversionError(str(error)) from error


def _is_local_path(model: str) -> bool:
    """A string that can only mean a directory: absolute, relative with ./ or ~, or existing.
    Anything else of the form ``name`` or ``org/name`` is a hub id."""
    return (os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
            or model.count("/") > 1)


def load_pretrained(model, options: Options):
    """(model, tokenizer or None, source directory or None, description, whether the pooler's
    weights are missing) for ``model``."""
    task_name, offline = options.task, options.offline
    if model is not None and not isinstance(model, (str, os.PathLike)):
        if not isinstance(model, transformers.PreTrainedModel):
            raise ConversionError(f"cannot convert a {type(model).__name__}: pass a transformers "
                                  f"PreTrainedModel, a hub id or a model directory")
        model.config._attn_implementation = "eager"
        return model.eval(), None, None, type(model).__name__, False

    if model is None:
        from milpasses.bundled import bundled_model_dir

        source, description, offline = str(bundled_model_dir()), f"{BUNDLED_NAME} (bundled)", True
    else:
        source = description = os.fspath(model)
        if _is_local_path(source):
            source = os.path.expanduser(source)
            if not os.path.isdir(source):
                raise ConversionError(f"no model directory at {source}: give a directory holding "
                                      f"config.json and model.safetensors, or a hub id")
    loading = dict(local_files_only=offline, trust_remote_code=options.trust_remote_code)
    try:
        config = transformers.AutoConfig.from_pretrained(source, **loading)
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot load model '{description}': {first_line(error)}") from error
    auto_class = _model_class(config, task_name)
    try:
        loaded, info = auto_class.from_pretrained(source, attn_implementation="eager", use_safetensors=True,
                                                  output_loading_info=True, **loading)
    except ValueError as error:
        if "Unrecognized configuration class" in str(error):
            raise ConversionError(f"{config.model_type} has no {task_name} head in transformers; "
                                  f"choose another --task") from error
        raise ConversionError(f"cannot load model '{description}': {first_line(error)}") from error
    except OSError as error:
        raise ConversionError(f"cannot load model '{description}': {first_line(error)}"
                              + (" (--offline: only local files are read)" if offline else "")) from error
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("pooler.")]
    if missing:
        raise ConversionError(
            f"'{description}' has no trained weights for the {task_name} head ({len(missing)} missing, "
            f"e.g. {missing[0]}); choose the task its checkpoint was trained for")
    loaded.config.use_cache = False
    loaded.eval()
    untrained_pooler = any(k.startswith("pooler.") for k in info.get("missing_keys", ()))
    tokenizer = None
    if _modality(loaded, TASKS[task_name]) == "text":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, **loading)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # verification falls back to seeded token ids, and says so
    return loaded, tokenizer, source, description, untrained_pooler


def _model_class(config, task_name: str):
    """The Auto class of the task; for feature extraction from a model with two towers or an
    encoder-decoder, the class of the part that extracts features (CLIPVisionModel, T5EncoderModel)."""
    task = TASKS[task_name]
    if task.auto_class != "AutoModel":
        return getattr(transformers, task.auto_class)
    family = type(config).__name__.removesuffix("Config")
    if hasattr(config, "vision_config") and hasattr(config, "text_config"):
        if task_name != "image-feature-extraction":
            raise ConversionError(f"{config.model_type} has a text and a vision tower: choose "
                                  f"--task image-feature-extraction to convert the vision tower")
        tower = getattr(transformers, type(config.vision_config).__name__.removesuffix("Config") + "Model", None)
        if tower is None:
            raise ConversionError(f"transformers has no vision model class for {config.model_type}")
        return tower
    saved_as_encoder = any(name.endswith("EncoderModel") for name in getattr(config, "architectures", None) or ())
    if getattr(config, "is_encoder_decoder", False) or saved_as_encoder:
        encoder = getattr(transformers, f"{family}EncoderModel", None)
        if encoder is None:
            raise ConversionError(f"{config.model_type} is an encoder-decoder model and transformers has no "
                                  f"{family}EncoderModel to extract features with")
        return encoder
    return transformers.AutoModel


def _modality(model, task: Task) -> str:
    if task.modality is not None:
        return task.modality
    return "vision" if getattr(model, "main_input_name", "input_ids") == "pixel_values" else "text"


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _uses_token_type_ids(model, tokenizer) -> bool:
    accepts = "token_type_ids" in inspect.signature(model.forward).parameters
    segments = getattr(model.config, "type_vocab_size", 0) or 0
    produced = tokenizer is None or "token_type_ids" in getattr(tokenizer, "model_input_names", ())
    return accepts and segments > 1 and produced
