"""Names and paths: adapter names are single safe path components, no path escapes its folder,
and a file is opened for reading only when it is a regular one (never a FIFO or a device)."""

from __future__ import annotations

import errno
import os
import re
import stat
from typing import BinaryIO, Collection, Tuple, Union

from ..errors import InvalidNameError

__all__ = [
    "check_name", "derive_name", "unique_name", "is_within", "file_kind", "open_regular", "group_key", "split_group_key",
]

_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_name(name: object, *, what: str = "adapter name") -> str:
    """Return ``name`` if it is a safe single path component, else raise.

    Example:
        >>> check_name("billing-v2")
        'billing-v2'
    """
    if not isinstance(name, str) or not _SAFE.match(name) or name in (".", ".."):
        problem = (f"{what} {name!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 . _ - "
                   "(a single path component, not '.' or '..').")
        # The fix is Python's; fronts give their own from ``problem`` (the CLI: --name).
        raise InvalidNameError(f"{problem} Pick another name, e.g. as a key of a dict {{name: path}}.",
                               adapter=str(name), problem=problem)
    return name


def derive_name(source: str) -> str:
    """A default name for an adapter source: its last path component, made safe.

    Example:
        >>> derive_name("runs/refunds lora")
        'refunds_lora'
    """
    base = re.split(r"[/\\]", source.rstrip("/\\"))[-1]
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", base).strip(".") or "adapter"
    return cleaned[:128]


def unique_name(name: str, taken: Collection[str]) -> str:
    """``name``, or the first free ``name_1``, ``name_2``, … (lorashare 0.1.x's scheme for derived names).

    Example:
        >>> unique_name("adapter", {"adapter", "adapter_1"})
        'adapter_2'
    """
    candidate, counter = name, 1
    while candidate in taken:
        suffix = f"_{counter}"
        candidate = name[: 128 - len(suffix)] + suffix
        counter += 1
    return candidate


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for messages: ``"a file"``, ``"a FIFO"``, ``"a folder"``…

    Example:
        >>> file_kind(stat.S_IFIFO)
        'a FIFO'
    """
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a file"


def open_regular(path: Union[str, "os.PathLike[str]"]) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file (symlinks followed), without blocking.

    ``open()`` on a FIFO waits for a writer forever, and on a device reads without end, so the
    kind is checked before opening (a device is never opened) and again on the open descriptor
    (the path may have been swapped in between).  Anything else raises an ``OSError`` whose
    ``strerror`` says what it is (``"it is a FIFO, not a regular file"``).

    Example:
        >>> with open_regular("adapter_config.json") as f:  # doctest: +SKIP
        ...     raw = f.read()
    """
    path = os.fspath(path)

    def refuse(mode: int) -> OSError:
        return OSError(errno.EINVAL, f"it is {file_kind(mode)}, not a regular file", path)

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        return os.fdopen(fd, "rb")  # O_NONBLOCK does nothing to a regular file's reads
    except BaseException:
        os.close(fd)
        raise


def is_within(path: Union[str, "os.PathLike[str]"], folder: Union[str, "os.PathLike[str]"], *, resolve: bool = True) -> bool:
    """Whether ``path`` is ``folder`` or lies below it: after following symlinks, or with
    ``resolve=False`` as written (``..`` folded, links not followed).

    Example:
        >>> is_within("/srv/ckpt/adapters/a", "/srv/ckpt", resolve=False)
        True
        >>> is_within("/srv/ckpt/../etc", "/srv/ckpt", resolve=False)
        False
    """
    norm = os.path.realpath if resolve else os.path.abspath
    inner, outer = norm(os.fspath(path)), norm(os.fspath(folder))
    try:
        return os.path.commonpath([inner, outer]) == outer
    except ValueError:  # different drives on Windows
        return False


def group_key(module: str, side: str) -> str:
    """The checkpoint key of one side of one module: ``"<module>:<A|B>"``.

    Example:
        >>> group_key("encoder.layer.0.query", "A")
        'encoder.layer.0.query:A'
    """
    return f"{module}:{side}"


def split_group_key(key: str) -> Tuple[str, str]:
    """``(module, side)`` of a checkpoint key ``"<module>:<A|B>"``.

    Example:
        >>> split_group_key("encoder.layer.0.query:B")
        ('encoder.layer.0.query', 'B')
    """
    module, _, side = key.rpartition(":")
    return module, side
