"""train.py end to end on the CPU toy config (DESIGN §7-§9): the stage hand-off chain, the loss going down on a
fixed batch, DDP = one process with the same global batch, exact resume, SIGKILL in the middle of a save, and the
CLI's refusals. The real script runs in subprocesses; the loss test calls `train.main` in-process (the same loop,
without paying the imports five times)."""
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from conftest import ok, run_python
from minedit import checkpoint as ckpt
from minedit import data as data_module
from minedit import training
from minedit.errors import run_cli
from minedit.model import EditModel
from minedit.toy.world import generate

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
QUICK = ["--batch-size", "4", "--sample-every", "0", "--log_every=1"]
# The loss parts each (recipe, stage) must log (DESIGN §4): LLM, Q-Former alignment, IAA, diffusion.
PARTS = {("insightedit", 1): {"llm", "qformer", "iaa"}, ("insightedit", 2): {"llm", "iaa", "explicit", "diff"},
         ("insightedit", 3): {"iaa", "diff"}, ("smartedit", 1): {"llm", "qformer"}, ("smartedit", 2): {"llm", "diff"}}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small toy world (58 train edits, 116 captions) and 4-row manifests (= one batch) of each kind."""
    out = tmp_path_factory.mktemp("toyworld")
    generate(out, n=64, seed=1, size=32)
    for name in ("train", "captions"):
        rows = (out / f"{name}.jsonl").read_text().splitlines()[:4]
        (out / f"batch-{name}.jsonl").write_text("\n".join(rows) + "\n")
    return out


def run(*args, launcher=(TRAIN,), env=None) -> subprocess.CompletedProcess:
    """`python train.py ARGS` (or `python LAUNCHER... ARGS`) in a subprocess, from the repository root."""
    return run_python(*launcher, *args, env=env)


def user_error(p: subprocess.CompletedProcess | tuple, *words: str) -> str:
    """Exit 2, one `error:` line naming `words`, no traceback; returns that line."""
    code, stderr = (p.returncode, p.stderr) if isinstance(p, subprocess.CompletedProcess) else p
    assert code == 2, f"exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def read_log(run_dir) -> list[dict]:
    """log.jsonl's rows without `samples_s`: a timing, which differs between runs that compute the same."""
    rows = [json.loads(line) for line in Path(run_dir, "log.jsonl").read_text().splitlines()]
    for row in rows:
        assert row.pop("samples_s") > 0
    return rows


def final_weights(run_dir) -> dict:
    return ckpt.load_weights(ckpt.find_checkpoint(str(run_dir)))


