"""The bridge between MLLM and UNet: Q-Former, BIM (+ conv_in residual) and IAA."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

from conftest import tiny_unet as shared_tiny_unet
from minedit.parts.bim import BIM, ConvInWithResidual, conv_in_residual, sincos_2d, wrap_conv_in
from minedit.parts.iaa import IAA, iaa_loss
from minedit.parts.qformer import QFormer


def small_qformer():
    return QFormer(in_dim=24, num_queries=7, hidden=32, layers=4, heads=4, ffn=64)


def small_bim():
    return BIM(text_dim=32, vision_dim=20, width=48, heads=4, latent_channels=8)


def randomise_zero_layers(bim):
    """Give the zero-initialised output layers random weights, so the inner paths show up in the outputs."""
    with torch.no_grad():
        for p in (*bim.out_txt.parameters(), *bim.out_img.parameters()):
            p.normal_(0, 0.1)


# ---------------------------------------------------------------- shapes


def test_small_shapes():
    torch.manual_seed(0)
    q = small_qformer()(torch.randn(3, 5, 24))
    assert q.shape == (3, 7, 32)
    f_txt, v_txt = small_bim()(q, torch.randn(3, 16, 20), latent_hw=(8, 6))
    assert f_txt.shape == (3, 7, 32) and v_txt.shape == (3, 8, 8, 6)
    e, f_img = IAA(in_dim=24, embed_dim=16, num_tokens=4)(torch.randn(3, 5, 24))
    assert e.shape == (3, 16) and f_img.shape == (3, 4, 16)


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        qformer, bim, iaa = QFormer(4096), BIM(), IAA(4096)
        h = torch.randn(2, 32, 4096)
        q = qformer(h, h_mask=torch.ones(2, 32, dtype=torch.bool))
        f_txt, v_txt = bim(q, torch.randn(2, 576, 1024), latent_hw=(32, 32))
        e, f_img = iaa(h)
    assert q.shape == (2, 77, 768) and q.is_meta
    assert f_txt.shape == (2, 77, 768) and v_txt.shape == (2, 320, 32, 32)
    assert e.shape == (2, 768) and f_img.shape == (2, 4, 768)
    # Cross-attention to h only in layers 0, 2, 4.
    assert [layer.cross_attn is not None for layer in qformer.layers] == [True, False] * 3


def test_bim_rejects_non_square_patches():
    with pytest.raises(ValueError, match="square"):
        small_bim()(torch.randn(1, 7, 32), torch.randn(1, 17, 20), latent_hw=(8, 8))


# ---------------------------------------------------------------- Q-Former


def test_qformer_gradients_reach_queries_and_cross_kv():
    torch.manual_seed(0)
    model = small_qformer()
    out = model(torch.randn(2, 5, 24))
    # A random projection of the output: the plain sum of a LayerNorm output has zero gradient.
    (out * torch.randn_like(out)).sum().backward()
    assert model.queries.grad.abs().sum() > 0
    for layer in model.layers[::2]:
        assert layer.cross_attn.k_proj_weight.grad.abs().sum() > 0
        assert layer.cross_attn.v_proj_weight.grad.abs().sum() > 0


def test_qformer_output_depends_on_h():
    torch.manual_seed(0)
    model = small_qformer()
    h = torch.randn(2, 5, 24)
    h2 = h.clone()
    h2[1, 3] += torch.randn(24)  # not a constant shift: h is layer-normed per token
    a, b = model(h), model(h2)
    torch.testing.assert_close(a[0], b[0])  # samples are independent
    assert (a[1] - b[1]).abs().max() > 1e-3


def test_qformer_padding_has_no_influence():
    torch.manual_seed(0)
    model = small_qformer().eval()
    h = torch.randn(2, 6, 24)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    out = model(h, h_mask=mask)
    h_junk = h.clone()
    h_junk[1, 3:] = 100 * torch.randn(3, 24)
    assert torch.equal(model(h_junk, h_mask=mask), out)
    # Independent reference: sample 1 alone, truncated to its real tokens, with no mask at all.
    torch.testing.assert_close(model(h[1:, :3])[0], out[1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- BIM


def test_fresh_bim_is_identity_then_trains():
    torch.manual_seed(0)
    bim = small_bim()
    q, v = torch.randn(2, 7, 32), torch.randn(2, 16, 20)
    f_txt, v_txt = bim(q, v, latent_hw=(8, 8))
    assert torch.equal(f_txt, q)
    assert torch.equal(v_txt, torch.zeros_like(v_txt))

    opt = torch.optim.Adam(bim.parameters(), lr=1e-2)
    loss = (f_txt - torch.randn_like(f_txt)).pow(2).mean() + (v_txt - torch.randn_like(v_txt)).pow(2).mean()
    loss.backward()
    assert bim.out_txt.weight.grad.abs().sum() > 0 and bim.out_img.weight.grad.abs().sum() > 0
    opt.step()
    f_txt2, v_txt2 = bim(q, v, latent_hw=(8, 8))
    assert (f_txt2 - q).abs().max() > 1e-4
    assert v_txt2.abs().max() > 1e-4


def test_bim_is_bidirectional_and_position_aware():
    torch.manual_seed(0)
    bim = small_bim()
    randomise_zero_layers(bim)
    q, v = torch.randn(1, 7, 32), torch.randn(1, 16, 20)
    f_txt, v_txt = bim(q, v, latent_hw=(8, 8))
    # Text → image: v_txt depends on q.
    assert (bim(q + torch.randn_like(q), v, (8, 8))[1] - v_txt).abs().max() > 1e-4
    # Image → text, with positions: permuting the patches changes f_txt (without positions it could not).
    f_perm = bim(q, v[:, torch.randperm(16)], (8, 8))[0]
    assert (f_perm - f_txt).abs().max() > 1e-4


def test_bim_conv_then_upsample_equals_upsample_then_conv():
    torch.manual_seed(0)
    bim = small_bim()
    randomise_zero_layers(bim)
    captured = {}
    bim.out_img.register_forward_hook(lambda m, args, out: captured.update(grid=args[0]))
    _, v_txt = bim(torch.randn(2, 7, 32), torch.randn(2, 16, 20), latent_hw=(8, 8))
    reference = bim.out_img(F.interpolate(captured["grid"], size=(8, 8), mode="bilinear", align_corners=False))
    torch.testing.assert_close(v_txt, reference, atol=1e-5, rtol=1e-5)


def test_sincos_2d_rows_and_columns():
    pos = sincos_2d(3, 8)
    assert pos.shape == (9, 8)
    grid = pos.reshape(3, 3, 8)  # row-major: [row, col, channel]
    assert torch.equal(grid[:, 0, :4], grid[:, 2, :4])  # first half encodes the row only
    assert torch.equal(grid[0, :, 4:], grid[2, :, 4:])  # second half encodes the column only
    assert len({tuple(p.tolist()) for p in pos}) == 9  # every patch distinct


# ---------------------------------------------------------------- conv_in residual


def tiny_unet():
    return shared_tiny_unet(in_channels=8)


@torch.no_grad()
def test_conv_in_wrapper_is_exact_and_keeps_state_dict():
    unet = tiny_unet()
    x, t, ctx = torch.randn(2, 8, 16, 16), torch.tensor([10, 500]), torch.randn(2, 5, 32)
    residual = torch.randn(2, 32, 16, 16)
    keys = list(unet.state_dict())
    plain = unet(x, t, ctx).sample

    # Reference for the residual: add it to the *unwrapped* conv_in's output with a forward hook.
    hook = unet.conv_in.register_forward_hook(lambda m, args, out: out + residual)
    hooked = unet(x, t, ctx).sample
    hook.remove()

    conv = unet.conv_in
    assert wrap_conv_in(unet) is unet
    wrapped = unet.conv_in
    assert isinstance(wrapped, ConvInWithResidual) and wrap_conv_in(unet).conv_in is wrapped  # idempotent
    assert wrapped.weight is conv.weight and wrapped.bias is conv.bias
    assert list(unet.state_dict()) == keys

    assert torch.equal(unet(x, t, ctx).sample, plain)
    with conv_in_residual(unet, torch.zeros_like(residual)):
        assert torch.equal(unet(x, t, ctx).sample, plain)
    with conv_in_residual(unet, residual):
        out = unet(x, t, ctx).sample
    assert (out - plain).abs().max() > 1e-3
    torch.testing.assert_close(out, hooked)
    assert wrapped.residual is None


def test_conv_in_residual_clears_on_error_and_needs_wrap():
    unet = tiny_unet()
    with pytest.raises(TypeError, match="wrap_conv_in"):
        with conv_in_residual(unet, torch.zeros(1, 32, 16, 16)):
            pass
    wrap_conv_in(unet)
    with pytest.raises(RuntimeError):
        with conv_in_residual(unet, torch.zeros(1, 32, 16, 16)):
            raise RuntimeError("boom")
    assert unet.conv_in.residual is None


def test_conv_in_residual_gets_gradient():
    conv = ConvInWithResidual(nn.Conv2d(8, 4, 3, padding=1))
    conv.residual = torch.zeros(1, 4, 5, 5, requires_grad=True)
    conv(torch.randn(1, 8, 5, 5)).pow(2).sum().backward()
    assert conv.residual.grad.abs().sum() > 0 and conv.weight.grad is not None


# ---------------------------------------------------------------- IAA


def test_iaa_loss_and_layernorm():
    torch.manual_seed(0)
    iaa = IAA(in_dim=24, embed_dim=16, num_tokens=4)
    h = torch.randn(3, 5, 24)
    e, f_img = iaa(h)
    assert iaa_loss(e, e.detach()).item() == 0.0
    target = torch.randn(3, 16)
    ref = ((e.double() - target.double()) ** 2).mean()
    loss = iaa_loss(e.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(iaa_loss(e, target).double(), ref)
    # LayerNorm over embed_dim on every token (fresh affine: mean 0, std 1).
    torch.testing.assert_close(f_img.mean(-1), torch.zeros(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(f_img.var(-1, unbiased=False), torch.ones(3, 4), atol=1e-3, rtol=0)
    torch.testing.assert_close(iaa.tokens(e), f_img)


def test_iaa_mean_pooling_is_order_free_and_any_r():
    torch.manual_seed(0)
    iaa = IAA(in_dim=24, embed_dim=16)
    h = torch.randn(2, 5, 24)
    torch.testing.assert_close(iaa.map(h[:, torch.randperm(5)]), iaa.map(h))
    # Mean pooling: repeating every token (r → 2r) leaves the pooled vector, and so e, unchanged.
    torch.testing.assert_close(iaa.map(torch.cat([h, h], 1)), iaa.map(h))
    assert torch.isfinite(iaa(torch.zeros(2, 5, 24))[1]).all()  # the null image condition
