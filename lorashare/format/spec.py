"""The compression spec: every setting that decides a SHARE model's bases, as one frozen, validated value.

``from_adapters``, the manifest (``lorashare.yaml``), the CLI and the Space all build a
:class:`CompressionSpec`; it is saved whole in ``share_config.json`` (``"compression"``), so a
recompute, a save and load, or a sync run compresses exactly as the first run did.  Settings that
change only how the work runs (device, progress bars) are not part of it.

Example:
    >>> spec = CompressionSpec(num_components="auto", variance_threshold=0.9, dtype="int8")
    >>> spec.method
    'auto'
    >>> CompressionSpec.from_dict(spec.to_dict()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

from ..errors import ConfigError
from .storage import SCHEMES

__all__ = ["CompressionSpec", "WEIGHTINGS", "check_number", "resolve_spec"]

#: How each basis is fitted: to the adapters' updates ΔW (each adapter normalised), or to the plain factors.
WEIGHTINGS = ("delta_w", "factors")


def check_number(
    name: str, value: Any, *, low: float = 0.0, high: float = math.inf, low_open: bool = True, expected: str
) -> float:
    """``value`` as a float if it is a real number in ``(low, high]`` (``[low, high]`` without
    ``low_open``), else a :class:`ConfigError` naming ``name`` and saying what is ``expected``.

    Example:
        >>> check_number("target_ratio", 6, expected="a number > 0")
        6.0
    """
    try:
        x = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except (OverflowError, ValueError):  # an int too large for a float
        x = math.nan
    if not (math.isfinite(x) and (low < x if low_open else low <= x) and x <= high):
        raise ConfigError(f"{name}={value!r}: expected {expected}.")
    return x


@dataclass(frozen=True)
class CompressionSpec:
    """How to compress: the one value every front builds and ``share_config.json`` stores.

    Attributes:
        num_components: k per module and side (capped at what is lossless), or ``"auto"``: the
            smallest k that keeps ``variance_threshold`` of the ΔW energy, per module and side.
        variance_threshold: the energy share ``"auto"`` keeps; also the projection threshold of
            ``add_adapter`` (below it, an added adapter triggers a recompute).
        budget_bytes: bytes on disk of the bases and loadings; k is then chosen per module by
            water-filling (``num_components`` is ignored).
        target_ratio: the same as a ratio: the adapters' LoRA bytes divided by this, recomputed
            from the adapters present whenever the model is recompressed.
        dtype: storage of bases and loadings: float32, float16, bfloat16, int8 or nf4.
        weighting: ``"delta_w"`` fits each basis to the updates ΔW; ``"factors"`` is plain PCA.
        strict: refuse adapters of mixed ranks or mixed target modules.
    """

    num_components: Union[int, str] = 32
    variance_threshold: float = 0.95
    budget_bytes: Optional[int] = None
    target_ratio: Optional[float] = None
    dtype: str = "float32"
    weighting: str = "delta_w"
    strict: bool = False

    def __post_init__(self) -> None:
        k = self.num_components
        if isinstance(k, str):
            if k != "auto":
                raise ConfigError(f"num_components={k!r}: expected an integer ≥ 1 or 'auto'.")
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"num_components={k!r}: expected an integer ≥ 1 or 'auto' (k < 1 keeps nothing).")
        threshold = check_number("variance_threshold", self.variance_threshold, low=0.0, high=1.0,
                                 expected="a number in (0, 1] (the share of ΔW energy to keep, e.g. 0.95)")
        object.__setattr__(self, "variance_threshold", threshold)
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0
        ):
            raise ConfigError(f"budget_bytes={self.budget_bytes!r}: expected a positive integer number of bytes.")
        if self.target_ratio is not None:
            ratio = check_number("target_ratio", self.target_ratio,
                                 expected="a number > 0 (e.g. 6 for 1/6 of the size)")
            object.__setattr__(self, "target_ratio", ratio)
        if self.budget_bytes is not None and self.target_ratio is not None:
            raise ConfigError(
                f"budget_bytes={self.budget_bytes} and target_ratio={self.target_ratio:g} both set a byte budget: "
                "give one of them.")
        if not isinstance(self.dtype, str) or self.dtype not in SCHEMES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {', '.join(SCHEMES)}.")
        if not isinstance(self.weighting, str) or self.weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting={self.weighting!r}: expected 'delta_w' or 'factors'.")
        if not isinstance(self.strict, bool):
            raise ConfigError(f"strict={self.strict!r}: expected true or false.")

    @property
    def method(self) -> str:
        """How k is chosen: ``"budget"``, ``"auto"`` or ``"fixed"``."""
        if self.budget_bytes is not None or self.target_ratio is not None:
            return "budget"
        return "auto" if self.num_components == "auto" else "fixed"

    def budget_for(self, lora_bytes: int) -> Optional[int]:
        """The byte budget for adapters of ``lora_bytes`` LoRA bytes in all (``None``: no budget)."""
        if self.target_ratio is not None:
            return max(1, int(lora_bytes / self.target_ratio))
        return self.budget_bytes

    def replace(self, **changes: Any) -> "CompressionSpec":
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The spec as ``share_config.json`` stores it (every field, always)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CompressionSpec":
        """Read a stored spec; an unknown or invalid field is a :class:`ConfigError` naming it."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"compression spec is a {type(data).__name__}, expected an object of settings.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"compression spec has unknown settings {unknown}; this lorashare knows {sorted(known)}. "
                "Upgrade lorashare if a newer release wrote it.")
        return cls(**dict(data))

    @classmethod
    def from_config(cls, config: Any) -> "CompressionSpec":
        """The spec of a loaded ``SHAREConfig``: stored whole since 0.2.0, else migrated from older fields.

        Checkpoints written before the spec existed (0.1.x, early 0.2.0) lose nothing that they
        recorded: k (or ``"auto"``), the threshold, the budget and the dtype; the fit weighting and
        strictness were not recorded and take their defaults.
        """
        stored = getattr(config, "compression", None)
        if stored is not None:
            return cls.from_dict(stored)
        selection = getattr(config, "component_selection", "fixed")
        requested = getattr(config, "requested_components", None)
        if requested is None:
            requested = "auto" if selection == "auto" else (getattr(config, "num_components", 32) or 32)
        budget = getattr(config, "budget_bytes", None) if selection == "budget" else None
        return cls(num_components=requested, variance_threshold=getattr(config, "variance_threshold", 0.95),
                   budget_bytes=budget, dtype=getattr(config, "dtype", "float32") or "float32")

    def diff(self, other: "CompressionSpec") -> List[str]:
        """The settings that differ, as ``"name old → new"`` (``other`` is the new one).

        ``num_components`` does not count while both use a byte budget, which ignores it.

        Example:
            >>> CompressionSpec(dtype="int8").diff(CompressionSpec(dtype="nf4"))
            ['dtype int8 → nf4']
        """
        out = []
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "num_components" and self.method == other.method == "budget":
                continue
            same = math.isclose(a, b, rel_tol=0, abs_tol=1e-9) if isinstance(a, float) and isinstance(b, float) \
                else a == b
            if not same:
                out.append(f"{f.name} {a} → {b}")
        return out


def resolve_spec(spec: Optional["CompressionSpec"], given: "CompressionSpec") -> "CompressionSpec":
    """The spec a call compresses with: ``spec`` when given (then the keywords, ``given``, must keep
    their defaults), else the keywords' own.

    Example:
        >>> resolve_spec(None, CompressionSpec(num_components=8)).num_components
        8
    """
    if spec is None:
        return given
    if not isinstance(spec, CompressionSpec):
        raise ConfigError(f"spec={spec!r}: expected a lorashare.CompressionSpec.")
    if given != CompressionSpec():
        raise ConfigError(f"spec= and compression keywords ({', '.join(CompressionSpec().diff(given))}) were both "
                          "given: put every setting in the spec (spec.replace(...)).")
    return spec
