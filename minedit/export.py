"""Export a trained run in the formats the ecosystem loads: diffusers, peft, a merged LLaVA.

    python -m minedit.export RUN --format diffusers --out DIR   # StableDiffusionInstructPix2PixPipeline folder
    python -m minedit.export RUN --format peft --out DIR        # the MLLM's LoRA (+ [MM] rows) as a peft adapter
    python -m minedit.export RUN --format llava --out DIR       # a full LLaVA folder, LoRA folded in

What each carries, and why:
* ``diffusers`` (recipe ``ip2p``): the 8-channel UNet, VAE, CLIP text encoder and tokenizer, and the sampler's
  scheduler (the run's ``scheduler`` class, configured like its training scheduler), saved by diffusers' own
  ``StableDiffusionInstructPix2PixPipeline.save_pretrained``; ``from_pretrained`` on the folder gives the same
  edit as ``infer.py`` with the same seed, steps and guidance. The MLLM recipes are refused: their UNet is
  conditioned on the MLLM's [MM] states through the Q-Former (and BIM's conv_in residual, IAA's image tokens) or
  on T_opt and v_insight — fed CLIP text by the pipeline it would still draw an image, just not the edit asked
  for. A folder that loads and runs but does not edit is worse than an error; their MLLM side goes out with
  ``peft`` or ``llava``, their IP-Adapter weights with ``ip_adapter.save_ip_adapter``.
* ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's LoRA format, keys
  ``base_model.model.<layer>.lora_{A,B}.weight``), rank/alpha/dropout/targets as trained. The [MM] tokens are new
  vocabulary rows that a LoRA cannot carry: they go in peft's ``trainable_token_indices`` (the r rows of the
  input embedding and of ``lm_head``, stored as their values), and the tokenizer/processor with the added tokens
  is saved beside the adapter. Loading therefore needs the base resized to that tokenizer first:

      proc = AutoProcessor.from_pretrained(DIR)
      base = LlavaForConditionalGeneration.from_pretrained(BASE)
      base.resize_token_embeddings(len(proc.tokenizer), mean_resizing=False)
      model = PeftModel.from_pretrained(base, DIR)

  Needs the run's MLLM to come from a folder or hub id (``mllm_path``): a LoRA is only useful on a base one can
  load. Not carried: the Q-Former, BIM, IAA and MIND-Edit's vision head, which are not part of LLaVA.
* ``llava``: the MLLM with every LoRA folded into its weights and the [MM] rows in place, saved by
  ``save_pretrained`` with its processor and the extended tokenizer: ``LlavaForConditionalGeneration`` (or
  ``LlavaOnevisionForConditionalGeneration``) ``.from_pretrained(DIR)`` computes what minedit's MLLM computes.

`save_bases` writes base models (not a run) in the same public layouts: how the toy bases in assets/toy/base
ship (scripts/pretrain_toy_bases.py), and how tests exercise build's from_pretrained road offline.

Every export is written into a hidden temporary folder and renamed into place, so ``--out`` is either complete
or absent; ``minedit_export.json`` beside the weights names the run, the format and the sampling settings.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil

import torch

from .config import Config
from .errors import UserError, run_cli

FORMATS = ("diffusers", "peft", "llava")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m minedit.export", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("run", help="run folder or checkpoint folder written by train.py")
    p.add_argument("--format", required=True, help="diffusers, peft or llava")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16: the dtype of the saved weights")
    return p.parse_args(argv)


def check_out(out: str) -> None:
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise UserError(f"--out {out} already exists and is not empty — choose a new folder or remove it")
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(parent) and not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: folder {parent} is read-only — choose another --out")


def _publish(tmp: str, out: str) -> str:
    """Rename the finished temporary folder to `out` (an empty `out` is replaced)."""
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return out


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    """The dotted name of `module` inside `root`, found by identity (not by guessing a name)."""
    return next(n for n, m in root.named_modules() if m is module)


def mllm_processor(model):
    """The MLLM's processor with minedit's tokenizer (the [MM] tokens added): the base's own when it was
    loaded from a folder or hub id, else one built like the toy bases'."""
    from . import build

    if model.cfg.mllm_path:
        processor = build.mllm_processor(model.cfg.mllm_path)
        processor.tokenizer = model.tokenizer
        return processor
    return llava_processor(model.mllm, model.tokenizer)


