"""The ``lorashare.yaml`` manifest of ``lorashare sync``: parsed and validated with line numbers.

This docstring is the reference of the manifest: every key is below, with its default.  A
working example that names the adapters bundled with lorashare is ``examples/lorashare.yaml``;
``lorashare sync --check`` validates a manifest offline (no Hub, no token).

The manifest, ``lorashare.yaml``, lives in the repository that holds (or names) the adapters::

    version: 1                                 # optional: the manifest's format; 1 (the default) is the only one
    repo_id: acme/support-adapters-share       # required: the Hub repo the checkpoint is published to
    private: false                             # optional (default false); only used when the repo is created
    base_model: FacebookAI/roberta-base        # optional: the base model's Hub id, for the model card, when the
                                               # adapters' configs name a local folder they were trained from
    compression:                               # optional; every key optional
      num_components: auto                     # an integer ≥ 1 (k per module and side) or "auto" (default)
      variance_threshold: 0.95                 # (0, 1]: energy kept with "auto", and the projection
                                               # threshold when an adapter is added (default 0.95)
      dtype: float32                           # float32 (default), float16, bfloat16, int8 or nf4
      budget_bytes: 50000000                   # optional byte budget for bases + loadings (k chosen per module)
      target_ratio: 6                          # optional, instead of budget_bytes: 1/6 of the adapters' LoRA bytes
      weighting: delta_w                       # delta_w (default: fit the updates ΔW) or factors (plain PCA)
      strict: false                            # true: refuse adapters of mixed ranks or target modules
    adapters:                                  # required: at least 2; name → source
      billing: adapters/billing                # a folder in this repository, relative to the manifest's folder
      refunds: acme/refunds-lora@v3            # a Hub repo, optionally pinned to a branch, tag or commit
      legal: acme/multi-lora/legal             # a subfolder of a Hub repo (also accepts @revision)
    card:                                      # optional: the model card
      license: apache-2.0                      # a Hub license id (apache-2.0, mit, cc-by-4.0, …, or other)
      description: "Support-bot adapters, compressed with SHARE."   # the text of the model card

Rules:

* Unknown keys are errors (with a did-you-mean suggestion); every error names the file, the line
  and the key: ``lorashare.yaml:7: adapters.refunds: not a folder and not a Hub id``.
* Adapter names are single safe path components (``A-Z a-z 0-9 . _ -``).
* A source is a folder, relative to the manifest's folder, when it exists, when it looks like a
  path (starts with ``./``, ``../`` or ``/``, or has a ``.`` or ``..`` component), or when its
  leading folders exist (:func:`lorashare.hub.is_local_path`): with ``adapters/`` beside the
  manifest, ``adapters/billingg`` is a missing folder (the error lists the folders of
  ``adapters/``), not a Hub id.  A path written from the workspace's root instead of the
  manifest's folder is a folder too, and the error says how to write it.  Otherwise it must be a
  Hub id (``owner/name[/subfolder][@revision]``).
  Folders must stay inside the workspace (``GITHUB_WORKSPACE``, else the enclosing git repository,
  else the manifest's folder): no ``..`` escape, no absolute path elsewhere, no symlink that
  resolves outside, and their files must not be symlinks that resolve outside either.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .. import hub
from ..errors import ConfigError, HubError, LoraShareError
from ..format.spec import WEIGHTINGS, CompressionSpec
from ..format.storage import SCHEMES
from ..hub.card import check_license, is_model_id
from ..peft.adapters import CONFIG_NAME, WEIGHTS_NAME, missing_path
from ..utils.names import check_name, is_within, open_regular

logger = logging.getLogger(__name__)

__all__ = [
    "ManifestError",
    "Compression",
    "CardOptions",
    "AdapterSource",
    "Manifest",
    "load_manifest",
    "parse_manifest",
    "workspace_root",
]

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 1024 * 1024
DTYPE_NAMES = SCHEMES
TOP_KEYS = ("version", "repo_id", "private", "base_model", "compression", "adapters", "card")
COMPRESSION_KEYS = ("num_components", "variance_threshold", "dtype", "budget_bytes", "target_ratio", "weighting",
                    "strict")
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


def default_compression() -> CompressionSpec:
    """The spec of a manifest without a ``compression:`` block: auto k at 95% energy, float32, no budget."""
    return Compression()


def Compression(num_components: Union[int, str] = "auto", variance_threshold: float = 0.95, dtype: str = "float32",
                budget_bytes: Optional[int] = None, **more: Any) -> CompressionSpec:  # noqa: N802
    """The spec of a ``compression:`` block, with the manifest's defaults (kept for the old class's callers)."""
    return CompressionSpec(num_components=num_components, variance_threshold=variance_threshold, dtype=dtype,
                           budget_bytes=budget_bytes, **more)


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
    compression: CompressionSpec = field(default_factory=default_compression)
    adapters: Dict[str, AdapterSource] = field(default_factory=dict)
    card: CardOptions = field(default_factory=CardOptions)
    lines: Dict[str, int] = field(default_factory=dict)  # "compression.dtype" → line
    base_model: Optional[str] = None  # the base model's Hub id, when the adapters name a local folder


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
    folder = here
    while True:
        if os.path.exists(os.path.join(folder, ".git")):
            return folder
        parent = os.path.dirname(folder)
        if parent == folder:
            return here
        folder = parent


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
        try:
            f = open_regular(apath)  # a FIFO or a device would block the read forever
        except FileNotFoundError:
            raise ManifestError(
                f"{file}: no such file. Create a lorashare.yaml (see `lorashare sync --help`) or pass --config PATH.",
                file=file) from None
        except OSError as exc:
            raise ManifestError(f"{file}: cannot read the manifest: {exc.strerror or exc}. Give the lorashare.yaml "
                                "file itself (--config PATH).", file=file) from None
        with f:
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

    walker = _Walker(file)
    top = walker.mapping(root_node, "", TOP_KEYS)
    for required in ("repo_id", "adapters"):
        if required not in top:
            raise walker.error(root_node, "", f"missing {required!r} (required keys: repo_id, adapters)")

    if "version" in top:
        v_node = top["version"][1]
        version = walker.scalar(v_node, "version")
        if version != MANIFEST_VERSION or isinstance(version, bool):
            raise walker.error(v_node, "version", f"unsupported manifest version {_show(version)}; this lorashare reads version 1")

    repo_node = top["repo_id"][1]
    repo_id = walker.string(repo_node, "repo_id")
    try:
        hub.check_repo_id(repo_id)
    except HubError:
        raise walker.error(repo_node, "repo_id", f"{repo_id[:100]!r} is not a Hub repo id (owner/name)") from None

    private = False
    if "private" in top:
        p_node = top["private"][1]
        private = walker.scalar(p_node, "private")
        if not isinstance(private, bool):
            raise walker.error(p_node, "private", f"expected true or false, got {_show(private)}")

    base_model = None
    if "base_model" in top:
        b_node = top["base_model"][1]
        base_model = walker.string(b_node, "base_model")
        if not is_model_id(base_model):
            raise walker.error(b_node, "base_model", f"{base_model[:100]!r} is not a Hub model id (owner/name); the "
                               "card links it, so a local folder cannot be the base model here")
    compression = _compression(walker, top["compression"][1]) if "compression" in top else default_compression()
    card = _card(walker, top["card"][1]) if "card" in top else CardOptions()
    adapters = _adapters(walker, top["adapters"][1], os.path.dirname(apath), root)
    return Manifest(file=file, path=apath, root=root, repo_id=repo_id, private=private, compression=compression,
                    adapters=adapters, card=card, lines=dict(walker.lines), base_model=base_model)


def _compression(walker: _Walker, node: Any) -> CompressionSpec:
    import yaml

    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return default_compression()
    items = walker.mapping(node, "compression", COMPRESSION_KEYS)
    values: Dict[str, Any] = {}
    if "num_components" in items:
        item = items["num_components"][1]
        k = walker.scalar(item, "compression.num_components")
        if k != "auto" and not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 1_000_000):
            raise walker.error(item, "compression.num_components", f"expected an integer ≥ 1 or 'auto', got {_show(k)}")
        values["num_components"] = k
    if "variance_threshold" in items:
        item = items["variance_threshold"][1]
        value = walker.scalar(item, "compression.variance_threshold")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
            raise walker.error(item, "compression.variance_threshold", f"expected a number in (0, 1], got {_show(value)}")
        values["variance_threshold"] = float(value)
    if "dtype" in items:
        item = items["dtype"][1]
        dtype = walker.scalar(item, "compression.dtype")
        if dtype not in DTYPE_NAMES:
            close = difflib.get_close_matches(str(dtype), DTYPE_NAMES, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise walker.error(item, "compression.dtype", f"expected one of {', '.join(DTYPE_NAMES)}, got {_show(dtype)}{hint}")
        values["dtype"] = dtype
    if "budget_bytes" in items:
        item = items["budget_bytes"][1]
        budget = walker.scalar(item, "compression.budget_bytes")
        if budget is not None and not (isinstance(budget, int) and not isinstance(budget, bool) and 1 <= budget <= 2**62):
            raise walker.error(item, "compression.budget_bytes", f"expected a number of bytes ≥ 1, got {_show(budget)}")
        values["budget_bytes"] = budget
    if "target_ratio" in items:
        item = items["target_ratio"][1]
        ratio = walker.scalar(item, "compression.target_ratio")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not math.isfinite(ratio) or ratio <= 0):
            raise walker.error(item, "compression.target_ratio", f"expected a number > 0 (e.g. 6 for 1/6 of the size), "
                               f"got {_show(ratio)}")
        values["target_ratio"] = None if ratio is None else float(ratio)
    if "weighting" in items:
        item = items["weighting"][1]
        weighting = walker.scalar(item, "compression.weighting")
        if weighting not in WEIGHTINGS:
            raise walker.error(item, "compression.weighting", f"expected one of {', '.join(WEIGHTINGS)}, got {_show(weighting)}")
        values["weighting"] = weighting
    if "strict" in items:
        item = items["strict"][1]
        strict = walker.scalar(item, "compression.strict")
        if not isinstance(strict, bool):
            raise walker.error(item, "compression.strict", f"expected true or false, got {_show(strict)}")
        values["strict"] = strict
    try:
        return default_compression().replace(**values)
    except ConfigError as exc:  # a rule between settings (budget_bytes and target_ratio both set)
        raise walker.error(node, "compression", str(exc)) from None


def _card(walker: _Walker, node: Any) -> CardOptions:
    import yaml

    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return CardOptions()
    items = walker.mapping(node, "card", CARD_KEYS)
    values: Dict[str, Optional[str]] = {}
    if "license" in items:
        item = items["license"][1]
        lic = walker.string(item, "card.license")
        try:
            values["license"] = check_license(lic)
        except ConfigError as exc:
            raise walker.error(item, "card.license", str(exc)) from None
    if "description" in items:
        item = items["description"][1]
        desc = walker.string(item, "card.description", allow_empty=True)
        if len(desc) > 20_000:
            raise walker.error(item, "card.description", "over 20000 characters")
        values["description"] = desc or None
    return CardOptions(**values)


def _adapters(walker: _Walker, node: Any, base: str, root: str) -> Dict[str, AdapterSource]:

    items = walker.mapping(node, "adapters", None)
    if len(items) < 2:
        raise walker.error(node, "adapters", f"needs at least 2 adapters to share a basis, got {len(items)}")
    out: Dict[str, AdapterSource] = {}
    for name, (k_node, v_node) in items.items():
        key = f"adapters.{name}"[:140]
        try:
            check_name(name)
        except LoraShareError:
            raise walker.error(k_node, key, "bad adapter name: use 1-128 characters from A-Z a-z 0-9 . _ - "
                          "(not '.' or '..')") from None
        text = walker.string(v_node, key)
        out[name] = _source(walker, v_node, key, name, text, base, root)
    return out


def _source(walker: _Walker, node: Any, key: str, name: str, text: str, base: str, root: str) -> AdapterSource:

    candidate = os.path.normpath(os.path.join(base, text)) if "\x00" not in text else ""
    # a path written from the repository's root (examples/adapters/x in examples/lorashare.yaml) is a path too
    if candidate and (_is_path(text, base) or (root != base and _is_path(text, root))):
        return _folder_source(walker, node, key, name, text, candidate, base, root)
    try:
        ref = hub.parse_adapter_id(text)
    except HubError:
        raise walker.error(node, key, f"{text[:100]!r} is not a folder and not a Hub id "
                      "(owner/name, owner/name@revision or owner/name/subfolder)") from None
    return AdapterSource(name=name, text=text, kind="hub", line=_line(node), ref=ref)


def _is_path(text: str, base: str) -> bool:
    """A folder source, not a Hub id: it exists, or it can only be a path (:func:`lorashare.hub.is_local_path`:
    ``./``, ``../``, ``/``, a ``.`` or ``..`` part, leading folders that exist), relative to ``base``."""
    return "\\" in text or hub.is_local_path(text, base=base) or os.path.lexists(os.path.join(base, text))


def _folder_source(walker: _Walker, node: Any, key: str, name: str, text: str, folder: str, base: str,
                   root: str) -> AdapterSource:
    shown = text[:100]
    if not folder or not is_within(folder, root, resolve=False):
        raise walker.error(node, key, f"{shown!r} is outside the workspace ({root}); adapter folders must be in the repository")
    if not is_within(folder, root):
        raise walker.error(node, key, f"{shown!r} resolves outside the workspace (a symlink to "
                      f"{os.path.realpath(folder)}); refusing it")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise walker.error(node, key, f"{shown!r}: is a file, not an adapter folder")
    if not os.path.isdir(folder):
        from_root = os.path.normpath(os.path.join(root, text))
        if root != base and os.path.isdir(from_root) and is_within(from_root, root):
            fixed = os.path.relpath(from_root, base).replace(os.sep, "/")
            where = os.path.relpath(base, root).replace(os.sep, "/")
            raise walker.error(node, key, f"{shown} does not exist here: folders are relative to the manifest's "
                                          f"folder ({where}/), so write {fixed!r}")
        raise walker.error(node, key, missing_path(text, base=base)[:400])
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        p = os.path.join(folder, fname)
        if not os.path.lexists(p):
            raise walker.error(node, key, f"{shown!r} has no {fname}: not a PEFT adapter folder "
                          "(save it with PeftModel.save_pretrained, safetensors)")
        if not is_within(p, root):
            raise walker.error(node, key, f"{shown!r}: {fname} is a symlink that resolves outside the workspace; refusing it")
        if not os.path.isfile(p):
            raise walker.error(node, key, f"{shown!r}: {fname} is not a regular file")
    rel = os.path.relpath(folder, base).replace(os.sep, "/")
    return AdapterSource(name=name, text=rel, kind="folder", line=_line(node), folder=folder)


def _display(apath: str, root: str, given: str) -> str:
    if is_within(apath, root, resolve=False):
        return os.path.relpath(apath, root).replace(os.sep, "/")
    return given
