"""The sampling flags infer.py and evaluate.py share (minedit/sampling_flags.py): one declaration, one check,
one "settings from the flags and the checkpoint"."""
import argparse

import pytest

import evaluate
import infer
from minedit.presets import preset
from minedit.errors import UserError
from minedit.sampling_flags import add_sampling_flags, check_sampling_flags, sampling_settings

SAMPLING = ["--steps", "7", "--seed", "3", "--scheduler", "EulerDiscreteScheduler", "--text-guidance", "2.5",
            "--image-guidance", "1.25", "--ip-scale", "0.5", "--no-topt", "--no-vinsight"]
DESTS = ("steps", "seed", "scheduler", "text_guidance", "image_guidance", "ip_scale", "no_topt", "no_vinsight")


def parse(argv):
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    return p.parse_args(argv)


def test_both_scripts_take_the_same_sampling_flags():
    got = [infer.parse_args(SAMPLING), evaluate.parse_args(["--data", "x.jsonl", *SAMPLING])]
    for a in got:
        assert {d: getattr(a, d) for d in DESTS} == dict(steps=7, seed=3, scheduler="EulerDiscreteScheduler",
                                                         text_guidance=2.5, image_guidance=1.25, ip_scale=0.5,
                                                         no_topt=True, no_vinsight=True)
    defaults = [infer.parse_args([]), evaluate.parse_args(["--data", "x.jsonl"])]
    assert [{d: getattr(a, d) for d in DESTS} for a in defaults] == [vars(parse([]))] * 2


def test_flags_left_out_keep_the_checkpoints_settings():
    cfg = preset("insightedit", "toy", 3)
    assert sampling_settings(cfg, parse([]), "ck") == dict(steps=cfg.steps, scheduler=cfg.scheduler,
                                                           text_guidance=cfg.text_guidance,
                                                           image_guidance=cfg.image_guidance, ip_scale=cfg.ip_scale)
    given = sampling_settings(cfg, parse(["--steps", "3", "--text-guidance", "0", "--ip-scale", "0.25"]), "ck")
    assert (given["steps"], given["text_guidance"], given["ip_scale"]) == (3, 0.0, 0.25)  # 0 is a value, not unset
    assert (given["scheduler"], given["image_guidance"]) == (cfg.scheduler, cfg.image_guidance)


def test_mind_edit_ablations():
    cfg = preset("mindedit", "toy", 2)
    assert sampling_settings(cfg, parse([]), "ck")["use_topt"] is True
    s = sampling_settings(cfg, parse(["--no-topt", "--no-vinsight", "--ip-scale", "0.7"]), "ck")
    assert (s["use_topt"], s["ip_scale"]) == (False, 0.0)  # --no-vinsight wins over --ip-scale
    with pytest.raises(UserError, match="MIND-Edit ablations; runs/x is a insightedit model — drop the flag"):
        sampling_settings(preset("insightedit", "toy", 3), parse(["--no-vinsight"]), "runs/x")
    assert "use_topt" not in sampling_settings(preset("insightedit", "toy", 3), parse([]), "ck")


@pytest.mark.parametrize("argv,words", [
    (["--steps", "0"], "--steps 0: must be at least 1"),
    (["--text-guidance", "nan"], "--text-guidance nan: must be a finite number >= 0"),
    (["--image-guidance", "-1"], "--image-guidance -1.0: must be a finite number >= 0"),
    (["--ip-scale", "inf"], "--ip-scale inf: must be a finite number >= 0"),
    (["--scheduler", "FastScheduler"], "--scheduler FastScheduler: not a diffusers scheduler class"),
    (["--scheduler", "UNet2DModel"], "--scheduler UNet2DModel: not a diffusers scheduler class"),
    (["--scheduler", ""], "--scheduler : not a diffusers scheduler class"),
])
def test_bad_values_fail_with_one_line(argv, words):
    with pytest.raises(UserError, match=words):
        check_sampling_flags(parse(argv))


def test_good_values_pass():
    check_sampling_flags(parse(SAMPLING))
    check_sampling_flags(parse(["--text-guidance", "0", "--image-guidance", "0", "--ip-scale", "0"]))
