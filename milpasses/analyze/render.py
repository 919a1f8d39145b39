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


def speedup_sensitivity(before: Analysis, after: Analysis) -> dict:
    """The speed-up of ``after`` over ``before`` on their chip, and again with each assumed
    per-partition cost (``cost.SENSITIVITY``) at 0 and at twice its value."""
    varied = {label: before.latency_with(p) / after.latency_with(p)
              for label, p in costs.sensitivity_variants().items()}
    return {"chip": before.chip.name, "speedup": before.latency / after.latency, "variants": varied,
            "range": [min(varied.values()), max(varied.values())]}


def headline(before: Analysis, after: Analysis, labels=("DEFAULT", "ane_pipeline()")) -> str:
    """One line: the predicted speed-up on the analyses' chip with its sensitivity range."""
    found = speedup_sensitivity(before, after)
    assumed = " and ".join(f"{name} {getattr(costs.PARAMETERS, name) * 1e3:.2f} ms" for name in costs.SENSITIVITY)
    return (f"predicted speed-up of {labels[1]} over {labels[0]} on {found['chip']}: {found['speedup']:.2f}x "
            f"({found['range'][0]:.2f}x to {found['range'][1]:.2f}x with each of {assumed} at 0 or 2x; "
            f"{before.latency * 1e3:.2f} ms -> {after.latency * 1e3:.2f} ms)")


def compare_lines(before: Analysis, after: Analysis, labels=("DEFAULT", "ane_pipeline()")) -> list[str]:
    lines = [headline(before, after, labels), f"{'':28}{labels[0]:>18}{labels[1]:>18}"]
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
            f'<svg class="layers" xmlns="http://www.w3.org/2000/svg" width="{label_width + width + 80}" '
            f'height="{bar_height * len(segments)}" font-family="monospace">' + "".join(rows) + "</svg>")


#: Rows of switch labels above the execution strip.
SWITCH_LABEL_ROWS = 3
#: Room per character of a 10 px monospace label: DejaVu Sans Mono and Menlo advance 6.02 px.
_LABEL_CHAR_WIDTH = 6.5
_LABEL_GAP = 6.0


def switch_label_rows(marks: list[float], widths: list[float], rows: int = SWITCH_LABEL_ROWS) -> list[int | None]:
    """The row of each switch's label (0 nearest the strip), or None where none fits, for marks
    in increasing order. A label runs right from its mark, and the mark's line runs down to the
    strip through the rows below it, so a label must sit below every earlier label that spans
    its mark: a crowded run of switches becomes a descending staircase, then goes unlabelled."""
    placed: list[tuple[float, int]] = []  # (right end with its gap, row) of each label so far
    chosen: list[int | None] = []
    for mark, width in zip(marks, widths):
        ceiling = min((row for end, row in placed if end > mark), default=rows)
        if ceiling == 0:
            chosen.append(None)
            continue
        chosen.append(ceiling - 1)
        placed.append((mark + width + _LABEL_GAP, ceiling - 1))
    return chosen


def _strip_svg(analysis: Analysis) -> str:
    """The program in execution order as one strip: a segment per op as wide as its estimated
    time (at least a hairline), coloured by device, with each switch between devices marked.
    A switch is labelled with its devices where the label fits (see ``switch_label_rows``);
    every mark names them in its tooltip."""
    width, height, row_height = 900, 22, 13
    strip_top = SWITCH_LABEL_ROWS * row_height + 4
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
        parts.append(f'<rect class="strip" x="{x:.2f}" y="{strip_top}" width="{length:.2f}" height="{height}" '
                     f'fill="{DEVICE_COLOURS[r.device]}"><title>{tip}</title></rect>')
        x += length
    switches = analysis.switches()
    labels = [f"{before}→{after}" for _, before, after in switches]
    marks = [starts[index] for index, _, _ in switches]
    rows = switch_label_rows(marks, [len(label) * _LABEL_CHAR_WIDTH for label in labels])
    for mark, label, row in zip(marks, labels, rows):
        tip = html.escape(f"switch {label}: {switch_cost * 1e3:.2f} ms, a dispatch and a hand-over")
        if row is None:  # a tick under the strip, leaving its colours visible where switches crowd
            mark_line = (f'<line x1="{mark:.2f}" y1="{strip_top + height}" x2="{mark:.2f}" '
                         f'y2="{strip_top + height + 6}" stroke="black" stroke-width="1"/>')
        else:
            label_top = strip_top - 4 - (row + 1) * row_height
            mark_line = (f'<line x1="{mark:.2f}" y1="{label_top}" x2="{mark:.2f}" y2="{strip_top + height + 6}" '
                         f'stroke="black" stroke-width="2"/><text class="switch-label" x="{mark + 2:.2f}" '
                         f'y="{label_top + 10}" font-size="10">{html.escape(label)}</text>')
        parts.append(f'<g class="switch"><title>{tip}</title>{mark_line}</g>')
    unlabelled = rows.count(None)
    longest_label = max((len(label) for label in labels), default=0) * _LABEL_CHAR_WIDTH
    return (f'<h3>Execution order: {len(analysis.partitions)} device partitions, '
            f'{len(switches)} switches, each estimated at {switch_cost * 1e3:.2f} ms</h3>'
            + (f'<p>{unlabelled} of the {len(switches)} switches are too close together to label; they are the '
               'short ticks under the strip (hover one for its devices).</p>' if unlabelled else "")
            + f'<svg class="execution" xmlns="http://www.w3.org/2000/svg" width="{width + longest_label + 10:.0f}" '
            f'height="{strip_top + height + 8}" font-family="monospace">' + "".join(parts) + "</svg>")


