"""The report of a conversion: what was converted and how, what each pass did, and how close the
converted program comes to the model it came from (PyTorch, or ONNX Runtime for an ONNX model); printed as a table, written as JSON and Markdown."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from milpasses.convert.options import DEFAULT_MIN_PSNR_DB


@dataclass
class ConversionReport:
    model: str
    task: str
    inputs: dict[str, list[list[int]]]  # input name -> its shapes (several with --seq-lens)
    outputs: list[str]
    options: dict
    samples: str = ""
    ops_before: dict[str, int] = field(default_factory=dict)  # DEFAULT pipeline, fp32 program
    ops_after: dict[str, int] = field(default_factory=dict)  # ane_pipeline
    passes: list[dict] = field(default_factory=list)
    psnr: list[dict] = field(default_factory=list)  # {"output", "seq_len", "psnr_db"}
    device_check: str = ""
    verification_error: str = ""  # why the program could not be simulated, if it could not
    fp16_findings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    package_bytes: int | None = None
    min_psnr_db: float = DEFAULT_MIN_PSNR_DB
    reference: str = "PyTorch fp32"  # what the simulated program is compared with
    generation: dict = field(default_factory=dict)  # a KV-cache decoder: its functions and greedy checks
    compression: dict | None = None  # scheme, bits per weight, weight bytes before and after
    cosine: list[dict] = field(default_factory=list)  # {"output", "seq_len", "worst_cosine"}: embeddings
    # One function per sequence length (an ONNX model at several lengths): function name ->
    # {"seq_len", "ops" (its histogram), "sites_rewritten" (per pass)}
    functions: dict[str, dict] = field(default_factory=dict)

    @property
    def worst_psnr_db(self) -> float:
        return min((entry["psnr_db"] for entry in self.psnr), default=-math.inf)

    @property
    def passed(self) -> bool:
        return not self.verification_error and self.worst_psnr_db >= self.min_psnr_db

    def failure(self) -> str:
        """Why verification failed, in one line ("" when it passed)."""
        if self.verification_error and self.generation:
            return f"greedy generation: {self.verification_error}"
        if self.verification_error:
            return f"the converted program could not be simulated: {self.verification_error}"
        if not self.passed:
            worst = min(self.psnr, key=lambda entry: entry["psnr_db"])
            length = "" if worst["seq_len"] is None else f" at sequence length {worst['seq_len']}"
            return (f"PSNR of {worst['output']}{length} is {worst['psnr_db']:.1f} dB, below "
                    f"{self.min_psnr_db:g} dB")
        return ""

    def as_dict(self) -> dict:
        from milpasses import __version__

        return {
            "milpasses_version": __version__, "model": self.model, "task": self.task,
            "inputs": self.inputs, "outputs": self.outputs, "options": self.options,
            "samples": self.samples, "ops_before": self.ops_before, "ops_after": self.ops_after,
            "passes": self.passes,
            "psnr": [{**e, "psnr_db": _json_number(e["psnr_db"])} for e in self.psnr],
            "reference": self.reference, "min_psnr_db": self.min_psnr_db, "verified": self.passed,
            "verification_error": self.verification_error,
            "device_check": self.device_check, "fp16_findings": self.fp16_findings,
            "seconds": self.seconds, "package_bytes": self.package_bytes,
            **({"generation": self.generation} if self.generation else {}),
            "compression": self.compression, "cosine": self.cosine,
            **({"functions": self.functions} if self.functions else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        """The plain-text summary the CLI prints: what was converted and what the passes did, then
        time and size, then, last, how close the converted program comes to PyTorch."""
        lines = [f"model    {self.model}", f"task     {self.task}",
                 "inputs   " + ", ".join(f"{n} {' | '.join(_shape(s) for s in shapes)}"
                                        for n, shapes in self.inputs.items()),
                 f"options  {_options_text(self.options)}", ""]
        lines.append("ops (non-const)  DEFAULT (fp32) -> ane_pipeline: "
                     f"{sum(self.ops_before.values())} -> {sum(self.ops_after.values())}; "
                     + ", ".join(f"{op} {self.ops_before.get(op, 0)}->{self.ops_after.get(op, 0)}"
                                 for op in _changed_ops(self.ops_before, self.ops_after)))
        for report in self.passes:
            skipped = "; ".join(f"{reason} x{n}" for reason, n in report["skipped"].items())
            function = f"{report['function']}: " if "function" in report else ""
            lines.append(f"{function}{report['pass']}: {sum(report['rewritten'].values())} sites rewritten, "
                         f"{sum(report['skipped'].values())} left alone"
                         + (f" ({skipped})" if skipped else "")
                         + (f"; checked, relative error {report['check']['max_rel_error']:.1e}"
                            if "check" in report else ""))
        lines += _function_lines(self.functions)
        lines += ["", "seconds  " + ", ".join(f"{stage} {s:.1f}" for stage, s in self.seconds.items())]
        if self.package_bytes is not None:
            lines.append(f"package  {self.package_bytes / 2**20:.1f} MiB")
        if self.compression:
            lines.append(f"weights  {self.compression_summary()}")
        lines.append(f"device   {self.device_check}")
        if self.fp16_findings:
            lines.append(f"fp16 check: {len(self.fp16_findings)} finding(s)")
            lines += [f"  {finding}" for finding in self.fp16_findings]
        lines += ["", f"samples  {self.samples}",
                  f"{'output':<20} {'seq_len':>7} {'PSNR dB':>8}  vs {self.reference} (simulated)"]
        for entry in self.psnr:
            verdict = "ok" if entry["psnr_db"] >= self.min_psnr_db else f"BELOW {self.min_psnr_db:g}"
            seq_len = "-" if entry["seq_len"] is None else entry["seq_len"]
            lines.append(f"{entry['output']:<20} {seq_len:>7} {entry['psnr_db']:>8.1f}  {verdict}")
        lines += _generation_lines(self.generation)
        for entry in self.cosine:
            seq_len = "-" if entry["seq_len"] is None else entry["seq_len"]
            lines.append(f"{entry['output']:<20} {seq_len:>7} cosine {entry['worst_cosine']:.5f} (worst sentence)")
        if self.verification_error:
            lines.append(f"verification failed: {self.verification_error}")
        return "\n".join(lines)

    def compression_summary(self) -> str:
        """The compression in one line: scheme, weight bytes before and after, how many weights at each width."""
        c = self.compression
        widths = Counter(c["bits"].values())
        return (f"{c['scheme']}: {c['weight_bytes_before'] / 2**20:.1f} -> {c['weight_bytes_after'] / 2**20:.1f} MiB "
                f"({c['weight_bytes_after'] / max(c['weight_bytes_before'], 1):.2f}); "
                + ", ".join(f"{n} weights at {b} bits" for b, n in sorted(widths.items(), reverse=True)))

    def to_markdown(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"# {self.model} ({self.task})", "",
                 f"Converted by milpasses with `ane_pipeline()`; verification {verdict} "
                 f"(threshold {self.min_psnr_db:g} dB).", "",
                 "## Shapes and options", "", "| input | shapes |", "|---|---|"]
        lines += [f"| {n} | {', '.join(_shape(s) for s in shapes)} |" for n, shapes in self.inputs.items()]
        lines += ["", "| option | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.options.items()]
        lines += ["", f"## PSNR against {self.reference} (simulated program)", "", f"Samples: {self.samples}", "",
                  "| output | seq_len | PSNR dB |", "|---|---|---|"]
        lines += [f"| {e['output']} | {e['seq_len'] if e['seq_len'] is not None else '-'} | {e['psnr_db']:.1f} |"
                  for e in self.psnr]
        if self.generation:
            lines += ["", "## Greedy generation against Hugging Face generate", "", "```text"]
            lines += _generation_lines(self.generation) + ["```"]
        if self.verification_error:
            lines += ["", f"Verification failed: {self.verification_error}"]
        lines += ["", f"Device check: {self.device_check}", ""]
        if self.fp16_findings:
            lines += ["fp16 check findings:", ""] + [f"- {f}" for f in self.fp16_findings] + [""]
        lines += ["## Op histogram (non-const ops)", "",
                  "DEFAULT: coremltools' default pipeline on the same traced model, counted on its fp32 "
                  "program (the fp16 casting passes add at most a cast of a float input).", "",
                  "| op | DEFAULT | ane_pipeline |", "|---|---|---|"]
        for op in sorted(set(self.ops_before) | set(self.ops_after)):
            lines.append(f"| {op} | {self.ops_before.get(op, 0)} | {self.ops_after.get(op, 0)} |")
        if self.functions:
            lines += ["", "## Functions, one per sequence length", "", "```text"]
            lines += _function_lines(self.functions) + ["```"]
        per_function = any("function" in report for report in self.passes)
        lines += ["", "## Passes", "", "| function | pass | rewritten | left alone (why) |" if per_function
                  else "| pass | rewritten | left alone (why) |", "|---|---|---|---|" if per_function else "|---|---|---|"]
        for report in self.passes:
            rewritten = ", ".join(f"{k} x{n}" for k, n in report["rewritten"].items()) or "-"
            skipped = ", ".join(f"{k} x{n}" for k, n in report["skipped"].items()) or "-"
            function = f"| {report['function']} " if per_function else ""
            lines.append(f"{function}| {report['pass']} | {rewritten} | {skipped} |")
        lines += ["", "## Time and size", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {stage} | {s:.2f} |" for stage, s in self.seconds.items()]
        if self.package_bytes is not None:
            lines += ["", f"Package size: {self.package_bytes / 2**20:.1f} MiB"]
        if self.compression:
            lines += ["", "## Compression", "", self.compression_summary()
                      + (f"; calibrated on {self.compression['calibration']}" if self.compression["calibration"] else ""),
                      "", "| weight | bits |", "|---|---|"]
            lines += [f"| {name} | {bits} |" for name, bits in self.compression["bits"].items()]
        if self.cosine:
            lines += ["", "Worst sentence-embedding cosine to PyTorch fp32: "
                      + ", ".join(f"{e['worst_cosine']:.5f}" for e in self.cosine)]
        return "\n".join(lines) + "\n"


def _json_number(value: float):
    return value if math.isfinite(value) else str(value)


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _options_text(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items() if v is not None)


def _changed_ops(before: dict, after: dict) -> list[str]:
    return [op for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]


def _generation_lines(generation: dict) -> list[str]:
    """Per prompt: tokens matched, first divergence, worst step, and the DEFAULT pipeline's
    package's worst step on the same tokens; per function: its op count."""
    if not generation:
        return []
    lines = ["", f"{'prompt':<40} {'matched':>9} {'diverges':>10} {'worst dB':>8} {'DEFAULT':>8}  "
                 f"(greedy vs HF generate; DEFAULT: the DEFAULT pipeline's package, same tokens)"]
    for check in generation["prompts"]:
        diverges = "-" if check["first_divergence"] is None else check["first_divergence"]
        diverges = f"{diverges} (tie)" if check.get("near_tie") else diverges
        worst, twin = (_decibels(check.get(key)) for key in ("worst_psnr_db", "default_worst_psnr_db"))
        lines.append(f"{check['prompt'][:40]:<40} {check['matched']:>4}/{check['tokens']:<4} {diverges:>10} "
                     f"{worst:>8} {twin:>8}")
    for name, ops in generation["functions"].items():
        lines.append(f"function {name}: {sum(ops.values())} ops ({', '.join(f'{k} {v}' for k, v in sorted(ops.items()))})")
    parts = generation.get("logits", ["logits"])
    if len(parts) > 1:
        lines.append(f"logits in {len(parts)} parts ({', '.join(parts)}): the vocabulary is wider than the ANE's "
                     f"16384, so the LM head is split; join them on the last axis, in order")
    return lines


def _decibels(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _function_lines(functions: dict) -> list[str]:
    """Per function of a package converted at several lengths: its length, op count and the sites
    the passes rewrote, then how to call one."""
    if not functions:
        return []
    lines = []
    for name, function in functions.items():
        lines.append(f"function {name}: seq_len {function['seq_len']}, {sum(function['ops'].values())} ops, "
                     f"{sum(function['sites_rewritten'].values())} sites rewritten")
    default, *_, last = list(functions)
    lines.append(f"each length is a function of the package ({default} the default): "
                 f"MLModel(path, function_name=\"{last}\"), milpasses analyze PACKAGE --function {last}")
    return lines
