"""infer.py and evaluate.py end to end: the real scripts in subprocesses on a small toy checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import import_script
from conftest import run_script as run
from minedit import checkpoint
from minedit.model import EditModel
from minedit.presets import preset
from minedit.toy import draw as toydraw, world as toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    toyworld.generate(str(out), n=40, seed=3, size=32)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A stage-3 insightedit toy checkpoint (random weights: the scripts' plumbing is under test here)."""
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    cfg = preset("insightedit", "toy", 3)
    model = EditModel(cfg)
    checkpoint.save_checkpoint(str(run_dir), 1, cfg, model.checkpoint_state(3))
    return run_dir


@pytest.mark.slow
def test_infer_keeps_size_and_is_deterministic(ckpt, tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    img.save(tmp_path / "in.png")
    outs = []
    for name in ("a.png", "b.png"):
        r = run("infer.py", "--ckpt", ckpt, "--image", tmp_path / "in.png", "--instruction", "remove the red circle",
                "--out", tmp_path / name, "--steps", 3, "--seed", 5)
        assert r.returncode == 0, r.stderr
        assert f"wrote {tmp_path / name}" in r.stdout
        outs.append(Image.open(tmp_path / name))
    assert outs[0].size == (70, 45)  # the input's size and aspect come back
    assert np.array_equal(np.asarray(outs[0]), np.asarray(outs[1]))


@pytest.mark.slow
def test_infer_batch_matches_single_edits(ckpt, world, tmp_path):
    r = run("infer.py", "--ckpt", ckpt, "--batch", world / "eval.jsonl", "--out-dir", tmp_path / "edits",
            "--steps", 2, "--batch-size", 3, "--seed", 1)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]
    assert len(os.listdir(tmp_path / "edits")) == len(rows)
    # Row 2 of the batch run (seed 1 + 2, its manifest mask) equals the same edit made alone with seed 3.
    r = run("infer.py", "--ckpt", ckpt, "--image", world / rows[2]["source"], "--instruction", rows[2]["instruction"],
            "--mask", world / rows[2]["mask"], "--out", tmp_path / "one.png", "--steps", 2, "--seed", 3)
    assert r.returncode == 0, r.stderr
    a = np.asarray(Image.open(tmp_path / "edits" / "00002.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "one.png"), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


@pytest.mark.slow
def test_evaluate_writes_table_json_and_sheet(ckpt, world, tmp_path):
    out = tmp_path / "res.json"
    r = run("evaluate.py", "--ckpt", ckpt, "--data", world / "eval.jsonl", "--out", out, "--steps", 2, "--limit", 3)
    assert r.returncode == 0, r.stderr
    assert "overall" in r.stdout and "psnr_bg" in r.stdout
    res = json.load(open(out))
    assert res["count"] == 3 and len(res["samples"]) == 3
    assert {"psnr_bg", "ssim_bg", "psnr_in", "success"} <= set(res["samples"][0])
    rule = res["success_rule"]  # the file says what "success" meant: each sample's verdict follows from it
    assert rule["count_outline"] is False and rule["drawn_shape"] is True and rule["others_kept"] is True
    for s in res["samples"]:
        inside = s["acc_core"] is None or s["acc_core"] >= rule["min_fraction"]
        shapes = s["shape_right"] is not False and s["others_kept"] is not False
        assert s["success"] == (inside and shapes and s["psnr_bg"] is not None and s["psnr_bg"] >= rule["min_psnr_bg"])
    assert os.path.isfile(tmp_path / "res.png")
    grid = Image.open(tmp_path / "res-grid.png")  # one row per category present in the 3 rows scored
    assert grid.height == len({s["category"] for s in res["samples"]}) * (64 + 2 * 12 + 6)
    # Scoring the edits already made (--pred-dir) gives the same numbers without running the model.
    r2 = run("evaluate.py", "--ckpt", ckpt, "--data", world / "eval.jsonl", "--out", tmp_path / "again.json",
             "--limit", 3, "--pred-dir", tmp_path / "res-edits")
    assert r2.returncode == 0, r2.stderr and "made" not in r2.stdout
    assert json.load(open(tmp_path / "again.json"))["summary"] == res["summary"]


@pytest.mark.slow
def test_evaluate_exact_text_changes_the_edits_and_is_part_of_the_stamp(ckpt, world, tmp_path):
    """--exact-text (the perfect-bridge diagnostic) makes other edits than the Q-Former's reading, says so in the
    results' settings, and a folder of edits made one way is not continued the other way; a folder stamped before
    the flag existed continues as made without it."""
    edit = lambda name, *extra: run("evaluate.py", "--ckpt", ckpt, "--data", world / "eval.jsonl", "--out",  # noqa
                                    tmp_path / f"{name}.json", "--steps", 2, "--limit", 2, "--instruction-field",
                                    "optimized_instruction", *extra)
    for name, extra in (("free", ()), ("exact", ("--exact-text",))):
        assert edit(name, *extra).returncode == 0
        assert json.load(open(tmp_path / f"{name}.json"))["settings"]["exact_text"] == bool(extra)
    pixels = [np.asarray(Image.open(tmp_path / f"{n}-edits" / "00000.png"), dtype=np.int16) for n in ("free", "exact")]
    assert np.abs(pixels[0] - pixels[1]).max() > 0
    (tmp_path / "exact-edits" / "00001.png").unlink()
    r = edit("exact", "--pred-dir", tmp_path / "exact-edits")  # now without the flag: refused
    assert r.returncode == 2 and "other settings (exact_text True there, False now)" in r.stderr, r.stderr
    stamp = tmp_path / "free-edits" / "edits.json"
    stamp.write_text(json.dumps({k: v for k, v in json.load(open(stamp)).items() if k != "exact_text"}))
    (tmp_path / "free-edits" / "00001.png").unlink()
    r = edit("free", "--pred-dir", tmp_path / "free-edits")
    assert r.returncode == 0 and "made 1 edits" in r.stdout, r.stderr


def test_evaluate_accepts_any_valid_place_for_an_add(ckpt, world, tmp_path):
    """An add drawn at another place the instruction allows succeeds; scored against the one stored target (as
    --instruction-field simple_instruction does, whose region differs) the same edit fails."""
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]
    preds = tmp_path / "edits"
    preds.mkdir()
    moved = []
    for i, row in enumerate(rows):
        target = Image.open(world / row["target"])
        if row["kind"] == "add":
            new = row["target_objects"][-1]
            far = max(toydraw.valid_targets(row, 32), key=lambda o: abs(o["x"] - new["x"]) + abs(o["y"] - new["y"]))
            if abs(far["x"] - new["x"]) + abs(far["y"] - new["y"]) > 6:  # clearly elsewhere
                target = toydraw.render(row["background"], row["objects"] + [far], 32)
                moved.append(i)
        target.save(preds / f"{i:05d}.png")
    assert moved
    for field, expect in (("instruction", True), ("simple_instruction", False)):
        out = tmp_path / f"{field}.json"
        r = run("evaluate.py", "--ckpt", ckpt, "--data", world / "eval.jsonl", "--out", out, "--pred-dir", preds,
                "--instruction-field", field)
        assert r.returncode == 0, r.stderr
        res = json.load(open(out))
        samples, by_kind = res["samples"], res["summary_by_kind"]["groups"]
        assert by_kind["add"]["success_rate"] == (1.0 if expect else 1 - len(moved) / by_kind["add"]["count"])
        assert any(line.split()[:2] == ["kind", "count"] for line in r.stdout.splitlines())  # the per-kind table
        assert all(samples[i]["success"] is expect for i in moved), [samples[i] for i in moved]
        assert all(s["success"] for i, s in enumerate(samples) if i not in moved)
        assert all(samples[i]["valid_targets"] > 1 for i in moved) is expect


def test_evaluate_scores_an_explicit_add_anywhere_in_the_region_it_names(ckpt, world, tmp_path):
    """--instruction-field optimized_instruction: an add drawn elsewhere in the region its rewrite names ("at the
    top left") succeeds; drawn where only the original instruction allowed (another region) it fails."""
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]

    def score(place) -> tuple[list[dict], list[int]]:
        """Every row's exact target, but each add's shape moved to place(row) (None: left where it was)."""
        preds, moved = tmp_path / place.__name__, []
        preds.mkdir()
        for i, row in enumerate(rows):
            target = Image.open(world / row["target"])
            o = place(row) if row["kind"] == "add" else None
            if o is not None:
                target = toydraw.render(row["background"], row["objects"] + [o], 32)
                moved.append(i)
            target.save(preds / f"{i:05d}.png")
        out = tmp_path / f"{place.__name__}.json"
        r = run("evaluate.py", "--ckpt", ckpt, "--data", world / "eval.jsonl", "--out", out, "--pred-dir", preds,
                "--instruction-field", "optimized_instruction")
        assert r.returncode == 0, r.stderr
        return json.load(open(out))["samples"], moved

    def inside(row):  # the farthest place with the same size and region word
        new = row["target_objects"][-1]
        far = max(toydraw.valid_targets(row, 32, "optimized_instruction"),
                  key=lambda o: abs(o["x"] - new["x"]) + abs(o["y"] - new["y"]))
        return far if far != new else None

    def outside(row):  # a place the original instruction allows, in another region
        new, here = row["target_objects"][-1], toydraw.valid_targets(row, 32, "optimized_instruction")
        return next((o for o in toydraw.valid_targets(row, 32) if o["size"] == new["size"] and o not in here), None)

    for place, expect in ((inside, True), (outside, False)):
        samples, moved = score(place)
        assert moved and all(samples[i]["success"] is expect for i in moved), place.__name__
        assert all(s["success"] for i, s in enumerate(samples) if i not in moved)


