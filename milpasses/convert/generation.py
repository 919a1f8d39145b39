"""``convert(..., task="text-generation", context=N)``: a KV-cache decoder with ``prefill`` and
``decode`` functions in one package, verified by greedy decoding through the simulator against
Hugging Face ``generate``.

The stages are the other conversions' (load, trace and convert, verify, report), run on the two
steps of :mod:`milpasses.generation.step`. The package is built in a temporary directory and the
returned ``MLModel`` reads it; :func:`milpasses.convert.save` copies it to its destination.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from milpasses.errors import ConversionError

KV_CACHE_MODES = ("io", "state")
DEFAULT_PREFILL_CHUNK = 64
#: The verification's prompts (a model without a tokenizer gets seeded token ids instead).
VERIFICATION_PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")
VERIFIED_TOKENS = 16


def check_generation_options(task: str, context, prefill_chunk, kv_cache: str, seq_len, seq_lens, batch,
                             target: str | None = None) -> int:
    """The prefill chunk, after the checks that need no model."""
    if task != "text-generation":
        raise ConversionError(f"--context applies to --task text-generation, not {task}")
    if seq_len is not None or seq_lens is not None:
        raise ConversionError("--seq-len and --seq-lens do not apply with --context: the prefill chunk "
                              "(--prefill-chunk) and the context fix the shapes")
    if batch != 1:
        raise ConversionError("a KV-cache decoder is converted for batch 1")
    if kv_cache not in KV_CACHE_MODES:
        raise ConversionError(f"unknown kv_cache '{kv_cache}'; choose one of {', '.join(KV_CACHE_MODES)}")
    if target is not None and target != "iOS18":
        # Two functions sharing one copy of the weights (multifunction) and Core ML states are
        # both iOS18 features; two separate packages would store the weights twice.
        raise ConversionError(f"text generation needs --target iOS18 (multifunction packages and states are iOS18 "
                              f"features), got --target {target}: convert with --target iOS18 or without --target")
    if not isinstance(context, int) or context < 2:
        raise ConversionError(f"--context must be an integer of at least 2, got {context}")
    chunk = min(DEFAULT_PREFILL_CHUNK, context) if prefill_chunk is None else prefill_chunk
    if not isinstance(chunk, int) or chunk < 1:
        raise ConversionError(f"--prefill-chunk must be a positive integer, got {prefill_chunk}")
    if chunk > context:
        raise ConversionError(f"--prefill-chunk {chunk} is larger than --context {context}: choose a chunk of at "
                              f"most {context}")
    return chunk


def _require_causal_lm(model) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ConversionError(f"{type(model).__name__} has no causal language-model head: pass a model of "
                              f"AutoModelForCausalLM (e.g. {model.config.model_type}'s ...ForCausalLM)")


def _verification_prompts(loaded, context: int) -> list[tuple[str, list[int]]]:
    """(label, token ids) of the two prompts, cut so that the prompt and the tokens fit the context."""
    import numpy as np

    room = max(1, context - VERIFIED_TOKENS)
    if loaded.tokenizer is None:
        rng = np.random.default_rng(0)
        vocab = loaded.model.config.get_text_config().vocab_size
        return [(f"seeded ids {i + 1}", rng.integers(3, vocab, size=min(11 + 2 * i, room)).tolist()) for i in range(2)]
    prompts = []
    for text in VERIFICATION_PROMPTS:
        ids = loaded.tokenizer(text)["input_ids"]
        prompts.append((text, list(ids)[-room:]))
    return prompts


def convert_generation(model, context: int, prefill_chunk: int, kv_cache: str, options, min_psnr_db: float,
                       console, stage, all_logits: bool = False):
    """(MLModel of the package, ConversionReport)."""
    import coremltools as ct

    import milpasses
    from milpasses.convert import load
    from milpasses.convert.coreml import histogram
    from milpasses.convert.report import ConversionReport
    from milpasses.generation.package import SimulatedPackage, build_package, check_prompt
    from milpasses.generation.step import cache_shape, state_slots
    from milpasses.pipeline import ane_pipeline

    seconds = {}
    with stage(console, seconds, "load", "loading the model"):
        loaded = load.load(model, options)
        _require_causal_lm(loaded.model)
        maximum = load._max_positions(loaded.model.config.get_text_config())
        if maximum is not None and context > maximum:
            raise ConversionError(f"--context {context} is above the model's maximum of {maximum} positions: "
                                  f"choose --context at most {maximum}")
    directory = Path(tempfile.mkdtemp(prefix="milpasses-generation-"))
    atexit.register(shutil.rmtree, directory, True)
    package = directory / "model.mlpackage"
    pipeline = (lambda: ane_pipeline(attention=options.attention)) if options.attention else ane_pipeline
    with stage(console, seconds, "convert", f"tracing and converting prefill ({prefill_chunk} tokens) and decode "
               f"(1 token) at context {context}, the cache as {kv_cache}"):
        programs, reports = build_package(loaded.model, context, prefill_chunk, pipeline, package, kv_cache,
                                          all_logits)
        passes = [{"function": function, **entry} for function, filed in reports.items() for entry in filed.as_dicts()]
    shape = cache_shape(loaded.model, state_slots(context) if kv_cache == "state" else context)
    recorded = {"task": "text-generation", "context": context, "prefill_chunk": prefill_chunk, "kv_cache": kv_cache,
                "all_logits": all_logits,
                "attention": options.attention, "target": "iOS18", "precision": options.precision,
                "offline": options.offline, "compute_units": "CPU_AND_NE"}
    cache = list(shape.array_shape())
    inputs = {"input_ids": [[1, prefill_chunk], [1, 1]], "position": [[1]]}
    outputs = ["logits"]
    if kv_cache == "io":
        inputs.update(key_cache=[cache], value_cache=[cache])
        outputs += ["new_keys", "new_values"]
    report = ConversionReport(
        model=loaded.description, task="text-generation", inputs=inputs, outputs=outputs, options=recorded,
        min_psnr_db=min_psnr_db, passes=passes, ops_after=histogram(programs["decode"]))
    report.generation = {"functions": {name: histogram(program) for name, program in programs.items()},
                         "cache_shape": cache, "kv_cache": kv_cache, "prompts": []}
    prompts = _verification_prompts(loaded, context)
    with stage(console, seconds, "verify", f"verifying: {VERIFIED_TOKENS} greedy tokens from {len(prompts)} prompts, "
               f"simulated, against Hugging Face generate"):
        run = SimulatedPackage(package)
        for label, ids in prompts:
            new_tokens = min(VERIFIED_TOKENS, context - len(ids))
            check = check_prompt(run, loaded.model, ids, context, prefill_chunk, new_tokens, label, kv_cache)
            report.generation["prompts"].append(check.as_dict())
            report.psnr.append({"output": f"logits, prompt {len(report.psnr) + 1}", "seq_len": None,
                                "psnr_db": check.worst_psnr_db})
            if check.first_divergence is not None and not check.near_tie:
                report.verification_error = (f"prompt {len(report.psnr)}: the tokens diverge from Hugging Face's "
                                             f"at step {check.first_divergence}")
    report.samples = (f"{len(prompts)} prompts, {VERIFIED_TOKENS} greedy tokens each, per-step logits against the "
                      f"torch model fed the same tokens (worst step shown)")
    report.device_check = "skipped: Core ML runs only on macOS (verified by simulation)"
    report.seconds = {k: round(v, 3) for k, v in seconds.items()}
    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    mlmodel.user_defined_metadata["milpasses.version"] = milpasses.__version__
    mlmodel.user_defined_metadata["milpasses.task"] = "text-generation"
    mlmodel.user_defined_metadata["milpasses.source_model"] = loaded.description
    mlmodel.user_defined_metadata["milpasses.options"] = json.dumps(recorded)
    mlmodel.short_description = f"{loaded.description} (text-generation, KV cache), converted for the ANE by milpasses"
    return mlmodel, report
