"""A BERT-style encoder written by hand in the form Apple's ANE recipe prescribes, for the
calibration set: the stand-in for Apple's ml-ane-transformers DistilBERT and for hft2ane's
re-implementations of BERT and RoBERTa (which follow the same recipe). Written here from the
recipe in shared/ANE_NOTES.md, not from Apple's code.

The recipe: activations are (B, C, 1, S); every projection is a 1x1 conv; the norm is computed
over the channel axis; attention is split per head, Q sliced on channels, K transposed once to
(B, S, 1, C) and sliced on its last axis, scores are (B, Sk, 1, Sq) with the softmax over axis 1
and a (B, Sk, 1, 1) additive padding mask of -1e4; heads are concatenated on channels.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

MASK_VALUE = -1e4


class ChannelLayerNorm(nn.Module):
    """LayerNorm over axis 1 of (B, C, 1, S), spelled as mean / centre / variance / rsqrt."""

    def __init__(self, channels: int, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        centred = x - x.mean(dim=1, keepdim=True)
        scale = torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + self.eps)
        return centred * scale * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class SplitHeadAttention(nn.Module):
    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, channels // heads
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.output = nn.Conv2d(channels, channels, 1)

    def forward(self, x, key_mask):
        d = self.head_dim
        queries = self.query(x).split(d, dim=1)  # each (B, d, 1, Sq)
        keys = self.key(x).permute(0, 3, 2, 1).split(d, dim=3)  # one transpose: each (B, Sk, 1, d)
        values = self.value(x).split(d, dim=1)  # each (B, d, 1, Sk)
        heads = []
        for q, k, v in zip(queries, keys, values):
            scores = torch.einsum("bchq,bkhc->bkhq", q, k) * (1.0 / math.sqrt(d)) + key_mask
            weights = scores.softmax(dim=1)
            heads.append(torch.einsum("bkhq,bchk->bchq", weights, v))
        return self.output(torch.cat(heads, dim=1))


class EncoderLayer(nn.Module):
    """Post-norm (BERT, DistilBERT): norm(x + attention(x)), then norm(h + ffn(h))."""

    def __init__(self, channels: int, heads: int, ffn: int):
        super().__init__()
        self.attention = SplitHeadAttention(channels, heads)
        self.attention_norm = ChannelLayerNorm(channels)
        self.expand = nn.Conv2d(channels, ffn, 1)
        self.contract = nn.Conv2d(ffn, channels, 1)
        self.output_norm = ChannelLayerNorm(channels)

    def forward(self, x, key_mask):
        h = self.attention_norm(x + self.attention(x, key_mask))
        return self.output_norm(h + self.contract(nn.functional.gelu(self.expand(h))))


class AppleFormEncoder(nn.Module):
    """Token ids and a (B, S) padding mask in, (B, C, 1, S) hidden states out."""

    def __init__(self, vocab: int, channels: int, heads: int, ffn: int, layers: int, positions: int,
                 token_types: int = 0):
        super().__init__()
        self.words = nn.Embedding(vocab, channels)
        self.positions = nn.Embedding(positions, channels)
        self.token_types = nn.Embedding(token_types, channels) if token_types else None
        self.embedding_norm = ChannelLayerNorm(channels)
        self.layers = nn.ModuleList(EncoderLayer(channels, heads, ffn) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        length = input_ids.shape[1]
        embedded = self.words(input_ids) + self.positions.weight[:length].unsqueeze(0)
        if self.token_types is not None:
            embedded = embedded + self.token_types.weight[0]
        x = embedded.transpose(1, 2).unsqueeze(2)  # (B, C, 1, S)
        x = self.embedding_norm(x)
        key_mask = ((1.0 - attention_mask.to(x.dtype)) * MASK_VALUE)[:, :, None, None]  # (B, Sk, 1, 1)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


def from_distilbert(model) -> AppleFormEncoder:
    """The Apple-form encoder carrying a transformers ``DistilBertModel``'s weights: the same
    function, hand-written (``max_difference`` checks it)."""
    config = model.config
    ane = AppleFormEncoder(config.vocab_size, config.dim, config.n_heads, config.hidden_dim, config.n_layers,
                           config.max_position_embeddings)
    ane.words.load_state_dict(model.embeddings.word_embeddings.state_dict())
    ane.positions.load_state_dict(model.embeddings.position_embeddings.state_dict())
    ane.embedding_norm.load_state_dict(model.embeddings.LayerNorm.state_dict())
    for mine, theirs in zip(ane.layers, model.transformer.layer):
        attention = mine.attention
        pairs = [(attention.query, theirs.attention.q_lin), (attention.key, theirs.attention.k_lin),
                 (attention.value, theirs.attention.v_lin), (attention.output, theirs.attention.out_lin),
                 (mine.expand, theirs.ffn.lin1), (mine.contract, theirs.ffn.lin2)]
        for conv, linear in pairs:
            conv.weight.data = linear.weight.data[:, :, None, None].clone()
            conv.bias.data = linear.bias.data.clone()
        mine.attention_norm.load_state_dict(theirs.sa_layer_norm.state_dict())
        mine.output_norm.load_state_dict(theirs.output_layer_norm.state_dict())
    return ane.eval()


def max_difference(model, ane: AppleFormEncoder, input_ids, attention_mask) -> float:
    """Largest |difference| between the two models' last_hidden_state on real (unmasked) tokens."""
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = ane(input_ids, attention_mask).squeeze(2).transpose(1, 2)
    valid = attention_mask.bool()
    return float((expected[valid] - actual[valid]).abs().max())


@functools.cache
def distilbert_converted(seq_len: int = 128):
    """Stock DistilBERT-base (``fixtures.families.distilbert_base``'s seeded weights) in this form,
    converted in fp16 through coremltools' DEFAULT pipeline, once per process: the MLModel."""
    from fixtures.families import distilbert_base
    from milpasses.convert.coreml import convert_traced

    model, inputs, _ = distilbert_base(seq_len)
    examples = tuple(torch.from_numpy(v.astype("int64")) for v in inputs.values())
    with torch.no_grad():
        traced = torch.jit.trace(from_distilbert(model), examples)
    return convert_traced(traced, inputs, "fp16")
