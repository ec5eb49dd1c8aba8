"""Editing: add, remove, recompute, re-source.  Each edit is a pure function from one state to the next.

Nothing here changes the state it is given; the model publishes what these return.

Example:
    >>> state2, report = add(state, open_adapter("runs/legal"), threshold=0.95)  # doctest: +SKIP
    >>> report["method"]  # doctest: +SKIP
    'projection'
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DuplicateAdapterError,
    LoraShareError,
    UnknownAdapterError,
)
from ..format.storage import DTYPES, is_quantized, quantize
from ..peft.adapters import Adapter, check_compatible, open_adapter, write_peft_adapter
from ..utils.names import group_key
from . import subspace as S
from .build import build, record_of
from .compress import check_storable
from .state import SHAREState, Weight, peft_config, rebuild

logger = logging.getLogger(__name__)

__all__ = ["check_known", "explained", "add", "project", "recompute", "remove", "set_source", "set_base_model", "set_card"]


def check_known(state: SHAREState, name: str) -> None:
    """Raise :class:`UnknownAdapterError` unless ``name`` is an adapter of ``state``."""
    if name not in state.records:
        raise UnknownAdapterError(f"adapter {name!r} not found. Available: {list(state.names)}.", adapter=name)


def explained(state: SHAREState, a: Adapter) -> Dict[str, float]:
    """Share of each module's ΔW energy that the bases of ``state`` keep for adapter ``a``."""
    out = {}
    comps = state.components
    for m in a.modules:
        ka, kb = group_key(m, "A"), group_key(m, "B")
        if ka not in comps or kb not in comps:
            continue
        A, B = a.read_factor(m, "A").float(), a.read_factor(m, "B").float()
        UA, UB = comps[ka].float(), comps[kb].float()
        if UA.shape[0] != A.shape[1] or UB.shape[0] != B.shape[0]:
            raise AdapterError(
                f"adapter {a.name!r}: {m} has shape {tuple(B.shape)}·{tuple(A.shape)}, but the shared bases "
                f"are for {UB.shape[0]}×{UA.shape[0]}. Is it for the same base model?",
                adapter=a.name,
                layer=m,
            )
        err, orig = S.delta_w_error(A, B, (UA @ (UA.T @ A.T)).T, UB @ (UB.T @ B))
        out[m] = 1.0 if float(orig) == 0 else max(0.0, 1.0 - float(err) / float(orig))
    return out


def add(state: SHAREState, new: Adapter, *, threshold: float, force: bool = False, device: Optional[str] = None,
        originals: Optional[Mapping[str, str]] = None, token: Optional[str] = None,
        progress: bool = True, replace: bool = False) -> Tuple[SHAREState, Dict[str, Any]]:
    """Add ``new``: projected onto the bases if they keep ``threshold`` of its ΔW energy in every
    module, else every adapter is recompressed.  Returns the next state and a report.

    With ``replace``, an adapter of the same name is replaced in the same step (no state
    without it is ever published)."""
    if replace and new.name in state.records:
        if len(state.records) <= 1:
            raise CheckpointError(f"cannot replace {new.name!r}: it is the only adapter, and a SHARE model needs "
                                  "another to share its bases with. Compress them together instead.", adapter=new.name)
        # Not published: the bases stay as they are for the projection test.
        state = dataclasses.replace(state, records={n: r for n, r in state.records.items() if n != new.name})
    elif new.name in state.records:
        raise DuplicateAdapterError(
            f"adapter {new.name!r} already exists. Pass name=... to add it under another name, "
            "replace=True to replace it in one step, or remove_adapter() it first.",
            adapter=new.name,
        )
    expl = explained(state, new)
    lo = min(expl.values()) if expl else 0.0
    mean = sum(expl.values()) / len(expl) if expl else 0.0
    uncovered = [m for m in new.modules if group_key(m, "A") not in state.bases]
    report = {"adapter_name": new.name, "min_explained_variance": lo, "mean_explained_variance": mean}
    if force:
        reason = "forced"
    elif uncovered:
        reason = f"module {uncovered[0]} has no shared basis yet"
    elif lo < threshold:
        reason = f"bases keep only {lo:.1%} of its ΔW energy (< {threshold:.1%})"
    else:
        return project(state, new), {"method": "projection", **report,
                                     "reason": f"bases keep {lo:.1%} of its ΔW energy"}
    nxt = recompute(state, extra=new, device=device, originals=originals, token=token, progress=progress)
    return nxt, {"method": "recompute", **report, "reason": reason}


