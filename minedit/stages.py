"""What each recipe trains in each stage and what its checkpoints hold, as functions of the config alone
(DESIGN §4). Parts are the names EditModel.part_names gives each parameter: "lora", "mm_rows" (the [MM] rows of
the embedding and lm_head matrices), "mllm" (the rest of the MLLM), "qformer", "bim", "iaa.mapper",
"iaa.tokens", "vision_head", "image_proj", "unet", "unet.ip" (the decoupled attention's to_k_ip/to_v_ip),
"text_encoder", "image_encoder", "vae".
"""
from __future__ import annotations

from .config import Config

# The trainable parts per recipe and stage (DESIGN §4). Everything not listed is frozen.
STAGE_TRAINABLE = {
    ("insightedit", 1): {"mm_rows", "qformer", "iaa.mapper"},
    ("insightedit", 2): {"lora", "mm_rows", "qformer", "iaa.mapper", "bim", "unet"},
    ("insightedit", 3): {"iaa.mapper", "iaa.tokens", "unet.ip"},
    ("smartedit", 1): {"mm_rows", "qformer"},
    ("smartedit", 2): {"lora", "mm_rows", "qformer", "bim", "unet"},
    ("ip2p", 2): {"unet"},
    # MIND-Edit: stage 1 trains the MLLM's LoRA (text head = the LLM's own lm_head, frozen) and the vision head;
    # stage 2 trains the generation module (see mind.teacher_conditions for why the UNet trains too).
    ("mindedit", 1): {"lora", "vision_head"},
    ("mindedit", 2): {"unet", "unet.ip", "image_proj"},
}


def trainable_parts(cfg: Config, stage: int) -> set:
    """STAGE_TRAINABLE's set; MIND-Edit's text-only stage 1 (Table 2's independent T_opt model) also freezes
    the unused vision head, and --train_text_encoder adds CLIP's text encoder to the stage that trains the UNet."""
    parts = set(STAGE_TRAINABLE[(cfg.recipe, stage)])
    if stage == 1 and cfg.mind_losses == "text":
        parts.discard("vision_head")
    if cfg.train_text_encoder and "unet" in parts:
        parts.add("text_encoder")
    return parts


def newly_trained(cfg: Config, stage: int) -> set:
    """The parts `stage` trains that no earlier stage of the recipe trained (they start their training here)."""
    earlier = set().union(*(trainable_parts(cfg, s) for s in cfg.stages if s < stage))
    return trainable_parts(cfg, stage) - earlier


def built_from_config(cfg: Config) -> set:
    """The base models built at random from the config because no path names pretrained weights for them."""
    return {base for base, path in (("mllm", cfg.mllm_path), ("unet", cfg.sd_path), ("vae", cfg.sd_path),
                                    ("text_encoder", cfg.sd_path), ("image_encoder", cfg.clip_path)) if not path}


def random_for_good(cfg: Config, parts) -> list[str]:
    """The parts (of `parts`) built at random from the config that no stage of the recipe trains: they stay random,
    which suits the tests' tiny models and nothing meant to learn (a random frozen VAE gives the UNet noise to fit)."""
    trained = set().union(*(trainable_parts(cfg, s) for s in cfg.stages))
    return sorted(p for p in parts if p in built_from_config(cfg) and p not in trained)


def saved_parts(cfg: Config, stage: int, parts) -> set:
    """The parts (of `parts`) a checkpoint of `stage` holds whole: every part trained in this or an earlier stage
    (so one folder serves inference and the next stage), the LoRA adapters, and a base model built from the
    config rather than loaded by path (the toy world), since nothing else could restore it. The [MM] matrices
    are whole only with such a built MLLM; otherwise the checkpoint holds their r new rows (mm_rows_state_dict)."""
    trained = set().union(*(STAGE_TRAINABLE[(cfg.recipe, s)] for s in cfg.stages if s <= stage))
    if cfg.train_text_encoder and "unet" in trained:
        trained.add("text_encoder")
    built = built_from_config(cfg)
    base_of = {"unet.ip": "unet", "mm_rows": "mllm"}
    return {p for p in parts if base_of.get(p, p) in built or (p != "mm_rows" and (p in trained or p == "lora"))}


def format_param_table(table: dict, title: str = "") -> str:
    """The dry-run table: each part, its parameter count as a plain integer, trainable or frozen, and totals."""
    rows = [(k, n, on) for k, (n, on) in table.items()]
    width = max(len(k) for k, _, _ in rows + [("total frozen", 0, 0)])
    lines = [title] if title else []
    lines.append(f"{'part':<{width}}  {'parameters':>14}  state")
    for k, n, on in rows:
        lines.append(f"{k:<{width}}  {n:>14d}  {'trainable' if on else 'frozen'}")
    lines.append(f"{'total trainable':<{width}}  {sum(n for _, n, on in rows if on):>14d}")
    lines.append(f"{'total frozen':<{width}}  {sum(n for _, n, on in rows if not on):>14d}")
    return "\n".join(lines)
