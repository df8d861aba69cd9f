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
import os
import sys
from dataclasses import dataclass

import torch

from minedit import checkpoint as ckpt
from minedit import fsio, runfolder, training
from minedit.config import HELP, PRESETS, RECIPES, Config
from minedit.confighelp import field_help
from minedit.errors import UserError, run_cli
from minedit.presets import apply_overrides, preset
from minedit.stages import newly_trained, random_for_good

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


def rows_without_explicit(rows: list[dict]) -> list[dict]:
    """The manifest rows with no (or a blank) "optimized_instruction", the explicit rewrite some stages train on."""
    return [r for r in rows if not str(r.get("optimized_instruction") or "").strip()]


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
        missing = rows_without_explicit(ds.rows)
        if missing:
            raise UserError(f"{missing[0]['_manifest']} line {missing[0]['_line']}: mindedit stage 1 needs "
                            f"\"optimized_instruction\" on every row (the text head's target) — {len(missing)} of "
                            f"{len(ds.rows)} rows lack it")
    if cfg.qformer_explicit_weight and cfg.stage == 2 and rt.is_main:
        lack = len(rows_without_explicit(ds.rows))
        if lack:  # those rows train as the papers' stage 2: no explicit alignment, no teacher forcing
            print(f"warning: {lack} of {len(ds.rows)} rows have no \"optimized_instruction\"; "
                  f"--qformer_explicit_weight and --qformer_teacher_forcing skip them", file=sys.stderr)
    if cfg.t2i_share and kind == "edit":
        lack = sum(not r.get("target_caption") for r in ds.rows)
        if lack == len(ds.rows):
            raise UserError("--t2i_share draws the target from its \"target_caption\", and no training row has one "
                            "— add target captions to the manifest or drop --t2i_share")
        if lack and rt.is_main:
            print(f"warning: {lack} of {len(ds.rows)} rows have no \"target_caption\"; --t2i_share skips them",
                  file=sys.stderr)
    if ds.bad and rt.is_main:
        print(f"warning: skipped {len(ds.bad)} bad manifest rows (first: line {ds.bad[0][0]}: {ds.bad[0][1]})",
              file=sys.stderr)
    h = cfg.resolution // cfg.latent_factor
    latent = (4, h, h) if kind == "edit" else None
    return Draws(ds, cfg.seed, latent, cfg.train_timesteps), ds.sample_weights()


def build_model(cfg, args):
    """The recipe's model, built from the config, with the previous stage's weights under --init (a resumed run
    loads its own checkpoint later, in `resume`)."""
    from minedit.model import EditModel
    from minedit.parts.decoupled_attention import restart_image_branch

    torch.manual_seed(cfg.seed)  # the same random init (toy bases, new modules) on every rank
    model = EditModel(cfg)
    if args.init and not args.resume:
        source = ckpt.find_checkpoint(args.init)
        ckpt.check_compatible(ckpt.load_config(source), cfg)
        model.load_checkpoint_state(ckpt.load_weights(source))
        if "unet.ip" in newly_trained(cfg, cfg.stage):  # InsightEdit stage 3: the branch copies the trained UNet
            restart_image_branch(model.unet)
    return model


@dataclass
class Progress:
    """Where the run is. step, draw and skipped are saved in every checkpoint; in_a_row is not (it restarts)."""
    step: int = 0  # optimizer steps done
    draw: int = 0  # global samples drawn (training.DrawStream continues from here: the data order on resume)
    skipped: int = 0  # steps skipped for non-finite gradients, in all
    in_a_row: int = 0  # non-finite losses in a row: the run stops at cfg.nan_patience


