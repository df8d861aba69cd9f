"""The toy world's own "Stable Diffusion": train the toy UNet text-to-image before it learns to edit.

    python scripts/pretrain_toy_unet.py --base assets/toy/base                 # replaces base/sd/unet in place
    python scripts/pretrain_toy_unet.py --base assets/toy/base --out runs/b2   # a copy of base with the new unet
    python scripts/pretrain_toy_unet.py --base assets/toy/base --out runs/wide --arch unet_channels=64,128,128
        # a wider prior; train.py then needs --sd_path=runs/wide/sd --unet_channels=64,128,128
    python scripts/pretrain_toy_unet.py --base runs/wide --out runs/wide-eval --eval-only   # score a prior as it is
    python scripts/pretrain_toy_unet.py --base runs/long --out runs/long2 --continue --steps 3000  # train it further

InstructPix2Pix (and through it SmartEdit, InsightEdit, MIND-Edit) starts its editing UNet from Stable Diffusion,
a UNet that already draws objects from text; the editing stage then only has to learn to copy the source and
change what the instruction names. The toy bases' VAE and CLIP text tower stand in for SD's, so this script
trains the toy preset's UNet with **4** input channels exactly as SD was trained, and saves it as `sd/unet` in
the diffusers layout; `build.build_unet` then widens it 4 -> 8 channels (`unet.expand_unet_in_channels`, new
channels zero, bias copied) as it widens SD 1.5.

Training, as SD's (at toy size): the frozen VAE's latents (scaled by its scaling_factor) of the toy world's
images, the frozen CLIP text tower's last hidden states of their captions (10 % replaced by the empty caption
so the model supports classifier-free guidance), DDPM noise with the toy preset's schedule and v-prediction,
MSE loss (Min-SNR-γ weighted with `--snr-gamma`, a drawing-speed lever); AdamW, warm-up then cosine decay,
gradient clipping at 1. The images and captions are the train split of the world the editing stage trains on
(`cached_world(seed + 1000, n)`: source and target of every sample); the eval split's captions are never
trained on.

Quality is measured the toy way on held-out captions (scripts/prior_quality.py says how).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/...` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling pretrain_toy_bases.py, however loaded

from minedit import build, fsio  # noqa: E402
from minedit.errors import UserError, run_cli  # noqa: E402
from minedit.losses import diffusion_loss  # noqa: E402
from minedit.presets import apply_overrides, preset  # noqa: E402
from minedit.toy.world import cached_world, caption  # noqa: E402
from pretrain_toy_bases import load_images, log, read_jsonl, schedule, step  # noqa: E402
from prior_quality import curve_probe, encode_captions, t2i_quality  # noqa: E402

P_NULL = 0.1  # fraction of captions replaced by "" (classifier-free guidance, as SD fine-tuning does)


@torch.no_grad()
def latent_moments(vae, images: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for every image (N×4×h×w each), computed once: a step then samples
    mean + std·ε like `encode().latent_dist.sample()` without re-running the encoder."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def build_t2i_unet(cfg, coords: bool = False):
    """The toy preset's UNet with 4 input channels: a text-to-image UNet like SD's (with coords, 4 + 2 wrapped
    in WithCoords)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**{**build.unet_kwargs(cfg), "in_channels": 6 if coords else 4})
    return WithCoords(unet) if coords else unet


