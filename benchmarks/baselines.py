"""Baselines for lorashare at equal bytes: each adapter compressed alone, and the mean adapter.

Pure functions over tensors (no files read or written), used by ``run.py --baselines`` and
``fidelity.py``.

**Per-adapter SVD + quantization.**  Each module's ``ΔW = s·B·A`` (B d_out × r, A r × d_in) is
decomposed in factored form, never forming the d_out × d_in matrix: ``B = Q_B R_B`` and
``Aᵀ = Q_A R_A`` (QR), then the SVD of the r × r core ``s·R_B R_Aᵀ = U Σ Vᵀ``, so that
``ΔW = (Q_B U) Σ (Q_A V)ᵀ``.  Truncated to r′ components, the factors are split evenly,
``B′ = Q_B U √Σ`` (d_out × r′) and ``A′ = √Σ Vᵀ Q_Aᵀ`` (r′ × d_in), the scale folded in, and
stored in a scheme of :mod:`lorashare.format.storage` with its own :func:`quantize` and
:meth:`Stored.dequantize`, so that the rebuilt ``B̂′ Â′`` carries the quantization error as well
as the truncation error.

Stored as lorashare stores its tensors, component-major: when d_out = d_in the two factors go
into one (2r′ × d) tensor ``[B′ᵀ; A′]`` (so nf4 never pads an odd row, and both factors share
the block layout), otherwise as ``B′ᵀ`` (r′ × d_out) and ``A′`` (r′ × d_in).  One adapter is one
file in lorashare's own layout (a quantized file packs every tensor into ``codes``, ``index``,
``scales``; a float file has one entry per tensor), and :func:`adapter_file_nbytes` counts its
bytes exactly as lorashare's writer would write them (header, padding, index and scales included).

Within one adapter the byte budget is shared by its modules: :func:`allocate_ranks` gives each
next component to the module where it removes the most *relative* ΔW energy (σ²/‖ΔW‖²) per byte,
while it fits.  With modules of one shape this is the same r′ everywhere, and the bytes left
over buy one more component for some of them.  A module may get r′ = 0 (ΔŴ = 0, error 1).

**Mean adapter (leave-one-out).**  Every adapter is replaced by the mean ΔW of the *other*
adapters, ``ΔŴ_i = Σ_{j≠i} s_j B_j A_j / (N − 1)``: what sharing alone, with nothing per adapter,
gives.  Its errors come from the N × N matrix ``M_jk = ⟨ΔW_j, ΔW_k⟩_F`` (Gram matrices of the
stacked factors, float64), never forming ΔW.
"""

from __future__ import annotations

import heapq
import math
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from lorashare.format import storage
from lorashare.format.tensorfile import save_bytes

try:
    from oracle import delta_w_rel_err  # run as a script: benchmarks/ is sys.path[0]
except ImportError:  # imported as benchmarks.baselines
    from benchmarks.oracle import delta_w_rel_err

__all__ = [
    "factored_svd", "factor_shapes", "factor_nbytes", "max_rank", "truncate_at_rank", "truncate_quantized",
    "allocate_ranks", "adapter_file_nbytes", "adapter_file_tensors", "Truncated", "truncate_adapter", "mean_adapter",
    "loo_mean_errors", "relative_error",
]

META = {"format": "pt"}
INDEX_BYTES = 8  # a quantized file's index: one (position, c) int32 pair per tensor


