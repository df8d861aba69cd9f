"""The benchmarks' own scoring formulas: Reason-Edit (SmartEdit), MagicBrush, GEdit-Bench (VIEScore).

Each follows the benchmark's public evaluation code, including its quirks, so the numbers are comparable with the
papers' tables (evaluate.py's default protocol is minedit's own, metrics.py). Images are float H×W×3 in [0, 1].

Reason-Edit (SmartEdit §5, its metrics script). No target images: the background is compared with the *source*.
  * source and edit resized to 256×256 (bicubic), the mask (`*_mask.jpg`, grey) to 256×256 (nearest);
  * w = 1 − mask/255 (soft: JPEG grey levels are kept), and both images are multiplied by w, so the edit region
    counts as equal black pixels in every metric (this inflates PSNR; it is how the published numbers were made);
  * PSNR = 10·log10(1/MSE) over the whole weighted images; SSIM with an 11×11 Gaussian window (σ = 1.5),
    K = (0.01, 0.03), population variances, averaged over the window centres that fit inside the image
    (torchmetrics' StructuralSimilarityIndexMeasure defaults; = scikit-image with gaussian_weights=True,
    use_sample_covariance=False); LPIPS with the SqueezeNet network on the weighted images (optional: `lpips`);
  * CLIP score = 100·max(cos(E_img(crop), E_txt(clip_text)), 0), the crop being the edit cut to the bounding box
    of the mask's nonzero pixels, right/bottom edge excluded (PIL's crop box, as the script calls it).
MagicBrush (its image_eval.py): the edit resized to the target's size (bicubic); L1 = mean |edit − target|,
  L2 = mean (edit − target)² (an MSE, as nn.MSELoss); CLIP-I = cos(E_img(edit), E_img(target)) and
  CLIP-T = cos(E_img(edit), E_txt(local caption)), raw cosines (no ×100, no clamp); DINO = cos of the CLS
  features of a DINO ViT (resize the shorter side to 256/224·S bicubic, centre crop S = the model's image size,
  ImageNet mean/std; S = 224 for facebook/dino-vits16, as MagicBrush).
GEdit-Bench (VIEScore, Ku et al. 2024): the judge rates semantic consistency with two sub-scores from 0 to 10
  (the instruction carried out; nothing else changed) and perceptual quality with two (naturalness; absence of
  artifacts). SC = min of its sub-scores, PQ = min of its sub-scores, O = √(SC·PQ); means per task type.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from . import metrics

REASON_EDIT_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- Reason-Edit ----------------------------------------------------------------------------------------------
def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    d = np.arange(size) - (size - 1) / 2
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return g / g.sum()


def ssim_gaussian(a, b, data_range: float = 1.0, size: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM with a Gaussian window and population variances over the valid window centres (see above)."""
    a, b = metrics._pair(a, b)
    x = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2)  # 2×C×H×W, float64
    c = x.shape[1]
    g = torch.from_numpy(_gaussian(size, sigma))
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)  # separable 2-D Gaussian, one per channel

    def blur(t):  # valid convolution: only windows inside the image
        return F.conv2d(t, kernel, groups=c)

    mu = blur(x)
    ux, uy = mu[0:1], mu[1:2]
    vx = blur(x[0:1] ** 2) - ux ** 2
    vy = blur(x[1:2] ** 2) - uy ** 2
    vxy = blur(x[0:1] * x[1:2]) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(smap.mean())


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the nonzero pixels, as the PIL crop box SmartEdit's script passes (its right
    and bottom are the last nonzero column/row, which PIL's crop then excludes); None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0 or xs.min() == xs.max() or ys.min() == ys.max():  # nothing left to crop
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def reason_edit_background(source, edit, mask_grey, lpips_net=None) -> dict:
    """Background PSNR / SSIM (/ LPIPS with `lpips_net`, an lpips.LPIPS) of `edit` vs `source`, both ×(1 − m/255).

    `source`, `edit`: 256×256×3 in [0, 1]; `mask_grey`: 256×256 grey levels 0..255 (255 = the edit region)."""
    w = 1.0 - np.asarray(mask_grey, dtype=np.float64)[..., None] / 255.0  # H×W×1
    a, b = np.asarray(source, dtype=np.float64) * w, np.asarray(edit, dtype=np.float64) * w
    out = {"psnr": metrics.psnr(a, b), "ssim": ssim_gaussian(a, b)}
    if lpips_net is not None:
        x, y = (torch.from_numpy(2 * im - 1).float().permute(2, 0, 1)[None] for im in (a, b))
        with torch.no_grad():
            out["lpips"] = float(lpips_net(x, y).mean())
    return out


