"""Does the editor remove the shape it is told to? One toy scene, one seed, one instruction per shape in it.

    python scripts/grounding_probe.py --ckpt assets/toy/insightedit --data runs/toy/eval-world/eval.jsonl
    python scripts/grounding_probe.py --ckpt runs/toy/ip2p --data eval.jsonl --scenes 80 --seeds 0,1,2

For each toy scene of 2–3 shapes that differ in colour or shape, every shape gets the instruction "remove the
<colour> <shape>", and all of them are sampled from the same noise (same seed). The shape the editor removed is
the one whose footprint changed most (mean absolute change over its drawn pixels). Four figures:

  named    how often the removed shape is the named one, against the chance of a random pick (mean of 1/shapes);
  depends  in how many (scene, seed) pairs the removed shape changes with the instruction at all. An editor
           that chooses by the scene and the noise alone scores 0 here, whatever its "named" figure.
  spread   how much the UNet's text condition f_txt moves with the instruction, one scene at a time:
           ‖f − f̄‖ / ‖f̄‖ over the scene's instructions (f̄ their mean), averaged over scenes. 0 means the
           conditioning carries nothing of which shape was named.
  carried  how often f_txt of an instruction is nearer (mean squared distance) CLIP_text of that instruction
           than CLIP_text of the scene's other instructions: whether the condition names the right shape in the
           text encoder's terms (ip2p: 1 by construction; InsightEdit/SmartEdit: what the Q-Former and BIM keep;
           MIND-Edit: whether T_opt kept the referent). Chance is the "chance" figure.

--exact-text (InsightEdit, SmartEdit) gives the UNet BIM(CLIP_text(instruction)) in place of the Q-Former output:
the condition --qformer_teacher_forcing trains on, so "named" then says whether the UNet grounds the exact
condition, apart from how closely the Q-Former reaches it.

Sampling uses the checkpoint's settings; infer.py's sampling flags (--steps, --text-guidance, ...) override them.
Needs the toy manifest's "objects" (the toy world writes them); scenes come from the start of --data.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedit.errors import UserError, run_cli  # noqa: E402
from minedit.sampling_flags import add_sampling_flags, check_sampling_flags, sampling_settings  # noqa: E402


def removed_shape(source, edited, objects: list[dict]) -> int:
    """source, edited: 3×H×W in [0, 1]; objects: the scene's toy objects -> index of the one changed most."""
    import torch

    from minedit.toy.draw import footprint

    change = (edited.float() - source.float()).abs().mean(0)  # H×W
    size = source.shape[-1]
    scores = [change[torch.from_numpy(footprint(o, size)).bool()].mean().item() for o in objects]
    return max(range(len(objects)), key=scores.__getitem__)


def probe_scenes(rows: list[dict], n: int) -> list[dict]:
    """The first n rows whose source scene has 2+ shapes, each told apart by colour and shape; one row per scene."""
    out, seen = [], set()
    for r in rows:
        objs = r.get("objects") or []
        if len(objs) >= 2 and len({(o["colour"], o["shape"]) for o in objs}) == len(objs) \
                and r["source"] not in seen:
            out.append(r)
            seen.add(r["source"])
    return out[:n]


def probe(model, scenes: list[dict], seeds: list[int], settings: dict) -> dict:
    """Edit each scene once per shape and seed -> {named, chance, spread, carried} (fractions), {depends, pairs}
    (counts)."""
    import torch

    from minedit.data import load_image, to_tensor
    from minedit.sampler import edit

    named = total = depends = 0
    hw = (model.cfg.resolution // model.cfg.latent_factor,) * 2
    spread, carried = [], 0
    for r in scenes:
        src = to_tensor(load_image(r["source"]))
        texts = [f"remove the {o['colour']} {o['shape']}" for o in r["objects"]]
        sources = src[None].expand(len(texts), -1, -1, -1)  # shapes×3×H×W: one copy of the scene per instruction
        with torch.no_grad():
            cond, _ = model.conditions(sources, texts, hw, model.image_branch(model.cfg.stage))
            f = cond.f_txt.float()                           # shapes×T×D
            mean = f.mean(0, keepdim=True)
            spread.append(((f - mean).norm() / mean.norm()).item())
            ref = model.encode_text(texts).float()           # shapes×T×D: each instruction in CLIP-text terms
            dist = ((f[:, None] - ref[None]) ** 2).mean((-2, -1))  # shapes×shapes: f_txt(i) to CLIP_text(j)
            carried += (dist.argmin(1) == torch.arange(len(texts))).sum().item()
            for seed in seeds:
                out = edit(model, sources, texts, seed=[seed] * len(texts), **settings)
                picks = [removed_shape(src, img.cpu(), r["objects"]) for img in out]
                named += sum(p == i for i, p in enumerate(picks))
                total += len(picks)
                depends += len(set(picks)) > 1
    chance = sum(1 / len(r["objects"]) for r in scenes) / len(scenes)
    return {"named": named / total, "chance": chance, "depends": depends, "pairs": len(scenes) * len(seeds),
            "spread": sum(spread) / len(spread), "carried": carried / sum(len(r["objects"]) for r in scenes)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", required=True, help="run folder or checkpoint folder")
    p.add_argument("--data", required=True, help="toy-world manifest (rows with \"objects\"), e.g. eval.jsonl")
    p.add_argument("--scenes", type=int, default=40, help="how many scenes of 2-3 shapes (from the start)")
    p.add_argument("--seeds", default="0,1", help="comma-separated sampling seeds; each scene is edited per seed")
    p.add_argument("--exact-text", action="store_true", help="the UNet reads BIM(CLIP_text(instruction)) in place "
                   "of the Q-Former output (what --qformer_teacher_forcing trains on)")
    add_sampling_flags(p, seed=False)  # --steps --scheduler --text-guidance --image-guidance ...: as infer.py
    a = p.parse_args(argv)
    check_sampling_flags(a)
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {a.seeds!r}: give integers separated by commas, e.g. 0,1") from None
    if a.scenes < 1:
        raise UserError(f"--scenes {a.scenes}: must be at least 1")
    from minedit.data import read_manifest
    from minedit.model import load_model
    from minedit.recipes import use_exact_text

    rows, _ = read_manifest(a.data, kind="edit")
    scenes = probe_scenes(rows, a.scenes)
    if not scenes:
        raise UserError(f"{a.data} has no toy scenes of 2-3 shapes with \"objects\" — give a toy world's manifest")
    model = load_model(a.ckpt)
    if a.exact_text:
        use_exact_text(model)
    res = probe(model, scenes, seeds, sampling_settings(model.cfg, a, a.ckpt))
    print(f"{a.ckpt}: {len(scenes)} scenes x {len(seeds)} seeds: named shape removed {100 * res['named']:.0f} % "
          f"(chance {100 * res['chance']:.0f} %); the removed shape depends on the instruction in "
          f"{res['depends']} / {res['pairs']} scene-seeds; f_txt spread over instructions {res['spread']:.3f}, "
          f"nearest its own instruction's CLIP_text {100 * res['carried']:.0f} %")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    run_cli(main)
