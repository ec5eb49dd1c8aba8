"""Every call to the Hugging Face Hub, in one place.

Ids are validated before any request.  The endpoint, token and offline mode are
read at call time (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), not at
import, so they can be set late; every call goes through ``HfApi(endpoint=...)``
or passes ``endpoint=`` explicitly.  Downloads use the normal HF cache
(``HF_HOME``) and fetch only the files needed (``allow_patterns``).  Transient
failures (5xx, timeouts, dropped connections) are retried with backoff.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from .errors import AdapterNotFoundError, CheckpointNotFoundError, HubError, HubNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["HubRef", "parse_adapter_id", "is_hub_id", "fetch_adapter", "fetch_checkpoint", "push_folder", "endpoint"]

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO = re.compile(rf"^{_NAME}/{_NAME}$")
T = TypeVar("T")


@dataclass(frozen=True)
class HubRef:
    """A parsed Hub source: ``repo_id``, optional ``subfolder`` and ``revision``."""

    repo_id: str
    subfolder: str = ""
    revision: Optional[str] = None

    def __str__(self) -> str:
        sub = f"/{self.subfolder}" if self.subfolder else ""
        return f"{self.repo_id}{sub}@{self.revision or 'main'}"


def endpoint() -> str:
    """The Hub endpoint for this call: ``HF_ENDPOINT`` if set, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _token(token: Optional[str]) -> Optional[str]:
    return token or os.environ.get("HF_TOKEN") or None


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def is_hub_id(text: str) -> bool:
    """True if ``text`` parses as ``owner/name[/sub][@rev]``."""
    try:
        parse_adapter_id(text)
        return True
    except HubError:
        return False


def parse_adapter_id(text: str) -> HubRef:
    """Parse ``owner/name``, ``owner/name@rev`` or ``owner/name/sub/folder[@rev]``.

    Example:
        >>> parse_adapter_id("acme/multi-lora/legal@v3")
        HubRef(repo_id='acme/multi-lora', subfolder='legal', revision='v3')
    """
    body, _, rev = text.partition("@")
    parts = body.strip("/").split("/")
    if len(parts) < 2 or not _REPO.match("/".join(parts[:2])) or (_ and not rev):
        raise HubError(
            f"{text!r} is not a local folder and not a Hub id (expected owner/name, owner/name@revision "
            "or owner/name/subfolder).",
            adapter=text,
        )
    sub = "/".join(parts[2:])
    if any(p in ("", ".", "..") for p in parts[2:]) or "\\" in sub:
        raise HubError(f"{text!r}: bad subfolder {sub!r} (no '.', '..' or empty parts).", adapter=text)
    if rev and (".." in rev or rev.startswith("/") or any(c.isspace() for c in rev)):
        raise HubError(f"{text!r}: bad revision {rev!r}.", adapter=text)
    return HubRef("/".join(parts[:2]), sub, rev or None)


def check_repo_id(repo_id: str) -> str:
    """Validate a repo id (``owner/name``) before any request."""
    if not isinstance(repo_id, str) or not _REPO.match(repo_id):
        raise HubError(
            f"{repo_id!r} is not a Hub repo id (expected owner/name with letters, digits, '.', '_' or '-').",
            path=str(repo_id),
        )
    return repo_id


def _api(token: Optional[str] = None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint(), token=_token(token))