def _ops_svg(analysis: Analysis) -> str:
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
    return (f'<h3>Per op (longest {longest * 1e6:.1f} us)</h3>'
            f'<svg class="ops" xmlns="http://www.w3.org/2000/svg" width="{label_width + width + 70}" '
            f'height="{bar_height * len(analysis.ops)}" font-family="monospace">' + "".join(rows) + "</svg>")


def _section(title: str, analysis: Analysis) -> str:
    summary = "".join(f"<li>{html.escape(line)}</li>" for line in summary_lines(analysis))
    return (f'<section><h2>{html.escape(title)}</h2><p>Bar length: estimated time on {analysis.chip.name}; '
            f'estimated latency {analysis.latency * 1e3:.2f} ms.</p><ul>{summary}</ul>'
            + _strip_svg(analysis) + _layer_svg(analysis) + _ops_svg(analysis) + "</section>")


def _summary(analyses: dict[str, Analysis], compare: bool) -> str:
    """The page's opening: a sentence, then a table of latency per chip and device partitions per
    analysis, with the speed-up of the second over the first when they are a comparison."""
    labels, columns = list(analyses), list(analyses.values())
    chosen = columns[0].chip.name
    by_chip = speedups(*columns) if compare else {}
    if compare:
        before, after = labels
        least, most = min(by_chip, key=by_chip.get), max(by_chip, key=by_chip.get)
        found = speedup_sensitivity(*columns)
        sentence = (f"{after} is predicted {found['speedup']:.2f}x as fast as {before} on {chosen} "
                    f"({found['range'][0]:.2f}x to {found['range'][1]:.2f}x with the assumed dispatch or switch "
                    f"cost at 0 or 2x), {by_chip[least]:.2f}x ({least}) to {by_chip[most]:.2f}x ({most}) "
                    f"across chips; device partitions {len(columns[0].partitions)} → {len(columns[1].partitions)}.")
    else:
        sentence = " ".join(
            f"{label}: {a.latency * 1e3:.2f} ms predicted on {chosen}, {len(a.partitions)} device partitions."
            for label, a in analyses.items())
    header = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    if compare:
        header += f"<th>speed-up of {html.escape(labels[1])}</th>"
    rows = [("device partitions", [str(len(a.partitions)) for a in columns], ""),
            ("switches", [str(len(a.switches())) for a in columns], ""),
            ("ANE share of ops", [f"{a.ane_op_share:.1%}" for a in columns], "")]
    rows += [(f"latency {chip}", [f"{a.latency_by_chip[chip] * 1e3:.2f} ms" for a in columns],
              f"{by_chip[chip]:.2f}x" if compare else "") for chip in columns[0].latency_by_chip]
    body = "".join(
        f"<tr{' class=chosen' if name == f'latency {chosen}' else ''}><th>{html.escape(name)}</th>"
        + "".join(f"<td>{value}</td>" for value in values) + (f"<td>{speedup}</td>" if compare else "") + "</tr>"
        for name, values, speedup in rows)
    return (f'<section id="summary"><h2>Summary</h2><p>{html.escape(sentence)}</p>'
            f'<table class="summary"><tr><th></th>{header}</tr>{body}</table></section>')


_STYLE = ("table.summary{border-collapse:collapse}table.summary th,table.summary td{padding:2px 12px;"
          "border-bottom:1px solid #ddd;text-align:right}table.summary tr>th:first-child{text-align:left}"
          "table.summary tr.chosen{font-weight:bold}")


def html_page(analyses: dict[str, Analysis], compare: bool = False) -> str:
    """A self-contained page: a summary (with ``compare``, the speed-up of the second analysis
    over the first), then per analysis the execution strip and a bar per layer half and per op,
    each as long as its estimated time and coloured by device."""
    legend = " ".join(f'<span style="color:{c}">&#9632; {d}</span>' for d, c in DEVICE_COLOURS.items())
    assumptions = "".join(f"<li>{html.escape(a)}</li>" for a in costs.ASSUMPTIONS)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>milpasses analyze</title>"
            f"<style>{_STYLE}</style></head>"
            "<body style='font-family:sans-serif'><h1>milpasses analyze: predicted device and estimated time "
            f"per op</h1>{_summary(analyses, compare)}<p>{legend}. Hover a bar for the reason. Predictions are "
            "heuristics, not measurements.</p>" + "".join(_section(t, a) for t, a in analyses.items())
            + f"<h2>Assumptions</h2><ul>{assumptions}</ul></body></html>")
