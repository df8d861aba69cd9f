"""Step 3, editing pairs (InsightEdit §3.1): removal, addition (the removal swapped) and replacement, each made
by a mask-based inpainting model, with the paper's template instructions.

  removal      target = the inpainted image with the object's mask filled by background; "remove the [object]"
  addition     source and target of the removal swapped, same mask;                   "add the [object]"
  replacement  the MLLM proposes another object for the scene, the inpainter draws it in the mask;
               "replace the [source] with the [target]"

Inpainter: diffusers' `AutoPipelineForInpainting` by hub id or folder (SD inpainting, SDXL inpainting, ...;
InsightEdit used PowerPaint, which is not a diffusers pipeline). The image is inpainted at its size (longer
side at most `max_side`) rounded down to a multiple of 8 and brought back, then composited: pixels outside
the mask are the source's exactly, so a pair differs only inside its mask (the background consistency the paper
aims for). Removal prompts the pipeline with `remove_prompt` and the object's name as the negative prompt; the
generator is seeded per pair, so a resumed run draws the same images.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from PIL import Image

from .mllm import _load

TEMPLATES = {"remove": "remove the {s}", "add": "add the {s}", "replace": "replace the {s} with the {t}"}
REPLACE_PROMPT = (
    "In this image there is {d}. Name one other physical object that could plausibly stand in its place in this "
    "scene, clearly different from \"{s}\". Answer with the object's name only, in one to four words."
)
DEFAULT_REMOVE_PROMPT = "empty background, nothing there, seamless continuation of the surroundings"


def template(kind: str, source: str, target: str | None = None) -> str:
    return TEMPLATES[kind].format(s=source, t=target)


def parse_replacement(text, source: str, max_words: int = 4) -> str | None:
    """The proposed object's name from an answer ("A red apple." -> "red apple"), or None when the answer is
    empty, too long, not words, or the source object again."""
    if not isinstance(text, str):
        return None
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:answer|object|replacement)\s*:\s*", "", line.strip(), flags=re.I)
    name = re.sub(r"^(?:the|a|an)\s+", "", line.strip(" .!\"'`*"), flags=re.I).strip()
    words = name.split()
    if not words or len(words) > max_words or not all(re.fullmatch(r"[A-Za-z][A-Za-z'-]*", w) for w in words):
        return None
    if name.lower() == source.lower().strip():
        return None
    return name


def composite(source: Image.Image, filled: Image.Image, mask: np.ndarray) -> Image.Image:
    """Source outside the mask, the inpainted image inside (`mask` H×W bool at the source's size)."""
    if filled.size != source.size:
        filled = filled.resize(source.size, Image.BICUBIC)
    out = np.where(mask[..., None], np.asarray(filled.convert("RGB")), np.asarray(source.convert("RGB")))
    return Image.fromarray(out.astype(np.uint8), "RGB")


class Inpainter:
    """A diffusers inpainting pipeline: `fill(image, mask, prompt, negative, seed) -> image`."""

    def __init__(self, path: str, device: str = "cpu", dtype=torch.float32, steps: int = 30,
                 guidance: float = 7.5, remove_prompt: str = DEFAULT_REMOVE_PROMPT, max_side: int = 1024):
        from diffusers import AutoPipelineForInpainting

        def load(p):
            kwargs = {"safety_checker": None, "requires_safety_checker": False}
            try:
                return AutoPipelineForInpainting.from_pretrained(p, torch_dtype=dtype, **kwargs)
            except TypeError:  # a pipeline class without a safety checker
                return AutoPipelineForInpainting.from_pretrained(p, torch_dtype=dtype)

        self.pipe = _load("inpainting pipeline", "--inpainter", path, load).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device, self.steps, self.guidance, self.remove_prompt = device, steps, guidance, remove_prompt
        self.max_side = max_side  # larger inputs are inpainted downscaled; only the mask is pasted back

    @torch.no_grad()
    def fill(self, image: Image.Image, mask: np.ndarray, prompt: str, negative: str | None, seed: int):
        s = min(1.0, self.max_side / max(image.size))
        w, h = max(8, int(image.width * s) // 8 * 8), max(8, int(image.height * s) // 8 * 8)
        m = Image.fromarray(mask.astype(np.uint8) * 255, "L")
        g = torch.Generator("cpu").manual_seed(seed)
        out = self.pipe(prompt=prompt, negative_prompt=negative, image=image.resize((w, h), Image.BICUBIC),
                        mask_image=m.resize((w, h), Image.NEAREST), height=h, width=w, generator=g,
                        num_inference_steps=self.steps, guidance_scale=self.guidance, output_type="pil").images[0]
        return composite(image, out, mask)


class Editor:
    """Step 3's three acts on real images: remove and draw with the inpainter, propose with the MLLM."""

    def __init__(self, inpainter: Inpainter, mllm):
        self.inpainter, self.mllm = inpainter, mllm

    def remove(self, image, mask, obj: dict, seed: int) -> Image.Image:
        return self.inpainter.fill(image, mask, self.inpainter.remove_prompt, obj["simple"], seed)

    def propose(self, image, mask, obj: dict) -> str | None:
        return parse_replacement(self.mllm.ask(REPLACE_PROMPT.format(d=obj["detailed"], s=obj["simple"]), image),
                                 obj["simple"])

    def draw(self, image, mask, obj: dict, new: str, seed: int) -> Image.Image:
        return self.inpainter.fill(image, mask, new, None, seed)


def make_pairs(image, obj: dict, mask: np.ndarray, editor, seed: int, kinds, tally) -> list[dict]:
    """The pairs of one masked object: [{"kind", "source", "target", "instruction", "object", "new"?}].
    Removal and addition share one inpainting; replacement asks the editor for the new object first."""
    pairs = []
    if {"remove", "add"} & set(kinds):
        removed = editor.remove(image, mask, obj, seed)
        for kind in ("remove", "add"):
            if kind in kinds:
                src, tgt = (image, removed) if kind == "remove" else (removed, image)
                pairs.append({"kind": kind, "source": src, "target": tgt, "object": obj,
                              "instruction": template(kind, obj["simple"])})
    if "replace" in kinds:
        new = editor.propose(image, mask, obj)
        if new is None:
            tally.drop("edits", "replacement proposal unusable")
        else:
            pairs.append({"kind": "replace", "source": image, "target": editor.draw(image, mask, obj, new, seed + 1),
                          "object": obj, "new": new, "instruction": template("replace", obj["simple"], new)})
    for p in pairs:
        tally.keep("edits", p["kind"])
    return pairs