# ----------------------------------------------------------------------------------------------------------------
def export_diffusers(model, folder: str, dtype: torch.dtype) -> dict:
    """The ip2p recipe's generator as a StableDiffusionInstructPix2PixPipeline folder."""
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from . import build

    cfg = model.cfg
    scheduler = build.build_sampler_scheduler(cfg.scheduler, model.noise_scheduler)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.text_tokenizer, unet=model.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype).save_pretrained(folder)
    return {"pipeline": "StableDiffusionInstructPix2PixPipeline", "scheduler": cfg.scheduler}


def check_format(cfg, fmt: str) -> None:
    """Refuse, before any model is loaded, an export that the run cannot give (module docstring says why)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "diffusers" and (cfg.uses_mllm or cfg.uses_bim or cfg.uses_decoupled_attention):
        raise UserError(f"--format diffusers: a {cfg.recipe} UNet is conditioned through the MLLM ([MM] states, "
                        "T_opt, image tokens), not by CLIP text alone, so diffusers' InstructPix2Pix pipeline "
                        "cannot drive it — export its MLLM with --format peft or --format llava; "
                        "--format diffusers takes an ip2p run")
    if fmt in ("peft", "llava") and not cfg.uses_mllm:
        raise UserError(f"--format {fmt}: a {cfg.recipe} run has no MLLM — use --format diffusers")
    if fmt == "peft" and not cfg.mllm_path:
        raise UserError("--format peft: this run's MLLM was built from the config (toy preset without "
                        "mllm_path), so there is no base LLaVA to load the adapter onto — use --format llava")
    if fmt == "peft" and importlib.util.find_spec("peft") is None:
        raise UserError("--format peft needs the peft package — pip install peft")


def peft_adapter(model) -> tuple[dict, dict]:
    """-> (LoraConfig keyword arguments, adapter tensors in peft's key layout) for the run's MLLM."""
    from .parts.lora import lora_state_dict

    mllm = model.mllm
    adapters = lora_state_dict(mllm)  # {"<layer>.lora_A": r×in, "<layer>.lora_B": out×r}
    layers = sorted({k.rsplit(".", 1)[0] for k in adapters})
    first = mllm.get_submodule(layers[0])
    tensors = {f"base_model.model.{k}.weight": v.float().contiguous() for k, v in adapters.items()}
    kwargs = dict(r=first.rank, lora_alpha=first.alpha, lora_dropout=model.cfg.lora_dropout,
                  target_modules=layers, bias="none")
    if model.cfg.uses_mm_tokens:
        # The r new rows of each matrix, as peft's trainable tokens (values, not deltas: peft index_copies them
        # into the resized base, so whatever the resize initialised there does not matter).
        ids = list(model.mm_ids)
        mats = {_module_name(mllm, mllm.get_input_embeddings()): mllm.get_input_embeddings().weight}
        head = mllm.get_output_embeddings()
        if head.weight is not mllm.get_input_embeddings().weight:  # untied: lm_head's rows are their own
            mats[_module_name(mllm, head)] = head.weight
        kwargs["trainable_token_indices"] = {name: ids for name in mats}
        for name, w in mats.items():
            tensors[f"base_model.model.{name}.token_adapter.trainable_tokens_delta"] = w[ids].detach().clone()
    return kwargs, tensors


def export_peft(model, folder: str, dtype: torch.dtype) -> dict:
    from peft import LoraConfig
    from safetensors.torch import save_file

    from . import build

    kwargs, tensors = peft_adapter(model)
    base = build._pretrained(model.cfg.mllm_path, False)
    base = os.path.abspath(base) if os.path.isdir(base) else base
    config = LoraConfig(base_model_name_or_path=base, **kwargs)
    config.save_pretrained(folder)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    mllm_processor(model).save_pretrained(folder)
    return {"base_model": base, "vocab_size": len(model.tokenizer),
            "mm_token_ids": list(getattr(model, "mm_ids", []) or []),
            "not_carried": [p for p in ("qformer", "bim", "iaa", "vision_head", "image_proj") if hasattr(model, p)]}


def export_llava(model, folder: str, dtype: torch.dtype) -> dict:
    from .parts.lora import lora_state_dict, merge_lora

    mllm = model.mllm
    adapter_keys = set(lora_state_dict(mllm))  # "<layer>.lora_A"/"lora_B": the parameter names LoRA added
    merge_lora(mllm)  # W += (alpha/r)·B A in every adapted layer
    state = {k: v.to(dtype) for k, v in mllm.state_dict().items() if k not in adapter_keys}
    mllm.config.dtype = dtype
    mllm.save_pretrained(folder, state_dict=state)
    mllm_processor(model).save_pretrained(folder)
    return {"class": type(mllm).__name__, "vocab_size": len(model.tokenizer),
            "mm_token_ids": list(getattr(model, "mm_ids", []) or [])}


EXPORTERS = {"diffusers": export_diffusers, "peft": export_peft, "llava": export_llava}


# ---------------------------------------------------------------- base models in their public layouts
def llava_processor(mllm, tokenizer):
    """A LlavaProcessor for a LLaVA built from the config (the toy bases): CLIP preprocessing at the vision
    tower's size, `tokenizer` and its chat template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from .build import CLIP_MEAN, CLIP_STD

    size = mllm.config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=mllm.config.vision_config.patch_size,
                          vision_feature_select_strategy="default", chat_template=tokenizer.chat_template,
                          num_additional_image_tokens=1)