@dataclass
class Optim:
    """What updates the trained weights: AdamW, its warm-up + cosine schedule, the fp16 loss scaler (disabled, a
    no-op, in bf16/fp32) and the optional EMA of the weights (the values saved and sampled)."""
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: training.EMA | None

    @classmethod
    def build(cls, model, cfg, rt) -> "Optim":
        """Called after set_stage: the groups, the clipped set and the EMA cover the stage's trainable weights."""
        optimizer = torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
        warmup = max(1, round(cfg.warmup_ratio * cfg.max_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, training.lr_lambda(warmup, cfg.max_steps))
        ema = training.EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        return cls(model.trainable_parameters(), optimizer, scheduler, rt.grad_scaler(), ema)

    def step(self, p: Progress, losses: dict, clip: float) -> None:
        """Unscale and clip the accumulated gradients; step only if they are finite (one host sync per step);
        then the scale, the schedule and the EMA. A skipped step is counted in p.skipped and, unless it is the
        fp16 scaler's own overflow signal, in p.in_a_row: early in an fp16 run, overflowing gradients of a finite
        loss tell the scaler to halve its scale, several steps in a row — no fault while the scale is >= 1."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        finite_grads, finite_loss = torch.stack([torch.isfinite(norm), torch.isfinite(sum(losses.values()))]).tolist()
        if finite_grads:
            self.scaler.step(self.optimizer)
            p.in_a_row = 0
        else:
            overflow = self.scaler.is_enabled() and finite_loss and self.scaler.get_scale() >= 1.0
            p.skipped, p.in_a_row = p.skipped + 1, p.in_a_row + (0 if overflow else 1)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(p.step)

    def averaged(self):
        """The weights that are saved and sampled: the EMA's average swapped in for the block, if there is one."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


def resume(out: str, cfg, model, opt: Optim, rt) -> tuple[Progress, dict]:
    """Load --out's last checkpoint into the model and the optimizer; warn about changed config fields.
    -> the progress and the saved RNG state (restored last, by the caller: making the loader draws from it)."""
    last = ckpt.find_checkpoint(out)
    saved = ckpt.load_config(last)
    ckpt.check_compatible(saved, cfg)
    model.load_checkpoint_state(ckpt.load_weights(last))
    state = ckpt.load_state(last)
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):  # empty when saved in bf16/fp32: an fp16 resume then starts a fresh scale
        opt.scaler.load_state_dict(state["scaler"])
    progress = Progress(state["step"], state["draw"], state["skipped"])
    changes = training.resume_changes(saved, cfg, progress.step)
    if changes and rt.is_main:
        print(f"warning: --resume with {len(changes)} changed config field(s):\n  " + "\n  ".join(changes),
              file=sys.stderr)
    if opt.ema is not None:
        opt.ema.load_state(state["ema"])
    return progress, state["rng"]


def save(out: str, cfg, model, opt: Optim, p: Progress, rt) -> None:
    """RUN/ckpt-<step>: the stage's weights (the EMA's average when on) and the state --resume continues from.
    The main rank writes; every rank waits for it."""
    if rt.is_main:
        state = {"optimizer": opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
                 "scaler": opt.scaler.state_dict(), "rng": training.rng_state(),
                 "step": p.step, "draw": p.draw, "skipped": p.skipped}
        if opt.ema is not None:
            state["ema"] = opt.ema.state()
        with opt.averaged():
            weights = model.checkpoint_state(cfg.stage)
            if opt.ema is not None:  # the trained values come back when the block ends: keep the averaged ones
                weights = {k: v.clone() for k, v in weights.items()}
        ckpt.save_checkpoint(out, p.step, cfg, weights, state, keep=cfg.keep_checkpoints)
    rt.barrier()


def announce(out: str, cfg, rt, table, n_samples: int, fresh: bool) -> None:
    """The parameter table and the batch arithmetic on the console; the run's config.json in --out; a warning
    when a fresh run (no --init or --resume) leaves a base model random for good."""
    from minedit.model import format_param_table

    if rt.is_main:
        print(format_param_table(table, f"{cfg.recipe} · {cfg.preset} · stage {cfg.stage}"))
        global_batch = cfg.batch_size * cfg.grad_accum * rt.world_size
        print(f"effective batch {global_batch} = {cfg.batch_size} per device × {cfg.grad_accum} accumulation × "
              f"{rt.world_size} process(es); {n_samples} samples; device {rt.device}, {cfg.precision}")
        fsio.write_text(os.path.join(out, "config.json"), cfg.to_json())
        if fresh and (never := random_for_good(cfg, table)):
            print(f"warning: {', '.join(never)} built at random and trained in no stage (no --sd_path / --mllm_path "
                  f"/ --clip_path): the model cannot learn through them — for the toy world pass its bases: "
                  f"--sd_path=assets/toy/base/sd --mllm_path=assets/toy/base/mllm --clip_path=assets/toy/base/clip",
                  file=sys.stderr)


