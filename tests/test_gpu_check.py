"""bench/gpu_check.py (issue 19): its CPU mode end to end, so the GPU check cannot rot while no GPU is at hand;
its per-part time limit; gpu_check.sh's install of a carried diffusers wheel."""
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import summary  # noqa: E402


def env_for(tmp_path, **extra):
    return {"OMP_NUM_THREADS": "1", "MINEDIT_CACHE": str(tmp_path / "cache"), "PATH": os.environ["PATH"],
            "HOME": str(tmp_path), **extra}


@pytest.mark.slow
def test_cpu_mode_runs_every_part_and_writes_its_figures(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--out", str(out),
                        "--recipes", "ip2p,mindedit"], cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["log.txt", "results.json", "summary.md"]  # the part files are gone
    res = json.loads((out / "results.json").read_text())
    assert {k: v["status"] for k, v in res["parts"].items()} == dict.fromkeys(gpu_check.PARTS, "ok")
    assert res["parts"]["env"]["versions"]["torch"].startswith(str(__import__("torch").__version__)[:4])

    toy = res["parts"]["toy"]["figures"]
    assert [(r["recipe"], r["stage"]) for r in toy] == [("ip2p", 2), ("mindedit", 1), ("mindedit", 2)]
    for r in toy:
        for precision in ("bf16", "fp16"):  # two steps on a fixed batch lower its loss, no scaler skips at toy size
            assert r[precision]["after"] < r[precision]["before"] and r[precision]["skipped"] == 0
        assert r["fp16"]["scale"] == 65536.0 and r["bf16"]["scale"] is None
        assert "_scaled_dot_product_flash_attention_for_cpu" in r["attention"]["kernels"]
        assert r["attention"]["fused_only"] == "ok" and not r["attention"]["math"]
        if r["stage"] == 2:  # on the CPU the "device" fp32 edit is the reference itself; bf16 is close, not equal
            assert r["edit"]["fp32"]["max"] == 0.0
            assert 0 < r["edit"]["bf16"]["mean"] <= 0.03
    latency = res["parts"]["latency"]["figures"]["results"][0]
    assert latency["size"] == "toy" and latency["forwards"] == [1] and latency["ours_total"] > 0
    train = res["parts"]["train"]["figures"]
    assert train["grad_checkpointing"] and train["results"][0]["batch"] == 2 and train["results"][0]["bare"] > 0
    memory = res["parts"]["memory"]["figures"]["measured"][0]
    assert memory["size"] == "toy" and [r["batch"] for r in memory["runs"]["ckpt"]] == [1, 2]

    text = (out / "summary.md").read_text()
    assert "| toy correctness, every recipe × stage" in text and "3 of 3 pass | passed |" in text
    assert "## Memory: measured against bench/memory.py's model" in text and "| yes | 2 |" in text
    assert "| ≥ 25 stage-2 samples/s (toy, batch 2, bf16, gradient checkpointing) |" in text
    assert "| – (the target is for full size) |" in text and "| met |" not in text
    assert text in (out / "log.txt").read_text()  # the summary is also printed last


def test_a_hanging_part_is_killed_at_its_limit_and_keeps_its_output(tmp_path):
    lines = []
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"]
    t0 = time.perf_counter()
    res = gpu_check.finish(*gpu_check.start(cmd, lines.append, "hang"), limit=2)
    assert res["status"] == "timeout" and time.perf_counter() - t0 < 30
    assert res["output"] == "started" and lines == ["[hang] started"]
    failed = gpu_check.finish(*gpu_check.start([sys.executable, "-c", "raise SystemExit(3)"], lines.append, "x"), 30)
    assert failed["status"] == "failed" and failed["rc"] == 3


