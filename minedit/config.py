"""The run configuration: one typed, flat dataclass, a `toy` and a `full` preset per recipe.

Flat on purpose: every field is overridable from the command line as `--field=value` with the same name,
unknown keys are an error, and the resolved config is written as JSON next to every run and checkpoint.

Base models are named by `*_path` fields: a hub id or a local folder loads real weights through
`from_pretrained`; an empty string builds the part from the architecture fields below it (random init),
which is what the toy preset does and what the `meta`-device dry run does for the full preset.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields

from .errors import UserError

RECIPES = ("insightedit", "smartedit", "ip2p", "mindedit")
BIM_RECIPES = ("insightedit", "smartedit")  # the recipes built with a BIM (unless --bim=false)
PRESETS = ("toy", "full")


class ConfigError(UserError):
    """A config that cannot run: the message names the field and the fix."""


@dataclass
class Config:
    recipe: str = "insightedit"
    preset: str = "toy"

    # --- base models: hub id / local folder, or "" to build from the architecture fields -------------------
    mllm_path: str = ""            # LLaVA (LlavaForConditionalGeneration + its processor)
    sd_path: str = ""              # diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/
    clip_path: str = ""            # CLIP image encoder with projection (IAA targets, CLIP-I)

    # --- MLLM architecture (LLaVA: CLIP vision tower + projector + Llama) -------------------------------------
    llm_vocab: int = 32064
    llm_hidden: int = 4096
    llm_intermediate: int = 11008
    llm_layers: int = 32
    llm_heads: int = 32
    llm_kv_heads: int = 32
    llm_max_positions: int = 4096
    vision_hidden: int = 1024      # = width of the patch features v that BIM reads
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    vision_image_size: int = 336
    vision_patch: int = 14
    vision_feature_layer: int = -2  # penultimate layer, as LLaVA-1.5

    # --- CLIP text encoder (the UNet's cross-attention space) and CLIP image encoder --------------------------
    text_vocab: int = 49408
    text_hidden: int = 768         # = UNet cross_attention_dim = Q-Former width
    text_intermediate: int = 3072
    text_layers: int = 12
    text_heads: int = 12
    text_max_length: int = 77      # = number of Q-Former queries
    clip_hidden: int = 1024
    clip_intermediate: int = 4096
    clip_layers: int = 24
    clip_heads: int = 16
    clip_image_size: int = 224
    clip_patch: int = 14
    clip_embed_dim: int = 768      # projected image embedding: the IAA target width

    # --- UNet and VAE (SD1.5 / InstructPix2Pix) ----------------------------------------------------------------
    unet_channels: tuple = (320, 640, 1280, 1280)
    unet_layers_per_block: int = 2
    unet_head_dim: int = 8         # diffusers' (misnamed) attention_head_dim = number of heads in SD1.5
    unet_norm_groups: int = 32
    unet_cross_attn_blocks: tuple = (True, True, True, False)  # which down blocks have cross-attention
    vae_channels: tuple = (128, 256, 512, 512)
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 32
    vae_scaling_factor: float = 0.18215
    prediction_type: str = "epsilon"  # the toy preset uses v_prediction (DESIGN §10)
    beta_schedule: str = "scaled_linear"
    train_timesteps: int = 1000

    # --- bridge --------------------------------------------------------------------------------------------
    num_mm_tokens: int = 32        # r
    qformer_layers: int = 6
    qformer_heads: int = 12
    qformer_ffn: int = 3072
    bim: bool = True               # False: SmartEdit Table 2 "plain", the Q-Former output goes straight to the UNet
    bim_width: int = 1024
    bim_heads: int = 16
    iaa_tokens: int = 4            # N
    vision_head_layer: int = 21    # m (MIND-Edit): hidden_states[m] feeds the vision head F_v

    # --- MIND-Edit stage 1 (paper eq. 6: l_text + lambda * l_embed) ------------------------------------------
    mind_losses: str = "joint"     # joint | text | embed: Table 2's independent models (train.py --text-only ...)
    mind_embed_weight: float = 2.0  # lambda
    topt_max_tokens: int = 77      # greedy T_opt decoding cap (CLIP's text length)

    # --- LoRA (paper: rank 16, alpha 27; SmartEdit's public code used 8/16) ---------------------------------
    lora_rank: int = 16
    lora_alpha: float = 27.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,v_proj"

    # --- training ------------------------------------------------------------------------------------------
    stage: int = 2
    resolution: int = 256
    batch_size: int = 4            # per device
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.001
    max_steps: int = 10000
    clip_grad: float = 1.0
    precision: str = "bf16"        # bf16 | fp16 (CUDA + GradScaler) | fp32
    grad_checkpointing: bool = False
    seed: int = 0
    drop_text: float = 0.05        # classifier-free-guidance dropout, per sample (InstructPix2Pix)
    drop_image: float = 0.05
    drop_both: float = 0.05
    snr_gamma: float = 0.0         # Min-SNR-γ loss weighting (γ = 5 in its paper); 0 = off, the papers' plain MSE
    mask_loss_weight: float = 1.0  # loss weight inside the edit mask (1 = off; an ablation, not in the papers)
    ema_decay: float = 0.0         # EMA of the trained weights, saved as the checkpoint's weights; 0 = off
    num_workers: int = 2
    save_every: int = 1000
    sample_every: int = 1000
    log_every: int = 10
    max_bad_fraction: float = 0.1
    nan_patience: int = 5          # consecutive non-finite losses before the run stops
    toy_samples: int = 4000        # toy preset without --data: size of the generated toy world

    # --- inference -----------------------------------------------------------------------------------------
    steps: int = 50
    text_guidance: float = 7.5
    image_guidance: float = 1.5
    ip_scale: float = 1.0
    scheduler: str = "EulerAncestralDiscreteScheduler"

    # ----- derived views ----------------------------------------------------------------------------------
    @property
    def uses_mllm(self) -> bool:
        return self.recipe != "ip2p"

    @property
    def uses_mm_tokens(self) -> bool:
        return self.recipe in ("insightedit", "smartedit")

    @property
    def uses_vision_head(self) -> bool:
        return self.recipe == "mindedit"

    @property
    def uses_bim(self) -> bool:
        return self.bim and self.recipe in BIM_RECIPES

    @property
    def uses_iaa(self) -> bool:
        return self.recipe == "insightedit"

    @property
    def uses_decoupled_attention(self) -> bool:
        return self.recipe in ("insightedit", "mindedit")

    @property
    def stages(self) -> tuple:
        return {"insightedit": (1, 2, 3), "smartedit": (1, 2), "ip2p": (2,), "mindedit": (1, 2)}[self.recipe]

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    def check_types(self) -> "Config":
        """Every field holds a value of its declared type (a float also finite): a config.json edited by hand or by
        another tool fails here with the field's name, not deep inside torch."""
        for f in fields(self):
            v = getattr(self, f.name)
            ok = {"bool": lambda: isinstance(v, bool), "str": lambda: isinstance(v, str),
                  "int": lambda: isinstance(v, int) and not isinstance(v, bool),
                  "float": lambda: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                  "tuple": lambda: isinstance(v, tuple) and all(isinstance(x, (int, str)) for x in v)}[str(f.type)]
            if not ok():
                raise ConfigError(f"{f.name}={v!r}: expected a {'finite ' if f.type == 'float' else ''}{f.type}")
        return self

    def validate(self) -> "Config":
        def bad(name, why):
            raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")
        self.check_types()
        if self.recipe not in RECIPES:
            bad("recipe", f"choose one of {', '.join(RECIPES)}")
        if self.preset not in PRESETS:
            bad("preset", f"choose one of {', '.join(PRESETS)}")
        if self.stage not in self.stages:
            bad("stage", f"recipe {self.recipe} has stages {', '.join(map(str, self.stages))}")
        if not self.bim and self.recipe not in BIM_RECIPES:
            bad("bim", f"recipe {self.recipe} has no BIM to drop — use it with smartedit or insightedit")
        if self.mind_losses not in ("joint", "text", "embed"):
            bad("mind_losses", "choose joint, text (--text-only) or embed (--embed-only)")
        if self.uses_vision_head and not 0 <= self.vision_head_layer <= self.llm_layers:
            bad("vision_head_layer", f"must index hidden_states: 0..{self.llm_layers}")
        if self.topt_max_tokens <= 0:
            bad("topt_max_tokens", "must be a positive integer")
        if self.precision not in ("bf16", "fp16", "fp32"):
            bad("precision", "choose bf16, fp16 or fp32")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            bad("prediction_type", "choose epsilon or v_prediction")
        for name in ("batch_size", "grad_accum", "max_steps", "steps", "resolution", "num_mm_tokens", "lora_rank"):
            if getattr(self, name) <= 0:
                bad(name, "must be a positive integer")
        for name in ("text_guidance", "image_guidance", "lr", "weight_decay", "ip_scale", "snr_gamma"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.resolution % self.latent_factor:
            bad("resolution", f"must be a multiple of the VAE's downsampling factor {self.latent_factor}")
        if self.mask_loss_weight <= 0:
            bad("mask_loss_weight", "must be > 0 (1 = every pixel weighs the same)")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "must be in [0, 1) (0 = no EMA; 0.999 is typical)")
        if not 0 <= self.drop_text + self.drop_image + self.drop_both <= 1:
            bad("drop_text", "the three guidance-dropout probabilities must sum to at most 1")
        return self

    # ----- (de)serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if not isinstance(d, dict):
            raise ConfigError(f"a config is a JSON object of fields, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}: this config comes from another minedit version")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}).check_types()


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
    resolution=32, batch_size=32, lr=3e-4, max_steps=2000, save_every=500, sample_every=500, num_workers=0,
    steps=25, scheduler="DDIMScheduler", precision="fp32", warmup_ratio=0.01,
    # s_T = 3 (not 7.5): chosen on a validation world (seed 555); a toy UNet that has only begun to use the
    # instruction turns strong text guidance into coloured noise (README, toy world results).
    text_guidance=3.0,
)
# The stage-1 learning rate of the papers (2e-4) differs from stages 2-3 (1e-5).
_STAGE_LR = {1: 2e-4}


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
        values.update(_TOY)
    cfg = Config(**values)
    cfg.stage = stage if stage is not None else cfg.stages[-1 if recipe == "ip2p" else 0]
    if name == "full" and cfg.stage in _STAGE_LR:
        cfg.lr = _STAGE_LR[cfg.stage]
    return cfg


