"""Train one stage of a minedit recipe (DESIGN §4, §7-§9). The loop is written here by hand, top to bottom.

CPU toy (tiny models built from the config; the toy world supplies data when --data is left out):
    python train.py --stage 1 --out runs/toy-s1
    python train.py --stage 2 --init runs/toy-s1 --out runs/toy-s2
    python train.py --stage 3 --init runs/toy-s2 --out runs/toy-s3
    python train.py --stage 2 --init runs/toy-s1 --out runs/toy-s2 --resume      # continue an interrupted run
    python train.py --stage 2 --init runs/toy-s1 --out runs/toy-s2 --stop-after 500  # time-boxed: save, exit 0
One GPU, real weights by hub id or local folder:
    python train.py --preset full --stage 1 --data cc12m.jsonl --out runs/s1 --precision=bf16
    python train.py --preset full --stage 2 --data ip2p.jsonl,magicbrush.jsonl:2 --init runs/s1 --out runs/s2
Many GPUs / nodes (DDP; the global batch = batch_size × grad_accum × world size):
    torchrun --nproc_per_node 8 train.py --preset full --stage 2 --data edits.jsonl --init runs/s1 --out runs/s2
Dry run (build on the meta device: the parameter table, no weights, no network):
    python train.py --recipe insightedit --preset full --stage 2 --dry-run

Any config field can be set as --field=value (--help lists them all, with defaults); an unknown field is an error.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import time

import torch

from minedit import checkpoint as ckpt
from minedit import fsio, runlock
from minedit.config import HELP, PRESETS, RECIPES, Config
from minedit.confighelp import field_help
from minedit.errors import UserError, run_cli
from minedit.presets import apply_overrides, preset

# Config fields that also have a conventional dashed flag.
FLAG_FIELDS = ("max_steps", "save_every", "sample_every", "precision", "batch_size", "grad_accum", "lr", "seed")


def parse_args(argv):
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --help shows this recipe's defaults
    pre.add_argument("--recipe", choices=RECIPES)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog=field_help(pre.parse_known_args(argv)[0].recipe or "insightedit"),
                                formatter_class=functools.partial(argparse.RawDescriptionHelpFormatter, width=120))
    p.add_argument("--stage", type=int, help="the stage to train (default: the recipe's first, or the one after "
                   "--init's)")
    p.add_argument("--recipe", choices=RECIPES)
    p.add_argument("--preset", choices=PRESETS, help="toy (default; tiny models on a CPU) or full (the papers' "
                   "models by hub id): the defaults every other field starts from")
    p.add_argument("--data", help="MANIFEST[:WEIGHT][,MANIFEST[:WEIGHT] ...]")
    p.add_argument("--out", help="run folder")
    p.add_argument("--init", help="the previous stage's run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--stop-after", type=int, metavar="N", help="stop after N steps of this invocation and save "
                   "(a time-boxed job; the schedule still spans max_steps) — continue later with --resume")
    p.add_argument("--dry-run", action="store_true", help="print the parameter table (built on meta) and exit")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    for f in FLAG_FIELDS:
        p.add_argument("--" + f.replace("_", "-"), dest=f, default=None, metavar="X", help=f"= --{f}=X: {HELP[f]}")
    losses = p.add_mutually_exclusive_group()  # MIND-Edit stage 1: the independent models of Table 2 (#3-#5)
    losses.add_argument("--text-only", dest="mind_losses", action="store_const", const="text",
                        help="mindedit stage 1: train the text head only (= --mind_losses=text)")
    losses.add_argument("--embed-only", dest="mind_losses", action="store_const", const="embed",
                        help="mindedit stage 1: train the vision head only (= --mind_losses=embed)")
    args, rest = p.parse_known_args(argv)
    overrides = [f"{f}={getattr(args, f)}" for f in FLAG_FIELDS + ("mind_losses",) if getattr(args, f) is not None]
    overrides += rest
    return args, overrides


def resolve_config(args, overrides):
    """preset <- the --init run's config (recipe, bases, architecture) <- --field=value; or the run's own config
    when resuming."""
    if args.resume:
        if not args.out or not os.path.isfile(os.path.join(args.out, "config.json")):
            raise UserError(f"--resume: {args.out} holds no run to resume — drop --resume to start a new run")
        cfg = ckpt.load_config(args.out)
    elif args.init:
        cfg = ckpt.load_config(ckpt.find_checkpoint(args.init))
        ckpt.check_weights(ckpt.find_checkpoint(args.init))  # a corrupt file fails before anything is built
        if args.recipe and args.recipe != cfg.recipe:
            raise UserError(f"--init {args.init} is a {cfg.recipe} run, not {args.recipe} — init from a "
                            f"{args.recipe} run or drop --recipe")
        if args.preset and args.preset != cfg.preset:
            raise UserError(f"--init {args.init} is a {cfg.preset} run, not {args.preset} — drop --preset")
        previous, stage = cfg.stage, args.stage or cfg.stage + 1
        # Everything carries over from the previous stage except the stage and its learning rate.
        cfg = Config.from_dict({**cfg.to_dict(), "stage": stage, "lr": preset(cfg.recipe, cfg.preset, stage).lr})
        if cfg.stage <= previous:
            raise UserError(f"--init {args.init} is a stage-{previous} run; stage {cfg.stage} does not follow it "
                            f"— run stage {previous + 1}")
    else:
        cfg = preset(args.recipe or "insightedit", args.preset or "toy", args.stage)
    if args.stage is not None and args.stage != cfg.stage and not args.resume:
        cfg.stage = args.stage
    apply_overrides(cfg, overrides)
    cfg.validate()
    first = cfg.stages[0]
    if cfg.stage > first and not (args.init or args.resume or args.dry_run):
        raise UserError(f"stage {cfg.stage} of {cfg.recipe} starts from a stage-{cfg.stage - 1} run: run "
                        f"`python train.py --recipe {cfg.recipe} --stage {cfg.stage - 1} --out RUN` first, "
                        "then pass --init RUN")
    return cfg


def dry_run(cfg) -> int:
    from minedit.model import EditModel, format_param_table

    model = EditModel(cfg, meta=True)
    table = model.set_stage(cfg.stage)
    print(format_param_table(table, f"{cfg.recipe} · {cfg.preset} · stage {cfg.stage} (built on meta)"))
    print(f"effective batch: {cfg.batch_size} per device × {cfg.grad_accum} accumulation × world size")
    return 0


def prepare_out(args, rt) -> bool:
    """Create the run folder (emptying the old run's files under --overwrite) and prove it writable; the
    refusals themselves ran earlier, in check_out. -> whether this call made the folder."""
    made = not os.path.exists(args.out)
    holds_run = os.path.isfile(os.path.join(args.out, "config.json"))
    if rt.is_main:
        fsio.makedirs(args.out)
        runlock.acquire(args.out)  # before --overwrite empties anything: a live run is never touched
        if holds_run and args.overwrite and not args.resume:
            for name in os.listdir(args.out):
                if name.startswith(("ckpt-", ".ckpt-")) or name in ("latest", "log.jsonl", "samples", "config.json"):
                    path = os.path.join(args.out, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        try:
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            probe = os.path.join(args.out, f".probe-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to --out {args.out} ({e.strerror}) — choose a writable folder") from None
    rt.barrier()
    return made


def remove_if_unused(out: str) -> None:
    """Undo prepare_out's folder when the run failed before writing anything (e.g. a base model would not load),
    so that the same command can simply be rerun."""
    samples = os.path.join(out, "samples")
    runlock.release(out)
    if os.path.isdir(samples) and not os.listdir(samples) and os.listdir(out) == ["samples"]:
        shutil.rmtree(out)


def build_data(cfg, args, rt):
    """The dataset of the stage (caption pairs for stage 1, editing triples after), wrapped with its draws."""
    from minedit.data import EditDataset
    from minedit.training import Draws

    kind = "caption" if cfg.stage == 1 and not cfg.uses_vision_head else "edit"  # MIND-Edit's stage 1 edits
    if args.data:
        manifests = []
        for item in args.data.split(","):
            path, _, weight = item.partition(":") if not os.path.exists(item) else (item, "", "")
            try:
                manifests.append((path, float(weight) if weight else 1.0))
            except ValueError:
                raise UserError(f"--data {item}: the weight after ':' must be a number") from None
    elif cfg.preset == "toy":
        from minedit.toy.world import cached_world

        world = cached_world(seed=cfg.seed + 1000, n=cfg.toy_samples, size=cfg.resolution, main=rt.is_main,
                             barrier=rt.barrier)
        manifests = [(os.path.join(world, "captions.jsonl" if kind == "caption" else "train.jsonl"), 1.0)]
    else:
        raise UserError("--data is required with --preset full — pass one or more JSONL manifests")
    ds = EditDataset(manifests, cfg.resolution, kind=kind, max_bad_fraction=cfg.max_bad_fraction, seed=cfg.seed)
    if cfg.uses_vision_head and cfg.stage == 1:
        missing = [r for r in ds.rows if not str(r.get("optimized_instruction") or "").strip()]
        if missing:
            raise UserError(f"{missing[0]['_manifest']} line {missing[0]['_line']}: mindedit stage 1 needs "
                            f"\"optimized_instruction\" on every row (the text head's target) — {len(missing)} of "
                            f"{len(ds.rows)} rows lack it")
    if ds.bad and rt.is_main:
        print(f"warning: skipped {len(ds.bad)} bad manifest rows (first: line {ds.bad[0][0]}: {ds.bad[0][1]})",
              file=sys.stderr)
    h = cfg.resolution // cfg.latent_factor
    latent = (4, h, h) if kind == "edit" else None
    return Draws(ds, cfg.seed, latent, cfg.train_timesteps), ds.sample_weights()


def elastic_restart(args) -> None:
    """torchrun --max-restarts restarts every rank with the same command line: continue this run, do not refuse
    the folder it already wrote. With a checkpoint -> --resume; killed before the first one -> start over."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) <= 0 or args.resume or not args.out:
        return
    if not os.path.isfile(os.path.join(args.out, "config.json")):
        return
    try:
        ckpt.find_checkpoint(args.out)
        args.resume = True
    except UserError:
        args.overwrite = True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"restarted by torchrun (restart {os.environ['TORCHELASTIC_RESTART_COUNT']}): "
              + ("resuming from the last checkpoint" if args.resume else "no checkpoint yet, starting over"),
              file=sys.stderr)


