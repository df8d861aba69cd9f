"""The editing sampler (DESIGN §5): conditioning once per edit, three-branch guidance in one UNet call per step.

    branch            text condition   source latent   image tokens
    text + image      f_txt            E(I_src)        f_img
    image only        CLIP_text("")    E(I_src)        IAA(0)
    unconditional     CLIP_text("")    0               IAA(0)          (v_txt is kept in all three, as SmartEdit)

    ε = ε_u + s_T·(ε_c − ε_i) + s_I·(ε_i − ε_u)       (InstructPix2Pix's two-scale guidance)

At s_T = s_I = 1 the formula reduces to ε_c, so only the conditional branch runs. With recipe `ip2p` this is
step for step what diffusers' StableDiffusionInstructPix2PixPipeline computes (tests/test_sampler.py holds the
two to 1e-4). The optional mask (MIND-Edit) keeps the latents outside it equal to the source latent noised to
the current step, so the background comes back from the source.

MIND-Edit (recipe `mindedit`): the MLLM decodes T_opt greedily and gives v_insight from the same generation;
f_txt = CLIP_text(T_opt), f_img = image_proj(v_insight); the null image tokens are image_proj(0).
`use_topt=False` conditions on the raw instruction instead (the paper's ablation #2), and `ip_scale=0` drops the
image branch (ablation #1; the decoupled attention then equals the plain UNet exactly). `return_texts=True`
also returns the decoded T_opt per edit (None for the other recipes).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from . import build
from .parts.decoupled_attention import set_ip_scale


@torch.no_grad()
def edit(model, images: torch.Tensor, instructions: list[str], steps: int = 50, text_guidance: float = 7.5,
         image_guidance: float = 1.5, ip_scale: float = 1.0, scheduler: str | None = None,
         seed: int | list[int] = 0, mask: torch.Tensor | None = None, progress: bool = False,
         use_topt: bool = True, return_texts: bool = False):
    """Edit B images (B×3×H×W in [-1, 1], H and W multiples of the VAE factor) -> B×3×H×W in [-1, 1].

    `seed` is one seed per image (an int means seed, seed+1, ...): every random draw of an edit comes from its
    own generator, so an edit does not depend on which other edits share its batch."""
    cfg, dev = model.cfg, model.device
    images = images.to(dev)
    b = images.shape[0]
    sched = build.build_sampler_scheduler(scheduler or cfg.scheduler, model.noise_scheduler)
    sched.set_timesteps(steps, device=dev)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed + i for i in range(b)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]

    # ---- conditioning: once per edit; the null conditions once per process -----------------------------------
    z_src = model.vae.encode(images.to(model.vae.dtype)).latent_dist.mode()      # B×4×h×w, unscaled
    image_branch = model.image_branch(cfg.stage) and ip_scale > 0
    cond, texts = model.conditions(images, instructions, tuple(z_src.shape[-2:]), image_branch, use_topt=use_topt)
    guided = not (text_guidance == 1 and image_guidance == 1)
    f_txt, v_txt, f_img = cond.f_txt, cond.v_txt, cond.f_img
    if guided:
        null = model.null_text().to(f_txt.dtype).expand(b, -1, -1)
        f_txt = torch.cat([f_txt, null, null])
        z_src = torch.cat([z_src, z_src, torch.zeros_like(z_src)])
        v_txt = None if v_txt is None else torch.cat([v_txt] * 3)
        if f_img is not None:
            f_img = torch.cat([f_img, cond.null_img, cond.null_img])
    if cfg.uses_decoupled_attention:
        set_ip_scale(model.unet, ip_scale)

    # ---- the denoising loop: one batched UNet call per step -----------------------------------------------------
    h, w = z_src.shape[-2:]
    noise = lambda: torch.cat([torch.randn((1, 4, h, w), generator=g) for g in generators]).to(dev)  # noqa: E731
    latents = noise() * sched.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(sched.step).parameters else {}
    if mask is not None:
        keep = F.interpolate(mask.to(dev, torch.float32), size=(h, w), mode="nearest")  # 1 = edit region
        src_scaled = z_src[:b].float() * model.vae.config.scaling_factor
        bg_noise = noise()
    timesteps = sched.timesteps
    for i, t in enumerate(_progress(timesteps, progress)):
        x = torch.cat([latents] * 3) if guided else latents
        x = sched.scale_model_input(x, t)
        pred = model.unet_forward(x, z_src, t, f_txt, v_txt, f_img).float()
        if guided:
            e_c, e_i, e_u = pred.chunk(3)
            pred = e_u + text_guidance * (e_c - e_i) + image_guidance * (e_i - e_u)
        latents = sched.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if mask is not None:
            nxt = timesteps[i + 1: i + 2]
            bg = sched.add_noise(src_scaled, bg_noise, nxt.expand(b)) if len(nxt) else src_scaled
            latents = keep * latents + (1 - keep) * bg
    out = model.vae.decode((latents / model.vae.config.scaling_factor).to(model.vae.dtype)).sample
    out = out.float().clamp(-1, 1)
    return (out, texts) if return_texts else out


def _progress(items, on: bool):
    if not on:
        return items
    from tqdm import tqdm
    return tqdm(items, desc="denoising", leave=False)


def to_pil(x: torch.Tensor):
    """3×H×W in [-1, 1] -> PIL RGB."""
    from PIL import Image

    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def edit_grid(model, items: list[dict], path: str, steps: int = 20, seed: int = 0, **kw) -> str:
    """Rows of source | target | the model's edit, the instruction printed under each row; saved as PNG."""
    from .fsio import save_image
    from .imagegrid import draw_grid, side_by_side

    src = torch.stack([it["source"] for it in items])
    edits = edit(model, src, [it["instruction"] for it in items], steps=steps, seed=seed,
                 text_guidance=kw.get("text_guidance", model.cfg.text_guidance),
                 image_guidance=kw.get("image_guidance", model.cfg.image_guidance))
    cell = max(64, src.shape[-1])
    rows = [[(side_by_side([to_pil(it["source"]), to_pil(it.get("target", it["source"])), to_pil(out)], cell),
              it["instruction"])] for it, out in zip(items, edits)]
    save_image(draw_grid(rows, (3 * cell, cell), line_h=14), path)
    return path
