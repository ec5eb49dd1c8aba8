"""The codec's two ends: shared part and per-adapter residual, allocated under a byte budget.

Pure functions over tensors, no I/O.  Notation, for one module and N adapters (as in
:mod:`.subspace`): adapter i has ``B_i`` (d_out × r_i), ``A_i`` (r_i × d_in) and scale ``s_i``,
its update is ``ΔW_i = s_i · B_i A_i``; the module has shared orthonormal bases ``U_B``
(d_out × K) and ``U_A`` (d_in × K), columns by decreasing importance, so that their first k
columns are the best k-dimensional bases (K may be 0).  Bases as stored (float16, quantized) are
only nearly orthonormal: the math runs on their QR's Q, whose every prefix spans the same columns,
and the loadings are returned in the given bases' coordinates, so the errors stay exact.

**The representation.**  For a prefix size k, an adapter is stored as

    ΔW_i ≈ s_i · ( U_B L_B,i L_A,iᵀ U_Aᵀ  +  R_B,i R_A,i )

* the **shared part**: the core ``C_i = (U_Bᵀ B_i)(A_i U_A)`` (k × k, rank ≤ r_i) kept at rank
  ``c_i`` through its SVD ``C_i = Ub S Vaᵀ``: ``L_B,i = Ub_c √S_c`` and ``L_A,i = Va_c √S_c``
  (k × c_i each), so that the rebuilt factors are ``U_B L_B`` and ``(U_A L_A)ᵀ``, the layout of
  lorashare's loadings (a loading is k × rank, a basis d × k);
* the **residual**: the best rank-``ρ_i`` approximation of what the shared part leaves,
  ``D_i = B_i A_i − U_B L_B L_Aᵀ U_Aᵀ``, as ``R_B,i = Uq √T`` (d_out × ρ_i) and
  ``R_A,i = √T Vqᵀ`` (ρ_i × d_in).  ``D_i`` is factored, ``[B_i, −U_B L_B]·[A_i ; (U_A L_A)ᵀ]``
  (rank ≤ r_i + c_i), so its SVD is two QRs and the SVD of a small core: nothing d_out × d_in is
  ever formed;
* ``c_i + ρ_i ≤ r_i``: the rebuilt adapter, zero-padded, is a plain LoRA of its own rank r_i.

k = 0 is per-adapter truncation (rank-ρ SVD of ΔW_i); ρ = 0 with c_i = r_i is plain SHARE.

**Why the residual is fitted after the truncated shared part.**  With ``P = U_B C U_Aᵀ`` and
``Q = B A − P`` (``⟨P, Q⟩_F = 0``), the spectra σ of ``s·C`` and τ of ``s·Q`` split the energy
exactly, ``Σσ² + Στ² = ‖ΔW‖²``, but truncating both at once does not: the top-ρ part of Q has a
component inside the subspace, so the error is ``tail_c(σ) + tail_ρ(τ)`` plus a cross term of
either sign, as large as ``2·√tail_c(σ)·√tail_ρ(τ)``.  Fitting the residual to
``D_c = ΔW − P_c`` instead makes the error exactly the tail of D_c's spectrum τ⁽ᶜ⁾ (Eckart–Young),
``‖ΔW − ΔŴ‖² = Σ_{j≥ρ} τ⁽ᶜ⁾_j²``, never more than the cross-term form at ``X = C_c``, and
``Σ_j τ⁽ᶜ⁾_j² = ‖ΔW‖² − Σ_{j<c} σ_j²`` because ``P_c ⊥ ΔW − P_c``.  At ``c = rank C`` it is τ;
at ``c = 0`` it is ΔW's own spectrum, so per-adapter truncation is open to every adapter at
every k.  :func:`module_options` computes every τ⁽ᶜ⁾, so the allocator sees the exact error of
each choice (up to the float32 rounding of the stored factors; quantization noise is not modelled).
Measured on synthetic adapters (16 of rank 8, 128 × 96, k ∈ {4, 8, 16}, every c and ρ ≥ 1 with
c + ρ ≤ 8): truncating both at once gave between 0.56× and 1.16× its additive prediction, and the
sequential fit a median 0.27× its error on adapters sharing their row and column spaces (never more).

**Bytes** are those of :mod:`lorashare.format.storage`, per tensor, component-major as it stores
them: ``U_B[:, :k]`` and ``U_A[:, :k]`` as (k, d), ``L_B`` and ``L_A`` as (k, c), ``R_B`` as
(ρ, d_out) (transposed) and ``R_A`` as (ρ, d_in): :class:`ModuleCosts`.

**Allocation** (:func:`allocate`) minimises ``Σ_i ‖ΔW_i − ΔŴ_i‖² / ‖ΔW_i‖²`` (each adapter's
relative error counts the same, lorashare's ``"delta_w"`` weighting) under a total byte budget, by
Lagrangian relaxation: for a price λ per byte each adapter takes the (c, ρ) minimising
``err + λ·bytes`` over its whole table (exact for the relaxed problem, including ``c + ρ ≤ r``),
each module the k minimising the bases' ``λ·bytes`` plus its adapters' best; λ is bisected until the
bytes fit, and the bytes left are spent greedily on the best error per byte.  That is optimal for
the convex hull of the choices (every budget the relaxation hits exactly) and near-optimal between
its points.  The bases are a fixed cost, so a k whose points lie above the hull is invisible to
the relaxation: a local search then tries every other k per module.  The plain per-adapter
truncation at a proportional share of the budget is evaluated too and kept if better, so the
result is never worse than compressing each adapter alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..format.storage import SCHEMES, is_quantized, stored_entries, stored_nbytes

__all__ = [
    "ModuleOptions",
    "ModuleCosts",
    "ModuleChoice",
    "Allocation",
    "Baseline",
    "default_ks",
    "module_options",
    "tensor_overhead",
    "allocate",
    "encode",
    "decode",
    "per_adapter_baseline",
]

#: Bisection steps on log λ: 2^-64 of relative precision, far below any gain ratio's spacing.
_BISECT_STEPS = 64
#: Elements of the (adapters × c × 2r × 2r) cores built at once by :func:`module_options`.
_CHUNK_ELEMENTS = 1 << 22
#: Passes of the local search on the modules' k after the relaxation.
_K_PASSES = 3


# ---------------------------------------------------------------- small linear algebra


class _Serial:
    """Run on one thread inside the block (as :func:`.subspace._serial` does, for the same reason).

    torch spreads batched tiny factorisations and tiny element-wise ops over OpenMP threads whose
    spin-waits, on a busy host, cost far more than the work: measured on a 2-core VM at load
    average 4, this file's tests ran 30 to 100× slower on two threads than on one.
    """

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.threads)


def _factored_svd(L: torch.Tensor, R: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``L @ R`` (…, d_out, m)·(…, m, d_in) from two QRs: ``(U, S, V)``, ``L R = U diag(S) Vᵀ``.

    O((d_out + d_in)·m²); the d_out × d_in product is never formed.
    """
    Ql, Rl = torch.linalg.qr(L)
    Qr, Rr = torch.linalg.qr(R.transpose(-1, -2))
    u, s, vh = torch.linalg.svd(Rl @ Rr.transpose(-1, -2), full_matrices=False)
    return Ql @ u, s, Qr @ vh.transpose(-1, -2)


