"""The schema of ``share_config.json`` and ``adapter_meta.json``, as typed dataclasses with one validator.

Each field carries its own rule (``field(metadata=rule(check, "expected ..."))``): what a value
read back from disk must be, and the words an error uses when it is not.  :func:`validate` walks a
dataclass's fields and checks a plain dict against them, so adding a statistic or a field is one
line here, read by the loader, the writer and the error messages alike.

The dataclasses are also the writers' constructors: ``AdapterInfo(...).to_dict()``,
``CompressionStats(...).to_dict()`` and ``AdapterMeta(...).to_dict()`` give exactly the dicts that a
save writes, key order included (re-saving an unchanged checkpoint is byte-identical).  In memory,
``SHAREConfig.adapters`` and ``compression_stats`` stay plain dicts, which users, the card and the
Space read with ``.get``.

Example:
    >>> AdapterInfo(source="runs/a", rank=4, lora_alpha=8).to_dict()["rank"]
    4
    >>> validate({"rank": "4"}, AdapterInfo, "share_config.json", "adapters.a.")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lorashare.errors.CheckpointError: share_config.json: field 'adapters.a.rank' is '4', expected an integer ≥ 0. ...
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple

from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, IntegrityError
from ..utils.names import check_name, is_within
from .jsonfile import loads as json_loads
from .jsonfile import read_bytes
from .loraconfig import check_lora_config
from .storage import NF4_BLOCK, QUANTIZED, SCHEMES, is_quantized

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "QUANTIZED_FORMAT_VERSION", "CONFIG_FILE", "MAX_JSON", "FIX", "Rule", "rule", "validate",
           "bad", "CardData", "AdapterInfo", "CompressionStats", "AdapterMeta", "SHAREConfig", "check_format_version",
           "check_config", "check_meta", "checkpoint_path", "read_config", "read_config_stamped", "config_stamp"]

#: The newest format this lorashare reads.  It writes 1 for float storage (which lorashare 0.2.0 reads
#: too) and 2 only for quantized storage, which older readers must refuse rather than misread.
FORMAT_VERSION = 2
QUANTIZED_FORMAT_VERSION = 2
CONFIG_FILE = "share_config.json"
#: No JSON file of a checkpoint may be larger.
MAX_JSON = 64 * 1024 * 1024
#: The fix that ends every schema error.
FIX = "The checkpoint was edited or is corrupt: re-download it, or re-save it with lorashare."
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- checks
def _is_int(v: Any, low: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _is_real(v: Any) -> bool:
    """A JSON number; 0.1.x writes ``Infinity`` as a ratio, so it is one too."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_finite(v: Any) -> bool:
    return _is_real(v) and math.isfinite(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and bool(_SHA256.match(v))


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_map(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, dict) and all(check(x) for x in v.values())


def _group_keys(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(k, str) and k.endswith((":A", ":B")) for k in v)


def _card_dict(v: Any) -> bool:
    return isinstance(v, dict) and set(v) <= {"repo_id", "license", "description"} and all(
        _opt(_is_str)(x) for x in v.values())


def _storage(v: Any) -> bool:
    return v is None or (isinstance(v, dict) and set(v) == {"bases", "loadings", "block_size", "layout"}
                         and v["bases"] in QUANTIZED and v["loadings"] in QUANTIZED
                         and v["block_size"] == NF4_BLOCK and v["layout"] == "packed")


def _compression(v: Any) -> bool:
    """``None`` or a spec that :class:`lorashare.format.spec.CompressionSpec` reads (its ConfigError says why not)."""
    if v is None:
        return True
    if not isinstance(v, dict):
        return False
    from .spec import CompressionSpec  # lazily: the spec is a layer above the on-disk schema

    CompressionSpec.from_dict(v)
    return True


# --------------------------------------------------------------------------- the rule of a field
@dataclass(frozen=True)
class Rule:
    """What a field's value must be on disk.

    Attributes:
        check: ``value -> bool`` (may raise :class:`ConfigError`, whose message says why).
        expected: the words after "expected" in the error.
        needs: fields that must be numbers whenever this one is set (summary() prints them together).
        nested: a dataclass the value (an object) is validated against, field by field.
        each: a dataclass each value of the object is validated against.
        v0: the field is one of lorashare 0.1.x's (every other one implies format v1).
    """

    check: Callable[[Any], bool]
    expected: str
    needs: Tuple[str, ...] = ()
    nested: Optional[type] = None
    each: Optional[type] = None
    v0: bool = False


def rule(check: Callable[[Any], bool], expected: str, **kwargs: Any) -> Dict[str, Rule]:
    """A field's ``metadata``: ``field(default=..., metadata=rule(_is_str, "a string"))``."""
    return {"rule": Rule(check, expected, **kwargs)}


@functools.lru_cache(maxsize=None)
def _rules(schema: type) -> Tuple[Tuple[str, Rule], ...]:
    """The rules of a dataclass: its fields', then those of keys only old files hold (``LEGACY``)."""
    own = tuple((f.name, f.metadata["rule"]) for f in dataclasses.fields(schema) if "rule" in f.metadata)
    return own + tuple(getattr(schema, "LEGACY", {}).items())


def bad(path: str, name: str, value: Any, expected: str) -> CheckpointError:
    """The one-line error of a field that breaks its rule."""
    return CheckpointError(f"{path}: field {name!r} is {reprlib.repr(value)}, expected {expected}. {FIX}", path=path)


def validate(data: Mapping[str, Any], schema: type, path: str, prefix: str = "") -> None:
    """Check every field of ``schema`` that ``data`` holds (absent ones keep their defaults).

    Raises :class:`CheckpointError` naming ``path`` and the field (``prefix`` + its name).
    """
    for name, r in _rules(schema):
        if name not in data:
            continue
        value = data[name]
        try:
            ok, why = bool(r.check(value)), ""
        except ConfigError as exc:
            ok, why = False, f" ({exc})"
        if not ok:
            raise bad(path, prefix + name, value, r.expected + why)
        if value is None:
            continue
        if r.nested is not None:
            validate(value, r.nested, path, f"{prefix}{name}.")
        if r.each is not None:
            for key, item in value.items():
                validate(item, r.each, path, f"{prefix}{name}.{key}.")
        for need in r.needs:
            if not _is_real(data.get(need)):
                raise bad(path, prefix + need, data.get(need), f"a number ({prefix}{name} is set)")


def _validated(schema: Any, data: Mapping[str, Any], path: str) -> Any:
    """``schema(**data)`` after :func:`validate`, with only the fields it knows."""
    validate(data, schema, path)
    return schema(**_known(schema, data, path))


def _known(schema: type, data: Mapping[str, Any], what: str) -> Dict[str, Any]:
    """The keys of ``data`` that are fields of ``schema`` (newer writers may add others)."""
    names = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(data) - names)
    if unknown:
        logger.debug("%s: ignoring unknown keys %s", what, unknown)
    return {k: v for k, v in data.items() if k in names}