def save_bases(out: str, cfg: Config, mllm=None, tokenizer=None, text_encoder=None, text_tokenizer=None,
               vae=None, unet=None, image_encoder=None, scheduler=None) -> dict:
    """Write base models in the public layouts that minedit.build's loaders read (LLaVA folder with its processor;
    diffusers folder unet/ vae/ text_encoder/ tokenizer/ scheduler/; CLIP vision folder), and return the
    `*_path` config values that point at them. This is how the toy bases ship, and how tests exercise the
    from_pretrained road offline."""
    from . import build

    paths = {}
    if mllm is not None:
        folder = os.path.join(out, "mllm")
        mllm.save_pretrained(folder)
        llava_processor(mllm, tokenizer).save_pretrained(folder)
        paths["mllm_path"] = folder
    if unet is not None:
        folder = os.path.join(out, "sd")
        unet.save_pretrained(os.path.join(folder, "unet"))
        vae.save_pretrained(os.path.join(folder, "vae"))
        text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
        text_tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        (scheduler or build.build_noise_scheduler(cfg)).save_pretrained(os.path.join(folder, "scheduler"))
        paths["sd_path"] = folder
    if image_encoder is not None:
        image_encoder.save_pretrained(os.path.join(out, "clip"))
        paths["clip_path"] = os.path.join(out, "clip")
    return paths


def export(run: str, fmt: str, out: str, dtype: str = "fp32") -> str:
    """Write `run`'s weights to `out` in `fmt` (see the module docstring); -> `out`."""
    from . import checkpoint
    from .build import quiet_loading
    from .model import load_model

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_out(out)
    where = checkpoint.find_checkpoint(run)
    cfg = checkpoint.load_config(where)
    checkpoint.check_weights(where)
    check_format(cfg, fmt)
    with quiet_loading():
        model = load_model(where)
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        info = EXPORTERS[fmt](model, tmp, DTYPES[dtype])
        _write_json(os.path.join(tmp, "minedit_export.json"), {
            "format": fmt, "checkpoint": os.path.abspath(where), "recipe": cfg.recipe, "stage": cfg.stage,
            "dtype": dtype, **info,
            "sampling": {"steps": cfg.steps, "text_guidance": cfg.text_guidance,
                         "image_guidance": cfg.image_guidance, "resolution": cfg.resolution}})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out)


def main(argv=None) -> int:
    a = parse_args(argv)
    out = export(a.run, a.format, a.out, a.dtype)
    print(f"wrote {a.format} export of {a.run} to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
