"""The state of a SHARE model: its spec, its bases, one record per adapter, and a revision.

A :class:`SHAREState` is an immutable value.  An edit (add, remove, recompute, a new source or
card) never changes a state: it builds the next one, with ``revision + 1``, and the model
publishes it in one step.  Whoever read a state (a served call, a save) keeps a consistent
view of it, whatever edits follow.

Bases and loadings are *weights*: a float tensor, or for int8/nf4 storage a
:class:`~lorashare.format.storage.Stored` value (codes and scales, decoded once and cached).  Names,
statistics, sizes and the ``share_config.json`` view are derived from the state (see
:mod:`lorashare.codec.stats`), never stored beside it.

Example:
    >>> state = share.state  # doctest: +SKIP
    >>> state.revision, state.names  # doctest: +SKIP
    (3, ('billing', 'refunds'))
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .. import hub
from ..errors import AdapterError, CheckpointError
from ..format.checkpoint import CheckpointData, check_values, load_checkpoint
from ..format.schema import AdapterInfo, AdapterMeta, CardData, SHAREConfig
from ..format.spec import CompressionSpec
from ..format.storage import Stored, is_quantized, quantize
from ..peft.adapters import lora_key, num_labels, parse_lora_key
from ..utils.names import split_group_key
from . import subspace as S

__all__ = ["Weight", "as_float", "encoded", "AdapterRecord", "Fit", "Origin", "SHAREState", "rebuild", "peft_config", "from_parts", "save_inputs", "load_state",
           "from_checkpoint", "to_checkpoint", "check_adapter", "SAVE_FIX"]

#: A basis (d × k) or a loading (k × r): a float tensor, or its quantized stored form.
Weight = Union[torch.Tensor, Stored]


def as_float(w: Weight) -> torch.Tensor:
    """The float tensor a weight stands for (decoded once per stored value)."""
    return w if isinstance(w, torch.Tensor) else w.value()


def encoded(w: Weight, scheme: str, *, transposed: bool) -> Stored:
    """The codes to write for ``w`` in ``scheme``: its own while its decoded floats are unchanged
    (so a re-save is bit-identical), else the floats quantized anew (an in-place edit is kept)."""
    if isinstance(w, Stored) and w.scheme == scheme and w.unchanged():
        return w
    return quantize(as_float(w), scheme, transposed=transposed)


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, eq=False)
class AdapterRecord:
    """Everything a SHARE model keeps about one of its adapters.

    Attributes:
        weights: ``{"<module>:<A|B>": loading (k × r)}`` on the shared bases, as stored.
        config: the adapter's own ``adapter_config.json``.
        heads: its non-LoRA tensors (classifier heads, ``modules_to_save``), bit-exact.
        source: the folder or Hub id it came from.
        revision: the resolved Hub commit of a Hub source.
        sha256: the fingerprint of its ``adapter_model.safetensors``.
        lora_bytes: the bytes of its LoRA factors before compression.
        errors: ΔW relative error per module, measured at compression (or projection).
        lora_keys: its own factor keys where they are not PEFT's default ``lora_key(module, side)``.
        errors_bound: ``errors`` are upper bounds against the original, not measurements (it was
            recompressed from its reconstruction: see :func:`lorashare.codec.edit.recompute`).
    """

    weights: Mapping[str, Weight]
    config: Dict[str, Any]
    heads: Mapping[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    revision: Optional[str] = None
    sha256: Optional[str] = None
    lora_bytes: Optional[int] = None
    errors: Mapping[str, float] = field(default_factory=dict)
    lora_keys: Mapping[str, str] = field(default_factory=dict)
    errors_bound: bool = False

    def __post_init__(self) -> None:
        for name in ("weights", "heads", "errors", "lora_keys"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @cached_property
    def loadings(self) -> Mapping[str, torch.Tensor]:
        """``{"<module>:<A|B>": loading (k × r)}`` as float tensors."""
        return MappingProxyType({k: as_float(w) for k, w in self.weights.items()})

    @cached_property
    def rank(self) -> int:
        """The largest rank of its modules."""
        return max((int(w.shape[1]) for w in self.weights.values()), default=0)

    def replace(self, **changes: Any) -> "AdapterRecord":
        return dataclasses.replace(self, **changes)

    def meta(self, name: str) -> Dict[str, Any]:
        """Its ``adapters/<name>/adapter_meta.json``."""
        return AdapterMeta(name, self.config, self.source, self.revision, self.sha256, dict(self.errors),
                           dict(self.lora_keys), delta_w_error_bound=bool(self.errors and self.errors_bound)).to_dict()

    def info(self) -> Dict[str, Any]:
        """Its entry in ``share_config.json``'s ``adapters`` (readable without any tensor)."""
        errs = list(self.errors.values())
        return AdapterInfo(
            source=self.source, revision=self.revision, sha256=self.sha256, rank=self.rank,
            lora_alpha=self.config.get("lora_alpha"), lora_bytes=self.lora_bytes, task_type=self.config.get("task_type"),
            num_labels=num_labels(self.heads), delta_w_error_mean=sum(errs) / len(errs) if errs else None,
            delta_w_error_max=max(errs) if errs else None, delta_w_error_bound=bool(errs and self.errors_bound) or None,
        ).to_dict()


