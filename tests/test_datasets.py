"""python -m minedit.datasets: tiny fixtures of each public layout (real PNG/JPEG bytes in the cells, a corrupt
cell, a missing mask) -> manifests checked row for row and loaded by minedit.data as train.py loads them; reruns
add no duplicates; bad input is one `error:` line with exit 2 and no manifest.jsonl."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minedit.data import EditDataset, load_image, read_manifest, to_tensor
from minedit.datasets.__main__ import main
from minedit.errors import UserError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
ROOT = Path(__file__).resolve().parents[1]
IMG = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def encoded(color, fmt="PNG", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def mask_bytes(box, size=(8, 8)) -> bytes:
    """White (the edit region) inside box = (x0, y0, x1, y1), black elsewhere; RGB as MagicBrush stores it."""
    m = Image.new("RGB", size, "black")
    m.paste((255, 255, 255), box)
    buf = io.BytesIO()
    m.save(buf, format="PNG")
    return buf.getvalue()


CORRUPT = encoded("red")[:40]  # a PNG cut short: the header parses, the pixels do not
RED, BLUE, GREEN = encoded("red"), encoded("blue", "JPEG"), encoded("green")


def cell(b):
    return None if b is None else {"bytes": b, "path": "x.png"}


def write_parquet(path, columns: dict, images=(), row_group_size=1):
    arrays = {k: pa.array([cell(b) for b in v], type=IMG) if k in images else pa.array(v)
              for k, v in columns.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


def manifest(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "manifest.jsonl").read_text().splitlines()]


def file_bytes(out, rel) -> bytes:
    return (Path(out) / rel).read_bytes()


def test_ip2p_shards_row_for_row(tmp_path, capsys):
    images = ("original_image", "edited_image")
    write_parquet(tmp_path / "src" / "train-00000.parquet", {
        "original_prompt": ["a red square", "x", "a red box"], "original_image": [RED, RED, RED],
        "edit_prompt": ["make it blue", "make it green", "   "], "edited_prompt": ["a blue square", "y", "z"],
        "edited_image": [BLUE, CORRUPT, GREEN]}, images=images)
    write_parquet(tmp_path / "src" / "train-00001.parquet", {
        "original_prompt": ["green"], "original_image": [GREEN], "edit_prompt": ["turn it red"],
        "edited_prompt": [None], "edited_image": [RED]}, images=images)
    out = tmp_path / "out"
    assert main(["ip2p", str(tmp_path / "src"), "--out", str(out), "--max-skip-fraction", "0.5"]) == 0
    rows = manifest(out)
    assert [r["id"] for r in rows] == ["train-00000-0000000", "train-00001-0000000"]
    assert [(r["instruction"], r.get("source_caption"), r.get("target_caption")) for r in rows] == [
        ("make it blue", "a red square", "a blue square"), ("turn it red", "green", None)]
    assert [file_bytes(out, r["source"]) for r in rows] == [RED, GREEN]  # bytes kept as they were
    assert [file_bytes(out, r["target"]) for r in rows] == [BLUE, RED]
    assert rows[0]["target"].endswith(".jpg") and "mask" not in rows[0]
    report = json.loads((out / "convert.json").read_text())
    assert report["status"] == "done" and report["kept"] == 2
    assert report["skipped"] == {"corrupt target image": 1, "empty instruction": 1}
    assert report["skipped_examples"]["corrupt target image"][0][0] == "train-00000-0000001"
    assert "kept 2 rows" in capsys.readouterr().out
    # train.py's reader: the same dataset class, the same tensors as decoding the cells
    ds = EditDataset(str(out / "manifest.jsonl"), resolution=8, random_flip=False)
    item = ds[0]
    assert torch.equal(item["source"], to_tensor(Image.open(io.BytesIO(RED)).convert("RGB")))
    assert torch.equal(item["target"], to_tensor(load_image(out / rows[0]["target"])))
    assert item["instruction"] == "make it blue" and torch.equal(item["mask"], torch.ones(1, 8, 8))
    # a glob picks one split out of a shared folder
    assert main(["ip2p", str(tmp_path / "src" / "*-00001.parquet"), "--out", str(tmp_path / "one")]) == 0
    assert [r["id"] for r in manifest(tmp_path / "one")] == ["train-00001-0000000"]


def test_magicbrush_masks_turns_and_chains(tmp_path):
    src = tmp_path / "mb.parquet"
    write_parquet(src, {"img_id": ["327726", "327726", "42"], "turn_index": [1, 2, 1],
                        "source_img": [RED, GREEN, BLUE], "mask_img": [mask_bytes((2, 2, 6, 6)), None, CORRUPT],
                        "instruction": ["make it green", "add a dot", "remove it"],
                        "target_img": [GREEN, BLUE, RED]},
                  images=("source_img", "mask_img", "target_img"), row_group_size=2)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="1 of 3 rows were skipped"):  # a corrupt mask is a bad row
        main(["magicbrush", str(src), "--out", str(out)])
    assert not (out / "manifest.jsonl").exists() and (out / "manifest.jsonl.partial").exists()
    assert json.loads((out / "convert.json").read_text())["status"] == "failed"
    assert main(["magicbrush", str(src), "--out", str(out), "--max-skip-fraction", "0.5"]) == 0
    rows = manifest(out)
    assert [(r["chain"], r["turn_index"], r["instruction"]) for r in rows] == [
        ("327726", 1, "make it green"), ("327726", 2, "add a dot")]
    assert "mask" in rows[0] and "mask" not in rows[1]  # a missing mask keeps the row, unmasked
    want = np.zeros((8, 8), bool)
    want[2:6, 2:6] = True
    assert np.array_equal(np.asarray(Image.open(out / rows[0]["mask"])) == 255, want)
    ds = EditDataset(str(out / "manifest.jsonl"), resolution=8, random_flip=False)
    assert torch.equal(ds[0]["mask"][0].bool(), torch.from_numpy(want))
    assert torch.equal(ds[1]["mask"], torch.ones(1, 8, 8))
    assert torch.equal(ds[1]["source"], to_tensor(Image.open(io.BytesIO(GREEN)).convert("RGB")))  # turn 2 source


def test_ultraedit_region_and_free_form(tmp_path):
    src = tmp_path / "ue.parquet"
    write_parquet(src, {"source_image": [RED, BLUE], "edited_image": [GREEN, RED],
                        "mask_image": [mask_bytes((0, 0, 4, 8)), None], "edit_prompt": ["paint left half", "redden"],
                        "source_caption": ["red", "blue"], "target_caption": ["half green", "red"],
                        "clip_sim_dir": [0.3, 0.2]}, images=("source_image", "edited_image", "mask_image"))
    out = tmp_path / "out"
    assert main(["ultraedit", str(src), "--out", str(out)]) == 0
    rows = manifest(out)
    assert [(r["instruction"], r["source_caption"], r["target_caption"], "mask" in r) for r in rows] == [
        ("paint left half", "red", "half green", True), ("redden", "blue", "red", False)]
    assert [file_bytes(out, r["target"]) for r in rows] == [GREEN, RED]
    good, bad = read_manifest(out / "manifest.jsonl", kind="edit")
    assert len(good) == 2 and not bad


def test_imagefolder_metadata(tmp_path):
    src = tmp_path / "folder"
    (src / "imgs").mkdir(parents=True)
    (src / "imgs" / "a.png").write_bytes(RED)
    (src / "imgs" / "b.jpg").write_bytes(BLUE)
    (src / "imgs" / "c.png").write_bytes(CORRUPT)
    meta = [{"original_image": "imgs/a.png", "edited_image": "imgs/b.jpg", "edit_prompt": "make it blue"},
            {"original_image": "imgs/a.png", "edited_image": "imgs/missing.png", "edit_prompt": "x"},
            {"file_name": "imgs/b.jpg", "edited_image": "imgs/a.png", "edit_prompt": "make it red"},
            {"original_image": "imgs/c.png", "edited_image": "imgs/a.png", "edit_prompt": "y"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\nnot json\n")
    out = tmp_path / "out"
    assert main(["imagefolder", str(src), "--out", str(out), "--max-skip-fraction", "0.7"]) == 0
    rows = manifest(out)
    assert [(r["id"], r["instruction"]) for r in rows] == [("meta-0000001", "make it blue"),
                                                           ("meta-0000003", "make it red")]
    assert [file_bytes(out, r["source"]) for r in rows] == [RED, BLUE]
    assert json.loads((out / "convert.json").read_text())["skipped"] == {
        "missing target image": 1, "corrupt source image": 1, "metadata line is not valid JSON": 1}
    assert len(EditDataset(str(out / "manifest.jsonl"), resolution=8)) == 2


def test_captions_tsv_and_folder(tmp_path):
    src = tmp_path / "cc"
    (src / "shard").mkdir(parents=True)
    (src / "shard" / "0001.jpg").write_bytes(BLUE)
    (src / "shard" / "0001.txt").write_text("a blue square\n")
    (src / "shard" / "0002.png").write_bytes(RED)
    (src / "shard" / "0002.txt").write_text("a  red\nsquare")
    (src / "shard" / "0003.png").write_bytes(GREEN)  # no caption file
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("caption\timage\na blue square\tcc/shard/0001.jpg\nremote\thttps://x.org/a.jpg\n"
                   "a red square\tcc/shard/0002.png\n")
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert main(["captions", str(tsv), "--out", str(out1), "--max-skip-fraction", "0.5"]) == 0
    assert main(["captions", str(src), "--out", str(out2), "--max-skip-fraction", "0.5"]) == 0
    rows1, rows2 = manifest(out1), manifest(out2)
    assert [(r["id"], r["caption"]) for r in rows1] == [("cc3m-0000002", "a blue square"),
                                                        ("cc3m-0000004", "a red square")]
    assert [r["caption"] for r in rows2] == ["a blue square", "a red square"]
    assert [file_bytes(out2, r["image"]) for r in rows2] == [BLUE, RED]
    assert json.loads((out2 / "convert.json").read_text())["skipped"] == {
        "no caption file (.txt beside the image)": 1}
    ds = EditDataset(str(out1 / "manifest.jsonl"), resolution=8, kind="caption", random_flip=False)
    assert ds[1]["caption"] == "a red square"
    assert torch.equal(ds[1]["image"], to_tensor(load_image(src / "shard" / "0002.png")))


def test_rerun_after_a_crash_adds_no_duplicates(tmp_path):
    src = tmp_path / "ip2p.parquet"
    n = 6
    write_parquet(src, {"original_prompt": ["p"] * n, "original_image": [RED] * n,
                        "edit_prompt": [f"edit {i}" for i in range(n)], "edited_prompt": ["q"] * n,
                        "edited_image": [BLUE] * n}, images=("original_image", "edited_image"), row_group_size=4)
    out = tmp_path / "out"
    assert main(["ip2p", str(src), "--out", str(out)]) == 0
    full = (out / "manifest.jsonl").read_text()
    # a run killed after three rows, in the middle of writing the fourth
    lines = full.splitlines(keepends=True)
    (out / "manifest.jsonl").unlink()
    (out / "manifest.jsonl.partial").write_text("".join(lines[:3]) + lines[3][:10])
    assert main(["ip2p", str(src), "--out", str(out)]) == 0
    assert (out / "manifest.jsonl").read_text() == full
    assert json.loads((out / "convert.json").read_text())["kept_earlier"] == 3
    assert main(["ip2p", str(src), "--out", str(out)]) == 0  # a finished conversion run again: unchanged
    assert (out / "manifest.jsonl").read_text() == full
    other = tmp_path / "other.parquet"
    other.write_bytes(src.read_bytes())
    with pytest.raises(UserError, match="holds a ip2p conversion of .*ip2p.parquet"):
        main(["ip2p", str(other), "--out", str(out)])


@pytest.mark.parametrize("where", ["image", "manifest"])
def test_full_disk_is_one_error_and_the_rerun_finishes(tmp_path, monkeypatch, where):
    """A full disk mid-conversion: a UserError naming the path and the fix, no temporary file left, and the same
    command run again (space freed) gives the manifest an uninterrupted run gives."""
    import errno

    from minedit.datasets import writer

    n = 4
    src = tmp_path / "ip2p.parquet"
    write_parquet(src, {"original_prompt": ["p"] * n, "original_image": [RED] * n,
                        "edit_prompt": [f"edit {i}" for i in range(n)], "edited_prompt": ["q"] * n,
                        "edited_image": [GREEN] * n}, images=("original_image", "edited_image"))
    assert main(["ip2p", str(src), "--out", str(tmp_path / "clean")]) == 0
    out, calls = tmp_path / "out", {"n": 0}

    def full_on_third(real):  # the third call hits a full disk
        def call(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*a, **k)
        return call

    class Manifest:  # the partial manifest's file, whose third line does not fit
        def __init__(self, f):
            self.f, self.write = f, full_on_third(f.write)

        def __getattr__(self, name):
            return getattr(self.f, name)

    if where == "image":
        monkeypatch.setattr(writer.os, "replace", full_on_third(os.replace))
    else:
        monkeypatch.setattr(writer, "open", lambda p, *a, **k: Manifest(open(p, *a, **k))
                            if str(p).endswith(".partial") else open(p, *a, **k), raising=False)
    name = r"images/.*\.png" if where == "image" else "manifest.jsonl.partial"
    with pytest.raises(UserError, match=f"no space left on device writing .*{name} — free space or choose another "
                                        "--out; the rows converted so far are kept in .*manifest.jsonl.partial"):
        main(["ip2p", str(src), "--out", str(out)])
    monkeypatch.undo()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "manifest.jsonl").exists()
    assert main(["ip2p", str(src), "--out", str(out)]) == 0
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "clean" / "manifest.jsonl").read_text()


def run_cli(*args, hide_pyarrow=False):
    code = ("import sys; " + ("sys.modules['pyarrow'] = None; " if hide_pyarrow else "") +
            f"sys.path.insert(0, {str(ROOT)!r}); from minedit.errors import run_cli; "
            "from minedit.datasets.__main__ import main; run_cli(main)")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_bad_input_is_one_error_line(tmp_path):
    good = tmp_path / "mb.parquet"
    write_parquet(good, {"img_id": ["1"], "turn_index": [1], "source_img": [RED], "mask_img": [None],
                         "instruction": ["x"], "target_img": [CORRUPT]},
                  images=("source_img", "mask_img", "target_img"))
    (tmp_path / "fake.parquet").write_text("img_id,turn_index\n1,1\n")
    cases = [(["magicbrush", tmp_path / "fake.parquet"], "is not a readable parquet file"),
             (["ip2p", good], "has no column original_image"),
             (["pix2pix", good], "unknown format 'pix2pix'"),
             (["magicbrush", good], "no row was kept"),
             (["captions", tmp_path / "nowhere"], "not found")]
    for args, needle in cases:
        out = tmp_path / f"out-{args[0]}"
        r = run_cli(*args, "--out", out)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
        assert needle in r.stderr, r.stderr
        assert not (out / "manifest.jsonl").exists()
    r = run_cli("magicbrush", good, "--out", tmp_path / "o", hide_pyarrow=True)
    assert r.returncode == 2 and r.stderr == ("error: reading parquet needs pyarrow, which is an optional extra "
                                              "— python3 -m pip install pyarrow\n")
    assert not (tmp_path / "o").exists()  # structural faults fail before anything is written


def test_edit_region_from_each_mask_layout():
    from minedit.datasets.writer import edit_region

    want = np.zeros((8, 8), bool)
    want[2:6, 1:5] = True
    photo = np.random.default_rng(0).integers(100, 240, (8, 8, 3)).astype(np.uint8)  # bright, never pure white
    binary = Image.fromarray(np.where(want[..., None], 255, 0).astype(np.uint8).repeat(3, -1))
    erased = np.dstack([photo, np.where(want, 0, 255).astype(np.uint8)])  # RGBA, region transparent
    painted = np.where(want[..., None], 255, photo).astype(np.uint8)
    for im in (binary, binary.convert("L"), Image.fromarray(erased, "RGBA"), Image.fromarray(painted)):
        assert np.array_equal(np.asarray(edit_region(im)) == 255, want), im.mode
    opaque = Image.fromarray(np.dstack([np.asarray(binary), np.full((8, 8), 255, np.uint8)]), "RGBA")
    assert np.array_equal(np.asarray(edit_region(opaque)) == 255, want)  # alpha all opaque: read the colours


@pytest.mark.slow
def test_train_py_trains_on_converted_manifests(tmp_path):
    """The real train.py, one step each: stage 2 (ip2p) on a converted parquet, stage 1 on converted captions."""
    n = 4
    write_parquet(tmp_path / "ip2p.parquet", {
        "original_prompt": ["a red square"] * n, "original_image": [encoded("red", size=(40, 32))] * n,
        "edit_prompt": ["make the square blue"] * n, "edited_prompt": ["a blue square"] * n,
        "edited_image": [encoded("blue", "JPEG", size=(40, 32))] * n}, images=("original_image", "edited_image"))
    (tmp_path / "cc").mkdir()
    for i in range(n):
        (tmp_path / "cc" / f"{i}.png").write_bytes(encoded((60 * i, 0, 0), size=(32, 48)))
        (tmp_path / "cc" / f"{i}.txt").write_text(f"a square number {i}")
    assert main(["ip2p", str(tmp_path / "ip2p.parquet"), "--out", str(tmp_path / "edits")]) == 0
    assert main(["captions", str(tmp_path / "cc"), "--out", str(tmp_path / "caps")]) == 0
    quick = ["--max-steps", "1", "--batch-size", "4", "--sample-every", "0", "--log_every=1"]
    for args in (["--recipe", "ip2p", "--stage", "2", "--data", tmp_path / "edits" / "manifest.jsonl"],
                 ["--recipe", "insightedit", "--stage", "1", "--data", tmp_path / "caps" / "manifest.jsonl"]):
        out = tmp_path / f"run-{args[1]}"
        r = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args), "--out", str(out), *quick],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr[-3000:]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 1 and np.isfinite(log[-1]["loss"])
