"""The sampling flags infer.py and evaluate.py share: declared, checked and turned into the sampler's settings here.

    --steps --seed --scheduler --text-guidance --image-guidance --ip-scale --no-topt --no-vinsight

A flag left out keeps the checkpoint's value (its config's steps, scheduler, guidance scales and ip_scale), so
an edit made with no flags is the edit the run was trained and validated with. The checks run before anything
is loaded: a bad flag costs no model load and writes nothing. The settings dict is what sampler.edit takes as
keyword arguments, and what evaluate.py stamps on a folder of edits (edits.json).
"""
from __future__ import annotations

import math

from .errors import UserError


def add_sampling_flags(p, seed: bool = True) -> None:
    """Declare the shared flags on an argparse parser (seed=False: the caller declares its own seeds)."""
    p.add_argument("--steps", type=int)
    if seed:
        p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scheduler", help="a diffusers scheduler class name, e.g. DDIMScheduler")
    p.add_argument("--text-guidance", type=float)
    p.add_argument("--image-guidance", type=float)
    p.add_argument("--ip-scale", type=float)
    p.add_argument("--no-topt", action="store_true", help="mindedit: condition on the raw instruction, not the "
                   "MLLM's optimized one (MIND-Edit Table 2 #2, v_insight only)")
    p.add_argument("--no-vinsight", action="store_true", help="mindedit: drop v_insight, i.e. --ip-scale 0 "
                   "(MIND-Edit Table 2 #1, T_opt only)")


def check_sampling_flags(a) -> None:
    """Each flag's own range, before the checkpoint is read (the MIND-Edit-only flags are checked against it in
    sampling_settings)."""
    if a.steps is not None and a.steps <= 0:
        raise UserError(f"--steps {a.steps}: must be at least 1")
    for name in ("text_guidance", "image_guidance", "ip_scale"):
        v = getattr(a, name)
        if v is not None and not (math.isfinite(v) and v >= 0):
            raise UserError(f"--{name.replace('_', '-')} {v}: must be a finite number >= 0")
    if a.scheduler is not None:  # "" too: it would be stamped into the results as the scheduler used
        import diffusers

        cls = getattr(diffusers, a.scheduler, None)
        if cls is None or not a.scheduler.endswith("Scheduler") or not hasattr(cls, "from_config"):
            raise UserError(f"--scheduler {a.scheduler}: not a diffusers scheduler class — e.g. DDIMScheduler or "
                            "EulerAncestralDiscreteScheduler")


def sampling_settings(cfg, a, ckpt: str) -> dict:
    """The sampler's settings: the checkpoint's config `cfg`, overridden by the flags given. `ckpt` names the
    checkpoint in the error for a MIND-Edit flag on another recipe."""
    pick = lambda name: getattr(cfg, name) if getattr(a, name) is None else getattr(a, name)  # noqa: E731
    settings = {name: pick(name) for name in ("steps", "scheduler", "text_guidance", "image_guidance", "ip_scale")}
    if (a.no_topt or a.no_vinsight) and not cfg.uses_vision_head:
        raise UserError(f"--no-topt / --no-vinsight are MIND-Edit ablations; {ckpt} is a {cfg.recipe} model "
                        "— drop the flag")
    if a.no_vinsight:
        settings["ip_scale"] = 0.0
    if cfg.uses_vision_head:
        settings["use_topt"] = not a.no_topt
    return settings
