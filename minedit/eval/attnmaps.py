"""Cross-attention maps of one edit: which conditioning token steers which pixels (infer.py --attention-maps).

For every cross-attention layer (attn2 of each transformer block) and a few sampler steps the recorder computes

    P = softmax(Q Kᵀ / √d)        Q: B×heads×L×d from the layer's pixels, K: B×heads×T×d from the tokens

explicitly (the UNet itself keeps using its fused SDPA kernel), averages P over heads, reshapes it to the layer's
grid (L = h_l·w_l), upsamples it bilinearly to the latent grid h×w and averages over layers. Each layer's P sums
to one over tokens at every pixel; heads, layers and bilinear weights are convex combinations, so the averaged
maps do too. The decoupled (IP-Adapter-style) image branch has its own softmax over its N image tokens: its maps
are a second group that sums to one on its own (before its weight λ, stored beside them).

Choices:
  * Forward pre-hooks on the attn2 modules, not replacement processors: the hooks only read the layer's inputs,
    so the edit is the same with and without recording (tested with torch.equal), and the decoupled processors
    keep their trained weights untouched.
  * Only the fully conditioned guidance branch is recorded: the sampler batches (conditional, image-only,
    unconditional) in one UNet call, the conditional rows first; the recorder keeps rows [:edits].
  * Steps are counted as UNet calls (the sampler makes one per step); by default three, spread over the schedule.
  * Token names: the text tokenizer's tokens when the text condition is CLIP_text(instruction) (ip2p, and
    MIND-Edit's T_opt), caught from the text encoder's first call; "q0.." for the Q-Former queries (InsightEdit,
    SmartEdit); "img0.." for the decoupled image tokens.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .. import fsio
from ..errors import UserError


def spread_steps(n_steps: int, k: int = 3) -> list[int]:
    """k step indices spread evenly over 0..n_steps-1 (first, middle, last for k = 3)."""
    k = min(k, n_steps)
    return sorted({round(i * (n_steps - 1) / max(1, k - 1)) for i in range(k)})


def softmax_attention(attn, x: torch.Tensor, ctx: torch.Tensor, to_k, mask=None) -> torch.Tensor:
    """The attention probabilities of one layer, as its processor forms them: x B×L×C pixels, ctx B×T×D tokens
    -> P: B×heads×L×T (fp32). `to_k` is the key projection (the layer's to_k, or the image branch's to_k_ip)."""
    b = x.shape[0]
    q, k = attn.to_q(x), to_k(ctx)
    d = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)  # B×heads×L×d
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)  # B×heads×T×d
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    with torch.autocast(q.device.type, enabled=False):  # the recording in fp32 whatever the UNet's precision
        logits = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)
        if mask is not None:  # additive, as prepared for SDPA: B×heads×(1 or L)×T
            logits = logits + mask.float()
        return logits.softmax(-1)


class AttentionRecorder:
    """Context manager: record per-token cross-attention maps of the conditional branch at the given steps.

    After the block: `timesteps` (one per recorded step), `text` [S × B×T×h×w], `image` [S × B×N×h×w] (empty
    without image tokens), `ip_scale` (λ seen), `text_ids` (B×T token ids of the text condition, when a
    `text_encoder` was given and ran). Steps count UNet calls from the block's start. `keep_layers=True` also
    keeps each layer's raw P (B×heads×L×T) in `layers` [S × {name: (P_text, P_image or None)}] — for tests; it
    costs memory on a full-size UNet."""

    def __init__(self, unet, steps, edits: int = 1, keep_layers: bool = False, text_encoder=None):
        self.unet, self.steps, self.edits, self.keep_layers = unet, set(steps), edits, keep_layers
        self.text_encoder = text_encoder
        self.timesteps, self.text, self.image, self.layers = [], [], [], []
        self.ip_scale, self.text_ids = None, None
        self._handles, self._call, self._on = [], -1, False

    def __enter__(self):
        from diffusers.models.attention_processor import Attention  # lazy: infer.py checks paths before loading

        from ..parts.decoupled_attention import DecoupledAttnProcessor

        self._decoupled = DecoupledAttnProcessor
        self._call = -1
        self._handles.append(self.unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        self._handles.append(self.unet.register_forward_hook(self._unet_post))
        for name, m in self.unet.named_modules():
            if isinstance(m, Attention) and m.is_cross_attention:
                hook = lambda mod, args, kw, name=name: self._layer(name, mod, args, kw)  # noqa: E731
                self._handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        if self.text_encoder is not None:
            self._handles.append(self.text_encoder.register_forward_pre_hook(self._text_pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _text_pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if self.text_ids is None and ids is not None:  # the first call is the condition; the null text comes later
            self.text_ids = ids.detach().cpu()

    def _unet_pre(self, module, args, kwargs):
        self._call += 1
        self._on = self._call in self.steps
        if self._on:
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            if sample.shape[0] % self.edits:
                raise ValueError(f"UNet batch {sample.shape[0]} is not a multiple of {self.edits} edits")
            self._hw = tuple(sample.shape[-2:])
            self._t = int(torch.as_tensor(t).flatten()[0])
            self._sum, self._n, self._layers = {}, {}, {}

    def _unet_post(self, module, args, output):
        if not self._on:
            return
        self.timesteps.append(self._t)
        self.text.append(self._sum["text"] / self._n["text"])
        if "image" in self._sum:
            self.image.append(self._sum["image"] / self._n["image"])
        if self.keep_layers:
            self.layers.append(self._layers)
        self._on = False

    @torch.no_grad()
    def _layer(self, name, attn, args, kwargs):
        if not self._on:
            return
        b = self.edits
        x = (args[0] if args else kwargs["hidden_states"])[:b]
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)[:b]
        grid = None
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, kwargs.get("temb"))
        if x.ndim == 4:  # B×C×h×w -> B×L×C
            grid = tuple(x.shape[-2:])
            x = x.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            mask = attn.prepare_attention_mask(mask[:b], ctx.shape[1], b).view(b, attn.heads, -1, ctx.shape[1])
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        p_txt = softmax_attention(attn, x, ctx, attn.to_k, mask)
        self._add("text", p_txt, grid)
        p_img, tokens, proc = None, kwargs.get("image_tokens"), attn.processor
        if tokens is not None and isinstance(proc, self._decoupled):
            p_img = softmax_attention(attn, x, tokens[:b], proc.to_k_ip)  # no mask: it indexes text tokens
            self._add("image", p_img, grid)
            scale = kwargs.get("ip_scale")
            self.ip_scale = float(proc.scale if scale is None else scale)
        if self.keep_layers:
            self._layers[name] = (p_txt, p_img)

    def _add(self, group: str, p: torch.Tensor, grid):
        """P: B×heads×L×T -> mean over heads, on the layer's grid, upsampled to the latent grid; summed."""
        b, _, length, n = p.shape
        hl, wl = grid or layer_grid(length, self._hw)
        m = p.mean(1).transpose(1, 2).reshape(b, n, hl, wl)
        m = F.interpolate(m, size=self._hw, mode="bilinear", align_corners=False) if (hl, wl) != self._hw else m
        self._sum[group] = self._sum.get(group, 0) + m.cpu()
        self._n[group] = self._n.get(group, 0) + 1


