"""``lorashare sync``'s I/O: fingerprint the sources, read the published config, build the new checkpoint."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .. import hub
from ..errors import AdapterError, ConfigError, HubError, LoraShareError
from ..model import SHAREModel
from ..peft.adapters import WEIGHTS_NAME, check_compatible, file_sha256, missing_path, open_adapter
from ..utils.names import open_regular
from .manifest import AdapterSource, Manifest
from .plan import Plan

logger = logging.getLogger(__name__)

__all__ = ["check_sources", "fingerprint_sources", "read_published", "apply_plan", "set_card"]


def fingerprint_sources(manifest: Manifest, *, token: Optional[str] = None) -> Dict[str, str]:
    """``{name: fingerprint}``: sha256 of the weights for folders, the resolved commit sha for Hub ids."""
    out: Dict[str, str] = {}
    for name, src in manifest.adapters.items():
        try:
            if src.kind == "folder":
                _refuse_lfs_pointer(os.path.join(src.folder, WEIGHTS_NAME), src.text)
                out[name] = file_sha256(os.path.join(src.folder, WEIGHTS_NAME))
            else:
                out[name] = hub.resolve_revision(src.ref, token=token)
        except LoraShareError as exc:  # first: HubNotFoundError is also an OSError
            raise _locate(exc, manifest, name) from None
        except OSError as exc:
            raise _locate(ConfigError(f"cannot read {src.text}: {exc.strerror or exc}"), manifest, name) from None
    return out


def check_sources(manifest: Manifest) -> Tuple[Dict[str, Dict[str, Any]], List[LoraShareError]]:
    """Offline: open every folder source (its config and its weights' header) and check that they can share bases.

    Returns ``({name: what was found}, problems)``; each problem names the manifest's file, line and
    adapter.  Hub sources were checked for their syntax by the parser; nothing is resolved, nothing
    is requested, no token is read.
    """
    found: Dict[str, Dict[str, Any]] = {}
    problems: List[LoraShareError] = []
    opened = []
    try:
        for name, src in manifest.adapters.items():
            entry: Dict[str, Any] = {"kind": src.kind, "source": src.text, "line": src.line, "checked": False}
            found[name] = entry
            if src.kind != "folder":
                base, head = os.path.dirname(manifest.path), src.text.split("/", 1)[0]
                if os.path.isdir(os.path.join(base, head)):
                    entry["note"] = (f"read as a Hub id, though {head}/ is a folder here; if you meant a folder: "
                                     f"{missing_path(src.text, base=base)}")
                continue
            try:
                _refuse_lfs_pointer(os.path.join(str(src.folder), WEIGHTS_NAME), src.text)
                adapter = open_adapter(str(src.folder), name)
            except LoraShareError as exc:
                problems.append(_locate(exc, manifest, name))
                continue
            except OSError as exc:
                problems.append(_locate(ConfigError(f"cannot read {src.text}: {exc.strerror or exc}"), manifest, name))
                continue
            opened.append(adapter)
            entry.update(checked=True, base_model=adapter.base_model, modules=len(adapter.modules),
                         ranks=sorted({m.rank for m in adapter.modules.values()}))
        if len(opened) >= 2:
            try:
                check_compatible(opened, strict=manifest.compression.strict)
            except LoraShareError as exc:
                problems.append(_locate(exc, manifest, exc.adapter if exc.adapter in found else opened[-1].name))
    finally:
        for adapter in opened:
            adapter.close()
    return found, problems


LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _refuse_lfs_pointer(path: str, shown: str) -> None:
    """A clear error for weights checked out as a Git LFS pointer (a small text file), not the file itself."""
    try:
        with open_regular(path) as f:
            head = f.read(len(LFS_POINTER))
    except OSError:
        return  # open_adapter says what is wrong with it
    if head == LFS_POINTER:
        raise AdapterError(f"{shown}/{WEIGHTS_NAME} is a Git LFS pointer, not the weights: run `git lfs pull` "
                           "(in a workflow: actions/checkout with `lfs: true`).", path=path)


def _locate(exc: LoraShareError, manifest: Manifest, name: str) -> LoraShareError:
    """Prefix ``file:line: adapters.name:`` to an error about one adapter, keeping its type."""
    line = manifest.adapters[name].line if name in manifest.adapters else None
    where = f"{manifest.file}:{line}" if line else manifest.file
    msg = f"{where}: adapters.{name}: {exc}"
    src = manifest.adapters.get(name)
    if src is not None and src.kind == "hub" and isinstance(exc, HubError) and "not found" in str(exc):
        head = src.text.split("/", 1)[0]
        if os.path.isdir(os.path.join(os.path.dirname(manifest.path), head)):
            msg += f" (if you meant a folder of this repository, {src.text!r} does not exist in it)"
    try:
        new = type(exc)(msg, adapter=name, path=exc.path, layer=exc.layer)
    except TypeError:  # pragma: no cover - a subclass with another signature
        new = LoraShareError(msg, adapter=name)
    new.file, new.line = manifest.file, line  # type: ignore[attr-defined]
    return new


def read_published(repo_id: str, *, token: Optional[str] = None) -> Tuple[Any, Optional[str]]:
    """``(SHAREConfig or None, commit sha or None)`` of the published checkpoint; only its JSON is read."""
    return hub.fetch_config(repo_id, token=token)


def _build_source(src: AdapterSource, fingerprint: Optional[str]) -> str:
    """What to open: the absolute folder, or the Hub id pinned to the planned commit."""
    if src.kind == "folder":
        return str(src.folder)
    sub = f"/{src.ref.subfolder}" if src.ref.subfolder else ""
    return f"{src.ref.repo_id}{sub}@{fingerprint}" if fingerprint else src.text


def _restamp(share: Any, manifest: Manifest) -> None:
    """Record each adapter's source as the manifest wrote it (no runner paths, no pinned sha)."""
    for name, src in manifest.adapters.items():
        if name in share.adapter_names:
            share.set_source(name, src.text)


def _compress_all(manifest: Manifest, plan: Plan, fingerprints: Mapping[str, str], *, token: Optional[str],
                  progress: bool) -> Any:
    """Compress the manifest's adapters, and the published ones it keeps (trained: rebuilt from their loadings)."""
    sources = {n: _build_source(s, fingerprints.get(n)) for n, s in manifest.adapters.items()}
    kept = plan.by_status("kept")
    with tempfile.TemporaryDirectory(prefix="lorashare-sync-") as tmp:
        if kept:
            published = SHAREModel.from_pretrained(manifest.repo_id, revision=plan.base_sha, token=token, adapters=kept)
            for name in kept:  # the trained adapter exactly as published is its only original
                sources[name] = os.path.join(tmp, name)
                published.reconstruct(name, sources[name])
        share = SHAREModel.from_adapters(sources, spec=manifest.compression, progress=progress, token=token)
    _restamp(share, manifest)
    for name in kept:
        share.set_source(name, "")  # still trained: no source, no fingerprint
    return share


def apply_plan(manifest: Manifest, plan: Plan, fingerprints: Mapping[str, str], *, token: Optional[str],
           progress: bool, say: Callable[[str], None]) -> Tuple[Any, Dict[str, Dict[str, Any]]]:
    """Build the new checkpoint; may turn an ``add`` plan into ``recompute``.  Returns (share, add reports)."""
    reports: Dict[str, Dict[str, Any]] = {}
    if plan.action in ("add", "card"):
        share = SHAREModel.from_pretrained(manifest.repo_id, revision=plan.base_sha, token=token)
        # A recompute re-reads every adapter from its source (exact), never from a reconstruction.
        sources = {n: _build_source(s, fingerprints.get(n)) for n, s in manifest.adapters.items()}
        for name in plan.by_status("added"):
            rep = share.add_adapter(sources[name], name=name, variance_threshold=manifest.compression.variance_threshold,
                                    token=token, originals=sources)
            reports[name] = rep
            say(f"{name}: {rep['method']} ({rep['reason']})")
        _restamp(share, manifest)
        recomputed = [n for n, r in reports.items() if r["method"] != "projection"]
        if recomputed:
            plan.action = "recompute"
            plan.reasons = [f"{n} added: {reports[n]['reason']}" for n in recomputed] + [
                f"{n} added" for n in reports if n not in recomputed]
        else:
            plan.reasons = [f"{n} added by projection ({r['min_explained_variance']:.1%} of its ΔW energy explained)"
                            for n, r in reports.items()] or plan.reasons
        return share, reports
    return _compress_all(manifest, plan, fingerprints, token=token, progress=progress), reports


def set_card(share: Any, manifest: Manifest) -> None:
    if manifest.base_model:
        share.set_base_model(manifest.base_model)
    share.set_card(repo_id=manifest.repo_id, license=manifest.card.license or None,
                   description=manifest.card.description or None)
