"""Score a checkpoint's edits on an evaluation manifest: a table per category, JSON, and a contact sheet.

    python evaluate.py --ckpt runs/toy-s3 --data toyworld/eval.jsonl --out results.json
    python evaluate.py --data toyworld/eval.jsonl         # no --ckpt: the shipped toy checkpoint, as infer.py
    python evaluate.py --ckpt runs/s3 --data advancededit_eval.jsonl --limit 500 --seed 0 \
        --clip openai/clip-vit-large-patch14
    python evaluate.py --ckpt runs/s3 --data eval.jsonl --pred-dir edits/      # score edits made earlier
    python evaluate.py --ckpt runs/s3 --data eval.jsonl --instruction-field optimized_instruction --exact-text
                                               # diagnostic: the UNet given a perfect MLLM and Q-Former
    python evaluate.py ... --judge-url http://localhost:8000/v1 --judge-model qwen2-vl   # VIEScore, off by default

Per sample, per category and overall (minedit/eval/metrics.py defines each precisely):
    psnr_bg, ssim_bg   background fidelity vs the target (outside the mask; the whole image without one)
    psnr_in            inside the mask vs the target
    success            edit success where targets are exact (≥ 90 % of in-mask pixels off the target's
                       outlines within 0.15 of the target, L∞ over RGB in [0, 1], background PSNR ≥ 25 dB, and
                       in the toy world each shape the target draws recognised as that shape, `shape_right`,
                       and each shape it keeps left as it was, `others_kept`)
    lpips_bg           when the `lpips` package and its weights are installed
    clip_i, clip_score CLIP image–image (edit vs target) and 100·cos(edit, instruction), with a CLIPModel
                       (--clip, default the checkpoint's clip_path; skipped when it has none)
    viescore           ½(S_n/5 + S_i/5) from an MLLM judge (InsightEdit supp. eq. 1), with --judge-url
Toy-world add rows (`add_region`) have many right answers ("add a star at the top"): each is scored against the
valid target nearest the edit (minedit.toy.draw.nearest_target), and `valid_targets` says how many there were.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from minedit import editfiles, fsio
from minedit.errors import UserError, run_cli
from minedit.sampling_flags import add_sampling_flags, check_sampling_flags, sampling_settings

COLUMNS = ("count", "psnr_bg", "ssim_bg", "psnr_in", "success_rate", "lpips_bg", "clip_i", "clip_score",
           "viescore")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--ckpt", help="run folder or checkpoint folder (default: the shipped toy checkpoint, as infer.py)")
    p.add_argument("--data", required=True, help="editing manifest (JSONL with source, target, instruction)")
    p.add_argument("--out", default="results.json", help="results JSON (a contact sheet PNG is written beside it)")
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--pred-dir", help="edits already made (NNNNN.png per row); made there if missing")
    add_sampling_flags(p)  # --steps --seed --scheduler --text-guidance --image-guidance --ip-scale --no-topt ...
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--instruction-field", default="instruction",
                   help="which manifest field to edit with (e.g. simple_instruction, optimized_instruction)")
    p.add_argument("--exact-text", action="store_true", help="diagnostic (InsightEdit, SmartEdit): the UNet reads "
                   "BIM(CLIP_text(instruction)) in place of the Q-Former output — with --instruction-field "
                   "optimized_instruction, what the UNet makes of a perfect MLLM and Q-Former")
    p.add_argument("--clip", help="CLIPModel id or folder for CLIP-I and CLIPScore")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint for VIEScore (off by default)")
    p.add_argument("--judge-model", default="gpt-4o")
    p.add_argument("--device")
    p.add_argument("--protocol", help="score as a benchmark does: reason-edit (--data: its folder), magicbrush or "
                   "gedit (--data: a manifest); see minedit/eval/benchmarks.py and the README")
    p.add_argument("--dino", help="magicbrush: a DINO ViT id or folder for the DINO score (e.g. facebook/dino-vits16)")
    p.add_argument("--lpips", default="auto", help="reason-edit: LPIPS network (squeeze as SmartEdit, alex, vgg), "
                   "off, or auto (squeeze when the lpips package is installed)")
    return p.parse_args(argv)


def check_args(a) -> None:
    """Each flag on its own, before any file is read (a --protocol run included)."""
    from minedit import runtime

    if a.limit is not None and a.limit <= 0:
        raise UserError(f"--limit {a.limit}: must be at least 1")
    if a.batch_size <= 0:
        raise UserError(f"--batch-size {a.batch_size}: must be at least 1")
    check_sampling_flags(a)
    if a.judge_url and not a.judge_url.startswith(("http://", "https://")):
        raise UserError(f"--judge-url {a.judge_url}: give the endpoint's full URL, e.g. http://localhost:8000/v1")
    if a.pred_dir and os.path.exists(a.pred_dir) and not os.path.isdir(a.pred_dir):
        raise UserError(f"--pred-dir {a.pred_dir} is a file — name a folder for the edits")
    if a.device:
        runtime.pick_device(a.device)


def as_array(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def main(argv=None) -> int:
    a = parse_args(argv)
    check_args(a)
    import infer

    a.ckpt = a.ckpt or infer.TOY_CKPT
    if a.protocol:  # a benchmark's own layout and formulas (minedit/eval/benchmarks.py, minedit/eval/protocols.py)
        from minedit.eval import benchmarks

        return benchmarks.run(a)
    from minedit import runtime
    from minedit.eval import metrics
    from minedit.recipes import check_exact_text

    # ---- inputs: the manifest, the checkpoint, the settings; a bad one fails here, before any folder is made ----
    editfiles.check_out_path(a.out)
    rows = read_rows(a)
    cfg = editfiles.check_inputs(a.ckpt, [])
    settings = sampling_settings(cfg, a, a.ckpt)
    if a.exact_text:
        check_exact_text(cfg)
    pred_dir = a.pred_dir or os.path.splitext(a.out)[0] + "-edits"
    fsio.makedirs(pred_dir, "--pred-dir")
    preds = [os.path.join(pred_dir, f"{i:05d}.png") for i in range(len(rows))]

    # ---- edits: make the ones the folder lacks (row i always with seed + i) -----------------------------------
    rt = runtime.setup("bf16" if runtime.pick_device(a.device).type == "cuda" else "fp32", a.device)
    todo = [i for i, p in enumerate(preds) if not os.path.isfile(p)]
    made_with = check_edits_stamp(pred_dir, a, cfg, settings, making=bool(todo))
    latency = make_edits(a, rows, pred_dir, preds, todo, cfg, settings, rt) if todo else None

    # ---- scores: per sample, then CLIP and the judge over all of them ------------------------------------------
    results, images = score_edits(a, rows, preds)
    clip_path = a.clip or cfg.clip_path
    if clip_path:
        add_clip_scores(clip_path, images, results, rt.device)
    missing = add_viescore(a.judge_url, a.judge_model, images, results) if a.judge_url else None

    # ---- report: tables on stdout, the results JSON, the sheets -----------------------------------------------
    summary = metrics.aggregate(results, by="category")
    print(format_table(summary))
    by_kind = metrics.aggregate(results, by="kind") if any(r["kind"] for r in results) else None
    if by_kind:  # remove / add / replace: which kind of edit fails says which part is short (README, toy results)
        print(format_table(by_kind, "kind"))
    out = {"ckpt": a.ckpt, "data": a.data, "instruction_field": a.instruction_field, "seed": a.seed,
           "count": len(results), "summary": summary,
           "summary_by_kind": by_kind, "success_rule": metrics.SUCCESS_RULE,
           "latency_s": latency, "settings": made_with,
           "viescore_missing": missing, "samples": results, "clip": clip_path or None}
    fsio.write_text(a.out, json.dumps(out, indent=1, default=float))
    stem = os.path.splitext(a.out)[0]
    sheets = [contact_sheet(images[:8], stem + ".png")]
    if any(r["category"] for r in results):
        sheets.append(category_grid(images, results, stem + "-grid.png"))
    print(f"wrote {a.out} and {' and '.join(sheets)}")
    return 0


def read_rows(a) -> list[dict]:
    """The manifest's usable rows (at most --limit), each with a non-empty --instruction-field."""
    from minedit.data import read_manifest

    rows, bad = read_manifest(a.data, kind="edit")
    for line, why in bad:
        print(f"warning: {a.data} line {line}: {why} (skipped)", file=sys.stderr)
    rows = rows[: a.limit] if a.limit else rows
    if not rows:
        raise UserError(f"{a.data} has no usable rows — each row needs source, target and instruction")
    for r in rows:
        if not (r.get(a.instruction_field) or "").strip():
            raise UserError(f"{a.data}: a row has no {a.instruction_field!r} — choose --instruction-field "
                            "from the manifest's fields")
    return rows