def join_restarted_group(device) -> None:
    """After a torchrun restart, join the process group under a key prefix of this attempt: the agent's store
    still holds the previous attempt's gloo/nccl addresses, and the new ranks would connect to dead ones.
    (runtime.setup then finds the group initialised.)"""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart <= 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    store, rank, world = next(torch.distributed.rendezvous("env://"))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                         store=torch.distributed.PrefixStore(f"attempt-{restart}", store))


def check_out(args) -> None:
    """Refuse a missing, file, read-only or already-used --out (unless --resume/--overwrite): before anything
    heavy is imported or built."""
    if not args.out:
        raise UserError("--out is required — name the run folder to write, e.g. --out runs/stage2")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file — name a folder")
    if os.path.isfile(os.path.join(args.out, "config.json")) and not (args.resume or args.overwrite):
        raise UserError(f"{args.out} already holds a run — pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(args.out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent if not os.path.isdir(args.out) else args.out, os.W_OK):
        raise UserError(f"cannot write to --out {args.out} (read-only) — choose a writable folder")


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    elastic_restart(args)
    cfg = resolve_config(args, overrides)
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after {args.stop_after}: must be a positive number of steps")
    if args.dry_run:
        return dry_run(cfg)
    check_out(args)

    from torch.nn.parallel import DistributedDataParallel as DDP
    from tqdm import tqdm

    from minedit import runtime, training
    from minedit.data import collate

    join_restarted_group(runtime.pick_device(args.device))
    rt = runtime.setup(cfg.precision, args.device)
    data, weights = build_data(cfg, args, rt)  # a bad manifest fails before the folder or the model is made
    made_out = prepare_out(args, rt)
    from minedit.model import EditModel, format_param_table

    # ---- model: build, take the previous stage's weights, apply the stage's trainable split ---------------------
    torch.manual_seed(cfg.seed)  # the same random init (toy bases, new modules) on every rank
    try:
        model = EditModel(cfg)
        if args.init and not args.resume:
            source = ckpt.find_checkpoint(args.init)
            ckpt.check_compatible(ckpt.load_config(source), cfg)
            model.load_checkpoint_state(ckpt.load_weights(source))
    except BaseException:
        if made_out and rt.is_main:
            remove_if_unused(args.out)
        raise
    table = model.set_stage(cfg.stage, rt.frozen_dtype)
    model.to(rt.device)
    params = model.trainable_parameters()

    optimizer = torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    warmup = max(1, round(cfg.warmup_ratio * cfg.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda(warmup, cfg.max_steps))
    scaler = rt.grad_scaler()
    ema = training.EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None  # after set_stage: trainable only
    averaged = ema.applied if ema is not None else contextlib.nullcontext  # the weights that are saved/sampled
    step, draw, skipped = 0, 0, 0
    if args.resume:
        last = ckpt.find_checkpoint(args.out)
        ckpt.check_compatible(ckpt.load_config(last), cfg)
        model.load_checkpoint_state(ckpt.load_weights(last))
        state = ckpt.load_state(last)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, draw, skipped = state["step"], state["draw"], state["skipped"]
        changes = training.resume_changes(ckpt.load_config(last), cfg, step)
        if changes and rt.is_main:
            print(f"warning: --resume with {len(changes)} changed config field(s):\n  " + "\n  ".join(changes),
                  file=sys.stderr)
        if ema is not None:
            ema.load_state(state["ema"])
    if rt.is_main:
        print(format_param_table(table, f"{cfg.recipe} · {cfg.preset} · stage {cfg.stage}"))
        global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
        print(f"effective batch {global_batch} = {cfg.batch_size} per device × {cfg.grad_accum} accumulation × "
              f"{rt.world_size} process(es); {len(data)} samples; device {rt.device}, {cfg.precision}")
        fsio.write_text(os.path.join(args.out, "config.json"), cfg.to_json())

    stream = training.DrawStream(len(data), cfg.seed, rt.rank, rt.world_size, cfg.batch_size, weights, start=draw)
    loader = iter(torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=stream, collate_fn=collate,
        num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda", persistent_workers=cfg.num_workers > 0))
    net = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.distributed \
        else model
    if args.resume:  # restored last: making the DataLoader iterator draws from the global RNG
        training.set_rng_state(state["rng"])

    # ---- signals: finish the step, save, exit 0 -----------------------------------------------------------------
    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: stop.__setitem__("signal", signal.Signals(s).name))

    def save():
        if rt.is_main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else {}, "rng": training.rng_state(),
                     "step": step, "draw": draw, "skipped": skipped}
            if ema is not None:
                state["ema"] = ema.state()
            with averaged():
                weights = model.checkpoint_state(cfg.stage)
                if ema is not None:  # the trained values come back when the block ends: keep the averaged ones
                    weights = {k: v.clone() for k, v in weights.items()}
            guarded(ckpt.save_checkpoint, args.out, step, cfg, weights, state)
        rt.barrier()

    samples_per_step = cfg.batch_size * cfg.grad_accum * rt.world_size
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.is_main, dynamic_ncols=True)

    def guarded(write, *args_):
        """A write that fails (full disk, I/O error) ends the progress bar first: the error gets its own line."""
        try:
            return write(*args_)
        except UserError:
            bar.close()
            raise

    log_path = os.path.join(args.out, "log.jsonl")
    if rt.is_main and step and os.path.isfile(log_path):  # resuming: drop rows logged after the checkpoint
        keep_log_until(log_path, step)
    in_a_row, t0 = 0, time.perf_counter()
    end = min(cfg.max_steps, step + args.stop_after) if args.stop_after else cfg.max_steps
    model.train()
    while step < end and stop["signal"] is None:
        # ---- one optimizer step: grad_accum micro-batches, gradients synchronised on the last one only ----------
        sums = {}
        for micro in range(cfg.grad_accum):
            batch = next(loader)
            sync = micro == cfg.grad_accum - 1
            with (net.no_sync() if rt.distributed and not sync else torch.enable_grad()), rt.autocast():
                loss, parts = net(batch, cfg.stage)
            loss = loss / cfg.grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        draw += samples_per_step
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        # One host sync per step: skip a non-finite step, count it, stop after K in a row. Under the GradScaler
        # (fp16), overflowing gradients of a finite loss are its signal to halve the scale, which happens several
        # steps in a row early in a run: skipped, but no fault unless the scale has collapsed below 1.
        finite_grads, finite_loss = torch.stack([torch.isfinite(norm), torch.isfinite(sum(sums.values()))]).tolist()
        if finite_grads:
            (scaler.step(optimizer) if scaler is not None else optimizer.step())
            in_a_row = 0
        else:
            overflow = scaler is not None and finite_loss and scaler.get_scale() >= 1.0
            skipped, in_a_row = skipped + 1, in_a_row + (0 if overflow else 1)
        if scaler is not None:
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema.update(step)
        step += 1
        bar.update(1)
        if in_a_row >= cfg.nan_patience:
            bar.close()
            raise UserError(f"{in_a_row} non-finite losses in a row at step {step} — lower --lr or use "
                            f"--precision=fp32; the last good checkpoint in {args.out} is intact")
        log_now = step % cfg.log_every == 0 or step == cfg.max_steps
        if log_now and rt.distributed:  # log the global batch's losses, not rank 0's slice of it
            keys = list(sums)  # the same order on every rank
            mean = torch.stack([sums[k].double() for k in keys]).to(rt.device)
            torch.distributed.all_reduce(mean)
            sums = dict(zip(keys, (mean / rt.world_size).tolist()))
        if rt.is_main and log_now:
            rate = samples_per_step * cfg.log_every / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            row = {"step": step, "lr": scheduler.get_last_lr()[0], "skipped": skipped, "samples_s": round(rate, 3),
                   **{k: float(v) for k, v in sums.items()}}
            row["loss"] = sum(v for k, v in row.items() if k in sums)
            guarded(fsio.append_line, log_path, json.dumps(row))
            bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{rate:.1f}")
        if rt.distributed:  # every rank must agree to stop on a signal
            flag = torch.tensor([stop["signal"] is not None], dtype=torch.int32, device=rt.device)
            torch.distributed.all_reduce(flag)
            if flag.item() and stop["signal"] is None:
                stop["signal"] = "SIGTERM"
        if cfg.sample_every and step % cfg.sample_every == 0 and rt.is_main and cfg.stage > 1:
            with averaged():
                guarded(write_samples, model, data.dataset, cfg, rt,
                        os.path.join(args.out, "samples", f"step-{step:07d}.png"))
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            save()
    bar.close()
    save()
    if rt.is_main:
        why = (f"stopped by {stop['signal']} at step {step}" if stop["signal"] else
               f"stopped by --stop-after at step {step} of {cfg.max_steps}" if step < cfg.max_steps else
               f"finished {step} steps")
        print(f"{why}; checkpoint in {ckpt.find_checkpoint(args.out)}"
              + (f"; {skipped} non-finite steps skipped" if skipped else ""))
    runtime.shutdown(rt)
    return 0


def keep_log_until(path: str, step: int) -> None:
    """Rewrite log.jsonl without the rows of steps after `step` (a run killed between a log and a save would
    otherwise log those steps twice after --resume); atomic, like every other write of a run."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a crash or a full disk: dropped, not fatal
                continue
            if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= step:
                rows.append(line if line.endswith("\n") else line + "\n")
    fsio.write_text(path, "".join(rows))


def write_samples(model, dataset, cfg, rt, path, rows: int = 4):
    """A PNG grid of the model's current edits of the first few training rows: source | target | edit."""
    from minedit.sampler import edit_grid

    items = [dataset[i] for i in range(min(rows, len(dataset)))]
    model.eval()
    with rt.autocast():
        edit_grid(model, items, path, steps=min(cfg.steps, 20), seed=cfg.seed)
    model.train()


if __name__ == "__main__":
    run_cli(main)
