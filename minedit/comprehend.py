"""The MLLM side of InsightEdit and SmartEdit: one teacher-forced forward per edit (InsightEdit §4.1, eq. 2).

    prompt = chat template(<image>×n, instruction) ⊕ [MM0] .. [MM{r-1}]     (right-padded to one length)
    LLaVA(+LoRA)(prompt, I_src) ──► h: B×r×d (last layer at the [MM] positions), L_LLM, and on the way
    v: B×P×D_vis, the vision tower's patch features (CLS dropped) that BIM reads — caught with a forward hook so
    the vision tower runs once per edit.

MIND-Edit's MLLM side (no [MM] tokens, a decoded T_opt instead) is mind.py; both build their prompt with
`build.chat_prompt`, as the toy bases were pretrained on.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import build
from .parts.mm_tokens import MM_TOKEN, mm_forward


def mllm_inputs(model, images: torch.Tensor, texts: list[str]):
    """-> (input_ids B×L, attention_mask B×L, pixel_values B×3×S×S): the chat prompt with the r [MM] tokens as
    the assistant turn."""
    mm = "".join(MM_TOKEN.format(i) for i in range(model.cfg.num_mm_tokens))
    prompts = [build.chat_prompt(model.tokenizer, fit_instruction(model, t), model.n_image_tokens) + mm
               for t in texts]
    model.tokenizer.padding_side = "right"
    enc = model.tokenizer(prompts, padding=True, return_tensors="pt")
    pixels = build.clip_pixels(images, model.mllm.config.vision_config.image_size).to(model.mllm.dtype)
    return enc.input_ids.to(model.device), enc.attention_mask.to(model.device), pixels


class Reading(NamedTuple):
    """What one comprehension forward computes."""
    h: torch.Tensor     # B×r×d, last-layer hidden states at the [MM] positions
    loss: torch.Tensor  # scalar fp32 L_LLM
    v: torch.Tensor     # B×P×D_vis, the vision tower's patch features (CLS dropped), BIM's image input


_warned_long = False  # the truncation warning is printed once per process


def fit_instruction(model, text: str) -> str:
    """Cut an instruction's tokens so the prompt (+ image tokens + r [MM] tokens) fits the LLM's positions;
    warn once. The cut keeps the start: the instruction's verb and object come first."""
    global _warned_long
    tok = model.tokenizer
    limit = min(tok.model_max_length, model.mllm.config.text_config.max_position_embeddings)
    ids = tok(text, add_special_tokens=False).input_ids
    overhead = len(tok(build.chat_prompt(tok, "", model.n_image_tokens)).input_ids) + model.cfg.num_mm_tokens + 2
    budget = max(1, limit - overhead)  # +2 above: re-tokenising slack
    if len(ids) <= budget:
        return text
    if not _warned_long:
        warnings.warn(f"instruction of {len(ids)} tokens truncated to {budget} to fit the LLM's {limit} "
                      "positions (warned once)")
        _warned_long = True
    return tok.decode(ids[:budget])


def comprehend(model, images: torch.Tensor, texts: list[str]) -> Reading:
    """One teacher-forced MLLM forward -> Reading(h: B×r×d, L_LLM, v: B×P×D_vis patch features)."""
    ids, mask, pixels = mllm_inputs(model, images, texts)
    caught = {}

    def hook(module, args, out):  # the vision tower's hidden states, computed inside the LLaVA forward
        caught["v"] = out.hidden_states[model.mllm.config.vision_feature_layer][:, 1:]

    handle = model.mllm.model.vision_tower.register_forward_hook(hook)
    try:
        out = mm_forward(model.mllm, ids, mask, model.mm_ids, pixel_values=pixels)
    finally:
        handle.remove()
    return Reading(out.hidden, out.loss, caught["v"])
