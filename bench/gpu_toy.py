"""Toy-size correctness of the device path, every recipe × stage (issue 19; one part of bench/gpu_check.py).

    python bench/gpu_toy.py --device cuda --json toy.json
    python bench/gpu_toy.py --device cpu                   # the same checks on the CPU (the test suite runs this)

Per recipe × stage, on the toy preset's architecture with random weights (nothing to download):

* train: for bf16 and for fp16 + GradScaler, `--train-steps` AdamW steps on one fixed batch (its diffusion
  noise, timesteps, VAE noise and guidance-dropout coins fixed in the batch), taken as train.py takes them
  (autocast forward, scaled backward, unscale, clip, finite check, scaler step/update), with the frozen parts
  stored in the precision's dtype as set_stage stores them; the fp16 run also checkpoints the LLM and UNet
  (grad_checkpointing, where set_stage applies it), as the full-size stage 2 trains. Pass: every loss finite and
  the loss on that batch lower after the steps than before. Also reported: steps the scaler skipped, the final scale.
* attention: the attention ops the forward + backward dispatched to (a dispatch mode records every aten op), and
  whether the step still runs when SDPA may use fused kernels only (torch.nn.attention.sdpa_kernel with flash,
  memory-efficient and cuDNN attention on CUDA; flash on the CPU, which has no other fused kernel). Pass: no
  math-kernel SDPA and no attention-shaped softmax, and the restricted step runs.
* edit (stages that edit): one checkpoint of the stage, loaded with minedit.model.load_model on the CPU in fp32
  (the reference) and on the device in fp32 (TF32 off) and bf16 (infer.py's CUDA default: frozen weights bf16,
  bf16 autocast); one `--edit-steps`-step edit of the same image, instruction and seed. Pass: max |Δ| against
  the reference ≤ FP32_TOL for fp32, mean |Δ| ≤ BF16_MEAN_TOL for bf16 (pixels in [-1, 1]; the CPU's own bf16
  edit is ~0.005 off). MIND-Edit also reports whether the greedy T_opt texts agree: a bf16 run that flips a
  near-tied token changes the edit a lot, legitimately, and is then judged by its fp32 comparison alone.

On the CPU, fp16 runs under CPU autocast with a CPU GradScaler (train.py refuses fp16 on the CPU; the check
only exercises the code path there), and the device edit is the CPU edit itself.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common

from minedit import checkpoint as ckpt
from minedit import runtime, training
from minedit.config import RECIPES
from minedit.errors import UserError, run_cli
from minedit.model import EditModel, load_model
from minedit.presets import preset
from minedit.sampler import edit

FP32_TOL = 1e-3        # max |Δ| of a device fp32 edit against the CPU fp32 edit (pixels in [-1, 1])
BF16_MEAN_TOL = 0.03   # mean |Δ| of a device bf16 edit against the CPU fp32 edit
INSTRUCTIONS = ["remove the red circle", "make the blue square green"]


def combos(recipes=RECIPES) -> list[tuple[str, int]]:
    return [(r, s) for r in recipes for s in preset(r, "toy").stages]


def fixed_batch(cfg, b: int = 2, seed: int = 0) -> dict:
    """A training batch in collate's format for every stage, its random draws included (so every forward on it
    computes the same loss): images in [-1, 1], guidance-dropout coins u, timesteps t, noise, VAE noise."""
    g = torch.Generator().manual_seed(seed)
    res, h = cfg.resolution, cfg.resolution // cfg.latent_factor
    image = lambda: torch.rand(b, 3, res, res, generator=g) * 2 - 1  # noqa: E731
    texts = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(b)]
    return {"source": image(), "target": image(), "image": image(), "instruction": texts,
            "optimized_instruction": texts, "caption": texts,
            "u": torch.full((b,), 0.9),  # above every dropout threshold: no condition dropped
            "t": torch.randint(0, cfg.train_timesteps, (b,), generator=g),
            "noise": torch.randn(b, 4, h, h, generator=g), "vae_eps": torch.randn(b, 4, h, h, generator=g)}


class OpLog(TorchDispatchMode):
    """Names of the aten ops dispatched (attention kernels; softmaxes over ≥ 4-d inputs = math attention)."""

    def __init__(self):
        super().__init__()
        self.attention, self.softmax4d = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "attention" in name:
            self.attention.add(name)
        if name in ("_softmax", "_safe_softmax") and args and getattr(args[0], "dim", lambda: 0)() >= 4:
            self.softmax4d += 1
        return func(*args, **(kwargs or {}))


def fused_only(device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type == "cuda":
        allowed = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    else:
        allowed = [SDPBackend.FLASH_ATTENTION]
    return sdpa_kernel(allowed)


def build(recipe: str, stage: int, rt, seed: int = 0, ckpt: bool = False) -> EditModel:
    cfg = common.config("toy", recipe, stage)
    cfg.precision, cfg.grad_checkpointing = rt.precision, ckpt
    torch.manual_seed(seed)
    model = EditModel(cfg)
    with warnings.catch_warnings():  # transformers' deprecation notice for gradient_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.set_stage(stage, rt.frozen_dtype)
    return model.to(rt.device).train()


def train_check(recipe: str, stage: int, rt, steps: int, lr: float, ckpt: bool = False) -> dict:
    """train.py's step, `steps` times on one fixed batch -> losses before/after, skipped steps, the scale."""
    model = build(recipe, stage, rt, ckpt=ckpt)
    batch = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in fixed_batch(model.cfg).items()}
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(training.param_groups(model, model.cfg.weight_decay), lr=lr)
    scaler = rt.grad_scaler()

    def loss_now() -> float:
        with torch.no_grad(), rt.autocast():
            return model(batch, stage)[0].float().item()

    before, losses, skipped = loss_now(), [], 0
    for _ in range(steps):
        with rt.autocast():
            loss, _ = model(batch, stage)
        scaler.scale(loss).backward()  # the scaler is a no-op unless fp16
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, model.cfg.clip_grad)
        if torch.isfinite(norm):
            scaler.step(optimizer)
        else:
            skipped += 1
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.float().item())
    after = loss_now()
    finite = all(torch.isfinite(torch.tensor(losses + [before, after])).tolist())
    return dict(before=before, after=after, skipped=skipped, ok=finite and after < before,
                scale=scaler.get_scale() if scaler.is_enabled() else None)


