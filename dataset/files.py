"""Files the commands write: atomic outputs, output-path checks before work starts, stale temporaries,
a run lock, per-output locks, and file fingerprints.

Every file-system failure here becomes an :class:`~dataset.errors.InputError` that names the path
and the cause (read-only, no space left, not a folder, ...), so the commands end with one line.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

from dataset.errors import WRITE_ERRNOS, InputError, os_error_text

Item = TypeVar("Item")

#: Below this many free bytes a failed write is reported as "no space left on the device".
LOW_SPACE = 16 << 20


def _temporary_prefix(path: str) -> str:
    return "." + os.path.basename(path) + "."


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary file is flushed to disk before the rename, so a full disk fails here rather than
    leaving a short file under the final name. An interrupted or failed write leaves no file at
    ``path`` (and removes the temporary one).

    Raises:
        InputError: the folder cannot be written or the disk is full, naming ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise InputError(f"{path}: cannot write ({os_error_text(exc)})") from None
    try:
        yield tmp
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _sync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise InputError(f"{path}: cannot write ({os_error_text(exc)}); nothing was saved under this name") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failure_cause(path: str, fallback: str) -> str:
    """Why a write beside ``path`` failed when the library did not say: a full disk, else ``fallback``."""
    try:
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except OSError:
        return fallback
    free = stat.f_bavail * stat.f_frsize
    if free < LOW_SPACE:
        return f"no space left on the device, {free // 1024} KiB free"
    return fallback


def remove_stale_temporaries(paths: list[str]) -> int:
    """Remove the temporary files that an interrupted :func:`atomic_output` of ``paths`` left behind.

    Only names of the form ``.<name>.<random>.tmp`` beside each path are touched. Call it when a
    command starts, for the outputs that this command alone writes. Returns how many were removed.
    """
    removed = 0
    for path in paths:
        folder = os.path.dirname(os.path.abspath(path))
        for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(_temporary_prefix(path)) + "*.tmp")):
            with contextlib.suppress(OSError):
                os.remove(stale)
                removed += 1
    return removed


def check_output_folder(path: str, flag: str, shown: str | None = None) -> None:
    """Make sure files can be written in the folder ``path`` (or created there), before any work starts.

    Nothing is created: a folder that does not exist yet is checked through its nearest existing
    parent.

    Raises:
        InputError: ``"<flag> <shown or path>: ..."`` when it (or a parent) is a file, or it cannot be
            written.
    """
    shown = shown or path
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == os.path.abspath(path) else f"{existing} is a file"
        raise InputError(f"{flag} {shown}: {what}, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise InputError(f"{flag} {shown}: cannot write in this folder ({os_error_text(exc)})") from None


def check_output_file(path: str, flag: str) -> None:
    """Make sure the file ``path`` can be written (its folder writable, ``path`` not a folder).

    Raises:
        InputError: naming ``flag`` and ``path``.
    """
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a folder; give a file name")
    check_output_folder(os.path.dirname(os.path.abspath(path)), flag, shown=path)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's content (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        feed_digest(digest, fh)
    return digest.hexdigest()


def feed_digest(digest: Any, fh: BinaryIO) -> None:
    """Feed a ``hashlib`` object the rest of the open binary file ``fh``, 1 MiB at a time."""
    for block in iter(lambda: fh.read(1 << 20), b""):
        digest.update(block)


class FolderLock:
    """An exclusive lock on ``<folder>/<name>`` held while a command writes the folder.

    It is an ``fcntl.flock`` lock, which the kernel drops when the process ends however it ends,
    so a killed run never leaves the folder locked. The file records who holds it.

    Raises:
        InputError: another process holds the lock (naming it), or the folder cannot be written.
    """

    def __init__(self, folder: str, name: str = ".lock", what: str = "a run") -> None:
        import fcntl

        self.path = os.path.join(folder, name)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"{folder}: cannot write in this folder ({os_error_text(exc)})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise InputError(f"{folder}: {what} is already writing here ({holder}); wait for it to end or choose "
                             "another folder") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


class OutputLocks:
    """Exclusive locks on single outputs of a folder, one held at a time, while a command writes them.

    Commands that share a folder by design (the shards and ranks of one mapping run, or two runs of
    it started by mistake) each lock an output before they remove its stale temporaries, check it
    and write it, so none deletes another's file in progress or maps the same tile at the same time.
    The locks are POSIX byte-range locks on one file, ``<folder>/<name>``, one byte per output (at an
    offset from a hash of its file name): the kernel drops them when the process ends, however it
    ends. The last process to finish removes the file; one that locked a file removed meanwhile
    locks the new one instead.

    Raises:
        InputError: the lock file cannot be created in the folder.
    """

    def __init__(self, folder: str, name: str = ".outputs.lock") -> None:
        self.path = os.path.join(folder, name)
        self._fd: int | None = None
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{folder}: cannot create the folder ({os_error_text(exc)})") from None
        self._open()

    def _open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops this process's locks in the file: none is held between outputs
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot create the lock file ({os_error_text(exc)})") from None

    def _is_current(self) -> bool:
        """Whether the open lock file is still the one under its name (not removed by a finished process)."""
        try:
            on_disk, held = os.stat(self.path), os.fstat(self._fd)
        except FileNotFoundError:
            return False
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    @staticmethod
    def _offset(path: str) -> int:
        return int.from_bytes(hashlib.sha256(os.path.basename(path).encode()).digest()[:6], "big")

    def acquire(self, path: str, wait: bool) -> bool:
        """Lock output ``path``; without ``wait``, return False at once if another process holds it."""
        import fcntl

        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1, self._offset(path))
            except (BlockingIOError, PermissionError):
                return False
            if self._is_current():
                return True
            self._open()

    def release(self, path: str) -> None:
        import fcntl

        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self._offset(path))

    def close(self) -> None:
        """Close the lock file, and remove it if no other process holds a lock in it."""
        import fcntl

        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file: fails while any output is held
            if self._is_current():
                os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLocks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def locked_in_turn(folder: str, items: Iterable[Item], path_of: Callable[[Item], str],
                   waiting: Callable[[str], None]) -> Iterator[Item]:
    """Yield ``items`` one at a time, each with the :class:`OutputLocks` lock of its output ``path_of(item)``
    held until the next one is asked for.

    An item whose output another process holds is put off until the others are done; then
    ``waiting(path)`` is called and its lock waited for. The caller checks the output again once it
    has the item: the other process may have finished it meanwhile.
    """
    with OutputLocks(folder) as locks:
        busy = []
        for item in items:
            path = path_of(item)
            if not locks.acquire(path, wait=False):
                busy.append((item, path))
                continue
            try:
                yield item
            finally:
                locks.release(path)
        for item, path in busy:
            waiting(path)
            locks.acquire(path, wait=True)
            try:
                yield item
            finally:
                locks.release(path)
