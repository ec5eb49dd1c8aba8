"""Parse JSON that came from disk or the network, with bounds.

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
from typing import Any, Optional, Type, Union

from .errors import LoraShareError

__all__ = ["loads", "MAX_DEPTH"]

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
