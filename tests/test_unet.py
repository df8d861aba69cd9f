"""4 -> 8 input-channel expansion of the editing UNet."""

import torch
from diffusers import UNet2DConditionModel

from conftest import tiny_unet
from minedit.parts.unet import expand_unet_in_channels


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 7, 32, generator=g)


@torch.no_grad()
def test_expanded_unet_with_zero_source_equals_original():
    latents, t, text = inputs()
    unet = tiny_unet()
    reference = unet(latents, t, text).sample
    old_weight, old_bias = unet.conv_in.weight.clone(), unet.conv_in.bias.clone()
    assert old_bias.abs().sum() > 0  # the bias is non-trivial, so forgetting it would show

    assert expand_unet_in_channels(unet, 8) is unet
    conv = unet.conv_in
    assert conv.in_channels == 8 and unet.config.in_channels == 8
    assert conv.weight.shape == (old_weight.shape[0], 8, *old_weight.shape[2:])
    assert torch.equal(conv.weight[:, :4], old_weight)
    assert torch.equal(conv.weight[:, 4:], torch.zeros_like(conv.weight[:, 4:]))
    assert torch.equal(conv.bias, old_bias)
    assert conv.weight.requires_grad and conv.bias.requires_grad

    out = unet(torch.cat([latents, torch.zeros_like(latents)], dim=1), t, text).sample
    assert torch.equal(out, reference)
    # A non-zero source latent has no effect yet either (zero kernel), but can after training.
    out_src = unet(torch.cat([latents, torch.randn_like(latents)], dim=1), t, text).sample
    assert torch.equal(out_src, reference)


def test_noop_when_already_expanded_and_keeps_dtype():
    unet = expand_unet_in_channels(tiny_unet(), 8)
    conv = unet.conv_in
    assert expand_unet_in_channels(unet, 8).conv_in is conv

    unet = tiny_unet().to(torch.float64)
    expand_unet_in_channels(unet, 8)
    assert unet.conv_in.weight.dtype == torch.float64 and unet.conv_in.bias.dtype == torch.float64


@torch.no_grad()
def test_save_pretrained_round_trip_keeps_eight_channels(tmp_path):
    latents, t, text = inputs()
    unet = expand_unet_in_channels(tiny_unet(), 8)
    with torch.no_grad():  # train the new channels a little so the reload check covers them
        unet.conv_in.weight[:, 4:].normal_(std=0.1)
    x = torch.cat([latents, torch.randn_like(latents)], dim=1)
    expected = unet(x, t, text).sample

    unet.save_pretrained(tmp_path)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.in_channels == 8 and reloaded.conv_in.in_channels == 8
    assert torch.equal(reloaded(x, t, text).sample, expected)


@torch.no_grad()
def test_half_source_init_sees_the_prior_input_where_source_equals_target():
    # The ablation start: W·(z_t + z_src)/2 + b, so a source equal to the noisy latent gives the prior's output,
    # and the source now matters from step 0 (a zero source halves the input instead).
    latents, t, text = inputs()
    unet = tiny_unet()
    reference = unet(latents, t, text).sample
    old_weight = unet.conv_in.weight.clone()
    expand_unet_in_channels(unet, 8, source_init="half")
    w = unet.conv_in.weight
    assert torch.equal(w[:, :4], old_weight / 2) and torch.equal(w[:, 4:], old_weight / 2)
    out = unet(torch.cat([latents, latents], dim=1), t, text).sample
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unet(torch.cat([latents, torch.zeros_like(latents)], dim=1), t, text).sample,
                              reference, atol=1e-3)


def test_unknown_source_init_is_refused():
    import pytest

    for init, channels in (("copy", 8), ("half", 12)):
        with pytest.raises(ValueError, match="source_init"):
            expand_unet_in_channels(tiny_unet(), channels, source_init=init)
