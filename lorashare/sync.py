"""``lorashare sync``: keep a SHARE checkpoint on the Hub in step with a manifest of adapters.

The manifest, ``lorashare.yaml``, lives in the repository that holds (or names) the adapters::

    version: 1                                 # optional; the only version is 1
    repo_id: acme/support-adapters-share       # required: the Hub repo the checkpoint is published to
    private: false                             # optional (default false); only used when the repo is created
    compression:                               # optional; every key optional
      num_components: auto                     # an integer ≥ 1 (k per module and side) or "auto" (default)
      variance_threshold: 0.95                 # (0, 1]: energy kept with "auto", and the projection
                                               # threshold when an adapter is added (default 0.95)
      dtype: float32                           # float32 (default), float16 or bfloat16
      budget_bytes: 50000000                   # optional byte budget for bases + loadings (k chosen per module)
    adapters:                                  # required: at least 2; name → source
      billing: adapters/billing                # a folder in this repository, relative to the manifest's folder
      refunds: acme/refunds-lora@v3            # a Hub repo, optionally pinned to a branch, tag or commit
      legal: acme/multi-lora/legal             # a subfolder of a Hub repo (also accepts @revision)
    card:                                      # optional: the model card
      license: apache-2.0
      description: "Support-bot adapters, compressed with SHARE."

Rules:

* Unknown keys are errors (with a did-you-mean suggestion); every error names the file, the line
  and the key: ``lorashare.yaml:7: adapters.refunds: not a folder and not a Hub id``.
* Adapter names are single safe path components (``A-Z a-z 0-9 . _ -``).
* A source is a folder when it exists as one (relative to the manifest's folder), or when it looks
  like a path (starts with ``./``, ``../`` or ``/``, or has a ``.`` or ``..`` component); otherwise
  it must be a Hub id (``owner/name[/subfolder][@revision]``).
  Folders must stay inside the workspace (``GITHUB_WORKSPACE``, else the enclosing git repository,
  else the manifest's folder): no ``..`` escape, no absolute path elsewhere, no symlink that
  resolves outside, and their files must not be symlinks that resolve outside either.

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
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import ConfigError, HubError, LoraShareError
from .names import is_within

logger = logging.getLogger(__name__)

__all__ = [
    "ManifestError",
    "Compression",
    "CardOptions",
    "AdapterSource",
    "Manifest",
    "AdapterPlan",
    "Plan",
    "SyncResult",
    "load_manifest",
    "parse_manifest",
    "workspace_root",
    "fingerprint_sources",
    "read_published",
    "plan_sync",
    "commit_message",
    "run_sync",
]

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
DTYPE_NAMES = ("float32", "float16", "bfloat16")
ACTIONS = ("none", "create", "add", "recompute", "card")
TOP_KEYS = ("version", "repo_id", "private", "compression", "adapters", "card")
COMPRESSION_KEYS = ("num_components", "variance_threshold", "dtype", "budget_bytes")
CARD_KEYS = ("license", "description")
_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"


# ---------------------------------------------------------------------------- manifest model
class ManifestError(ConfigError):
    """A bad ``lorashare.yaml``; ``file`` and ``line`` locate it (``line`` may be ``None``)."""

    def __init__(self, message: str, *, file: Optional[str] = None, line: Optional[int] = None) -> None:
        super().__init__(message, path=file)
        self.file = file
        self.line = line


@dataclass(frozen=True)
class Compression:
    """The ``compression:`` block (defaults: auto k at 95% energy, float32, no budget)."""

    num_components: Union[int, str] = "auto"
    variance_threshold: float = 0.95
    dtype: str = "float32"
    budget_bytes: Optional[int] = None


@dataclass(frozen=True)
class CardOptions:
    """The ``card:`` block."""

    license: Optional[str] = None
    description: Optional[str] = None


@dataclass(frozen=True)
class AdapterSource:
    """One ``adapters:`` entry.

    ``text`` is what the checkpoint records as the source: the Hub id as written, or the folder
    relative to the manifest's folder (POSIX, normalised).  ``folder`` is the absolute folder
    (folders only); ``ref`` the parsed Hub id (Hub sources only).
    """

    name: str
    text: str
    kind: str  # "folder" or "hub"
    line: Optional[int] = None
    folder: Optional[str] = None
    ref: Any = None  # hub.HubRef


@dataclass(frozen=True)
class Manifest:
    """A validated ``lorashare.yaml``."""

    file: str  # as shown in messages
    path: str  # absolute
    root: str  # the workspace: folders must stay inside it
    repo_id: str
    private: bool = False
    compression: Compression = field(default_factory=Compression)
    adapters: Dict[str, AdapterSource] = field(default_factory=dict)
    card: CardOptions = field(default_factory=CardOptions)
    lines: Dict[str, int] = field(default_factory=dict)  # "compression.dtype" → line


# ----------------------------------------------------------------------------- YAML walking
class _Walker:
    """Validates composed YAML nodes, so every error can name its line and key."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: Dict[str, int] = {}

    def error(self, node: Any, key: str, msg: str) -> ManifestError:
        line = _line(node)
        where = f"{self.file}:{line}" if line else self.file
        return ManifestError(f"{where}: {key + ': ' if key else ''}{msg}", file=self.file, line=line)

    def mapping(self, node: Any, key: str, known: Optional[Sequence[str]]) -> Dict[str, Tuple[Any, Any]]:
        """``{key: (key node, value node)}`` of a mapping node; unknown and duplicate keys are errors."""
        import yaml

        if not isinstance(node, yaml.MappingNode) or node.tag != _MAP_TAG:
            raise self.error(node, key, f"expected a mapping (key: value lines), got {_kind(node)}")
        out: Dict[str, Tuple[Any, Any]] = {}
        for k_node, v_node in node.value:
            if not isinstance(k_node, yaml.ScalarNode) or k_node.tag != _STR_TAG:
                shown = k_node.value if isinstance(k_node, yaml.ScalarNode) else _kind(k_node)
                raise self.error(k_node, key, f"keys must be plain names, got {str(shown)[:40]!r}")
            name = str(k_node.value)
            full = f"{key}.{name}" if key else name
            if known is not None and name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.error(k_node, full[:120], f"unknown key; {hint}(known: {', '.join(known)})")
            if name in out:
                raise self.error(k_node, full[:120], f"duplicate key (first on line {_line(out[name][0])})")
            out[name] = (k_node, v_node)
            self.lines[full] = _line(v_node) or _line(k_node) or 0
        return out

    def scalar(self, node: Any, key: str) -> Any:
        """The Python value of a scalar node (YAML 1.1 safe types), or an error."""
        import yaml

        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, f"expected a single value, got {_kind(node)}")
        ctor = yaml.constructor.SafeConstructor.yaml_constructors.get(node.tag)
        if ctor is None:
            raise self.error(node, key, f"unsupported YAML tag {node.tag[:60]!r}")
        try:
            return ctor(yaml.constructor.SafeConstructor(), node)
        except Exception as exc:  # noqa: BLE001 - any bad scalar (e.g. "!!int abc") is a manifest error
            raise self.error(node, key, f"bad value {str(node.value)[:40]!r} ({type(exc).__name__})") from None

    def string(self, node: Any, key: str, *, allow_empty: bool = False) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str):
            raise self.error(node, key, f"expected a string, got {_show(value)}")
        value = value.strip()
        if not value and not allow_empty:
            raise self.error(node, key, "must not be empty")
        return value