class WithCoords(torch.nn.Module):
    """--coords, an experiment: a UNet with 2 more input channels that always hold the pixel's x and y in [-1, 1]
    (CoordConv's idea), so that where a feature is can be read by every layer, not only inferred from the
    zero-padded borders; it looks like a 4-channel UNet to the training loop and to sampling. Not SD's UNet:
    the editing stages cannot start from it (build.build_unet widens a 4-channel conv_in)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config = unet, types.SimpleNamespace(in_channels=unet.config.in_channels - 2)

    def forward(self, z, t, encoder_hidden_states):
        b, _, h, w = z.shape                                                    # z: B×4×h×w
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xs, ys]).to(z).expand(b, 2, h, w)
        return self.unet(torch.cat([z, coords], 1), t, encoder_hidden_states=encoder_hidden_states)  # B×6×h×w in

    def save_pretrained(self, path):
        self.unet.save_pretrained(path)


def train_t2i(cfg, vae, context, null_context, images, steps: int, batch: int, lr: float, g: torch.Generator,
              probe=None, probe_every: int = 0, start=None, coords: bool = False):
    """v-prediction diffusion loss on (latent, caption context) pairs, from `start` (a UNet) or a fresh one;
    returns the UNet, its loss history and the learning curve: probe(unet) every probe_every steps (sampling
    draws from its own generator, so the training stream is the same with or without it)."""
    unet = start if start is not None else build_t2i_unet(cfg, coords)
    scheduler = build.build_noise_scheduler(cfg)
    mean, std = latent_moments(vae, images)
    scale = vae.config.scaling_factor
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched, history, curve = schedule(opt, steps, max(1, steps // 20)), [], []
    unet.train()
    for s in range(steps):
        idx = torch.randint(len(images), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale  # B×4×h×w
        ctx = context[idx].clone()                                                         # B×T×D
        ctx[torch.rand(batch, generator=g) < P_NULL] = null_context
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=ctx).sample
        # plain MSE on v (SD's loss) unless cfg.snr_gamma > 0: then each sample weighted min(SNR, γ) / (SNR + 1)
        loss = diffusion_loss(pred, scheduler.get_velocity(z0, noise, t), t, scheduler.alphas_cumprod,
                              scheduler.config.prediction_type, cfg.snr_gamma)
        step(unet, opt, sched, loss)
        history.append(loss.item())
        if (s + 1) % 100 == 0:
            log(f"t2i step {s + 1}/{steps} loss {np.mean(history[-100:]):.4f}")
        if probe is not None and probe_every and (s + 1) % probe_every == 0:
            curve.append({"step": s + 1, "loss": float(np.mean(history[-100:])), **probe(unet.eval())})
            log(f"t2i curve {json.dumps(curve[-1])}")
            unet.train()
    return unet.eval(), history, curve


def held_out(cfg, seed: int, n: int, eval_n: int):
    """The world's folder, its train (image, caption) pairs and its first eval_n held-out rows."""
    root = Path(cached_world(seed=seed + 1000, n=n, size=cfg.resolution))
    return root, read_jsonl(root / "captions.jsonl"), read_jsonl(root / "eval.jsonl")[:eval_n]


def recaption(root: Path, caps: list[dict], place_share: float, seed: int, size: int) -> list[dict]:
    """The train pairs captioned again from their scenes (the train split's source and target objects), naming
    each object's place with probability place_share instead of the world's PLACE_SHARE: a lever for a prior that
    must learn where "at the top left" is, which the world's captions name for about one object in three."""
    scenes = {}
    for r in read_jsonl(root / "train.jsonl"):
        scenes[r["source"]] = r["background"], r["objects"]
        scenes[r["target"]] = r["background"], r["target_objects"]
    rng = np.random.default_rng(seed)
    return [dict(c, caption=caption(rng, *scenes[c["image"]], size, place_share)) for c in caps]


