"""The SHARE checkpoint format on disk (v1), and reading 0.1.x checkpoints.

Layout (a superset of what lorashare 0.1.x writes)::

    share_config.json                      SHAREConfig (lorashare.format.schema), incl. format_version,
                                           per-adapter source/revision/sha256 and a
                                           sha256 of every other file ("files")
    shared_components.safetensors          "<module>:<A|B>" → basis (d × k)
    adapters/<name>/loadings.safetensors   "<module>:<A|B>" → loading (k × r)
    adapters/<name>/classifier_head.safetensors   non-LoRA tensors, bit-exact
    adapters/<name>/adapter_meta.json      {"adapter_name", "original_config", ...}
    README.md                              model card

With ``int8`` / ``nf4`` storage (format 2) each of those safetensors files holds instead three
tensors, ``index`` (n × 2: the key's position in sorted ``k_per_group``, its width), ``codes`` and
``scales`` (see :mod:`lorashare.format.storage` and ``_decode``).

A factor comes back as ``B = U_B L_B`` and ``A = (U_A L_A)ᵀ``.  Only JSON and
safetensors are read, only from regular files; adapter names are checked before they touch a path.

The fields of ``share_config.json`` and ``adapter_meta.json`` and their checks are
:mod:`lorashare.format.schema`'s.  Here every claim of the config is checked against the files on
load: its keys, k and layer keys against the bases, each adapter's ranks against its LoRA
config and its entry in ``adapters``, and every decoded value must be finite, so that a
checkpoint that loads rebuilds each adapter as a PEFT adapter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Type

import torch

from ..errors import CheckpointError, ConfigError, IntegrityError, LoraShareError, UnknownAdapterError
from ..utils.fmt import size
from ..utils.names import check_name, split_group_key
from . import tensorfile
from .atomic import atomic_folder, check_target
from .jsonfile import open_regular, read_bytes, read_json
from .loraconfig import check_lora_config, pattern_value
from .schema import (
    CONFIG_FILE,
    FIX,
    FORMAT_VERSION,
    MAX_JSON,
    QUANTIZED_FORMAT_VERSION,
    AdapterMeta,
    CardData,
    SHAREConfig,
    Stamp,
    check_meta,
    checkpoint_path,
    config_stamp,
    read_config,
    read_config_stamped,
    validate,
)
from .storage import NF4_BLOCK, PACKED_KEYS, Stored, code_shape, is_quantized, quantize, scale_count
from .tensorfile import TensorFile, save_bytes

logger = logging.getLogger(__name__)

__all__ = ["FORMAT_VERSION", "CardData", "SHAREConfig", "CheckpointData", "read_config", "load_checkpoint", "save_checkpoint", "checkpoint_files",
           "check_checkpoint_target", "foreign_content", "check_values", "describe_nonfinite", "max_rebuild_bytes"]

COMPONENTS_FILE = "shared_components.safetensors"
LOADINGS_FILE = "loadings.safetensors"
HEAD_FILE = "classifier_head.safetensors"
META_FILE = "adapter_meta.json"
CARD_FILE = "README.md"
_FIX = FIX  # the fix that ends every message about a checkpoint's content
_GROUP_KEY = re.compile(r"^.+:[AB]$")
#: A module path as PyTorch names submodules: dot-separated names, no spaces or colons.
_MODULE_PATH = re.compile(r"^[\w-]+(\.[\w-]+)*$")
#: Above this bound on |U·L| a rebuilt factor may overflow float32 (3.4e38), so it is computed to be sure.
_SAFE_BOUND = 1e37
_CHANGED_HINT = "Try again once the save or download has finished."


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
    peaks: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Per-column peaks of the bases, from their checks: what a later load with ``bases=`` reuses."""
    stamp: Optional[str] = None
    """The sha256 of the ``share_config.json`` bytes read: a save back over the folder checks it is still there."""


