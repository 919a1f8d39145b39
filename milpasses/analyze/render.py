"""Present an analysis: a terminal table, a JSON-ready dict, and a self-contained HTML page."""

from __future__ import annotations

import html

from milpasses.analyze import cost as costs
from milpasses.analyze.report import Analysis

DEVICE_COLOURS = {"ANE": "#2e7d32", "GPU": "#f9a825", "CPU": "#c62828"}


def _shape_text(shapes) -> str:
    return ",".join("x".join(str(d) for d in shape) or "scalar" for shape in shapes)


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _share(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{fraction:.1%}"


def summary_lines(analysis: Analysis) -> list[str]:
    kinds = analysis.bytes_by_kind()
    off = analysis.off_ane_outside_input_stage
    chip = analysis.chip
    lines = [
        f"deployment target {analysis.opset}; {len(analysis.ops)} ops (consts excluded)",
        f"predicted on the ANE: {analysis.ane_op_share:.1%} of ops, {_share(analysis.ane_flop_share)} of FLOPs",
        f"off the ANE outside the input stage (embedding lookups, input masks): {len(off)}"
        + (" (" + ", ".join(f"{r.op_type} '{r.name}'" for r in off[:5]) + (", ..." if len(off) > 5 else "") + ")"
           if off else ""),
        f"device partitions: {len(analysis.partitions)} ("
        + " -> ".join(f"{device}x{len(names)}" for device, names in analysis.partitions) + ")",
        f"estimated latency on {chip.name}: {analysis.latency * 1e3:.2f} ms = ops {analysis.ops_seconds * 1e3:.2f}"
        f" + dispatch {analysis.dispatch_seconds * 1e3:.2f} + switches {analysis.switch_seconds * 1e3:.2f};"
        f" bytes: weights {_si(kinds['weight_bytes'], 'B')}, activations {_si(kinds['activation_bytes'], 'B')},"
        f" relayouts {_si(kinds['relayout_bytes'], 'B')}",
        "estimated latency per chip: " + ", ".join(
            f"{name} {seconds * 1e3:.2f} ms" for name, seconds in analysis.latency_by_chip.items()),
    ]
    return lines


def assumption_lines() -> list[str]:
    return ["assumptions (an estimate, not a measurement; every rule is a heuristic):"] + [
        f"  - {text}" for text in costs.ASSUMPTIONS]


def table(analysis: Analysis, device_plan: dict | None = None) -> str:
    """One line per op, then the summary and the assumptions. ``device_plan`` maps op names to
    (device, cost) that Core ML's MLComputePlan reported, shown beside each prediction."""
    header = ["op", "type", "shapes in -> out", "predicted", "FLOPs", "bytes", "time", "reason"]
    if device_plan is not None:
        header[4:4] = ["MLComputePlan", "plan cost"]
    rows = []
    for r in analysis.ops:
        row = [r.name, r.op_type, f"{_shape_text(r.input_shapes)} -> {_shape_text(r.output_shapes)}",
               r.device + ("" if not r.input_stage else "*"), _si(r.cost.flops, ""), _si(r.cost.bytes, "B"),
               f"{r.seconds * 1e6:.1f}us", f"{r.predictions[0].reason} [{r.predictions[0].confidence}]"]
        if device_plan is not None:
            real_device, real_cost = device_plan.get(r.output_name, (None, None))
            row[4:4] = [real_device or "-", "-" if real_cost is None else f"{real_cost:.4f}"]
        rows.append(row)
    widths = [min(max(len(str(x[i])) for x in [header] + rows), 48) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c)[:w].ljust(w) for c, w in zip(row[:-1], widths)) + "  " + str(row[-1])
             for row in [header] + rows]
    lines.append("(* = input stage: embedding lookups and preparation of integer inputs)")
    return "\n".join(lines + summary_lines(analysis) + assumption_lines())


def _prediction_dict(p) -> dict:
    return {"device": p.device, "reason": p.reason, "confidence": p.confidence, "source": p.source,
            "scope": p.scope, "rule": p.rule}


