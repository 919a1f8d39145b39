"""``ane::attention_to_einsum``: multi-head attention as per-head einsums on (B, C, 1, S)."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.attention.attention_match import (
    bc1s_view,
    AttentionSite,
    carry,
    external_layout,
    extra_key_count,
    is_sequence_last_split,
    match_attention,
    match_sdpa,
    operand_rows,
    projection_rows,
)
from milpasses.passes.attention.head_form import BATCH, CHANNEL, SEQ, Build, HeadForm, Source, materialise
from milpasses.passes.base import AnePass, PositiveIntOption, logger, register
from milpasses.passes.shared import compressed
from milpasses.passes.shared.bc1s import enter, leave, left_from
from milpasses.passes.shared.matching import NoMatch, constant_value, is_static, rank

MODES = ("split_einsum", "split_einsum_v2", "batched", "off")
#: The one einsum MIL has: contract axis -1 of the first operand with axis -3 of the second.
EQUATION = "nchw,nwhu->nchu"
#: Scores (B, H, Sq, Sk) -> (B, Sk, H, Sq): keys on the channel axis, queries on the last.
TO_KEYS_FIRST = [0, 3, 1, 2]
#: One head's score tensor must stay below this many elements: at 2^20 and above the ANE gives
#: wrong numbers (community finding, eeANE's ATTENTION_SCORE_ELEMENT_LIMIT).
SCORE_ELEMENT_LIMIT = 1 << 20


def _split(x, parts, axis: int, name: str) -> list:
    """``x`` cut on ``axis`` into ``parts`` equal pieces, or pieces of the sizes ``parts`` lists."""
    sizes = parts if isinstance(parts, list) else [x.shape[axis] // parts] * parts
    if len(sizes) == 1:
        return [x]
    return list(mb.split(x=x, split_sizes=sizes, axis=axis, name=name))


def _concat(values, axis: int, name: str):
    return values[0] if len(values) == 1 else mb.concat(values=values, axis=axis, name=name)


@register
class attention_to_einsum(AnePass):
    """
    Rewrite multi-head attention into Apple's split-einsum form inside the ``(B, C, 1, S)`` body.

    Why: the ANE keeps a small score tensor on chip, so attention split per head runs from
    on-chip memory; the reshapes and transposes of the frontend's ``(B, H, S, d)`` form are
    memory copies (Apple, "Deploying Transformers on the Apple Neural Engine", principles 2
    and 3). MIL's ``einsum`` contracts axis -1 of its first operand with axis -3 of its second,
    so K is transposed once per block to ``(B, Sk, 1, C)`` and each head is two einsums.

    .. code-block::

        Given (per block, after ane::linear_to_conv):
            %q4 = reshape(x=%q, shape=[B, S, H, d]) ... transpose -> (B, H, Sq, d)
            %s  = matmul(x=%q4, y=%kT4)                           # (B, H, Sq, Sk)
            %s2 = add(x=mul(x=%s, y=d^-0.5), y=%mask)
            %w  = softmax(x=%s2, axis=-1)
            %o4 = matmul(x=%w, y=%v4) ... transpose, reshape -> %o (B, Sq, C)
        Result (mode split_einsum; the scale is folded into the Q conv's weights and bias):
            %qh = split(x=%q_bc1s, num_splits=H, axis=1)          # H x (B, d, 1, Sq)
            %kT = transpose(x=%k_bc1s, perm=[0, 3, 2, 1])         # (B, Sk, 1, C)
            %kh = split(x=%kT, num_splits=H, axis=3)              # H x (B, Sk, 1, d)
            %vh = split(x=%v_bc1s, num_splits=H, axis=1)          # H x (B, d, 1, Sk)
            %m  = transpose(x=%mask, perm=[0, 3, 1, 2])           # (B, Sk, 1, Sq), once per mask
            per head i:
                %si = einsum(values=(%kh_i, %qh_i), equation="nchw,nwhu->nchu")   # (B, Sk, 1, Sq)
                %wi = softmax(x=add(x=%si, y=%m), axis=1)
                %oi = einsum(values=(%vh_i, %wi), equation="nchw,nwhu->nchu")    # (B, d, 1, Sq)
            %o_bc1s = concat(values=(%o0, ..., %oH-1), axis=1)

    The region between the head splits and the core is found from its two ends and carried op
    by op by the transport rules of ``head_rules`` (a table per op type: layout ops rearrange a
    compile-time channel map, computing ops run once on (B, C, 1, S)), so every rotary variant
    (half, partial, interleaved), per-head q/k norms, fused QKV cut by split, slice, gather or
    unbind, grouped- and multi-query attention (each query head reads its K/V head; the repeat is
    never built) and run-time rotary tables are carried without a per-family form. Strided reads
    of head_dim (interleaved rotary) become contiguous: when Q and K have projections of their
    own, their rows are permuted to one head order (evens, then odds), which leaves Q·Kᵀ as it
    was. Between the scores and the softmax, scales, additive masks and biases, ``select``
    masks and soft-caps are applied per head in their order; extra key columns (attention
    sinks) join the keys-first scores on axis 1 and are dropped after the softmax, and a
    subtraction of the scores' own maximum right before the softmax is dropped. A gate on the
    output before the heads are merged (``o * sigmoid(gate)``, the gate cut into heads from a
    projection) is carried like an operand and applied to the merged heads. Scalar factors
    on q, k and the raw scores are folded into the Q projection when Q is a linear function of
    it, else one ``mul`` remains. In every mode each head's score tensor stays under 2^20
    elements: queries are chunked when Sq * Sk reaches it.

    Modes: ``split_einsum`` as above; ``split_einsum_v2`` also splits each head's queries into
    chunks of ``query_chunk`` when Sq >= ``query_chunk`` (a shorter last chunk is computed,
    not dropped); ``batched`` keeps the heads together in one einsum pair over
    ``(B, d, H, S)`` views (reshapes and transposes remain); ``off`` leaves attention alone.

    Flexible sequence lengths (EnumeratedShapes) are fine: only the channel split needs fixed
    sizes; ``split_einsum_v2`` chunks only a fixed length, and ``batched`` needs a fixed batch.

    Does not fire when: the softmax is not over the last axis of a rank-4 tensor; an op in the
    region has no transport rule (the reason names it and where it sits: DeBERTa's disentangled
    attention, a (B*H, S, d) batched form); a region tensor is read outside the region; a
    reshape mixes heads with the batch or sequence; a mask or bias has more than 4 axes; a
    boolean sdpa mask.

    Options:

    - ``enabled`` (default true);
    - ``mode`` (default ``split_einsum``): one of ``split_einsum``, ``split_einsum_v2``,
      ``batched``, ``off``;
    - ``query_chunk`` (default 512): the query chunk length of ``split_einsum_v2``.
    """

    def __init__(self):
        self._mode = "split_einsum"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        if value not in MODES:
            raise ValueError(f"option 'mode' must be one of {list(MODES)}, got {value!r}")
        self._mode = value

    query_chunk = PositiveIntOption(512)

    def run(self, block) -> None:
        if self.mode == "off":
            return
        self._terms = {}  # id(mask var) -> its (B, Sk, H, Sq) form, shared by every block using it
        self._tables = {}  # run-time tables laid out for the heads, shared by every block using them
        self.rewrite_each(block, ("softmax", "scaled_dot_product_attention"), self._match, self._rewrite)

    def _match(self, op) -> AttentionSite | NoMatch | None:
        if op.op_type == "softmax" and rank(op.inputs["x"]) < 3:
            return None  # a classifier's or a mixture-of-experts router's softmax: no attention
        site = match_attention(op) if op.op_type == "softmax" else match_sdpa(op)
        if site and self.mode == "batched" and not self._batchable(site):
            return NoMatch("batched mode needs a fixed batch, K/V heads read in contiguous groups, "
                           "and a fixed length for grouped-query attention")
        return site

    def _batchable(self, site: AttentionSite) -> bool:
        batch, sq = site.output.shape[0], site.output.shape[1]
        fits = not (is_static(sq) and self._chunks(site) != [sq])
        return is_static(batch) and site.grouped and fits and (site.kv_heads == site.heads or is_static(sq))

    def _rewrite(self, block, site: AttentionSite) -> None:
        for source, size in site.permuted_sources:
            self._permute_projection(block, source, np.asarray(dict(site.head_orders)[size]))
        folded = site.scale == 1.0 or self._fold_scale(block, site)
        name = site.anchor.name
        with mb.set_before_op(before_op=site.anchor):
            q, k, v, forms = self._operands(site, name)
            if not folded:
                q = mb.mul(x=q, y=np.float32(site.scale), name=f"{name}_q_scaled")
            steps = [self._step_inputs(step, f"{name}_step{i}") for i, step in enumerate(site.steps)]
            if self.mode == "batched":
                out = self._batched(site, q, k, v, steps, name)
            else:
                out = self._per_head(site, q, k, v, steps, name)
            out = self._in_output_order(site, self._gated(site, out, forms, name), name)
            result = leave(out, 3, name)
            views = self._bc1s_views(site, forms, name)
        # forced: coremltools refuses when a compressed weight upstream of the old output is not
        # upstream of the new one (the Q scale folded into a rebuilt one); remove_dead drops only dead ops
        block.replace_uses_of_var_after_op(anchor_op=site.anchor, old_var=site.output, new_var=result,
                                           force_replace=True)
        for old, new, _ in views:
            block.replace_uses_of_var_after_op(anchor_op=site.anchor, old_var=old, new_var=new)
        self.remove_dead(block, [op for _, _, ops in views for op in ops] + list(site.matched_ops))
        self.report.rewritten[self._site_kind(site, folded)] += 1

    @staticmethod
    def _site_kind(site: AttentionSite, folded: bool) -> str:
        """"attention", with what set the block apart: sdpa, grouped-query, a head order folded
        into the projections, a scale that could not be folded into the Q projection."""
        kind = "sdpa attention" if site.sdpa else "attention"
        if site.kv_heads < site.heads:
            kind += " (grouped-query)"
        if site.permuted_sources:
            kind += ", head order folded into the Q/K projections"
        return kind if folded else kind + ", scale as a multiply"

    def _fold_scale(self, block, site: AttentionSite) -> bool:
        """Fold the score scale into the Q projection's weights and bias, if Q is a linear
        function of one conv's output (or a channel range of one) that nothing else reads."""
        found = None if site.query_root is None else projection_rows(site.query_root)
        if found is None:
            return False
        conv, lo, hi = found
        weight = self._scaled_weight(conv, lo, hi, site.scale)
        if isinstance(weight, NoMatch):
            logger.debug("%s left the scale of %s unfolded: %s", self.pass_id, site.anchor.name, weight.reason)
            return False
        bias = conv.inputs.get("bias")
        if bias is not None:
            bias = np.array(constant_value(bias), copy=True)
            bias[lo:hi] *= np.asarray(site.scale, dtype=bias.dtype)
        arguments = {key: conv.inputs[key] for key in ("x", "strides", "pad_type", "pad", "dilations", "groups")}
        with mb.set_before_op(before_op=conv):
            if isinstance(weight, compressed.Compressed):
                weight = compressed.build(weight, f"{conv.name}_scaled_weight")
            scaled = mb.conv(weight=weight, bias=bias, name=f"{conv.name}_scaled", **arguments)
        block.replace_uses_of_var_after_op(anchor_op=conv, old_var=conv.outputs[0], new_var=scaled,
                                           force_replace=compressed.is_compressed(conv.inputs["weight"]))
        self.remove_dead(block, [conv])
        return True

    @staticmethod
    def _scaled_weight(conv, lo: int, hi: int, scale: float):
        """The conv's weight with output channels [lo, hi) times ``scale``: a constant scaled, a
        compressed weight through its tables or scales (NoMatch when those rows share them)."""
        var = conv.inputs["weight"]
        value = constant_value(var)
        if value is not None:
            weight = np.array(value, copy=True)
            weight[lo:hi] *= np.asarray(scale, dtype=weight.dtype)
            return weight
        if len(var.child_ops) != 1:
            return NoMatch("the compressed Q weight is read by other ops too")
        plan = compressed.read(var)
        return compressed.rows_scaled(plan, lo, hi, scale) if plan else plan

    def _permute_projection(self, block, source, order) -> None:
        """Permute the rows of the conv that computes ``source`` within each head by ``order``
        (physical row p of a head computes its channel order[p])."""
        conv, lo, hi = projection_rows(source)
        rows = np.arange(hi - lo).reshape(-1, order.size)[:, order].ravel() + lo
        index = np.concatenate([np.arange(lo), rows, np.arange(hi, conv.outputs[0].shape[1])])
        weight = np.asarray(constant_value(conv.inputs["weight"]))[index]
        bias = conv.inputs.get("bias")
        bias = None if bias is None else np.asarray(constant_value(bias))[index]
        arguments = {key: conv.inputs[key] for key in ("x", "strides", "pad_type", "pad", "dilations", "groups")}
        with mb.set_before_op(before_op=conv):
            permuted = mb.conv(weight=weight, bias=bias, name=f"{conv.name}_head_order", **arguments)
        block.replace_uses_of_var_after_op(anchor_op=conv, old_var=conv.outputs[0], new_var=permuted)
        self.remove_dead(block, [conv])

    def _operands(self, site: AttentionSite, name: str):
        """Q as (B, H*d, 1, Sq), K and V as (B, Hkv*d, 1, Sk): the region's rules run on the
        real program, then each operand's heads are gathered in head order (each K/V head once)."""
        builder = Build()
        forms = carry(site.roots, site.region_ops, builder, _Tables(self._tables), _in_bc1s, site.head_orders,
                      frozenset(id(source) for source, _ in site.permuted_sources))
        q, k, v = (forms[id(var)] for var in (site.query, site.key, site.value))
        kv_first = [site.kv_of_head.index(g) for g in range(site.kv_heads)]
        gathered = []
        for form, key_transposed, heads, tag in ((q, False, None, "q"), (k, site.key_transposed, kv_first, "k"),
                                                 (v, False, kv_first, "v")):
            src, chan = operand_rows(form, key_transposed, site.heads_shape)
            if heads is not None:
                src, chan = src[heads], chan[heads]
            # q's and k's factors are in site.scale already; v's is applied here.
            # Q and K share one head order (the scores contract them over it); V's is the output's.
            rows = HeadForm((BATCH, CHANNEL, CHANNEL, SEQ), src, chan, form.sources, form.batch, form.seq,
                            scale=form.scale if tag == "v" else 1.0, orders=() if tag == "v" else site.head_orders)
            gathered.append(materialise(rows, builder, f"{name}_{tag}"))
        return (*gathered, forms)

    @staticmethod
    def _bc1s_views(site: AttentionSite, forms: dict, name: str) -> list:
        """Region tensors read outside the region through layout ops only, into a (B, C, 1, S)
        tensor (a KV-cache step's new K and V, returned to the host): that tensor is the
        region's materialised form, so it is built from it and the old computation goes.
        (old var, new var, the layout ops it replaces) for each."""
        inside = {id(op) for op in site.matched_ops}
        views = []
        for op in site.region_ops:
            for out in op.outputs:
                form = forms.get(id(out))
                for child in [] if form is None else out.child_ops:
                    if id(child) not in inside:
                        view = bc1s_view(child, out, form)
                        if view is not None:
                            var, view_form, ops = view
                            views.append((var, materialise(view_form, Build(), f"{name}_{var.name}_view"), ops))
        return views

    @staticmethod
    def _gated(site: AttentionSite, out, forms: dict, name: str):
        """The gates applied to the per-head concat, each operand gathered in its order."""
        for i, gate in enumerate(site.gates):
            other = forms[id(gate.other)]
            order = np.argsort(gate.positions.ravel())
            rows = HeadForm((BATCH, CHANNEL, SEQ), other.src.ravel()[order], other.chan.ravel()[order],
                            other.sources, other.batch, other.seq, scale=other.scale)
            operand = materialise(rows, Build(), f"{name}_gate{i}")
            inputs = {gate.chain: out, "y" if gate.chain == "x" else "x": operand}
            out = getattr(mb, gate.kind)(**inputs, name=f"{name}_gated{i}")
        return out

    def _in_output_order(self, site: AttentionSite, out, name: str):
        """The per-head concat rearranged in the order the model merges its heads."""
        order = site.output_order
        if np.array_equal(order, np.arange(order.size)):
            return out
        form = HeadForm((BATCH, CHANNEL, SEQ), np.zeros_like(order), order, (Source(out, order.size),), None, None)
        return materialise(form, Build(), f"{name}_merged")

    def _chunks(self, site: AttentionSite) -> list:
        """Query chunk lengths: ``query_chunk`` in split_einsum_v2, and in every mode short
        enough that one head's scores stay under SCORE_ELEMENT_LIMIT elements."""
        sq, sk = site.output.shape[1], _key_length(site) + extra_key_count(site.steps)
        if not is_static(sq):
            return [sq]
        chunk = sq
        if self.mode == "split_einsum_v2":
            chunk = min(chunk, self.query_chunk)
        if is_static(sk) and chunk * sk >= SCORE_ELEMENT_LIMIT:
            fitting = (SCORE_ELEMENT_LIMIT - 1) // sk
            chunk = min(chunk, max(1, fitting - fitting % 32 if fitting >= 32 else fitting))
        whole, rest = divmod(sq, chunk)
        return [chunk] * whole + ([rest] if rest else [])

    def _step_inputs(self, step, name: str) -> dict:
        """Each non-score input of an epilogue step: a scalar as it is, a tensor keys-first."""
        inputs = {}
        for key, var in step.others.items():
            value = constant_value(var)
            if value is not None and np.size(value) == 1 or rank(var) == 0:
                inputs[key] = var
            else:
                inputs[key] = self._keys_first(var, f"{name}_{key}")
        return inputs

    def _keys_first(self, term, name: str):
        """A mask or bias broadcasting against (B, H, Sq, Sk), as (B, Sk, H, Sq)."""
        if id(term) in self._terms:
            return self._terms[id(term)]
        value = constant_value(term)
        if value is not None:
            value = np.asarray(value)
            result = np.transpose(value.reshape((1,) * (4 - value.ndim) + value.shape), TO_KEYS_FIRST)
        else:
            x = term if rank(term) == 4 else mb.expand_dims(x=term, axes=list(range(4 - rank(term))), name=f"{name}_rank4")
            result = mb.transpose(x=x, perm=TO_KEYS_FIRST, name=f"{name}_keys_first")
            self._terms[id(term)] = result
        return result

    def _per_head(self, site: AttentionSite, q, k, v, steps, name: str):
        heads, kv_heads = site.heads, site.kv_heads
        chunks = self._chunks(site)
        q_heads = _split(q, heads, 1, f"{name}_q_heads")
        k_heads = _split(mb.transpose(x=k, perm=[0, 3, 2, 1], name=f"{name}_k_transposed"), kv_heads, 3, f"{name}_k_heads")
        v_heads = _split(v, kv_heads, 1, f"{name}_v_heads")
        step_parts = [{key: self._term_parts(t, heads, chunks, f"{name}_step{i}_{key}") if _is_tensor(t) else t
                       for key, t in inputs.items()} for i, inputs in enumerate(steps)]
        outputs = []
        for h in range(heads):
            group = site.kv_of_head[h]
            q_chunks = _split(q_heads[h], chunks, 3, f"{name}_h{h}_q_chunks")
            pieces = []
            for c, q_chunk in enumerate(q_chunks):
                tag = f"{name}_h{h}" + (f"_c{c}" if len(chunks) > 1 else "")
                scores = mb.einsum(values=(k_heads[group], q_chunk), equation=EQUATION, name=f"{tag}_scores")
                for i, (step, parts) in enumerate(zip(site.steps, step_parts)):
                    arguments = {key: p[h][c] if isinstance(p, list) else p for key, p in parts.items()}
                    scores = _apply_step(step, arguments, scores, f"{tag}_scores_{i}")
                weights = _without_extra_keys(mb.softmax(x=scores, axis=1, name=f"{tag}_weights"), site)
                pieces.append(mb.einsum(values=(v_heads[group], weights), equation=EQUATION, name=f"{tag}_out"))
            outputs.append(_concat(pieces, 3, f"{name}_h{h}_out"))
        return _concat(outputs, 1, f"{name}_heads_out")

    @staticmethod
    def _term_parts(term, heads: int, chunks: list, name: str):
        """``term`` (B, Sk, H or 1, Sq or 1) cut per head and per query chunk: [head][chunk].
        A term shared by every head is cut into chunks once."""
        by_query = len(chunks) > 1 and term.shape[3] != 1
        per_head = term.shape[2] > 1

        def chunked(part, tag):
            if not by_query:
                return [part] * len(chunks)
            if isinstance(part, np.ndarray):
                bounds = np.cumsum([0] + chunks)
                return [part[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]
            return _split(part, chunks, 3, f"{name}{tag}_chunks")

        if not per_head:
            return [chunked(term, "")] * heads
        if isinstance(term, np.ndarray):
            return [chunked(term[:, :, h:h + 1], f"_h{h}") for h in range(heads)]
        return [chunked(part, f"_h{h}") for h, part in enumerate(_split(term, heads, 2, f"{name}_heads"))]

    def _batched(self, site: AttentionSite, q, k, v, steps, name: str):
        """One einsum pair over all heads: q as (B, d, Hkv, n * Sq), k as (B, Sk, Hkv, d). The
        reshapes leave the sequence axis to -1, so flexible lengths work too."""
        batch, d = site.output.shape[0], site.head_dim
        kv_heads, repeats = site.kv_heads, site.heads // site.kv_heads
        if repeats == 1:
            q4 = mb.transpose(x=mb.reshape(x=q, shape=[batch, kv_heads, d, -1], name=f"{name}_q_split"),
                              perm=[0, 2, 1, 3], name=f"{name}_q_heads")
        else:
            q5 = mb.reshape(x=q, shape=[batch, kv_heads, repeats, d, -1], name=f"{name}_q_split")
            q5 = mb.transpose(x=q5, perm=[0, 3, 1, 2, 4], name=f"{name}_q_grouped")
            q4 = mb.reshape(x=q5, shape=[batch, d, kv_heads, -1], name=f"{name}_q_heads")
        k4 = mb.transpose(x=mb.reshape(x=k, shape=[batch, kv_heads, d, -1], name=f"{name}_k_split"),
                          perm=[0, 3, 1, 2], name=f"{name}_k_heads")
        v4 = mb.transpose(x=mb.reshape(x=v, shape=[batch, kv_heads, d, -1], name=f"{name}_v_split"),
                          perm=[0, 2, 1, 3], name=f"{name}_v_heads")
        scores = mb.einsum(values=(k4, q4), equation=EQUATION, name=f"{name}_scores")
        for i, (step, inputs) in enumerate(zip(site.steps, steps)):
            arguments = {key: self._grouped_term(t, site, f"{name}_step{i}_{key}") if _is_tensor(t) else t
                         for key, t in inputs.items()}
            scores = _apply_step(step, arguments, scores, f"{name}_scores_{i}")
        weights = _without_extra_keys(mb.softmax(x=scores, axis=1, name=f"{name}_weights"), site)
        out = mb.einsum(values=(v4, weights), equation=EQUATION, name=f"{name}_out")  # (B, d, Hkv, n*Sq)
        channels = kv_heads * repeats * d
        if repeats == 1:
            heads_first = mb.transpose(x=out, perm=[0, 2, 1, 3], name=f"{name}_out_heads")
        else:
            out5 = mb.reshape(x=out, shape=[batch, d, kv_heads, repeats, -1], name=f"{name}_out_split")
            heads_first = mb.transpose(x=out5, perm=[0, 2, 3, 1, 4], name=f"{name}_out_heads")
        return mb.reshape(x=heads_first, shape=[batch, channels, 1, -1], name=f"{name}_out_merged")

    @staticmethod
    def _grouped_term(term, site: AttentionSite, name: str):
        """``term`` (B, Sk, H or 1, Sq or 1) against grouped scores (B, Sk, Hkv, n * Sq)."""
        repeats = site.heads // site.kv_heads
        if repeats == 1:
            return term
        kv_heads, sq = site.kv_heads, site.output.shape[1]
        shape = list(term.shape)
        if shape[2] == 1 and shape[3] == 1:
            return term
        if isinstance(term, np.ndarray):
            full = np.broadcast_to(term, shape[:2] + [kv_heads * repeats, sq])
            return np.ascontiguousarray(full).reshape(shape[:2] + [kv_heads, repeats * sq])
        if shape[3] == 1:
            term = mb.tile(x=term, reps=[1, 1, 1, sq], name=f"{name}_queries")
        if shape[2] == 1:
            return mb.tile(x=term, reps=[1, 1, 1, repeats], name=f"{name}_grouped")
        return mb.reshape(x=term, shape=shape[:2] + [kv_heads, repeats * sq], name=f"{name}_grouped")


def _apply_step(step, arguments: dict, scores, name: str):
    """One epilogue step on keys-first scores; extra key columns join them on axis 1."""
    if step.kind == "concat":
        return mb.concat(values=[scores, _broadcast_like(arguments["extra"], scores, name)], axis=1, name=name)
    arguments[step.chain] = scores
    return getattr(mb, step.kind)(**arguments, name=name)


def _broadcast_like(extra, scores, name: str):
    """Keys-first extra columns (B|1, n, H|1, Sq|1) repeated to the scores' other axes."""
    target = [scores.shape[0], extra.shape[1], scores.shape[2], scores.shape[3]]
    if isinstance(extra, np.ndarray):
        return np.ascontiguousarray(np.broadcast_to(extra, target)).astype(np.float32)
    reps = [int(t) // int(e) for t, e in zip(target, extra.shape)]
    return extra if reps == [1, 1, 1, 1] else mb.tile(x=extra, reps=reps, name=f"{name}_extra")


def _without_extra_keys(weights, site: AttentionSite):
    """The softmax weights of the real keys: extra key columns (sinks) took their share and go."""
    extra = extra_key_count(site.steps)
    if not extra:
        return weights
    return mb.slice_by_size(x=weights, begin=[0, 0, 0, 0], size=[-1, weights.shape[1] - extra, -1, -1],
                            name=f"{weights.name}_keys")


def _in_bc1s(root, source):
    """A head split's (B, S, C) source in (B, C, 1, S): the conv output it left, or entered;
    a sequence-last cache is in that form already."""
    if is_sequence_last_split(root):
        return source
    left = left_from(source)
    return enter(source, f"{root.name}_source") if left is None else left


def _is_tensor(value) -> bool:
    if isinstance(value, np.ndarray):
        return value.ndim == 4
    return rank(value) == 4


def _key_length(site: AttentionSite):
    return site.key.shape[-1] if site.key_transposed else site.key.shape[-2]


class _Tables:
    """Run-time operands of the region (rotary tables computed from positions), laid out as
    (B|1, C, 1, S|1) for the heads once and shared by every block."""

    def __init__(self, cache: dict):
        self._cache = cache

    def lay_out(self, var, form, out_axes, builder, name):
        failed = external_layout(var, form, out_axes)
        if failed:
            return failed
        order = form.last_axis_order()
        key = (id(var), tuple(out_axes), form.channel_shape, None if order is None else order.tobytes())
        if key in self._cache:
            return self._cache[key]
        n = len(out_axes)
        x = var if rank(var) == n else mb.expand_dims(x=var, axes=list(range(n - rank(var))), name=f"{name}_rank")
        channel = [i for i, role in enumerate(out_axes) if role == CHANNEL]
        batch, seq = out_axes.index(BATCH), out_axes.index(SEQ)
        x = mb.transpose(x=x, perm=[batch] + channel + [seq], name=f"{name}_heads_last")
        inner = x.shape[-2]
        x = mb.reshape(x=x, shape=[x.shape[0] if is_static(x.shape[0]) else -1, inner, 1, -1], name=f"{name}_bc1s")
        if order is not None and order.size == inner:
            permutation = np.zeros((inner, inner, 1, 1), dtype=np.float32)
            permutation[np.arange(inner), order, 0, 0] = 1.0
            x = mb.conv(x=x, weight=permutation, name=f"{name}_head_order")
        repeat = form.channels // inner
        if repeat > 1:
            x = mb.tile(x=x, reps=[1, repeat, 1, 1], name=f"{name}_per_head")
        self._cache[key] = x
        return x