def factored_svd(B: torch.Tensor, A: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, Vh)`` of ``scale·B·A`` in float64 from its factors: U d_out × q, S (q,), Vh q × d_in, q = min(r, d).

    Example:
        >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
        >>> U, S, Vh = factored_svd(B, A, 0.5)
        >>> torch.allclose(U @ torch.diag(S) @ Vh, 0.5 * B.double() @ A.double())
        True
    """
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    Uc, S, Vhc = torch.linalg.svd(scale * (Rb @ Ra.T))
    return Qb @ Uc, S, Vhc @ Qa.T


def factor_shapes(d_out: int, d_in: int, rank: int) -> List[Tuple[int, int]]:
    """The component-major (k, c) tensors that rank-``rank`` factors are stored as (none at rank 0)."""
    if rank <= 0:
        return []
    return [(2 * rank, d_in)] if d_out == d_in else [(rank, d_out), (rank, d_in)]


def factor_nbytes(d_out: int, d_in: int, rank: int, scheme: str) -> int:
    """Data bytes (codes and scales, or floats) of rank-``rank`` factors in ``scheme``; no header, no index.

    Example:
        >>> factor_nbytes(4096, 4096, 1, "nf4")  # [B′ᵀ; A′] 2 × 4096: 4096 code bytes + 128 float32 scales
        4608
    """
    return sum(storage.stored_nbytes(scheme, k, c) for k, c in factor_shapes(d_out, d_in, rank))


def _index_nbytes(d_out: int, d_in: int, rank: int, scheme: str) -> int:
    return INDEX_BYTES * len(factor_shapes(d_out, d_in, rank)) if storage.is_quantized(scheme) else 0


def max_rank(d_out: int, d_in: int, r: int, nbytes: int, scheme: str) -> int:
    """The largest r′ ≤ r whose factors' data bytes fit ``nbytes`` (0 if not even one component fits)."""
    best = 0
    for k in range(1, r + 1):
        if factor_nbytes(d_out, d_in, k, scheme) <= nbytes:
            best = k
    return best


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    root = S[:rank].sqrt()
    return (U[:, :rank] * root).float(), (root[:, None] * Vh[:rank]).float()


