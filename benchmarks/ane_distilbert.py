"""DistilBERT written by hand in the form Apple's 2022 article "Deploying Transformers on the
Apple Neural Engine" describes (ANE_NOTES, "Apple's reference recipe"), for timing its
conversion against what ane_pipeline() does automatically. Written here from that description.

- The body runs in (B, C, 1, S); every projection is a 1x1 Conv2d.
- Attention is split per head: Q split on channels, K transposed once to (B, S, 1, C) and split
  on its last axis, scores ``einsum('bchq,bkhc->bkhq')`` in (B, Sk, 1, Sq) with the padding mask
  added as (B, Sk, 1, 1) and the softmax over axis 1, output ``einsum('bkhq,bchk->bchq')``, heads
  concatenated on the channel axis.
- LayerNorm is computed over the channel axis (axis 1); masked positions add -1e4.

:func:`from_distilbert` copies a transformers ``DistilBertModel``'s weights, so the two compute
the same function (checked by :func:`max_difference`).
"""

from __future__ import annotations

import torch
from torch import nn

MASK_VALUE = -1e4


class ChannelLayerNorm(nn.Module):
    """LayerNorm over axis 1 of a (B, C, 1, S) tensor."""

    def __init__(self, channels: int, eps: float):
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
        self.q, self.k, self.v, self.out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x, mask):
        d = self.head_dim
        queries = self.q(x).split(d, dim=1)  # (B, d, 1, Sq) each
        keys = self.k(x).transpose(1, 3).split(d, dim=3)  # (B, Sk, 1, d): the one transpose per block
        values = self.v(x).split(d, dim=1)  # (B, d, 1, Sk)
        heads = []
        for q, k, v in zip(queries, keys, values):
            scores = torch.einsum("bchq,bkhc->bkhq", q, k) * d ** -0.5 + mask
            heads.append(torch.einsum("bkhq,bchk->bchq", scores.softmax(dim=1), v))
        return self.out(torch.cat(heads, dim=1))


class Layer(nn.Module):
    def __init__(self, channels: int, heads: int, hidden: int, eps: float):
        super().__init__()
        self.attention = SplitHeadAttention(channels, heads)
        self.attention_norm = ChannelLayerNorm(channels, eps)
        self.up, self.down = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)
        self.output_norm = ChannelLayerNorm(channels, eps)

    def forward(self, x, mask):
        x = self.attention_norm(x + self.attention(x, mask))
        return self.output_norm(x + self.down(nn.functional.gelu(self.up(x))))


class AneDistilBert(nn.Module):
    """(input_ids, attention_mask), both (B, S) -> last_hidden_state in (B, C, 1, S)."""

    def __init__(self, vocab: int, positions: int, channels: int, heads: int, hidden: int, layers: int,
                 eps: float = 1e-12):
        super().__init__()
        self.words, self.positions = nn.Embedding(vocab, channels), nn.Embedding(positions, channels)
        self.embedding_norm = nn.LayerNorm(channels, eps=eps)
        self.layers = nn.ModuleList(Layer(channels, heads, hidden, eps) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.embedding_norm(self.words(input_ids) + self.positions(positions))
        x = x.transpose(1, 2).unsqueeze(2)  # (B, S, C) -> (B, C, 1, S), once, after the embeddings
        mask = ((1 - attention_mask.float()) * MASK_VALUE)[:, :, None, None]  # (B, Sk, 1, 1)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def from_distilbert(model) -> AneDistilBert:
    """The hand-written form of a transformers ``DistilBertModel``, with its weights."""
    config = model.config
    ane = AneDistilBert(config.vocab_size, config.max_position_embeddings, config.dim, config.n_heads,
                        config.hidden_dim, config.n_layers)
    ane.words.load_state_dict(model.embeddings.word_embeddings.state_dict())
    ane.positions.load_state_dict(model.embeddings.position_embeddings.state_dict())
    ane.embedding_norm.load_state_dict(model.embeddings.LayerNorm.state_dict())
    for mine, theirs in zip(ane.layers, model.transformer.layer):
        pairs = [(mine.attention.q, theirs.attention.q_lin), (mine.attention.k, theirs.attention.k_lin),
                 (mine.attention.v, theirs.attention.v_lin), (mine.attention.out, theirs.attention.out_lin),
                 (mine.up, theirs.ffn.lin1), (mine.down, theirs.ffn.lin2)]
        for conv, linear in pairs:
            conv.weight.data = linear.weight.data[:, :, None, None].clone()
            conv.bias.data = linear.bias.data.clone()
        for norm, theirs_norm in ((mine.attention_norm, theirs.sa_layer_norm),
                                  (mine.output_norm, theirs.output_layer_norm)):
            norm.load_state_dict(theirs_norm.state_dict())
    return ane.eval()


def max_difference(model, ane: AneDistilBert, input_ids, attention_mask) -> float:
    """Largest |difference| between the two models' last_hidden_state on real (unmasked) tokens."""
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        actual = ane(input_ids, attention_mask).squeeze(2).transpose(1, 2)
    valid = attention_mask.bool()
    return float((expected[valid] - actual[valid]).abs().max())
