"""``milpasses.generate``: text from a converted ``text-generation`` package.

The package's metadata names its source model (for the tokenizer) and its context and prefill
chunk; its functions' inputs give the cache's shape. On macOS the functions run in Core ML
(``MLModel``); elsewhere, and when asked, in the MIL simulator.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Callable


from milpasses.generation.host import Sampling, generate_ids
from milpasses.frontend.generation_step import CacheShape


class GenerationError(ValueError):
    """The package or the request cannot generate; the message says why and what to do."""


def _package_options(path: Path) -> tuple[dict, str]:
    import coremltools as ct

    if path.suffix != ".mlpackage" or not path.is_dir():
        raise GenerationError(f"no .mlpackage directory at {path}: give a package written by "
                              f"milpasses convert --task text-generation --context N")
    metadata = ct.models.MLModel(str(path), skip_model_load=True, function_name="decode").user_defined_metadata
    options = json.loads(metadata.get("milpasses.options", "{}"))
    if "context" not in options:
        raise GenerationError(f"{path} is not a KV-cache decoder: convert it with --task text-generation --context N")
    return options, metadata.get("milpasses.source_model", "")


def _cache_shape(path: Path, context: int) -> CacheShape:
    """The cache's shape from the decode function's ``key_cache`` (an input, or a state), and
    the converted context (a state's context axis may be padded past it)."""
    from milpasses.simulator import load_program

    cache = load_program(path).functions["decode"].inputs["key_cache"].shape
    layers, channels = int(cache[0]), int(cache[1])
    return CacheShape(layers, 1, channels, context)  # the host only needs (layers, channels, context)


class CoreMLPackage:
    """The package's functions run by Core ML (macOS only), as the host loop calls them.

    A ``state`` package's state is made by the ``decode`` function's model and passed to both
    functions: they declare the same states (names, shapes, fp16), as Core ML's multifunction
    sharing asks. Written and guarded, never run on Linux."""

    def __init__(self, path: Path):
        import coremltools as ct

        self.models = {name: ct.models.MLModel(str(path), function_name=name,
                                               compute_units=ct.ComputeUnit.CPU_AND_NE)
                       for name in ("prefill", "decode")}

    def make_state(self):
        return self.models["decode"].make_state()

    def __call__(self, function: str, inputs: dict, state=None) -> dict:
        model = self.models[function]
        return model.predict(inputs) if state is None else model.predict(inputs, state=state)


def _runner(path: Path, simulate: bool | None) -> Callable:
    if simulate is None:
        simulate = platform.system() != "Darwin"
    if simulate:
        from milpasses.generation.package import SimulatedPackage

        return SimulatedPackage(path)
    return CoreMLPackage(path)


def _load_tokenizer(tokenizer, source: str):
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    import transformers

    name = tokenizer or source
    if not name:
        raise GenerationError("the package does not name its source model: pass tokenizer= (--tokenizer)")
    try:
        return transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise GenerationError(f"cannot load the tokenizer of '{name}': {str(error).splitlines()[0]}; "
                              f"pass tokenizer= (--tokenizer) with a model directory or hub id") from error


def generate(package, prompt: str, max_new_tokens: int = 32, tokenizer=None, chat: bool = False,
             top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0, seed: int = 0,
             stop: list[str] | None = None, stream: Callable[[str], None] | None = None,
             simulate: bool | None = None) -> str:
    """The text ``package`` continues ``prompt`` with (greedy unless ``top_k``/``top_p``).

    ``chat`` wraps the prompt in the tokenizer's chat template as one user turn. Generation stops
    at the tokenizer's end-of-sequence token, at any token of ``stop``, or after
    ``max_new_tokens``; a prompt and answer longer than the context raise
    :class:`milpasses.generation.host.ContextFullError`. ``stream`` is called with each new piece
    of text as it is produced. ``simulate`` forces the simulator (the default off macOS)."""
    path = Path(package)
    options, source = _package_options(path)
    tokenizer = _load_tokenizer(tokenizer, source)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise GenerationError("the tokenizer has no chat template: generate without chat (--chat)")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for text in stop or ():
        stop_ids.update(tokenizer.convert_tokens_to_ids([text]))
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    produced, shown = [], ""
    for step in generate_ids(_runner(path, simulate), list(ids), _cache_shape(path, options["context"]),
                             options["prefill_chunk"], max_new_tokens, sampling, stop_ids,
                             kv_cache=options.get("kv_cache", "io")):
        if step.token in stop_ids:
            break
        produced.append(step.token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        if stream is not None and len(text) > len(shown):
            stream(text[len(shown):])
        shown = text
    return tokenizer.decode(produced, skip_special_tokens=True)

