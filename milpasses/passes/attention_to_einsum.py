"""``ane::attention_to_einsum``: multi-head attention as per-head einsums on (B, C, 1, S)."""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb

from milpasses.passes.attention_match import AttentionSite, HeadView, match_attention, match_sdpa
from milpasses.passes.base import AnePass, register
from milpasses.passes.layout import enter, leave, left_from
from milpasses.passes.matching import NoMatch, constant_value, is_static, rank, single_consumer

MODES = ("split_einsum", "split_einsum_v2", "batched", "off")
#: The one einsum MIL has: contract axis -1 of the first operand with axis -3 of the second.
EQUATION = "nchw,nwhu->nchu"
#: Scores (B, H, Sq, Sk) -> (B, Sk, H, Sq): keys on the channel axis, queries on the last.
TO_KEYS_FIRST = [0, 3, 1, 2]


def _split(x, parts, axis: int, name: str) -> list:
    """``x`` cut on ``axis`` into ``parts`` equal pieces, or pieces of the sizes ``parts`` lists."""
    sizes = parts if isinstance(parts, list) else [x.shape[axis] // parts] * parts
    if len(sizes) == 1:
        return [x]
    return list(mb.split(x=x, split_sizes=sizes, axis=axis, name=name))


def _concat(values, axis: int, name: str):
    return values[0] if len(values) == 1 else mb.concat(values=values, axis=axis, name=name)


def _scaled_conv_of(source):
    """The conv whose output channels [lo, hi) are ``source`` (B, S, C), reached through a
    layout leave and perhaps a channel split, each read by one op: (conv, lo, hi), or None."""
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
    if constant_value(conv.inputs["weight"]) is None or int(constant_value(conv.inputs["groups"])) != 1:
        return None
    bias = conv.inputs.get("bias")
    if bias is not None and constant_value(bias) is None:
        return None
    return conv, lo, lo + source.shape[2]


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

    Recognised on the way: a fused QKV projection split on the channel axis (GPT-2); rotary
    embeddings (``x * cos + rotate_half(x) * sin``, Llama, Qwen), applied in ``(B, C, 1, S)``
    as a channel split, a concat that swaps each head's halves, and two multiplies; grouped-query
    attention, whose per-head einsums read the shared K/V head (the repeated copy is never
    built); any number of additive masks or per-head biases (T5's position bias); iOS18's
    ``scaled_dot_product_attention``.

    Modes: ``split_einsum`` as above; ``split_einsum_v2`` also splits each head's queries into
    chunks of ``query_chunk`` when Sq >= ``query_chunk`` (a shorter last chunk is computed,
    not dropped); ``batched`` keeps the heads together in one einsum pair over
    ``(B, d, H, S)`` views (reshapes and transposes remain); ``off`` leaves attention alone.

    Flexible sequence lengths (EnumeratedShapes) are fine: only the channel split needs fixed
    sizes; ``split_einsum_v2`` chunks only a fixed length, and ``batched`` needs a fixed batch.

    Does not fire when: the softmax is not over the last axis of a rank-4 tensor; the
    scores or the output pass through an op it does not understand (DeBERTa's disentangled
    attention, rank-3 per-head matmuls); an intermediate has other consumers; a scale is
    applied after a mask; a mask or bias does not broadcast per head; a boolean sdpa mask.

    Options:

    - ``enabled`` (default true);
    - ``mode`` (default ``split_einsum``): one of ``split_einsum``, ``split_einsum_v2``,
      ``batched``, ``off``;
    - ``query_chunk`` (default 512): the query chunk length of ``split_einsum_v2``.
    """

    def __init__(self):
        self._mode = "split_einsum"
        self._query_chunk = 512

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value) -> None:
        if value not in MODES:
            raise ValueError(f"option 'mode' must be one of {list(MODES)}, got {value!r}")
        self._mode = value

    @property
    def query_chunk(self) -> int:
        return self._query_chunk

    @query_chunk.setter
    def query_chunk(self, value) -> None:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1 or str(number) != str(value).strip():
            raise ValueError(f"option 'query_chunk' must be a positive integer, got {value!r}")
        self._query_chunk = number

    def run(self, block) -> None:
        if self.mode == "off":
            return
        self._terms = {}  # id(mask var) -> its (B, Sk, H, Sq) form, shared by every block using it
        self.rewrite_each(block, ("softmax", "scaled_dot_product_attention"), self._match, self._rewrite)

    def _match(self, op) -> AttentionSite | NoMatch:
        site = match_attention(op) if op.op_type == "softmax" else match_sdpa(op)
        if site and self.mode == "batched" and not self._batchable(site):
            return NoMatch("batched mode needs a fixed batch, and a fixed length for grouped-query attention")
        return site

    @staticmethod
    def _batchable(site: AttentionSite) -> bool:
        return is_static(site.query.source.shape[0]) and (site.key.repeats == 1 or is_static(site.query.seq_len))

    def _rewrite(self, block, site: AttentionSite) -> None:
        folded = site.scale == 1.0 or self._fold_scale(block, site)
        name = site.anchor.name
        with mb.set_before_op(before_op=site.anchor):
            q = self._to_bc1s(site.query, f"{name}_q")
            if not folded:
                q = mb.mul(x=q, y=np.float32(site.scale), name=f"{name}_q_scaled")
            k = self._to_bc1s(site.key, f"{name}_k")
            v = self._to_bc1s(site.value, f"{name}_v")
            terms = [self._keys_first(term, f"{name}_term{i}") for i, term in enumerate(site.terms)]
            if self.mode == "batched":
                out = self._batched(site, q, k, v, terms, name)
            else:
                out = self._per_head(site, q, k, v, terms, name)
            result = leave(out, 3, name)
        block.replace_uses_of_var_after_op(anchor_op=site.anchor, old_var=site.output, new_var=result)
        self.remove_dead(block, site.matched_ops)
        self.report.rewritten[self._site_kind(site, folded)] += 1

    @staticmethod
    def _site_kind(site: AttentionSite, folded: bool) -> str:
        """"attention", with what set the block apart: sdpa, grouped-query, a scale that could
        not be folded into the Q projection."""
        kind = "sdpa attention" if any(op.op_type == "scaled_dot_product_attention" for op in site.matched_ops) else "attention"
        if site.key.repeats > 1:
            kind += " (grouped-query)"
        return kind if folded else kind + ", scale as a multiply"

    def _fold_scale(self, block, site: AttentionSite) -> bool:
        """Fold the score scale into the Q projection's weights and bias, if Q is a conv's
        output (or a channel range of one) read only by this attention."""
        found = _scaled_conv_of(site.query.source)
        if found is None:
            return False
        conv, lo, hi = found
        weight = np.array(constant_value(conv.inputs["weight"]), copy=True)
        weight[lo:hi] *= np.asarray(site.scale, dtype=weight.dtype)
        bias = conv.inputs.get("bias")
        if bias is not None:
            bias = np.array(constant_value(bias), copy=True)
            bias[lo:hi] *= np.asarray(site.scale, dtype=bias.dtype)
        arguments = {key: conv.inputs[key] for key in ("x", "strides", "pad_type", "pad", "dilations", "groups")}
        with mb.set_before_op(before_op=conv):
            scaled = mb.conv(weight=weight, bias=bias, name=f"{conv.name}_scaled", **arguments)
        block.replace_uses_of_var_after_op(anchor_op=conv, old_var=conv.outputs[0], new_var=scaled)
        self.remove_dead(block, [conv])
        return True

    @staticmethod
    def _to_bc1s(view: HeadView, name: str):
        x = left_from(view.source)
        if x is None:
            x = enter(view.source, name)
        if view.rotary is None:
            return x
        d, heads = view.head_dim, view.heads
        # rotate_half negates each head's first half; the sign goes into the sin table.
        sign = np.where(np.arange(d) < d // 2, -1.0, 1.0).astype(np.float32)[:, None]
        cos = np.tile(view.rotary.cos.T, (heads, 1))[None, :, None, :]
        sin = np.tile(view.rotary.sin.T * sign, (heads, 1))[None, :, None, :]
        halves = mb.split(x=x, num_splits=2 * heads, axis=1, name=f"{name}_halves")
        swapped = mb.concat(values=[halves[i ^ 1] for i in range(2 * heads)], axis=1, name=f"{name}_swapped")
        return mb.add(x=mb.mul(x=x, y=cos, name=f"{name}_cos"), y=mb.mul(x=swapped, y=sin, name=f"{name}_sin"),
                      name=f"{name}_rotated")

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

    def _per_head(self, site: AttentionSite, q, k, v, terms, name: str):
        heads, kv_heads = site.heads, site.key.heads
        sq = site.query.seq_len
        chunks = [sq]
        if self.mode == "split_einsum_v2" and is_static(sq) and sq >= self.query_chunk:
            whole, rest = divmod(sq, self.query_chunk)
            chunks = [self.query_chunk] * whole + ([rest] if rest else [])
        q_heads = _split(q, heads, 1, f"{name}_q_heads")
        k_heads = _split(mb.transpose(x=k, perm=[0, 3, 2, 1], name=f"{name}_k_transposed"), kv_heads, 3, f"{name}_k_heads")
        v_heads = _split(v, kv_heads, 1, f"{name}_v_heads")
        term_parts = [self._term_parts(t, heads, chunks, f"{name}_term{i}") for i, t in enumerate(terms)]
        outputs = []
        for h in range(heads):
            group = h // site.key.repeats
            q_chunks = _split(q_heads[h], chunks, 3, f"{name}_h{h}_q_chunks")
            pieces = []
            for c, q_chunk in enumerate(q_chunks):
                tag = f"{name}_h{h}" + (f"_c{c}" if len(chunks) > 1 else "")
                scores = mb.einsum(values=(k_heads[group], q_chunk), equation=EQUATION, name=f"{tag}_scores")
                for i, parts in enumerate(term_parts):
                    scores = mb.add(x=scores, y=parts[h][c], name=f"{tag}_scores_{i}")
                weights = mb.softmax(x=scores, axis=1, name=f"{tag}_weights")
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

    def _batched(self, site: AttentionSite, q, k, v, terms, name: str):
        """One einsum pair over all heads: q as (B, d, Hkv, n * Sq), k as (B, Sk, Hkv, d). The
        reshapes leave the sequence axis to -1, so flexible lengths work too."""
        batch, d = site.query.source.shape[0], site.query.head_dim
        kv_heads, repeats = site.key.heads, site.key.repeats
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
        for i, term in enumerate(terms):
            scores = mb.add(x=scores, y=self._grouped_term(term, site, f"{name}_term{i}"), name=f"{name}_scores_{i}")
        weights = mb.softmax(x=scores, axis=1, name=f"{name}_weights")
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
        repeats = site.key.repeats
        if repeats == 1:
            return term
        kv_heads, sq = site.key.heads, site.query.seq_len
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