def data_loader(data, weights, cfg, rt, draw: int):
    """An endless iterator of this rank's micro-batches, continuing the run's stream of draws at `draw`."""
    from minedit.data import collate

    stream = training.DrawStream(len(data), cfg.seed, rt.rank, rt.world_size, cfg.batch_size, weights, start=draw)
    return iter(torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=stream, collate_fn=collate,
        num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda", persistent_workers=cfg.num_workers > 0))


def log_step(log, p: Progress, sums: dict, opt: Optim, cfg, rt, bar) -> None:
    """One log.jsonl row: the global batch's loss parts (averaged over the ranks, not rank 0's slice), their sum,
    the learning rate, the skipped steps and the samples/s since the previous row."""
    if rt.distributed:
        keys = list(sums)  # the same order on every rank
        mean = torch.stack([sums[k].double() for k in keys]).to(rt.device)
        torch.distributed.all_reduce(mean)
        sums = dict(zip(keys, (mean / rt.world_size).tolist()))
    if rt.is_main:
        rate = log.rate(cfg.batch_size * cfg.grad_accum * rt.world_size * cfg.log_every)
        row = {"step": p.step, "lr": opt.scheduler.get_last_lr()[0], "skipped": p.skipped,
               "samples_s": round(rate, 3), **{k: float(v) for k, v in sums.items()}}
        row["loss"] = sum(v for k, v in row.items() if k in sums)
        log.write(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{rate:.1f}")


def write_samples(model, dataset, cfg, rt, path, rows: int = 4):
    """A PNG grid of the model's current edits of the first few training rows: source | target | edit."""
    from minedit.sampler import edit_grid

    items = [dataset[i] for i in range(min(rows, len(dataset)))]
    model.eval()
    with rt.autocast():
        edit_grid(model, items, path, steps=min(cfg.steps, 20), seed=cfg.seed)
    model.train()


def main(argv=None) -> int:
    # ---- flags and config: a bad flag, field or --out fails here, before anything heavy is built -------------------
    args, overrides = parse_args(argv)
    args.resume, args.overwrite = runfolder.restart_mode(args.out, args.resume, args.overwrite)
    cfg = resolve_config(args, overrides)
    if args.stop_after is not None and args.stop_after <= 0:
        raise UserError(f"--stop-after {args.stop_after}: must be a positive number of steps")
    if args.dry_run:
        return dry_run(cfg)
    runfolder.check(args.out, args.resume, args.overwrite)

    # ---- device, data, run folder (a bad manifest fails before the folder or the model is made) ------------------
    from tqdm import tqdm

    from minedit import runtime

    runfolder.join_restarted_group(runtime.pick_device(args.device))
    rt = runtime.setup(cfg.precision, args.device)
    data, weights = build_data(cfg, args, rt)
    made_out = runfolder.prepare(args.out, args.overwrite and not args.resume, rt)

    # ---- model, optimizer, resume ------------------------------------------------------------------------------
    with runfolder.removed_on_failure(args.out, made_out and rt.is_main):
        model = build_model(cfg, args)
    table = model.set_stage(cfg.stage, rt.frozen_dtype)
    model.to(rt.device)
    opt = Optim.build(model, cfg, rt)
    p, rng = resume(args.out, cfg, model, opt, rt) if args.resume else (Progress(), None)
    announce(args.out, cfg, rt, table, len(data), fresh=not (args.init or args.resume))
    loader = data_loader(data, weights, cfg, rt, p.draw)
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.distributed else model
    if rng is not None:  # restored last: making the DataLoader iterator draws from the global RNG
        training.set_rng_state(rng)

    # ---- the loop: grad_accum micro-batches, one optimizer step, then log / sample / save when due ---------------
    stop, log = runfolder.StopSignal(), runfolder.RunLog(args.out, p.step, rt.is_main)
    end = min(cfg.max_steps, p.step + args.stop_after) if args.stop_after else cfg.max_steps
    model.train()
    with tqdm(total=cfg.max_steps, initial=p.step, disable=not rt.is_main, dynamic_ncols=True) as bar:
        while p.step < end and stop.name is None:
            sums = {}  # this step's loss parts, averaged over its micro-batches
            for micro in range(cfg.grad_accum):
                batch = next(loader)
                batch["step"] = p.step  # for schedules inside the loss (--qformer_teacher_forcing_steps)
                quiet = rt.distributed and micro < cfg.grad_accum - 1  # DDP syncs gradients on the last one only
                with net.no_sync() if quiet else contextlib.nullcontext(), rt.autocast():
                    loss, parts = net(batch, cfg.stage)
                opt.scaler.scale(loss / cfg.grad_accum).backward()
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
            p.draw += cfg.batch_size * cfg.grad_accum * rt.world_size
            opt.step(p, sums, cfg.clip_grad)  # a non-finite step is skipped and counted
            p.step += 1
            bar.update(1)
            if p.in_a_row >= cfg.nan_patience:
                raise UserError(f"{p.in_a_row} non-finite losses in a row at step {p.step} — lower --lr or use "
                                f"--precision=fp32; the last good checkpoint in {args.out} is intact")
            if p.step % cfg.log_every == 0 or p.step == cfg.max_steps:
                log_step(log, p, sums, opt, cfg, rt, bar)
            stop.agree(rt)  # under DDP, a signal to any rank stops every rank at this step
            if cfg.sample_every and p.step % cfg.sample_every == 0 and rt.is_main and cfg.stage > 1:
                with opt.averaged():
                    write_samples(model, data.dataset, cfg, rt, os.path.join(args.out, "samples",
                                                                             f"step-{p.step:07d}.png"))
            if p.step % cfg.save_every == 0 and p.step < cfg.max_steps:
                save(args.out, cfg, model, opt, p, rt)

    # ---- the last checkpoint, whatever stopped the loop ------------------------------------------------------------
    save(args.out, cfg, model, opt, p, rt)
    if rt.is_main:
        why = (f"stopped by {stop.name} at step {p.step}" if stop.name else
               f"stopped by --stop-after at step {p.step} of {cfg.max_steps}" if p.step < cfg.max_steps else
               f"finished {p.step} steps")
        print(f"{why}; checkpoint in {ckpt.find_checkpoint(args.out)}"
              + (f"; {p.skipped} non-finite steps skipped" if p.skipped else ""))
    runtime.shutdown(rt)
    return 0


if __name__ == "__main__":
    run_cli(main)
