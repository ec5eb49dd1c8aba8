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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DuplicateAdapterError,
    LoraShareError,
    UnknownAdapterError,
    WorsenedError,
)
from ..format.storage import DTYPES, is_quantized, quantize
from ..peft.adapters import Adapter, check_compatible, open_adapter, write_peft_adapter
from ..utils.names import group_key
from . import subspace as S
from .build import build, record_of
from .compress import check_storable
from .state import SHAREState, Weight, peft_config, rebuild

logger = logging.getLogger(__name__)

__all__ = ["check_known", "check_whole", "explained", "add", "project", "recompute", "remove", "set_source", "set_base_model", "set_card",
           "error_bound", "worsened"]

#: An adapter already there is "worsened" by an edit when its ΔW error (max or mean over modules) rises by
#: more than WORSE_ABS + WORSE_REL × its value before.  0.001 absolute is far below any change an output
#: shows, and above the noise of refitting the same adapters (measured: float32 ~1e-6, float16 ~1e-5,
#: bfloat16 ~1e-4); 5% relative covers quantized storage, whose own rounding error (nf4 ≈ 0.2) moves by
#: about 1% between two fits of the same adapters (measured 0.0024 on nf4).
WORSE_ABS = 1e-3
WORSE_REL = 0.05


def check_known(state: SHAREState, name: str) -> None:
    """Raise :class:`UnknownAdapterError` unless ``name`` is an adapter of ``state``."""
    if name in state.unseen:
        raise UnknownAdapterError(
            f"adapter {name!r} is in {state.origin.where} but was not loaded: this model was loaded with "
            f"adapters={list(state.names)}. Load it too (from_pretrained(..., adapters=[..., {name!r}])).", adapter=name)
    if name not in state.records:
        raise UnknownAdapterError(f"adapter {name!r} not found. Available: {list(state.names)}.", adapter=name)


def check_whole(state: SHAREState, action: str) -> None:
    """Refuse ``action`` (one that refits the bases) on a partial view: its unseen adapters' loadings would no
    longer fit the bases, and a save back would have to drop them."""
    if state.unseen:
        raise ConfigError(
            f"cannot {action}: this model holds only {list(state.names)} of the {len(state.origin.names)} adapters of "
            f"{state.origin.where} (loaded with adapters=[...]), and refitting the bases would leave the other "
            f"{len(state.unseen)} ({', '.join(state.unseen)}) with loadings for bases that are gone. Load the whole "
            "checkpoint (from_pretrained without adapters=) to do this.")


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
        progress: bool = True, replace: bool = False, strict: bool = False,
        require_originals: bool = False) -> Tuple[SHAREState, Dict[str, Any]]:
    """Add ``new``: projected onto the bases if they keep ``threshold`` of its ΔW energy in every
    module, else every adapter is recompressed.  Returns the next state and a report.

    With ``replace``, an adapter of the same name is replaced in the same step (no state
    without it is ever published).  The report's ``worsened`` names the adapters already there
    whose ΔW error the edit raised (``{name: {"before", "after", ...}}``, max over modules), and
    ``reconstructed`` those recompressed from their reconstructions; ``strict`` refuses an edit
    that worsens any (:class:`~lorashare.errors.WorsenedError`, nothing changed), and
    ``require_originals`` one that would recompress any from its reconstruction."""
    if replace and new.name in state.records:
        if len(state.records) + len(state.unseen) <= 1:
            raise CheckpointError(f"cannot replace {new.name!r}: it is the only adapter, and a SHARE model needs "
                                  "another to share its bases with. Compress them together instead.", adapter=new.name)
        # Not published: the bases stay as they are for the projection test.
        state = dataclasses.replace(state, records={n: r for n, r in state.records.items() if n != new.name})
    elif new.name in state.unseen:
        raise DuplicateAdapterError(
            f"adapter {new.name!r} already exists in {state.origin.where}; this model was loaded without it "
            f"(adapters={list(state.names)}). Pass name=... to add it under another name, or load it too to replace "
            "it.", adapter=new.name,
        )
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
                                     "reason": f"bases keep {lo:.1%} of its ΔW energy", "worsened": {},
                                     "reconstructed": []}
    nxt, rebuilt = _recompute(state, extra=new, device=device, originals=originals, token=token, progress=progress,
                              require_originals=require_originals)
    worse = worsened(state, nxt)
    if worse:
        total = sum(r.rank for r in nxt.records.values())
        changes = ", ".join(f"{n!r} {w['before']:.4f} → {w['after']:.4f}{' (a bound)' if w['bound'] else ''}"
                            for n, w in worse.items())
        problem = (f"adding {new.name!r} recompressed every adapter ({reason}) and raised the ΔW error (max over "
                   f"modules) of {changes}.")
        fix = (f"Compress the adapters together again with more components (num_components ≥ {total}, the sum of "
               "their ranks, is lossless)")
        if strict:
            raise WorsenedError(f"{problem} strict=True refuses that; nothing was changed. {fix}, or pass "
                                "strict=False to accept it.", worsened=worse, lossless_k=total, adapter=new.name,
                                problem=problem)
        logger.warning("%s %s, or pass strict=True to refuse such an edit.", problem, fix,
                       extra={"lorashare_note": "worsened"})
    _warn_reconstructed(rebuilt)
    return nxt, {"method": "recompute", **report, "reason": reason, "worsened": worse, "reconstructed": rebuilt}


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
              progress: bool = True, require_originals: bool = False) -> SHAREState:
    """Recompress every adapter (plus ``extra``) with the state's spec, from the best copy of its weights.

    The best copy is the original (``originals[name]``, else the recorded source) while it has the
    recorded fingerprint; else the adapter's reconstruction, which compounds the losses: that is
    logged as a WARNING, and the adapter's recorded errors become upper bounds against the original
    (:func:`error_bound`; ``errors_bound`` on its record).  ``require_originals`` refuses instead
    (:class:`~lorashare.errors.WorsenedError` naming the adapters).
    """
    nxt, rebuilt = _recompute(state, extra, device=device, originals=originals, token=token, progress=progress,
                              require_originals=require_originals)
    _warn_reconstructed(rebuilt)
    return nxt


