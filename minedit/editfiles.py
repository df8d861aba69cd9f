"""Editing image files on disk, shared by infer.py, evaluate.py and the benchmark protocols: check the inputs
before a model is built, size each image for the UNet, edit (image, instruction, mask, output) jobs in batches and
write the results with the one atomic writer."""

from __future__ import annotations

import os

import torch

from . import fsio
from .errors import UserError


def check_inputs(ckpt_path: str, jobs):
    """Fail fast, before the model is built: every image and mask decodes, the checkpoint's files are sound.
    -> the checkpoint's config."""
    from . import checkpoint
    from .data import load_image, load_mask

    for image, _, mask, _ in jobs:
        load_image(image)
        if mask:
            load_mask(mask, load_image(image).size)
    where = checkpoint.find_checkpoint(ckpt_path)
    cfg = checkpoint.load_config(where)
    checkpoint.check_weights(where)
    return cfg


def work_size(w: int, h: int, resolution: int, multiple: int) -> tuple[int, int]:
    """Shorter side -> resolution, aspect kept, both sides rounded to `multiple`."""
    s = resolution / min(w, h)
    return (max(multiple, round(w * s / multiple) * multiple), max(multiple, round(h * s / multiple) * multiple))


def check_out_path(path: str) -> None:
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder — name a file, e.g. {os.path.join(path, 'out.png')}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist — create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write {path}: folder {folder} is read-only — choose another --out")


def edit_files(model, rt, jobs, settings: dict, resolution: int, batch_size: int, seeds: list[int],
               verbose: bool = False) -> int:
    """Edit (image, instruction, mask or None, output path) jobs, `batch_size` at a time; edits of one working
    size share a batch. Job i uses seeds[i], whatever its batch. Returns the count."""
    from PIL import Image

    from .data import load_image, load_mask, to_tensor
    from .sampler import edit, to_pil

    cfg = model.cfg
    multiple = cfg.latent_factor * 2 ** (len(cfg.unet_channels) - 1)
    done = 0
    for start in range(0, len(jobs), batch_size):
        group = list(enumerate(jobs[start:start + batch_size], start))
        pics = {i: load_image(job[0]) for i, job in group}
        sizes = {i: work_size(*pics[i].size, resolution, multiple) for i, _ in group}
        for size in dict.fromkeys(sizes.values()):
            sub = [(i, job) for i, job in group if sizes[i] == size]
            x = torch.stack([to_tensor(pics[i].resize(size, Image.BICUBIC)) for i, _ in sub])
            masks = None
            if any(job[2] for _, job in sub):
                masks = torch.stack([_mask_tensor(load_mask(job[2], size) if job[2] else None, x.shape[-2:])
                                     for _, job in sub])
            with rt.autocast():
                out, topts = edit(model, x, [job[1] for _, job in sub], seed=[seeds[i] for i, _ in sub],
                                  mask=masks, progress=verbose, return_texts=True, **settings)
            for k, ((i, job), img) in enumerate(zip(sub, out)):
                if topts is not None:  # MIND-Edit: the optimized instruction, beside the image as <out>.txt
                    fsio.write_text(os.path.splitext(job[3])[0] + ".txt", topts[k] + "\n")
                    if verbose:
                        print(f"optimized instruction: {topts[k]}")
                fsio.save_image(to_pil(img).resize(pics[i].size, Image.BICUBIC), job[3])
                done += 1
                if verbose:
                    print(f"wrote {job[3]}")
    return done


def _mask_tensor(mask, hw) -> torch.Tensor:
    import numpy as np

    if mask is None:
        return torch.ones(1, *hw)
    return torch.from_numpy((np.asarray(mask) > 127).astype(np.float32))[None]