def _parse_value(f: dataclasses.Field, text: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "tuple":
            items = [s for s in text.replace("(", "").replace(")", "").split(",") if s.strip()]
            return tuple(s.strip() == "True" if s.strip() in ("True", "False") else int(s) for s in items)
        return text
    except ValueError:
        raise ConfigError(f"--{f.name}={text}: expected a {kind}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--field=value` strings (or `field=value`); an unknown field or a bad value is a ConfigError."""
    by_name = {f.name: f for f in fields(Config)}
    for item in overrides:
        key, eq, value = item.lstrip("-").partition("=")
        key = key.replace("-", "_")
        if not eq:
            raise ConfigError(f"{item}: write overrides as --field=value")
        if key not in by_name:
            close = [n for n in by_name if key in n or n in key][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config field --{key}{hint}")
        setattr(cfg, key, _parse_value(by_name[key], value))
    return cfg


def diff_keys(a: Config, b: Config, keys: tuple | None = None) -> list[str]:
    """The fields (of `keys`, default all) on which two configs differ: used to name a mismatch on load."""
    names = keys or tuple(f.name for f in fields(Config))
    return [k for k in names if getattr(a, k) != getattr(b, k)]


# Fields that fix the shapes of the trainable weights: a checkpoint only loads into a config that agrees on them.
ARCH_FIELDS = tuple(f.name for f in fields(Config) if f.name not in {
    "stage", "resolution", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio", "max_steps",
    "clip_grad", "precision", "grad_checkpointing", "seed", "drop_text", "drop_image", "drop_both",
    "num_workers", "save_every", "sample_every", "log_every", "max_bad_fraction", "nan_patience", "steps",
    "text_guidance", "image_guidance", "ip_scale", "scheduler", "lora_dropout", "mllm_path", "sd_path",
    "clip_path", "mind_losses", "mind_embed_weight", "topt_max_tokens", "snr_gamma", "mask_loss_weight",
    "ema_decay"})
