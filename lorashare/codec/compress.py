"""The compression pipeline: plan module groups, stream factors, fit bases, project.

"Plan, then apply": :func:`plan_groups` looks at headers only and buckets the
modules whose factors have the same shapes, so the math runs batched over many
modules at once (no per-module Python loop).  :func:`compress` then streams one
bounded chunk of modules at a time from disk, so peak memory is one chunk,
whatever the total adapter bytes.  The math itself is :mod:`lorashare.codec.subspace`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import AdapterError, ConfigError, StorageRangeError
from ..format.spec import CompressionSpec, check_number
from ..format.storage import (
    DTYPES,
    Stored,
    component_nbytes,
    header_nbytes,
    is_quantized,
    packed_entries,
    quantize,
    stored_entries,
    stored_nbytes,
)
from ..peft.adapters import MAX_FACTOR_ABS, Adapter
from ..utils.names import group_key
from . import subspace as S

logger = logging.getLogger(__name__)

__all__ = ["CompressOptions", "GroupPlan", "GroupResult", "plan_groups", "compress",
           "check_storable", "check_number", "files_overhead", "resolve_device"]



def check_storable(module: str, dtype: str, tensors: Sequence[Tuple[str, torch.Tensor]]) -> None:
    """Refuse loadings that rounding to the storage ``dtype`` made infinite: never store a non-finite value.

    ``tensors`` are ``(adapter name, loading already in dtype)``; the error names every adapter at fault.
    """
    bad = list(dict.fromkeys(name for name, t in tensors if not bool(torch.isfinite(t).all())))
    if not bad:
        return
    who = f"adapter {bad[0]!r}" if len(bad) == 1 else "adapters " + ", ".join(repr(n) for n in bad)
    if dtype == "float16":
        rule = (f"the loadings exceed float16's range (largest finite value {torch.finfo(torch.float16).max:g}), "
                "so they would be stored as Inf")
        problem = f"{who}, module {module}: {rule}."
        raise StorageRangeError(f"{problem} Compress with dtype='float32' or 'bfloat16', which hold the range.",
                                dtype=dtype, adapter=bad[0], layer=module, problem=problem)
    else:
        rule = f"the loadings are not finite in {dtype} (the factors are too large)"
        fix = "Check the adapter's factors (diverged training?) and retrain or rescale it."
    raise AdapterError(f"{who}, module {module}: {rule}. {fix}", adapter=bad[0], layer=module)


@dataclass(frozen=True)
class CompressOptions:
    """One compression run: the :class:`~lorashare.format.spec.CompressionSpec`, plus how the work runs.

    ``budget_bytes`` is the spec's byte budget resolved for these adapters (a ``target_ratio``
    becomes bytes); the rest never changes the result, only where and how it is computed.
    """

    spec: CompressionSpec = field(default_factory=CompressionSpec)
    budget_bytes: Optional[int] = None
    device: Optional[str] = None
    progress: bool = True
    chunk_bytes: int = 32 * 1024 * 1024  # raw factors per batch: peak memory is a few times this
    power_iters: int = 2

    # The spec's settings, read where the pipeline needs them (the spec stays their one owner).
    @property
    def num_components(self) -> Union[int, str]:
        return self.spec.num_components

    @property
    def variance_threshold(self) -> float:
        return self.spec.variance_threshold

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def weighting(self) -> str:
        return self.spec.weighting


@dataclass
class GroupPlan:
    """One module: which adapters have it, with which ranks, and its shape."""

    module: str
    members: List[int]  # indices into the adapter list
    ranks: Tuple[int, ...]
    d_in: int
    d_out: int

    @property
    def n(self) -> int:
        return sum(self.ranks)

    def nbytes(self) -> int:
        return 4 * self.n * (self.d_in + self.d_out)


@dataclass
class GroupResult:
    """What compression produced for one module."""

    plan: GroupPlan
    basis: Dict[str, torch.Tensor]  # side -> (d × k)
    loadings: Dict[str, List[torch.Tensor]]  # side -> per member (k × r_i)
    explained: Dict[str, float]  # side -> kept share of ΔW energy
    rel_error: List[float]  # per member: ‖ΔW − ΔŴ‖ / ‖ΔW‖
    capped: Tuple[str, ...] = ()  # sides whose k stopped at the break-even (auto and budget modes)
    # Quantized schemes: the stored forms (basis and loadings above are their dequantized floats).
    stored_basis: Dict[str, Stored] = field(default_factory=dict)
    stored_loadings: Dict[str, List[Stored]] = field(default_factory=dict)


def plan_groups(adapters: Sequence[Adapter]) -> List[GroupPlan]:
    """Group every LoRA module across adapters (headers only, nothing read)."""
    plans: Dict[str, GroupPlan] = {}
    for i, a in enumerate(adapters):
        for m in a.modules.values():
            p = plans.get(m.module)
            if p is None:
                plans[m.module] = GroupPlan(m.module, [i], (m.rank,), m.d_in, m.d_out)
            else:
                p.members.append(i)
                p.ranks = p.ranks + (m.rank,)
    return [plans[k] for k in sorted(plans)]


def _chunks(
    plans: Sequence[GroupPlan], chunk_bytes: int, where: Optional[List[GroupPlan]] = None
) -> Iterator[List[GroupPlan]]:
    """Batches of same-shape groups, each at most ``chunk_bytes`` of raw factors (or one group).

    ``where`` is set to the batch being yielded, so an error can name its modules.
    """
    buckets: Dict[tuple, List[GroupPlan]] = {}
    for p in plans:
        buckets.setdefault((p.d_in, p.d_out, p.ranks), []).append(p)
    for group in buckets.values():
        per = max(1, chunk_bytes // max(1, group[0].nbytes()))
        for at in range(0, len(group), per):
            chunk = group[at : at + per]
            if where is not None:
                where[:] = chunk
            yield chunk


def _read_chunk(chunk: Sequence[GroupPlan], adapters: Sequence[Adapter]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factor stacks ``F_A`` (G, n, d_in) and ``F_B`` (G, n, d_out), in float32.

    Each adapter's tensors for the whole chunk are read together (coalesced
    spans), then copied into place; B is stored transposed, as rows.
    """
    p0 = chunk[0]
    FA = torch.empty(len(chunk), p0.n, p0.d_in, dtype=torch.float32)
    FB = torch.empty(len(chunk), p0.n, p0.d_out, dtype=torch.float32)
    wanted: Dict[int, List[str]] = {}
    for p in chunk:
        for idx in p.members:
            info = adapters[idx].modules[p.module]
            wanted.setdefault(idx, []).extend((info.a_key, info.b_key))
    read = {idx: adapters[idx]._tf().get_many(keys) for idx, keys in wanted.items()}
    for g, p in enumerate(chunk):
        infos = [(read[idx], adapters[idx].modules[p.module]) for idx in p.members]
        # One cat per group and side: far cheaper than a slice assignment per tensor.
        torch.cat([t[i.a_key].float() for t, i in infos], 0, out=FA[g])
        torch.cat([t[i.b_key].float().T for t, i in infos], 0, out=FB[g])
    del read
    # One cheap reduction per side catches NaN/Inf (they propagate) and factors so large that
    # float32 products overflow; read_factor then names the culprit.
    if not (_in_range(FA) and _in_range(FB)):
        _raise_non_finite(chunk, adapters)  # re-read per tensor to name the culprit
    return FA, FB


