"""PEFT LoRA adapters in and out: lazy reading, validation with clear errors, writing.

An adapter is opened from its *header* only (config + safetensors header), so
compatibility is checked across all adapters before a single weight is read.
Weights are then streamed one module at a time by the compressor.

Sources are local folders, or Hub ids (``user/repo``, ``user/repo@rev``,
``user/repo/subfolder``) which :mod:`lorashare.hub` turns into cached folders.

Every file is checked to be a regular file before it is opened (a FIFO named
``adapter_config.json`` would block a read forever), and refused with the adapter's
name and the file's path otherwise.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import logging
import os
import re
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import hub
from ..errors import AdapterError, AdapterNotFoundError, IncompatibleAdaptersError
from ..format.atomic import atomic_folder, check_target
from ..format.checkpoint import describe_nonfinite
from ..format.jsonfile import loads as json_loads
from ..format.loraconfig import check_lora_config, module_scale, pattern_value
from ..format.tensorfile import TensorFile, read_header, write_tensors
from ..utils.names import check_name, derive_name, file_kind, group_key, open_regular, unique_name

logger = logging.getLogger(__name__)

__all__ = [
    "LoraModule",
    "Adapter",
    "open_adapter",
    "open_adapters",
    "check_compatible",
    "parse_lora_key",
    "lora_key",
    "module_scale",
    "write_peft_adapter",
    "check_adapter_target",
    "foreign_adapter_content",
    "file_sha256",
    "default_name",
    "name_sources",
    "is_local_source",
    "check_source",
    "missing_path",
    "num_labels",
    "check_lora_config",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
#: Largest |value| accepted in a LoRA factor: past this, float32 products (Grams, B·A) overflow.
MAX_FACTOR_ABS = 1e15
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


def parse_lora_key(key: str) -> Optional[Tuple[str, str]]:
    """``(module, side)`` for a LoRA factor key, ``None`` for any other tensor.

    Accepts PEFT's saved form and the in-model form with an adapter name.

    Example:
        >>> parse_lora_key("base_model.model.enc.layer.0.query.lora_A.default.weight")
        ('enc.layer.0.query', 'A')
    """
    m = _LORA_KEY.match(key)
    return (m.group("module"), m.group("side")) if m else None


def lora_key(module: str, side: str) -> str:
    """The key PEFT saves for a factor: ``base_model.model.<module>.lora_<side>.weight``."""
    return f"base_model.model.{module}.lora_{side}.weight"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module of an adapter, as declared in its safetensors header."""

    module: str
    a_key: str
    b_key: str
    rank: int
    d_in: int
    d_out: int
    nbytes: int = 0  # of lora_A and lora_B as the file stores them


