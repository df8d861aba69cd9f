"""Public editing and caption datasets -> minedit manifests (issue 18 §1).

    python -m minedit.datasets FORMAT SRC --out DIR [--limit N] [--max-skip-fraction F]

writes DIR/images/ and DIR/manifest.jsonl in the format minedit.data reads (`train.py --data DIR/manifest.jsonl`,
`evaluate.py --data ...`), plus DIR/convert.json (what was read, rows kept, rows skipped by reason with examples).

FORMAT      SRC                                 columns / files read              manifest row
ip2p        parquet file, folder or glob        original_prompt, original_image,  edit row; source_caption,
                                                edit_prompt, edited_prompt,       target_caption
                                                edited_image
magicbrush  parquet file, folder or glob        img_id, turn_index, source_img,   edit row + mask; chain (= img_id),
                                                mask_img, instruction, target_img turn_index
ultraedit   parquet file, folder or glob        source_image, mask_image,         edit row (+ mask when present);
                                                source_caption, target_caption,   source_caption, target_caption
                                                edit_prompt, edited_image
imagefolder folder with metadata.jsonl          original_image (or file_name),    edit row
            (the diffusers InstructPix2Pix      edited_image, edit_prompt; paths
            example's convention)               relative to the folder
captions    a .tsv file, or a folder of         TSV: a header naming an image     caption row (stage 1)
            `name.jpg` + `name.txt`             column (image/file_name/path/...)
                                                and a caption column (caption/text)

Parquet image cells are HF `datasets` image structs {"bytes": ..., "path": ...} (raw bytes are accepted too).
Every row gets "id" (its shard and row number, or its line / file): the key that makes a rerun skip it.

Choices:
  * Images keep their encoded bytes (no re-encoding: no quality lost, no time spent); each is fully decoded once
    to check it. Masks are re-encoded as binary PNG (255 = the edit region), the convention
    minedit.data.load_mask reads, from any of the layouts mask cells come in (writer.edit_region): a binary mask
    (white = region, as MagicBrush's card says), an RGBA copy of the image with the region erased (MagicBrush's
    original release: transparent = region), or the image with the region painted pure white. A missing mask
    (None) keeps the row unmasked (minedit then edits the whole image); a corrupt one skips the row.
  * MagicBrush turns >= 2 already hold the previous turn's output as their source; the row keeps `turn_index`
    and `chain` (MagicBrush's img_id) so an evaluation can follow a chain.
  * Restartable without duplicates: images are written to a temporary name and renamed; the manifest grows as
    DIR/manifest.jsonl.partial (one line appended and flushed per kept row) and is renamed to manifest.jsonl
    only when the whole source has been read. A rerun reads the partial (or finished) manifest's ids (kept as
    sorted 64-bit hashes: 8 bytes a row, 32 MB for UltraEdit's 4 M), drops a torn last line, and skips those
    rows without decoding them; rows skipped as bad are looked at again. So a manifest.jsonl is always complete.
    A rerun into the same DIR with another FORMAT or SRC is refused (convert.json records them).
  * A bad row (corrupt or missing image, empty text) is skipped and counted with its reason; the run fails
    (exit 2, the partial manifest left as it is) when more than --max-skip-fraction of the rows read were
    skipped (default 0.1, as minedit.data's max_bad_fraction) or none was kept. Structural faults — a missing
    column, a file that is not parquet, an unknown format, pyarrow missing — fail before anything is written.
  * Imagefolder and caption images are hard-linked into DIR/images/ when on the same filesystem, else copied,
    so DIR is self-contained either way. A remote URL in a TSV is skipped ("download first", e.g. img2dataset).
"""
from __future__ import annotations

import functools
from typing import NamedTuple


class Row(NamedTuple):
    """One source row: `images` maps a manifest field (source / target / mask / image) to encoded bytes, a file
    path, or None (missing); `fields` are the text fields; `skip` a reason to drop it without reading images."""
    key: str
    fields: dict
    images: dict
    skip: str | None = None


def formats() -> dict:
    """FORMAT -> (reader(src) -> (total rows or None, iterator of Row), manifest kind)."""
    from . import folders, parquet

    out = {name: (functools.partial(parquet.read, name), "edit") for name in parquet.COLUMNS}
    return out | {"imagefolder": (folders.read_imagefolder, "edit"), "captions": (folders.read_captions, "caption")}
