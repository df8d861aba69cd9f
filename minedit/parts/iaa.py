"""IAA, InsightEdit's Image Alignment Adapter: the image branch of the bridge (InsightEdit §4.2, eq. 5).

    h: B×r×d ──mean over r──► B×d ──LayerNorm, Linear, GELU, Linear──► e = Mapper(h): B×embed_dim
    e ──Linear(embed_dim → N·embed_dim)──► B×N×embed_dim ──LayerNorm──► f_img (decoupled cross-attention tokens)

    L_IAA = ||CLIP_image(I_tar) − Mapper(h)||²   (stage 1: CLIP_image(I_src))

Choices the paper left open:
- Pooling is the mean over the r [MM] tokens: it has no parameters, is invariant to the order of the tokens
  (nothing in the r hidden states is positional for the mapper's purpose), and works for any r. The [MM] rows
  and LoRA are trained jointly, so the LLM can place whatever the mapper needs into that mean; a learned
  attention pool would add parameters without a clear gain.
- The pooled vector is layer-normed before the MLP (LLM hidden states carry a few huge outlier channels). This
  also keeps the "null image condition" (the IAA applied to zeros) finite and well defined.
- MLP hidden width defaults to embed_dim (4096 → 768 → 768 at full size, about 3.7 M parameters).
- The token expansion (Linear + LayerNorm over embed_dim) is IP-Adapter's image projection, as the paper says.
- `iaa_loss` is the mean squared error over all elements, in fp32: the paper's squared L2 norm divided by
  embed_dim (and averaged over the batch), i.e. the usual MSE; the constant factor is absorbed by the loss
  weight / learning rate.
"""

import torch
import torch.nn.functional as F
from torch import nn


class IAA(nn.Module):
    """Mapper (pool + MLP) to one CLIP-image-sized embedding, then N LayerNorm'd image tokens."""

    def __init__(self, in_dim: int, embed_dim: int = 768, num_tokens: int = 4, hidden: int | None = None):
        super().__init__()
        hidden = embed_dim if hidden is None else hidden
        self.num_tokens = num_tokens
        self.mapper = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )
        self.proj = nn.Linear(embed_dim, num_tokens * embed_dim)
        self.norm = nn.LayerNorm(embed_dim)

    def map(self, h: torch.Tensor) -> torch.Tensor:
        """h: B×r×in_dim → e: B×embed_dim (the vector trained against CLIP image embeddings)."""
        pooled = h.to(self.proj.weight.dtype).mean(dim=1)  # B×in_dim; frozen MLLMs may hand over bf16
        return self.mapper(pooled)

    def tokens(self, e: torch.Tensor) -> torch.Tensor:
        """e: B×embed_dim → f_img: B×N×embed_dim."""
        return self.norm(self.proj(e).reshape(e.shape[0], self.num_tokens, -1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.map(h)
        return e, self.tokens(e)


def iaa_loss(e: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_IAA: mean squared error over all elements, computed in fp32 (target is not detached here)."""
    return F.mse_loss(e.float(), target.float())