def _line(node: Any) -> Optional[int]:
    mark = getattr(node, "start_mark", None)
    return mark.line + 1 if mark is not None else None


def _kind(node: Any) -> str:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if isinstance(node, yaml.ScalarNode):
        return f"{str(node.value)[:40]!r}"
    return "nothing"


def _show(value: Any) -> str:
    return f"{str(value)[:40]!r} ({type(value).__name__})"


# -------------------------------------------------------------------------- manifest parsing
def workspace_root(manifest_path: str) -> str:
    """Where adapter folders may live: ``GITHUB_WORKSPACE``, else the enclosing git repo, else the manifest's folder."""
    here = os.path.dirname(os.path.abspath(manifest_path))
    ws = os.environ.get("GITHUB_WORKSPACE")
    if ws:
        return os.path.abspath(ws)
    d = here
    while True:
        if os.path.exists(os.path.join(d, ".git")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return here
        d = parent


def load_manifest(path: str, *, root: Optional[str] = None) -> Manifest:
    """Read and validate a manifest file; raises :class:`ManifestError` (a ``ConfigError``) only."""
    try:
        shown = os.fspath(path)
        apath = os.path.abspath(shown)
        root = os.path.abspath(root) if root else workspace_root(apath)
        file = _display(apath, root, shown)
        if not is_within(apath, root):
            raise ManifestError(
                f"{file}: the manifest is outside the workspace ({root}); put it in the repository.", file=file)
        if not os.path.isfile(apath):
            raise ManifestError(
                f"{file}: no such file. Create a lorashare.yaml (see `lorashare sync --help`) or pass --config PATH.",
                file=file)
        with open(apath, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except LoraShareError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise ManifestError(f"{path}: cannot read the manifest ({type(exc).__name__}: {exc})", file=str(path)) from None
    return parse_manifest(data, path=apath, root=root, file=file)


def parse_manifest(data: Union[str, bytes], *, path: str = "lorashare.yaml", root: Optional[str] = None,
                   file: Optional[str] = None) -> Manifest:
    """Validate manifest text.  Folders are resolved relative to ``path``'s folder, inside ``root``.

    Raises :class:`ManifestError` (a ``ConfigError``) for any bad input, never anything else.
    """
    apath = os.path.abspath(path)
    root = os.path.abspath(root) if root else os.path.dirname(apath)
    file = file or os.path.basename(apath)
    try:
        return _parse(data, apath, root, file)
    except ManifestError:
        raise
    except LoraShareError as exc:  # pragma: no cover - every check converts already; kept as a guard
        raise ManifestError(f"{file}: {exc}", file=file) from None
    except Exception as exc:  # noqa: BLE001 - the contract: bad input never escapes as another type
        raise ManifestError(f"{file}: cannot read the manifest ({type(exc).__name__}: {str(exc)[:200]})", file=file) from None


def _parse(data: Union[str, bytes], apath: str, root: str, file: str) -> Manifest:
    import yaml

    if isinstance(data, bytes):
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{file}: over {MAX_MANIFEST_BYTES} bytes; not a manifest.", file=file)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{file}: not UTF-8 text (byte {exc.start}); save it as UTF-8.", file=file) from None
    else:
        text = data
    if len(text) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{file}: over {MAX_MANIFEST_BYTES} characters; not a manifest.", file=file)
    try:
        root_node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = (exc.problem or exc.context or "syntax error").strip()
        raise ManifestError(f"{file}:{line}: invalid YAML: {what}" if line else f"{file}: invalid YAML: {what}",
                            file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{file}: invalid YAML: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                            file=file) from None
    except RecursionError:
        raise ManifestError(f"{file}: invalid YAML: nested too deeply.", file=file) from None
    if root_node is None:
        raise ManifestError(f"{file}: the manifest is empty; it needs at least repo_id and adapters.", file=file)

    w = _Walker(file)
    top = w.mapping(root_node, "", TOP_KEYS)
    for required in ("repo_id", "adapters"):
        if required not in top:
            raise w.error(root_node, "", f"missing {required!r} (required keys: repo_id, adapters)")

    if "version" in top:
        v_node = top["version"][1]
        version = w.scalar(v_node, "version")
        if version != MANIFEST_VERSION or isinstance(version, bool):
            raise w.error(v_node, "version", f"unsupported manifest version {_show(version)}; this lorashare reads version 1")

    repo_node = top["repo_id"][1]
    repo_id = w.string(repo_node, "repo_id")
    from . import hub

    try:
        hub.check_repo_id(repo_id)
    except HubError:
        raise w.error(repo_node, "repo_id", f"{repo_id[:100]!r} is not a Hub repo id (owner/name)") from None

    private = False
    if "private" in top:
        p_node = top["private"][1]
        private = w.scalar(p_node, "private")
        if not isinstance(private, bool):
            raise w.error(p_node, "private", f"expected true or false, got {_show(private)}")

    compression = _compression(w, top["compression"][1]) if "compression" in top else Compression()
    card = _card(w, top["card"][1]) if "card" in top else CardOptions()
    adapters = _adapters(w, top["adapters"][1], os.path.dirname(apath), root)
    return Manifest(file=file, path=apath, root=root, repo_id=repo_id, private=private, compression=compression,
                    adapters=adapters, card=card, lines=dict(w.lines))


def _compression(w: _Walker, node: Any) -> Compression:
    import yaml

    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return Compression()
    items = w.mapping(node, "compression", COMPRESSION_KEYS)
    values: Dict[str, Any] = {}
    if "num_components" in items:
        n = items["num_components"][1]
        k = w.scalar(n, "compression.num_components")
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 1_000_000):
            raise w.error(n, "compression.num_components", f"expected an integer ≥ 1 or 'auto', got {_show(k)}")
        values["num_components"] = k
    if "variance_threshold" in items:
        n = items["variance_threshold"][1]
        v = w.scalar(n, "compression.variance_threshold")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
            raise w.error(n, "compression.variance_threshold", f"expected a number in (0, 1], got {_show(v)}")
        values["variance_threshold"] = float(v)
    if "dtype" in items:
        n = items["dtype"][1]
        d = w.scalar(n, "compression.dtype")
        if d not in DTYPE_NAMES:
            close = difflib.get_close_matches(str(d), DTYPE_NAMES, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise w.error(n, "compression.dtype", f"expected one of {', '.join(DTYPE_NAMES)}, got {_show(d)}{hint}")
        values["dtype"] = d
    if "budget_bytes" in items:
        n = items["budget_bytes"][1]
        b = w.scalar(n, "compression.budget_bytes")
        if b is not None and not (isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= 2**62):
            raise w.error(n, "compression.budget_bytes", f"expected a number of bytes ≥ 1, got {_show(b)}")
        values["budget_bytes"] = b
    return Compression(**values)


def _card(w: _Walker, node: Any) -> CardOptions:
    import yaml

    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return CardOptions()
    items = w.mapping(node, "card", CARD_KEYS)
    values: Dict[str, Optional[str]] = {}
    if "license" in items:
        n = items["license"][1]
        lic = w.string(n, "card.license")
        if len(lic) > 100 or any(c.isspace() for c in lic):
            raise w.error(n, "card.license", f"expected a license id such as apache-2.0 or mit, got {lic[:40]!r}")
        values["license"] = lic
    if "description" in items:
        n = items["description"][1]
        desc = w.string(n, "card.description", allow_empty=True)
        if len(desc) > 20_000:
            raise w.error(n, "card.description", "over 20000 characters")
        values["description"] = desc or None
    return CardOptions(**values)


def _adapters(w: _Walker, node: Any, base: str, root: str) -> Dict[str, AdapterSource]:
    from .names import check_name

    items = w.mapping(node, "adapters", None)
    if len(items) < 2:
        raise w.error(node, "adapters", f"needs at least 2 adapters to share a basis, got {len(items)}")
    out: Dict[str, AdapterSource] = {}
    for name, (k_node, v_node) in items.items():
        key = f"adapters.{name}"[:140]
        try:
            check_name(name)
        except LoraShareError:
            raise w.error(k_node, key, "bad adapter name: use 1-128 characters from A-Z a-z 0-9 . _ - "
                          "(not '.' or '..')") from None
        text = w.string(v_node, key)
        out[name] = _source(w, v_node, key, name, text, base, root)
    return out


def _source(w: _Walker, node: Any, key: str, name: str, text: str, base: str, root: str) -> AdapterSource:
    from . import hub

    parts = text.split("@", 1)[0].split("/")
    explicit_path = text.startswith(("./", "../", "/")) or "\\" in text or any(p in (".", "..") for p in parts)
    candidate = os.path.normpath(os.path.join(base, text)) if "\x00" not in text else ""
    if explicit_path or (candidate and os.path.lexists(candidate)):
        return _folder_source(w, node, key, name, text, candidate, base, root)
    try:
        ref = hub.parse_adapter_id(text)
    except HubError:
        raise w.error(node, key, f"{text[:100]!r} is not a folder and not a Hub id "
                      "(owner/name, owner/name@revision or owner/name/subfolder)") from None
    return AdapterSource(name=name, text=text, kind="hub", line=_line(node), ref=ref)


def _folder_source(w: _Walker, node: Any, key: str, name: str, text: str, folder: str, base: str,
                   root: str) -> AdapterSource:
    from .adapters import CONFIG_NAME, WEIGHTS_NAME

    shown = text[:100]
    if not folder or not is_within(folder, root, resolve=False):
        raise w.error(node, key, f"{shown!r} is outside the workspace ({root}); adapter folders must be in the repository")
    if not is_within(folder, root):
        raise w.error(node, key, f"{shown!r} resolves outside the workspace (a symlink to "
                      f"{os.path.realpath(folder)}); refusing it")
    if not os.path.isdir(folder):
        what = "is a file, not an adapter folder" if os.path.exists(folder) else "not a folder (no such folder in the repository)"
        raise w.error(node, key, f"{shown!r}: {what}")
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        p = os.path.join(folder, fname)
        if not os.path.lexists(p):
            raise w.error(node, key, f"{shown!r} has no {fname}: not a PEFT adapter folder "
                          "(save it with PeftModel.save_pretrained, safetensors)")
        if not is_within(p, root):
            raise w.error(node, key, f"{shown!r}: {fname} is a symlink that resolves outside the workspace; refusing it")
        if not os.path.isfile(p):
            raise w.error(node, key, f"{shown!r}: {fname} is not a regular file")
    rel = os.path.relpath(folder, base).replace(os.sep, "/")
    return AdapterSource(name=name, text=rel, kind="folder", line=_line(node), folder=folder)


def _display(apath: str, root: str, given: str) -> str:
    if is_within(apath, root, resolve=False):
        return os.path.relpath(apath, root).replace(os.sep, "/")
    return given


# ------------------------------------------------------------------------------ planning
@dataclass
class AdapterPlan:
    """One adapter's state: ``added``, ``changed``, ``unchanged`` or ``removed``."""

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


def fingerprint_sources(manifest: Manifest, *, token: Optional[str] = None) -> Dict[str, str]:
    """``{name: fingerprint}``: sha256 of the weights for folders, the resolved commit sha for Hub ids."""
    from . import hub
    from .adapters import WEIGHTS_NAME, file_sha256

    out: Dict[str, str] = {}
    for name, src in manifest.adapters.items():
        try:
            if src.kind == "folder":
                out[name] = file_sha256(os.path.join(src.folder, WEIGHTS_NAME))
            else:
                out[name] = hub.resolve_revision(src.ref, token=token)
        except LoraShareError as exc:  # first: HubNotFoundError is also an OSError
            raise _locate(exc, manifest, name) from None
        except OSError as exc:
            raise _locate(ConfigError(f"cannot read {src.text}: {exc.strerror or exc}"), manifest, name) from None
    return out


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
    from . import hub

    return hub.fetch_config(repo_id, token=token)


def _short(value: Optional[str]) -> str:
    return value[:8] if value else "–"


def _settings_diff(c: Compression, published: Any) -> List[str]:
    """Compression settings of the manifest that differ from the published checkpoint's."""
    diffs = []
    pub_budget = published.budget_bytes if getattr(published, "component_selection", "") == "budget" else None
    if c.budget_bytes != pub_budget:
        diffs.append(f"budget_bytes {pub_budget} → {c.budget_bytes}")
    if c.budget_bytes is None:
        pub_k = published.requested_components
        if pub_k is None:  # written before requested_components existed
            pub_k = "auto" if published.component_selection == "auto" else published.num_components
        if pub_k != c.num_components:
            diffs.append(f"num_components {pub_k} → {c.num_components}")
    try:
        same_v = math.isclose(float(published.variance_threshold), c.variance_threshold, rel_tol=0, abs_tol=1e-9)
    except (TypeError, ValueError):
        same_v = False
    if not same_v:
        diffs.append(f"variance_threshold {published.variance_threshold} → {c.variance_threshold}")
    if (published.dtype or "float32") != c.dtype:
        diffs.append(f"dtype {published.dtype} → {c.dtype}")
    return diffs


def _card_diff(card: CardOptions, published: Any) -> List[str]:
    st = published.compression_stats if isinstance(published.compression_stats, dict) else {}
    old = st.get("card") if isinstance(st.get("card"), dict) else {}
    return [k for k in CARD_KEYS if (old.get(k) or None) != getattr(card, k)]


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
            prev = info.get("revision") or info.get("sha256")
            entries.append(AdapterPlan(name, "removed", str(info.get("source") or ""),
                                       "hub" if info.get("revision") else "folder", None, prev, reason="not in the manifest"))
            reasons.append(f"{name} removed")
    settings = _settings_diff(manifest.compression, published)
    if settings:
        reasons.append("compression settings changed (" + ", ".join(settings) + ")")
    added = [e.name for e in entries if e.status == "added"]
    card = _card_diff(manifest.card, published)
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


# ------------------------------------------------------------------------------ applying
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


def _compress_all(manifest: Manifest, fingerprints: Mapping[str, str], *, token: Optional[str], progress: bool) -> Any:
    from .model import SHAREModel

    c = manifest.compression
    share = SHAREModel.from_adapters(
        {n: _build_source(s, fingerprints.get(n)) for n, s in manifest.adapters.items()},
        num_components=c.num_components, variance_threshold=c.variance_threshold, dtype=c.dtype,
        budget_bytes=c.budget_bytes, progress=progress, token=token,
    )
    _restamp(share, manifest)
    return share


def _apply(manifest: Manifest, plan: Plan, fingerprints: Mapping[str, str], *, token: Optional[str],
           progress: bool, say: Callable[[str], None]) -> Tuple[Any, Dict[str, Dict[str, Any]]]:
    """Build the new checkpoint; may turn an ``add`` plan into ``recompute``.  Returns (share, add reports)."""
    from .model import SHAREModel

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
    return _compress_all(manifest, fingerprints, token=token, progress=progress), reports


def _set_card(share: Any, manifest: Manifest) -> None:
    card = share.config.compression_stats.setdefault("card", {})
    card["repo_id"] = manifest.repo_id
    for key in CARD_KEYS:
        value = getattr(manifest.card, key)
        if value:
            card[key] = value
        else:
            card.pop(key, None)


# ------------------------------------------------------------------------ GitHub Actions I/O
def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


class _Reporter:
    """Workflow commands, outputs and the job summary; every text goes through ``redact``."""

    def __init__(self, *, gha: bool, stream: IO[str], secrets: Sequence[str] = ()) -> None:
        self.gha = gha
        self.stream = stream
        self.secrets: List[str] = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        from .hub import _redact

        for s in self.secrets:
            text = text.replace(s, "***")
        return _redact(text)

    def mask(self, secret: Optional[str]) -> None:
        """Register a secret: masked in the runner's log, and redacted from everything we print."""
        if not secret:
            return
        if self.gha:
            for part in secret.splitlines():
                if part.strip():
                    self.stream.write(f"::add-mask::{part}\n")
            self.stream.flush()
        self.secrets.append(secret)

    def command(self, text: str) -> None:
        if self.gha:
            self.stream.write(self.redact(text) + "\n")
            self.stream.flush()

    def group(self, title: str) -> None:
        self.command(f"::group::{title}")

    def endgroup(self) -> None:
        self.command("::endgroup::")

    def error(self, message: str, *, file: Optional[str] = None, line: Optional[int] = None) -> None:
        props = ["title=lorashare sync"]
        if file:
            props.insert(0, f"file={_escape_prop(file)}")
            if line:
                props.insert(1, f"line={line}")
        self.command(f"::error {','.join(props)}::{_escape_data(self.redact(message))}")

    def outputs(self, values: Mapping[str, str]) -> None:
        path = os.environ.get("GITHUB_OUTPUT")
        if not (self.gha and path):
            return
        with open(path, "a", encoding="utf-8") as f:
            for k, v in values.items():
                v = self.redact(str(v))
                if "\n" in v or "\r" in v:
                    delim = f"lorashare_{os.urandom(8).hex()}"
                    f.write(f"{k}<<{delim}\n{v}\n{delim}\n")
                else:
                    f.write(f"{k}={v}\n")

    def summary(self, markdown: str) -> None:
        path = os.environ.get("GITHUB_STEP_SUMMARY")
        if not (self.gha and path):
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write(self.redact(markdown).rstrip("\n") + "\n")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").replace("`", "'")


def _size(n: Any) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _fp_label(a: AdapterPlan) -> str:
    fp = a.fingerprint or a.previous
    if not fp:
        return "–"
    return f"{'rev' if a.kind == 'hub' else 'sha256'} `{fp[:10]}`"


def _markdown(result: "SyncResult", plan: Plan, share: Any, published: Any) -> str:
    r = result
    lines = [f"## lorashare sync: `{_cell(r.repo_id)}`", ""]
    if r.dry_run:
        verdict = (f"**Dry run**: would `{plan.action}` — {_cell('; '.join(plan.reasons))}. Nothing was pushed."
                   if plan.changed else "**Dry run**: no change; nothing would be pushed.")
    elif r.commit_sha:
        link = f"[`{r.commit_sha[:10]}`]({r.commit_url})" if r.commit_url else f"`{r.commit_sha[:10]}`"
        verdict = f"**Published** {link} to [{_cell(r.repo_id)}]({r.repo_url}): {_cell(r.message or '')}"
    else:
        verdict = f"**No change**: the checkpoint at [{_cell(r.repo_id)}]({r.repo_url}) matches the manifest; no commit."
    lines += [verdict, ""]
    cfg = share.config if share is not None else published
    st = cfg.compression_stats if cfg is not None and isinstance(cfg.compression_stats, dict) else {}
    lines += ["| | |", "|---|---|", f"| Action | `{plan.action}` |", f"| Adapters | {len(r.adapters)} |"]
    if st.get("compression_ratio"):
        lines.append(f"| Compression ratio | {st['compression_ratio']:.2f}× (bases counted) |")
        lines.append(f"| Original LoRA → compressed | {_size(st.get('original_lora_bytes'))} → {_size(st.get('compressed_bytes'))} |")
    if cfg is not None and getattr(cfg, "k_per_group", None):
        ks = sorted(set(cfg.k_per_group.values()))
        k = f"{ks[0]}" + (f"–{ks[-1]}" if len(ks) > 1 else "")
        lines.append(f"| k per module/side | {k} ({cfg.component_selection}, {cfg.dtype}) |")
    if st.get("delta_w_rel_error_mean") is not None:
        lines.append(f"| ΔW relative error | mean {st['delta_w_rel_error_mean']:.4f}, max {st['delta_w_rel_error_max']:.4f} |")
    lines += ["", "### Adapters", "",
              "| Adapter | Source | Fingerprint | Status | ΔW error mean | ΔW error max |",
              "|---|---|---|---|---|---|"]
    errors = share.delta_w_errors if share is not None else {}
    for a in plan.adapters:
        errs = list((errors.get(a.name) or {}).values())
        mean = f"{sum(errs) / len(errs):.4f}" if errs else "–"
        mx = f"{max(errs):.4f}" if errs else "–"
        status = a.status + (f" ({_cell(a.reason)})" if a.reason and a.status == "changed" else "")
        lines.append(f"| {_cell(a.name)} | `{_cell(a.source)}` | {_fp_label(a)} | {status} | {mean} | {mx} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- driver
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


def _credentials(repo_id: str, rep: _Reporter) -> Optional[str]:
    """HF_TOKEN, else a short-lived token from trusted publishing (OIDC) on a CI runner, else None."""
    token = os.environ.get("HF_TOKEN") or None
    if token:
        return token
    on_runner = bool(os.environ.get("ACTIONS_ID_TOKEN_REQUEST_URL") and os.environ.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"))
    if not (on_runner or os.environ.get("HF_OIDC_ID_TOKEN")):
        return None
    from . import hub

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
    rep = _Reporter(gha=gha, stream=stream)
    rep.mask(os.environ.get("HF_TOKEN"))  # before anything else is printed
    for alias in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_ID_TOKEN"):
        rep.mask(os.environ.get(alias))
    _use_runner_temp()
    progress = progress and not gha
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
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
        rep.summary(f"## lorashare sync failed\n\n{_cell(text)}\n")
        raise


def _use_runner_temp() -> None:
    """On a runner, temporary files go under ``$RUNNER_TEMP`` (never into the workspace)."""
    rt = os.environ.get("RUNNER_TEMP")
    if rt and os.path.isdir(rt):
        tempfile.tempdir = rt


def _run(config: str, *, dry_run: bool, force: bool, progress: bool, rep: _Reporter) -> SyncResult:
    from . import hub

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
        plan=_plan_json(plan),
    )
    if plan.changed and not dry_run:
        rep.group(f"lorashare sync: {plan.action}")
        try:
            share, reports = _apply(manifest, plan, fingerprints, token=token, progress=progress, say=rep.command)
        finally:
            rep.endgroup()
        message = commit_message(plan, reports)
        _set_card(share, manifest)
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
        result.plan = _plan_json(plan)
        result.adapters = list(share.adapter_names)
    elif plan.changed:
        result.message = commit_message(plan)
    if share is not None:
        result.compression_ratio = share.config.compression_stats.get("compression_ratio")
    elif published is not None and isinstance(published.compression_stats, dict) and not plan.changed:
        result.compression_ratio = published.compression_stats.get("compression_ratio")
    rep.outputs(result.outputs())
    rep.summary(_markdown(result, plan, share, published))
    return result


def _plan_json(plan: Plan) -> Dict[str, Dict[str, Any]]:
    return {a.name: {"status": a.status, "source": a.source, "kind": a.kind, "fingerprint": a.fingerprint,
                     "previous": a.previous, "reason": a.reason} for a in plan.adapters}