def attention_check(recipe: str, stage: int, rt) -> dict:
    """One forward + backward under the op log, then one with SDPA restricted to fused kernels."""
    model = build(recipe, stage, rt)
    batch = {k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in fixed_batch(model.cfg).items()}
    log = OpLog()
    with log, rt.autocast():
        loss, _ = model(batch, stage)
    with log:
        loss.backward()
    model.zero_grad(set_to_none=True)
    try:
        with fused_only(rt.device), rt.autocast():
            loss, _ = model(batch, stage)
        with fused_only(rt.device):
            loss.backward()
        restricted = "ok"
    except RuntimeError as e:
        restricted = str(e).splitlines()[0][:200]
    kernels = sorted(log.attention)
    math = [k for k in kernels if "math" in k] or (["softmax"] if log.softmax4d else [])
    return dict(kernels=kernels, math=math, fused_only=restricted, ok=not math and restricted == "ok")


@contextlib.contextmanager
def exact_fp32(device: torch.device):
    """No TF32 in matmuls and cuDNN convolutions while comparing fp32 against the CPU. torch >= 2.9 has the
    fp32_precision flags and refuses to read the legacy allow_tf32 ones once the new ones were set (transformers
    sets them), so the new API is used where it exists."""
    if device.type != "cuda":
        yield
        return
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    flags = [(cuda, "fp32_precision", "ieee"), (cudnn.conv, "fp32_precision", "ieee")] \
        if hasattr(cuda, "fp32_precision") else [(cuda, "allow_tf32", False), (cudnn, "allow_tf32", False)]
    old = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, old):
            setattr(obj, name, value)


