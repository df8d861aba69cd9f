"""bench/memory.py: its weights arithmetic equals what a real stage allocates, and its shape-only step measures
what the computed step allocates. (The full-size figures are measurements: see bench/RESULTS.md.)"""
import re
from pathlib import Path

import pytest
import torch

from minedit import runtime
from minedit.model import EditModel
from minedit.presets import preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def memory(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import memory

    return memory


def nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("recipe, stage", [("insightedit", 2), ("smartedit", 1)])
def test_weights_row_is_what_a_real_stage_allocates(memory, recipe, stage):
    """The meta arithmetic (frozen in bf16, trainable fp32, fp32 grads, two fp32 AdamW moments) against a real toy
    model after set_stage and one optimizer step."""
    cfg = preset(recipe, "toy", stage)
    cfg.precision = "bf16"
    w = memory.weights_row(EditModel(cfg, meta=True), stage)

    torch.manual_seed(0)
    model = EditModel(cfg)
    model.set_stage(stage, torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert nbytes(trainable) == w["trainable_bytes"]
    assert nbytes(frozen) + nbytes(model.buffers()) == w["frozen_bytes"]
    # the dry-run table counts r new rows of each [MM] matrix; the allocation holds them whole
    r = cfg.num_mm_tokens
    whole = sum((p.shape[0] - r) * p.shape[1] for name, p in model.named_parameters()
                if model.part_of(name) == "mm_rows")
    assert whole > 0 and w["trainable_params"] == w["table_trainable"] + whole

    rt = runtime.Runtime(device=torch.device("cpu"), precision="bf16")
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    with rt.autocast():
        loss, _ = model(memory.make_batch(cfg, 1, rt.device), stage)
    loss.backward()
    assert nbytes(p.grad for p in trainable) == w["grad_bytes"]
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert nbytes(state) == w["adamw_bytes"]


def test_shape_only_step_measures_what_the_computed_step_allocates(memory):
    """--check's rows: the Ledger's shape-only step agrees with the computed one (peak to 1 %, held to 3 %)."""
    rows = memory.check_rows({"insightedit": [2]}, lambda msg: None)
    assert [r["ckpt"] for r in rows] == [False, True]
    for r in rows:
        a, b = r["computed"], r["shape_only"]
        assert a["peak"] > 0 and abs(a["peak"] - b["peak"]) <= 0.01 * a["peak"], r
        assert abs(a["held"] - b["held"]) <= 0.03 * a["held"], r  # held varies by ~1 % from run to run
    plain, ckpt = rows
    assert ckpt["computed"]["held"] < plain["computed"]["held"]  # checkpointing keeps less for backward


def test_weights_table_prints_every_recipe_stage(memory, capsys):
    assert memory.main(["--no-measure", "--recipes", "ip2p,insightedit:3"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) · (\d) \| (\d+) \| (\d+) \|", out, re.M)
    assert [(r, int(s)) for r, s, *_ in rows] == [("ip2p", 2), ("insightedit", 3)]
