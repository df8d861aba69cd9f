"""Ship a trained toy InsightEdit as the model `python3 infer.py` uses with no flags (README, "Toy world results").

    python3 scripts/ship_toy.py --ckpt runs/toy/insightedit-s3 --results runs/toy/results-insightedit.json \
        --world runs/toy/eval-world
    python3 infer.py --attention-maps assets/toy/example-attention.png     # then the README's attention sheet

1. Picks the example: the first held-out edit of the preferred kinds and categories (--prefer) that the
   evaluation scored right *and* that `infer.py` with its default seed also gets right (it edits one image, so
   its random draws differ from the evaluation's batch), and writes example.png, example-target.png,
   example.json and example-before-after.png (source | edit | target).
2. Copies the checkpoint's weights and config into OUT/insightedit/ (OUT = assets/toy), the config's paths to
   the toy bases made relative to the repository so that the shipped model loads from any clone.
3. Copies the evaluation's per-category sheet to heldout-insightedit.png.
Nothing is trained or downloaded, and nothing is written unless an example is found; the held-out world must be
the one the results were scored on.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from evaluate import score_row  # noqa: E402
from minedit.checkpoint import find_checkpoint  # noqa: E402
from minedit.imagegrid import side_by_side  # noqa: E402


def candidates(results: dict, rows: list[dict], prefer: list[str]) -> list[int]:
    """Indices of the edits the evaluation scored right, ordered by the first `prefer` entry ("kind/category",
    either may be *) each matches; removals of any category last, additions never (they have several right
    answers, and infer.py's output is scored here against the one target the row names)."""
    def rank(i: int) -> int:
        r = rows[i]
        for k, p in enumerate(prefer):
            kind, _, cat = p.partition("/")
            if kind in ("*", r["kind"]) and cat in ("*", "", r["category"]):
                return k
        return len(prefer)
    ok = [s["index"] for s in results["samples"] if s["success"] and rows[s["index"]]["kind"] != "add"]
    return sorted(ok, key=lambda i: (rank(i), i))


def portable_config(ckpt: str) -> str:
    """The checkpoint's config.json with every absolute path to a shipped toy base (any checkout's
    .../assets/toy/base/PART) made relative to the repository, as the loader resolves it: the shipped model must
    load from any clone. Raises ValueError naming a path that points anywhere else."""
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    marker = os.path.join("assets", "toy", "base") + os.sep
    for key, value in cfg.items():
        if not (key.endswith("_path") and isinstance(value, str) and os.path.isabs(value)):
            continue
        rel = marker + value.rsplit(marker, 1)[1] if marker in value else None
        if rel is None or not os.path.isdir(os.path.join(ROOT, rel)):
            raise ValueError(f"{key}={value} is outside the repository's toy bases — train from assets/toy/base")
        cfg[key] = rel
    return json.dumps(cfg, indent=2, sort_keys=True)


def infer_one(ckpt: str, source: str, instruction: str, out: str) -> None:
    """The user's own command, in a subprocess, with every sampling default."""
    subprocess.run([sys.executable, os.path.join(ROOT, "infer.py"), "--ckpt", ckpt, "--image", source,
                    "--instruction", instruction, "--out", out], check=True, capture_output=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="the trained run folder or checkpoint folder")
    p.add_argument("--results", required=True, help="evaluate.py's JSON for that checkpoint on --world")
    p.add_argument("--world", required=True, help="the held-out toy world folder (its eval.jsonl was scored)")
    p.add_argument("--out", default=os.path.join(ROOT, "assets", "toy"))
    p.add_argument("--prefer", default="replace/reasoning,replace/*,remove/reasoning",
                   help="kind/category patterns, best first, for the example")
    p.add_argument("--tries", type=int, default=12, help="candidates to run through infer.py at most")
    a = p.parse_args(argv)

    ckpt = find_checkpoint(a.ckpt)
    try:
        config = portable_config(ckpt)  # checked before anything is written
    except ValueError as e:
        print(f"error: {ckpt}/config.json: {e}", file=sys.stderr)
        return 2
    results = json.load(open(a.results))
    rows = [json.loads(line) for line in open(os.path.join(a.world, "eval.jsonl"))]
    if len(rows) != results["count"]:
        print(f"error: {a.results} scored {results['count']} edits, {a.world}/eval.jsonl has {len(rows)} — "
              "give the world it was scored on", file=sys.stderr)
        return 2
    from PIL import Image
    with tempfile.TemporaryDirectory() as tmp:
        for n, i in enumerate(candidates(results, rows, a.prefer.split(","))[:a.tries]):
            r = {**rows[i], **{k: os.path.join(a.world, rows[i][k]) for k in ("source", "target", "mask")}}
            src, tgt = r["source"], r["target"]
            pred = os.path.join(tmp, f"{i}.png")
            infer_one(ckpt, src, r["instruction"], pred)
            score, _ = score_row(r, Image.open(src), Image.open(pred))  # as evaluate.py scores
            print(f"candidate {n}: row {i} {r['kind']}/{r['category']} \"{r['instruction']}\": "
                  f"{'right' if score['success'] else 'wrong'} with infer.py's default seed")
            if score["success"]:
                break
        else:
            print("error: no candidate was right with infer.py's default seed — raise --tries", file=sys.stderr)
            return 2
        shipped = os.path.join(a.out, "insightedit")  # nothing is written before an example is found
        os.makedirs(shipped, exist_ok=True)
        shutil.copyfile(os.path.join(ckpt, "weights.safetensors"), os.path.join(shipped, "weights.safetensors"))
        with open(os.path.join(shipped, "config.json"), "w") as f:
            f.write(config)
        print(f"copied {ckpt} -> {shipped}")
        images = [Image.open(f).convert("RGB") for f in (src, pred, tgt)]
        images[0].save(os.path.join(a.out, "example.png"))
        images[2].save(os.path.join(a.out, "example-target.png"))
        side_by_side(images, 128).save(os.path.join(a.out, "example-before-after.png"))
    share = {c: g["success_rate"] for c, g in results["summary"]["groups"].items()}
    example = {"image": "example.png", "instruction": r["instruction"], "target": "example-target.png",
               "category": r["category"], "kind": r["kind"],
               "source": f"toy world seed {json.load(open(os.path.join(a.world, 'meta.json')))['seed']} (held out), "
                         f"eval row {i}: the first held-out {r['kind']} edit ({r['category']}) that the shipped "
                         f"model gets right with infer.py's default seed 0 (it gets "
                         f"{100 * share.get(r['category'], 0):.0f} % of {r['category']} edits right)"}
    with open(os.path.join(a.out, "example.json"), "w") as f:
        f.write(json.dumps(example, indent=1) + "\n")
    sheet = os.path.splitext(a.results)[0] + "-grid.png"
    shutil.copyfile(sheet, os.path.join(a.out, "heldout-insightedit.png"))
    print(f"wrote the example (row {i}) and {os.path.join(a.out, 'heldout-insightedit.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
