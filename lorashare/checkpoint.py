"""The SHARE checkpoint format on disk (v1), and reading 0.1.x checkpoints.

Layout (a superset of what lorashare 0.1.x writes)::

    share_config.json                      SHAREConfig (below), incl. format_version,
                                           per-adapter source/revision/sha256 and a
                                           sha256 of every other file ("files")
    shared_components.safetensors          "<module>:<A|B>" → basis (d × k)
    adapters/<name>/loadings.safetensors   "<module>:<A|B>" → loading (k × r)
    adapters/<name>/classifier_head.safetensors   non-LoRA tensors, bit-exact
    adapters/<name>/adapter_meta.json      {"adapter_name", "original_config", ...}
    README.md                              model card

A factor comes back as ``B = U_B L_B`` and ``A = (U_A L_A)ᵀ``.  Only JSON and
safetensors are read; adapter names are checked before they touch a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

import torch

from .atomic import atomic_folder
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .names import check_name
from .tensorfile import TensorFile, save_bytes

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "SHAREConfig", "CheckpointData", "read_config", "load_checkpoint", "save_checkpoint", "checkpoint_files"]

FORMAT_VERSION = 1
CONFIG_FILE = "share_config.json"
COMPONENTS_FILE = "shared_components.safetensors"
LOADINGS_FILE = "loadings.safetensors"
HEAD_FILE = "classifier_head.safetensors"
META_FILE = "adapter_meta.json"
CARD_FILE = "README.md"
_MAX_JSON = 64 * 1024 * 1024


@dataclass
class SHAREConfig:
    """``share_config.json``.  The first block is lorashare 0.1.x's, unchanged in meaning."""

    share_version: str = "0.1.0"
    num_components: int = 32
    component_selection: str = "fixed"  # "fixed", "auto" or "budget"
    variance_threshold: float = 0.95
    base_model_name_or_path: str = ""
    target_modules: List[str] = field(default_factory=list)
    lora_rank: int = 0
    lora_alpha: Any = 0
    adapter_names: List[str] = field(default_factory=list)
    num_adapters: int = 0
    layer_keys: List[str] = field(default_factory=list)
    compression_stats: Dict[str, Any] = field(default_factory=dict)
    # format v1
    format_version: int = 0  # 0 = written by lorashare 0.1.x
    lorashare_version: str = ""
    dtype: str = "float32"
    budget_bytes: Optional[int] = None
    requested_components: Any = None  # what the user asked for: an int or "auto"
    k_per_group: Dict[str, int] = field(default_factory=dict)
    adapters: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    files: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SHAREConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.debug("share_config.json: ignoring unknown keys %s", unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, output_dir: str) -> None:
        """Write ``share_config.json`` into ``output_dir`` (0.1.x API)."""
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, checkpoint_dir: str) -> "SHAREConfig":
        """Read ``share_config.json`` from a folder (0.1.x API)."""
        return read_config(checkpoint_dir)


@dataclass
class CheckpointData:
    """A checkpoint in memory (the parts that were read)."""

    config: SHAREConfig
    components: Dict[str, torch.Tensor]
    loadings: Dict[str, Dict[str, torch.Tensor]]
    heads: Dict[str, Dict[str, torch.Tensor]]
    metas: Dict[str, Dict[str, Any]]


def _read_json(path: str, what: str) -> Any:
    try:
        if os.path.getsize(path) > _MAX_JSON:
            raise CheckpointError(f"{path} is over {_MAX_JSON} bytes; not a {what}.", path=path)
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not valid JSON ({exc}); the {what} is corrupt or truncated. Re-download or re-save it.",
            path=path,
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}", path=path) from exc


def _inside(root: str, rel: str, jail: Optional[str] = None) -> str:
    """``root/rel``, refusing anything that would resolve outside ``jail`` (default ``root``)."""
    path = os.path.join(root, *rel.split("/"))
    real = os.path.realpath(path)
    jail_real = os.path.realpath(jail or root)
    if os.path.isabs(rel) or ".." in rel.split("/") or os.path.commonpath([real, jail_real]) != jail_real:
        raise CheckpointError(
            f"{rel!r} in {root} resolves to {real}, outside the checkpoint. Refusing to read it "
            "(a symlink or '..' in a downloaded repo?).",
            path=path,
        )
    return path


