"""Where does "at the top left" get lost? Three probes of a toy base's text tower and text-to-image prior.

    python scripts/place_probe.py --base assets/toy/base
    python scripts/place_probe.py --base runs/b2 --json runs/b2/place-probe.json

1. text: the text tower's last hidden states (what the UNet's cross-attention reads) of captions that differ
   only in their place words ("... at the top left" / "... at the bottom right"), against captions that differ
   only in a colour word: the mean cosine similarity of the states at the words that differ. 1.0 means the
   UNet is given the same thing whichever place the caption names.
2. moved: one-shape captions ("a white background with a large red star at the top left"), each with every one
   of the nine places the world names (draw.where), sampled from the *same* noise (DDIM 25 steps, guidance 3);
   the share whose shape of the named colour lands in the named place (chance about 1 in 9), its mean centroid
   per place, and how far the shape moves when only the place words change.
3. decided: at each DDIM step, how often the place of the x0 prediction (decoded) is already the final image's:
   the steps at which the prior commits to where a shape goes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/...` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from minedit import fsio  # noqa: E402
from minedit.errors import UserError, run_cli  # noqa: E402
from minedit.toy.draw import where  # noqa: E402
from minedit.toy.looks import centroid, colour_region  # noqa: E402
from minedit.toy.phrases import SHAPES  # noqa: E402
from prior_quality import decode, denoise, encode_captions, rgb  # noqa: E402

CENTRES = [(x, y) for y in (6, 16, 26) for x in (6, 16, 26)]  # one centre in each of the nine places (32 px)
PALETTE = ("red", "green", "blue", "yellow", "purple", "orange")  # colours that stand out on white


def caption(colour: str, shape: str, place: str) -> str:
    return f"a white background with a large {colour} {shape} {place}"


def state_similarity(text_encoder, tok, cfg, a: list[str], b: list[str]) -> float:
    """Mean cosine similarity of the token states of caption pairs (a[i], b[i]) at the tokens that differ."""
    ids_a, ids_b = (tok(x, padding="max_length", max_length=cfg.text_max_length, truncation=True,
                        return_tensors="pt").input_ids for x in (a, b))
    with torch.no_grad():
        ha, hb = (text_encoder(ids).last_hidden_state for ids in (ids_a, ids_b))  # N×T×D each
    cos = torch.nn.functional.cosine_similarity(ha, hb, dim=-1)                   # N×T
    return float(cos[ids_a != ids_b].mean())


@torch.no_grad()
def sample_tracked(unet, vae, context, null_context, cfg, z):
    """prior_quality's DDIM (25 steps, guidance 3) from the given noise z (N×4×h×w); -> (final images N×H×W×3 in
    0..255, [(t, decoded x0 prediction at t)] per step)."""
    track = []
    final = denoise(unet, z, context, null_context, cfg,
                    on_step=lambda t, x0: track.append((t, rgb(decode(vae, x0)))))
    return rgb(decode(vae, final)), track


def drawn_place(image: np.ndarray, colour: str) -> tuple[str | None, np.ndarray]:
    """(where the largest region of `colour` is, its centroid); (None, nan) if fewer than 6 pixels have it."""
    region = colour_region(image, colour)
    if region is None:
        return None, np.full(2, np.nan)
    c = centroid(region)
    return where({"x": c[0], "y": c[1]}, image.shape[0]), c


def probe(unet, vae, text_encoder, tok, cfg, n: int, seed: int = 0) -> dict:
    """The three probes on n one-shape captions (n groups of nine places)."""
    places = [where({"x": x, "y": y}, cfg.resolution) for x, y in CENTRES]
    groups = [(PALETTE[k % len(PALETTE)], SHAPES[k % len(SHAPES)]) for k in range(n)]
    caps = [caption(c, s, p) for c, s in groups for p in places]
    other = [caption(PALETTE[(k + 1) % len(PALETTE)], s, p) for k, (_, s) in enumerate(groups) for p in places]
    # each place against the opposite one (top left / bottom right, left / right, ...; the middle has none)
    flips = [(caption(c, s, p), caption(c, s, q)) for c, s in groups for p, q in zip(places, places[::-1]) if p != q]
    text = {"place_words": state_similarity(text_encoder, tok, cfg, *map(list, zip(*flips))),
            "colour_word": state_similarity(text_encoder, tok, cfg, caps, other)}
    side = cfg.resolution // cfg.latent_factor
    z = torch.randn((n, 1, unet.config.in_channels, side, side), generator=torch.Generator().manual_seed(seed))
    z = z.expand(n, len(places), -1, -1, -1).reshape(n * len(places), -1, side, side)  # the same noise per group
    null = encode_captions(text_encoder, tok, cfg, [""])
    final, track = sample_tracked(unet, vae, encode_captions(text_encoder, tok, cfg, caps), null, cfg, z)
    colours = [c for c, _ in groups for _ in places]
    got = [drawn_place(img, c) for img, c in zip(final, colours)]
    cents = np.stack([c for _, c in got]).reshape(n, len(places), 2)
    moved = np.nanmean(np.linalg.norm(cents - np.nanmean(cents, 1, keepdims=True), axis=-1))
    named = [p for _ in groups for p in places]
    decided = []
    for t, x0 in track:
        agree = [drawn_place(img, c)[0] == g for img, c, (g, _) in zip(x0, colours, got) if g is not None]
        decided.append({"t": t, "agrees_with_final": float(np.mean(agree)) if agree else 0.0})
    return {"captions": len(caps), "text_state_cosine": text,
            "places_right": float(np.mean([g == p for (g, _), p in zip(got, named)])),
            "mean_centroid_by_place": {p: np.nanmean(cents[:, i], 0).round(1).tolist() for i, p in enumerate(places)},
            "mean_move_px": float(moved), "decided": decided}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="toy base folder (its sd/ is read)")
    ap.add_argument("--n", type=int, default=12, help="one-shape captions, each sampled at the nine places")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    base = Path(args.base)
    if not (base / "sd" / "unet" / "config.json").is_file():
        raise UserError(f"--base {base}: no sd/unet/config.json there; pass a toy base folder (e.g. assets/toy/base)")
    if args.n < 1:
        raise UserError(f"--n {args.n}: at least one caption")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from minedit.presets import preset

    torch.set_num_threads(args.threads)
    cfg = preset("insightedit", "toy")
    vae = AutoencoderKL.from_pretrained(base / "sd", subfolder="vae").eval()
    cfg.vae_channels = tuple(vae.config.block_out_channels)  # the base's VAE fixes the latent size
    unet = UNet2DConditionModel.from_pretrained(base / "sd", subfolder="unet").eval()
    if unet.config.in_channels != 4:
        raise UserError(f"--base {base}: sd/unet reads {unet.config.in_channels} channels; a text-to-image prior "
                        "reads 4")
    text_encoder = CLIPTextModel.from_pretrained(base / "sd", subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(base / "sd" / "tokenizer")
    result = probe(unet, vae, text_encoder, tok, cfg, args.n) | {"base": str(base)}
    print(json.dumps(result))
    if args.json:
        fsio.write_text(args.json, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    run_cli(lambda argv: main(argv) and 0)
