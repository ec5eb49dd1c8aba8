"""Cache: adapters of SHARE checkpoints rebuilt on demand, as PEFT folders named by their content.

An inference server names an adapter ``ALIAS/ADAPTER`` (``support/refunds``).  An
:class:`AdapterCache` maps the alias to a configured checkpoint, a Hub repo (optionally at a
revision) or a folder, and gives back a standard PEFT folder for the adapter: from the Hub it
downloads the shared bases once and then only that adapter's files (kilobytes), each into the
content store ``.blobs/<sha256>`` once it matched the checkpoint's fingerprint, rebuilds the
adapter and writes it under the cache root.

The folder's name comes from what the adapter is made of (the sha256 of its files and of the
bases, as the checkpoint fingerprints them, and the export dtype), so a later revision that
leaves an adapter as it was reuses its folder, and one that changes it gets a new folder; a
server that still serves the old one keeps reading it.  Folders are written atomically, under a
file lock, so that two requests (or two servers sharing the cache) never see half an adapter
and build it once.  Each folder's file sizes and CRC-32s are kept beside it (``<folder>.crc32.json``) and
checked before a folder left by an earlier process is served: one that does not match them is
rebuilt.

Example:
    >>> cache = AdapterCache(parse_checkpoints("support=acme/support-share@v3"), "/srv/lorashare-cache")  # doctest: +SKIP
    >>> cache.folder_for("support/refunds")  # doctest: +SKIP
    '/srv/lorashare-cache/refunds-3f9c0a6d1e2b4c5d6e7f'
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
import zlib
from typing import Dict, Iterator, Mapping, Optional, Tuple

from .. import hub
from ..codec.state import SHAREState, from_checkpoint
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, HubError, InvalidNameError
from ..format.checkpoint import CONFIG_FILE, CheckpointData, checkpoint_files, load_checkpoint
from ..format.schema import SHAREConfig, checkpoint_path, read_config
from ..peft.adapters import CONFIG_NAME, WEIGHTS_NAME, file_sha256
from ..utils.names import check_name
from .export import check_dtype, export_adapter

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows; vLLM runs on Linux
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = ["CheckpointRef", "parse_checkpoints", "AdapterCache", "content_key"]

_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
LAYOUT = 2
"""Bump when the way a folder is written changes, so old folders are not taken for new ones (2: adapters that
an engine would compute otherwise than PEFT are refused, and ``lora_alpha`` is always written)."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """One configured checkpoint: its ``alias``, a folder or a Hub repo id, and a Hub ``revision``."""

    alias: str
    location: str
    revision: Optional[str] = None
    is_hub: bool = False

    def __str__(self) -> str:
        return f"{self.location}@{self.revision or 'main'}" if self.is_hub else self.location


def parse_checkpoints(text: str, *, base: Optional[str] = None) -> Dict[str, CheckpointRef]:
    """Parse ``"alias=checkpoint,alias=checkpoint"``: Hub ids (``owner/name[@revision]``) or folders.

    Entries are separated by commas or newlines.  A folder is an existing folder, or any path
    :func:`lorashare.hub.is_local_path` reads as one; anything else must be a Hub repo id.

    Example:
        >>> refs = parse_checkpoints("support=acme/support-share@v3,local=/srv/ckpt")
        >>> refs["support"].location, refs["support"].revision, refs["local"].is_hub
        ('acme/support-share', 'v3', False)
    """
    out: Dict[str, CheckpointRef] = {}
    for entry in (e.strip() for e in re.split(r"[,\n]", text or "")):
        if not entry:
            continue
        alias, eq, where = (p.strip() for p in entry.partition("="))
        if not eq or not where:
            raise ConfigError(f"checkpoint entry {entry!r} is not alias=checkpoint (e.g. support=acme/support-share@v3).")
        if not _ALIAS.match(alias):
            raise ConfigError(f"checkpoint alias {alias!r} (in {entry!r}) is not allowed: use 1-64 characters from "
                              "A-Z a-z 0-9 . _ - (no '/': a request names an adapter as ALIAS/ADAPTER).")
        if alias in out:
            raise ConfigError(f"checkpoint alias {alias!r} is given twice; give each checkpoint its own alias.")
        where = os.path.expanduser(where)
        if os.path.isdir(where) or hub.is_local_path(where, base=base):
            out[alias] = CheckpointRef(alias, os.path.abspath(where))
            continue
        try:
            ref = hub.parse_adapter_id(where)
        except Exception:
            raise ConfigError(f"checkpoint {where!r} (alias {alias!r}) is neither a folder nor a Hub repo id "
                              "(owner/name or owner/name@revision).") from None
        if ref.subfolder:
            raise ConfigError(f"checkpoint {where!r} (alias {alias!r}) names a subfolder, but SHARE checkpoints live "
                              "at a repo's root: give owner/name[@revision].")
        out[alias] = CheckpointRef(alias, ref.repo_id, ref.revision, is_hub=True)
    return out


def content_key(cfg: SHAREConfig, adapter: str, dtype: str, *, fallback: str = "") -> str:
    """A sha256 of what ``adapter``'s rebuilt folder is made of: its files, the bases and the export dtype.

    ``fallback`` stands in for fingerprints a checkpoint lacks (lorashare 0.1.x): the Hub commit,
    or the files' own sha256; empty for a checkpoint that has them.
    """
    files = {rel: cfg.files.get(rel) for rel in checkpoint_files(cfg, [adapter]) if rel != CONFIG_FILE}
    payload = {"layout": LAYOUT, "adapter": adapter, "files": files, "dtype": cfg.dtype, "storage": cfg.storage,
               "export_dtype": dtype, "fallback": fallback}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class _View:
    """What is known of one checkpoint revision: its config, and its bases once some adapter needed them."""

    config: SHAREConfig
    commit: Optional[str] = None
    folder: Optional[str] = None
    bases: Optional[CheckpointData] = None
    checked: float = 0.0


class AdapterCache:
    """Rebuilt adapters of configured checkpoints, in content-named folders under ``root``.

    Args:
        checkpoints: ``{alias: CheckpointRef}``, as :func:`parse_checkpoints` gives.
        root: the cache folder (created if needed).
        dtype: the dtype of the exported LoRA factors (``float32``, ``float16``, ``bfloat16``).
        refresh: seconds a Hub branch or tag is trusted to point at the same commit before it is
            asked again (a commit sha is never asked again).  Adapters served already keep the
            revision they were rebuilt from.
        token: Hub token (default ``HF_TOKEN``).
        hub_timeout: seconds each Hub operation may take (default ``LORASHARE_HUB_TIMEOUT``, else 60).
    """

    def __init__(self, checkpoints: Mapping[str, CheckpointRef], root: str, *, dtype: Optional[str] = None,
                 refresh: float = 60.0, token: Optional[str] = None, hub_timeout: Optional[float] = None) -> None:
        check_dtype(dtype)
        self.checkpoints = dict(checkpoints)
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dtype = dtype or "float32"
        self.refresh = float(refresh)
        self.token = token
        self.hub_timeout = hub_timeout
        self.built = 0
        self.reused = 0
        self._views: Dict[str, _View] = {}
        self._locks: Dict[str, threading.Lock] = {a: threading.Lock() for a in self.checkpoints}
        self._warned_base: set = set()
        self._checked: set = set()  # folders this process built or verified

    def split(self, name: str) -> Optional[Tuple[CheckpointRef, str]]:
        """``(checkpoint, adapter)`` for ``ALIAS/ADAPTER`` if the alias is configured, else None."""
        alias, slash, adapter = str(name).partition("/")
        ref = self.checkpoints.get(alias)
        return (ref, adapter) if slash and ref is not None else None

    def folder_for(self, name: str, *, base_model: Optional[str] = None) -> Optional[str]:
        """The PEFT folder of adapter ``ALIAS/ADAPTER``, rebuilt first if it is not cached.

        Returns None when the alias is not configured or the checkpoint has no such adapter (a
        server answers "not found").  Raises :class:`~lorashare.errors.LoraShareError` when the
        checkpoint cannot be read (unreachable, altered, not a SHARE checkpoint).  With
        ``base_model`` (the server's model), a checkpoint made for another base is logged, once.
        """
        found = self.split(name)
        if found is None:
            return None
        ref, adapter = found
        try:
            check_name(adapter)
        except InvalidNameError:
            return None
        with self._locks[ref.alias]:
            view = self._view(ref)
        if adapter not in view.config.adapter_names:
            have = view.config.adapter_names
            listed = ", ".join(have[:10]) + (f", … ({len(have)} in all)" if len(have) > 10 else "")
            logger.info("%s: checkpoint %s has no adapter %r (it has %s)", name, ref, adapter, listed)
            return None
        self._check_base(ref, view.config, base_model)
        key = content_key(view.config, adapter, self.dtype, fallback=self._fallback(ref, view, adapter))
        folder = os.path.join(self.root, f"{adapter}-{key[:20]}")
        if folder in self._checked or _intact(folder):
            self._checked.add(folder)
            self.reused += 1
            return folder
        started = time.perf_counter()
        with _file_lock(os.path.join(self.root, ".locks", f"{key}.lock")):
            if _intact(folder):  # another request or server built it while this one waited
                self._checked.add(folder)
                self.reused += 1
                return folder
            state, read = self._read_adapter(ref, view, adapter)
            # The folder is named by the revision actually read: a local checkpoint re-saved since its
            # config was read above is another revision, whose adapter must not go under this one's name.
            # (A 0.1.x checkpoint has no fingerprints to tell revisions apart; its key stays the view's.)
            legacy = view.config.format_version == 0
            got = key if legacy else content_key(read, adapter, self.dtype, fallback=self._fallback(ref, view, adapter))
            if got == key:
                return self._write(name, ref, state, adapter, folder, started)
        logger.info("%s: %s was re-saved while it was read; serving the revision read", name, ref)
        folder = os.path.join(self.root, f"{adapter}-{got[:20]}")
        with _file_lock(os.path.join(self.root, ".locks", f"{got}.lock")):  # never two locks held at once
            if _intact(folder):
                self._checked.add(folder)
                self.reused += 1
                return folder
            return self._write(name, ref, state, adapter, folder, started)

    def _write(self, name: str, ref: CheckpointRef, state: SHAREState, adapter: str, folder: str,
               started: float) -> str:
        """Write ``adapter`` of ``state`` into ``folder`` with its sidecar (under the folder's file lock)."""
        # No fsync: the sidecar, written after, says the folder is whole, and a folder whose files do
        # not match it (a crash before the data reached the disk) is rebuilt, never served.
        export_adapter(state, adapter, folder, dtype=self.dtype, overwrite=True, durable=False)
        _write_sidecar(folder)
        self._checked.add(folder)
        self.built += 1
        logger.info("%s: rebuilt from %s into %s in %.2f s", name, ref, folder, time.perf_counter() - started)
        return folder

    # ------------------------------------------------------------------ one checkpoint
    def _view(self, ref: CheckpointRef) -> _View:
        """The checkpoint as it is now: a folder's config is read again, a Hub branch asked again after ``refresh``."""
        old = self._views.get(ref.alias)
        if not ref.is_hub:
            cfg = read_config(ref.location)
            if old is None or old.config != cfg:
                old = self._views[ref.alias] = _View(cfg, folder=ref.location)
            return old
        pinned = ref.revision if ref.revision and _SHA.match(ref.revision) else None
        if old is not None and (pinned or time.monotonic() - old.checked < self.refresh):
            return old
        try:
            commit = pinned or hub.resolve_revision(hub.HubRef(ref.location, "", ref.revision), token=self.token,
                                                    timeout=self.hub_timeout)
        except HubError as exc:
            if old is None:
                raise
            # A Hub that does not answer now does not make the revision known a minute ago wrong.
            old.checked = time.monotonic()
            logger.warning("checkpoint %s: could not look up its revision (%s); staying at commit %s",
                           ref, " ".join(str(exc).split()), (old.commit or "")[:8])
            return old
        if old is not None and old.commit == commit:
            old.checked = time.monotonic()
            return old
        farm = os.path.join(self.root, ".hub", f"{ref.location.replace('/', '--')}@{commit}")
        if not os.path.isfile(os.path.join(farm, CONFIG_FILE)):
            snap = hub.fetch_files(ref.location, [CONFIG_FILE], revision=commit, token=self.token,
                                   timeout=self.hub_timeout)
            if not os.path.isfile(os.path.join(snap, CONFIG_FILE)):
                raise CheckpointNotFoundError(f"{ref} has no {CONFIG_FILE} at {commit[:8]}: not a SHARE checkpoint.",
                                              path=str(ref))
            with open(os.path.join(snap, CONFIG_FILE), "rb") as f:
                _put(os.path.join(farm, CONFIG_FILE), f.read())
        cfg = read_config(farm, jail=self.root)
        if old is not None:
            logger.info("checkpoint %s moved to commit %s", ref, commit[:8])
        view = self._views[ref.alias] = _View(cfg, commit=commit, folder=farm, checked=time.monotonic())
        return view

    def _read_adapter(self, ref: CheckpointRef, view: _View, adapter: str) -> Tuple[SHAREState, SHAREConfig]:
        """The state of ``adapter`` alone, and the config of the revision it was read from (one revision,
        whatever saves run meanwhile); its files downloaded if needed, the bases read once per view."""
        folder, jail = ref.location, None
        if ref.is_hub:
            folder, jail = self._fetch(ref, view, adapter)
        with self._locks[ref.alias]:
            bases = view.bases
            if bases is None:
                bases = load_checkpoint(folder, adapters=[], jail=jail)
                # In float32 once: every rebuild would otherwise convert each stored basis again.
                bases = dataclasses.replace(bases, components={k: U.float() for k, U in bases.components.items()})
                if bases.config == view.config:  # a folder re-saved since the view's config was read: not its bases
                    view.bases = bases
        try:
            data = load_checkpoint(folder, adapters=[adapter], jail=jail, bases=bases)
        except CheckpointError:
            if ref.is_hub:  # a commit's files never change: the error is the checkpoint's
                raise
            # A local folder re-saved since the bases were read (or while the adapter was): read the revision
            # there now whole, once; load_checkpoint refuses a mix of two revisions.
            data = load_checkpoint(folder, adapters=[adapter], jail=jail)
        return from_checkpoint(data, folder), data.config

    def _fetch(self, ref: CheckpointRef, view: _View, adapter: str) -> Tuple[str, str]:
        """The checkpoint folder of ``view`` holding the bases and ``adapter``'s files: ``(folder, jail)``.

        Files the config fingerprints are fetched into the content store ``.blobs/<sha256>`` (a file is
        kept only once it matched) and linked into ``.hub/<repo>@<commit>/``, laid out as a checkpoint;
        a 0.1.x checkpoint, which has no fingerprints, goes through the Hugging Face cache instead.
        """
        rels = [r for r in checkpoint_files(view.config, [adapter]) if r != CONFIG_FILE]
        if view.config.format_version == 0 or any(r not in view.config.files for r in rels):
            return hub.fetch_checkpoint(ref.location, revision=view.commit, token=self.token, adapters=[adapter],
                                        timeout=self.hub_timeout)
        for rel in rels:
            sha = view.config.files[rel]
            # One download of a file however many requests need it at once (the bases, for all of them).
            with _file_lock(os.path.join(self.root, ".locks", f"blob-{sha}.lock")):
                blob = hub.fetch_verified(ref.location, view.commit or "", {rel: sha}, os.path.join(self.root, ".blobs"),
                                          token=self.token, timeout=self.hub_timeout)[rel]
            _link(os.path.join(view.folder or "", *rel.split("/")), blob)
        return view.folder or "", self.root

    def _fallback(self, ref: CheckpointRef, view: _View, adapter: str) -> str:
        """For a checkpoint without fingerprints: the Hub commit, or the local files' own sha256."""
        if view.config.format_version != 0:
            return ""
        if ref.is_hub:
            return view.commit or ""
        paths = [checkpoint_path(ref.location, rel) for rel in checkpoint_files(view.config, [adapter])]
        return ",".join(file_sha256(p) for p in paths if os.path.isfile(p))

    def _check_base(self, ref: CheckpointRef, cfg: SHAREConfig, base_model: Optional[str]) -> None:
        made_for = cfg.base_model_name_or_path
        if not base_model or not made_for or ref.alias in self._warned_base:
            return
        if made_for != base_model and os.path.basename(made_for.rstrip("/")) != os.path.basename(base_model.rstrip("/")):
            self._warned_base.add(ref.alias)
            logger.warning("checkpoint %s was made for base model %r, and this server serves %r: check that its "
                           "adapters fit this model.", ref, made_for, base_model)


FILES = (CONFIG_NAME, WEIGHTS_NAME)


def _put(path: str, data: bytes) -> None:
    """Write ``path`` atomically (a temporary file, then a rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _link(path: str, target: str) -> None:
    """Make ``path`` a relative symlink to ``target``, atomically (it may exist already)."""
    rel = os.path.relpath(target, os.path.dirname(path))
    if os.path.islink(path) and os.readlink(path) == rel:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    os.symlink(rel, tmp)
    os.replace(tmp, path)


def _sidecar(folder: str) -> str:
    return folder + ".crc32.json"


def _digests(folder: str) -> Dict[str, object]:
    """Size and CRC-32 of each file: enough to catch a torn write (whoever can write the cache can
    write this file too, so a cryptographic hash would prove nothing more)."""
    out: Dict[str, object] = {}
    for name in FILES:
        crc, size = 0, 0
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                crc, size = zlib.crc32(block, crc), size + len(block)
        out[name] = [size, crc]
    return out


def _write_sidecar(folder: str) -> None:
    """Record the folder's file sizes and CRCs next to it, atomically (write, then rename)."""
    _put(_sidecar(folder), json.dumps(_digests(folder), sort_keys=True).encode())


def _intact(folder: str) -> bool:
    """True if ``folder`` holds the files its sidecar describes (checked once per process)."""
    try:
        with open(_sidecar(folder), encoding="utf-8") as f:
            want = json.load(f)
        return isinstance(want, dict) and want == _digests(folder)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held by this thread and process until the block ends."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock
