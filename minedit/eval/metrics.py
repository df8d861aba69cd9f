"""Edit metrics: background fidelity, in-mask correctness, edit success, CLIP-I / CLIPScore and (optional) LPIPS.

Images are float arrays H×W×C in [0, 1] (C = 3; H×W is taken as one channel); masks are H×W bool, True = the
edit region. As SmartEdit §5.1 and InsightEdit measure it, PSNR / SSIM / LPIPS are taken on the *background*
(outside the mask, ``background(mask) = ~mask``) of the edit against the target; without a mask, on the whole image.

* ``psnr`` = 10·log10(R² / MSE), the MSE over the selected pixels and all channels; identical inputs give
  ``inf`` (not a number to average: ``aggregate`` caps it at ``inf_cap`` = 100 dB before taking means).
* ``ssim`` is written by hand and equals ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
  data_range=R)`` with its defaults: 7×7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N/(N−1)), and
  the mean of the SSIM map cropped by (7−1)/2 = 3 pixels on each side, i.e. over the centres of the windows that
  lie entirely inside the image (so the boundary mode never matters). With ``region`` the cropped map is averaged
  over the window centres that lie in the region: a background window next to the mask still sees some edited
  pixels, and region pixels within 3 pixels of the image border do not count.
* Edit success (the toy world has exact targets). A sample succeeds when (1) at least ``min_fraction`` = 90 % of
  the edit-region pixels *off the target's outlines* are within ``tol`` = 0.15 of the target in L∞ over RGB, and
  (2) the background PSNR against the target is at least ``min_psnr_bg`` = 25 dB. Without a mask the edit region
  is where source and target differ by more than ``tol`` (L∞) and "background" is the whole image; an empty edit
  region satisfies (1). The ``outline`` (one pixel either side of each colour boundary) is left out because toy
  renders have hard edges and decoded edits soft ones; the form it decides is judged instead by the toy check
  ``minedit.toy.looks.drawn_shape_right``, and ``regions_kept`` holds each shape the edit was not asked to
  touch to the same numbers (evaluate.py applies both). ``acc_in`` counts every edit-region pixel, ``acc_core``
  those off the outline (``count_outline=True`` is the rule before 2026-12-07).
* CLIP-I = cos(E_img(edit), E_img(target)); CLIPScore = 100·max(cos(E_img(edit), E_txt(instruction)), 0).
  Hessel et al. scale by w = 2.5; we use 100, the scale of the ~20–23 CLIP Scores in SmartEdit / InsightEdit tables.
  Images are resized (shortest side, bicubic with antialiasing) and centre-cropped to the model's
  ``vision_config.image_size``, then normalised with the CLIP mean/std — from the float images, not via PIL.
* LPIPS only if the ``lpips`` package is importable (``LPIPS_AVAILABLE``) and its backbone weights load; else None.
"""
import importlib.util
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LPIPS_AVAILABLE = importlib.util.find_spec("lpips") is not None
# The toy world's success rule (module docstring); evaluate.py writes it into every results file beside the rates
# and applies drawn_shape and others_kept. count_outline / drawn_shape / others_kept were True / False / False in the
# first rule, and others_kept False in the second (both changed on 2026-12-07: README, "Scoring, audited again").
SUCCESS_RULE = {"tol": 0.15, "min_fraction": 0.9, "min_psnr_bg": 25.0, "count_outline": False, "drawn_shape": True,
                "others_kept": True}


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 2:  # one channel
        a, b = a[..., None], b[..., None]
    return a, b


def _region(region, shape: tuple[int, ...]) -> np.ndarray | None:
    if region is None:
        return None
    region = np.asarray(region, dtype=bool)
    if region.shape != shape[:2]:
        raise ValueError(f"region shape {region.shape} does not match image {shape[:2]}")
    return region


def background(mask) -> np.ndarray:
    """The pixels outside the edit mask."""
    return ~np.asarray(mask, dtype=bool)


