"""Files that survive faults: writes that are whole or absent, a full disk said in one line,
output folders checked before any work, and one build at a time in a folder.

Every file a run leaves behind (cache samples, manifests, grounded images, checkpoints) is
written to a temporary name in its own folder and renamed into place, so a crash, a kill or a
full disk leaves the previous version, never a torn one under a valid name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from grounded_diffusion.errors import ConfigError, UserError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError):
    """No space left (or the quota is used up) where a run writes."""


class FolderBusyError(UserError, RuntimeError):
    """Another run is writing the same folder."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS


def nearest_existing(path: str | Path) -> Path:
    """``path`` if it exists, else its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or would hold it)."""
    return shutil.disk_usage(nearest_existing(path)).free


def disk_full_error(path: str | Path, kept: str) -> DiskFullError:
    """``disk full at PATH, N bytes free``, what was kept, and how to go on."""
    return DiskFullError(
        f"disk full at {path}, {free_bytes(path):,} bytes free: free some space (or write elsewhere) and rerun "
        f"the same command; {kept}",
    )


class ReadOnlyError(UserError):
    """Where a run writes is read-only (or not ours to write)."""


READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def write_error(error: BaseException, path: str | Path, kept: str) -> UserError | None:
    """The one-line error for a write that failed because the disk is full or read-only."""
    if is_disk_full(error):
        return disk_full_error(path, kept)
    if isinstance(error, OSError) and error.errno in READ_ONLY_ERRNOS:
        return ReadOnlyError(
            f"cannot write {path}: {error.strerror.lower()}; write elsewhere (a folder you can write in) or make "
            f"it writable, then rerun the same command; {kept}"
        )
    return None


def atomic_write(
    path: str | Path, write: Callable[[Path], object], kept: str = "nothing else was changed"
) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it to ``path``. On any failure
    the temporary file is removed (a full disk gets its space back) and ``path`` is untouched;
    a full or read-only disk raises one line naming ``path``. The file gets the usual mode
    (0666 less the umask), whatever ``write`` created it with."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # (a read-only disk refuses the cleanup too: the first error is the one to say)
        said = write_error(error, path, kept)
        if said is not None:
            raise said from error
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_folder(
    folder: str | Path, write: Callable[[Path], object], kept: str = "nothing was changed"
) -> Path:
    """Build a whole folder with ``write(tmp)`` in a temporary folder beside ``folder``, then put it
    in place at once: a new name is a rename; an existing folder is swapped with it atomically
    (``renameat2(RENAME_EXCHANGE)``; where the filesystem lacks it, two renames, with the old
    folder kept under a hidden name between them) and then deleted. A kill or a full disk
    leaves the old folder whole, never a mix of old and new files."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # (mkdtemp makes it 0700)
        write(tmp)
        if folder.is_dir() and any(folder.iterdir()):
            _swap(tmp, folder)  # tmp now holds the old folder, deleted below
        else:
            os.replace(tmp, folder)  # (onto a missing name, or an empty folder)
    except BaseException as error:
        said = write_error(error, folder, kept)
        if said is not None:
            raise said from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _swap(a: Path, b: Path) -> None:
    """Exchange two folders' names at once (Linux ``renameat2``), or by two renames."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass  # (no renameat2 in this C library)
    aside = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def check_writable_folder(folder: str | Path, key: str) -> None:
    """``folder`` is a folder this process can write in, or can be created: one line naming the
    config key otherwise (before any work). Found by trying: permission bits do not stop root,
    and ``os.access`` cannot see every cause (ACLs, network mounts)."""
    folder = Path(folder)
    existing = nearest_existing(folder) if not folder.exists() else folder
    if not existing.is_dir():
        raise ConfigError(
            f"{key} '{folder}': {existing} is a file, not a folder; give a folder path (or move the file away)"
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = "read-only" if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else error.strerror
        target = "" if existing == folder else f" (its parent {existing}, where it would be created)"
        raise ConfigError(
            f"{key} '{folder}' is not writable{target}: {reason}; give a folder you can write in "
            f"(--{key} PATH)"
        ) from error


def read_text_file(path: str | Path, what: str) -> str:
    """A UTF-8 text file (a byte-order mark, as some editors save, is dropped), or one line
    naming ``what`` and saying why it cannot be one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{what} '{path}' is not UTF-8 text (byte {error.start}): save it as UTF-8 (e.g. from a Latin-1 file: "
            f"`iconv -f latin1 -t utf-8`), one entry per line"
        ) from None


class FolderLock:
    """One run at a time writes a folder: an exclusive ``flock`` on ``<folder>/.lock``, which
    names its holder. The lock goes with the process (a killed run holds none), so there is no
    stale lock to clear by hand.

    Args:
        folder: the folder to guard.
        what: the folder's role in messages, e.g. ``the triplet cache``.
        key: the config key that chooses the folder, for the fix.
    """

    def __init__(self, folder: str | Path, what: str, key: str) -> None:
        self.folder, self.what, self.key = Path(folder), what, key
        self.path = self.folder / ".lock"
        self.handle = None

    def acquire(self) -> None:
        if self.handle is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FolderBusyError(
                f"{self.what} at '{self.folder}' is being written by another run ({holder}); wait for it to "
                f"finish (then rerun this to go on from it), or give this run another {self.key}"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the last descriptor drops the flock
            self.handle = None
