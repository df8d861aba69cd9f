"""Readers for data already on disk as files: the diffusers InstructPix2Pix example's imagefolder
(metadata.jsonl), and stage-1 caption pairs (a CC3M/CC12M-style TSV, or a folder of `name.jpg` + `name.txt`).

Paths in metadata.jsonl and in a TSV are relative to the file's folder (absolute ones are kept). Rows are read
line by line and folders walked one directory at a time, so memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from ..errors import UserError
from . import Row

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SOURCE_KEYS = ("original_image", "input_image", "file_name")  # the diffusers example's column, then HF's
IMAGE_COLS = ("image", "file_name", "filepath", "file", "path", "url", "image_url")
CAPTION_COLS = ("caption", "text", "alt", "title")


def _file(root: str, rel) -> str | None:
    """The file `rel` names (relative to root), or None when it is missing."""
    if not isinstance(rel, str) or not rel.strip():
        return None
    path = os.path.join(root, rel)
    return path if os.path.isfile(path) else None


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_imagefolder(src: str):
    meta = os.path.join(src, "metadata.jsonl")
    if not os.path.isfile(meta):
        raise UserError(f"{src} has no metadata.jsonl — an imagefolder is a folder with the images and a "
                        "metadata.jsonl of {\"original_image\", \"edited_image\", \"edit_prompt\"} rows")

    def gen():
        with open(meta, encoding="utf-8", errors="replace") as f:
            for no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                key = f"meta-{no:07d}"
                try:
                    v = json.loads(line)
                except json.JSONDecodeError:
                    yield Row(key, {}, {}, "metadata line is not valid JSON")
                    continue
                if not isinstance(v, dict):
                    yield Row(key, {}, {}, "metadata line is not a JSON object")
                    continue
                source = next((v[k] for k in SOURCE_KEYS if v.get(k)), None)
                instruction = v.get("edit_prompt").strip() if isinstance(v.get("edit_prompt"), str) else ""
                images = {"source": _file(src, source), "target": _file(src, v.get("edited_image"))}
                yield Row(key, {"instruction": instruction}, images, None if instruction else "empty instruction")

    return _count_lines(meta), gen()


def read_captions(src: str):
    if os.path.isfile(src):
        with open(src, encoding="utf-8", errors="replace") as f:
            header = f.readline().rstrip("\r\n").split("\t")
        columns = _columns(header, src)  # fails here, before anything is written
        return _count_lines(src) - columns[2], _tsv(src, *columns)
    if os.path.isdir(src):
        return None, _caption_folder(src)
    raise UserError(f"{src} not found — point SRC at a .tsv of image paths and captions, or a folder of "
                    "image + .txt pairs")


def _columns(header: list[str], path: str) -> tuple[int, int, bool]:
    """(image column, caption column, whether the first line is a header)."""
    low = [h.strip().lower() for h in header]
    img = next((low.index(c) for c in IMAGE_COLS if c in low), None)
    cap = next((low.index(c) for c in CAPTION_COLS if c in low), None)
    if img is not None and cap is not None:
        return img, cap, True
    if len(header) == 2:  # headerless: CC3M is caption<TAB>url, CC12M url<TAB>caption
        looks = [bool(re.match(r"^(https?://|/|\.)", h.strip())) or h.strip().lower().endswith(IMAGE_EXTS)
                 for h in header]
        if looks[0] != looks[1]:
            return (0, 1, False) if looks[0] else (1, 0, False)
    raise UserError(f"{path}: cannot tell the image and caption columns — add a header row naming them "
                    f"(image: one of {', '.join(IMAGE_COLS)}; caption: one of {', '.join(CAPTION_COLS)})")


def _tsv(path: str, img: int, cap: int, header: bool):
    root = os.path.dirname(os.path.abspath(path))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])
    with open(path, encoding="utf-8", errors="replace") as f:
        if header:
            f.readline()
        for no, line in enumerate(f, start=2 if header else 1):
            cells = line.rstrip("\r\n").split("\t")
            key = f"{stem}-{no:07d}"
            if len(cells) <= max(img, cap):
                if any(c.strip() for c in cells):
                    yield Row(key, {}, {}, "fewer columns than the header")
                continue
            ref, caption = cells[img].strip(), cells[cap].strip()
            if re.match(r"^https?://", ref):
                yield Row(key, {}, {}, "remote URL: download the images first (e.g. with img2dataset)")
                continue
            yield Row(key, {"caption": caption}, {"image": _file(root, ref)}, None if caption else "empty caption")


def _caption_folder(src: str):
    for root, dirs, files in os.walk(src):
        dirs.sort()
        names = set(files)
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            rel = os.path.relpath(os.path.join(root, stem), src)
            # A readable key, plus a hash of the path so "a b" and "a_b" cannot collide.
            key = re.sub(r"[^A-Za-z0-9._-]", "_", rel)[-80:] + "-" + hashlib.sha1(rel.encode()).hexdigest()[:8]
            if stem + ".txt" not in names:
                yield Row(key, {}, {}, "no caption file (.txt beside the image)")
                continue
            with open(os.path.join(root, stem + ".txt"), encoding="utf-8", errors="replace") as f:
                caption = " ".join(f.read().split())
            yield Row(key, {"caption": caption}, {"image": os.path.join(root, name)},
                      None if caption else "empty caption")
