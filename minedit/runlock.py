"""One training process per run folder: RUN/.lock holds the owner's PID and host.

A second `train.py` on the same --out (a typo, a job scheduled twice, --resume while the first still runs) would
interleave checkpoints and logs; it refuses instead. A lock whose process is gone (killed with SIGKILL, a crashed
node restarted) is taken over with a warning, so a crash never leaves a run stuck. A lock written on another
host cannot be checked from here: the error says so and how to clear it.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time

from .errors import UserError

NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as stale


def acquire(run_dir: str) -> str:
    """Take RUN/.lock for this process (released at exit); UserError if a live process holds it."""
    path = os.path.join(run_dir, NAME)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner.get("host", me["host"]) != me["host"]:
                raise UserError(f"{run_dir} is locked by process {owner['pid']} on host {owner['host']} (since "
                                f"{owner.get('since', '?')}) — wait for that run or choose another --out; if it "
                                f"is gone, delete {path}") from None
            if owner and _alive(owner["pid"]) and owner["pid"] != me["pid"]:
                raise UserError(f"{run_dir} is in use by train.py process {owner['pid']} (since "
                                f"{owner.get('since', '?')}) — wait for it to finish, stop it, or choose another "
                                "--out") from None
            print(f"warning: {path} was left by process {owner.get('pid', '?')}, which is no longer running: "
                  "taking the run folder over", file=sys.stderr)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue  # another process may have taken it meanwhile: O_EXCL decides
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        atexit.register(release, run_dir)
        return path
    raise UserError(f"could not take {path}: other processes keep taking it — run one train.py per --out")


def release(run_dir: str) -> None:
    """Remove RUN/.lock if this process holds it."""
    path = os.path.join(run_dir, NAME)
    if _read(path).get("pid") == os.getpid():
        try:
            os.remove(path)
        except OSError:
            pass