def lpips_network(net: str = "squeeze"):
    """LPIPS's network (SmartEdit: SqueezeNet) from the `lpips` package, an optional extra."""
    try:
        import lpips
    except ImportError:
        raise UserError("LPIPS needs the lpips package — pip install lpips (or pass --lpips off)") from None
    try:
        return lpips.LPIPS(net=net, verbose=False).eval()
    except (OSError, RuntimeError) as e:
        raise UserError(f"LPIPS {net} network could not load ({e}) — its torchvision backbone weights must be in "
                        "the torch hub cache (or pass --lpips off)") from None


# ---- feature similarities (MagicBrush) ------------------------------------------------------------------------
def load_clip(path: str, device):
    """A CLIPModel and its tokenizer by hub id or folder (the toy bases keep the tokenizer beside SD's)."""
    from transformers import AutoTokenizer, CLIPModel

    from ..build import _pretrained, quiet_loading

    local = _pretrained(path, meta=False)
    try:
        with quiet_loading():
            model = CLIPModel.from_pretrained(local).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the CLIP model {path} ({e}) — pass --clip with a CLIPModel id or "
                        "folder") from None
    try:
        tok = AutoTokenizer.from_pretrained(local)
    except (OSError, ValueError):
        tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(local), "sd", "tokenizer"))
    return model, tok


def load_dino(path: str, device):
    """A DINO ViT (transformers ViTModel / Dinov2Model) by hub id or folder."""
    from transformers import AutoModel

    from ..build import quiet_loading

    try:
        with quiet_loading():
            model = AutoModel.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the DINO model {path} ({e}) — pass --dino with a ViT/DINOv2 id or folder, "
                        "e.g. facebook/dino-vits16") from None
    if model.config.model_type not in ("vit", "dinov2", "dinov2_with_registers"):
        raise UserError(f"--dino {path} is a {model.config.model_type} model — pass a ViT or DINOv2 model")
    return model


def _resize_crop(images, size: int, resize: int) -> torch.Tensor:
    """Images (H×W×3 in [0, 1]) -> B×3×size×size: shorter side to `resize` (bicubic, antialiased), centre crop."""
    out = []
    for image in images:
        x = metrics._as_chw(image)[None]
        h, w = x.shape[-2:]
        s = resize / min(h, w)
        nh, nw = max(size, round(h * s)), max(size, round(w * s))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[..., top:top + size, left:left + size])
    return torch.cat(out)


@torch.no_grad()
def dino_features(model, images) -> torch.Tensor:
    """Unit CLS features (B×D) of a transformers ViTModel / Dinov2Model, preprocessed as MagicBrush's DINO."""
    param = next(model.parameters())
    size = model.config.image_size
    x = _resize_crop(images, size, round(size * 256 / 224))
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = model(pixel_values=((x - mean) / std).to(param.device, param.dtype))
    return F.normalize(out.last_hidden_state[:, 0].float(), dim=-1)  # CLS after the final LayerNorm


@torch.no_grad()
def clip_image_features(model, images) -> torch.Tensor:
    param = next(model.parameters())
    pixels = metrics._clip_pixels(images, model.config.vision_config.image_size).to(param.device, param.dtype)
    return F.normalize(metrics.clip_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)


