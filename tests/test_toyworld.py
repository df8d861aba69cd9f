"""The toy world: exact edits, unambiguous referents, vocabulary coverage, determinism, speed and the CLI."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minedit.toy import draw as toydraw, phrases as toyphrases
from minedit.toy import world as tw

ROOT = Path(__file__).resolve().parents[1]
TEXT_FIELDS = ("instruction", "simple_instruction", "advanced_instruction", "optimized_instruction", "caption",
               "target_caption")


@pytest.fixture(scope="module")
def toyset(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    start = time.perf_counter()
    meta = tw.generate(out, 300, seed=7)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for name in ("train", "eval") for line in (out / f"{name}.jsonl").read_text().splitlines()]
    return out, meta, rows, seconds


def _arrays(out, row):
    return [np.asarray(Image.open(out / row[k])) for k in ("source", "target", "mask")]


def test_300_samples_quickly_and_counts(toyset):
    out, meta, rows, seconds = toyset
    assert seconds < 20
    assert len(rows) == 300 and meta["n_train"] == 270 and meta["n_eval"] == 30
    for field, names in (("category", tw.CATEGORIES), ("kind", tw.KINDS)):
        counts = {v: sum(r[field] == v for r in rows) for v in names}
        assert counts == meta[field]
        assert min(counts.values()) >= 95, counts  # balanced: 100 each up to rounding
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 2 * 270 and all((out / c["image"]).is_file() and c["caption"] for c in captions)


def test_target_differs_from_source_only_inside_mask(toyset):
    out, _, rows, _ = toyset
    for row in rows:
        src, tgt, mask = _arrays(out, row)
        assert src.shape == tgt.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        changed = (src != tgt).any(-1)
        assert changed.any(), row["instruction"]  # the edit does something
        assert not (changed & (mask == 0)).any(), row["instruction"]  # and nothing outside the mask
        # the mask is the edit region, not the whole image
        assert (mask > 0).sum() < changed.sum() * 4 + 60


def _edited(row):
    """Index of the removed or changed shape in row['objects'] (None for adds), from the descriptions alone."""
    objs, tobjs = row["objects"], row["target_objects"]
    if row["kind"] == "add":
        return None
    if row["kind"] == "remove":
        return next(i for i, o in enumerate(objs) if i >= len(tobjs) or tobjs[i] != o)
    return next(i for i, (o, t) in enumerate(zip(objs, tobjs)) if o != t)


POSITIONAL = (("x", min, ("the left shape", "the leftmost shape", "the shape on the left")),
              ("x", max, ("the right shape", "the rightmost shape", "the shape on the right")),
              ("y", min, ("the top shape", "the upper shape", "the topmost shape", "the highest shape",
                          "the shape at the top")),
              ("y", max, ("the bottom shape", "the lower shape", "the lowest shape", "the shape at the bottom")))
GRASS = {"grass": "green", "the sky": "blue", "the sun": "yellow", "snow": "white", "a carrot": "orange"}


def test_referents_pick_out_exactly_the_edited_shape(toyset):
    """An independent reading of a few phrase families, checked against the scene descriptions."""
    _, _, rows, _ = toyset
    checked = 0
    for row in rows:
        i = _edited(row)
        if i is None:
            new = row["target_objects"][-1]
            assert row["target_objects"][:-1] == row["objects"]
            assert f"{new['colour']} {new['shape']}" in row["optimized_instruction"]
            continue
        objs, text = row["objects"], row["instruction"]
        o = objs[i]
        if row["category"] == "simple":
            assert f"the {o['colour']} {o['shape']}" in text
            assert sum((p["colour"], p["shape"]) == (o["colour"], o["shape"]) for p in objs) == 1
            checked += 1
        for axis, pick, phrases in POSITIONAL:
            if any(p in text for p in phrases):
                assert o[axis] == pick(p[axis] for p in objs) and len(objs) >= 2
                others = [p[axis] for j, p in enumerate(objs) if j != i]
                assert min(abs(o[axis] - v) for v in others) >= 0.15 * 32
                checked += 1
        if row["kind"] == "remove":  # no new shape is described, so every clue is about the referent
            for clues, shape in ((("three corners", "three sides", "3 corners"), "triangle"),
                                 (("no corners", "round", "could roll"), "circle")):
                if any(c in text for c in clues) and f"{o['colour']} shape" not in text:
                    assert o["shape"] == shape and [p["shape"] for p in objs].count(shape) == 1
                    checked += 1
            for thing, colour in GRASS.items():
                if f"colour of {thing}" in text and f"{colour}" not in text:
                    same = [p for p in objs if p["colour"] == colour]
                    assert o["colour"] == colour and (len(same) == 1 or f" {o['shape']} " in f" {text} ")
                    checked += 1
        # the canonical rewrite names the edited shape explicitly
        assert f"{o['colour']} {o['shape']}" in row["optimized_instruction"]
    assert checked >= 100


def test_every_text_word_is_in_vocab(toyset):
    _, _, rows, _ = toyset
    vocab = set(toyphrases.VOCAB)
    assert toyphrases.tokenize_words("Is there anything round? Replace it, now.") == [
        "is", "there", "anything", "round", "?", "replace", "it", ",", "now", "."]
    for row in rows:
        for field in TEXT_FIELDS:
            assert set(toyphrases.tokenize_words(row[field])) <= vocab, (field, row[field])
    rng = np.random.default_rng(0)  # and at 64 px, every category x kind
    for c in tw.CATEGORIES:
        for k in tw.KINDS:
            s = tw.sample(rng, 64, c, k)
            assert s["source"].size == (64, 64) and s["category"] == c and s["kind"] == k
            assert all(set(toyphrases.tokenize_words(s[f])) <= vocab for f in TEXT_FIELDS)
            changed = (np.asarray(s["source"]) != np.asarray(s["target"])).any(-1)
            assert changed.any() and not (changed & (np.asarray(s["mask"]) == 0)).any()


def test_texts_by_category(toyset):
    _, _, rows, _ = toyset
    for row in rows:
        assert row["instruction"].strip() and row["simple_instruction"].strip()
        if row["category"] == "simple":
            assert row["instruction"] == row["simple_instruction"] and row["advanced_instruction"] == ""
        else:
            assert row["instruction"] == row["advanced_instruction"] != ""
    reasoning = " ".join(r["instruction"] for r in rows if r["category"] == "reasoning")
    assert "colour of" in reasoning and "corners" in reasoning and "?" in reasoning
    synonyms = " ".join(r["instruction"] for r in rows)
    assert sum(w in synonyms for w in ("remove", "delete", "erase", "take away", "turn", "paint", "put", "place")) >= 6


def test_deterministic_per_seed(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    tw.generate(a, 24, seed=3)
    tw.generate(b, 24, seed=3)
    tw.generate(c, 24, seed=4)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 24 * 3 + 4
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    assert (a / "images/000000_source.png").read_bytes() != (c / "images/000000_source.png").read_bytes()


def test_generate_rejects_bad_arguments(tmp_path):
    for kwargs in ({"n": 0}, {"n": -3}, {"n": 5, "size": 8}, {"n": 5, "eval_fraction": 1.0}):
        with pytest.raises(ValueError, match="—"):
            tw.generate(tmp_path / "x", seed=0, **{"n": 5, **kwargs})


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "minedit.toy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_cli(tmp_path):
    ok = _cli("--out", str(tmp_path / "tmp"), "--n", "20", "--seed", "1", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert len((tmp_path / "tmp/train.jsonl").read_text().splitlines()) == 18
    assert json.loads((tmp_path / "tmp/meta.json").read_text())["n"] == 20
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for args in (("--n", "0"), ("--out", str(blocker / "sub"), "--n", "3")):
        bad = _cli("--out", str(tmp_path / "bad"), *args, cwd=tmp_path)
        assert bad.returncode == 2
        assert "error:" in bad.stderr and "Traceback" not in bad.stderr and "—" in bad.stderr


def test_cached_world_is_made_once(tmp_path, monkeypatch):
    calls = []
    path = tw.cached_world(seed=2, n=9, size=32, root=tmp_path, barrier=lambda: calls.append("barrier"))
    assert json.loads((Path(path) / "meta.json").read_text())["n"] == 9 and calls == ["barrier"]
    assert [p.name for p in tmp_path.iterdir()] == [Path(path).name]  # no temporary folder left behind
    monkeypatch.setattr(tw, "generate", lambda *a, **k: pytest.fail("regenerated a cached world"))
    assert tw.cached_world(seed=2, n=9, size=32, root=tmp_path) == path
    with pytest.raises(RuntimeError, match="main process"):
        tw.cached_world(seed=3, n=9, size=32, root=tmp_path, main=False)


def test_add_region_holds_the_drawn_target_and_only_valid_ones(toyset):
    out, _, rows, _ = toyset
    adds = [r for r in rows if r["kind"] == "add"]
    assert adds and all("add_region" in r for r in adds) and not any("add_region" in r for r in rows
                                                                       if r["kind"] != "add")
    for r in adds:
        options = toydraw.valid_targets(r, 32)
        new = r["target_objects"][-1]
        assert new in options  # the generator's own placement is one of the valid answers
        for o in options:
            assert (o["shape"], o["colour"]) == (new["shape"], new["colour"])
            assert toydraw.fits(o, r["objects"], 32)
            x0, x1, y0, y1 = r["add_region"]["box"]
            assert x0 <= o["x"] <= x1 and y0 <= o["y"] <= y1
        # The exact target is its own nearest valid target, with the stored mask.
        target, mask = (np.asarray(Image.open(out / r[k])) for k in ("target", "mask"))
        got = toydraw.nearest_target(r, target.astype(np.float32) / 255)
        assert np.array_equal(np.asarray(got[0]), target) and np.array_equal(np.asarray(got[1]), mask)
        assert got[3] == r["target_objects"]  # and its objects, which the drawn-shape check reads
    # Some adds leave real freedom (else the scoring rule would change nothing).
    assert max(len(toydraw.valid_targets(r, 32)) for r in adds) > 10
    # The explicit rewrite names size and region ("add a small red star at the top left"): its valid targets keep
    # the stored size and `where`, hold the stored one, and the exact target is again its own nearest.
    for r in adds:
        new = r["target_objects"][-1]
        options = toydraw.valid_targets(r, 32, "optimized_instruction")
        assert new in options and r["optimized_instruction"].endswith(toydraw.where(new, 32))
        assert all(o["size"] == new["size"] and toydraw.where(o, 32) == toydraw.where(new, 32) for o in options)
        target = np.asarray(Image.open(out / r["target"])).astype(np.float32) / 255
        assert np.array_equal(np.asarray(toydraw.nearest_target(r, target, "optimized_instruction")[0]),
                              np.asarray(Image.open(out / r["target"])))
    assert toydraw.valid_targets(adds[0], 32, "simple_instruction") == []  # other texts: the stored target only
