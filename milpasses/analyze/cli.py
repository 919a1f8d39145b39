"""``milpasses analyze``: where each op of a Core ML program is predicted to run, and how long
the program should take, for a saved package or a Hugging Face model converted on the spot."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from milpasses.analyze import compute_plan
from milpasses.analyze.chips import CHIPS, DEFAULT_CHIP
from milpasses.console import Console, add_verbose_option


class UserError(Exception):
    """A problem with what the user asked for: one line on stderr, exit status 2 (as ``milpasses.cli``
    reports its own; kept here so the subcommand does not depend on how cli.py is run)."""


CORE_ML_SUFFIXES = (".mlpackage", ".mlmodel")


def add_analyze_parser(commands) -> None:
    parser = commands.add_parser(
        "analyze", help="predict where each op runs (ANE, GPU, CPU) and why, with a latency estimate")
    parser.add_argument("model", nargs="?",
                        help="an .mlpackage, or a Hugging Face model directory or id to convert "
                             "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--json", action="store_true", help="print the analysis as JSON")
    parser.add_argument("--function", help="the function of a multifunction package (default: its default "
                                           "function: a text-generation package's decode, the first length of "
                                           "an ONNX model converted with --seq-lens)")
    parser.add_argument("--html", metavar="OUT", help="also write a self-contained HTML picture of it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --html file")
    parser.add_argument("--chip", choices=tuple(CHIPS), default=DEFAULT_CHIP,
                        help="the chip for the per-op times (every chip's latency is summarised)")
    parser.add_argument("--compare", action="store_true",
                        help="convert the model with DEFAULT and with ane_pipeline() and compare them: the "
                             "predicted speed-up, with its range when the assumed dispatch and switch costs vary")
    parser.add_argument("--device", action="store_true",
                        help="macOS only: show Core ML's own MLComputePlan device and cost beside each op")
    parser.add_argument("--seq-len", type=int, default=128, help="sequence length when converting a model")
    add_verbose_option(parser)
    parser.set_defaults(run=analyze_command)


def _check_html_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a directory; give --html a file name such as ops.html")
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise UserError(f"cannot write to {path.parent}: choose a writable directory for --html")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside the destination, then rename: the destination is never half-written."""
    descriptor, staging = tempfile.mkstemp(prefix=".milpasses-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)


def _is_package_argument(text: str) -> bool:
    path = Path(text)
    return path.suffix in CORE_ML_SUFFIXES or (path.is_dir() and (path / "Manifest.json").exists())


def _load_hf_model(text: str | None):
    """A Hugging Face model in eager attention, loaded as ``milpasses convert`` loads it: the
    bundled MiniLM, a local directory, or a hub id."""
    from milpasses.convert import ConversionError, Options
    from milpasses.convert.load import load_pretrained

    try:
        model, _, _, description, _ = load_pretrained(text, Options.check())
    except ConversionError as error:
        raise UserError(f"cannot load '{text}': not an .mlpackage, nor a Hugging Face model directory "
                        f"or id ({error})") from error
    return model, description


def _convert(model, described: str, seq_len: int, pipelines: tuple[str, ...]):
    """{pipeline label: fp16 iOS16 MLModel} for a text model traced at batch 1, ``seq_len`` tokens."""
    import coremltools as ct
    import numpy as np
    import torch

    from milpasses.pipeline import ane_pipeline
    from milpasses.convert.coreml import convert_traced
    from milpasses.frontend.tracing import LastHiddenState

    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise UserError("only text models (input_ids) can be converted here; convert others yourself and "
                        "pass the .mlpackage")
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", seq_len))
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, size=(1, seq_len)).astype(np.int32)
    inputs = {"input_ids": ids, "attention_mask": np.ones((1, seq_len), np.int32)}
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    makers = {"DEFAULT": lambda: ct.PassPipeline.DEFAULT, "ane_pipeline()": ane_pipeline}
    try:
        with torch.no_grad():
            traced = torch.jit.trace(LastHiddenState(model, tuple(inputs)).eval(), examples)
        return {name: convert_traced(traced, inputs, "fp16", makers[name]()) for name in pipelines}
    except Exception as error:  # tracing and conversion fail in many ways; name the model and the cause
        raise UserError(f"could not trace and convert {described}: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''} (--verbose shows "
                        f"what coremltools and torch printed)") from error


def _programs(args, console: Console) -> tuple[dict, str]:
    """{label: MLModel or package path} to analyse, and what they were made from."""
    if args.model is not None and _is_package_argument(args.model):
        if args.compare:
            raise UserError("--compare converts a model twice: give a Hugging Face model directory or id "
                            "(or nothing, for the bundled MiniLM), not a Core ML package")
        path = Path(args.model)
        if not path.exists():
            raise UserError(f"no Core ML package at {path}")
        if path.suffix == ".mlmodel":
            raise UserError(f"{path} is an .mlmodel (a neuralnetwork or spec file); analyze reads ML Program "
                            f".mlpackage files: convert with convert_to='mlprogram'")
        return {str(path): path}, "Core ML package"
    if args.seq_len < 1:
        raise UserError(f"--seq-len must be a positive integer, got {args.seq_len}")
    with console.stage("loading the model"):
        model, described = _load_hf_model(args.model)
    pipelines = ("DEFAULT", "ane_pipeline()") if args.compare else ("ane_pipeline()",)
    with console.stage(f"tracing and converting with {' and '.join(pipelines)}"):
        return _convert(model, described, args.seq_len, pipelines), described