# --------------------------------------------------------------------------- the dataclasses
@dataclass
class CardData:
    """The model card's own options; everything else on the card is derived from the config.

    Example:
        >>> CardData(repo_id="acme/support-share", license="apache-2.0")
        CardData(repo_id='acme/support-share', license='apache-2.0', description=None)
    """

    repo_id: Optional[str] = None  # the card's title and usage snippet name it
    license: Optional[str] = None  # a Hub license id (lorashare.hub.card.check_license)
    description: Optional[str] = None


_NUMBER = rule(_opt(_is_real), "a number or null")


@dataclass
class CompressionStats:
    """``share_config.json``'s ``compression_stats``: what summary(), the card, the CLI and the Space show.

    lorashare 0.1.x wrote only some of these keys, and ``Infinity`` as a ratio: both still load.

    Example:
        >>> list(CompressionStats(compression_ratio=3.5).to_dict())[:2]
        ['original_total_params', 'compressed_total_params']
    """

    # 0.1.x keys (parameter counts)
    original_total_params: Optional[int] = field(default=None, metadata=_NUMBER)
    compressed_total_params: Optional[int] = field(default=None, metadata=_NUMBER)
    shared_component_params: Optional[int] = field(default=None, metadata=_NUMBER)
    per_adapter_loading_params: Optional[int] = field(default=None, metadata=_NUMBER)
    mean_explained_variance: Optional[float] = field(default=None, metadata=_NUMBER)
    min_explained_variance: Optional[float] = field(default=None, metadata=_NUMBER)
    per_layer_explained_variance: Dict[str, float] = field(default_factory=dict, metadata=rule(
        _opt(_str_map(_is_real)), 'an object {"<module>:<A|B>": number}',
        needs=("mean_explained_variance", "min_explained_variance")))
    # v1: bytes, both ratios with their meaning
    original_lora_bytes: Optional[int] = field(default=None, metadata=rule(
        _opt(_is_real), "a number or null", needs=("compressed_bytes", "shared_bytes", "loadings_bytes",
                                                    "compression_ratio", "compression_ratio_excluding_basis")))
    shared_bytes: Optional[int] = field(default=None, metadata=_NUMBER)
    loadings_bytes: Optional[int] = field(default=None, metadata=_NUMBER)
    heads_bytes: Optional[int] = field(default=None, metadata=_NUMBER)
    compressed_bytes: Optional[int] = field(default=None, metadata=_NUMBER)
    compression_ratio: Optional[float] = field(default=None, metadata=_NUMBER)
    compression_ratio_excluding_basis: Optional[float] = field(default=None, metadata=_NUMBER)
    delta_w_rel_error_mean: Optional[float] = field(default=None, metadata=rule(
        _opt(_is_real), "a number or null", needs=("delta_w_rel_error_max",)))
    delta_w_rel_error_max: Optional[float] = field(default=None, metadata=_NUMBER)
    largest_saving_k: Optional[int] = field(default=None, metadata=rule(_opt(_is_int), "an integer ≥ 0 or null"))
    # module sides whose k auto/budget stopped at the break-even (a record of the compression run)
    capped_groups: List[str] = field(default_factory=list, metadata=rule(
        _opt(_group_keys), 'a list of "<module>:<A|B>" keys'))

    #: Keys only older files hold: 0.2.0 kept the card here before it had its own field.
    LEGACY: ClassVar[Dict[str, Rule]] = {
        "card": Rule(_opt(lambda v: isinstance(v, dict) and all(_opt(_is_str)(x) for x in v.values())),
                     "an object of strings (repo_id, license, description)"),
    }

    def to_dict(self) -> Dict[str, Any]:
        """The dict a save writes, every key, in this order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str = "compression_stats") -> "CompressionStats":
        """Validated; missing keys (0.1.x) take their defaults, unknown ones are ignored."""
        return _validated(cls, data, path)


@dataclass
class AdapterInfo:
    """One entry of ``share_config.json``'s ``adapters``: what is known of an adapter without reading a tensor.

    Example:
        >>> sorted(AdapterInfo(rank=4).to_dict())[:3]
        ['lora_alpha', 'lora_bytes', 'num_labels']
    """

    source: Optional[str] = field(default=None, metadata=rule(_opt(_is_str), "a string (a folder or a Hub id)"))
    revision: Optional[str] = field(default=None, metadata=rule(_opt(_is_str), "a string or null"))
    sha256: Optional[str] = field(default=None, metadata=rule(_opt(_is_sha256), "64 hex digits or null"))
    rank: Optional[int] = field(default=None, metadata=rule(_opt(_is_int), "an integer ≥ 0"))
    lora_alpha: Optional[float] = field(default=None, metadata=rule(_opt(_is_finite), "a number or null"))
    lora_bytes: Optional[int] = field(default=None, metadata=rule(_opt(_is_int), "an integer ≥ 0 or null"))
    task_type: Optional[str] = field(default=None, metadata=rule(
        _opt(_is_str), "a PEFT task type (e.g. SEQ_CLS) or null"))
    num_labels: Optional[int] = field(default=None, metadata=rule(
        _opt(lambda v: _is_int(v, 1)), "an integer ≥ 1 or null"))
    delta_w_error_mean: Optional[float] = field(default=None, metadata=rule(_opt(_is_finite), "a number or null"))
    delta_w_error_max: Optional[float] = field(default=None, metadata=rule(_opt(_is_finite), "a number or null"))
    #: True: the two errors are upper bounds against the original, not measurements (the adapter was
    #: recompressed from its reconstruction, its original being unavailable).  Absent in older files.
    delta_w_error_bound: Optional[bool] = field(default=None, metadata=rule(_opt(_is_bool), "true, false or null"))

    def to_dict(self) -> Dict[str, Any]:
        """The entry a save writes; the two errors only when measured, the bound flag only when set."""
        out = dataclasses.asdict(self)
        for key in ("delta_w_error_mean", "delta_w_error_max"):
            if out[key] is None:
                del out[key]
        if not out["delta_w_error_bound"]:  # so that a checkpoint without bounds re-saves byte-identical
            del out["delta_w_error_bound"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, path: str = "adapters") -> "AdapterInfo":
        """Validated; unknown keys are ignored."""
        return _validated(cls, data, path)


@dataclass
class AdapterMeta:
    """``adapters/<name>/adapter_meta.json``: the adapter's own config and where it came from.

    ``original_config`` is the adapter's ``adapter_config.json`` (checked by
    :func:`lorashare.format.loraconfig.check_lora_config` on load); ``lora_keys`` its own factor keys
    where they are not PEFT's default.

    Example:
        >>> AdapterMeta("a", {"peft_type": "LORA", "r": 4}).to_dict()["delta_w_error"]
        {}
    """

    adapter_name: Optional[str] = field(metadata=rule(_opt(_is_str), "a string"))
    original_config: Dict[str, Any] = field(metadata=rule(_is_dict, "an object (the adapter's adapter_config.json)"))
    original_adapter_path: Optional[str] = field(default=None, metadata=rule(_opt(_is_str), "a string or null"))
    revision: Optional[str] = field(default=None, metadata=rule(_opt(_is_str), "a string or null"))
    sha256: Optional[str] = field(default=None, metadata=rule(_opt(_is_str), "a string or null"))
    delta_w_error: Dict[str, float] = field(default_factory=dict, metadata=rule(
        _str_map(lambda v: _is_finite(v) and v >= 0), 'an object {"<module>": error ≥ 0}'))
    lora_keys: Dict[str, str] = field(default_factory=dict, metadata=rule(
        _opt(_str_map(_is_str)), 'an object {"<module>:<A|B>": key}'))
    #: True: ``delta_w_error`` holds upper bounds against the original, not measurements (see AdapterInfo).
    delta_w_error_bound: bool = field(default=False, metadata=rule(_opt(_is_bool), "true, false or null"))

    def to_dict(self) -> Dict[str, Any]:
        """The file's content; ``lora_keys`` only when some key differs from PEFT's default, sorted;
        ``delta_w_error_bound`` only when set (older files re-save byte-identical)."""
        out: Dict[str, Any] = {
            "adapter_name": self.adapter_name, "original_config": self.original_config,
            "original_adapter_path": self.original_adapter_path, "revision": self.revision, "sha256": self.sha256,
            "delta_w_error": self.delta_w_error,
        }
        if self.delta_w_error_bound:
            out["delta_w_error_bound"] = True
        if self.lora_keys:
            out["lora_keys"] = dict(sorted(self.lora_keys.items()))
        return out


_V0 = {"v0": True}


@dataclass
class SHAREConfig:
    """``share_config.json``.  The first block is lorashare 0.1.x's, unchanged in meaning."""

    share_version: str = field(default="0.1.0", metadata=rule(_is_str, "a string", **_V0))
    num_components: int = field(default=32, metadata=rule(_is_int, "an integer ≥ 0", **_V0))
    component_selection: str = field(default="fixed", metadata=rule(  # "fixed", "auto" or "budget"
        lambda v: v in ("fixed", "auto", "budget"), "'fixed', 'auto' or 'budget'", **_V0))
    variance_threshold: float = field(default=0.95, metadata=rule(
        lambda v: _is_finite(v) and 0 < v <= 1, "a number in (0, 1]", **_V0))
    base_model_name_or_path: str = field(default="", metadata=rule(_opt(_is_str), "a string", **_V0))
    target_modules: List[str] = field(default_factory=list, metadata=rule(
        lambda v: v is None or isinstance(v, str) or _str_list(v), "a list of module names", **_V0))
    lora_rank: int = field(default=0, metadata=rule(_is_int, "an integer ≥ 0", **_V0))
    lora_alpha: Any = field(default=0, metadata=rule(_opt(_is_finite), "a number", **_V0))
    adapter_names: List[str] = field(default_factory=list, metadata=rule(_str_list, "a list of adapter names", **_V0))
    num_adapters: int = field(default=0, metadata=rule(_is_int, "an integer ≥ 0", **_V0))
    layer_keys: List[str] = field(default_factory=list, metadata=rule(_str_list, "a list of module names", **_V0))
    compression_stats: Dict[str, Any] = field(default_factory=dict, metadata=rule(
        _is_dict, "an object", nested=CompressionStats, **_V0))
    # format v1
    format_version: int = 0  # 0 = written by lorashare 0.1.x; checked apart (check_format_version)
    lorashare_version: str = field(default="", metadata=rule(_is_str, "a string"))
    dtype: str = field(default="float32", metadata=rule(
        lambda v: isinstance(v, str) and v in SCHEMES, f"one of {', '.join(SCHEMES)}"))
    budget_bytes: Optional[int] = field(default=None, metadata=rule(
        _opt(lambda v: _is_int(v, 1)), "a positive integer or null"))
    requested_components: Any = field(default=None, metadata=rule(  # what the user asked for: an int or "auto"
        lambda v: v is None or v == "auto" or _is_int(v, 1), "an integer ≥ 1, 'auto' or null"))
    k_per_group: Dict[str, int] = field(default_factory=dict, metadata=rule(
        _str_map(_is_int), 'an object {"<module>:<A|B>": k}'))
    adapters: Dict[str, Dict[str, Any]] = field(default_factory=dict, metadata=rule(
        _str_map(_is_dict), "an object {adapter name: {...}}", each=AdapterInfo))
    files: Dict[str, str] = field(default_factory=dict, metadata=rule(
        _str_map(_is_sha256), 'an object {"<relative path>": "<64 hex digits of sha256>"}'))
    # format v2: how quantized bases and loadings are laid out (None: floats, in ``dtype``)
    storage: Optional[Dict[str, Any]] = field(default=None, metadata=rule(
        _storage, f'null or {{"bases": int8|nf4, "loadings": int8|nf4, "block_size": {NF4_BLOCK}, '
        '"layout": "packed"}'))
    card: CardData = field(default_factory=CardData, metadata=rule(
        _card_dict, "an object of strings or nulls: repo_id, license, description"))
    #: the whole compression spec (lorashare.format.spec.CompressionSpec.to_dict()); None: written before it existed
    compression: Optional[Dict[str, Any]] = field(default=None, metadata=rule(
        _compression, "null or a compression spec (an object of CompressionSpec's settings)"))

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["compression"] is None:  # so that a checkpoint saved without a spec re-saves byte-identical
            del out["compression"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SHAREConfig":
        values = _known(cls, data, "share_config.json")
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


# --------------------------------------------------------------------------- whole documents
def _v1_fields() -> List[str]:
    return [name for name, r in _rules(SHAREConfig) if not r.v0]


def check_format_version(data: Mapping[str, Any], path: str) -> None:
    """Only a real 0.1.x layout (no format_version, no v1 field) may go without fingerprints."""
    if "format_version" not in data:
        v1 = sorted(set(data) & set(_v1_fields()))
        if v1:
            raise IntegrityError(
                f"{path} has format-v1 fields {v1} but no format_version, as if to pass for a 0.1.x checkpoint "
                f"(which has no fingerprints). {FIX}",
                path=path,
            )
        return
    fv = data["format_version"]
    if isinstance(fv, bool) or not isinstance(fv, int):
        raise bad(path, "format_version", fv, "the integer 1 (or 2, with int8 or nf4 storage)")
    if fv > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {fv}; this lorashare reads up to {FORMAT_VERSION}. "
            'Upgrade lorashare: pip install -U "lorashare @ git+https://github.com/lorashare/lorashare" (PyPI has only the older 0.1.x).',
            path=path,
        )
    if fv < 1:
        raise IntegrityError(
            f"{path}: format_version is {fv}, which no lorashare writes (0.1.x writes none, v1 writes 1): "
            f"it would turn off verification. {FIX}",
            path=path,
        )