def _recompute(state: SHAREState, extra: Optional[Adapter] = None, *, device: Optional[str] = None,
               originals: Optional[Mapping[str, str]] = None, token: Optional[str] = None,
               progress: bool = True, require_originals: bool = False) -> Tuple[SHAREState, List[str]]:
    """:func:`recompute`, and the names of the adapters recompressed from their reconstructions."""
    check_whole(state, f"recompute the bases{f' to add {extra.name!r}' if extra is not None else ''}")
    with tempfile.TemporaryDirectory(prefix="lorashare-recompute-") as tmp:
        found: Dict[str, Optional[Adapter]] = {}
        opened: List[Adapter] = []
        try:
            for n in state.names:
                found[n] = _original(state, n, (originals or {}).get(n), token)
            rebuilt = [n for n, a in found.items() if a is None]
            if rebuilt and require_originals:
                raise WorsenedError(
                    f"recompute: the originals of {_names(rebuilt)} are not available (no folder or Hub id with "
                    "the fingerprint recorded at compression), and require_originals=True refuses to recompress "
                    f"them from their reconstructions; nothing was changed. {ORIGINALS_FIX}",
                    missing=rebuilt, adapter=rebuilt[0])
            for n, a in found.items():
                opened.append(a if a is not None else _reconstruction(state, n, tmp))
            if extra is not None:
                opened.append(open_adapter(extra.source, extra.name) if os.path.isdir(extra.folder) else extra)
            fresh = build(opened, state.spec, device=device, progress=progress)
        finally:
            for a in {id(x): x for x in [*found.values(), *opened] if x is not None}.values():
                a.close()
    # A record rebuilt from a reconstructed copy keeps where the original came from.
    records = dict(fresh.records)
    for n, old in state.records.items():
        records[n] = records[n].replace(source=old.source, revision=old.revision, sha256=old.sha256,
                                        lora_bytes=old.lora_bytes)
        if n in rebuilt:
            # Measured against the reconstruction, the new error says nothing of the original: bound it.  A module
            # without a recorded error (a 0.1.x checkpoint) stays unknown rather than shown as measured.
            bounds = {m: error_bound(old.errors[m], e) for m, e in records[n].errors.items() if m in old.errors}
            records[n] = records[n].replace(errors=bounds, errors_bound=bool(bounds))
    inputs = state.inputs + ((extra.folder,) if extra is not None else ())
    return state.next(bases=fresh.bases, records=records, fit=fresh.fit, inputs=inputs), rebuilt


#: How to keep an adapter's original within reach of a recompute.
ORIGINALS_FIX = ("To recompress from the originals, keep each source folder (or the Hub repo at its recorded "
                 "revision) unchanged, or give the original files: add_adapter(..., originals={name: "
                 "'path/or/hub-id'}).")


def _warn_reconstructed(rebuilt: Sequence[str]) -> None:
    """The WARNING of a recompute that started from reconstructions (once its result is kept)."""
    if rebuilt:
        logger.warning(
            "recompute: no original for %s (the source folder is gone, or its adapter_model.safetensors changed "
            "since compression): recompressed from the reconstruction, so the compression losses add up, and the "
            "recorded ΔW error is now an upper bound against the original. %s", _names(rebuilt), ORIGINALS_FIX,
            extra={"lorashare_note": "reconstructed"})


