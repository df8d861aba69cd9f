"""The runner: every input through steps 1-5, its files and rows written before the next input starts.

`Pipeline` holds the five steps as parts that can be swapped (real models, the toy oracle, or fixed answers in
the tests): `describe(id, image) -> (caption, objects, how)`, `masker(id, image, objects, tally)`,
`editor_for(id) -> editor`, the MLLM that rewrites instructions, and an optional quality filter.

Faults: an input that cannot be read is a counted skip ("unreadable image"); a model that fails on one input
(an exception inside a model call) is a counted skip too, its traceback appended to OUT/errors.log, so one odd
image does not end a run of millions; a `UserError` (a judge that cannot be reached, ...) stops the run with one
`error:` line, and what was written stays (a rerun continues).
"""
from __future__ import annotations

import re
import traceback
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ..data import load_image
from ..errors import UserError
from .edits import make_pairs
from .manifest import Output, Tally, save_image
from .masks import check_mask
from .recaption import recaption

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
KINDS = ("remove", "add", "replace")


def list_images(folder) -> list[tuple[str, Path]]:
    """[(id, path)] of the image files under a folder, sorted; the id is the path relative to the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--images {folder} is not a folder — pass the folder that holds the source images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images {folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) — "
                        "check the folder")
    return [(p.relative_to(root).as_posix(), p) for p in files]


def file_stem(image_id: str) -> str:
    """A file-name-safe, collision-free stem for an input id."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(image_id).with_suffix("").as_posix())[-60:]
    return f"{base}-{zlib.crc32(image_id.encode()):08x}"


def toy_masker(oracle, min_area: float, max_area: float):
    """Step 2 on toy scenes: the oracle's exact masks, held to the same area thresholds as SAM's."""
    def masker(image_id, image, objects, tally):
        kept = []
        for obj in objects:
            mask = oracle.mask(image_id, obj)
            if (why := check_mask(mask, min_area, max_area)) is not None:
                tally.drop("masks", why)
                continue
            tally.keep("masks")
            kept.append((obj, mask, {"oracle": True}))
        return kept
    return masker


class Pipeline:
    def __init__(self, describe, masker, editor_for, mllm, quality=None, kinds=KINDS, reasoning=True, seed=0):
        self.describe, self.masker, self.editor_for, self.mllm = describe, masker, editor_for, mllm
        self.quality, self.kinds, self.reasoning, self.seed = quality, tuple(kinds), reasoning, seed

    def process(self, image_id: str, image: Image.Image, out: Output) -> tuple[dict, Tally]:
        """Steps 1-5 for one input: ({"manifest.jsonl": rows, ...}, its tally); writes its image files."""
        tally, rows = Tally(), {"manifest.jsonl": [], "dropped.jsonl": [], "captions.jsonl": []}
        tally.keep("inputs")
        stem = file_stem(image_id)
        src_path, src_rel = out.path(f"{stem}.png")
        caption, objects, how = self.describe(image_id, image)
        if caption or objects:
            save_image(image, src_path)
        if caption:
            rows["captions.jsonl"].append({"image": src_rel, "caption": caption})
        if not objects:
            tally.drop("objects", how)
            return rows, tally
        tally.keep("objects", "JSON repaired" if how == "repaired" else None)
        tally.note("objects", "objects listed", len(objects))
        id_seed = zlib.crc32(image_id.encode())
        for k, (obj, mask, info) in enumerate(self.masker(image_id, image, objects, tally)):
            seed = (self.seed * 1_000_003 + id_seed * 31 + k) % 2**31
            mask_path, mask_rel = out.path(f"{stem}_o{k}_mask.png")
            save_image(Image.fromarray(mask.astype(np.uint8) * 255, "L"), mask_path)
            for pair in make_pairs(image, obj, mask, self.editor_for(image_id), seed, self.kinds, tally):
                row = self._row(pair, image, mask_rel, src_rel, f"{stem}_o{k}", caption, info, seed, tally, out)
                rows["manifest.jsonl" if row.get("drop_reason") is None else "dropped.jsonl"].append(row)
        return rows, tally

    def _save_target(self, pair, out, name) -> str:
        """Write the edited image of a pair once (removal and addition share it) and return its relative path."""
        if "_path" not in pair:
            image = pair["target"] if pair["kind"] != "add" else pair["source"]
            path, pair["_path"] = out.path(f"{name}_{'replace' if pair['kind'] == 'replace' else 'removed'}.png")
            save_image(image, path)
        return pair["_path"]

    def _row(self, pair, image, mask_rel, src_rel, name, caption, info, seed, tally, out) -> dict:
        edited = self._save_target(pair, out, name)
        source, target = (src_rel, edited) if pair["kind"] != "add" else (edited, src_rel)
        rng = np.random.default_rng([seed, KINDS.index(pair["kind"])])
        texts = recaption(pair, image, self.mllm, rng, tally, self.reasoning)
        row = {"source": source, "target": target, "mask": mask_rel, **texts, "kind": pair["kind"],
               "object": pair["object"]["simple"], "object_detailed": pair["object"]["detailed"],
               **({"new_object": pair["new"]} if "new" in pair else {}), "caption": caption, "detection": info,
               "scores": None}
        if self.quality is not None:
            reason, row["scores"] = self.quality(pair["source"], pair["target"], texts["instruction"])
            if reason is not None:
                tally.drop("quality", reason)
                return row | {"drop_reason": reason}
            tally.keep("quality")
        tally.keep("written", pair["kind"])
        return row


def run(pipeline: Pipeline, inputs, out: Output, progress: bool = True, log=print) -> Tally:
    """Process the inputs not yet done. `inputs`: [(id, PIL image or path)]."""
    from tqdm import tqdm

    todo = [(i, x) for i, x in inputs if i not in out.done]
    bar = tqdm(todo, total=len(inputs), initial=len(inputs) - len(todo), desc="datagen", unit="image",
               disable=not progress, dynamic_ncols=True)
    for image_id, item in bar:
        tally = Tally()
        try:
            image = item if isinstance(item, Image.Image) else load_image(item)
        except UserError:
            tally.drop("inputs", "unreadable image")
            out.finish(image_id, {}, tally)
            continue
        try:
            rows, tally = pipeline.process(image_id, image, out)
        except UserError:
            raise
        except Exception as e:  # one odd input must not end the run: counted, its traceback kept
            with open(out.root / "errors.log", "a") as f:
                f.write(f"--- {image_id}\n{traceback.format_exc()}\n")
            tally = Tally()
            tally.drop("inputs", f"a model failed on it ({type(e).__name__}; see errors.log)")
            rows = {}
        out.finish(image_id, rows, tally)
        bar.set_postfix(pairs=sum(out.tally.counts["written"].values()))
    return out.tally