def make_edits(a, rows, pred_dir: str, preds: list[str], todo: list[int], cfg, settings: dict, rt) -> float:
    """Edit rows `todo` into their paths in `preds`, row i with seed a.seed + i: scoring a subset or completing
    a folder gives the same edits. -> seconds per edit."""
    from minedit.model import load_model

    model = load_model(a.ckpt, rt.device, rt.frozen_dtype)
    if a.exact_text:
        from minedit.recipes import use_exact_text

        use_exact_text(model)
    jobs = [(rows[i]["source"], rows[i][a.instruction_field], None, preds[i]) for i in todo]
    t0 = time.perf_counter()
    editfiles.edit_files(model, rt, jobs, settings, cfg.resolution, a.batch_size, [a.seed + i for i in todo])
    latency = (time.perf_counter() - t0) / len(todo)
    print(f"made {len(todo)} edits in {pred_dir} ({latency:.3f} s per edit on {rt.device})")
    return latency


def score_edits(a, rows, preds) -> tuple[list[dict], list[tuple]]:
    """Each edit against its row's target -> (per-sample scores, (source, target, edit, instruction) images)."""
    from minedit.data import load_image

    results, images = [], []
    for i, (row, pred_path) in enumerate(zip(rows, preds)):
        source, pred = load_image(row["source"]), load_image(pred_path)
        s, target = score_row(row, source, pred, a.instruction_field)
        s.update(index=i, category=row.get("category") or "", kind=row.get("kind") or "",
                 instruction=row[a.instruction_field], pred=pred_path)
        results.append(s)
        images.append((source, target, pred, row[a.instruction_field]))
    return results, images