def check_config(data: Dict[str, Any], path: str) -> Dict[str, Any]:
    """``data`` with every known field checked; 0.1.x's loose values normalised (null → "", a string → [it])."""
    validate(data, SHAREConfig, path)
    _check_storage(data, path)
    spec = data.get("compression")
    if spec is not None and spec.get("dtype", "float32") != data.get("dtype", "float32"):
        raise bad(path, "compression.dtype", spec.get("dtype"), f"the checkpoint's dtype {data.get('dtype', 'float32')!r} "
                  "(the spec says how its files are stored)")
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
        raise bad(path, "adapter_names", names, f"unique names ({dup!r} is there twice)")
    return data


def _check_storage(data: Mapping[str, Any], path: str) -> None:
    """Quantized storage needs format 2, its ``storage`` layout and a k for every group; floats have none."""
    quantized = is_quantized(data.get("dtype", "float32"))
    storage = data.get("storage")
    if quantized != (storage is not None):
        raise bad(path, "storage", storage, f"a layout object for dtype {data.get('dtype')!r}" if quantized else
                  f"null for dtype {data.get('dtype', 'float32')!r} (only int8 and nf4 have a layout)")
    if quantized and data.get("format_version") != QUANTIZED_FORMAT_VERSION:
        raise bad(path, "format_version", data.get("format_version"),
                  f"{QUANTIZED_FORMAT_VERSION} with dtype {data['dtype']!r} (older readers must refuse quantized files)")
    if quantized and storage["bases"] != data["dtype"] and storage["loadings"] != data["dtype"]:
        raise bad(path, "storage", storage, f"bases or loadings in dtype {data['dtype']!r}")


