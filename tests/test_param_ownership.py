"""What each stage trains, saves and weight-decays is pinned: the checkpoint key set (with shapes) of every
recipe × stage, for base models built from the config (the toy world: the bases are saved too) and loaded by path,
and the two AdamW groups in order. tests/data/param_fingerprints.json was computed on the code before EditModel
was composed from its parts (which ask each part for its parameters instead of matching parameter names), so a
shipped checkpoint keeps loading and a resumed optimizer keeps its parameter order.

Each entry is a count and a sha256 of the sorted `name shape` lines (the group lists in parameter order); on a
mismatch the test names the top-level modules whose counts moved."""
import copy
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from minedit import training
from minedit.parts.decoupled_attention import decoupled_state_dict
from minedit.conditions import guidance_dropout
from minedit.parts.lora import lora_state_dict
from minedit.parts.mm_tokens import mm_row_params
from minedit.presets import preset
from minedit.model import STAGE_TRAINABLE, EditModel

FIXTURE = Path(__file__).parent / "data" / "param_fingerprints.json"
VARIANTS = {"insightedit": ("insightedit", {}), "smartedit": ("smartedit", {}), "ip2p": ("ip2p", {}),
            "smartedit-nobim": ("smartedit", {"bim": False}), "mindedit": ("mindedit", {}),
            "mindedit-text": ("mindedit", {"mind_losses": "text"}),
            "mindedit-embed": ("mindedit", {"mind_losses": "embed"})}


def _fingerprint(lines: list[str]) -> dict:
    tops = Counter(line.split(".")[0].split(" ")[0] for line in lines)
    return {"n": len(lines), "sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(), "tops": dict(tops)}


def _model(variant: str) -> EditModel:
    recipe, overrides = VARIANTS[variant]
    cfg = preset(recipe, "toy")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return EditModel(cfg)


def fingerprints(variant: str) -> dict:
    """{"STAGE/config|path": checkpoint keys, "STAGE/decay|plain": AdamW group names in order}."""
    model = _model(variant)
    out = {}
    for stage in model.cfg.stages:
        for bases, path in (("config", ""), ("path", "/somewhere")):
            model.cfg = copy.copy(model.cfg)  # only checkpoint_state reads the paths: a loaded base is not saved
            model.cfg.mllm_path = model.cfg.sd_path = model.cfg.clip_path = path
            keys = model.checkpoint_state(stage)
            out[f"{stage}/{bases}"] = _fingerprint(sorted(f"{k} {tuple(v.shape)}" for k, v in keys.items()))
        model.cfg.mllm_path = model.cfg.sd_path = model.cfg.clip_path = ""
        model.set_stage(stage)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {g["weight_decay"] > 0: [names[id(p)] for p in g["params"]]
                  for g in training.param_groups(model, 0.01)}
        for on, kind in ((True, "decay"), (False, "plain")):
            out[f"{stage}/{kind}"] = _fingerprint(groups.get(on, []))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_keys_and_decay_groups_are_as_before(variant):
    expected = json.loads(FIXTURE.read_text())[variant]
    got = fingerprints(variant)
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        moved = {t: (want["tops"].get(t, 0), have["tops"].get(t, 0)) for t in want["tops"].keys() | have["tops"].keys()
                 if want["tops"].get(t, 0) != have["tops"].get(t, 0)}
        assert have == want, f"{variant} {key}: {want['n']} -> {have['n']} names; moved (before, now): {moved}"


def test_fixture_covers_every_recipe_and_stage():
    pinned = json.loads(FIXTURE.read_text())
    seen = {(VARIANTS[v][0], int(k.split("/")[0])) for v in pinned for k in pinned[v]}
    assert seen == set(STAGE_TRAINABLE)


def test_each_part_owns_what_its_api_names():
    """The map agrees with the parts' own APIs: a LoRA adapter is never "mllm", a to_k_ip never "unet"."""
    model = _model("insightedit")
    owned = lambda part: {n for n, p in model.part_names.items() if p == part}  # noqa: E731
    assert owned("lora") == {f"mllm.{k}" for k in lora_state_dict(model.mllm)}
    assert owned("unet.ip") == {f"unet.{k}" for k in decoupled_state_dict(model.unet)}
    params = dict(model.named_parameters())
    assert {id(params[n]) for n in owned("mm_rows")} == {id(p) for p in mm_row_params(model.mllm)}
    assert owned("iaa.mapper") == {f"iaa.mapper.{k}" for k, _ in model.iaa.mapper.named_parameters()}
    assert set(model.part_names) == set(params)


def test_guidance_dropout_splits_the_unit_interval():
    """p_t = 0.1, p_i = 0.2, p_b = 0.3: [0, .1) text, [.1, .3) image, [.3, .6) both, [.6, 1) neither."""
    u = torch.tensor([0.0, 0.099, 0.1, 0.299, 0.3, 0.599, 0.6, 0.999])
    text, image = guidance_dropout(u, 0.1, 0.2, 0.3)
    assert text.tolist() == [True, True, False, False, True, True, False, False]
    assert image.tolist() == [False, False, True, True, True, True, False, False]


if __name__ == "__main__":  # `PYTHONPATH=. python3 tests/test_param_ownership.py`: only for an intended change
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({v: fingerprints(v) for v in VARIANTS}, indent=1, sort_keys=True) + "\n")
