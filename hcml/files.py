"""Atomic file writes that a team can share: temp file in the target folder + fsync + rename (a crash never leaves
a half-written file), with the permissions an ordinary ``open`` would give (``mkstemp`` makes 0600, which a
colleague reading a prepared dataset or a checkpoint on a shared disk cannot open). Every layer writes through
here."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, IO

from hcml.errors import HCMLError


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temp file next to ``path`` and rename it into place (mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
        cause = _storage_error(e)
        if cause is not None:
            raise HCMLError(f"cannot write {path}: {cause.strerror}; what was there before is intact") from None
        raise
    return path


def _storage_error(e: BaseException | None) -> OSError | None:
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
