"""Load a diffusers model folder (UNet, VAE) with one copy of its weights in memory, and without warnings.

diffusers' `from_pretrained` builds a model lean — on the meta device, each weight assigned as it is read — only
when `accelerate` is installed. Without it, it prints "Cannot initialize model with low cpu memory usage because
`accelerate` was not found", allocates the whole model and then reads the whole state dict beside it: twice the
weights in RAM. minedit does not depend on accelerate (bench/load_time.py measures both roads; bench/RESULTS.md
has the figures). For a folder in diffusers' own layout — config.json + diffusion_pytorch_model.safetensors, or
its shards with an index — `from_pretrained` below does the lean load itself: the architecture is built on `meta`,
then each tensor is read from the file, converted to the requested dtype and assigned in place of its meta
parameter, one tensor at a time. Peak memory: the model in the requested dtype, plus one tensor.

Anything else goes through diffusers' own loader with `low_cpu_mem_usage=False` said explicitly (the old cost,
but no warning): .bin weights, keys in an older layout (diffusers renames those while loading), a model with
non-persistent buffers (nothing in the file would fill them). A hub id is first resolved to the cached/downloaded
subfolder, fetching only its config and non-variant safetensors, as diffusers' default does.
"""
from __future__ import annotations

import json
import os

import torch

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def weight_files(folder: str) -> list[str] | None:
    """The safetensors files of a diffusers model folder (one file, or the shards its index names), else None."""
    if os.path.isfile(os.path.join(folder, WEIGHTS)):
        return [os.path.join(folder, WEIGHTS)]
    if os.path.isfile(os.path.join(folder, INDEX)):
        with open(os.path.join(folder, INDEX)) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, s) for s in shards]
        return files if all(os.path.isfile(p) for p in files) else None
    return None


def _resolve(path: str, subfolder: str) -> str | None:
    """The local folder of `path/subfolder`; a hub id is fetched (config + non-variant safetensors only)."""
    if os.path.isdir(path):
        return os.path.join(path, subfolder)
    try:
        from huggingface_hub import snapshot_download

        stem = f"{subfolder}/diffusion_pytorch_model"
        root = snapshot_download(path, allow_patterns=[f"{subfolder}/config.json", f"{stem}.safetensors",
                                                       f"{stem}.safetensors.index.json", f"{stem}-*.safetensors"])
    except Exception:  # noqa: BLE001 — not a hub id we can reach: diffusers' loader says what is wrong
        return None
    return os.path.join(root, subfolder)


def from_pretrained(cls, path: str, subfolder: str, dtype=torch.float32):
    """`cls.from_pretrained(path, subfolder=subfolder, dtype=dtype)` with one copy of the weights, quietly."""
    folder = _resolve(path, subfolder)
    files = weight_files(folder) if folder and os.path.isfile(os.path.join(folder, "config.json")) else None
    model = _lean(cls, folder, files, dtype) if files else None
    if model is None:
        model = cls.from_pretrained(path, subfolder=subfolder, dtype=dtype, low_cpu_mem_usage=False)
    return model


def _lean(cls, folder: str, files: list[str], dtype):
    """Build on meta, assign tensor by tensor; None when the file's keys are not exactly the model's."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    wanted = model.state_dict()  # meta tensors: names, shapes, no memory
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    keys = set()
    for p in files:
        with safe_open(p, framework="pt") as f:
            keys |= set(f.keys())
    if keys != set(wanted) or names != set(wanted):
        return None
    for p in files:
        with safe_open(p, framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.shape != wanted[key].shape:
                    from .errors import UserError

                    raise UserError(f"{p}: {key} has shape {tuple(t.shape)}, the config in {folder} makes "
                                    f"{tuple(wanted[key].shape)} — the folder's config.json and weights disagree")
                _assign(model, key, t.to(dtype) if t.is_floating_point() else t)
    model.register_to_config(_name_or_path=os.path.dirname(folder))
    return model.eval()


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the meta parameter or buffer `key` with `tensor` (a Parameter keeps requires_grad=True)."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = tensor
