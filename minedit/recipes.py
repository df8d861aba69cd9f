"""How each recipe turns (source image, instruction) into the UNet's `Conditions` (conditions.py): one class per
path, chosen once from the config by `recipe_path`. EditModel holds the parts; a path reads them and returns
what it computed (conditions, losses, decoded text), writing nothing onto the model.

    TextPath    ip2p          f_txt = CLIP_text(c)
    BridgePath  insightedit,  I_src + c ─MLLM─► h ─Q-Former (─BIM)─► f_txt (, v_txt);  h ─IAA─► e, f_img
                smartedit
    MindPath    mindedit      I_src + c ─MLLM─► T_opt, v_insight;  f_txt = CLIP_text(T_opt),
                              f_img = image_proj(v_insight)

Each path answers the same four questions:
    image_branch(stage)        does the decoupled attention read image tokens at this stage?
    conditions(...)            inference: (Conditions, decoded texts or None); the MLLM runs once
    alignment_losses(batch)    stage 1: {name: loss}
    edit_conditions(...)       editing stages: (Conditions, {name: loss} computed on the way)

Choices the design left open (bridge path), recorded here:
  * Stage 1 feeds the caption as the MLLM's instruction text (with the image), and aligns the Q-Former output
    with CLIP_text(caption) and the IAA mapper with CLIP_image(I_src) (InsightEdit supp. eq. 2).
  * v (BIM's image input) is the LLaVA vision tower's own penultimate-layer patch features (CLS dropped),
    caught with a forward hook during the single MLLM forward, so the vision tower runs once per edit.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import mind
from .errors import UserError
from .comprehend import comprehend
from .conditions import Conditions
from .parts.iaa import iaa_loss


class TextPath:
    """InstructPix2Pix: the instruction through CLIP's text encoder, nothing else."""

    def image_branch(self, model, stage: int) -> bool:
        return False

    def conditions(self, model, images, texts, latent_hw, image_branch=False, use_topt=True):
        return Conditions(f_txt=model.encode_text(texts)), None

    def alignment_losses(self, model, batch) -> dict:
        raise ValueError("ip2p has no alignment stage")  # unreachable: config validation refuses --stage 1

    def edit_conditions(self, model, batch, source, target, latent_hw, stage):
        return Conditions(f_txt=model.encode_text(batch["instruction"])), {}


class BridgePath:
    """InsightEdit and SmartEdit: the [MM] states read by the Q-Former (+ BIM) and, for InsightEdit, the IAA."""

    def image_branch(self, model, stage: int) -> bool:
        return model.cfg.uses_iaa and stage >= 3

    def read(self, model, images, texts, latent_hw, image_branch: bool, forced=None) -> "BridgeReading":
        """One MLLM forward -> BridgeReading. The null image tokens are the IAA of zero [MM] states. forced =
        (B bool, B×T×D_txt) puts those rows' text conditions in place of q' before BIM (teacher forcing)."""
        r = comprehend(model, images, texts)
        q = model.qformer(r.h.float())               # B×T×D_txt
        q_in = q if forced is None else torch.where(forced[0][:, None, None], forced[1], q)
        f_txt, v_txt = model.bim(q_in, r.v.float(), latent_hw) if model.cfg.uses_bim else (q_in, None)
        e = f_img = null_img = None
        if model.cfg.uses_iaa:
            e = model.iaa.map(r.h.float())           # B×D_img
            if image_branch:
                f_img = model.iaa.tokens(e)          # B×N×D_img
                null_img = model.iaa(torch.zeros_like(r.h, dtype=torch.float32))[1]
        return BridgeReading(Conditions(f_txt, v_txt, f_img, null_img), r.loss, e, q)

    def conditions(self, model, images, texts, latent_hw, image_branch=False, use_topt=True):
        return self.read(model, images, texts, latent_hw, image_branch).cond, None

    def alignment_losses(self, model, batch) -> dict:
        """Stage 1: L_LLM, Q-Former output vs CLIP_text(caption), IAA mapper vs CLIP_image(I_src)."""
        images, captions = batch["image"].to(model.device), batch["caption"]
        r = comprehend(model, images, captions)
        parts = {"llm": r.loss.float(), "qformer": text_alignment_loss(model, model.qformer(r.h.float()), captions)}
        if model.cfg.uses_iaa:
            with torch.no_grad():
                target_img = model.encode_image_clip(images).float()
            parts["iaa"] = iaa_loss(model.iaa.map(r.h.float()), target_img)
        return parts

    def edit_conditions(self, model, batch, source, target, latent_hw, stage):
        """Stages 2-3: L_LLM keeps training the [MM] rows in stage 2; L_IAA aligns e with CLIP_image(I_tar);
        with --qformer_explicit_weight, stage 2 also aligns q' with CLIP_text(optimized_instruction), and with
        --qformer_teacher_forcing a share of the rows feed the UNet that target instead of q' (in the first
        --qformer_teacher_forcing_steps steps only, when that is set)."""
        cfg = model.cfg
        explicit = (batch.get("optimized_instruction") or [""] * len(source)) if stage == 2 else [""] * len(source)
        forced = teacher_forced_rows(model, explicit, forcing_rate(cfg, batch.get("step"))) if stage == 2 else None
        read = self.read(model, source, batch["instruction"], latent_hw, self.image_branch(model, stage), forced)
        parts = {} if stage == 3 else {"llm": read.loss_llm.float()}
        if read.e is not None:
            with torch.no_grad():
                target_img = model.encode_image_clip(target).float()
            parts["iaa"] = iaa_loss(read.e, target_img)
        if stage == 2 and cfg.qformer_explicit_weight:
            parts["explicit"] = cfg.qformer_explicit_weight * text_alignment_loss(model, read.q, explicit)
        return read.cond, parts