def _read_json(path: str, what: str) -> Any:
    return read_json(
        path, max_bytes=MAX_JSON, what=what, error=CheckpointError,
        hint=f"The {what} is corrupt or truncated: re-download the checkpoint or re-save it.",
    )


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path, error=CheckpointError) as f:
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
    path = checkpoint_path(folder, rel, jail)
    if not os.path.exists(path):  # a FIFO or a folder exists: open_regular names what it is
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
    folder: str, *, adapters: Optional[Iterable[str]] = None, verify: bool = True, jail: Optional[str] = None,
    bases: Optional[CheckpointData] = None,
) -> CheckpointData:
    """Read a checkpoint (v1 or 0.1.x), only the named adapters if ``adapters`` is given.

    ``bases``: an earlier load of the same checkpoint (the same ``share_config.json``), whose
    bases were read and checked already; they are reused instead of read again, so that loading
    adapters one at a time reads the bases once.  A config that differs from the one they came
    with is refused.

    With ``verify`` every file read is checked against its sha256 in the config.  Whatever
    ``verify`` says, every claim of the config (keys, k, shapes, ranks) is checked against the
    files, and every decoded value is finite: a checkpoint that loads rebuilds each of its
    adapters with finite values, the config's keys and shapes, and a config PEFT loads.  A save
    that replaces the checkpoint while it is read is reported as such.

    Example:
        >>> data = load_checkpoint("share_ckpt", adapters=["billing"])  # doctest: +SKIP
        >>> bases = load_checkpoint("share_ckpt", adapters=[])  # doctest: +SKIP
        >>> one = load_checkpoint("share_ckpt", adapters=["refunds"], bases=bases)  # doctest: +SKIP
    """
    cfg, stamp = read_config_stamped(folder, jail=jail)
    try:
        data = _load(folder, cfg, adapters, verify, jail, bases)
    except CheckpointError as exc:
        _check_unchanged(folder, jail, stamp, exc)
        raise
    _check_unchanged(folder, jail, stamp, None)
    data.stamp = stamp
    return data


def _check_unchanged(folder: str, jail: Optional[str], stamp: Stamp, cause: Optional[BaseException]) -> None:
    """Refuse what was read if ``share_config.json`` is not the one read first (a save meanwhile)."""
    if config_stamp(folder, jail=jail) == stamp:
        return
    raise CheckpointError(
        f"the checkpoint at {folder} changed while it was read: its {CONFIG_FILE} was replaced or rewritten "
        f"(by a save or a download at the same time?). {_CHANGED_HINT}",
        path=os.path.join(folder, CONFIG_FILE),
    ) from cause


