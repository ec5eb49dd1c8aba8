"""Every call to the Hugging Face Hub, in one place.

Ids are validated before any request.  The endpoint, token and offline mode are
read at call time (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``), not at
import, so they can be set late; every call goes through ``HfApi(endpoint=...)``
or passes ``endpoint=`` explicitly.  Downloads use the normal HF cache
(``HF_HOME``) and fetch only the files needed (``allow_patterns``).  Transient
failures (5xx, timeouts, dropped connections) are retried with backoff, logged
at DEBUG level.

One deadline per operation.  Each public function here (a fetch of an adapter,
of a checkpoint's config then its files, a push, ``resolve_revision``,
``remote_sizes``, ``push_space``...) has ``DEFAULT_TIMEOUT`` = 60 seconds in all,
every retry and every request of huggingface_hub included; ``timeout=`` or the
environment variable ``LORASHARE_HUB_TIMEOUT`` (seconds, read at call time)
changes it.  When it passes, the operation fails with one :class:`HubError` line.
Why hooks: huggingface_hub 2.x sends most API calls (``model_info``,
``create_commit``...) with no timeout at all, file requests with
``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` (10 s per read, read at
import), and retries on its own (``http_backoff``: 5 retries, 1 to 8 s apart;
``http_get``: 5 resumes), none of it settable per call.  So lorashare wraps its
HTTP client (``set_client_factory``) with two event hooks.  A request of an
operation (tagged by a header that never leaves the machine, or made from the
operation's own thread) gets timeouts no longer than what is left, is refused
once nothing is left (so huggingface_hub's retries stop too), and its body is cut
when the deadline passes while it trickles in.  huggingface_hub's retry warnings
are demoted to DEBUG meanwhile.  Not covered: transfers that bypass httpx
(``hf_xet``), which stop at their next Hub request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, TypeVar

from ..errors import (
    AdapterNotFoundError,
    CheckpointNotFoundError,
    ConfigError,
    HubAuthError,
    HubConflictError,
    HubError,
    HubNotFoundError,
    HubTimeoutError,
    IntegrityError,
    LoraShareError,
)
from ..utils.names import is_within

logger = logging.getLogger(__name__)

__all__ = [
    "snapshot_commit",
    "disable_progress_bars",
    "cache_roots",
    "HubRef",
    "parse_adapter_id",
    "is_hub_id",
    "is_local_path",
    "fetch_adapter",
    "fetch_checkpoint",
    "fetch_files",
    "fetch_verified",
    "push_folder",
    "endpoint",
    "remote_sizes",
    "trusted_publishing_token",
    "push_space",
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "hub_timeout",
    "push_saved",
]

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO = re.compile(rf"^{_NAME}/{_NAME}$")
T = TypeVar("T")


# ------------------------------------------------------------------------------ one deadline per operation

DEFAULT_TIMEOUT = 60.0
"""Seconds one Hub operation may take in all (every retry and request included): 60.

``timeout=`` of the public functions, or ``LORASHARE_HUB_TIMEOUT`` (read at call time), changes it.
"""

TIMEOUT_ENV = "LORASHARE_HUB_TIMEOUT"

_TAG = "X-Lorashare-Deadline"  # carries the deadline to huggingface_hub's worker threads; stripped before sending
_KEY = "lorashare_deadline"  # request extension: the deadline of a tagged request, for the response hook
_RETRY_NOISE = re.compile(r"thrown while requesting|Retrying in|Rate limited\. Waiting|Trying to resume download|"
                          r"Max retries exceeded|No local file found\. Retrying")
_HF_RETRY_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.file_download")


def hub_timeout(timeout: Optional[float] = None) -> float:
    """The deadline of one Hub operation in seconds: ``timeout``, else ``LORASHARE_HUB_TIMEOUT``, else 60.

    Example:
        >>> hub_timeout(5), hub_timeout()  # doctest: +SKIP
        (5.0, 60.0)
    """
    raw: Any = timeout
    where = "timeout="
    if raw is None:
        raw, where = os.environ.get(TIMEOUT_ENV, "").strip() or DEFAULT_TIMEOUT, f"{TIMEOUT_ENV}="
    try:
        seconds = float(raw)
    except (TypeError, ValueError):
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigError(f"{where}{raw!r} is not a number of seconds above 0 (the deadline of one Hub operation, "
                          f"default {DEFAULT_TIMEOUT:g}); set it to e.g. 120.")
    return seconds


@dataclass(frozen=True)
class _Deadline:
    """When an operation must be over (``time.monotonic`` time), and what to tell the user then."""

    seconds: float
    end: float
    upload: bool = False

    def left(self) -> float:
        return self.end - time.monotonic()


class _Expired(Exception):
    """Raised inside huggingface_hub's calls once the deadline passed: no httpx type, so no retry catches it."""


_LOCAL = threading.local()
_ACTIVE: Dict[int, _Deadline] = {}  # id -> deadline of the operations running now (any thread)
_STATE_LOCK = threading.Lock()