def snapshot(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# 1. The hand-off chain: insightedit 1 -> 2 -> 3 and smartedit 1 -> 2, each stage --init from the previous folder
CHAIN = [("ie1", "insightedit", 1, None), ("ie2", "insightedit", 2, "ie1"), ("ie3", "insightedit", 3, "ie2"),
         ("se1", "smartedit", 1, None), ("se2", "smartedit", 2, "se1")]


@pytest.fixture(scope="module")
def chain(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    procs = {}
    for name, recipe, stage, init in CHAIN:
        manifest = world / ("captions.jsonl" if stage == 1 else "train.jsonl")
        start = ["--init", str(root / init)] if init else ["--recipe", recipe]
        procs[name] = run("--stage", str(stage), *start, "--data", str(manifest), "--out", str(root / name),
                          "--max-steps", "3", "--save-every", "2", *QUICK)
    return root, procs


@pytest.mark.slow
def test_stage_chain_hands_off_with_init(chain):
    root, procs = chain
    for name, recipe, stage, init in CHAIN:
        ok(procs[name])
        # a fresh run on models built from the config is warned that its frozen bases stay random; a stage --init
        # from a run is not warned again
        warned = [line for line in procs[name].stderr.splitlines() if "built at random and trained in no stage" in line]
        assert (len(warned), "vae" in "".join(warned)) == ((1, True) if init is None else (0, False)), name
        run_dir = root / name
        cfg = json.loads((run_dir / "config.json").read_text())
        assert (cfg["recipe"], cfg["stage"], cfg["max_steps"]) == (recipe, stage, 3)
        log = read_log(run_dir)
        assert [r["step"] for r in log] == [1, 2, 3]
        for row in log:
            parts = set(row) - {"step", "lr", "skipped", "samples_s", "loss"}
            assert parts == PARTS[(recipe, stage)], (name, row)
            assert row["lr"] > 0 or row["step"] == 3  # the cosine reaches 0 on the last step
            assert row["loss"] == pytest.approx(sum(row[k] for k in parts))
        assert (run_dir / "latest").read_text().strip() == "ckpt-0000003"
        assert {p.name for p in run_dir.glob("ckpt-*")} == {"ckpt-0000002", "ckpt-0000003"}
        assert (run_dir / "ckpt-0000003" / "weights.safetensors").is_file()
        assert ckpt.load_config(str(run_dir / "ckpt-0000003")).stage == stage
    # Stage 3 starts from stage 2's weights: what it freezes is carried bit for bit, what it trains has moved.
    w2, w3 = final_weights(root / "ie2"), final_weights(root / "ie3")
    frozen = [k for k in w2 if not k.startswith("iaa.") and ".processor." not in k]
    assert any(k.startswith("qformer.") for k in frozen) and all(torch.equal(w2[k], w3[k]) for k in frozen)
    for trained in ("iaa.mapper", "unet.ip"):
        keys = [k for k in w3 if k in w2 and (k.startswith("iaa.mapper") if trained == "iaa.mapper"
                                              else ".processor." in k)]
        assert keys and any(not torch.equal(w2[k], w3[k]) for k in keys), trained


@pytest.mark.slow
def test_stage3_image_branch_starts_from_stage2_unet(chain):
    """IP-Adapter's start, at the hand-off: the branch stage 3 trains first copies the layer it extends as stage 2
    left it, not as the model was built before stage 2 trained the UNet (to_k/to_v moved in between)."""
    root, procs = chain
    ok(procs["ie2"])
    args, overrides = train.parse_args(["--stage", "3", "--init", str(root / "ie2"), "--out", str(root / "unused")])
    cfg = train.resolve_config(args, overrides)
    model = train.build_model(cfg, args)
    w2 = final_weights(root / "ie2")
    torch.manual_seed(cfg.seed)
    built = EditModel(cfg).unet  # the UNet as the model is built, before stage 2's weights are loaded
    layers = [(name, m) for name, m in model.unet.named_modules() if name.endswith("attn2")]
    assert layers
    moved = 0
    for name, attn in layers:
        k2, v2 = w2[f"unet.{name}.to_k.weight"], w2[f"unet.{name}.to_v.weight"]
        assert torch.equal(attn.processor.to_k_ip.weight, k2) and torch.equal(attn.processor.to_v_ip.weight, v2)
        moved += not torch.equal(k2, built.get_submodule(name).to_k.weight)
    assert moved  # stage 2 did move them, so a copy taken at build time would have failed above


@pytest.mark.slow
def test_insightedit_stage2_refuses_a_smartedit_init(chain, world, tmp_path):
    root, procs = chain
    ok(procs["se1"])
    p = run("--recipe", "insightedit", "--stage", "2", "--init", str(root / "se1"), "--data",
            str(world / "train.jsonl"), "--out", str(tmp_path / "x"), "--max-steps", "1", *QUICK)
    user_error(p, "smartedit", "insightedit")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,words", [
    (["--stage", "3"], ["--stage 2", "--init"]),                         # stage 3 needs a stage-2 run first
    (["--stage", "1", "--no_such_field=1"], ["no_such_field"]),
    (["--stage", "1", "--stop-after", "0"], ["--stop-after"]),
])
def test_bad_invocations_exit_2_with_one_error_line(world, tmp_path, args, words):
    p = run(*args, "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "x"), "--max-steps", "1", *QUICK)
    user_error(p, *words)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------
# 2. Loss goes down: 50 steps on one fixed batch, every stage
@pytest.fixture
def in_process():
    """For calling train.main here: put back the signal handlers it installs and the thread count."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (see `run`)
    yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


@pytest.fixture
def pinned_draws(monkeypatch, in_process):
    """Every draw gets the random numbers of draw 0 (noise, t, VAE noise, dropout coin, epoch order) and no flip,
    so a 4-row manifest is the same batch at every step and the loss is a deterministic function of the weights:
    any decrease is the optimizer's."""
    draw_generator = training.draw_generator
    monkeypatch.setattr(training, "draw_generator", lambda seed, draw: draw_generator(seed, 0))
    monkeypatch.setattr(data_module.EditDataset, "_flip", lambda self, index, epoch, texts: False)


# The objective each stage exists for must fall at least in half.
MAIN_PART = {1: "qformer", 2: "diff", 3: "iaa"}


@pytest.mark.slow
def test_fifty_steps_lower_every_stage_loss_on_a_fixed_batch(world, tmp_path, pinned_draws):
    for name, recipe, stage, init in CHAIN:
        manifest = world / ("batch-captions.jsonl" if stage == 1 else "batch-train.jsonl")
        start = ["--init", str(tmp_path / init)] if init else ["--recipe", recipe]
        assert train.main(["--stage", str(stage), *start, "--data", str(manifest), "--out", str(tmp_path / name),
                           "--max-steps", "50", "--save-every", "1000", *QUICK]) == 0
        log = read_log(tmp_path / name)
        assert len(log) == 50
        first, last = log[0], log[-1]
        for part in PARTS[(recipe, stage)]:
            assert last[part] < first[part], (name, part, first[part], last[part])
        assert last[MAIN_PART[stage]] < 0.5 * first[MAIN_PART[stage]], (name, first, last)
        assert last["loss"] < 0.75 * first["loss"], (name, first["loss"], last["loss"])


# ---------------------------------------------------------------------------------------------------------------
# 3. DDP: torchrun with 2 CPU processes (gloo) = one process with the same global batch
@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(chain, world, tmp_path):
    root, procs = chain
    ok(procs["ie1"])
    # Adam normalises every element's step, so fp32 rounding in near-zero gradients becomes a difference of up to
    # ~lr per step in those elements: a small lr keeps that under the tolerance, while a real mismatch (a rank
    # seeing other samples, gradients not averaged) moves elements by ~lr per step.
    args = ["--stage", "2", "--init", str(root / "ie1"), "--data", str(world / "train.jsonl"), "--max-steps", "3",
            "--save-every", "100", "--lr=3e-5", "--sample-every", "0", "--log_every=1"]
    ok(run(*args, "--batch-size", "4", "--out", str(tmp_path / "one")))
    ddp = ok(run(*args, "--batch-size", "2", "--out", str(tmp_path / "ddp"),
                 launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", TRAIN)))
    assert "effective batch 4 = 2 per device × 1 accumulation × 2 process(es)" in ddp.stdout
    one, ddp, init = final_weights(tmp_path / "one"), final_weights(tmp_path / "ddp"), final_weights(root / "ie1")
    assert one.keys() == ddp.keys()
    worst = max((one[k] - ddp[k]).abs().max().item() for k in one)
    assert worst <= 1e-5
    moved = max((one[k] - init[k]).abs().max().item() for k in one if k.startswith("qformer."))
    assert moved > 5e-5  # the tolerance is small against how far training moved the weights
    # The logged losses are the global batch's (averaged over ranks), hence the same as one process's.
    for a, b in zip(read_log(tmp_path / "one"), read_log(tmp_path / "ddp"), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (k, a, b)


# ---------------------------------------------------------------------------------------------------------------
# 4. Exact resume: 6 steps straight = 3 steps (--stop-after) then --resume for 3, bit for bit
# (also with the optional training levers: the EMA's shadow and trained values both come back, and a
# teacher-forcing schedule that switches off after step 4 — inside the resumed half — switches off there too;
# and for SmartEdit, whose BIM and LLM LoRA train in stage 2)
LEVERS = ["--ema_decay=0.9", "--snr_gamma=5", "--mask_loss_weight=4", "--qformer_explicit_weight=1",
          "--qformer_teacher_forcing=1", "--qformer_teacher_forcing_steps=4", "--t2i_share=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("init, levers", [("ie1", []), ("ie1", LEVERS), ("se1", [])],
                         ids=["plain", "ema-minsnr-mask-forcing-t2i", "smartedit"])
def test_resume_is_bit_exact(chain, world, tmp_path, init, levers):
    root, procs = chain
    ok(procs[init])
    args = ["--stage", "2", "--init", str(root / init), "--data", str(world / "train.jsonl"), "--max-steps", "6",
            "--save-every", "3", "--lora_dropout=0.1", *QUICK, *levers]  # dropout: the global RNG matters too
    ok(run(*args, "--out", str(tmp_path / "straight")))
    half = ok(run(*args, "--out", str(tmp_path / "split"), "--stop-after", "3"))
    assert "stopped by --stop-after at step 3 of 6" in half.stdout
    assert (tmp_path / "split" / "latest").read_text().strip() == "ckpt-0000003"
    ok(run("--resume", "--data", str(world / "train.jsonl"), "--out", str(tmp_path / "split")))
    assert read_log(tmp_path / "split") == read_log(tmp_path / "straight")  # same losses and lr, step by step
    for f in ("weights.safetensors", "state.safetensors"):  # weights, Adam moments, RNG state
        a = load_file(tmp_path / "straight" / "ckpt-0000006" / f)
        b = load_file(tmp_path / "split" / "ckpt-0000006" / f)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


# ---------------------------------------------------------------------------------------------------------------
# 5. SIGKILL in the middle of a save: the previous checkpoint stays loadable and the run resumes
# Runs train.py with safetensors' save_file patched: its KILL_AT-th call writes half a file, then the process
# SIGKILLs itself. With --save-every 1 the calls are: 1 weights, 2 state (ckpt 1); 3 weights, 4 state (ckpt 2).
KILLER = """
import os, runpy, signal, sys
import safetensors.torch as st
real, calls = st.save_file, [0]
def save_file(tensors, path, *args, **kwargs):
    calls[0] += 1
    real(tensors, path, *args, **kwargs)
    if calls[0] == int(os.environ["KILL_AT"]):
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
st.save_file = save_file
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 4], ids=["in-weights", "in-state"])
def test_sigkill_during_save_keeps_previous_checkpoint(world, tmp_path, kill_at):
    out = tmp_path / "run"
    args = ["--stage", "1", "--data", str(world / "captions.jsonl"), "--out", str(out), "--max-steps", "4",
            "--save-every", "1", *QUICK]
    p = run(*args, launcher=("-c", KILLER, TRAIN), env={"KILL_AT": str(kill_at)})
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert (out / ".ckpt-0000002.tmp").is_dir()  # killed half-way through writing checkpoint 2
    assert (out / "latest").read_text().strip() == "ckpt-0000001"
    where = ckpt.find_checkpoint(str(out))
    assert where == str(out / "ckpt-0000001")
    weights = ckpt.load_weights(where)
    assert any(k.startswith("qformer.") for k in weights)
    assert ckpt.load_state(where)["step"] == 1
    ok(run("--resume", *args))
    assert (out / "latest").read_text().strip() == "ckpt-0000004"
    assert not list(out.glob(".ckpt-*"))  # the half-written folder was cleared by the next save
    assert ckpt.load_state(ckpt.find_checkpoint(str(out)))["step"] == 4
    assert [r["step"] for r in read_log(out)] == [1, 2, 3, 4]  # step 2, logged before the kill, not twice


# ---------------------------------------------------------------------------------------------------------------
# 6. --out already holding a run
def test_out_holding_a_run_is_refused_unless_overwrite(world, tmp_path, capsys, in_process):
    out = tmp_path / "run"
    args = ["--stage", "1", "--data", str(world / "batch-captions.jsonl"), "--out", str(out), "--save-every", "1",
            *QUICK]
    assert train.main([*args, "--max-steps", "2"]) == 0
    before = snapshot(out)
    assert {"config.json", "log.jsonl", "latest", "ckpt-0000002/weights.safetensors"} <= set(before)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, [*args, "--max-steps", "1"])
    user_error((e.value.code, capsys.readouterr().err), "already holds a run", "--resume", "--overwrite")
    assert snapshot(out) == before  # not a byte changed
    with pytest.raises(SystemExit) as e:
        run_cli(train.main, [*args, "--max-steps", "1", "--overwrite"])
    assert e.value.code == 0
    assert json.loads((out / "config.json").read_text())["max_steps"] == 1
    assert [r["step"] for r in read_log(out)] == [1]  # the old log is gone, not appended to
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000001"]
