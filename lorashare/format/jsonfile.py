"""Read files that came from disk or the network, and parse their JSON, with bounds.

Every file lorashare reads is opened by :func:`open_regular` (here with the caller's error
type; the check itself is :func:`lorashare.utils.names.open_regular`'s): a FIFO, a device, a socket
or a folder in place of a file is refused at once, naming it, instead of blocking forever on a
pipe or reading ``/dev/zero`` without end.

``json.loads`` recurses once per nesting level, so ``[`` × 100 000 ends in a
``RecursionError``, and a value nested a few hundred levels deep parses but
makes later code that walks it (``dataclasses.asdict``, ``json.dumps``) recurse
out of the stack.  Every JSON document lorashare reads (safetensors headers,
``adapter_config.json``, ``share_config.json``, ``adapter_meta.json``) goes
through :func:`loads`, which turns all of that into one
:class:`~lorashare.errors.LoraShareError` naming the file.
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO, Optional, Type, Union

from ..errors import LoraShareError
from ..utils.names import open_regular as _open_regular

__all__ = ["loads", "MAX_DEPTH", "open_regular", "read_bytes", "read_json"]

#: Deepest nesting accepted.  Real documents nest 3 or 4 levels (PEFT configs, safetensors headers).
MAX_DEPTH = 64


def loads(
    raw: Union[bytes, str],
    *,
    path: str,
    what: str,
    error: Type[LoraShareError] = LoraShareError,
    who: Optional[str] = None,
    label: str = "",
    subject: str = "it is",
    hint: str = "Re-download or re-save it.",
    max_depth: int = MAX_DEPTH,
) -> Any:
    """Parse ``raw`` (UTF-8 bytes or text), or raise ``error`` naming ``path``.

    ``what`` says what the file should be ("adapter config"), ``label`` prefixes the
    message (e.g. ``"adapter 'billing': "``), ``subject`` names the part that is bad
    ("its header is"), ``who`` goes into the error's ``adapter`` field, and ``hint`` is the fix.

    Example:
        >>> loads(b'{"r": 8}', path="adapter_config.json", what="adapter config")
        {'r': 8}
    """

    def fail(why: str) -> LoraShareError:
        return error(f"{label}{path} is not a valid {what}: {subject} {why}. {hint}", adapter=who, path=path)

    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise fail(f"not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise fail(f"JSON nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # JSONDecodeError, and integers over Python's digit limit
        raise fail(f"not valid JSON ({exc})") from None
    if _depth_over(data, max_depth):
        raise fail(f"JSON nested deeper than {max_depth} levels")
    return data


def _depth_over(data: Any, limit: int) -> bool:
    """Whether ``data`` nests containers deeper than ``limit`` (iterative: no recursion of its own)."""
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def open_regular(
    path: str, *, error: Type[LoraShareError] = LoraShareError, who: Optional[str] = None, label: str = "",
    hint: str = "Check that it is the regular file that was written (re-download or re-save it).",
) -> BinaryIO:
    """:func:`lorashare.utils.names.open_regular` with its refusal as ``error``, naming ``path`` (and ``who``).

    A FIFO, a device, a socket or a folder raises ``error`` at once, without blocking;
    ``FileNotFoundError`` passes through for the caller to word.

    Example:
        >>> with open_regular("adapter_config.json", error=AdapterError) as f:  # doctest: +SKIP
        ...     raw = f.read()
    """
    try:
        return _open_regular(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise error(f"{label}cannot read {path}: {exc.strerror or exc}. {hint}", adapter=who, path=path) from None


def read_bytes(
    path: str, *, max_bytes: int, what: str, error: Type[LoraShareError] = LoraShareError,
    who: Optional[str] = None, label: str = "",
    hint: str = "Check that it is the regular file that was written (re-download or re-save it).",
) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``.

    The bound is on what is read, not on the size the file claims.
    """
    with open_regular(path, error=error, who=who, label=label, hint=hint) as f:
        try:
            chunks, got = [], 0
            while got <= max_bytes:
                chunk = f.read(min(max_bytes + 1 - got, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        except OSError as exc:
            raise error(f"{label}cannot read {path}: {exc.strerror or exc}", adapter=who, path=path) from exc
    if got > max_bytes:
        raise error(f"{label}{path} is over {max_bytes} bytes; not a {what}.", adapter=who, path=path)
    return b"".join(chunks)


def read_json(
    path: str, *, max_bytes: int, what: str, error: Type[LoraShareError] = LoraShareError,
    who: Optional[str] = None, label: str = "", hint: str = "Re-download or re-save it.",
) -> Any:
    """Read and parse a JSON file with :func:`read_bytes` and :func:`loads`.

    Example:
        >>> read_json("adapter_config.json", max_bytes=10 << 20, what="adapter config")  # doctest: +SKIP
        {'peft_type': 'LORA', 'r': 8, ...}
    """
    raw = read_bytes(path, max_bytes=max_bytes, what=what, error=error, who=who, label=label)
    return loads(raw, path=path, what=what, error=error, who=who, label=label, hint=hint)
