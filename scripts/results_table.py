"""One markdown table from several `evaluate.py` results files: the toy lever study's and the README's rows.

    python scripts/results_table.py runs/levers/results/*.json
    python scripts/results_table.py base=runs/r/base.json "mask ×5=runs/r/mask.json"     # NAME=FILE labels rows

Columns: edit success per category (simple / understanding / reasoning) and overall, success per kind (remove /
replace / add), in-mask PSNR, background PSNR and CLIPScore. Success is strict and moves late; the smoother
figures show a lever's direction early, which is why the study reports them side by side.

The last column asks whether the editor finds *which* shape an instruction names: success on removals in toy
scenes of two or three shapes, against (in brackets) the success of removing one of the scene's shapes picked at
random. A one-shape removal needs only *that* something is removed; these need the instruction grounded in the
image. After the dot: how often the named shape is gone at all (its footprint right: evaluate.py's `acc_core`,
or `acc_in` in files written before it, ≥ MIN_FRACTION), whatever happened to the rest of the scene — above the
success figure by the edits that remove it *and* more. The column before it splits replacements into recolours
(same shape, new colour) and new shapes (a triangle turned into a star, with or without a new colour): a recolour
repaints a footprint that is already there, a new shape has to be drawn. Both are read from the scored manifest
(the results' `data`), "–" where that has no toy scene description.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CATEGORIES = ("simple", "understanding", "reasoning")
KINDS = ("remove", "replace", "add")
# The in-mask half of an edit's success: its share of edit-region pixels right (acc_core) must reach this. It is
# minedit.eval.metrics.edit_scores' min_fraction, repeated so that this script stays free of the torch import.
MIN_FRACTION = 0.9


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def num(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def row(label: str, res: dict) -> str:
    groups, overall = res["summary"]["groups"], res["summary"]["overall"]
    kinds = (res.get("summary_by_kind") or {}).get("groups", {})
    cats = " / ".join(pct(groups.get(c, {}).get("success_rate")) for c in CATEGORIES)
    by_kind = " / ".join(pct(kinds.get(k, {}).get("success_rate")) for k in KINDS)
    rows = manifest(res)
    return (f"| {label} | {cats} % | {num(100 * overall['success_rate'])} % | {by_kind} % | "
            f"{num(overall.get('psnr_in'))} | {num(overall.get('psnr_bg'))} | {num(overall.get('clip_score'))} | "
            f"{replacements(res, rows)} | {grounding(res, rows)} |")


def manifest(res: dict) -> list[dict]:
    """The scored manifest's rows, or [] when it cannot be read."""
    try:
        lines = Path(res["data"]).read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (KeyError, OSError, ValueError):
        return []


def scored(res: dict, rows: list[dict], kind: str) -> list[tuple[dict, dict]]:
    """(scored sample, manifest row) of every scored sample of this kind."""
    return [(s, rows[s["index"]]) for s in res.get("samples", [])
            if s.get("kind") == kind and s.get("index", len(rows)) < len(rows)]


def grounding(res: dict, rows: list[dict]) -> str:
    """Multi-shape removals: 'success (chance) · named shape gone' in %, or '–'."""
    multi = [(s, len(r["objects"])) for s, r in scored(res, rows, "remove") if len(r.get("objects") or ()) >= 2]
    if not multi:
        return "–"
    right, chance = (sum(s["success"] for s, _ in multi), sum(1 / n for _, n in multi))
    acc = [s.get("acc_core", s.get("acc_in")) for s, _ in multi]
    gone = [a >= MIN_FRACTION for a in acc if a is not None]
    return (f"{pct(right / len(multi))} ({pct(chance / len(multi))}) %"
            + (f" · {pct(sum(gone) / len(gone))} %" if gone else ""))


def new_shape(row: dict) -> bool | None:
    """Whether a replacement draws a different shape where the old one was; None without a scene description."""
    objects = row.get("objects") or []
    before = {(o["x"], o["y"]): o["shape"] for o in objects}
    changed = [o for o in row.get("target_objects") or () if o not in objects]
    if len(changed) != 1 or (changed[0]["x"], changed[0]["y"]) not in before:
        return None
    return before[changed[0]["x"], changed[0]["y"]] != changed[0]["shape"]


def replacements(res: dict, rows: list[dict]) -> str:
    """Replacement success split into recolours / new shapes, in %, or '–'."""
    split = {False: [], True: []}
    for s, r in scored(res, rows, "replace"):
        if (drawn := new_shape(r)) is not None:
            split[drawn].append(s["success"])
    if not split[False] and not split[True]:
        return "–"
    return " / ".join(pct(sum(v) / len(v) if v else None) for v in (split[False], split[True])) + " %"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    lines = ["| run | success s / u / r | overall | remove / replace / add | in-mask PSNR | bg PSNR | CLIPScore | "
             "replacements: recolour / new shape | removals among 2–3 shapes (chance) · named one gone |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arg in argv:
        label, _, path = arg.rpartition("=") if "=" in arg else (Path(arg).stem, "", arg)
        try:
            res = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"error: cannot read results file {path}: {e} — give files written by evaluate.py --out",
                  file=sys.stderr)
            return 2
        lines.append(row(label, res))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
