"""Finding an attention region from its two ends. Nothing here mutates a program.

A region is everything between where Q, K and V are cut into heads and where the heads are
merged back::

    roots:     reshape (B, S, C) -> (B, S, c1, c2, ...)     one per projection, or one fused
    operands:  any ops with a transport rule (head_rules)   rotary, q/k norms, GQA repeats, slices
    core:      scores = matmul(q, k^T)                      (B, H, Sq, Sk)
    epilogue:  scales, masks and biases (add, select), soft-caps (tanh), in any order
               softmax over the keys
    values:    matmul(weights, v), layout ops, reshape to (B, Sq, C)

The matcher walks up from each ``softmax`` (and each iOS18 ``scaled_dot_product_attention``)
to the scores, down to the merged output, then up from q, k and v: an op on the way belongs to
the region when it has a transport rule and reads a region tensor, and the walk stops at head
splits. It then runs every rule in a dry run, so a site is returned only when each op of its
region can be carried; otherwise a NoMatch names the op that could not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from coremltools.converters.mil.mil import types

from milpasses.passes.attention import head_rules
from milpasses.passes.attention.head_form import BATCH, CHANNEL, SEQ, DryRun, HeadForm, Placeholder, root_form
from milpasses.passes.shared import compressed
from milpasses.passes.shared.bc1s import left_from
from milpasses.passes.shared.matching import (
    NoMatch,
    as_list,
    is_dead,
    constant_value,
    is_activation,
    is_block_output,
    is_static,
    rank,
    same_length,
    scalar_value,
    single_consumer,
)

EPILOGUE_BINARY = {"add", "sub", "mul", "real_div", "maximum", "minimum"}
EPILOGUE_UNARY = {"tanh", "sigmoid", "clip", "identity"}
#: Elementwise ops that may gate the attention output before its heads are merged.
OUTPUT_GATES = {"mul", "add", "sub", "real_div"}


@dataclass(frozen=True)
class EpilogueStep:
    """One op between the scores and the softmax, applied per head: ``chain`` names the input
    that carries the scores; ``others`` are the remaining inputs (terms, conditions, constants)."""

    kind: str  # the MIL op type
    chain: str
    others: dict


@dataclass(frozen=True)
class AttentionSite:
    roots: tuple  # the head-split reshapes of (B, S, C) sources
    region_ops: tuple  # operand-path ops, in block order
    query: object  # operand vars of the core
    key: object
    value: object
    key_transposed: bool  # the key operand is (..., d, Sk)
    steps: tuple  # EpilogueStep, scores to softmax
    scale: float  # scalar factors met before anything else on the scores
    heads_shape: tuple  # the query's head axes (one axis, or several for a rank-5 grouped form)
    head_dim: int
    kv_of_head: tuple  # for each query head, its K/V head
    output: object  # the (B, Sq, C) var the rewritten attention replaces
    output_order: np.ndarray  # per output channel, its position in the per-head concat (h * d + j)
    anchor: object
    matched_ops: tuple
    query_root: object = None  # the (B, S, C) source a scale can be folded into, if any
    sdpa: bool = False
    head_orders: tuple = ()  # ((size, order), ...): how Q and K lay out a last channel axis
    permuted_sources: tuple = ()  # (source, head size): Q/K projections whose rows follow head_orders
    gates: tuple = ()  # OutputGate, in order from the values matmul to the merged output

    @property
    def heads(self) -> int:
        return len(self.kv_of_head)

    @property
    def kv_heads(self) -> int:
        return len(set(self.kv_of_head))

    @property
    def grouped(self) -> bool:
        """K/V heads read in contiguous groups: query head h reads K/V head h // repeats."""
        repeats = self.heads // self.kv_heads
        return all(kv == h // repeats for h, kv in enumerate(self.kv_of_head))


# --- the scores side ---------------------------------------------------------------------------

def _leads_to_scores(var, depth: int = 0) -> bool:
    """Whether ``var`` is computed from a matmul of two activations through epilogue ops only."""
    op = var.op
    if op is None or depth > 16:
        return False
    if op.op_type == "matmul":
        return is_activation(op.inputs["x"]) and is_activation(op.inputs["y"])
    if op.op_type in EPILOGUE_BINARY:
        return any(_leads_to_scores(op.inputs[n], depth + 1) for n in ("x", "y"))
    if op.op_type in EPILOGUE_UNARY:
        return _leads_to_scores(op.inputs["x"], depth + 1)
    if op.op_type == "select":
        return any(_leads_to_scores(op.inputs[n], depth + 1) for n in ("a", "b"))
    return False


def _epilogue(softmax_op):
    """From the softmax input up to ``q @ k^T``: (matmul, scale, steps, ops) or NoMatch.

    Two ops are more than elementwise steps: a ``concat`` of extra key columns (attention
    sinks: one learnt logit per head that takes a share of the softmax and is then dropped),
    and a subtraction of the scores' own maximum over the keys right before the softmax, which
    is dropped: the softmax of x - max(x) is the softmax of x."""
    var, steps, ops = softmax_op.inputs["x"], [], []
    shifted_by = None
    while True:
        op = var.op
        if op is None:
            return NoMatch("softmax input is a program input")
        readers = {id(child) for child in var.child_ops if not is_dead(child)}
        if (len(readers) != 1 or is_block_output(var)) and readers != shifted_by:
            return NoMatch("attention scores have several consumers")
        ops.append(op)
        if op.op_type == "matmul":
            break
        if not steps and shifted_by is None and _is_max_shift(op):
            ops.append(op.inputs["y"].op)
            shifted_by = {id(op), id(op.inputs["y"].op)}
            var = op.inputs["x"]
            continue
        shifted_by = None
        if op.op_type == "concat":
            step = _extra_keys(op)
            if isinstance(step, NoMatch):
                return step
            steps.append(step)
            var = op.inputs["values"][0]
            continue
        names = {"select": ("a", "b")}.get(op.op_type, ("x", "y") if op.op_type in EPILOGUE_BINARY else ("x",))
        if op.op_type not in EPILOGUE_BINARY | EPILOGUE_UNARY | {"select"}:
            return NoMatch(f"'{op.op_type}' between the scores and the softmax has no rule")
        chain = [n for n in names if _leads_to_scores(op.inputs[n])]
        if len(chain) != 1:
            return NoMatch(f"cannot tell the scores from the other operand of '{op.op_type}'")
        others = {k: v for k, v in op.inputs.items() if k != chain[0]}
        if op.op_type in EPILOGUE_BINARY | {"select"}:
            if any(rank(other) > 4 for other in others.values()):
                return NoMatch("a mask or bias has more than 4 axes")
        steps.append(EpilogueStep(op.op_type, chain[0], others))
        var = op.inputs[chain[0]]
    steps.reverse()
    scale = 1.0
    while steps and _folds(steps[0]):
        step = steps.pop(0)
        factor = scalar_value(step.others[_other_name(step)])
        scale *= factor if step.kind == "mul" else 1.0 / factor
    return op, scale, tuple(steps), ops


def _is_max_shift(op) -> bool:
    """``sub(x, reduce_max(x, axes=[-1], keep_dims=True))``."""
    if op.op_type != "sub" or op.inputs["y"].op is None:
        return False
    peak = op.inputs["y"].op
    if peak.op_type != "reduce_max" or peak.inputs["x"] is not op.inputs["x"]:
        return False
    axes = constant_value(peak.inputs.get("axes"))
    keep = constant_value(peak.inputs.get("keep_dims"))
    return axes is not None and [int(a) % 4 for a in np.ravel(axes)] == [3] and bool(keep)


def _extra_keys(op):
    """Extra key columns appended to the scores (``concat(values=(scores, extra), axis=-1)``):
    an EpilogueStep, or NoMatch."""
    values = list(op.inputs["values"])
    if int(constant_value(op.inputs["axis"])) % 4 != 3 or constant_value(op.inputs.get("interleave")):
        return NoMatch("a 'concat' between the scores and the softmax is not of extra key columns")
    if len(values) != 2 or not _leads_to_scores(values[0]) or _leads_to_scores(values[1]):
        return NoMatch("a 'concat' between the scores and the softmax does not append columns to them")
    if rank(values[1]) != 4 or not all(is_static(n) for n in op.outputs[0].shape):
        return NoMatch("extra key columns of unknown or unusual shape")
    return EpilogueStep("concat", "values", {"extra": values[1]})


def extra_key_count(steps) -> int:
    return sum(int(step.others["extra"].shape[3]) for step in steps if step.kind == "concat")


def _other_name(step) -> str:
    return "y" if step.chain == "x" else "x"


def _folds(step) -> bool:
    """A scalar factor right on the scores, which moves into the query."""
    kind = step.kind
    if kind not in ("mul", "real_div") or (kind == "real_div" and step.chain != "x"):
        return False
    factor = scalar_value(step.others[_other_name(step)])
    return factor is not None and factor != 0.0


# --- the output side ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputGate:
    """An elementwise op on the attention output, before its heads are merged, whose other
    operand is computed from head splits like q, k and v are (Qwen3-Next's sigmoid gate)."""

    kind: str  # the MIL op type
    chain: str  # the input that carries the attention output
    other: object  # the other operand's var
    axes: tuple  # the roles of the output's axes there
    positions: np.ndarray  # per channel element of the output there: its place in the head concat


def _output_order(values_matmul_out, lead_roles, heads: int, head_dim: int):
    """Down from the per-head output (..., Sq, d) through layout ops and gates to (B, Sq, C):
    (output var, per-channel order, ops, gates) or NoMatch."""
    roles = tuple(lead_roles) + (SEQ, CHANNEL)
    lead_shape = [s for s, r in zip(values_matmul_out.shape, roles) if r == CHANNEL][:-1]
    positions = np.arange(heads * head_dim).reshape(tuple(lead_shape) + (head_dim,))
    form = HeadForm(roles, np.zeros_like(positions), positions, (), None, None)
    var, ops, gates = values_matmul_out, [], []
    while True:
        if rank(var) == 3 and form.axes == (BATCH, SEQ, CHANNEL):
            return var, form.chan.ravel(), ops, tuple(gates)
        op = single_consumer(var)
        if op is None:
            return NoMatch("the attention output has several consumers")
        if op.op_type in OUTPUT_GATES:
            chain = "x" if op.inputs["x"] is var else "y"
            other = op.inputs["y" if chain == "x" else "x"]
            if not is_activation(other) or tuple(other.shape) != tuple(var.shape):
                return NoMatch(f"'{op.op_type}' after the attention output does not gate it elementwise")
            gates.append(OutputGate(op.op_type, chain, other, form.axes, form.chan.copy()))
            ops.append(op)
            var = op.outputs[0]
            continue
        if op.op_type not in ("transpose", "reshape", "concat", "expand_dims", "squeeze"):
            return NoMatch(f"'{op.op_type}' after the attention output has no rule")
        if op.op_type == "concat" and len(op.inputs["values"]) != 1:
            return NoMatch("the attention output is concatenated with other tensors")
        result = head_rules.apply(op, [form], DryRun(), None)
        if isinstance(result, NoMatch):
            return result
        ops.append(op)
        form, var = result[0], op.outputs[0]


# --- the operand side --------------------------------------------------------------------------

def is_sequence_last_split(op) -> bool:
    """A reshape of a (B, C, 1, S) float activation into (B, c1, ..., S) that factors C: a KV
    cache held in the ANE's sequence-last layout, cut into heads. Its source is already in the
    form the heads are carried in."""
    if op.op_type != "reshape":
        return False
    x, out = op.inputs["x"], op.outputs[0]
    if rank(x) != 4 or rank(out) < 3 or not types.is_float(x.dtype) or not is_activation(x):
        return False
    if not all(is_static(d) for d in tuple(x.shape) + tuple(out.shape)) or x.shape[2] != 1:
        return False
    return (out.shape[0] == x.shape[0] and out.shape[-1] == x.shape[3] and x.shape[3] > 1
            and int(np.prod(out.shape[1:-1])) == x.shape[1])


def _is_head_split(op) -> bool:
    """A reshape of a (B, S, C) float activation that keeps B and S and factors C, or an
    expand_dims of one that adds unit axes (GPT-BigCode's (B, 1, S, C) before its QKV split),
    or a sequence-last cache cut into heads (:func:`is_sequence_last_split`)."""
    if is_sequence_last_split(op):
        return True
    if op.op_type not in ("reshape", "expand_dims"):
        return False
    x, out = op.inputs["x"], op.outputs[0]
    if rank(x) != 3 or rank(out) < 4 or not types.is_float(x.dtype) or not is_activation(x):
        return False
    if op.op_type == "expand_dims":
        return is_static(x.shape[2])
    channels = x.shape[2]
    tail = out.shape[2:]
    if not (is_static(channels) and all(is_static(d) for d in tail)) or int(np.prod(tail)) != channels:
        return False
    return all(same_length(a, b) for a, b in zip(x.shape[:2], out.shape[:2]))


class _Region:
    """The ops between head splits and the core operands, found by walking up."""

    def __init__(self):
        self.ops = {}  # id(op) -> op
        self.roots = {}  # id(reshape op) -> reshape op
        self._known = {}  # id(var) -> whether it is a region tensor
        self.stopped_at = []  # ops without a rule met on the way up, nearest first

    def holds(self, var) -> bool:
        key = id(var)
        if key in self._known:
            return self._known[key]
        self._known[key] = False
        op = var.op
        if op is None or var.val is not None:
            return False
        if _is_head_split(op):
            self.roots[id(op)] = op
            self._known[key] = True
            return True
        if op.op_type not in head_rules.RULES:
            self.stopped_at.append(op)
            return False
        inputs = [v for name in head_rules.TENSOR_INPUTS[op.op_type] for v in as_list(op.inputs.get(name))]
        found = [self.holds(v) for v in inputs]
        if any(found):
            self.ops[id(op)] = op
            self._known[key] = True
        return self._known[key]


class _DryExternals:
    """Run-time tables (activations from outside the region) as the dry run sees them."""

    def lay_out(self, var, form, out_axes, builder, name):
        return external_layout(var, form, out_axes) or Placeholder(name)


def external_layout(var, form: HeadForm, out_axes) -> NoMatch | None:
    """Why a run-time operand cannot be laid out against the heads, or None when it can: it
    must vary only along the batch, the sequence and the innermost channel axis."""
    if rank(var) > len(out_axes):
        return NoMatch("a run-time operand has more axes than the region tensor")
    shape = (1,) * (len(out_axes) - rank(var)) + tuple(var.shape)
    channel = [i for i, role in enumerate(out_axes) if role == CHANNEL]
    if any(shape[i] != 1 for i in channel[:-1]):
        return NoMatch("a run-time operand varies per head")
    return None


def _root_roles(root):
    """(axes, channel shape) of a head split's output."""
    out_shape = root.outputs[0].shape
    if is_sequence_last_split(root):
        return (BATCH,) + (CHANNEL,) * (len(out_shape) - 2) + (SEQ,), tuple(out_shape[1:-1])
    if root.op_type == "reshape":
        return (BATCH, SEQ) + (CHANNEL,) * (len(out_shape) - 2), tuple(out_shape[2:])
    inserted = {int(a) % len(out_shape) for a in constant_value(root.inputs["axes"])}
    kept = iter((BATCH, SEQ, CHANNEL))
    axes = tuple(CHANNEL if i in inserted else next(kept) for i in range(len(out_shape)))
    return axes, tuple(size for size, role in zip(out_shape, axes) if role == CHANNEL)


def carry(roots, region_ops, builder, externals, root_var, orders=(), permuted=frozenset()):
    """Run the rules of ``region_ops`` (in block order) from the head-split ``roots``, whose
    (B, S, C) sources become ``root_var(root, source)``: {id(var): HeadForm}, or NoMatch. The
    sources whose ids are in ``permuted`` have their channels in ``orders``."""
    forms = {}
    for root in roots:
        source = root.inputs["x"]
        axes, channel_shape = _root_roles(root)
        form = root_form(source, root_var(root, source), axes, channel_shape, id(source),
                         orders if id(source) in permuted else ())
        if is_sequence_last_split(root):
            form = replace(form, seq=source.shape[3])
        forms[id(root.outputs[0])] = form
    for op in region_ops:
        names = head_rules.TENSOR_INPUTS[op.op_type]
        operands = [forms.get(id(v)) for name in names for v in as_list(op.inputs.get(name))]
        result = head_rules.apply(op, operands, builder, externals)
        if isinstance(result, NoMatch):
            return NoMatch(f"{result.reason} (at '{op.name}')")
        for out, form in zip(op.outputs, result):
            forms[id(out)] = form
    return forms


def _check_consumers(region: _Region, core_ops, forms) -> NoMatch | None:
    """Why the region cannot be rewritten because something outside it reads it, or None.
    A region op may be read outside only through layout ops into a (B, C, 1, S) tensor (a
    KV-cache step's new K and V), which the rewrite builds from the region's forms; any other
    reader would keep the original computation alive, and it would see a projection whose rows
    the rewrite permuted or scaled. A reader whose result nothing reads (an exporter's unused
    transpose, which DEFAULT's dead-code elimination removes later) cannot see anything. A head split's source may be read elsewhere (a KV-cache
    step returns its new values): the rewrite permutes or scales only a projection read once
    (:func:`projection_rows`), so such a reader sees what it saw before."""
    inside = set(region.ops) | {id(op) for op in core_ops} | set(region.roots)
    for op in list(region.ops.values()) + list(region.roots.values()):
        for out in op.outputs:
            outside = [child for child in out.child_ops if id(child) not in inside and not is_dead(child)]
            form = forms.get(id(out))
            if is_block_output(out) or any(form is None or bc1s_view(child, out, form) is None for child in outside):
                return NoMatch(f"'{op.op_type}' inside the attention has consumers outside it")
    return None


def bc1s_view(op, var, form: HeadForm):
    """(view var, its form, ops) when ``op`` starts a chain of layout ops from ``var`` that ends
    in a (B, C, 1, S) tensor holding ``form``'s channels in order; None otherwise."""
    ops = []
    while op is not None and op.op_type in ("transpose", "reshape", "expand_dims", "squeeze"):
        result = head_rules.apply(op, [form], DryRun(), None)
        if isinstance(result, NoMatch):
            return None
        form, var = result[0], op.outputs[0]
        ops.append(op)
        shape = var.shape
        if rank(var) == 4 and all(is_static(d) for d in shape) and shape[2] == 1 and form.channels == shape[1]:
            others = [(i, role) for i, role in enumerate(form.axes) if role != CHANNEL]
            in_order = others == [(0, BATCH), (3, SEQ)] or (shape[3] == 1 and [r for _, r in others] == [BATCH, SEQ]
                                                             and others[0][0] == 0)
            if in_order and int(np.prod(form.channel_shape)) == shape[1]:
                return var, form, ops
        op = single_consumer(var)
    return None


def operand_rows(form: HeadForm, key_transposed: bool, heads_shape: tuple):
    """A core operand's channels as (heads, d) rows: (src, chan), or None when its head axes
    do not broadcast against ``heads_shape`` (a head axis of size 1 serves every head)."""
    lead_axes, d_axis = _operand_axes(form, key_transposed)
    channel = form.channel_axes()
    order = [channel.index(a) for a in lead_axes] + [channel.index(d_axis)]
    src, chan = np.transpose(form.src, order), np.transpose(form.chan, order)
    target = tuple(heads_shape) + (src.shape[-1],)
    if any(s not in (1, t) for s, t in zip(src.shape, target)):
        return None
    src, chan = np.broadcast_to(src, target), np.broadcast_to(chan, target)
    heads = int(np.prod(heads_shape)) if heads_shape else 1
    return src.reshape(heads, -1), chan.reshape(heads, -1)


def _operand_axes(form: HeadForm, key_transposed: bool):
    """(lead channel axes, d axis) of a core operand whose last two axes are (S, d), or (d, S)."""
    n = len(form.axes)
    seq_axis, d_axis = (n - 1, n - 2) if key_transposed else (n - 2, n - 1)
    if form.axes[seq_axis] != SEQ or form.axes[d_axis] != CHANNEL:
        return None
    lead = [i for i in range(n) if i not in (seq_axis, d_axis)]
    if sum(form.axes[i] == BATCH for i in lead) != 1:
        return None
    return [i for i in lead if form.axes[i] == CHANNEL], d_axis


def _assemble(block, core, key_transposed, steps, scale, values_out, matched, sdpa=False):
    q_var, k_var, v_var = core
    region = _Region()
    for var in core:
        if not region.holds(var):
            if region.stopped_at and region.stopped_at[0].op_type != "matmul":
                op = region.stopped_at[0]
                return NoMatch(f"'{op.op_type}' on an attention operand has no rule (at '{op.name}')")
            return NoMatch("an attention operand is not cut into heads from a (B, S, C) tensor")
    region_ops = tuple(op for op in block.operations if id(op) in region.ops)
    dry_run = DryRun()
    forms = carry(region.roots.values(), region_ops, dry_run, _DryExternals(),
                  lambda root, source: Placeholder(source.name))
    if isinstance(forms, NoMatch):
        return forms
    q, k, v = (forms[id(var)] for var in core)
    q_axes, k_axes, v_axes = _operand_axes(q, False), _operand_axes(k, key_transposed), _operand_axes(v, False)
    if q_axes is None or k_axes is None or v_axes is None:
        return NoMatch("q, k or v is not laid out as (batch, heads, sequence, head_dim)")
    if not (len(q_axes[0]) == len(k_axes[0]) == len(v_axes[0])):
        return NoMatch("q, k and v have different head axes")
    heads_shape = tuple(q.src.shape[q.channel_axes().index(a)] for a in q_axes[0])
    q_rows, k_rows, v_rows = (operand_rows(f, transposed, heads_shape)
                              for f, transposed in ((q, False), (k, key_transposed), (v, False)))
    if k_rows is None or v_rows is None:
        return NoMatch("k or v heads do not broadcast against the query heads")
    head_dim = q_rows[0].shape[1]
    if k_rows[0].shape[1] != head_dim:
        return NoMatch("q and k head sizes differ")
    kv_of_head = _kv_heads(k_rows, v_rows)
    if kv_of_head is None:
        return NoMatch("k and v do not share their head grouping")
    lead_roles = [q.axes[i] for i in range(len(q.axes) - 2)]
    output = _output_order(values_out, lead_roles, len(kv_of_head), v_rows[0].shape[1])
    if isinstance(output, NoMatch):
        return output
    out_var, order, out_ops, gates = output
    gate_roots = frozenset()
    if gates:
        forms = _with_gates(block, region, gates, tuple(matched) + tuple(out_ops))
        if isinstance(forms, NoMatch):
            return forms
        region_ops = tuple(op for op in block.operations if id(op) in region.ops)
        gate_roots = frozenset().union(*(forms[id(gate.other)].roots for gate in gates))
    else:
        failed = _check_consumers(region, tuple(matched) + tuple(out_ops), forms)
        if failed is not None:
            return failed
    sources = {id(root.inputs["x"]): root.inputs["x"] for root in region.roots.values()}
    foldable = q.linear and len(q.roots) == 1 and q.roots.isdisjoint(k.roots | v.roots | gate_roots)
    query_root = sources[next(iter(q.roots))] if foldable else None
    all_ops = tuple(matched) + tuple(out_ops) + region_ops + tuple(region.roots.values())
    orders, permuted = _permutation_worth_folding(region, region_ops, dry_run, (q, k, v), sources)
    return AttentionSite(
        roots=tuple(region.roots.values()), region_ops=region_ops, query=q_var, key=k_var, value=v_var,
        key_transposed=key_transposed, steps=steps, scale=scale * q.scale * k.scale, heads_shape=heads_shape,
        head_dim=head_dim, kv_of_head=tuple(kv_of_head), output=out_var, output_order=order, anchor=out_var.op,
        matched_ops=all_ops, query_root=query_root, sdpa=sdpa, head_orders=orders, permuted_sources=permuted,
        gates=gates)


def _with_gates(block, region: _Region, gates, matched):
    """The region grown by the gates' operands, carried again: {id(var): HeadForm} or NoMatch.
    A gate's operand must be laid out like the attention output where it meets it."""
    for gate in gates:
        if not region.holds(gate.other):
            return NoMatch(f"'{gate.kind}' gates the attention output with a tensor not cut into heads")
    region_ops = tuple(op for op in block.operations if id(op) in region.ops)
    forms = carry(region.roots.values(), region_ops, DryRun(), _DryExternals(),
                  lambda root, source: Placeholder(source.name))
    if isinstance(forms, NoMatch):
        return forms
    failed = _check_consumers(region, matched, forms)
    if failed is not None:
        return failed
    for gate in gates:
        other = forms[id(gate.other)]
        if other.axes != gate.axes or other.channel_shape != gate.positions.shape:
            return NoMatch(f"'{gate.kind}' gates the attention output with a tensor of another head layout")
    return forms


# --- head orders: interleaved reads made contiguous by permuting the Q and K projections ------

def _permutation_worth_folding(region, region_ops, dry_run: DryRun, operands, sources):
    """(orders, ((source, head size), ...) to permute) when permuting the rows of the Q and K
    projections makes the region cheaper (its gathers cut fewer pieces), else ((), ()). Q and K
    must come from projection convs of their own, V from none of them: the scores contract Q
    and K over one order, so any order is exact, but V's order is the output's."""
    orders = head_orders(dry_run.slices)
    q, k, v = operands
    qk_roots = q.roots | k.roots
    if not orders or not qk_roots.isdisjoint(v.roots):
        return (), ()
    sizes, head_size = dict(orders), {}
    for root in region.roots.values():
        source = root.inputs["x"]
        if id(source) not in qk_roots:
            continue
        size = _root_roles(root)[1][-1]
        found = projection_rows(source)
        if size not in sizes or found is None or head_size.setdefault(id(source), size) != size:
            return (), ()
        if constant_value(found[0].inputs["weight"]) is None:
            return (), ()  # a compressed projection's rows are not permuted
    trial = DryRun()
    carry(region.roots.values(), region_ops, trial, _DryExternals(), lambda root, source: Placeholder(source.name),
          orders, frozenset(qk_roots))
    if trial.pieces >= dry_run.pieces:
        return (), ()
    return orders, tuple((sources[i], size) for i, size in head_size.items())


def head_orders(slices) -> tuple:
    """((size, order), ...) that make the strided reads of a last channel axis contiguous: each
    axis read with a stride gets its indices grouped by read (evens, then odds) and the rest
    kept after them; an axis that a contiguous slice cuts from a longer one extends the order
    to the longer one, and a longer one's order that keeps the cut's channels in place gives
    the cut its share. ``slices`` are (axis size, indices read) pairs."""
    orders = {}
    for size in {n for n, indices in slices if _is_strided(indices)}:
        groups = sorted({indices for n, indices in slices if n == size and _is_strided(indices)})
        owner = {}
        for group in groups:
            for i in group:
                owner.setdefault(i, []).append(group[0])
        if any(len(firsts) > 1 for firsts in owner.values()):
            continue  # reads that overlap suggest no one grouping
        order = sorted(range(size), key=lambda i: (owner.get(i, [i])[0], i))
        if order != list(range(size)):
            orders[size] = tuple(order)
    changed = True
    while changed:
        changed = False
        for n, indices in slices:
            if not indices or _is_strided(indices) or len(indices) >= n:
                continue
            lo, cut = indices[0], len(indices)
            if cut in orders and n not in orders:
                orders[n] = tuple(range(lo)) + tuple(lo + i for i in orders[cut]) + tuple(range(lo + cut, n))
                changed = True
            elif n in orders and cut not in orders and sorted(orders[n][lo:lo + cut]) == list(indices):
                orders[cut] = tuple(i - lo for i in orders[n][lo:lo + cut])
                changed = True
    return tuple((n, order) for n, order in sorted(orders.items()) if order != tuple(range(n)))


def _is_strided(indices) -> bool:
    return len(indices) > 1 and any(b - a != 1 for a, b in zip(indices, indices[1:]))


def projection_rows(source):
    """The conv whose output channels [lo, hi) are ``source`` (B, S, C), reached through a
    layout leave and perhaps a channel split, each read by one op: (conv, lo, hi), or None.
    The conv's weight is a constant, or compressed (a decompression op's output)."""
    lo = 0
    var = source
    op = var.op
    if op is not None and op.op_type == "split" and int(constant_value(op.inputs["axis"])) % 3 == 2:
        index = list(op.outputs).index(var)
        lo = sum(out.shape[2] for out in op.outputs[:index])
        var = op.inputs["x"]
    entered = left_from(var)
    if entered is None or single_consumer(var) is None or single_consumer(entered) is None:
        return None
    squeezed = single_consumer(entered).outputs[0]
    conv = entered.op
    if single_consumer(squeezed) is None or conv is None or conv.op_type != "conv":
        return None
    weight = conv.inputs["weight"]
    if constant_value(weight) is None and not compressed.is_compressed(weight):
        return None
    if int(constant_value(conv.inputs["groups"])) != 1:
        return None
    bias = conv.inputs.get("bias")
    if bias is not None and constant_value(bias) is None:
        return None
    return conv, lo, lo + source.shape[2]


def _kv_heads(k_rows, v_rows):
    """Each query head's K/V head: heads reading the same K and V channels share one."""
    seen, kv_of_head = {}, []
    for h in range(k_rows[0].shape[0]):
        key = (k_rows[0][h].tobytes(), k_rows[1][h].tobytes(), v_rows[0][h].tobytes(), v_rows[1][h].tobytes())
        kv_of_head.append(seen.setdefault(key, len(seen)))
    k_keys = {(k_rows[0][h].tobytes(), k_rows[1][h].tobytes()) for h in range(len(kv_of_head))}
    return kv_of_head if len(k_keys) == len(seen) else None


def match_attention(softmax_op) -> AttentionSite | NoMatch:
    """The attention block whose softmax is ``softmax_op``, or why it is not one."""
    x = softmax_op.inputs["x"]
    if rank(x) != 4:
        return NoMatch("softmax input is not a rank-4 tensor")
    if int(constant_value(softmax_op.inputs["axis"])) % 4 != 3:
        return NoMatch("softmax is not over the last axis")
    chain = _epilogue(softmax_op)
    if not chain:
        return chain
    scores, scale, steps, ops = chain
    if constant_value(scores.inputs["transpose_x"]):
        return NoMatch("the scores matmul transposes q")
    if sum(step.kind == "concat" for step in steps) > 1:
        return NoMatch("several concats between the scores and the softmax")
    weights, dropped = softmax_op.outputs[0], []
    extra = extra_key_count(steps)
    if extra:
        cut = single_consumer(weights)
        if cut is None or not _drops_last_columns(cut, extra):
            return NoMatch("the extra key columns are not dropped before the values")
        weights, dropped = cut.outputs[0], [cut]
    weights_user = single_consumer(weights)
    if weights_user is None or weights_user.op_type != "matmul" or weights_user.inputs["x"] is not weights:
        return NoMatch("the softmax does not feed one matmul with the values")
    if any(constant_value(weights_user.inputs[f]) for f in ("transpose_x", "transpose_y")):
        return NoMatch("the weights-by-values matmul transposes an operand")
    key_transposed = not constant_value(scores.inputs["transpose_y"])
    core = (scores.inputs["x"], scores.inputs["y"], weights_user.inputs["y"])
    block = softmax_op.enclosing_block
    return _assemble(block, core, key_transposed, steps, scale, weights_user.outputs[0],
                     ops + [softmax_op] + dropped + [weights_user])


def _drops_last_columns(op, count: int) -> bool:
    """A slice that keeps every axis whole but the last, of which it drops ``count`` columns."""
    if op.op_type != "slice_by_index":
        return False
    x, out = op.inputs["x"].shape, op.outputs[0].shape
    stride = constant_value(op.inputs.get("stride"))
    begin = constant_value(op.inputs.get("begin"))
    if stride is not None and any(int(s) != 1 for s in np.ravel(stride)):
        return False
    if begin is not None and any(int(b) != 0 for b in np.ravel(begin)):
        return False
    return tuple(out[:3]) == tuple(x[:3]) and is_static(x[3]) and out[3] == x[3] - count


def match_sdpa(op) -> AttentionSite | NoMatch:
    """iOS18's ``scaled_dot_product_attention(query, key, value, attn_mask)`` on (B, H, S, d)."""
    if rank(op.inputs["query"]) != 4:
        return NoMatch("scaled_dot_product_attention on tensors of rank other than 4")
    mask = op.inputs.get("attn_mask")
    if mask is not None and types.is_bool(mask.dtype):
        return NoMatch("a boolean attn_mask is not rewritten")
    core = (op.inputs["query"], op.inputs["key"], op.inputs["value"])
    steps = () if mask is None else (EpilogueStep("add", "x", {"y": mask}),)
    scale = 1.0 / math.sqrt(op.inputs["query"].shape[-1])
    return _assemble(op.enclosing_block, core, False, steps, scale, op.outputs[0], [op], sdpa=True)