def psnr(a, b, region=None, data_range: float = 1.0) -> float:
    """PSNR in dB over all pixels, or only where ``region`` is True; ``inf`` if equal there, ``nan`` if empty."""
    a, b = _pair(a, b)
    region = _region(region, a.shape)
    diff2 = (a - b) ** 2  # H×W×C
    if region is not None:
        diff2 = diff2[region]  # N×C
    if diff2.size == 0:
        return float("nan")
    mse = float(diff2.mean())
    return float("inf") if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def _box_mean(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over every w×w window that fits in x (H×W×C) -> (H−w+1)×(W−w+1)×C, via an integral image."""
    s = np.pad(x.cumsum(0).cumsum(1), ((1, 0), (1, 0), (0, 0)))
    return (s[w:, w:] - s[:-w, w:] - s[w:, :-w] + s[:-w, :-w]) / (w * w)


def ssim(a, b, region=None, data_range: float = 1.0, win_size: int = 7) -> float:
    """Mean SSIM as scikit-image computes it (see the module docstring); ``nan`` if no window centre is in region."""
    a, b = _pair(a, b)
    h, w = a.shape[:2]
    if win_size % 2 == 0 or win_size > min(h, w):
        raise ValueError(f"win_size {win_size} must be odd and fit in the {h}×{w} image")
    region = _region(region, a.shape)
    n = win_size * win_size
    cov_norm = n / (n - 1)  # sample covariance, as skimage's use_sample_covariance=True
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ux, uy = _box_mean(a, win_size), _box_mean(b, win_size)
    vx = cov_norm * (_box_mean(a * a, win_size) - ux * ux)
    vy = cov_norm * (_box_mean(b * b, win_size) - uy * uy)
    vxy = cov_norm * (_box_mean(a * b, win_size) - ux * uy)
    smap = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))  # (H−6)×(W−6)×C
    if region is not None:
        pad = (win_size - 1) // 2
        smap = smap[region[pad:h - pad, pad:w - pad]]  # window centres inside the region: N×C
    return float(smap.mean()) if smap.size else float("nan")


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def outline(image, tol: float = SUCCESS_RULE["tol"]) -> np.ndarray:
    """H×W bool: the pixels with a 4-neighbour more than ``tol`` away in L∞ over channels — in a flat render, the
    one-pixel band on each side of every colour boundary."""
    image = np.asarray(image, dtype=np.float64)
    image = image[..., None] if image.ndim == 2 else image
    out = np.zeros(image.shape[:2], dtype=bool)
    across = np.abs(np.diff(image, axis=0)).max(-1) > tol  # (H-1)×W: pixel (y, x) against (y+1, x)
    out[:-1] |= across
    out[1:] |= across
    along = np.abs(np.diff(image, axis=1)).max(-1) > tol  # H×(W-1): pixel (y, x) against (y, x+1)
    out[:, :-1] |= along
    out[:, 1:] |= along
    return out


def regions_kept(pred, target, regions: Sequence[np.ndarray], *, tol: float = SUCCESS_RULE["tol"],
                 min_fraction: float = SUCCESS_RULE["min_fraction"], min_pixels: int = 3) -> bool | None:
    """Does an edit leave each of `regions` (H×W bool: shapes it was not asked to touch) as the target has it? Each
    region's pixels off the target's ``outline`` must be ≥ ``min_fraction`` within ``tol`` — the numbers success
    asks inside the mask. Regions under ``min_pixels`` do not count; None without regions."""
    if not regions:
        return None
    pred, target = _pair(pred, target)
    close, rim = np.abs(pred - target).max(-1) <= tol, outline(target, tol)  # H×W each
    counted = [r & ~rim for r in regions]
    return all(close[r].mean() >= min_fraction for r in counted if r.sum() >= min_pixels)


def edit_scores(pred, target, source, mask=None, *, tol: float = SUCCESS_RULE["tol"],
                min_fraction: float = SUCCESS_RULE["min_fraction"], min_psnr_bg: float = SUCCESS_RULE["min_psnr_bg"],
                count_outline: bool = SUCCESS_RULE["count_outline"], lpips: bool = False) -> dict:
    """Per-sample scores of an edit ``pred`` against the exact ``target`` (see the module docstring for success).

    Keys: ``psnr_bg``, ``ssim_bg`` (outside the mask, or whole image without one), ``psnr_in``, ``mae_in`` (inside
    the mask; None without a mask or with an empty one), ``acc_in`` (fraction of edit-region pixels within ``tol``;
    None if that region is empty), ``acc_core`` (the same off the target's ``outline``; ``acc_in`` where the whole
    region is outline), ``success`` (bool) and, with ``lpips=True``, ``lpips_bg`` (None if unavailable).
    """
    source = _pair(source, target)[0]
    pred, target = _pair(pred, target)
    if mask is not None:
        mask = _region(mask, pred.shape)
        bg, edit_region = background(mask), mask
    else:
        bg, edit_region = None, np.abs(target - source).max(-1) > tol
    has_mask = mask is not None and bool(mask.any())
    out = {
        "psnr_bg": _none_if_nan(psnr(pred, target, bg)),
        "ssim_bg": _none_if_nan(ssim(pred, target, bg)),
        "psnr_in": psnr(pred, target, mask) if has_mask else None,
        "mae_in": float(np.abs(pred - target)[mask].mean()) if has_mask else None,
    }
    close = np.abs(pred - target).max(-1) <= tol  # H×W: L∞ over channels
    out["acc_in"] = float(close[edit_region].mean()) if edit_region.any() else None
    core = edit_region & ~outline(target, tol)
    out["acc_core"] = float(close[core].mean()) if core.any() else out["acc_in"]
    judged = out["acc_in"] if count_outline else out["acc_core"]
    inside_ok = judged is None or judged >= min_fraction
    out["success"] = bool(inside_ok and out["psnr_bg"] is not None and out["psnr_bg"] >= min_psnr_bg)
    if lpips:
        out["lpips_bg"] = lpips_distance(pred, target, bg)
    return out


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _kinds(rows: list[dict], skip: str) -> dict[str, str]:
    """Key -> "rate" (bool values) or "mean" (numbers), over all rows; other keys (ids, text) are left out."""
    kinds: dict[str, str] = {}
    for r in rows:
        for k, v in r.items():
            if k != skip and k not in kinds and v is not None:
                if isinstance(v, (bool, np.bool_)):
                    kinds[k] = "rate"
                elif _is_number(v):
                    kinds[k] = "mean"
    return kinds


def _stats(rows: list[dict], kinds: dict[str, str], inf_cap: float) -> dict:
    out: dict = {"count": len(rows)}
    for k, kind in kinds.items():
        values = [r.get(k) for r in rows]
        if kind == "rate":
            flags = [bool(v) for v in values if v is not None]
            out[f"{k}_rate"] = sum(flags) / len(flags) if flags else None
        else:
            nums = [min(float(v), inf_cap) for v in values if _is_number(v) and not math.isnan(v)]
            out[k] = sum(nums) / len(nums) if nums else None
    return out


def aggregate(rows: list[dict], by: str = "category", inf_cap: float = 100.0) -> dict:
    """Means per group (rows grouped by ``row[by]``, missing or None -> "(none)") and overall.

    Returns ``{"overall": stats, "groups": {name: stats}}``; every ``stats`` has the same keys: ``count`` (rows),
    the mean of every numeric key (None and NaN ignored, +inf — a PSNR of identical images — counted as
    ``inf_cap``; None if no value) and, for every bool key such as ``success``, ``<key>_rate`` (None ignored).
    Non-numeric keys (ids, text) are left out.
    """
    kinds = _kinds(rows, by)
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault("(none)" if r.get(by) is None else str(r[by]), []).append(r)
    return {"overall": _stats(rows, kinds, inf_cap),
            "groups": {g: _stats(groups[g], kinds, inf_cap) for g in sorted(groups)}}


def _as_chw(image) -> torch.Tensor:
    """One image (H×W×3 or 3×H×W, numpy or torch, [0, 1]) -> float32 3×H×W; the channel axis is the one of
    size 3."""
    x = torch.as_tensor(np.asarray(image) if not torch.is_tensor(image) else image).float()
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"expected an H×W×3 or 3×H×W image, got shape {tuple(x.shape)}")
    return x.permute(2, 0, 1) if x.shape[-1] == 3 else x


def _clip_pixels(images, size: int) -> torch.Tensor:
    """Images -> CLIP ``pixel_values`` B×3×size×size: shortest side to ``size``, centre crop, normalise."""
    out = []
    for image in images:
        x = _as_chw(image)[None]  # 1×3×H×W
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(x[..., top:top + size, left:left + size])
    x = torch.cat(out)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_features(output) -> torch.Tensor:
    """get_image_features / get_text_features output -> the embedding tensor, on every transformers version."""
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projected embedding
    return getattr(output, "pooler_output", output)


@torch.no_grad()
def clip_scores(model, processor_or_tokenizer, images: Sequence, texts: Sequence[str] | None,
                targets: Sequence | None, batch_size: int = 32) -> tuple[list, list]:
    """CLIP-I (vs ``targets``) and CLIPScore (vs ``texts``) per image with a transformers ``CLIPModel`` in eval mode.

    ``images``/``targets``: sequences of H×W×3 or 3×H×W float images in [0, 1] (a batched array works too);
    ``processor_or_tokenizer``: a ``CLIPProcessor`` (its tokenizer is used) or a tokenizer. ``texts`` or
    ``targets`` may be None; the matching list is then all None. CLIPScore uses the scale 100 (module docstring).
    """
    n = len(images)
    for name, other in (("texts", texts), ("targets", targets)):
        if other is not None and len(other) != n:
            raise ValueError(f"{name} has {len(other)} entries for {n} images")
    param = next(model.parameters())
    size = model.config.vision_config.image_size
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    max_len = model.config.text_config.max_position_embeddings

    def embed_images(batch) -> torch.Tensor:
        pixels = _clip_pixels(batch, size).to(param.device, param.dtype)
        return F.normalize(clip_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    clip_i, clip_s = [], []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        e = embed_images(images[start:stop])  # B×D, unit norm
        if targets is not None:
            clip_i += (e * embed_images(targets[start:stop])).sum(-1).tolist()
        if texts is not None:
            tok = tokenizer(list(texts[start:stop]), padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(param.device)
            t = clip_features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
            clip_s += (100.0 * (e * F.normalize(t.float(), dim=-1)).sum(-1).clamp(min=0)).tolist()
    return (clip_i if targets is not None else [None] * n), (clip_s if texts is not None else [None] * n)


_LPIPS_MODELS: dict = {}


def _lpips_model(net: str):
    if net not in _LPIPS_MODELS:
        import lpips  # optional dependency, imported only when asked for
        try:
            _LPIPS_MODELS[net] = lpips.LPIPS(net=net, spatial=True, verbose=False).eval()
        except (OSError, RuntimeError) as e:  # backbone weights missing and not downloadable (offline)
            warnings.warn(f"LPIPS unavailable ({e}); lpips scores are reported as None")
            _LPIPS_MODELS[net] = None
    return _LPIPS_MODELS[net]


@torch.no_grad()
def lpips_distance(a, b, region=None, net: str = "alex") -> float | None:
    """LPIPS between two H×W×3 images in [0, 1], averaged over ``region`` of its spatial map; None if unavailable."""
    if not LPIPS_AVAILABLE:
        return None
    model = _lpips_model(net)
    if model is None:
        return None
    a, b = _pair(a, b)
    region = _region(region, a.shape)
    x, y = (torch.from_numpy(2 * im - 1).float().permute(2, 0, 1)[None] for im in (a, b))  # 1×3×H×W in [-1, 1]
    dmap = model(x, y)[0, 0].numpy()  # H×W: spatial=True upsamples to the input size
    if region is not None:
        dmap = dmap[region]
    return float(dmap.mean()) if dmap.size else None
