"""The toy LLaVA of the bases (DESIGN §10): its training data, its training, and `--only mllm` (this stage alone).

Called by scripts/pretrain_toy_bases.py, whose flags drive it (`--steps-mllm`, `--mllm-world-n`, `--only mllm`,
...); scored by scripts/mllm_quality.py on the held-out scenes only.

    python scripts/pretrain_toy_bases.py --only mllm --base assets/toy/base --out DIR   # the MLLM stage alone

What it learns: next-token loss on the assistant answer (prompt masked) for two tasks mixed in every batch:
image + "describe the picture." -> caption, and image + instruction -> the explicit `optimized_instruction` (the
toy world's T_opt, e.g. "remove the green triangle"), so the MLLM grounds instructions in the image; optionally
a third (`--mllm-refer-share`), naming the shape a relational phrase picks out. Prompts are built exactly as the
recipes build them (`build.chat_prompt`: chat template, <image> x 64). The LLaVA vision tower starts from the
trained CLIP vision tower (same config), as LLaVA starts from CLIP; then the whole MLLM trains ("describe" is not
in the toy vocabulary: it becomes <unk>, harmless in one fixed caption prompt). Train rows whose
simple instruction differs from the advanced one add a second (image, simple instruction) -> optimized_instruction
pair: free extra data for the same target.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python scripts/...` from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling pretrain_toy_bases.py, however loaded

from minedit import build, export, fsio  # noqa: E402
from minedit.errors import UserError  # noqa: E402
from minedit.presets import apply_overrides  # noqa: E402
from minedit.toy.tokenizer import toy_tokenizer  # noqa: E402
from minedit.toy.world import MARGIN, cached_world  # noqa: E402
from pretrain_toy_bases import (base_and_out, clip_data, folder_mb, load_images, log, loss_ends,  # noqa: E402
                                read_jsonl, schedule, step, text_tokenizer, world_images, write_readme)
from pretrain_toy_clip import clip_negatives, train_clip  # noqa: E402

CAPTION_PROMPT = "describe the picture."
EDIT_SHARE = 0.6  # fraction of each MLLM batch drawn from the instruction task (the rest: captions)
TOWER = ("hidden", "intermediate", "layers", "heads", "image_size", "patch")  # vision_X of LLaVA = clip_X of CLIP


# ----------------------------------------------------------------------------------------------------------------
# Data and training
def prompt_ids(tok, n_image_tokens: int, text: str) -> list[int]:
    """The chat prompt every recipe uses (build.chat_prompt, without the [MM] tokens), ending in 'ASSISTANT:'."""
    return tok(build.chat_prompt(tok, text, n_image_tokens), add_special_tokens=False).input_ids


def answer_ids(tok, text: str) -> list[int]:
    """The assistant answer the loss is taken on: the text's ids and eos, no special tokens before them."""
    return tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def mllm_examples(tok, n_img, rows, image_index, caption_rows):
    """(image index, prompt ids, answer ids + eos) for the two tasks."""
    cap_prompt = prompt_ids(tok, n_img, CAPTION_PROMPT)
    caps = [(image_index[r["image"]], cap_prompt, answer_ids(tok, r["caption"])) for r in caption_rows]
    edits = []
    for r in rows:
        texts = {r["instruction"], r.get("simple_instruction") or r["instruction"]}
        edits += [(image_index[r["source"]], prompt_ids(tok, n_img, t),
                   answer_ids(tok, r["optimized_instruction"]))
                  for t in sorted(texts)]
    return caps, edits


REFER_PROMPT = "find {u}."  # words of the toy vocabulary ("which", "name" are not)


def refer_examples(tok, n_img, rows, image_index, margin: float):
    """A third task (lever --mllm-refer-share): name the shape an understanding-level phrase picks out —
    "find the leftmost shape." -> "the red square" — for every shape of every training scene that has
    such phrases. It asks for exactly the binding of place, size, colour and shape that rewriting an
    understanding instruction needs (README of the bases, "Comprehension study")."""
    from minedit.toy.refer import explicit, understanding

    out, seen = [], set()
    for r in rows:
        if r["source"] in seen or not r.get("objects"):
            continue
        seen.add(r["source"])
        objs = r["objects"]
        for t in range(len(objs)):
            name = explicit(objs, t, margin)
            for u in understanding(objs, t, margin) if name else []:
                out.append((image_index[r["source"]], prompt_ids(tok, n_img, REFER_PROMPT.format(u=u)),
                            answer_ids(tok, name)))
    return out


def collate_mllm(batch, images, cfg, pad_id):
    """Right-padded ids, attention mask, labels (-100 on prompt and padding), CLIP-normalised pixels."""
    length = max(len(p) + len(a) for _, p, a in batch)
    ids = torch.full((len(batch), length), pad_id)
    labels = torch.full((len(batch), length), -100)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, (_, p, a) in enumerate(batch):
        seq = torch.tensor(p + a)
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
        labels[i, len(p):len(seq)] = torch.tensor(a)
    pixels = build.clip_pixels(images[[b[0] for b in batch]], cfg.vision_image_size)
    return ids, mask, labels, pixels