def check_meta(meta: Any, name: str, path: str) -> Dict[str, Any]:
    """An ``adapter_meta.json``, checked; its ``original_config`` must be a LoRA config lorashare can rebuild."""
    if not isinstance(meta, dict):
        raise bad(path, "(the whole file)", meta, "a JSON object")
    if "original_config" not in meta:
        raise CheckpointError(
            f"{path}: field 'original_config' is missing, so adapter {name!r}'s LoRA config (lora_alpha, "
            f"use_rslora, ...) is unknown and it cannot be rebuilt. {FIX}",
            adapter=name,
            path=path,
        )
    validate(meta, AdapterMeta, path)
    check_lora_config(meta["original_config"], name, path, error=CheckpointError, prefix="original_config.",
                      require_r=True, fix=FIX)
    return meta


# --------------------------------------------------------------------------- reading share_config.json
#: What identifies the bytes of a config that were read: their sha256.  Bytes, not inode or mtime: a
#: re-save of the same content changes neither what was read nor what it vouches for.
Stamp = str


def checkpoint_path(root: str, rel: str, jail: Optional[str] = None) -> str:
    """``root/rel``, refusing anything that would resolve outside ``jail`` (default ``root``)."""
    path = os.path.join(root, *rel.split("/"))
    if os.path.isabs(rel) or ".." in rel.split("/") or not is_within(path, jail or root):
        raise CheckpointError(
            f"{rel!r} in {root} resolves to {os.path.realpath(path)}, outside the checkpoint. Refusing to read it "
            "(a symlink or '..' in a downloaded repo?).",
            path=path,
        )
    return path


