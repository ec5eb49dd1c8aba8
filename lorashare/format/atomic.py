"""Atomic saves that replace only what lorashare itself wrote.

A folder is written into a temporary sibling, flushed, then swapped in.  On
Linux the swap of an existing folder uses ``renameat2(RENAME_EXCHANGE)``, which
is atomic; elsewhere the old folder is renamed aside first, so a crash leaves it
(as ``.<name>.old-<hex>``) rather than a half-written one.

What may be replaced is decided by :func:`check_target`, before any work and
again just before the swap:

* a path that does not exist, or an empty folder;
* a folder that the caller's ``replaceable`` predicate recognises as lorashare's
  own output (a SHARE checkpoint, a rebuilt adapter);
* with ``overwrite=True``, any other folder.

Never, even with ``overwrite``: a file, FIFO, device, socket or symlink; the
current folder, the home folder or an ancestor of either (so never ``/``); an
input, anything inside one (after following symlinks), or an ancestor of one.  A
caller that saves a checkpoint back where it was loaded from leaves that folder out
of ``inputs``.  Refusals raise :class:`~lorashare.errors.OutputPathError` (a
:class:`~lorashare.errors.ForeignFolderError` where ``overwrite`` would do), and OS
failures while saving (disk full, permissions) :class:`~lorashare.errors.SaveError`,
with the previous content untouched.

Temporary siblings are named ``.<name>.tmp-<8 hex>`` (``.old-`` for the old folder
set aside) and locked (``flock``) while a save runs, so a later save of the same
target removes those left by a killed process, and only those: never a path that
lorashare did not name.  A name too long to take the 14 extra bytes within the
filesystem's limit (255 bytes) is shortened in the sibling's name to its first
characters, ``~`` and 8 hex of its sha256, the same on every save.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import time
from typing import Callable, Iterable, Iterator, Optional

from ..errors import ForeignFolderError, LoraShareError, OutputPathError, SaveError
from ..utils.names import file_kind, is_within

try:  # POSIX only; without it stale temporaries are left alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_folder", "check_target", "fsync_tree"]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# An empty temporary folder this young may belong to a save that has not locked it yet.
_GRACE_SECONDS = 10.0
#: Longest name of one path component, in bytes, where the filesystem does not say (ext4, XFS, APFS...).
NAME_MAX = 255
_SIBLING_EXTRA = len(".") + len(".tmp-") + 8  # what a temporary's name adds to the target's


def _libc_fn(name: str):
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return getattr(libc, name)
    except (OSError, AttributeError):
        return None


def _renameat2_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the OS cannot."""
    fn = _libc_fn("renameat2")
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _syncfs(path: str) -> bool:
    """Flush the whole filesystem holding ``path`` in one call (Linux ``syncfs``)."""
    fn = _libc_fn("syncfs")
    if fn is None:
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


def check_target(
    target: str,
    *,
    what: str,
    replaceable: Callable[[str], Optional[str]],
    inputs: Iterable[str] = (),
    overwrite: bool = False,
) -> str:
    """Return the absolute ``target`` if a save may write it, else raise :class:`OutputPathError`.

    Args:
        target: the folder to write.
        what: what is being saved, for messages (``"SHARE checkpoint"``).
        replaceable: given an existing non-empty folder, ``None`` if it is lorashare's own output of
            this kind, else a short reason it is not (``"it holds notes.txt"``).
        inputs: folders the data was read from: neither they nor their ancestors may be replaced.
        overwrite: also replace a non-empty folder that ``replaceable`` refuses.

    Example:
        >>> check_target("out/ckpt", what="SHARE checkpoint", replaceable=lambda p: None)  # doctest: +SKIP
        '/home/me/out/ckpt'
    """
    if not isinstance(target, (str, os.PathLike)) or not os.fspath(target).strip():
        raise OutputPathError(f"will not write the {what} to {target!r}: the path is empty. Give a folder name, "
                              "e.g. -o share_ckpt.", path=str(target))
    given = os.fspath(target)
    absolute = os.path.abspath(os.path.expanduser(given))
    real = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))

    def refuse(why: str, fix: str = "Choose another path") -> OutputPathError:
        return OutputPathError(f"will not write the {what} to {given!r}: {why}. {fix}.", path=given)

    for name, place in (("the current folder", os.getcwd()), ("your home folder", os.path.expanduser("~"))):
        place = os.path.realpath(place)
        if is_within(place, real):
            rel = "is" if real == place else "is an ancestor of"
            raise refuse(f"it {rel} {name} ({place})")
    for src in inputs:
        why = _clash_with_input(real, os.fspath(src))
        if why:
            raise refuse(why, "Choose a path outside the inputs")
    try:
        st = os.lstat(absolute)
    except FileNotFoundError:
        return absolute
    except OSError as exc:
        raise refuse(f"it cannot be inspected ({exc.strerror or exc})") from None
    if stat.S_ISLNK(st.st_mode):
        raise refuse("it is a symlink", "Choose another path, or remove the link yourself")
    if not stat.S_ISDIR(st.st_mode):
        raise refuse(f"it is {file_kind(st.st_mode)}, not a folder", "Choose another path, or remove it yourself")
    try:
        empty = not os.listdir(absolute)
    except OSError as exc:
        raise refuse(f"its contents cannot be listed ({exc.strerror or exc})") from None
    if empty or overwrite:
        return absolute
    why = replaceable(absolute)
    if why is not None:
        problem = f"will not write the {what} to {given!r}: it is a folder that lorashare did not write as a {what} ({why})."
        # Python's fix; the CLI gives its own per subcommand from ``problem`` and ``found``.
        raise ForeignFolderError(f"{problem} Choose another path, remove it yourself, or pass overwrite=True to "
                                 "replace it.", found=why, path=given, problem=problem)
    return absolute


