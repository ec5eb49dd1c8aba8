"""The SHARE math: pure functions over tensors, no I/O.

Notation, for one module (``q_proj`` of layer 3, say) and N adapters:

* adapter i has ``A_i`` (r_i × d_in) and ``B_i`` (d_out × r_i); its update is
  ``ΔW_i = s_i · B_i A_i``.
* a *side* is A or B.  Its **factor stack** ``F`` puts every adapter's factor
  as rows: ``F_A = [A_1; …; A_N]`` (n × d_in) and ``F_B = [B_1ᵀ; …; B_Nᵀ]``
  (n × d_out), with ``n = Σ r_i``.  So ``ΔW_i = F_B,iᵀ F_A,i`` up to the scale.
* a side's **basis** ``U`` (d × k, orthonormal columns) is shared by all
  adapters; an adapter's **loading** is ``L_i = Uᵀ F_iᵀ`` (k × r_i), and the
  factor comes back as ``F_iᵀ ≈ U L_i``.  That is the 0.1.x layout, so its
  checkpoints and ours reconstruct the same way.

Which basis?  Given orthonormal ``U_A`` and ``U_B``, projecting both factors
gives ``ΔŴ = P_B ΔW P_A``, and that is already the least-squares optimum of
``‖ΔW − U_B X U_Aᵀ‖`` over every rank-r core X, so loadings never need a
refit.  The error is at most ``‖(I−P_B)ΔW‖² + ‖ΔW(I−P_A)‖²``, so each side's
basis should be the top-k subspace of ``Σ_i ΔW_iᵀΔW_i`` (A side) or
``Σ_i ΔW_i ΔW_iᵀ`` (B side), with each ΔW_i scaled to unit norm so that every
adapter counts the same (this minimises the mean *relative* error).  That
matrix is ``X Xᵀ`` for the weighted stack ``X_A = F_Aᵀ·blockdiag(C_B,i)``
where ``C_B,i C_B,iᵀ = B_iᵀB_i``: the basis depends on ΔW alone, not on the
gauge ``(B G)(G⁻¹A)`` that a random init leaves in the factors.

Nothing here is d × d: every product is on the small side (n × n, or r × r).
Functions are batched: leading dimensions are independent groups.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "factor_gram",
    "psd_sqrt",
    "delta_w_sqnorm",
    "side_weights",
    "weighted_gram",
    "range_gram",
    "top_eigvals",
    "top_eigh",
    "gram_subspace",
    "basis_from_eigh",
    "randomized_basis",
    "extend_range",
    "ritz_values",
    "threshold_bases",
    "spectrum_to_depth",
    "largest_saving_k",
    "lossless_basis",
    "orthonormalize",
    "project",
    "reconstruct_rows",
    "explained_ratio",
    "choose_k",
    "water_fill",
    "delta_w_error",
    "delta_w_error_rows",
    "delta_w_error_coords",
]

Ranks = Sequence[int]


@contextlib.contextmanager
def _serial() -> Iterator[None]:
    """Run LAPACK factorisations on one thread.

    torch parallelises a batch of tiny factorisations over OpenMP threads; on a
    busy machine the threads' spin-waits made a (24, 48, 48) eigh 150× slower
    (1.4 s instead of 10 ms, measured here).  Large ones suffer too: a (2, 1800, 1800)
    eigh took 52 s on 2 threads against 5.4 s on one (busy 2-core host).  Big
    matmuls keep every thread.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _blocks(n_ranks: Ranks) -> List[slice]:
    out, at = [], 0
    for r in n_ranks:
        out.append(slice(at, at + r))
        at += r
    return out


def _uniform(ranks: Ranks) -> Optional[int]:
    return ranks[0] if len(set(ranks)) == 1 else None


def factor_gram(F: torch.Tensor, ranks: Ranks) -> List[torch.Tensor]:
    """Per-adapter Gram ``F_i F_iᵀ`` (…, r_i, r_i) of a factor stack (…, n, d), in float64."""
    r = _uniform(ranks)
    if r is not None:
        Fb = F.unflatten(-2, (len(ranks), r))
        G = (Fb @ Fb.transpose(-1, -2)).double()  # (…, N, r, r)
        return list(G.unbind(-3))
    return [(F[..., s, :] @ F[..., s, :].transpose(-1, -2)).double() for s in _blocks(ranks)]