def _load(folder: str, cfg: SHAREConfig, adapters: Optional[Iterable[str]], verify: bool,
          jail: Optional[str], bases: Optional[CheckpointData] = None) -> CheckpointData:
    if cfg.format_version == 0:
        bases = None  # a 0.1.x config has no fingerprints to tell that the bases are still these: read them
    elif bases is not None and bases.config != cfg:
        raise CheckpointError(
            f"{folder}/{CONFIG_FILE} is not the config the bases were read with: the checkpoint changed in "
            "between. Load it again from the start.", path=os.path.join(folder, CONFIG_FILE),
        )
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
    stored_loadings: Dict[str, Dict[str, Stored]] = {}
    if bases is not None:
        components, stored_components, amax = bases.components, bases.stored_components, bases.peaks
    else:
        components = _read_tensors(folder, COMPONENTS_FILE, cfg, verify, jail)
        stored_components = {}
        if cfg.storage is not None:
            components, stored_components = _decode(components, cfg.storage["bases"], cfg, folder, COMPONENTS_FILE, None)
        amax = _check_bases(folder, cfg, components)  # per column, for _check_rebuild
    loadings, heads, metas = {}, {}, {}
    for n in names:
        base = f"adapters/{n}"
        loadings[n] = _read_tensors(folder, f"{base}/{LOADINGS_FILE}", cfg, verify, jail)
        if cfg.storage is not None:
            loadings[n], stored_loadings[n] = _decode(loadings[n], cfg.storage["loadings"], cfg, folder,
                                                      f"{base}/{LOADINGS_FILE}", n)
        if os.path.exists(checkpoint_path(folder, f"{base}/{HEAD_FILE}", jail)) or f"{base}/{HEAD_FILE}" in cfg.files:
            heads[n] = _read_tensors(folder, f"{base}/{HEAD_FILE}", cfg, verify, jail)
            _check_heads(folder, f"{base}/{HEAD_FILE}", n, heads[n])
        meta_path = checkpoint_path(folder, f"{base}/{META_FILE}", jail)
        if not os.path.exists(meta_path):  # never invent a config: a wrong alpha would rescale the adapter
            raise _missing(folder, f"{base}/{META_FILE}", cfg, meta_path)
        if verify:
            _verify(folder, f"{base}/{META_FILE}", cfg, meta_path)
        metas[n] = check_meta(_read_json(meta_path, f"adapter meta ({META_FILE})"), n, meta_path)
        _check_loadings(folder, cfg, n, components, loadings[n], metas[n], amax)
    card = checkpoint_path(folder, CARD_FILE, jail)
    if verify and CARD_FILE in cfg.files and os.path.isfile(card):
        _verify(folder, CARD_FILE, cfg, card)  # the card is not used here, but a tampered one is reported
    return CheckpointData(cfg, components, loadings, heads, metas, stored_components, stored_loadings, amax)