@dataclass(frozen=True)
class Fit:
    """What the last fit of the bases measured, kept until the next fit.

    Attributes:
        explained: ``{"<module>:<A|B>": share of the ΔW energy the basis keeps}``.
        capped: module sides whose k auto/budget stopped at the break-even.
        budget_bytes: the byte budget the fit used (a ``target_ratio`` resolved), if any.
    """

    explained: Mapping[str, float] = field(default_factory=dict)
    capped: Tuple[str, ...] = ()
    budget_bytes: Optional[int] = None


@dataclass(frozen=True)
class Origin:
    """Where a loaded state came from: the folder, and its format and fingerprints as read.

    ``legacy`` is the config of a lorashare 0.1.x checkpoint as read: its statistics cannot be
    derived (0.1.x recorded no LoRA bytes), so they are shown as the file has them until an edit.

    ``stamp`` is the sha256 of the ``share_config.json`` read: a save back over the folder (or a
    push back to ``repo_id``, from ``commit``) first checks that nobody changed it since.  ``names``
    are all the checkpoint's adapters; ``unseen`` those a partial load (``adapters=[...]``) left
    out, which a save or push back keeps; ``bases`` are the bases as read, to tell that they
    still fit the unseen adapters' loadings.  ``head``: loaded from the default branch's head.
    """

    folder: str
    format_version: int = 0
    files: Mapping[str, str] = field(default_factory=dict)
    legacy: Optional[SHAREConfig] = None
    stamp: Optional[str] = None
    names: Tuple[str, ...] = ()
    unseen: Tuple[str, ...] = ()
    repo_id: Optional[str] = None
    commit: Optional[str] = None
    head: bool = False
    bases: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def where(self) -> str:
        """The checkpoint as a user named it: the Hub repo (at its commit) or the folder."""
        if self.repo_id:
            return f"{self.repo_id}@{self.commit[:8]}" if self.commit else self.repo_id
        return self.folder


@dataclass(frozen=True, eq=False)
class SHAREState:
    """One revision of a SHARE model (immutable; edits build the next revision).

    Attributes:
        spec: how the bases were (and will be) compressed.
        bases: ``{"<module>:<A|B>": basis (d × k)}``.
        records: ``{adapter: AdapterRecord}``, in order.
        base_model: the base model the adapters were trained on.
        card: the model card's own options.
        fit: what the last fit of the bases measured.
        inputs: folders the data was read from (saves never replace them or their ancestors).
        origin: the checkpoint it was loaded from, if any.
        revision: counts the edits since this model was built or loaded.
    """

    spec: CompressionSpec
    bases: Mapping[str, Weight]
    records: Mapping[str, AdapterRecord]
    base_model: str = ""
    card: CardData = field(default_factory=CardData)
    fit: Fit = field(default_factory=Fit)
    inputs: Tuple[str, ...] = ()
    origin: Optional[Origin] = None
    revision: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bases", _frozen(self.bases))
        object.__setattr__(self, "records", _frozen(self.records))

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.records)

    @property
    def unseen(self) -> Tuple[str, ...]:
        """Adapters of the loaded checkpoint that a partial load left out (a save back keeps them)."""
        return self.origin.unseen if self.origin else ()

    @cached_property
    def components(self) -> Mapping[str, torch.Tensor]:
        """``{"<module>:<A|B>": basis (d × k)}`` as float tensors."""
        return MappingProxyType({k: as_float(w) for k, w in self.bases.items()})

    def next(self, **changes: Any) -> "SHAREState":
        """The next revision, with ``changes``; bases no adapter uses any more are dropped."""
        new = dataclasses.replace(self, revision=self.revision + 1, **changes)
        used = {k for r in new.records.values() for k in r.weights}
        if set(new.bases) - used and not new.unseen:  # a partial view keeps the bases its unseen adapters use
            new = dataclasses.replace(new, bases={k: w for k, w in new.bases.items() if k in used})
        return new


