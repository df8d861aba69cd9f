"""Manifests, image loading and the one-geometry-for-all transform of minedit.data."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minedit import data
from minedit.data import DataError, EditDataset, collate, load_image, load_mask, read_manifest


def _write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


@pytest.fixture
def pair(tmp_path):
    """An asymmetric 24x16 source/target pair whose difference is exactly the mask's region (right side)."""
    h, w = 16, 24
    src = np.zeros((h, w, 3), np.uint8)
    src[..., 0] = np.arange(w, dtype=np.uint8)[None, :] * 10  # a left-to-right ramp: flips are visible
    src[..., 1] = np.arange(h, dtype=np.uint8)[:, None] * 10
    tgt = src.copy()
    tgt[4:12, 14:22] = (0, 0, 255)
    mask = np.zeros((h, w), np.uint8)
    mask[4:12, 14:22] = 255
    Image.fromarray(src).save(tmp_path / "s.png")
    Image.fromarray(tgt).save(tmp_path / "t.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    return tmp_path


def test_same_resize_crop_and_flip_for_source_target_mask(pair):
    row = {"source": "s.png", "target": "t.png", "mask": "m.png", "instruction": "paint the patch blue"}
    manifest = _write_jsonl(pair / "edit.jsonl", [row] * 16)
    fixed = EditDataset(str(manifest), 16, random_flip=False)[0]
    # shorter side 16 already: centre crop of width 24 -> columns 4..19, no resampling
    src = np.asarray(Image.open(pair / "s.png"), np.float32)[:, 4:20] / 127.5 - 1
    assert torch.allclose(fixed["source"], torch.from_numpy(src).permute(2, 0, 1))
    changed = (fixed["source"] != fixed["target"]).any(0)
    assert torch.equal(changed, fixed["mask"][0].bool())  # mask and edit are aligned
    ds = EditDataset([(str(manifest), 1.0)], 16, random_flip=True, seed=3)
    flips = []
    for i in range(len(ds)):
        item = ds[i]
        flipped = torch.equal(item["source"], fixed["source"].flip(-1))
        assert flipped or torch.equal(item["source"], fixed["source"])
        ref = {k: fixed[k].flip(-1) if flipped else fixed[k] for k in ("source", "target", "mask")}
        assert all(torch.equal(item[k], ref[k]) for k in ref)  # all three flipped together, or none
        assert torch.equal((item["source"] != item["target"]).any(0), item["mask"][0].bool())
        flips.append(flipped)
    assert any(flips) and not all(flips)
    assert [torch.equal(ds[i]["source"], EditDataset(str(manifest), 16, seed=3)[i]["source"]) for i in range(16)] \
        == [True] * 16  # reproducible from (seed, index, epoch)
    ds.set_epoch(1)
    assert [torch.equal(ds[i]["source"], fixed["source"].flip(-1)) for i in range(16)] != flips


def test_resize_keeps_alignment_and_left_right_texts_never_flip(pair):
    row = {"source": "s.png", "target": "t.png", "mask": "m.png", "instruction": "make the left patch blue",
           "category": "understanding"}
    manifest = _write_jsonl(pair / "edit.jsonl", [row] * 12)
    ds = EditDataset(str(manifest), 8, random_flip=True)  # 24x16 -> 12x8 -> crop 8x8 (columns 2..9)
    plain = EditDataset(str(manifest), 8, random_flip=False)[0]
    for i in range(len(ds)):
        assert torch.equal(ds[i]["source"], plain["source"])
    item = ds[0]
    assert item["source"].shape == (3, 8, 8) and item["mask"].shape == (1, 8, 8)
    assert item["source"].min() >= -1 and item["source"].max() <= 1
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
    expected = np.zeros((8, 8), bool)
    expected[2:6, 5:] = True  # mask rows 4..11 -> 2..5, columns 14..21 -> 7..10 -> crop -> 5..8
    assert np.array_equal(item["mask"][0].numpy().astype(bool), expected)
    blue = item["target"][2] - item["source"][2] > 0.5
    assert blue[expected].float().mean() > 0.9 and not blue[~expected].any()
    assert item["category"] == "understanding" and item["optimized_instruction"] == "" and item["index"] == 0


def test_target_caption_comes_with_the_row_unless_a_flip_would_make_it_wrong(pair):
    """The target caption (for --t2i_share) is passed through; a row mirrored by the flip keeps it only when it
    names no side, so a "left" never describes the right of a flipped image — and the flip stream is unchanged."""
    row = {"source": "s.png", "target": "t.png", "instruction": "paint it blue"}
    rows = [{**row, "target_caption": "a blue patch on the left"}, {**row, "target_caption": "a blue patch"}]
    manifest = _write_jsonl(pair / "edit.jsonl", rows * 8)
    ds = EditDataset(str(manifest), 16, random_flip=True, seed=3)
    plain = EditDataset(str(manifest), 16, random_flip=False)[0]
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        flipped = not torch.equal(item["source"], plain["source"])
        wanted = rows[i % 2]["target_caption"] if not flipped or i % 2 else ""
        assert item["target_caption"] == wanted
        seen.add((i % 2, flipped))
    assert (0, True) in seen and (0, False) in seen  # both cases of the sided caption were exercised
    assert EditDataset(str(_write_jsonl(pair / "bare.jsonl", [row])), 16)[0]["target_caption"] == ""


def test_bad_rows_are_reported_with_line_numbers(pair):
    good = {"source": "s.png", "target": "t.png", "instruction": "x"}
    manifest = _write_jsonl(pair / "m.jsonl", [
        good,                                                       # 1
        '{"source": "s.png", "target": ',                           # 2 malformed JSON
        "",                                                         # 3 blank: ignored
        {"source": "s.png", "instruction": "x"},                    # 4 missing target
        {**good, "instruction": "   "},                             # 5 empty instruction
        {**good, "target": "nope.png"},                             # 6 file not found
        "[1, 2]",                                                   # 7 not an object
        {**good, "mask": "m.png", "extra": 5},                      # 8 good, extra field kept
    ])
    rows, bad = read_manifest(manifest)
    assert [r["_line"] for r in rows] == [1, 8]
    assert rows[1]["extra"] == 5 and rows[1]["mask"] == str(pair / "m.png") and rows[0]["source"] == str(pair / "s.png")
    assert [no for no, _ in bad] == [2, 4, 5, 6, 7]
    reasons = dict(bad)
    assert "JSON" in reasons[2] and "target" in reasons[4] and "instruction" in reasons[5]
    assert "not found" in reasons[6] and "nope.png" in reasons[6] and "object" in reasons[7]

    with pytest.raises(DataError, match=r"5 of 7 rows.*line 2"):
        EditDataset(str(manifest), 8, max_bad_fraction=0.1)
    with pytest.warns(UserWarning, match="5 bad rows"):
        ds = EditDataset(str(manifest), 8, max_bad_fraction=1.0)
    assert len(ds) == 2 and [b[0] for b in ds.bad] == [2, 4, 5, 6, 7] and ds.bad[0][2] == str(manifest)
    assert torch.equal(ds[0]["mask"], torch.ones(1, 8, 8))  # no mask: everything may change


def test_missing_or_empty_manifest_and_captions(tmp_path, pair):
    with pytest.raises(DataError, match="nothere.jsonl.*not found"):
        read_manifest(tmp_path / "nothere.jsonl")
    with pytest.raises(DataError, match="empty"):
        read_manifest(_write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    caps = _write_jsonl(pair / "c.jsonl", [{"image": "s.png", "caption": "a ramp"}, {"image": "s.png", "caption": ""},
                                          {"image": "s.png", "caption": "left ramp"}])
    rows, bad = read_manifest(caps, kind="caption")
    assert len(rows) == 2 and bad == [(2, "empty caption")]
    infer = _write_jsonl(pair / "i.jsonl", [{"source": "s.png", "instruction": "x"}, {"source": "s.png"}])
    rows, bad = read_manifest(infer, kind="infer")
    assert [r["_line"] for r in rows] == [1] and bad == [(2, "missing field 'instruction'")]
    with pytest.warns(UserWarning):
        ds = EditDataset(str(caps), 8, kind="caption", max_bad_fraction=0.5)
    item = ds[0]
    assert set(item) == {"image", "caption", "index"} and item["image"].shape == (3, 8, 8)


def test_weights_and_collate(pair):
    row = {"source": "s.png", "target": "t.png", "instruction": "x", "optimized_instruction": "y"}
    a = _write_jsonl(pair / "a.jsonl", [row] * 2)
    b = _write_jsonl(pair / "b.jsonl", [row] * 6)
    ds = EditDataset([(str(a), 1.0), (str(b), 3.0)], 8)
    w = ds.sample_weights()
    assert len(w) == len(ds) == 8
    assert sum(w[:2]) == pytest.approx(1.0) and sum(w[2:]) == pytest.approx(3.0)
    batch = collate([ds[i] for i in (0, 5, 7)])
    assert batch["source"].shape == (3, 3, 8, 8) and batch["mask"].shape == (3, 1, 8, 8)
    assert batch["instruction"] == ["x"] * 3 and batch["optimized_instruction"] == ["y"] * 3
    assert batch["index"].tolist() == [0, 5, 7] and batch["category"] == [""] * 3
    with pytest.raises(DataError, match="weight"):
        EditDataset([(str(a), 0.0)], 8)


def test_toyworld_rows_load_exactly(tmp_path):
    from minedit.toy.world import generate
    generate(tmp_path, 6, seed=0)
    ds = EditDataset(str(tmp_path / "train.jsonl"), 32, random_flip=False)
    item, row = ds[0], ds.rows[0]
    src = np.asarray(Image.open(row["source"]), np.float32) / 127.5 - 1
    assert torch.equal(item["source"], torch.from_numpy(src).permute(2, 0, 1))
    assert torch.equal(item["mask"][0], torch.from_numpy(np.asarray(Image.open(row["mask"])) > 0).float())


# ---------------------------------------------------------------- load_image / load_mask
def test_load_image_modes(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (8, 8, 3) and (out == gray[..., None]).all()

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)        # fully transparent -> white
    rgba[0, 1] = (10, 20, 30, 255)      # opaque -> itself
    rgba[0, 2] = (255, 0, 0, 128)       # half red over white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png")).astype(int)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [10, 20, 30]
    assert out[0, 2, 0] == 255 and abs(out[0, 2, 1] - 127) <= 1

    pal = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    pal.save(tmp_path / "p.png")
    assert np.asarray(load_image(tmp_path / "p.png"))[1, 0].tolist() == [0, 0, 255]
    pal.save(tmp_path / "pt.png", transparency=1)  # palette index 1 transparent -> white
    out = np.asarray(load_image(tmp_path / "pt.png"))
    assert out[0, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [255, 0, 0]

    Image.fromarray(np.array([[0, 65535], [25700, 514]], np.uint16)).save(tmp_path / "i16.png")
    assert Image.open(tmp_path / "i16.png").mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "i16.png"))[..., 0].tolist() == [[0, 255], [100, 2]]

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    out = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.abs(out - [255, 0, 0]).max() <= 8

    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)  # stored: red left half; orientation 6 = display rotated 90 degrees clockwise
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "e.jpg", exif=exif.tobytes())
    out = load_image(tmp_path / "e.jpg")
    arr = np.asarray(out).astype(int)
    assert out.size == (20, 40) and arr[5, 10, 0] > 200 and arr[35, 10, 0] < 50  # upright: red on top