def _decode(raw: Mapping[str, torch.Tensor], scheme: str, cfg: SHAREConfig, folder: str, rel: str,
            adapter: Optional[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Stored]]:
    """A packed quantized file, checked field by field: ``(dequantized floats, stored forms)``.

    ``index`` row i is (position of the tensor's key in sorted ``k_per_group``, c); its codes and
    scales follow those of the rows before it in ``codes`` and ``scales``.  The basis file holds
    ``Uᵀ`` (k × d), a loadings file ``L`` (k × r); k comes from ``k_per_group``, so a file that
    disagrees with the config is refused before any byte is decoded.  That the keys are the
    config's own (no position shifted by keys added to ``k_per_group``) is checked by the
    caller, on the decoded keys.
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
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
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
    """A 0.1.x checkpoint lists its adapters by folder; recover names from the files (k from the bases, later)."""
    adir = checkpoint_path(folder, "adapters", jail)
    names = sorted(
        d for d in (os.listdir(adir) if os.path.isdir(adir) else []) if os.path.isfile(os.path.join(adir, d, LOADINGS_FILE))
    )
    for n in names:
        check_name(n)
    cfg.adapter_names = names or list(cfg.adapter_names)
    cfg.num_adapters = len(cfg.adapter_names)
    return cfg


# --------------------------------------------------------------------------- claims against the files
# A hostile repo controls its hashes too, so fingerprints prove nothing about intent: what the
# config claims (keys, k, shapes, ranks) must agree with the tensors, and the tensors must be
# finite once decoded, or the load is refused here, naming the file and the key.

def _nonfinite(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point and not bool(torch.isfinite(t).all())


def describe_nonfinite(t: torch.Tensor) -> Optional[str]:
    """``None`` if ``t`` is finite, else how many of its values are not (``"3 NaN"``, ``"1 NaN and 2 infinite"``).

    Example:
        >>> describe_nonfinite(torch.tensor([1.0, float("nan"), float("inf")]))
        '1 NaN and 1 infinite'
    """
    if not _nonfinite(t):
        return None
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    return " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if p)


def _at(rel: str, folder: str) -> str:
    """Where a checked file is, for messages: in its folder, or (``folder=""``) still in memory."""
    return f"{rel} in {folder}" if folder else f"{rel} (in memory)"


def _check_bases(folder: str, cfg: SHAREConfig, components: Dict[str, torch.Tensor], *,
                 error: Type[LoraShareError] = CheckpointError, fix: str = _FIX) -> Dict[str, torch.Tensor]:
    """Every basis is a finite 2-D float named ``<module>:<A|B>``, with both sides per module, the k of
    ``k_per_group`` and the modules of ``layer_keys``.  Returns each basis's column peaks (float64).

    ``error`` and ``fix``: the class and the fix of a refusal (a checkpoint read, or values to be written)."""
    where = _at(COMPONENTS_FILE, folder)
    path = os.path.join(folder, COMPONENTS_FILE)
    for key, U in components.items():
        if not _GROUP_KEY.match(key):
            raise error(f"{where}: tensor {key!r} is not named '<module>:A' or '<module>:B'. {fix}",
                        layer=key, path=path)
        if U.dim() != 2 or not U.dtype.is_floating_point or U.shape[0] == 0:
            # a basis of no rows (0 × k) is the factor of a module of width 0: nothing PEFT builds
            raise error(f"{where}: {key!r} is {tuple(U.shape)} {U.dtype}; expected a 2-D float basis (d × k, d ≥ 1). "
                        f"{fix}", layer=key, path=path)
        if not _MODULE_PATH.match(split_group_key(key)[0]):
            raise error(f"{where}: tensor {key!r} does not name a module path (dot-separated names). {fix}",
                        layer=key, path=path)
        module, side = split_group_key(key)
        if f"{module}:{'B' if side == 'A' else 'A'}" not in components:
            raise error(f"{where}: basis {key!r} has no other side; a module needs an A and a B basis. {fix}",
                        layer=module, path=path)
    if cfg.format_version == 0 and not cfg.k_per_group:  # 0.1.x wrote no k per group: take the files'
        cfg.k_per_group = {key: int(U.shape[1]) for key, U in components.items()}
    claimed, held = set(cfg.k_per_group), set(components)
    if claimed != held:
        extra, lost = sorted(claimed - held), sorted(held - claimed)
        raise error(
            f"{_at(CONFIG_FILE, folder)}: k_per_group " + (f"names {extra[0]!r}, which has no basis in {COMPONENTS_FILE}"
                                                       if extra else f"has no k for the basis {lost[0]!r}") +
            f" ({len(claimed)} keys claimed, {len(held)} bases held); the config must name exactly the bases, "
            f"or a packed file's positions shift onto other modules. {fix}",
            layer=(extra or lost)[0], path=os.path.join(folder, CONFIG_FILE))
    for key, U in components.items():
        if int(U.shape[1]) != cfg.k_per_group[key]:
            raise error(
                f"{where}: basis {key!r} is {tuple(U.shape)}, k = {U.shape[1]}, but {CONFIG_FILE}'s "
                f"k_per_group[{key!r}] is {cfg.k_per_group[key]}. {fix}", layer=key, path=path)
    modules = {split_group_key(key)[0] for key in components}
    if cfg.format_version >= 1 and set(cfg.layer_keys) != modules:
        odd = sorted(set(cfg.layer_keys) ^ modules)[0]
        raise error(
            f"{_at(CONFIG_FILE, folder)}: layer_keys " + (f"names {odd!r}, which has no basis in {COMPONENTS_FILE}"
                                                      if odd in cfg.layer_keys else f"lacks {odd!r}, which has bases") +
            f"; it must list exactly the modules of the bases. {fix}",
            layer=odd, path=os.path.join(folder, CONFIG_FILE))
    peaks = _column_peaks(components)  # a NaN or Inf anywhere in a basis makes its peaks non-finite
    for key, p in peaks.items():
        if not bool(torch.isfinite(p).all()) and _nonfinite(components[key]):
            raise error(
                f"{where}: basis {key!r} holds NaN or infinite values" +
                (" once decoded (codes × scales)" if cfg.storage else "") + f" ({describe_nonfinite(components[key])}). {fix}",
                layer=key, path=path)
    return peaks


def _column_peaks(components: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``max |U|`` per column of every basis, in float64: one stacked reduction per shape."""
    by_shape: Dict[Tuple[int, ...], List[str]] = {}
    for key, U in components.items():
        by_shape.setdefault(tuple(U.shape), []).append(key)
    out: Dict[str, torch.Tensor] = {}
    for keys in by_shape.values():
        stacked = torch.stack([components[k].detach() for k in keys]).abs().amax(1).double()
        out.update(zip(keys, stacked.unbind(0)))
    return out


