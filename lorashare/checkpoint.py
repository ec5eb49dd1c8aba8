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

With ``int8`` / ``nf4`` storage (format 2) each of those safetensors files holds instead three
tensors, ``index`` (n × 2: the key's position in sorted ``k_per_group``, its width), ``codes`` and
``scales`` (see :mod:`lorashare.storage` and ``_decode``).

A factor comes back as ``B = U_B L_B`` and ``A = (U_A L_A)ᵀ``.  Only JSON and
safetensors are read; adapter names are checked before they touch a path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from .atomic import atomic_folder, check_target
from .errors import CheckpointError, CheckpointNotFoundError, IntegrityError
from .jsonfile import loads as json_loads
from .loraconfig import check_lora_config
from .names import check_name, is_within
from .storage import NF4_BLOCK, PACKED_KEYS, QUANTIZED, SCHEMES, Stored, code_shape, is_quantized, quantize, scale_count
from .tensorfile import TensorFile, save_bytes

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CardData", "SHAREConfig", "CheckpointData", "read_config", "load_checkpoint", "save_checkpoint", "checkpoint_files",
           "check_checkpoint_target", "foreign_content"]

#: The newest format this lorashare reads.  It writes 1 for float storage (which lorashare 0.2.0 reads
#: too) and 2 only for quantized storage, which older readers must refuse rather than misread.
FORMAT_VERSION = 2
QUANTIZED_FORMAT_VERSION = 2
CONFIG_FILE = "share_config.json"
COMPONENTS_FILE = "shared_components.safetensors"
LOADINGS_FILE = "loadings.safetensors"
HEAD_FILE = "classifier_head.safetensors"
META_FILE = "adapter_meta.json"
CARD_FILE = "README.md"
_MAX_JSON = 64 * 1024 * 1024


@dataclass
class CardData:
    """The model card's own options; everything else on the card is derived from the config.

    Example:
        >>> CardData(repo_id="acme/support-share", license="apache-2.0")
        CardData(repo_id='acme/support-share', license='apache-2.0', description=None)
    """

    repo_id: Optional[str] = None  # the card's title and usage snippet name it
    license: Optional[str] = None  # a Hub license id (lorashare.card.check_license)
    description: Optional[str] = None


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
    # format v2: how quantized bases and loadings are laid out (None: floats, in ``dtype``)
    storage: Optional[Dict[str, Any]] = None
    card: CardData = field(default_factory=CardData)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SHAREConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.debug("share_config.json: ignoring unknown keys %s", unknown)
        values = {k: v for k, v in data.items() if k in known}
        stats = values.get("compression_stats")
        card = values.get("card")
        if card is None and isinstance(stats, dict) and isinstance(stats.get("card"), dict):
            # written by 0.2.0 before the card had its own field
            values["compression_stats"] = {k: v for k, v in stats.items() if k != "card"}
            card = stats["card"]
        values["card"] = CardData(**{k: card.get(k) for k in ("repo_id", "license", "description")}) \
            if isinstance(card, dict) else CardData()
        return cls(**values)

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
    """A checkpoint in memory (the parts that were read).

    With quantized storage, ``components`` and ``loadings`` are the dequantized floats and
    ``stored_components`` / ``stored_loadings`` the codes and scales as on disk: a save
    writes those unchanged (bit-identical), and quantizes only what has none.
    """

    config: SHAREConfig
    components: Dict[str, torch.Tensor]
    loadings: Dict[str, Dict[str, torch.Tensor]]
    heads: Dict[str, Dict[str, torch.Tensor]]
    metas: Dict[str, Dict[str, Any]]
    stored_components: Dict[str, Stored] = field(default_factory=dict)
    stored_loadings: Dict[str, Dict[str, Stored]] = field(default_factory=dict)