def _read_raw(folder: str, jail: Optional[str]) -> Tuple[str, bytes]:
    if not os.path.isdir(folder):
        raise CheckpointNotFoundError(
            f"no SHARE checkpoint at {folder}: not a folder. Give the folder that save_pretrained wrote, "
            "or a Hub repo id.",
            path=folder,
        )
    path = checkpoint_path(folder, CONFIG_FILE, jail)
    try:
        raw = read_bytes(path, max_bytes=MAX_JSON, what="SHARE config", error=CheckpointError,
                             hint="Replace it with the checkpoint's real share_config.json (re-download or re-save it).")
    except FileNotFoundError:
        raise CheckpointNotFoundError(
            f"no {CONFIG_FILE} in {folder}: not a SHARE checkpoint (or an interrupted save).", path=path
        ) from None
    return path, raw


def _stamp(raw: bytes) -> Stamp:
    return hashlib.sha256(raw).hexdigest()


def read_config_stamped(folder: str, *, jail: Optional[str] = None) -> Tuple[SHAREConfig, Stamp]:
    """:func:`read_config`, and the stamp of the bytes read (see :func:`config_stamp`)."""
    path, raw = _read_raw(folder, jail)
    data = json_loads(
        raw, path=path, what="SHARE config", error=CheckpointError,
        hint="The SHARE config is corrupt or truncated: re-download the checkpoint or re-save it.",
    )
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object.", path=path)
    check_format_version(data, path)
    return SHAREConfig.from_dict(check_config(data, path)), _stamp(raw)


def read_config(folder: str, *, jail: Optional[str] = None) -> SHAREConfig:
    """Read and sanity-check ``share_config.json``.

    Example:
        >>> read_config("my_share_checkpoint").adapter_names  # doctest: +SKIP
        ['billing', 'refunds']
    """
    return read_config_stamped(folder, jail=jail)[0]


def config_stamp(folder: str, *, jail: Optional[str] = None) -> Optional[Stamp]:
    """The stamp of ``share_config.json`` as it is now (``None``: gone or unreadable).

    A reader compares it with the one it started from: a save that replaced the checkpoint
    meanwhile changes it (unless it wrote the same bytes, which vouch for the same files).
    """
    try:
        _, raw = _read_raw(folder, jail)
    except (CheckpointError, OSError):
        return None
    return _stamp(raw)
