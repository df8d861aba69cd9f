"""Readers for the parquet-sharded editing datasets: InstructPix2Pix, MagicBrush, UltraEdit.

Streaming: one shard at a time, `BATCH` rows at a time (pyarrow reads by row group underneath), only the columns
used; memory stays constant whatever the dataset's size. Every shard's footer is read (and its columns checked)
before the first row, so a wrong file fails before anything is written.
"""
from __future__ import annotations

import glob
import os
import re

from ..errors import UserError
from . import Row

BATCH = 16


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading parquet needs pyarrow, which is an optional extra — "
                        "python3 -m pip install pyarrow") from None
    return pq


def shards(src: str) -> list[str]:
    """The parquet files of SRC: the file itself, every *.parquet below the folder, or a glob's matches
    ('data/train-*.parquet': one split of a dataset whose splits share a folder), sorted."""
    if os.path.isfile(src):
        return [src]
    if any(c in src for c in "*?[") and (found := sorted(p for p in glob.glob(src) if os.path.isfile(p))):
        return found
    if os.path.isdir(src):
        found = sorted(os.path.join(r, f) for r, _, fs in os.walk(src) for f in fs if f.endswith(".parquet"))
        if not found:
            raise UserError(f"{src} holds no .parquet file — point SRC at a parquet shard or the folder of shards")
        return found
    raise UserError(f"{src} not found — point SRC at a parquet shard or the folder of shards")


def check_shards(src: str, columns: dict[str, tuple]) -> list[tuple[str, int, dict]]:
    """[(path, rows, {field: column name found})] from each shard's footer (files are closed again: a dataset may
    have more shards than a process may hold open); `columns` maps a field to its accepted column names (first
    present wins; a trailing "?" marks the field optional)."""
    pq = _pyarrow()
    out = []
    for path in shards(src):
        try:
            meta = pq.read_metadata(path)
            names = set(meta.schema.to_arrow_schema().names)
        except Exception as e:  # noqa: BLE001 — pyarrow raises ArrowInvalid / OSError for a non-parquet file
            raise UserError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}) — "
                            "check SRC, or re-download the shard") from None
        found, missing = {}, []
        for field, accepted in columns.items():
            hit = next((c for c in accepted if c in names), None)
            if hit:
                found[field] = hit
            elif accepted[-1] != "?":
                missing.append(" or ".join(accepted))
        if missing:
            raise UserError(f"{path} has no column {', '.join(missing)} (it has: {', '.join(sorted(names))}) — "
                            "is this the right FORMAT for this dataset?")
        out.append((path, meta.num_rows, found))
    return out


def image_cell(cell):
    """An HF image struct {"bytes", "path"} or raw bytes -> bytes, or None when the cell holds no image."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    return bytes(cell) if isinstance(cell, (bytes, bytearray, memoryview)) and len(cell) else None


def _rows(src: str, columns: dict[str, tuple]):
    """-> (total rows, iterator of (key, {field: value})) over every shard, in order."""
    checked = check_shards(src, columns)
    pq = _pyarrow()

    def gen():
        for path, _, found in checked:
            stem = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.splitext(os.path.basename(path))[0])
            i = 0
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=BATCH, columns=list(dict.fromkeys(found.values()))):
                    data = {field: batch.column(col).to_pylist() for field, col in found.items()}
                    for j in range(batch.num_rows):
                        yield f"{stem}-{i:07d}", {field: values[j] for field, values in data.items()}
                        i += 1

    return sum(n for _, n, _ in checked), gen()


def _text(value) -> str:
    return value.strip() if isinstance(value, str) else ""


# field -> accepted column names (first present wins; "?" = optional). Images: source / target / mask; text:
# instruction; every other field is kept in the manifest row as it is (captions, MagicBrush's chain and turn).
COLUMNS = {
    "ip2p": {"source": ("original_image",), "target": ("edited_image",), "instruction": ("edit_prompt",),
             "source_caption": ("original_prompt", "?"), "target_caption": ("edited_prompt", "?")},
    "magicbrush": {"source": ("source_img",), "target": ("target_img",), "mask": ("mask_img", "?"),
                   "instruction": ("instruction",), "chain": ("img_id",), "turn_index": ("turn_index",)},
    "ultraedit": {"source": ("source_image",), "target": ("edited_image", "target_image"),
                  "mask": ("mask_image", "?"), "instruction": ("edit_prompt",),
                  "source_caption": ("source_caption", "?"), "target_caption": ("target_caption", "?")},
}
IMAGES = ("source", "target", "mask")


def read(fmt: str, src: str):
    """-> (total rows, iterator of Row) for one of COLUMNS' formats."""
    total, rows = _rows(src, COLUMNS[fmt])

    def to_row(key, v):
        images = {f: image_cell(v[f]) for f in IMAGES if f in v}
        instruction = _text(v["instruction"])
        fields = {"instruction": instruction}
        for f, x in v.items():
            if f not in IMAGES and f != "instruction" and x not in (None, ""):
                fields[f] = str(x).strip() if f != "turn_index" else int(x)
        return Row(key, fields, images, None if instruction else "empty instruction")

    return total, (to_row(k, v) for k, v in rows)