def _read_json(path: str, what: str) -> Any:
    try:
        if os.path.getsize(path) > _MAX_JSON:
            raise CheckpointError(f"{path} is over {_MAX_JSON} bytes; not a {what}.", path=path)
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", path=path) from exc
    return json_loads(
        raw, path=path, what=what, error=CheckpointError,
        hint=f"The {what} is corrupt or truncated: re-download the checkpoint or re-save it.",
    )


def _inside(root: str, rel: str, jail: Optional[str] = None) -> str:
    """``root/rel``, refusing anything that would resolve outside ``jail`` (default ``root``)."""
    path = os.path.join(root, *rel.split("/"))
    if os.path.isabs(rel) or ".." in rel.split("/") or not is_within(path, jail or root):
        raise CheckpointError(
            f"{rel!r} in {root} resolves to {os.path.realpath(path)}, outside the checkpoint. Refusing to read it "
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
    _check_format_version(data, path)
    return SHAREConfig.from_dict(_checked_config(data, path))


# --------------------------------------------------------------------------- validation on load
# Every field that lorashare reads back is checked here, with its type, so that an edited or
# corrupt checkpoint fails on load naming the file and the field, never later with a TypeError.

#: share_config.json keys that lorashare 0.1.x writes; every other field is format v1.
_LEGACY_KEYS = frozenset({
    "share_version", "num_components", "component_selection", "variance_threshold", "base_model_name_or_path",
    "target_modules", "lora_rank", "lora_alpha", "adapter_names", "num_adapters", "layer_keys", "compression_stats",
})
_FIX = "The checkpoint was edited or is corrupt: re-download it, or re-save it with lorashare."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_GROUP_KEY = re.compile(r"^.+:[AB]$")


def _bad(path: str, name: str, value: Any, expected: str) -> CheckpointError:
    return CheckpointError(f"{path}: field {name!r} is {reprlib.repr(value)}, expected {expected}. {_FIX}", path=path)


def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_real(v: Any) -> bool:
    """A JSON number; 0.1.x writes ``Infinity`` as a ratio, so it is one too."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_real(v) and math.isfinite(v)


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


#: share_config.json: field → (check, what it must be).  format_version is checked apart.
_CONFIG_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "share_version": (_is_str, "a string"),
    "num_components": (_is_int, "an integer ≥ 0"),
    "component_selection": (lambda v: v in ("fixed", "auto", "budget"), "'fixed', 'auto' or 'budget'"),
    "variance_threshold": (lambda v: _is_finite(v) and 0 < v <= 1, "a number in (0, 1]"),
    "base_model_name_or_path": (_opt(_is_str), "a string"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _str_list(v), "a list of module names"),
    "lora_rank": (_is_int, "an integer ≥ 0"),
    "lora_alpha": (_opt(_is_finite), "a number"),
    "adapter_names": (_str_list, "a list of adapter names"),
    "num_adapters": (_is_int, "an integer ≥ 0"),
    "layer_keys": (_str_list, "a list of module names"),
    "compression_stats": (lambda v: isinstance(v, dict), "an object"),
    "lorashare_version": (_is_str, "a string"),
    "dtype": (lambda v: isinstance(v, str) and v in SCHEMES, f"one of {', '.join(SCHEMES)}"),
    "storage": (lambda v: v is None or (isinstance(v, dict) and set(v) == {"bases", "loadings", "block_size", "layout"}
                                        and v["bases"] in QUANTIZED and v["loadings"] in QUANTIZED
                                        and v["block_size"] == NF4_BLOCK and v["layout"] == "packed"),
                f'null or {{"bases": int8|nf4, "loadings": int8|nf4, "block_size": {NF4_BLOCK}, '
                '"layout": "packed"}'),
    "budget_bytes": (_opt(lambda v: _is_int(v, 1)), "a positive integer or null"),
    "requested_components": (lambda v: v is None or v == "auto" or _is_int(v, 1), "an integer ≥ 1, 'auto' or null"),
    "k_per_group": (_str_map(_is_int), 'an object {"<module>:<A|B>": k}'),
    "adapters": (_str_map(lambda v: isinstance(v, dict)), "an object {adapter name: {...}}"),
    "files": (_str_map(lambda v: isinstance(v, str) and bool(_SHA256.match(v))),
              'an object {"<relative path>": "<64 hex digits of sha256>"}'),
    "card": (lambda v: isinstance(v, dict) and set(v) <= {"repo_id", "license", "description"}
             and all(_opt(_is_str)(x) for x in v.values()),
             "an object of strings or nulls: repo_id, license, description"),
}

#: compression_stats: numbers that summary(), the card, the CLI and the Space format.
_STAT_NUMBERS = (
    "original_total_params", "compressed_total_params", "shared_component_params", "per_adapter_loading_params",
    "mean_explained_variance", "min_explained_variance", "original_lora_bytes", "shared_bytes", "loadings_bytes",
    "heads_bytes", "compressed_bytes", "compression_ratio", "compression_ratio_excluding_basis",
    "delta_w_rel_error_mean", "delta_w_rel_error_max",
)
#: A stat that is set needs these too (summary() prints them together).
_STAT_NEEDS = {
    "original_lora_bytes": ("compressed_bytes", "shared_bytes", "loadings_bytes", "compression_ratio",
                            "compression_ratio_excluding_basis"),
    "delta_w_rel_error_mean": ("delta_w_rel_error_max",),
    "per_layer_explained_variance": ("mean_explained_variance", "min_explained_variance"),
}

#: share_config.json "adapters" → each adapter's record.
_ADAPTER_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "source": (_opt(_is_str), "a string (a folder or a Hub id)"),
    "revision": (_opt(_is_str), "a string or null"),
    "sha256": (_opt(lambda v: isinstance(v, str) and bool(_SHA256.match(v))), "64 hex digits or null"),
    "rank": (_opt(_is_int), "an integer ≥ 0"),
    "lora_alpha": (_opt(_is_finite), "a number or null"),
    "lora_bytes": (_opt(_is_int), "an integer ≥ 0 or null"),
    "delta_w_error_mean": (_opt(_is_finite), "a number or null"),
    "delta_w_error_max": (_opt(_is_finite), "a number or null"),
    "task_type": (_opt(_is_str), "a PEFT task type (e.g. SEQ_CLS) or null"),
    "num_labels": (_opt(lambda v: _is_int(v, 1)), "an integer ≥ 1 or null"),
}

#: adapter_meta.json (the adapter's original config is checked by adapters.py's own check).
_META_FIELDS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "adapter_name": (_opt(_is_str), "a string"),
    "original_config": (lambda v: isinstance(v, dict), "an object (the adapter's adapter_config.json)"),
    "original_adapter_path": (_opt(_is_str), "a string or null"),
    "revision": (_opt(_is_str), "a string or null"),
    "sha256": (_opt(_is_str), "a string or null"),
    "delta_w_error": (_str_map(lambda v: _is_finite(v) and v >= 0), 'an object {"<module>": error ≥ 0}'),
}


def _check_fields(data: Mapping[str, Any], table: Mapping[str, Tuple[Callable[[Any], bool], str]], path: str,
                  prefix: str = "") -> None:
    for key, (check, expected) in table.items():
        if key in data and not check(data[key]):
            raise _bad(path, prefix + key, data[key], expected)


def _check_format_version(data: Mapping[str, Any], path: str) -> None:
    """Only a real 0.1.x layout (no format_version, no v1 field) may go without fingerprints."""
    if "format_version" not in data:
        v1 = sorted(set(data) & (set(_CONFIG_FIELDS) - _LEGACY_KEYS))
        if v1:
            raise IntegrityError(
                f"{path} has format-v1 fields {v1} but no format_version, as if to pass for a 0.1.x checkpoint "
                f"(which has no fingerprints). {_FIX}",
                path=path,
            )
        return
    fv = data["format_version"]
    if isinstance(fv, bool) or not isinstance(fv, int):
        raise _bad(path, "format_version", fv, "the integer 1 (or 2, with int8 or nf4 storage)")
    if fv > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {fv}; this lorashare reads up to {FORMAT_VERSION}. "
            'Upgrade lorashare: pip install -U "lorashare @ git+https://github.com/lorashare/lorashare" (PyPI has only the older 0.1.x).',
            path=path,
        )
    if fv < 1:
        raise IntegrityError(
            f"{path}: format_version is {fv}, which no lorashare writes (0.1.x writes none, v1 writes 1): "
            f"it would turn off verification. {_FIX}",
            path=path,
        )


def _checked_config(data: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``data`` with every known field checked; 0.1.x's loose values normalised (null → "", a string → [it])."""
    _check_fields(data, _CONFIG_FIELDS, path)
    _check_storage(data, path)
    data = dict(data)
    if data.get("base_model_name_or_path", "") is None:
        data["base_model_name_or_path"] = ""
    tm = data.get("target_modules", [])
    data["target_modules"] = [] if tm is None else [tm] if isinstance(tm, str) else tm
    names = data.get("adapter_names", [])
    for name in names:
        check_name(name)
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _bad(path, "adapter_names", names, f"unique names ({dup!r} is there twice)")
    for name, info in data.get("adapters", {}).items():
        _check_fields(info, _ADAPTER_FIELDS, path, prefix=f"adapters.{name}.")
    st = data.get("compression_stats", {})
    for key in _STAT_NUMBERS:
        if key in st and not _opt(_is_real)(st[key]):
            raise _bad(path, f"compression_stats.{key}", st[key], "a number or null")
    per_layer = st.get("per_layer_explained_variance")
    if per_layer is not None and not _str_map(_is_real)(per_layer):
        raise _bad(path, "compression_stats.per_layer_explained_variance", per_layer, 'an object {"<module>:<A|B>": number}')
    for key, needs in _STAT_NEEDS.items():
        if st.get(key) is not None:
            for need in needs:
                if not _is_real(st.get(need)):
                    raise _bad(path, f"compression_stats.{need}", st.get(need), f"a number (compression_stats.{key} is set)")
    capped = st.get("capped_groups")
    if capped is not None and not (isinstance(capped, list) and all(isinstance(k, str) and k.endswith((":A", ":B"))
                                                                   for k in capped)):
        raise _bad(path, "compression_stats.capped_groups", capped, 'a list of "<module>:<A|B>" keys')
    card = st.get("card")
    if card is not None and not (isinstance(card, dict) and all(_opt(_is_str)(v) for v in card.values())):
        raise _bad(path, "compression_stats.card", card, "an object of strings (repo_id, license, description)")
    return data


def _check_storage(data: Mapping[str, Any], path: str) -> None:
    """Quantized storage needs format 2, its ``storage`` layout and a k for every group; floats have none."""
    quantized = is_quantized(data.get("dtype", "float32"))
    storage = data.get("storage")
    if quantized != (storage is not None):
        raise _bad(path, "storage", storage, f"a layout object for dtype {data.get('dtype')!r}" if quantized else
                   f"null for dtype {data.get('dtype', 'float32')!r} (only int8 and nf4 have a layout)")
    if quantized and data.get("format_version") != QUANTIZED_FORMAT_VERSION:
        raise _bad(path, "format_version", data.get("format_version"),
                   f"{QUANTIZED_FORMAT_VERSION} with dtype {data['dtype']!r} (older readers must refuse quantized files)")
    if quantized and storage["bases"] != data["dtype"] and storage["loadings"] != data["dtype"]:
        raise _bad(path, "storage", storage, f"bases or loadings in dtype {data['dtype']!r}")


def _checked_meta(meta: Any, name: str, path: str) -> Dict[str, Any]:
    """An ``adapter_meta.json``, checked; its ``original_config`` must be a LoRA config lorashare can rebuild."""
    if not isinstance(meta, dict):
        raise _bad(path, "(the whole file)", meta, "a JSON object")
    if "original_config" not in meta:
        raise CheckpointError(
            f"{path}: field 'original_config' is missing, so adapter {name!r}'s LoRA config (lora_alpha, "
            f"use_rslora, ...) is unknown and it cannot be rebuilt. {_FIX}",
            adapter=name,
            path=path,
        )
    _check_fields(meta, _META_FIELDS, path)
    check_lora_config(meta["original_config"], name, path, error=CheckpointError, prefix="original_config.",
                      require_r=True, fix=_FIX)
    return meta


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
        raise _missing(folder, rel, cfg, path)
    if verify:
        _verify(folder, rel, cfg, path)
    with TensorFile(path, error=CheckpointError) as tf:
        return tf.load_all()


def _missing(folder: str, rel: str, cfg: SHAREConfig, path: str) -> CheckpointError:
    """A needed file is not there: an :class:`IntegrityError` when ``files`` lists it."""
    if rel in cfg.files:
        return IntegrityError(
            f"{rel} is listed in {CONFIG_FILE}'s files but is missing from the checkpoint at {folder} "
            "(deleted, or an incomplete copy or download). Re-download the checkpoint or re-save it.",
            path=path,
        )
    return CheckpointError(f"{rel} is missing from the checkpoint at {folder}. {_FIX}", path=path)


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
        if verify:
            logger.warning(
                "%s is a lorashare 0.1.x checkpoint: it has no fingerprints, so its files are not verified. "
                "Re-save it (save_pretrained) to add them.", folder,
            )
    names = list(cfg.adapter_names) if adapters is None else [check_name(n) for n in adapters]
    missing = [n for n in names if n not in cfg.adapter_names]
    if missing:
        from .errors import UnknownAdapterError

        raise UnknownAdapterError(
            f"adapter {missing[0]!r} is not in the checkpoint at {folder}; it has {cfg.adapter_names}.",
            adapter=missing[0],
        )
    if verify and cfg.format_version >= 1:
        for rel in [COMPONENTS_FILE] + [f"adapters/{n}/{f}" for n in names for f in (LOADINGS_FILE, META_FILE)]:
            if rel not in cfg.files:
                raise IntegrityError(
                    f"{rel} in {folder} has no fingerprint in {CONFIG_FILE}'s files; the checkpoint was altered. "
                    "Re-download it or re-save it.",
                    path=os.path.join(folder, *rel.split("/")),
                )
    components = _read_tensors(folder, COMPONENTS_FILE, cfg, verify, jail)
    stored_components: Dict[str, Stored] = {}
    stored_loadings: Dict[str, Dict[str, Stored]] = {}
    if cfg.storage is not None:
        components, stored_components = _decode(components, cfg.storage["bases"], cfg, folder, COMPONENTS_FILE, None)
    loadings, heads, metas = {}, {}, {}
    for n in names:
        base = f"adapters/{n}"
        loadings[n] = _read_tensors(folder, f"{base}/{LOADINGS_FILE}", cfg, verify, jail)
        if cfg.storage is not None:
            loadings[n], stored_loadings[n] = _decode(loadings[n], cfg.storage["loadings"], cfg, folder,
                                                      f"{base}/{LOADINGS_FILE}", n)
        if os.path.exists(_inside(folder, f"{base}/{HEAD_FILE}", jail)) or f"{base}/{HEAD_FILE}" in cfg.files:
            heads[n] = _read_tensors(folder, f"{base}/{HEAD_FILE}", cfg, verify, jail)
        meta_path = _inside(folder, f"{base}/{META_FILE}", jail)
        if not os.path.isfile(meta_path):  # never invent a config: a wrong alpha would rescale the adapter
            raise _missing(folder, f"{base}/{META_FILE}", cfg, meta_path)
        if verify:
            _verify(folder, f"{base}/{META_FILE}", cfg, meta_path)
        metas[n] = _checked_meta(_read_json(meta_path, f"adapter meta ({META_FILE})"), n, meta_path)
    card = _inside(folder, CARD_FILE, jail)
    if verify and CARD_FILE in cfg.files and os.path.isfile(card):
        _verify(folder, CARD_FILE, cfg, card)  # the card is not used here, but a tampered one is reported
    _check_shapes(folder, components, loadings)
    return CheckpointData(cfg, components, loadings, heads, metas, stored_components, stored_loadings)


def _decode(raw: Mapping[str, torch.Tensor], scheme: str, cfg: SHAREConfig, folder: str, rel: str,
            adapter: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Stored]]:
    """A packed quantized file, checked field by field: ``(dequantized floats, stored forms)``.

    ``index`` row i is (position of the tensor's key in sorted ``k_per_group``, c); its codes and
    scales follow those of the rows before it in ``codes`` and ``scales``.  The basis file holds
    ``Uᵀ`` (k × d), a loadings file ``L`` (k × r); k comes from ``k_per_group``, so a file that
    disagrees with the config is refused before any byte is decoded.
    """
    def fail(what: str, why: str) -> CheckpointError:
        return CheckpointError(f"{rel} in {folder}: {what} {why}. {_FIX}", adapter=adapter,
                               path=os.path.join(folder, *rel.split("/")))

    if set(raw) != set(PACKED_KEYS):
        raise fail("tensors", f"are {sorted(raw)}; a {scheme} file holds exactly {list(PACKED_KEYS)}")
    index, codes, scales = raw["index"], raw["codes"], raw["scales"]
    want_codes = torch.int8 if scheme == "int8" else torch.uint8
    if index.dtype != torch.int32 or index.dim() != 2 or index.shape[1] != 2:
        raise fail("'index'", f"is {tuple(index.shape)} {index.dtype}; expected (n, 2) int32")
    if codes.dtype != want_codes or codes.dim() != 1:
        raise fail("'codes'", f"is {tuple(codes.shape)} {codes.dtype}; expected a vector of {want_codes} ({scheme})")
    if scales.dtype != torch.float32 or scales.dim() != 1:
        raise fail("'scales'", f"is {tuple(scales.shape)} {scales.dtype}; expected a vector of float32 scales")
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise fail("'scales'", "holds a negative, NaN or infinite scale")
    if scheme == "int8" and bool((codes == -128).any()):
        raise fail("'codes'", "holds the code -128; int8 codes are symmetric, in [-127, 127]")
    groups = sorted(cfg.k_per_group)
    floats: Dict[str, torch.Tensor] = {}
    stored: Dict[str, Stored] = {}
    at = sat = 0
    for g, c in index.tolist():
        if not (0 <= g < len(groups)) or c < 1:
            raise fail(f"'index' row ({g}, {c})", f"is not (a position in share_config.json's {len(groups)} "
                                                   "k_per_group keys, sorted; a width ≥ 1)")
        key = groups[g]
        if key in stored:
            raise fail(f"'index' row ({g}, {c})", f"names {key!r} a second time")
        k = cfg.k_per_group[key]
        if not _is_int(k, 1):
            raise fail(f"k_per_group[{key!r}]", f"is {k!r}, expected an integer ≥ 1")
        rows, _ = code_shape(scheme, k, c)
        n, ns = rows * c, scale_count(k, c)
        if at + n > codes.numel() or sat + ns > scales.numel():
            raise fail(f"{key!r} (k = {k}, c = {c})", f"needs codes up to {at + n} and scales up to {sat + ns}, but "
                                                     f"the file has {codes.numel()} and {scales.numel()}")
        block = codes[at:at + n].reshape(rows, c)
        if scheme == "nf4" and k % 2 and bool(((block[-1] & 0xF) != 7).any()):
            raise fail(repr(key), "has padding codes other than 0.0 (code 7) in the low nibbles of its last row (k is odd)")
        st = Stored(scheme, (k, c), block.clone(), scales[sat:sat + ns].clone(), transposed=adapter is None)
        stored[key] = st
        floats[key] = st.dequantize()
        at, sat = at + n, sat + ns
    if at != codes.numel() or sat != scales.numel():
        raise fail("'codes' and 'scales'", f"hold {codes.numel()} codes and {scales.numel()} scales, but the index "
                                           f"accounts for {at} and {sat}")
    return floats, stored


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
        if not _GROUP_KEY.match(key):
            raise CheckpointError(
                f"{COMPONENTS_FILE} in {folder}: tensor {key!r} is not named '<module>:A' or '<module>:B'. {_FIX}",
                layer=key,
            )
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
        for key, L in ls.items():
            module, side = key[:-2], key[-1:]
            other = ls.get(f"{module}:{'B' if side == 'A' else 'A'}")
            if other is None or L.shape[1] != other.shape[1]:  # both are 2-D: checked above
                raise CheckpointError(
                    f"adapter {name!r}: {LOADINGS_FILE} has {key!r} " + (
                        "without its other side" if other is None else
                        f"of rank {L.shape[1]} but its other side has rank {other.shape[1]}") +
                    f"; a module needs an A and a B loading of one rank. {_FIX}",
                    adapter=name,
                    layer=module,
                )


