"""`evaluate.py --protocol reason-edit|magicbrush|gedit`: each benchmark's data layout, edits and scoring
(the formulas, and the references they follow, are in protocols.py).

    reason-edit  --data FOLDER: one subfolder per category (or the folder itself), each with sources `*.png`,
                 masks `*_mask.jpg` and one `*_text.txt`, line i = `<instruction> CLIP: <text>` for the i-th
                 source in sorted order (SmartEdit's release). Edits: PRED_DIR/<category>/<name>.png.
    magicbrush   --data MANIFEST (JSONL: source, target, instruction, and `turn_index` + `img_id` (or `chain`)
                 for multi-turn sessions, a local caption in `local_caption`/`caption`/`target_caption` for
                 CLIP-T). single-turn: every turn edited from its ground-truth input; final-turn: each session
                 edited turn after turn on the model's own outputs, the last one scored against the last target.
    gedit        --data MANIFEST (JSONL: source, instruction, `task_type` or `category`), scored by the judge
                 behind --judge-url; means per task type.
Edits are made with the checkpoint where PRED_DIR (--pred-dir, default <out>-edits) lacks them; edit i uses
seed + i, as evaluate.py's own protocol.
"""
from __future__ import annotations

import glob
import io
import json
import os
import sys

import numpy as np

from .. import editfiles, fsio
from ..errors import UserError
from ..sampling_flags import sampling_settings
from . import metrics, protocols

PROTOCOLS = ("reason-edit", "magicbrush", "gedit")
CAPTION_FIELDS = ("local_caption", "caption", "target_caption")


