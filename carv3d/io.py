"""Writing files safely: atomically and durably, under a lock, and with a clear message when the disk is full.

- :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_bytes`: write to a temporary
  name, fsync it, rename it onto the target, fsync the folder. A crash (kill -9, power loss) leaves
  either the old file or the new one, never half of one.
- :class:`FileLock`: an ``fcntl.flock`` lock on a file, so that two processes never work in the same
  folder at once. The kernel drops it when its process dies, even by kill -9: no stale locks.
- :func:`reporting_full_disk`: turns "no space left" (and torch's way of saying it) into a
  :class:`~carv3d.errors.DiskFullError` that names the file and the free space.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from carv3d.errors import DiskFullError

PathLike = Union[str, os.PathLike]
TEMPORARY_MARK = ".tmp-"  # atomic_path's temporaries are ".<stem>.tmp-<random><suffix>"


# ---------------------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is made durable and renamed onto ``path``.

    The temporary file keeps the final suffix (``.tmp-xxxx.glb``) so libraries that pick a format
    from the extension (imageio, trimesh) still do the right thing. On error it is removed.

    Durability: the file's data is fsynced before the rename (otherwise a power loss can leave the
    new name pointing at an empty file), and the folder is fsynced after it (otherwise the rename
    itself can be lost, and with it e.g. the newest checkpoint that LATEST already names).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}{TEMPORARY_MARK}", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the user's usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, path)
        fsync_directory(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_file(path: PathLike) -> None:
    """Flush ``path``'s data to the disk (the writer may have closed it: fsync works on any descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Filesystems that cannot fsync a directory say so with these; there is nothing more to do there.
_NO_DIRECTORY_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES}


def fsync_directory(folder: PathLike) -> None:
    """Make a rename in ``folder`` durable. A no-op where the OS or filesystem cannot do it."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIRECTORY_FSYNC:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_report(path: PathLike, report: Any, indent: int = 2, **dumps: Any) -> None:
    """A benchmark's JSON, rewritten atomically (its folder made first), so that a reader or a run
    killed mid-write sees the previous complete file; values JSON cannot hold are written as ``str``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=indent, default=str, **dumps))


def temporaries_of(folder: PathLike, stem_patterns: Iterable[str]) -> list[Path]:
    """The :func:`atomic_path` temporaries in ``folder`` whose target's stem matches one of the regexes.

    A process killed between creating a temporary and renaming it leaves one behind; only the owner
    of the folder (e.g. the holder of the run's lock) may remove them, since a live writer's
    temporary looks the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = re.compile(r"^\.(?:" + "|".join(stem_patterns) + ")" + re.escape(TEMPORARY_MARK) + r"[^/]+$")
    return sorted(p for p in folder.iterdir() if pattern.match(p.name) and p.is_file())


def make_writable_folder(folder: PathLike) -> Path:
    """Create ``folder`` (and its parents) if missing and prove a file can be written in it.

    Called before slow work whose result goes there, so a bad output path fails first. Creating and
    removing a file is the only reliable test: permission bits say nothing about a read-only mount,
    ``/proc``, or a parent that is a file. Raises the ``OSError`` (callers turn it into a user error).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
        pass
    return folder


def unwritable_reason(folder: PathLike) -> Optional[str]:
    """Why files could not be created in ``folder``, or None when they can: tested in ``folder``, or,
    when it does not exist yet, in its nearest existing parent (where the folder would be created).
    Creates nothing that outlives the call (a check before a run, unlike :func:`make_writable_folder`)."""
    existing = Path(folder).expanduser()
    while not existing.exists():
        if existing.parent == existing:
            return f"no part of {folder} exists"
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"cannot create files in {existing}: {err.strerror or err}"
    return None