def rebuild(state: SHAREState, name: str, *, peft_keys: bool = False, contiguous: bool = True) -> Dict[str, torch.Tensor]:
    """One adapter's rebuilt factors and heads, under its own keys (PEFT's saved form with ``peft_keys``).

    ``contiguous=False`` leaves A factors as transposed views, for a caller that copies them anyway
    (a cast to another dtype makes them contiguous in the same pass).
    """
    rec = state.records[name]
    own = {} if peft_keys else rec.lora_keys
    out: Dict[str, torch.Tensor] = {}
    for key, L in rec.loadings.items():
        module, side = split_group_key(key)
        W = S.reconstruct_rows(state.components[key], L)  # (r, d)
        W = W if side == "A" else W.T
        out[own.get(key) or lora_key(module, side)] = W.contiguous() if contiguous else W
    out.update(rec.heads)
    return out


def peft_config(rec: AdapterRecord, name: str) -> Dict[str, Any]:
    """The adapter's own ``adapter_config.json``; refused when it has none."""
    cfg = dict(rec.config)
    if not cfg:
        # Never invent one from checkpoint-wide values: a wrong lora_alpha or a lost
        # use_rslora rescales the adapter without a word.
        raise AdapterError(
            f"adapter {name!r} has no LoRA config (its adapter_config.json), so it cannot be rebuilt as a "
            "PEFT adapter. Give it in adapter_configs, or compress the adapter again from its folder.",
            adapter=name,
        )
    return cfg


def from_parts(config: SHAREConfig, components: Mapping[str, Weight], all_loadings: Mapping[str, Mapping[str, Weight]],
               adapter_configs: Mapping[str, Dict[str, Any]], heads: Optional[Mapping[str, Dict[str, torch.Tensor]]] = None,
               sources: Optional[Mapping[str, str]] = None) -> SHAREState:
    """The state that lorashare 0.1.x's constructor arguments describe (``SHAREModel(config, components, ...)``)."""
    heads, sources = heads or {}, sources or {}
    infos = config.adapters if isinstance(config.adapters, dict) else {}
    records = {}
    for n, loadings in all_loadings.items():
        info = infos.get(n) if isinstance(infos.get(n), dict) else {}
        records[n] = AdapterRecord(
            weights=loadings, config=adapter_configs.get(n) or {}, heads=heads.get(n) or {},
            source=sources.get(n) or info.get("source") or "", revision=info.get("revision"),
            sha256=info.get("sha256"), lora_bytes=info.get("lora_bytes"),
        )
    st = config.compression_stats or {}
    return SHAREState(
        spec=CompressionSpec.from_config(config), bases=components, records=records,
        base_model=config.base_model_name_or_path or "", card=config.card,
        fit=Fit(dict(st.get("per_layer_explained_variance") or {}), tuple(st.get("capped_groups") or ()),
                config.budget_bytes if config.component_selection == "budget" else None),
        origin=Origin("", config.format_version, dict(config.files)),
    )


def load_state(path: Union[str, "os.PathLike[str]"], *, revision: Optional[str] = None, token: Optional[str] = None,
               adapters: Optional[Iterable[str]] = None, verify: bool = True,
               timeout: Optional[float] = None) -> SHAREState:
    """The state of the checkpoint in folder ``path``, or in Hub repo ``path`` (only ``adapters``' files fetched)."""
    path = os.path.expanduser(os.fspath(path))  # as open_adapter does: "~/ckpt" is never a Hub id
    if os.path.isdir(path):
        return from_checkpoint(load_checkpoint(path, adapters=adapters, verify=verify), path)
    folder, jail = hub.fetch_checkpoint(path, revision=revision, token=token, adapters=adapters, timeout=timeout)
    state = from_checkpoint(load_checkpoint(folder, adapters=adapters, verify=verify, jail=jail), folder)
    ref = hub.parse_adapter_id(path)
    origin = dataclasses.replace(state.origin, repo_id=ref.repo_id, commit=hub.snapshot_commit(folder),
                                 head=not (revision or ref.revision))
    return dataclasses.replace(state, origin=origin)


def save_inputs(state: SHAREState, output_dir: Optional[str] = None) -> List[str]:
    """The folders a save of ``state`` must never replace; saving over the loaded checkpoint itself is allowed."""
    here = os.path.realpath(output_dir) if output_dir is not None else None
    origin = state.origin.folder if state.origin else ""
    return [f for f in state.inputs if not (f == origin and here is not None and os.path.realpath(f) == here)]


