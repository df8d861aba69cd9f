"""The toy world's CLIP: the stand-in for SD's text encoder and for the editing side's image encoder.

    python scripts/pretrain_toy_bases.py --only clip --base assets/toy/base --out DIR [--clip-place-negatives]

pretrain_toy_bases.py trains it as its second stage; `--only clip` trains it alone on another base's VAE and
MLLM (and then the text-to-image prior, which reads its text tower). The loss is CLIPModel's symmetric
contrastive loss on the toy world's (image, caption) pairs. The contrastive loss alone can tell most toy captions
apart by colour, so the towers need not learn shape or place: `--clip-shape-negatives` and `--clip-place-negatives`
add NegCLIP's hard negatives (Yuksekgonul et al., 2023), each caption with one shape word, or one place word,
swapped, which only an encoder that reads that word can tell from the truth.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/...` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, however loaded

from minedit import build, fsio  # noqa: E402
from minedit.eval.metrics import clip_features  # noqa: E402
from minedit.toy.phrases import SHAPES, tokenize_words  # noqa: E402
from minedit.toy.world import cached_world  # noqa: E402
from pretrain_toy_bases import (base_and_out, clip_data, folder_mb, log, loss_ends, save_all, schedule,  # noqa: E402
                                step, text_tokenizer, world_images, write_readme)


def build_clip(cfg):
    """A CLIPModel whose towers have exactly the configs of build_text_encoder and build_image_encoder."""
    from transformers import CLIPConfig, CLIPModel

    base = dataclasses.replace(cfg, sd_path="", clip_path="")  # build from the architecture fields
    text = build.build_text_encoder(base)[0].config
    vision = build.build_image_encoder(base).config
    conf = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=cfg.clip_embed_dim)
    return CLIPModel._from_config(conf)


@torch.no_grad()
def clip_retrieval(clip, tok, cfg, images, captions, batch: int = 32) -> float:
    """Image -> caption top-1 accuracy within consecutive batches (a repeated caption string counts as right)."""
    right = total = 0
    for i in range(0, len(images) - batch + 1, batch):
        caps = captions[i:i + batch]
        enc = tok(caps, padding="max_length", max_length=cfg.text_max_length, truncation=True, return_tensors="pt")
        out = clip(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   pixel_values=build.clip_pixels(images[i:i + batch], cfg.clip_image_size))
        pick = out.logits_per_image.argmax(-1).tolist()
        right += sum(caps[p] == caps[j] for j, p in enumerate(pick))
        total += len(caps)
    return right / max(1, total)


PLACE_SWAPS = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}  # the opposite side


def swap_table(tok, negatives: tuple[str, ...]) -> dict[int, torch.Tensor]:
    """Token id -> the ids it may be swapped for in a hard negative: "shape" (each shape word for any other) and
    "place" (each side word of a place phrase for the opposite side, so "at the top left" -> "at the bottom left"
    or "at the top right": still a place the world names, never a phrase only a negative would hold)."""
    ids = lambda words: tok.convert_tokens_to_ids(list(words))  # noqa: E731
    table = {}
    if "shape" in negatives:
        table |= {i: torch.tensor([j for j in ids(SHAPES) if j != i]) for i in ids(SHAPES)}
    if "place" in negatives:
        table |= {i: torch.tensor(ids([PLACE_SWAPS[w]])) for i, w in zip(ids(PLACE_SWAPS), PLACE_SWAPS)}
    return table


def word_swapped(ids: torch.Tensor, swaps: dict[int, torch.Tensor], g: torch.Generator):
    """NegCLIP's hard negatives (Yuksekgonul et al., 2023): each caption with one word that `swaps` lists
    replaced by one of its swaps — a false caption of the same image that only that word tells apart.
    -> (swapped ids, changed: (B,) bool; False for a caption with no such word left after truncation)."""
    out, can = ids.clone(), torch.isin(ids, torch.tensor(list(swaps), dtype=ids.dtype))
    for i in range(len(ids)):
        where = can[i].nonzero().flatten()
        if len(where):
            p = where[torch.randint(len(where), (1,), generator=g)]
            alternatives = swaps[int(ids[i, p])]
            out[i, p] = alternatives[torch.randint(len(alternatives), (1,), generator=g)]
    return out, can.any(1)


def clip_loss(clip, ids, mask, pixels, swaps=None, g=None):
    """CLIP's symmetric contrastive loss; with swaps (swap_table), every image also sees its caption's swapped
    copy (and the batch's other copies) among the captions it must not pick: logits (B, 2B) on the image side,
    the text side as usual (a swapped caption has no image of its own)."""
    if not swaps:
        return clip(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss
    neg, changed = word_swapped(ids, swaps, g)
    out = clip(input_ids=torch.cat([ids, neg]), attention_mask=torch.cat([mask, mask]), pixel_values=pixels)
    b, target = len(ids), torch.arange(len(ids))
    per_image = torch.cat([out.logits_per_image[:, :b],
                           out.logits_per_image[:, b:].masked_fill(~changed, float("-inf"))], 1)
    return (F.cross_entropy(per_image, target) + F.cross_entropy(out.logits_per_text[:b], target)) / 2


@torch.no_grad()
def clip_prefers_true(clip, tok, cfg, images, captions, swaps, g) -> float | None:
    """How often an image is nearer its caption than the caption with one `swaps` word swapped (chance 0.5),
    over the captions that hold such a word (None if none does)."""
    enc = tok(captions, padding="max_length", max_length=cfg.text_max_length, truncation=True, return_tensors="pt")
    neg, changed = word_swapped(enc.input_ids, swaps, g)
    img = clip_features(clip.get_image_features(pixel_values=build.clip_pixels(images, cfg.clip_image_size)))
    sims = []
    for ids in (enc.input_ids, neg):
        txt = clip_features(clip.get_text_features(input_ids=ids, attention_mask=enc.attention_mask))
        sims.append(F.cosine_similarity(img, txt, dim=-1))
    return float((sims[0] > sims[1])[changed].float().mean()) if changed.any() else None


def train_clip(cfg, tok, images, captions, eval_images, eval_captions, steps, batch, lr, g,
               negatives: tuple[str, ...] = ()):
    """CLIP from scratch on (image, caption) pairs; `negatives` ("shape", "place") adds each caption's swapped
    copy as a hard negative (clip_loss). Reports retrieval and how often an image prefers its caption over the
    shape- and the place-swapped one, whatever it was trained with."""
    clip = build_clip(cfg)
    enc = tok(captions, padding="max_length", max_length=cfg.text_max_length, truncation=True, return_tensors="pt")
    truncated = float(np.mean([len(tokenize_words(c)) + 2 > cfg.text_max_length for c in captions]))
    swaps = swap_table(tok, negatives)
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.01)
    sched, history = schedule(opt, steps, max(1, steps // 20)), []
    clip.train()
    for s in range(steps):
        idx = torch.randperm(len(images), generator=g)[:batch]
        loss = clip_loss(clip, enc.input_ids[idx], enc.attention_mask[idx],
                         build.clip_pixels(images[idx], cfg.clip_image_size), swaps, g)
        step(clip, opt, sched, loss)
        history.append(loss.item())
        if (s + 1) % 100 == 0:
            log(f"clip step {s + 1}/{steps} loss {np.mean(history[-100:]):.4f}")
    clip.eval()
    prefers = {f"eval_true_over_{kind}_swapped": clip_prefers_true(clip, tok, cfg, eval_images, eval_captions,
                                                                   swap_table(tok, (kind,)),
                                                                   torch.Generator().manual_seed(0))
               for kind in ("shape", "place")}
    metrics = {"eval_image_to_caption_top1_in_32": clip_retrieval(clip, tok, cfg, eval_images, eval_captions),
               "chance": 1 / 32, **prefers, "negatives": list(negatives), "captions_truncated": truncated,
               "steps": steps, "batch": batch, **loss_ends(history)}
    return clip, metrics


def clip_text_encoder(clip):
    """CLIP's text tower as the standalone CLIPTextModel that SD's text_encoder/ folder holds."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel._from_config(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())  # transformers 5: no text_model wrapper
    return text_encoder.eval()


def clip_only(args, cfg, g: torch.Generator, start: float, command: str) -> dict:
    """--only clip: a copy of --base in --out with CLIP trained anew (clip/, sd/text_encoder) and, since the
    text-to-image UNet reads that text tower, the prior trained anew after it (sd/unet, --steps-unet steps); the
    VAE and the MLLM are --base's. The base's metrics.json is kept with "clip" and "unet" replaced."""
    from diffusers import AutoencoderKL
    from pretrain_toy_unet import PRIOR_RECORD, pretrain_unet

    base, out = base_and_out(args, "clip")
    root = Path(cached_world(seed=args.seed, n=args.n, size=cfg.resolution))
    text_tok = text_tokenizer(cfg)
    clip, m_clip = train_clip(cfg, text_tok, *clip_data(root, *world_images(root)), args.steps_clip,
                              args.batch_clip, 1e-3, g, clip_negatives(args))
    log(f"clip: {json.dumps(m_clip)}")
    shutil.copytree(base, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("metrics.json", *PRIOR_RECORD))
    vae = AutoencoderKL.from_pretrained(base / "sd", subfolder="vae").eval()
    cfg = dataclasses.replace(cfg, vae_channels=tuple(vae.config.block_out_channels))  # its latent size
    text_encoder = clip_text_encoder(clip)
    unet, m_unet = pretrain_unet(cfg, vae, text_encoder, text_tok, clip.eval(), out, args.seed,
                                 n=args.unet_world_n, steps=args.steps_unet)
    log(f"unet: {json.dumps(m_unet)}")
    save_all(out, cfg, vae, clip, text_encoder, None, None, text_tok, unet, build.build_noise_scheduler(cfg))
    base_metrics = json.loads((base / "metrics.json").read_text()) if (base / "metrics.json").is_file() else {}
    metrics = base_metrics | {"clip": m_clip | {"command": command},
                              "unet": m_unet | {"wall_time_s": time.time() - start}}
    metrics["size_mb"] = folder_mb(out)
    fsio.write_text(str(out / "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    if {"vae", "mllm"} <= set(metrics):
        write_readme(out, command, metrics)
    log(f"wrote {out} (clip and prior retrained) in {(time.time() - start) / 60:.1f} min")
    return metrics


def clip_negatives(args) -> tuple[str, ...]:
    """The hard negatives CLIP trains with (swap_table's kinds)."""
    return tuple(kind for kind, on in (("shape", args.clip_shape_negatives), ("place", args.clip_place_negatives))
                 if on)
