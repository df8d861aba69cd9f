"""The MLLM side of InsightEdit and SmartEdit: one teacher-forced forward per edit (InsightEdit §4.1, eq. 2).

    prompt = chat template(<image>×n, instruction) ⊕ [MM0] .. [MM{r-1}]     (right-padded to one length)
    LLaVA(+LoRA)(prompt, I_src) ──► h: B×r×d (last layer at the [MM] positions), L_LLM, and on the way
    v: B×P×D_vis, the vision tower's patch features (CLS dropped) that BIM reads — caught with a forward hook so
    the vision tower runs once per edit.

MIND-Edit's MLLM side (no [MM] tokens, a decoded T_opt instead) is mind.py; both build their prompt with
`build.chat_prompt`, as the toy bases were pretrained on.
"""
from __future__ import annotations

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


def fit_instruction(model, text: str) -> str:
    """Cut an instruction's tokens so the prompt (+ image tokens + r [MM] tokens) fits the LLM's positions;
    warn once per model. The cut keeps the start: the instruction's verb and object come first."""
    tok = model.tokenizer
    limit = min(tok.model_max_length, model.mllm.config.text_config.max_position_embeddings)
    ids = tok(text, add_special_tokens=False).input_ids
    if not hasattr(model, "_prompt_overhead"):
        empty = build.chat_prompt(tok, "", model.n_image_tokens)
        model._prompt_overhead = len(tok(empty).input_ids) + model.cfg.num_mm_tokens + 2  # +2: re-tokenising slack
    budget = max(1, limit - model._prompt_overhead)
    if len(ids) <= budget:
        return text
    if not getattr(model, "_warned_long", False):
        import warnings

        warnings.warn(f"instruction of {len(ids)} tokens truncated to {budget} to fit the LLM's {limit} "
                      "positions (warned once)")
        model._warned_long = True
    return tok.decode(ids[:budget])


def comprehend(model, images: torch.Tensor, texts: list[str]):
    """One teacher-forced MLLM forward -> (h: B×r×d, L_LLM, v: B×P×D_vis patch features)."""
    ids, mask, pixels = mllm_inputs(model, images, texts)
    caught = {}

    def hook(module, args, out):  # the vision tower's hidden states, computed inside the LLaVA forward
        caught["v"] = out.hidden_states[model.mllm.config.vision_feature_layer][:, 1:]

    handle = model.mllm.model.vision_tower.register_forward_hook(hook)
    try:
        out = mm_forward(model.mllm, ids, mask, model.mm_ids, pixel_values=pixels)
    finally:
        handle.remove()
    return out.hidden, out.loss, caught["v"]
