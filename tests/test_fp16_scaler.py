"""train.py under fp16 + GradScaler (a CUDA-only path, run here on the CPU's fp16 autocast with a CPU GradScaler):
the scaler's overflow skips early in a run are not the non-finite losses that stop a run (issue 19)."""
import json

import pytest
import torch

import train
from minedit import runtime
from minedit.toy.world import generate


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """runtime.setup refuses fp16 on the CPU (no GradScaler there in practice); here it hands back an fp16 CPU
    runtime whose scaler starts at 2**40, so that the first steps' scaled gradients overflow fp16."""
    monkeypatch.setattr(runtime, "setup", lambda precision, device=None: runtime.Runtime(torch.device("cpu"),
                                                                                         precision))
    monkeypatch.setattr(runtime.Runtime, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 40))


def test_scaler_overflow_skips_do_not_stop_the_run(tmp_path, fp16_on_cpu):
    generate(tmp_path / "world", n=8, seed=1, size=32)
    out = tmp_path / "run"
    assert train.main(["--recipe", "ip2p", "--stage", "2", "--data", str(tmp_path / "world" / "train.jsonl"),
                       "--out", str(out), "--max-steps", "6", "--batch-size", "2", "--precision=fp16",
                       "--nan_patience=3", "--sample-every", "0", "--log_every=1", "--device", "cpu"]) == 0
    rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 2, 3, 4, 5, 6]  # every step overflowed: 6 > nan_patience in a row
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    from minedit import checkpoint

    state = checkpoint.load_state(checkpoint.find_checkpoint(str(out)))
    assert state["skipped"] == 6 and state["scaler"]["scale"] == 2.0 ** 34  # halved once per overflow
