"""Calibrate ``milpasses analyze``'s cost model on published on-device latencies.

    python benchmarks/calibration.py [--rebuild] [--only NAME,...]

Every point is a latency (or a speed-up) someone measured on a named Apple chip for a model we
can build offline at its published shape with seeded random weights (latency does not depend on
the weights' values). Each model is converted the way its source converted it: a hand-written
model in Apple's ANE form (benchmarks/apple_form.py) through coremltools' DEFAULT pipeline,
``ane_pipeline()``, or, for Apple's 2022 baseline, the Hugging Face code and the coremltools fp16
rule of that year (fixtures/distilbert_2022.py); then analysed for its chip. The script fits the
cost model's free parameters (``cost.FITTED``) to all points, and predicts every point from a fit
that leaves that point out (leave-one-out), every fit starting from a stated neutral point
(``NEUTRAL``), printing predicted / measured and its source. It writes each point's inputs (per
build, its device partitions and its ops as device, FLOPs and DRAM bytes) and the results to
``benchmarks/logs/calibration.json``, committed, and exits 1 when a bar of issue 16 (``BARS``) is
missed.

Deep models are not converted whole: a transformer's layers are identical, and the cost model
sums per-op times, so a model of L layers costs T(2) + (L - 2) * (T(2) - T(1)), computed from
one- and two-layer builds at full width and length (checked here against DistilBERT converted
whole). Vocabularies are cut to 1024 rows: a lookup reads only the rows it gathers, so the
table size changes no estimate (the models' published vocabularies are printed beside them).
Per-op analyses are cached in ``benchmarks/output/calibration_cache.json`` (gitignored), so a
rerun only refits; ``--rebuild`` converts again (needed after a pass changes the programs).
Conversions run one at a time, in a child process each, so memory is returned between them.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from milpasses.analyze import cost as costs  # noqa: E402
from milpasses.analyze.rules import ANE, GPU  # noqa: E402

OUTPUT = ROOT / "benchmarks" / "output"
CACHE = OUTPUT / "calibration_cache.json"
#: Committed: each point's inputs (what its prediction needs) and the results, recomputed by
#: tests/test_calibration_log.py without converting anything.
LOG = ROOT / "benchmarks" / "logs" / "calibration.json"
VOCAB = 1024
SEED = 0

# Sources, named once.
APPLE = "Apple, 'Deploying Transformers on the Apple Neural Engine' (2022), iPhone 13"
ANENTROPIC = "anentropic/experiments-coreml-ane-distilbert README (M1 Air, Apple's ANE DistilBERT, 'Inferred in 4.71ms')"
HFT2ANE = "anentropic/hft2ane README: ComputeUnit.ALL vs CPU_AND_GPU speed-up, M1 Air, S=128"
EEANE = "eeANE (ANE_NOTES, 2026 survey), M2"
MORE_ANE = ("smpanaro/more-ane-transformers evals/SPEED.md at b44664c (2023-04-11): ms/token, full 512-token "
            "input, no KV cache, CPU_AND_NE")


@dataclass(frozen=True)
class Program:
    """One model, converted one way, at one length; ``layers`` is the published depth."""

    family: str  # a key of BUILDERS
    conversion: str  # "apple" (hand-written ANE form, DEFAULT passes), "ane_pipeline" or "coremltools_2022"
    seq_len: int
    layers: int
    inputs: tuple = ("input_ids", "attention_mask")

    def key(self, layers: int) -> str:
        return f"{self.family}/{self.conversion}/S{self.seq_len}/L{layers}"


@dataclass(frozen=True)
class Point:
    name: str
    program: Program
    chip: str
    measured: float
    source: str
    kind: str = "latency_ms"  # or "speedup_without_ane": latency(CPU_AND_GPU) / latency(CPU_AND_NE)
    note: str = ""


def _distilbert(conversion, layers=6, seq=128):
    return Program("distilbert", conversion, seq, layers)


POINTS = [
    Point("DistilBERT-base DEFAULT", _distilbert("coremltools_2022"), "A15", 9.89, APPLE,
          note="Apple's baseline: HF DistilBERT's 2022 code through coremltools 5.2-6.3's defaults"),
    Point("DistilBERT-base Apple form", _distilbert("apple"), "A15", 3.47, APPLE),
    Point("DistilBERT-base Apple form", _distilbert("apple"), "M1", 4.71, ANENTROPIC,
          note="one reported inference; the author says times vary"),
    Point("DistilBERT hft2ane", _distilbert("apple"), "M1", 3.67, HFT2ANE, kind="speedup_without_ane"),
    Point("BERT-base hft2ane", Program("bert", "apple", 128, 12), "M1", 3.26, HFT2ANE, kind="speedup_without_ane"),
    Point("RoBERTa-base hft2ane", Program("roberta", "apple", 128, 12), "M1", 3.53, HFT2ANE,
          kind="speedup_without_ane"),
    Point("XLM-R large S=128", Program("xlm_roberta_large", "ane_pipeline", 128, 24), "M2", 11.6, EEANE),
    Point("XLM-R large S=512", Program("xlm_roberta_large", "ane_pipeline", 512, 24), "M2", 70.0, EEANE),
    Point("Qwen3-Embedding-0.6B S=128", Program("qwen3_embedding", "ane_pipeline", 128, 28), "M2", 20.1, EEANE),
    Point("Qwen3-Embedding-0.6B S=512", Program("qwen3_embedding", "ane_pipeline", 512, 28), "M2", 104.0, EEANE),
    Point("EmbeddingGemma-300m S=128", Program("embedding_gemma", "ane_pipeline", 128, 24), "M2", 7.56, EEANE),
    Point("gpt2 S=512", Program("gpt2", "ane_pipeline", 512, 12, ("input_ids",)), "M1", 69.0, MORE_ANE,
          note="'partially runs on CPU' (source)"),
    Point("gpt2-medium S=512", Program("gpt2_medium", "ane_pipeline", 512, 24, ("input_ids",)), "M1", 103.0, MORE_ANE),
    Point("gpt2-large S=512", Program("gpt2_large", "ane_pipeline", 512, 36, ("input_ids",)), "M1", 210.0, MORE_ANE),
    Point("gpt2-xl S=512", Program("gpt2_xl", "ane_pipeline", 512, 48, ("input_ids",)), "M1", 455.0, MORE_ANE,
          note="split into pieces under 2 GiB by the source"),
    Point("gpt2-xl S=512", Program("gpt2_xl", "ane_pipeline", 512, 48, ("input_ids",)), "M2", 406.0, MORE_ANE,
          note="split into pieces under 2 GiB by the source"),
]

#: Published numbers left out, and why.
EXCLUDED = [
    ("DistilBERT optimized, M1 Max, 8.7 ms (ANE_NOTES, community)", "sequence length not stated, and M1 Max's "
     "memory system is not in the chip table"),
    ("more-ane-transformers gpt2 26/21 ms, gpt2-xl 138/95 ms per token (M1/M2, SPEED.md from 2023-10)",
     "KV-cache generation with a chunked input whose length SPEED.md does not give, on a patched coremltools: "
     "not buildable at its published shape; the same source's earlier full-input figures are used instead"),
    ("ExecuTorch Llama-3.2-1B decode/prefill, A17 Pro", "needs the 1B decoder with 4-bit channel-wise weights: "
     "the KV-cache decode function exists (milpasses convert --task text-generation), but converting "
     "Llama-3.2-1B's decode alone peaks at 21 GB of this machine's 24 before any compression"),
    ("ANEForge MiniLM 0.53 ms, M5 Pro", "not Core ML, and M5 is not in the chip table"),
]

PUBLISHED_VOCAB = {"distilbert": 30522, "bert": 30522, "roberta": 50265, "xlm_roberta_large": 250002,
                   "qwen3_embedding": 151669, "embedding_gemma": 262144, "gpt2": 50257, "gpt2_medium": 50257,
                   "gpt2_large": 50257, "gpt2_xl": 50257}


# ---------------------------------------------------------------------------------------------
# Building and analysing (runs in a child process per program)

def _hf_model(family: str, layers: int):
    import transformers as hf

    gpt2_sizes = {"gpt2": (768, 12), "gpt2_medium": (1024, 16), "gpt2_large": (1280, 20), "gpt2_xl": (1600, 25)}
    if family == "distilbert":
        config, model_class = hf.DistilBertConfig(vocab_size=VOCAB, n_layers=layers), hf.DistilBertModel
    elif family == "xlm_roberta_large":
        config = hf.XLMRobertaConfig(vocab_size=VOCAB, hidden_size=1024, num_hidden_layers=layers,
                                     num_attention_heads=16, intermediate_size=4096, max_position_embeddings=514,
                                     pad_token_id=1)
        model_class = hf.XLMRobertaModel
    elif family == "qwen3_embedding":
        config = hf.Qwen3Config(vocab_size=VOCAB, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                                num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6)
        model_class = hf.Qwen3Model
    elif family == "embedding_gemma":
        config = hf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=1152,
                                     num_hidden_layers=layers, num_attention_heads=3, num_key_value_heads=1,
                                     head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
                                     # built as causal full attention: transformers' bidirectional
                                     # window mask does not trace (RuntimeError in and_mask); the
                                     # 512-token window never bites at S=128, and either mask costs
                                     # one (1, 1, S, S) tensor, negligible beside the layers
                                     layer_types=["full_attention"] * layers, use_bidirectional_attention=False,
                                     max_position_embeddings=2048)
        model_class = hf.Gemma3TextModel
    elif family in gpt2_sizes:
        width, heads = gpt2_sizes[family]
        config = hf.GPT2Config(vocab_size=VOCAB, n_embd=width, n_head=heads, n_layer=layers, n_positions=1024)
        model_class = hf.GPT2Model
    else:
        raise ValueError(f"no Hugging Face builder for {family}")
    config._attn_implementation = "eager"
    return model_class(config).eval()


def _apple_model(family: str, layers: int):
    from benchmarks.apple_form import AppleFormEncoder

    positions = {"distilbert": 512, "bert": 512, "roberta": 514}[family]
    token_types = 0 if family == "distilbert" else 1  # BERT and RoBERTa add a segment embedding
    return AppleFormEncoder(VOCAB, 768, 12, 3072, layers, positions, token_types).eval()


def build_and_analyse(program: Program, layers: int, chips: list[str]) -> dict:
    """Convert one program and return its per-op analysis for each chip, with and without the ANE."""
    import coremltools as ct
    import torch

    from milpasses.analyze.report import analyze
    from milpasses.pipeline import ane_pipeline
    from milpasses.convert.coreml import convert_traced
    from milpasses.frontend.tracing import LastHiddenState

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    inputs = {"input_ids": rng.integers(3, VOCAB, size=(1, program.seq_len)).astype(np.int32)}
    if "attention_mask" in program.inputs:
        inputs["attention_mask"] = np.ones((1, program.seq_len), np.int32)
    examples = tuple(torch.from_numpy(v.astype(np.int64)) for v in inputs.values())
    if program.conversion == "apple":
        module = _apple_model(program.family, layers)
    elif program.conversion == "coremltools_2022":
        from fixtures.distilbert_2022 import DistilBert2022, convert_2022

        module = DistilBert2022(_hf_model(program.family, layers)).eval()
    else:
        module = LastHiddenState(_hf_model(program.family, layers), tuple(inputs)).eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, examples)
    pipeline = ane_pipeline() if program.conversion == "ane_pipeline" else ct.PassPipeline.DEFAULT
    started = time.perf_counter()
    if program.conversion == "coremltools_2022":
        mlmodel = convert_2022(traced, inputs)  # its equality with today's model: tests/test_analyze_cost.py
    else:
        mlmodel = convert_traced(traced, inputs, "fp16", pipeline)
    converted_seconds = time.perf_counter() - started
    result = {"convert_seconds": converted_seconds, "chips": {}}
    for chip in chips:
        result["chips"][chip] = {}
        for units in ("CPU_AND_NE", "CPU_AND_GPU"):
            analysis = analyze(mlmodel._mil_program, chip, compute_units=units)
            result["chips"][chip][units] = {
                "partitions": len(analysis.partitions),
                "ops": [[r.device, r.cost.to_dict()] for r in analysis.ops],
            }
    return result


def _child(arguments: list[str]) -> None:
    spec = json.loads(arguments[0])
    program = Program(spec["family"], spec["conversion"], spec["seq_len"], spec["layers"], tuple(spec["inputs"]))
    print(json.dumps(build_and_analyse(program, spec["build_layers"], spec["chips"])))


def _builds(points) -> dict[str, tuple[Program, int, list[str]]]:
    """Every (program, layer count) to convert, with the chips it is analysed for."""
    builds: dict[str, tuple[Program, int, set]] = {}
    for point in points:
        program = point.program
        depths = [program.layers] if program.family == "distilbert" else []
        depths += [1, 2]
        for layers in depths:
            key = program.key(layers)
            builds.setdefault(key, (program, layers, set()))[2].add(point.chip)
    return {key: (program, layers, sorted(chips)) for key, (program, layers, chips) in builds.items()}


def load_cache() -> dict:
    return json.loads(CACHE.read_text()) if CACHE.exists() else {}


def fill_cache(points, rebuild: bool) -> dict:
    cache = {} if rebuild else load_cache()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for key, (program, layers, chips) in _builds(points).items():
        cached = cache.get(key)
        if cached and all(chip in cached["chips"] for chip in chips):
            continue
        spec = dict(family=program.family, conversion=program.conversion, seq_len=program.seq_len,
                    layers=program.layers, inputs=list(program.inputs), build_layers=layers, chips=chips)
        print(f"  converting {key} for {', '.join(chips)} ...", flush=True)
        child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True, cwd=ROOT)
        if child.returncode != 0:
            tail = child.stderr.strip().splitlines()[-3:]
            print(f"  FAILED {key}: " + " | ".join(tail), flush=True)
            cache[key] = {"failed": tail, "chips": {}}
        else:
            cache[key] = json.loads(child.stdout.strip().splitlines()[-1])
            print(f"  converted in {cache[key]['convert_seconds']:.0f} s", flush=True)
        CACHE.write_text(json.dumps(cache))
    return cache


# ---------------------------------------------------------------------------------------------
# What the fit consumes per point, drawn from the cached per-op analyses and committed to LOG

def _work_rows(entry: dict) -> list[list]:
    """The ops of one analysis that do work, as [device, FLOPs, DRAM bytes, count]: identical ops
    listed once (a layer's heads cost the same), free views left out."""
    rows = Counter()
    for device, cost in entry["ops"]:
        cost = costs.OpCost.from_dict(cost)
        if cost.launches:
            rows[(device, cost.flops, cost.dram_bytes(device, costs.PARAMETERS))] += 1
    return [[device, flops, dram, count] for (device, flops, dram), count in sorted(rows.items())]


def point_inputs(point: Point, cache: dict) -> dict:
    """Everything the fit needs to predict ``point``: per build (the published depth when it was
    converted whole, else one and two layers) and compute units, its device partitions and work rows."""
    program = point.program
    depths = [program.layers] if program.key(program.layers) in cache else [1, 2]
    units = ("CPU_AND_NE", "CPU_AND_GPU") if point.kind == "speedup_without_ane" else ("CPU_AND_NE",)
    builds = {}
    for layers in depths:
        entry = cache.get(program.key(layers), {})
        if "failed" in entry or point.chip not in entry.get("chips", {}):
            raise LookupError(f"{program.key(layers)} was not converted: {entry.get('failed', 'missing')}")
        analysed = entry["chips"][point.chip]
        builds[str(layers)] = {u: {"partitions": analysed[u]["partitions"], "ops": _work_rows(analysed[u])}
                               for u in units}
    return {"name": point.name, "chip": point.chip, "kind": point.kind, "measured": point.measured,
            "layers": program.layers, "source": point.source, "note": point.note, "builds": builds}


def fixed_inputs() -> dict:
    """The values every prediction shares that the fit does not change: checked against the code
    by tests/test_calibration_log.py, so a changed chip or fixed parameter calls for a re-run."""
    return {"neutral": {name: getattr(NEUTRAL, name) for name in costs.FITTED},
            "fixed_parameters": {f.name: getattr(costs.PARAMETERS, f.name) for f in fields(costs.PARAMETERS)
                                 if f.name not in costs.FITTED},
            "cpu_flops": costs.CPU_FLOPS,
            "chips": {name: asdict(chip) for name, chip in costs.CHIPS.items()}}


# ---------------------------------------------------------------------------------------------
# The model's prediction for a point, from its inputs alone

class Compiled:
    """One build's work rows as arrays, so that a parameter set is evaluated in a few numpy ops."""

    def __init__(self, build: dict, chip: costs.Chip, cpu_flops: float):
        self.chip, self.cpu_flops, self.partitions = chip, cpu_flops, build["partitions"]
        device, flops, dram, count = zip(*build["ops"]) if build["ops"] else ((), (), (), ())
        self.device = np.array(device)
        self.flops, self.dram, self.count = (np.array(v, float) for v in (flops, dram, count))

    def seconds(self, parameters: costs.CostParameters) -> float:
        chip = self.chip
        peak = np.where(self.device == ANE, chip.ane_fp16_flops * parameters.ane_efficiency,
                        np.where(self.device == GPU, chip.gpu_flops * parameters.gpu_efficiency, self.cpu_flops))
        per_op = np.maximum(self.flops / peak, self.dram / chip.dram_bytes_per_s) + parameters.op_seconds
        return float((per_op * self.count).sum()) + sum(costs.partition_seconds(self.partitions, parameters))


class Predictor:
    """A point's predicted value (ms, or a speed-up) under a parameter set."""

    def __init__(self, inputs: dict, fixed: dict):
        chip = costs.Chip(**fixed["chips"][inputs["chip"]])
        self.kind, self.layers = inputs["kind"], inputs["layers"]
        self.depths = {int(layers): {units: Compiled(build, chip, fixed["cpu_flops"])
                                     for units, build in by_units.items()}
                       for layers, by_units in inputs["builds"].items()}

    def _latency(self, units: str, parameters) -> float:
        if self.layers in self.depths:
            return self.depths[self.layers][units].seconds(parameters)
        one, two = (self.depths[n][units].seconds(parameters) for n in (1, 2))
        return two + (self.layers - 2) * (two - one)

    def __call__(self, parameters) -> float:
        if self.kind == "speedup_without_ane":
            return self._latency("CPU_AND_GPU", parameters) / self._latency("CPU_AND_NE", parameters)
        return self._latency("CPU_AND_NE", parameters) * 1e3


# ---------------------------------------------------------------------------------------------
# Fitting

#: Where every fit starts, stated and never fitted, so that no point's prediction depends on a fit
#: that saw it: half of each device's peak and no fixed cost per op (the fixed values are cost.py's).
NEUTRAL = costs.PARAMETERS.replace(ane_efficiency=0.5, gpu_efficiency=0.5, op_seconds=0.0)
#: Issue 16's bars on the leave-one-out error factor (max(predicted/measured, measured/predicted)).
BARS = {"median_error": 1.5, "worst_error": 3.0}

GRID = {
    "ane_efficiency": np.geomspace(0.05, 1.0, 28),
    "gpu_efficiency": np.geomspace(0.05, 1.0, 28),
    "op_seconds": np.concatenate([[0.0], np.geomspace(0.5e-6, 100e-6, 27)]),
}


def _loss(predictors, measured, parameters) -> float:
    return float(sum(math.log(p(parameters) / m) ** 2 for p, m in zip(predictors, measured)))


def fit(predictors, measured, start: costs.CostParameters, rounds: int = 4) -> costs.CostParameters:
    """Minimise the squared log error over the fitted parameters: coordinate descent on a grid,
    then refine each around its best value (the model has no gradient worth trusting: max())."""
    best = start
    for _ in range(rounds):
        for name in costs.FITTED:
            candidates = [best.replace(**{name: float(v)}) for v in GRID[name]]
            best = min(candidates, key=lambda c: _loss(predictors, measured, c))
    for name in costs.FITTED:
        value = getattr(best, name) or 1e-7
        candidates = [best.replace(**{name: float(value * f)}) for f in np.geomspace(0.8, 1.25, 11)]
        best = min(candidates, key=lambda c: _loss(predictors, measured, c))
    return best


def calibrate(inputs: dict) -> dict:
    """The fit on every point and each point predicted by a fit, from the neutral start, on the
    others (leave-one-out): computed from ``inputs`` (as committed in LOG) alone."""
    fixed = {k: inputs[k] for k in ("chips", "cpu_flops")}
    predictors = [Predictor(point, fixed) for point in inputs["points"]]
    measured = [point["measured"] for point in inputs["points"]]
    start = costs.PARAMETERS.replace(**inputs["neutral"], **inputs["fixed_parameters"])
    fitted = fit(predictors, measured, start)
    rows = []
    for i, (point, predictor) in enumerate(zip(inputs["points"], predictors)):
        others = [j for j in range(len(predictors)) if j != i]
        held_out = fit([predictors[j] for j in others], [measured[j] for j in others], start)
        prediction = predictor(held_out)
        rows.append({"name": point["name"], "chip": point["chip"], "kind": point["kind"],
                     "measured": point["measured"], "fit_all": predictor(fitted), "leave_one_out": prediction,
                     "error": max(prediction / point["measured"], point["measured"] / prediction)})
    errors = [row["error"] for row in rows]
    median, worst = float(np.median(errors)), max(errors)
    return {"fitted": {name: getattr(fitted, name) for name in costs.FITTED}, "points": rows,
            "median_error": median, "worst_error": worst, "bars": BARS,
            "passed": median <= BARS["median_error"] and worst <= BARS["worst_error"]}


def _compact_json(document: dict) -> str:
    """Indented JSON with every list of numbers and strings on one line (one work row a line)."""
    text = json.dumps(document, indent=1)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="convert every program again")
    parser.add_argument("--only", help="comma-separated point names to use (default: all; then LOG is not written)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child([args.child])
        return 0
    started = time.perf_counter()
    points = [p for p in POINTS if not args.only or p.name in args.only.split(",")]
    print(f"calibration set: {len(points)} points from {len({p.source for p in points})} sources")
    cache = fill_cache(points, args.rebuild)

    usable, per_point, left_out = [], [], []
    for point in points:
        try:
            per_point.append(point_inputs(point, cache))
            usable.append(point)
        except LookupError as error:
            left_out.append(f"{point.name} on {point.chip}: {error}")
            print(f"  left out {left_out[-1]}")
    inputs = {**fixed_inputs(), "points": per_point}
    results = calibrate(inputs)

    print("\nevery fit starts from a stated neutral point: "
          + ", ".join(f"{name} = {value:g}" for name, value in inputs["neutral"].items()))
    print("fitted parameters (all points): " + ", ".join(f"{k} = {v:.4g}" for k, v in results["fitted"].items()))
    print("fixed parameters:\n  " + "\n  ".join(line for line in costs.parameter_lines()
                                                if line.split(" = ")[0] not in costs.FITTED))
    fixed = {k: inputs[k] for k in ("chips", "cpu_flops")}
    print(f"\n{'point':32}{'chip':>6}{'measured':>10}{'fit-all':>9}{'LOO':>9}{'LOO/meas':>9}{'in use':>9}  source")
    for point, row, one in zip(usable, results["points"], per_point):
        unit = "x" if point.kind == "speedup_without_ane" else "ms"
        current = Predictor(one, fixed)(costs.PARAMETERS)
        print(f"{point.name:32}{point.chip:>6}{point.measured:>8.2f}{unit:2}{row['fit_all']:>9.2f}"
              f"{row['leave_one_out']:>9.2f}{row['leave_one_out'] / point.measured:>9.2f}{current:>9.2f}  "
              f"{point.source}" + (f" [{point.note}]" if point.note else ""))
    sources = {p.source for p in usable}
    print(f"\nleave-one-out: median error factor {results['median_error']:.2f}x (bar {BARS['median_error']}x), "
          f"worst {results['worst_error']:.2f}x (bar {BARS['worst_error']}x), {len(usable)} points from "
          f"{len(sources)} sources")
    predictors = {(p.name, p.chip): Predictor(one, fixed) for p, one in zip(usable, per_point)}
    default, apple = ("DistilBERT-base DEFAULT", "A15"), ("DistilBERT-base Apple form", "A15")
    if default in predictors and apple in predictors:
        print("DistilBERT's DEFAULT point is built as Apple built it in 2022 (fixtures/distilbert_2022.py), a "
              "calibration point; today's DEFAULT is compared in docs/analyze.md")
        fitted = costs.PARAMETERS.replace(**results["fitted"])
        for label, parameters in (("fit on all points", fitted), ("parameters in cost.py", costs.PARAMETERS)):
            default_ms, apple_ms = predictors[default](parameters), predictors[apple](parameters)
            print(f"DistilBERT A15, {label}: 2022 DEFAULT {default_ms:.2f} ms, Apple form {apple_ms:.2f} ms, "
                  f"predicted speed-up {default_ms / apple_ms:.2f}x (Apple measured {9.89 / 3.47:.2f}x)")
    _check_extrapolation(cache)
    print("\nleft out of the set:")
    for what, why in EXCLUDED:
        print(f"  {what}: {why}")
    if args.only:
        print(f"\n--only: {LOG.relative_to(ROOT)} not written")
    else:
        LOG.parent.mkdir(parents=True, exist_ok=True)
        LOG.write_text(_compact_json({"inputs": inputs, "left_out": left_out, "results": results}))
        print(f"\nwrote {LOG.relative_to(ROOT)}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    if not results["passed"]:
        print("FAILED: a leave-one-out bar is missed")
        return 1
    return 0


def _check_extrapolation(cache: dict) -> None:
    """DistilBERT is converted whole and as one and two layers: the two estimates must agree."""
    fixed = fixed_inputs()
    for conversion in ("apple", "coremltools_2022"):
        program = _distilbert(conversion)
        keys = [program.key(n) for n in (1, 2, program.layers)]
        if not all(k in cache and "A15" in cache[k].get("chips", {}) for k in keys):
            continue
        chip = costs.CHIPS["A15"]
        one, two, whole = (Compiled({"partitions": cache[k]["chips"]["A15"]["CPU_AND_NE"]["partitions"],
                                     "ops": _work_rows(cache[k]["chips"]["A15"]["CPU_AND_NE"])}, chip,
                                    fixed["cpu_flops"]).seconds(costs.PARAMETERS) for k in keys)
        extrapolated = two + (program.layers - 2) * (two - one)
        print(f"layer extrapolation check, DistilBERT {conversion}: whole {whole * 1e3:.3f} ms, from 1 and 2 layers "
              f"{extrapolated * 1e3:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