def _clash_with_input(real: str, src: str) -> Optional[str]:
    """Why a save to ``real`` would change the input ``src`` (it is, holds or lies inside it), or ``None``.

    Both sides are compared after following symlinks, so a link that leads into an input counts.
    """
    src_real = os.path.realpath(src)
    if is_within(src_real, real):
        rel = "is the input" if src_real == os.path.realpath(real) else "contains the input"
        return f"it {rel} {src}, which would be deleted"
    if is_within(real, src_real):
        return f"it is inside the input {src}, which would be changed"
    return None


_STALE = re.compile(r"^\.(?P<base>.+)\.(?:tmp|old)-(?:[0-9a-f]{8}|[a-z0-9_]{8})$")


def _lock(fd: int) -> bool:
    if fcntl is None:  # pragma: no cover
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _name_max(parent: str) -> int:
    """The longest name (bytes) a folder in ``parent`` may have."""
    try:
        return min(NAME_MAX, int(os.pathconf(parent, "PC_NAME_MAX")))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def _sibling_base(base: str, name_max: int = NAME_MAX) -> str:
    """What stands for ``base`` in its temporaries' names: itself, or shortened to fit ``name_max``.

    The short form (first characters, ``~``, 8 hex of the name's sha256) is the same on every
    save, so a later save still recognises what a killed one left.

    Example:
        >>> _sibling_base("ck")
        'ck'
        >>> len(_sibling_base("x" * 250).encode())
        241
    """
    raw = os.fsencode(base)
    room = name_max - _SIBLING_EXTRA
    if len(raw) <= room:
        return base
    digest = hashlib.sha256(raw).hexdigest()[:8]
    keep, used = [], 0
    for ch in base:  # whole characters only, so a multibyte UTF-8 name is never cut mid-character
        size = len(os.fsencode(ch))
        if used + size > room - 1 - len(digest):
            break
        keep.append(ch)
        used += size
    return "".join(keep) + "~" + digest


def _clean_stale(parent: str, base: str) -> None:
    """Remove temporaries of earlier, killed saves of ``parent/base`` (unlocked, named by us).

    ``base`` is the target's name as it appears in its temporaries (:func:`_sibling_base`).
    """
    if fcntl is None:  # pragma: no cover - no way to tell a live save from a dead one
        return
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = _STALE.match(name)
        if not m or m.group("base") != base:
            continue
        path = os.path.join(parent, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode):
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue  # a save in progress
            if not os.listdir(path) and time.time() - st.st_mtime < _GRACE_SECONDS:
                continue  # just made by a save that has not locked it yet
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _make_temp(parent: str, base: str) -> str:
    for _ in range(100):
        path = os.path.join(parent, f".{base}.tmp-{secrets.token_hex(4)}")
        try:
            os.mkdir(path, 0o777)  # the umask applies, as for any folder the user creates
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", parent)  # pragma: no cover


@contextlib.contextmanager
def atomic_folder(
    target: str,
    *,
    what: str,
    replaceable: Callable[[str], Optional[str]],
    inputs: Iterable[str] = (),
    overwrite: bool = False,
    durable: bool = True,
) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces ``target`` atomically.

    ``target`` is checked with :func:`check_target` (same arguments) before and after the
    work.  On an exception the temporary folder is removed and ``target`` is untouched.

    Example:
        >>> with atomic_folder("out/ckpt", what="SHARE checkpoint", replaceable=is_checkpoint) as tmp:  # doctest: +SKIP
        ...     open(os.path.join(tmp, "a.json"), "w").write("{}")
    """
    inputs = [os.fspath(p) for p in inputs]
    check = dict(what=what, replaceable=replaceable, inputs=inputs, overwrite=overwrite)
    target = check_target(target, **check)
    parent, name = os.path.split(target)
    try:
        os.makedirs(parent, exist_ok=True)
        base = _sibling_base(name, _name_max(parent))
        _clean_stale(parent, base)
        tmp = _make_temp(parent, base)
    except OSError as exc:
        raise _save_error(exc, what, target) from None
    fd = os.open(tmp, os.O_RDONLY)
    try:
        _lock(fd)  # marks the folder as in use until this save ends
        yield tmp
        check_target(target, **check)  # it may have changed during the work
        if durable:
            fsync_tree(tmp)
        if os.path.isdir(target) and not os.path.islink(target):
            if _renameat2_exchange(tmp, target):
                shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
            else:
                old = os.path.join(parent, f".{base}.old-{secrets.token_hex(4)}")
                os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, LoraShareError):
            raise
        raise _save_error(exc, what, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _save_error(exc: OSError, what: str, target: str) -> SaveError:
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "Free some disk space, or save elsewhere",
        errno.EDQUOT: "Free some quota, or save elsewhere",
        errno.EFBIG: "The file size limit (ulimit -f) is too small; raise it or save elsewhere",
        errno.EACCES: "Check the folder's permissions, or save elsewhere",
        errno.EPERM: "Check the folder's permissions, or save elsewhere",
        errno.EROFS: "The filesystem is read-only; save elsewhere",
    }.get(exc.errno or 0, "Save elsewhere")
    where = f" ({exc.filename})" if exc.filename else ""
    return SaveError(
        f"could not save the {what} to {target}: {reason}{where}. Nothing was changed there. {hint}.",
        path=target,
    )