@dataclass
class Adapter:
    """A PEFT LoRA adapter opened lazily from a local folder.

    Attributes:
        name: the adapter's name in the SHARE model.
        source: what the user gave (a folder or a Hub id).
        folder: the local folder that holds the files.
        config: the parsed ``adapter_config.json``.
        modules: ``{module path: LoraModule}``.
        head_keys: keys of non-LoRA tensors (classifier heads, ``modules_to_save``).
        revision: the resolved Hub commit, for Hub sources.
    """

    name: str
    source: str
    folder: str
    config: Dict[str, Any]
    modules: Dict[str, LoraModule]
    head_keys: List[str]
    revision: Optional[str] = None
    _file: Optional[TensorFile] = field(default=None, repr=False)
    _sha256: Optional[str] = field(default=None, repr=False)
    _hashing: Optional["Future[str]"] = field(default=None, repr=False)

    @property
    def lora_bytes(self) -> int:
        """The bytes of the LoRA factors, as the file stores them (from the header read at open)."""
        return sum(m.nbytes for m in self.modules.values())

    @property
    def own_keys(self) -> Dict[str, str]:
        """``{"<module>:<A|B>": key}`` for the factors whose key is not PEFT's default (:func:`lora_key`)."""
        return {group_key(m.module, side): key for m in self.modules.values()
                for side, key in (("A", m.a_key), ("B", m.b_key)) if key != lora_key(m.module, side)}

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_NAME)

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def _tf(self) -> TensorFile:
        if self._file is None:
            self._file = TensorFile(self.weights_path, error=AdapterError, who=self.name)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def read_factor(self, module: str, side: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Read ``lora_A`` (r × d_in) or ``lora_B`` (d_out × r) of ``module``; refuses NaN/Inf."""
        info = self.modules[module]
        key = info.a_key if side == "A" else info.b_key
        t = self._tf().get(key, out=out)
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise AdapterError(
                f"adapter {self.name!r} ({self.source}): {key} holds {bad} NaN/Inf values. "
                "The adapter is broken (diverged training?); retrain it or drop it (on_error='skip').",
                adapter=self.name,
                path=self.weights_path,
                layer=module,
            )
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > MAX_FACTOR_ABS:
            raise AdapterError(
                f"adapter {self.name!r} ({self.source}): module {module}: {key} holds values up to {peak:.3g}, "
                f"over the {MAX_FACTOR_ABS:.0e} that lorashare accepts (float32 products of such factors "
                "overflow). The adapter is broken (diverged training, or scaled by mistake); retrain or rescale "
                "it, or drop it (on_error='skip').",
                adapter=self.name,
                path=self.weights_path,
                layer=module,
            )
        return t

    def read_heads(self) -> Dict[str, torch.Tensor]:
        """The non-LoRA tensors, bit-exact, under their original keys; refuses NaN/Inf (as a checkpoint load would)."""
        heads = {k: self._tf().get(k) for k in self.head_keys}
        for key, t in heads.items():
            bad = describe_nonfinite(t)
            if bad:
                raise AdapterError(
                    f"adapter {self.name!r} ({self.source}): {key} holds NaN or infinite values ({bad}). The adapter "
                    "is broken (diverged training?); retrain it or drop it (on_error='skip').",
                    adapter=self.name, path=self.weights_path, layer=key)
        return heads

    def sha256(self) -> str:
        """sha256 of ``adapter_model.safetensors``: the adapter's fingerprint (``sha256sum`` agrees).

        :func:`open_adapters` starts it in the background when it opens the adapter; this waits for it.
        """
        if self._sha256 is None and self._hashing is not None:
            hashing, self._hashing = self._hashing, None
            self._sha256 = hashing.result()
        if self._sha256 is None:
            self._sha256 = self._read_sha256()
        return self._sha256

    def _read_sha256(self) -> str:
        try:
            return file_sha256(self.weights_path)
        except OSError as exc:
            raise AdapterError(
                f"adapter {self.name!r} ({self.source}): cannot read {self.weights_path}: {exc.strerror or exc}. "
                f"Check that {WEIGHTS_NAME} is the regular file PEFT wrote.",
                adapter=self.name, path=self.weights_path,
            ) from None

    def scale(self, module: str) -> float:
        return module_scale(self.config, module, self.modules[module].rank)


def num_labels(heads: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Outputs of a classifier head (the rows of its last layer), if the non-LoRA tensors hold one.

    Example:
        >>> num_labels({"base_model.model.classifier.out_proj.weight": torch.zeros(3, 8)})
        3
    """
    for suffix in ("out_proj.weight", "classifier.weight", "score.weight"):
        for key, tensor in sorted(heads.items()):
            if key.endswith(suffix) and getattr(tensor, "ndim", 0) == 2:
                return int(tensor.shape[0])
    return None


def file_sha256(path: str, *, chunk: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a regular file, read in chunks; an ``OSError`` for anything else (a FIFO never blocks)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _load_config(path: str, who: str) -> Dict[str, Any]:
    try:
        with open_regular(path) as f:
            raw = f.read(10 * 1024 * 1024 + 1)
    except FileNotFoundError:
        raise AdapterNotFoundError(
            f"adapter {who!r}: not a PEFT adapter: no {CONFIG_NAME} in {os.path.dirname(path)}. "
            "Point at the folder that PeftModel.save_pretrained wrote.",
            adapter=who,
            path=path,
        ) from None
    except OSError as exc:  # a folder or a FIFO named adapter_config.json, no permission...
        raise AdapterError(
            f"adapter {who!r}: cannot read {path}: {exc.strerror or exc}. {CONFIG_NAME} must be the regular file "
            "that PEFT wrote (PeftModel.save_pretrained); check the adapter folder.",
            adapter=who,
            path=path,
        ) from None
    if len(raw) > 10 * 1024 * 1024:
        raise AdapterError(f"adapter {who!r}: {path} is over 10 MB; not an adapter config.", adapter=who, path=path)
    config = json_loads(
        raw, path=path, what=f"adapter config ({CONFIG_NAME})", error=AdapterError, who=who,
        label=f"adapter {who!r}: ", hint="Re-save the adapter with PEFT (PeftModel.save_pretrained).",
    )
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {who!r}: {path} must hold a JSON object.", adapter=who, path=path)
    return config


def _scan_modules(infos: Mapping[str, Any], who: str, path: str) -> Tuple[Dict[str, LoraModule], List[str]]:
    pairs: Dict[str, Dict[str, str]] = {}
    heads: List[str] = []
    for key in infos:
        parsed = parse_lora_key(key)
        if parsed is None:
            if ".lora_" in key:  # LoRA-like but not a plain A/B weight: refuse rather than mangle
                raise AdapterError(
                    f"adapter {who!r}: unsupported LoRA tensor {key!r} in {path} (bias, embedding or "
                    "magnitude factors are not supported). Only lora_A/lora_B weights of linear layers are.",
                    adapter=who,
                    path=path,
                )
            heads.append(key)
            continue
        module, side = parsed
        if side in pairs.setdefault(module, {}):
            raise AdapterError(
                f"adapter {who!r}: module {module} has two lora_{side} tensors in {path} "
                f"({pairs[module][side]!r} and {key!r}). Save one adapter per file.",
                adapter=who,
                path=path,
                layer=module,
            )
        pairs[module][side] = key
    modules: Dict[str, LoraModule] = {}
    for module, sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            missing = ({"A", "B"} - set(sides)).pop()
            raise AdapterError(
                f"adapter {who!r}: module {module} has no lora_{missing} in {path}; the file is incomplete.",
                adapter=who,
                path=path,
                layer=module,
            )
        a, b = infos[sides["A"]], infos[sides["B"]]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1] or a.shape[0] < 1:
            raise AdapterError(
                f"adapter {who!r}: module {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                f"in {path}; expected (r, d_in) and (d_out, r) with the same r ≥ 1.",
                adapter=who,
                path=path,
                layer=module,
            )
        if not (a.dtype.is_floating_point and b.dtype.is_floating_point):
            raise AdapterError(
                f"adapter {who!r}: module {module} factors are {a.dtype}/{b.dtype} in {path}; expected floats.",
                adapter=who,
                path=path,
                layer=module,
            )
        modules[module] = LoraModule(module, sides["A"], sides["B"], a.shape[0], a.shape[1], b.shape[0],
                                     a.nbytes + b.nbytes)
    if not modules:
        raise AdapterError(
            f"adapter {who!r}: {path} holds no lora_A/lora_B weights; not a LoRA adapter.",
            adapter=who,
            path=path,
        )
    return modules, heads


def open_local(folder: str, name: str, source: Optional[str] = None, revision: Optional[str] = None) -> Adapter:
    """Open a PEFT LoRA adapter folder (headers only) and validate it."""
    source = source or folder
    if not os.path.isdir(folder):
        raise AdapterNotFoundError(
            f"adapter {name!r}: {folder} is not a folder. Give a PEFT adapter folder or a Hub id (owner/name).",
            adapter=name,
            path=folder,
        )
    cfg_path = os.path.join(folder, CONFIG_NAME)
    config = _load_config(cfg_path, name)
    # r is required as a checkpoint's copy of the config requires it: without it PEFT would take its default
    # rank, and a checkpoint made from the adapter would not load.
    check_lora_config(config, name, cfg_path, require_r=True)
    weights = os.path.join(folder, WEIGHTS_NAME)
    _check_regular(weights, name)
    if not os.path.isfile(weights):
        pickled = [p for p in _PICKLE_NAMES if os.path.exists(os.path.join(folder, p))]
        hint = (
            f" It has {pickled[0]}, a pickle, which lorashare never loads (it can run code). Convert it once, "
            "in a trusted environment: PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)."
            if pickled
            else ""
        )
        raise AdapterNotFoundError(
            f"adapter {name!r}: no {WEIGHTS_NAME} in {folder}.{hint}", adapter=name, path=weights
        )
    tf = TensorFile(weights, error=AdapterError, who=name)  # the one read of the header; reads go through it
    try:
        modules, heads = _scan_modules(tf.infos, name, weights)
        _check_ranks(config, modules, name, weights)
    except BaseException:
        tf.close()
        raise
    return Adapter(name=name, source=source, folder=folder, config=config, modules=modules, head_keys=heads,
                   revision=revision, _file=tf)


def _check_ranks(config: Mapping[str, Any], modules: Mapping[str, LoraModule], name: str, weights: str) -> None:
    """Refuse factors whose rank is not the one the config gives their module."""
    r = config.get("r")
    for m in modules.values():
        expect = pattern_value(config.get("rank_pattern") or {}, m.module, r)
        if expect is not None and expect != m.rank:
            # PEFT would refuse it too, and a checkpoint made from it could not be rebuilt as this config says.
            raise AdapterError(
                f"adapter {name!r}: module {m.module} has rank {m.rank} in {WEIGHTS_NAME}, but its "
                f"{CONFIG_NAME} says r={expect}{' (rank_pattern)' if config.get('rank_pattern') else ''}. "
                "Make the config's r / rank_pattern match the weights, or save the adapter again with PEFT.",
                adapter=name, layer=m.module, path=weights)


def _check_regular(path: str, who: str) -> None:
    """Refuse ``path`` if it exists and is not a regular file (symlinks followed); never opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # the caller says what is missing
    except OSError as exc:
        raise AdapterError(f"adapter {who!r}: cannot read {path}: {exc.strerror or exc}. Check the adapter folder.",
                           adapter=who, path=path) from None
    if not stat.S_ISREG(mode):
        raise AdapterError(
            f"adapter {who!r}: {path} is {file_kind(mode)}, not a regular file. Replace it with the file that "
            "PEFT wrote (PeftModel.save_pretrained).",
            adapter=who, path=path,
        )


def open_adapter(source: str, name: Optional[str] = None, **hub_kwargs: Any) -> Adapter:
    """Open one adapter from a local folder or a Hub id (``user/repo[/sub][@rev]``).

    Example:
        >>> a = open_adapter("runs/billing")  # doctest: +SKIP
        >>> sorted(a.modules)[:1]  # doctest: +SKIP
        ['roberta.encoder.layer.0.attention.self.query']
    """
    if not isinstance(source, (str, os.PathLike)):
        raise AdapterError(f"adapter source {source!r} must be a folder path or a Hub id string.")
    source = os.fspath(source)
    local = is_local_source(source)  # decided once: the name and the opening follow from it
    name = check_name(name) if name is not None else _derived_name(source, local)
    if local:
        _check_local(source, name)
        return open_local(os.path.expanduser(source), name, source)

    folder, revision = hub.fetch_adapter(hub.parse_adapter_id(source), **hub_kwargs)
    return open_local(folder, name, source, revision=revision)


def is_local_source(source: Union[str, "os.PathLike[str]"], *, base: Optional[str] = None) -> bool:
    """True if the adapter source ``source`` is a local path, False if it is to be read as a Hub id.

    A local path is one that exists; one that only a path can be (absolute, ``./``, ``~``, a
    wildcard, or leading folders that exist: :func:`lorashare.hub.is_local_path`); or a single
    name (a Hub id has an owner).  So a typo in a path (``examples/adapters/task9``) is a missing
    folder, reported with what is there, never a Hub request.  ``base``: the folder relative paths
    start from (default: the current folder).

    Example:
        >>> is_local_source("./runs/a"), is_local_source("/nonexistent/acme/refunds-lora@v3")
        (True, True)
    """

    text = os.fspath(source)
    return (
        os.path.lexists(os.path.join(base or os.curdir, os.path.expanduser(text)))
        or text.startswith((".", "~"))
        or "/" not in text.split("@", 1)[0]
        or hub.is_local_path(text, base=base)
    )


_PATTERN = "*?["


def _folders(folder: str) -> List[str]:
    """The visible subfolders of ``folder``, sorted (none if it cannot be listed)."""
    try:
        return sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir())
    except OSError:
        return []


def _listing(names: Sequence[str], near: str = "", *, most: int = 10) -> str:
    """``names`` joined, at most ``most`` of them (the closest to ``near``), with the count when cut."""
    if len(names) <= most:
        return ", ".join(names)
    close = sorted(sorted(names, key=lambda n: -difflib.SequenceMatcher(None, near, n).ratio())[:most])
    return ", ".join(close) + f", … ({len(names)} in all)"


def missing_path(path: str, *, base: Optional[str] = None, what: str = "does not exist") -> str:
    """Why ``path`` (as given, relative to ``base``) is not there: what of it exists and what that holds.

    ``what`` says what is wrong with ``path`` (``"matches nothing"`` for a wildcard pattern).

    Example:
        >>> missing_path("examples/adapters/task9")  # doctest: +SKIP
        'examples/adapters/task9 does not exist (examples/adapters has task0, task1, task2, task3)'
        >>> missing_path("examples/adapter/task0")  # doctest: +SKIP
        'examples/adapter/task0 does not exist (examples has no adapter; it has adapters, workflows; did you mean examples/adapters/task0?)'
    """
    root = base or os.curdir
    shown = os.path.normpath(path)
    parts = shown.split(os.sep)
    absolute = os.path.isabs(shown)
    # the deepest folder of the path that exists
    i = len(parts) - 1
    while i > (1 if absolute else 0) and not os.path.isdir(os.path.join(root, os.sep.join(parts[:i]) or os.sep)):
        i -= 1
    parent = os.sep.join(parts[:i]) or (os.sep if absolute else "")
    where = os.path.join(root, parent) if parent else root
    if not os.path.isdir(where):
        return f"{path} {what}"
    missing = parts[i]
    here = parent or ("the current folder" if base is None else "its folder")
    if os.path.lexists(os.path.join(where, missing)):  # a file where a folder should be
        return f"{path} {what} ({os.path.join(parent, missing)} is a file, not a folder)"
    names = _folders(where)
    if not names:
        return f"{path} {what} ({here} holds no folders)"
    scores = sorted(((difflib.SequenceMatcher(None, missing, n).ratio(), n) for n in names), reverse=True)
    unique = len(scores) == 1 or scores[0][0] > scores[1][0]
    guess = scores[0][1] if unique and scores[0][0] >= 0.75 else None
    if i == len(parts) - 1:
        hint = f"; did you mean {os.path.join(parent, guess)}?" if guess else ""
        return f"{path} {what} ({here} has {_listing(names, missing)}{hint})"
    hint = f"; did you mean {os.sep.join([*parts[:i], guess, *parts[i + 1:]])}?" if guess else ""
    return f"{path} {what} ({here} has no {missing}; it has {_listing(names, missing)}{hint})"


def _adapter_subfolders(folder: str) -> List[str]:
    return [n for n in _folders(folder) if os.path.isfile(os.path.join(folder, n, CONFIG_NAME))]


def check_source(source: Union[str, "os.PathLike[str]"], *, name: Optional[str] = None) -> None:
    """Refuse, with what is there, a local source that cannot be an adapter folder; no Hub request, nothing read.

    Raises :class:`~lorashare.errors.AdapterNotFoundError` for a path that does not exist
    (naming the folders beside it), a wildcard pattern (lorashare does not expand them), a folder
    of adapters (naming them) or one of an adapter's files.  Anything else passes: the adapter
    itself is checked when opened.

    Example:
        >>> check_source("examples/adapters/task9")  # doctest: +SKIP
        Traceback (most recent call last):
        lorashare.errors.AdapterNotFoundError: adapter 'task9': examples/adapters/task9 does not exist (examples/adapters has task0, task1, task2, task3).
    """
    text = os.fspath(source)
    if is_local_source(text):
        _check_local(text, name)


def _check_local(text: str, name: Optional[str]) -> None:
    """:func:`check_source` for a source already known to be local."""
    folder = os.path.expanduser(text)
    who = f"adapter {name!r}: " if name is not None else ""
    if os.path.isdir(folder):
        inner = [] if os.path.lexists(os.path.join(folder, CONFIG_NAME)) else _adapter_subfolders(folder)
        if inner:
            many = f"{len(inner)} adapters" if len(inner) > 1 else "an adapter"
            problem = (f"{text} is a folder of {many} ({_listing(inner)}), not an adapter: it has no {CONFIG_NAME}, "
                       "its subfolders do.")
            raise AdapterNotFoundError(
                f"{problem} Pass each adapter's folder, e.g. {os.path.join(text, inner[0])!r}.",
                adapter=text, path=text, problem=problem)
        return
    if os.path.lexists(folder):
        if os.path.basename(folder) in (CONFIG_NAME, WEIGHTS_NAME):
            raise AdapterNotFoundError(
                f"{who}{text} is a file of the adapter; give its folder, {os.path.dirname(text) or '.'}.",
                adapter=name or text, path=text)
        return  # open_local says it is not a folder
    if any(c in text for c in _PATTERN):
        matches = sorted(glob.glob(folder))
        if matches:
            problem = (f"{text} is a wildcard pattern, which lorashare does not expand (it matches "
                       f"{_listing([os.path.basename(m) for m in matches])}).")
            raise AdapterNotFoundError(f"{problem} Pass the folders it matches: sorted(glob.glob({text!r})).",
                                       adapter=text, path=text, problem=problem)
        problem = f"the wildcard pattern {missing_path(text, what='matches nothing')}."
        raise AdapterNotFoundError(f"{problem} lorashare does not expand patterns in any case: pass the folders, e.g. "
                                   "sorted(glob.glob(pattern)).", adapter=text, path=text, problem=problem)
    shown = folder if text.startswith("~") else text
    raise AdapterNotFoundError(f"{who}{missing_path(shown)}.", adapter=name or text, path=text)


def default_name(source: Union[str, "os.PathLike[str]"]) -> str:
    """The name an adapter gets when none is given: its folder's name, or its Hub subfolder or repo name.

    Example:
        >>> default_name("acme/multi-lora/legal@v3"), default_name("/runs/refunds lora")
        ('legal', 'refunds_lora')
    """
    source = os.fspath(source)
    return _derived_name(source, is_local_source(source))


def _derived_name(source: str, local: bool) -> str:
    if local:
        return derive_name(os.path.abspath(os.path.expanduser(source)))
    return derive_name(source.split("@", 1)[0])


def name_sources(items: Iterable[Tuple[Optional[str], str]]) -> Dict[str, str]:
    """``{name: source}`` for ``(name or None, source)`` pairs, as the CLI and the Space take them.

    Given names are kept (given twice: an error); the others get :func:`default_name`, made unique
    with ``_1``, ``_2``, … as lorashare 0.1.x does, and the renames are logged.

    Example:
        >>> name_sources([("a", "runs/x"), (None, "runs/v1/adapter"), (None, "runs/v2/adapter")])
        {'a': 'runs/x', 'adapter': 'runs/v1/adapter', 'adapter_1': 'runs/v2/adapter'}
    """
    items = list(items)
    named: Dict[str, str] = {}
    for name, source in items:
        if name is None:
            continue
        check_name(name)
        if name in named:
            raise AdapterError(f"adapter name {name!r} is given twice (for {named[name]} and {source}). "
                               "Names must be unique: choose another one.", adapter=name)
        named[name] = source
    out: Dict[str, str] = {}
    for name, source in items:
        if name is None:
            derived = default_name(source)
            name = unique_name(derived, set(named) | set(out))
            if name != derived:
                logger.warning("adapter %s: the name %r is taken, naming it %r", source, derived, name)
        out[name] = source
    return out


def open_adapters(
    adapters: Sequence[str] | Mapping[str, str], *, on_error: str = "raise", **hub_kwargs: Any
) -> List[Adapter]:
    """Open many adapters and name them; with ``on_error='skip'`` log and skip bad ones.

    Names derived from folders (or Hub ids) that clash get ``_1``, ``_2``, … as in
    lorashare 0.1.x (``runs/v1/adapter``, ``runs/v2/adapter`` → ``adapter``, ``adapter_1``),
    and the names given are logged; pass a dict ``{name: source}`` to choose them.
    """
    items: List[Tuple[Optional[str], str]]
    if isinstance(adapters, Mapping):
        items = [(check_name(n), p) for n, p in adapters.items()]
    elif isinstance(adapters, (str, os.PathLike)):
        raise AdapterError(
            f"adapters must be a list of folders/Hub ids or a dict name → source, got the single string {adapters!r}."
        )
    else:
        items = [(None, p) for p in adapters]
    opened: List[Adapter] = []
    seen: Dict[str, str] = {}
    # Fingerprints (a full read of each file) run in the background from each adapter's opening on,
    # beside the other openings and the compression; Adapter.sha256() waits for its own.
    hashing = ThreadPoolExecutor(1, thread_name_prefix="lorashare-sha256")
    try:
        for name, src in items:
            try:
                a = open_adapter(src, name, **hub_kwargs)
            except AdapterError as exc:
                if on_error == "skip":
                    logger.warning("skipping adapter %s: %s", src, exc)
                    continue
                for done in opened:
                    done.close()
                raise
            a._hashing = hashing.submit(a._read_sha256)
            _unique(a, name, src, seen)
            opened.append(a)
    finally:
        hashing.shutdown(wait=False)
    if items and items[0][0] is None:
        logger.info("adapter names: %s", ", ".join(f"{n} ← {s}" for n, s in seen.items()))
    return opened


def _unique(a: Adapter, name: Optional[str], src: str, seen: Dict[str, str]) -> None:
    """Give ``a`` a name no adapter in ``seen`` has (a derived one gets ``_1``, ``_2``, …), and record it."""
    if a.name in seen:
        if name is not None:  # an explicit name: never renamed behind the user's back
            raise AdapterError(
                f"duplicate adapter name {a.name!r}: from {seen[a.name]} and from {src}. "
                "Names must be unique; pass a dict {name: source} with one name per adapter.",
                adapter=a.name,
            )
        derived, a.name = a.name, unique_name(a.name, seen)
        logger.warning(
            "adapters %s and %s share the name %r: naming the second %r. Pass a dict {name: source} "
            "to choose names.", seen[derived], src, derived, a.name,
        )
    seen[a.name] = os.fspath(src)


def check_compatible(adapters: Sequence[Adapter], *, strict: bool = False) -> None:
    """Refuse adapters that cannot share bases: other base models, or other shapes of one module.

    Mixed ranks and mixed target modules are supported; ``strict=True`` refuses them too.
    """
    ref = adapters[0]
    ref_base = _norm_base(ref.base_model)
    for a in adapters[1:]:
        base = _norm_base(a.base_model)
        if ref_base and base and base != ref_base:
            raise IncompatibleAdaptersError(
                f"adapter {a.name!r} was trained on base model {a.base_model!r}, but {ref.name!r} on "
                f"{ref.base_model!r}. A shared basis needs one base model: compress each base's adapters separately.",
                adapter=a.name,
            )
    shapes: Dict[str, Tuple[str, int, int]] = {}
    for a in adapters:
        for m in a.modules.values():
            first = shapes.setdefault(m.module, (a.name, m.d_in, m.d_out))
            if (first[1], first[2]) != (m.d_in, m.d_out):
                raise IncompatibleAdaptersError(
                    f"adapter {a.name!r}: module {m.module} maps {m.d_in} → {m.d_out} features, but in "
                    f"{first[0]!r} it maps {first[1]} → {first[2]}. Are these adapters for the same base model?",
                    adapter=a.name,
                    layer=m.module,
                )
    if strict:
        for a in adapters[1:]:
            if set(a.modules) != set(ref.modules):
                diff = sorted(set(a.modules) ^ set(ref.modules))
                raise IncompatibleAdaptersError(
                    f"adapter {a.name!r} targets other modules than {ref.name!r} (e.g. {diff[0]}); "
                    "strict mode needs the same target modules. Drop strict=True to allow mixed sets.",
                    adapter=a.name,
                    layer=diff[0],
                )
            for m in a.modules.values():
                if m.rank != ref.modules[m.module].rank:
                    raise IncompatibleAdaptersError(
                        f"adapter {a.name!r}: {m.module} has rank {m.rank}, but {ref.name!r} has rank "
                        f"{ref.modules[m.module].rank}; strict mode needs one rank. Drop strict=True to allow mixed ranks.",
                        adapter=a.name,
                        layer=m.module,
                    )


def _norm_base(base: Optional[str]) -> Optional[str]:
    return base.rstrip("/") if isinstance(base, str) and base else None


#: ``__metadata__`` of the weights file of an adapter that lorashare rebuilt: how a later save
#: knows the folder is its own to replace.
REBUILT_METADATA = {"format": "pt", "lorashare": "rebuilt"}


def foreign_adapter_content(folder: str) -> Optional[str]:
    """``None`` if ``folder`` is a PEFT adapter that lorashare rebuilt, and nothing else; else what is foreign.

    Example:
        >>> foreign_adapter_content("billing_adapter") is None  # doctest: +SKIP
        True
    """
    for entry in sorted(os.listdir(folder)):
        if entry not in (WEIGHTS_NAME, CONFIG_NAME) or not os.path.isfile(os.path.join(folder, entry)) \
                or os.path.islink(os.path.join(folder, entry)):
            return f"it holds {entry!r}"
    try:
        _, meta = read_header(os.path.join(folder, WEIGHTS_NAME), error=AdapterError)
    except (AdapterError, OSError):
        return f"it has no readable {WEIGHTS_NAME}"
    if meta.get("lorashare") != REBUILT_METADATA["lorashare"]:
        return "it is a PEFT adapter that lorashare did not rebuild"
    return None


def check_adapter_target(folder: str, *, inputs: Iterable[str] = (), overwrite: bool = False) -> str:
    """Raise :class:`~lorashare.errors.OutputPathError` unless a rebuilt adapter may be written at ``folder``."""
    return check_target(folder, what="rebuilt adapter", replaceable=foreign_adapter_content, inputs=inputs,
                        overwrite=overwrite)


def write_peft_adapter(
    folder: str,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    *,
    inputs: Iterable[str] = (),
    overwrite: bool = False,
    durable: bool = True,
) -> None:
    """Write a standard PEFT adapter folder atomically (``PeftModel.from_pretrained`` loads it).

    ``folder`` may be new, empty or an adapter lorashare rebuilt before; see
    :func:`lorashare.format.atomic.check_target` for what is never replaced.  ``durable=False`` skips
    the fsync, for a cache that checks its folders itself.
    """
    with atomic_folder(folder, what="rebuilt adapter", replaceable=foreign_adapter_content, inputs=inputs,
                       overwrite=overwrite, durable=durable) as tmp:
        with open(os.path.join(tmp, WEIGHTS_NAME), "wb") as f:
            write_tensors(f, tensors, REBUILT_METADATA)
        with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True)
