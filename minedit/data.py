"""Editing and caption data: JSONL manifests, robust image loading, aligned transforms (DESIGN §9).

Manifest: one JSON object per line, blank lines ignored, paths relative to the manifest's folder.
    edit rows     {"source", "target", "instruction", "mask"?, "optimized_instruction"?, "category"?, "kind"?, ...}
    caption rows  {"image", "caption", ...}
    infer rows    {"source", "instruction", "mask"?, ...}   (read_manifest only: batch editing without targets)
Extra fields are kept. A bad row (not JSON, not an object, missing or empty field, file not found) is collected
as (line number, reason): never dropped silently. Each row gets "_line" (its 1-based line number);
EditDataset adds "_manifest", keeps `bad` as (line, reason, manifest) triples and warns with the count.
Reading a manifest checks that files exist, not that they decode: an unreadable image raises DataError naming
the manifest and line when the item is loaded.

Choices the design left open:
  * Mixing manifests: the dataset is their concatenation; `sample_weights()` gives item i of manifest k the weight
    w_k / len(manifest k), so with `WeightedRandomSampler` each manifest is drawn in proportion to w_k whatever its
    size. The bad-row limit applies to each manifest on its own, so a small broken file is not hidden by a big one.
  * Geometry: target and mask are first brought to the source's size if they differ (with a warning), then all
    three get one transform: shorter side to R (bicubic for images, nearest for the mask), centre crop R x R,
    and one horizontal flip decided by a generator seeded from (seed, index, epoch).
  * A flip mirrors left and right, so a sample whose texts say "left"/"right" (or "leftmost", ...) is never
    flipped: the instruction would become false ("remove the left square").
  * Masks are read as luminance and thresholded at 128 (>= 128 -> edit region); no mask means all ones.
  * Integer ("I", "I;16") images are taken as 16-bit and scaled by 1/257; transparency is composited on white.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .errors import UserError

MAX_PIXELS = 64_000_000
FIELDS = {"edit": ("source", "target", "instruction"), "caption": ("image", "caption"),
          "infer": ("source", "instruction")}
PATH_FIELDS = {"edit": ("source", "target", "mask"), "caption": ("image",), "infer": ("source", "mask")}
_SIDEDNESS = re.compile(r"\b(left|right)", re.IGNORECASE)
_warned_resize = False


class DataError(UserError):
    """Unusable data: a missing/empty manifest, an unreadable image, too many bad rows."""


def read_manifest(path, kind: str = "edit") -> tuple[list[dict], list[tuple[int, str]]]:
    """(good rows with paths resolved against the manifest's folder, [(line number, reason)] of bad rows)."""
    if kind not in FIELDS:
        raise ValueError(f"kind must be one of {list(FIELDS)}, got {kind!r}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} {'is a directory' if path.is_dir() else 'not found'} — check the path, "
                        f"or write one with `python -m minedit.toy --out DIR`")
    rows, bad = [], []
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read manifest {path} ({e.strerror}) — check its permissions") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"manifest {path} is UTF-16 (as some Windows editors save) — save it as UTF-8")
    # Editors and spreadsheets: a UTF-8 byte-order mark, CRLF or CR line ends, no final newline are all fine.
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()
    for no, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:  # a row, not the whole manifest: reported by line number like any bad row
            bad.append((no, "not valid UTF-8"))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((no, f"not valid JSON ({e.msg})"))
            continue
        if not isinstance(row, dict):
            bad.append((no, f"not a JSON object but {type(row).__name__}"))
            continue
        reason = _check(row, kind, path.parent)
        if reason:
            bad.append((no, reason))
        else:
            rows.append(row | {"_line": no})
    if not rows and not bad:
        raise DataError(f"manifest {path} is empty — add one JSON object per line "
                        f"({', '.join(FIELDS[kind])} for {kind} rows)")
    return rows, bad


def _check(row: dict, kind: str, root: Path) -> str | None:
    """Validate the row in place (resolving its paths); the reason it is bad, or None."""
    for f in FIELDS[kind]:
        if f not in row:
            return f"missing field '{f}'"
        if not isinstance(row[f], str) or not row[f].strip():
            return f"empty {f}" if isinstance(row[f], str) else f"field '{f}' is not a string"
    if "mask" in PATH_FIELDS[kind] and row.get("mask") is not None and not isinstance(row["mask"], str):
        return "field 'mask' is not a string"
    for f in PATH_FIELDS[kind]:
        if row.get(f) is not None:
            row[f] = str(root / row[f])  # an absolute path stays as it is
            if not Path(row[f]).is_file():
                return f"{f} file not found: {row[f]}"
    return None


def _open(path, max_pixels: int) -> Image.Image:
    """Open, fully decode and upright an image; every failure becomes one DataError."""
    fix = "check the file, re-export it, or remove its row"
    p = Path(path)
    if not p.is_file():
        raise DataError(f"cannot read image {path}: {'is a directory' if p.is_dir() else 'no such file'} — {fix}")
    if p.stat().st_size == 0:
        raise DataError(f"cannot read image {path}: the file is empty (0 bytes) — {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's own limit becomes ours
            with Image.open(p) as im:
                if im.width * im.height > max_pixels:
                    raise DataError(f"cannot read image {path}: {im.width}x{im.height} is above the limit of "
                                    f"{max_pixels} pixels — downscale it or raise max_pixels")
                im.load()
                return ImageOps.exif_transpose(im)
    except DataError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: above the pixel limit ({e}; minedit's limit is {max_pixels} "
                        "pixels) — downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels") from None
    except (OSError, SyntaxError, ValueError) as e:  # unidentified, truncated, corrupt
        raise DataError(f"cannot read image {path}: {e} — {fix}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im, dtype=np.float64) / 257.0  # 16-bit range onto 0..255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":  # float images (TIFF, EXR-like exports): [0, 1] when the maximum says so, else 0..255
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return im


def _convert(im: Image.Image, mode: str, path) -> Image.Image:
    """im.convert(mode), going through RGB when PIL has no direct conversion (LAB -> L); DataError if none."""
    try:
        return im.convert(mode)
    except (ValueError, OSError):
        pass
    try:
        return im.convert("RGB").convert(mode)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read image {path}: mode {im.mode} ({e}) — re-export it as RGB") from None


def load_image(path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any readable image as upright 8-bit RGB (transparency composited on white); DataError otherwise."""
    im = _to_8bit(_open(path, max_pixels))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = _convert(im, "RGBA", path)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return _convert(im, "RGB", path)


def load_mask(path, size, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Mask as L in {0, 255} (luminance >= 128 -> 255) at `size` (w, h) or an int side; nearest resize."""
    global _warned_resize
    size = (size, size) if isinstance(size, int) else tuple(size)
    im = _convert(_to_8bit(_open(path, max_pixels)), "L", path)
    if im.size != size:
        if not _warned_resize:
            warnings.warn(f"mask {path} is {im.size}, not {size}: resized with nearest (warned once)")
            _warned_resize = True
        im = im.resize(size, Image.NEAREST)
    return im.point(lambda v: 255 if v >= 128 else 0)


def _resize_crop(im: Image.Image, r: int, resample) -> Image.Image:
    """Shorter side to r, then the centre r x r."""
    w, h = im.size
    if (w, h) == (r, r):
        return im
    s = r / min(w, h)
    nw, nh = max(r, round(w * s)), max(r, round(h * s))
    im = im.resize((nw, nh), resample)
    left, top = (nw - r) // 2, (nh - r) // 2
    return im.crop((left, top, left + r, top + r))


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL -> 3×H×W float in [-1, 1] (the model's image convention; infer.py uses it too)."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


class EditDataset(Dataset):
    """Editing triples (kind="edit") or image-caption pairs (kind="caption") from one or more weighted manifests."""

    def __init__(self, manifests, resolution: int, random_flip: bool = True, kind: str = "edit",
                 max_bad_fraction: float = 0.1, seed: int = 0):
        if isinstance(manifests, (str, Path)):
            manifests = [(manifests, 1.0)]
        if kind not in ("edit", "caption"):
            raise ValueError(f"kind must be 'edit' or 'caption', got {kind!r}")
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution, self.random_flip, self.kind, self.seed, self.epoch = resolution, random_flip, kind, seed, 0
        self.rows, self.bad, self._weights = [], [], []
        for entry in manifests:
            path, weight = (entry, 1.0) if isinstance(entry, (str, Path)) else entry
            if not (math.isfinite(weight) and weight > 0):
                raise DataError(f"manifest {path} has weight {weight} — weights must be positive numbers")
            rows, bad = read_manifest(path, kind)
            self.bad += [(no, why, str(path)) for no, why in bad]
            if bad and len(bad) > max_bad_fraction * (len(rows) + len(bad)):
                first = ", ".join(f"line {no} ({why})" for no, why in bad[:3])
                raise DataError(f"manifest {path}: {len(bad)} of {len(rows) + len(bad)} rows are bad, above "
                                f"max_bad_fraction={max_bad_fraction}: {first} — fix those rows or raise the limit")
            if not rows:
                raise DataError(f"manifest {path} has no usable rows ({len(bad)} bad, first: line {bad[0][0]}, "
                                f"{bad[0][1]}) — fix the rows or drop the manifest")
            if bad:
                warnings.warn(f"manifest {path}: skipped {len(bad)} bad rows (first: line {bad[0][0]}, "
                              f"{bad[0][1]}); see dataset.bad")
            self.rows += [r | {"_manifest": str(path)} for r in rows]
            self._weights += [weight / len(rows)] * len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Choose the flips of this epoch: each flip depends on (seed, index, epoch) only. Call it before the
        epoch's DataLoader iterator is made (persistent workers keep the copy they were started with)."""
        self.epoch = epoch

    def sample_weights(self) -> list[float]:
        """Per-item weights for WeightedRandomSampler: manifest k is drawn in proportion to its weight w_k."""
        return list(self._weights)

    def _flip(self, index: int, epoch: int, texts: list[str]) -> bool:
        if not self.random_flip or any(_SIDEDNESS.search(t) for t in texts):
            return False
        return bool(np.random.default_rng([self.seed, index, epoch]).random() < 0.5)

    def _load(self, row: dict, fn, *args):
        try:
            return fn(*args)
        except DataError as e:
            raise DataError(f"{row['_manifest']} line {row['_line']}: {e}") from None

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`dataset[i]` uses the epoch of `set_epoch`; `dataset[i, epoch]` names it (the trainer's sampler does, so
        a flip never depends on which worker process loads the item)."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        row, r = self.rows[index], self.resolution
        if self.kind == "caption":
            image = _resize_crop(self._load(row, load_image, row["image"]), r, Image.BICUBIC)
            t = to_tensor(image)
            if self._flip(index, epoch, [row["caption"]]):
                t = t.flip(-1)
            return {"image": t, "caption": row["caption"], "index": index}
        source = self._load(row, load_image, row["source"])
        target = self._load(row, load_image, row["target"])
        if target.size != source.size:
            warnings.warn(f"target {row['target']} is {target.size}, source is {source.size}: target resized")
            target = target.resize(source.size, Image.BICUBIC)
        mask = self._load(row, load_mask, row["mask"], source.size) if row.get("mask") else None
        # One geometry for all three: same resize/crop here, same flip below.
        src, tgt = (to_tensor(_resize_crop(im, r, Image.BICUBIC)) for im in (source, target))
        if mask is None:
            m = torch.ones(1, r, r)
        else:
            m = torch.from_numpy(np.asarray(_resize_crop(mask, r, Image.NEAREST)) >= 128).float()[None]
        optimized, caption = row.get("optimized_instruction") or "", row.get("target_caption") or ""
        if self._flip(index, epoch, [row["instruction"], optimized]):
            src, tgt, m = src.flip(-1), tgt.flip(-1), m.flip(-1)
            caption = "" if _SIDEDNESS.search(caption) else caption  # a mirrored target no longer fits its "left"
        return {"source": src, "target": tgt, "mask": m, "instruction": row["instruction"],
                "optimized_instruction": optimized, "target_caption": caption, "category": row.get("category") or "",
                "index": index}


def collate(batch: list[dict]) -> dict:
    """Stack tensors (B x ...), ints to a tensor, everything else (strings) into lists."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], int):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
