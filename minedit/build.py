"""Load or build every base model the recipes use: the MLLM, CLIP text and image encoders, VAE, UNet, scheduler.

Each builder has two roads, chosen by the config's `*_path` field:
  * a hub id or a local folder: `from_pretrained(path, dtype=...)` (never `trust_remote_code`). The UNet and VAE
    say `low_cpu_mem_usage=False`: without `accelerate` diffusers would choose it anyway, after a warning; on
    safetensors it maps the file and holds one copy of the weights, as accelerate's road does (bench/RESULTS.md);
  * "" (the toy preset), or `meta=True` (the dry run of the full preset): build the architecture from the
    config's fields with random weights. Under `meta=True` nothing is allocated and nothing is downloaded.

The toy parts' tokenizer (minedit/toy/tokenizer.py) is imported only on the toy road, so loading real models
never touches the toy world.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import Config
from .parts.unet import expand_unet_in_channels

IMAGE_TOKEN = "<image>"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def chat_prompt(tokenizer, text: str, n_image_tokens: int | None = None) -> str:
    """The MLLM's prompt for one edit: its own chat template (image first, then the text, then the generation
    prompt); LLaVA-1.5 style models get the placeholder expanded to their fixed image-token run (OneVision's
    processor expands it per image instead). Every recipe and the toy bases' pretraining build prompts here."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    p = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return p if n_image_tokens is None else p.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens, 1)


@contextlib.contextmanager
def quiet_loading():
    """Hide transformers' per-file progress bars and load reports (a CLIPModel folder loaded as its vision half
    lists the text tower's keys as unexpected, which is expected); restored afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _device_ctx(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pretrained(path: str, meta: bool) -> str | None:
    """Where to load from: a local folder as given, else relative to the repository (the shipped toy bases live
    in assets/), else the hub id as given; None when the part is built from the config instead."""
    if not path or meta:
        return None
    if not os.path.isdir(path) and os.path.isdir(os.path.join(REPO, path)):
        return os.path.join(REPO, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# MLLM
def llava_config(cfg: Config):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=cfg.llm_vocab, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
                       num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                       num_key_value_heads=cfg.llm_kv_heads, max_position_embeddings=cfg.llm_max_positions,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.vision_image_size, patch_size=cfg.vision_patch)
    n_img = (cfg.vision_image_size // cfg.vision_patch) ** 2
    # The toy tokenizer puts <image> at id 4; the real LLaVA-1.5 puts it at 32000.
    image_id = 4 if not cfg.mllm_path else 32000
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, image_seq_length=n_img,
                       vision_feature_layer=cfg.vision_feature_layer)


def is_onevision(cfg: Config) -> bool:
    """MIND-Edit's full-size MLLM is LLaVA-OneVision (Qwen2 + SigLIP, anyres image tiling)."""
    return "onevision" in cfg.mllm_path.lower()