def pretrain_unet(cfg, vae, text_encoder, tok, clip, out: Path, seed: int = 0, n: int = 24000, steps: int = 3000,
                  batch: int = 32, lr: float = 1e-3, eval_n: int = 512, curve_every: int = 0, curve_n: int = 128,
                  start=None, place_share: float | None = None, coords: bool = False):
    """Train the 4-channel text-to-image UNet on the editing world's (image, caption) pairs; returns it and its
    metrics (loss ends, held-out quality, the learning curve if curve_every), writing the grid of generations to
    out/t2i-grid.png."""
    g = torch.Generator().manual_seed(seed)
    root, caps, evals = held_out(cfg, seed, n, eval_n)
    if place_share is not None:
        caps = recaption(root, caps, place_share, seed, cfg.resolution)
    log(f"toy world {root}: {len(caps)} train (image, caption) pairs, {len(evals)} held-out captions")
    context = encode_captions(text_encoder, tok, cfg, [c["caption"] for c in caps])
    null_context = encode_captions(text_encoder, tok, cfg, [""])
    probe = curve_probe(vae, text_encoder, tok, cfg, evals[:curve_n], null_context) if curve_every else None
    unet, history, curve = train_t2i(cfg, vae, context, null_context, load_images(root, [c["image"] for c in caps]),
                                     steps, batch, lr, g, probe, curve_every, start, coords)
    del context
    k = max(1, len(history) // 10)
    quality = t2i_quality(unet, vae, text_encoder, tok, clip, cfg, root, evals, null_context, out)
    return unet, {"steps": steps, "batch": batch, "lr": lr, "snr_gamma": cfg.snr_gamma, "p_null": P_NULL,
                  "world_n": n, "train_pairs": len(caps), "place_share": place_share, "coords": coords,
                  "loss_first": float(np.mean(history[:k])), "loss_last": float(np.mean(history[-k:])),
                  **quality, **({"curve": curve} if curve else {})}


# What this script writes about a prior beside its sd/unet; a copy of a base made for a new prior leaves them out,
# so a killed run's folder never looks finished (or describes the base's prior as its own).
PRIOR_RECORD = ("t2i.json", "t2i-grid.png", "t2i-eval.json")


def unet_config(arch: list[str]):
    """The toy preset with --arch's UNet fields applied (a wider or deeper prior for a lever study); any other
    field is an error, since only the UNet is trained here."""
    other = [a for a in arch if not a.lstrip("-").replace("-", "_").startswith("unet_")]
    if other:
        raise UserError(f"--arch {other[0]}: only the UNet's fields (unet_...) are trained here")
    return apply_overrides(preset("insightedit", "toy"), arch).validate()


def load_prior(base: Path):
    """The text-to-image UNet saved in base/sd/unet."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base / "sd", subfolder="unet").eval()


def steps_so_far(base: Path) -> int:
    """Steps base's prior has been trained: from this script's record (t2i.json) or, in a folder written by
    pretrain_toy_bases.py (the shipped bases), from its metrics.json["unet"]."""
    for name, key in (("t2i.json", None), ("metrics.json", "unet")):
        if (base / name).is_file():
            record = json.loads((base / name).read_text())
            record = record.get(key, {}) if key else record
            return record.get("steps_total", record.get("steps", 0))
    return 0


def evaluate_prior(cfg, base: Path, vae, text_encoder, tok, clip, out: Path, args) -> dict:
    """--eval-only: the held-out quality of the prior already in base/sd/unet, written to out/t2i-eval.json."""
    unet = load_prior(base)
    root, _, evals = held_out(cfg, args.seed, args.n, args.eval_n)
    null_context = encode_captions(text_encoder, tok, cfg, [""])
    metrics = t2i_quality(unet, vae, text_encoder, tok, clip, cfg, root, evals, null_context, out)
    metrics.update(prior=str(base / "sd" / "unet"))
    fsio.write_text(str(out / "t2i-eval.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"t2i eval: {json.dumps(metrics)}")
    return metrics


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="toy base folder (sd/ and clip/ are read)")
    ap.add_argument("--out", default=None, help="write a copy of --base with the new sd/unet here (default: "
                                                  "replace --base's sd/unet in place)")
    ap.add_argument("--seed", type=int, default=0, help="the editing runs' seed: the world is seed + 1000")
    ap.add_argument("--n", type=int, default=24000, help="toy world size (its train split's images are used)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 3000)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--snr-gamma", type=float, default=0.0,
                    help="Min-SNR-γ loss weighting (γ = 5 in its paper; 0 = off, SD's plain MSE on v)")
    ap.add_argument("--eval-n", type=int, default=512, help="held-out captions to generate from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--curve-every", type=int, default=0,
                    help="every N steps, generate from the first --curve-n held-out captions and log colours, "
                         "shapes and places right (a learning curve, in t2i.json; mid-run points are at that step's "
                         "learning rate, not the end of a shorter schedule)")
    ap.add_argument("--curve-n", type=int, default=128, help="held-out captions per learning-curve point")
    ap.add_argument("--continue", dest="resume_prior", action="store_true",
                    help="train --base's own sd/unet further instead of a fresh one (a warm restart: a new warm-up "
                         "and cosine over --steps; the saved architecture is kept, so no --arch) — a long prior in "
                         "time-boxed pieces")
    ap.add_argument("--place-captions", type=float, default=None, metavar="SHARE",
                    help="caption the train pairs again from their scenes, naming each object's place with this "
                         "probability (the world's captions: 0.3) — a lever for where the prior draws; held-out "
                         "captions stay the world's")
    ap.add_argument("--coords", action="store_true",
                    help="experiment: a fresh UNet that also reads each pixel's x and y (WithCoords) — does it "
                         "learn where a caption places a shape? Needs --out; no editing stage can start from it")
    ap.add_argument("--eval-only", action="store_true",
                    help="score --base's sd/unet as it is (no training): the metrics go to OUT/t2i-eval.json and "
                         "the grid to OUT/t2i-grid.png; needs --out, so a base's own grid is not replaced")
    ap.add_argument("--arch", action="append", default=[], metavar="FIELD=VALUE",
                    help="a UNet field of the toy preset changed (repeatable), e.g. --arch unet_channels=64,128,128 "
                         "--arch unet_layers_per_block=2; the editing stages then pass the same --FIELD=VALUE")
    args = ap.parse_args(argv)
    cfg = unet_config(args.arch)
    cfg.snr_gamma = args.snr_gamma
    if args.arch and not args.out:
        raise UserError("--arch without --out would replace the base's prior with one its preset does not match — "
                        "pass --out DIR")
    if args.coords and (not args.out or args.resume_prior):
        raise UserError("--coords trains a fresh UNet that is not SD's (6 input channels): pass --out DIR and no "
                        "--continue")
    if args.resume_prior and args.arch:
        raise UserError("--continue keeps the saved UNet's architecture — drop --arch")
    if args.snr_gamma < 0:
        raise UserError(f"--snr-gamma {args.snr_gamma}: γ must be > 0 (5 in the Min-SNR paper), or 0 for plain MSE")
    if args.place_captions is not None and not 0 <= args.place_captions <= 1:
        raise UserError(f"--place-captions {args.place_captions}: a share of the objects, from 0 to 1")
    if args.eval_only and not args.out:
        raise UserError("--eval-only writes its metrics and grid to a folder of their own — pass --out DIR")
    trains = [f for f, on in (("--steps", args.steps is not None), ("--continue", args.resume_prior),
                              ("--snr-gamma", args.snr_gamma), ("--place-captions", args.place_captions is not None),
                              ("--arch", args.arch), ("--curve-every", args.curve_every), ("--coords", args.coords))
              if on]
    if args.eval_only and trains:
        raise UserError(f"--eval-only trains nothing, so {trains[0]} would be ignored — drop it")
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPModel, CLIPTextModel

    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, out = Path(args.base), Path(args.out or args.base)
    if args.eval_only:
        out.mkdir(parents=True, exist_ok=True)
    elif out != base:  # the copy leaves out the base prior's record: out has a t2i.json only once it is trained
        shutil.copytree(base, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*PRIOR_RECORD))
        for name in PRIOR_RECORD:
            (out / name).unlink(missing_ok=True)
    vae = AutoencoderKL.from_pretrained(base / "sd", subfolder="vae").eval()
    cfg.vae_channels = tuple(vae.config.block_out_channels)  # the base's VAE fixes the latent size (factor 1 or 2)
    text_encoder = CLIPTextModel.from_pretrained(base / "sd", subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(base / "sd" / "tokenizer")
    clip = CLIPModel.from_pretrained(base / "clip").eval()
    if args.eval_only:
        return evaluate_prior(cfg, base, vae, text_encoder, tok, clip, out, args)
    start_unet = load_prior(base) if args.resume_prior else None
    steps = 3000 if args.steps is None else args.steps
    unet, metrics = pretrain_unet(cfg, vae, text_encoder, tok, clip, out, args.seed, args.n, steps, args.batch,
                                  args.lr, args.eval_n, args.curve_every, args.curve_n, start_unet,
                                  args.place_captions, args.coords)
    fsio.replace_dir(str(out / "sd" / "unet"), unet.save_pretrained)  # a kill never leaves sd/ without a UNet
    metrics.update(wall_time_s=time.time() - start, threads=args.threads, arch=args.arch)
    if args.resume_prior:  # steps in all, through every piece
        metrics.update(continued_from=str(base), steps_total=steps_so_far(base) + steps)
    fsio.write_text(str(out / "t2i.json"), json.dumps(metrics, indent=1) + "\n")
    log(f"t2i: {json.dumps(metrics)}")
    return metrics


if __name__ == "__main__":
    run_cli(lambda argv: main(argv) and 0)