def score_row(row: dict, source, pred, field: str = "instruction") -> tuple[dict, object]:
    """One edit (PIL images) against its manifest row -> (scores, the target it was scored against). A toy-world
    add leaves size and place partly free: it is scored against the valid answer nearest the edit; a toy row's
    drawn shapes must be recognised (`shape_right`, None for a removal or a row without a scene description) and its
    untouched shapes kept (`others_kept`, None where the target keeps none)."""
    from minedit.data import load_image, load_mask
    from minedit.eval import metrics
    from minedit.toy import draw as toydraw, looks

    target = load_image(row["target"])
    size = target.size
    edited = as_array(pred.resize(size))
    mask = load_mask(row["mask"], size) if row.get("mask") else None
    choices, target_objects = 1, row.get("target_objects")
    if row.get("add_region"):
        nearest = toydraw.nearest_target(row, edited.astype(np.float32), field)
        if nearest:
            target, mask, choices, target_objects = nearest
    mask = np.asarray(mask) > 127 if mask is not None else None
    wanted = as_array(target)
    s = metrics.edit_scores(edited, wanted, as_array(source.resize(size)), mask, lpips=metrics.LPIPS_AVAILABLE)
    shape_right = kept = None
    if mask is not None and row.get("objects") is not None and target_objects is not None:
        shape_right = looks.drawn_shape_right(edited * 255, row["objects"], target_objects, mask)
        kept = metrics.regions_kept(edited, wanted, looks.kept_regions(row["objects"], target_objects, mask))
    rule = metrics.SUCCESS_RULE
    if (rule["drawn_shape"] and shape_right is False) or (rule["others_kept"] and kept is False):
        s["success"] = False
    s.update(shape_right=shape_right, others_kept=kept, valid_targets=choices)
    return s, target


STAMP_ADDED = {"exact_text": False}  # stamp fields added later: their value in the stamps written before them