def _store(Bp: torch.Tensor, Ap: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """Factors as ``scheme`` stores them and decodes them: ``(B̂′, Â′, [stored tensors])``.

    A stored tensor is a :class:`storage.Stored` (quantized) or the float tensor in its dtype.
    """
    d_out, rank = Bp.shape
    d_in = Ap.shape[1]
    if rank == 0:
        return Bp.new_zeros(d_out, 0), Ap.new_zeros(0, d_in), []
    if storage.is_quantized(scheme):
        if d_out == d_in:
            st = storage.quantize(torch.cat([Bp.T, Ap]), scheme)
            both = st.dequantize()
            return both[:rank].T.contiguous(), both[rank:].contiguous(), [st]
        sb, sa = storage.quantize(Bp, scheme, transposed=True), storage.quantize(Ap, scheme)
        return sb.dequantize(), sa.dequantize(), [sb, sa]
    dtype = storage.DTYPES[scheme]
    if d_out == d_in:
        both = torch.cat([Bp.T, Ap]).to(dtype)
        return both[:rank].T.float().contiguous(), both[rank:].float().contiguous(), [both]
    bt, a = Bp.T.contiguous().to(dtype), Ap.to(dtype)
    return bt.T.float().contiguous(), a.float(), [bt, a]


def _nbytes(stored: Sequence) -> int:
    return sum(s.nbytes if isinstance(s, storage.Stored) else s.numel() * s.element_size() for s in stored)


def truncate_at_rank(
    B: torch.Tensor, A: torch.Tensor, scale: float, rank: int, scheme: str,
    svd: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(B̂′, Â′, data bytes)``: ``scale·B·A`` truncated to ``rank`` components, stored in ``scheme`` and decoded.

    ``B̂′ Â′`` approximates ``scale·B·A`` (the scale is folded in).  The bytes are those of the stored
    codes and scales (or floats), what :func:`factor_nbytes` predicts.
    """
    U, S, Vh = svd if svd is not None else factored_svd(B, A, scale)
    rank = max(0, min(rank, S.numel()))
    Bh, Ah, stored = _store(*_split(U, S, Vh, rank), scheme)
    return Bh, Ah, _nbytes(stored)


def truncate_quantized(B: torch.Tensor, A: torch.Tensor, scale: float, nbytes: int,
                       scheme: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(B̂′, Â′, bytes)``: the largest truncation of ``scale·B·A`` whose stored factors fit ``nbytes``.

    Example:
        >>> B, A = torch.randn(64, 4), torch.randn(4, 64)
        >>> Bh, Ah, n = truncate_quantized(B, A, 2.0, 10_000, "int8")
        >>> Bh.shape[1], n <= 10_000
        (4, True)
    """
    rank = max_rank(B.shape[0], A.shape[1], min(A.shape[0], B.shape[0], A.shape[1]), nbytes, scheme)
    return truncate_at_rank(B, A, scale, rank, scheme)


def allocate_ranks(spectra: Sequence[torch.Tensor], shapes: Sequence[Tuple[int, int]], nbytes: int,
                   scheme: str) -> List[int]:
    """Ranks r′ per module (spectra: each module's singular values, descending; shapes: (d_out, d_in))
    whose data and index bytes together fit ``nbytes``: greedy, the most relative energy per byte first."""
    ranks = [0] * len(spectra)
    energy = [float((s.double() ** 2).sum()) for s in spectra]

    def step(m: int) -> Optional[Tuple[float, int]]:
        k = ranks[m]
        if k >= spectra[m].numel() or energy[m] <= 0:
            return None
        d_out, d_in = shapes[m]
        cost = (factor_nbytes(d_out, d_in, k + 1, scheme) + _index_nbytes(d_out, d_in, k + 1, scheme)
                - factor_nbytes(d_out, d_in, k, scheme) - _index_nbytes(d_out, d_in, k, scheme))
        return float(spectra[m][k]) ** 2 / energy[m] / max(cost, 1), cost

    heap = []
    for m in range(len(spectra)):
        s = step(m)
        if s:
            heap.append((-s[0], m, s[1]))
    heapq.heapify(heap)
    left = nbytes
    while heap:
        _, m, cost = heapq.heappop(heap)
        if cost > left:
            continue  # this module's next component does not fit; a cheaper one elsewhere still may
        left -= cost
        ranks[m] += 1
        s = step(m)
        if s:
            heapq.heappush(heap, (-s[0], m, s[1]))
    return ranks


def adapter_file_tensors(stored: Mapping[str, Sequence], scheme: str) -> Dict[str, torch.Tensor]:
    """The tensors of one adapter's file in lorashare's layout, from each module's stored tensors.

    Quantized: every tensor's codes in one ``codes`` vector, the scales in one ``scales`` vector and an
    ``index`` (n × 2 int32: position, c); float: one entry per tensor (``<module>:<i>``).
    """
    items = [(f"{m}:{i}", t) for m in sorted(stored) for i, t in enumerate(stored[m])]
    if not storage.is_quantized(scheme):
        return {key: t for key, t in items}
    if not items:
        return {}
    return {
        "codes": torch.cat([t.codes.reshape(-1) for _, t in items]),
        "index": torch.tensor([[i, t.shape[1]] for i, (_, t) in enumerate(items)], dtype=torch.int32),
        "scales": torch.cat([t.scale.reshape(-1) for _, t in items]),
    }


def adapter_file_nbytes(stored: Mapping[str, Sequence], scheme: str) -> int:
    """Bytes on disk of one adapter's file (header and padding included), as lorashare's writer writes it."""
    tensors = adapter_file_tensors(stored, scheme)
    return len(save_bytes(tensors, META)) if tensors else 0


def _header_reserve(shapes: Mapping[str, Tuple[int, int, int]], scheme: str) -> int:
    """Header and index bytes of an adapter file at full rank: an upper bound of what a truncation costs."""
    full = {m: factor_shapes(d_out, d_in, r) for m, (d_out, d_in, r) in shapes.items()}
    if storage.is_quantized(scheme):
        flat = [kc for m in sorted(full) for kc in full[m]]
        return storage.header_nbytes(storage.packed_entries(scheme, flat), META) + INDEX_BYTES * len(flat)
    return storage.header_nbytes([e for m in sorted(full) for i, (k, c) in enumerate(full[m])
                                  for e in storage.stored_entries(f"{m}:{i}", scheme, k, c)], META)


class Truncated(NamedTuple):
    """One adapter compressed alone (:func:`truncate_adapter`)."""

    factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # module -> (B̂′, Â′), decoded, the scale folded in
    nbytes: int  # bytes of its file on disk
    ranks: Dict[str, int]  # module -> r′
    tensors: Dict[str, torch.Tensor]  # its file's tensors (adapter_file_tensors)


def truncate_adapter(modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor, float]], nbytes: int,
                     scheme: str) -> Truncated:
    """One adapter compressed alone: ``(factors, file bytes, ranks, file tensors)``.

    ``modules`` maps each module to ``(B, A, scale)``.  The ranks share ``nbytes`` (the whole file:
    header, index, codes and scales) by :func:`allocate_ranks`; the bytes returned are those of the
    file that holds the stored factors (:func:`adapter_file_nbytes`), never more than ``nbytes``
    unless not even the header fits.
    """
    names = list(modules)
    svds = {m: factored_svd(*modules[m]) for m in names}
    shapes = {m: (modules[m][0].shape[0], modules[m][1].shape[1], svds[m][1].numel()) for m in names}
    data_budget = nbytes - _header_reserve(shapes, scheme)
    # the reserve counts every module's index; allocate_ranks counts it again per module it stores
    if storage.is_quantized(scheme):
        data_budget += sum(_index_nbytes(d_out, d_in, r, scheme) for d_out, d_in, r in shapes.values())
    ranks = allocate_ranks([svds[m][1] for m in names], [shapes[m][:2] for m in names], max(0, data_budget), scheme)
    out, stored = {}, {}
    for m, k in zip(names, ranks):
        Bh, Ah, st = _store(*_split(*svds[m], k), scheme)
        out[m] = (Bh, Ah)
        if st:
            stored[m] = st
    tensors = adapter_file_tensors(stored, scheme)
    return Truncated(out, len(save_bytes(tensors, META)) if tensors else 0, dict(zip(names, ranks)), tensors)


