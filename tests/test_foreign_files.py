"""Files written by other tools (issue 17): manifests as editors and spreadsheets save them, images in every
format Pillow opens, paths with spaces and non-ASCII names. They must simply work (or, for what cannot be read,
fail with one DataError that says how to re-save the file)."""
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minedit.data import DataError, EditDataset, load_image, load_mask, read_manifest

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
PIXELS = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)  # H×W×3


# ---- manifests --------------------------------------------------------------------------------------------------
def rows_text(folder):
    for name in ("a.png", "b.png"):
        Image.fromarray(PIXELS).save(folder / name)
    return [json.dumps({"source": "a.png", "target": "b.png", "instruction": f"edit {i}"}) for i in range(3)]


@pytest.mark.parametrize("style", ["bom", "crlf", "cr", "blank-lines", "no-final-newline", "all-at-once"])
def test_manifest_as_other_tools_save_it(tmp_path, style):
    rows = rows_text(tmp_path)
    clean = tmp_path / "clean.jsonl"
    clean.write_text("\n".join(rows) + "\n")
    sep = {"crlf": "\r\n", "cr": "\r", "all-at-once": "\r\n"}.get(style, "\n")
    body = sep.join(rows) + ("" if style in ("no-final-newline", "all-at-once") else sep)
    if style in ("blank-lines", "all-at-once"):
        body = sep + " \t " + sep + rows[0] + sep + sep + "   " + sep + sep.join(rows[1:]) + sep + "\t"
    data = body.encode("utf-8")
    if style in ("bom", "all-at-once"):
        data = b"\xef\xbb\xbf" + data
    other = tmp_path / "other.jsonl"
    other.write_bytes(data)
    want, bad_want = read_manifest(clean)
    got, bad = read_manifest(other)
    assert bad == [] and bad_want == []
    strip = lambda rs: [{k: v for k, v in r.items() if k != "_line"} for r in rs]  # noqa: E731
    assert strip(got) == strip(want)
    lines = data.removeprefix(b"\xef\xbb\xbf").splitlines()  # line numbers are the editor's line numbers
    for r in got:
        assert json.loads(lines[r["_line"] - 1])["instruction"] == r["instruction"]


def test_utf16_manifest_says_to_save_as_utf8(tmp_path):
    rows = rows_text(tmp_path)
    (tmp_path / "m.jsonl").write_bytes("\n".join(rows).encode("utf-16"))
    with pytest.raises(DataError, match="is UTF-16 .* save it as UTF-8"):
        read_manifest(tmp_path / "m.jsonl")


# ---- images ------------------------------------------------------------------------------------------------------
def png16(path, arr, color_type):
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour PNGs); arr is H×W×C uint16."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def make(fmt, path):
    """Write PIXELS in format `fmt`; -> the RGB array load_image must give."""
    rgb = Image.fromarray(PIXELS)
    exact = {"webp-lossless": dict(lossless=True), "tiff": {}, "tiff-lzw": dict(compression="tiff_lzw"), "bmp": {},
             "ppm": {}, "tga": {}}
    if fmt in exact:
        rgb.save(path, **exact[fmt])
        return PIXELS
    if fmt in ("webp", "jpeg-cmyk", "tiff-cmyk"):  # lossy or another colour space: Pillow's own RGB decode
        (rgb.convert("CMYK") if "cmyk" in fmt else rgb).save(path)
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    if fmt in ("gif", "png-palette", "gif-animated"):
        pal = rgb.convert("P")
        if fmt == "gif-animated":
            pal.save(path, save_all=True, append_images=[rgb.rotate(90).convert("P")])
        else:
            pal.save(path)
        return np.asarray(pal.convert("RGB"))  # the first frame, colours as the palette gives them
    if fmt in ("png-16bit-gray", "tiff-16bit-gray"):
        g = RNG.integers(0, 65536, PIXELS.shape[:2]).astype(np.uint16)
        Image.fromarray(g).save(path)
        return np.repeat(np.rint(g / 257.0).astype(np.uint8)[..., None], 3, -1)
    if fmt == "png-16bit-rgb":
        png16(path, PIXELS.astype(np.uint16) * 257, 2)
        return PIXELS
    if fmt == "tiff-float":
        f = PIXELS[..., 0].astype(np.float32) / 255.0  # float images are usually in [0, 1]
        Image.fromarray(f).save(path)
        return np.repeat(PIXELS[..., :1], 3, -1)
    if fmt == "png-1bit":
        rgb.convert("1").save(path)
        return np.asarray(rgb.convert("1").convert("RGB"))
    raise AssertionError(fmt)


