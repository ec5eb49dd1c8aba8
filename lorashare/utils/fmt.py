"""Human-readable text shared by the CLI, the model card, the job summary and the Space."""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["size", "k_range", "md_cell"]


def size(n: Optional[float], *, missing: str = "?") -> str:
    """Bytes as ``12.3 kB`` or ``4.56 MB``; ``missing`` for none.

    Example:
        >>> size(123456), size(2048), size(2e9), size(None)
        ('0.12 MB', '2.0 kB', '2.00 GB', '?')
    """
    if not n:
        return missing
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def k_range(k_per_group: Mapping[str, int], default: Any = "?") -> str:
    """The k of every module and side, as ``32`` or ``8–32``.

    Example:
        >>> k_range({"q:A": 8, "q:B": 32}), k_range({}, 16)
        ('8–32', '16')
    """
    ks = sorted(set(k_per_group.values()))
    if not ks:
        return str(default)
    return f"{ks[0]}" + (f"–{ks[-1]}" if len(ks) > 1 else "")


def md_cell(text: Any) -> str:
    """``text`` made safe for one cell of a Markdown table (no pipes, newlines or backticks).

    Example:
        >>> md_cell("a|b\nc")
        'a\\|b c'
    """
    return str(text).replace("|", "\\|").replace("\n", " ").replace("`", "'")
