"""A causal LM as a KV-cache decoder on the route: ``prefill`` and ``decode`` functions in one
package, verified by greedy decoding through the simulator against Hugging Face ``generate``
and held to its DEFAULT twin (the same steps converted by coremltools' DEFAULT pipeline).

The steps are :mod:`milpasses.frontend.generation_step`'s; the stages are the route's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from milpasses.convert import load
from milpasses.convert.coreml import Converted, histogram, to_mlprogram, write_multifunction
from milpasses.convert.options import Options
from milpasses.convert.report import ConversionReport
from milpasses.convert.source import Source, Stages
from milpasses.errors import ConversionError
from milpasses.frontend.generation_step import cache_shape, state_slots, step_function

#: The verification's prompts (a model without a tokenizer gets seeded token ids instead).
VERIFICATION_PROMPTS = ("The capital of France is", "Once upon a time, in a small village by the sea,")
VERIFIED_TOKENS = 16


class CausalLMSteps(Source):
    task = "text-generation"
    default_function = "decode"

    def __init__(self, model, options: Options):
        self.given, self.options, self.generation = model, options, options.generation

    def load(self) -> None:
        self.loaded = load.load(self.given, self.options)
        model = self.loaded.model
        self.description, self.model_class = self.loaded.description, type(model).__name__
        _require_causal_lm(model)
        maximum = load.max_positions(model.config.get_text_config())
        context = self.generation.context
        if maximum is not None and context > maximum:
            raise ConversionError(f"--context {context} is above the model's maximum of {maximum} positions: "
                                  f"choose --context at most {maximum}")

    def functions(self, stages: Stages):
        g = self.generation
        return [step_function(self.loaded.model, g.context, length, g.kv_cache, g.all_logits, self.options.precision,
                              name) for name, length in (("prefill", g.prefill_chunk), ("decode", 1))]

    def report(self, converted: list[Converted]) -> ConversionReport:
        g = self.generation
        cache = list(cache_shape(self.loaded.model, state_slots(g.context) if g.kv_cache == "state"
                                 else g.context).array_shape())
        inputs = {"input_ids": [[1, g.prefill_chunk], [1, 1]], "position": [[1]]}
        decode = next(item.program for item in converted if item.function.name == "decode")
        self.logits = logits_outputs(decode)
        outputs = list(self.logits)
        if g.kv_cache == "io":
            inputs.update(key_cache=[cache], value_cache=[cache])
            outputs += ["new_keys", "new_values"]
        report = ConversionReport(model=self.description, task=self.task, inputs=inputs, outputs=outputs,
                                  options=self.options.recorded(), min_psnr_db=self.options.min_psnr_db)
        report.generation = {"functions": {item.function.name: histogram(item.program) for item in converted},
                             "cache_shape": cache, "kv_cache": g.kv_cache, "logits": self.logits, "prompts": []}
        return report

    def metadata(self) -> dict[str, str]:
        """The logits' outputs: ``logits``, or its parts to join on the vocabulary axis in order."""
        return {"milpasses.logits": ",".join(self.logits)}

    def verifying(self, mlmodel) -> tuple[str, None]:
        self.prompts = _verification_prompts(self.loaded, self.generation.context)
        return (f"verifying: {VERIFIED_TOKENS} greedy tokens from {len(self.prompts)} prompts, simulated, against "
                f"Hugging Face generate and the DEFAULT pipeline's package", None)

    def verify(self, mlmodel, converted: list[Converted], report: ConversionReport, step) -> None:
        import coremltools as ct

        from milpasses.generation.package import TWIN_ALLOWANCE_DB, SimulatedPackage, check_prompt

        g, prompts = self.generation, self.prompts
        run = SimulatedPackage(mlmodel.package_path)
        with tempfile.TemporaryDirectory(prefix="milpasses-default-") as directory:
            twin_path = Path(directory) / "default.mlpackage"
            build_package(self.loaded.model, g.context, g.prefill_chunk, lambda: ct.PassPipeline.DEFAULT, twin_path,
                          g.kv_cache, g.all_logits, self.options.precision)
            twin = SimulatedPackage(twin_path)
            checks = [check_prompt(run, self.loaded.model, ids, g.context, g.prefill_chunk,
                                   min(VERIFIED_TOKENS, g.context - len(ids)), label, g.kv_cache, twin)
                      for label, ids in prompts]
        for number, check in enumerate(checks, start=1):
            report.generation["prompts"].append(check.as_dict())
            report.psnr.append({"output": f"logits, prompt {number}", "seq_len": None,
                                "psnr_db": check.worst_psnr_db})
            if check.first_divergence is not None and not check.near_tie:
                report.verification_error = (f"prompt {number}: the tokens diverge from Hugging "
                                             f"Face's at step {check.first_divergence}")
            elif not check.within_twin:
                # A finding, not a failure: one fp16 rounding more or less moves the worst of 16 steps by
                # up to 4.6 dB on the fixtures (docs/cli.md), in the DEFAULT package as in this one.
                report.fp16_findings.append(f"prompt {number}: the worst step's logits PSNR, {check.worst_psnr_db:.1f} "
                                            f"dB, is more than {TWIN_ALLOWANCE_DB:g} dB below the DEFAULT pipeline's "
                                            f"package's, {check.default_worst_psnr_db:.1f} dB")
        report.samples = (f"{len(prompts)} prompts, {VERIFIED_TOKENS} greedy tokens each, per-step logits against the "
                          f"torch model fed the same tokens (worst step shown), beside the DEFAULT pipeline's "
                          f"package fed the same tokens")
        report.device_check = "skipped: Core ML runs only on macOS (verified by simulation)"