def _translate(exc: Exception, what: str, *, kind: str = "repo") -> Exception:
    """Map huggingface_hub errors to lorashare errors that name the id."""
    from huggingface_hub import errors as hfe

    if isinstance(exc, hfe.GatedRepoError):
        return HubError(f"{what} is gated: accept its conditions on the Hub and pass a token (HF_TOKEN) that has access.", path=what)
    if isinstance(exc, hfe.RevisionNotFoundError):
        return HubNotFoundError(f"revision not found: {what}. Check the branch, tag or commit.", path=what)
    if isinstance(exc, hfe.EntryNotFoundError):
        return HubNotFoundError(f"file missing: {what}.", path=what)
    if isinstance(exc, hfe.RepositoryNotFoundError):
        return HubNotFoundError(
            f"repo not found: {what}. Check the id; for a private repo pass a token (HF_TOKEN or token=...).", path=what
        )
    if isinstance(exc, (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):
        return HubError(
            f"{what} is not in the local cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '')!r}). Download it once online, or unset HF_HUB_OFFLINE.",
            path=what,
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(f"not authorised for {what} (HTTP {status}): pass a token with access (HF_TOKEN).", path=what)
    return HubError(f"Hub request for {what} failed: {type(exc).__name__}: {_redact(str(exc))}", path=what)


def _redact(text: str) -> str:
    return re.sub(r"hf_[A-Za-z0-9]{6,}", "hf_***", text)


def _transient(exc: Exception) -> bool:
    from huggingface_hub import errors as hfe

    if isinstance(exc, (hfe.RepositoryNotFoundError, hfe.RevisionNotFoundError, hfe.EntryNotFoundError,
                        hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):
        return False
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is not None:
        return status >= 500 or status in (408, 429)
    name = type(exc).__name__.lower()
    return any(s in name for s in ("timeout", "connect", "protocol", "network", "readerror", "remote"))


def _retry(fn: Callable[[], T], what: str, *, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, then fail with the cause."""
    for i in range(attempts):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated below
            if i + 1 < attempts and _transient(exc):
                delay = base_delay * 2**i
                logger.warning("%s: %s, retrying in %.1fs (%d/%d)", what, type(exc).__name__, delay, i + 1, attempts - 1)
                time.sleep(delay)
                continue
            raise _translate(exc, what) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _snapshot(repo_id: str, revision: Optional[str], patterns: List[str], token: Optional[str]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint(), token=_token(token),
        local_files_only=_offline(),
    )


def _commit_of(folder: str) -> Optional[str]:
    """The commit sha of a cache snapshot folder (``…/snapshots/<sha>``)."""
    base = os.path.basename(os.path.normpath(folder))
    return base if re.fullmatch(r"[0-9a-f]{40}", base) else None


def _repo_cache_root(snapshot: str) -> str:
    """``models--owner--name`` above a snapshot: cached files are symlinks into its ``blobs/``."""
    return os.path.dirname(os.path.dirname(os.path.normpath(snapshot)))


def fetch_adapter(ref: HubRef, *, token: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """Download an adapter's two files into the HF cache; return ``(folder, commit sha)``."""
    check_repo_id(ref.repo_id)
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    patterns = [f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"]
    snap = _retry(lambda: _snapshot(ref.repo_id, ref.revision, patterns, token), str(ref))
    folder = os.path.join(snap, *ref.subfolder.split("/")) if ref.subfolder else snap
    _check_within(folder, _repo_cache_root(snap), str(ref))
    if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise AdapterNotFoundError(
            f"not a PEFT adapter: no adapter_config.json in {ref}. For a repo with several adapters, "
            "name the subfolder: owner/name/subfolder.",
            adapter=str(ref),
            path=str(ref),
        )
    for name in patterns:
        _check_within(os.path.join(snap, name), _repo_cache_root(snap), str(ref))
    return folder, _commit_of(snap)


def _check_within(path: str, root: str, what: str) -> None:
    if os.path.lexists(path):
        real, root_real = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, root_real]) != root_real:
            raise HubError(f"{what}: {path} resolves outside the cache ({real}); refusing it.", path=path)


def fetch_checkpoint(
    repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None, adapters: Optional[Iterable[str]] = None
) -> Tuple[str, str]:
    """Download a SHARE checkpoint (only ``adapters``' files if given); return ``(folder, jail)``.

    ``jail`` is the repo's cache root: cached files are symlinks into it, and
    nothing may resolve outside it.
    """
    from .checkpoint import CONFIG_FILE, checkpoint_files, read_config
    from .names import check_name

    try:
        ref = parse_adapter_id(repo_id)
    except HubError:
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {repo_id!r}: not a local folder and not a Hub repo id (owner/name).", path=repo_id
        ) from None
    if ref.subfolder:
        raise CheckpointNotFoundError(f"{repo_id!r}: checkpoints live at a repo's root, not in a subfolder.", path=repo_id)
    revision = revision or ref.revision
    what = f"{ref.repo_id}@{revision or 'main'}"
    snap = _retry(lambda: _snapshot(ref.repo_id, revision, [CONFIG_FILE], token), what)
    if not os.path.isfile(os.path.join(snap, CONFIG_FILE)):
        raise CheckpointNotFoundError(f"{what} has no {CONFIG_FILE}: not a SHARE checkpoint.", path=what)
    jail = _repo_cache_root(snap)
    cfg = read_config(snap, jail=jail)
    names = None if adapters is None else [check_name(n) for n in adapters]
    files = checkpoint_files(cfg, names)
    if cfg.format_version == 0:  # 0.1.x: file list unknown, take the adapters' folders
        files = [CONFIG_FILE, "shared_components.safetensors"] + [f"adapters/{n}/*" for n in (names or cfg.adapter_names)]
    sha = _commit_of(snap) or revision
    snap = _retry(lambda: _snapshot(ref.repo_id, sha, files + ["README.md"], token), what)
    return snap, jail


def push_folder(
    folder: str,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: Optional[str] = None,
    create_pr: bool = False,
    revision: Optional[str] = None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; return the ``CommitInfo``.

    Files of adapters no longer in the checkpoint are deleted in the same commit.
    """
    check_repo_id(repo_id)
    api = _api(token)
    if _offline():
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set.", path=repo_id)
    _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), repo_id)
    return _retry(
        lambda: api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message or "Upload SHARE checkpoint",
            create_pr=create_pr, revision=revision, delete_patterns=["adapters/**"],
        ),
        repo_id,
        attempts=2,
    )