def _check_heads(folder: str, rel: str, name: str, heads: Mapping[str, torch.Tensor], *,
                 error: Type[LoraShareError] = CheckpointError, fix: str = _FIX) -> None:
    """Heads are copied bit-exact into the rebuilt adapter: finite, and never in place of a LoRA factor."""
    path = os.path.join(folder, *rel.split("/"))
    for key, t in heads.items():
        if ".lora_" in key:
            raise error(
                f"adapter {name!r}: {_at(rel, folder)} holds {key!r}, a LoRA factor's name; heads are non-LoRA "
                f"tensors, and this one would replace the rebuilt factor. {fix}", adapter=name, path=path)
        bad = describe_nonfinite(t)
        if bad:
            raise error(f"adapter {name!r}: {_at(rel, folder)}: tensor {key!r} holds NaN or infinite values "
                        f"({bad}). {fix}", adapter=name, path=path, layer=key)


def _targets(config: Mapping[str, Any], module: str) -> Optional[bool]:
    """Whether PEFT's ``target_modules`` of ``config`` could match ``module`` (``None``: it cannot tell).

    As PEFT's ``check_target_module_exists``: a string is a regex that must match the whole path
    (``"all-linear"`` matches any linear layer), a list names path suffixes.
    """
    tm = config.get("target_modules")
    if tm is None or tm == "all-linear":
        return None
    if isinstance(tm, str):
        try:
            return re.fullmatch(tm, module) is not None
        except (re.error, RecursionError, OverflowError):
            return False
    if isinstance(tm, (list, tuple)):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in tm)
    return False


