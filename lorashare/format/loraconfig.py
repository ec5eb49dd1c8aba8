"""What lorashare reads from a LoRA ``adapter_config.json``: its checks, PEFT's patterns, the scale.

One owner for these facts, used for adapters as they are read (:mod:`lorashare.peft.adapters`), for the
copies kept in checkpoints (:mod:`lorashare.format.checkpoint`) and for serving.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any, Dict, Mapping, Type

from ..errors import AdapterError, LoraShareError

__all__ = ["check_lora_config", "pattern_value", "module_scale"]


def _pattern_regex(pat: str) -> "re.Pattern[str]":
    """The regex PEFT builds from a ``rank_pattern`` / ``alpha_pattern`` key (``peft.utils.other.get_pattern_key``)."""
    return re.compile(rf"(.*\.)?({pat})")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module-path suffix.

    The keys were checked by :func:`check_lora_config`, so each compiles.
    """
    for pat, value in (patterns or {}).items():
        if module == pat or _pattern_regex(pat).fullmatch(module):
            return value
    return default


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling ``s`` in ``ΔW = s·B·A`` for one module: alpha/r, or alpha/√r with rsLoRA."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    alpha = float(alpha if alpha is not None else rank)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    """A finite JSON number (``true`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_lora_config(
    config: Dict[str, Any],
    who: str,
    path: str,
    *,
    error: Type[LoraShareError] = AdapterError,
    prefix: str = "",
    require_r: bool = False,
    fix: str = "Fix the value, or re-save the adapter with PEFT (LoraConfig validates it).",
) -> None:
    """Check the fields of a LoRA ``adapter_config.json`` that lorashare reads.

    Also checks the copy kept in a checkpoint's ``adapter_meta.json`` (``error=CheckpointError``,
    ``prefix="original_config."``, where ``r`` is required); ``fix`` ends each message.
    """

    def fail(key: str, value: Any, expected: str) -> LoraShareError:
        return error(
            f"adapter {who!r}: {prefix}{key} is {reprlib.repr(value)} in {path}, expected {expected}. {fix}",
            adapter=who,
            path=path,
        )

    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise error(
            f"adapter {who!r}: {prefix}peft_type is {reprlib.repr(peft_type)} in {path}, expected 'LORA'. "
            "lorashare compresses LoRA adapters only.",
            adapter=who,
            path=path,
        )
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag) is not None and not isinstance(config.get(flag), bool):
            raise fail(flag, config[flag], "true or false")
    if config.get("use_dora"):
        raise error(
            f"adapter {who!r}: use_dora=True in {path}. DoRA's magnitude vectors make ΔW more than "
            "B·A, which a shared basis cannot represent; merge or retrain it as plain LoRA.",
            adapter=who,
            path=path,
        )
    r = config.get("r")
    if (r is not None or require_r) and not _is_int(r):
        raise fail("r", r, "an integer ≥ 1 (the LoRA rank)")
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_number(alpha):
        raise fail("lora_alpha", alpha, "a finite number")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail("base_model_name_or_path", base, "a string (a Hub model id or a folder)")
    for key, is_value, expected in (
        ("rank_pattern", _is_int, "an integer ≥ 1"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise fail(key, patterns, 'an object {"<module regex>": value, ...} (or null)')
        for pat, value in patterns.items():
            try:
                _pattern_regex(pat)
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                raise error(
                    f"adapter {who!r}: {prefix}{key} key {reprlib.repr(pat)} in {path} is not a valid regular "
                    f"expression ({exc}). PEFT matches these keys as regexes against module paths: fix the key, "
                    "or escape it (re.escape) to match a name literally.",
                    adapter=who,
                    path=path,
                ) from None
            if not is_value(value):
                raise fail(f"{key}[{pat!r}]", value, expected)