def psd_sqrt(G: torch.Tensor) -> torch.Tensor:
    """A factor ``C`` with ``C Cᵀ = G`` for symmetric PSD ``G`` (…, r, r), robust to rank loss.

    Cholesky with a relative jitter: a module an adapter never trained (B = 0)
    has ``G = 0`` and simply gets weight ~0.
    """
    r = G.shape[-1]
    eye = torch.eye(r, dtype=G.dtype, device=G.device)
    scale = G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)[..., None, None]
    with _serial():
        C, info = torch.linalg.cholesky_ex(G + 1e-12 * scale * eye)
    if bool((info != 0).any()):  # numerically indefinite: fall back to eigh
        with _serial():
            w, V = torch.linalg.eigh(G)
        C = V * w.clamp_min(0).sqrt()[..., None, :]
    return C


def delta_w_sqnorm(GA: torch.Tensor, GB: torch.Tensor) -> torch.Tensor:
    """``‖B A‖_F²`` from ``A Aᵀ`` and ``BᵀB`` (both r × r): ``tr(GA·GB)``."""
    return (GA * GB.transpose(-1, -2)).sum((-1, -2))


def side_weights(
    GA: Sequence[torch.Tensor], GB: Sequence[torch.Tensor], *, normalize: bool = True
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Block weights that turn factor stacks into ΔW-weighted stacks.

    Returns ``(WA, WB, sqnorms)``: ``X_A = F_Aᵀ·blockdiag(WA)`` and
    ``X_B = F_Bᵀ·blockdiag(WB)`` satisfy ``X_A X_Aᵀ = Σ ΔW_iᵀΔW_i / ‖ΔW_i‖²``
    (and the B analogue).  ``sqnorms`` are the ``‖B_i A_i‖²``.
    """
    if len({tuple(g.shape) for g in GA}) == 1:  # uniform ranks: one batched call
        ga, gb = torch.stack(list(GA), -3), torch.stack(list(GB), -3)
        n2 = delta_w_sqnorm(ga, gb)
        inv = torch.where(n2 > 0, n2.clamp_min(1e-300).rsqrt(), torch.zeros_like(n2))[..., None, None] if normalize else 1.0
        return list((psd_sqrt(gb) * inv).unbind(-3)), list((psd_sqrt(ga) * inv).unbind(-3)), list(n2.unbind(-1))
    WA, WB, norms = [], [], []
    for ga, gb in zip(GA, GB):
        n2 = delta_w_sqnorm(ga, gb)
        inv = torch.where(n2 > 0, n2.clamp_min(1e-300).rsqrt(), torch.zeros_like(n2))[..., None, None] if normalize else 1.0
        WA.append(psd_sqrt(gb) * inv)
        WB.append(psd_sqrt(ga) * inv)
        norms.append(n2)
    return WA, WB, norms


def _blockdiag_congruence(K: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks) -> torch.Tensor:
    """``blockdiag(W)ᵀ · K · blockdiag(W)`` without forming the block-diagonal matrix."""
    r = _uniform(ranks)
    if r is not None:
        Wt = torch.stack(list(W), -3).to(K.dtype)  # (…, N, r, r)
        N = len(ranks)
        Kb = K.unflatten(-1, (N, r)).unflatten(-3, (N, r))  # (…, N, r, N, r)
        out = torch.einsum("...iab,...iajc,...jcd->...ibjd", Wt, Kb, Wt)
        return out.flatten(-2, -1).flatten(-3, -2)
    D = torch.zeros(K.shape, dtype=K.dtype, device=K.device)
    for s, w in zip(_blocks(ranks), W):
        D[..., s, s] = w.to(K.dtype)
    return D.transpose(-1, -2) @ K @ D


def weighted_gram(F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gram ``Xᵀ X`` (…, n, n) of the weighted stack ``X = Fᵀ·blockdiag(W)``."""
    K = (F @ F.transpose(-1, -2)).to(dtype)
    return _blockdiag_congruence(K, W, ranks)


def range_gram(F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``X Xᵀ`` (…, d, d) of the weighted stack: the small side when the stack is taller than wide (n > d).

    Its eigenvectors are the basis itself.
    """
    Y = _apply_blocks_t(W, F.to(dtype), ranks)  # Xᵀ (…, n, d)
    return Y.transpose(-1, -2) @ Y


def top_eigvals(K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues only (descending, clamped at 0) of symmetric ``K``: several times cheaper than with vectors."""
    with _serial():
        w = torch.linalg.eigvalsh(K)
    return w.flip(-1).clamp_min(0)


def gram_subspace(
    K: torch.Tensor, k: int, *, iters: int = 2, oversample: int = 16, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs of a PSD Gram ``K`` (…, n, n) by subspace iteration + Rayleigh–Ritz.

    Cheaper than a full ``eigh`` when n ≫ k.  On the RoBERTa-shaped benchmark
    (n = 160, k = 32) two iterations kept 99.998% of the exact top-k energy in
    a quarter of the time.
    Returns ``(evals (…, k) descending, V (…, n, k))``.
    """
    n = K.shape[-1]
    ell = min(n, k + oversample)
    # Drawn on the CPU from a seeded generator, then moved: the same start on every device.
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(*K.shape[:-2], n, ell, generator=g, dtype=K.dtype).to(K.device)
    for _ in range(iters):
        Q = orthonormalize(K @ Q)
    evals, Vs = top_eigh(Q.transpose(-1, -2) @ K @ Q)
    return evals[..., :k], Q @ Vs[..., :k]


def top_eigh(K: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of symmetric ``K``."""
    with _serial():
        w, V = torch.linalg.eigh(K)
    return w.flip(-1).clamp_min(0), V.flip(-1)


def orthonormalize(U: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``U`` (full column rank): CholeskyQR2.

    Two rounds of ``U ← U·R⁻¹`` with ``RᵀR = UᵀU`` (Gram in float64): batched
    matmuls only, far faster than batched Householder QR on CPU, and as
    accurate for the well-conditioned panels used here.  Falls back to
    Householder QR if the Gram is numerically singular.
    """
    Q = U
    for _ in range(2):
        G = (Q.transpose(-1, -2) @ Q).double()
        with _serial():
            L, info = torch.linalg.cholesky_ex(G)
            if bool((info != 0).any()):
                return _householder(U)
            # Q·L⁻ᵀ through the small inverse: one batched matmul beats a batched trsm.
            eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
        Q = Q @ Linv.transpose(-1, -2).to(U.dtype)
    return Q


def _householder(U: torch.Tensor) -> torch.Tensor:
    with _serial():
        Q, R = torch.linalg.qr(U)
    sign = torch.sign(R.diagonal(dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return Q * sign[..., None, :]


def _apply_blocks(W: Sequence[torch.Tensor], M: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``blockdiag(W) · M`` for ``M`` (…, n, m)."""
    r = _uniform(ranks)
    if r is not None:
        Wt = torch.stack(list(W), -3).to(M.dtype)
        return (Wt @ M.unflatten(-2, (len(ranks), r))).flatten(-3, -2)
    return torch.cat([w.to(M.dtype) @ M[..., s, :] for s, w in zip(_blocks(ranks), W)], -2)


def _apply_blocks_t(W: Sequence[torch.Tensor], M: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``blockdiag(W)ᵀ · M``."""
    return _apply_blocks([w.transpose(-1, -2) for w in W], M, ranks)


def basis_from_eigh(
    F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, V: torch.Tensor, evals: torch.Tensor, k: int
) -> torch.Tensor:
    """Top-k basis ``U = X V_k Λ_k^{-1/2}`` (d × k) of the weighted stack, from its Gram's eigh."""
    lam = evals[..., :k].clamp_min(evals[..., :1] * 1e-12 + 1e-300)
    C = _apply_blocks(W, V[..., :k].double() / lam.sqrt()[..., None, :], ranks)  # (…, n, k)
    U = F.transpose(-1, -2) @ C.to(F.dtype)
    return orthonormalize(U)


def randomized_basis(
    F: torch.Tensor,
    W: Sequence[torch.Tensor],
    ranks: Ranks,
    k: int,
    *,
    oversample: int = 16,
    power_iters: int = 1,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-k basis of the weighted stack by a randomized range finder (Halko et al.).

    For large stacks (n ≫ k), where the n × n Gram and its eigh cost O(d n²):
    this costs O(d n (k+p)) per pass.  Returns ``(U, sv2)``: the basis and
    the estimated top-k squared singular values (captured energies).
    """
    n = F.shape[-2]
    ell = min(n, k + oversample)
    g = torch.Generator().manual_seed(seed)  # on the CPU, then moved: the same sketch on every device
    omega = torch.randn(*F.shape[:-2], n, ell, generator=g, dtype=F.dtype).to(F.device)
    # X Ω = Fᵀ (blockdiag(W) Ω)
    Y = F.transpose(-1, -2) @ _apply_blocks(W, omega.double(), ranks).to(F.dtype)
    for _ in range(power_iters):
        Y = orthonormalize(Y)
        Z = _apply_blocks_t(W, (F @ Y).double(), ranks).to(F.dtype)  # Xᵀ Y (n × ell)
        Y = F.transpose(-1, -2) @ _apply_blocks(W, orthonormalize(Z).double(), ranks).to(F.dtype)
    Q = orthonormalize(Y)  # d × ell
    B = _apply_blocks_t(W, (F @ Q).double(), ranks)  # Xᵀ Q : n × ell  (B = (QᵀX)ᵀ)
    # SVD of Qᵀ X = Bᵀ via eigh of the small ell × ell Gram.
    evals, V = top_eigh(B.transpose(-1, -2) @ B)
    U = orthonormalize(Q @ V[..., :k].to(F.dtype))
    return U, evals[..., :k]


def _x_times(F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, M: torch.Tensor) -> torch.Tensor:
    """``X M = Fᵀ·(blockdiag(W) M)`` (…, d, m) for the weighted stack, in ``F``'s dtype."""
    return F.transpose(-1, -2) @ _apply_blocks(W, M.double(), ranks).to(F.dtype)


def _xt_times(F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, Y: torch.Tensor) -> torch.Tensor:
    """``Xᵀ Y = blockdiag(W)ᵀ·(F Y)`` (…, n, m), in float64."""
    return _apply_blocks_t(W, (F @ Y.to(F.dtype)).double(), ranks)


def _deflate(Q: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``Y`` with its components along the orthonormal columns of ``Q`` removed."""
    return Y if Q.shape[-1] == 0 else Y - Q @ (Q.transpose(-1, -2) @ Y)


def extend_range(
    F: torch.Tensor,
    W: Sequence[torch.Tensor],
    ranks: Ranks,
    Q: torch.Tensor,
    width: int,
    *,
    power_iters: int = 2,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``width`` more orthonormal directions of the weighted stack's range, orthogonal to ``Q`` (…, d, ℓ).

    A blocked randomized range finder with power iterations (Martinsson & Voronin's
    randQB): each new block is a Gaussian sketch ``X Ω`` refined by
    ``(X Xᵀ)^power_iters`` with the known directions projected out, so a spectrum
    can be grown block by block at O(d n width) per pass; no n × n Gram is formed.
    Returns ``(Q_new (…, d, width), Xᵀ Q_new (…, n, width) in float64)``.
    """
    n = F.shape[-2]
    # Drawn on the CPU from a seeded generator, then moved: the same sketch on every device.
    g = torch.Generator().manual_seed(seed)
    omega = torch.randn(*F.shape[:-2], n, width, generator=g, dtype=F.dtype).to(F.device)
    Y = _x_times(F, W, ranks, omega)
    for _ in range(power_iters):
        Y = orthonormalize(_deflate(Q, Y))
        Y = _x_times(F, W, ranks, orthonormalize(_xt_times(F, W, ranks, Y).to(F.dtype)))
    # Twice: one projection leaves rounding-level components along Q when the block is nearly inside it.
    Y = orthonormalize(_deflate(Q, orthonormalize(_deflate(Q, Y))))
    return Y, _xt_times(F, W, ranks, Y)


def ritz_values(B: torch.Tensor) -> torch.Tensor:
    """Ritz values (descending) of the weighted Gram on the span of ``Q``, from ``B = Xᵀ Q`` (…, n, ℓ).

    By Cauchy interlacing the i-th is at most the i-th exact eigenvalue, so a
    threshold reached on them is reached by the exact spectrum too.
    """
    with _serial():
        w = torch.linalg.eigvalsh(B.transpose(-1, -2) @ B)
    return w.flip(-1).clamp_min(0)


def largest_saving_k(original_bytes: float, column_bytes: float) -> int:
    """The largest k whose basis and loadings take fewer bytes than the factors they replace.

    Per module and side, each component costs ``column_bytes``: one basis column
    (d values) and one loading row per adapter (n = Σ r_i values).  Past the
    break-even ``k·column_bytes ≥ original_bytes`` (``k·(d + n) ≥ d·n`` at equal
    value sizes) sharing costs more than it saves.  0 if no k saves.

    Example:
        >>> largest_saving_k(4 * 32 * 4096, 4 * (4096 + 32))  # d = 4096, n = 32, float32
        31
    """
    if not column_bytes > 0:
        raise ValueError(f"column_bytes={column_bytes!r}: expected a positive number of bytes")
    return max(0, math.ceil(original_bytes / column_bytes) - 1)


def threshold_bases(
    F: torch.Tensor,
    W: Sequence[torch.Tensor],
    ranks: Ranks,
    totals: torch.Tensor,
    threshold: float,
    k_max: Sequence[int],
    *,
    start: int = 32,
    oversample: int = 16,
    power_iters: int = 2,
    seed: int = 0,
    max_block: Optional[int] = None,
) -> Tuple[List[Optional[torch.Tensor]], List[Optional[torch.Tensor]], List[bool]]:
    """Per group (leading dim of ``F``): the smallest k keeping ``threshold`` of the energy, capped at ``k_max``.

    The spectrum is grown only as deep as the threshold needs: the block of
    :func:`extend_range` grows until the top Ritz values reach
    ``threshold·totals`` (the total energy is the Gram's trace, known up front)
    with ``oversample`` directions to spare, or until the cap.  The work is that
    of a fixed-k fit at the k found, instead of a cubic full ``eigh``.
    A group that would need a block wider than ``max_block`` (where a full
    ``eigh`` is cheaper) is given up: its basis and energies are ``None``.
    Returns ``(bases (d × k) per group, kept energies (k,) per group, capped per group)``.
    """
    G, n, d = F.shape[0], F.shape[-2], F.shape[-1]
    lim = min(n, d)
    caps = [max(1, min(int(c), lim)) for c in k_max]
    out_U: List[Optional[torch.Tensor]] = [None] * G
    out_kept: List[Optional[torch.Tensor]] = [None] * G
    out_capped = [False] * G
    active = list(range(G))
    Fa, Wa = F, list(W)
    Q = F.new_zeros(G, d, 0)
    B = torch.zeros(G, n, 0, dtype=torch.float64, device=F.device)
    ell = min(lim, start + oversample)
    rnd = 0
    while active:
        rnd += 1
        Qn, Bn = extend_range(Fa, Wa, ranks, Q, ell - Q.shape[-1], power_iters=power_iters, seed=seed + 7919 * rnd)
        Q, B = torch.cat([Q, Qn], -1), torch.cat([B, Bn], -1)
        evals = ritz_values(B)
        done, grow = [], []
        for j, g in enumerate(active):
            total = float(totals[g])
            cum = torch.cumsum(evals[j], 0)
            hit = torch.nonzero(cum >= (threshold - 1e-12) * total).flatten()
            k = 1 if total <= 0 else (int(hit[0]) + 1 if len(hit) else None)
            sure = ell >= lim or (k is not None and k <= ell - oversample)
            if k is not None and sure:
                done.append((j, g, min(k, caps[g]), k > caps[g]))
            elif ell >= min(lim, caps[g] + oversample):  # the cap is reached before the threshold
                done.append((j, g, caps[g], True))
            else:  # directions still needed if the rest were as large as the last reliable one (a lower bound)
                at = ell - oversample - 1
                short = threshold * total - float(cum[at])
                grow.append(math.ceil(short / max(float(evals[j, at]), 1e-300 * total + 1e-300)) + oversample)
        if done:
            with _serial():
                _, V = torch.linalg.eigh(B[[j for j, *_ in done]].transpose(-1, -2) @ B[[j for j, *_ in done]])
            V = V.flip(-1)
            for (j, g, k, capped), v in zip(done, V):
                out_U[g] = orthonormalize(Q[j] @ v[:, :k].to(Q.dtype))
                out_kept[g] = evals[j, :k]
                out_capped[g] = capped
        keep = [j for j in range(len(active)) if j not in {j for j, *_ in done}]
        if not keep:
            break
        if len(keep) < len(active):
            Fa, Wa, Q, B = Fa[keep], [w[keep] for w in Wa], Q[keep], B[keep]
        active = [active[j] for j in keep]
        # Grow by the estimate, and at least by half: geometric growth bounds the rounds.
        ell = min(lim, max(caps[g] for g in active) + oversample, ell + max(ell // 2, max(grow)))
        if max_block is not None and ell > max_block:
            break  # the rest are left to the caller's exact path
    return out_U, out_kept, out_capped


def spectrum_to_depth(
    F: torch.Tensor, W: Sequence[torch.Tensor], ranks: Ranks, depth: int, *,
    oversample: int = 16, power_iters: int = 2, seed: int = 0, basis: bool = False,
):
    """The top ``depth`` eigenvalues (…, depth) of the weighted Gram, as Ritz values of a randomized range.

    ``depth + oversample`` directions are found (all of them at ``min(n, d)``,
    where the result is exact); only the ``depth`` reliable ones are returned.
    With ``basis=True`` returns ``(evals, U)``: ``U[..., :k]`` (…, d, depth) is the
    top-k basis for every k ≤ depth, so a later fit at a chosen k costs nothing.
    """
    n, d = F.shape[-2], F.shape[-1]
    ell = min(n, d, depth + oversample)
    m = min(depth, ell)
    Q, B = extend_range(F, W, ranks, F.new_zeros(*F.shape[:-2], d, 0), ell, power_iters=power_iters, seed=seed)
    if not basis:
        return ritz_values(B)[..., :m]
    evals, V = top_eigh(B.transpose(-1, -2) @ B)
    return evals[..., :m], Q @ V[..., :m].to(Q.dtype)


def lossless_basis(F: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of every row of ``F``: with k ≥ n nothing is lost."""
    return _householder(F.transpose(-1, -2))


def project(U: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """Loadings ``Uᵀ Fᵀ`` (…, k, n): the coordinates of each factor row in the basis."""
    return U.transpose(-1, -2) @ F.transpose(-1, -2).to(U.dtype)


def reconstruct_rows(U: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Factor rows back from basis and loading: ``(U L)ᵀ`` (…, r, d), a transposed view.

    Computed as ``U @ L`` exactly like lorashare 0.1.x, so its checkpoints
    reconstruct bit-for-bit as they did there.
    """
    return (U.to(torch.float32) @ L.to(torch.float32)).transpose(-1, -2)


def explained_ratio(evals: torch.Tensor, k: int, total: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of the (weighted) energy that the top-k directions keep."""
    total = evals.sum(-1) if total is None else total
    kept = evals[..., :k].sum(-1)
    return torch.where(total > 0, kept / total.clamp_min(1e-300), torch.ones_like(kept))


def choose_k(evals: torch.Tensor, threshold: float) -> int:
    """Smallest k whose top-k energy is at least ``threshold`` of the total (1-D ``evals``)."""
    total = float(evals.sum())
    if total <= 0:
        return 1
    cum = torch.cumsum(evals.double(), 0) / total
    hit = torch.nonzero(cum >= threshold - 1e-12)
    return int(hit[0]) + 1 if len(hit) else int(evals.numel())


def water_fill(spectra: Sequence[torch.Tensor], costs: Sequence[int], budget: float, *, k_min: int = 1) -> List[int]:
    """Per-group k that keeps the most energy for a total cost of at most ``budget``.

    Group g's j-th direction keeps ``spectra[g][j]`` energy and costs
    ``costs[g]`` (its basis column plus one loading row per adapter).  Since each
    spectrum is non-increasing, taking directions greedily by energy per cost is
    optimal for this fractional knapsack up to one item.  Every group keeps at
    least ``k_min``.

    Example:
        >>> water_fill([torch.tensor([4., 1.]), torch.tensor([3., 2.])], [1, 1], 3)
        [1, 2]
    """
    ks = [min(k_min, int(s.numel())) for s in spectra]
    spent = sum(k * c for k, c in zip(ks, costs))
    cand = []
    for g, (s, c) in enumerate(zip(spectra, costs)):
        for j in range(ks[g], int(s.numel())):
            cand.append((float(s[j]) / c, g, j))
    cand.sort(key=lambda t: -t[0])
    for gain, g, j in cand:
        if gain <= 0:
            break
        if spent + costs[g] > budget:
            continue
        # spectra are sorted, so a group's candidates come in order j = ks[g], ks[g]+1, ...
        if j != ks[g]:
            continue
        ks[g] += 1
        spent += costs[g]
    return ks


#: Factors whose largest |value| lies within 2^±32 need no rescaling: their float32 Grams
#: (sums of d products) neither overflow nor lose a residual of 2^-24 of them to underflow.
_SAFE_EXPONENT = 32
_LOW, _HIGH = 2.0 ** -_SAFE_EXPONENT, 2.0 ** _SAFE_EXPONENT


def _peak(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``max(|X|, |Y|)`` over the last two dimensions: reductions only, no copy of the factors."""
    dims = (-1, -2)
    return torch.maximum(torch.maximum(X.amax(dims), Y.amax(dims)), torch.minimum(X.amin(dims), Y.amin(dims)).neg())


def _normalised(
    A: torch.Tensor, A_hat: torch.Tensor, B: torch.Tensor, B_hat: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Each side's pair scaled by an exact power of two so that its peak is ~1, with the sum ``e`` of
    the two exponents (per leading index), or the four as they were and ``None`` when every peak is
    within ``2^±32`` (the common case: a few reductions and one host sync).

    Scaling by 2^e is exact, so a residual ``A − Â`` keeps every bit (subnormals gain theirs).
    """
    if A.numel() == 0 or B.numel() == 0:
        return A, A_hat, B, B_hat, None
    peaks = torch.stack([_peak(A, A_hat), _peak(B, B_hat)]).double()
    if not bool(((peaks > _HIGH) | ((peaks < _LOW) & (peaks > 0))).any()):  # 0, Inf, NaN: left as they are
        return A, A_hat, B, B_hat, None
    e = torch.frexp(peaks).exponent
    e = torch.where(e.abs() > _SAFE_EXPONENT, e, torch.zeros_like(e))
    A, A_hat = (_times_pow2(x, -e[0]) for x in (A, A_hat))
    B, B_hat = (_times_pow2(x, -e[1]) for x in (B, B_hat))
    return A, A_hat, B, B_hat, e.sum(0)


def _times_pow2(X: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``X · 2^e`` per leading index, exact (two steps, so no factor leaves float32's range)."""
    half = torch.div(e, 2, rounding_mode="floor")
    for step in (half, e - half):
        X = X * torch.exp2(step.to(X.dtype))[..., None, None]
    return X


def _rescaled(err: torch.Tensor, orig: torch.Tensor, e: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`_normalised` on squared norms: both scale by ``2^(2e)`` (float64 holds it)."""
    if e is None:
        return err, orig
    scale = torch.exp2(2 * e.double())
    return err * scale, orig * scale


def delta_w_error_rows(
    FA: torch.Tensor,
    FB: torch.Tensor,
    FA_hat: torch.Tensor,
    FB_hat: torch.Tensor,
    GA: Optional[torch.Tensor] = None,
    GB: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(‖ΔW − ΔŴ‖², ‖ΔW‖²)`` for factors given as rows: ``ΔW = FBᵀ·FA``.

    ``FA``, ``F̂A`` are (…, r, d_in) (that is A) and ``FB``, ``F̂B`` (…, r, d_out)
    (that is Bᵀ).  The residual is ``FBᵀ·(FA−F̂A) + (FB−F̂B)ᵀ·F̂A``; every term of
    its squared norm holds a residual factor twice, so a tiny error is measured
    as tiny (no cancellation of large terms) even with float32 products; only
    r × r products are formed, and summed in float64.  ``GA = FA FAᵀ`` and
    ``GB = FB FBᵀ`` may be passed in when already known.

    Scale-invariant: a side whose values lie outside ``2^±32`` (factors at 1e-40 are float32
    subnormals, whose products underflow to 0; at 1e20 they overflow) is first scaled by an
    exact power of two, its Gram recomputed from the scaled rows (a passed one may have
    underflowed), and the results scaled back in float64.
    """
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    FA, FA_hat, FB, FB_hat, e = _normalised(FA, FA_hat, FB, FB_hat)
    if e is not None:  # the Grams passed in are of the unscaled factors (and may have underflowed)
        GA = GB = None
    RA, RB = FA - FA_hat, FB - FB_hat
    GB = (FB @ t(FB)).double() if GB is None else GB
    err = (
        ((RA @ t(RA)).double() * GB).sum((-1, -2))
        + 2 * ((FB @ t(RB)).double() * (RA @ t(FA_hat)).double()).sum((-1, -2))
        + ((FA_hat @ t(FA_hat)).double() * (RB @ t(RB)).double()).sum((-1, -2))
    ).clamp_min(0)
    orig = delta_w_sqnorm((FA @ t(FA)).double() if GA is None else GA, GB)
    return _rescaled(err, orig, e)


def delta_w_error(
    A: torch.Tensor, B: torch.Tensor, A_hat: torch.Tensor, B_hat: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(‖BA − B̂Â‖², ‖BA‖²)`` without forming the update; ``A`` is (…, r, d_in), ``B`` (…, d_out, r).

    Products run in float32, at any scale: factors of any float dtype are first scaled by an
    exact power of two into float32's comfortable range (see :func:`delta_w_error_rows`), so
    ``err / orig`` is the relative error at 1e-40 as at 1.

    Example:
        >>> A, B = torch.randn(4, 10), torch.randn(6, 4)
        >>> err, orig = delta_w_error(A, B, A, B)
        >>> float(err)
        0.0
    """
    t = lambda x: x.transpose(-1, -2).contiguous()  # noqa: E731
    # Scaled before the cast: float64 factors at 1e-50 would otherwise round to 0 in float32.
    A, A_hat, B, B_hat, e = _normalised(A, A_hat, B, B_hat)
    err, orig = delta_w_error_rows(A.float(), t(B.float()), A_hat.float(), t(B_hat.float()))
    return _rescaled(err, orig, e)


def delta_w_error_coords(
    GA: torch.Tensor,
    GB: torch.Tensor,
    QA: torch.Tensor,
    QB: torch.Tensor,
    LA: torch.Tensor,
    LB: torch.Tensor,
    SA: torch.Tensor,
    SB: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(‖ΔW − ΔŴ‖², ‖ΔW‖²)`` from coordinates only: O(k² r) instead of O(d k r).

    ``GA = A Aᵀ``, ``GB = BᵀB`` (r × r); ``QA = Uᵀ_A Aᵀ``, ``QB = Uᵀ_B B`` (k × r) are
    the exact coordinates, ``LA``, ``LB`` the stored (maybe rounded) loadings and
    ``SA = Uᵀ_A U_A``, ``SB`` (k × k) the stored bases' Grams.  It expands the
    square, so it loses precision when the error is below ~1e-3 of ‖ΔW‖: the
    caller re-measures those with :func:`delta_w_error_rows`.
    """
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    QA, QB, LA, LB, SA, SB = (x.double() for x in (QA, QB, LA, LB, SA, SB))
    HA = t(LA) @ SA @ LA
    HB = t(LB) @ SB @ LB
    cross = ((t(QB) @ LB) * (t(QA) @ LA)).sum((-1, -2))
    orig = delta_w_sqnorm(GA, GB)
    return (orig + delta_w_sqnorm(HA, HB) - 2 * cross).clamp_min(0), orig
