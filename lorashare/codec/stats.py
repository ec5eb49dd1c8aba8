"""Statistics and sizes derived from a SHARE state, and its ``share_config.json`` view.

Everything here is a pure function of a :class:`~lorashare.codec.state.SHAREState`: nothing is
stored beside the state, so names, sizes and ratios can never go out of step with it.

Example:
    >>> compression_stats(share.state)["compression_ratio"]  # doctest: +SKIP
    5.8
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any, Dict, List, Mapping, Optional

import torch

from .. import __version__
from ..format.schema import CompressionStats, SHAREConfig
from ..format.storage import Stored, bytes_per_value, is_quantized, stored_nbytes
from ..peft.adapters import lora_key, open_adapter, parse_lora_key
from ..utils.fmt import k_range, size
from ..utils.names import split_group_key
from . import subspace as S
from .state import SHAREState, Weight, as_float, rebuild

logger = logging.getLogger(__name__)

__all__ = ["compression_stats", "config_of", "largest_saving_k", "summary_text", "warn_if_larger",
           "delta_w_errors", "reconstruction_error"]

_CONFIGS: "weakref.WeakKeyDictionary[SHAREState, SHAREConfig]" = weakref.WeakKeyDictionary()


def _stored_bytes(w: Weight, dtype: str, *, basis: bool) -> int:
    """Bytes the files hold for one weight: codes and scales for quantized storage (bases stored k × d)."""
    if isinstance(w, Stored):
        return stored_nbytes(dtype, *w.shape)
    if is_quantized(dtype):
        return stored_nbytes(dtype, *((w.shape[1], w.shape[0]) if basis else w.shape))
    return w.numel() * w.element_size()


def compression_stats(state: SHAREState) -> Dict[str, Any]:
    """``share_config.json``'s ``compression_stats``: sizes, both ratios, errors and what the fit measured."""
    dtype = state.spec.dtype
    shared = sum(_stored_bytes(w, dtype, basis=True) for w in state.bases.values())
    per_adapter = {n: sum(_stored_bytes(w, dtype, basis=False) for w in r.weights.values())
                   for n, r in state.records.items()}
    loadings = sum(per_adapter.values())
    original = sum(int(r.lora_bytes or 0) for r in state.records.values())
    heads = sum(t.numel() * t.element_size() for r in state.records.values() for t in r.heads.values())
    errs = [e for r in state.records.values() for e in r.errors.values()]
    explained = dict(state.fit.explained)
    ev = list(explained.values())
    params = lambda b: int(b // bytes_per_value(dtype))  # noqa: E731
    return CompressionStats(
        original_total_params=original // 4 if original else 0,
        compressed_total_params=params(shared + loadings),
        shared_component_params=params(shared),
        per_adapter_loading_params=params(loadings // max(1, len(per_adapter))),
        mean_explained_variance=sum(ev) / len(ev) if ev else 0.0,
        min_explained_variance=min(ev) if ev else 0.0,
        per_layer_explained_variance=explained,
        original_lora_bytes=original,
        shared_bytes=shared,
        loadings_bytes=loadings,
        heads_bytes=heads,
        compressed_bytes=shared + loadings,
        compression_ratio=original / (shared + loadings) if shared + loadings else 0.0,
        compression_ratio_excluding_basis=original / loadings if loadings else 0.0,
        delta_w_rel_error_mean=sum(errs) / len(errs) if errs else None,
        delta_w_rel_error_max=max(errs) if errs else None,
        largest_saving_k=largest_saving_k(state) if original else None,
        capped_groups=list(state.fit.capped),
    ).to_dict()


def config_of(state: SHAREState) -> SHAREConfig:
    """The ``share_config.json`` view of ``state`` (one object per state, built on first use).

    The 0.1.x fields keep their meaning; ``compression`` holds the whole spec.
    """
    cfg = _CONFIGS.get(state)
    if cfg is None:
        cfg = _CONFIGS[state] = _config(state)
    return cfg


def _config(state: SHAREState) -> SHAREConfig:
    legacy = state.origin.legacy if state.origin else None
    if legacy is not None and state.revision == 0:  # a 0.1.x checkpoint as read (the adapters that were)
        return dataclasses.replace(legacy, adapter_names=list(state.names), num_adapters=len(state.records))
    spec, recs = state.spec, list(state.records.values())
    ks = {k: int(as_float(w).shape[1]) for k, w in state.bases.items()}
    modules = sorted({split_group_key(k)[0] for k in state.bases})
    first = recs[0].config if recs else {}
    origin = state.origin
    return SHAREConfig(
        share_version=__version__,
        num_components=max(ks.values(), default=0),
        component_selection=spec.method,
        variance_threshold=float(spec.variance_threshold),
        base_model_name_or_path=state.base_model,
        target_modules=sorted({split_group_key(k)[0].rsplit(".", 1)[-1] for r in recs for k in r.weights}),
        lora_rank=max((r.rank for r in recs), default=0),
        lora_alpha=first.get("lora_alpha", 0),
        adapter_names=list(state.names),
        num_adapters=len(recs),
        layer_keys=modules,
        compression_stats=compression_stats(state),
        format_version=origin.format_version if origin else 0,
        lorashare_version=__version__,
        dtype=spec.dtype,
        budget_bytes=state.fit.budget_bytes if spec.method == "budget" else None,
        requested_components=spec.num_components,
        k_per_group=ks,
        adapters={n: r.info() for n, r in state.records.items()},
        files=dict(origin.files) if origin else {},
        card=state.card,
        compression=spec.to_dict(),
    )


def largest_saving_k(state: SHAREState) -> int:
    """The largest k per module and side at which every module's bases + loadings are smaller than its factors.

    Per module and side, a basis of k columns costs ``k·(d + n)`` values against the adapters'
    ``n·d`` (n = the sum of their ranks), each value at its own byte size; 0 if no k saves.
    """
    storage = bytes_per_value(state.spec.dtype)
    comps = state.components
    elem: Dict[str, float] = {}  # bytes per value of each adapter's original factors
    for n, r in state.records.items():
        values = sum(int(L.shape[1]) * int(comps[k].shape[0]) for k, L in r.loadings.items() if k in comps)
        lora_bytes = int(r.lora_bytes or 0)
        elem[n] = lora_bytes / values if lora_bytes and values else 4.0
    best: Optional[int] = None
    for key, U in comps.items():
        d = int(U.shape[0])
        ranks = [(n, int(r.loadings[key].shape[1])) for n, r in state.records.items() if key in r.loadings]
        if not ranks:
            continue
        original = sum(r * d * elem[n] for n, r in ranks)
        width = (d + sum(r for _, r in ranks)) * storage
        k = S.largest_saving_k(original, width)
        best = k if best is None else min(best, k)
    return best or 0


def warn_if_larger(state: SHAREState) -> None:
    """Say so when the bases cost more than they save (k too large for so few adapters).

    The record carries ``lorashare_note="larger"``: a front that says it in its own words (the
    CLI, with ``-k``) keeps it off its terminal.
    """
    st = config_of(state).compression_stats
    if not st.get("original_lora_bytes") or st.get("compression_ratio", 1.0) >= 1.0:
        return
    k = st.get("largest_saving_k") or 0
    fix = (f"use num_components={k} or less, or compress more adapters together" if k else
           "no k saves space for so few adapters: compress more adapters together, or keep them as they are")
    logger.warning(
        "the checkpoint's bases and loadings (%d bytes) are larger than the adapters' LoRA factors (%d bytes): "
        "the shared bases cost more than they save; %s.", st["compressed_bytes"], st["original_lora_bytes"], fix,
        extra={"lorashare_note": "larger"},
    )


def summary_text(cfg: SHAREConfig) -> str:
    """The compression summary that ``SHAREModel.summary()`` prints."""
    st = cfg.compression_stats
    rule = "=" * 60
    lines = [
        rule,
        "  SHARE Compression Summary",  # lorashare 0.1.x's heading, which scripts match on
        rule,
        f"  base model          {cfg.base_model_name_or_path or '?'}",
        f"  adapters            {cfg.num_adapters}: {', '.join(cfg.adapter_names)}",
        f"  modules             {len(cfg.layer_keys)} ({', '.join(cfg.target_modules)})",
        f"  k per module/side   {k_range(cfg.k_per_group, cfg.num_components)} ({cfg.component_selection}, {cfg.dtype})",
    ]
    if st.get("original_lora_bytes"):
        lines += [
            f"  original LoRA       {size(st['original_lora_bytes'])}",
            f"  compressed          {size(st['compressed_bytes'])} = bases {size(st['shared_bytes'])} + loadings {size(st['loadings_bytes'])}",
            f"  compression ratio   {st['compression_ratio']:.2f}x (bases counted)",
            f"  excluding bases     {st['compression_ratio_excluding_basis']:.2f}x (marginal cost per adapter, not the ratio)",
        ]
        if st["compression_ratio"] < 1:
            k = st.get("largest_saving_k")
            lines.append("  note                larger than the adapters: the bases cost more than they save"
                         + (f"; k ≤ {k} would save space" if k else "; compress more adapters together"))
    if st.get("capped_groups"):
        lines.append(f"  capped at break-even {len(st['capped_groups'])} module sides (a larger k would cost more "
                     "than the factors it replaces)")
    if st.get("delta_w_rel_error_mean") is not None:
        lines.append(f"  ΔW relative error   mean {st['delta_w_rel_error_mean']:.4f}, max {st['delta_w_rel_error_max']:.4f}")
        bounded = [n for n, info in (cfg.adapters or {}).items() if isinstance(info, dict) and info.get("delta_w_error_bound")]
        if bounded:  # their errors are upper bounds, so the mean and max above are too
            lines.append(f"  error bounds        {', '.join(bounded)}: upper bounds, not measurements (recompressed "
                         "from their reconstructions)")
    if st.get("per_layer_explained_variance"):
        lines.append(f"  explained energy    mean {st['mean_explained_variance']:.4f}, min {st['min_explained_variance']:.4f}")
    lines.append(rule)
    return "\n".join(lines)


def delta_w_errors(original: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per-module ‖ΔW − ΔŴ‖/‖ΔW‖ for two PEFT state dicts (the scale cancels)."""
    def factors(sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            p = parse_lora_key(k)
            if p:
                out.setdefault(p[0], {})[p[1]] = v
        return out

    fo, fr = factors(original), factors(rebuilt)
    per = {}
    for m, f in fo.items():
        if m not in fr or set(f) != {"A", "B"}:
            continue
        err, orig = S.delta_w_error(f["A"], f["B"], fr[m]["A"], fr[m]["B"])
        per[m] = 0.0 if float(orig) == 0 else float((err / orig).sqrt())
    return per


def reconstruction_error(state: SHAREState, name: str, original_weights: Optional[Mapping[str, torch.Tensor]] = None,
                         original_path: Optional[str] = None) -> Dict[str, Any]:
    """Relative ΔW error per module of adapter ``name`` against its original (weights or folder), or as
    recorded at compression when neither is given: ``{"per_layer": {...}, "mean": …, "max": …, "bound": …}``
    (``bound``: the recorded values are upper bounds, the adapter having been recompressed from its reconstruction)."""
    bound = False
    if original_weights is None and original_path is None:
        per, bound = dict(state.records[name].errors), bool(state.records[name].errors_bound)
    else:
        if original_weights is None:
            a = open_adapter(original_path, name=name)
            try:
                original_weights = {lora_key(m, side): a.read_factor(m, side) for m in a.modules for side in "AB"}
            finally:
                a.close()
        per = delta_w_errors(original_weights, rebuild(state, name))
    vals = list(per.values())
    return {"per_layer": per, "mean": sum(vals) / len(vals) if vals else 0.0, "max": max(vals) if vals else 0.0,
            "bound": bound}


def capped_of(results: List[Any]) -> List[str]:
    """The module sides a compression run capped at the break-even."""
    from ..utils.names import group_key

    return sorted(group_key(r.plan.module, side) for r in results for side in r.capped)