def edit_check(recipe: str, stage: int, device: torch.device, work: str, steps: int) -> dict:
    """One checkpoint, edited on the CPU in fp32 and on the device in fp32 and bf16 -> |Δ| figures."""
    cpu_rt = runtime.Runtime(device=torch.device("cpu"), precision="fp32")
    model = build(recipe, stage, cpu_rt, seed=1)
    run = os.path.join(work, f"{recipe}-{stage}")
    ckpt.save_checkpoint(run, 0, model.cfg, model.checkpoint_state(stage))
    image = torch.rand(1, 3, model.cfg.resolution, model.cfg.resolution, generator=torch.Generator().manual_seed(2))
    kw = dict(steps=steps, text_guidance=model.cfg.text_guidance, image_guidance=model.cfg.image_guidance,
              seed=0, return_texts=True)

    def run_edit(rt):
        m = load_model(run, rt.device, rt.frozen_dtype)
        with rt.autocast():
            out, texts = edit(m, image * 2 - 1, INSTRUCTIONS[:1], **kw)
        return out.float().cpu(), texts

    ref, ref_texts = run_edit(cpu_rt)
    out = {}
    for precision in ("fp32", "bf16"):
        with exact_fp32(device):
            got, texts = run_edit(runtime.Runtime(device=device, precision=precision))
        d = (got - ref).abs()
        row = dict(max=d.max().item(), mean=d.mean().item(), texts_equal=texts == ref_texts)
        # bf16 may flip a near-tied greedy T_opt token (MIND-Edit), which changes the edit legitimately: then the
        # row says so and only the fp32 comparison judges the path.
        row["ok"] = row["max"] <= FP32_TOL if precision == "fp32" else \
            row["mean"] <= BF16_MEAN_TOL or not row["texts_equal"]
        out[precision] = row
    return out


def check_one(recipe: str, stage: int, device: torch.device, args, work: str) -> dict:
    t0 = time.perf_counter()
    row = dict(recipe=recipe, stage=stage)
    for precision in ("bf16", "fp16"):  # fp16 with gradient checkpointing (where set_stage applies it)
        row[precision] = train_check(recipe, stage, runtime.Runtime(device=device, precision=precision),
                                     args.train_steps, args.lr, ckpt=precision == "fp16")
    row["attention"] = attention_check(recipe, stage, runtime.Runtime(device=device, precision="bf16"))
    if stage >= 2:
        row["edit"] = edit_check(recipe, stage, device, work, args.edit_steps)
    row["ok"] = all(row[k]["ok"] for k in ("bf16", "fp16", "attention")) and \
        all(v["ok"] for v in row.get("edit", {}).values())
    row["seconds"] = time.perf_counter() - t0
    return row


def table_head() -> str:
    return "\n".join([
        f"Toy size, every recipe × stage. Train: loss on the fixed batch before → after the steps (scaler skips); "
        f"edit: abs. difference to the CPU fp32 edit (fp32: max ≤ {FP32_TOL:g}; bf16: mean ≤ {BF16_MEAN_TOL:g})", "",
        "| recipe · stage | bf16 loss | fp16 + GradScaler + checkpointing loss | attention kernels | fused only | "
        "edit fp32 max Δ | edit bf16 mean Δ | seconds | ok |", "|---|---|---|---|---|---|---|---|---|"])


def table_row(r: dict) -> str:
    loss = lambda p: f"{r[p]['before']:.4f} → {r[p]['after']:.4f}" + (  # noqa: E731
        f" ({r[p]['skipped']} skipped)" if r[p]["skipped"] else "")
    e = r.get("edit")
    fp32 = f"{e['fp32']['max']:.1e}" if e else "–"
    bf16 = f"{e['bf16']['mean']:.4f}" + ("" if e["bf16"]["texts_equal"] else " (T_opt differs)") if e else "–"
    kernels = ", ".join(k.replace("_scaled_dot_product_", "") for k in r["attention"]["kernels"]) or "none"
    return (f"| {r['recipe']} · {r['stage']} | {loss('bf16')} | {loss('fp16')} | {kernels} | "
            f"{r['attention']['fused_only']} | {fp32} | {bf16} | {r['seconds']:.1f} | "
            f"{'yes' if r['ok'] else '**no**'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated")
    p.add_argument("--train-steps", type=int, default=8, help="AdamW steps on the fixed batch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--edit-steps", type=int, default=10)
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    if not recipes or any(r not in RECIPES for r in recipes):
        raise UserError(f"--recipes {args.recipes}: choose from {', '.join(RECIPES)}, comma-separated")
    if args.train_steps < 1 or args.edit_steps < 1:
        raise UserError("--train-steps and --edit-steps must be at least 1")
    device = common.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device if device.index is not None else 0)
    print(common.machine(device) + "\n\n" + table_head(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="minedit-gpu-toy-") as work:
        for recipe, stage in combos(recipes):  # each row printed and saved when done: a part stopped at its
            rows.append(check_one(recipe, stage, device, args, work))  # time limit keeps what it measured
            print(table_row(rows[-1]), flush=True)
            if args.json:
                common.write_json(args.json, rows)
    failed = [f"{r['recipe']}·{r['stage']}" for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} recipe × stage checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
