"""Q-Former: a small BLIP-2-style transformer that reads the MLLM's [MM] hidden states into CLIP-text space.

SmartEdit §4.1 eq. 3 (f = Q_beta(h)) and InsightEdit §4.2 eq. 3 (q' = Q_beta(q, h)): Q learnable query tokens
attend to themselves (self-attention) and, every `cross_every`-th layer, to the r [MM] hidden states h of the
LLM (cross-attention, keys/values projected from the LLM width d). The Q outputs are used directly as the
77×768 text condition of the Stable Diffusion UNet (after BIM), so there is **no output projection**.

    h: B×r×d ──LayerNorm──► K/V source
    queries: 1×Q×hidden ──expand──► B×Q×hidden ──layers──► final LayerNorm ──► q': B×Q×hidden

Choices the design left open:
- Pre-LN layers (x = x + Attn(LN x)), then one final LayerNorm. Pre-LN trains stably from random init without
  warm-up; the final LayerNorm makes the output a normalised sequence, like the CLIP text encoder's
  `last_hidden_state` (which also ends in a LayerNorm) that it replaces and is aligned to in stage 1.
- h is layer-normed once (over d) before the cross-attentions: LLM hidden states have a few very large
  outlier channels, and normalising makes the K/V scale independent of the MLLM that produced them.
- Attention is `nn.MultiheadAttention(batch_first=True, kdim=d, vdim=d)` called with `need_weights=False`,
  which dispatches to `F.scaled_dot_product_attention` (flash / memory-efficient kernels where available).
- `h_mask` follows the Hugging Face convention: True (or 1) marks a real token, False (0) a padded one.
  Padded positions get exactly zero attention weight. At least one position per sample must be real.
- Random init (PyTorch defaults for the layers, queries ~ N(0, 0.02²)); no BERT weights are loaded.
"""

import torch
from torch import nn


class QFormerLayer(nn.Module):
    """One pre-LN layer: self-attention over the queries, optional cross-attention to h, GELU FFN."""

    def __init__(self, hidden: int, heads: int, ffn: int, kv_dim: int | None, dropout: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(hidden)
        self.self_attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        # kv_dim None = a layer without cross-attention (the odd layers for cross_every=2).
        if kv_dim is not None:
            self.norm_cross = nn.LayerNorm(hidden)
            self.cross_attn = nn.MultiheadAttention(
                hidden, heads, dropout=dropout, batch_first=True, kdim=kv_dim, vdim=kv_dim
            )
        else:
            self.cross_attn = None
        self.norm_ffn = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, hidden), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, h: torch.Tensor, h_pad: torch.Tensor | None) -> torch.Tensor:
        # x: B×Q×hidden, h: B×r×d (already normalised), h_pad: B×r bool, True = ignore.
        y = self.norm_self(x)
        x = x + self.self_attn(y, y, y, need_weights=False)[0]
        if self.cross_attn is not None:
            y = self.norm_cross(x)
            x = x + self.cross_attn(y, h, h, key_padding_mask=h_pad, need_weights=False)[0]
        return x + self.ffn(self.norm_ffn(x))


class QFormer(nn.Module):
    """Q learnable queries → B×Q×hidden, reading h (B×r×in_dim) by cross-attention in layers 0, k, 2k, ..."""

    def __init__(
        self,
        in_dim: int,
        num_queries: int = 77,
        hidden: int = 768,
        layers: int = 6,
        heads: int = 12,
        ffn: int = 3072,
        cross_every: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, hidden) * 0.02)
        self.h_norm = nn.LayerNorm(in_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, heads, ffn, in_dim if i % cross_every == 0 else None, dropout)
            for i in range(layers)
        )
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, h: torch.Tensor, h_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: B×r×in_dim MLLM hidden states; h_mask: optional B×r (True/1 = real token). Returns B×Q×hidden."""
        # Frozen MLLMs run in bf16; the Q-Former's own parameters decide the compute dtype.
        h = self.h_norm(h.to(self.queries.dtype))
        h_pad = None if h_mask is None else ~h_mask.bool()  # nn.MultiheadAttention: True = ignore
        x = self.queries.expand(h.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, h, h_pad)
        return self.final_norm(x)
