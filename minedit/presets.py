"""How a run's Config is made: the `toy` and `full` preset of each recipe, then `--field=value` overrides.

    cfg = apply_overrides(preset("insightedit", "toy"), ["--lr=1e-4"]).validate()

The full presets name the papers' models by hub id and keep the architecture defaults declared in config.py
(SD1.5 / InstructPix2Pix, LLaVA-1.5-7B; LLaVA-OneVision-7B for MIND-Edit). The toy presets shrink every part
so that a recipe trains from scratch on a CPU (DESIGN §10). Overrides use the field names as they are, are
parsed by the field's declared type, and an unknown field is an error that suggests close names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields

from .config import PRESETS, RECIPES, Config, ConfigError

RENAMED = {"config": "preset"}  # flags of earlier versions -> today's name (refused with a pointer to it)


# Full-size presets: the real models by hub id (DESIGN §6); the architecture fields above are their defaults.
_FULL = dict(
    mllm_path="llava-hf/llava-1.5-7b-hf",
    sd_path="timbrooks/instruct-pix2pix",
    clip_path="openai/clip-vit-large-patch14",
)
# MIND-Edit's MLLM is LLaVA-OneVision-7B (Qwen2-7B, 28 layers, SigLIP vision tower); m = 21.
_FULL_MINDEDIT = dict(
    _FULL, mllm_path="llava-hf/llava-onevision-qwen2-7b-ov-hf", llm_vocab=152000, llm_hidden=3584,
    llm_intermediate=18944, llm_layers=28, llm_heads=28, llm_kv_heads=4, llm_max_positions=32768,
    vision_hidden=1152, vision_intermediate=4304, vision_layers=26, vision_heads=16, vision_image_size=384,
    vision_patch=14, vision_feature_layer=-1, vision_head_layer=21,
)

# Toy presets: every part tiny, built from these fields, trainable from scratch on a CPU (DESIGN §10).
_TOY = dict(
    llm_vocab=512, llm_hidden=128, llm_intermediate=256, llm_layers=4, llm_heads=4, llm_kv_heads=4,
    llm_max_positions=256, vision_hidden=64, vision_intermediate=128, vision_layers=2, vision_heads=4,
    vision_image_size=32, vision_patch=4,
    text_vocab=512, text_hidden=64, text_intermediate=128, text_layers=2, text_heads=4, text_max_length=24,
    clip_hidden=64, clip_intermediate=128, clip_layers=2, clip_heads=4, clip_image_size=32, clip_patch=4,
    clip_embed_dim=64,
    unet_channels=(32, 64, 64), unet_layers_per_block=1, unet_head_dim=4, unet_norm_groups=8,
    unet_cross_attn_blocks=(False, True, True),
    vae_channels=(32, 64), vae_layers_per_block=1, vae_norm_groups=8, vae_scaling_factor=1.0,
    prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2",
    num_mm_tokens=8, qformer_layers=2, qformer_heads=4, qformer_ffn=128, bim_width=64, bim_heads=4,
    iaa_tokens=4, vision_head_layer=3,
    lora_rank=8, lora_alpha=16.0, lora_dropout=0.0,
    resolution=32, batch_size=32, lr=1e-3, max_steps=2000, save_every=500, sample_every=500, num_workers=0,
    steps=25, scheduler="DDIMScheduler", precision="fp32", warmup_ratio=0.01,
    # s_T = 3 (not 7.5): chosen on a validation world (seed 555); a toy UNet that has only begun to use the
    # instruction turns strong text guidance into coloured noise (README, toy world results).
    text_guidance=3.0,
)
# Our ablation, adopted for the toy InsightEdit only (the full presets keep the papers' stage 2): stage 2 also pulls
# the Q-Former output toward CLIP_text(optimized_instruction) and teacher-forces that condition into the UNet. The
# toy diffusion loss alone hardly teaches the bridge which shape an edit names; with both, removals among several
# shapes beat chance and success rose on the validation world (21.3 -> 25.0 %) and the held-out one (25.3 ->
# 27.0 %; a second seed 22.3 / 27.7 %) — README, "Toy world results"; docs/DESIGN.md §4.
_TOY_RECIPE = {"insightedit": dict(qformer_explicit_weight=1.0, qformer_teacher_forcing=1.0)}
# Stage 1 has its own learning rate: the papers' 2e-4 (stages 2-3: 1e-5); the toy world's 3e-4 (stages 2-3: 1e-3,
# which beat 3e-4 on the validation world: ip2p with two training seeds, InsightEdit with one — README, lever study).
_STAGE_LR = {"full": {1: 2e-4}, "toy": {1: 3e-4}}


def preset(recipe: str = "insightedit", name: str = "toy", stage: int | None = None) -> Config:
    """The preset config for a recipe; `stage` picks the stage's default learning rate."""
    if recipe not in RECIPES:
        raise ConfigError(f"recipe={recipe!r}: choose one of {', '.join(RECIPES)}")
    if name not in PRESETS:
        raise ConfigError(f"config={name!r}: choose one of {', '.join(PRESETS)}")
    values = dict(recipe=recipe, preset=name)
    if name == "full":
        values.update(_FULL_MINDEDIT if recipe == "mindedit" else _FULL)
    else:
        values.update(_TOY, **_TOY_RECIPE.get(recipe, {}))
    cfg = Config(**values)
    cfg.stage = stage if stage is not None else cfg.stages[-1 if recipe == "ip2p" else 0]
    cfg.lr = _STAGE_LR[name].get(cfg.stage, cfg.lr)
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _parse_value(f: dataclasses.Field, text: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            return _parse_bool(text)
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "tuple":  # items read as the default's are: integers (block widths) or booleans (which blocks)
            items = [s.strip() for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            of_bools = isinstance(f.default, tuple) and all(isinstance(v, bool) for v in f.default)
            return tuple(_parse_bool(s) if of_bools else int(s) for s in items)
        return text
    except ValueError:
        example = f" like {','.join(str(v).lower() for v in f.default)}" if kind == "tuple" else ""
        raise ConfigError(f"--{f.name}={text}: expected a {kind}{example}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--field=value` strings (or `field=value`); an unknown field or a bad value is a ConfigError."""
    by_name = {f.name: f for f in fields(Config)}
    for item in overrides:
        key, eq, value = item.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if key in RENAMED:
            raise ConfigError(f"--{key} is now called --{RENAMED[key]} (same values) — write --{RENAMED[key]}")
        if not eq:
            raise ConfigError(f"{item}: write overrides as --field=value")
        if key not in by_name:
            close = [n for n in by_name if key in n or n in key][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config field --{key}{hint}")
        setattr(cfg, key, _parse_value(by_name[key], value))
    return cfg
