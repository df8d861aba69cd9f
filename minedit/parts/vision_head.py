"""MIND-Edit's vision head F_v: hidden states of MLLM layer m -> v_insight, a CLIP-image-embedding-sized vector
(MIND-Edit §3.4 eq. 2, trained with eq. 5):

    h_m: B×L×d (layer m, prompt positions) ──LayerNorm──► scores = Linear(d→1) ──masked softmax over L──►
    pooled: B×d ──Linear(d→D), GELU, Linear(D→D)──► v_insight: B×D          (D = clip_embed_dim, 768 full size)

    ℓ_embed = 1 − cos(v_insight, CLIP_image(I_tar))                           (eq. 5)

Which positions of h_m feed F_v is not stated in the paper. Choice: a learned attention pool over the **prompt**
positions (image tokens + raw instruction, up to and including the generation prompt), not over the answer:
  * the prompt's hidden states are the same in training's teacher-forced forward over prompt + T_opt (attention is
    causal, so later tokens cannot change them) and in the prefill forward of greedy decoding at inference; so
    v_insight comes out of the very forward that starts T_opt, and never depends on the decoded text;
  * a learned scoring vector (d parameters) lets the head weight the instruction and the relevant image tokens
    instead of a plain mean dominated by hundreds of image tokens; [MM]-style query tokens would change the
    prompt the text head answers and add rows to the vocabulary for no clear gain.
The pooled vector is layer-normed first (LLM hidden states carry a few huge outlier channels), and pooling
uses only positions with attention_mask = 1, so left or right padding gives the same v_insight.
"""
import torch
import torch.nn.functional as F
from torch import nn


class VisionHead(nn.Module):
    """F_v: attention pool over the prompt positions of h_m, then a two-layer MLP to the CLIP embedding width."""

    def __init__(self, in_dim: int, embed_dim: int = 768, hidden: int | None = None):
        super().__init__()
        hidden = embed_dim if hidden is None else hidden
        self.norm = nn.LayerNorm(in_dim)
        self.score = nn.Linear(in_dim, 1)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, h_m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h_m: B×L×d (any dtype), mask: B×L (1 = a prompt position to pool) -> v_insight: B×embed_dim (fp32 head)."""
        x = self.norm(h_m.to(self.score.weight.dtype))
        scores = self.score(x).squeeze(-1).masked_fill(mask == 0, float("-inf"))  # B×L
        weights = scores.softmax(dim=-1)
        pooled = torch.einsum("bl,bld->bd", weights, x)
        return self.mlp(pooled)


def embed_loss(v_insight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_embed = 1 − cos(v_insight, CLIP_image(I_tar)), averaged over the batch, in fp32 (eq. 5)."""
    return (1 - F.cosine_similarity(v_insight.float(), target.float(), dim=-1)).mean()
