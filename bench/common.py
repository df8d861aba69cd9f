"""What the benchmarks share: the mid-size config, a model builder, timing and the machine line.

The mid-size config is the full architecture shrunk to what a CPU can time in minutes (#8): an SD1.5-shaped
UNet (four blocks, two layers each, cross-attention in the first three) with every width divided by 4, run at
256 px, and a 2-layer LLM. Everything is built from config with random weights: latency and memory do not
depend on what the weights are. `full` is the full preset's architecture built the same way (its fields, random
weights, the toy word-level tokenizers: no hub access).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minedit import runtime  # noqa: E402
from minedit.errors import UserError  # noqa: E402
from minedit.model import EditModel  # noqa: E402
from minedit.presets import apply_overrides, preset  # noqa: E402

MID = dict(
    unet_channels=(80, 160, 320, 320), unet_layers_per_block=2, unet_head_dim=8, unet_norm_groups=16,
    unet_cross_attn_blocks=(True, True, True, False),
    vae_channels=(32, 64, 128, 128), vae_layers_per_block=2, vae_norm_groups=16, vae_scaling_factor=0.18215,
    text_hidden=192, text_intermediate=768, text_layers=3, text_heads=4, text_max_length=77,
    llm_hidden=1024, llm_intermediate=2752, llm_layers=2, llm_heads=8, llm_kv_heads=8, llm_max_positions=1024,
    vision_hidden=256, vision_intermediate=1024, vision_layers=3, vision_heads=4, vision_image_size=224,
    vision_patch=14,
    clip_hidden=256, clip_intermediate=1024, clip_layers=3, clip_heads=4, clip_image_size=224, clip_patch=14,
    clip_embed_dim=192,
    num_mm_tokens=32, qformer_layers=2, qformer_heads=4, qformer_ffn=768, bim_width=256, bim_heads=4,
    resolution=256, prediction_type="epsilon", beta_schedule="scaled_linear",
)


def config(size: str, recipe: str = "insightedit", stage: int | None = None, overrides: list[str] = ()):
    """`toy` = the toy preset; `mid` = the toy preset with the MID widths above; `full` = the full preset's
    architecture and precision. All three are built from their fields (no *_path), like the toy preset."""
    cfg = preset(recipe, "full" if size == "full" else "toy", stage)
    if size == "mid":
        for k, v in MID.items():
            setattr(cfg, k, v)
    cfg.mllm_path = cfg.sd_path = cfg.clip_path = ""
    cfg.preset = "toy"
    return apply_overrides(cfg, list(overrides)).validate()


def build_model(cfg, size: str, device: torch.device) -> EditModel:
    """EditModel(cfg) with random weights, initialised on `device` itself (a 7B model initialises in seconds on a
    GPU). A `full` model's embedding matrices get the real vocabulary's rows (the toy tokenizer is small), so
    every tensor has the full model's shape."""
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = EditModel(cfg)
        if size == "full" and cfg.uses_mllm:
            rows = cfg.llm_vocab + (cfg.num_mm_tokens if cfg.uses_mm_tokens else 0)
            model.mllm.resize_token_embeddings(rows, mean_resizing=False)
    return model.to(device)


def median_time(fn, repeats: int, warmup: int = 1, sync=None) -> list[float]:
    """Wall seconds of `fn()` per repeat after `warmup` calls (sync() before reading the clock on CUDA)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append(time.perf_counter() - t0)
    return out


def pick_device(name: str) -> torch.device:
    """runtime.pick_device, with a malformed name ("--device gpu") a UserError like a missing CUDA device."""
    try:
        return runtime.pick_device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name — use cpu, cuda or cuda:N") from None


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else None


def machine(device: torch.device) -> str:
    """One line naming where the figures came from."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"torch threads {torch.get_num_threads()}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{what}; torch {torch.__version__}; load avg {load:.2f}; {time.strftime('%Y-%m-%d %H:%M')}"


def median(xs):
    return statistics.median(xs)


def write_json(path: str, obj) -> None:
    """json.dump to a temporary name, then rename: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
