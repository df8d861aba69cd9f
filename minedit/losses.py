"""The editing stage's diffusion loss (InsightEdit eq. 7) and its two optional weightings.

    L = E_t [ w(t) · Σ_px m(px) (pred − goal)² / Σ_px m(px) ]

with goal = ε or v (the scheduler's prediction type). Both weightings are off by default, and then L is exactly
the plain MSE the papers train with:

  * w(t): Min-SNR-γ (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy", 2023). SNR(t) =
    ᾱ_t / (1 − ᾱ_t). The paper's weight for an ε loss is min(SNR, γ) / SNR; a v loss already weighs each timestep
    by SNR + 1 relative to an x₀ loss, so its weight is min(SNR, γ) / (SNR + 1). γ = 5 in the paper. Low-noise
    steps (huge SNR), which mostly teach copying the source, stop dominating the gradient.
  * m(px): an up-weighted edit region, 1 outside the mask and `mask_weight` inside it (the mask brought to the
    latent grid by max-pooling: a latent pixel touched by the edit counts as edited). Normalised per sample, so
    the loss keeps its scale. Most of a toy image is background that the UNet copies; this spends more of the
    gradient where the edit happens. An ablation of ours: none of the three papers uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each sample's timestep: B."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ per-sample weight: B (see the module docstring)."""
    s = snr(alphas_cumprod, t)
    return s.clamp(max=gamma) / (s + 1 if prediction_type == "v_prediction" else s)


def region_weight(mask: torch.Tensor, latent_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """B×1×H×W edit mask in {0, 1} (image size) -> B×1×h×w weights, 1 outside the edit and `weight` inside."""
    m = F.adaptive_max_pool2d(mask.float(), latent_hw)
    return 1 + (weight - 1) * m


def diffusion_loss(pred: torch.Tensor, goal: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
                   prediction_type: str, snr_gamma: float = 0.0, mask: torch.Tensor | None = None,
                   mask_weight: float = 1.0) -> torch.Tensor:
    """pred, goal: B×C×h×w; t: B; mask: B×1×H×W or None. With snr_gamma = 0 and mask_weight = 1 this is
    F.mse_loss(pred, goal), computed as such."""
    weigh_region = mask is not None and mask_weight != 1.0
    if snr_gamma <= 0 and not weigh_region:
        return F.mse_loss(pred.float(), goal.float())
    err = (pred.float() - goal.float()).pow(2)
    if not weigh_region:
        per_sample = err.mean(dim=(1, 2, 3))
    else:
        w = region_weight(mask.to(err.device), tuple(err.shape[-2:]), mask_weight)  # B×1×h×w
        per_sample = (err * w).mean(dim=(1, 2, 3)) / w.mean(dim=(1, 2, 3))
    if snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(alphas_cumprod, t, snr_gamma, prediction_type)
    return per_sample.mean()