# --------------------------------------------------------------------------- checkpoint data ⇄ state
def from_checkpoint(data: CheckpointData, folder: Optional[str]) -> SHAREState:
    """The state a loaded checkpoint describes (only the adapters that were read)."""
    cfg = data.config
    infos = cfg.adapters if isinstance(cfg.adapters, dict) else {}
    records = {}
    bases = {k: data.stored_components.get(k, U) for k, U in data.components.items()}
    for n in cfg.adapter_names:
        if n not in data.loadings:
            continue
        meta, info = data.metas.get(n, {}), infos.get(n) if isinstance(infos.get(n), dict) else {}
        stored = data.stored_loadings.get(n, {})
        records[n] = AdapterRecord(
            weights={k: stored.get(k, L) for k, L in data.loadings[n].items()},
            config=dict(meta.get("original_config", {})), heads=data.heads.get(n) or {},
            source=meta.get("original_adapter_path") or info.get("source") or "", revision=info.get("revision"),
            sha256=info.get("sha256"), lora_bytes=info.get("lora_bytes"),
            errors=dict(meta.get("delta_w_error") or {}), lora_keys=_meta_lora_keys(n, meta, data.loadings[n]),
            errors_bound=bool(meta.get("delta_w_error_bound")),
        )
    st = cfg.compression_stats or {}
    fit = Fit(explained=dict(st.get("per_layer_explained_variance") or {}), capped=tuple(st.get("capped_groups") or ()),
              budget_bytes=cfg.budget_bytes if cfg.component_selection == "budget" else None)
    return SHAREState(
        spec=CompressionSpec.from_config(cfg),
        bases=bases, records=records, base_model=cfg.base_model_name_or_path or "", card=cfg.card, fit=fit,
        inputs=(folder,) if folder else (),
        origin=Origin(folder or "", cfg.format_version, dict(cfg.files), legacy=cfg if cfg.format_version == 0 else None,
                      stamp=data.stamp, names=tuple(cfg.adapter_names),
                      unseen=tuple(n for n in cfg.adapter_names if n not in records), bases=bases),
    )


def _meta_lora_keys(name: str, meta: Mapping[str, Any], loadings: Mapping[str, torch.Tensor]) -> Dict[str, str]:
    """The ``lora_keys`` of an adapter_meta.json, checked: each names a factor of its own module and side."""
    raw = meta.get("lora_keys")
    if raw is None:
        return {}
    where = f"adapters/{name}/adapter_meta.json"
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{where}: lora_keys is a {type(raw).__name__}, expected an object {{\"<module>:<A|B>\": key}}. "
            "The checkpoint is corrupt; re-save it from its adapters.", adapter=name, path=where,
        )
    out = {}
    for gk, key in raw.items():
        module, side = split_group_key(gk)
        if gk not in loadings or not isinstance(key, str) or parse_lora_key(key) != (module, side):
            raise CheckpointError(
                f"{where}: lora_keys maps {gk!r} to {key!r}, expected the key of that module's lora_{side or '?'} "
                "for one of the adapter's loadings. The checkpoint is corrupt; re-save it from its adapters.",
                adapter=name, path=where, layer=module,
            )
        out[gk] = key
    return out


#: How a refused save ends: the values at fault never reach the disk.
SAVE_FIX = ("Nothing was saved: no reader would load a checkpoint with it. Fix that adapter (train or compress it "
            "again) or remove_adapter() it, then save.")


def check_adapter(state: SHAREState, name: str, rec: AdapterRecord, *, fix: str) -> None:
    """Refuse ``rec`` as adapter ``name`` of ``state`` (an :class:`~lorashare.errors.AdapterError` ending with
    ``fix``) unless a checkpoint holding it would load: the reader's rules
    (:func:`lorashare.format.checkpoint.check_values`), applied before it is published."""
    data = CheckpointData(SHAREConfig(), dict(state.components), {name: dict(rec.loadings)},
                          {name: dict(rec.heads)} if rec.heads else {}, {name: rec.meta(name)})
    check_values(data, bases=False, error=AdapterError, fix=fix)


def to_checkpoint(state: SHAREState, config: Any) -> CheckpointData:
    """What a save writes for ``state`` (``config`` is its ``share_config.json`` view, a fresh copy).

    Refused (a :class:`~lorashare.errors.CheckpointError` naming the adapter and the tensor) when a load
    would refuse it: a NaN loading of a diverged run, a hand-built state's inconsistent shapes.
    """
    data = CheckpointData(
        config, dict(state.components), {n: dict(r.loadings) for n, r in state.records.items()},
        {n: dict(r.heads) for n, r in state.records.items() if r.heads},
        {n: r.meta(n) for n, r in state.records.items()},
    )
    check_values(data, fix=SAVE_FIX)  # what no reader accepts is never written (nor quantized)
    if is_quantized(config.dtype):
        data.stored_components = {k: encoded(w, config.dtype, transposed=True) for k, w in state.bases.items()}
        data.stored_loadings = {n: {k: encoded(w, config.dtype, transposed=False) for k, w in r.weights.items()}
                                for n, r in state.records.items()}
    return data