@pytest.mark.parametrize("args,needle", [
    (["--steps", "0"], "--steps"),
    (["--text-guidance", "-1"], "--text-guidance"),
    (["--instruction", "   "], "instruction is empty"),
    (["--image", "/nonexistent/x.png"], "x.png"),
    (["--out", "/nonexistent/dir/o.png"], "does not exist"),
])
def test_infer_bad_input_is_one_error_line(ckpt, tmp_path, args, needle):
    img = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "white").save(img)
    base = {"--image": str(img), "--instruction": "remove it", "--out": str(tmp_path / "o.png")}
    flags = ["--ckpt", str(ckpt)]
    for k, v in base.items():
        if k not in args:
            flags += [k, v]
    r = run("infer.py", *flags, *args)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and needle in r.stderr and "Traceback" not in r.stderr


def cut_text_path(model) -> None:
    """Zero every cross-attention output projection: the instruction can no longer reach the UNet."""
    for name, mod in model.unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            torch.nn.init.zeros_(mod.weight), torch.nn.init.zeros_(mod.bias)


def test_condition_gap_is_zero_exactly_when_the_text_has_no_path(world, tmp_path):
    """scripts/condition_gap.py: with every cross-attention output zeroed the instruction cannot reach the UNet,
    so the null-text loss equals the conditioned one; the untouched model's differ."""
    gaps = {}
    for name in ("plain", "no-text-path"):
        torch.manual_seed(0)
        cfg = preset("ip2p", "toy", 2)
        model = EditModel(cfg)
        if name == "no-text-path":
            cut_text_path(model)
        checkpoint.save_checkpoint(str(tmp_path / name), 1, cfg, model.checkpoint_state(2))
        r = run("scripts/condition_gap.py", "--ckpt", tmp_path / name, "--data", world / "train.jsonl", "--rows", 8)
        assert r.returncode == 0, r.stderr
        table = json.loads(r.stdout.strip().splitlines()[-1])
        assert [row["band"] for row in table] == ["0-250", "250-500", "500-750", "750-1000"]
        assert all(row["null_both"] != row["cond"] for row in table)  # the source latent always matters
        gaps[name] = [row["null_text"] - row["cond"] for row in table]
    assert gaps["no-text-path"] == [0.0] * 4
    assert all(g != 0 for g in gaps["plain"])