def to_dict(analysis: Analysis) -> dict:
    kinds = analysis.bytes_by_kind()
    return {
        "chip": analysis.chip.name,
        "deployment_target": analysis.opset,
        "ops": [{
            "name": r.name, "type": r.op_type, "input_shapes": [list(map(str, s)) for s in r.input_shapes],
            "output_shapes": [list(map(str, s)) for s in r.output_shapes], "device": r.device,
            "input_stage": r.input_stage, "predictions": [_prediction_dict(p) for p in r.predictions],
            "flops": r.cost.flops, "bytes": r.cost.bytes, "weight_bytes": r.cost.weight_bytes,
            "activation_bytes": r.cost.activation_bytes, "relayout_bytes": r.cost.relayout_bytes,
            "estimated_seconds": r.seconds,
        } for r in analysis.ops],
        "summary": {
            "ops": len(analysis.ops),
            "ane_op_share": analysis.ane_op_share,
            "ane_flop_share": analysis.ane_flop_share,
            "off_ane_outside_input_stage": [r.name for r in analysis.off_ane_outside_input_stage],
            "partitions": [{"device": d, "ops": len(names)} for d, names in analysis.partitions],
            "estimated_seconds": analysis.latency,
            "ops_seconds": analysis.ops_seconds,
            "dispatch_seconds": analysis.dispatch_seconds,
            "switch_seconds": analysis.switch_seconds,
            **kinds,
            "estimated_seconds_by_chip": analysis.latency_by_chip,
        },
        "assumptions": list(costs.ASSUMPTIONS),
    }


def compare_lines(before: Analysis, after: Analysis, labels=("DEFAULT", "ane_pipeline()")) -> list[str]:
    lines = [f"{'':28}{labels[0]:>18}{labels[1]:>18}"]
    rows = [
        ("ops", len(before.ops), len(after.ops), "{}"),
        ("ANE share of ops", before.ane_op_share, after.ane_op_share, "{:.1%}"),
        ("ANE share of FLOPs", _share(before.ane_flop_share), _share(after.ane_flop_share), "{}"),
        ("device partitions", len(before.partitions), len(after.partitions), "{}"),
    ] + [(f"latency {chip} (ms)", before.latency_by_chip[chip] * 1e3, after.latency_by_chip[chip] * 1e3, "{:.2f}")
         for chip in before.latency_by_chip]
    for label, x, y, fmt in rows:
        lines.append(f"{label:28}{fmt.format(x):>18}{fmt.format(y):>18}")
    lines.append("predicted speed-up of " + labels[1] + ": " + ", ".join(
        f"{chip} {speedup:.2f}x" for chip, speedup in speedups(before, after).items()))
    return lines


def speedups(before: Analysis, after: Analysis) -> dict[str, float]:
    return {chip: before.latency_by_chip[chip] / after.latency_by_chip[chip] for chip in before.latency_by_chip}


#: Ops that end a normalisation (a fused layer_norm, or the rsqrt of an RMSNorm chain): a
#: transformer layer is two such segments, attention then feed-forward.
_NORM_ENDS = ("layer_norm", "rsqrt")
_FEED_FORWARD = ("gelu", "silu", "relu")


def layer_segments(analysis: Analysis) -> list[tuple[str, list]]:
    """The ops cut after each normalisation, each piece named by what it holds: attention (it
    has a softmax), feed-forward (an activation), or other (embeddings, heads, outputs)."""
    pieces, current = [], []
    for record in analysis.ops:
        current.append(record)
        if record.op_type in _NORM_ENDS:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    named = []
    for piece in pieces:
        types_in = {r.op_type for r in piece}
        kind = "attention" if "softmax" in types_in else "feed-forward" if types_in & set(_FEED_FORWARD) else "other"
        named.append((kind, piece))
    return named


def _layer_svg(analysis: Analysis) -> str:
    """One bar per segment, its length the segment's estimated time, split by device."""
    segments = layer_segments(analysis)
    bar_height, width, label_width = 18, 520, 230
    totals = [sum(r.seconds for r in piece) for _, piece in segments]
    longest = max(totals, default=0) or 1
    rows = []
    for i, ((kind, piece), total) in enumerate(zip(segments, totals)):
        y, x = i * bar_height, float(label_width)
        by_device = {d: sum(r.seconds for r in piece if r.device == d) for d in DEVICE_COLOURS}
        shares = ", ".join(f"{d} {t * 1e6:.1f} us" for d, t in by_device.items() if t)
        rows.append(f'<g><title>{html.escape(f"{kind}, {len(piece)} ops: {shares}")}</title>'
                    f'<text x="0" y="{y + 13}" font-size="11">{i + 1:>3} {kind} ({len(piece)} ops)</text>')
        for device, seconds in by_device.items():
            if seconds:
                length = max(1.0, width * seconds / longest)
                rows.append(f'<rect class="layer" x="{x:.1f}" y="{y + 3}" width="{length:.1f}" height="{bar_height - 6}" '
                            f'fill="{DEVICE_COLOURS[device]}"/>')
                x += length
        rows.append(f'<text x="{x + 4:.1f}" y="{y + 13}" font-size="10">{total * 1e6:.1f} us</text></g>')
    return ('<h3>Per layer: attention and feed-forward halves, cut at each norm</h3>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + width + 80}" '
            f'height="{bar_height * len(segments)}" font-family="monospace">' + "".join(rows) + "</svg>"
            '<h3>Per op</h3>')


