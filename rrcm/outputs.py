"""Where rrcm writes: outputs checked before work starts, one writer per output, files replaced whole.

- `check_writable(path)`: the output can be created and written (no file in the way of its folder,
  a writable place, optionally the free space it needs), tried with a probe file before any work.
- `OutputLock(path)`: an advisory lock (flock) on PATH.lock, held for a whole run. A second run on the
  same output is refused; the kernel releases the lock when its process dies, so a crash never blocks a
  resume. A finished run removes PATH.lock; a killed one leaves it for the next run to take over.
- `atomic_write(path, data)`: a temporary file next to `path`, flushed to disk, renamed over it.
  A failed write (disk full, read-only place) is a one-line UserError and `path` keeps its old content.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from rrcm.errors import UserError


def write_error(path: str | Path, e: OSError) -> UserError:
    """A failed write as one line: the file and the system's reason (disk full, read-only, ...)."""
    return UserError(f"cannot write {path}: {e.strerror or type(e).__name__}")


def check_writable(path: str | Path, *, folder: bool = False, need_bytes: int = 0) -> Path:
    """Refuse, before any work, an output `path` (a file, or a `folder`) that could not be written."""
    path = Path(path)
    try:
        if path.is_dir() != folder and path.exists():
            raise UserError(f"{path} is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
        place = path if folder and path.is_dir() else path.parent
        while not place.exists():  # the folders still to be made: can their nearest existing parent take them?
            place = place.parent
        if not place.is_dir():
            raise UserError(f"cannot write {path}: {place} is a file, not a folder")
        fd, probe = tempfile.mkstemp(dir=place, prefix=".rrcm-probe-")
        os.close(fd)
        os.unlink(probe)
        free = shutil.disk_usage(place).free
    except OSError as e:
        raise write_error(path, e) from None
    if free < need_bytes:
        raise UserError(f"cannot write {path}: it needs about {need_bytes / 2**20:,.0f} MiB, {place} has "
                        f"{free / 2**20:,.0f} MiB free")
    return path


def make_folder(path: str | Path) -> Path:
    """`path` and its parents as folders, or a one-line error."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None
    return Path(path)


def publish(tmp: Path, path: Path) -> None:
    """Flush the finished temporary file `tmp` to disk and rename it over `path`; on failure remove it."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    try:  # the rename itself, on file systems that sync folders
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write `data` (bytes, text, or a function writing to a binary file) to `path` as a whole or not at all."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, path)
    return path


class OutputLock:
    """Exclusive use of an output (file or folder) for one run: `with OutputLock(out): ...`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock_path = self.path.parent / (self.path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        make_folder(self.lock_path.parent)
        while self._fd is None:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise write_error(self.lock_path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode(errors="replace").strip()
                os.close(fd)
                raise UserError(f"{self.path} is in use by another rrcm run{f' (process {holder})' if holder else ''}; "
                                "wait for it to end or use another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock: then retry
                current = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.lock_path.unlink(missing_ok=True)  # while still locked, so nobody else holds a lock on this file
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