def _analyze_or_explain(label: str, source, chip: str, function: str | None = None):
    from milpasses.analyze.report import analyze

    try:
        return analyze(source, chip, function_name=_function_name(source, function))
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise UserError(f"cannot analyse {label}: {error}") from error
    except Exception as error:  # coremltools raises bare Exceptions for a corrupt package
        raise UserError(f"cannot read {label} as a Core ML ML Program ({type(error).__name__}: {error})") from error


def _function_name(source, function: str | None) -> str:
    """The function asked for; without one, a multifunction package's default function (a
    text-generation package's ``decode``, the first length of an ONNX model converted at several),
    else ``main``."""
    if function is not None:
        return function
    import coremltools as ct

    model = ct.models.MLModel(str(source), skip_model_load=True) if isinstance(source, (str, Path)) else source
    return model.get_spec().description.defaultFunctionName or "main"


def generation_lines(analysis, source, function: str) -> list[str]:
    """Per-token latency and tokens/s per chip of a KV-cache step, and what its cache costs."""
    from coremltools.converters.mil.mil import types

    from milpasses.generation.host import cache_bytes_per_token
    from milpasses.simulator import load_program

    inputs = load_program(source).functions[function].inputs
    if "key_cache" not in inputs:
        return []
    as_state = types.is_state(inputs["key_cache"].sym_type)
    layers, channels, _, context = (int(d) for d in inputs["key_cache"].shape)
    tokens = int(inputs["input_ids"].shape[1])
    traffic = cache_bytes_per_token(layers, channels, context)
    rates = ", ".join(f"{chip} {tokens / latency:.1f}" for chip, latency in analysis.latency_by_chip.items())
    mode = "state" if as_state else "io"
    return [f"generation ({function}, {tokens} token(s) per call, context {context}, cache as {mode}): "
            f"{analysis.latency / tokens * 1e3:.2f} ms per token; tokens/s by chip: {rates}",
            f"cache bytes per token (this package: {mode}): io {traffic['io']:,} (the whole cache in, the new K/V "
            f"out), state {traffic['state']:,} (the new K/V written in place)"]


def _device_plan(source) -> dict:
    if isinstance(source, Path):
        return compute_plan.device_plan(source)
    with tempfile.TemporaryDirectory(prefix="milpasses-analyze-") as scratch:
        package = Path(scratch) / "model.mlpackage"
        source.save(str(package))
        return compute_plan.device_plan(package)


def analyze_command(args) -> int:
    console = getattr(args, "console", None) or Console(None if args.json else sys.stderr, errors=sys.stderr)
    try:
        return _run(args, console)
    except UserError as error:
        console.error(str(error))
        return 2


def _run(args, console: Console) -> int:
    from milpasses.analyze import render

    if args.device:
        try:
            compute_plan.require_macos()
        except compute_plan.PlanUnavailable as error:
            raise UserError(str(error)) from error
    html_output = Path(args.html) if args.html else None
    if html_output is not None:
        _check_html_output(html_output, args.overwrite)

    sources, described = _programs(args, console)
    with console.stage("predicting where each op runs"):
        analyses = {label: _analyze_or_explain(label, source, args.chip, args.function)
                    for label, source in sources.items()}
    plans = {label: _device_plan(source) for label, source in sources.items()} if args.device else {}

    if args.json:
        document = {label: render.to_dict(a) for label, a in analyses.items()}
        for label, plan in plans.items():
            matched, compared = compute_plan.agreement(
                {r.output_name: r.device for r in analyses[label].ops}, plan)
            document[label]["compute_plan"] = {
                "ops": {name: {"device": device, "cost": cost} for name, (device, cost) in plan.items()},
                "agreement": matched / compared if compared else None}
        output = {"model": described, "analyses": document}
        if args.compare:
            output["speedup"] = render.speedups(*analyses.values())
            output["speedup_sensitivity"] = render.speedup_sensitivity(*analyses.values())
        print(json.dumps(output, indent=1))
    else:
        for label, analysis in analyses.items():
            print(f"== {label} ({described}) on {args.chip} ==")
            print(render.table(analysis, plans.get(label)))
            for line in generation_lines(analysis, sources[label], _function_name(sources[label], args.function)):
                print(line)
            if label in plans:
                matched, compared = compute_plan.agreement(
                    {r.output_name: r.device for r in analysis.ops}, plans[label])
                print(f"agreement with MLComputePlan: {matched}/{compared} ops"
                      + (f" ({matched / compared:.1%})" if compared else ""))
        if args.compare:
            print("\n".join(render.compare_lines(*analyses.values())))
    if html_output is not None:
        _write_atomically(html_output, render.html_page(analyses, compare=args.compare))
        if not args.json:
            print(f"wrote {html_output}")
    return 0