def _strip_svg(analysis: Analysis) -> str:
    """The program in execution order as one strip: a segment per op as wide as its estimated
    time (at least a hairline), coloured by device, with each switch between devices marked
    and labelled with its estimated cost."""
    width, height, label_height = 900, 22, 14
    order = analysis.execution_order()
    total = sum(r.seconds for r in order) or 1.0
    hairline = 0.6
    scale = (width - hairline * len(order)) / total
    switch_cost = sum(costs.partition_seconds(2)) - costs.partition_seconds(1)[0]  # a dispatch and a hand-over
    starts, x, parts = [], 0.0, []
    for r in order:
        starts.append(x)
        length = hairline + r.seconds * scale
        tip = html.escape(f"{r.op_type} {r.name} on {r.device}: {r.seconds * 1e6:.1f} us")
        parts.append(f'<rect class="strip" x="{x:.2f}" y="{label_height}" width="{length:.2f}" height="{height}" '
                     f'fill="{DEVICE_COLOURS[r.device]}"><title>{tip}</title></rect>')
        x += length
    for index, before, after in analysis.switches():
        at = starts[index]
        label = f"{before}→{after} {switch_cost * 1e3:.2f} ms"
        parts.append(f'<g class="switch"><title>{html.escape(f"switch {label}: a dispatch and a hand-over")}</title>'
                     f'<line x1="{at:.2f}" y1="0" x2="{at:.2f}" y2="{label_height + height + 4}" stroke="black" '
                     f'stroke-width="2"/><text x="{at + 2:.2f}" y="10" font-size="10">{html.escape(label)}</text></g>')
    partitions = " → ".join(f"{device} {len(names)}" for device, names in analysis.partitions)
    return (f'<h3>Execution order: {len(analysis.partitions)} device partitions ({html.escape(partitions)}), '
            f'{len(analysis.switches())} switches</h3>'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 120}" height="{label_height + height + 6}" '
            'font-family="monospace">' + "".join(parts) + "</svg>")


def _svg(analysis: Analysis, title: str) -> str:
    bar_height, width, label_width = 14, 520, 320
    longest = max((r.seconds for r in analysis.ops), default=0) or 1
    rows = []
    for i, r in enumerate(analysis.ops):
        y = i * bar_height
        length = max(1.0, width * r.seconds / longest)
        tip = html.escape(f"{r.name} ({r.op_type}) on {r.device}: {r.seconds * 1e6:.1f} us; "
                          f"{r.predictions[0].reason} [{r.predictions[0].confidence}]")
        rows.append(
            f'<g><title>{tip}</title>'
            f'<text x="0" y="{y + 11}" font-size="11">{html.escape((r.op_type + " " + r.name)[:46])}</text>'
            f'<rect class="op" x="{label_width}" y="{y + 2}" width="{length:.1f}" height="{bar_height - 4}" '
            f'fill="{DEVICE_COLOURS[r.device]}"/>'
            f'<text x="{label_width + length + 4:.1f}" y="{y + 11}" font-size="10">{r.seconds * 1e6:.1f} us</text></g>')
    height = bar_height * len(analysis.ops)
    return (f'<h2>{html.escape(title)}</h2><p>Bar length: estimated time on {analysis.chip.name} '
            f'(longest op {longest * 1e6:.1f} us); estimated latency {analysis.latency * 1e3:.2f} ms.</p>'
            + _strip_svg(analysis) + _layer_svg(analysis) + f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + width + 70}" height="{height}" '
            f'font-family="monospace">' + "".join(rows) + "</svg>")


def html_page(analyses: dict[str, Analysis]) -> str:
    """A self-contained page: per op, a bar as long as its estimated time, coloured by device."""
    legend = " ".join(f'<span style="color:{c}">&#9632; {d}</span>' for d, c in DEVICE_COLOURS.items())
    sections = []
    for title, analysis in analyses.items():
        summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(analysis))
        sections.append(f"<section>{_svg(analysis, title)}<ul>{summary}</ul></section>")
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in costs.ASSUMPTIONS)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>milpasses analyze</title></head>"
            "<body style='font-family:sans-serif'><h1>milpasses analyze: predicted device and estimated time "
            f"per op</h1><p>{legend}. Hover a bar for the reason. Predictions are heuristics, not "
            "measurements.</p>" + "".join(sections)
            + f"<h2>Assumptions</h2><ul>{assumptions}</ul></body></html>")
