"""Atomic writes: a folder or a file appears whole or not at all.

A checkpoint folder is written into a temporary sibling, flushed, then swapped
in.  On Linux the swap of a non-empty folder uses ``renameat2(RENAME_EXCHANGE)``,
which is atomic even when the target exists; elsewhere the old folder is
renamed aside first, so a crash leaves it (as ``.<name>.old-*``) rather than
a half-written one.  Temporary folders start with ``.`` and end with a random
suffix, so they are never mistaken for a checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["atomic_folder", "atomic_write_bytes", "fsync_tree"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the OS cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _syncfs(path: str) -> bool:
    """Flush the whole filesystem holding ``path`` in one call (Linux ``syncfs``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return fn(fd) == 0
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """Flush every file and folder under ``root`` to disk (one ``syncfs`` where available)."""
    if _syncfs(root):
        return
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(dirpath)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: str, *, durable: bool = True) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces ``target`` atomically.

    On an exception the temporary folder is removed and ``target`` is untouched.

    Example:
        >>> with atomic_folder("out/ckpt") as tmp:  # doctest: +SKIP
        ...     open(os.path.join(tmp, "a.json"), "w").write("{}")
    """
    target = os.path.abspath(target)
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        if os.path.isdir(target) and not os.path.islink(target):
            if _renameat2_exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
                os.rmdir(old)
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            if os.path.lexists(target):
                os.remove(target)  # a file or a symlink where the folder goes
            os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
