"""Edits of one folder, one at a time: a lock held from the read to the write.

A read-modify-write of a checkpoint folder (``lorashare add``, ``remove``, a save over the
checkpoint a model was loaded from) holds :func:`folder_lock` on it, so two edits at once run
one after the other instead of one silently undoing the other.

The lock is ``flock`` on the folder's *parent* directory: the folder itself is swapped out by
every atomic save (a lock on its inode would guard a folder that is gone), and no lock file is
left beside the user's files.  ``flock`` is released by the kernel when a process dies, so a
killed edit never leaves a stale lock.  Within one process the lock is re-entrant (a save inside
the CLI's edit takes it again) and threads take turns.  Where ``fcntl`` is missing (Windows)
only the threads of one process are serialised; savers still compare what they read with what
is there (:class:`~lorashare.errors.ConflictError`).

Example:
    >>> with folder_lock("share_ckpt"):  # doctest: +SKIP
    ...     share = SHAREModel.from_pretrained("share_ckpt")
    ...     share.remove_adapter("old")
    ...     share.save_pretrained("share_ckpt")
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Dict, Iterator, Optional

from ..errors import ConflictError

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["LOCK_TIMEOUT_ENV", "DEFAULT_LOCK_TIMEOUT", "folder_lock", "lock_timeout"]

LOCK_TIMEOUT_ENV = "LORASHARE_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 600.0
_POLL = 0.05

class _Entry:
    """One locked parent: the threads' turn, how deep the holding thread is, and the flocked descriptor.

    ``depth`` and ``fd`` are only touched by the thread that holds ``turn``.
    """

    def __init__(self) -> None:
        self.turn = threading.RLock()
        self.depth = 0
        self.fd: Optional[int] = None


_guard = threading.Lock()
_held: Dict[str, _Entry] = {}


def lock_timeout() -> float:
    """Seconds to wait for another edit of the same folder (``LORASHARE_LOCK_TIMEOUT``, default 600)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", LOCK_TIMEOUT_ENV, raw, DEFAULT_LOCK_TIMEOUT)
        return DEFAULT_LOCK_TIMEOUT
    return max(value, 0.0)


def _parent(folder: str) -> str:
    return os.path.dirname(os.path.abspath(os.path.realpath(os.fspath(folder)))) or os.sep


@contextlib.contextmanager
def folder_lock(folder: str, *, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold the edit lock of ``folder`` (which need not exist yet) for the ``with`` block.

    Waits at most ``timeout`` seconds (default :func:`lock_timeout`), then raises
    :class:`~lorashare.errors.ConflictError` naming the folder.
    """
    parent = _parent(folder)
    wait = lock_timeout() if timeout is None else timeout
    deadline = time.monotonic() + wait
    with _guard:
        entry = _held.setdefault(parent, _Entry())
    if not entry.turn.acquire(timeout=max(wait, 0.001)):
        raise _busy(folder, wait)
    try:
        if entry.depth == 0:
            entry.fd = _acquire(parent, folder, deadline, wait)
        entry.depth += 1
        try:
            yield
        finally:
            entry.depth -= 1
            if entry.depth == 0 and entry.fd is not None:
                os.close(entry.fd)  # closing the descriptor releases the flock
                entry.fd = None
    finally:
        entry.turn.release()


def _acquire(parent: str, folder: str, deadline: float, wait: float) -> Optional[int]:
    """The flock on ``parent``, polled until ``deadline``; ``None`` where flock is unavailable."""
    if fcntl is None:
        return None
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        logger.debug("cannot open %s to lock it (%s); edits of %s are serialised within this process only",
                     parent, exc, folder)
        return None
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except OSError as exc:  # a filesystem without flock (some network mounts)
            os.close(fd)
            logger.debug("cannot flock %s (%s); edits of %s are serialised within this process only", parent, exc, folder)
            return None
        if time.monotonic() >= deadline:
            os.close(fd)
            raise _busy(folder, wait)
        if not said:
            logger.info("waiting for another lorashare edit of %s to finish", folder)
            said = True
        time.sleep(_POLL)


def _busy(folder: str, wait: float) -> ConflictError:
    return ConflictError(
        f"{folder} is being edited by another lorashare process (add, remove, save) and stayed locked for {wait:g} s; "
        f"nothing was changed. Try again when it has finished, or raise {LOCK_TIMEOUT_ENV} (seconds).", path=folder,
    )