def _check_loadings(folder: str, cfg: SHAREConfig, name: str, components: Mapping[str, torch.Tensor],
                    loadings: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                    amax: Mapping[str, torch.Tensor], *, error: Type[LoraShareError] = CheckpointError,
                    fix: str = _FIX) -> None:
    """An adapter's loadings fit its bases, its LoRA config (``r``, ``rank_pattern``, ``target_modules``)
    and its entry in ``adapters``, rebuild factors of a bounded size (:func:`max_rebuild_bytes`), and
    those are finite in float32.  ``error`` and ``fix``: as :func:`_check_bases`."""
    rel = f"adapters/{name}/{LOADINGS_FILE}"
    path = os.path.join(folder, *rel.split("/"))
    meta_rel = f"adapters/{name}/{META_FILE}"
    where, meta_where = _at(rel, folder), _at(meta_rel, folder)

    def fail(msg: str, layer: Optional[str] = None) -> LoraShareError:
        return error(f"adapter {name!r}: {msg} {fix}", adapter=name, layer=layer, path=path)

    if not loadings:
        raise fail(f"{where} holds no loadings; an adapter has at least one module.")
    for key, L in loadings.items():
        U = components.get(key)
        if U is None:
            raise error(f"adapter {name!r} has a loading for {key!r} but {COMPONENTS_FILE} has no basis for it. {fix}",
                        adapter=name, layer=key, path=path)
        if L.dim() != 2 or L.shape[0] != U.shape[1] or not L.dtype.is_floating_point:
            raise fail(f"loading {key!r} is {tuple(L.shape)} but its basis is {tuple(U.shape)}; expected a float "
                       f"(k, r) with k = the basis's columns ({where}).", layer=key)
    ranks: Dict[str, int] = {}
    for key, L in loadings.items():
        module, side = split_group_key(key)
        other = loadings.get(f"{module}:{'B' if side == 'A' else 'A'}")
        if other is None or L.shape[1] != other.shape[1]:  # both are 2-D: checked above
            raise fail(f"{LOADINGS_FILE} has {key!r} " + (
                "without its other side" if other is None else
                f"of rank {L.shape[1]} but its other side has rank {other.shape[1]}") +
                "; a module needs an A and a B loading of one rank.", layer=module)
        ranks[module] = int(L.shape[1])
    config = meta["original_config"]
    for module, r in ranks.items():
        want = pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
        if r != want:
            raise fail(f"{where} has {module} at rank {r}, but {meta_rel}'s original_config says r={want} "
                       "for it (r, or its rank_pattern): PEFT could not load the rebuilt adapter.", layer=module)
        if _targets(config, module) is False:
            raise fail(f"{where} has a loading for {module}, which {meta_rel}'s original_config.target_modules "
                       f"{config.get('target_modules')!r} does not match: PEFT would not put a LoRA layer there.",
                       layer=module)
    info = cfg.adapters.get(name)
    claimed = info.get("rank") if isinstance(info, dict) else None
    if claimed is not None and claimed != max(ranks.values()):
        raise fail(f"{CONFIG_FILE}'s adapters.{name}.rank is {claimed}, but its loadings in {rel} have rank "
                   f"{max(ranks.values())}.")
    unknown = sorted(set(meta.get("delta_w_error") or {}) - set(ranks))
    if unknown:
        raise fail(f"{meta_where} has a delta_w_error for {unknown[0]!r}, which has no loading in {rel}.",
                   layer=unknown[0])
    own = meta.get("adapter_name")
    if own not in (None, "", name):
        raise fail(f"{meta_where} is adapter {own!r}'s (its adapter_name), not {name!r}'s.")
    _check_sizes(where, components, loadings, fail)  # before any product is computed, here or by a rebuild

    def nonfinite(key: str) -> LoraShareError:
        return fail(f"{where}: loading {key!r} holds NaN or infinite values" +
                    (" once decoded (codes × scales)" if cfg.storage else "") +
                    f" ({describe_nonfinite(loadings[key])}).", layer=key)

    _check_rebuilds(components, loadings, amax, fail, nonfinite)


#: What one adapter's rebuilt factors may take in all by default (float32), env ``LORASHARE_MAX_REBUILD_BYTES``.
MAX_REBUILD_BYTES = 16 * 1024**3
_REBUILD_ENV = "LORASHARE_MAX_REBUILD_BYTES"


