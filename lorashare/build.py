"""Building: compress opened adapters into a new SHARE state.

Example:
    >>> from lorashare.adapters import open_adapters
    >>> state = build(open_adapters(["runs/a", "runs/b"]), CompressionSpec(num_components=8))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Optional, Sequence

import torch

from .adapters import Adapter, check_compatible, lora_key
from .compress import CompressOptions, GroupResult, compress
from .errors import AdapterError
from .names import group_key
from .spec import CompressionSpec
from .state import AdapterRecord, Fit, SHAREState, Weight
from .stats import capped_of, warn_if_larger

logger = logging.getLogger(__name__)

__all__ = ["build", "record_of", "lora_bytes"]


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
    budget = spec.budget_for(sum(lora_bytes(a) for a in opened))
    opts = CompressOptions(spec, budget_bytes=budget, device=device, progress=progress)
    # Fingerprints (a full read of each file) overlap with the compression.
    with ThreadPoolExecutor(1) as pool:
        shas = pool.map(lambda a: a.sha256(), opened)
        results = compress(opened, opts)
        heads = {a.name: a.read_heads() for a in opened if a.head_keys}
        fingerprints = list(shas)
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
        lora_bytes=lora_bytes(a), errors=errors, lora_keys=_own_keys(a),
    )


def lora_bytes(a: Adapter) -> int:
    """The bytes of an adapter's LoRA factors, as its file stores them."""
    tf = a._tf()
    return sum(tf.infos[k].nbytes for m in a.modules.values() for k in (m.a_key, m.b_key))


def _own_keys(a: Adapter) -> Dict[str, str]:
    """``{"<module>:<A|B>": key}`` for the factors whose key is not PEFT's default (``lora_key``)."""
    out = {}
    for m in a.modules.values():
        for side, key in (("A", m.a_key), ("B", m.b_key)):
            if key != lora_key(m.module, side):
                out[group_key(m.module, side)] = key
    return out