def check_edits_stamp(pred_dir: str, a, cfg, settings: dict, making: bool) -> dict | None:
    """--pred-dir/edits.json records what made its edits. Before making (more) edits there, the stamp must match
    this command — a run killed and started again continues only with the same checkpoint, manifest and settings,
    and so gives the results of an uninterrupted run; edits are never mixed. Scoring a complete folder needs no
    match. -> the settings that made the edits (None when unknown: edits made elsewhere)."""
    from minedit import checkpoint

    stamp = {"ckpt": os.path.abspath(checkpoint.find_checkpoint(a.ckpt)), "data": os.path.abspath(a.data),
             "instruction_field": a.instruction_field, "seed": a.seed, "resolution": cfg.resolution, **settings,
             "exact_text": a.exact_text}
    path = os.path.join(pred_dir, "edits.json")
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None  # none, or unreadable: the edits' origin is unknown, like edits made elsewhere
    old = {**STAMP_ADDED, **old} if isinstance(old, dict) else None
    if making and old is not None:
        differ = [k for k in stamp if old.get(k) != stamp[k]]
        if differ:
            shown = ", ".join(f"{k} {old.get(k)!r} there, {stamp[k]!r} now" for k in differ[:3])
            raise UserError(f"--pred-dir {pred_dir} holds edits made with other settings ({shown}) — repeat that "
                            "command's flags, delete the folder, or choose another --pred-dir")
    if making and old is None:
        fsio.write_text(path, json.dumps(stamp, indent=1) + "\n", "--pred-dir")
        old = stamp
    return None if old is None else {k: old.get(k) for k in [*settings, *STAMP_ADDED]}


def add_clip_scores(path, images, results, device):
    import torch

    from minedit.eval import metrics
    from minedit.eval.protocols import load_clip

    model, tok = load_clip(path, device)
    with torch.no_grad():
        ci, cs = metrics.clip_scores(model, tok, [as_array(p) for _, _, p, _ in images],
                                     [t for *_, t in images], [as_array(t) for _, t, _, _ in images])
    for r, i, s in zip(results, ci, cs):
        r["clip_i"], r["clip_score"] = i, s


def add_viescore(url, model_name, images, results):
    import io

    from minedit.eval.judge import HTTPJudge

    judge = HTTPJudge(url, model_name, api_key=os.environ.get("MINEDIT_JUDGE_KEY"))

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    for r, (src, _, pred, text) in zip(results, images):
        out = judge.score(png(src), png(pred), text)
        # A failed judgement is missing, never 0: the means leave it out and the results count it.
        r["viescore"], r["viescore_missing"] = out["viescore"], out["viescore"] is None
        if out["error"]:
            r["viescore_error"] = out["error"]
    missing = sum(r["viescore_missing"] for r in results)
    if missing:
        first = next(r["viescore_error"] for r in results if r["viescore_missing"])
        print(f"warning: VIEScore missing for {missing} of {len(results)} edits (first: {first}); the VIEScore "
              "means are over the judged edits only", file=sys.stderr)
    return missing


def format_table(summary: dict, by: str = "category") -> str:
    groups = {**summary["groups"], "overall": summary["overall"]}
    cols = [c for c in COLUMNS if any(c in g for g in groups.values())]
    lines = [f"{by:<14}" + "".join(f"{c:>13}" for c in cols)]
    for name, g in groups.items():
        cells = []
        for c in cols:
            v = g.get(c)
            cells.append(f"{'-':>13}" if v is None else f"{v:>13d}" if c == "count" else
                         f"{100 * v:>12.1f}%" if c.endswith("_rate") else f"{v:>13.3f}")
        lines.append(f"{name:<14}" + "".join(cells))
    return "\n".join(lines)


def contact_sheet(items, path: str) -> str:
    """source | target | edit per row, the instruction under each row."""
    from minedit.imagegrid import draw_grid, side_by_side

    rows = [[(side_by_side([src, tgt, pred], 96), text)] for src, tgt, pred, text in items]
    fsio.save_image(draw_grid(rows, (3 * 96, 96), line_h=14), path)
    return path


def category_grid(images, results, path: str, per_row: int = 4) -> str:
    """One row per category: its first `per_row` edits, each as source | edit | target over its instruction."""
    from minedit.imagegrid import draw_grid, side_by_side

    rows = {}
    for (src, tgt, pred, text), r in zip(images, results):
        row = rows.setdefault(r["category"] or "(none)", [])
        if len(row) < per_row:
            mark = "" if r.get("success") is None else ("ok: " if r["success"] else "miss: ")
            row.append((side_by_side([src, pred, tgt], 64), mark + text))
    names = sorted(rows)
    sheet = draw_grid([rows[n] for n in names], (3 * 64, 64), lines=2, gap=6, row_labels=names, label_w=96)
    fsio.save_image(sheet, path)
    return path


if __name__ == "__main__":
    run_cli(main)
