"""Storage schemes of a checkpoint's bases and loadings: their names, their math and what they cost.

The one owner of storage schemes.  Float schemes store a tensor as it is, in that dtype.
Quantized schemes (``int8``, ``nf4``) are pure, deterministic functions here (no I/O):
:func:`quantize` turns a float tensor into a :class:`Stored` (codes plus scales) and
:meth:`Stored.dequantize` gives the float tensor back.

Every quantized tensor is stored *component-major*: a basis ``U`` (d × k) as ``Uᵀ`` (k × d),
a loading ``L`` (k × r) as it is, so that the first axis is always the component axis k.

Both schemes scale blocks of 64 values of the row-major (component-major) order, one float32
scale per block, so a block holds one or a few components of similar size.

- ``int8``: symmetric, ``x ≈ code · scale`` with ``code`` in [-127, 127] and
  ``scale = absmax(block) / 127``; ``|x − x̂| ≤ scale / 2``.  Blocks rather than one scale per
  component: measured on RoBERTa N=20 at k=32, the error is the same (quantization-only ΔW error²
  1.40e-4 vs 1.34e-4) for 31% fewer scale bytes (a loading's row holds only r values); one scale
  per tensor is 3.4× worse.
- ``nf4``: QLoRA's 16 NormalFloat levels times the block's absmax, two codes per byte, the even
  component of a pair in the high nibble (as bitsandbytes and torchao pack), an odd k padded with
  the code of 0.0; ``|x − x̂| ≤ absmax · (largest gap between levels) / 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .tensorfile import header_bytes

__all__ = [
    "DTYPES", "SCHEMES", "QUANTIZED", "NF4_LEVELS", "NF4_BLOCK", "Stored", "bytes_per_value", "is_quantized",
    "quantize", "stored_entries", "stored_nbytes", "header_nbytes", "component_nbytes", "error_bound",
    "SCALE_SUFFIX", "nf4_levels_formula", "PACKED_KEYS", "packed_entries", "code_shape", "scale_count",
]

#: Float schemes: ``share_config.json``'s ``dtype`` → the torch dtype the tensors are stored in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Quantized schemes (format v2).
QUANTIZED = ("int8", "nf4")
#: Every scheme a checkpoint may store its bases and loadings in.
SCHEMES = tuple(DTYPES) + QUANTIZED
NF4_BLOCK = 64
#: The name of a quantized tensor's scales, beside its codes ``"<key>"``.
SCALE_SUFFIX = ".scale"
_INT8_MAX = 127


def nf4_levels_formula() -> Tuple[float, ...]:
    """QLoRA's construction of the NF4 levels (``create_normal_map(0.9677083)``), in float64.

    Quantiles of N(0, 1): 8 positive and 7 negative, plus an exact 0, scaled to [-1, 1].
    The table below is bitsandbytes' float32 rounding of these; a test checks they agree.
    """
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return tuple(float(x) for x in v / v.max())


#: The 16 NF4 levels, ascending; code i means ``NF4_LEVELS[i] · absmax``.
NF4_LEVELS: Tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
_NF4_ZERO = NF4_LEVELS.index(0.0)
_NF4_MAX_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))


def is_quantized(scheme: str) -> bool:
    """Whether ``scheme`` stores codes plus scales (``int8``, ``nf4``) rather than floats."""
    return scheme in QUANTIZED


def bytes_per_value(dtype: str) -> float:
    """Bytes one stored value takes, scales included on average (float32 for an unknown name).

    Example:
        >>> bytes_per_value("float16")
        2
        >>> bytes_per_value("nf4")
        0.5625
        >>> bytes_per_value("int8")
        1.0625
    """
    if dtype == "int8":
        return 1 + 4 / NF4_BLOCK
    if dtype == "nf4":
        return 0.5 + 4 / NF4_BLOCK
    return torch.empty(0, dtype=DTYPES.get(dtype, torch.float32)).element_size()


@dataclass(frozen=True)
class Stored:
    """A tensor as a quantized scheme stores it: ``codes`` and ``scale``, component-major.

    ``shape`` is the float tensor's (k, c) in component-major order; ``transposed`` says the
    float tensor is its transpose (a basis, d × k).
    """

    scheme: str
    shape: Tuple[int, int]
    codes: torch.Tensor
    scale: torch.Tensor
    transposed: bool = False

    def dequantize(self, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float tensor, on ``device`` (default: where the codes are), as the model uses it."""
        codes, scale = self.codes.to(device), self.scale.to(device)
        k, c = self.shape
        blocks = torch.repeat_interleave(scale.to(dtype), NF4_BLOCK)[: k * c].reshape(k, c)
        if self.scheme == "int8":
            x = codes.to(dtype) * blocks
        else:
            lut = torch.tensor(NF4_LEVELS, dtype=dtype, device=codes.device)
            idx = torch.stack([codes >> 4, codes & 0xF], 1).reshape(-1, c)[:k].long()
            x = lut[idx] * blocks
        return (x.T if self.transposed else x).contiguous()

    def value(self) -> torch.Tensor:
        """The float32 tensor, decoded once and cached: the value a model computes with."""
        cached = self.__dict__.get("_value")
        if cached is None:
            cached = self.dequantize()
            object.__setattr__(self, "_value", cached)
            object.__setattr__(self, "_version", cached._version)
        return cached

    def decoded_as(self, value: torch.Tensor) -> "Stored":
        """This value, with ``value`` (what :meth:`dequantize` gives, already computed) as its decoded cache."""
        object.__setattr__(self, "_value", value)
        object.__setattr__(self, "_version", value._version)
        return self

    def unchanged(self) -> bool:
        """Whether the cached float tensor (if decoded) still holds what the codes decode to.

        An in-place edit (``mul_``, ``copy_``) bumps a tensor's version counter, so a save
        quantizes the edited floats instead of writing stale codes.
        """
        cached = self.__dict__.get("_value")
        return cached is None or cached._version == self.__dict__.get("_version")

    def tensors(self, key: str) -> Dict[str, torch.Tensor]:
        """What a safetensors file holds for it: ``{key: codes, key + ".scale": scale}``."""
        return {key: self.codes, key + SCALE_SUFFIX: self.scale}

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def quantize(t: torch.Tensor, scheme: str, *, transposed: bool = False) -> Stored:
    """Quantize a finite 2-D float tensor (a loading k × r, or with ``transposed`` a basis d × k).

    Deterministic: the same tensor always gives the same bytes.

    Example:
        >>> s = quantize(torch.tensor([[1.0, -0.5]]), "int8")
        >>> s.codes.tolist(), s.dequantize().tolist()
        ([[127, -64]], [[1.0, -0.5039370059967041]])
    """
    if scheme not in QUANTIZED:
        raise ValueError(f"scheme {scheme!r} is not quantized; expected one of {QUANTIZED}")
    x = (t.T if transposed else t).detach().cpu().to(torch.float32).contiguous()
    k, c = x.shape
    flat = x.reshape(-1)
    n = flat.numel()
    nb = -(-n // NF4_BLOCK)
    padded = torch.zeros(nb * NF4_BLOCK)
    padded[:n] = flat
    absmax = padded.reshape(nb, NF4_BLOCK).abs().amax(1)
    if scheme == "int8":
        scale = absmax / _INT8_MAX
        per = torch.repeat_interleave(scale, NF4_BLOCK)[:n].reshape(k, c)
        codes = torch.where(per > 0, x / per.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(x))
        codes = codes.round().clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return Stored(scheme, (k, c), codes.contiguous(), scale.contiguous(), transposed)
    normed = torch.where(absmax[:, None] > 0, padded.reshape(nb, NF4_BLOCK) / absmax.clamp_min(
        torch.finfo(torch.float32).tiny)[:, None], torch.zeros(nb, NF4_BLOCK)).reshape(-1)[:n]
    lut = torch.tensor(NF4_LEVELS)
    mids = (lut[1:] + lut[:-1]) / 2
    idx = torch.searchsorted(mids, normed.clamp(-1, 1)).to(torch.uint8).reshape(k, c)
    if k % 2:
        idx = torch.cat([idx, torch.full((1, c), _NF4_ZERO, dtype=torch.uint8)])
    pairs = idx.reshape(-1, 2, c)
    codes = (pairs[:, 0] << 4) | pairs[:, 1]
    return Stored(scheme, (k, c), codes.contiguous(), absmax.contiguous(), transposed)


def error_bound(stored: Stored) -> torch.Tensor:
    """The largest |x − x̂| per value that the scheme allows (component-major, k × c)."""
    k, c = stored.shape
    per = torch.repeat_interleave(stored.scale, NF4_BLOCK)[: k * c].reshape(k, c)
    return per / 2 if stored.scheme == "int8" else per * (_NF4_MAX_GAP / 2)


def stored_entries(key: str, scheme: str, k: int, c: int) -> List[Tuple[str, str, List[int]]]:
    """The safetensors entries ``(name, dtype, shape)`` that one (k, c) tensor is stored as.

    A float scheme stores the tensor itself (``shape`` as given); a quantized one its codes
    and scales.
    """
    if scheme in QUANTIZED:
        return [(key, "I8" if scheme == "int8" else "U8", list(code_shape(scheme, k, c))),
                (key + SCALE_SUFFIX, "F32", [scale_count(k, c)])]
    return [(key, {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[scheme], [k, c])]


_ITEM = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I32": 4}
#: A quantized file packs all its tensors into three (see :func:`packed_entries`).
PACKED_KEYS = ("codes", "index", "scales")


def code_shape(scheme: str, k: int, c: int) -> Tuple[int, int]:
    """Shape of the codes of a (k, c) tensor: (k, c) int8, (ceil(k/2), c) nf4 (two per byte)."""
    return (k, c) if scheme == "int8" else (-(-k // 2), c)


def scale_count(k: int, c: int) -> int:
    """Scales of a (k, c) tensor: one per block of 64 values."""
    return -(-k * c // NF4_BLOCK)


def packed_entries(scheme: str, shapes: Sequence[Tuple[int, int]]) -> List[Tuple[str, str, List[int]]]:
    """The safetensors entries of a quantized file holding tensors of ``shapes`` (k, c): every
    tensor's codes in one ``codes`` vector, its scales in one ``scales`` vector, and an ``index``
    (n × 2, int32: the tensor's position in ``k_per_group``'s sorted keys, and c).  Three headers
    instead of two per tensor: with small adapters the headers would cost as much as the data."""
    codes = sum(math.prod(code_shape(scheme, k, c)) for k, c in shapes)
    scales = sum(scale_count(k, c) for k, c in shapes)
    return [("codes", "I8" if scheme == "int8" else "U8", [codes]), ("index", "I32", [len(shapes), 2]),
            ("scales", "F32", [scales])]


def stored_nbytes(scheme: str, k: int, c: int) -> int:
    """Data bytes (scales included, header excluded) of one (k, c) tensor in ``scheme``.

    Example:
        >>> stored_nbytes("nf4", 16, 768)  # 6144 bytes of codes + 192 absmax
        6912
    """
    return sum(_ITEM[dt] * math.prod(shape) for _, dt, shape in stored_entries("", scheme, k, c))


def header_nbytes(entries: Sequence[Tuple[str, str, Sequence[int]]], metadata: Optional[Dict[str, str]] = None) -> int:
    """Bytes of the safetensors header (length prefix, JSON, padding) that our writer gives ``entries``.

    Example:
        >>> header_nbytes([("q:A", "F32", [16, 8])], {"format": "pt"})
        104
    """
    return len(header_bytes(entries, metadata))


def component_nbytes(scheme: str, c: int) -> float:
    """Marginal bytes of one more component (one more row of c values) in ``scheme``: for budgets."""
    return c * bytes_per_value(scheme)
