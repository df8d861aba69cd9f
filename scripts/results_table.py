"""One markdown table from several `evaluate.py` results files: the toy lever study's and the README's rows.

    python scripts/results_table.py runs/levers/results/*.json
    python scripts/results_table.py base=runs/r/base.json "mask ×5=runs/r/mask.json"     # NAME=FILE labels rows

Columns: edit success per category (simple / understanding / reasoning) and overall, success per kind (remove /
replace / add), in-mask PSNR, background PSNR and CLIPScore. Success is strict and moves late; the smoother
figures show a lever's direction early, which is why the study reports them side by side.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CATEGORIES = ("simple", "understanding", "reasoning")
KINDS = ("remove", "replace", "add")


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def num(x, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def row(label: str, res: dict) -> str:
    groups, overall = res["summary"]["groups"], res["summary"]["overall"]
    kinds = (res.get("summary_by_kind") or {}).get("groups", {})
    cats = " / ".join(pct(groups.get(c, {}).get("success_rate")) for c in CATEGORIES)
    by_kind = " / ".join(pct(kinds.get(k, {}).get("success_rate")) for k in KINDS)
    return (f"| {label} | {cats} % | {num(100 * overall['success_rate'])} % | {by_kind} % | "
            f"{num(overall.get('psnr_in'))} | {num(overall.get('psnr_bg'))} | {num(overall.get('clip_score'))} |")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    lines = ["| run | success s / u / r | overall | remove / replace / add | in-mask PSNR | bg PSNR | CLIPScore |",
             "|---|---|---|---|---|---|---|"]
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