FORMATS = {"webp": ".webp", "webp-lossless": ".webp", "tiff": ".tif", "tiff-lzw": ".tif", "tiff-cmyk": ".tif",
           "gif": ".gif", "gif-animated": ".gif", "bmp": ".bmp", "ppm": ".ppm", "tga": ".tga", "png-palette": ".png",
           "png-16bit-gray": ".png", "tiff-16bit-gray": ".tif", "png-16bit-rgb": ".png", "tiff-float": ".tif",
           "png-1bit": ".png", "jpeg-cmyk": ".jpg"}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_pillow_format_loads_as_rgb(tmp_path, fmt):
    path = tmp_path / f"im{FORMATS[fmt]}"
    want = make(fmt, path)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(im), want)
    m = load_mask(path, (30, 20))
    assert m.mode == "L" and set(np.unique(np.asarray(m))) <= {0, 255}


@pytest.mark.parametrize("ext", [".webp", ".tif", ".png"])
def test_exif_rotation_in_other_formats(tmp_path, ext):
    im = Image.fromarray(PIXELS)  # 30 wide, 20 high as stored
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90°
    im.save(tmp_path / f"r{ext}", exif=exif.tobytes())
    assert load_image(tmp_path / f"r{ext}").size == (20, 30)


def test_lab_image_and_mask(tmp_path):
    """CIELAB TIFF: PIL converts LAB -> RGB but not LAB -> L directly (load_mask raised ValueError before)."""
    lab = Image.fromarray(PIXELS).convert("LAB")
    lab.save(tmp_path / "lab.tif")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "lab.tif")), np.asarray(lab.convert("RGB")))
    assert load_mask(tmp_path / "lab.tif", (30, 20)).size == (30, 20)


def test_a_mode_that_cannot_become_rgb_is_a_data_error(tmp_path, monkeypatch):
    Image.fromarray(PIXELS).save(tmp_path / "x.png")

    def no_conversion(self, mode=None, *a, **k):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", no_conversion)
    for load in (load_image, lambda p: load_mask(p, 8)):
        with pytest.raises(DataError, match="mode RGB .* re-export it as RGB"):
            load(tmp_path / "x.png")


# ---- paths --------------------------------------------------------------------------------------------------------
def unicode_world(root):
    folder = root / "my data" / "Ünïcödé 編集"
    (folder / "im ages").mkdir(parents=True)
    Image.fromarray(PIXELS).save(folder / "im ages" / "source é 1.webp")
    Image.fromarray(PIXELS[::-1]).save(folder / "im ages" / "target ü 1.tif")
    rows = [{"source": "im ages/source é 1.webp", "target": "im ages/target ü 1.tif", "instruction": "flip it"},
            {"source": str(folder / "im ages" / "source é 1.webp"), "target": "im ages/target ü 1.tif",
             "instruction": "flip it"}]
    manifest = folder / "edits ✓.jsonl"
    text = json.dumps(rows[0], ensure_ascii=False) + "\r\n" + json.dumps(rows[1]) + "\r\n"  # raw UTF-8 and \u escapes
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    return folder, manifest


def test_paths_with_spaces_and_non_ascii(tmp_path):
    folder, manifest = unicode_world(tmp_path)
    ds = EditDataset([(manifest, 1.0)], 16)
    assert len(ds) == 2 and not ds.bad
    for i in range(2):
        item = ds[i]
        assert item["source"].shape == (3, 16, 16) and item["target"].shape == (3, 16, 16)


@pytest.mark.slow
def test_infer_batch_on_a_foreign_manifest(tmp_path):
    """infer.py --batch: a BOM + CRLF manifest in a folder with spaces and non-ASCII names, WebP sources, the
    edits into a non-ASCII folder."""
    folder, manifest = unicode_world(tmp_path)
    out = tmp_path / "édits out"
    p = subprocess.run([sys.executable, ROOT / "infer.py", "--batch", manifest, "--out-dir", out, "--steps", "1",
                        "--resolution", "32"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png"]
    assert Image.open(out / "00000.png").size == (30, 20)
