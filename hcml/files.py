"""Atomic file writes that a team can share: temp file in the target folder + fsync + rename (a crash never leaves
a half-written file), with the permissions an ordinary ``open`` would give (``mkstemp`` makes 0600, which a
colleague reading a prepared dataset or a checkpoint on a shared disk cannot open). Every layer writes through
here."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, IO

from hcml.errors import HCMLError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_TEMP = re.compile(r"^\.tmp-([A-Za-z0-9_]+)-(\d+)-")


def temp_prefix(path: str | Path) -> str:
    """Name prefix of a temp file for ``path`` (same folder): ``.tmp-<host>-<pid>-<name>``. The writer's host and pid
    in the name let a later run tell a temp file of a killed writer (removed by ``remove_stale_temps``) from one
    still being written."""
    return f".tmp-{_HOST}-{os.getpid()}-{Path(path).name}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temp files (``temp_prefix``) in ``folder`` whose writer was a process of this host that no longer
    runs: a ``kill -9`` or a node failure mid-write leaves them (a checkpoint's is as large as the checkpoint).
    Another host's temp files are kept, since whether their writer still runs cannot be known from here."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(".tmp-*") if recursive else folder.glob(".tmp-*"):
        m = _TEMP.match(p.name)
        if m and m.group(1) == _HOST and not _alive(int(m.group(2))) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class FolderInUse(HCMLError):
    """``FolderLock.acquire`` found the folder locked; ``holder`` says by whom (pid, host, since when)."""

    def __init__(self, folder: Path, holder: str):
        super().__init__(f"{folder} is in use ({holder})")
        self.folder, self.holder = folder, holder


class FolderLock:
    """Exclusive, non-blocking lock on ``folder/.hcml-lock`` for one writer at a time (a run dir, a prepared
    dataset). A POSIX record lock: NFS supports it, and the kernel drops it with the process, so a crashed writer
    leaves nothing stuck. The file names the holder for the refusal message."""

    NAME = ".hcml-lock"

    def __init__(self, folder: str | Path, who: str = ""):
        self.path = Path(folder) / self.NAME
        self.who = who  # e.g. "hcml prepare": named in the refusal a second writer gets
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):  # no locks on this file system (Lustre without
                # flock, some FUSE mounts): go on unlocked rather than refuse every run
                warnings.warn(f"{self.path.parent}: the file system does not support locks ({e.strerror}); a second "
                              f"writer started into this folder would not be refused", stacklevel=2)
            else:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderInUse(self.path.parent, holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.who + ': ' if self.who else ''}pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and rename it into place (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path) + ".")
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failure = write_failure(e, path, "what was there before is intact")
        if failure is not None:
            raise failure from None
        raise
    return path


def write_failure(e: BaseException, path: str | Path, then: str, ignore: tuple[int, ...] = ()) -> HCMLError | None:
    """The one-line error for a write to ``path`` that storage refused (``storage_error``; errnos in ``ignore``
    excepted), ``then`` saying what is intact and what to do; None when ``e`` is not such a failure."""
    cause = storage_error(e)
    if cause is None or cause.errno in ignore:
        return None
    return HCMLError(f"cannot write {path}: {cause.strerror}; {then}")


def storage_error(e: BaseException | None) -> OSError | None:
    """The full-disk / read-only / permission error behind ``e`` (torch.save re-raises it as a RuntimeError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            return e
        e = e.__cause__ or e.__context__
    return None


def remove_own(folder: str | Path, names) -> None:
    """``--overwrite``: delete the named files and folders a command writes in ``folder``, nothing else."""
    import shutil

    for name in names:
        p = Path(folder) / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))
