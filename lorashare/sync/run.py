"""``lorashare sync``: keep a SHARE checkpoint on the Hub in step with a manifest of adapters.

The manifest is described in :mod:`lorashare.sync.manifest`; the plan in :mod:`lorashare.sync.plan`
(pure); fingerprints and building the checkpoint in :mod:`lorashare.sync.apply`; the runner's
I/O in :mod:`lorashare.sync.github_actions`.  This module drives them.

What ``sync`` does (plan, then apply):

1. Fingerprint every source: the sha256 of ``adapter_model.safetensors`` for a folder, the
   resolved commit sha for a Hub id (a tag or branch is resolved now; the checkpoint records
   the sha).
2. Read the published ``share_config.json`` (only that file; a missing repo is a first publish)
   and compare: per adapter its source and fingerprint, the compression settings, the card.
3. Decide the action: ``none`` (nothing differs: no commit), ``create`` (first publish),
   ``add`` (only new adapters, projected onto the published bases; when the bases explain
   one poorly, everything is recompressed from the sources instead: ``recompute``),
   ``recompute`` (an adapter changed or was removed, the compression settings changed, or
   ``--force``), ``card`` (only the model card's license/description changed).
4. Push the checkpoint and its model card in one commit whose message says what changed
   and why, to ``repo_id`` and nowhere else.  ``--dry-run`` stops after step 3 and needs
   no token.

Under GitHub Actions (``GITHUB_ACTIONS=true``) the token is masked (``::add-mask::``) before
anything else is printed; the outputs ``changed``, ``action``, ``repo-url``, ``commit-sha``,
``compression-ratio`` and ``adapters`` (a JSON list) go to ``$GITHUB_OUTPUT``; a Markdown
report goes to ``$GITHUB_STEP_SUMMARY``; a failure is one ``::error::`` line (with the
manifest's file and line when known).  Without a token, trusted publishing (OIDC; the job
needs ``permissions: id-token: write``) is used when the runner offers it.

Nothing is written into the workspace: downloads go to the Hugging Face cache, temporary
files to ``tempfile`` (``$RUNNER_TEMP`` on a runner).

``lorashare sync --check`` (:func:`check_sync`) is the offline part alone, for a pre-commit hook:
it parses and validates the manifest, opens every adapter folder (its ``adapter_config.json``
and the header of its weights: present, regular, readable, LoRA) and checks that the folders can
share bases (one base model, the same shape per module; ``strict`` as the manifest says).  Hub
sources are checked for their syntax only: nothing is resolved, no request is made, no token read.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional

from .. import hub
from ..errors import ConfigError, LoraShareError
from ..utils.fmt import md_cell
from .apply import apply_plan, check_sources, fingerprint_sources, read_published, set_card
from .github_actions import Reporter, summary_markdown
from .manifest import load_manifest
from .plan import commit_message, plan_json, plan_sync

logger = logging.getLogger(__name__)

__all__ = ["SyncResult", "CheckResult", "run_sync", "check_sync"]


@dataclass
class SyncResult:
    """What ``sync`` did; ``to_json()`` is the ``--json`` payload."""

    repo_id: str
    repo_url: str
    action: str
    changed: bool
    dry_run: bool
    reasons: List[str]
    adapters: List[str]
    plan: Dict[str, Dict[str, Any]]
    commit_sha: Optional[str] = None
    commit_url: Optional[str] = None
    compression_ratio: Optional[float] = None
    message: Optional[str] = None

    def to_json(self) -> Dict[str, Any]:
        return {
            "changed": self.changed, "action": self.action, "dry_run": self.dry_run, "repo_id": self.repo_id,
            "repo_url": self.repo_url, "commit_sha": self.commit_sha, "commit_url": self.commit_url,
            "compression_ratio": self.compression_ratio, "adapters": self.adapters, "reasons": self.reasons,
            "message": self.message, "plan": self.plan,
        }

    def outputs(self) -> Dict[str, str]:
        return {
            "changed": "true" if self.changed else "false",
            "action": self.action,
            "repo-url": self.repo_url,
            "commit-sha": self.commit_sha or "",
            "compression-ratio": f"{self.compression_ratio:.4f}" if self.compression_ratio else "",
            "adapters": json.dumps(self.adapters),
        }

    def text(self) -> str:
        head = f"lorashare sync: {self.repo_id}: {self.action}"
        lines = [head + (" (dry run, nothing pushed)" if self.dry_run else "")]
        for name, p in self.plan.items():
            fp = p.get("fingerprint") or p.get("previous") or ""
            lines.append(f"  {name:<20} {p['status']:<10} {p['source']}  {fp[:10]}")
        lines.append("  " + "; ".join(self.reasons))
        if self.compression_ratio:
            lines.append(f"  compression ratio {self.compression_ratio:.2f}x (bases counted)")
        if self.commit_sha:
            lines.append(f"  pushed {self.commit_sha[:10]}: {self.commit_url or self.repo_url}")
        elif not self.dry_run:
            lines.append("  no commit")
        return "\n".join(lines)


@dataclass
class CheckResult:
    """What ``sync --check`` found; ``to_json()`` is the ``--json`` payload, ``ok`` is False on any problem."""

    config: str
    repo_id: str
    adapters: Dict[str, Dict[str, Any]]
    problems: List[LoraShareError]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"check": True, "ok": self.ok, "config": self.config, "repo_id": self.repo_id,
                               "adapters": self.adapters,
                               "problems": [{"adapter": p.adapter, "file": getattr(p, "file", None),
                                             "line": getattr(p, "line", None), "type": type(p).__name__,
                                             "message": str(p)} for p in self.problems]}
        if self.problems:  # the shape of every other --json error, for readers that look only there
            out.update(error=str(self.problems[0]), type=type(self.problems[0]).__name__)
        return out

    def text(self) -> str:
        folders = sum(1 for a in self.adapters.values() if a["kind"] == "folder")
        if self.problems:
            return "\n".join(f"lorashare sync: error: {p}" for p in self.problems)
        hubs = len(self.adapters) - folders
        head = f"lorashare sync --check: {self.config}: ok: {self.repo_id}, {folders} adapter folders read and compatible"
        lines = [head + (f", {hubs} Hub ids checked for syntax only (not resolved)" if hubs else "") + "; nothing sent"]
        lines += [f"  note: {self.config}:{a['line']}: adapters.{n}: {a['note']}"
                  for n, a in self.adapters.items() if a.get("note")]
        return "\n".join(lines)


def check_sync(config: str = "lorashare.yaml", *, json_mode: bool = False, out: Optional[IO[str]] = None) -> CheckResult:
    """Validate a manifest and its adapter folders offline: no Hub request, no token, nothing written.

    Raises :class:`ManifestError` (a ``ConfigError``) for a bad manifest; problems with the adapter
    folders come back in the result (``ok`` False), each naming the manifest's file and line.  Under
    GitHub Actions each is also an ``::error`` annotation.

    Example:
        >>> check_sync("examples/lorashare.yaml").ok  # doctest: +SKIP
        True
    """
    gha = os.environ.get("GITHUB_ACTIONS") == "true"
    rep = Reporter(gha=gha, stream=out or (sys.stderr if json_mode else sys.stdout))
    try:
        manifest = load_manifest(config)
    except LoraShareError as exc:
        rep.error(str(exc).replace("\n", " "), file=getattr(exc, "file", None), line=getattr(exc, "line", None))
        raise
    adapters, problems = check_sources(manifest)
    for p in problems:
        rep.error(str(p).replace("\n", " "), file=getattr(p, "file", None), line=getattr(p, "line", None))
    return CheckResult(config=manifest.file, repo_id=manifest.repo_id, adapters=adapters, problems=problems)


def _credentials(repo_id: str, rep: Reporter) -> Optional[str]:
    """HF_TOKEN, else a short-lived token from trusted publishing (OIDC) on a CI runner, else None."""
    token = os.environ.get("HF_TOKEN") or None
    if token:
        return token
    on_runner = bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") and os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"))
    if not (on_runner or os.environ.get("HF_OIDC_ID_TOKEN")):
        return None
    token = hub.trusted_publishing_token(repo_id)  # errors are redacted and reported by run_sync
    rep.mask(token)
    return token


def run_sync(config: str = "lorashare.yaml", *, dry_run: bool = False, force: bool = False,
             progress: bool = True, json_mode: bool = False, out: Optional[IO[str]] = None) -> SyncResult:
    """Plan and apply; report to GitHub Actions when ``GITHUB_ACTIONS=true``.  Returns the result.

    Raises a :class:`LoraShareError` on failure, after reporting it (``::error::``, job summary).
    Workflow commands go to stdout, or to stderr with ``json_mode`` (stdout then holds one JSON object).
    """
    gha = os.environ.get("GITHUB_ACTIONS") == "true"
    stream = out or (sys.stderr if json_mode else sys.stdout)
    rep = Reporter(gha=gha, stream=stream)
    rep.mask(os.environ.get("HF_TOKEN"))  # before anything else is printed
    for alias in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        rep.mask(os.environ.get(alias))
    _use_runner_temp()
    progress = progress and not gha
    if not progress:
        hub.disable_progress_bars()
    try:
        return _run(config, dry_run=dry_run, force=force, progress=progress, rep=rep)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = rep.redact(str(exc) or type(exc).__name__)
        if isinstance(exc, LoraShareError):
            exc.message = text
            exc.args = (text,)
        rep.error(text.replace("\n", " "), file=getattr(exc, "file", None), line=getattr(exc, "line", None))
        rep.summary(f"## lorashare sync failed\n\n{md_cell(text)}\n")
        raise


def _use_runner_temp() -> None:
    """On a runner, temporary files go under ``$RUNNER_TEMP`` (never into the workspace)."""
    rt = os.environ.get("RUNNER_TEMP")
    if rt and os.path.isdir(rt):
        tempfile.tempdir = rt


def _run(config: str, *, dry_run: bool, force: bool, progress: bool, rep: Reporter) -> SyncResult:
    rep.group("lorashare sync: plan")
    try:
        manifest = load_manifest(config)
        token = os.environ.get("HF_TOKEN") or None
        if not dry_run:
            token = _credentials(manifest.repo_id, rep)
            if token is None:
                raise ConfigError(
                    f"no Hugging Face token to push to {manifest.repo_id}: set the action's hf-token input "
                    "(hf-token: ${{ secrets.HF_TOKEN }}) or the HF_TOKEN environment variable, or use trusted "
                    "publishing (job permissions: id-token: write). --dry-run needs no token.")
        fingerprints = fingerprint_sources(manifest, token=token)
        published, base_sha = read_published(manifest.repo_id, token=token)
        plan = plan_sync(manifest, fingerprints, published, base_sha=base_sha, force=force)
        for a in plan.adapters:
            logger.info("%s: %s (%s)", a.name, a.status, a.reason or a.fingerprint)
        rep.command(f"lorashare sync: {manifest.repo_id}: {plan.action}: {'; '.join(plan.reasons)}")
    finally:
        rep.endgroup()

    repo_url = f"{hub.endpoint()}/{manifest.repo_id}"
    share = None
    result = SyncResult(
        repo_id=manifest.repo_id, repo_url=repo_url, action=plan.action, changed=plan.changed, dry_run=dry_run,
        reasons=plan.reasons, adapters=list(manifest.adapters),
        plan=plan_json(plan),
    )
    if plan.changed and not dry_run:
        rep.group(f"lorashare sync: {plan.action}")
        try:
            share, reports = apply_plan(manifest, plan, fingerprints, token=token, progress=progress, say=rep.command)
        finally:
            rep.endgroup()
        message = commit_message(plan, reports)
        set_card(share, manifest)
        rep.group("lorashare sync: push")
        try:
            info = share.push_to_hub(manifest.repo_id, private=manifest.private, token=token, commit_message=message,
                                     license=manifest.card.license, parent_commit=plan.base_sha)
        finally:
            rep.endgroup()
        result.commit_sha = getattr(info, "oid", None)
        result.commit_url = getattr(info, "commit_url", None)
        result.message = message
        result.reasons = plan.reasons
        result.action = plan.action
        result.plan = plan_json(plan)
        result.adapters = list(share.adapter_names)
    elif plan.changed:
        result.message = commit_message(plan)
    if share is not None:
        result.compression_ratio = share.config.compression_stats.get("compression_ratio")
    elif published is not None and isinstance(published.compression_stats, dict) and not plan.changed:
        result.compression_ratio = published.compression_stats.get("compression_ratio")
    rep.outputs(result.outputs())
    rep.summary(summary_markdown(result, plan, share, published))
    return result
