"""The run folder of train.py and everything around it that is not training: checks, lock, restarts, signals, log.

A run folder holds config.json, log.jsonl, samples/ and ckpt-NNNNNNN/ folders with `latest` naming the newest
(minedit/checkpoint.py writes those). This module keeps it consistent whatever happens to the job:
  * `check` refuses a bad --out before anything heavy is built; `prepare` creates it, takes its lock
    (minedit/runlock.py) and empties an old run under --overwrite; `removed_on_failure` undoes a folder that a
    failed start left empty, so that the same command can simply be rerun;
  * `restart_mode` and `join_restarted_group` let `torchrun --max-restarts` restart every rank with the same
    command line: the run continues from its last checkpoint instead of refusing its own folder;
  * `StopSignal` turns SIGINT/SIGTERM into "finish this step, save, exit 0" (agreed by every rank under DDP);
  * `RunLog` appends log.jsonl rows and, on --resume, first drops the rows logged after the checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time

import torch

from . import fsio, runlock
from .errors import UserError

RUN_FILES = ("latest", "log.jsonl", "samples", "config.json")  # what --overwrite removes, besides the checkpoints


# ---- the folder ---------------------------------------------------------------------------------------------------
def check(out: str | None, resume: bool, overwrite: bool) -> None:
    """Refuse a missing, file, read-only or already-used --out (unless --resume/--overwrite): before anything
    heavy is imported or built."""
    if not out:
        raise UserError("--out is required — name the run folder to write, e.g. --out runs/stage2")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file — name a folder")
    if os.path.isfile(os.path.join(out, "config.json")) and not (resume or overwrite):
        raise UserError(f"{out} already holds a run — pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent if not os.path.isdir(out) else out, os.W_OK):
        raise UserError(f"cannot write to --out {out} (read-only) — choose a writable folder")


def prepare(out: str, empty_old_run: bool, rt) -> bool:
    """Create the run folder (emptying the old run's files when `empty_old_run`, i.e. --overwrite without
    --resume), lock it and prove it writable; the refusals themselves ran earlier, in `check`. Every rank calls
    this; the main one does the work. -> whether this call made the folder."""
    made = not os.path.exists(out)
    holds_run = os.path.isfile(os.path.join(out, "config.json"))
    if rt.is_main:
        fsio.makedirs(out)
        runlock.acquire(out)  # before --overwrite empties anything: a live run is never touched
        if holds_run and empty_old_run:
            for name in os.listdir(out):
                if name.startswith(("ckpt-", ".ckpt-")) or name in RUN_FILES:
                    path = os.path.join(out, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        try:
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            probe = os.path.join(out, f".probe-{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to --out {out} ({e.strerror}) — choose a writable folder") from None
    rt.barrier()
    return made


@contextlib.contextmanager
def removed_on_failure(out: str, made: bool):
    """A block that may fail before the run wrote anything (e.g. a base model that will not load): on failure,
    remove the folder `prepare` made (when `made`: this process created it and is the main rank) and its lock."""
    try:
        yield
    except BaseException:
        if made:
            samples = os.path.join(out, "samples")
            runlock.release(out)
            if os.path.isdir(samples) and not os.listdir(samples) and os.listdir(out) == ["samples"]:
                shutil.rmtree(out)
        raise


# ---- torchrun restarts --------------------------------------------------------------------------------------------
def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def restart_mode(out: str | None, resume: bool, overwrite: bool) -> tuple[bool, bool]:
    """torchrun --max-restarts restarts every rank with the same command line: continue this run, do not refuse
    the folder it already wrote. -> (resume, overwrite): with a checkpoint, resume; killed before the first one,
    start over. Unchanged outside a restart."""
    if _restart_count() <= 0 or resume or not out or not os.path.isfile(os.path.join(out, "config.json")):
        return resume, overwrite
    from .checkpoint import find_checkpoint

    try:
        find_checkpoint(out)
        resume = True
    except UserError:
        overwrite = True
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"restarted by torchrun (restart {_restart_count()}): "
              + ("resuming from the last checkpoint" if resume else "no checkpoint yet, starting over"),
              file=sys.stderr)
    return resume, overwrite


def join_restarted_group(device: torch.device) -> None:
    """After a torchrun restart, join the process group under a key prefix of this attempt: the agent's store
    still holds the previous attempt's gloo/nccl addresses, and the new ranks would connect to dead ones.
    (runtime.setup then finds the group initialised.)"""
    restart = _restart_count()
    if restart <= 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    store, rank, world = next(torch.distributed.rendezvous("env://"))
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                         store=torch.distributed.PrefixStore(f"attempt-{restart}", store))


# ---- signals ------------------------------------------------------------------------------------------------------
class StopSignal:
    """SIGINT/SIGTERM set `name`; the loop finishes its step, saves and exits 0 (a scheduler's pre-emption notice
    or Ctrl-C never costs more than one step)."""

    def __init__(self):
        self.name: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._caught)

    def _caught(self, signum, _frame) -> None:
        self.name = signal.Signals(signum).name

    def agree(self, rt) -> None:
        """Under DDP every rank must stop at the same step: one that was signalled stops them all (one
        all-reduce of a flag per step)."""
        if not rt.distributed:
            return
        flag = torch.tensor([self.name is not None], dtype=torch.int32, device=rt.device)
        torch.distributed.all_reduce(flag)
        if flag.item() and self.name is None:
            self.name = "SIGTERM"


# ---- log.jsonl ----------------------------------------------------------------------------------------------------
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


class RunLog:
    """RUN/log.jsonl, one JSON row per logged step, written by the main rank. Opened at `step` > 0 (a resumed
    run), it first drops the rows of later steps. `rate(samples)` is the throughput since the previous row."""

    def __init__(self, out: str, step: int, is_main: bool):
        self.path, self.t0 = os.path.join(out, "log.jsonl"), time.perf_counter()
        if is_main and step and os.path.isfile(self.path):
            keep_log_until(self.path, step)

    def rate(self, samples: int) -> float:
        now = time.perf_counter()
        rate, self.t0 = samples / (now - self.t0), now
        return rate

    def write(self, row: dict) -> None:
        fsio.append_line(self.path, json.dumps(row))