def _in_range(F: torch.Tensor) -> bool:
    if F.numel() == 0:
        return True
    lo, hi = torch.aminmax(F)
    return bool(-MAX_FACTOR_ABS <= float(lo)) and bool(float(hi) <= MAX_FACTOR_ABS)


def _raise_non_finite(chunk: Sequence[GroupPlan], adapters: Sequence[Adapter]) -> None:
    for p in chunk:
        for idx in p.members:
            for side in "AB":
                adapters[idx].read_factor(p.module, side)  # raises, naming adapter and layer


#: Factors whose peak is outside 2^±32 are rescaled before their Grams, which would under- or overflow.
_SAFE_EXPONENT = 32


def _grams_out_of_range(GA: Sequence[torch.Tensor], GB: Sequence[torch.Tensor]) -> bool:
    """Whether some member's Gram (r × r) is tiny, zero, huge or not finite: then its factors need :func:`_rescale`.

    The Grams are computed anyway, so the common case costs a few small reductions: a member's
    largest squared row norm within 2^±64 is exact enough in float32.
    """
    grams = (*GA, *GB)
    if not grams:
        return False
    d = torch.stack([torch.diagonal(g, dim1=-2, dim2=-1).amax(-1) for g in grams])  # (2N, G): one host sync below
    return not bool(((d >= 2.0 ** -(2 * _SAFE_EXPONENT)) & (d <= 2.0 ** (2 * _SAFE_EXPONENT))).all())


