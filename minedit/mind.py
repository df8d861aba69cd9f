"""MIND-Edit's MLLM side: one forward gives both heads (MIND-Edit §3.3–3.5).

    I_src + T_raw ──LLaVA (+LoRA)──► h_N (last layer) ──lm_head F_t──► T_opt        (text head, eq. 3)
                                  └► h_m (layer m)    ──VisionHead F_v──► v_insight  (vision head, eq. 2)

Training (stage 1) is one teacher-forced forward over prompt ⊕ T_opt ⊕ eos:
    ℓ_text  = mean cross-entropy of the T_opt tokens and eos given everything before them (eq. 4; prompt masked)
    ℓ_embed = 1 − cos(F_v(h_m), CLIP_image(I_tar))                                           (eq. 5)
Inference decodes T_opt greedily (`generate`), and v_insight comes from the hidden states of that generation's
first (prefill) forward: the head pools the prompt positions only (see vision_head.py), which causal attention
makes identical to the training forward's.

Prompt: the MLLM's own chat template (image first, raw instruction, generation prompt): `build.chat_prompt`, as
the other recipes' (comprehend.py) but without [MM] tokens; the toy base MLLM was pretrained on this prompt to
write `optimized_instruction`. Training pads on the right, decoding on the left; pooling and the loss ignore
padding, and RoPE attention depends only on relative positions, so the two agree (tests check it).
LLaVA-OneVision (full size) goes through its processor, which expands the anyres image tokens per image.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import build
from .conditions import Conditions
from .errors import UserError
from .parts.vision_head import embed_loss


class MindInputs(NamedTuple):
    input_ids: torch.Tensor       # B×L
    attention_mask: torch.Tensor  # B×L
    prompt_mask: torch.Tensor     # B×L, 1 on the prompt's own tokens (what F_v pools)
    labels: torch.Tensor          # B×L, -100 except the answer tokens (T_opt ⊕ eos)
    vision: dict                  # pixel_values (+ image_sizes for OneVision)


def _vision_and_prompts(model, images: torch.Tensor, texts: list[str]):
    """-> (list of prompt id lists, vision kwargs). OneVision: its processor expands the image tokens."""
    prompts = [build.chat_prompt(model.tokenizer, t, model.n_image_tokens) for t in texts]
    processor = getattr(model, "processor", None)
    if processor is not None:
        pil = [(((x.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy())
               for x in images]
        enc = processor(images=pil, text=prompts, return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(enc.input_ids, enc.attention_mask)]
        vision = {"pixel_values": enc.pixel_values.to(model.device, model.mllm.dtype),
                  "image_sizes": enc.image_sizes.to(model.device)}
        return ids, vision
    ids = [model.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    pixels = build.clip_pixels(images, model.mllm.config.vision_config.image_size).to(model.mllm.dtype)
    return ids, {"pixel_values": pixels.to(model.device)}


def mind_inputs(model, images: torch.Tensor, texts: list[str], answers: list[str] | None = None,
                left_pad: bool = False) -> MindInputs:
    """Token ids of prompt (⊕ answer ⊕ eos when `answers` are given), padded to one length."""
    tok = model.tokenizer
    prompts, vision = _vision_and_prompts(model, images, texts)
    answer_ids = [[] for _ in prompts] if answers is None else \
        [tok(a, add_special_tokens=False).input_ids + [tok.eos_token_id] for a in answers]
    length = max(len(p) + len(a) for p, a in zip(prompts, answer_ids))
    b = len(prompts)
    ids = torch.full((b, length), tok.pad_token_id)
    attn, prompt_mask = torch.zeros(b, length, dtype=torch.long), torch.zeros(b, length, dtype=torch.long)
    labels = torch.full((b, length), -100)
    for i, (p, a) in enumerate(zip(prompts, answer_ids)):
        n = len(p) + len(a)
        start = length - n if left_pad else 0
        ids[i, start:start + n] = torch.tensor(p + a)
        attn[i, start:start + n] = 1
        prompt_mask[i, start:start + len(p)] = 1
        if a:
            labels[i, start + len(p):start + n] = torch.tensor(a)
    dev = model.device
    return MindInputs(ids.to(dev), attn.to(dev), prompt_mask.to(dev), labels.to(dev), vision)


def teacher_forward(model, images: torch.Tensor, texts: list[str], answers: list[str] | None,
                    need_text: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward over prompt ⊕ T_opt (the prompt alone with `answers=None`) -> (ℓ_text fp32 or None,
    v_insight B×D)."""
    x = mind_inputs(model, images, texts, answers)
    out = model.mllm.model(input_ids=x.input_ids, attention_mask=x.attention_mask, use_cache=False,
                           output_hidden_states=True, **x.vision)
    v = model.vision_head(out.hidden_states[model.cfg.vision_head_layer], x.prompt_mask)
    if not need_text:
        return None, v
    # Position j predicts token j+1: logits only where the next token is an answer token (never B×L×V).
    nxt = x.labels[:, 1:]
    where = nxt != -100
    logits = model.mllm.get_output_embeddings()(out.last_hidden_state[:, :-1][where])  # K×V
    return F.cross_entropy(logits.float(), nxt[where]), v