@torch.no_grad()
def clip_text_features(model, tokenizer, texts) -> torch.Tensor:
    param = next(model.parameters())
    tok = tokenizer(list(texts), padding=True, truncation=True,
                    max_length=model.config.text_config.max_position_embeddings, return_tensors="pt").to(param.device)
    feats = model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    return F.normalize(metrics.clip_features(feats).float(), dim=-1)


def magicbrush_distances(edit, target) -> dict:
    """L1 and L2 (an MSE) of an edit already resized to the target's size; both H×W×3 in [0, 1]."""
    a, b = metrics._pair(edit, target)
    return {"l1": float(np.abs(a - b).mean()), "l2": float(((a - b) ** 2).mean())}


# ---- GEdit-Bench / VIEScore -----------------------------------------------------------------------------------
SC_PROMPT = (
    "You judge an instruction-based image edit. The first image is the source, the second the edit, made from "
    "the instruction below. Give two integer scores from 0 to 10: first, how completely and exactly the "
    "instruction was carried out (0 = not at all, 10 = perfectly); second, how little else was changed (0 = the "
    "whole image was changed, 10 = nothing but the requested change). Answer with one JSON object: "
    '{"score": [<first>, <second>], "reasoning": "<one sentence>"}.'
)
PQ_PROMPT = (
    "You judge the perceptual quality of an image. Give two integer scores from 0 to 10: first, how natural it "
    "looks (lighting, shadows, proportions; 0 = unnatural, 10 = natural); second, how free it is of artifacts "
    "(distortion, blur, smears, broken parts; 0 = full of them, 10 = none). Answer with one JSON object: "
    '{"score": [<first>, <second>], "reasoning": "<one sentence>"}.'
)


def sc_messages(instruction: str) -> list[dict]:
    return [{"role": "system", "content": SC_PROMPT}, {"role": "user", "content": [
        {"type": "text", "text": f"Editing instruction: {instruction}"}, {"type": "text", "text": "Source image:"},
        {"type": "image"}, {"type": "text", "text": "Edited image:"}, {"type": "image"}]}]


def pq_messages() -> list[dict]:
    return [{"role": "system", "content": PQ_PROMPT},
            {"role": "user", "content": [{"type": "text", "text": "The image:"}, {"type": "image"}]}]


def parse_score_list(text, n: int = 2, top: float = 10.0) -> list[float] | None:
    """The last JSON object's "score" list of `n` numbers in [0, top]; None when there is none (never raises)."""
    from .judge import _json_objects, _number

    found = None
    for obj in _json_objects(text if isinstance(text, str) else ""):
        scores = obj.get("score", obj.get("scores"))
        if isinstance(scores, list) and len(scores) == n:
            values = [_number(s) for s in scores]
            if all(v is not None and math.isfinite(v) and 0 <= v <= top for v in values):
                found = values
    return found


def vie_overall(sc_scores, pq_scores) -> dict:
    """VIEScore as GEdit-Bench reports it: SC = min(sc_scores), PQ = min(pq_scores), O = √(SC·PQ)."""
    sc, pq = min(sc_scores), min(pq_scores)
    return {"sc": sc, "pq": pq, "o": math.sqrt(sc * pq)}


def gedit_scores(judge, source_png: bytes, edited_png: bytes, instruction: str, retries: int = 1) -> dict:
    """Ask `judge` (judge.HTTPJudge / LocalJudge) for the SC and PQ sub-scores; SC, PQ, O None when unusable."""
    def ask(messages, images):
        for _ in range(1 + retries):
            raw = judge.ask(messages, images)
            scores = parse_score_list(raw)
            if scores is not None:
                return scores
        return None

    sc = ask(sc_messages(instruction), [source_png, edited_png])
    pq = ask(pq_messages(), [edited_png])
    out = {"sc_scores": sc, "pq_scores": pq, "sc": None, "pq": None, "o": None}
    if sc is not None and pq is not None:
        out.update(vie_overall(sc, pq))
    return out
