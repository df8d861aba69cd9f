"""Killed and restarted jobs (issue 17): a run-folder lock for train.py, --resume with changed fields explained,
evaluate.py continued after a kill giving the uninterrupted results, an interrupted write leaving the old file."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from minedit import fsio, runlock, training
from minedit.errors import UserError
from minedit.presets import preset
from minedit.toy import world as toyworld

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---- the run-folder lock -----------------------------------------------------------------------------------------
def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, capsys):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                    "since": "2026-01-01 00:00:00"}))
        with pytest.raises(UserError, match=rf"in use by train.py process {sleeper.pid} .* choose another --out"):
            runlock.acquire(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename}))
    runlock.acquire(str(tmp_path))
    assert "no longer running: taking the run folder over" in capsys.readouterr().err
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    runlock.release(str(tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_lock_of_another_host_and_a_torn_lock(tmp_path, capsys):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "node-17"}))
    with pytest.raises(UserError, match=r"locked by process 1 on host node-17 .* delete .*\.lock"):
        runlock.acquire(str(tmp_path))
    (tmp_path / ".lock").write_text('{"pid": 12')  # written half by a process killed at that moment
    runlock.acquire(str(tmp_path))
    assert "taking the run folder over" in capsys.readouterr().err
    runlock.release(str(tmp_path))


def test_release_leaves_another_owners_lock(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": os.getpid() + 1, "host": os.uname().nodename}))
    runlock.release(str(tmp_path))
    assert (tmp_path / ".lock").exists()


# ---- --resume with changed fields ---------------------------------------------------------------------------------
def test_resume_changes_say_what_they_mean():
    saved = preset("insightedit", "toy", 1)
    saved.max_steps, saved.warmup_ratio, saved.lr = 100, 0.0, 1e-3
    now = preset("insightedit", "toy", 1)
    now.max_steps, now.warmup_ratio, now.lr = 200, 0.0, 1e-3
    assert training.resume_changes(saved, saved, 50) == []
    now.seed, now.save_every = 7, 3
    lines = {ln.split(":")[0]: ln for ln in training.resume_changes(saved, now, 50)}
    assert set(lines) == {"max_steps", "seed", "save_every"}
    # cosine from 1e-3 over 100 vs 200 steps (warm-up 1 step), at step 50: by hand
    old = 1e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 99))
    new = 1e-3 * 0.5 * (1 + math.cos(math.pi * 49 / 199))
    assert f"at step 50 the rate is {new:.3g} instead of {old:.3g}" in lines["max_steps"]
    assert "100 in the checkpoint, 200 now" in lines["max_steps"]
    assert "data order" in lines["seed"] and "bookkeeping" in lines["save_every"]


def start_train(*args):
    return subprocess.Popen([sys.executable, ROOT / "train.py", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_trainers_one_folder_then_a_crash_and_a_changed_resume(tmp_path):
    """A trains; B on the same --out (with --resume) is refused; A is SIGKILLed (its lock stays); C resumes with a
    changed max_steps: it takes the stale lock over with a warning, lists the change and finishes."""
    out = tmp_path / "run"
    common = ["--stage", "1", "--sample-every", "0", "--batch-size", "2", "--log_every=1", "--out", out]
    a = start_train(*common, "--max-steps", "100000", "--save-every", "1")
    t0 = time.time()
    while not (out / "latest").exists():
        assert a.poll() is None, a.communicate()
        assert time.time() - t0 < 240
        time.sleep(0.2)
    b = subprocess.run([sys.executable, ROOT / "train.py", *map(str, common), "--resume"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr[-3000:]
    assert f"is in use by train.py process {a.pid}" in b.stderr
    a.send_signal(signal.SIGKILL)
    a.wait()
    assert (out / ".lock").exists()
    c = subprocess.run([sys.executable, ROOT / "train.py", *map(str, common), "--resume", "--max-steps", "50000",
                        "--stop-after", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    assert f"left by process {a.pid}, which is no longer running" in c.stderr
    assert "--resume with 1 changed config field(s)" in c.stderr
    assert "max_steps: 100000 in the checkpoint, 50000 now — the learning-rate schedule is recomputed" in c.stderr
    assert not (out / ".lock").exists()  # released at exit


# ---- an interrupted write -----------------------------------------------------------------------------------------
def test_write_interrupted_mid_file_keeps_the_earlier_output(tmp_path, monkeypatch):
    """A kill (here KeyboardInterrupt) while half the PNG is written: the earlier output is intact, no debris."""
    out = tmp_path / "o.png"
    Image.new("RGB", (4, 4), "red").save(out)
    real_save = Image.Image.save

    def half_then_killed(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        Path(fp).write_bytes(Path(fp).read_bytes()[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        fsio.save_image(Image.new("RGB", (4, 4), "blue"), str(out))
    monkeypatch.undo()
    assert Image.open(out).getpixel((0, 0)) == (255, 0, 0) and os.listdir(tmp_path) == ["o.png"]


# ---- evaluate.py killed and run again ----------------------------------------------------------------------------
def evaluate(world, out, pred_dir, *extra):
    return subprocess.run([sys.executable, ROOT / "evaluate.py", "--ckpt", ROOT / "assets/toy/insightedit",
                           "--data", world / "train.jsonl", "--limit", "6", "--batch-size", "2", "--steps", "2",
                           "--out", out, "--pred-dir", pred_dir, *map(str, extra)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=400)


def scores(path):
    r = json.loads(Path(path).read_text())
    return r["summary"], [{k: v for k, v in s.items() if k != "pred"} for s in r["samples"]], r["settings"]


@pytest.mark.slow
def test_evaluate_killed_then_rerun_gives_the_uninterrupted_results(tmp_path):
    toyworld.generate(str(tmp_path / "world"), n=40, seed=5, size=32)
    world = tmp_path / "world"
    p = evaluate(world, tmp_path / "full.json", tmp_path / "full-edits")
    assert p.returncode == 0, p.stderr[-3000:]
    cmd = [sys.executable, ROOT / "evaluate.py", "--ckpt", ROOT / "assets/toy/insightedit", "--data",
           world / "train.jsonl", "--limit", "6", "--batch-size", "2", "--steps", "2", "--out", tmp_path / "r.json",
           "--pred-dir", tmp_path / "edits"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.time()

    def made_edits():  # finished edits only: the atomic writer's ".00000.png.tmp-PID.png" is not one yet
        d = tmp_path / "edits"
        return sorted(n for n in os.listdir(d) if re.fullmatch(r"\d{5}\.png", n)) if d.is_dir() else []

    while not made_edits():
        assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = made_edits()
    assert 0 < len(made) < 6, made  # killed part-way
    p = evaluate(world, tmp_path / "r.json", tmp_path / "edits")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"made {6 - len(made)} edits" in p.stdout
    assert scores(tmp_path / "r.json") == scores(tmp_path / "full.json")
    # the same folder with other settings: refused, nothing overwritten
    before = {n: (tmp_path / "edits" / n).read_bytes() for n in os.listdir(tmp_path / "edits")}
    (tmp_path / "edits" / "00005.png").unlink()
    del before["00005.png"]
    p = evaluate(world, tmp_path / "r2.json", tmp_path / "edits", "--text-guidance", "5")
    assert p.returncode == 2 and "holds edits made with other settings (text_guidance" in p.stderr, p.stderr[-2000:]
    assert {n: (tmp_path / "edits" / n).read_bytes() for n in os.listdir(tmp_path / "edits")} == before