def _current() -> Optional[_Deadline]:
    return getattr(_LOCAL, "deadline", None)


@contextlib.contextmanager
def _operation(timeout: Optional[float] = None, *, upload: bool = False) -> Iterator[_Deadline]:
    """Run one Hub operation under one deadline; a nested call keeps the outer, earlier one."""
    outer = _current()
    if outer is not None and timeout is None:  # a step of the running operation
        yield outer
        return
    seconds = hub_timeout(timeout)
    end = time.monotonic() + seconds
    if outer is not None and outer.end <= end:
        yield outer
        return
    deadline = _Deadline(seconds, end, upload)
    _install_hooks()
    _LOCAL.deadline = deadline
    with _STATE_LOCK:
        _ACTIVE[id(deadline)] = deadline
    try:
        yield deadline
    finally:
        _LOCAL.deadline = outer
        with _STATE_LOCK:
            _ACTIVE.pop(id(deadline), None)


def _tag() -> Dict[str, str]:
    """Headers for huggingface_hub calls: the deadline, for requests made in its worker threads."""
    deadline = _current()
    return {_TAG: repr(deadline.end)} if deadline is not None else {}


def _deadline_of(request: Any) -> Optional[float]:
    """The deadline a request runs under: its tag (removed: it never leaves the machine), or its thread's."""
    tagged = request.headers.get(_TAG)
    if tagged is not None:
        del request.headers[_TAG]
        try:
            return float(tagged)
        except ValueError:
            return None
    deadline = _current()
    return deadline.end if deadline is not None else None


def _clamp(timeouts: Any, left: float) -> Dict[str, Optional[float]]:
    """httpx's per-phase timeouts, none longer than ``left`` (huggingface_hub often sends none at all)."""
    given = timeouts if isinstance(timeouts, dict) else {}
    out: Dict[str, Optional[float]] = {}
    for phase in ("connect", "read", "write", "pool"):
        value = given.get(phase)
        out[phase] = left if value is None else min(float(value), left)
    return out


def _on_request(request: Any) -> None:
    """httpx request hook: no request of an operation may outlive its deadline, nor start after it."""
    end = _deadline_of(request)
    tagged = end is not None
    if not tagged:
        # From another thread, untagged (huggingface_hub's LFS upload workers): while operations run, no such
        # request waits or starts past the latest of their deadlines. Its body is not cut: it may not be ours.
        with _STATE_LOCK:
            end = max((d.end for d in _ACTIVE.values()), default=None)
        if end is None:
            return
    left = end - time.monotonic()
    if left <= 0:
        raise _Expired(f"deadline passed before {request.method} {request.url.path}")
    request.extensions["timeout"] = _clamp(request.extensions.get("timeout"), left)
    if tagged:
        request.extensions[_KEY] = end


def _on_response(response: Any) -> None:
    """httpx response hook: cut a body that trickles past the deadline; refuse a wait that would pass it."""
    end = response.request.extensions.get(_KEY)
    if end is None:
        return
    wait = _asked_wait(response)
    if wait is not None and wait + 1 >= end - time.monotonic():  # huggingface_hub sleeps one second more
        response.close()
        raise _Expired(f"the Hub asks to retry in {wait:g} s (HTTP {response.status_code})")
    response.stream = _deadline_stream(response.stream, end)


def _asked_wait(response: Any) -> Optional[float]:
    """Seconds the Hub asks a client to wait before retrying (``Retry-After``, rate limits), if any."""
    if response.status_code not in (429, 503):
        return None
    from huggingface_hub.utils import parse_ratelimit_headers

    retry_after = str(response.headers.get("Retry-After", "")).strip()
    if retry_after.isdigit():
        return float(retry_after)
    limit = parse_ratelimit_headers(response.headers)
    if response.status_code == 429 and limit is not None and limit.remaining == 0:
        return float(limit.reset_in_seconds)
    return None


_STREAM_CLASS: Any = None


def _deadline_stream(inner: Any, end: float) -> Any:
    """``inner`` (a response body) as one that stops at the deadline, however steadily its bytes arrive."""
    global _STREAM_CLASS
    if _STREAM_CLASS is None:
        import httpx2  # huggingface_hub's HTTP client: imported here, when a request is already on its way

        class DeadlineStream(httpx2.SyncByteStream):
            def __init__(self, inner: Any, end: float) -> None:
                self._inner, self._end = inner, end

            def __iter__(self) -> Iterator[bytes]:
                try:
                    for chunk in self._inner:
                        if time.monotonic() >= self._end:
                            raise _Expired("deadline passed while the answer was still arriving")
                        yield chunk
                except Exception as exc:  # a read the deadline cut short: no retry can help
                    if time.monotonic() >= self._end and not isinstance(exc, _Expired):
                        raise _Expired(f"deadline passed while reading ({type(exc).__name__})") from exc
                    raise

            def close(self) -> None:
                self._inner.close()

        _STREAM_CLASS = DeadlineStream
    return _STREAM_CLASS(inner, end)