@torch.no_grad()
def generate(model, images: torch.Tensor, texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Greedy T_opt (at most cfg.topt_max_tokens tokens, stops at eos) and v_insight from the same generation.
    Batch-safe: rows are left-padded, so each row decodes exactly as it would alone."""
    x = mind_inputs(model, images, texts, left_pad=True)
    tok = model.tokenizer
    out = model.mllm.generate(input_ids=x.input_ids, attention_mask=x.attention_mask, **x.vision,
                              max_new_tokens=model.cfg.topt_max_tokens, do_sample=False, num_beams=1,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              output_hidden_states=True, return_dict_in_generate=True)
    prefill = out.hidden_states[0][model.cfg.vision_head_layer]  # B×L×d: the prompt's forward
    v = model.vision_head(prefill, x.prompt_mask)
    new = out.sequences[:, x.input_ids.shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)], v


# ---------------------------------------------------------------- the recipe's conditions and stage-1 loss
def image_tokens(model, v: torch.Tensor) -> torch.Tensor:
    """f_img = IP-Adapter's image projection of an image embedding v: B×D_img -> B×N×D_txt."""
    return model.image_proj(v.to(model.image_proj.image_embeds.weight.dtype))


def _with_image(model, f_txt: torch.Tensor, v: torch.Tensor | None) -> Conditions:
    """f_txt plus, given v, its image tokens and the null ones (the projection of a zero embedding, IP-Adapter's
    own unconditional image prompt)."""
    if v is None:
        return Conditions(f_txt)
    return Conditions(f_txt, f_img=image_tokens(model, v), null_img=image_tokens(model, torch.zeros_like(v)))


def conditions(model, images: torch.Tensor, texts: list[str], use_image_branch: bool = True, use_topt: bool = True):
    """Inference: greedy T_opt and v_insight from one generation -> (Conditions, T_opt). f_txt = CLIP_text(T_opt)
    (the raw instruction with `use_topt=False`: Table 2 ablation #2); no image tokens without the image branch
    (ablation #1, identical to λ = 0)."""
    topt, v = generate(model, images, texts)
    f_txt = model.encode_text(topt if use_topt else texts)
    return _with_image(model, f_txt, v if use_image_branch else None), topt


def stage1_losses(model, batch) -> dict:
    """Stage 1 (eq. 6): {"text": ℓ_text, "embed": λ·ℓ_embed}, or one of them (`mind_losses`: Table 2's
    independent models); the parts sum to the loss."""
    cfg = model.cfg
    optimized = batch.get("optimized_instruction")
    if optimized is None or not all(t.strip() for t in optimized):
        raise UserError("mindedit stage 1 needs an `optimized_instruction` for every row (the text head's "
                        "target, MIND-Edit eq. 4) — add it to the manifest")
    source, target = batch["source"].to(model.device), batch["target"].to(model.device)
    loss_text, v = teacher_forward(model, source, batch["instruction"], optimized,
                                   need_text=cfg.mind_losses != "embed")
    parts = {}
    if cfg.mind_losses != "embed":
        parts["text"] = loss_text
    if cfg.mind_losses != "text":
        with torch.no_grad():
            target_img = model.encode_image_clip(target).float()
        parts["embed"] = cfg.mind_embed_weight * embed_loss(v, target_img)
    return parts


def predicted_v_insight(model, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """The frozen stage-1 vision head's v_insight as inference computes it: the prompt alone (v pools the prompt
    positions, so answer tokens would be wasted compute) and the MLLM in eval mode (the training loop puts the
    whole model in train mode; LoRA dropout there would feed the UNet noise that inference never has)."""
    parts = (model.mllm, model.vision_head)
    modes = [m.training for m in parts]
    for m in parts:
        m.eval()
    try:
        return teacher_forward(model, images, texts, None, need_text=False)[1]
    finally:
        for m, mode in zip(parts, modes):
            m.train(mode)


def teacher_conditions(model, batch, source: torch.Tensor, target: torch.Tensor) -> Conditions:
    """Stage 2: f_txt = frozen CLIP_text of the ground-truth optimized instruction (the raw instruction where a
    row has none) — what the stage-1 text head's T_opt stands in for at inference — and f_img = image_proj(v) with
    v, by `mind_image_prompt`:
      target     CLIP_image(I_tar), teacher forcing as IP-Adapter is trained: an embedding of the answer itself,
                 which the UNet can lean on more than inference's v_insight deserves;
      predicted  the frozen stage-1 vision head's v_insight for (I_src, instruction): exactly what inference feeds
                 the UNet (`predicted_v_insight`).

    Trainable here: the UNet, the projection and to_k_ip/to_v_ip. The paper keeps a pretrained SD + IP-Adapter
    frozen; this package's generation module starts from an InstructPix2Pix UNet (or a toy one) whose
    cross-attention never saw image prompts, so it must learn to edit with them."""
    texts = [o if o and o.strip() else raw for o, raw in
             zip(batch.get("optimized_instruction") or batch["instruction"], batch["instruction"])]
    with torch.no_grad():
        f_txt = model.encode_text(texts)
        if model.cfg.mind_image_prompt == "predicted":
            v = predicted_v_insight(model, source, batch["instruction"])
        else:
            v = model.encode_image_clip(target)
    return _with_image(model, f_txt, v)