def test_load_image_errors(tmp_path, monkeypatch):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, not an image")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "f.png")
    full = (tmp_path / "f.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    (tmp_path / "folder.png").mkdir()
    for name, why in (("zero.png", "empty"), ("text.png", ""), ("cut.png", ""), ("missing.png", "no such file"),
                      ("folder.png", "directory")):
        with pytest.raises(DataError, match=f"cannot read image .*{name}.*{why}"):
            load_image(tmp_path / name)
    with pytest.raises(DataError, match="limit of 100 pixels"):
        load_image(tmp_path / "f.png", max_pixels=100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 px: PIL's bomb warning becomes our error
    with pytest.raises(DataError, match="pixel limit"):
        load_image(tmp_path / "f.png")


def test_load_mask_threshold_and_resize(tmp_path, monkeypatch):
    vals = np.array([[0, 127, 128, 255]] * 4, np.uint8)
    Image.fromarray(vals).save(tmp_path / "m.png")
    monkeypatch.setattr(data, "_warned_resize", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(load_mask(tmp_path / "m.png", (4, 4)))[0].tolist() == [0, 0, 255, 255]
    with pytest.warns(UserWarning, match="nearest"):
        out = load_mask(tmp_path / "m.png", 8)
    assert out.mode == "L" and out.size == (8, 8)
    assert np.asarray(out)[0].tolist() == [0, 0, 0, 0, 255, 255, 255, 255]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        load_mask(tmp_path / "m.png", 2)