def read_config(folder: str, *, jail: Optional[str] = None) -> SHAREConfig:
    """Read and sanity-check ``share_config.json``.

    Example:
        >>> read_config("my_share_checkpoint").adapter_names  # doctest: +SKIP
        ['billing', 'refunds']
    """
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {folder}: not a folder. Give the folder that save_pretrained wrote, "
            "or a Hub repo id.",
            path=folder,
        )
    path = _inside(folder, CONFIG_FILE, jail)
    try:
        data = _read_json(path, "SHARE config")
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no {CONFIG_FILE} in {folder}: not a SHARE checkpoint (or an interrupted save).", path=path
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.", path=path)
    try:
        cfg = SHAREConfig.from_dict(data)
    except TypeError as exc:
        raise CheckpointError(f"{path}: {exc}", path=path) from None
    if not isinstance(cfg.format_version, int) or cfg.format_version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {cfg.format_version!r}; this lorashare reads up to {FORMAT_VERSION}. "
            "Upgrade lorashare (pip install -U lorashare).",
            path=path,
        )
    if not isinstance(cfg.adapter_names, list) or not isinstance(cfg.files, dict) or not isinstance(cfg.adapters, dict):
        raise CheckpointError(f"{path}: adapter_names/files/adapters have the wrong types.", path=path)
    for name in cfg.adapter_names:
        check_name(name)
    return cfg


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(folder: str, rel: str, cfg: SHAREConfig, path: str) -> None:
    want = cfg.files.get(rel)
    if cfg.format_version >= 1 and want is None:
        raise IntegrityError(
            f"{rel} in {folder} has no fingerprint in {CONFIG_FILE}; the checkpoint was altered. Re-save it.",
            path=path,
        )
    if want is not None and _sha256_file(path) != want:
        raise IntegrityError(
            f"{rel} in {folder} does not match its sha256 in {CONFIG_FILE} (corrupted or tampered file). "
            "Re-download it (delete it from the cache) or re-save the checkpoint.",
            path=path,
        )


def _read_tensors(folder: str, rel: str, cfg: SHAREConfig, verify: bool, jail: Optional[str]) -> Dict[str, torch.Tensor]:
    path = _inside(folder, rel, jail)
    if not os.path.isfile(path):
        raise CheckpointError(f"{rel} is missing from the checkpoint at {folder}.", path=path)
    if verify:
        _verify(folder, rel, cfg, path)
    with TensorFile(path, error=CheckpointError) as tf:
        return tf.load_all()


def checkpoint_files(cfg: SHAREConfig, names: Optional[Iterable[str]] = None) -> List[str]:
    """Relative paths of the files needed for ``names`` (all adapters by default)."""
    names = cfg.adapter_names if names is None else list(names)
    out = [CONFIG_FILE, COMPONENTS_FILE]
    for n in names:
        for f in (LOADINGS_FILE, HEAD_FILE, META_FILE):
            rel = f"adapters/{n}/{f}"
            if cfg.format_version == 0 or rel in cfg.files:
                out.append(rel)
    return out


def load_checkpoint(
    folder: str, *, adapters: Optional[Iterable[str]] = None, verify: bool = True, jail: Optional[str] = None
) -> CheckpointData:
    """Read a checkpoint (v1 or 0.1.x), only the named adapters if ``adapters`` is given.

    With ``verify`` every file read is checked against its sha256 in the config.
    """
    cfg = read_config(folder, jail=jail)
    if cfg.format_version == 0:
        cfg = _legacy_config(folder, cfg, jail)
    names = list(cfg.adapter_names) if adapters is None else [check_name(n) for n in adapters]
    missing = [n for n in names if n not in cfg.adapter_names]
    if missing:
        from .errors import UnknownAdapterError

        raise UnknownAdapterError(
            f"adapter {missing[0]!r} is not in the checkpoint at {folder}; it has {cfg.adapter_names}.",
            adapter=missing[0],
        )
    components = _read_tensors(folder, COMPONENTS_FILE, cfg, verify, jail)
    loadings, heads, metas = {}, {}, {}
    for n in names:
        base = f"adapters/{n}"
        loadings[n] = _read_tensors(folder, f"{base}/{LOADINGS_FILE}", cfg, verify, jail)
        if os.path.exists(_inside(folder, f"{base}/{HEAD_FILE}", jail)) or f"{base}/{HEAD_FILE}" in cfg.files:
            heads[n] = _read_tensors(folder, f"{base}/{HEAD_FILE}", cfg, verify, jail)
        meta_path = _inside(folder, f"{base}/{META_FILE}", jail)
        if os.path.exists(meta_path):
            if verify:
                _verify(folder, f"{base}/{META_FILE}", cfg, meta_path)
            meta = _read_json(meta_path, "adapter meta")
            metas[n] = meta if isinstance(meta, dict) else {}
        else:
            metas[n] = {}
    card = _inside(folder, CARD_FILE, jail)
    if verify and CARD_FILE in cfg.files and os.path.isfile(card):
        _verify(folder, CARD_FILE, cfg, card)  # the card is not used here, but a tampered one is reported
    _check_shapes(folder, components, loadings)
    return CheckpointData(cfg, components, loadings, heads, metas)


