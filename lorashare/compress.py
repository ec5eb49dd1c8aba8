"""The compression pipeline: plan module groups, stream factors, fit bases, project.

"Plan, then apply": :func:`plan_groups` looks at headers only and buckets the
modules whose factors have the same shapes, so the math runs batched over many
modules at once (no per-module Python loop).  :func:`compress` then streams one
bounded chunk of modules at a time from disk, so peak memory is one chunk,
whatever the total adapter bytes.  The math itself is :mod:`lorashare.subspace`.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import subspace as S
from .adapters import MAX_FACTOR_ABS, Adapter
from .errors import AdapterError, ConfigError
from .storage import DTYPES

logger = logging.getLogger(__name__)

__all__ = ["CompressOptions", "GroupPlan", "GroupResult", "plan_groups", "compress", "group_key", "split_group_key",
           "check_storable", "check_number"]



def group_key(module: str, side: str) -> str:
    """The checkpoint key of one side of one module: ``"<module>:<A|B>"``."""
    return f"{module}:{side}"


def split_group_key(key: str) -> Tuple[str, str]:
    module, _, side = key.rpartition(":")
    return module, side


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
        fix = "Compress with dtype='float32' or 'bfloat16' (CLI: --dtype float32 or --dtype bfloat16), which hold the range."
    else:
        rule = f"the loadings are not finite in {dtype} (the factors are too large)"
        fix = "Check the adapter's factors (diverged training?) and retrain or rescale it."
    raise AdapterError(f"{who}, module {module}: {rule}. {fix}", adapter=bad[0], layer=module)


@dataclass
class CompressOptions:
    """How to compress.  ``num_components`` is an int (per side and module, capped
    at what is lossless), ``"auto"`` (smallest k reaching ``variance_threshold`` of
    the ΔW energy, per module and side), or ignored when ``budget_bytes`` is set
    (per-module k by water-filling under one byte budget for bases + loadings)."""

    num_components: Union[int, str] = 32
    variance_threshold: float = 0.95
    budget_bytes: Optional[int] = None
    dtype: str = "float32"
    device: Optional[str] = None
    chunk_bytes: int = 32 * 1024 * 1024  # raw factors per batch: peak memory is a few times this
    power_iters: int = 2
    progress: bool = True
    weighting: str = "delta_w"  # "delta_w" (gauge-free, per-adapter normalised) or "factors" (plain PCA of A, B)

    def validate(self) -> None:
        k = self.num_components
        if isinstance(k, str):
            if k != "auto":
                raise ConfigError(f"num_components={k!r}: expected an integer ≥ 1 or 'auto'.")
        elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"num_components={k!r}: expected an integer ≥ 1 or 'auto' (k < 1 keeps nothing).")
        check_number("variance_threshold", self.variance_threshold, low=0.0, high=1.0,
                      expected="a number in (0, 1] (the share of ΔW energy to keep, e.g. 0.95)")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: expected one of {sorted(DTYPES)}.")
        if not isinstance(self.weighting, str) or self.weighting not in ("delta_w", "factors"):
            raise ConfigError(f"weighting={self.weighting!r}: expected 'delta_w' or 'factors'.")
        if self.budget_bytes is not None and (
            isinstance(self.budget_bytes, bool) or not isinstance(self.budget_bytes, int) or self.budget_bytes <= 0
        ):
            raise ConfigError(f"budget_bytes={self.budget_bytes!r}: expected a positive integer number of bytes.")


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
    sqnorm: List[float] = field(default_factory=list)  # per member ‖B A‖²


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
        blk = lambda t: t.unflatten(-2, (i1 - i0, r))  # noqa: E731  (G, m, r, d)
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
    dtype: torch.dtype,
    work_bytes: int = 16 * 1024 * 1024,
) -> List[GroupResult]:
    """Project onto the bases, round to the storage dtype, and measure the ΔW error."""
    ranks = chunk[0].ranks
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
                sqnorm=[float(x) for x in orig[g]],
            )
        )
    return out


def _weights(FA: torch.Tensor, FB: torch.Tensor, ranks: Tuple[int, ...], weighting: str = "delta_w"):
    GA = S.factor_gram(FA, ranks)
    GB = S.factor_gram(FB, ranks)
    WA, WB, sq = S.side_weights(GA, GB)
    if weighting == "factors":  # the plain factor PCA of the paper (uncentred), for comparison
        WA = [torch.eye(g.shape[-1], dtype=g.dtype).expand_as(g) for g in GA]
        WB = [torch.eye(g.shape[-1], dtype=g.dtype).expand_as(g) for g in GB]
    # Total weighted energy of each side: Σ_i tr(Wᵢᵀ Gᵢ Wᵢ) (= number of non-zero ΔW_i).
    tot_A = sum((g * (w @ w.transpose(-1, -2))).sum((-1, -2)) for w, g in zip(WA, GA))
    tot_B = sum((g * (w @ w.transpose(-1, -2))).sum((-1, -2)) for w, g in zip(WB, GB))
    return GA, GB, WA, WB, sq, {"A": tot_A, "B": tot_B}


def _spectra(
    adapters: Sequence[Adapter], plans: Sequence[GroupPlan], opts: CompressOptions, bar,
    where: Optional[List[GroupPlan]] = None,
) -> Dict[str, torch.Tensor]:
    """Full weighted spectrum of every (module, side): pass 1 of the budget mode."""
    out: Dict[str, torch.Tensor] = {}
    for chunk in _chunks(plans, opts.chunk_bytes, where):
        FA, FB = _read_chunk(chunk, adapters)
        ranks = chunk[0].ranks
        _, _, WA, WB, _, _ = _weights(FA, FB, ranks, opts.weighting)
        for side, F, W in (("A", FA, WA), ("B", FB, WB)):
            # float32 is plenty to rank directions for the allocation, and twice as fast
            evals, _ = S.top_eigh(S.weighted_gram(F, W, ranks, torch.float32))
            for g, p in enumerate(chunk):
                out[group_key(p.module, side)] = evals[g]
        if bar is not None:
            bar.update(len(chunk))
    return out


def compress(
    adapters: Sequence[Adapter], opts: CompressOptions, plans: Optional[Sequence[GroupPlan]] = None
) -> List[GroupResult]:
    """Fit one basis per module and side, and every adapter's loadings.

    Example:
        >>> results = compress(open_adapters(["a", "b"]), CompressOptions(num_components=8))  # doctest: +SKIP
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
    opts.validate()
    plans = list(plans) if plans is not None else plan_groups(adapters)
    dtype = DTYPES[opts.dtype]
    elem = torch.empty(0, dtype=dtype).element_size()
    bar = _progress(opts, len(plans) * (2 if opts.budget_bytes else 1))

    fixed_k: Dict[str, int] = {}
    spectra: Dict[str, torch.Tensor] = {}
    if opts.budget_bytes is not None:
        spectra = _spectra(adapters, plans, opts, bar, where)
        keys, specs, costs = [], [], []
        for p in plans:
            for side, d in (("A", p.d_in), ("B", p.d_out)):
                key = group_key(p.module, side)
                keys.append(key)
                specs.append(spectra[key][: min(p.n, d)])
                costs.append((d + p.n) * elem)
        ks = S.water_fill(specs, costs, opts.budget_bytes)
        fixed_k = dict(zip(keys, ks))
        spent = sum(k * c for k, c in zip(ks, costs))
        if spent > opts.budget_bytes:
            logger.warning("budget of %d bytes is below one component per module; using %d bytes", opts.budget_bytes, spent)

    results: List[GroupResult] = []
    seed = 0
    for chunk in _chunks(plans, opts.chunk_bytes, where):
        FA, FB = _read_chunk(chunk, adapters)
        if opts.device:
            FA, FB = FA.to(opts.device), FB.to(opts.device)
        ranks = chunk[0].ranks
        GA, GB, WA, WB, sq, totals = _weights(FA, FB, ranks, opts.weighting)
        bases, kept = {}, {}
        for side, F, W in (("A", FA, WA), ("B", FB, WB)):
            seed += 1
            if fixed_k:
                # Budget mode: each module has its own k, so fit group by group.
                Us, kk = [], []
                for g, p in enumerate(chunk):
                    k = fixed_k[group_key(p.module, side)]
                    U, kv, _ = _fit_side(F[g : g + 1], [w[g : g + 1] for w in W], ranks, k, opts, seed)
                    Us.append(U[0])
                    kk.append(kv[0])
                bases[side], kept[side] = Us, kk
            elif opts.num_components == "auto":
                _, _, evals = _fit_side(F, W, ranks, None, opts, seed)
                Us, kk = [], []
                for g in range(len(chunk)):
                    k = S.choose_k(evals[g], opts.variance_threshold)
                    U, kv, _ = _fit_side(F[g : g + 1], [w[g : g + 1] for w in W], ranks, k, opts, seed)
                    Us.append(U[0])
                    kk.append(kv[0])
                bases[side], kept[side] = Us, kk
            else:
                U, kv, _ = _fit_side(F, W, ranks, int(opts.num_components), opts, seed)
                bases[side], kept[side] = list(U.unbind(0)), list(kv.unbind(0))
        finished = _finish_groups(chunk, FA, FB, GA, GB, sq, bases, totals, kept, dtype)
        for r in finished:
            check_storable(r.plan.module, opts.dtype, [
                (adapters[i].name, L) for side in "AB" for i, L in zip(r.plan.members, r.loadings[side])])
        results.extend(finished)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return results


