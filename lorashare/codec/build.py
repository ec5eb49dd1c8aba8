"""Building: adapters in, a new SHARE state out, in one pass: open → plan → fit → state → stats.

:func:`build_from_sources` opens every source once (names, headers and fingerprints are decided
there, by :func:`lorashare.peft.adapters.open_adapters`); :func:`build` then plans the module groups
and fits them (:func:`lorashare.codec.compress.compress`), and assembles the state from what the
opened adapters already hold, without going back to their files except for the heads' bytes.

Example:
    >>> state = build_from_sources(["runs/a", "runs/b"], CompressionSpec(num_components=8))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch

from ..errors import AdapterError
from ..format.spec import CompressionSpec
from ..peft.adapters import Adapter, check_compatible, open_adapters
from ..utils.names import group_key
from .compress import CompressOptions, GroupResult, compress
from .state import AdapterRecord, Fit, SHAREState, Weight
from .stats import capped_of, warn_if_larger

logger = logging.getLogger(__name__)

__all__ = ["build_from_sources", "build", "record_of", "lora_bytes"]


def build_from_sources(sources: Union[Sequence[str], Mapping[str, str]], spec: CompressionSpec, *,
                       on_error: str = "raise", device: Optional[str] = None, progress: bool = True,
                       base_model: Optional[str] = None, **hub_kwargs: Any) -> SHAREState:
    """Open ``sources`` (folders or Hub ids, or ``{name: source}``) once and compress them as ``spec`` says.

    ``on_error="skip"`` drops unreadable adapters (logged); ``hub_kwargs`` (``token``, ``timeout``)
    go to the Hub downloads.
    """
    opened = open_adapters(sources, on_error=on_error, **hub_kwargs)
    try:
        given = len(sources) if hasattr(sources, "__len__") else len(opened)
        return build(opened, spec, device=device, progress=progress, skipped=given - len(opened),
                     base_model=base_model)
    finally:
        for a in opened:
            a.close()


def build(opened: Sequence[Adapter], spec: CompressionSpec, *, device: Optional[str] = None, progress: bool = True,
          skipped: int = 0, base_model: Optional[str] = None) -> SHAREState:
    """Compress ``opened`` (at least 2 adapters) as ``spec`` says: a state at revision 0.

    ``skipped`` is how many unreadable adapters were dropped before (for the error message);
    ``base_model`` overrides the base model the adapters' configs name (a local training folder).
    """
    if len(opened) < 2:
        raise AdapterError(
            f"need at least 2 adapters to share a basis, got {len(opened)}"
            f"{f' after skipping {skipped} bad one' + ('s' if skipped > 1 else '') if skipped else ''}. "
            "Add adapters, or keep a single adapter as it is.",
        )
    check_compatible(opened, strict=spec.strict)
    logger.info("compressing %d adapters", len(opened))
    budget = spec.budget_for(sum(a.lora_bytes for a in opened))
    results = compress(opened, CompressOptions(spec, budget_bytes=budget, device=device, progress=progress))
    heads = {a.name: a.read_heads() for a in opened if a.head_keys}
    fingerprints = [a.sha256() for a in opened]  # started when each adapter was opened
    state = _assemble(opened, results, heads, fingerprints, spec, budget)
    if base_model is not None:
        state = dataclasses.replace(state, base_model=base_model)
    warn_if_larger(state)
    return state


def _assemble(opened: Sequence[Adapter], results: Sequence[GroupResult], heads: Dict[str, Dict[str, torch.Tensor]],
              fingerprints: Sequence[str], spec: CompressionSpec, budget: Optional[int]) -> SHAREState:
    bases: Dict[str, Weight] = {}
    loadings: Dict[str, Dict[str, Weight]] = {a.name: {} for a in opened}
    errors: Dict[str, Dict[str, float]] = {a.name: {} for a in opened}
    explained: Dict[str, float] = {}
    for res in results:
        p = res.plan
        for side in "AB":
            key = group_key(p.module, side)
            st = res.stored_basis.get(side)
            # The pipeline already decoded what it stored (errors are measured on it): no second decode.
            bases[key] = st.decoded_as(res.basis[side]) if st is not None else res.basis[side]
            explained[key] = res.explained[side]
            stored = res.stored_loadings.get(side)
            for j, (idx, L) in enumerate(zip(p.members, res.loadings[side])):
                loadings[opened[idx].name][key] = stored[j].decoded_as(L) if stored else L
        for idx, e in zip(p.members, res.rel_error):
            errors[opened[idx].name][p.module] = e
    records = {a.name: record_of(a, loadings[a.name], heads.get(a.name) or {}, errors[a.name], sha)
               for a, sha in zip(opened, fingerprints)}
    return SHAREState(
        spec=spec, bases=bases, records=records, base_model=opened[0].base_model or "",
        fit=Fit(explained=explained, capped=tuple(capped_of(list(results))), budget_bytes=budget),
        inputs=tuple(a.folder for a in opened),
    )


def record_of(a: Adapter, weights: Dict[str, Weight], heads: Dict[str, torch.Tensor], errors: Dict[str, float],
              sha256: str) -> AdapterRecord:
    """The record of a freshly compressed (or projected) adapter."""
    return AdapterRecord(
        weights=weights, config=dict(a.config), heads=heads, source=a.source, revision=a.revision, sha256=sha256,
        lora_bytes=a.lora_bytes, errors=errors, lora_keys=a.own_keys,
    )


def lora_bytes(a: Adapter) -> int:
    """The bytes of an adapter's LoRA factors, as its file stores them."""
    return a.lora_bytes
