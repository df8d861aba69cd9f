"""What the editing UNet reads for one batch of edits, and classifier-free-guidance dropout (DESIGN §4, §5).

    f_txt: B×T×D_txt     the text condition (CLIP_text(c), the Q-Former/BIM output, or CLIP_text(T_opt))
    v_txt: B×C0×h×w      BIM's residual on the UNet's conv_in output (None without BIM)
    f_img: B×N×D         image tokens of the decoupled cross-attention (None while the image branch is off)
    null_img: B×N×D      what guidance puts in f_img's place when the instruction is dropped: the IAA of zero
                         [MM] states, or IP-Adapter's projection of a zero embedding (None with f_img None)

Every recipe produces this one shape (recipes.py); the sampler and the training loss read nothing else. What a
recipe computes on the way (L_LLM, the IAA's e, MIND-Edit's decoded T_opt) it returns beside it.

Guidance dropout (InstructPix2Pix): one uniform u per sample picks which conditions it trains without:
    u < p_t                    text only: f_txt -> CLIP_text(""), f_img -> null_img
    p_t <= u < p_t + p_i       image only: the source latent -> 0
    p_t + p_i <= u < p_t+p_i+p_b  both
v_txt is kept in every branch, as SmartEdit's inference keeps it.

Prior preservation (--t2i_share; an ablation of ours, in none of the papers): a share of the rows is turned into
the text-to-image prior's own task before the dropout — f_txt -> CLIP_text(target caption), the source latent,
v_txt and f_img emptied — so the editing stage keeps drawing from text, which it otherwise forgets.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Conditions(NamedTuple):
    f_txt: torch.Tensor                    # B×T×D_txt
    v_txt: torch.Tensor | None = None      # B×C0×h×w
    f_img: torch.Tensor | None = None      # B×N×D
    null_img: torch.Tensor | None = None   # B×N×D, the image branch's null condition


def guidance_dropout(u: torch.Tensor, p_text: float, p_image: float, p_both: float):
    """u: B uniform draws -> (drop_text: B bool, drop_image: B bool) (see the module docstring)."""
    drop_text = (u < p_text) | ((u >= p_text + p_image) & (u < p_text + p_image + p_both))
    drop_image = (u >= p_text) & (u < p_text + p_image + p_both)
    return drop_text, drop_image


def drop_conditions(cond: Conditions, z_src: torch.Tensor, drop_text: torch.Tensor, drop_image: torch.Tensor,
                    null_text: torch.Tensor) -> tuple[Conditions, torch.Tensor]:
    """Swap in the null conditions per sample: null_text 1×T×D_txt, z_src B×4×h×w -> (conditions, z_src)."""
    f_txt = torch.where(drop_text[:, None, None], null_text.to(cond.f_txt.dtype), cond.f_txt)
    f_img = cond.f_img
    if f_img is not None:
        f_img = torch.where(drop_text[:, None, None], cond.null_img, f_img)
    z_src = torch.where(drop_image[:, None, None, None], torch.zeros_like(z_src), z_src)
    return cond._replace(f_txt=f_txt, f_img=f_img), z_src


def as_text_to_image(cond: Conditions, z_src: torch.Tensor, pick: torch.Tensor,
                     f_caption: torch.Tensor) -> tuple[Conditions, torch.Tensor]:
    """Rows `pick` (B bool) become text-to-image rows: f_txt -> f_caption (B×T×D_txt, CLIP_text of each row's target
    caption), z_src and v_txt -> 0, f_img -> null_img (the image branch's "no instruction") -> (conditions, z_src)."""
    rows = pick[:, None, None]
    f_txt = torch.where(rows, f_caption.to(cond.f_txt.dtype), cond.f_txt)
    v_txt = None if cond.v_txt is None else torch.where(rows[..., None], torch.zeros_like(cond.v_txt), cond.v_txt)
    f_img = None if cond.f_img is None else torch.where(rows, cond.null_img, cond.f_img)
    z_src = torch.where(rows[..., None], torch.zeros_like(z_src), z_src)
    return cond._replace(f_txt=f_txt, v_txt=v_txt, f_img=f_img), z_src
