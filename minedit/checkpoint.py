"""Run folders and checkpoints (DESIGN §8): safetensors + JSON only, written atomically.

    RUN/config.json               the resolved config of the run (recipe, base-model ids, every field)
    RUN/log.jsonl                 one line of losses and learning rate per logged step
    RUN/samples/step-XXXXXXX.png  sample grids
    RUN/ckpt-XXXXXXX/             a complete checkpoint:
        config.json               the config it was trained with
        weights.safetensors       the weights to restore (trainable parts; see EditModel.checkpoint_state)
        state.safetensors         optimizer / RNG tensors, for --resume
        state.json                step, scheduler, scaler, data position and the non-tensor optimizer state
    RUN/latest                    the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place (`fsio.replace_dir`: a re-saved
step's old folder is set aside as `.ckpt-X.old` until the new one is in), then `latest` is replaced
(write + os.replace), so a process killed at any moment leaves a complete checkpoint that `find_checkpoint`
finds; the next save tidies what such a kill left. Nothing is ever unpickled: a checkpoint cannot make the code
execute anything.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import fsio
from .config import ARCH_FIELDS, Config, diff_keys
from .errors import UserError


def _write_plain(path: str, text: str) -> None:
    """A file inside the checkpoint's temporary folder: the folder's rename is what makes it atomic."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _as_oserror(e: Exception) -> OSError:
    """safetensors reports write failures as SafetensorError("... (os error 28)"): recover the errno."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code))


def flatten_state(obj, prefix="") -> tuple[dict, object]:
    """Split a nested state (dicts, lists, tensors, numbers) into {key: tensor} and a JSON-able skeleton."""
    tensors = {}

    def walk(o, key):
        if isinstance(o, torch.Tensor):
            tensors[key] = o.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(o, dict):
            return {"__dict__": [[k, walk(v, f"{key}.{k}")] for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return {"__list__": [walk(v, f"{key}.{i}") for i, v in enumerate(o)], "tuple": isinstance(o, tuple)}
        return o

    return tensors, walk(obj, prefix)


def unflatten_state(tensors: dict, skeleton):
    def walk(o):
        if isinstance(o, dict) and "__tensor__" in o:
            return tensors[o["__tensor__"]]
        if isinstance(o, dict) and "__dict__" in o:
            return {k: walk(v) for k, v in o["__dict__"]}
        if isinstance(o, dict) and "__list__" in o:
            items = [walk(v) for v in o["__list__"]]
            return tuple(items) if o["tuple"] else items
        return o

    return walk(skeleton)


def save_checkpoint(run_dir: str, step: int, config: Config, weights: dict, state: dict | None = None,
                    keep: int = 2) -> str:
    """Write RUN/ckpt-<step>/ atomically and point RUN/latest at it; keep the newest `keep` checkpoints (0: all).
    A failed write (full disk, I/O error, read-only folder) removes the partial folder, leaves the previous
    checkpoint and `latest` untouched and raises one UserError with the size the checkpoint needs."""
    name = f"ckpt-{step:07d}"
    final = os.path.join(run_dir, name)
    weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    tensors, skeleton = flatten_state(state, "s") if state is not None else ({}, None)
    need = sum(t.numel() * t.element_size() for t in (*weights.values(), *tensors.values()))

    def write(folder: str) -> None:
        try:
            os.makedirs(folder)
            save_file(weights, os.path.join(folder, "weights.safetensors"))
            _write_plain(os.path.join(folder, "config.json"), config.to_json())
            if state is not None:
                save_file(tensors, os.path.join(folder, "state.safetensors"))
                _write_plain(os.path.join(folder, "state.json"), json.dumps(skeleton))
        except SafetensorError as e:
            raise _as_oserror(e) from None

    # Re-saving a step (a final save right after a periodic one) replaces that folder the same safe way.
    fsio.replace_dir(final, write, "--out", need, f"the previous checkpoint in {run_dir} is intact "
                     "(infer.py --ckpt and train.py --resume use it)")
    fsio.write_text(os.path.join(run_dir, "latest"), name + "\n")
    fsio.recover_replaced(run_dir, "ckpt-")  # what a save killed mid-way left; rotation then counts it
    old = sorted(d for d in os.listdir(run_dir) if d.startswith("ckpt-") and d != name)
    for d in old[:max(0, len(old) - (keep - 1))] if keep > 0 else []:
        shutil.rmtree(os.path.join(run_dir, d), ignore_errors=True)
    return final


def find_checkpoint(path: str) -> str:
    """A run folder (-> its latest complete checkpoint) or a checkpoint folder -> the checkpoint folder."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist — pass a run folder written by train.py")
    if not os.path.isdir(path):
        raise UserError(f"checkpoint {path} is not a folder — pass the run folder written by train.py")
    if os.path.isfile(os.path.join(path, "weights.safetensors")):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            name = f.read().strip()
        here = os.path.join(path, name)
        for d in (here, fsio.beside(here, "old")):  # the second: killed while re-saving that step (replace_dir)
            if os.path.isfile(os.path.join(d, "weights.safetensors")):
                return d
    done = sorted(d for d in os.listdir(path)
                  if d.startswith("ckpt-") and os.path.isfile(os.path.join(path, d, "weights.safetensors")))
    if not done:
        raise UserError(f"{path} holds no checkpoint — train first, or pass a folder with weights.safetensors")
    return os.path.join(path, done[-1])


def load_config(ckpt: str) -> Config:
    path = os.path.join(ckpt, "config.json")
    try:
        with open(path) as f:
            return Config.from_dict(json.load(f))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
        raise UserError(f"cannot read {path} ({e}) — the checkpoint is incomplete or corrupt") from None
    except UserError as e:  # unknown keys: never guessed at, never executed
        raise UserError(f"{path}: {e} — use a checkpoint written by this version of train.py") from None


def check_weights(ckpt: str) -> None:
    """Read only the safetensors header of the weights: a pickle, a truncated or corrupt file fails here, fast."""
    from safetensors import safe_open

    path = os.path.join(ckpt, "weights.safetensors")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except (OSError, SafetensorError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}) — the file is truncated or corrupt; "
                        "use an earlier checkpoint or retrain") from None


def load_weights(ckpt: str) -> dict:
    path = os.path.join(ckpt, "weights.safetensors")
    try:
        return load_file(path)
    except (OSError, SafetensorError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}) — the file is truncated or corrupt; "
                        "use an earlier checkpoint or retrain") from None


def load_state(ckpt: str) -> dict:
    try:
        tensors = load_file(os.path.join(ckpt, "state.safetensors"))
        with open(os.path.join(ckpt, "state.json")) as f:
            return unflatten_state(tensors, json.load(f))
    except (OSError, SafetensorError, ValueError) as e:
        raise UserError(f"cannot read the training state in {ckpt} ({e}) — resume from an earlier "
                        "checkpoint or start a new run") from None


def check_compatible(saved: Config, current: Config) -> None:
    """A checkpoint loads only into a config with the same recipe and architecture; name what differs."""
    bad = diff_keys(saved, current, ARCH_FIELDS)
    if bad:
        shown = ", ".join(f"{k} ({getattr(saved, k)!r} in the checkpoint, {getattr(current, k)!r} here)"
                          for k in bad[:4])
        raise UserError(f"checkpoint config differs in {shown}{' ...' if len(bad) > 4 else ''} — "
                        "use the checkpoint's own --recipe/--preset, or retrain")