def as_array(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


class Editor:
    """Makes the edits that PRED_DIR lacks, loading the checkpoint once, on first need."""

    def __init__(self, a):
        self.a, self.model = a, None
        self.cfg = editfiles.check_inputs(a.ckpt, [])
        self.settings = sampling_settings(self.cfg, a, a.ckpt)

    def make(self, jobs: list[tuple[str, str, str]], seeds: list[int]) -> int:
        """jobs: (source path, instruction, output path); the ones whose output exists are skipped."""
        from .. import runtime
        todo = [(j, s) for j, s in zip(jobs, seeds) if not os.path.isfile(j[2])]
        if not todo:
            return 0
        if self.model is None:
            from ..model import load_model

            self.rt = runtime.setup("bf16" if runtime.pick_device(self.a.device).type == "cuda" else "fp32",
                                    self.a.device)
            self.model = load_model(self.a.ckpt, self.rt.device, self.rt.frozen_dtype)
        for _, _, out in (j for j, _ in todo):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        return editfiles.edit_files(self.model, self.rt, [(src, text, None, out) for (src, text, out), _ in todo],
                                self.settings, self.cfg.resolution, self.a.batch_size, [s for _, s in todo])


# ---- Reason-Edit ----------------------------------------------------------------------------------------------
def read_reason_edit(folder: str) -> list[dict]:
    """Rows {category, source, mask, instruction, clip_text} from SmartEdit's folder layout."""
    if not os.path.isdir(folder):
        raise UserError(f"--data {folder}: not a folder — reason-edit reads the Reason-Edit folder "
                        "(subfolders of *.png, *_mask.jpg and one *_text.txt)")
    subs = sorted(d for d in glob.glob(os.path.join(folder, "*")) if os.path.isdir(d)) or [folder]
    rows = []
    for sub in subs:
        sources = sorted(glob.glob(os.path.join(sub, "*.png")))
        masks = sorted(glob.glob(os.path.join(sub, "*_mask.jpg")))
        texts = sorted(glob.glob(os.path.join(sub, "*_text.txt")))
        if not sources:
            continue
        if len(texts) != 1:
            raise UserError(f"{sub}: expected one *_text.txt, found {len(texts)} — each category folder holds "
                            "one text file, a line per image")
        with open(texts[0], encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
        if not len(sources) == len(masks) == len(lines):
            raise UserError(f"{sub}: {len(sources)} *.png, {len(masks)} *_mask.jpg and {len(lines)} lines in "
                            f"{os.path.basename(texts[0])} — they must pair up one to one")
        for n, (src, mask, line) in enumerate(zip(sources, masks, lines), 1):
            if "CLIP: " not in line:
                raise UserError(f"{texts[0]} line {n}: no 'CLIP: ' — write '<instruction> CLIP: <target text>'")
            instruction, clip_text = line.split("CLIP: ", 1)
            rows.append({"category": os.path.basename(sub), "source": src, "mask": mask,
                         "instruction": instruction.rstrip(), "clip_text": clip_text.strip()})
    if not rows:
        raise UserError(f"--data {folder}: no *.png sources found — is it the Reason-Edit folder?")
    return rows


def score_reason_edit(rows, preds, clip, lpips_net) -> list[dict]:
    from PIL import Image

    size = (protocols.REASON_EDIT_SIZE,) * 2
    results, crops, texts = [], [], []
    for row, pred in zip(rows, preds):
        src = as_array(Image.open(row["source"]).convert("RGB").resize(size, Image.BICUBIC))
        edit = as_array(Image.open(pred).convert("RGB").resize(size, Image.BICUBIC))
        mask = np.asarray(Image.open(row["mask"]).convert("L").resize(size, Image.NEAREST))
        r = protocols.reason_edit_background(src, edit, mask, lpips_net)
        box = protocols.mask_bbox(mask)
        r.update(category=row["category"], instruction=row["instruction"], pred=pred, clip_score=None)
        if box is not None:
            left, top, right, bottom = box
            crops.append((len(results), edit[top:bottom, left:right]))
            texts.append(row["clip_text"])
        results.append(r)
    if clip is not None and crops:
        _, scores = metrics.clip_scores(clip[0], clip[1], [c for _, c in crops], texts, None)
        for (i, _), s in zip(crops, scores):
            results[i]["clip_score"] = s
    return results


# ---- MagicBrush -----------------------------------------------------------------------------------------------
def sessions(rows: list[dict]) -> dict[str, list[int]]:
    """Session id -> its row indices in turn order (a row without turn_index is a one-turn session)."""
    chains: dict[str, list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        cid = r.get("img_id", r.get("chain"))
        key = f"row{i}" if cid is None or r.get("turn_index") is None else str(cid)
        try:
            turn = int(r.get("turn_index") or 1)
        except (TypeError, ValueError):
            raise UserError(f"row {i + 1}: turn_index {r.get('turn_index')!r} is not a number") from None
        chains.setdefault(key, []).append((turn, i))
    out = {}
    for key, turns in chains.items():
        turns.sort()
        if [t for t, _ in turns] != list(range(turns[0][0], turns[0][0] + len(turns))):
            raise UserError(f"session {key}: turns {[t for t, _ in turns]} are not consecutive — a final-turn "
                            "edit needs every turn of its session")
        out[key] = [i for _, i in turns]
    return out


def score_magicbrush(pairs, captions, clip, dino) -> list[dict]:
    """pairs: (edit path, target path); captions: the local caption or None, per pair."""
    from PIL import Image

    results, edits, targets = [], [], []
    for pred, tgt in pairs:
        target = Image.open(tgt).convert("RGB")
        edit = as_array(Image.open(pred).convert("RGB").resize(target.size, Image.BICUBIC))
        results.append({**protocols.magicbrush_distances(edit, as_array(target)), "pred": pred})
        edits.append(edit)
        targets.append(as_array(target))
    if clip is not None:
        e, t = protocols.clip_image_features(clip[0], edits), protocols.clip_image_features(clip[0], targets)
        with_text = [i for i, c in enumerate(captions) if c]
        txt = protocols.clip_text_features(clip[0], clip[1], [captions[i] for i in with_text]) if with_text else None
        for i, r in enumerate(results):
            r["clip_i"] = float(e[i] @ t[i])
        for k, i in enumerate(with_text):
            results[i]["clip_t"] = float(e[i] @ txt[k])
    if dino is not None:
        e, t = protocols.dino_features(dino, edits), protocols.dino_features(dino, targets)
        for i, r in enumerate(results):
            r["dino"] = float(e[i] @ t[i])
    return results


# ---- the command ----------------------------------------------------------------------------------------------
def run(a) -> int:
    """evaluate.py's entry for --protocol: make the missing edits, score, print, write a.out (atomically)."""
    if a.protocol not in PROTOCOLS:
        raise UserError(f"--protocol {a.protocol!r}: choose one of {', '.join(PROTOCOLS)}")
    editfiles.check_out_path(a.out)
    pred_dir = a.pred_dir or os.path.splitext(a.out)[0] + "-edits"
    if a.protocol == "gedit" and not (a.judge_url or getattr(a, "judge", None)):
        raise UserError("--protocol gedit needs a judge — pass --judge-url (an OpenAI-compatible endpoint)")
    editor = Editor(a)
    from ..runtime import pick_device

    device = pick_device(a.device)
    clip_path = a.clip or editor.cfg.clip_path
    clip = protocols.load_clip(clip_path, device) if clip_path and a.protocol != "gedit" else None
    if a.protocol == "reason-edit":  # the LPIPS network first: a missing extra fails before any edit is made
        net = None if a.lpips == "off" or (a.lpips == "auto" and not metrics.LPIPS_AVAILABLE) else \
            protocols.lpips_network("squeeze" if a.lpips == "auto" else a.lpips)
        rows = read_reason_edit(a.data)[: a.limit]
        if net is None and a.lpips == "auto":
            print("note: LPIPS left out (pip install lpips to add it)", file=sys.stderr)
        preds = [os.path.join(pred_dir, r["category"], os.path.basename(r["source"])) for r in rows]
        editor.make([(r["source"], r["instruction"], p) for r, p in zip(rows, preds)],
                    [a.seed + i for i in range(len(rows))])
        results = score_reason_edit(rows, preds, clip, net)
        summary = {"by_category": metrics.aggregate(results, by="category")}
    elif a.protocol == "magicbrush":
        summary, results = run_magicbrush(a, editor, pred_dir, clip)
    else:
        summary, results = run_gedit(a, editor, pred_dir)
    for name, s in summary.items():
        print(f"{a.protocol} — {name}\n{format_summary(s)}")
    out = {"protocol": a.protocol, "ckpt": a.ckpt, "data": a.data, "seed": a.seed, "clip": clip_path or None,
           "summary": summary, "samples": results}
    fsio.write_text(a.out, json.dumps(out, indent=1, default=float))
    print(f"wrote {a.out}")
    return 0


def read_rows(path: str, kind: str, limit) -> list[dict]:
    from ..data import read_manifest

    rows, bad = read_manifest(path, kind=kind)
    if not rows:
        first = f" (line {bad[0][0]}: {bad[0][1]})" if bad else ""
        raise UserError(f"{path} has no usable rows{first} — --data takes a JSONL manifest, one edit per line")
    for line, why in bad:
        print(f"warning: {path} line {line}: {why} (skipped)", file=sys.stderr)
    return rows[:limit]


def run_magicbrush(a, editor, pred_dir, clip):
    rows = read_rows(a.data, "edit", a.limit)
    chains = sessions(rows)
    dino = protocols.load_dino(a.dino, clip[0].device if clip else "cpu") if a.dino else None  # before any edit
    single = [os.path.join(pred_dir, "single", f"{i:05d}.png") for i in range(len(rows))]
    editor.make([(r["source"], r["instruction"], p) for r, p in zip(rows, single)],
                [a.seed + i for i in range(len(rows))])
    captions = [next((r[k] for k in CAPTION_FIELDS if r.get(k)), None) for r in rows]
    res_single = score_magicbrush(list(zip(single, (r["target"] for r in rows))), captions, clip, dino)
    # final turn: turn k starts from the model's own turn k-1; turn 1 is the single-turn edit of that row
    last = {key: single[idx[0]] for key, idx in chains.items()}
    for k in range(1, max(len(idx) for idx in chains.values())):
        live = [(key, idx[k]) for key, idx in chains.items() if len(idx) > k]
        outs = [os.path.join(pred_dir, "final", key, f"turn{k + 1}.png") for key, _ in live]
        editor.make([(last[key], rows[i]["instruction"], o) for (key, i), o in zip(live, outs)],
                    [a.seed + i for _, i in live])
        last.update({key: o for (key, _), o in zip(live, outs)})
    finals = [(last[key], idx[-1]) for key, idx in chains.items()]
    res_final = score_magicbrush([(p, rows[i]["target"]) for p, i in finals], [captions[i] for _, i in finals],
                                 clip, dino)
    for r, (key, _) in zip(res_final, chains.items()):
        r["session"] = key
    summary = {"single_turn": metrics.aggregate(res_single, by="none"),
               "final_turn": metrics.aggregate(res_final, by="none")}
    return summary, {"single_turn": res_single, "final_turn": res_final}


def run_gedit(a, editor, pred_dir):
    from PIL import Image

    from .judge import HTTPJudge

    rows = read_rows(a.data, "infer", a.limit)
    preds = [os.path.join(pred_dir, f"{i:05d}.png") for i in range(len(rows))]
    editor.make([(r["source"], r["instruction"], p) for r, p in zip(rows, preds)],
                [a.seed + i for i in range(len(rows))])
    judge = getattr(a, "judge", None) or HTTPJudge(a.judge_url, a.judge_model, os.environ.get("MINEDIT_JUDGE_KEY"))

    def png(path):
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, format="PNG")
        return buf.getvalue()

    results = []
    for r, p in zip(rows, preds):
        s = protocols.gedit_scores(judge, png(r["source"]), png(p), r["instruction"])
        s.update(task_type=r.get("task_type") or r.get("category") or "", instruction=r["instruction"], pred=p,
                 language=r.get("instruction_language"))
        results.append(s)
    summary = {"by_task_type": metrics.aggregate(results, by="task_type")}
    if any(r["language"] for r in results):  # GEdit-Bench reports its English and Chinese halves apart
        summary["by_language"] = metrics.aggregate(results, by="language")
    return summary, results


def format_summary(summary: dict) -> str:
    groups = {**summary["groups"], "overall": summary["overall"]} if len(summary["groups"]) > 1 else \
        {"overall": summary["overall"]}
    cols = [c for c in summary["overall"] if c != "count"]
    lines = [f"{'group':<20}{'count':>7}" + "".join(f"{c:>12}" for c in cols)]
    for name, g in groups.items():
        lines.append(f"{name[:19]:<20}{g['count']:>7d}" + "".join(
            f"{'-':>12}" if g.get(c) is None else f"{g[c]:>12.4f}" for c in cols))
    return "\n".join(lines)
