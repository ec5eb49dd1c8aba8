"""A local, in-memory, Hugging Face Hub-compatible HTTP server for offline tests.

The real ``huggingface_hub`` client (2.4) talks to :class:`HubServer` over real HTTP, so tests
exercise the same code paths as production (HEAD/GET ``/resolve``, ``/api/models/...``, NDJSON
commits, the LFS batch API) without network access. Only the standard library is used.

Typical use::

    with HubServer() as hub:
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_repo("me/adapter")
        api.upload_folder(repo_id="me/adapter", folder_path=folder)
        hf_hub_download("me/adapter", "adapter_config.json", endpoint=hub.url, cache_dir=tmp)
        assert hub.served_files("me/adapter") == {"adapter_config.json"}

What is modelled (enough for ``HfApi``, ``hf_hub_download`` and ``snapshot_download``):

* repos keyed by ``(repo_type, "ns/name")``; each keeps commits (full snapshots
  ``path -> Blob``), branches, tags and ``refs/pr/N`` pull-request refs;
* revisions: branch, tag, ``refs/heads/x``, ``refs/tags/x``, ``refs/pr/N`` or a full 40-hex sha;
* the Hub's error protocol (``X-Error-Code`` / ``X-Error-Message`` headers plus a JSON
  ``{"error": ...}`` body), which the client turns into typed exceptions;
* auth: ``required_token``, private repos, gated repos (with per-token grants);
* fault injection (``inject`` / ``inject_when``) for reliability tests, including a Hub that
  stalls, trickles its answers or resets connections;
* trusted publishing: the OIDC token exchange (``POST /oauth/token``, RFC 8693) for the repos in
  ``trusted_publishers``, and a stand-in for the GitHub Actions runtime's id-token service
  (``GET /__github/id-token``), so a run without ``HF_TOKEN`` exchanges tokens over real HTTP;
* a request log (``requests``, ``records``, ``served_files``).

Not modelled: Xet storage (never advertised, so the client always uses plain HTTP), CDN
redirects, pagination, discussions beyond PR refs, users/orgs permissions.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Optional
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "Action",
    "Blob",
    "Commit",
    "HubApiError",
    "HubServer",
    "Injection",
    "RequestRecord",
    "Repo",
    "git_blob_sha1",
]

# --------------------------------------------------------------------------------------------
# Constants and small pure helpers
# --------------------------------------------------------------------------------------------

REPO_TYPES: dict[str, str] = {"models": "model", "datasets": "dataset", "spaces": "space"}
"""URL plural -> canonical repo type, as used in ``/api/{plural}/...`` and ``/{plural}/...``."""

_URL_PREFIX: dict[str, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SHA_RE = re.compile(r"[0-9a-f]{40}")
_PR_RE = re.compile(r"refs/pr/(\d+)")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")

# What the real Hub puts in the initial commit of a new repo (abridged): tests that list files see
# the same extra entry they would see against huggingface.co.
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_sha1(content: bytes) -> str:
    """Return the git object id of ``content`` (what the Hub uses as ETag of regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Return the git-lfs pointer file git would store instead of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def hub_timestamp(when: datetime) -> str:
    """Format a datetime the way the Hub does; ``huggingface_hub.utils.parse_datetime`` needs 'Z'."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _is_true(value: str | None) -> bool:
    """Interpret a query-string flag; httpx encodes Python booleans as 'true'/'false'."""
    return value is not None and value.lower() in {"1", "true", "yes"}


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """Content of one file in one commit. ``lfs`` says whether it was committed as an LFS file."""

    content: bytes
    lfs: bool = False

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        return lfs_pointer(self.sha256, self.size)

    @property
    def git_oid(self) -> str:
        """Git blob id: of the pointer for LFS files (as in git), of the content otherwise."""
        return git_blob_sha1(self.pointer if self.lfs else self.content)

    @property
    def etag(self) -> str:
        """Unquoted ETag the Hub serves: sha256 for LFS files, git sha1 for regular ones."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    """An immutable commit: a full snapshot of the repo plus metadata."""

    oid: str
    parent: str | None
    files: Mapping[str, Blob]
    title: str
    message: str
    date: datetime
    author: str


@dataclass
class Repo:
    """One repository. Mutate flags (``private``, ``gated``, ``granted_tokens``) freely in tests."""

    repo_id: str
    repo_type: str = "model"
    private: bool = False
    gated: bool | str = False
    """False, or "auto"/"manual" like the Hub; True is stored as "auto"."""
    granted_tokens: set[str] = field(default_factory=set)
    """Tokens allowed to download from a gated repo."""
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass
class RequestRecord:
    """One request as seen by the server (``path`` is raw, without the query string)."""

    method: str
    path: str
    query: str
    token: str | None
    repo_id: str | None = None
    kind: str | None = None
    """Endpoint family: "resolve", "info", "tree", "commit", "preupload", "lfs-batch", ..."""
    revision: str | None = None
    filename: str | None = None
    status: int | None = None
    range: str | None = None
    """The Range request header, if any (resumed downloads send one)."""
    action: tuple[Any, ...] | None = None
    """The injected fault applied to this request, if any."""


Action = tuple[Any, ...]
"""A fault to inject. One of:

* ``("status", code)`` or ``("status", code, {"Header": "value"})``: answer with that status and
  a JSON error body (e.g. ``("status", 500)``, ``("status", 429, {"Retry-After": "0"})``);
* ``("drop",)``: close the connection without sending any response;
* ``("delay", seconds)``: sleep, then handle the request normally (for timeout tests);
* ``("stall",)`` or ``("stall", seconds)``: read the request, then answer nothing, keeping the
  connection open until the server stops (or ``seconds`` pass), then close it: a Hub that
  accepts connections and never answers;
* ``("trickle", nbytes, interval)``: answer normally (status and headers at once), but send the
  body ``nbytes`` at a time every ``interval`` seconds (default 4 bytes every 0.25 s) until it is
  sent, the client hangs up or the server stops; a HEAD has no body, so it is answered normally;
* ``("reset",)`` or ``("reset", nbytes)``: close the connection with a TCP RST, right after
  reading the request or after the headers and ``nbytes`` of the body (a cut mid-response);
* ``("truncate", nbytes)``: announce the full Content-Length but send only ``nbytes`` of the body;
* ``("bad_etag",)``: serve a wrong ETag (and X-Linked-Etag) on ``/resolve``;
* ``("corrupt",)``: flip the first byte of the body, keeping its length.
"""

Rule = Callable[[str, str], Optional[Action]]  # Optional: the project supports Python 3.9
"""``rule(method, raw_path) -> Action | None``; None means "does not apply to this request"."""


@dataclass
class Injection:
    """A registered fault rule; ``remaining=None`` means unlimited, ``fired`` counts uses."""

    rule: Rule
    remaining: int | None
    fired: int = 0


class HubApiError(Exception):
    """An HTTP error answered the way the Hub does (error code header + JSON body)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def _repo_not_found(repo_id: str, status: int = 404) -> HubApiError:
    return HubApiError(status, f"Repository not found: {repo_id}", "RepoNotFound")


def validate_repo_path(path: str) -> str:
    """Reject paths that could escape a checkout: absolute, ``..``/``.``, empty parts, NUL."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\0" in path
        or any(part in {"", ".", ".."} for part in parts)
    ):
        raise HubApiError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass
class Response:
    """What a route returns; the handler turns it into bytes on the wire."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def error(cls, err: HubApiError) -> Response:
        headers = {"X-Error-Message": _header_safe(err.message), **err.headers}
        if err.error_code is not None:
            headers["X-Error-Code"] = err.error_code
        return cls.json({"error": err.message, **err.extra}, err.status, headers)


def _header_safe(text: str) -> str:
    """Header values must be latin-1 and single-line; keep messages readable anyway."""
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class HubServer:
    """In-memory Hub. Start it (or use ``with``), point the client at ``url``.

    Public attributes (safe to set at any time):

    * ``required_token``: if set, every request (except LFS uploads to the pre-signed URL) must
      carry ``Authorization: Bearer <required_token>``, else 401.
    * ``lfs_mode``: if True, ``/preupload`` answers "lfs" for non-empty files, so the client uses
      the LFS batch API. Requires Xet to be disabled client-side (``HF_HUB_DISABLE_XET=1`` or
      ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``), as with Xet the client would
      upload to a Xet CAS this server does not implement.
    * ``requests``: list of ``(method, raw_path)``; ``records``: list of :class:`RequestRecord`.
    * ``internal_errors``: tracebacks of unexpected server exceptions (should stay empty).
    * ``trusted_publishers``: ``{repo_id: id token}``: ``POST /oauth/token`` exchanges that id token,
      for that repo only, for ``oidc_access_token``; anything else is ``invalid_grant``.
    * ``github_request_token`` / ``github_id_token``: ``GET /__github/id-token`` (point
      ``ACTIONS_ID_TOKEN_REQUEST_URL`` at ``url + "/__github/id-token"``) answers ``github_id_token``
      to a bearer of ``github_request_token``; ``id_token_audiences`` logs the audiences asked for.
    * ``bandwidth``: if set, bytes per second of one link that all response bodies share (as a
      server's uplink would), for benchmarks; ``bytes_sent`` counts the body bytes sent since the
      last ``reset_log``.
    """

    def __init__(self, *, user: str = "tester", seed_gitattributes: bool = True) -> None:
        self.user = user
        self.seed_gitattributes = seed_gitattributes
        self.required_token: str | None = None
        self.lfs_mode = False
        self.trusted_publishers: dict[str, str] = {}
        self.oidc_access_token = "hf_jwt_ExchangedShortLivedToken0001"
        self.github_request_token = "gha-request-token"
        self.github_id_token = "eyJ.github-id-token.sig"
        self.id_token_audiences: list[str] = []
        self.bandwidth: float | None = None
        self.bytes_sent = 0
        self._link_free = 0.0
        self._link_lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.records: list[RequestRecord] = []
        self.internal_errors: list[str] = []
        self._repos: dict[tuple[str, str], Repo] = {}
        self._lfs_objects: dict[str, bytes] = {}
        self._injections: list[Injection] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._released = threading.Event()
        """Set by stop(): handlers held by "stall" and "trickle" faults give up."""

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind 127.0.0.1 on an ephemeral port and serve from a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        self._released.clear()
        self._httpd = _HubHTTPServer(("127.0.0.1", 0), _HubRequestHandler, self)
        # A short poll interval keeps stop() fast (shutdown waits for the next poll).
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="HubServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open keep-alive connections (so handler threads exit)."""
        if self._httpd is None:
            return
        self._released.set()  # first: stalled handlers must not outlive the test
        self._httpd.shutdown()
        self._httpd.close_open_connections()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to pass as ``endpoint=`` to the client, e.g. ``http://127.0.0.1:54321``."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    # ---- request log -----------------------------------------------------------------------

    def reset_log(self) -> None:
        """Forget all logged requests (not the repos)."""
        with self._lock:
            self.requests.clear()
            self.records.clear()
            self.bytes_sent = 0

    def served_files(self, repo_id: str, *, repo_type: str = "model") -> set[str]:
        """Paths whose content was sent by a GET ``/resolve`` (HEADs and errors don't count)."""
        with self._lock:
            return {
                r.filename
                for r in self.records
                if r.method == "GET"
                and r.kind == "resolve"
                and r.repo_id == _key_str(repo_type, repo_id)
                and r.status in (200, 206)
                and r.filename is not None
            }

    def count(
        self,
        method: str | None = None,
        kind: str | None = None,
        repo_id: str | None = None,
        *,
        repo_type: str = "model",
    ) -> int:
        """Number of logged requests matching all given filters (``kind`` as in RequestRecord)."""
        with self._lock:
            return sum(
                1
                for r in self.records
                if (method is None or r.method == method)
                and (kind is None or r.kind == kind)
                and (repo_id is None or r.repo_id == _key_str(repo_type, repo_id))
            )

    # ---- fault injection -------------------------------------------------------------------

    def inject(self, rule: Rule, times: int | None = None) -> Injection:
        """Register ``rule(method, raw_path) -> Action | None``; applies at most ``times`` times."""
        injection = Injection(rule=rule, remaining=times)
        with self._lock:
            self._injections.append(injection)
        return injection

    def inject_when(
        self,
        action: Action,
        *,
        method: str | None = None,
        path_regex: str | None = None,
        times: int | None = 1,
    ) -> Injection:
        """Convenience: apply ``action`` to requests matching ``method`` and ``path_regex`` (search)."""
        pattern = re.compile(path_regex) if path_regex is not None else None

        def rule(req_method: str, path: str) -> Action | None:
            if method is not None and req_method != method:
                return None
            if pattern is not None and not pattern.search(path):
                return None
            return action

        return self.inject(rule, times=times)

    def clear_injections(self) -> None:
        """Remove every registered fault rule."""
        with self._lock:
            self._injections.clear()

    def _take_action(self, method: str, path: str) -> Action | None:
        """Return the first applicable injected action, consuming one use of it."""
        with self._lock:
            for injection in self._injections:
                if injection.remaining == 0:
                    continue
                action = injection.rule(method, path)
                if action is None:
                    continue
                injection.fired += 1
                if injection.remaining is not None:
                    injection.remaining -= 1
                return action
        return None

    # ---- direct state manipulation (seeding repos without HTTP) ----------------------------

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, gated: bool | str = False
    ) -> Repo:
        """Create a repo with its initial commit; raises HubApiError(409) if it exists."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise HubApiError(409, f"You already created this {repo_type} repo", extra={"url": self.repo_url(key)})
            repo = Repo(repo_id=repo_id, repo_type=repo_type, private=private, gated="auto" if gated is True else gated)
            files = {".gitattributes": Blob(DEFAULT_GITATTRIBUTES)} if self.seed_gitattributes else {}
            initial = self._new_commit(repo, None, files, "initial commit", "")
            repo.branches["main"] = initial.oid
            self._repos[key] = repo
            return repo

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        """Delete a repo (HubApiError 404 RepoNotFound if missing)."""
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise _repo_not_found(repo_id)

    def repo(self, repo_id: str, *, repo_type: str = "model") -> Repo:
        """The live :class:`Repo` object (raises HubApiError 404 if missing)."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise _repo_not_found(repo_id)
            return repo

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str] | None = None,
        *,
        delete: Iterable[str] = (),
        message: str = "test commit",
        revision: str = "main",
        lfs: bool | Iterable[str] = False,
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (str is utf-8 encoded) and deletions to a branch; return the new sha.

        ``lfs=True`` stores every added file as LFS (affects ETag/X-Linked-* headers and tree
        ``lfs`` entries), or pass an iterable of paths to choose.
        """
        lfs_paths = set(files or {}) if lfs is True else set(lfs or ())
        ops: list[dict[str, Any]] = [{"key": "deletedFile", "value": {"path": p}} for p in delete]
        with self._lock:
            for path, data in (files or {}).items():
                content = data.encode() if isinstance(data, str) else data
                if path in lfs_paths:
                    oid = hashlib.sha256(content).hexdigest()
                    self._lfs_objects[oid] = content  # as if uploaded through the LFS batch API
                    ops.append({"key": "lfsFile", "value": {"path": path, "oid": oid}})
                else:
                    ops.append({"key": "file", "value": {"path": path, "content": content}})
            repo = self.repo(repo_id, repo_type=repo_type)
            return self._commit_ops(repo, revision, {"summary": message}, ops, create_pr=False)[0].oid

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            if branch in repo.branches:
                raise HubApiError(409, f"Branch {branch} already exists")
            repo.branches[branch] = self._resolve(repo, revision)
            return repo.branches[branch]

    def create_tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            if tag in repo.tags:
                raise HubApiError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve(repo, revision)
            return repo.tags[tag]

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha a revision points to (HubApiError 404 RevisionNotFound otherwise)."""
        with self._lock:
            return self._resolve(self.repo(repo_id, repo_type=repo_type), revision)

    def snapshot(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """``path -> content`` of the repo at ``revision``."""
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            commit = repo.commits[self._resolve(repo, revision)]
            return {path: blob.content for path, blob in commit.files.items()}

    def history(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from ``revision``, newest first."""
        with self._lock:
            repo = self.repo(repo_id, repo_type=repo_type)
            return [c.oid for c in self._walk(repo, self._resolve(repo, revision))]

    def repo_url(self, key: tuple[str, str]) -> str:
        repo_type, repo_id = key
        return f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"

    # ---- internals shared by routes -----------------------------------------------------------

    def _new_commit(
        self, repo: Repo, parent: str | None, files: Mapping[str, Blob], title: str, message: str
    ) -> Commit:
        """Create and store a commit. The sha mixes a counter in, so identical commits differ."""
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{next(self._counter)}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].git_oid}\n".encode())
        commit = Commit(
            oid=digest.hexdigest(),
            parent=parent,
            files=dict(files),
            title=title,
            message=message,
            date=datetime.now(timezone.utc),
            author=self.user,
        )
        repo.commits[commit.oid] = commit
        return commit

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        elif revision.startswith("refs/tags/"):
            revision = revision[len("refs/tags/") :]
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if (match := _PR_RE.fullmatch(revision)) and int(match[1]) in repo.pull_requests:
            return repo.pull_requests[int(match[1])]
        if _SHA_RE.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubApiError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _walk(self, repo: Repo, oid: str | None) -> Iterator[Commit]:
        while oid is not None:
            commit = repo.commits[oid]
            yield commit
            oid = commit.parent

    def _last_commit_touching(self, repo: Repo, head: str, path: str) -> Commit:
        """Most recent commit (from ``head``) that changed ``path`` or anything below it."""

        def state(commit: Commit | None) -> tuple[tuple[str, str], ...]:
            if commit is None:
                return ()
            under = (p for p in commit.files if p == path or p.startswith(path + "/"))
            return tuple(sorted((p, commit.files[p].git_oid) for p in under))

        for commit in self._walk(repo, head):
            parent = repo.commits[commit.parent] if commit.parent else None
            if state(commit) != state(parent):
                return commit
        return repo.commits[head]

    def _commit_ops(
        self, repo: Repo, revision: str, header: Mapping[str, Any], ops: list[dict[str, Any]], *, create_pr: bool
    ) -> tuple[Commit, int | None]:
        """Apply a commit atomically to a branch or PR ref; return (commit, pr_number)."""
        with self._lock:
            target_ref, base = self._commit_target(repo, revision)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base:
                raise HubApiError(412, "A commit has happened since. Please refresh and try again.")
            files = self._apply_operations(dict(repo.commits[base].files), ops)
            commit = self._new_commit(
                repo, base, files, str(header.get("summary") or "commit"), str(header.get("description") or "")
            )
            if create_pr:
                number = max(repo.pull_requests, default=0) + 1
                repo.pull_requests[number] = commit.oid
                return commit, number
            kind, name = target_ref
            if kind == "branch":
                repo.branches[name] = commit.oid
            else:
                repo.pull_requests[int(name)] = commit.oid
            return commit, None

    def _commit_target(self, repo: Repo, revision: str) -> tuple[tuple[str, str], str]:
        """Which ref a commit moves and its current head; only branches and PR refs are writable."""
        branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        if branch in repo.branches:
            return ("branch", branch), repo.branches[branch]
        if (match := _PR_RE.fullmatch(revision)) and int(match[1]) in repo.pull_requests:
            return ("pr", match[1]), repo.pull_requests[int(match[1])]
        raise HubApiError(404, f"Invalid rev id: {revision} (not a branch)", "RevisionNotFound")

    def _apply_operations(self, files: dict[str, Blob], ops: list[dict[str, Any]]) -> dict[str, Blob]:
        """Apply NDJSON operations to a copy of a snapshot; raise HubApiError on the first bad one."""
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            raw_path = str(value.get("path", ""))
            # Folder deletions may carry a trailing "/" (the client's way to say "folder").
            path = validate_repo_path(raw_path.rstrip("/") if key == "deletedFolder" else raw_path)
            if key == "file":
                files[path] = Blob(_decode_file_content(value), lfs=False)
            elif key == "lfsFile":
                files[path] = Blob(self._lfs_content(str(value.get("oid", ""))), lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubApiError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                doomed = [p for p in files if p.startswith(path + "/")]
                if not doomed:
                    raise HubApiError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
            else:
                raise HubApiError(400, f"Unknown commit operation key: {key!r}")
        _check_no_file_dir_clash(files)
        return files

    def _lfs_content(self, oid: str) -> bytes:
        content = self._lfs_objects.get(oid)
        if content is None:
            raise HubApiError(400, f"LFS object {oid} was not uploaded (missing from LFS storage)")
        return content

    def _store_lfs_object(self, oid: str, content: bytes) -> None:
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubApiError(400, f"Uploaded content does not match LFS oid {oid}")
        with self._lock:
            self._lfs_objects[oid] = content

    def _has_lfs_object(self, oid: str) -> bool:
        with self._lock:
            return oid in self._lfs_objects

    def _lookup(self, repo_type: str, repo_id: str) -> Repo | None:
        with self._lock:
            return self._repos.get((repo_type, repo_id))

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append((record.method, record.path))
            self.records.append(record)


def _key_str(repo_type: str, repo_id: str) -> str:
    """Repo id as recorded in the log: prefixed for non-model repos, like the URL."""
    return f"{_URL_PREFIX[repo_type]}{repo_id}"


def _decode_file_content(value: Mapping[str, Any]) -> bytes:
    content = value.get("content", b"")
    if isinstance(content, bytes):  # direct seeding via HubServer.commit
        return content
    if value.get("encoding", "base64") != "base64":
        raise HubApiError(400, f"Unsupported encoding {value.get('encoding')!r}")
    try:
        return base64.b64decode(content, validate=True)
    except ValueError as err:
        raise HubApiError(400, f"Invalid base64 content for {value.get('path')!r}") from err


def _check_no_file_dir_clash(files: Mapping[str, Blob]) -> None:
    """Git cannot have 'a' both as a file and as a directory; neither can the Hub."""
    for path in files:
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files:
                raise HubApiError(400, f"Path {path!r} conflicts with file {'/'.join(parts[:i])!r}")


# --------------------------------------------------------------------------------------------
# JSON views of repo objects
# --------------------------------------------------------------------------------------------


def _file_entry(path: str, blob: Blob, last_commit: Commit | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": blob.size, "path": path}
    if blob.lfs:
        entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(blob.pointer)}
    if last_commit is not None:
        entry["lastCommit"] = _commit_ref(last_commit)
    return entry


def _dir_entry(path: str, files: Mapping[str, Blob], last_commit: Commit | None = None) -> dict[str, Any]:
    listing = "".join(f"{p}\0{b.git_oid}\n" for p, b in sorted(files.items()) if p.startswith(path + "/"))
    oid = hashlib.sha1(listing.encode()).hexdigest()
    entry: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
    if last_commit is not None:
        entry["lastCommit"] = _commit_ref(last_commit)
    return entry


def _commit_ref(commit: Commit) -> dict[str, str]:
    return {"id": commit.oid, "title": commit.title, "date": hub_timestamp(commit.date)}


def _tree_paths(files: Mapping[str, Blob], base: str, recursive: bool) -> tuple[list[str], list[str]]:
    """(file paths, directory paths) under ``base`` (all levels if ``recursive``)."""
    prefix = f"{base}/" if base else ""
    file_paths: list[str] = []
    dirs: set[str] = set()
    for path in files:
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix) :].split("/")
        if len(parts) == 1:
            file_paths.append(path)
        elif recursive:
            file_paths.append(path)
            dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
        else:
            dirs.add(prefix + parts[0])
    return sorted(file_paths), sorted(dirs)


def _card_data(readme: Blob | None) -> dict[str, Any] | None:
    """YAML front matter of README.md, if PyYAML is around (it is: huggingface_hub needs it)."""
    if readme is None:
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme.content.decode("utf-8", "replace"), re.DOTALL)
    if match is None:
        return None
    try:
        import yaml  # noqa: PLC0415 - optional, keeps the module stdlib-only at import time
    except ImportError:
        return None
    try:
        data = yaml.safe_load(match[1])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------------------------


class _HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that knows its HubServer and tracks sockets to close them on stop."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], hub: HubServer) -> None:
        self.hub = hub
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(address, handler)

    def close_open_connections(self) -> None:
        """Unblock handler threads parked on idle keep-alive connections of the client pool."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@dataclass
class _Request:
    """A parsed request, handed to route functions."""

    method: str
    path: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    token: str | None
    record: RequestRecord

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as err:
            raise HubApiError(400, "Request body is not valid JSON") from err


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Parses HTTP, applies auth and injected faults, dispatches to :class:`_Routes`."""

    protocol_version = "HTTP/1.1"  # keep-alive, like the real Hub; every response has Content-Length
    timeout = 60  # idle keep-alive connections don't pin a thread forever
    server: _HubHTTPServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the body
        # until the client's delayed ACK (about 40 ms on Linux) on every keep-alive request.
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self.server.sockets_lock:
            self.server.open_sockets.add(self.connection)

    def finish(self) -> None:
        with self.server.sockets_lock:
            self.server.open_sockets.discard(self.connection)
        try:
            super().finish()
        except OSError:  # client went away mid-response (e.g. after a "truncate" fault)
            pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence stderr access logs; the structured log lives in ``HubServer.records``."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        # Read the body first: on a keep-alive connection unread bytes would corrupt the next request.
        body = self._read_body()
        token = _bearer_token(self.headers.get("Authorization"))
        record = RequestRecord(
            method=method, path=split.path, query=split.query, token=token, range=self.headers.get("Range")
        )
        hub._log(record)
        request = _Request(
            method=method,
            path=split.path,
            segments=[unquote(s) for s in split.path.split("/")[1:]],
            query=parse_qs(split.query, keep_blank_values=True),
            headers=self.headers,
            body=body,
            token=token,
            record=record,
        )
        action = hub._take_action(method, split.path)
        record.action = action
        name = action[0] if action else None
        if name == "stall":
            # Connected and heard, never answered: the client's only way out is its own timeout.
            hub._released.wait(float(action[1]) if len(action) > 1 else None)  # type: ignore[misc]
            self.close_connection = True
            return
        if name == "reset" and len(action) == 1:  # type: ignore[arg-type]
            self._reset()
            return
        response = self._respond(request, action)
        if response is None:
            self.close_connection = True  # "drop": no response at all, the client sees a disconnect
            return
        record.status = response.status
        self._send(method, response, action)

    def _respond(self, request: _Request, action: Action | None) -> Response | None:
        """Apply request-level faults (drop/delay/status), else route normally."""
        name = action[0] if action else None
        if name == "drop":
            return None
        if name == "delay":
            time.sleep(float(action[1]))  # type: ignore[index]
        if name == "status":
            assert action is not None
            status = int(action[1])
            extra_headers = action[2] if len(action) > 2 else None
            return Response.error(HubApiError(status, f"Injected failure ({status})", headers=extra_headers))
        return self._dispatch(request)

    def _dispatch(self, request: _Request) -> Response:
        hub = self.server.hub
        try:
            _check_required_token(hub, request)
            return _Routes(hub, request).dispatch()
        except HubApiError as err:
            return Response.error(err)
        except Exception:  # noqa: BLE001 - a test server must answer, and report the bug
            hub.internal_errors.append(traceback.format_exc())
            return Response.error(HubApiError(500, "Internal server error (see HubServer.internal_errors)"))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        """Decode a chunked request body (httpx streams file-like uploads this way)."""
        chunks: list[bytes] = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # CRLF after each chunk

    def _send(self, method: str, response: Response, action: Action | None) -> None:
        body, headers = response.body, dict(response.headers)
        name = action[0] if action else None
        if name == "bad_etag" and "ETag" in headers:
            bad = '"' + hashlib.sha1(b"bad-etag" + headers["ETag"].encode()).hexdigest() + '"'
            headers["ETag"] = bad
            if "X-Linked-Etag" in headers:
                headers["X-Linked-Etag"] = bad
        if name == "corrupt" and body:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        self.send_response(response.status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method == "HEAD":
            return
        if name == "truncate":
            # Promise the whole body, deliver part of it, then hang up: a mid-download network cut.
            self.wfile.write(body[: int(action[1])])  # type: ignore[index]
            self.wfile.flush()
            self.close_connection = True
            return
        if name == "reset":
            self.wfile.write(body[: int(action[1])])  # type: ignore[index]
            self.wfile.flush()
            self._reset()
            return
        if name == "trickle":
            self._trickle(body, *action[1:])  # type: ignore[misc]
            return
        self._write_paced(body)

    def _write_paced(self, body: bytes) -> None:
        """Send ``body``, at the hub's ``bandwidth`` if set: each chunk books its time on the one shared link."""
        hub = self.server.hub
        with hub._lock:
            hub.bytes_sent += len(body)
        if not hub.bandwidth:
            self.wfile.write(body)
            return
        step = 1 << 18
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            with hub._link_lock:
                begin = max(time.monotonic(), hub._link_free)
                hub._link_free = begin + len(chunk) / float(hub.bandwidth)
                until = hub._link_free
            delay = until - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.wfile.write(chunk)

    def _trickle(self, body: bytes, nbytes: int = 4, interval: float = 0.25) -> None:
        """Send ``body`` a few bytes at a time: every read succeeds, the whole takes forever."""
        released = self.server.hub._released
        try:
            for start in range(0, len(body), max(1, int(nbytes))):
                if start and released.wait(float(interval)):
                    break
                self.wfile.write(body[start : start + max(1, int(nbytes))])
                self.wfile.flush()
        except OSError:  # the client gave up (its deadline): that is the point of this fault
            pass
        self.close_connection = True

    def _reset(self) -> None:
        """Abort the connection: SO_LINGER 0 makes close() send a TCP RST instead of a FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            return
        # The socket closes only when its makefile() reader does too: close both now, so the RST goes out
        # now. (wfile writes straight to the socket and holds no reference; the handler flushes it later.)
        try:
            self.rfile.close()
        except OSError:
            pass
        self.connection.close()


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def _check_required_token(hub: HubServer, request: _Request) -> None:
    # LFS upload URLs are pre-signed (like S3): the client sends no Authorization header there.
    # The token exchange and the CI's id-token service take other credentials than a Hub token.
    if hub.required_token is None or request.segments[:1] in (["__lfs"], ["oauth"], ["__github"]):
        return
    if request.token is None:
        raise HubApiError(401, "Authentication required: no token provided")
    if request.token != hub.required_token:
        raise HubApiError(401, "Invalid credentials in Authorization header")


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------


class _Routes:
    """One instance per request: maps the path to a handler method and implements endpoints."""

    def __init__(self, hub: HubServer, request: _Request) -> None:
        self.hub = hub
        self.req = request

    # ---- dispatch ---------------------------------------------------------------------------

    def dispatch(self) -> Response:
        seg, method = self.req.segments, self.req.method
        if seg[:1] == ["api"]:
            return self._dispatch_api(seg[1:], method)
        if seg[:2] == ["__lfs", "upload"] and len(seg) == 3 and method == "PUT":
            return self.lfs_upload(seg[2])
        if seg == ["oauth", "token"] and method == "POST":
            return self.oidc_exchange()
        if seg == ["__github", "id-token"] and method == "GET":
            return self.github_id_token()
        return self._dispatch_repo_url(seg, method)

    def _dispatch_api(self, seg: list[str], method: str) -> Response:
        simple: dict[tuple[str, str], Callable[[], Response]] = {
            ("GET", "whoami-v2"): self.whoami,
            ("POST", "validate-yaml"): self.validate_yaml,
            ("POST", "repos/create"): self.create_repo,
            ("DELETE", "repos/delete"): self.delete_repo,
            ("POST", "repos/delete"): self.delete_repo,
        }
        if (route := simple.get((method, "/".join(seg)))) is not None:
            return route()
        if len(seg) >= 3 and seg[0] in REPO_TYPES:
            repo_type, repo_id = REPO_TYPES[seg[0]], f"{seg[1]}/{seg[2]}"
            return self._dispatch_repo_api(repo_type, repo_id, seg[3:], method)
        raise HubApiError(404, f"Not found: {self.req.path}")

    def _dispatch_repo_api(self, repo_type: str, repo_id: str, rest: list[str], method: str) -> Response:
        self.req.record.repo_id = _key_str(repo_type, repo_id)
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        self.req.record.kind = action or "info"
        rev = args[0] if args else None
        sub_path = "/".join(args[1:])
        routes: dict[tuple[str, str], Callable[[], Response]] = {
            ("GET", ""): lambda: self.repo_info(repo_type, repo_id, "main"),
            ("GET", "revision"): lambda: self.repo_info(repo_type, repo_id, _need(rev)),
            ("GET", "tree"): lambda: self.tree(repo_type, repo_id, _need(rev), sub_path),
            ("POST", "paths-info"): lambda: self.paths_info(repo_type, repo_id, _need(rev)),
            ("GET", "refs"): lambda: self.refs(repo_type, repo_id),
            ("GET", "commits"): lambda: self.commits(repo_type, repo_id, _need(rev)),
            ("POST", "preupload"): lambda: self.preupload(repo_type, repo_id, _need(rev)),
            ("POST", "commit"): lambda: self.commit(repo_type, repo_id, _need(rev)),
            ("POST", "branch"): lambda: self.create_branch(repo_type, repo_id, _need(rev)),
            ("DELETE", "branch"): lambda: self.delete_branch(repo_type, repo_id, _need(rev)),
            ("POST", "tag"): lambda: self.create_tag(repo_type, repo_id, _need(rev)),
            ("DELETE", "tag"): lambda: self.delete_tag(repo_type, repo_id, _need(rev)),
            ("PUT", "settings"): lambda: self.settings(repo_type, repo_id),
        }
        route = routes.get((method, action))
        if route is None:
            # Unknown repos must still say RepoNotFound, whatever the endpoint (client relies on it).
            self._readable_repo(repo_type, repo_id)
            raise HubApiError(404 if method in ("GET", "HEAD") else 405, f"Unsupported endpoint: {method} {self.req.path}")
        return route()

    def _dispatch_repo_url(self, seg: list[str], method: str) -> Response:
        repo_type = "model"
        if seg[:1] and seg[0] in REPO_TYPES and seg[0] != "models":
            repo_type, seg = REPO_TYPES[seg[0]], seg[1:]
        if len(seg) >= 4 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            return self.resolve(repo_type, f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
        is_lfs_batch = len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]
        if is_lfs_batch and method == "POST":
            return self.lfs_batch(repo_type, f"{seg[0]}/{seg[1][: -len('.git')]}")
        raise HubApiError(404, f"Not found: {self.req.path}")

    # ---- access control --------------------------------------------------------------------------

    def _readable_repo(self, repo_type: str, repo_id: str) -> Repo:
        """Repo visible to this request; private repos need a token (single-user model)."""
        repo = self.hub._lookup(repo_type, repo_id)
        if repo is None:
            raise _repo_not_found(repo_id)
        if repo.private and self.req.token is None:
            # Like the Hub: unauthenticated access to a private repo looks like a missing repo.
            raise HubApiError(401, "Invalid username or password.", "RepoNotFound")
        return repo

    def _downloadable_repo(self, repo_type: str, repo_id: str) -> Repo:
        """Readable repo whose files may be downloaded: gated repos need a granted token."""
        repo = self._readable_repo(repo_type, repo_id)
        if repo.gated and self.req.token not in repo.granted_tokens:
            status = 401 if self.req.token is None else 403
            raise HubApiError(
                status,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
                " to access it.",
                "GatedRepo",
            )
        return repo

    # ---- account / misc --------------------------------------------------------------------

    def whoami(self) -> Response:
        if self.req.token is None:
            raise HubApiError(401, "Invalid credentials in Authorization header")
        return Response.json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": self.hub.user.title(),
                "email": f"{self.hub.user}@example.com",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def oidc_exchange(self) -> Response:
        """RFC 8693 token exchange: a trusted publisher's id token for a short-lived, repo-scoped token."""
        self.req.record.kind = "oidc-exchange"
        payload = self.req.json()
        grant = payload.get("grant_type") == "urn:ietf:params:oauth:grant-type:token-exchange"
        typed = payload.get("subject_token_type") == "urn:ietf:params:oauth:token-type:id_token"
        resource = str(payload.get("resource") or "")
        expected = self.hub.trusted_publishers.get(resource)
        if not (grant and typed and expected is not None and payload.get("subject_token") == expected):
            raise HubApiError(400, f"invalid_grant: no trusted publisher matches this id token for {resource!r}")
        return Response.json({"access_token": self.hub.oidc_access_token, "token_type": "bearer", "expires_in": 3600})

    def github_id_token(self) -> Response:
        """What the GitHub Actions runtime answers a job with ``permissions: id-token: write``."""
        self.req.record.kind = "github-id-token"
        if self.req.token != self.hub.github_request_token:
            raise HubApiError(401, "Bad ACTIONS_ID_TOKEN_REQUEST_TOKEN")
        self.hub.id_token_audiences.append(self.req.param("audience") or "")
        return Response.json({"value": self.hub.github_id_token})

    def validate_yaml(self) -> Response:
        return Response.json({"errors": [], "warnings": []})

    # ---- repo lifecycle ---------------------------------------------------------------------

    def _repo_key_from_payload(self) -> tuple[str, str, dict[str, Any]]:
        payload = self.req.json()
        name = str(payload.get("name") or "")
        organization = payload.get("organization")
        if "/" in name and organization is None:  # older clients send the full id as "name"
            organization, name = name.split("/", 1)
        if not _NAME_RE.fullmatch(name) or (organization is not None and not _NAME_RE.fullmatch(str(organization))):
            raise HubApiError(400, f"Invalid repo name: {organization}/{name}")
        repo_type = str(payload.get("type") or "model")
        if repo_type not in _URL_PREFIX:
            raise HubApiError(400, f"Invalid repo type: {repo_type}")
        return repo_type, f"{organization or self.hub.user}/{name}", payload

    def create_repo(self) -> Response:
        repo_type, repo_id, payload = self._repo_key_from_payload()
        self.req.record.kind, self.req.record.repo_id = "create", _key_str(repo_type, repo_id)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        # HubApiError(409) carries {"url": ...}: the client's exist_ok=True path needs a 409 status.
        self.hub.create_repo(repo_id, repo_type=repo_type, private=private)
        url = self.hub.repo_url((repo_type, repo_id))
        return Response.json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def delete_repo(self) -> Response:
        repo_type, repo_id, _ = self._repo_key_from_payload()
        self.req.record.kind, self.req.record.repo_id = "delete", _key_str(repo_type, repo_id)
        self.hub.delete_repo(repo_id, repo_type=repo_type)
        return Response(200)

    def settings(self, repo_type: str, repo_id: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        payload = self.req.json()
        if "gated" in payload:
            repo.gated = payload["gated"] or False
        if "visibility" in payload:
            repo.private = payload["visibility"] == "private"
        if "private" in payload:
            repo.private = bool(payload["private"])
        return Response.json({})

    # ---- read endpoints -----------------------------------------------------------------------

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        self.req.record.revision = revision
        with self.hub._lock:
            commit = repo.commits[self.hub._resolve(repo, revision)]
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": blob.size, "blobId": blob.git_oid}
            if blob.lfs:
                sibling["lfs"] = {"size": blob.size, "sha256": blob.sha256, "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": hub_timestamp(commit.date),
            "createdAt": hub_timestamp(repo.created_at),
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(b.size for b in commit.files.values()),
        }
        if repo_type == "model":
            info["modelId"] = repo_id
        if (card := _card_data(commit.files.get("README.md"))) is not None:
            info["cardData"] = card
        return Response.json(info)

    def tree(self, repo_type: str, repo_id: str, revision: str, base: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        self.req.record.revision = revision
        base = base.strip("/")
        with self.hub._lock:
            head = self.hub._resolve(repo, revision)
            files = repo.commits[head].files
            file_paths, dir_paths = _tree_paths(files, base, _is_true(self.req.param("recursive")))
            if base and not file_paths and not dir_paths:
                raise HubApiError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": head})
            expand = _is_true(self.req.param("expand"))

            def last(path: str) -> Commit | None:
                return self.hub._last_commit_touching(repo, head, path) if expand else None

            entries = [_dir_entry(p, files, last(p)) for p in dir_paths]
            entries += [_file_entry(p, files[p], last(p)) for p in file_paths]
        return Response.json(entries)

    def paths_info(self, repo_type: str, repo_id: str, revision: str) -> Response:
        """``POST paths-info/{rev}`` with a form body ``paths=a&paths=b&expand=...``."""
        repo = self._readable_repo(repo_type, repo_id)
        form = parse_qs(self.req.body.decode(), keep_blank_values=True)
        with self.hub._lock:
            files = repo.commits[self.hub._resolve(repo, revision)].files
            entries = []
            for path in dict.fromkeys(p.strip("/") for p in form.get("paths", [])):
                if path in files:
                    entries.append(_file_entry(path, files[path]))
                elif any(p.startswith(path + "/") for p in files):
                    entries.append(_dir_entry(path, files))
        return Response.json(entries)

    def refs(self, repo_type: str, repo_id: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        with self.hub._lock:
            return Response.json(
                {
                    "branches": [
                        {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()
                    ],
                    "converts": [],
                    "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                    "pullRequests": [
                        {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": c}
                        for n, c in sorted(repo.pull_requests.items())
                    ],
                }
            )

    def commits(self, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        with self.hub._lock:
            head = self.hub._resolve(repo, revision)
            items = [
                {
                    "id": c.oid,
                    "title": c.title,
                    "message": c.message,
                    "authors": [{"user": c.author}],
                    "date": hub_timestamp(c.date),
                }
                for c in self.hub._walk(repo, head)
            ]
        return Response.json(items)

    def resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> Response:
        """HEAD/GET a file: the download protocol. Headers matter more than the body here."""
        record = self.req.record
        record.repo_id, record.kind = _key_str(repo_type, repo_id), "resolve"
        record.revision, record.filename = revision, path
        repo = self._downloadable_repo(repo_type, repo_id)
        with self.hub._lock:
            oid = self.hub._resolve(repo, revision)
            blob = repo.commits[oid].files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the file's absence under .no_exist/<sha>/.
            raise HubApiError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": oid,
        }
        if blob.lfs:  # what the Hub sends with its CDN redirect for LFS files
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(blob.size)
        return _ranged(blob.content, self.req.headers.get("Range"), headers)

    # ---- write endpoints ------------------------------------------------------------------------

    def preupload(self, repo_type: str, repo_id: str, revision: str) -> Response:
        """Tell the client, per file, whether to inline it ("regular") or use LFS."""
        repo = self._readable_repo(repo_type, repo_id)
        files_in = self.req.json().get("files", [])
        with self.hub._lock:
            head = self.hub._commit_target(repo, revision)[1]
            current = repo.commits[head].files
        answer = []
        for item in files_in:
            path = validate_repo_path(str(item.get("path", "")))
            mode = "lfs" if self.hub.lfs_mode and int(item.get("size") or 0) > 0 else "regular"
            entry: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if (existing := current.get(path)) is not None:
                # The client skips files whose oid is unchanged (sha256 for LFS, git sha1 otherwise).
                entry["oid"] = existing.sha256 if mode == "lfs" else git_blob_sha1(existing.content)
            answer.append(entry)
        return Response.json({"files": answer, "commitOid": head})

    def commit(self, repo_type: str, repo_id: str, revision: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        self.req.record.revision = revision
        header, ops = _parse_ndjson_commit(self.req.body)
        create_pr = _is_true(self.req.param("create_pr"))
        commit, pr_number = self.hub._commit_ops(repo, revision, header, ops, create_pr=create_pr)
        base_url = self.hub.repo_url((repo_type, repo_id))
        return Response.json(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{base_url}/commit/{commit.oid}",
                # CommitInfo parses the PR number out of ".../discussions/<N>".
                "pullRequestUrl": f"{base_url}/discussions/{pr_number}" if pr_number is not None else None,
            }
        )

    def create_branch(self, repo_type: str, repo_id: str, branch: str) -> Response:
        self._readable_repo(repo_type, repo_id)
        starting_point = self.req.json().get("startingPoint") or "main"
        self.hub.create_branch(repo_id, branch, starting_point, repo_type=repo_type)
        return Response.json({})

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        with self.hub._lock:
            if branch == "main":
                raise HubApiError(403, "Cannot delete the default branch")
            if repo.branches.pop(branch, None) is None:
                raise HubApiError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        return Response.json({})

    def create_tag(self, repo_type: str, repo_id: str, revision: str) -> Response:
        self._readable_repo(repo_type, repo_id)
        tag = str(self.req.json().get("tag") or "")
        if not tag:
            raise HubApiError(400, "Missing tag name")
        self.hub.create_tag(repo_id, tag, revision, repo_type=repo_type)
        return Response.json({})

    def delete_tag(self, repo_type: str, repo_id: str, tag: str) -> Response:
        repo = self._readable_repo(repo_type, repo_id)
        with self.hub._lock:
            if repo.tags.pop(tag, None) is None:
                raise HubApiError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        return Response.json({})

    # ---- LFS --------------------------------------------------------------------------------------

    def lfs_batch(self, repo_type: str, repo_id: str) -> Response:
        """git-lfs batch API (upload only): one pre-signed PUT URL per missing object."""
        self.req.record.repo_id, self.req.record.kind = _key_str(repo_type, repo_id), "lfs-batch"
        self._readable_repo(repo_type, repo_id)
        payload = self.req.json()
        if payload.get("operation") != "upload":
            raise HubApiError(400, "Only the 'upload' LFS operation is supported")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size") or 0)
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if not self.hub._has_lfs_object(oid):  # no "actions" => client skips the upload
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/__lfs/upload/{oid}", "header": {}}}
            objects.append(entry)
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        return Response.json({"transfer": "basic", "objects": objects}, headers=lfs_json)

    def lfs_upload(self, oid: str) -> Response:
        self.req.record.kind = "lfs-upload"
        self.hub._store_lfs_object(oid, self.req.body)
        return Response(200)


def _need(value: str | None) -> str:
    if not value:
        raise HubApiError(400, "Missing revision in URL")
    return value


def _parse_ndjson_commit(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Split the commit payload into its header value and the list of operations."""
    try:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
    except ValueError as err:
        raise HubApiError(400, "Commit payload is not valid NDJSON") from err
    if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
        raise HubApiError(400, "Commit payload must start with a header line")
    header = lines[0].get("value") or {}
    if not str(header.get("summary") or "").strip():
        raise HubApiError(400, "Commit summary must not be empty")
    return header, lines[1:]


_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


def _ranged(content: bytes, range_header: str | None, headers: dict[str, str]) -> Response:
    """Serve ``content`` whole (200) or a single byte range (206/416) per RFC 9110."""
    total = len(content)
    match = _RANGE_RE.fullmatch((range_header or "").replace(" ", ""))
    if match is None or (not match[1] and not match[2]):
        return Response(200, content, headers)
    if match[1]:
        start, end = int(match[1]), int(match[2]) if match[2] else total - 1
    else:  # suffix range: last N bytes
        start, end = max(total - int(match[2]), 0), total - 1
    end = min(end, total - 1)
    if start >= total or start > end:
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{total}"})
    return Response(206, content[start : end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{total}"})
