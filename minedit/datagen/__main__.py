"""python -m minedit.datagen: make editing pairs from a folder of images (or toy scenes with --toy-oracle)."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError, run_cli

REAL = {"mllm": "llava-hf/llava-1.5-7b-hf", "detector": "IDEA-Research/grounding-dino-base",
        "segmenter": "facebook/sam-vit-huge", "inpainter": "stable-diffusion-v1-5/stable-diffusion-inpainting"}
TOY_MLLM = "assets/toy/base/mllm"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minedit.datagen", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of source images (searched recursively)")
    src.add_argument("--toy-oracle", action="store_true", help="toy scenes with their exact masks and renders "
                     "standing in for detector, segmenter and inpainter (see minedit/datagen/toy.py)")
    p.add_argument("--out", required=True, help="output folder; rerun with the same flags to continue a run")
    p.add_argument("--n", type=int, help="toy scenes to draw (default 12), or the first N images of --images")
    p.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("models (hub id or local folder)")
    m.add_argument("--mllm", help=f"captions, proposes replacements, rewrites (default {REAL['mllm']}; "
                   f"toy: {TOY_MLLM})")
    m.add_argument("--llm", help="object extraction from the caption (default: the MLLM, text only)")
    m.add_argument("--detector", help=f"Grounding DINO (default {REAL['detector']})")
    m.add_argument("--segmenter", help=f"SAM or SAM 2 (default {REAL['segmenter']})")
    m.add_argument("--inpainter", help=f"diffusers inpainting pipeline (default {REAL['inpainter']})")
    m.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    m.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default fp16 on CUDA, else fp32")
    m.add_argument("--max-new-tokens", type=int, default=None, help="per MLLM answer (default 256; toy 32)")
    t = p.add_argument_group("thresholds and choices")
    t.add_argument("--box-threshold", type=float, default=0.35, help="lowest Grounding DINO box score kept")
    t.add_argument("--text-threshold", type=float, default=0.25)
    t.add_argument("--min-area", type=float, default=0.005, help="smallest mask, as a fraction of the image")
    t.add_argument("--max-area", type=float, default=0.6, help="largest mask, as a fraction of the image")
    t.add_argument("--dilate", type=int, default=None, help="grow masks by this many pixels (default 5; toy 0)")
    t.add_argument("--max-objects", type=int, default=8, help="objects per image")
    t.add_argument("--kinds", default="remove,add,replace", help="which edits to make")
    t.add_argument("--steps", type=int, default=30, help="inpainting steps")
    t.add_argument("--guidance", type=float, default=7.5, help="inpainting guidance scale")
    t.add_argument("--inpaint-side", type=int, default=1024, help="inpaint larger images downscaled to this side")
    t.add_argument("--no-reasoning", action="store_true", help="skip the MLLM's reasoning rewrite (step 4b)")
    j = p.add_argument_group("quality filter (step 5; not run without --judge-url)")
    j.add_argument("--judge-url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1")
    j.add_argument("--judge-model", default="gpt-4o")
    j.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    j.add_argument("--min-sc", type=float, default=3, help="drop pairs with min(S_i, S_n) below this (0-5)")
    j.add_argument("--min-pq", type=float, default=3, help="drop pairs with min(naturalness, artifacts) below this")
    p.add_argument("--no-progress", action="store_true")
    return p


def check(args) -> None:
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"remove", "add", "replace"}:
        raise UserError(f"--kinds {args.kinds!r}: use a comma list of remove, add, replace")
    args.kinds = kinds
    if args.n is not None and args.n <= 0:
        raise UserError(f"--n {args.n}: give a positive number")
    if not (0 <= args.min_area < args.max_area <= 1):
        raise UserError(f"--min-area {args.min_area} / --max-area {args.max_area}: need 0 <= min < max <= 1")
    if not (0 <= args.box_threshold <= 1):
        raise UserError(f"--box-threshold {args.box_threshold}: a score between 0 and 1")
    if args.toy_oracle:
        given = [f"--{k}" for k in ("detector", "segmenter", "inpainter", "llm") if getattr(args, k)]
        if given:
            raise UserError(f"--toy-oracle uses the scenes' exact objects, masks and renders, so {', '.join(given)} "
                            "would be unused — drop them, or use --images for real models")


def settings(args) -> dict:
    """What a rerun must repeat to continue this run (models, thresholds, choices; not --n, device, progress)."""
    keys = ("toy_oracle", "images", "seed", "mllm", "llm", "detector", "segmenter", "inpainter", "box_threshold",
            "text_threshold", "min_area", "max_area", "dilate", "max_objects", "kinds", "steps", "guidance",
            "inpaint_side", "no_reasoning", "judge_model", "min_sc", "min_pq")
    return {k: getattr(args, k) for k in keys}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    check(args)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports and backend notices would bury the summary

    from .build import build
    from .manifest import Output, write_simple
    from .run import run

    toy = args.toy_oracle
    args.mllm = args.mllm or (TOY_MLLM if toy else REAL["mllm"])
    if not toy:
        for k in ("detector", "segmenter", "inpainter"):
            setattr(args, k, getattr(args, k) or REAL[k])
    args.dilate = args.dilate if args.dilate is not None else (0 if toy else 5)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    out = Output(args.out, settings(args))
    pipeline, inputs = build(args, device, dtype)
    try:
        tally = run(pipeline, inputs, out, progress=not args.no_progress)
    except KeyboardInterrupt:  # every finished input is on disk; the one under way is redone on the rerun
        print(f"\nstopped after {len(out.done)} of {len(inputs)} inputs — rerun the same command to continue",
              file=sys.stderr)
        return 130
    for line in tally.lines():
        print(line)
    if args.judge_url is None:
        print("quality    not run (no --judge-url): every pair kept unscored")
    n = sum(tally.counts["written"].values())
    write_simple(args.out)
    print(f"{n} pairs in {os.path.join(args.out, 'manifest.jsonl')} from {len(out.done)} inputs "
          f"(simple instructions: simple.jsonl; summary: summary.json)")
    if n == 0:
        print("no pairs kept — see the dropped reasons above", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
