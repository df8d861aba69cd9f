"""Writing a converted dataset: checked images, a manifest that is only ever complete under its final name, and a
rerun that skips what an earlier run wrote (see the package docstring for the layout and the choices)."""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import shutil

import numpy as np
from PIL import Image

from ..fsio import atomic_path, write_error, write_text
from ..errors import UserError
from . import Row

EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
MANIFEST = "manifest.jsonl"


class BadRow(Exception):
    """A row's reason to be skipped (a short, countable phrase)."""


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def edit_region(im: Image.Image) -> Image.Image:
    """A mask cell -> binary L (255 = the edit region). Three layouts occur: a binary mask (white = region); an
    RGBA copy of the image with the region erased (MagicBrush's release: transparent = region); the image with
    the region painted white (only pure white is the region: a bright photo pixel is not)."""
    if "A" in im.getbands() or "transparency" in im.info:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
        if (alpha < 128).any():
            return Image.fromarray(np.where(alpha < 128, 255, 0).astype(np.uint8), "L")
    rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    binary = ((rgb <= 16) | (rgb >= 239)).all() and (rgb.max(-1) - rgb.min(-1) <= 16).all()
    region = rgb.mean(-1) >= 128 if binary else rgb.min(-1) >= 250
    return Image.fromarray(np.where(region, 255, 0).astype(np.uint8), "L")


class Converter:
    def __init__(self, out: str, fmt: str, src: str, kind: str, max_skip_fraction: float = 0.1):
        self.out, self.kind, self.max_skip = out, kind, max_skip_fraction
        self.manifest = os.path.join(out, MANIFEST)
        self.partial = self.manifest + ".partial"
        self.on_fault = f"the rows converted so far are kept in {self.partial}: run the same command again to continue"
        self.report = os.path.join(out, "convert.json")
        self.info = {"format": fmt, "src": os.path.abspath(src)}
        self.kept = self.earlier = 0
        self.skipped = collections.Counter()
        self.examples = collections.defaultdict(list)  # reason -> first few (id, detail)
        self._start()

    # -- restart ---------------------------------------------------------------------------------------------------
    def _start(self) -> None:
        if os.path.isfile(self.report):
            try:
                with open(self.report) as f:
                    old = json.load(f)
            except (OSError, ValueError):
                old = {}
            if {k: old.get(k) for k in self.info} != self.info:
                raise UserError(f"{self.out} holds a {old.get('format')} conversion of {old.get('src')} — choose "
                                "another --out, or delete that folder to start again")
        os.makedirs(os.path.join(self.out, "images"), exist_ok=True)
        if os.path.isfile(self.manifest) and not os.path.isfile(self.partial):
            os.replace(self.manifest, self.partial)  # a rerun of a finished conversion: it becomes complete again
        # The earlier run's ids as sorted 64-bit hashes: 8 bytes a row whatever the dataset's size.
        self.done = np.sort(np.fromiter((_hash(k) for k in self._recover()), dtype=np.uint64))
        self.earlier = len(self.done)
        write_text(self.report, json.dumps(self.info | {"status": "running"}, indent=1))
        self.file = open(self.partial, "a", encoding="utf-8")

    def _recover(self):
        """Yield the ids in the partial manifest, cutting off a torn last line (a run killed mid-write)."""
        if not os.path.isfile(self.partial):
            return
        good = 0
        with open(self.partial, "rb") as f:
            for line in f:
                try:
                    key = json.loads(line)["id"] if line.endswith(b"\n") else None
                except (ValueError, KeyError, TypeError):
                    key = None
                if key is None:
                    break
                good += len(line)
                yield key
        with open(self.partial, "r+b") as f:
            f.truncate(good)

    def _was_done(self, key: str) -> bool:
        h = np.uint64(_hash(key))
        i = np.searchsorted(self.done, h)
        return bool(i < len(self.done) and self.done[i] == h)

    # -- rows ------------------------------------------------------------------------------------------------------
    def add(self, row: Row) -> None:
        if self.earlier and self._was_done(row.key):
            return
        try:
            if row.skip:
                raise BadRow(row.skip)
            paths = {}
            for field, data in row.images.items():
                if data is None and field == "mask":
                    continue  # no mask: the whole image may change
                if data is None:
                    raise BadRow(f"missing {field} image")
                paths[field] = self._image(row.key, field, data)
        except BadRow as e:
            reason, _, detail = str(e).partition(": ")
            self.skipped[reason] += 1
            if len(self.examples[reason]) < 5:
                self.examples[reason].append([row.key, detail])
            return
        try:  # a line cut short by a fault is cut off by the rerun's _recover
            self.file.write(json.dumps(paths | row.fields | {"id": row.key}, ensure_ascii=False) + "\n")
            self.file.flush()
        except OSError as e:
            raise write_error(e, self.partial, kept=self.on_fault) from None
        self.kept += 1

    def _image(self, key: str, field: str, data) -> str:
        """Check that `data` (bytes or a path) decodes; write it under images/; its path relative to out."""
        try:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
                im.load()
                fmt = im.format
                mask = edit_region(im) if field == "mask" else None
        except Exception as e:  # noqa: BLE001 — PIL raises many types for a corrupt or truncated image
            raise BadRow(f"corrupt {field} image: {str(e)[:120]}") from None
        sub = hashlib.sha1(key.encode()).hexdigest()[:2]  # 256 folders: no folder of millions of files
        ext = ".png" if mask is not None else EXT.get(fmt, "." + fmt.lower())
        rel = os.path.join("images", sub, f"{key}-{field}{ext}")
        path = os.path.join(self.out, rel)
        # No fsync (millions of images): the manifest row, written after, is what commits the file.
        with atomic_path(path, durable=False, kept=self.on_fault) as tmp:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if mask is not None:
                mask.save(tmp, format="PNG")
            elif isinstance(data, bytes):
                with open(tmp, "wb") as f:
                    f.write(data)
            else:
                try:
                    os.link(data, tmp)  # same filesystem: no copy
                except OSError:
                    shutil.copyfile(data, tmp)
        return rel

    # -- the end ---------------------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Rename the manifest into place when the run is good; else leave it partial and raise UserError."""
        self.file.close()
        seen = self.kept + sum(self.skipped.values())
        summary = self.info | {"kept": self.kept + self.earlier, "kept_earlier": self.earlier,
                               "skipped": dict(self.skipped), "skipped_examples": dict(self.examples)}
        total_kept = self.kept + self.earlier
        bad = sum(self.skipped.values())
        failure = None
        if total_kept == 0:
            failure = "no row was kept"
        elif seen and bad > self.max_skip * (seen + self.earlier):
            failure = f"{bad} of {seen + self.earlier} rows were skipped, above --max-skip-fraction {self.max_skip}"
        if failure:
            write_text(self.report, json.dumps(summary | {"status": "failed"}, indent=1))
            first = ", ".join(f"{r} ({n})" for r, n in self.skipped.most_common(3)) or "-"
            raise UserError(f"{failure} ({first}; see {self.report}) — check SRC and FORMAT, or raise "
                            f"--max-skip-fraction; {os.path.basename(self.partial)} is kept for a rerun")
        os.replace(self.partial, self.manifest)
        summary |= {"status": "done", "manifest": self.manifest}
        write_text(self.report, json.dumps(summary, indent=1))
        return summary
