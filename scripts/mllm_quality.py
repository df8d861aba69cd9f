"""How well a toy MLLM rewrites instructions, measured on held-out scenes (used by pretrain_toy_mllm.py).

  * exact match of the greedy rewrite to the row's explicit `optimized_instruction`, per category and kind, and
    on remove/replace alone (an add's rewrite is under-determined: the phrase fixes a region, not the place);
  * why the wrong remove/replace rewrites are wrong (`why_wrong`): which part of the named shape is off — another
    shape of the scene (the relation), a shape the scene lacks (recognition, or a word copied from the
    instruction), a missing qualifier;
  * the shape word of held-out captions, teacher-forced: whether the image side recognises shapes at all;
  * next-token loss on held-out instructions and captions.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from minedit import build
from minedit.toy.phrases import CATEGORIES, KINDS, SHAPES, tokenize_words
from pretrain_toy_mllm import collate_mllm, prompt_ids


def mllm_quality(mllm, tok, n_img, cfg, eval_sets) -> dict:
    """Every held-out figure of the MLLM stage, as metrics.json's "mllm" entry holds them."""
    rows, images, caps, edits = eval_sets
    acc, samples, failures = mllm_accuracy(mllm, tok, n_img, cfg, rows, images)
    return {"eval_exact_match": acc, "eval_failures": failures,
            "eval_loss_caption": mllm_eval_loss(mllm, caps, images, cfg, tok.pad_token_id),
            "eval_loss_instruction": mllm_eval_loss(mllm, edits, images, cfg, tok.pad_token_id),
            "eval_caption_shape_word": caption_shape_accuracy(mllm, tok, caps, images, cfg), "eval_samples": samples}


@torch.no_grad()
def mllm_eval_loss(mllm, examples, images, cfg, pad_id, batch: int = 64) -> float:
    total = count = 0.0
    for i in range(0, len(examples), batch):
        ids, mask, labels, pixels = collate_mllm(examples[i:i + batch], images, cfg, pad_id)
        n = int((labels[:, 1:] != -100).sum())
        total += float(mllm(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss) * n
        count += n
    return total / max(1, count)


@torch.no_grad()
def caption_shape_accuracy(mllm, tok, examples, images, cfg, batch: int = 64) -> float:
    """Teacher-forced: how often the caption's next word is predicted right where that word is a shape — after
    "a small red" the shape of the small red object, which only the image tells (chance 1 / 5)."""
    shape_ids, right, total = torch.tensor(tok.convert_tokens_to_ids(list(SHAPES))), 0, 0
    for i in range(0, len(examples), batch):
        ids, mask, labels, pixels = collate_mllm(examples[i:i + batch], images, cfg, tok.pad_token_id)
        logits = mllm(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        at = torch.isin(gold, shape_ids)
        right, total = right + int((pred[at] == gold[at]).sum()), total + int(at.sum())
    return right / max(1, total)


@torch.no_grad()
def greedy_answers(mllm, tok, prompts: list[list[int]], pixels: torch.Tensor, max_new: int = 24) -> list[str]:
    """Greedy decoding; prompts of equal length are decoded together, so no padding is ever needed."""
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out = [""] * len(prompts)
    for idx in groups.values():
        for j in range(0, len(idx), 64):
            part = idx[j:j + 64]
            ids = torch.tensor([prompts[i] for i in part])
            gen = mllm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels[part],
                                max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
            for i, seq in zip(part, gen[:, ids.shape[1]:].tolist()):
                out[i] = tok.decode(seq, skip_special_tokens=True)
    return out


def mllm_accuracy(mllm, tok, n_img, cfg, rows, images) -> tuple[dict, list, dict]:
    """Exact match (as word sequences) of the greedy answer to optimized_instruction, per category and kind."""
    prompts = [prompt_ids(tok, n_img, r["instruction"]) for r in rows]
    answers = greedy_answers(mllm, tok, prompts, build.clip_pixels(images, cfg.vision_image_size))
    hits = [tokenize_words(a) == tokenize_words(r["optimized_instruction"]) for a, r in zip(answers, rows)]
    acc = {"all": float(np.mean(hits))}
    for key, values in (("category", CATEGORIES), ("kind", KINDS)):
        for v in values:
            sel = [h for h, r in zip(hits, rows) if r[key] == v]
            acc[v] = float(np.mean(sel)) if sel else float("nan")
    for c in CATEGORIES:  # without the under-determined adds
        sel = [h for h, r in zip(hits, rows) if r["category"] == c and r["kind"] != "add"]
        acc[f"{c}_remove_replace"] = float(np.mean(sel)) if sel else float("nan")
    samples = [{"instruction": r["instruction"], "target": r["optimized_instruction"], "answer": a}
               for r, a in list(zip(rows, answers))[:9]]
    return acc, samples, why_wrong(rows, answers, hits)


def named_object(text: str):
    """(colour, shape) of the shape a remove/replace rewrite names first: "replace the small red circle on the
    left with ..." -> ("red", "circle"); None when the words do not parse."""
    words = [w for w in tokenize_words(text) if w not in ("small", "large")]
    return tuple(words[2:4]) if len(words) >= 4 and words[:2] in (["remove", "the"], ["replace", "the"]) else None


def why_wrong(rows, answers, hits) -> dict:
    """The wrong remove/replace rewrites of each category sorted by what the named shape got wrong: another
    shape of the scene (the reference not resolved), the right colour with a shape the scene lacks — one the
    instruction names (a word copied: "turn the left shape into a star" -> "replace the red star ...") or not
    (the shape not recognised) —, the right shape with a colour it lacks, the right shape and colour with a
    qualifier or the new part wrong, or none of these."""
    out = {c: defaultdict(int) for c in CATEGORIES}
    for r, a, hit in zip(rows, answers, hits):
        if hit or r["kind"] == "add":
            continue
        want, got = named_object(r["optimized_instruction"]), named_object(a)
        scene = {(o["colour"], o["shape"]) for o in r["objects"]}
        copied = got is not None and got[1] in tokenize_words(r["instruction"])
        why = ("right shape and colour, rest wrong" if got == want else "another shape of the scene" if got in scene
               else f"colour right, shape {'copied from the instruction' if copied else 'not in the scene'}"
               if got and want and got[0] == want[0]
               else "shape right, colour not in the scene" if got and want and got[1] == want[1] else "other")
        out[r["category"]][why] += 1
    return {c: dict(v) for c, v in out.items()}
