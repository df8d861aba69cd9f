"""Decoupled cross-attention (IP-Adapter style) for the editing UNet.

InsightEdit eq. 6 (and MIND-Edit §3.1, IP-Adapter) adds a second, parallel cross-attention per UNet
cross-attention layer that reads image tokens instead of text tokens, sharing the layer's query:

    Z = Attention(Q, K_txt, V_txt) + λ · Attention(Q, K_img, V_img)

with K_txt = f_txt W_k, V_txt = f_txt W_v (the layer's own ``to_k``/``to_v``) and K_img = f_img W'_k,
V_img = f_img W'_v (new ``to_k_ip``/``to_v_ip``, Linear without bias). As in IP-Adapter the sum is taken on the
attention outputs, before the layer's output projection ``to_out``.

``DecoupledAttnProcessor`` is a diffusers attention processor for the cross-attention (attn2) layers. Its text
part repeats diffusers' ``AttnProcessor2_0`` op for op, so λ = 0 or ``image_tokens=None`` reproduces the stock
UNet bit for bit. Image tokens (B×N×cross_dim) reach it explicitly through the UNet's
``cross_attention_kwargs={"image_tokens": f_img}`` (``Attention.forward`` forwards every keyword that the
processor's ``__call__`` declares); they are never sliced off the end of the text tokens.

Choices the design left open:

* ``image_tokens=None`` skips the image branch (stage 2: the branch does not exist yet). Given tokens with λ = 0
  the branch is still computed and added with weight 0, so that under DDP every ``to_k_ip``/``to_v_ip`` parameter
  takes part in the graph. Dropping the image condition for guidance means passing the null image tokens, never
  ``None``.
* The image branch uses the text branch's (possibly ``norm_q``-normalised) query and applies the layer's
  ``norm_k`` to its keys, but not ``norm_cross`` (a normalisation of the text encoder's output) and not the
  attention mask (which indexes text tokens). SD1.5 has none of these, so this only matters for other UNets.
* ``cross_attention_kwargs`` reach the self-attention (attn1) layers too, and ``Attention.forward`` logs a
  warning on every call for keywords a processor does not declare. Self-attention therefore gets
  ``SelfAttnProcessor``: diffusers' ``AttnProcessor2_0`` unchanged, with ``image_tokens``/``ip_scale`` declared
  and ignored.

Pitfalls (diffusers 0.42): ``UNet2DConditionModel.set_attn_processor(dict)`` pops the entries of the dict it is
given (we pass it a copy), and ``set_default_attn_processor()`` (like any later ``set_attn_processor``) replaces
the processors and their trained ``to_k_ip``/``to_v_ip`` weights — do not call it after installing. The
processors are ``nn.Module``s, so their weights are registered under the attention layers, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.weight``. ``from_pretrained`` builds a
stock UNet and ignores these keys; the reload path is: build UNet → ``install_decoupled_attention`` →
``load_state_dict``.
"""

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