def test_grounding_probe_names_the_shape_that_was_taken_away(world, monkeypatch):
    """scripts/grounding_probe.py's pick: in a rendered scene with one shape drawn away, that shape is the one
    whose footprint changed most — for every shape of every probe scene."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import grounding_probe as gp

    from minedit.data import read_manifest, to_tensor

    rows, _ = read_manifest(world / "train.jsonl")
    scenes = gp.probe_scenes(rows, 5)
    assert scenes and all(len(r["objects"]) >= 2 for r in scenes)
    for r in scenes:
        src = to_tensor(toydraw.render(r["background"], r["objects"], 32))
        for j in range(len(r["objects"])):
            edited = to_tensor(toydraw.render(r["background"], r["objects"][:j] + r["objects"][j + 1:], 32))
            assert gp.removed_shape(src, edited, r["objects"]) == j


def test_grounding_probe_of_an_instruction_blind_editor_is_chance_exactly(world, tmp_path):
    """With every cross-attention output zeroed the instruction cannot reach the UNet: one scene and one seed give
    one edit whatever shape is named, so the removed shape never depends on the instruction and the named rate is
    exactly the chance of a fixed pick (one shape in k named right)."""
    torch.manual_seed(0)
    cfg = preset("ip2p", "toy", 2)
    model = EditModel(cfg)
    cut_text_path(model)
    checkpoint.save_checkpoint(str(tmp_path / "blind"), 1, cfg, model.checkpoint_state(2))
    r = run("scripts/grounding_probe.py", "--ckpt", tmp_path / "blind", "--data", world / "train.jsonl",
            "--scenes", 3, "--seeds", "0,1")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["pairs"] == 6 and res["depends"] == 0
    assert res["named"] == pytest.approx(res["chance"], abs=1e-12)
    assert res["spread"] > 0  # CLIP_text still tells the instructions apart: it is the UNet that cannot read them
    assert res["carried"] == 1.0  # ip2p's f_txt is CLIP_text(instruction) itself
    bad = run("scripts/grounding_probe.py", "--ckpt", tmp_path / "blind", "--data", world / "train.jsonl",
              "--seeds", "one")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --seeds") and "Traceback" not in bad.stderr
    bad = run("scripts/grounding_probe.py", "--ckpt", tmp_path / "blind", "--data", world / "train.jsonl",
              "--text-guidance", "-1")  # infer.py's sampling flags, checked as infer.py checks them
    assert bad.returncode == 2 and bad.stderr.startswith("error: --text-guidance") and "Traceback" not in bad.stderr
    bad = run("scripts/grounding_probe.py", "--ckpt", tmp_path / "blind", "--data", world / "train.jsonl",
              "--exact-text")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --exact-text: ip2p") and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_lever_study_script_runs_each_lever_and_prints_its_table(tmp_path):
    """scripts/toy_levers.sh end to end at a tiny size (one lever, to keep it short): the lever trains, is scored
    on the validation world and gets its table row; a second invocation finds everything done and only prints the
    table again; an unknown lever is one error line."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "lev"), "STEPS": "2", "TOY_SAMPLES": "40",
           "VAL_N": "20", "LEVERS": "mask5", "MINEDIT_CACHE": str(tmp_path / "cache")}
    cmd = ["bash", os.path.join(ROOT, "scripts", "toy_levers.sh")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [line for line in first.stdout.splitlines() if line.startswith("| ip2p-")]
    assert [r.split("|")[1].strip() for r in rows] == ["ip2p-mask5"]
    assert json.loads((tmp_path / "lev" / "ip2p-mask5" / "config.json").read_text())["mask_loss_weight"] == 5.0
    assert (tmp_path / "lev" / "random-sd-x16" / "sd" / "unet").is_dir()  # the random-UNet levers' bases
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "made " not in again.stdout and again.stdout.endswith(first.stdout[-200:])
    bad = subprocess.run(cmd, capture_output=True, text=True, env={**env, "LEVERS": "nope"}, timeout=600)
    assert bad.returncode == 2 and "error: unknown lever nope" in bad.stderr


def test_results_table_scores_removals_among_several_shapes_against_chance_and_splits_replacements(tmp_path):
    """The grounding column: removals in scenes of 2-3 shapes only (a one-shape removal and a replacement are left
    out), success against the chance of removing a random shape, then how often the named shape is gone whatever
    else changed (acc_in). The replacement column: recolours (same shape where the old one was) apart from new
    shapes. "–" without the manifest's scene description."""
    shapes = lambda n: [{"shape": "circle", "colour": "red", "x": 4 * i, "y": 9} for i in range(n)]  # noqa: E731
    recolour = [dict(shapes(2)[0], colour="blue"), shapes(2)[1]]
    reshape = [shapes(2)[0], dict(shapes(2)[1], shape="star")]
    manifest = [{"kind": "remove", "objects": shapes(1)}, {"kind": "remove", "objects": shapes(2)},
                {"kind": "remove", "objects": shapes(3)}, {"kind": "replace", "objects": shapes(2)},
                {"kind": "replace", "objects": shapes(2), "target_objects": recolour},
                {"kind": "replace", "objects": shapes(2), "target_objects": reshape}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in manifest) + "\n\n")
    samples = [{"index": i, "kind": r["kind"], "success": ok, "acc_in": acc} for i, (r, ok, acc) in
               enumerate(zip(manifest, [False, True, False, True, True, False], [0, 1, 0.95, 1, 1, 0]))]
    summary = {"overall": {"success_rate": 0.5}, "groups": {}}
    for name, data in (("toy", tmp_path / "m.jsonl"), ("real", tmp_path / "missing.jsonl")):
        (tmp_path / f"{name}.json").write_text(json.dumps({"data": str(data), "samples": samples,
                                                           "summary": summary}))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "results_table.py"), tmp_path / "toy.json",
                          tmp_path / "real.json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    toy, real = out.stdout.splitlines()[2:]
    # removals: 1 of 2 right; chance (1/2 + 1/3) / 2; the named shape gone in both (the failed one removed it and more)
    assert toy.endswith("| 100 / 0 % | 50 (42) % · 100 % |")
    assert real.endswith("| – | – |")


