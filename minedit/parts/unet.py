"""The editing UNet's 8-channel input (InstructPix2Pix convention, InsightEdit eq. 7).

The editing UNet sees concat[z_t, E(I_src)] along channels: 4 noisy target-latent channels followed by 4 source
latent channels. Starting from a 4-channel text-to-image UNet, ``conv_in`` is widened: the old kernel goes into
the first 4 input channels, the new ones start at zero, and the bias is copied (the diffusers InstructPix2Pix
training example leaves the new conv's bias at its random init). With a zero source latent the widened UNet
therefore computes exactly what the original did. The config is updated so ``save_pretrained`` /
``from_pretrained`` round-trip the 8-channel model.

``source_init="half"`` is an ablation, not the papers' start: both halves get half the old kernel, so
conv_in([z_t, z_src]) = W·(z_t + z_src)/2 + b. Where the target equals the source (the background, t → 0) that
is exactly the prior's conv_in(z_t), and at high noise the UNet sees a half-noised source: a start biased towards
copying the source instead of ignoring it. (Guidance's image-dropped branch, a zero source, then starts at half
the prior's input; training on those rows teaches that branch its own use of the kernel.)
"""

import torch
from diffusers import UNet2DConditionModel
from torch import nn


SOURCE_INITS = ("zero", "half")


def expand_unet_in_channels(unet: UNet2DConditionModel, in_channels: int = 8,
                            source_init: str = "zero") -> UNet2DConditionModel:
    """Widen ``unet.conv_in`` in place to ``in_channels`` inputs and return the UNet; the extra channels start at
    zero, or with ``source_init="half"`` (exactly doubled width only) both halves start at half the old kernel."""
    old = unet.conv_in
    if old.in_channels == in_channels:
        return unet
    if in_channels < old.in_channels:
        raise ValueError(f"cannot shrink conv_in from {old.in_channels} to {in_channels} input channels")
    if source_init not in SOURCE_INITS or (source_init == "half" and in_channels != 2 * old.in_channels):
        raise ValueError(f"source_init must be one of {SOURCE_INITS} ('half' only when doubling the channels), "
                         f"not {source_init!r}")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        # weight: (out, in, kh, kw); with "zero" the extra input channels contribute nothing until trained.
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if source_init == "half":  # W·(z_t + z_src)/2: the prior's input wherever z_src = z_t
            new.weight.mul_(0.5)
            new.weight[:, old.in_channels:].copy_(new.weight[:, : old.in_channels])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    unet.conv_in = new
    unet.register_to_config(in_channels=in_channels)
    return unet
