"""The config explains itself: every field carries its help text and says whether checkpoints depend on it;
`train.py --help` lists every field with its default; the toy/full choice has one name (--preset)."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

import train
from minedit import checkpoint
from minedit.config import ARCH_FIELDS, HELP, Config, ConfigError
from minedit.confighelp import field_help
from minedit.errors import UserError
from minedit.presets import apply_overrides, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_field_is_classified_and_documented():
    for f in dataclasses.fields(Config):
        assert f.metadata.get("arch") in (True, False), f"{f.name}: declare it with arch(...) or setting(...)"
        assert f.metadata.get("help", "").strip(), f"{f.name} has no help text"
    assert set(HELP) == {f.name for f in dataclasses.fields(Config)}


def test_architecture_fields_are_the_marked_ones():
    marked = {f.name for f in dataclasses.fields(Config) if f.metadata["arch"]}
    assert set(ARCH_FIELDS) == marked
    # The shapes of trained weights depend on these ...
    assert {"recipe", "llm_hidden", "num_mm_tokens", "unet_channels", "lora_rank", "bim", "iaa_tokens"} <= marked
    # ... and not on how a run trains or samples, nor on where its base weights were read from.
    for name in ("snr_gamma", "mask_loss_weight", "ema_decay", "toy_samples", "lr", "stage", "steps",
                 "lora_dropout", "mllm_path", "text_guidance"):
        assert name not in marked, name


def test_a_training_field_does_not_block_a_checkpoint_but_an_architecture_field_does():
    saved = preset("insightedit", "toy", 2)
    current = dataclasses.replace(saved, toy_samples=10, ema_decay=0.99, snr_gamma=5.0, lr=5e-4)
    checkpoint.check_compatible(saved, current)
    with pytest.raises(UserError, match="qformer_layers"):
        checkpoint.check_compatible(saved, dataclasses.replace(saved, qformer_layers=3))


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        train.parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", ["insightedit", "mindedit"])
def test_train_help_lists_every_field_with_its_default(capsys, recipe):
    text = help_text(capsys, "--recipe", recipe)
    toy, full = preset(recipe, "toy"), preset(recipe, "full")
    for f in dataclasses.fields(Config):
        value = getattr(toy, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        line = re.search(rf"^    --{f.name}=(\S*)", text, flags=re.M)
        assert line and line.group(1) == shown, f"--{f.name} missing or wrong default in --help"
        block = re.split(r"\n    --|\n\n", text[line.start():])[0]  # the field's line and its continuations
        assert " ".join(HELP[f.name].split()[:3]) in " ".join(block.split()), f.name
        assert ("[arch]" in block) == (f.name in ARCH_FIELDS), f.name
        if f.name not in ("preset",) and getattr(full, f.name) != value:
            assert "[full:" in block, f.name
    assert all(len(line) <= 120 for line in text.splitlines())


def test_field_help_differs_per_recipe():
    assert "--vision_head_layer=3" in field_help("mindedit")
    assert "llava-onevision" in field_help("mindedit") and "llava-onevision" not in field_help("insightedit")


def test_preset_is_the_one_name_for_toy_or_full():
    args, overrides = train.parse_args(["--preset", "full", "--stage", "2", "--dry-run"])
    cfg = train.resolve_config(args, overrides)
    assert cfg.preset == "full" and cfg.llm_hidden == 4096 and cfg.mllm_path
    args, overrides = train.parse_args(["--preset=toy", "--stage", "1"])
    assert train.resolve_config(args, overrides).llm_hidden == preset("insightedit", "toy").llm_hidden
    with pytest.raises(ConfigError, match="--config is now called --preset"):
        apply_overrides(preset(), ["--config", "full"])


def test_tuple_fields_read_their_items_as_scalar_flags_of_that_type_are_read():
    """A tuple of booleans takes true/false/1/0/yes/no/on/off in any case, like every boolean flag, and a tuple of
    integers integers; a bad item names the field and shows its default's form."""
    cfg = apply_overrides(preset("ip2p", "toy"), ["--unet_cross_attn_blocks=true,True,1",
                                                  "--unet_channels=(64, 128,128)"])
    assert cfg.unet_cross_attn_blocks == (True, True, True) and cfg.unet_channels == (64, 128, 128)
    assert all(type(v) is bool for v in cfg.unet_cross_attn_blocks)
    cfg = apply_overrides(cfg, ["--unet_cross_attn_blocks=off,yes,FALSE"])
    assert cfg.unet_cross_attn_blocks == (False, True, False)
    with pytest.raises(ConfigError, match=r"--unet_channels=64,wide: expected a tuple like 320,640,1280,1280"):
        apply_overrides(cfg, ["--unet_channels=64,wide"])
    with pytest.raises(ConfigError, match=r"expected a tuple like true,true,true,false"):
        apply_overrides(cfg, ["--unet_cross_attn_blocks=2,0,1"])


@pytest.mark.slow
def test_old_config_flag_fails_in_one_line_naming_the_new_one():
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", "full", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == ["error: --config is now called --preset (same values) — write --preset"]


def test_shipped_checkpoint_config_still_loads():
    cfg = checkpoint.load_config(os.path.join(ROOT, "assets", "toy", "insightedit"))
    assert (cfg.recipe, cfg.preset) == ("insightedit", "toy")
    checkpoint.check_compatible(cfg, preset("insightedit", "toy", cfg.stage))
