"""Write failures (issue 17): a full disk, an I/O error or a read-only folder at every write site gives one
`error:` line naming the path, what failed and the fix; nothing written earlier is lost or left half-written.

Faults are injected with monkeypatch (OSError with ENOSPC / EIO / EROFS / EACCES at the write or the rename), and
once for real: a small tmpfs that fills up during training (skipped where mounting is not permitted).
"""
import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from minedit import checkpoint, fsio
from minedit.errors import UserError
from minedit.presets import preset
from minedit.toy import world as toyworld

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def oserror(code):
    def fail(*a, **k):
        raise OSError(code, os.strerror(code))
    return fail


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def tiny_save(run, step, value=0.0):
    cfg = preset("insightedit", "toy", 3)
    weights = {"w": torch.full((64, 64), float(value))}
    return checkpoint.save_checkpoint(str(run), step, cfg, weights, {"step": step, "t": torch.arange(5.0)})


# ---- checkpoints --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,words", [(errno.ENOSPC, ["no space left on device", "needs ~", "free space"]),
                                        (errno.EIO, ["input/output error", "check the disk"]),
                                        (errno.EROFS, ["read-only filesystem", "writable"]),
                                        (errno.EACCES, ["permission denied", "writable"])])
@pytest.mark.parametrize("where", ["weights", "state", "config", "rename"])
def test_checkpoint_write_failure_keeps_the_last_one(tmp_path, monkeypatch, code, words, where):
    run = tmp_path / "run"
    tiny_save(run, 10, 1.0)
    before = snapshot(run)
    if where == "weights":
        monkeypatch.setattr(checkpoint, "save_file", oserror(code))
    elif where == "state":
        real = checkpoint.save_file
        monkeypatch.setattr(checkpoint, "save_file",
                            lambda t, p: oserror(code)() if p.endswith("state.safetensors") else real(t, p))
    elif where == "config":
        monkeypatch.setattr(checkpoint, "_write_plain", oserror(code))
    else:
        monkeypatch.setattr(checkpoint.os, "replace", oserror(code))
    with pytest.raises(UserError) as e:
        tiny_save(run, 20, 2.0)
    msg = str(e.value)
    assert str(run / "ckpt-0000020") in msg and "—" in msg and "previous checkpoint" in msg
    for w in words:
        assert w in msg, msg
    monkeypatch.undo()
    assert snapshot(run) == before  # no temporary folder left, nothing of the old checkpoint touched
    where_ = checkpoint.find_checkpoint(str(run))
    assert where_.endswith("ckpt-0000010")
    assert float(checkpoint.load_weights(where_)["w"][0, 0]) == 1.0 and checkpoint.load_state(where_)["step"] == 10


class Killed(BaseException):
    """A kill: no handler runs (a BaseException that is not an OSError)."""