def _orthonormal(U: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``U = Q R`` in float64, Q orthonormal and R upper triangular, so that every prefix
    ``Q[:, :k]`` spans ``U[:, :k]`` (bases stored in float32, float16 or quantized are only nearly
    orthonormal; the math runs on Q, and loadings go back to U's coordinates through R)."""
    Q, R = torch.linalg.qr(U.detach().double())
    diag = R.diagonal().abs()
    if diag.numel() and float(diag.min()) <= 1e-6 * float(diag.max()):
        raise ValueError(f"bases of shape {tuple(U.shape)} have dependent columns (|R_jj| down to "
                         f"{float(diag.min()):.3g}): give bases with independent, nearly orthonormal columns")
    return Q, R


def _sqnorm(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖B A‖_F²`` as ``tr((A Aᵀ)(BᵀB))`` (r × r products), batched."""
    return ((A @ A.transpose(-1, -2)) * (B.transpose(-1, -2) @ B)).sum((-1, -2))


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad (or cut) the last dimension to ``width``."""
    if x.shape[-1] >= width:
        return x[..., :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def _group_spectra(B: torch.Tensor, A: torch.Tensor, Ub: torch.Tensor, Ua: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ (n, m) of the cores and τ⁽ᶜ⁾ (n, m + 1, w) for c = 0..m, of unscaled float64 factors of one rank r.

    ``B`` (n, d_out, r), ``A`` (n, r, d_in), ``Ub`` (d_out, k), ``Ua`` (d_in, k); m = min(k, r).
    ``D_c = B A − P_c`` lives in the column span of ``[B, P_B B]`` and the row span of
    ``[Aᵀ, P_A Aᵀ]`` for every c (``P_c``'s columns lie in ``U_B·col(U_Bᵀ B)``), so one QR of each
    gives bases ``Qb``, ``Qa`` of at most 2r columns, and ``Qbᵀ D_c Qa`` (≤ 2r × 2r) has D_c's
    singular values: the core of ``B A`` minus the first c rank-one terms of ``C``'s SVD.
    """
    n, _, r = B.shape
    k = Ub.shape[1]
    m = min(k, r)
    if m > 0:
        YB, YA = Ub.T @ B, A @ Ua  # (n, k, r), (n, r, k): C = YB YA
        lv, S, rv = _factored_svd(YB, YA)
        S, lv, rv = S[:, :m], lv[..., :m], rv[..., :m]
        Qb = torch.linalg.qr(torch.cat([B, Ub @ YB], -1)).Q
        Qa = torch.linalg.qr(torch.cat([A.transpose(-1, -2), Ua @ YA.transpose(-1, -2)], -1)).Q
    else:
        S = B.new_zeros(n, 0)
        Qb = torch.linalg.qr(B).Q
        Qa = torch.linalg.qr(A.transpose(-1, -2)).Q
    G = (Qb.transpose(-1, -2) @ B) @ (A @ Qa)  # (n, wb, wa): Qbᵀ (B A) Qa
    if m == 0:
        return S, torch.linalg.svdvals(G)[:, None, :]
    Eb = Qb.transpose(-1, -2) @ (Ub @ lv)  # (n, wb, m)
    Ea = Qa.transpose(-1, -2) @ (Ua @ rv)  # (n, wa, m)
    terms = torch.einsum("nim,njm,nm->nmij", Eb, Ea, S)  # (n, m, wb, wa), rank-one parts of P
    T = torch.cat([G[:, None], G[:, None] - terms.cumsum(1)], 1)  # (n, m + 1, wb, wa)
    return S, torch.linalg.svdvals(T)


# ---------------------------------------------------------------- options: the spectra of every choice


@dataclass(frozen=True)
class ModuleOptions:
    """One module's spectra for every candidate k: all that :func:`allocate` needs.

    Tensors are float64 and scaled (singular values of ``s_i·…``), zero-padded across adapters
    of smaller rank.  Per candidate ``ks[j]``, with ``m = min(ks[j], max(ranks))``:

    * ``sigma[j]`` (N, m): singular values of ``s_i·C_i``, the in-subspace core;
    * ``tau[j]`` (N, 2·max(ranks)): singular values of ``s_i·Q_i``, ``Q_i = B_i A_i − U_B C_i U_Aᵀ``;
    * ``tau_c[j]`` (N, m + 1, 2·max(ranks)): row c holds the singular values of
      ``s_i·(B_i A_i − P_c)``, what the residual sees once the core is cut to rank c
      (row 0 is ΔW_i's own spectrum; the row ``min(k, r_i)`` is ``tau``).

    ``sqnorms`` (N,) holds ``‖ΔW_i‖_F²``.  Exact: ``Σσ² + Στ² = ‖ΔW_i‖²``, and for every c
    ``Σ_{j<c} σ_j² + Σ τ⁽ᶜ⁾² = ‖ΔW_i‖²``.
    """

    ks: Tuple[int, ...]
    ranks: Tuple[int, ...]
    d_out: int
    d_in: int
    sqnorms: torch.Tensor
    sigma: Tuple[torch.Tensor, ...]
    tau: Tuple[torch.Tensor, ...]
    tau_c: Tuple[torch.Tensor, ...]

    def errors(self, j: int) -> torch.Tensor:
        """Relative squared errors (N, m + 1, max(ranks) + 1) at ``ks[j]``: entry (i, c, ρ) is
        ``‖ΔW_i − ΔŴ_i‖² / ‖ΔW_i‖²`` for core rank c and residual rank ρ; ``inf`` where
        ``c > min(k, r_i)`` or ``c + ρ > r_i``; 0 for an adapter whose ΔW is 0."""
        R = max(self.ranks, default=0)
        t2 = self.tau_c[j].square()
        tail = t2.flip(-1).cumsum(-1).flip(-1)  # tail[..., ρ] = Σ_{l ≥ ρ} τ_l²
        tail = _pad(tail, R + 1)  # ρ = 0..R; a ρ past the last value keeps no error
        w = torch.where(self.sqnorms > 0, 1.0 / self.sqnorms.clamp_min(1e-300), torch.zeros_like(self.sqnorms))
        err = tail * w[:, None, None]
        m = err.shape[1] - 1
        c = torch.arange(m + 1)[None, :, None]
        rho = torch.arange(R + 1)[None, None, :]
        r = torch.tensor(self.ranks, dtype=torch.long)[:, None, None]
        valid = (c <= torch.clamp(r, max=self.ks[j])) & (c + rho <= r)
        return torch.where(valid, err, torch.full_like(err, math.inf))


def default_ks(K: int) -> List[int]:
    """Candidate prefix sizes when none are given: every k up to 8, then half-octaves (×√2), and K.

    Example:
        >>> default_ks(48)
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 23, 32, 45, 48]
    """
    ks = list(range(min(K, 8) + 1))
    e = 7
    while round(2 ** (e / 2)) < K:
        ks.append(round(2 ** (e / 2)))
        e += 1
    return sorted(set(ks) | {K})


def module_options(
    B_list: Sequence[torch.Tensor],
    A_list: Sequence[torch.Tensor],
    *,
    scales: Sequence[float],
    U_B: torch.Tensor,
    U_A: torch.Tensor,
    ks: Optional[Sequence[int]] = None,
) -> ModuleOptions:
    """Spectra of one module's adapters for every candidate k (see :class:`ModuleOptions`).

    Args:
        B_list: each adapter's ``B_i`` (d_out × r_i).
        A_list: each adapter's ``A_i`` (r_i × d_in).
        scales: each adapter's ``s_i``.
        U_B: the shared basis (d_out × K), orthonormal columns by decreasing importance.
        U_A: the shared basis (d_in × K).
        ks: candidate prefix sizes, each in [0, K]; 0 is always added (it is what keeps
            :func:`allocate` never worse than per-adapter truncation).  Default :func:`default_ks`.

    Returns:
        The module's :class:`ModuleOptions`, float64.

    Example:
        >>> B, A = [torch.randn(6, 2)], [torch.randn(2, 5)]
        >>> U_B, U_A = torch.linalg.qr(B[0]).Q, torch.linalg.qr(A[0].T).Q
        >>> o = module_options(B, A, scales=[2.0], U_B=U_B, U_A=U_A, ks=[2])
        >>> o.ks
        (0, 2)
        >>> bool(torch.allclose(o.sigma[1].square().sum() + o.tau[1].square().sum(), o.sqnorms[0]))
        True
    """
    N = len(B_list)
    if len(A_list) != N or len(scales) != N:
        raise ValueError(f"{N} B factors, {len(A_list)} A factors and {len(scales)} scales: expected one of each per adapter")
    if U_B.dim() != 2 or U_A.dim() != 2 or U_B.shape[1] != U_A.shape[1]:
        raise ValueError(f"bases of shapes {tuple(U_B.shape)} and {tuple(U_A.shape)}: expected (d_out, K) and (d_in, K)")
    d_out, K = U_B.shape
    d_in = U_A.shape[0]
    for i, (B, A) in enumerate(zip(B_list, A_list)):
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != d_out or A.shape[1] != d_in or B.shape[1] != A.shape[0]:
            raise ValueError(f"adapter {i}: B {tuple(B.shape)} and A {tuple(A.shape)} do not fit bases "
                             f"{tuple(U_B.shape)}, {tuple(U_A.shape)}: expected ({d_out}, r) and (r, {d_in})")
    kset = sorted({0, *(default_ks(K) if ks is None else (int(k) for k in ks))})
    if kset[-1] > K:
        raise ValueError(f"candidate k = {kset[-1]} exceeds the bases' K = {K}: give ks within [0, {K}]")
    with _Serial():
        ranks = tuple(int(B.shape[1]) for B in B_list)
        R = max(ranks, default=0)
        UB, UA = _orthonormal(U_B[:, : kset[-1]])[0], _orthonormal(U_A[:, : kset[-1]])[0]
        s = torch.tensor([abs(float(x)) for x in scales], dtype=torch.float64)
        sq = torch.zeros(N, dtype=torch.float64)
        sigma = [torch.zeros(N, min(k, R), dtype=torch.float64) for k in kset]
        tau_c = [torch.zeros(N, min(k, R) + 1, 2 * R, dtype=torch.float64) for k in kset]
        for r in sorted(set(ranks)):
            members = [i for i, ri in enumerate(ranks) if ri == r]
            if r == 0:
                continue
            step = max(1, _CHUNK_ELEMENTS // ((r + 1) * 4 * r * r))
            for at in range(0, len(members), step):
                idx = members[at:at + step]
                Bg = torch.stack([B_list[i].detach().double() for i in idx])
                Ag = torch.stack([A_list[i].detach().double() for i in idx])
                sg = s[idx]
                sq[idx] = sg.square() * _sqnorm(Bg, Ag)
                for j, k in enumerate(kset):
                    S, T = _group_spectra(Bg, Ag, UB[:, :k], UA[:, :k])
                    m = S.shape[1]
                    sigma[j][idx, :m] = S * sg[:, None]
                    rows = _pad(T, 2 * R) * sg[:, None, None]
                    tau_c[j][idx, : m + 1] = rows
                    # rows past min(k, r) repeat the last one: the core has no more directions to remove
                    tau_c[j][idx, m + 1:] = rows[:, -1:]
        tau = []
        for j, k in enumerate(kset):
            last = torch.tensor([min(k, r) for r in ranks], dtype=torch.long)
            tau.append(tau_c[j][torch.arange(N), last] if N else torch.zeros(0, 2 * R, dtype=torch.float64))
        return ModuleOptions(tuple(kset), ranks, d_out, d_in, sq, tuple(sigma), tuple(tau), tuple(tau_c))


# ---------------------------------------------------------------- costs


def tensor_overhead(scheme: str, *, key_chars: int = 64, max_file_bytes: int = 1 << 40) -> int:
    """Bytes beyond the data that one more stored tensor adds to its file, at most: for budgets.

    A float scheme writes one safetensors header entry per tensor,
    ``"<key>":{"dtype":…,"shape":[…],"data_offsets":[…]},``: counted with a key of
    ``key_chars`` characters, and shape sizes and data offsets of as many digits as
    ``max_file_bytes`` (every one of them is at most the file's size).
    A quantized file packs its tensors into ``codes``, ``index`` and ``scales``
    (:func:`lorashare.format.storage.packed_entries`), so one more tensor adds an index row of
    two int32 (8 bytes), as ``compress.files_overhead`` counts it; its name lives in the config.
    The header's length prefix, metadata and 8-byte padding are per file, not per tensor.

    Example:
        >>> tensor_overhead("nf4")
        8
        >>> tensor_overhead("float32", key_chars=10, max_file_bytes=999)
        72
    """
    if scheme not in SCHEMES:
        raise ValueError(f"storage scheme {scheme!r} is unknown: expected one of {SCHEMES}")
    if is_quantized(scheme):
        return 8
    big = max(1, int(max_file_bytes))
    (_, dtype, _), = stored_entries("", scheme, 1, 1)
    return len(f'"{"k" * key_chars}":{{"dtype":"{dtype}","shape":[{big},{big}],"data_offsets":[{big},{big}]}},')


@dataclass(frozen=True)
class ModuleCosts:
    """Byte costs of one module's tensors in a storage scheme (:mod:`lorashare.format.storage`).

    Data bytes (quantization scales and nf4 nibble padding included) of each tensor in its
    component-major layout, plus ``tensor_overhead`` bytes for every tensor that holds at least
    one value (see :func:`tensor_overhead`; 0 counts data only).  Per-file bytes (the header's
    length prefix and metadata) are not per module: take them off the budget first, as
    ``compress.files_overhead`` does.

    Example:
        >>> c = ModuleCosts("float16", d_out=8, d_in=4)
        >>> c.bases(2), c.loadings(2, 1), c.residual(1), c.adapter(2, 1, 1)
        (48, 8, 24, 32)
    """

    scheme: str
    d_out: int
    d_in: int
    tensor_overhead: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"storage scheme {self.scheme!r} is unknown: expected one of {SCHEMES}")

    def _t(self, k: int, c: int) -> int:
        return stored_nbytes(self.scheme, k, c) + (self.tensor_overhead if k * c > 0 else 0)

    def bases(self, k: int) -> int:
        """``U_B[:, :k]`` and ``U_A[:, :k]``, stored as (k, d_out) and (k, d_in)."""
        return self._t(k, self.d_out) + self._t(k, self.d_in)

    def loadings(self, k: int, c: int) -> int:
        """One adapter's ``L_B`` and ``L_A``, (k, c) each."""
        return 2 * self._t(k, c)

    def residual(self, rho: int) -> int:
        """One adapter's ``R_B`` (stored as ρ × d_out) and ``R_A`` (ρ × d_in)."""
        return self._t(rho, self.d_out) + self._t(rho, self.d_in)

    def adapter(self, k: int, c: int, rho: int) -> int:
        """One adapter's loadings and residual."""
        return self.loadings(k, c) + self.residual(rho)


# ---------------------------------------------------------------- allocation


@dataclass(frozen=True)
class ModuleChoice:
    """One module's allocation: its k, each adapter's core rank ``c`` and residual rank ``rho``,
    the bytes (bases plus every adapter's tensors, :class:`ModuleCosts`) and each adapter's
    predicted relative squared ΔW error."""

    k: int
    c: Tuple[int, ...]
    rho: Tuple[int, ...]
    nbytes: int
    errors: Tuple[float, ...]


@dataclass(frozen=True)
class Allocation:
    """The budget's split: one :class:`ModuleChoice` per module, the total bytes, the total of the
    relative squared errors (``Σ ‖ΔW − ΔŴ‖² / ‖ΔW‖²`` over every module and adapter), the price λ
    per byte the relaxation settled on, and ``source``: ``"lagrangian"``, or ``"per_adapter"`` when
    per-adapter truncation at a proportional share of the budget did better."""

    modules: Tuple[ModuleChoice, ...]
    nbytes: int
    error: float
    price: float
    source: str


class _Tables:
    """One module's choices as tables: per k, the errors (N, m + 1, R + 1) and bytes (m + 1, R + 1)."""

    def __init__(self, o: ModuleOptions, cost: ModuleCosts) -> None:
        if (cost.d_out, cost.d_in) != (o.d_out, o.d_in):
            raise ValueError(f"costs for a ({cost.d_out}, {cost.d_in}) module given to options of "
                             f"({o.d_out}, {o.d_in}): give each module its own ModuleCosts")
        R = max(o.ranks, default=0)
        self.options, self.cost, self.R = o, cost, R
        self.err = [o.errors(j) for j in range(len(o.ks))]
        self.flat_err = [e.flatten(1) for e in self.err]
        self.bytes = []
        for j, k in enumerate(o.ks):
            m = self.err[j].shape[1] - 1
            b = torch.tensor([[cost.adapter(k, c, rho) for rho in range(R + 1)] for c in range(m + 1)],
                             dtype=torch.float64)
            self.bytes.append(b.flatten())
        self.bases = [float(cost.bases(k)) for k in o.ks]


def _best(obj: torch.Tensor, nbytes: torch.Tensor) -> torch.Tensor:
    """Per row, the index minimising ``obj``; among near-ties the fewest bytes."""
    lo = obj.amin(-1, keepdim=True)
    near = obj <= lo + 1e-12 * lo.abs() + 1e-300
    return torch.where(near, nbytes.expand_as(obj), torch.full_like(obj, math.inf)).argmin(-1)


def _relaxed(tables: Sequence[_Tables], lam: float, fixed: Optional[Sequence[int]] = None) -> List[Tuple[int, torch.Tensor]]:
    """For price ``lam``: per module (k index, flat (c, ρ) index per adapter); ``fixed`` pins each module's k index."""
    out = []
    for g, t in enumerate(tables):
        best_k, best_val, best_bytes, best_pick = 0, math.inf, math.inf, None
        for j in range(len(t.options.ks)) if fixed is None else (fixed[g],):
            obj = t.flat_err[j] + lam * t.bytes[j]
            pick = _best(obj, t.bytes[j])
            rows = torch.arange(obj.shape[0])
            val = lam * t.bases[j] + float(obj[rows, pick].sum())
            nbytes = t.bases[j] + float(t.bytes[j][pick].sum())
            tie = math.isfinite(best_val) and abs(val - best_val) <= 1e-12 * abs(best_val)
            if (nbytes < best_bytes) if tie else (val < best_val):
                best_k, best_val, best_bytes, best_pick = j, val, nbytes, pick
        out.append((best_k, best_pick))
    return out


def _solve(tables: Sequence[_Tables], budget: float, fixed: Optional[Sequence[int]] = None
           ) -> Optional[Tuple[List[Tuple[int, torch.Tensor]], float]]:
    """The relaxation's choice at the smallest price whose bytes fit (bisection on log λ), the bytes
    left spent by :func:`_polish`: ``(selection, price)``, or None when even λ → ∞ does not fit
    (the pinned bases alone exceed the budget)."""
    def spent(lam: float) -> float:
        return _spent(tables, _relaxed(tables, lam, fixed))

    price = 0.0
    if spent(0.0) > budget:
        n = max(1.0, sum(float(t.options.sqnorms.numel()) for t in tables))
        hi = n / max(budget, 1.0)
        while spent(hi) > budget:
            if hi > 1e300:
                return None
            hi *= 16
        lo = hi * 16.0 ** -24
        if spent(lo) <= budget:
            hi = lo
        else:
            for _ in range(_BISECT_STEPS):
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if spent(mid) <= budget else (mid, hi)
        price = hi
    sel = _relaxed(tables, price, fixed)
    _polish(tables, sel, budget)
    return sel, price


def _module_error(t: _Tables, choice: Tuple[int, torch.Tensor]) -> float:
    j, pick = choice
    return float(t.flat_err[j][torch.arange(len(pick)), pick].sum())


def _module_bytes(t: _Tables, choice: Tuple[int, torch.Tensor]) -> float:
    j, pick = choice
    return t.bases[j] + float(t.bytes[j][pick].sum())


def _refine_k(tables: Sequence[_Tables], sel: List[Tuple[int, torch.Tensor]], budget: float) -> None:
    """Local search on the modules' k, for what the relaxation cannot see (a k whose points lie
    above the convex hull, the bases being a fixed cost): each module in turn tries every other k
    with the bytes it holds plus those left, its adapters re-solved; a change that lowers the total
    error is kept.  After a pass with a change, every module's adapters are re-solved together at
    the new k (bytes move between modules); at most ``_K_PASSES`` passes."""
    for _ in range(_K_PASSES):
        improved = False
        for g, t in enumerate(tables):
            avail = budget - (_spent(tables, sel) - _module_bytes(t, sel[g]))
            best = _module_error(t, sel[g])
            for j in range(len(t.options.ks)):
                if j == sel[g][0] or t.bases[j] > avail:
                    continue
                sub = _solve([t], avail, [j])
                if sub is not None and _module_error(t, sub[0][0]) < best * (1 - 1e-9):
                    best, sel[g], improved = _module_error(t, sub[0][0]), sub[0][0], True
        if not improved:
            break
        again = _solve(tables, budget, [j for j, _ in sel])
        if again is not None and _total_error(tables, again[0]) < _total_error(tables, sel):
            sel[:] = again[0]
    _polish(tables, sel, budget)


def _spent(tables: Sequence[_Tables], sel: Sequence[Tuple[int, torch.Tensor]]) -> float:
    return sum(t.bases[j] + float(t.bytes[j][pick].sum()) for t, (j, pick) in zip(tables, sel))


def _total_error(tables: Sequence[_Tables], sel: Sequence[Tuple[int, torch.Tensor]]) -> float:
    return sum(float(t.flat_err[j][torch.arange(len(pick)), pick].sum()) for t, (j, pick) in zip(tables, sel))


def _polish(tables: Sequence[_Tables], sel: List[Tuple[int, torch.Tensor]], budget: float) -> None:
    """Spend the bytes left on the moves (one adapter to another (c, ρ) of its module's k) with the
    most error removed per byte, while one fits.  Modules keep their k."""
    left = budget - _spent(tables, sel)
    while True:
        best = None  # (ratio, module, adapter, new index, bytes)
        for g, (t, (j, pick)) in enumerate(zip(tables, sel)):
            if pick.numel() == 0:
                continue
            rows = torch.arange(len(pick))
            e, b = t.flat_err[j], t.bytes[j]
            gain = e[rows, pick][:, None] - e  # (N, E)
            extra = b[None, :] - b[pick][:, None]
            ok = (gain > 0) & (extra <= left) & torch.isfinite(e)
            if not bool(ok.any()):
                continue
            ratio = torch.where(ok, gain / extra.clamp_min(1e-300), torch.full_like(gain, -math.inf))
            flat = int(ratio.argmax())
            i, new = divmod(flat, ratio.shape[1])
            r = float(ratio[i, new])
            if best is None or r > best[0]:
                best = (r, g, i, new, float(extra[i, new]))
        if best is None:
            return
        _, g, i, new, extra = best
        sel[g][1][i] = new
        left -= extra


def _per_adapter(tables: Sequence[_Tables], budget: float) -> Optional[List[Tuple[int, torch.Tensor]]]:
    """k = 0 everywhere; each adapter at the largest ρ fitting its share of the budget,
    proportional to its LoRA's size ``r_i·(d_out + d_in)``.  None when some module has no k = 0."""
    if any(t.options.ks[0] != 0 for t in tables):
        return None
    size = sum(r * (t.options.d_out + t.options.d_in) for t in tables for r in t.options.ranks)
    sel = []
    for t in tables:
        picks = []
        for r in t.options.ranks:
            share = budget * r * (t.options.d_out + t.options.d_in) / size if size else 0.0
            rho = max((p for p in range(r + 1) if t.cost.residual(p) <= share), default=0)
            picks.append(rho)  # c = 0: flat index c·(R + 1) + ρ = ρ
        sel.append((0, torch.tensor(picks, dtype=torch.long)))
    return sel


def allocate(
    options: Sequence[ModuleOptions],
    *,
    budget_bytes: float,
    costs: Sequence[ModuleCosts],
) -> Allocation:
    """Per module its k, per adapter its core rank c and residual rank ρ, under a total byte budget.

    Minimises ``Σ ‖ΔW_i − ΔŴ_i‖² / ‖ΔW_i‖²`` over every module and adapter (each adapter's
    relative error counts the same) subject to ``bytes ≤ budget_bytes``, by Lagrangian relaxation:
    for a price λ per byte each adapter takes the entry of its exact (c, ρ) table
    (:meth:`ModuleOptions.errors`, ``c + ρ ≤ r_i``) minimising ``err + λ·bytes``, each module the
    k minimising ``λ·bases(k)`` plus its adapters' best; λ is bisected (log scale) to the smallest
    price whose choice fits, then the bytes left are spent greedily on the moves with the most
    error removed per byte (modules keep their k).  The relaxation is optimal on the convex hull
    of the achievable (bytes, error) points; between them the greedy leaves at most the bytes of
    one move unspent.  A local search on k follows (each module tries every
    other k with the bytes it holds plus those left; then all adapters are re-balanced at the new
    k), since the bases' fixed cost hides from the relaxation a k that is best only at this
    budget.  Per-adapter truncation (k = 0, each adapter at a proportional share of the
    budget, then the same greedy) is evaluated too and kept if its error is lower, so the result is
    never worse than compressing each adapter alone.

    Args:
        options: each module's :func:`module_options`.
        budget_bytes: the bytes every module's tensors may take, per-file overhead excluded.
        costs: each module's :class:`ModuleCosts`, in the same order.

    Returns:
        An :class:`Allocation` whose ``nbytes`` (≤ ``budget_bytes``) are exactly what
        :func:`encode`'s tensors and the bases' first k columns take under ``costs``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> B = [torch.randn(16, 2, generator=g) for _ in range(3)]
        >>> A = [torch.randn(2, 12, generator=g) for _ in range(3)]
        >>> U_B = torch.linalg.qr(torch.cat(B, 1)).Q
        >>> U_A = torch.linalg.qr(torch.cat([a.T for a in A], 1)).Q
        >>> o = module_options(B, A, scales=[1.0] * 3, U_B=U_B, U_A=U_A)
        >>> a = allocate([o], budget_bytes=10_000, costs=[ModuleCosts("float32", 16, 12)])
        >>> a.nbytes <= 10_000, round(a.error, 6)
        (True, 0.0)
    """
    if len(costs) != len(options):
        raise ValueError(f"{len(options)} modules' options and {len(costs)} costs: give one ModuleCosts per module")
    if not budget_bytes >= 0 or math.isinf(budget_bytes):
        raise ValueError(f"budget_bytes = {budget_bytes!r}: expected a finite number ≥ 0")
    with _Serial():
        tables = [_Tables(o, c) for o, c in zip(options, costs)]
        budget = float(budget_bytes)

        sel, price = _solve(tables, budget)  # type: ignore[misc]  # k = 0 needs no bytes: always fits
        _refine_k(tables, sel, budget)
        source = "lagrangian"
        alt = _per_adapter(tables, budget)
        if alt is not None:
            _polish(tables, alt, budget)
            if _total_error(tables, alt) < _total_error(tables, sel):
                sel, source = alt, "per_adapter"

        modules = []
        for t, (j, pick) in zip(tables, sel):
            k = t.options.ks[j]
            c, rho = (pick // (t.R + 1)).tolist(), (pick % (t.R + 1)).tolist()
            errs = t.flat_err[j][torch.arange(len(pick)), pick].tolist()
            nbytes = t.cost.bases(k) + sum(t.cost.adapter(k, ci, ri) for ci, ri in zip(c, rho))
            modules.append(ModuleChoice(k, tuple(c), tuple(rho), nbytes, tuple(errs)))
        return Allocation(tuple(modules), sum(m.nbytes for m in modules), float(sum(sum(m.errors) for m in modules)),
                          price, source)


# ---------------------------------------------------------------- the two ends


def encode(
    B: torch.Tensor,
    A: torch.Tensor,
    U_B: torch.Tensor,
    U_A: torch.Tensor,
    *,
    k: int,
    c: int,
    rho: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One adapter's loadings and residual at prefix k, core rank c and residual rank ρ.

    The scale is not folded in (``ΔW ≈ s·(U_B L_B L_Aᵀ U_Aᵀ + R_B R_A)``, and the factors do not
    depend on s); computed in float64, returned in float32.  The squared error is exactly the
    tail ``Σ_{j≥ρ} τ⁽ᶜ⁾_j²`` of :class:`ModuleOptions` (divided by s²).

    Args:
        B: the adapter's ``B`` (d_out × r).
        A: the adapter's ``A`` (r × d_in).
        U_B: the module's basis (d_out × K); its first k columns are used.
        U_A: the module's basis (d_in × K).
        k: the prefix size, 0 ≤ k ≤ K.
        c: the core's rank, c ≤ min(k, r).
        rho: the residual's rank, c + ρ ≤ r.

    Returns:
        ``(L_B, L_A, R_B, R_A)``: (k × c), (k × c), (d_out × ρ), (ρ × d_in).

    Example:
        >>> B, A = torch.randn(6, 3), torch.randn(3, 5)
        >>> U_B, U_A = torch.eye(6)[:, :2], torch.eye(5)[:, :2]
        >>> [tuple(t.shape) for t in encode(B, A, U_B, U_A, k=2, c=1, rho=2)]
        [(2, 1), (2, 1), (6, 2), (2, 5)]
    """
    d_out, r = B.shape
    d_in = A.shape[1]
    K = U_B.shape[1]
    if not (0 <= k <= K and 0 <= c <= min(k, r) and rho >= 0 and c + rho <= r):
        raise ValueError(f"k = {k}, c = {c}, rho = {rho} for rank {r} and K = {K}: "
                         f"expected 0 ≤ k ≤ K, c ≤ min(k, r) and c + rho ≤ r")
    with _Serial():
        B64, A64 = B.detach().double(), A.detach().double()
        (Ub, Rb), (Ua, Ra) = _orthonormal(U_B[:, :k]), _orthonormal(U_A[:, :k])
        if c > 0:
            lv, S, rv = _factored_svd(Ub.T @ B64, A64 @ Ua)
            root = S[:c].clamp_min(0).sqrt()
            L_B, L_A = lv[:, :c] * root, rv[:, :c] * root  # in Q's coordinates: Ub L_B = U_B R⁻¹ L_B
        else:
            L_B = L_A = B64.new_zeros(k, 0)
        if rho > 0:
            left = torch.cat([B64, -(Ub @ L_B)], 1)  # D = B A − U_B L_B L_Aᵀ U_Aᵀ = left · right
            right = torch.cat([A64, (Ua @ L_A).T], 0)
            u, T, v = _factored_svd(left, right)
            root = T[:rho].clamp_min(0).sqrt()
            R_B = _pad(u[:, :rho] * root, rho)
            R_A = _pad(v[:, :rho] * root, rho).T
        else:
            R_B, R_A = B64.new_zeros(d_out, 0), B64.new_zeros(0, d_in)
        if c > 0:  # loadings of the bases as given: U_B[:, :k] L = Ub R L
            L_B = torch.linalg.solve_triangular(Rb, L_B, upper=True)
            L_A = torch.linalg.solve_triangular(Ra, L_A, upper=True)
        return tuple(t.float().contiguous() for t in (L_B, L_A, R_B, R_A))  # type: ignore[return-value]


def decode(
    U_B: torch.Tensor,
    U_A: torch.Tensor,
    L_B: torch.Tensor,
    L_A: torch.Tensor,
    R_B: torch.Tensor,
    R_A: torch.Tensor,
    *,
    rank: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rebuilt LoRA factors ``(B, A)``, (d_out × rank) and (rank × d_in), zero-padded.

    ``B = [U_B L_B, R_B, 0]`` and ``A = [(U_A L_A)ᵀ; R_A; 0]`` with k = ``L_B.shape[0]``, so that
    ``s·B A`` is the rebuilt update and the adapter keeps its config (rank and alpha).

    Example:
        >>> B, A = torch.randn(6, 3), torch.randn(3, 5)
        >>> U_B, U_A = torch.linalg.qr(B).Q, torch.linalg.qr(A.T).Q  # bases that hold the adapter
        >>> Bh, Ah = decode(U_B, U_A, *encode(B, A, U_B, U_A, k=3, c=3, rho=0), rank=3)
        >>> tuple(Bh.shape), tuple(Ah.shape), bool(torch.allclose(Bh @ Ah, B @ A, atol=1e-5))
        ((6, 3), (3, 5), True)
    """
    k, c = L_B.shape
    rho = R_B.shape[1]
    if L_A.shape != (k, c) or R_A.shape[0] != rho or c + rho > rank:
        raise ValueError(f"L_B {tuple(L_B.shape)}, L_A {tuple(L_A.shape)}, R_B {tuple(R_B.shape)}, "
                         f"R_A {tuple(R_A.shape)} for rank {rank}: expected equal loadings and c + rho ≤ rank")
    dtype = torch.promote_types(L_B.dtype, R_B.dtype)
    d_out, d_in = U_B.shape[0], U_A.shape[0]
    B = torch.zeros(d_out, rank, dtype=dtype, device=L_B.device)
    A = torch.zeros(rank, d_in, dtype=dtype, device=L_B.device)
    if c:
        B[:, :c] = U_B[:, :k].to(dtype) @ L_B.to(dtype)
        A[:c] = (U_A[:, :k].to(dtype) @ L_A.to(dtype)).T
    if rho:
        B[:, c:c + rho] = R_B.to(dtype)
        A[c:c + rho] = R_A.to(dtype)
    return B, A


@dataclass(frozen=True)
class Baseline:
    """An adapter compressed alone: rebuilt factors (zero-padded to its rank), the rank kept, its bytes."""

    B: torch.Tensor
    A: torch.Tensor
    rank: int
    nbytes: int


def per_adapter_baseline(
    B: torch.Tensor,
    A: torch.Tensor,
    *,
    budget_bytes: float,
    scheme: str,
    tensor_overhead: int = 0,
) -> Baseline:
    """Compress one adapter alone: its rank-ρ SVD truncation at the largest ρ whose factors fit.

    ρ is the largest ρ ≤ r with ``ModuleCosts(scheme, d_out, d_in, tensor_overhead).residual(ρ)``
    ≤ ``budget_bytes``; the factors are those of :func:`encode` at k = 0 (Eckart–Young optimal).

    Example:
        >>> B, A = torch.randn(8, 4), torch.randn(4, 8)
        >>> b = per_adapter_baseline(B, A, budget_bytes=130, scheme="float32")
        >>> b.rank, b.nbytes, tuple(b.B.shape)
        (2, 128, (8, 4))
    """
    d_out, r = B.shape
    d_in = A.shape[1]
    cost = ModuleCosts(scheme, d_out, d_in, tensor_overhead)
    rho = max((p for p in range(r + 1) if cost.residual(p) <= budget_bytes), default=0)
    U_B, U_A = B.new_zeros(d_out, 0), A.new_zeros(d_in, 0)
    L_B, L_A, R_B, R_A = encode(B, A, U_B, U_A, k=0, c=0, rho=rho)
    Bh, Ah = decode(U_B, U_A, L_B, L_A, R_B, R_A, rank=r)
    return Baseline(Bh, Ah, rho, cost.residual(rho))