def _fake_results(world, tmp_path, right):
    """evaluate.py's JSON shape for `world`, with the rows in `right` scored right, and its sheet."""
    rows = [json.loads(line) for line in open(world / "eval.jsonl")]
    samples = [{"index": i, "success": i in right} for i in range(len(rows))]
    groups = {c: {"success_rate": 0.5} for c in {r["category"] for r in rows}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"count": len(rows), "samples": samples, "summary": {"groups": groups}}))
    Image.new("RGB", (8, 8), "white").save(tmp_path / "results-grid.png")
    return rows, path


def test_ship_toy_picks_an_example_infer_gets_right_and_writes_nothing_otherwise(ckpt, world, tmp_path,
                                                                                 monkeypatch):
    import shutil

    rows, results = _fake_results(world, tmp_path, right=set(range(40)))
    out = tmp_path / "assets"
    # The random checkpoint gets no edit right through infer.py: one error line, exit 2, nothing written.
    r = run("scripts/ship_toy.py", "--ckpt", ckpt, "--results", results, "--world", world, "--out", out,
            "--tries", 2)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr
    assert not out.exists()
    # With an infer that draws the exact target, the first edit of the --prefer pattern ships (here the pattern of
    # the last non-add row, so that it is not simply the first row).
    ship = import_script(os.path.join(ROOT, "scripts", "ship_toy.py"))
    by_source = {str(world / r["source"]): str(world / r["target"]) for r in rows}
    monkeypatch.setattr(ship, "infer_one", lambda ck, src, instr, pred: shutil.copyfile(by_source[src], pred))
    last = [r for r in rows if r["kind"] != "add"][-1]
    assert ship.main(["--ckpt", str(ckpt), "--results", str(results), "--world", str(world), "--out", str(out),
                      "--prefer", f"{last['kind']}/{last['category']}"]) == 0
    want = next(r for r in rows if (r["kind"], r["category"]) == (last["kind"], last["category"]))
    example = json.loads((out / "example.json").read_text())
    assert example["instruction"] == want["instruction"] and example["kind"] == want["kind"]
    assert np.array_equal(np.asarray(Image.open(out / "example-target.png")),
                          np.asarray(Image.open(world / want["target"]).convert("RGB")))
    ck = checkpoint.find_checkpoint(str(ckpt))
    assert (out / "insightedit" / "weights.safetensors").read_bytes() == \
        open(os.path.join(ck, "weights.safetensors"), "rb").read()
    assert (out / "heldout-insightedit.png").exists() and (out / "example-before-after.png").exists()
    # A run trained in another checkout names its bases by absolute path: shipped relative to the repository;
    # a path outside any toy bases is refused before anything is written.
    moved = tmp_path / "moved"
    shutil.copytree(ck, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["sd_path"] = "/elsewhere/clone/assets/toy/base/sd"
    (moved / "config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "assets2"
    assert ship.main(["--ckpt", str(moved), "--results", str(results), "--world", str(world), "--out",
                      str(out2)]) == 0
    assert json.loads((out2 / "insightedit" / "config.json").read_text())["sd_path"] == "assets/toy/base/sd"
    cfg["sd_path"] = "/elsewhere/my-sd"
    (moved / "config.json").write_text(json.dumps(cfg))
    r = run("scripts/ship_toy.py", "--ckpt", moved, "--results", results, "--world", world, "--out",
            tmp_path / "assets3")
    assert r.returncode == 2 and "sd_path=/elsewhere/my-sd" in r.stderr and not (tmp_path / "assets3").exists()