class _QuietRetries(logging.Filter):
    """During lorashare's Hub operations, huggingface_hub's retry warnings go to lorashare's DEBUG log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not _ACTIVE:
            return True
        message = record.getMessage()
        if not _RETRY_NOISE.search(message):
            return True
        logger.debug("huggingface_hub: %s", redact(message.splitlines()[0] if message else message))
        return False


_HOOKED = False


def _install_hooks() -> None:
    """Wrap huggingface_hub's HTTP client factory (the user's own, if set) with the deadline hooks, once."""
    global _HOOKED
    from huggingface_hub.utils import _http as hf_http
    from huggingface_hub.utils import set_client_factory

    with _STATE_LOCK:
        current = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", None)
        if current is None or getattr(current, "_lorashare_deadline", False):
            return
        if not _HOOKED:
            for name in _HF_RETRY_LOGGERS:
                logging.getLogger(name).addFilter(_QuietRetries())
            _HOOKED = True

        def factory() -> Any:
            client = current()
            hooks = client.event_hooks
            client.event_hooks = {"request": [*hooks.get("request", []), _on_request],
                                  "response": [_on_response, *hooks.get("response", [])]}
            return client

        factory._lorashare_deadline = True  # type: ignore[attr-defined]
        set_client_factory(factory)  # also closes the current client: the next request gets a hooked one


def _timed_out(deadline: _Deadline, what: str, tries: int, exc: Optional[BaseException]) -> HubError:
    """The one line for a deadline that passed."""
    said = [f"{tries} attempts"] if tries > 1 else []
    if exc is not None and not _expired(exc):
        said.append(f"last: {_server_says(exc)}")
    detail = f" ({'; '.join(said)})" if said else ""
    fix = "or try again later" if deadline.upload else "or HF_HUB_OFFLINE=1 to use the cache"
    return HubTimeoutError(
        f"the Hub did not answer within {deadline.seconds:g} s for {what}{detail}: set {TIMEOUT_ENV} "
        f"to wait longer, {fix}.",
        path=what,
    )


def _expired(exc: BaseException) -> bool:
    """True if ``exc`` is, or was caused by, a deadline that passed (huggingface_hub may wrap it)."""
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 10:
        if isinstance(cur, _Expired):
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


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


def is_local_path(text: str, *, base: Optional[str] = None) -> bool:
    """True if ``text`` is to be read as a local path, never as a Hub id; no request is made.

    Absolute paths, ``.``/``..``/``~`` and paths starting with ``./``, ``../`` or ``~``; paths
    with a ``.`` or ``..`` part, a wildcard (``*``, ``?``, ``[``: a shell pattern that matched
    nothing) or a separator a Hub id cannot hold (``\\`` on Windows); and paths whose leading
    folders exist (relative to ``base``, default the current folder): with ``examples/adapters/``
    here, ``examples/adapters/task9`` is a missing folder (a typo), not a Hub repo.

    Example:
        >>> is_local_path("/data/share_ckpt"), is_local_path("./ckpt"), is_local_path("acme/share")
        (True, True, False)
    """
    seps = {os.sep, os.altsep or os.sep} - {"/"}
    if (
        os.path.isabs(text)
        or text in (".", "..")
        or text.startswith(("~", "./", "../") + tuple(f"{d}{sep}" for d in (".", "..") for sep in seps))
        or any(sep in text for sep in seps)
        or any(c in text for c in "*?[")
    ):
        return True
    parts = text.split("@", 1)[0].split("/")
    if any(p in (".", "..") for p in parts):
        return True
    leading = [p for p in parts[:-1] if p]
    return bool(leading) and "\x00" not in text and os.path.isdir(os.path.join(base or os.curdir, *leading))


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

    return HfApi(endpoint=endpoint(), token=_token(token), headers=_tag())


def _status(exc: BaseException) -> Optional[int]:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _server_says(exc: BaseException) -> str:
    """The first line of an error, tokens redacted: ``HTTP 503: Server error '503 Service Unavailable' for url …``."""
    first = redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"HTTP {_status(exc)}: {first[:200]}" if _status(exc) is not None else f"{type(exc).__name__}: {first[:200]}"


def _translate(exc: BaseException, what: str, *, tries: int = 1) -> LoraShareError:
    """Map huggingface_hub errors to lorashare errors that name the id and say how to fix it."""
    from huggingface_hub import errors as hfe

    after = f" after {tries} attempts" if tries > 1 else ""
    if isinstance(exc, hfe.GatedRepoError):
        return HubAuthError(f"{what} is gated: accept its conditions on the Hub and pass a token (HF_TOKEN) that has access.",
                            path=what, problem=f"{what} is gated: accept its conditions on the Hub first.")
    if isinstance(exc, hfe.RevisionNotFoundError):
        return HubNotFoundError(f"revision not found: {what}. Check the branch, tag or commit.", path=what)
    if isinstance(exc, hfe.RepositoryNotFoundError):
        return HubNotFoundError(
            f"repo not found: {what}. Check the id; for a private repo pass a token (HF_TOKEN or token=...).", path=what,
            problem=f"repo not found: {what}.",
        )
    if isinstance(exc, (hfe.LocalEntryNotFoundError, hfe.OfflineModeIsEnabled)):
        # snapshot_download reports *any* failure to reach the Hub (5xx, dropped connection) as
        # "not in the cache"; only call it offline when it is.
        cause = exc.__cause__
        if cause is not None and not _offline() and not isinstance(cause, hfe.OfflineModeIsEnabled):
            return _translate(cause, what, tries=tries)
        partly = "only partly" if isinstance(exc, getattr(hfe, "IncompleteSnapshotError", ())) else "not"
        return HubError(
            f"{what} is {partly} in the local cache ({_cache_dir()}) and offline mode is on (HF_HUB_OFFLINE): "
            "download it once online, or unset HF_HUB_OFFLINE.",
            path=what,
        )
    if isinstance(exc, hfe.EntryNotFoundError):
        return HubNotFoundError(f"file missing: {what}.", path=what)
    status = _status(exc)
    if status in (401, 403):
        return HubAuthError(f"not authorised for {what} (HTTP {status}): pass a token with access (HF_TOKEN or token=...).",
                            path=what, problem=f"not authorised for {what} (HTTP {status}).")
    if status is not None and (status >= 500 or status in (408, 429)):
        return HubError(
            f"the Hub failed for {what}{after} ({_server_says(exc)}). It may be down or overloaded: try again later.",
            path=what,
        )
    if _transient(exc):
        current = _current()
        fix = "try again later" if current is not None and current.upload else "set HF_HUB_OFFLINE=1 to use the cache only"
        return HubError(
            f"cannot reach the Hub at {endpoint()} for {what}{after} ({_server_says(exc)}). Check the network and "
            f"HF_ENDPOINT, or {fix}.",
            path=what,
        )
    return HubError(f"Hub request for {what} failed: {_server_says(exc)}", path=what)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def redact(text: str) -> str:
    """Hide anything that looks like a Hugging Face token (``hf_…``) in ``text``."""
    return re.sub(r"hf_[A-Za-z0-9_]{6,}", "hf_***", text)


def _transient(exc: BaseException) -> bool:
    """True for failures worth retrying: 5xx, 408, 429, timeouts, dropped connections."""
    from huggingface_hub import errors as hfe

    if isinstance(exc, hfe.LocalEntryNotFoundError):
        cause = exc.__cause__  # snapshot_download wraps the real failure
        return cause is not None and not _offline() and _transient(cause)
    if isinstance(exc, (hfe.RepositoryNotFoundError, hfe.RevisionNotFoundError, hfe.EntryNotFoundError,
                        hfe.OfflineModeIsEnabled)):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    name = type(exc).__name__.lower()
    return any(s in name for s in ("timeout", "connect", "protocol", "network", "readerror", "remote"))


def _retry(fn: Callable[[], T], what: str, *, attempts: int = 4, base_delay: float = 0.5) -> T:
    """Call ``fn``; retry transient failures with exponential backoff, within the operation's deadline."""
    with _operation() as deadline:
        for i in range(attempts):
            try:
                return fn()
            except LoraShareError:
                raise
            except Exception as exc:  # noqa: BLE001 - translated below
                if _expired(exc) or deadline.left() <= 0:
                    raise _timed_out(deadline, what, i + 1, exc) from exc
                if _transient(exc) and i + 1 < attempts:
                    delay = base_delay * 2**i
                    if delay >= deadline.left():  # the next try would start after the deadline
                        raise _timed_out(deadline, what, i + 1, exc) from exc
                    logger.debug("%s: %s, retrying in %.1fs (%d/%d)", what, type(exc).__name__, delay, i + 1, attempts - 1)
                    time.sleep(delay)
                    continue
                raise _translate(exc, what, tries=i + 1) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _snapshot(repo_id: str, revision: Optional[str], patterns: List[str], token: Optional[str]) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(
        repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint(), token=_token(token),
        local_files_only=_offline(), headers=_tag(),
    )


def _commit_of(folder: str) -> Optional[str]:
    """The commit sha of a cache snapshot folder (``…/snapshots/<sha>``)."""
    base = os.path.basename(os.path.normpath(folder))
    return base if re.fullmatch(r"[0-9a-f]{40}", base) else None


def snapshot_commit(folder: str) -> Optional[str]:
    """The commit a folder from :func:`fetch_checkpoint` holds (``None`` for a local folder).

    Example:
        >>> snapshot_commit("/cache/models--acme--ckpt/snapshots/" + "0" * 40)
        '0000000000000000000000000000000000000000'
    """
    return _commit_of(folder)


def _repo_cache_root(snapshot: str) -> str:
    """``models--owner--name`` above a snapshot: cached files are symlinks into its ``blobs/``."""
    return os.path.dirname(os.path.dirname(os.path.normpath(snapshot)))


def fetch_adapter(
    ref: HubRef, *, token: Optional[str] = None, timeout: Optional[float] = None
) -> Tuple[str, Optional[str]]:
    """Download an adapter's two files into the HF cache; return ``(folder, commit sha)``.

    ``timeout``: seconds for the whole fetch (default ``LORASHARE_HUB_TIMEOUT``, else 60).
    """
    check_repo_id(ref.repo_id)
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    patterns = [f"{prefix}adapter_config.json", f"{prefix}adapter_model.safetensors"]
    with _operation(timeout):
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
    if os.path.lexists(path) and not is_within(path, root):
        raise HubError(f"{what}: {path} resolves outside the cache ({os.path.realpath(path)}); refusing it.", path=path)


def fetch_checkpoint(
    repo_id: str, *, revision: Optional[str] = None, token: Optional[str] = None, adapters: Optional[Iterable[str]] = None,
    timeout: Optional[float] = None,
) -> Tuple[str, str]:
    """Download a SHARE checkpoint (only ``adapters``' files if given); return ``(folder, jail)``.

    ``jail`` is the repo's cache root: cached files are symlinks into it, and
    nothing may resolve outside it.  ``timeout``: seconds for the config and the files
    together (default ``LORASHARE_HUB_TIMEOUT``, else 60).
    """
    from ..format.checkpoint import CONFIG_FILE, checkpoint_files, read_config
    from ..utils.names import check_name

    if os.path.exists(repo_id):  # the caller found no folder there
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {repo_id}: it is a file, not a folder. Give the checkpoint folder "
            f"(the one that holds {CONFIG_FILE}).", path=repo_id,
        )
    if is_local_path(repo_id):
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {repo_id}: the folder does not exist. Check the path "
            "(a Hub repo id looks like owner/name).", path=repo_id,
        )
    try:
        ref = parse_adapter_id(repo_id)
    except HubError:
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {repo_id!r}: not a local folder and not a Hub repo id (owner/name).", path=repo_id
        ) from None
    if ref.subfolder:
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {repo_id!r}: there is no such local folder, and as a Hub id it names a "
            "subfolder, but checkpoints live at a repo's root (owner/name).", path=repo_id,
        )
    revision = revision or ref.revision
    what = f"{ref.repo_id}@{revision or 'main'}"
    names = None if adapters is None else [check_name(n) for n in adapters]
    with _operation(timeout):  # one deadline for the config and the files
        snap = _retry(lambda: _snapshot(ref.repo_id, revision, [CONFIG_FILE], token), what)
        if not os.path.isfile(os.path.join(snap, CONFIG_FILE)):
            raise CheckpointNotFoundError(f"{what} has no {CONFIG_FILE}: not a SHARE checkpoint.", path=what)
        jail = _repo_cache_root(snap)
        cfg = read_config(snap, jail=jail)
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
    parent_commit: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` in one commit; return the ``CommitInfo``.

    Files under ``adapters/`` that the checkpoint no longer has are deleted in the same commit.
    A missing ``revision`` branch is created from main.  With ``parent_commit``, nothing is
    pushed unless the branch is still at that commit (the check and the commit are one: the
    Hub refuses a commit whose parent is not the head).  One ``create_commit``, not
    ``upload_folder``: with ``hf_xet`` installed, ``upload_folder`` may split a large folder
    into several commits (and opens pull requests through the discussions API).
    ``timeout``: seconds for the whole push (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> push_folder("share_ckpt", "acme/support-share", private=True).commit_url  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_repo_id(repo_id)
    if _offline():
        raise HubError(f"cannot push to {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it to push.", path=repo_id)
    what = f"{repo_id}@{revision or 'main'}"
    with _operation(timeout, upload=True):
        token = _push_token(token, repo_id)  # before any request: without one, every call would fail (after retries)
        api = _api(token)
        _retry(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"), repo_id)
        head = _retry(lambda: _head(api, repo_id, revision, create=not create_pr), what)
        if parent_commit is not None and head.sha != parent_commit:
            raise HubConflictError(
                f"{what} changed since it was read: it is now at {str(head.sha)[:8]}, not at {parent_commit[:8]} "
                "(someone pushed meanwhile); nothing was pushed. Load it again and redo the change (in CI, "
                "use a concurrency group so runs do not overlap).",
                path=repo_id,
            )
        local = _folder_files(folder)
        remote = {s.rfilename for s in head.siblings or []}
        ops: List[Any] = [CommitOperationDelete(path_in_repo=p) for p in sorted(remote)
                          if p.startswith("adapters/") and p not in local]
        ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path) for rel, path in sorted(local.items())]
        return _retry(
            lambda: api.create_commit(
                repo_id, ops, commit_message=commit_message or "Upload SHARE checkpoint", repo_type="model",
                create_pr=create_pr, revision=revision, parent_commit=head.sha,
            ),
            what,
            attempts=2,  # parent_commit makes a retry after a lost response fail (412) instead of committing twice
        )


def _push_token(token: Optional[str], repo_id: str) -> str:
    """The token to push with: the argument, ``HF_TOKEN``, or huggingface_hub's stored login; else a clear error."""
    from huggingface_hub import get_token

    found = _token(token)
    if not found:
        try:
            found = get_token()
        except Exception as exc:  # noqa: BLE001 - e.g. an OIDC exchange the environment opted into failed
            raise HubError(f"cannot push to {repo_id}: getting a Hub token failed ({_server_says(exc)}).", path=repo_id) from exc
    if not found:
        raise HubAuthError(
            f"cannot push to {repo_id}: no Hugging Face token. Set HF_TOKEN to a token with write access, log in "
            "once with `hf auth login`, or pass token=... in Python.",
            path=repo_id, problem=f"cannot push to {repo_id}: no Hugging Face token.",
        )
    return found


def _head(api: Any, repo_id: str, revision: Optional[str], *, create: bool) -> Any:
    """``model_info`` of ``revision`` (its sha and files), creating the branch from main if asked."""
    from huggingface_hub import errors as hfe

    try:
        return api.model_info(repo_id, revision=revision)
    except hfe.RevisionNotFoundError:
        if not (create and revision) or revision.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", revision):
            raise
        api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.model_info(repo_id, revision=revision)


def _folder_files(folder: str) -> Dict[str, str]:
    """``{posix relative path: absolute path}`` of the files under ``folder``."""
    out: Dict[str, str] = {}
    for root, _dirs, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, folder).replace(os.sep, "/")] = path
    return out


def resolve_revision(ref: HubRef, *, token: Optional[str] = None, timeout: Optional[float] = None) -> str:
    """The commit sha that ``ref``'s revision (branch, tag or sha; default main) points to.

    One ``model_info`` call; nothing is downloaded.  Used by ``lorashare sync`` to fingerprint
    Hub sources.  ``timeout``: seconds in all (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> resolve_revision(parse_adapter_id("acme/refunds-lora@v3"))  # doctest: +SKIP
        '9f8e7d6c...'
    """
    check_repo_id(ref.repo_id)
    with _operation(timeout):
        api = _api(token)
        info = _retry(lambda: api.model_info(ref.repo_id, revision=ref.revision), str(ref))
    return str(info.sha)


def fetch_files(
    repo_id: str, paths: Iterable[str], *, revision: Optional[str] = None, token: Optional[str] = None,
    timeout: Optional[float] = None,
) -> str:
    """Download exactly ``paths`` (file names at the repo's root) of a model repo; return the snapshot folder.

    No patterns: a name with a folder, ``..`` or a wildcard is refused.  Each file must resolve
    inside the repo's cache.  Used for a base model's ``config.json`` before any weight is
    fetched, then for its safetensors and tokenizer files (``remote_sizes`` checks sizes and
    access first).  Names missing from the repo are simply not there afterwards.  ``timeout``:
    seconds in all (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> folder = fetch_files("acme/tiny-bert", ["config.json"])  # doctest: +SKIP
    """
    check_repo_id(repo_id)
    wanted = list(paths)
    for p in wanted:
        if not isinstance(p, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", p):
            raise HubError(f"{repo_id}: {p!r} is not a file name at the repo's root; refusing to fetch it.", path=str(p))
    what = f"{repo_id}@{revision or 'main'}"
    with _operation(timeout):
        snap = _retry(lambda: _snapshot(repo_id, revision, wanted, token), what)
    for p in wanted:
        _check_within(os.path.join(snap, p), _repo_cache_root(snap), what)
    return snap


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REPO_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


def fetch_verified(
    repo_id: str, commit: str, files: Mapping[str, str], store: str, *, token: Optional[str] = None,
    timeout: Optional[float] = None,
) -> Dict[str, str]:
    """Download ``files`` (``{path in the repo: sha256}``) of ``repo_id`` at ``commit`` into a content store.

    Each file is kept as ``store/<sha256>``, and only once its bytes matched that sha256, so the
    store never holds an unverified file and a file already in it is never downloaded again,
    whichever repo or revision it came from.  One GET per missing file (no metadata request):
    for a server that fetches one adapter's few files at a time, the HEAD requests of the Hugging
    Face cache would double the round trips.  Returns ``{path: stored file}``.  ``timeout``:
    seconds in all (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> fetch_verified("acme/support-share", "9f8e7d6c" * 5, {"adapters/refunds/loadings.safetensors": "ab12..."},
        ...                "/srv/cache/.blobs")  # doctest: +SKIP
        {'adapters/refunds/loadings.safetensors': '/srv/cache/.blobs/ab12...'}
    """
    check_repo_id(repo_id)
    if not re.fullmatch(r"[0-9a-f]{40}", str(commit)):
        raise HubError(f"{repo_id}: {commit!r} is not a commit sha; resolve the revision first.", path=repo_id)
    what = f"{repo_id}@{commit[:8]}"
    for path, sha in files.items():
        if not _REPO_PATH.match(path) or ".." in path.split("/") or not _SHA256.match(str(sha)):
            raise HubError(f"{what}: refusing to fetch {path!r} (sha256 {sha!r}): not a plain path with a sha256.",
                           path=str(path))
    os.makedirs(store, exist_ok=True)
    out: Dict[str, str] = {}
    with _operation(timeout):
        for path, sha in files.items():
            dest = os.path.join(store, sha)
            if not os.path.isfile(dest):
                _retry(lambda p=path, h=sha, d=dest: _get_verified(repo_id, commit, p, h, d, token), f"{what}: {path}")
            out[path] = dest
    return out


def _get_verified(repo_id: str, commit: str, path: str, sha: str, dest: str, token: Optional[str]) -> None:
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    _install_hooks()
    url = hf_hub_url(repo_id, path, revision=commit, endpoint=endpoint())
    headers = {**build_hf_headers(token=_token(token)), **_tag()}
    tmp = f"{dest}.tmp-{os.getpid()}-{threading.get_ident()}"
    digest = hashlib.sha256()
    try:
        with get_session().stream("GET", url, headers=headers, follow_redirects=True) as response:
            hf_raise_for_status(response)
            with open(tmp, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        if digest.hexdigest() != sha:
            raise IntegrityError(
                f"{path} of {repo_id}@{commit[:8]} does not match its sha256 in share_config.json (corrupted or "
                "tampered file); it was not kept. Re-save and push the checkpoint.", path=f"{repo_id}/{path}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch_config(
    repo_id: str, *, token: Optional[str] = None, revision: Optional[str] = None, timeout: Optional[float] = None
) -> Tuple[Optional[Any], Optional[str]]:
    """The published ``share_config.json`` of ``repo_id`` (at ``revision``, default main) and its commit.

    Only that one JSON file is downloaded (no weights).  Returns ``(None, None)`` when the repo
    does not exist (or is private and the token cannot see it), ``(None, sha)`` when it exists
    but holds no SHARE checkpoint, else ``(SHAREConfig, sha)``.  ``timeout``: seconds in all
    (default ``LORASHARE_HUB_TIMEOUT``, else 60).
    """
    from huggingface_hub import errors as hfe

    from ..format.checkpoint import CONFIG_FILE, read_config

    check_repo_id(repo_id)
    what = f"{repo_id}@{revision or 'main'}"
    with _operation(timeout):
        api = _api(token)
        try:
            info = _retry(lambda: api.model_info(repo_id, revision=revision), what)
        except HubNotFoundError as exc:
            if isinstance(exc.__cause__, hfe.RevisionNotFoundError):
                raise
            return None, None
        sha = str(info.sha)
        if CONFIG_FILE not in {s.rfilename for s in info.siblings or []}:
            return None, sha
        snap = _retry(lambda: _snapshot(repo_id, sha, [CONFIG_FILE], token), what)
    return read_config(snap, jail=_repo_cache_root(snap)), sha


def remote_sizes(
    repo_id: str, paths: Iterable[str], *, revision: Optional[str] = None, token: Optional[str] = None,
    probe: Optional[str] = None, timeout: Optional[float] = None,
) -> Dict[str, int]:
    """``{path: bytes}`` of the files among ``paths`` that exist at ``revision``; downloads nothing.

    Also checks that ``token`` may download from the repo: listing the files refuses a private
    repo, and a HEAD request of ``probe`` (if it exists) refuses a gated one.  A server that
    shares one download cache between users needs this before every download, since
    ``snapshot_download`` serves cached files without asking the Hub.  The check uses ``token``
    (else ``HF_TOKEN``), or none at all: never a stored login, which would answer for someone else.
    ``timeout``: seconds in all (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> remote_sizes("acme/billing-lora", ["adapter_model.safetensors"], probe="adapter_model.safetensors")  # doctest: +SKIP
        {'adapter_model.safetensors': 1179928}
    """
    from huggingface_hub import HfApi, hf_hub_url

    check_repo_id(repo_id)
    wanted = list(paths)
    token = _token(token)
    what = f"{repo_id}@{revision or 'main'}"
    with _operation(timeout):
        api = HfApi(endpoint=endpoint(), token=token or False, headers=_tag())  # False: anonymous, not the stored login
        entries = _retry(lambda: api.get_paths_info(repo_id, wanted, revision=revision), what)
        sizes = {e.path: int(getattr(e, "size", 0) or 0) for e in entries if hasattr(e, "size")}
        if probe in sizes:
            url = hf_hub_url(repo_id, probe, revision=revision, endpoint=endpoint())
            _retry(lambda: api.get_hf_file_metadata(url=url, token=token or False), what)
    return sizes


def trusted_publishing_token(repo_id: str, *, timeout: Optional[float] = None) -> str:
    """A short-lived token scoped to ``repo_id``, from trusted publishing (OIDC) on a CI runner.

    huggingface_hub's public route: with ``HF_OIDC_RESOURCE`` set, ``get_token()`` mints the CI
    provider's id token (GitHub Actions: the job needs ``permissions: id-token: write``) and
    exchanges it at the Hub for a repo-scoped token.  ``HF_OIDC_RESOURCE`` is set for this call
    only, and ``HF_OIDC_ID_TOKEN`` (an id token minted elsewhere) is honoured.  ``timeout``:
    seconds for the exchange (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> trusted_publishing_token("acme/support-share")  # doctest: +SKIP
        'hf_jwt_...'
    """
    import huggingface_hub
    from huggingface_hub import constants

    check_repo_id(repo_id)
    # huggingface_hub exchanges at the endpoint it read at import; it must be the one lorashare pushes to.
    if constants.ENDPOINT.rstrip("/") != endpoint():
        raise ConfigError(
            f"HF_ENDPOINT is {endpoint()} but huggingface_hub was imported with {constants.ENDPOINT}: trusted "
            "publishing would exchange the token at the wrong Hub. Set HF_ENDPOINT before Python starts.")
    saved = os.environ.get("HF_OIDC_RESOURCE")
    os.environ["HF_OIDC_RESOURCE"] = repo_id
    try:
        with _operation(timeout, upload=True) as deadline:
            try:
                token = huggingface_hub.get_token()
            except Exception as exc:  # noqa: BLE001 - translated below
                if _expired(exc) or deadline.left() <= 0:
                    raise _timed_out(deadline, f"the token exchange for {repo_id}", 1, exc) from None
                raise
    except LoraShareError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the exchange, as one clear error
        said = redact(" ".join(str(getattr(exc, "server_message", "") or "").split()))[:200]
        raise HubError(
            f"trusted publishing (OIDC) failed for {repo_id}: {_server_says(exc)}{' ' + said if said else ''}. "
            "Add this workflow as a trusted publisher of the repo on the Hub (repo settings), give the job "
            "`permissions: id-token: write`, or pass a token (HF_TOKEN).", path=repo_id) from None
    finally:
        if saved is None:
            os.environ.pop("HF_OIDC_RESOURCE", None)
        else:
            os.environ["HF_OIDC_RESOURCE"] = saved
    if not token:
        raise HubError(f"trusted publishing (OIDC) gave no token for {repo_id}.", path=repo_id)
    return str(token)


def push_space(
    folder: str, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, sdk: str = "gradio", timeout: Optional[float] = None,
) -> Any:
    """Create the Space ``repo_id`` if needed and make its files exactly ``folder``'s, in one commit.

    Files of the Space that ``folder`` lacks are deleted in the same commit (except
    ``.gitattributes``); ``private`` applies when the Space is created.  Returns the ``CommitInfo``.
    ``timeout``: seconds for the whole deploy (default ``LORASHARE_HUB_TIMEOUT``, else 60).

    Example:
        >>> push_space("build/space", "acme/lorashare", private=True).commit_url  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    check_repo_id(repo_id)
    if _offline():
        raise HubError(f"cannot deploy {repo_id}: offline mode is on (HF_HUB_OFFLINE); unset it.", path=repo_id)
    what = f"spaces/{repo_id}"
    with _operation(timeout, upload=True):
        api = _api(token)
        _retry(lambda: api.create_repo(repo_id, repo_type="space", space_sdk=sdk, private=private, exist_ok=True), what)
        head = _retry(lambda: api.space_info(repo_id, files_metadata=False), what)
        local = _folder_files(folder)
        remote = {s.rfilename for s in head.siblings or []}
        ops: List[Any] = [CommitOperationDelete(path_in_repo=p) for p in sorted(remote - set(local))
                          if p != ".gitattributes"]
        ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=path) for rel, path in sorted(local.items())]
        return _retry(
            lambda: api.create_commit(
                repo_id, ops, commit_message=commit_message or "Deploy the lorashare Space", repo_type="space",
                parent_commit=head.sha,
            ),
            what,
            attempts=2,  # parent_commit makes a retry after a lost response fail (412) instead of committing twice
        )


def disable_progress_bars() -> None:
    """Turn huggingface_hub's own download bars off (CI logs, ``--json``)."""
    from huggingface_hub.utils import disable_progress_bars as off

    off()


def cache_roots() -> Dict[str, str]:
    """The folders huggingface_hub keeps files in: ``{"HF_HOME": ..., "HF_HUB_CACHE": ...}`` (for redacting paths)."""
    from huggingface_hub import constants

    return {"HF_HOME": str(constants.HF_HOME), "HF_HUB_CACHE": str(constants.HF_HUB_CACHE)}


def push_saved(save: Callable[[str], None], repo_id: str, **options: Any) -> Any:
    """Push what ``save(folder)`` writes into a fresh temporary folder to ``repo_id``, in one commit.

    ``options`` are :func:`push_folder`'s; the folder is removed afterwards, whatever happened.

    Example:
        >>> push_saved(share.save_pretrained, "acme/support-share", private=True)  # doctest: +SKIP
    """
    with tempfile.TemporaryDirectory(prefix="lorashare-push-") as tmp:
        folder = os.path.join(tmp, "ckpt")
        save(folder)
        return push_folder(folder, repo_id, **options)