@pytest.mark.parametrize("fault", ["error", "kill"])
def test_resaving_a_step_never_loses_it(tmp_path, monkeypatch, fault):
    """A final save right after a periodic one re-saves that step: the old folder is set aside, not removed, until
    the new one is in place; a failed rename puts it back, a kill leaves it where find_checkpoint looks."""
    run = tmp_path / "run"
    tiny_save(run, 10, 1.0)
    real, calls = os.replace, []

    def second_rename_fails(src, dst):  # the first moves the old folder aside, the second would move the new in
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "input/output error") if fault == "error" else Killed()
        return real(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", second_rename_fails)
    with pytest.raises(UserError if fault == "error" else Killed):
        tiny_save(run, 10, 2.0)
    monkeypatch.undo()
    found = checkpoint.find_checkpoint(str(run))
    assert found.endswith("ckpt-0000010" if fault == "error" else ".ckpt-0000010.old"), found
    assert float(checkpoint.load_weights(found)["w"][0, 0]) == 1.0 and checkpoint.load_state(found)["step"] == 10
    if fault == "kill":  # a run resumed from the set-aside copy saves later steps: the copy is not left behind
        tiny_save(run, 20, 4.0)
        assert sorted(os.listdir(run)) == ["ckpt-0000010", "ckpt-0000020", "latest"]
        assert float(checkpoint.load_weights(str(run / "ckpt-0000010"))["w"][0, 0]) == 1.0
        (run / ".ckpt-0000020.tmp").mkdir()  # a save killed while writing its files
    tiny_save(run, 10, 3.0)  # the next save of that step tidies up
    assert sorted(os.listdir(run)) == ["ckpt-0000010", *(["ckpt-0000020"] if fault == "kill" else []), "latest"]
    assert float(checkpoint.load_weights(checkpoint.find_checkpoint(str(run)))["w"][0, 0]) == 3.0


def test_checkpoint_size_estimate_counts_weights_and_state(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", oserror(errno.ENOSPC))
    with pytest.raises(UserError, match=r"needs ~16 KB"):  # 64·64 fp32 weights + 5 fp32 state = 16 404 bytes
        tiny_save(tmp_path / "run", 1)


def test_safetensors_error_text_gives_the_errno():
    from safetensors import SafetensorError

    e = checkpoint._as_oserror(SafetensorError("Error while serializing: IoError(Os { code: 28 }) (os error 28)"))
    assert e.errno == errno.ENOSPC


# ---- the shared writers -------------------------------------------------------------------------------------------
def test_write_text_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: oserror(errno.ENOSPC)() if ".tmp-" in str(p)
                        else real_open(p, *a, **k))
    with pytest.raises(UserError, match=rf"no space left on device writing {path} — free space"):
        fsio.write_text(str(path), "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_save_image_failure_keeps_the_old_image(tmp_path, monkeypatch):
    path = tmp_path / "edit.png"
    Image.new("RGB", (4, 4), "red").save(path)
    monkeypatch.setattr(Image.Image, "save", oserror(errno.EIO))
    with pytest.raises(UserError, match="input/output error writing .*edit.png"):
        fsio.save_image(Image.new("RGB", (4, 4), "blue"), str(path))
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0) and os.listdir(tmp_path) == ["edit.png"]


def test_replace_dir_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "w.bin").write_text("old")

    def half_written(path):  # the disk fills after one of two files
        os.makedirs(path)
        (Path(path) / "w.bin").write_text("new")
        raise oserror(errno.ENOSPC)()
    with pytest.raises(UserError, match=rf"no space left on device writing {folder} — free space"):
        fsio.replace_dir(str(folder), half_written)
    assert (folder / "w.bin").read_text() == "old" and os.listdir(tmp_path) == ["unet"]

    def whole(path):
        os.makedirs(path)
        (Path(path) / "config.json").write_text("{}")
    fsio.replace_dir(str(folder), whole)
    assert os.listdir(folder) == ["config.json"] and os.listdir(tmp_path) == ["unet"]


def test_append_line_cut_short_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n')
    real_write = os.write

    def half(fd, data):  # what a nearly full disk does: part of the line, then ENOSPC
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsio.os, "write", half)
    with pytest.raises(UserError, match="no space left on device writing .*log.jsonl"):
        fsio.append_line(str(path), json.dumps({"step": 2, "loss": 0.5}))
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'


def test_resume_log_with_a_torn_last_line(tmp_path):
    """A log cut mid-line (an older crash, another tool) does not stop --resume: the torn line is dropped."""
    from minedit import runfolder

    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    runfolder.keep_log_until(str(path), 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_makedirs_failure_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio.os, "makedirs", oserror(errno.EROFS))
    with pytest.raises(UserError, match="read-only filesystem writing .*edits — choose a writable --pred-dir"):
        fsio.makedirs(str(tmp_path / "edits"), "--pred-dir")


def test_sample_grid_write_failure(tmp_path, monkeypatch):
    """train.py's sample grid (sampler.edit_grid): the model is stubbed, the PNG write fails with ENOSPC."""
    from types import SimpleNamespace

    from minedit import sampler

    monkeypatch.setattr(sampler, "edit", lambda model, src, *a, **k: src.clamp(-1, 1))
    model = SimpleNamespace(cfg=SimpleNamespace(text_guidance=1.0, image_guidance=1.0))
    items = [{"source": torch.zeros(3, 8, 8), "instruction": "x"}]
    path = tmp_path / "step-0000010.png"
    Image.new("RGB", (4, 4), "red").save(path)
    monkeypatch.setattr(Image.Image, "save", oserror(errno.ENOSPC))
    with pytest.raises(UserError, match="no space left on device writing .*step-0000010.png"):
        sampler.edit_grid(model, items, str(path))
    monkeypatch.undo()
    assert Image.open(path).getpixel((0, 0)) == (255, 0, 0) and os.listdir(tmp_path) == [path.name]


# ---- the scripts' write sites, in process ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("wf")
    toyworld.generate(str(d / "world"), n=12, seed=3, size=32)
    rows = [json.loads(r) for r in (d / "world" / "eval.jsonl").read_text().splitlines()][:3]
    preds = d / "preds"
    preds.mkdir()
    for i, r in enumerate(rows):  # edits made earlier: evaluate scores them without building the model
        shutil.copy(d / "world" / r["target"], preds / f"{i:05d}.png")
    return d


