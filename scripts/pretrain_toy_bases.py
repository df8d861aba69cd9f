"""Pretrain the toy world's base models: the stand-ins for SD's VAE, CLIP and LLaVA (DESIGN §10).

    python scripts/pretrain_toy_bases.py --out assets/toy/base
    python scripts/pretrain_toy_bases.py --only mllm --base assets/toy/base --out DIR   # the MLLM stage alone
    python scripts/pretrain_toy_bases.py --only mllm --base assets/toy/base --out DIR --arch vision_patch=2 \
        --arch llm_max_positions=512   # a comprehension-study lever: the tower gets its own CLIP first
    python scripts/pretrain_toy_bases.py --only mllm --base DIR --out DIR2 --continue-mllm --steps-mllm 12000 \
        --mllm-world-n 24000           # DIR's MLLM trained 12 000 steps more (pieces that fit a session)
    python scripts/pretrain_toy_bases.py --only clip --base assets/toy/base --out DIR --clip-place-negatives
                                       # CLIP anew (a text tower that reads places), then the prior that reads it

Measured: 27.1 min wall on 1 thread of a shared 2-core CPU (VAE 6.7, CLIP 3.7, MLLM 16.6 min), with the toy world
already cached (generating it adds about 1 min); the folder is 13.5 MB. Its README.md and metrics.json hold the
metrics (VAE 41.6 dB, CLIP retrieval 95 %, MLLM exact match 74 % simple / 23 % understanding / 63 % reasoning).

No pretrained weights exist offline, so the toy world trains its own tiny bases from scratch, with the
architecture sizes of `preset("insightedit", "toy")`, and saves them in the public layouts that the package loads
by local path (`mllm_path`, `sd_path`, `clip_path`):

  out/sd/      vae/ (trained), text_encoder/ (CLIP text tower), tokenizer/, unet/ (text-to-image, 4 channels),
               scheduler/
  out/clip/    the whole CLIPModel (loads as CLIPModel and as CLIPVisionModelWithProjection) + tokenizer
  out/mllm/    LlavaForConditionalGeneration + LlavaProcessor (word-level toy tokenizer, chat template)
  out/metrics.json, out/README.md

What each part learns, on the train split of `cached_world(seed, n)` (the eval split is only for reporting):
  1. VAE: reconstruction, MSE on images in [-1, 1] of decode(sample()) + a small KL term (weight 1e-6), as
     SD's autoencoder minus its perceptual and adversarial terms (flat-coloured shapes need neither). Its
     `scaling_factor` is set to 1 / std of the training latents, as SD did, so the UNet sees unit-variance latents.
  2. CLIP (scripts/pretrain_toy_clip.py): the symmetric contrastive loss of CLIPModel on (image, caption) pairs.
     The text tower has the exact config of `build_text_encoder` and becomes sd/text_encoder (the UNet's
     cross-attention space); the vision tower has the config of `build_image_encoder`. The text tokenizer appends
     "</s>": CLIPTextModel with an eos id other than 2 pools at the first eos, which must exist.
  3. UNet: text-to-image on the editing world's (image, caption) pairs with the VAE and text tower above frozen:
     the toy world's "Stable Diffusion" (scripts/pretrain_toy_unet.py says how; scripts/prior_quality.py, how
     it is scored). The editing UNet is widened from it 4 -> 8 channels as InstructPix2Pix widens SD 1.5.
  4. MLLM: the toy LLaVA, its vision tower started from the CLIP above, trained to caption and to rewrite
     instructions into the explicit `optimized_instruction` (scripts/pretrain_toy_mllm.py says how;
     scripts/mllm_quality.py, how it is scored, on the held-out scenes only).

Choices the brief left open:
  * Adds are under-determined (the phrase fixes a region, not the drawn place, and often not the size), so
    exact match on adds is bounded well below 100 %; accuracy is reported per category and per kind.
  * The VAE trains on one random 16×16 crop per batch (it is convolutional, and a crop costs a quarter of a
    whole image, so four times the steps fit the budget); it is evaluated on whole 32×32 eval images.
  * Optimisation: AdamW, linear warm-up then cosine decay, gradient clipping at 1.0; images preloaded in memory.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/...` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings pretrain_toy_{unet,mllm}.py, however loaded

from minedit import build, export, fsio  # noqa: E402
from minedit.errors import UserError, run_cli  # noqa: E402
from minedit.presets import preset  # noqa: E402
from minedit.toy.phrases import CATEGORIES, KINDS  # noqa: E402
from minedit.toy.tokenizer import toy_tokenizer  # noqa: E402
from minedit.toy.world import cached_world  # noqa: E402

STUDY = "## Comprehension study"  # README section kept when write_readme rewrites the file


# ----------------------------------------------------------------------------------------------------------------
# Data
def load_images(root: Path, paths: list[str]) -> torch.Tensor:
    """N×3×H×W float in [-1, 1] (the toy world's PNGs are square RGB at the training size)."""
    arr = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """root's train images (each once, in path order) and its eval rows' source images."""
    paths = sorted({r["image"] for r in read_jsonl(root / "captions.jsonl")})
    return load_images(root, paths), load_images(root, [r["source"] for r in read_jsonl(root / "eval.jsonl")])


def clip_data(root: Path, images: torch.Tensor, eval_images: torch.Tensor):
    """CLIP's (image, caption) training pairs and its eval (image, caption) pairs, from world_images(root)."""
    caption_rows = read_jsonl(root / "captions.jsonl")
    index = {p: i for i, p in enumerate(sorted({r["image"] for r in caption_rows}))}
    return (images[[index[r["image"]] for r in caption_rows]], [r["caption"] for r in caption_rows],
            eval_images, [r["caption"] for r in read_jsonl(root / "eval.jsonl")])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def text_tokenizer(cfg):
    """The toy word-level tokenizer, wrapping every text as <s> ... </s> so CLIP's eos pooling is meaningful."""
    from tokenizers.processors import TemplateProcessing

    tok = toy_tokenizer(cfg.text_max_length, chat=False)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    return tok


def schedule(opt, steps: int, warmup: int):
    """Linear warm-up, then cosine decay to 0."""
    def f(s):
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def step(model, opt, sched, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def loss_ends(history: list[float]) -> dict:
    """Mean loss over the first and the last tenth of the steps (at least one step each)."""
    if not history:
        return {}
    k = max(1, len(history) // 10)
    return {"loss_first": float(np.mean(history[:k])), "loss_last": float(np.mean(history[-k:]))}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# VAE
@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, batch: int = 128) -> float:
    """Mean PSNR (dB, on [0, 1]) of decode(encode(x).mode()) over images."""
    values = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        values.append(10 * torch.log10(1 / mse))
    return float(torch.cat(values).mean())


def train_vae(cfg, images, eval_images, steps: int, batch: int, lr: float, crop: int, g: torch.Generator):
    vae = build.build_vae(cfg)
    psnr_init = vae_psnr(vae, eval_images)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched, history = schedule(opt, steps, max(1, steps // 20)), []
    vae.train()
    for s in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        x = torch.where(torch.rand(batch, 1, 1, 1, generator=g) < 0.5, x, x.flip(-1))  # flips are free data
        if crop:  # one random crop per batch: a quarter of the compute for the same number of steps
            top, left = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=g).tolist()
            x = x[..., top:top + crop, left:left + crop]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        step(vae, opt, sched, loss)
        history.append(loss.item())
        if (s + 1) % 100 == 0:
            log(f"vae step {s + 1}/{steps} loss {np.mean(history[-100:]):.5f}")
    vae.eval()
    with torch.no_grad():  # SD's recipe: scale latents to unit variance (std over posterior samples)
        z = torch.cat([vae.encode(images[i:i + 256]).latent_dist.sample(generator=g)
                       for i in range(0, min(len(images), 1024), 256)])
    std = float(z.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    metrics = {"eval_psnr_db": vae_psnr(vae, eval_images), "eval_psnr_db_at_init": psnr_init,
               "latent_std": std, "scaling_factor": vae.config.scaling_factor, "steps": steps, "batch": batch,
               "crop": crop, **loss_ends(history)}
    return vae, metrics


# ----------------------------------------------------------------------------------------------------------------
# Saving
def save_all(out: Path, cfg, vae, clip, text_encoder, mllm, mllm_tok, text_tok, unet, scheduler) -> dict:
    """Everything in the layouts build.py loads; clip/ holds the whole CLIPModel, whose vision half loads as
    CLIPVisionModelWithProjection (same parameter names, projection_dim set in the vision config)."""
    from transformers import CLIPImageProcessor

    paths = export.save_bases(str(out), cfg, mllm=mllm, tokenizer=mllm_tok, text_encoder=text_encoder,
                             text_tokenizer=text_tok, vae=vae, unet=unet, scheduler=scheduler)
    clip.save_pretrained(out / "clip")
    text_tok.save_pretrained(out / "clip")
    size = cfg.clip_image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(build.CLIP_MEAN), image_std=list(build.CLIP_STD)).save_pretrained(out / "clip")
    return paths | {"clip_path": str(out / "clip")}


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def write_readme(out: Path, command: str, metrics: dict) -> None:
    v, c, u, m = metrics["vae"], metrics["clip"], metrics["unet"], metrics["mllm"]
    acc = m["eval_exact_match"]
    lines = [
        "# Toy base models", "",
        "Tiny stand-ins for SD's VAE / CLIP and LLaVA, trained from scratch on the toy world (DESIGN §10) by",
        "`scripts/pretrain_toy_bases.py`. Load them by path: `mllm_path=<this>/mllm`, `sd_path=<this>/sd`,",
        "`clip_path=<this>/clip`. The UNet in sd/unet is the toy text-to-image model (4 channels; the editing",
        "stages widen it to 8 as InstructPix2Pix widens SD 1.5).", "",
        f"    {command}", "",
        f"Seed {metrics['seed']}, toy world n={metrics['world_n']} ({metrics['n_train']} train / "
        f"{metrics['n_eval']} eval samples), {metrics['threads']} thread(s), wall time "
        f"{metrics['wall_time_s'] / 60:.1f} min; folder {metrics['size_mb']:.1f} MB.", "",
        "| part | steps × batch | eval metric |", "|---|---|---|",
        f"| VAE | {v['steps']} × {v['batch']} | reconstruction PSNR {v['eval_psnr_db']:.2f} dB (init "
        f"{v['eval_psnr_db_at_init']:.1f}); latent std {v['latent_std']:.3f} -> scaling_factor "
        f"{v['scaling_factor']} |",
        f"| CLIP | {c['steps']} × {c['batch']} | image->caption top-1 in batches of 32: "
        f"{c['eval_image_to_caption_top1_in_32']:.1%} (chance 3.1 %) |",
        f"| UNet (text-to-image) | {u['steps']} × {u['batch']} | held-out captions, generated: CLIP top-1 in 32 "
        f"{u['clip_top1_in_32_generated']:.1%} (real images {u['clip_top1_in_32_real']:.1%}), named colours right "
        f"{u['colours_right_generated']:.1%} (real {u['colours_right_real']:.1%}) |",
        f"| MLLM | {m['steps']} × {m['batch']} | optimized-instruction exact match: all {acc['all']:.1%}; " +
        ", ".join(f"{k} {acc[k]:.1%}" for k in (*CATEGORIES, *KINDS)) + " |", "",
        "Exact match without the under-determined adds (remove + replace): " +
        ", ".join(f"{k} {acc[f'{k}_remove_replace']:.1%}" for k in CATEGORIES) + ".",
        "All numbers, with loss curves' ends and sample answers, are in metrics.json. Generations of the",
        "text-to-image UNet from held-out captions (DDIM 25 steps, guidance 3):", "", "![t2i](t2i-grid.png)", ""]
    old = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
    if STUDY in old:  # a hand-written study section (measurements of other runs) survives regeneration
        lines.append(old[old.index(STUDY):].rstrip("\n") + "\n")
    fsio.write_text(str(out / "README.md"), "\n".join(lines))


def base_and_out(args, stage: str) -> tuple[Path, Path]:
    """--only STAGE's --base (a folder this script wrote) and --out (another folder)."""
    if not args.base:
        raise UserError(f"--only {stage} needs --base DIR: the toy base folder whose other parts are reused")
    base, out = Path(args.base), Path(args.out)
    if not (base / "clip" / "config.json").is_file():
        raise UserError(f"--base {base}: no clip/config.json there; pass a folder written by this script "
                        "(e.g. assets/toy/base)")
    if out.resolve() == base.resolve():
        raise UserError(f"--out {out} is --base: write the new {stage} to another folder (the base stays as it is)")
    return base, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (mllm/ sd/ clip/ are written inside)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=6000, help="toy world size (train + eval samples)")
    ap.add_argument("--steps-vae", type=int, default=4000)
    ap.add_argument("--steps-clip", type=int, default=3000)
    ap.add_argument("--steps-unet", type=int, default=3000)
    ap.add_argument("--unet-world-n", type=int, default=24000,
                    help="the UNet's world: the one the editing stages train on (seed + 1000, this size)")
    ap.add_argument("--steps-mllm", type=int, default=3000)
    ap.add_argument("--batch-vae", type=int, default=16)
    ap.add_argument("--batch-clip", type=int, default=64)
    ap.add_argument("--batch-mllm", type=int, default=32)
    ap.add_argument("--vae-crop", type=int, default=16, help="train the VAE on random crops of this side (0: whole)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clip-shape-negatives", action="store_true",
                    help="train CLIP with each caption's shape-swapped copy as a hard negative (NegCLIP's swaps; "
                         "our lever: the contrastive loss alone can tell most toy captions apart by colour); with "
                         "--only mllm it trains the vision tower's CLIP")
    ap.add_argument("--clip-place-negatives", action="store_true",
                    help="train CLIP with each caption's place-swapped copy as a hard negative (left <-> right, top "
                         "<-> bottom: a text tower whose states tell where a caption puts a shape)")
    ap.add_argument("--only", choices=["mllm", "clip"], default=None,
                    help="train this stage alone on the other parts of --base (clip: CLIP, then the text-to-image "
                         "UNet that reads its text tower); --out gets a copy of --base with the new stage, "
                         "metrics.json and README.md")
    ap.add_argument("--base", default=None, help="with --only: the base folder whose other parts are reused")
    mllm = ap.add_argument_group("MLLM stage levers (defaults: the shipped setting)")
    mllm.add_argument("--lr-mllm", type=float, default=1e-3)
    mllm.add_argument("--mllm-world-n", type=int, default=0,
                      help="also train on the train split of the editing world (seed + 1000, this size): more rows")
    mllm.add_argument("--vision-feature-layer", type=int, default=None,
                      help="vision tower hidden state LLaVA reads (default: the preset's, -2)")
    mllm.add_argument("--freeze-vision", action="store_true", help="keep the CLIP vision tower fixed")
    mllm.add_argument("--mllm-refer-share", type=float, default=0.0,
                      help="fraction of each batch given to naming the shape a relational phrase picks out "
                           "(taken from the captions' share; 0: the two shipped tasks only)")
    mllm.add_argument("--continue-mllm", action="store_true",
                      help="with --only mllm: start every MLLM weight from --base's mllm/ and train --steps-mllm "
                           "more (a warm restart: fresh warm-up and cosine; batches drawn anew), to train it "
                           "longer in session-sized pieces")
    mllm.add_argument("--arch", action="append", default=[], metavar="FIELD=VALUE",
                      help="an MLLM field of the toy preset changed (vision_... or llm_..., repeatable), e.g. --arch "
                           "vision_patch=2 --arch llm_max_positions=512; a changed vision tower gets its own CLIP "
                           "first (--steps-clip steps), whose vision tower starts it as base/clip's starts the "
                           "shipped one; base/clip itself is kept")
    args = ap.parse_args(argv)
    from pretrain_toy_clip import clip_negatives, clip_only, clip_text_encoder, train_clip  # a sibling (as below)
    if args.continue_mllm and (args.only != "mllm" or args.arch or clip_negatives(args)
                               or args.vision_feature_layer is not None):
        raise UserError("--continue-mllm trains --base's MLLM on as it is: use it with --only mllm --base DIR, "
                        "without --arch, --clip-shape-negatives, --clip-place-negatives or --vision-feature-layer")
    if args.arch and args.only != "mllm":
        raise UserError("--arch changes the MLLM stage alone: add --only mllm --base DIR")
    from pretrain_toy_mllm import EDIT_SHARE, mllm_only, run_mllm  # its sibling (it imports this file's helpers)

    if not 0 <= args.mllm_refer_share <= 1 - EDIT_SHARE:
        raise UserError(f"--mllm-refer-share {args.mllm_refer_share}: must be in [0, {1 - EDIT_SHARE:g}] (the "
                        f"instruction task keeps {EDIT_SHARE:g} of each batch)")
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = preset("insightedit", "toy")
    command = "python scripts/pretrain_toy_bases.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.only:
        return (clip_only if args.only == "clip" else mllm_only)(args, cfg, g, start, command)
    if args.base:
        raise UserError("--base is read only with --only; drop it to train every base from scratch")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    root = Path(cached_world(seed=args.seed, n=args.n, size=cfg.resolution))
    rows, eval_rows = read_jsonl(root / "train.jsonl"), read_jsonl(root / "eval.jsonl")
    images, eval_images = world_images(root)
    log(f"toy world {root}: {len(rows)} train rows, {len(eval_rows)} eval rows, {len(images)} train images")

    vae, m_vae = train_vae(cfg, images, eval_images, args.steps_vae, args.batch_vae, 2e-3, args.vae_crop, g)
    log(f"vae: {json.dumps(m_vae)}")
    text_tok = text_tokenizer(cfg)
    clip, m_clip = train_clip(cfg, text_tok, *clip_data(root, images, eval_images), args.steps_clip, args.batch_clip,
                              1e-3, g, clip_negatives(args))
    log(f"clip: {json.dumps(m_clip)}")
    from pretrain_toy_unet import pretrain_unet  # its sibling: the UNet stage (it imports this file's helpers)

    text_encoder = clip_text_encoder(clip)
    unet, m_unet = pretrain_unet(cfg, vae.eval(), text_encoder, text_tok, clip.eval(), out, args.seed,
                                 n=args.unet_world_n, steps=args.steps_unet)
    log(f"unet: {json.dumps(m_unet)}")

    mllm, mllm_tok, m_mllm = run_mllm(cfg, clip, args, root, g)

    saved = save_all(out, cfg, vae, clip, text_encoder, mllm, mllm_tok, text_tok, unet,
                     build.build_noise_scheduler(cfg))
    metrics = {"seed": args.seed, "world_n": args.n, "n_train": len(rows), "n_eval": len(eval_rows),
               "threads": args.threads, "vae": m_vae, "clip": m_clip, "unet": m_unet, "mllm": m_mllm,
               "wall_time_s": time.time() - start, "paths": {k: os.path.relpath(v, out) for k, v in saved.items()}}
    metrics["size_mb"] = folder_mb(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    write_readme(out, command, metrics)
    log(f"wrote {out} ({metrics['size_mb']:.1f} MB) in {metrics['wall_time_s'] / 60:.1f} min")
    return metrics


if __name__ == "__main__":
    run_cli(lambda argv: main(argv) and 0)
