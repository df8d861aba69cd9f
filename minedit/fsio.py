"""Every file minedit writes goes through here: a temporary name, fsync, then one rename.

A reader therefore sees either the previous complete file or the new complete one, never half of one, whatever
happens during the write (a full disk, an I/O error, a folder turned read-only, a killed process). A failed write
removes its temporary file and becomes one `UserError` naming the path, what failed and the fix:

    no space left on device writing RUN/ckpt-0000020 (needs ~21 MB) — free space or choose another --out

Used by checkpoints, log.jsonl, sample grids, infer.py's edits, evaluate.py's edits and results, and a toy prior's
UNet folder (`replace_dir`).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil

from .errors import UserError

_WHAT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EIO: "input/output error",
         errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
_FIX = {errno.ENOSPC: "free space or choose another {where}", errno.EDQUOT: "free space or choose another {where}",
        errno.EIO: "the disk or network filesystem failed: check the disk (dmesg) or choose another {where}",
        errno.EROFS: "choose a writable {where}", errno.EACCES: "choose a writable {where}",
        errno.EPERM: "choose a writable {where}"}


def human_size(n: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (decimal units, like df -H)."""
    unit = "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{n:.0f} {unit}" if unit == "B" or n >= 10 else f"{n:.1f} {unit}"


def write_error(e: OSError, path: str, where: str = "--out", need: int | None = None,
                kept: str = "files written before are intact") -> UserError:
    """The one message for a failed write: what failed, on which path, the size it needed, the fix, what is kept."""
    what = _WHAT.get(e.errno, e.strerror or str(e))
    size = f" (needs ~{human_size(need)})" if need else ""
    fix = _FIX.get(e.errno, "check the folder or choose another {where}").format(where=where)
    return UserError(f"{what} writing {path}{size} — {fix}; {kept}")


def makedirs(path: str, where: str = "--out") -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(e, path, where) from None


@contextlib.contextmanager
def atomic_path(path: str, where: str = "--out", need: int | None = None, suffix: str = "", durable: bool = True,
                kept: str = "files written before are intact"):
    """Yield a temporary path beside `path`; when the block ends without error, fsync it and rename it onto
    `path`. Any OSError (in the block or the rename) removes the temporary file and raises `write_error` (whose
    message ends with `kept`). `suffix` keeps an extension a writer needs (PIL picks the format from it).
    `durable=False` skips the fsyncs, for a writer whose own later record (a manifest row) commits the file."""
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{os.getpid()}{suffix}"
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        _remove(tmp)
        raise write_error(e, path, where, need, kept) from None
    except BaseException:
        _remove(tmp)
        raise


def replace_dir(path: str, save, where: str = "--out", need: int | None = None,
                kept: str = "files written before are intact") -> None:
    """Replace the folder `path` by what `save(tmp)` writes into a fresh folder beside it. The old folder is
    renamed aside first and removed only once the new one is in place, so a kill at any moment leaves one of the
    two complete (the old one, if need be, as `.NAME.old` beside it); a failed write or rename puts the old one
    back and raises `write_error` (with `need` and `kept` as there)."""
    tmp, old = beside(path, "tmp"), beside(path, "old")
    try:
        _remove(tmp)
        save(tmp)
        for folder, _, files in os.walk(tmp):  # on disk before the rename makes the folder look complete
            for f in files:
                _fsync_file(os.path.join(folder, f))
        _remove(old)
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(path) or ".")
    except OSError as e:
        _remove(tmp)
        if os.path.exists(old) and not os.path.exists(path):
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise write_error(e, path, where, need, kept) from None
    _remove(old)


def beside(path: str, kind: str) -> str:
    """replace_dir's hidden folder of `path`: `.NAME.tmp` (being written) or `.NAME.old` (set aside)."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}")


def recover_replaced(parent: str, prefix: str) -> None:
    """Settle what a kill in the middle of replace_dir left in `parent` for folders named `prefix*`: one set
    aside (`.NAME.old`, complete) goes back under its name when that is missing, else it is a spare copy and is
    removed; a half-written `.NAME.tmp` is removed."""
    for d in os.listdir(parent):
        if not (d.startswith("." + prefix) and d.endswith((".old", ".tmp"))):
            continue
        hidden, path = os.path.join(parent, d), os.path.join(parent, d[1:-4])
        if d.endswith(".old") and not os.path.exists(path):
            os.replace(hidden, path)
        else:
            _remove(hidden)


def write_text(path: str, text: str, where: str = "--out") -> None:
    """Replace `path` by `text` (UTF-8) atomically."""
    with atomic_path(path, where) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def save_image(img, path: str, where: str = "--out") -> None:
    """Save a PIL image atomically, in the format its extension names."""
    ext = os.path.splitext(path)[1] or ".png"
    with atomic_path(path, where, suffix=ext) as tmp:
        img.save(tmp)


def append_line(path: str, line: str, where: str = "--out") -> None:
    """Append one line; a failed append is cut back to the previous end, so no half line stays in the file."""
    data = (line if line.endswith("\n") else line + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(e, path, where) from None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
            if written != len(data):  # a short write is how a nearly full disk answers
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            raise write_error(e, path, where) from None
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make the rename itself durable; some filesystems cannot fsync a folder, which is not an error."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