def _finish_groups(chunk, FA, FB, GA, GB, sq, bases, totals, kept, dtype) -> List[GroupResult]:
    """Finish a chunk; bases may differ in k per group, so batch only equal-k runs."""
    same = len({(u.shape, v.shape) for u, v in zip(bases["A"], bases["B"])}) == 1
    if same:
        UA, UB = torch.stack(bases["A"]), torch.stack(bases["B"])
        kd = {"A": torch.stack(kept["A"]), "B": torch.stack(kept["B"])}
        res = _finish_chunk(chunk, FA, FB, GA, GB, sq, UA, UB, totals, kd, dtype)
    else:
        res = []
        for g in range(len(chunk)):
            sl = slice(g, g + 1)
            res.extend(
                _finish_chunk(
                    chunk[sl], FA[sl], FB[sl], [t[sl] for t in GA], [t[sl] for t in GB], [t[sl] for t in sq],
                    bases["A"][g][None], bases["B"][g][None], {s: totals[s][sl] for s in "AB"},
                    {s: kept[s][g][None] for s in "AB"}, dtype,
                )
            )
    if FA.device.type != "cpu":
        for r in res:
            r.basis = {s: t.cpu() for s, t in r.basis.items()}
            r.loadings = {s: [t.cpu() for t in ts] for s, ts in r.loadings.items()}
    return res


def _progress(opts: CompressOptions, total: int):
    if not opts.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compressing modules", unit="module", leave=False, disable=None)