def train_mllm(cfg, clip, images, caps, edits, eval_sets, steps, batch, lr, g, freeze_vision: bool = False,
               refers=(), refer_share: float = 0.0):
    """The LLaVA of `cfg` (its vision tower loaded from `clip`; every weight from cfg.mllm_path when that is set,
    to continue one) trained on the tasks mixed in every batch (instructions EDIT_SHARE, referring phrases
    refer_share, captions the rest); freeze_vision keeps the CLIP tower fixed (LLaVA's own stage 1) and trains
    projector + LLM only."""
    mllm, tok, n_img = build.build_mllm(cfg)
    vt = mllm.model.vision_tower
    if not cfg.mllm_path:  # LLaVA starts from CLIP's vision tower: the toy CLIP trained before (identical config)
        (vt.vision_model if hasattr(vt, "vision_model") else vt).load_state_dict(clip.vision_model.state_dict())
    vt.requires_grad_(not freeze_vision)
    opt = torch.optim.AdamW([p for p in mllm.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    sched, history = schedule(opt, steps, max(1, steps // 20)), []
    n_edit, n_ref = round(batch * EDIT_SHARE), round(batch * refer_share) if refers else 0
    mllm.train()
    for s in range(steps):
        pick = ([edits[i] for i in torch.randint(len(edits), (n_edit,), generator=g)]
                + [refers[i] for i in torch.randint(max(1, len(refers)), (n_ref,), generator=g)]
                + [caps[i] for i in torch.randint(len(caps), (batch - n_edit - n_ref,), generator=g)])
        ids, mask, labels, pixels = collate_mllm(pick, images, cfg, tok.pad_token_id)
        loss = mllm(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss
        step(mllm, opt, sched, loss)
        history.append(loss.item())
        if (s + 1) % 100 == 0:
            log(f"mllm step {s + 1}/{steps} loss {np.mean(history[-100:]):.4f}")
    mllm.eval()
    from mllm_quality import mllm_quality  # its sibling: how the MLLM is scored (it imports this file's helpers)

    metrics = {**mllm_quality(mllm, tok, n_img, cfg, eval_sets), "steps": steps, "batch": batch, "lr": lr,
               "train_edits": len(edits), "train_captions": len(caps), "vision_feature_layer": cfg.vision_feature_layer,
               "freeze_vision": freeze_vision, "train_refers": len(refers), "refer_share": refer_share,
               **loss_ends(history)}
    return mllm, tok, n_img, metrics


def mllm_data(cfg, roots: list[Path], eval_root: Path, with_refers: bool = False):
    """The MLLM's training set from the train splits of `roots` (images concatenated, indices offset) and its
    eval sets from eval_root's eval split -> (images, caps, edits, refers, (eval rows, images, caps, edits)).
    The referring examples are built only when asked for: they are ~4 per scene and tokenising them dominated
    the stage's start-up (tens of minutes over 5x the rows) when the lever was off."""
    tok = toy_tokenizer(cfg.llm_max_positions, chat=True)
    n_img = (cfg.vision_image_size // cfg.vision_patch) ** 2
    images, caps, edits, refers = [], [], [], []
    for root in roots:
        caption_rows, rows = read_jsonl(root / "captions.jsonl"), read_jsonl(root / "train.jsonl")
        paths = sorted({r["image"] for r in caption_rows})
        offset = sum(len(x) for x in images)
        index = {p: offset + i for i, p in enumerate(paths)}
        c, e = mllm_examples(tok, n_img, rows, index, caption_rows)
        images.append(load_images(root, paths))
        caps, edits = caps + c, edits + e
        if with_refers:
            refers += refer_examples(tok, n_img, rows, index, MARGIN * cfg.resolution)
    eval_rows = read_jsonl(eval_root / "eval.jsonl")
    eval_images = load_images(eval_root, [r["source"] for r in eval_rows])
    eval_caps, _ = mllm_examples(tok, n_img, [], {r["source"]: i for i, r in enumerate(eval_rows)},
                                 [{"image": r["source"], "caption": r["caption"]} for r in eval_rows])
    eval_edits = [(i, prompt_ids(tok, n_img, r["instruction"]), answer_ids(tok, r["optimized_instruction"]))
                  for i, r in enumerate(eval_rows)]
    longest = max(len(p) + len(a) for _, p, a in caps + edits + refers + eval_caps + eval_edits)
    if longest > cfg.llm_max_positions:
        enough = 1 << (longest - 1).bit_length()  # the next power of two
        raise UserError(f"the longest MLLM example is {longest} tokens ({n_img} of them image tokens), beyond "
                        f"llm_max_positions {cfg.llm_max_positions}: add --arch llm_max_positions={enough}")
    return torch.cat(images), caps, edits, refers, (eval_rows, eval_images, eval_caps, eval_edits)


def run_mllm(cfg, clip, args, root: Path, g: torch.Generator):
    """The MLLM stage as the flags ask: the world at `root`, plus the editing world's train split when
    --mllm-world-n is set (more rows; its scenes are never the eval split's)."""
    roots = [root]
    if args.mllm_world_n:
        roots.append(Path(cached_world(seed=args.seed + 1000, n=args.mllm_world_n, size=cfg.resolution)))
    if args.vision_feature_layer is not None:
        cfg = dataclasses.replace(cfg, vision_feature_layer=args.vision_feature_layer)
    images, caps, edits, refers, eval_sets = mllm_data(cfg, roots, root, with_refers=args.mllm_refer_share > 0)
    log(f"mllm: {len(edits)} (image, instruction), {len(caps)} (image, caption) and {len(refers)} (image, "
        "referring phrase) training examples")
    mllm, tok, _, metrics = train_mllm(cfg, clip, images, caps, edits, eval_sets, args.steps_mllm,
                                       args.batch_mllm, args.lr_mllm, g, args.freeze_vision,
                                       refers, args.mllm_refer_share)
    log(f"mllm: {json.dumps(metrics['eval_exact_match'])}")
    return mllm, tok, metrics | {"world_n_extra": args.mllm_world_n}


# ----------------------------------------------------------------------------------------------------------------
# --only mllm
def mllm_config(cfg, arch: list[str]):
    """The toy preset with --arch's MLLM fields applied; any other field is an error (only the MLLM trains)."""
    other = [a for a in arch if not a.lstrip("-").replace("-", "_").startswith(("vision_", "llm_"))]
    if other:
        raise UserError(f"--arch {other[0]}: only the MLLM's fields (vision_..., llm_...) are trained here")
    return apply_overrides(cfg, arch).validate()


def mllm_only(args, cfg, g: torch.Generator, start: float, command: str) -> dict:
    """--only mllm: a copy of --base in --out whose mllm/ is retrained from base/clip's vision tower; the base's
    metrics.json is kept with its "mllm" entry replaced (and the command that made it)."""
    from transformers import CLIPModel

    cfg = mllm_config(cfg, args.arch)
    base, out = base_and_out(args, "mllm")
    root = Path(cached_world(seed=args.seed, n=args.n, size=cfg.resolution))
    clip, m_clip = CLIPModel.from_pretrained(base / "clip").eval(), None
    base_metrics = json.loads((base / "metrics.json").read_text()) if (base / "metrics.json").is_file() else {}
    arch, before = args.arch, {}
    if args.continue_mllm:  # the base's MLLM, with the --arch it was trained with (recorded in its metrics)
        was = base_metrics.get("mllm", {})
        arch, m_clip = was.get("arch", []), was.get("tower_clip")
        before = {"continued_from": str(base), "steps_before": was.get("steps", 0) + was.get("steps_before", 0)}
        cfg = dataclasses.replace(mllm_config(cfg, arch), mllm_path=str(base / "mllm"))
        g.manual_seed(args.seed + before["steps_before"])  # not the first piece's batches again
    elif clip_negatives(args) or any(getattr(cfg, f"vision_{f}") != getattr(cfg, f"clip_{f}") for f in TOWER):
        # LLaVA's tower starts from a CLIP of its own architecture and training: train one (the editing side
        # keeps base/clip).
        tower_cfg = dataclasses.replace(cfg, **{f"clip_{f}": getattr(cfg, f"vision_{f}") for f in TOWER})
        clip, m_clip = train_clip(tower_cfg, text_tokenizer(cfg), *clip_data(root, *world_images(root)),
                                  args.steps_clip, args.batch_clip, 1e-3, g, clip_negatives(args))
        log(f"clip for the vision tower: {json.dumps(m_clip)}")
    mllm, tok, m_mllm = run_mllm(cfg, clip, args, root, g)
    m_mllm.update(arch=arch, **before, **({"tower_clip": m_clip} if m_clip else {}))
    shutil.copytree(base, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("mllm", "metrics.json"))
    shutil.rmtree(out / "mllm", ignore_errors=True)
    export.save_bases(str(out), cfg, mllm=mllm, tokenizer=tok)
    m_mllm.update(wall_time_s=time.time() - start, threads=args.threads, command=command)
    metrics = base_metrics | {"mllm": m_mllm}
    metrics["size_mb"] = folder_mb(out)
    fsio.write_text(str(out / "metrics.json"), json.dumps(metrics, indent=1) + "\n")
    if {"vae", "clip", "unet"} <= set(metrics):
        write_readme(out, command, metrics)
    log(f"wrote {out} (mllm retrained) in {m_mllm['wall_time_s'] / 60:.1f} min")
    return metrics