def project(state: SHAREState, a: Adapter) -> SHAREState:
    """The next state, with ``a``'s loadings its projection onto the current bases."""
    if state.base_model:
        stub = Adapter(name=state.names[0], source="", folder="", config={"base_model_name_or_path": state.base_model},
                       modules={}, head_keys=[])
        check_compatible([stub, a])
    dtype = state.spec.dtype
    weights: Dict[str, Weight] = {}
    errs = {}
    comps = state.components
    for m in a.modules:
        A, B = a.read_factor(m, "A").float(), a.read_factor(m, "B").float()
        ka, kb = group_key(m, "A"), group_key(m, "B")
        UA, UB = comps[ka].float(), comps[kb].float()
        LA, LB = UA.T @ A.T, UB.T @ B
        if is_quantized(dtype):
            sa, sb = quantize(LA, dtype), quantize(LB, dtype)
            weights[ka], weights[kb] = sa, sb
            LA, LB = sa.value(), sb.value()
        else:
            LA, LB = LA.to(DTYPES.get(dtype, torch.float32)), LB.to(DTYPES.get(dtype, torch.float32))
            weights[ka], weights[kb] = LA, LB
        check_storable(m, dtype, [(a.name, LA), (a.name, LB)])
        err, orig = S.delta_w_error(A, B, S.reconstruct_rows(UA, LA), S.reconstruct_rows(UB, LB).T)
        errs[m] = 0.0 if float(orig) == 0 else float((err / orig).sqrt())
    rec = record_of(a, weights, a.read_heads() if a.head_keys else {}, errs, a.sha256())
    return state.next(records={**state.records, a.name: rec}, inputs=state.inputs + (a.folder,))


def recompute(state: SHAREState, extra: Optional[Adapter] = None, *, device: Optional[str] = None,
              originals: Optional[Mapping[str, str]] = None, token: Optional[str] = None,
              progress: bool = True) -> SHAREState:
    """Recompress every adapter (plus ``extra``) with the state's spec, from the best copy of its weights."""
    with tempfile.TemporaryDirectory(prefix="lorashare-recompute-") as tmp:
        opened: List[Adapter] = []
        try:
            for n in state.names:
                opened.append(_best_copy(state, n, tmp, (originals or {}).get(n), token))
            if extra is not None:
                opened.append(open_adapter(extra.source, extra.name) if os.path.isdir(extra.folder) else extra)
            fresh = build(opened, state.spec, device=device, progress=progress)
        finally:
            for a in opened:
                a.close()
    # A record rebuilt from a reconstructed copy keeps where the original came from.
    records = dict(fresh.records)
    for n, old in state.records.items():
        records[n] = records[n].replace(source=old.source, revision=old.revision, sha256=old.sha256,
                                        lora_bytes=old.lora_bytes)
    inputs = state.inputs + ((extra.folder,) if extra is not None else ())
    return state.next(bases=fresh.bases, records=records, fit=fresh.fit, inputs=inputs)


def _best_copy(state: SHAREState, name: str, tmp: str, original: Optional[str], token: Optional[str]) -> Adapter:
    """The adapter's original when it still has the recorded fingerprint, else its reconstruction."""
    rec = state.records[name]
    for src in ([original] if original else []) + ([rec.source] if os.path.isdir(rec.source) else []):
        try:
            a = open_adapter(src, name, **({"token": token} if token else {}))
            if rec.sha256 and a.sha256() == rec.sha256:
                return a
            a.close()
        except LoraShareError:
            pass
    logger.info("adapter %r: original not available or changed; recompressing from its reconstruction", name)
    folder = os.path.join(tmp, name)
    write_peft_adapter(folder, rebuild(state, name), peft_config(rec, name))
    return open_adapter(folder, name)


def remove(state: SHAREState, name: str) -> SHAREState:
    """The next state without ``name``; the other adapters and their bases are untouched."""
    check_known(state, name)
    if len(state.records) <= 1:
        raise CheckpointError(
            f"cannot remove {name!r}: it is the last adapter, and a SHARE checkpoint holds at least one. "
            "Add another adapter first, or delete the checkpoint itself if you no longer need it.",
            adapter=name,
        )
    return state.next(records={n: r for n, r in state.records.items() if n != name})


def set_source(state: SHAREState, name: str, source: str) -> SHAREState:
    """The next state, recording that ``name`` came from ``source``."""
    check_known(state, name)
    return state.next(records={**state.records, name: state.records[name].replace(source=str(source))})


def set_base_model(state: SHAREState, base_model: str) -> SHAREState:
    """The next state, naming ``base_model`` (a Hub model id) as the base model the adapters belong to."""
    if not isinstance(base_model, str):
        raise ConfigError(f"base_model={base_model!r}: expected a Hub model id such as 'FacebookAI/roberta-base'.")
    return state.next(base_model=base_model)


def set_card(state: SHAREState, **options: Any) -> SHAREState:
    """The next state, with the model card's options changed (``repo_id``, ``license``, ``description``)."""
    return state.next(card=dataclasses.replace(state.card, **options))
