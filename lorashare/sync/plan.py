"""``lorashare sync``'s plan: what to do and why, decided from fingerprints alone (pure, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..format.spec import CompressionSpec
from .manifest import CARD_KEYS, Manifest

__all__ = ["ACTIONS", "KEPT_REASON", "AdapterPlan", "Plan", "plan_sync", "commit_message", "plan_json"]

ACTIONS = ("none", "create", "add", "recompute", "card")
KEPT_REASON = ("trained in the subspace, it has no source for the manifest to list; kept (to delete it: "
               "lorashare remove REPO NAME)")


@dataclass
class AdapterPlan:
    """One adapter's state: ``added``, ``changed``, ``unchanged``, ``removed``, or ``kept`` (an adapter trained in
    the subspace, which has no source to list: it stays until removed by name, ``lorashare remove REPO NAME``)."""

    name: str
    status: str
    source: str
    kind: str
    fingerprint: Optional[str]  # sha256 (folder) or commit sha (hub); None when removed
    previous: Optional[str] = None  # the published fingerprint
    reason: str = ""


@dataclass
class Plan:
    """What ``sync`` will do and why."""

    action: str
    reasons: List[str]
    adapters: List[AdapterPlan]
    base_sha: Optional[str] = None  # the published commit the plan was made against
    settings: List[str] = field(default_factory=list)  # compression settings that differ

    @property
    def changed(self) -> bool:
        return self.action != "none"

    def by_status(self, status: str) -> List[str]:
        return [a.name for a in self.adapters if a.status == status]


def _short(value: Optional[str]) -> str:
    return value[:8] if value else "–"


def _settings_diff(spec: CompressionSpec, published: Any) -> List[str]:
    """Compression settings of the manifest that differ from the published checkpoint's (field by field)."""
    return CompressionSpec.from_config(published).diff(spec)


def _card_diff(manifest: Manifest, published: Any) -> List[str]:
    diffs = [k for k in CARD_KEYS if (getattr(published.card, k) or None) != getattr(manifest.card, k)]
    if manifest.base_model and manifest.base_model != published.base_model_name_or_path:
        diffs.append("base_model")
    return diffs


def plan_sync(manifest: Manifest, fingerprints: Mapping[str, str], published: Any, *,
              base_sha: Optional[str] = None, force: bool = False) -> Plan:
    """Decide what to do (pure: no I/O).  ``published`` is the published ``SHAREConfig`` or ``None``."""
    entries: List[AdapterPlan] = []
    if published is None:
        for name, src in manifest.adapters.items():
            entries.append(AdapterPlan(name, "added", src.text, src.kind, fingerprints.get(name), reason="new"))
        return Plan("create", [f"first publish of {len(entries)} adapters"], entries, base_sha)

    old_names = list(published.adapter_names or [])
    old = published.adapters if isinstance(published.adapters, dict) else {}
    reasons: List[str] = []
    for name, src in manifest.adapters.items():
        fp = fingerprints.get(name)
        if name not in old_names:
            entries.append(AdapterPlan(name, "added", src.text, src.kind, fp, reason="new"))
            continue
        info = old.get(name) if isinstance(old.get(name), dict) else {}
        was_kind = "hub" if info.get("revision") else "folder"
        was = info.get("revision") if was_kind == "hub" else info.get("sha256")
        if info.get("source") != src.text or was_kind != src.kind:
            why = f"source {info.get('source')!r} → {src.text!r}"
        elif was != fp:
            what = "commit" if src.kind == "hub" else "sha256"
            why = f"{what} {_short(was)} → {_short(fp)}"
        else:
            entries.append(AdapterPlan(name, "unchanged", src.text, src.kind, fp, was))
            continue
        entries.append(AdapterPlan(name, "changed", src.text, src.kind, fp, was, reason=why))
        reasons.append(f"{name} changed ({why})")
    for name in old_names:
        if name not in manifest.adapters:
            info = old.get(name) if isinstance(old.get(name), dict) else {}
            if not info.get("source"):
                # Trained in the subspace (add_trained): no source a manifest could list, no copy anywhere else.
                entries.append(AdapterPlan(name, "kept", "", "trained", None, reason=KEPT_REASON))
                continue
            prev = info.get("revision") or info.get("sha256")
            entries.append(AdapterPlan(name, "removed", str(info.get("source") or ""),
                                       "hub" if info.get("revision") else "folder", None, prev, reason="not in the manifest"))
            reasons.append(f"{name} removed")
    settings = _settings_diff(manifest.compression, published)
    if settings:
        reasons.append("compression settings changed (" + ", ".join(settings) + ")")
    added = [e.name for e in entries if e.status == "added"]
    card = _card_diff(manifest, published)
    if force:
        action = "recompute"
        reasons = ["forced"] + reasons + [f"{n} added" for n in added]
    elif reasons:
        action = "recompute"
        reasons += [f"{n} added" for n in added]
    elif added:
        action = "add"
        reasons = [f"{n} added" for n in added]
    elif card:
        action = "card"
        reasons = [f"model card {k} changed" for k in card]
    else:
        action = "none"
        reasons = ["the published checkpoint matches the manifest"]
    return Plan(action, reasons, entries, base_sha, settings)


def commit_message(plan: Plan, add_reports: Optional[Mapping[str, Mapping[str, Any]]] = None) -> str:
    """The commit summary: what changed and why (at most 200 characters)."""
    if plan.action == "create":
        names = [a.name for a in plan.adapters]
        msg = f"lorashare sync: first publish ({len(names)} adapters: {', '.join(names)})"
    elif plan.action == "add":
        parts = []
        for n in plan.by_status("added"):
            rep = (add_reports or {}).get(n, {})
            ev = rep.get("min_explained_variance")
            parts.append(f"{n} ({rep.get('method', 'projection')}, {ev:.1%} explained)" if ev is not None else n)
        msg = "lorashare sync: added " + ", ".join(parts)
    elif plan.action == "card":
        msg = "lorashare sync: " + "; ".join(plan.reasons)
    else:
        msg = "lorashare sync: recompute: " + ", ".join(plan.reasons)
    return msg if len(msg) <= 200 else msg[:199] + "…"


def plan_json(plan: Plan) -> Dict[str, Dict[str, Any]]:
    """The plan per adapter, as ``--json`` and the job summary show it."""
    return {a.name: {"status": a.status, "source": a.source, "kind": a.kind, "fingerprint": a.fingerprint,
                     "previous": a.previous, "reason": a.reason} for a in plan.adapters}
