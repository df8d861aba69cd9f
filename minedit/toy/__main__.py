"""`python -m minedit.toy --out DIR [--n N --seed S --size PX]`: write a toy world's images and manifests.

The folder gets images/, train.jsonl, eval.jsonl, captions.jsonl and meta.json (written last), as
`minedit.toy.world.generate` describes; bad flags and unwritable folders end in one `error: ...` line, exit 2.
"""
from __future__ import annotations

import argparse
import sys
import time

from .world import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m minedit.toy",
                                 description="Write a toy world: drawn shape scenes with exact edits.")
    ap.add_argument("--out", required=True, help="output folder (created if missing)")
    ap.add_argument("--n", type=int, default=3000, help="number of editing samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels")
    ap.add_argument("--eval-fraction", type=float, default=0.1)
    args = ap.parse_args(argv)
    if not args.out.strip():
        print("error: --out is empty — name the folder to write the world to, e.g. --out toyworld", file=sys.stderr)
        return 2
    start = time.time()
    try:
        meta = generate(args.out, args.n, args.seed, args.size, args.eval_fraction)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot write to {args.out}: {e.strerror or e} — choose a writable --out folder",
              file=sys.stderr)
        return 2
    print(f"wrote {meta['n_train']} train + {meta['n_eval']} eval samples to {args.out} "
          f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