def _rescale(FA: torch.Tensor, FB: torch.Tensor, ranks: Tuple[int, ...], weighting: str
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Factor stacks scaled by exact powers of two so that Grams neither underflow nor overflow.

    Returns ``(FA, FB, e)`` with ``e`` (G, members, 2) the exponents each member's A and B rows
    were divided by (``None``, and the stacks untouched, in the common case: a few reductions).
    With ΔW weighting each member is scaled on its own (the fit normalises every adapter, so the
    bases do not change); the plain factor PCA weighs adapters by their size, so there one scale
    per group keeps it.
    """
    if FA.numel() == 0:
        return FA, FB, None
    bounds = [0, *torch.tensor(ranks).cumsum(0).tolist()]
    rows = [torch.linalg.vector_norm(F, ord=math.inf, dim=-1) for F in (FA, FB)]  # (G, n): max |x| per row, no copy of F
    peaks = torch.stack([torch.stack([R[:, a:b].amax(-1) for a, b in zip(bounds, bounds[1:])], -1)
                         for R in rows], -1).double()  # (G, members, 2)
    if weighting != "delta_w":
        peaks = peaks.amax(1, keepdim=True).expand_as(peaks)
    tiny_or_huge = ((peaks > 2.0 ** _SAFE_EXPONENT) | ((peaks < 2.0 ** -_SAFE_EXPONENT) & (peaks > 0)))
    if not bool(tiny_or_huge.any()):
        return FA, FB, None
    e = torch.where(tiny_or_huge, torch.frexp(peaks).exponent, torch.zeros_like(peaks, dtype=torch.int32))
    rows = torch.repeat_interleave(e, torch.tensor(ranks), dim=1)  # (G, n, 2): one exponent per factor row
    return _pow2(FA, -rows[..., 0]), _pow2(FB, -rows[..., 1]), e


def _pow2(F: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``F · 2^e`` per (group, row), exact: two steps, so that no factor leaves float32's range."""
    half = torch.div(e, 2, rounding_mode="floor")
    for step in (half, e - half):
        F = F * torch.exp2(step.to(F.dtype)).to(F.device)[..., None]
    return F


def _unscale(results: Sequence["GroupResult"], e: Optional[torch.Tensor]) -> None:
    """Give each member's loadings back the scale :func:`_rescale` took from its factors."""
    if e is None:
        return
    for g, r in enumerate(results):
        for side, col in (("A", 0), ("B", 1)):
            for j in range(len(r.plan.members)):
                shift = int(e[g, j, col])
                if shift == 0:
                    continue
                factor = torch.tensor(float(shift), dtype=torch.float64)
                r.loadings[side][j] = _pow2(r.loadings[side][j][None].float(), factor.expand(1, 1).int())[0].to(
                    r.loadings[side][j].dtype)
                if side in r.stored_loadings:
                    st = r.stored_loadings[side][j]
                    scale = _pow2(st.scale[None, :, None], factor.expand(1, st.scale.numel()).int())[0, :, 0]
                    r.stored_loadings[side][j] = dataclasses.replace(st, scale=scale)
                    r.loadings[side][j] = r.stored_loadings[side][j].dequantize()


def _remeasure(results: Sequence["GroupResult"], FA: torch.Tensor, FB: torch.Tensor) -> None:
    """Each member's ΔW error measured on its own factors (scale-invariant), where one scale per
    group would let a small adapter's Gram underflow next to a large one."""
    for g, r in enumerate(results):
        bounds = [0, *torch.tensor(r.plan.ranks).cumsum(0).tolist()]
        UA, UB = r.basis["A"].float().to(FA.device), r.basis["B"].float().to(FA.device)
        for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
            A, B = FA[g, a:b], FB[g, a:b].T
            A_hat = (UA @ r.loadings["A"][j].float().to(FA.device)).T
            B_hat = UB @ r.loadings["B"][j].float().to(FA.device)
            err, orig = S.delta_w_error(A, B, A_hat, B_hat)
            r.rel_error[j] = 0.0 if float(orig) == 0 else float((err / orig).sqrt())


def _fit_side(
    F: torch.Tensor, W: List[torch.Tensor], ranks: Tuple[int, ...], k: Optional[int], opts: CompressOptions, seed: int
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Basis (G, d, k) and kept energies (G, k) for one side; ``k=None``: only the full spectrum.

    Returns ``(U, kept, evals_or_None)``.  The solver follows the cost model:
    k ≥ n is lossless (QR of the factors); a full ``eigh`` of the n × n Gram
    when the spectrum is wanted or n is small; subspace iteration on the Gram
    while forming it (O(d n²)) is cheap; a randomized range finder on the
    stack itself (O(d n k) per pass) for very wide stacks.
    """
    n, d = F.shape[-2], F.shape[-1]
    if k is not None and k >= min(n, d):
        U = S.lossless_basis(F)
        return U, torch.full(U.shape[:-2] + (U.shape[-1],), float("nan"), dtype=torch.float64), None
    ell = k + 16 if k is not None else n
    if k is not None and n > 6 * ell:
        U, kept = S.randomized_basis(F, W, ranks, k, power_iters=opts.power_iters, seed=seed)
        return U, kept, None
    if k is not None and n > 1.5 * ell:
        evals, V = S.gram_subspace(S.weighted_gram(F, W, ranks, torch.float32), k, seed=seed)
        return S.basis_from_eigh(F, W, ranks, V, evals, k), evals.double(), None
    evals, V = S.top_eigh(S.weighted_gram(F, W, ranks))
    if k is None:
        return None, None, evals  # type: ignore[return-value]
    return S.basis_from_eigh(F, W, ranks, V, evals, k), evals[..., :k], evals


def _coord_errors(QA, QB, LA, LB, UAf, UBf, GA, GB, ranks):
    """Per-member ``(err², ‖ΔW‖²)`` (G, N) from coordinates (see ``subspace.delta_w_error_coords``)."""
    t = lambda x: x.transpose(-1, -2)  # noqa: E731
    SA, SB = t(UAf) @ UAf, t(UBf) @ UBf
    r = ranks[0] if len(set(ranks)) == 1 else None
    if r is not None:
        blk = lambda x: x.unflatten(-1, (len(ranks), r)).movedim(-2, -3)  # noqa: E731  (G, N, k, r)
        return S.delta_w_error_coords(
            torch.stack(GA, -3), torch.stack(GB, -3), blk(QA), blk(QB), blk(LA), blk(LB), SA[:, None], SB[:, None])
    pairs = [
        S.delta_w_error_coords(ga, gb, QA[..., sl], QB[..., sl], LA[..., sl], LB[..., sl], SA, SB)
        for sl, ga, gb in zip(S._blocks(ranks), GA, GB)
    ]
    return torch.stack([p[0] for p in pairs], -1), torch.stack([p[1] for p in pairs], -1)


def _stored_errors(FA, FB, UA_s, UB_s, LA, LB, GA, GB, ranks, work_bytes: int):
    """Per-member ``(‖ΔW − ΔŴ‖², ‖ΔW‖²)`` (G, N) for what is stored, a few adapters at a time.

    Reconstructing every factor at once would hold several copies of the chunk;
    slicing by adapters keeps the temporaries within ``work_bytes``.
    """
    G, d_in, d_out = FA.shape[0], FA.shape[-1], FB.shape[-1]
    r = ranks[0] if len(set(ranks)) == 1 else None
    if r is None:  # mixed ranks: one adapter at a time
        pairs = []
        for sl in S._blocks(ranks):
            pairs.append(S.delta_w_error_rows(
                FA[..., sl, :], FB[..., sl, :], S.reconstruct_rows(UA_s, LA[..., sl]), S.reconstruct_rows(UB_s, LB[..., sl])))
        return torch.stack([p[0] for p in pairs], -1), torch.stack([p[1] for p in pairs], -1)
    N = len(ranks)
    per = max(1, work_bytes // max(1, 4 * 4 * G * r * (d_in + d_out)))  # ~4 temporaries per factor row
    gA, gB = torch.stack(GA, -3), torch.stack(GB, -3)
    errs, origs = [], []
    for i0 in range(0, N, per):
        i1 = min(N, i0 + per)
        sl = slice(i0 * r, i1 * r)
        blk = lambda t, m=i1 - i0: t.unflatten(-2, (m, r))  # noqa: E731  (G, m, r, d)
        e, o = S.delta_w_error_rows(
            blk(FA[..., sl, :]), blk(FB[..., sl, :]),
            blk(S.reconstruct_rows(UA_s, LA[..., sl])), blk(S.reconstruct_rows(UB_s, LB[..., sl])),
            gA[..., i0:i1, :, :], gB[..., i0:i1, :, :],
        )
        errs.append(e)
        origs.append(o)
    return torch.cat(errs, -1), torch.cat(origs, -1)


def _members_split(L: torch.Tensor, ranks: Tuple[int, ...]) -> List[torch.Tensor]:
    return list(torch.split(L, list(ranks), dim=-1))


def _finish_chunk(
    chunk: Sequence[GroupPlan],
    FA: torch.Tensor,
    FB: torch.Tensor,
    GA: List[torch.Tensor],
    GB: List[torch.Tensor],
    sq: List[torch.Tensor],
    UA: torch.Tensor,
    UB: torch.Tensor,
    totals: Dict[str, torch.Tensor],
    kept: Dict[str, torch.Tensor],
    scheme: str,
    work_bytes: int = 16 * 1024 * 1024,
) -> List[GroupResult]:
    """Project onto the bases, round to the storage scheme, and measure the ΔW error of what is stored."""
    ranks = chunk[0].ranks
    stored_b: Dict[str, List[Stored]] = {}
    stored_l: Dict[str, List[List[Stored]]] = {}
    if is_quantized(scheme):
        (UA_s, stored_b["A"]), (UB_s, stored_b["B"]) = _store_bases(UA, scheme), _store_bases(UB, scheme)
        UAf, UBf = UA_s, UB_s
        QA, QB = S.project(UAf, FA), S.project(UBf, FB)  # exact coordinates (G, k, n) on the stored bases
        (LA, stored_l["A"]), (LB, stored_l["B"]) = _store_loadings(QA, ranks, scheme), _store_loadings(QB, ranks, scheme)
    else:
        dtype = DTYPES[scheme]
        UA_s, UB_s = UA.to(dtype), UB.to(dtype)
        UAf, UBf = UA_s.float(), UB_s.float()
        QA, QB = S.project(UAf, FA), S.project(UBf, FB)  # exact coordinates (G, k, n)
        LA, LB = QA.to(dtype), QB.to(dtype)
    err, orig = _coord_errors(QA, QB, LA, LB, UAf, UBf, GA, GB, ranks)
    # Expanding the square loses precision for tiny errors: measure those groups on the residual.
    redo = ((err < 1e-4 * orig) & (orig > 0)).any(-1).nonzero().flatten().tolist()
    for g in redo:
        sl = slice(g, g + 1)
        e, o = _stored_errors(FA[sl], FB[sl], UA_s[sl], UB_s[sl], LA[sl], LB[sl],
                              [x[sl] for x in GA], [x[sl] for x in GB], ranks, work_bytes)
        err[g], orig[g] = e[0], o[0]
    la, lb = _members_split(LA, ranks), _members_split(LB, ranks)
    rel = torch.where(orig > 0, (err / orig.clamp_min(1e-300)).sqrt(), torch.zeros_like(err))
    out = []
    for g, p in enumerate(chunk):
        expl = {}
        for side in "AB":
            kk = kept[side][g]
            tot = float(totals[side][g])
            expl[side] = 1.0 if (tot <= 0 or bool(torch.isnan(kk).any())) else min(1.0, float(kk.sum()) / tot)
        out.append(
            GroupResult(
                plan=p,
                basis={"A": UA_s[g].contiguous(), "B": UB_s[g].contiguous()},
                loadings={"A": [t[g].contiguous() for t in la], "B": [t[g].contiguous() for t in lb]},
                explained=expl,
                rel_error=[float(x) for x in rel[g]],
                stored_basis={s: b[g] for s, b in stored_b.items()},
                stored_loadings={s: ls[g] for s, ls in stored_l.items()},
            )
        )
    return out


def _store_bases(U: torch.Tensor, scheme: str) -> Tuple[torch.Tensor, List[Stored]]:
    """Quantize each basis (G, d, k): the stored forms, and their dequantized floats on U's device."""
    stored = [quantize(U[g].cpu(), scheme, transposed=True) for g in range(U.shape[0])]
    return torch.stack([s.dequantize(U.device) for s in stored]), stored


def _store_loadings(Q: torch.Tensor, ranks: Tuple[int, ...], scheme: str) -> Tuple[torch.Tensor, List[List[Stored]]]:
    """Quantize each member's loading (k × r_i) of coordinates Q (G, k, n): dequantized floats, stored forms."""
    Qc = Q.cpu()
    stored = [[quantize(Qc[g, :, sl], scheme) for sl in S._blocks(ranks)] for g in range(Q.shape[0])]
    deq = torch.stack([torch.cat([s.dequantize() for s in row], -1) for row in stored]).to(Q.device)
    return deq, stored


def _weights(FA: torch.Tensor, FB: torch.Tensor, ranks: Tuple[int, ...], weighting: str = "delta_w"):
    GA = S.factor_gram(FA, ranks)
    GB = S.factor_gram(FB, ranks)
    WA, WB, sq = S.side_weights(GA, GB)
    if weighting == "factors":  # the plain factor PCA of the paper (uncentred), for comparison
        WA = [torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g) for g in GA]
        WB = [torch.eye(g.shape[-1], dtype=g.dtype, device=g.device).expand_as(g) for g in GB]
    # Total weighted energy of each side: Σ_i tr(Wᵢᵀ Gᵢ Wᵢ) (= number of non-zero ΔW_i).
    tot_A = sum((g * (w @ w.transpose(-1, -2))).sum((-1, -2)) for w, g in zip(WA, GA))
    tot_B = sum((g * (w @ w.transpose(-1, -2))).sum((-1, -2)) for w, g in zip(WB, GB))
    return GA, GB, WA, WB, sq, {"A": tot_A, "B": tot_B}


#: Up to this many factor rows (n = Σ r_i) a side's full spectrum is one cheap ``eigh``; above, it is grown.
EXACT_SPECTRUM_ROWS = 256


#: Budget mode keeps pass 1's bases for pass 2 up to this many bytes (beyond, pass 2 fits again).
KEEP_BASES_BYTES = 1 << 30


def _spectra(
    adapters: Sequence[Adapter], plans: Sequence[GroupPlan], opts: CompressOptions, depth: Dict[str, int], bar,
    where: Optional[List[GroupPlan]] = None, bases: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
) -> Dict[str, torch.Tensor]:
    """Top ``depth[key]`` eigenvalues of every (module, side)'s weighted Gram: pass 1 of the budget mode.

    Small stacks get the full spectrum from one ``eigh``; larger ones only the
    partial spectrum that the budget can reach (:func:`subspace.spectrum_to_depth`),
    whose bases go into ``bases`` (on the CPU, within ``KEEP_BASES_BYTES``) for pass 2.
    """
    out: Dict[str, torch.Tensor] = {}
    seed = 0
    for chunk in _chunks(plans, opts.chunk_bytes, where):
        FA, FB = _read_chunk(chunk, adapters)
        if opts.device:
            FA, FB = FA.to(opts.device), FB.to(opts.device)
        ranks = chunk[0].ranks
        GA, GB, WA, WB, _, _ = _weights(FA, FB, ranks, opts.weighting)
        if _grams_out_of_range(GA, GB):  # spectra only: no loadings to scale back
            FA, FB, shifts = _rescale(FA, FB, ranks, opts.weighting)
            if shifts is not None:
                _, _, WA, WB, _, _ = _weights(FA, FB, ranks, opts.weighting)
        for side, F, W in (("A", FA, WA), ("B", FB, WB)):
            seed += 1
            n, d = F.shape[-2], F.shape[-1]
            want = max(depth[group_key(p.module, side)] for p in chunk)
            if n <= EXACT_SPECTRUM_ROWS or _exact_cheaper(n, d, want + 16, vectors=False):
                # float32 is plenty to rank directions for the allocation, and twice as fast
                evals, _, _ = _exact_spectrum(F, W, ranks, torch.float32, vectors=False)
            else:
                evals, U = S.spectrum_to_depth(F, W, ranks, want, power_iters=opts.power_iters, seed=seed, basis=True)
                if bases is not None:
                    held = sum(b.numel() * b.element_size() for b, _ in bases.values())
                    for g, p in enumerate(chunk):
                        if held + U[g].numel() * U[g].element_size() <= KEEP_BASES_BYTES:
                            bases[group_key(p.module, side)] = (U[g].cpu(), evals[g].cpu())
                            held += U[g].numel() * U[g].element_size()
            for g, p in enumerate(chunk):
                out[group_key(p.module, side)] = evals[g].cpu()
        if bar is not None:
            bar.update(len(chunk))
    return out


def _exact_cheaper(n: int, d: int, ell: int, vectors: bool = True) -> bool:
    """Whether a full ``eigh`` on the small side beats a randomized range ``ell`` wide.

    Rough flop counts: the Gram (d·m², m = min(n, d)) plus an ``eigh`` (~10·m³ with
    vectors, ~2·m³ for values only, weighted for LAPACK's lower speed) against ~8
    passes over the stack (d·n·ℓ each) plus the orthonormalisations (~6·d·ℓ²).
    """
    m = min(n, d)
    return d * m * m + (10 if vectors else 2) * m**3 < 8 * d * n * ell + 6 * d * ell * ell


def _exact_spectrum(
    F: torch.Tensor, W: List[torch.Tensor], ranks: Tuple[int, ...], dtype: torch.dtype, vectors: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """Full spectrum of the weighted Gram on the stack's small side: ``(evals, V or None, on_range_side)``.

    For n ≤ d the n × n Gram (vectors: coordinates for :func:`subspace.basis_from_eigh`);
    for n > d the d × d one, whose vectors are the basis itself.
    """
    n, d = F.shape[-2], F.shape[-1]
    K = S.weighted_gram(F, W, ranks, dtype) if n <= d else S.range_gram(F, W, ranks, dtype)
    if not vectors:
        return S.top_eigvals(K), None, n > d
    evals, V = S.top_eigh(K)
    return evals, V, n > d


def _column_bytes(scheme: str, d: int, ranks: Sequence[int]) -> float:
    """Bytes of one more component of a side: a basis column of d values and one loading row per adapter."""
    return component_nbytes(scheme, d) + sum(component_nbytes(scheme, r) for r in ranks)


def _caps(adapters: Sequence[Adapter], plans: Sequence[GroupPlan], scheme: str) -> Dict[str, int]:
    """Per (module, side): the largest k whose bases + loadings stay smaller than the factors they replace.

    The factors are counted at their own size on disk (float16 adapters are half the
    bytes of float32 ones), the components at the storage scheme's.
    """
    caps: Dict[str, int] = {}
    for p in plans:
        for side, d in (("A", p.d_in), ("B", p.d_out)):
            original = 0
            for i in p.members:
                info = adapters[i].modules[p.module]
                original += adapters[i]._tf().infos[info.a_key if side == "A" else info.b_key].nbytes
            caps[group_key(p.module, side)] = S.largest_saving_k(original, _column_bytes(scheme, d, p.ranks))
    return caps


def _budget_ks(
    adapters: Sequence[Adapter], plans: Sequence[GroupPlan], opts: CompressOptions, caps: Dict[str, int],
    budget: float, bar, where: List[GroupPlan], bases: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
) -> Tuple[Dict[str, int], List[str], float]:
    """k per (module, side) by water-filling the budget over partial spectra, never past the break-even.

    The spectra are computed only as deep as the budget reaches: a first depth from
    the budget's average k, then a module side whose every computed direction was
    bought is deepened (twice as deep) and the filling redone.  A direction that
    was not computed is worth at most the smallest computed one, so once no side is
    exhausted the allocation is the one the full spectra would give.
    Returns ``(k per key, keys capped with budget to spare, bytes spent)``; ``bases`` receives
    the partial spectra's bases (top directions first), which pass 2 reuses.
    """
    keys, costs, lims, lossless = [], [], {}, {}
    for p in plans:
        for side, d in (("A", p.d_in), ("B", p.d_out)):
            key = group_key(p.module, side)
            keys.append(key)
            costs.append(_column_bytes(opts.dtype, d, p.ranks))
            lossless[key] = min(p.n, d)
            lims[key] = max(1, min(caps[key], lossless[key]))
    mean_k = budget / max(1.0, sum(costs))
    depth = {key: min(lims[key], max(16, math.ceil(2 * mean_k))) for key in keys}
    spectra: Dict[str, torch.Tensor] = {}
    todo = list(plans)
    while True:
        spectra.update(_spectra(adapters, todo, opts, depth, bar, where, bases))
        specs = [spectra[key][: lims[key]] for key in keys]
        ks = S.water_fill(specs, costs, budget)
        deepen = {key for key, k, sp in zip(keys, ks, specs) if k == len(sp) < lims[key]}
        if not deepen:
            break
        for key in deepen:
            depth[key] = min(lims[key], 2 * depth[key])
        todo = [p for p in plans if group_key(p.module, "A") in deepen or group_key(p.module, "B") in deepen]
        logger.debug("budget: deepening the spectra of %d module sides", len(deepen))
    ks = _fit_exact_bytes(plans, specs, ks, opts.dtype, budget)  # quantized storage rounds up per tensor
    spent = sum(_group_nbytes(p, side, k, opts.dtype) for (p, side), k in zip(((p, s) for p in plans for s in "AB"), ks))
    # Capped: stopped at the break-even while the budget could buy another direction.
    capped = [key for key, k, c in zip(keys, ks, costs) if k == caps[key] < lossless[key] and spent + c <= budget]
    return dict(zip(keys, ks)), capped, spent


def _auto_side(
    F: torch.Tensor, W: List[torch.Tensor], ranks: Tuple[int, ...], total: torch.Tensor, caps: Sequence[int],
    opts: CompressOptions, seed: int,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[bool]]:
    """``num_components="auto"``: per group, the smallest k keeping ``variance_threshold``, capped at break-even.

    Small stacks: one ``eigh`` whose vectors also give the basis.  Larger ones: the
    spectrum is grown only as deep as the threshold needs (:func:`subspace.threshold_bases`).
    Returns ``(bases, kept energies, capped)`` per group.
    """
    G, n, d = F.shape[0], F.shape[-2], F.shape[-1]
    Us: List[Optional[torch.Tensor]] = [None] * G
    kept: List[Optional[torch.Tensor]] = [None] * G
    capped = [False] * G
    if n > EXACT_SPECTRUM_ROWS:
        # Grow while that is cheaper than the exact path; what is left goes there.
        widest = 16
        while widest < min(n, d) and not _exact_cheaper(n, d, 2 * widest):
            widest *= 2
        Us, kept, capped = S.threshold_bases(F, W, ranks, total, opts.variance_threshold, caps,
                                             power_iters=opts.power_iters, seed=seed, max_block=widest)
    rest = [g for g in range(G) if Us[g] is None]
    if rest:
        Fr, Wr = F[rest], [w[rest] for w in W]
        evals, V, range_side = _exact_spectrum(Fr, Wr, ranks, torch.float64, vectors=True)
        for j, g in enumerate(rest):
            k = S.choose_k(evals[j], opts.variance_threshold)
            capped[g] = k > max(1, caps[g])
            k = min(k, max(1, caps[g]))
            if range_side:
                Us[g] = V[j, :, :k].to(F.dtype).contiguous()
            else:
                Us[g] = S.basis_from_eigh(Fr[j : j + 1], [w[j : j + 1] for w in Wr], ranks, V[j : j + 1], evals[j : j + 1], k)[0]
            kept[g] = evals[j, :k]
    return Us, kept, capped  # type: ignore[return-value]


def _note_capped(plans: Sequence[GroupPlan], k: int) -> None:
    """An info line when a fixed k is more than every module side needs to be lossless (N·r, or d), so it is cut.

    The record carries ``lorashare_note="k_capped"``: a front that says it in its own words keeps it off its terminal.
    """
    lossless = [min(p.n, d) for p in plans for d in (p.d_in, p.d_out)]
    most = max(lossless, default=0)
    if most and k > most:
        using = f"k={most}" if min(lossless) == most else f"each module's lossless k (at most {most})"
        logger.info("num_components=%d is more than the %d components these adapters need to be lossless (k = N·r, "
                    "their ranks summed); using %s.", k, most, using, extra={"lorashare_note": "k_capped"})


def _warn_capped(capped: Sequence[str], total: int, why: str) -> None:
    if capped:
        shown = ", ".join(capped[:8]) + (f" and {len(capped) - 8} more" if len(capped) > 8 else "")
        logger.warning(
            "%d of %d module sides stopped at the break-even k (%s): beyond it their bases and loadings would "
            "take more bytes than the factors they replace. Capped: %s.", len(capped), total, why, shown)


def compress(
    adapters: Sequence[Adapter], opts: CompressOptions, plans: Optional[Sequence[GroupPlan]] = None
) -> List[GroupResult]:
    """Fit one basis per module and side, and every adapter's loadings.

    Example:
        >>> results = compress(open_adapters(["a", "b"]), CompressOptions(CompressionSpec(num_components=8)))  # doctest: +SKIP
    """
    where: List[GroupPlan] = []  # the batch of modules being fitted
    try:
        return _compress(adapters, opts, plans, where)
    except torch.linalg.LinAlgError as exc:  # a last line of defence: read_factor's range check comes first
        raise _linalg_error(exc, where, adapters) from None


def _linalg_error(exc: Exception, where: Sequence[GroupPlan], adapters: Sequence[Adapter]) -> AdapterError:
    """Name the module(s) and adapters whose factors made torch.linalg fail."""
    module = where[0].module if where else "?"
    more = f" (fitted together with {len(where) - 1} other modules of the same shape)" if len(where) > 1 else ""
    names = sorted({adapters[i].name for p in where for i in p.members})
    why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return AdapterError(
        f"module {module}{more}: the linear algebra failed on the factors of adapters {names} ({why}). "
        "Their values are extreme or degenerate (diverged training?): check those adapters' factors for this "
        "module, and compress without the one at fault.",
        adapter=names[0] if len(names) == 1 else None,
        layer=module if where else None,
    )


def _compress(
    adapters: Sequence[Adapter], opts: CompressOptions, plans: Optional[Sequence[GroupPlan]], where: List[GroupPlan]
) -> List[GroupResult]:
    plans = list(plans) if plans is not None else plan_groups(adapters)
    scheme = opts.dtype
    bar = _progress(opts, len(plans) * (2 if opts.budget_bytes else 1))

    fixed_k: Dict[str, int] = {}
    capped: Dict[str, bool] = {}
    pass1_bases: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (basis, its energies)
    caps = _caps(adapters, plans, scheme) if (opts.budget_bytes is not None or opts.num_components == "auto") else {}
    if opts.budget_bytes is not None:
        overhead = files_overhead(plans, [a.name for a in adapters], scheme)
        fixed_k, hit, spent = _budget_ks(adapters, plans, opts, caps, max(0, opts.budget_bytes - overhead), bar, where,
                                         pass1_bases)
        capped = dict.fromkeys(hit, True)
        spent += overhead
        if spent > opts.budget_bytes:
            logger.warning("budget of %d bytes is below one component per module; using %d bytes", opts.budget_bytes, spent)
        _warn_capped(hit, 2 * len(plans), "the budget could buy more")

    elif opts.num_components != "auto":
        _note_capped(plans, int(opts.num_components))

    results: List[GroupResult] = []
    seed = 0
    for chunk in _chunks(plans, opts.chunk_bytes, where):
        FA, FB = _read_chunk(chunk, adapters)
        if opts.device:
            FA, FB = FA.to(opts.device), FB.to(opts.device)
        ranks = chunk[0].ranks
        raw, shifts = (FA, FB), None
        GA, GB, WA, WB, sq, totals = _weights(FA, FB, ranks, opts.weighting)
        if _grams_out_of_range(GA, GB):  # rare: factors so small or large that their Grams lost precision
            FA, FB, shifts = _rescale(FA, FB, ranks, opts.weighting)
            if shifts is not None:
                GA, GB, WA, WB, sq, totals = _weights(FA, FB, ranks, opts.weighting)
        bases, kept = {}, {}
        for side, F, W in (("A", FA, WA), ("B", FB, WB)):
            seed += 1
            if fixed_k:
                # Budget mode: each module has its own k, so fit group by group.
                Us, kk = [], []
                for g, p in enumerate(chunk):
                    key = group_key(p.module, side)
                    k = fixed_k[key]
                    U0, e0 = pass1_bases.pop(key, (None, None))
                    if U0 is not None and U0.shape[-1] >= k:  # pass 1 already found it
                        Us.append(U0[:, :k].to(F.device, F.dtype).contiguous())
                        kk.append(e0[:k].to(F.device, torch.float64))
                        continue
                    U, kv, _ = _fit_side(F[g : g + 1], [w[g : g + 1] for w in W], ranks, k, opts, seed)
                    Us.append(U[0])
                    kk.append(kv[0])
                bases[side], kept[side] = Us, kk
            elif opts.num_components == "auto":
                group_caps = [caps[group_key(p.module, side)] for p in chunk]
                bases[side], kept[side], hit = _auto_side(F, W, ranks, totals[side], group_caps, opts, seed)
                capped.update({group_key(p.module, side): True for p, h in zip(chunk, hit) if h})
            else:
                U, kv, _ = _fit_side(F, W, ranks, int(opts.num_components), opts, seed)
                bases[side], kept[side] = list(U.unbind(0)), list(kv.unbind(0))
        finished = _finish_groups(chunk, FA, FB, GA, GB, sq, bases, totals, kept, scheme)
        if shifts is not None:  # rare: tiny or huge factors; measure each member on its own scale
            _unscale(finished, shifts)
            _remeasure(finished, *raw)
        for r in finished:
            r.capped = tuple(side for side in "AB" if capped.get(group_key(r.plan.module, side)))
        for r in finished:
            check_storable(r.plan.module, opts.dtype, [
                (adapters[i].name, L) for side in "AB" for i, L in zip(r.plan.members, r.loadings[side])])
        results.extend(finished)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if opts.num_components == "auto" and opts.budget_bytes is None:
        _warn_capped(sorted(capped), 2 * len(plans), f"variance_threshold={opts.variance_threshold:g} was not reached")
    return results


def _finish_groups(chunk, FA, FB, GA, GB, sq, bases, totals, kept, scheme: str) -> List[GroupResult]:
    """Finish a chunk; bases may differ in k per group, so batch only equal-k runs."""
    same = len({(u.shape, v.shape) for u, v in zip(bases["A"], bases["B"])}) == 1
    if same:
        UA, UB = torch.stack(bases["A"]), torch.stack(bases["B"])
        kd = {"A": torch.stack(kept["A"]), "B": torch.stack(kept["B"])}
        res = _finish_chunk(chunk, FA, FB, GA, GB, sq, UA, UB, totals, kd, scheme)
    else:
        res = []
        for g in range(len(chunk)):
            sl = slice(g, g + 1)
            res.extend(
                _finish_chunk(
                    chunk[sl], FA[sl], FB[sl], [t[sl] for t in GA], [t[sl] for t in GB], [t[sl] for t in sq],
                    bases["A"][g][None], bases["B"][g][None], {s: totals[s][sl] for s in "AB"},
                    {s: kept[s][g][None] for s in "AB"}, scheme,
                )
            )
    if FA.device.type != "cpu":
        for r in res:
            r.basis = {s: t.cpu() for s, t in r.basis.items()}
            r.loadings = {s: [t.cpu() for t in ts] for s, ts in r.loadings.items()}
    return res


def _group_nbytes(p: GroupPlan, side: str, k: int, scheme: str) -> int:
    """Exact data bytes (scales and padding included) of one module side's basis and loadings at k."""
    d = p.d_in if side == "A" else p.d_out
    return stored_nbytes(scheme, k, d) + sum(stored_nbytes(scheme, k, r) for r in p.ranks)


def _fit_exact_bytes(plans: Sequence[GroupPlan], specs: Sequence[torch.Tensor], ks: List[int], scheme: str,
                     budget: float) -> List[int]:
    """Water-filling prices a component at its average cost, but quantized blocks and nibble pairs
    round up per tensor: drop the components that keep the least energy until the exact bytes fit."""
    sides = [(p, s) for p in plans for s in "AB"]
    cost = [_group_nbytes(p, s, k, scheme) for (p, s), k in zip(sides, ks)]
    total = sum(cost)
    ks = list(ks)
    while total > budget:
        live = [i for i, k in enumerate(ks) if k > 1]
        if not live:
            break
        i = min(live, key=lambda j: float(specs[j][ks[j] - 1]) if ks[j] - 1 < len(specs[j]) else 0.0)
        ks[i] -= 1
        new = _group_nbytes(*sides[i], ks[i], scheme)
        total += new - cost[i]
        cost[i] = new
    return ks


def files_overhead(plans: Sequence[GroupPlan], names: Sequence[str], scheme: str) -> int:
    """Bytes of the bases' and loadings' files beyond their data (headers; a quantized file's index), for a budget.

    Shapes are taken at the largest k each module can have, so the digits (and the bytes)
    are never underestimated.
    """
    kmax = {p.module: min(p.n, p.d_in, p.d_out) for p in plans}
    bases: list = []
    per: Dict[int, list] = {}
    for p in plans:
        k = kmax[p.module]
        for side, d in (("A", p.d_in), ("B", p.d_out)):
            key = group_key(p.module, side)
            bases.append((key, k, d))
            for i, r in zip(p.members, p.ranks):
                per.setdefault(i, []).append((key, k, r))
    meta = {"format": "pt"}
    total = 0
    for entries in [bases, *per.values()]:
        if is_quantized(scheme):
            total += header_nbytes(packed_entries(scheme, [(k, c) for _, k, c in entries]), meta) + 8 * len(entries)
        else:
            total += header_nbytes([e for key, k, c in entries for e in stored_entries(key, scheme, k, c)], meta)
    return total


def _progress(opts: CompressOptions, total: int):
    if not opts.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compressing modules", unit="module", leave=False, disable=None)


_DEVICES = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def resolve_device(device: Any) -> Optional[str]:
    """The device to compute on (``None`` = the CPU); a GPU that is not there falls back to the CPU with a warning.

    Example:
        >>> resolve_device("cpu") is None
        True
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "cpu":
        return None
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r}: expected a string, one of {_DEVICES}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r}: expected {_DEVICES}.")
    if dev.type == "cpu":
        return None
    backend = torch.cuda if dev.type == "cuda" else torch.backends.mps
    if not backend.is_available():
        logger.warning("device=%r requested but %s is not available; using the CPU", device, dev.type.upper())
        return None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
        )
    return device