def layer_grid(length: int, hw: tuple[int, int]) -> tuple[int, int]:
    """The h_l×w_l grid of a layer with L = length pixels in a UNet whose input is h×w: each down-sampling
    (stride-2 conv, padding 1) takes a side s to ceil(s / 2)."""
    h, w = hw
    for k in range(12):
        hl, wl = -(-h // 2 ** k), -(-w // 2 ** k)
        if hl * wl == length:
            return hl, wl
    raise ValueError(f"no down-sampling of a {h}×{w} latent has {length} pixels")


def token_labels(model, recorder: AttentionRecorder, n_text: int, edit: int = 0) -> tuple[list[str], int]:
    """-> (a name per text token of edit `edit`, how many of them to show: its tokens, not the padding)."""
    if model.cfg.uses_mm_tokens or recorder.text_ids is None:
        return [f"q{i}" for i in range(n_text)], n_text
    tok = model.text_tokenizer
    ids = recorder.text_ids[edit].tolist()[:n_text]
    names = {tok.bos_token_id: "<bos>", tok.eos_token_id: "<eos>", tok.pad_token_id: "<pad>"}
    labels = [names.get(i) or tok.convert_ids_to_tokens(i).replace("</w>", "") for i in ids]
    if tok.eos_token_id is not None and tok.eos_token_id in ids:
        show = ids.index(tok.eos_token_id) + 1
    else:
        show = sum(i != tok.pad_token_id for i in ids)
    return labels, max(1, show)


def check_path(path: str) -> None:
    """--attention-maps PATH: a .png in a writable folder (the raw arrays go beside it as .npz)."""
    if os.path.splitext(path)[1].lower() != ".png":
        raise UserError(f"--attention-maps {path}: the sheet is a PNG — give a path ending in .png "
                        "(the raw maps are written beside it as .npz)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--attention-maps {path}: folder {folder} does not exist — create it or choose another")
    if not os.access(folder, os.W_OK):
        raise UserError(f"--attention-maps {path}: folder {folder} is read-only — choose another")


def save(path: str, model, recorder: AttentionRecorder, source, instruction: str, edit: int = 0) -> str:
    """Write the sheet (PATH, a PNG) and the raw maps (PATH with .npz) of edit `edit`; each atomically.
    `source` is the PIL source image. -> the .npz path."""
    from .attnsheet import render

    if not recorder.timesteps:
        raise ValueError("nothing was recorded: the sampler made fewer UNet calls than the first recorded step")
    text = torch.stack([m[edit] for m in recorder.text]).numpy()  # S×T×h×w
    image = torch.stack([m[edit] for m in recorder.image]).numpy() if recorder.image else None  # S×N×h×w
    labels, show = token_labels(model, recorder, text.shape[1], edit)
    img_labels = [f"img{i}" for i in range(0 if image is None else image.shape[1])]
    sheet = render(source, text[:, :show], labels[:show], image, img_labels, recorder.timesteps,
                   sorted(recorder.steps), recorder.ip_scale, hidden=len(labels) - show)
    fsio.save_image(sheet, path, where="--attention-maps")
    arrays = dict(text=text.astype(np.float32), text_labels=np.array(labels), text_shown=np.int64(show),
                  timesteps=np.array(recorder.timesteps, dtype=np.int64),
                  steps=np.array(sorted(recorder.steps)[:len(recorder.timesteps)], dtype=np.int64),
                  source=np.asarray(source.convert("RGB")), instruction=np.array(instruction))
    if image is not None:
        arrays.update(image=image.astype(np.float32), image_labels=np.array(img_labels),
                      ip_scale=np.float32(recorder.ip_scale))
    npz = os.path.splitext(path)[0] + ".npz"
    with fsio.atomic_path(npz, where="--attention-maps") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return npz
