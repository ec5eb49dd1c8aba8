"""Names and paths: adapter names are single safe path components, and no path escapes its folder."""

from __future__ import annotations

import os
import re
from typing import Collection, Union

from .errors import InvalidNameError

__all__ = ["check_name", "derive_name", "unique_name", "is_within"]

_SAFE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def check_name(name: object, *, what: str = "adapter name") -> str:
    """Return ``name`` if it is a safe single path component, else raise.

    Example:
        >>> check_name("billing-v2")
        'billing-v2'
    """
    if not isinstance(name, str) or not _SAFE.match(name) or name in (".", ".."):
        raise InvalidNameError(
            f"{what} {name!r} is not allowed: use 1-128 characters from A-Z a-z 0-9 . _ - "
            "(a single path component, not '.' or '..'). Pick another name, e.g. with "
            "a dict {name: path} or --name name=path.",
            adapter=str(name),
        )
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
