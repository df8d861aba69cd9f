"""Edit an image with a trained minedit checkpoint.

The shipped toy example (no flags):
    python infer.py
One image:
    python infer.py --ckpt runs/toy-s3 --image photo.png --instruction "remove the shape with three corners"
    python infer.py --ckpt runs/s3 --image photo.jpg --instruction "remove the object that tells the time" \
        --out edited.png --steps 50 --seed 0 --text-guidance 7.5 --image-guidance 1.5
A whole manifest (JSONL rows with "source" and "instruction"), batched:
    python infer.py --ckpt runs/s3 --batch eval.jsonl --out-dir edits/

The output keeps the input's size and aspect: the image is resized to the model's resolution (shorter side,
keeping aspect, sides rounded to what the VAE and UNet need), edited, and resized back.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from minedit import fsio
from minedit.editfiles import check_inputs, check_out_path, edit_files
from minedit.errors import UserError, run_cli
from minedit.sampling_flags import add_sampling_flags, check_sampling_flags, sampling_settings

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_CKPT = os.path.join(HERE, "assets", "toy", "insightedit")
TOY_EXAMPLE = os.path.join(HERE, "assets", "toy", "example.json")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", help="run folder or checkpoint folder (default: the shipped toy checkpoint)")
    p.add_argument("--image", help="the image to edit")
    p.add_argument("--instruction", help="what to do to it")
    p.add_argument("--out", help="output PNG (default: <image>-edited.png)")
    p.add_argument("--mask", help="optional mask: edit only where it is white")
    add_sampling_flags(p)  # --steps --seed --scheduler --text-guidance --image-guidance --ip-scale --no-topt ...
    p.add_argument("--resolution", type=int, help="working resolution (default: the model's)")
    p.add_argument("--batch", help="a JSONL manifest to edit row by row")
    p.add_argument("--out-dir", help="with --batch: the folder for the edits")
    p.add_argument("--batch-size", type=int, default=8, help="with --batch: edits per UNet batch")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA if present)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--attention-maps", metavar="PATH.png", help="one edit: also write the UNet's cross-attention "
                   "map of each conditioning token at three steps (a PNG sheet, raw maps beside it as .npz)")
    return p.parse_args(argv)


def check_args(a):
    from minedit import runtime

    check_sampling_flags(a)
    if a.device:
        runtime.pick_device(a.device)
    if a.batch_size <= 0:
        raise UserError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.resolution is not None and a.resolution <= 0:
        raise UserError(f"--resolution {a.resolution}: must be positive")
    if a.batch and not a.out_dir:
        raise UserError("--batch needs --out-dir — name the folder to write the edits to")
    if not a.batch and (a.image is None) != (a.instruction is None):
        raise UserError("give both --image and --instruction (or neither, for the shipped example)")
    if a.instruction is not None and not a.instruction.strip():
        raise UserError("--instruction is empty — say what to change, e.g. \"remove the red circle\"")
    if a.instruction is not None:
        a.instruction = clean_text(a.instruction, "--instruction")
    if a.attention_maps:
        from minedit.eval.attnmaps import check_path

        if a.batch:
            raise UserError("--attention-maps records one edit — drop --batch, or give --image and --instruction")
        check_path(a.attention_maps)


def clean_text(text: str, what: str) -> str:
    """Bytes that are not UTF-8 reach sys.argv as lone surrogates (PEP 383); they become U+FFFD with a warning
    rather than an error: the rest of the instruction is still meaningful."""
    fixed = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if fixed != text:
        print(f"warning: {what} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", file=sys.stderr)
    return fixed


def unknown_words(model, instructions: list[str]) -> list[str]:
    """Words that a tokenizer of the model reads as <unk> (the toy models' word-level vocabulary is the toy
    world's; a real model's byte-level BPE has no unknown words, so this is empty)."""
    unknown = []
    for tok in (getattr(model, "tokenizer", None), getattr(model, "text_tokenizer", None)):
        if tok is None or tok.unk_token_id is None:
            continue
        for word in dict.fromkeys(w for text in instructions for w in text.split()):
            if tok.unk_token_id in tok(word, add_special_tokens=False).input_ids and word not in unknown:
                unknown.append(word)
    return unknown


def main(argv=None) -> int:
    a = parse_args(argv)
    check_args(a)
    from minedit import runtime
    from minedit.data import read_manifest

    jobs = []  # (image path, instruction, mask path or None, output path)
    if a.batch:
        rows, bad = read_manifest(a.batch, kind="infer")
        for line, why in bad:
            print(f"warning: {a.batch} line {line}: {why} (skipped)", file=sys.stderr)
        if not rows:
            raise UserError(f"{a.batch} has no usable rows — each row needs \"source\" and \"instruction\"")
        fsio.makedirs(a.out_dir, "--out-dir")
        check_out_path(os.path.join(a.out_dir, "x.png"))
        jobs = [(r["source"], clean_text(r["instruction"], f"{a.batch} line {r['_line']}: instruction"), r.get("mask"),
                 os.path.join(a.out_dir, f"{i:05d}.png"))
                for i, r in enumerate(rows)]
    else:
        image, instruction = a.image, a.instruction
        if image is None:
            if not os.path.isfile(TOY_EXAMPLE):
                raise UserError("no shipped toy example found — pass --ckpt, --image and --instruction")
            ex = json.load(open(TOY_EXAMPLE))
            image = os.path.join(os.path.dirname(TOY_EXAMPLE), ex["image"])
            instruction = ex["instruction"]
            print(f"editing the shipped example {image}: \"{instruction}\"")
        out = a.out or os.path.splitext(image)[0] + "-edited.png"
        if a.image is None and a.out is None:
            out = os.path.join(os.getcwd(), "example-edited.png")
        check_out_path(out)
        if a.attention_maps and os.path.abspath(a.attention_maps) == os.path.abspath(out):
            raise UserError(f"--attention-maps {a.attention_maps} is also the edit's --out — give them two names")
        jobs = [(image, instruction, a.mask, out)]

    check_inputs(a.ckpt or TOY_CKPT, jobs if not a.batch else [])
    device = runtime.pick_device(a.device)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    rt = runtime.setup(precision, str(device))
    from minedit.model import load_model

    model = load_model(a.ckpt or TOY_CKPT, rt.device, rt.frozen_dtype)
    cfg = model.cfg
    settings = sampling_settings(cfg, a, a.ckpt or TOY_CKPT)
    unknown = unknown_words(model, [job[1] for job in jobs])
    if unknown:  # the edit still runs: the other words may carry it
        print(f"warning: the model does not know the words {', '.join(map(repr, unknown[:10]))} (read as <unk>)"
              + (" — the toy world's vocabulary is minedit/toy/phrases.py's VOCAB" if cfg.preset == "toy" else ""),
              file=sys.stderr)

    t0 = time.perf_counter()
    recorder = contextlib.nullcontext()
    if a.attention_maps:  # hooks that only read the attention layers' inputs: the edit itself is unchanged
        from minedit.eval.attnmaps import AttentionRecorder, spread_steps

        recorder = AttentionRecorder(model.unet, spread_steps(settings["steps"]), text_encoder=model.text_encoder)
    with recorder:
        done = edit_files(model, rt, jobs, settings, a.resolution or cfg.resolution,
                          a.batch_size if a.batch else 1, [a.seed + i for i in range(len(jobs))], verbose=not a.batch)
    if a.attention_maps:
        from minedit.data import load_image
        from minedit.eval.attnmaps import save

        npz = save(a.attention_maps, model, recorder, load_image(jobs[0][0]), jobs[0][1])
        print(f"wrote {a.attention_maps} and {npz}")
    if a.batch:
        print(f"wrote {done} edits to {a.out_dir}")
    print(f"{(time.perf_counter() - t0) / max(1, done):.2f} s per edit on {rt.device}")
    return 0


if __name__ == "__main__":
    run_cli(main)
