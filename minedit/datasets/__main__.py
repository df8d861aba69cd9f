"""python -m minedit.datasets FORMAT SRC --out DIR: convert a public dataset to a minedit manifest (see __init__)."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError, run_cli
from . import formats


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m minedit.datasets", allow_abbrev=False,
                                description="Convert an editing or caption dataset to a minedit JSONL manifest.")
    p.add_argument("format", help=f"one of: {', '.join(formats())}")
    p.add_argument("src", help="a parquet file or folder of shards; an imagefolder; a .tsv or folder of image+.txt")
    p.add_argument("--out", required=True, help="folder for images/, manifest.jsonl and convert.json")
    p.add_argument("--limit", type=int, help="read only the first N rows (to try a conversion)")
    p.add_argument("--max-skip-fraction", type=float, default=0.1,
                   help="fail when more than this fraction of the rows read are skipped (default 0.1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    known = formats()
    if a.format not in known:
        raise UserError(f"unknown format {a.format!r} — use one of: {', '.join(known)}")
    if a.limit is not None and a.limit <= 0:
        raise UserError(f"--limit {a.limit}: must be at least 1")
    if not 0 <= a.max_skip_fraction <= 1:
        raise UserError(f"--max-skip-fraction {a.max_skip_fraction}: must be between 0 and 1")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UserError(f"--out {a.out} is a file — name a folder")
    reader, kind = known[a.format]
    total, rows = reader(a.src)  # structural faults (columns, file types, pyarrow) fail here, before any write
    from tqdm import tqdm

    from .writer import Converter

    conv = Converter(a.out, a.format, a.src, kind, a.max_skip_fraction)
    total = min(total, a.limit) if total is not None and a.limit else (a.limit or total)
    with tqdm(total=total, unit="row", desc=f"{a.format} -> {a.out}", disable=None, file=sys.stderr) as bar:
        for n, row in enumerate(rows):
            if a.limit and n >= a.limit:
                break
            conv.add(row)
            bar.update()
    s = conv.finish()
    skipped = ", ".join(f"{r}: {n}" for r, n in sorted(s["skipped"].items(), key=lambda x: -x[1])) or "none"
    print(f"kept {s['kept']} rows ({s['kept_earlier']} from an earlier run); skipped {sum(s['skipped'].values())} "
          f"({skipped})")
    stage = "--stage 1" if kind == "caption" else "--stage 2"
    print(f"wrote {s['manifest']} — e.g. python3 train.py --preset full {stage} --data {s['manifest']} ...")
    return 0


if __name__ == "__main__":
    run_cli(main)