_TOP_LEVEL = {CONFIG_FILE: False, COMPONENTS_FILE: False, CARD_FILE: False, "adapters": True}  # name → is a folder
_PER_ADAPTER = (LOADINGS_FILE, HEAD_FILE, META_FILE)


def foreign_content(folder: str) -> Optional[str]:
    """``None`` if ``folder`` holds a SHARE checkpoint and nothing else, else what is foreign in it.

    Saves replace a non-empty folder only when this is ``None``, so that a folder of the
    user's (or a git clone with ``.git``) is never swapped out.

    Example:
        >>> foreign_content("share_ckpt") is None  # doctest: +SKIP
        True
    """
    config = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config) or os.path.islink(config):
        return f"it has no {CONFIG_FILE}"
    try:
        if os.path.getsize(config) > _MAX_JSON:
            return f"its {CONFIG_FILE} is too large"
        with open(config, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return f"its {CONFIG_FILE} is not readable JSON"
    if not isinstance(data, dict) or "adapter_names" not in data:
        return f"its {CONFIG_FILE} is not a SHARE config"
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry not in _TOP_LEVEL or os.path.islink(path) or os.path.isdir(path) != _TOP_LEVEL[entry]:
            return f"it holds {entry!r}"
    adir = os.path.join(folder, "adapters")
    for name in sorted(os.listdir(adir)) if os.path.isdir(adir) else []:
        sub = os.path.join(adir, name)
        if os.path.islink(sub) or not os.path.isdir(sub):
            return f"it holds adapters/{name!r}"
        for entry in sorted(os.listdir(sub)):
            if entry not in _PER_ADAPTER or os.path.islink(os.path.join(sub, entry)):
                return f"it holds adapters/{name}/{entry!r}"
    return None


def check_checkpoint_target(folder: str, *, inputs: Iterable[str] = (), overwrite: bool = False) -> str:
    """Raise :class:`~lorashare.errors.OutputPathError` unless a checkpoint may be saved at ``folder``.

    Call it before long work, so that a bad ``-o`` fails at once; :func:`save_checkpoint` checks again.

    Example:
        >>> check_checkpoint_target("share_ckpt", inputs=["runs/a", "runs/b"])  # doctest: +SKIP
        '/home/me/share_ckpt'
    """
    return check_target(folder, what="SHARE checkpoint", replaceable=foreign_content, inputs=inputs, overwrite=overwrite)


def save_checkpoint(
    folder: str,
    data: CheckpointData,
    *,
    card: Optional[str] = None,
    inputs: Iterable[str] = (),
    overwrite: bool = False,
) -> None:
    """Write a v1 checkpoint atomically: all of it appears at once, or nothing changes.

    ``folder`` may be new, empty, or a SHARE checkpoint (see :func:`foreign_content`); with
    ``overwrite`` any folder, but never a file, a symlink, ``.``, an ancestor of ``.``, of the
    home folder or of ``inputs`` (the folders the data came from).

    Example:
        >>> save_checkpoint("out/ckpt", data, card="# My adapters")  # doctest: +SKIP
    """
    check_checkpoint_target(folder, inputs=inputs, overwrite=overwrite)
    cfg = data.config
    payload: Dict[str, bytes] = {}
    quantized = is_quantized(cfg.dtype)
    groups = sorted(cfg.k_per_group)  # a packed file's index points into these
    cfg.storage = {"bases": cfg.dtype, "loadings": cfg.dtype, "block_size": NF4_BLOCK,
                   "layout": "packed"} if quantized else None
    payload[COMPONENTS_FILE] = save_bytes(  # one key: Rust writes a map in random order
        _encode(data.components, data.stored_components, cfg.storage and cfg.storage["bases"], True, groups),
        {"format": "pt"})
    for name in cfg.adapter_names:
        check_name(name)
        base = f"adapters/{name}"
        payload[f"{base}/{LOADINGS_FILE}"] = save_bytes(
            _encode(data.loadings[name], data.stored_loadings.get(name, {}), cfg.storage and cfg.storage["loadings"],
                    False, groups), {"format": "pt"})
        if data.heads.get(name):
            payload[f"{base}/{HEAD_FILE}"] = save_bytes(data.heads[name], {"format": "pt"})
        payload[f"{base}/{META_FILE}"] = json.dumps(data.metas.get(name, {}), indent=2, sort_keys=True).encode()
    if card is not None:
        payload[CARD_FILE] = card.encode("utf-8")
    cfg.format_version = QUANTIZED_FORMAT_VERSION if quantized else 1
    cfg.files = {rel: hashlib.sha256(b).hexdigest() for rel, b in sorted(payload.items())}
    payload[CONFIG_FILE] = json.dumps(cfg.to_dict(), indent=2).encode()
    with atomic_folder(folder, what="SHARE checkpoint", replaceable=foreign_content, inputs=inputs,
                       overwrite=overwrite) as tmp:
        for rel, blob in payload.items():
            path = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob)


def _encode(tensors: Mapping[str, torch.Tensor], stored: Mapping[str, Stored], scheme: Optional[str],
            transposed: bool, groups: List[str]) -> Dict[str, torch.Tensor]:
    """What a file holds: the tensors as they are for floats; for a quantized scheme, every
    tensor's codes and scales packed (see :func:`_decode`), from its given stored form where there
    is one (never re-quantized), else quantized now."""
    if scheme is None:
        return dict(tensors)
    pos = {g: i for i, g in enumerate(groups)}
    rows, codes, scales = [], [], []
    for key in sorted(tensors, key=lambda kk: pos[kk]):
        st = stored.get(key)
        if st is None or st.scheme != scheme:
            st = quantize(tensors[key], scheme, transposed=transposed)
        rows.append((pos[key], st.shape[1]))
        codes.append(st.codes.reshape(-1))
        scales.append(st.scale.reshape(-1))
    dt = torch.int8 if scheme == "int8" else torch.uint8
    return {"codes": torch.cat(codes) if codes else torch.zeros(0, dtype=dt),
            "index": torch.tensor(rows, dtype=torch.int32).reshape(-1, 2),
            "scales": torch.cat(scales) if scales else torch.zeros(0)}
