"""Why do a toy model's additions fail? Each add edit of an evaluate.py results file, looked at once more.

    python evaluate.py --ckpt CKPT --data WORLD/eval.jsonl --out R.json [--instruction-field optimized_instruction]
    python scripts/add_misses.py R.json WORLD/eval.jsonl

The success rule judges an add against the valid answer nearest the edit (minedit.toy.draw.nearest_target) and
says only *that* it failed. This splits the misses by what the edit drew in the new shape's colour (the largest
connected region of the pixels that changed from the source to within the rule's 0.15 of that colour): nothing;
the wrong place (its centroid over PLACE_PX from that of every valid answer, draw.valid_targets: for the raw
instruction any centre in the row's box, for the explicit rewrite one in the region it names); the wrong size or
form (the toy template that matches it best wherever it is, looks.template_ious, has a size the instruction
does not allow, or another shape). A miss with none of these drew the new shape right and broke the rest of the
scene (a neighbour repainted, the background off). The instruction field is the one the results file records.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minedit.errors import UserError, run_cli  # noqa: E402
from minedit.toy import draw as toydraw  # noqa: E402
from minedit.toy.looks import centroid, largest_region, template_ious  # noqa: E402
from minedit.toy.phrases import COLOURS  # noqa: E402

TOL = 0.15  # the success rule's per-pixel tolerance (metrics.SUCCESS_RULE["tol"])
MIN_PIXELS = 6  # fewer drawn pixels is nothing drawn (looks.drawn_shape_right's floor)
PLACE_PX = 1.5  # px: the shipped model's successful adds lie within 1.2 of their answer's centroid
REASONS = ("nothing drawn", "wrong place", "wrong size", "wrong form", "rest of the scene")


def drawn_pixels(src: np.ndarray, pred: np.ndarray, colour: str) -> np.ndarray:
    """H×W mask of the pixels the edit changed to (within TOL of) the new shape's colour; images H×W×3 in [0, 1]."""
    near = np.abs(pred - np.float32(COLOURS[colour]) / 255).max(-1) <= TOL
    return near & (np.abs(pred - src).max(-1) > TOL)


def in_place(row: dict, drawn: np.ndarray, field: str, size: int) -> bool:
    """Is the drawn shape where the instruction `field` lets it go: its centroid within PLACE_PX of a valid
    answer's (draw.valid_targets, whatever their size and form; the stored target where it is the only one)?"""
    answers = toydraw.valid_targets(row, size, field) or [row["target_objects"][-1]]
    here = centroid(drawn)
    return any(np.linalg.norm(here - centroid(toydraw.footprint(o, size))) <= PLACE_PX for o in answers)


def form_and_size(drawn: np.ndarray) -> tuple[str, str]:
    """(shape, size word) of the toy template that best matches the drawn region, wherever it is (looks.py)."""
    ious = template_ious(drawn)
    return max(ious, key=ious.get)


def reasons(sample: dict, row: dict, root: Path, field: str) -> list[str]:
    """What a failed add got wrong (REASONS; several can hold)."""
    try:
        src = np.asarray(Image.open(root / row["source"]).convert("RGB"), np.float32) / 255
        pred = Image.open(sample["pred"]).convert("RGB").resize(src.shape[1::-1], Image.BICUBIC)
    except OSError as e:
        raise UserError(f"cannot read an image of row {sample['index']} ({e}): keep the edits folder evaluate.py "
                        "wrote beside the results") from None
    pred = np.asarray(pred, np.float32) / 255
    new = row["target_objects"][-1]
    drawn = largest_region(drawn_pixels(src, pred, new["colour"]))
    if drawn.sum() < MIN_PIXELS:
        return ["nothing drawn"]
    shape, size_word = form_and_size(drawn)
    sizes = [new["size"]] if field == "optimized_instruction" else row["add_region"]["sizes"]
    out = [] if in_place(row, drawn, field, pred.shape[0]) else ["wrong place"]
    out += [] if size_word in sizes else ["wrong size"]
    out += [] if shape == new["shape"] else ["wrong form"]
    return out or ["rest of the scene"]


def tally(results: dict, rows: list[dict], root: Path, field: str) -> dict:
    """{category: Counter(adds, succeeded, each reason)} over the add edits of a results file."""
    out = collections.defaultdict(collections.Counter)
    for s in results.get("samples", []):
        if not 0 <= s.get("index", -1) < len(rows):
            raise UserError(f"a sample's index {s.get('index')} is not a row of the manifest: give the eval.jsonl "
                            "the results were scored on")
        row = rows[s["index"]]
        if row.get("kind") != "add":
            continue
        if "add_region" not in row:
            raise UserError(f"row {s['index']} is an add without add_region: a toy-world manifest is needed")
        for cat in (s["category"] or "all", "overall"):
            out[cat]["adds"] += 1
            out[cat]["succeeded"] += bool(s["success"])
            for why in [] if s["success"] else reasons(s, row, root, field):
                out[cat][why] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="an evaluate.py results JSON (its samples name each edit's image)")
    p.add_argument("data", help="the toy-world manifest the results were scored on (eval.jsonl)")
    p.add_argument("--instruction-field", choices=["instruction", "optimized_instruction"],
                   help="the text the edits were made from (default: the one the results file records, evaluate.py's "
                   "--instruction-field)")
    a = p.parse_args(argv)
    try:
        results = json.loads(Path(a.results).read_text())
        rows = [json.loads(line) for line in Path(a.data).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {e}: give an evaluate.py results JSON and its eval.jsonl") from None
    field = a.instruction_field or results.get("instruction_field", "instruction")
    if field not in ("instruction", "optimized_instruction"):
        raise UserError(f"{a.results} was made from {field!r}: only instruction and optimized_instruction "
                        "name where an add may go")
    counts = tally(results, rows, Path(a.data).parent, field)
    if not counts:
        raise UserError(f"{a.results} holds no add edit: score a toy-world manifest with evaluate.py first")
    print(f"{'category':<15}{'adds':>6}{'succeeded':>11}" + "".join(f"{r:>19}" for r in REASONS))
    for cat, c in sorted(counts.items(), key=lambda kv: kv[0] == "overall"):
        print(f"{cat:<15}{c['adds']:>6}{c['succeeded']:>11}" + "".join(f"{c[r]:>19}" for r in REASONS))
    print("(a miss can have several reasons; 'rest of the scene': the new shape right, a neighbour or the "
          "background not)")
    return 0


if __name__ == "__main__":
    run_cli(main)