def test_a_toy_part_stopped_at_its_limit_keeps_the_rows_it_finished(tmp_path, monkeypatch, capsys):
    # On the first H200 the toy part ran out of its limit after 7 of 8 rows and its figures were lost (written at
    # the end only); now each row is printed and saved as it finishes, and the summary says the part is incomplete.
    import gpu_toy

    def fake_check(recipe, stage, device, args, work):
        if len(calls) == 1:
            raise KeyboardInterrupt  # stands in for the SIGKILL at the part's limit
        calls.append((recipe, stage))
        ok = dict(before=1.0, after=0.5, skipped=0, ok=True)
        return dict(recipe=recipe, stage=stage, bf16=ok, fp16=ok, ok=True, seconds=1.0,
                    attention=dict(kernels=["_scaled_dot_product_flash_attention_for_cpu"], fused_only="ok"))
    calls = []
    monkeypatch.setattr(gpu_toy, "check_one", fake_check)
    with pytest.raises(KeyboardInterrupt):
        gpu_toy.main(["--device", "cpu", "--recipes", "ip2p,mindedit", "--json", str(tmp_path / "toy.json")])
    rows = json.loads((tmp_path / "toy.json").read_text())
    assert [(r["recipe"], r["stage"]) for r in rows] == calls == [("ip2p", 2)]
    assert "| ip2p · 2 | 1.0000 → 0.5000 | 1.0000 → 0.5000 | flash_attention_for_cpu | ok | – | – | 1.0 | yes |" \
        in capsys.readouterr().out
    results = {"parts": {"toy": {"status": "timeout", "figures": rows}}}
    assert summary.toy_rows(results)[0].endswith("| 1 of 1 pass, then the part's time limit | incomplete |")
    assert results["parts"]["toy"]["passed"] is False


def test_summary_copies_each_printed_table_with_its_title():
    out = summary.tables("noise\nTitle one\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|\nafter")
    assert out == "Title one\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n| c |\n|---|"


def fake_wheel(folder: Path, version: str = "0.0.1") -> Path:
    """A minimal pure-Python wheel of a package named diffusers (no network: the mechanism, not the package)."""
    folder.mkdir()
    path = folder / f"diffusers-{version}-py3-none-any.whl"
    info = f"diffusers-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("diffusers/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: diffusers\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def test_sh_installs_the_carried_wheel_when_diffusers_is_missing(tmp_path):
    shadow = tmp_path / "shadow" / "diffusers"  # makes `import diffusers` fail, as on the GPU machine
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('diffusers is not installed here')\n")
    env = env_for(tmp_path, PYTHONPATH=str(shadow.parent), MINEDIT_WHEELS=str(tmp_path / "none"),
                  MINEDIT_SITE=str(tmp_path / "site"))
    sh = ["bash", "bench/gpu_check.sh", "--device", "cpu", "--parts", "env", "--out", str(tmp_path / "out")]
    p = subprocess.run(sh, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: diffusers is not installed") and "Traceback" not in \
        p.stderr and "--fetch-wheels" in p.stderr

    fake_wheel(tmp_path / "none")
    p = subprocess.run(sh, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    versions = json.loads((tmp_path / "out" / "results.json").read_text())["parts"]["env"]["versions"]
    assert versions["diffusers"] == "0.0.1" and versions["diffusers_from"] == str(tmp_path / "site" / "diffusers")


def test_train_overhead_steps_fp16_through_the_grad_scaler():
    """The bare fp16 step scales the loss and steps through the GradScaler, as train.py does (without one, fp16
    gradients underflow): run on the CPU under fp16 autocast with a CPU GradScaler."""
    import torch

    import gpu_toy
    import train_overhead
    from minedit import runtime

    rt = runtime.Runtime(device=torch.device("cpu"), precision="fp16")
    model = gpu_toy.build("ip2p", 2, rt)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    scaler = rt.grad_scaler()
    train_overhead.bare_seconds_per_step(model, [gpu_toy.fixed_batch(model.cfg)], optimizer, rt, 1, None, scaler)
    assert scaler.get_scale() == 65536.0 and scaler._get_growth_tracker() == 2  # two finite steps, both updated
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_memory_max_batch_must_be_a_power_of_two(capsys):
    import memory
    from minedit.errors import UserError

    with pytest.raises(UserError, match="--max-batch 12: must be a power of two"):
        memory.main(["--max-batch", "12", "--no-measure"])
