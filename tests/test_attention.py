"""Decoupled cross-attention: λ = 0 is the stock UNet, eq. 6 numerics, init, gradients, state-dict round trip."""

import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from safetensors.torch import load_file, save_file

from conftest import tiny_unet
from minedit.parts.decoupled_attention import (
    DecoupledAttnProcessor,
    decoupled_parameters,
    decoupled_processors,
    decoupled_state_dict,
    install_decoupled_attention,
    set_ip_scale,
)

CROSS_DIM = 32


def inputs(seed: int = 1, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, 7, CROSS_DIM, generator=g)
    image = torch.randn(batch, 4, CROSS_DIM, generator=g)
    return sample, torch.tensor([10, 500]), text, image


def cross_attention_layers(unet):
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


@pytest.fixture
def diffusers_warnings():
    """Collect records logged by diffusers (its root logger does not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@torch.no_grad()
def test_zero_scale_and_no_tokens_equal_stock_unet(diffusers_warnings):
    sample, t, text, image = inputs()
    unet = tiny_unet()
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    stock = unet(sample, t, text).sample

    install_decoupled_attention(unet, scale=0.0)
    assert torch.equal(unet(sample, t, text).sample, stock)
    assert torch.equal(unet(sample, t, text, cross_attention_kwargs={"image_tokens": image}).sample, stock)
    set_ip_scale(unet, 1.0)
    assert torch.equal(unet(sample, t, text).sample, stock)  # no tokens: branch inactive
    assert torch.equal(
        unet(sample, t, text, cross_attention_kwargs={"image_tokens": image, "ip_scale": 0.0}).sample, stock
    )
    with_image = unet(sample, t, text, cross_attention_kwargs={"image_tokens": image}).sample
    assert not torch.allclose(with_image, stock, atol=1e-4)
    # Per-call ip_scale overrides the stored λ.
    set_ip_scale(unet, 0.0)
    assert torch.equal(
        unet(sample, t, text, cross_attention_kwargs={"image_tokens": image, "ip_scale": 1.0}).sample, with_image
    )
    # Neither attn1 nor attn2 complained about (and dropped) the keywords.
    assert not [r for r in diffusers_warnings if "not expected" in r.getMessage()]


@torch.no_grad()
def test_processor_runs_on_every_cross_attention_and_only_there(monkeypatch):
    sample, t, text, image = inputs()
    unet = tiny_unet()
    procs = install_decoupled_attention(unet)
    cross = cross_attention_layers(unet)
    assert len(procs) == len(cross) == 4  # down 1, mid 1, up 2 (layers_per_block + 1)
    assert all(name.endswith("attn2") for name in cross)
    for name, proc in unet.attn_processors.items():
        assert isinstance(proc, DecoupledAttnProcessor) == name.endswith("attn2.processor")
        assert isinstance(proc, AttnProcessor2_0) == name.endswith("attn1.processor")  # stock self-attention

    calls = []
    original = DecoupledAttnProcessor.__call__

    @functools.wraps(original)  # keeps the signature diffusers inspects to forward keywords
    def counting(self, attn, hidden_states, **kw):
        calls.append((id(attn), kw.get("image_tokens") is image, kw.get("encoder_hidden_states") is not None))
        return original(self, attn, hidden_states, **kw)

    monkeypatch.setattr(DecoupledAttnProcessor, "__call__", counting)
    unet(sample, t, text, cross_attention_kwargs={"image_tokens": image})
    assert sorted(c[0] for c in calls) == sorted(id(m) for m in cross.values())
    assert all(got_tokens and got_text for _, got_tokens, got_text in calls)


def test_init_copies_to_k_to_v_and_dtype():
    unet = tiny_unet()
    install_decoupled_attention(unet)
    for name, attn in cross_attention_layers(unet).items():
        proc = attn.processor
        assert torch.equal(proc.to_k_ip.weight, attn.to_k.weight)
        assert torch.equal(proc.to_v_ip.weight, attn.to_v.weight)
        assert proc.to_k_ip.bias is None and proc.to_v_ip.bias is None
        assert proc.to_k_ip.weight.data_ptr() != attn.to_k.weight.data_ptr()  # a copy, not a tie
    # Requested dtype; the UNet itself stays fp32.
    unet = tiny_unet()
    procs = install_decoupled_attention(unet, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in decoupled_parameters(unet))
    assert procs[0].to_k_ip.weight.dtype == torch.float64 and unet.conv_in.weight.dtype == torch.float32


def test_install_on_meta_device():
    with torch.device("meta"):
        unet = tiny_unet()
    procs = install_decoupled_attention(unet)
    assert len(procs) == 4
    for attn in cross_attention_layers(unet).values():
        w = attn.processor.to_k_ip.weight
        assert w.is_meta and w.shape == attn.to_k.weight.shape


def test_eq6_against_hand_written_attention():
    torch.manual_seed(3)
    query_dim, heads, head_dim = 32, 4, 8
    attn = Attention(query_dim, cross_attention_dim=CROSS_DIM, heads=heads, dim_head=head_dim).eval()
    proc = DecoupledAttnProcessor(heads * head_dim, CROSS_DIM, scale=0.7)
    torch.nn.init.normal_(proc.to_k_ip.weight, std=0.2)
    torch.nn.init.normal_(proc.to_v_ip.weight, std=0.2)
    attn.set_processor(proc)

    x = torch.randn(2, 10, query_dim)
    f_txt = torch.randn(2, 7, CROSS_DIM)
    f_img = torch.randn(2, 4, CROSS_DIM)

    def split(t):  # (B, L, heads*d) -> (B, heads, L, d)
        return t.reshape(t.shape[0], t.shape[1], heads, head_dim).permute(0, 2, 1, 3)

    def softmax_attention(q, k, v):
        return F.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v

    with torch.no_grad():
        q = split(x @ attn.to_q.weight.T)
        z_txt = softmax_attention(q, split(f_txt @ attn.to_k.weight.T), split(f_txt @ attn.to_v.weight.T))
        z_img = softmax_attention(q, split(f_img @ proc.to_k_ip.weight.T), split(f_img @ proc.to_v_ip.weight.T))
        z = (z_txt + 0.7 * z_img).permute(0, 2, 1, 3).reshape(2, 10, heads * head_dim)
        expected = z @ attn.to_out[0].weight.T + attn.to_out[0].bias

        got = attn(x, f_txt, image_tokens=f_img)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        # λ override and the text-only path follow the same reference.
        text_only = z_txt.permute(0, 2, 1, 3).reshape(2, 10, heads * head_dim)
        expected_text = text_only @ attn.to_out[0].weight.T + attn.to_out[0].bias
        torch.testing.assert_close(attn(x, f_txt), expected_text, atol=1e-5, rtol=1e-5)
        zero_scale = attn(x, f_txt, image_tokens=f_img, ip_scale=0.0)
        torch.testing.assert_close(zero_scale, expected_text, atol=1e-5, rtol=1e-5)


def test_gradients_reach_image_projections_even_at_zero_scale():
    sample, t, text, image = inputs()
    for scale in (1.0, 0.0):
        unet = tiny_unet()
        unet.requires_grad_(False)
        install_decoupled_attention(unet, scale=scale)
        params = list(decoupled_parameters(unet))
        assert len(params) == 8 and all(p.requires_grad for p in params)
        out = unet(sample, t, text, cross_attention_kwargs={"image_tokens": image}).sample
        out.square().mean().backward()
        # At λ = 0 the branch is still in the graph (DDP), its gradient just vanishes.
        assert all(p.grad is not None for p in params)
        assert all(p.grad.abs().sum() > 0 for p in params) == (scale != 0.0)


def test_state_dict_round_trip(tmp_path):
    sample, t, text, image = inputs()
    unet = tiny_unet()
    install_decoupled_attention(unet)
    with torch.no_grad():  # move the weights away from their init so the reload check means something
        for p in decoupled_parameters(unet):
            p.add_(0.05 * torch.randn_like(p))
    state = unet.state_dict()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight"
    assert key in state
    ip_keys = {k for k in state if ".to_k_ip." in k or ".to_v_ip." in k}
    assert set(decoupled_state_dict(unet)) == ip_keys and len(ip_keys) == 8
    assert set(decoupled_processors(unet)) == {k.rsplit(".", 2)[0] for k in ip_keys}

    path = tmp_path / "unet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    fresh = tiny_unet(seed=123)  # different random init
    install_decoupled_attention(fresh)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    kwargs = {"image_tokens": image}
    with torch.no_grad():
        assert torch.equal(
            fresh(sample, t, text, cross_attention_kwargs=kwargs).sample,
            unet(sample, t, text, cross_attention_kwargs=kwargs).sample,
        )
    # A stock UNet cannot take the decoupled keys strictly: they must be installed first.
    with pytest.raises(RuntimeError, match="to_k_ip"):
        tiny_unet().load_state_dict(load_file(str(path)), strict=True)