def logits_outputs(program) -> list[str]:
    """The names the logits leave ``program`` by: ``logits``, or ``logits_0 .. logits_{k-1}``
    when ``ane::split_wide_outputs`` split a vocabulary wider than the ANE's largest dimension."""
    return [v.name for v in program.functions["main"].outputs if v.name.startswith("logits")]


def convert_step(model, context: int, query_length: int, pass_pipeline=None, precision: str = "fp16",
                 kv_cache: str = "io", all_logits: bool = False):
    """The step of ``query_length`` tokens converted to an iOS18 ML Program with ``pass_pipeline``
    (DEFAULT when None)."""
    import coremltools as ct

    function = step_function(model, context, query_length, kv_cache, all_logits, precision)
    return to_mlprogram(function, pass_pipeline, ct.target.iOS18, precision)


def build_package(model, context: int, prefill_chunk: int, pass_pipeline_factory, output: Path,
                  kv_cache: str = "io", all_logits: bool = False, precision: str = "fp16") -> tuple[dict, dict]:
    """Convert the two steps and write them to ``output`` as one multifunction package (the
    default function is ``decode``); returns each function's MIL program, for op counts, and each
    function's pass reports (empty unless the factory makes ``ane_pipeline()``s). In a ``state``
    package both functions declare the same two states, so one state serves both."""
    mlmodels, programs, reports = {}, {}, {}
    for function, length in (("prefill", prefill_chunk), ("decode", 1)):
        pipeline = pass_pipeline_factory()
        mlmodels[function] = convert_step(model, context, length, pipeline, precision, kv_cache, all_logits)
        programs[function] = mlmodels[function]._mil_program
        reports[function] = getattr(pipeline, "reports", {})
    write_multifunction(mlmodels, Path(output), default="decode")
    return programs, reports


def _require_causal_lm(model) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ConversionError(f"{type(model).__name__} has no causal language-model head: pass a model of "
                              f"AutoModelForCausalLM (e.g. {model.config.model_type}'s ...ForCausalLM)")


def _verification_prompts(loaded, context: int) -> list[tuple[str, list[int]]]:
    """(label, token ids) of the two prompts, cut so that the prompt and the tokens fit the context."""
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
