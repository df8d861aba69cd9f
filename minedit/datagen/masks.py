"""Step 2, masks (InsightEdit §3.1 uses Grounded-SAM): Grounding DINO boxes an object phrase, SAM cuts the box
into a mask, and thresholds drop what is unreliable.

  * Detector: transformers' `AutoModelForZeroShotObjectDetection` + `AutoProcessor` (Grounding DINO), one phrase
    per call ("blue t-shirt."), so each object gets its own best box; a best box scoring below `box_threshold`
    drops the object ("low-confidence detection").
  * Segmenter: SAM (`SamModel`) or SAM 2 (`Sam2Model`, in this transformers) by `AutoModel`; one box in, one
    mask out (`multimask_output=False`), upsampled to the image by the processor's `post_process_masks`.
    The tests run SAM on a tiny model; the SAM 2 branch is untested here (its processor needs torchvision,
    which this machine lacks — loading it without torchvision is one `error:` line).
  * `check_mask`: a mask covering no pixel is "empty", under `min_area` of the image "too small", above
    `max_area` "too large" (a box around the whole picture is no object to remove).
  * `grow`: the kept mask is dilated by `dilate` pixels before inpainting, so the fill covers the object's
    soft edge and its shadow fringe (0 keeps SAM's mask as it is).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from .mllm import _load


def check_mask(mask: np.ndarray, min_area: float, max_area: float) -> str | None:
    """Why a boolean H×W mask is unusable ("empty mask", "mask too small", "mask too large"), or None."""
    frac = float(mask.mean()) if mask.size else 0.0
    if frac == 0:
        return "empty mask"
    if frac < min_area:
        return "mask too small"
    if frac > max_area:
        return "mask too large"
    return None


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation by `pixels` (a square neighbourhood)."""
    if pixels <= 0:
        return mask
    im = Image.fromarray(mask.astype(np.uint8) * 255, "L").filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(im) >= 128


class Detector:
    """Grounding DINO: the best box for a phrase, with its score."""

    def __init__(self, path: str, device: str = "cpu", box_threshold: float = 0.35, text_threshold: float = 0.25):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.processor = _load("detector processor", "--detector", path, AutoProcessor.from_pretrained)
        self.model = _load("detector", "--detector", path,
                           AutoModelForZeroShotObjectDetection.from_pretrained).to(device).eval()
        self.device, self.box_threshold, self.text_threshold = device, box_threshold, text_threshold

    @torch.no_grad()
    def best_box(self, image: Image.Image, phrase: str) -> tuple[float, list[float]] | None:
        """(score, [x0, y0, x1, y1] in pixels) of the highest-scoring box, or None when nothing was found."""
        text = phrase.lower().strip(" .") + "."  # Grounding DINO expects lower-case phrases ending in a dot
        enc = self.processor(images=image, text=text, return_tensors="pt").to(self.device)
        out = self.model(**enc)
        # Thresholds of 0 here: the best box is kept whatever its score and judged against box_threshold below,
        # so that a low score is reported as such rather than as "nothing found".
        res = self.processor.post_process_grounded_object_detection(
            out, enc["input_ids"], threshold=0.0, text_threshold=self.text_threshold,
            target_sizes=[(image.height, image.width)])[0]
        if len(res["scores"]) == 0:
            return None
        i = int(res["scores"].argmax())
        return float(res["scores"][i]), [float(v) for v in res["boxes"][i]]


class Segmenter:
    """SAM or SAM 2: a boolean mask for a box."""

    def __init__(self, path: str, device: str = "cpu"):
        from transformers import AutoModel, AutoProcessor

        self.processor = _load("segmenter processor", "--segmenter", path, AutoProcessor.from_pretrained)
        self.model = _load("segmenter", "--segmenter", path, AutoModel.from_pretrained).to(device).eval()
        self.device = device

    @torch.no_grad()
    def mask(self, image: Image.Image, box: list[float]) -> tuple[np.ndarray, float]:
        """(H×W bool mask, SAM's predicted IoU) for one box [x0, y0, x1, y1] in pixels."""
        enc = self.processor(images=image, input_boxes=[[box]], return_tensors="pt").to(self.device)
        out = self.model(**enc, multimask_output=False)  # pred_masks: 1 × 1 box × 1 mask × h × w (logits)
        if "reshaped_input_sizes" in enc:  # SAM
            masks = self.processor.image_processor.post_process_masks(
                out.pred_masks.cpu(), enc["original_sizes"].cpu(), enc["reshaped_input_sizes"].cpu())
        else:  # SAM 2: its processor upsamples to the original size directly
            masks = self.processor.post_process_masks(out.pred_masks.cpu(), enc["original_sizes"].cpu())
        m = masks[0].reshape(-1, image.height, image.width)[0]  # the box's one mask at the image's size
        return m.numpy().astype(bool), float(out.iou_scores.reshape(-1)[0])


def mask_objects(detector, segmenter, image, objects, min_area: float, max_area: float, dilate: int, tally):
    """[(object, H×W bool mask, {"box_score", "iou"})] for the objects that pass; the rest counted in `tally`."""
    kept = []
    for obj in objects:
        found = detector.best_box(image, obj["simple"])
        if found is None or found[0] < detector.box_threshold:
            tally.drop("masks", "low-confidence detection" if found else "nothing detected")
            continue
        score, box = found
        mask, iou = segmenter.mask(image, box)
        if (why := check_mask(mask, min_area, max_area)) is not None:
            tally.drop("masks", why)
            continue
        tally.keep("masks")
        kept.append((obj, grow(mask, dilate), {"box_score": round(score, 4), "iou": round(iou, 4)}))
    return kept