def _legacy_config(folder: str, cfg: SHAREConfig, jail: Optional[str]) -> SHAREConfig:
    """A 0.1.x checkpoint lists its adapters by folder; recover names and k from the files."""
    adir = _inside(folder, "adapters", jail)
    names = sorted(
        d for d in (os.listdir(adir) if os.path.isdir(adir) else []) if os.path.isfile(os.path.join(adir, d, LOADINGS_FILE))
    )
    for n in names:
        check_name(n)
    cfg.adapter_names = names or list(cfg.adapter_names)
    cfg.num_adapters = len(cfg.adapter_names)
    return cfg


def _check_shapes(folder: str, components: Mapping[str, torch.Tensor], loadings: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Every loading must fit its basis before any matmul touches it."""
    for key, U in components.items():
        if U.dim() != 2 or not U.dtype.is_floating_point:
            raise CheckpointError(f"{COMPONENTS_FILE} in {folder}: {key!r} is {tuple(U.shape)} {U.dtype}; expected a 2-D float basis.", layer=key)
    for name, ls in loadings.items():
        for key, L in ls.items():
            U = components.get(key)
            if U is None:
                raise CheckpointError(
                    f"adapter {name!r} has a loading for {key!r} but {COMPONENTS_FILE} has no basis for it.",
                    adapter=name,
                    layer=key,
                )
            if L.dim() != 2 or L.shape[0] != U.shape[1] or not L.dtype.is_floating_point:
                raise CheckpointError(
                    f"adapter {name!r}: loading {key!r} is {tuple(L.shape)} but its basis is {tuple(U.shape)}; "
                    "expected (k, r) with k = the basis's columns. The checkpoint is corrupt.",
                    adapter=name,
                    layer=key,
                )


def save_checkpoint(folder: str, data: CheckpointData, *, card: Optional[str] = None) -> None:
    """Write a v1 checkpoint atomically: all of it appears at once, or nothing changes.

    Example:
        >>> save_checkpoint("out/ckpt", data, card="# My adapters")  # doctest: +SKIP
    """
    cfg = data.config
    payload: Dict[str, bytes] = {}
    payload[COMPONENTS_FILE] = save_bytes(data.components, {"format": "pt"})  # one key: Rust writes a map in random order
    for name in cfg.adapter_names:
        check_name(name)
        base = f"adapters/{name}"
        payload[f"{base}/{LOADINGS_FILE}"] = save_bytes(data.loadings[name], {"format": "pt"})
        if data.heads.get(name):
            payload[f"{base}/{HEAD_FILE}"] = save_bytes(data.heads[name], {"format": "pt"})
        payload[f"{base}/{META_FILE}"] = json.dumps(data.metas.get(name, {}), indent=2, sort_keys=True).encode()
    if card is not None:
        payload[CARD_FILE] = card.encode("utf-8")
    cfg.format_version = FORMAT_VERSION
    cfg.files = {rel: hashlib.sha256(b).hexdigest() for rel, b in sorted(payload.items())}
    payload[CONFIG_FILE] = json.dumps(cfg.to_dict(), indent=2).encode()
    with atomic_folder(folder) as tmp:
        for rel, blob in payload.items():
            path = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob)