class SelfAttnProcessor(AttnProcessor2_0):
    """Diffusers' stock ``AttnProcessor2_0`` that silently accepts (and ignores) the decoupled-attention keywords."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        ip_scale: float | None = None,
    ) -> torch.Tensor:
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads·d) -> (B, heads, L, d)."""
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads·d)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class DecoupledAttnProcessor(nn.Module):
    """Cross-attention processor computing Z = Attn(Q, K_txt, V_txt) + λ·Attn(Q, K_img, V_img) (eq. 6)."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.scale = scale  # λ; overridden per call by the `ip_scale` keyword
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False, device=device, dtype=dtype)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        ip_scale: float | None = None,
    ) -> torch.Tensor:
        # Text branch: the same ops in the same order as diffusers' AttnProcessor2_0.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            # (B, C, H, W) -> (B, H*W, C)
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # SDPA wants the mask as (B, heads, L_query, L_key)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query, key, value = (_split_heads(x, attn.heads) for x in (query, key, value))

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = _merge_heads(hidden_states).to(query.dtype)

        # Image branch: computed whenever tokens are given, even at λ = 0 (DDP needs every parameter used).
        if image_tokens is not None:
            scale = self.scale if ip_scale is None else ip_scale
            # image_tokens: (B, N, cross_dim) -> K_img, V_img: (B, heads, N, d)
            ip_key = _split_heads(self.to_k_ip(image_tokens), attn.heads)
            ip_value = _split_heads(self.to_v_ip(image_tokens), attn.heads)
            if attn.norm_k is not None:
                ip_key = attn.norm_k(ip_key)
            ip_hidden_states = F.scaled_dot_product_attention(
                query, ip_key, ip_value, attn_mask=None, dropout_p=0.0, is_causal=False
            )
            hidden_states = hidden_states + scale * _merge_heads(ip_hidden_states).to(query.dtype)

        # Back to the stock processor: output projection, dropout, reshape, residual, rescale.
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, cross_attention_dim={self.cross_attention_dim}, scale={self.scale}"


def install_decoupled_attention(
    unet: UNet2DConditionModel, scale: float = 1.0, dtype: torch.dtype | None = None
) -> list[DecoupledAttnProcessor]:
    """Give every cross-attention layer a ``DecoupledAttnProcessor`` initialised from its own ``to_k``/``to_v``.

    Self-attention layers get ``SelfAttnProcessor`` (stock ``AttnProcessor2_0``). The new weights are on the
    device of the layer's ``to_k`` and in ``dtype`` (default: ``to_k``'s dtype); works on ``meta`` UNets.
    Returns the new processors in ``unet.attn_processors`` order.
    """
    processors: dict[str, nn.Module | AttnProcessor2_0] = {}
    decoupled = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if module.is_cross_attention:
            to_k, to_v = module.to_k, module.to_v
            proc = DecoupledAttnProcessor(
                hidden_size=to_k.out_features,
                cross_attention_dim=to_k.in_features,
                scale=scale,
                device=to_k.weight.device,
                dtype=dtype or to_k.weight.dtype,
            )
            decoupled.append(proc)
        else:
            proc = SelfAttnProcessor()
        processors[f"{name}.processor"] = proc
    # set_attn_processor empties the dict it receives; give it a copy.
    unet.set_attn_processor(dict(processors))
    restart_image_branch(unet)
    return decoupled


def restart_image_branch(unet: UNet2DConditionModel) -> None:
    """Set every ``to_k_ip``/``to_v_ip`` to a copy of its layer's current ``to_k``/``to_v`` (IP-Adapter's start).

    The processors are installed when the model is built, from the UNet as built; a stage that trains the UNet
    before the image branch exists (InsightEdit's stage 2) moves ``to_k``/``to_v`` on. The stage that first trains
    the branch calls this after loading the previous stage, so the branch starts from the UNet it extends, not
    from the one the first stage began with.
    """
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, Attention) and isinstance(module.processor, DecoupledAttnProcessor):
                module.processor.to_k_ip.weight.copy_(module.to_k.weight)
                module.processor.to_v_ip.weight.copy_(module.to_v.weight)


def decoupled_processors(unet: UNet2DConditionModel) -> dict[str, DecoupledAttnProcessor]:
    """The installed decoupled processors, keyed like ``unet.attn_processors``."""
    return {k: p for k, p in unet.attn_processors.items() if isinstance(p, DecoupledAttnProcessor)}


def set_ip_scale(unet: UNet2DConditionModel, scale: float) -> None:
    """Set λ on every decoupled processor (a per-call ``ip_scale`` keyword still takes precedence)."""
    for proc in decoupled_processors(unet).values():
        proc.scale = scale


def decoupled_parameters(unet: UNet2DConditionModel) -> Iterator[nn.Parameter]:
    """The ``to_k_ip``/``to_v_ip`` weights of every decoupled processor (the stage-3 trainable set)."""
    for proc in decoupled_processors(unet).values():
        yield from proc.parameters()


def decoupled_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The decoupled-attention weights under their ``unet.state_dict()`` keys (load with ``strict=False``)."""
    return {
        f"{name}.{key}": tensor
        for name, proc in decoupled_processors(unet).items()
        for key, tensor in proc.state_dict().items()
    }