def check_output_file(target: Path, overwrite: bool, option: str = "--out") -> None:
    """Fail early, before the slow part, when a report could not be written to ``target``: a folder, an
    existing file without ``overwrite``, or a parent folder that cannot be created or written
    (:func:`make_writable_folder`). A missing parent folder is created. ``option``: the flag that
    names ``target``, for the message."""
    from carv3d.errors import OutputPathError

    if target.is_dir():
        raise OutputPathError(f"'{target}' is a folder; pass {option} with a file name.")
    if target.exists() and not overwrite:
        raise OutputPathError(f"'{target}' already exists; pass --overwrite to replace it or {option} to write elsewhere.")
    folder = target.parent
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"cannot write '{target}': '{folder}' is a file, not a folder; pass {option} with a "
                              f"file in a folder.")
    try:
        make_writable_folder(folder)
    except OSError as err:
        raise OutputPathError(f"cannot write '{target}': {err.strerror or err} in '{folder}'; pass {option} with a "
                              f"file in a writable folder.") from None


# ---------------------------------------------------------------------------------------- full disk
# ENOSPC: no space; EDQUOT: quota exhausted; EFBIG: the file size limit (RLIMIT_FSIZE) was reached.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# torch.save writes through a C++ stream and reports a failed write as a RuntimeError such as
# "[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0" or "... file write failed".
_TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "inline_container")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` means that a write ran out of space (or of allowed file size)."""
    if isinstance(err, OSError):
        return err.errno in DISK_FULL_ERRNOS
    if isinstance(err, RuntimeError):
        text = str(err)
        return any(marker in text for marker in _TORCH_WRITE_FAILURES)
    return False


def free_space(path: PathLike) -> Optional[int]:
    """Bytes free on the filesystem that holds ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def format_bytes(count: Optional[int]) -> str:
    if count is None:
        return "an unknown amount"
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


def disk_full_error(path: PathLike, err: BaseException, consequence: str) -> DiskFullError:
    """A one-line :class:`DiskFullError` for a failed write of ``path``.

    Args:
        path: the file that could not be written (its final name, not a temporary's).
        err: the ``OSError`` / torch ``RuntimeError``.
        consequence: what is (not) lost and how to carry on, e.g. "Nothing is lost: ... Free some
            space, then continue with `carv3d train --resume RUN_DIR`."
    """
    path = Path(path)
    free = format_bytes(free_space(path.parent))
    if isinstance(err, OSError) and err.errno == errno.EFBIG:
        cause = f"the file size limit of this process was reached (ulimit -f; {free} free on the disk)"
    elif isinstance(err, OSError) and err.errno == errno.EDQUOT:
        cause = f"the disk quota is exhausted ({free} free on the disk)"
    elif isinstance(err, OSError):
        cause = f"the disk is full ({free} free)"
    else:
        first = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        cause = f"the write failed ({first}); the disk is most likely full ({free} free)"
    return DiskFullError(f"could not write {path}: {cause}. {consequence}")


@contextlib.contextmanager
def reporting_full_disk(path: PathLike, consequence: str) -> Iterator[None]:
    """Turn a disk-full failure inside the block into :func:`disk_full_error`; other errors pass through."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        raise disk_full_error(path, err, consequence) from err


# ---------------------------------------------------------------------------------------- locks
class LockHeld(Exception):
    """Raised by :meth:`FileLock.acquire` when another process holds the lock.

    ``holder`` is what that process wrote into the lock file (``pid``, ``host``), or ``{}``. Callers
    turn it into a user error that says who holds it and what to do.
    """

    def __init__(self, path: Path, holder: dict[str, Any]):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path = path
        self.holder = holder


class FileLock:
    """An exclusive, non-blocking ``fcntl.flock`` lock on ``path``, recording who holds it.

    flock rather than "create the file exclusively": the kernel releases a flock when its process
    ends in any way (kill -9, OOM, a power cut's reboot), so a lock is never stale and needs no
    "is that pid still alive" guess. The holder's pid and host are written into the file for the
    message another process gets. The file is removed on release; a process that opened it just
    before is told by the inode check in :meth:`acquire` and tries again.
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`LockHeld`; ``OSError`` when the file cannot be created."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockHeld(self.path, holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
                opened = os.fstat(fd)
                same = (current.st_ino, current.st_dev) == (opened.st_ino, opened.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: start over
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before unlocking, so no one can lock the old file after us
        finally:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "FileLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