@pytest.mark.parametrize("fault", ["results", "sheet"])
def test_evaluate_write_failure(world, tmp_path, monkeypatch, fault, capsys):
    import evaluate

    out = tmp_path / "r.json"
    out.write_text("earlier results")
    if fault == "results":
        real_open = open
        monkeypatch.setattr("builtins.open", lambda p, *a, **k: oserror(errno.ENOSPC)() if ".r.json.tmp-" in str(p)
                            else real_open(p, *a, **k))
    else:
        monkeypatch.setattr(Image.Image, "save", oserror(errno.EIO))
    with pytest.raises(SystemExit) as e:
        from minedit.errors import run_cli
        run_cli(evaluate.main, ["--ckpt", str(ROOT / "assets/toy/insightedit"), "--data",
                                str(world / "world/eval.jsonl"), "--limit", "3", "--pred-dir",
                                str(world / "preds"), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: " in err
    if fault == "results":
        assert f"no space left on device writing {out}" in err and out.read_text() == "earlier results"
    else:
        assert "input/output error writing" in err and ".png" in err
        json.loads(out.read_text())  # results were complete before the sheet failed


@pytest.mark.slow
def test_infer_write_failure_keeps_the_earlier_output(world, tmp_path, monkeypatch, capsys):
    import infer
    from minedit.errors import run_cli

    out = tmp_path / "o.png"
    Image.new("RGB", (8, 8), "green").save(out)
    monkeypatch.setattr(Image.Image, "save", oserror(errno.ENOSPC))
    with pytest.raises(SystemExit) as e:
        run_cli(infer.main, ["--image", str(ROOT / "assets/toy/example.png"), "--instruction", "remove it",
                             "--steps", "1", "--out", str(out), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"no space left on device writing {out}" in err and "Traceback" not in err
    monkeypatch.undo()
    assert Image.open(out).getpixel((0, 0)) == (0, 128, 0) and os.listdir(tmp_path) == ["o.png"]


# ---- a real full disk ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", f"minedit-{uuid.uuid4().hex[:6]}", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip() or p.returncode}): needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_real_full_disk_during_training(small_disk, tmp_path):
    """24 MB holds one 15 MB stage-1 toy checkpoint but not a second beside it: the second save fails with
    ENOSPC. The run stops with exit 2 naming the checkpoint and its size; the first checkpoint is complete,
    infer.py edits with it, a full disk under infer.py's --out leaves no partial file, and --resume continues."""
    run = small_disk / "run"
    p = subprocess.run([sys.executable, ROOT / "train.py", "--stage", "1", "--max-steps", "4", "--save-every", "1",
                        "--sample-every", "0", "--batch-size", "2", "--log_every=1", "--out", run],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and "no space left on device writing" in line[0] and "ckpt-0000002" in line[0], p.stderr
    assert "needs ~15 MB" in line[0] or "needs ~14 MB" in line[0] or "needs ~16 MB" in line[0], line[0]
    assert sorted(os.listdir(run)) == ["ckpt-0000001", "config.json", "latest", "log.jsonl", "samples"]
    where = checkpoint.find_checkpoint(str(run))
    assert checkpoint.load_state(where)["step"] == 1 and checkpoint.load_weights(where)
    rows = [json.loads(r) for r in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # the disk is still full: infer.py with the surviving checkpoint, its output onto the full disk, then elsewhere
    args = [sys.executable, ROOT / "infer.py", "--ckpt", run, "--image", ROOT / "assets/toy/example.png",
            "--instruction", "remove the red circle", "--steps", "1", "--resolution", "32"]
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"], capture_output=True)
    p = subprocess.run(args + ["--out", small_disk / "o.png"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "no space left on device writing" in p.stderr, p.stderr[-3000:]
    assert not any(n.endswith(".png") for n in os.listdir(small_disk))
    p = subprocess.run(args + ["--out", tmp_path / "o.png"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert Image.open(tmp_path / "o.png").size == Image.open(ROOT / "assets/toy/example.png").size
    # the run, moved to a disk with room, continues from the surviving checkpoint with --resume
    shutil.copytree(run, tmp_path / "run")
    p = subprocess.run([sys.executable, ROOT / "train.py", "--stage", "1", "--out", tmp_path / "run", "--resume",
                        "--stop-after", "1"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert checkpoint.load_state(checkpoint.find_checkpoint(str(tmp_path / "run")))["step"] == 2
