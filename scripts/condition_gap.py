"""How much does a trained editor use its conditions? Held-out diffusion loss with the real conditions, with the
text condition replaced by the null text, and with both text and source dropped — per band of timesteps.

    python scripts/condition_gap.py --ckpt runs/toy/insightedit-s2 --data runs/toy/eval-world/eval.jsonl
    python scripts/condition_gap.py --ckpt runs/toy/ip2p --data eval.jsonl --rows 256 --seed 1

The same rows, timesteps and noise go through all three, so the differences are the conditions' doing: a
"null text" loss barely above "cond" means the UNet has not yet learned to use the instruction (whatever the
MLLM understood cannot reach the image); "null both" far above both means it copies the source. "gap" is
(null text − cond) / cond. Target latents are the posterior mean (no VAE sampling noise).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedit.errors import UserError, run_cli  # noqa: E402

BANDS = ((0, 250), (250, 500), (500, 750), (750, 1000))


def losses(model, rows, seed: int) -> list[dict]:
    """[{band, cond, null_text, null_both}] mean squared error of the UNet's prediction per timestep band."""
    import torch

    from minedit.data import load_image, to_tensor

    load = lambda key: torch.stack([to_tensor(load_image(r[key])) for r in rows])  # noqa: E731  B×3×H×W
    source, target = load("source"), load("target")
    g = torch.Generator().manual_seed(seed)
    sched, n = model.noise_scheduler, len(rows)
    out = []
    with torch.no_grad():
        z_src, z_tar = model.encode_latents(source, target, torch.zeros(()))
        cond, _ = model.conditions(source, [r["instruction"] for r in rows], tuple(z_src.shape[-2:]),
                                   model.image_branch(model.cfg.stage))
        null = model.null_text().expand(n, -1, -1)
        noise = torch.randn(z_tar.shape, generator=g)
        for lo, hi in BANDS:
            t = torch.randint(lo, min(hi, sched.config.num_train_timesteps), (n,), generator=g)
            z_t = sched.add_noise(z_tar, noise, t)
            goal = sched.get_velocity(z_tar, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            row = {"band": f"{lo}-{hi}"}
            for name, f_txt, z in (("cond", cond.f_txt, z_src), ("null_text", null, z_src),
                                   ("null_both", null, torch.zeros_like(z_src))):
                pred = model.unet_forward(z_t, z, t, f_txt, cond.v_txt, cond.f_img)
                row[name] = (pred.float() - goal.float()).pow(2).mean().item()
            out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint folder")
    p.add_argument("--data", required=True, help="editing manifest (JSONL with source, target, instruction)")
    p.add_argument("--rows", type=int, default=128, help="how many manifest rows (from the start)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.rows < 1:
        raise UserError(f"--rows {a.rows}: must be at least 1")
    from minedit.data import read_manifest
    from minedit.model import load_model

    rows, _ = read_manifest(a.data, kind="edit")
    if not rows:
        raise UserError(f"{a.data} has no usable rows — each row needs source, target and instruction")
    model = load_model(a.ckpt)
    table = losses(model, rows[: a.rows], a.seed)
    print(f"{a.ckpt}: {min(a.rows, len(rows))} rows of {a.data}, seed {a.seed}")
    print("| t | cond | null text | null text + source | gap |")
    print("|---|---|---|---|---|")
    for r in table:
        gap = (r["null_text"] - r["cond"]) / r["cond"]
        print(f"| {r['band']} | {r['cond']:.4f} | {r['null_text']:.4f} | {r['null_both']:.4f} | {100 * gap:+.1f} % |")
    print(json.dumps(table))
    return 0


if __name__ == "__main__":
    run_cli(main)
