"""Training-loop overhead: a stage-2 step through train.py's own loop against the bare step of the same modules.

    python bench/train_overhead.py                          # toy and mid size, CPU, 1 thread
    python bench/train_overhead.py --sizes mid --repeats 3
    python bench/train_overhead.py --device cuda --precision bf16 --sizes toy,mid,full     # on a GPU

"train.py" is `train.main(...)` run in this process on a small toy world, its seconds per step read from the
`samples_s` column of log.jsonl (the wall time between two log rows, so data loading, the per-sample random
draws, gradient clipping, the finite-loss check, the LR schedule and logging are all inside it; the first row is
warm-up and dropped). "bare" is the same model, built and frozen the same way, stepping on a few batches made
beforehand and kept in memory: forward, backward, AdamW step, nothing else. Both run interleaved (repeats);
the figure is the median of the per-repeat ratios. Target (#8): ≤ 1.10×.
Stage 2 needs a stage-1 checkpoint (--init); one is trained for a single step first, outside the timing.

`full` (CUDA only) is the full preset's architecture with random weights (bench/common.py) and times the bare
step alone: its figures are stage-2 samples/s and the peak of torch.cuda's allocator (target #8: ≥ 25 samples/s
on one H100). Building a 7B model from config inside train.py means an fp32 CPU initialisation (minutes), so the
loop's overhead is taken from the mid size, whose step runs the same code.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import tempfile
import time

import torch

import common

import train  # the repo root is on sys.path through common
from minedit import checkpoint as ckpt
from minedit import runtime, training
from minedit.data import collate
from minedit.errors import UserError, run_cli
from minedit.model import EditModel

RECIPE, STAGE = "insightedit", 2
SIZES = ("toy", "mid", "full")


def overrides(size: str, args) -> list[str]:
    """The command-line overrides that make train.py's config equal common.config(size). The data is the toy
    world train.py generates for the config (64 samples at the config's resolution, cached)."""
    out = [f"--batch_size={args.batch_size}", f"--precision={args.precision}", f"--num_workers={args.workers}",
           "--sample_every=0", "--save_every=100000", "--toy_samples=64",
           f"--grad_checkpointing={args.grad_checkpointing}"]
    if size == "mid":
        out += [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in common.MID.items()]
    return out


def run_train(argv: list[str]) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train.main(argv)


def train_seconds_per_step(work: str, size: str, args, init: str) -> float:
    out = os.path.join(work, f"{size}-s2")  # one folder, overwritten by each repeat
    # log_every = steps: the row at `steps` times the warm-up steps, the row at 2·steps the timed ones.
    run_train(["--recipe", RECIPE, "--stage", "2", "--init", init, "--out", out, "--max-steps", str(2 * args.steps),
               "--device", args.device, f"--log_every={args.steps}", "--overwrite"]
              + overrides(size, args))
    with open(os.path.join(out, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    return args.batch_size / last["samples_s"]


def bare_seconds_per_step(model, batches, optimizer, rt, n: int, sync, scaler) -> float:
    """Seconds per bare step, after n warm-up steps. Steps go through `scaler` (rt.grad_scaler()), as train.py's
    do: fp16 needs it (its gradients underflow without one), in bf16/fp32 it is disabled and a no-op. Pass the
    same scaler every call so that its scale carries over."""
    it = itertools.cycle(batches)

    def step():
        with rt.autocast():
            loss, _ = model(next(it), STAGE)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(n):  # warm-up, as train.py's first log window
        step()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if sync:
        sync()
    return (time.perf_counter() - t0) / n


def make_bare(init: str | None, size: str, args, rt):
    """The model train.py builds for the run (same config, init weights, stage split, device), and batches;
    `full`: random weights, built on the device (no init)."""
    if size == "full":
        cfg = common.config("full", RECIPE, STAGE, overrides(size, args))
        model = common.build_model(cfg, size, rt.device)
    else:
        cfg = train.resolve_config(*train.parse_args(
            ["--recipe", RECIPE, "--stage", "2", "--init", init, "--out", "unused"] + overrides(size, args)))
        torch.manual_seed(cfg.seed)
        model = EditModel(cfg)
        model.load_checkpoint_state(ckpt.load_weights(ckpt.find_checkpoint(init)))
    model.set_stage(STAGE, rt.frozen_dtype)
    model.to(rt.device).train()
    data, _ = train.build_data(cfg, argparse.Namespace(data=None), rt)
    stream = iter(training.DrawStream(len(data), cfg.seed, 0, 1, cfg.batch_size))
    batches = []
    for _ in range(4):  # made once: the bare loop reads no files and draws no random numbers
        batch = collate([data[next(stream)] for _ in range(cfg.batch_size)])
        batches.append({k: v.to(rt.device) if torch.is_tensor(v) else v for k, v in batch.items()})
    optimizer = torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    return model, batches, optimizer


def bench(size: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"minedit-bench-{size}-") as work:
        return bench_in(work, size, args)


def bench_in(work: str, size: str, args) -> dict:
    init = None
    if size != "full":
        init = os.path.join(work, f"{size}-s1")
        run_train(["--recipe", RECIPE, "--stage", "1", "--out", init, "--max-steps", "1", "--device", args.device]
                  + overrides(size, args))
    rt = runtime.setup(args.precision, args.device)
    model, batches, optimizer = make_bare(init, size, args, rt)
    sync = common.sync_for(rt.device)
    scaler = rt.grad_scaler()
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    loop, bare = [], []
    for r in range(args.repeats):  # interleaved, alternating which goes first
        order = ("train", "bare") if r % 2 == 0 else ("bare", "train")
        for which in order:
            if which == "bare":
                bare.append(bare_seconds_per_step(model, batches, optimizer, rt, args.steps, sync, scaler))
            elif size != "full":
                loop.append(train_seconds_per_step(work, size, args, init))
        print(f"  {size} repeat {r + 1}: " + (f"train.py {loop[-1] * 1e3:.1f} ms/step, " if loop else "")
              + f"bare {bare[-1] * 1e3:.1f} ms/step", flush=True)
    cuda = rt.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(rt.device) if cuda else None
    reserved = torch.cuda.max_memory_reserved(rt.device) if cuda else None
    ratios = [a / b for a, b in zip(loop, bare)]
    return dict(size=size, loop=common.median(loop) if loop else None, bare=common.median(bare),
                ratio=common.median(ratios) if ratios else None, peak=peak, peak_reserved=reserved,
                bare_repeats=bare, loop_repeats=loop)


def check_args(args) -> list[str]:
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        raise UserError(f"--sizes {args.sizes}: choose from {', '.join(SIZES)}, comma-separated")
    for name in ("batch_size", "steps", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be 0 or more")
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--sizes", default="toy,mid", help="toy, mid, full (full: CUDA only), comma-separated")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 toy, 2 mid on CPU (8 on CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (after as many warm-up steps)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="train.py's DataLoader workers (default: 0 on CPU, "
                   "as the toy preset; 4 on CUDA)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the LLM and the UNet (set_stage; "
                   "the config field grad_checkpointing)")
    p.add_argument("--json", help="also write the figures (seconds, bytes) to this file")
    args = p.parse_args(argv)
    sizes = check_args(args)
    device = common.pick_device(args.device)
    torch.set_num_threads(args.threads)
    args.device = str(device)
    if "full" in sizes and device.type != "cuda":
        raise UserError("--sizes full needs --device cuda (a 7B model's training steps take minutes on a CPU)")
    if args.workers is None:
        args.workers = 4 if device.type == "cuda" else 0
    print(common.machine(device))
    results = []
    for size in sizes:
        a = argparse.Namespace(**vars(args))
        if a.batch_size is None:
            a.batch_size = 32 if size == "toy" else (8 if device.type == "cuda" else 2)
        results.append(bench(size, a) | {"batch": a.batch_size})
    ckpt_note = ", gradient checkpointing" if args.grad_checkpointing else ""
    print(f"\nstage 2 insightedit, {args.precision}{ckpt_note}, {device.type}, DataLoader workers {args.workers}; "
          f"{args.steps} timed steps per repeat")
    print(f"\n| size | batch | train.py ms/step | bare ms/step | ratio (median of {args.repeats}) | "
          "bare samples/s | peak GB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        loop = f"{r['loop'] * 1e3:.1f}" if r["loop"] else "–"
        ratio = f"{r['ratio']:.3f}×" if r["ratio"] else "–"
        peak = f"{r['peak'] / 2 ** 30:.2f}" if r["peak"] is not None else "–"
        print(f"| {r['size']} | {r['batch']} | {loop} | {r['bare'] * 1e3:.1f} | {ratio} | "
              f"{r['batch'] / r['bare']:.2f} | {peak} |")
    if args.json:
        common.write_json(args.json, dict(machine=common.machine(device), precision=args.precision,
                                          grad_checkpointing=args.grad_checkpointing, steps=args.steps,
                                          repeats=args.repeats, workers=args.workers, results=results))
    return 0


if __name__ == "__main__":
    run_cli(main)
