"""The run configuration: one typed, flat dataclass (its presets and overrides: presets.py).

Flat on purpose: every field is overridable from the command line as `--field=value` with the same name,
unknown keys are an error, and the resolved config is written as JSON next to every run and checkpoint.

Base models are named by `*_path` fields: a hub id or a local folder loads real weights through
`from_pretrained`; an empty string builds the part from the architecture fields below it (random init),
which is what the toy preset does and what the `meta`-device dry run does for the full preset.

Each field is declared with `arch(default, help)` or `setting(default, help)`. The help text is what
`train.py --help` prints (minedit/confighelp.py); `arch` marks the fields that fix the trained weights' shapes
(ARCH_FIELDS: a checkpoint loads only into a config that agrees on them). Declaring every field one way or the
other means a new training field cannot silently become one that blocks old checkpoints. The toy/full choice is
called `preset` everywhere: the field saved in config.json and train.py's `--preset` (formerly `--config`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields

from .errors import UserError

RECIPES = ("insightedit", "smartedit", "ip2p", "mindedit")
BIM_RECIPES = ("insightedit", "smartedit")  # the recipes built with a BIM (unless --bim=false)
PRESETS = ("toy", "full")


class ConfigError(UserError):
    """A config that cannot run: the message names the field and the fix."""


def arch(default, help: str):
    """A field that fixes the shapes (or meaning) of trained weights: a checkpoint loads only into a config that
    agrees on every such field (checkpoint.check_compatible)."""
    return field(default=default, metadata={"help": help, "arch": True})


def setting(default, help: str):
    """A field a checkpoint does not depend on: where base weights come from, training and inference settings."""
    return field(default=default, metadata={"help": help, "arch": False})


@dataclass
class Config:
    # Every field is declared with arch(...) or setting(...): its help text is train.py --help's, and a new field
    # has to say whether old checkpoints still load into a config that changes it.
    recipe: str = arch("insightedit", "insightedit | smartedit | ip2p | mindedit (docs/DESIGN.md §1)")
    preset: str = arch("toy", "toy (tiny models, CPU) | full (the papers' models); picks every other default")

    # --- base models: hub id / local folder, or "" to build from the architecture fields -------------------
    mllm_path: str = setting("", "LLaVA (LlavaForConditionalGeneration + its processor)")
    sd_path: str = setting("", "diffusers layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/")
    clip_path: str = setting("", "CLIP image encoder with projection (IAA targets, CLIP-I)")

    # --- MLLM architecture (LLaVA: CLIP vision tower + projector + Llama) -------------------------------------
    llm_vocab: int = arch(32064, "LLM vocabulary rows before the [MM] tokens are added")
    llm_hidden: int = arch(4096, "LLM width d (the [MM] hidden states h are B×r×d)")
    llm_intermediate: int = arch(11008, "LLM MLP width")
    llm_layers: int = arch(32, "LLM decoder layers")
    llm_heads: int = arch(32, "LLM attention heads")
    llm_kv_heads: int = arch(32, "LLM key/value heads (< llm_heads: grouped-query attention)")
    llm_max_positions: int = arch(4096, "LLM context length")
    vision_hidden: int = arch(1024, "vision tower width = width of the patch features v that BIM reads")
    vision_intermediate: int = arch(4096, "vision tower MLP width")
    vision_layers: int = arch(24, "vision tower layers")
    vision_heads: int = arch(16, "vision tower attention heads")
    vision_image_size: int = arch(336, "vision tower input side in pixels")
    vision_patch: int = arch(14, "vision tower patch side in pixels")
    vision_feature_layer: int = arch(-2, "vision tower layer LLaVA reads (-2: penultimate, as LLaVA-1.5)")

    # --- CLIP text encoder (the UNet's cross-attention space) and CLIP image encoder --------------------------
    text_vocab: int = arch(49408, "CLIP text vocabulary")
    text_hidden: int = arch(768, "CLIP text width = UNet cross_attention_dim = Q-Former width")
    text_intermediate: int = arch(3072, "CLIP text MLP width")
    text_layers: int = arch(12, "CLIP text layers")
    text_heads: int = arch(12, "CLIP text attention heads")
    text_max_length: int = arch(77, "CLIP text length = number of Q-Former queries")
    clip_hidden: int = arch(1024, "CLIP image encoder width")
    clip_intermediate: int = arch(4096, "CLIP image encoder MLP width")
    clip_layers: int = arch(24, "CLIP image encoder layers")
    clip_heads: int = arch(16, "CLIP image encoder attention heads")
    clip_image_size: int = arch(224, "CLIP image encoder input side in pixels")
    clip_patch: int = arch(14, "CLIP image encoder patch side in pixels")
    clip_embed_dim: int = arch(768, "projected CLIP image embedding: the IAA / vision-head target width")

    # --- UNet and VAE (SD1.5 / InstructPix2Pix) ----------------------------------------------------------------
    unet_channels: tuple = arch((320, 640, 1280, 1280), "UNet block widths")
    unet_layers_per_block: int = arch(2, "UNet resnet layers per block")
    unet_head_dim: int = arch(8, "diffusers' (misnamed) attention_head_dim = number of heads in SD1.5")
    unet_norm_groups: int = arch(32, "UNet GroupNorm groups")
    unet_cross_attn_blocks: tuple = arch((True, True, True, False), "which down blocks have cross-attention")
    vae_channels: tuple = arch((128, 256, 512, 512), "VAE block widths (latent side = image side / 2^(n-1))")
    vae_layers_per_block: int = arch(2, "VAE resnet layers per block")
    vae_norm_groups: int = arch(32, "VAE GroupNorm groups")
    vae_scaling_factor: float = arch(0.18215, "latent scale of the target latents (SD1.5's)")
    prediction_type: str = arch("epsilon", "epsilon | v_prediction (the toy preset's; DESIGN §10)")
    beta_schedule: str = arch("scaled_linear", "diffusers noise schedule name")
    train_timesteps: int = arch(1000, "diffusion timesteps of the noise schedule")

    # --- bridge --------------------------------------------------------------------------------------------
    num_mm_tokens: int = arch(32, "r, the number of [MM] tokens")
    qformer_layers: int = arch(6, "Q-Former layers (cross-attention in every second one)")
    qformer_heads: int = arch(12, "Q-Former attention heads")
    qformer_ffn: int = arch(3072, "Q-Former MLP width")
    bim: bool = arch(True, "false: SmartEdit Table 2 'plain', the Q-Former output goes straight to the UNet")
    bim_width: int = arch(1024, "BIM's own width")
    bim_heads: int = arch(16, "BIM attention heads")
    iaa_tokens: int = arch(4, "N, image tokens for the decoupled cross-attention")
    qformer_explicit_weight: float = setting(0.0, "ablation, not in the papers: stage 2 also pulls the Q-Former "
                                             "output toward CLIP_text(optimized_instruction) by this weight × MSE "
                                             "(rows without one are left out); 0 = off, the papers' stage 2 (the "
                                             "toy InsightEdit preset: 1)")
    qformer_teacher_forcing: float = setting(0.0, "ablation, not in the papers: in stage 2 this share of the rows "
                                             "with an optimized_instruction feed the UNet CLIP_text of it in "
                                             "place of the Q-Former output (MIND-Edit's teacher forcing); needs "
                                             "qformer_explicit_weight > 0; 0 = off (the toy InsightEdit preset: 1)")
    qformer_teacher_forcing_steps: int = setting(0, "with qformer_teacher_forcing: force only during the first N "
                                                 "steps of stage 2, then feed the UNet the Q-Former output as "
                                                 "inference does (scheduled sampling); 0 = every step")
    vision_head_layer: int = arch(21, "m (MIND-Edit): hidden_states[m] feeds the vision head F_v")

    # --- MIND-Edit stage 1 (paper eq. 6: l_text + lambda * l_embed) ------------------------------------------
    mind_losses: str = setting("joint", "joint | text | embed: Table 2's independent models (--text-only ...)")
    mind_embed_weight: float = setting(2.0, "lambda, the weight of l_embed")
    mind_image_prompt: str = setting("predicted", "stage 2's image prompt: predicted = the stage-1 vision head's "
                                     "v_insight, what inference feeds the UNet | target = CLIP_image(I_tar) "
                                     "(teacher forcing, as IP-Adapter trains)")
    topt_max_tokens: int = setting(77, "greedy T_opt decoding cap (CLIP's text length)")

    # --- LoRA (paper: rank 16, alpha 27; SmartEdit's public code used 8/16) ---------------------------------
    lora_rank: int = arch(16, "LoRA rank")
    lora_alpha: float = arch(27.0, "LoRA alpha (the update is scaled by alpha / rank)")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input")
    lora_targets: str = arch("q_proj,v_proj", "comma-separated names of the LLM linears that get LoRA")

    # --- training ------------------------------------------------------------------------------------------
    stage: int = setting(2, "training stage (docs/DESIGN.md §4); the preset picks the recipe's first")
    resolution: int = setting(256, "training image side in pixels")
    batch_size: int = setting(4, "per device (global batch = batch_size × grad_accum × world size)")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    lr: float = setting(1e-5, "AdamW learning rate (the full preset: 2e-4 in stage 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    warmup_ratio: float = setting(0.001, "linear warm-up, as a fraction of max_steps")
    max_steps: int = setting(10000, "optimizer steps of the run (the learning-rate schedule spans them)")
    clip_grad: float = setting(1.0, "gradient-norm clip; 0 = off")
    precision: str = setting("bf16", "bf16 | fp16 (CUDA + GradScaler) | fp32")
    grad_checkpointing: bool = setting(False, "recompute activations in the backward pass (UNet and LLM)")
    seed: int = setting(0, "seeds every random draw of the run")
    drop_text: float = setting(0.05, "classifier-free-guidance dropout of the text conditions, per sample")
    drop_image: float = setting(0.05, "guidance dropout of the source image, per sample")
    drop_both: float = setting(0.05, "guidance dropout of both, per sample")
    snr_gamma: float = setting(0.0, "Min-SNR-γ loss weighting (γ = 5 in its paper); 0 = off, the papers' plain MSE")
    unet_source_init: str = setting("zero", "how the widened conv_in's source-latent channels start when the UNet "
                                     "comes from a 4-channel sd_path: zero (InstructPix2Pix) | half (an "
                                     "ablation: both halves half the kernel, W·(z_t+z_src)/2)")
    mask_loss_weight: float = setting(1.0, "loss weight inside the edit mask (1 = off; an ablation, not in the papers)")
    train_text_encoder: bool = setting(False, "ip2p / mindedit: train CLIP's text encoder with the UNet (an ablation; "
                                       "the papers keep it frozen)")
    t2i_share: float = setting(0.0, "ablation, not in the papers: in stages 2-3 this share of the rows with a "
                               "target_caption train the prior's own task instead — the target drawn from "
                               "CLIP_text(target_caption), source latent zeroed (prior preservation); 0 = off")
    ema_decay: float = setting(0.0, "EMA of the trained weights, saved as the checkpoint's weights; 0 = off")
    num_workers: int = setting(2, "DataLoader worker processes")
    save_every: int = setting(1000, "steps between checkpoints")
    keep_checkpoints: int = setting(2, "newest checkpoints kept in the run folder; 0 = all (for a learning curve)")
    sample_every: int = setting(1000, "steps between sample grids (stages 2-3; 0 = never)")
    log_every: int = setting(10, "steps between log lines")
    max_bad_fraction: float = setting(0.1, "stop when more than this fraction of a manifest's rows is bad")
    nan_patience: int = setting(5, "consecutive non-finite losses before the run stops")
    toy_samples: int = setting(4000, "toy preset without --data: size of the generated toy world")

    # --- inference -----------------------------------------------------------------------------------------
    steps: int = setting(50, "sampler steps")
    text_guidance: float = setting(7.5, "s_T, text guidance scale")
    image_guidance: float = setting(1.5, "s_I, image guidance scale")
    ip_scale: float = setting(1.0, "lambda of the decoupled cross-attention's image branch; 0 = off")
    scheduler: str = setting("EulerAncestralDiscreteScheduler", "any diffusers scheduler class name")

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
        if self.mind_image_prompt not in ("target", "predicted"):
            bad("mind_image_prompt", "choose target or predicted")
        if self.uses_vision_head and self.stage == 2 and self.mind_image_prompt == "predicted" \
                and self.mind_losses == "text":
            bad("mind_image_prompt", "predicted needs the vision head that a --text-only stage 1 left untrained "
                "— pass --mind_image_prompt=target")
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
        for name in ("text_guidance", "image_guidance", "lr", "weight_decay", "ip_scale", "snr_gamma",
                     "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.resolution % self.latent_factor:
            bad("resolution", f"must be a multiple of the VAE's downsampling factor {self.latent_factor}")
        if self.qformer_explicit_weight < 0 or (self.qformer_explicit_weight and not self.uses_mm_tokens):
            bad("qformer_explicit_weight", "must be >= 0, and > 0 only for insightedit or smartedit (the recipes "
                "with a Q-Former)")
        if not 0 <= self.qformer_teacher_forcing <= 1 or (self.qformer_teacher_forcing
                                                          and not self.qformer_explicit_weight):
            bad("qformer_teacher_forcing", "must be in [0, 1], and > 0 only with --qformer_explicit_weight > 0 "
                "(the Q-Former learns the forced condition from that loss alone)")
        if self.qformer_teacher_forcing_steps < 0 or (self.qformer_teacher_forcing_steps
                                                      and not self.qformer_teacher_forcing):
            bad("qformer_teacher_forcing_steps", "must be >= 0, and > 0 only with --qformer_teacher_forcing > 0")
        if self.train_text_encoder and self.recipe not in ("ip2p", "mindedit"):
            bad("train_text_encoder", "only ip2p and mindedit give the UNet CLIP's text encoder to train")
        if self.unet_source_init not in ("zero", "half") or (self.unet_source_init == "half" and not self.sd_path):
            bad("unet_source_init", "must be zero or half, and half only with an sd_path (a UNet built from the "
                "config has 8 input channels from the start: nothing is widened)")
        if self.mask_loss_weight <= 0:
            bad("mask_loss_weight", "must be > 0 (1 = every pixel weighs the same)")
        if not 0 <= self.t2i_share < 1:
            bad("t2i_share", "must be in [0, 1) (a share of the rows; 1 would train no edits)")
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


def diff_keys(a: Config, b: Config, keys: tuple | None = None) -> list[str]:
    """The fields (of `keys`, default all) on which two configs differ: used to name a mismatch on load."""
    names = keys or tuple(f.name for f in fields(Config))
    return [k for k in names if getattr(a, k) != getattr(b, k)]


# Fields that fix the shapes of the trainable weights: a checkpoint only loads into a config that agrees on them.
ARCH_FIELDS = tuple(f.name for f in fields(Config) if f.metadata["arch"])
HELP = {f.name: f.metadata["help"] for f in fields(Config)}  # field -> its one-line help text