def mean_adapter(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scales: Sequence[float],
                 exclude: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(B̄, Ā)`` with ``B̄ Ā`` = the mean ΔW of the adapters (all, or all but ``exclude``).

    Rank Σ r_j: the factors are stacked, not multiplied out.
    """
    keep = [j for j in range(len(Bs)) if j != exclude]
    if not keep:
        raise ValueError("the mean of no adapters")
    n = len(keep)
    return (torch.cat([Bs[j].double() * (scales[j] / n) for j in keep], dim=1),
            torch.cat([As[j].double() for j in keep], dim=0))


def loo_mean_errors(Bs: Sequence[torch.Tensor], As: Sequence[torch.Tensor], scales: Sequence[float]) -> torch.Tensor:
    """Relative error ``‖ΔW_i − mean_{j≠i} ΔW_j‖_F / ‖ΔW_i‖_F`` for every adapter i (N ≥ 2), float64.

    From ``M_jk = ⟨s_j B_j A_j, s_k B_k A_k⟩_F = Σ (s_j B_jᵀ s_k B_k ⊙ A_j A_kᵀ)``: two Gram matrices of
    the stacked factors, summed over r × r blocks.  Adapter i's error² is ``c_iᵀ M c_i`` with
    ``c_i = e_i − (1 − e_i)/(N − 1)``.
    """
    n = len(Bs)
    if n < 2:
        raise ValueError("leave-one-out needs at least 2 adapters")
    X = torch.cat([b.double() * s for b, s in zip(Bs, scales)], dim=1)
    Y = torch.cat([a.double() for a in As], dim=0)
    owner = torch.repeat_interleave(torch.arange(n), torch.tensor([a.shape[0] for a in As]))
    P = torch.zeros(n, owner.numel(), dtype=torch.float64)
    P[owner, torch.arange(owner.numel())] = 1.0
    M = P @ ((X.T @ X) * (Y @ Y.T)) @ P.T
    C = torch.full((n, n), -1.0 / (n - 1), dtype=torch.float64)
    C.fill_diagonal_(1.0)
    err2 = ((C @ M) * C).sum(1).clamp_min(0)
    ref2 = M.diagonal().clamp_min(0)
    return torch.where(ref2 > 0, (err2 / ref2.clamp_min(1e-300)).sqrt(),
                       torch.where(err2 > 0, torch.full_like(err2, math.inf), torch.zeros_like(err2)))


def relative_error(B: torch.Tensor, A: torch.Tensor, scale: float, B_hat: torch.Tensor, A_hat: torch.Tensor,
                   scale_hat: float = 1.0) -> float:
    """``‖s·B·A − ŝ·B̂·Â‖_F / ‖s·B·A‖_F`` by the benchmarks' oracle (Gram matrices, float64, no d_out × d_in matrix).

    Example:
        >>> B, A = torch.randn(8, 2), torch.randn(2, 8)
        >>> relative_error(B, A, 2.0, 2 * B, A) < 1e-6
        True
    """
    return delta_w_rel_err(A, B, A_hat, B_hat, scale, scale_hat)[0]