def max_rebuild_bytes() -> int:
    """The most bytes one adapter's rebuilt factors may take (float32): ``LORASHARE_MAX_REBUILD_BYTES``, else 16 GiB.

    Read at each check, so that a process can raise it without a restart.

    Example:
        >>> max_rebuild_bytes() >= 1  # doctest: +SKIP
        True
    """
    raw = os.environ.get(_REBUILD_ENV)
    if raw is None or not raw.strip():
        return MAX_REBUILD_BYTES
    try:
        value = int(raw.strip().replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{_REBUILD_ENV}={raw!r}: expected a positive whole number of bytes (e.g. "
                          f"{32 * 1024**3} for 32 GiB). Fix or unset it.")
    return value


def _check_sizes(where: str, components: Mapping[str, torch.Tensor], loadings: Mapping[str, torch.Tensor],
                 fail: Callable[..., LoraShareError]) -> None:
    """The factors a rebuild computes (d × r each, from a d × k basis and a k × r loading) stay within the
    limit on one tensor (``LORASHARE_MAX_TENSOR_BYTES``, as for a tensor read from a file) and, all together,
    within :func:`max_rebuild_bytes`: a tiny file must not make a reader allocate gigabytes."""
    total, largest = 0, ("", 0)
    for key, L in loadings.items():
        nbytes = 4 * int(components[key].shape[0]) * int(L.shape[1])  # float32, as reconstruct computes it
        total += nbytes
        largest = max(largest, (key, nbytes), key=lambda kv: kv[1])
    key, nbytes = largest
    shape = f"{components[key].shape[0]} × {loadings[key].shape[1]}" if key else ""
    one, limit = tensorfile.MAX_TENSOR_BYTES, max_rebuild_bytes()
    if nbytes > one:
        raise fail(f"{where}: rebuilding {key!r} would allocate a {shape} factor ({size(nbytes)} in float32), over the "
                   f"{size(one)} that one tensor may take (LORASHARE_MAX_TENSOR_BYTES); nothing was allocated. If the "
                   "adapter is really that large, raise LORASHARE_MAX_TENSOR_BYTES.", layer=split_group_key(key)[0])
    if total > limit:
        raise fail(f"{where}: rebuilding its {len(loadings)} factors would allocate {size(total)} in float32 (the "
                   f"largest, {key!r}, {shape}: {size(nbytes)}), over the limit of {size(limit)} "
                   f"({_REBUILD_ENV}); nothing was allocated. If the adapter is really that large, set "
                   f"{_REBUILD_ENV} to at least {total}.", layer=split_group_key(key)[0])


def _check_rebuilds(components: Mapping[str, torch.Tensor], loadings: Mapping[str, torch.Tensor],
                    amax: Mapping[str, torch.Tensor], fail: Callable[..., LoraShareError],
                    nonfinite: Callable[[str], LoraShareError]) -> None:
    """Every loading is finite and every ``U @ L`` too: the bound Σ_k max|U_k|·max|L_k| for all loadings
    of one shape at once (a NaN or Inf in L makes it non-finite), the details only where it is not safe."""
    by_shape: Dict[Tuple[int, ...], List[str]] = {}
    for key, L in loadings.items():
        if L.numel():
            by_shape.setdefault(tuple(L.shape), []).append(key)
    for keys in by_shape.values():
        Ls = torch.stack([loadings[k] for k in keys]).detach().abs().amax(2).double()  # (n, k)
        bounds = (torch.stack([amax[k] for k in keys]) * Ls).sum(1)
        for key, bound in zip(keys, bounds.tolist()):
            if not (math.isfinite(bound) and bound < _SAFE_BOUND):
                if _nonfinite(loadings[key]):
                    raise nonfinite(key)
                _check_rebuild(key, components[key], loadings[key], amax[key], fail)


def _check_rebuild(key: str, U: torch.Tensor, L: torch.Tensor, amax: torch.Tensor,
                   fail: Callable[..., LoraShareError]) -> None:
    """``U @ L`` (what reconstruct computes, in float32) must be finite: cheap bound first, the product if need be."""
    bound = float((amax * L.detach().abs().amax(1).double()).sum()) if L.numel() else 0.0
    if math.isfinite(bound) and bound < _SAFE_BOUND:
        return
    if not bool(torch.isfinite(U.to(torch.float32) @ L.to(torch.float32)).all()):
        raise fail(f"rebuilding {key!r} from its basis and loading overflows float32 (values up to about {bound:.3g}): "
                   "the factors would hold infinite values.", layer=split_group_key(key)[0])


def check_values(data: CheckpointData, *, names: Optional[Iterable[str]] = None, bases: bool = True,
                 error: Type[LoraShareError] = CheckpointError, fix: str = _FIX) -> None:
    """The reader's rules, applied to values in memory before they are written or published.

    Whatever a load refuses must never be saved (no reader would accept the checkpoint) nor
    added: so the checks of :func:`load_checkpoint` run here on ``data`` as it stands, for the
    adapters ``names`` (default: all): every basis, head and loading finite, shapes and ranks
    consistent with each adapter's LoRA config, rebuilt sizes within the limits, the
    ``adapter_meta.json`` fields.  ``bases=False`` takes the bases as checked already (an adapter
    added to unchanged bases).  ``k_per_group`` and ``layer_keys`` are taken from the bases, as a
    save writes them.  A refusal is an ``error`` naming the adapter and the tensor, ending with ``fix``.

    Example:
        >>> check_values(data, fix="Nothing was saved.")  # doctest: +SKIP
        Traceback (most recent call last):
        CheckpointError: adapter 'a': adapters/a/loadings.safetensors (in memory): loading 'q:A' holds NaN ...
    """
    cfg = replace(data.config, storage=None, format_version=max(1, data.config.format_version))
    _describe_bases(cfg, data.components)  # facts of the tensors, never claims (see save_checkpoint)
    names = list(data.loadings) if names is None else list(names)
    if bases:
        amax = _check_bases("", cfg, dict(data.components), error=error, fix=fix)
    else:  # the peaks of the bases the adapters use: _check_loadings names a missing one
        used = {k for n in names for k in data.loadings[n] if k in data.components}
        amax = _column_peaks({k: data.components[k] for k in used})
    for n in names:
        meta_rel = f"adapters/{n}/{META_FILE}"
        meta = data.metas.get(n) or {}
        if "original_config" not in meta or not meta["original_config"]:
            raise error(f"adapter {n!r} has no LoRA config (its adapter_config.json), so no reader could rebuild it "
                        f"as a PEFT adapter. {fix}", adapter=n)
        try:
            validate(meta, AdapterMeta, _at(meta_rel, ""))
        except CheckpointError as exc:  # the reader's rule, with the fix of the caller's situation
            raise error(f"adapter {n!r}: {exc.message.removesuffix(_FIX).rstrip()} {fix}", adapter=n) from None
        check_lora_config(meta["original_config"], n, _at(meta_rel, ""), error=error, prefix="original_config.",
                          require_r=True, fix=fix)
        if data.heads.get(n):
            _check_heads("", f"adapters/{n}/{HEAD_FILE}", n, data.heads[n], error=error, fix=fix)
        _check_loadings("", cfg, n, data.components, data.loadings[n], meta, amax, error=error, fix=fix)


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
        raw = read_bytes(config, max_bytes=MAX_JSON, what="SHARE config", error=CheckpointError)
    except CheckpointError as exc:
        return f"its {CONFIG_FILE} is too large" if "is over" in str(exc) else f"its {CONFIG_FILE} is not readable"
    except OSError:
        return f"its {CONFIG_FILE} is not readable"
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
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
) -> str:
    """Write a v1 checkpoint atomically: all of it appears at once, or nothing changes.

    ``folder`` may be new, empty, or a SHARE checkpoint (see :func:`foreign_content`); with
    ``overwrite`` any folder, but never a file, a symlink, ``.``, an ancestor of ``.``, of the
    home folder or of ``inputs`` (the folders the data came from).

    Returns the stamp of the ``share_config.json`` written (its sha256, as :attr:`CheckpointData.stamp`).

    Example:
        >>> save_checkpoint("out/ckpt", data, card="# My adapters")  # doctest: +SKIP
    """
    check_checkpoint_target(folder, inputs=inputs, overwrite=overwrite)
    cfg = data.config
    payload: Dict[str, bytes] = {}
    quantized = is_quantized(cfg.dtype)
    _describe_bases(cfg, data.components)
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
    return hashlib.sha256(payload[CONFIG_FILE]).hexdigest()


def _describe_bases(cfg: SHAREConfig, components: Mapping[str, torch.Tensor]) -> None:
    """``k_per_group`` and ``layer_keys`` as the bases written say (a load checks they agree).

    They are facts of the tensors, so they are taken from them: after ``remove_adapter`` a
    basis no adapter uses is not written, and its key must go too.  Order is kept, so an
    unchanged checkpoint re-saves byte-identical.
    """
    ks = {key: int(U.shape[1]) for key, U in components.items()}
    k_per_group = {key: ks[key] for key in cfg.k_per_group if key in ks}
    k_per_group.update((key, k) for key, k in ks.items() if key not in k_per_group)
    cfg.k_per_group = k_per_group
    modules = {split_group_key(key)[0] for key in components}
    if set(cfg.layer_keys) != modules:
        cfg.layer_keys = sorted(modules)


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
