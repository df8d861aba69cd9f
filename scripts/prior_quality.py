"""How well a toy text-to-image prior draws, measured the toy way (used by pretrain_toy_unet.py).

Quality, measured the toy way on held-out captions (the eval split's source captions), sampled with 25 DDIM
steps at guidance 3:
  * CLIP retrieval: the toy CLIP picks the right caption for the generated image among 32 (real images: ~95 %);
  * colours named: every colour the caption names appears (>= 6 pixels within a small RGB distance), and the
    background colour covers most of the image — the parts of the scene a caption always fixes;
  * shapes drawn: for each named object whose colour is its scene's only one, the largest region of that colour
    is matched against every toy shape and size drawn near its centroid; right when the best match (IoU) is the
    named shape (minedit.toy.looks) — what additions and new-shape replacements need, and what the colour check
    cannot see;
  * a grid of generations (caption above each image) written next to the UNet.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from minedit import build
from minedit.imagegrid import draw_grid
from minedit.sampler import to_pil
from minedit.toy.looks import colours_right, places_right, shapes_right
from pretrain_toy_bases import load_images
from pretrain_toy_clip import clip_retrieval


@torch.no_grad()
def encode_captions(text_encoder, tok, cfg, captions: list[str], batch: int = 1024) -> torch.Tensor:
    """CLIP text last hidden states, N×T×D (what the UNet cross-attends to)."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tok(captions[i:i + batch], padding="max_length", max_length=cfg.text_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(text_encoder(ids).last_hidden_state)
    return torch.cat(out)


@torch.no_grad()
def denoise(unet, z, context, null_context, cfg, guidance: float = 3.0, steps: int = 25, on_step=None):
    """DDIM with classifier-free guidance from the noise z (N×C×h×w) to the final latent; on_step(t, x0
    prediction), if given, sees each step's prediction of the clean latent."""
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler.from_config(build.build_noise_scheduler(cfg).config)
    sampler.set_timesteps(steps)
    both = torch.cat([null_context.expand_as(context), context])
    for t in sampler.timesteps:
        uncond, cond = unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
        out = sampler.step(uncond + guidance * (cond - uncond), t, z)
        z = out.prev_sample
        if on_step is not None:
            on_step(int(t), out.pred_original_sample)
    return z


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents -> N×3×H×W images in [-1, 1]."""
    return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def generate(unet, vae, context, null_context, cfg, guidance: float = 3.0, steps: int = 25, seed: int = 0,
             batch: int = 64) -> torch.Tensor:
    """Text-to-image sampling with classifier-free guidance (DDIM): N×3×H×W in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    side = cfg.resolution // cfg.latent_factor
    out = []
    for i in range(0, len(context), batch):
        ctx = context[i:i + batch]
        z = torch.randn((len(ctx), unet.config.in_channels, side, side), generator=g)
        out.append(decode(vae, denoise(unet, z, ctx, null_context, cfg, guidance, steps)))
    return torch.cat(out)


def rgb(images: torch.Tensor) -> np.ndarray:
    """N×3×H×W in [-1, 1] -> N×H×W×3 in 0..255, what `minedit.toy.looks` reads."""
    return ((images.permute(0, 2, 3, 1) + 1) * 127.5).numpy()


def grid(images: torch.Tensor, captions: list[str], path: Path, cols: int = 8, scale: int = 3) -> None:
    """Generations in a grid, each over the first words of its caption."""
    side = images.shape[-1] * scale
    cells = [(to_pil(img), cap) for img, cap in zip(images, captions)]
    draw_grid([cells[k:k + cols] for k in range(0, len(cells), cols)], (side, side), lines=2, gap=4).save(path)


def t2i_quality(unet, vae, text_encoder, tok, clip, cfg, root: Path, eval_rows, null_context, out: Path):
    """Generate from held-out captions; CLIP retrieval, named colours, shapes and places, for generations and the
    real images (the rows' sources in the world folder `root`)."""
    eval_captions = [r["caption"] for r in eval_rows]
    eval_images = load_images(root, [r["source"] for r in eval_rows])
    context = encode_captions(text_encoder, tok, cfg, eval_captions)
    generated = generate(unet, vae, context, null_context, cfg)
    grid(generated[:32], eval_captions[:32], out / "t2i-grid.png")
    metrics = {"eval_captions": len(eval_captions), "guidance": 3.0, "sampler": "DDIM, 25 steps"}
    for name, images in (("generated", generated), ("real", eval_images)):
        pixels = rgb(images)
        metrics.update({f"clip_top1_in_32_{name}": clip_retrieval(clip, tok, cfg, images, eval_captions),
                        f"colours_right_{name}": colours_right(pixels, eval_captions),
                        f"shapes_{name}": shapes_right(pixels, eval_rows),
                        f"places_{name}": places_right(pixels, eval_rows)})
    return metrics


def curve_probe(vae, text_encoder, tok, cfg, rows: list[dict], null_context):
    """A cheap quality check for the learning curve (and for an editor sampled as text-to-image, editor_draws.py):
    colours, shapes and places of generations from these rows' captions."""
    context = encode_captions(text_encoder, tok, cfg, [r["caption"] for r in rows])

    def probe(unet) -> dict:
        generated = rgb(generate(unet, vae, context, null_context, cfg))
        shapes, places = shapes_right(generated, rows), places_right(generated, rows)
        return {"colours_right": colours_right(generated, [r["caption"] for r in rows]),
                "shapes_right": shapes["right"], "shapes_mean_iou": shapes["mean_iou"], "by_shape": shapes["by_shape"],
                "places_right": places["right"], "places_objects": places["objects"]}
    return probe