def onevision_config(cfg: Config):
    """LLaVA-OneVision's architecture from the config fields (Qwen2 text, SigLIP vision); the rest (anyres grid
    pinpoints, projector) keeps transformers' LlavaOnevisionConfig defaults, which are the 7B checkpoint's."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(vocab_size=cfg.llm_vocab, hidden_size=cfg.llm_hidden, intermediate_size=cfg.llm_intermediate,
                       num_hidden_layers=cfg.llm_layers, num_attention_heads=cfg.llm_heads,
                       num_key_value_heads=cfg.llm_kv_heads, max_position_embeddings=cfg.llm_max_positions,
                       tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_intermediate,
                                num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                                image_size=cfg.vision_image_size, patch_size=cfg.vision_patch)
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, vision_feature_layer=cfg.vision_feature_layer,
                                vision_feature_select_strategy="full")


def mllm_processor(path: str):
    """The processor of a real MLLM (OneVision's expands anyres image tokens and returns `image_sizes`)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(_pretrained(path, False))


def build_mllm(cfg: Config, dtype=torch.float32, meta: bool = False):
    """-> (LlavaForConditionalGeneration, tokenizer or None under meta, number of image tokens per image).

    LLaVA-OneVision (MIND-Edit full size) returns None for the image-token count: its processor decides it per
    image (anyres), see `mllm_processor`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    if is_onevision(cfg):
        if path := _pretrained(cfg.mllm_path, meta):
            with quiet_loading():
                model = LlavaOnevisionForConditionalGeneration.from_pretrained(path, dtype=dtype)
            processor = mllm_processor(path)
            tokenizer = processor.tokenizer
            if getattr(processor, "chat_template", None) and not tokenizer.chat_template:
                tokenizer.chat_template = processor.chat_template
            return model, tokenizer, None
        with _device_ctx(meta):
            model = LlavaOnevisionForConditionalGeneration._from_config(onevision_config(cfg), dtype=dtype)
        return model, None, None
    n_img = (cfg.vision_image_size // cfg.vision_patch) ** 2
    if path := _pretrained(cfg.mllm_path, meta):
        with quiet_loading():
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        processor = AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
        if getattr(processor, "chat_template", None) and not tokenizer.chat_template:
            tokenizer.chat_template = processor.chat_template
        vc = model.config.vision_config
        n_img = (vc.image_size // vc.patch_size) ** 2
        return model, tokenizer, n_img
    with _device_ctx(meta):
        model = LlavaForConditionalGeneration._from_config(llava_config(cfg), dtype=dtype)
    from .toy.tokenizer import toy_tokenizer  # the toy road only: real models bring their own

    tokenizer = None if meta and cfg.preset == "full" else toy_tokenizer(cfg.llm_max_positions, chat=True)
    return model, tokenizer, n_img


# ----------------------------------------------------------------------------------------------------------------
# CLIP text encoder (SD's), CLIP image encoder
def build_text_encoder(cfg: Config, dtype=torch.float32, meta: bool = False):
    """-> (CLIPTextModel, tokenizer or None under meta for the full preset)."""
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    if path := _pretrained(cfg.sd_path, meta):
        with quiet_loading():
            model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        return model, AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    conf = CLIPTextConfig(vocab_size=cfg.text_vocab, hidden_size=cfg.text_hidden,
                          intermediate_size=cfg.text_intermediate, num_hidden_layers=cfg.text_layers,
                          num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.text_max_length,
                          projection_dim=cfg.clip_embed_dim, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    with _device_ctx(meta):
        model = CLIPTextModel._from_config(conf, dtype=dtype)
    from .toy.tokenizer import toy_tokenizer  # the toy road only: real models bring their own

    tokenizer = None if meta and cfg.preset == "full" else toy_tokenizer(cfg.text_max_length, chat=False)
    return model, tokenizer


def build_image_encoder(cfg: Config, dtype=torch.float32, meta: bool = False):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path := _pretrained(cfg.clip_path, meta):
        with quiet_loading():
            return CLIPVisionModelWithProjection.from_pretrained(path, dtype=dtype)
    conf = CLIPVisionConfig(hidden_size=cfg.clip_hidden, intermediate_size=cfg.clip_intermediate,
                            num_hidden_layers=cfg.clip_layers, num_attention_heads=cfg.clip_heads,
                            image_size=cfg.clip_image_size, patch_size=cfg.clip_patch,
                            projection_dim=cfg.clip_embed_dim)
    with _device_ctx(meta):
        return CLIPVisionModelWithProjection._from_config(conf, dtype=dtype)


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """B×3×H×W in [-1, 1] -> B×3×size×size normalised as CLIP expects (images arrive square-cropped)."""
    x = (images.float() + 1) / 2
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------------------------------------------
# VAE, UNet, scheduler
def build_vae(cfg: Config, dtype=torch.float32, meta: bool = False):
    from diffusers import AutoencoderKL

    if path := _pretrained(cfg.sd_path, meta):
        return AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, low_cpu_mem_usage=False)
    n = len(cfg.vae_channels)
    with _device_ctx(meta):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=cfg.vae_channels,
                            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            layers_per_block=cfg.vae_layers_per_block, norm_num_groups=cfg.vae_norm_groups,
                            sample_size=cfg.resolution, scaling_factor=cfg.vae_scaling_factor)
    return vae if dtype == torch.float32 else vae.to(dtype)


def unet_kwargs(cfg: Config) -> dict:
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.unet_cross_attn_blocks)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.unet_cross_attn_blocks))
    return dict(sample_size=cfg.resolution // cfg.latent_factor, in_channels=8, out_channels=4,
                block_out_channels=cfg.unet_channels, down_block_types=down, up_block_types=up,
                layers_per_block=cfg.unet_layers_per_block, cross_attention_dim=cfg.text_hidden,
                attention_head_dim=cfg.unet_head_dim, norm_num_groups=cfg.unet_norm_groups)


def _check_loaded_unet(cfg: Config, loaded) -> None:
    """A UNet loaded from sd_path keeps its own architecture; the config's unet_* fields must describe it (BIM
    and the conditioning are sized from them), so an override that disagrees is an error, not silently ignored."""
    want = unet_kwargs(cfg)
    fields = {"block_out_channels": "unet_channels", "down_block_types": "unet_cross_attn_blocks",
              "layers_per_block": "unet_layers_per_block", "cross_attention_dim": "text_hidden"}
    bad = [f"{name}={getattr(cfg, name)} (the loaded UNet has {key}={loaded[key]})" for key, name in fields.items()
           if (tuple(loaded[key]) if isinstance(loaded[key], list) else loaded[key]) != want[key]]
    if bad:
        from .errors import UserError

        raise UserError(f"the UNet in {cfg.sd_path} does not match the config: {'; '.join(bad)} — a loaded UNet "
                        "keeps its own architecture: drop the override, or set the fields to the loaded ones")


def build_unet(cfg: Config, dtype=torch.float32, meta: bool = False):
    """The 8-channel editing UNet (noisy target latent ⊕ source latent). A 4-channel SD UNet is expanded."""
    from diffusers import UNet2DConditionModel

    if path := _pretrained(cfg.sd_path, meta):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, low_cpu_mem_usage=False)
        _check_loaded_unet(cfg, unet.config)
        return expand_unet_in_channels(unet, 8, cfg.unet_source_init)
    with _device_ctx(meta):
        unet = UNet2DConditionModel(**unet_kwargs(cfg))
    return unet if dtype == torch.float32 else unet.to(dtype)


def build_noise_scheduler(cfg: Config, meta: bool = False):
    """The training scheduler: DDPM with the config's prediction type (the base model's betas when loaded)."""
    from diffusers import DDPMScheduler

    if path := _pretrained(cfg.sd_path, meta):
        return DDPMScheduler.from_pretrained(path, subfolder="scheduler", prediction_type=cfg.prediction_type)
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule,
                         beta_start=0.00085, beta_end=0.012, prediction_type=cfg.prediction_type,
                         clip_sample=False)


def build_sampler_scheduler(name: str, train_scheduler):
    """Any diffusers scheduler by class name, configured like the training one."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config") or not name.endswith("Scheduler"):
        raise ValueError(f"unknown scheduler {name!r}: use a diffusers scheduler class name such as "
                         "EulerAncestralDiscreteScheduler or DDIMScheduler")
    return cls.from_config(train_scheduler.config)