def forcing_rate(cfg, step: int | None) -> float:
    """The share of rows to teacher-force at this optimizer step (the trainer puts it in the batch as "step"):
    --qformer_teacher_forcing, until --qformer_teacher_forcing_steps steps have been taken when that is set."""
    until = cfg.qformer_teacher_forcing_steps
    if not until:
        return cfg.qformer_teacher_forcing
    if step is None:  # a training loop that does not say the step would force every step without a word
        raise ValueError("--qformer_teacher_forcing_steps needs the optimizer step in the batch as 'step'")
    return cfg.qformer_teacher_forcing if step < until else 0.0


def teacher_forced_rows(model, texts: list[str], rate: float):
    """--qformer_teacher_forcing (an ablation, not in the papers): each row that has an explicit instruction is
    drawn with probability `rate` to feed the UNet CLIP_text(that instruction) in place of the Q-Former output,
    as MIND-Edit's stage 2 feeds CLIP_text of the ground-truth T_opt. The UNet then learns to edit from the exact
    condition the Q-Former is pulled toward (--qformer_explicit_weight), not from a moving estimate of it.
    -> (B bool on the model's device, B×T×D_txt), or None when no row is drawn."""
    if not rate:
        return None
    has = torch.tensor([bool(t) for t in texts])
    pick = has & (torch.rand(len(texts)) < rate)   # the training RNG: a resumed run draws the same rows
    if not pick.any():
        return None
    with torch.no_grad():
        target = model.encode_text([t or "" for t in texts]).float()
    return pick.to(target.device), target


def text_alignment_loss(model, q: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """MSE between the Q-Former output q': B×T×D_txt and CLIP_text of each row's text, over the rows that have
    one (0 when none does). Stage 1 aligns with the caption (InsightEdit supp. eq. 2); --qformer_explicit_weight
    also aligns stage 2 with the edit's explicit instruction — an ablation, not in the papers: a caption says what
    is in the image, not which shape to edit, and the diffusion loss alone teaches the bridge that slowly (README,
    "Does the instruction steer the choice at all?"), while MIND-Edit's UNet learns it from CLIP_text(T_opt)."""
    keep = [i for i, text in enumerate(texts) if text]
    if not keep:
        return q.sum() * 0.0
    with torch.no_grad():
        target = model.encode_text([texts[i] for i in keep]).float()
    return F.mse_loss(q[keep].float(), target)


class BridgeReading(NamedTuple):
    """What the bridge path computes from one MLLM forward."""
    cond: Conditions          # the UNet's conditions
    loss_llm: torch.Tensor    # scalar L_LLM
    e: torch.Tensor | None    # B×D_img, the IAA mapper's output (InsightEdit), else None
    q: torch.Tensor           # B×T×D_txt, the Q-Former output before BIM


class MindPath:
    """MIND-Edit (mind.py): T_opt and v_insight from the MLLM; teacher-forced conditions in stage 2."""

    def image_branch(self, model, stage: int) -> bool:
        return True

    def conditions(self, model, images, texts, latent_hw=None, image_branch=True, use_topt=True):
        return mind.conditions(model, images, texts, image_branch, use_topt)

    def alignment_losses(self, model, batch) -> dict:
        return mind.stage1_losses(model, batch)

    def edit_conditions(self, model, batch, source, target, latent_hw, stage):
        return mind.teacher_conditions(model, batch, source, target), {}


def check_exact_text(cfg) -> None:
    """--exact-text needs a recipe whose UNet reads a Q-Former (the bridge path): checked before any model is built."""
    if not isinstance(recipe_path(cfg), BridgePath):
        raise UserError(f"--exact-text: {cfg.recipe} has no Q-Former to stand in for — drop the flag")


def use_exact_text(model) -> None:
    """A diagnostic (evaluate.py and grounding_probe.py --exact-text): make model.conditions read
    BIM(CLIP_text(texts)) in place of the Q-Former output q', for every row — the condition
    --qformer_teacher_forcing trains the UNet on, i.e. a Q-Former that reached its explicit target exactly.
    Given the explicit instruction as the text, it measures what the UNet alone makes of a perfect bridge."""
    check_exact_text(model.cfg)
    path = model.path

    def conditions(images, texts, latent_hw, image_branch, use_topt=True):
        exact = model.encode_text(list(texts)).float()
        forced = (torch.ones(len(texts), dtype=torch.bool, device=exact.device), exact)
        return path.read(model, images, texts, latent_hw, image_branch, forced).cond, None

    model.conditions = conditions


def recipe_path(cfg):
    """The path of `cfg.recipe`."""
    if cfg.uses_vision_head:
        return MindPath()
    return BridgePath() if cfg.uses_mm_tokens else TextPath()