def _names(names: Sequence[str]) -> str:
    return ("adapter " if len(names) == 1 else "adapters ") + ", ".join(repr(n) for n in names)


def error_bound(e_prev: float, e_new: float) -> float:
    """An upper bound of the ΔW relative error against the original after a recompute from the reconstruction.

    With W₀ the original ΔW, W₁ the previous reconstruction and W₂ the new one, ``e_prev`` ≥
    ‖W₀ − W₁‖/‖W₀‖ (a measurement, or itself a bound) and ``e_new`` = ‖W₁ − W₂‖/‖W₁‖.  By the
    triangle inequality ‖W₀ − W₂‖ ≤ e_prev·‖W₀‖ + e_new·‖W₁‖, and ‖W₁‖ ≤ ‖W₀‖ + ‖W₁ − W₀‖ ≤
    (1 + e_prev)·‖W₀‖; so ‖W₀ − W₂‖/‖W₀‖ ≤ e_prev + e_new·(1 + e_prev) = (1 + e_prev)(1 + e_new) − 1.

    Example:
        >>> round(error_bound(0.1, 0.2), 6)
        0.32
    """
    return float(e_prev) + float(e_new) * (1.0 + float(e_prev))


def worsened(before: SHAREState, after: SHAREState) -> Dict[str, Dict[str, Any]]:
    """The adapters of ``before`` whose ΔW error (max or mean over modules) ``after`` raised beyond noise.

    ``{name: {"before": max, "after": max, "mean_before", "mean_after", "bound"}}``; ``bound`` says the
    value after is an upper bound (:func:`error_bound`).  Adapters without recorded errors on either
    side are left out (nothing to compare).

    Example:
        >>> worsened(state, state)  # doctest: +SKIP
        {}
    """
    out: Dict[str, Dict[str, Any]] = {}
    for n, old in before.records.items():
        new = after.records.get(n)
        if new is None or not old.errors or not new.errors:
            continue
        b, a = list(old.errors.values()), list(new.errors.values())
        pairs = [(max(b), max(a)), (sum(b) / len(b), sum(a) / len(a))]
        if any(y > x + WORSE_ABS + WORSE_REL * x for x, y in pairs):
            out[n] = {"before": pairs[0][0], "after": pairs[0][1], "mean_before": pairs[1][0],
                      "mean_after": pairs[1][1], "bound": bool(new.errors_bound)}
    return out


def _original(state: SHAREState, name: str, original: Optional[str], token: Optional[str]) -> Optional[Adapter]:
    """The adapter's original, opened, while it has the recorded fingerprint; else ``None``."""
    rec = state.records[name]
    for src in ([original] if original else []) + ([rec.source] if os.path.isdir(rec.source) else []):
        try:
            a = open_adapter(src, name, **({"token": token} if token else {}))
            if rec.sha256 and a.sha256() == rec.sha256:
                return a
            a.close()
        except LoraShareError:
            pass
    return None


def _reconstruction(state: SHAREState, name: str, tmp: str) -> Adapter:
    """The adapter's reconstruction, written as a PEFT folder under ``tmp`` and opened."""
    folder = os.path.join(tmp, name)
    write_peft_adapter(folder, rebuild(state, name), peft_config(state.records[name], name))
    return open_adapter(folder, name)


def remove(state: SHAREState, name: str) -> SHAREState:
    """The next state without ``name``; the other adapters and their bases are untouched."""
    check_known(state, name)
    if len(state.records) + len(state.unseen) <= 1:  # a partial view's unseen adapters stay in the checkpoint
        raise CheckpointError(
            f"cannot remove {name!r}: it is the last adapter, and a SHARE checkpoint holds at least one. "
            "Add another adapter first, or delete the checkpoint itself if you no longer need it.",
            adapter=name,
        )
    return state.next(records={n: r for n, r in state.records.items() if n != name})


def set_source(state: SHAREState, name: str, source: str) -> SHAREState:
    """The next state, recording that ``name`` came from ``source`` (``""``: from nowhere, as an adapter trained in
    the subspace, so it keeps no fingerprint either)."""
    check_known(state, name)
    rec = state.records[name]
    rec = rec.replace(source=str(source)) if source else rec.replace(source="", revision=None, sha256=None)
    return state.next(records={**state.records, name: rec})


def set_base_model(state: SHAREState, base_model: str) -> SHAREState:
    """The next state, naming ``base_model`` (a Hub model id) as the base model the adapters belong to."""
    if not isinstance(base_model, str):
        raise ConfigError(f"base_model={base_model!r}: expected a Hub model id such as 'FacebookAI/roberta-base'.")
    return state.next(base_model=base_model)


def set_card(state: SHAREState, **options: Any) -> SHAREState:
    """The next state, with the model card's options changed (``repo_id``, ``license``, ``description``)."""
    return state.next(card=dataclasses.replace(state.card, **options))
