"""Does an editing checkpoint still draw from text? Its UNet sampled as the text-to-image prior it started from.

    python scripts/editor_draws.py --ckpt runs/ip2p                  # the trained editor
    python scripts/editor_draws.py --ckpt runs/ip2p --prior BASE/sd  # the same config, fresh from that prior

The editing UNet reads z_t ⊕ E(I_src) (8 channels) and a text condition. With the source latent zero (its own
guidance-dropout input) and the condition CLIP_text(caption) it is a text-to-image model again; fresh from a prior
its zero-initialised source channels make it *exactly* that prior. So the toy way of scoring a prior
(scripts/prior_quality.py: named colours present, named shapes drawn, on held-out captions of the toy world,
DDIM 25 steps at guidance 3) says how much of the prior's drawing an editing stage kept — what additions and
new-shape replacements need. `--t2i_share` trains exactly this input on part of the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_toy_bases import read_jsonl  # noqa: E402
from prior_quality import curve_probe  # noqa: E402

from minedit import fsio  # noqa: E402
from minedit.errors import UserError, run_cli  # noqa: E402


class AsTextToImage(torch.nn.Module):
    """An editing model's UNet with its source latent zero: z_t (B×4×h×w) -> the UNet's prediction."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, types.SimpleNamespace(in_channels=4)

    def forward(self, z, t, encoder_hidden_states):
        return self.model.unet(torch.cat([z, torch.zeros_like(z)], 1), t, encoder_hidden_states=encoder_hidden_states)


def draws(model, rows: list[dict]) -> dict:
    """Generate from the rows' captions with the editing UNet as text-to-image (the prior's own probe,
    prior_quality.curve_probe); colours, shapes and places right."""
    probe = curve_probe(model.vae, model.text_encoder, model.text_tokenizer, model.cfg, rows, model.null_text())
    return {"captions": len(rows), **probe(AsTextToImage(model))}


def load(ckpt: str, prior: str | None):
    """The checkpoint's model, or (with prior) a fresh one of its config whose UNet starts from prior/unet."""
    from minedit import checkpoint
    from minedit.model import EditModel, load_model

    if prior is None:
        return load_model(ckpt)
    if not (Path(prior) / "unet").is_dir():
        raise UserError(f"--prior {prior}: no unet/ in it — pass a Stable-Diffusion folder such as BASE/sd")
    cfg = checkpoint.load_config(checkpoint.find_checkpoint(ckpt))
    cfg.sd_path = prior
    return EditModel(cfg).eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="an editing run or checkpoint folder (a toy-preset one)")
    ap.add_argument("--prior", default=None, help="score a fresh model of the checkpoint's config from this SD "
                                                  "folder's UNet instead (what the editing stage started from)")
    ap.add_argument("--n", type=int, default=128, help="held-out captions of the toy world to generate from")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    if args.n <= 0:
        raise UserError(f"--n {args.n}: generate from at least one caption")
    from minedit.toy.world import cached_world

    torch.set_num_threads(args.threads)
    model = load(args.ckpt, args.prior)
    if model.cfg.preset != "toy":
        raise UserError(f"--ckpt {args.ckpt}: a {model.cfg.preset}-preset model — the drawing check reads the toy "
                        "world's captions and shapes; pass a toy run")
    root = Path(cached_world(seed=model.cfg.seed + 1000, n=model.cfg.toy_samples, size=model.cfg.resolution))
    figures = {"ckpt": args.ckpt, "prior": args.prior, **draws(model, read_jsonl(root / "eval.jsonl")[:args.n])}
    print(json.dumps(figures))
    if args.out:
        fsio.write_text(args.out, json.dumps(figures, indent=1) + "\n")
    return figures


if __name__ == "__main__":
    run_cli(lambda argv: main(argv) and 0)
