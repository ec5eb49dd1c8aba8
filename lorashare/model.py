"""``SHAREModel``: the public facade over adapters, compression and checkpoints.

Source-compatible with lorashare 0.1.x (same methods, arguments and attributes),
plus fingerprints, per-module k, storage dtypes, mixed ranks/modules, the Hub,
and loading many adapters into one ``PeftModel``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from . import __version__
from . import subspace as S
from .adapters import (
    Adapter,
    check_compatible,
    lora_key,
    num_labels,
    open_adapter,
    open_adapters,
    parse_lora_key,
    write_peft_adapter,
)
from .card import check_license, render_card
from .checkpoint import (
    CheckpointData,
    SHAREConfig,
    check_checkpoint_target,
    load_checkpoint,
    save_checkpoint,
)
from .compress import (
    CompressOptions,
    GroupResult,
    check_number,
    check_storable,
    compress,
    group_key,
    split_group_key,
)
from .errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    DuplicateAdapterError,
    LoraShareError,
    UnknownAdapterError,
)
from .fmt import k_range, size
from .storage import DTYPES, Stored, bytes_per_value, is_quantized, quantize, stored_nbytes

logger = logging.getLogger(__name__)

__all__ = ["SHAREModel", "AdapterRecord"]

AdapterSources = Union[Sequence[str], Mapping[str, str]]


@dataclass
class AdapterRecord:
    """Everything a SHARE model keeps about one of its adapters.

    Attributes:
        loadings: ``{"<module>:<A|B>": loading (k × r)}`` on the model's shared bases.
        config: the adapter's own ``adapter_config.json``.
        heads: its non-LoRA tensors (classifier heads, ``modules_to_save``), bit-exact.
        source: the folder or Hub id it came from.
        revision: the resolved Hub commit of a Hub source.
        sha256: the fingerprint of its ``adapter_model.safetensors``.
        lora_bytes: the bytes of its LoRA factors before compression.
        errors: ΔW relative error per module, measured at compression (or projection).
        lora_keys: its own factor keys where they are not PEFT's default ``lora_key(module, side)``.
    """

    loadings: Dict[str, torch.Tensor]
    config: Dict[str, Any]
    heads: Dict[str, torch.Tensor] = field(default_factory=dict)
    source: str = ""
    revision: Optional[str] = None
    sha256: Optional[str] = None
    lora_bytes: Optional[int] = None
    errors: Dict[str, float] = field(default_factory=dict)
    lora_keys: Dict[str, str] = field(default_factory=dict)
    #: Quantized storage: each loading's codes and scales, with the float tensor they decode to.
    #: A save writes them unchanged while ``loadings[key]`` is still that tensor.
    stored: Dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((int(L.shape[1]) for L in self.loadings.values()), default=0)

    def info(self) -> Dict[str, Any]:
        """Its entry in ``share_config.json``'s ``adapters`` (readable without any tensor)."""
        out: Dict[str, Any] = {
            "source": self.source, "revision": self.revision, "sha256": self.sha256, "rank": self.rank,
            "lora_alpha": self.config.get("lora_alpha"), "lora_bytes": self.lora_bytes,
            "task_type": self.config.get("task_type"), "num_labels": num_labels(self.heads),
        }
        if self.errors:
            out["delta_w_error_mean"] = sum(self.errors.values()) / len(self.errors)
            out["delta_w_error_max"] = max(self.errors.values())
        return out


class SHAREModel:
    """Many LoRA adapters of one base model, stored as shared bases plus tiny loadings.

    Example:
        >>> share = SHAREModel.from_adapters(["runs/billing", "runs/refunds"], num_components=16)  # doctest: +SKIP
        >>> share.save_pretrained("share_ckpt")  # doctest: +SKIP
        >>> state_dict = SHAREModel.from_pretrained("share_ckpt").reconstruct("billing")  # doctest: +SKIP

    Attributes (as in 0.1.x):
        config: the :class:`SHAREConfig`.
        components: ``{"<module>:<A|B>": basis (d × k)}``.
        all_loadings: ``{adapter: {"<module>:<A|B>": loading (k × r)}}``.
        adapter_configs: ``{adapter: its adapter_config.json}``.
        all_classifier_heads: ``{adapter: {key: tensor}}`` (non-LoRA tensors, bit-exact).
        adapter_sources: ``{adapter: folder or Hub id it came from}``.
    """

    def __init__(
        self,
        config: SHAREConfig,
        components: Dict[str, torch.Tensor],
        all_loadings: Dict[str, Dict[str, torch.Tensor]],
        adapter_configs: Dict[str, Dict[str, Any]],
        all_classifier_heads: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
        adapter_sources: Optional[Dict[str, str]] = None,
    ) -> None:
        self.config = config
        self.components = components
        heads, sources = all_classifier_heads or {}, adapter_sources or {}
        #: One :class:`AdapterRecord` per adapter, in order; the 0.1.x attributes are views of these.
        self.records: Dict[str, AdapterRecord] = {}
        for n, loadings in all_loadings.items():
            info = config.adapters.get(n) if isinstance(config.adapters.get(n), dict) else {}
            self.records[n] = AdapterRecord(
                loadings=loadings, config=adapter_configs.get(n) or {}, heads=heads.get(n) or {},
                source=sources.get(n) or info.get("source") or "", revision=info.get("revision"),
                sha256=info.get("sha256"), lora_bytes=info.get("lora_bytes"),
            )
        #: Quantized storage: each basis's stored form, with the float tensor it decodes to.
        self._stored_components: Dict[str, Any] = {}
        # Folders the data was read from: saves never replace them or their ancestors.
        self._input_folders: List[str] = []
        self._loaded_from: Optional[str] = None

    # Read-only views, as lorashare 0.1.x exposed them; edit through the methods.
    @property
    def all_loadings(self) -> Mapping[str, Dict[str, torch.Tensor]]:
        """``{adapter: {"<module>:<A|B>": loading (k × r)}}``."""
        return MappingProxyType({n: r.loadings for n, r in self.records.items()})

    @property
    def adapter_configs(self) -> Mapping[str, Dict[str, Any]]:
        """``{adapter: its adapter_config.json}``."""
        return MappingProxyType({n: r.config for n, r in self.records.items()})

    @property
    def all_classifier_heads(self) -> Mapping[str, Dict[str, torch.Tensor]]:
        """``{adapter: {key: tensor}}`` for the adapters that have non-LoRA tensors."""
        return MappingProxyType({n: r.heads for n, r in self.records.items() if r.heads})

    @property
    def adapter_sources(self) -> Mapping[str, str]:
        """``{adapter: the folder or Hub id it came from}``."""
        return MappingProxyType({n: r.source for n, r in self.records.items()})

    @property
    def delta_w_errors(self) -> Mapping[str, Dict[str, float]]:
        """Per-module ΔW relative errors measured at compression: ``{adapter: {module: error}}``."""
        return MappingProxyType({n: r.errors for n, r in self.records.items()})

    @property
    def lora_keys(self) -> Mapping[str, Dict[str, str]]:
        """The adapters' own factor keys where they differ from ``lora_key(module, side)``."""
        return MappingProxyType({n: r.lora_keys for n, r in self.records.items()})

    def set_source(self, adapter_name: str, source: str) -> None:
        """Record where an adapter came from, as the card and ``share_config.json`` show it.

        Useful when it was read from a path that means nothing elsewhere (a runner's checkout),
        e.g. to keep the path relative to the repository that holds it.

        Example:
            >>> share.set_source("billing", "adapters/billing")  # doctest: +SKIP
        """
        self._check(adapter_name)
        rec = self.records[adapter_name]
        rec.source = str(source)
        self.config.adapters[adapter_name] = rec.info()

    # ------------------------------------------------------------------ build
    @classmethod
    def from_adapters(
        cls,
        adapters: AdapterSources,
        num_components: Union[int, str] = 32,
        variance_threshold: float = 0.95,
        device: Optional[str] = None,
        layer_by_layer: bool = False,
        chunk_size: Optional[int] = None,
        on_error: str = "raise",
        *,
        dtype: str = "float32",
        budget_bytes: Optional[int] = None,
        strict: bool = False,
        progress: bool = True,
        token: Optional[str] = None,
        weighting: str = "delta_w",
        target_ratio: Optional[float] = None,
    ) -> "SHAREModel":
        """Compress PEFT LoRA adapters into shared bases.

        Args:
            adapters: folders or Hub ids (``user/repo``, ``user/repo@rev``, ``user/repo/sub``),
                or a dict ``{name: source}``.
            num_components: k per module and side, or ``"auto"`` (per module, from
                ``variance_threshold`` of the ΔW energy).  k ≥ N·r is lossless.
            variance_threshold: energy share to keep with ``"auto"``; also the
                projection threshold of :meth:`add_adapter`.
            device: ``"cuda"`` to run the math on a GPU; default CPU.
            layer_by_layer, chunk_size: accepted for 0.1.x compatibility; lorashare
                always streams one bounded chunk of modules at a time.
            on_error: ``"raise"``, or ``"skip"`` to log and drop unreadable adapters.
            dtype: storage of bases and loadings: ``float32``, ``float16``, ``bfloat16``, ``int8``
                (8-bit, a scale per block of 64) or ``nf4`` (4-bit NormalFloat); both quantized
                schemes are dequantized to float32 on load.
            budget_bytes: bytes of the bases' and loadings' files on disk (headers and scales
                included); k is then chosen per module by water-filling on the spectra
                (``num_components`` is ignored).
            target_ratio: the same, as a compression ratio: a budget of the adapters'
                LoRA bytes divided by ``target_ratio`` (e.g. 6 for 1/6 of the size).
            strict: refuse mixed ranks or mixed target modules.
            progress: show a progress bar.
            token: Hugging Face token for private Hub adapters.
            weighting: ``"delta_w"`` (default) fits each basis to the adapters' updates
                ΔW, each adapter normalised; ``"factors"`` is the plain PCA of the factors.

        Example:
            >>> share = SHAREModel.from_adapters({"a": "runs/a", "b": "acme/b-lora@v2"}, num_components="auto")  # doctest: +SKIP
        """
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={on_error!r}: expected 'raise' or 'skip'.")
        opts = CompressOptions(
            num_components=num_components,
            variance_threshold=variance_threshold,
            budget_bytes=budget_bytes,
            dtype=dtype,
            device=_device(device),
            progress=progress,
            weighting=weighting,
        )
        opts.validate()
        if target_ratio is not None:
            check_number("target_ratio", target_ratio, expected="a number > 0 (e.g. 6 for 1/6 of the size)")
        if layer_by_layer or chunk_size:
            logger.debug("layer_by_layer/chunk_size are accepted for compatibility; streaming is always on")
        hub_kwargs = {"token": token} if token else {}
        opened = open_adapters(adapters, on_error=on_error, **hub_kwargs)
        try:
            if target_ratio is not None:
                opts.budget_bytes = max(1, int(sum(_lora_bytes(a) for a in opened) / float(target_ratio)))
            given = len(adapters) if hasattr(adapters, "__len__") else len(opened)
            return cls._build(opened, opts, strict=strict, skipped=given - len(opened))
        finally:
            for a in opened:
                a.close()

    @classmethod
    def _build(cls, opened: List[Adapter], opts: CompressOptions, *, strict: bool = False, skipped: int = 0) -> "SHAREModel":
        if len(opened) < 2:
            raise AdapterError(
                f"need at least 2 adapters to share a basis, got {len(opened)}"
                f"{f' after skipping {skipped} bad one' + ('s' if skipped > 1 else '') if skipped else ''}. "
                "Add adapters, or keep a single adapter as it is.",
            )
        check_compatible(opened, strict=strict)
        logger.info("compressing %d adapters", len(opened))
        from concurrent.futures import ThreadPoolExecutor

        # Fingerprints (a full read of each file) overlap with the compression.
        with ThreadPoolExecutor(1) as pool:
            shas = pool.map(lambda a: a.sha256(), opened)
            results = compress(opened, opts)
            heads = {a.name: a.read_heads() for a in opened if a.head_keys}
            fingerprints = list(shas)
        model = cls._assemble(opened, results, heads, fingerprints, opts)
        model._warn_if_larger()
        return model

    @classmethod
    def _assemble(
        cls,
        opened: Sequence[Adapter],
        results: Sequence[GroupResult],
        heads: Dict[str, Dict[str, torch.Tensor]],
        fingerprints: Sequence[str],
        opts: CompressOptions,
    ) -> "SHAREModel":
        components: Dict[str, torch.Tensor] = {}
        loadings: Dict[str, Dict[str, torch.Tensor]] = {a.name: {} for a in opened}
        errors: Dict[str, Dict[str, float]] = {a.name: {} for a in opened}
        explained: Dict[str, float] = {}
        stored_components: Dict[str, Any] = {}
        stored_loadings: Dict[str, Dict[str, Any]] = {a.name: {} for a in opened}
        for res in results:
            p = res.plan
            for side in "AB":
                key = group_key(p.module, side)
                components[key] = res.basis[side]
                explained[key] = res.explained[side]
                if side in res.stored_basis:
                    stored_components[key] = (res.basis[side], res.stored_basis[side])
                for j, (idx, L) in enumerate(zip(p.members, res.loadings[side])):
                    loadings[opened[idx].name][key] = L
                    if side in res.stored_loadings:
                        stored_loadings[opened[idx].name][key] = (L, res.stored_loadings[side][j])
            for idx, e in zip(p.members, res.rel_error):
                errors[opened[idx].name][p.module] = e
        ref = opened[0]
        ranks = sorted({m.rank for a in opened for m in a.modules.values()})
        cfg = SHAREConfig(
            share_version=__version__,
            num_components=max(U.shape[1] for U in components.values()),
            component_selection="budget" if opts.budget_bytes else ("auto" if opts.num_components == "auto" else "fixed"),
            variance_threshold=float(opts.variance_threshold),
            base_model_name_or_path=ref.base_model or "",
            target_modules=sorted({m.rsplit(".", 1)[-1] for a in opened for m in a.modules}),
            lora_rank=ranks[-1],
            lora_alpha=ref.config.get("lora_alpha", 0),
            adapter_names=[a.name for a in opened],
            num_adapters=len(opened),
            layer_keys=sorted({res.plan.module for res in results}),
            lorashare_version=__version__,
            dtype=opts.dtype,
            budget_bytes=opts.budget_bytes,
            requested_components=opts.num_components,
            k_per_group={k: int(U.shape[1]) for k, U in components.items()},
        )
        model = cls(config=cfg, components=components, all_loadings={}, adapter_configs={})
        for a, sha in zip(opened, fingerprints):
            model.records[a.name] = _record(a, loadings[a.name], heads.get(a.name) or {}, errors[a.name], sha)
            model.records[a.name].stored = stored_loadings[a.name]
        model._stored_components = stored_components
        model._input_folders = [a.folder for a in opened]
        capped = sorted(group_key(r.plan.module, side) for r in results for side in r.capped)
        model._refresh_stats(explained, capped=capped)
        return model

    # --------------------------------------------------------------- disk I/O
    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, os.PathLike],
        *,
        revision: Optional[str] = None,
        token: Optional[str] = None,
        adapters: Optional[Iterable[str]] = None,
        verify: bool = True,
    ) -> "SHAREModel":
        """Load a SHARE checkpoint from a folder or a Hub repo id.

        Args:
            path: the folder ``save_pretrained`` wrote, or a Hub repo id.
            revision: Hub branch, tag or commit.
            token: Hub token for private repos.
            adapters: load only these adapters (from the Hub, only their files are downloaded).
            verify: check every file read against its sha256 in ``share_config.json``.

        Example:
            >>> share = SHAREModel.from_pretrained("acme/support-share", adapters=["billing"])  # doctest: +SKIP
        """
        path = os.path.expanduser(os.fspath(path))  # as open_adapter does: "~/ckpt" is never a Hub id
        jail = None
        if not os.path.isdir(path):
            from . import hub

            path, jail = hub.fetch_checkpoint(path, revision=revision, token=token, adapters=adapters)
        data = load_checkpoint(path, adapters=adapters, verify=verify, jail=jail)
        model = cls._from_data(data)
        model._loaded_from = path
        return model

    @classmethod
    def _from_data(cls, data: CheckpointData) -> "SHAREModel":
        model = cls(
            config=data.config,
            components=data.components,
            all_loadings=data.loadings,
            adapter_configs={n: dict(m.get("original_config", {})) for n, m in data.metas.items()},
            all_classifier_heads=data.heads,
            adapter_sources={n: m.get("original_adapter_path") or "" for n, m in data.metas.items()},
        )
        model._stored_components = {k: (data.components[k], st) for k, st in data.stored_components.items()}
        for n, m in data.metas.items():
            rec = model.records[n]
            rec.stored = {k: (data.loadings[n][k], st) for k, st in data.stored_loadings.get(n, {}).items()}
            rec.errors = dict(m.get("delta_w_error") or {})
            rec.lora_keys = _meta_lora_keys(n, m, data.loadings.get(n, {}))
        # A partial load keeps only the named adapters.
        model.config.adapter_names = [n for n in data.config.adapter_names if n in data.loadings]
        model.config.num_adapters = len(model.config.adapter_names)
        return model

    def _to_data(self) -> CheckpointData:
        metas = {}
        for n, rec in self.records.items():
            metas[n] = {
                "adapter_name": n,
                "original_config": rec.config,
                "original_adapter_path": rec.source,
                "revision": rec.revision,
                "sha256": rec.sha256,
                "delta_w_error": rec.errors,
            }
            if rec.lora_keys:  # only when some key is not PEFT's default, to keep metas small
                metas[n]["lora_keys"] = dict(sorted(rec.lora_keys.items()))
        used = {k for rec in self.records.values() for k in rec.loadings}
        components = {k: v for k, v in self.components.items() if k in used}
        return CheckpointData(
            self.config, components, dict(self.all_loadings), dict(self.all_classifier_heads), metas,
            stored_components=_still_stored(components, self._stored_components),
            stored_loadings={n: _still_stored(r.loadings, r.stored) for n, r in self.records.items()},
        )

    def save_pretrained(self, output_dir: Union[str, os.PathLike], *, card: bool = True, overwrite: bool = False) -> None:
        """Write the checkpoint (and its model card, README.md) atomically.

        ``output_dir`` may be new, empty, or a SHARE checkpoint (this one, to save edits in
        place).  Any other folder is refused unless ``overwrite=True``; a file, a symlink, ``.``,
        an ancestor of ``.`` or of the home folder, and an input (or its ancestor) never are.

        Example:
            >>> share.save_pretrained("share_ckpt")  # doctest: +SKIP
        """
        output_dir = os.fspath(output_dir)
        inputs = list(self._input_folders)
        if self._loaded_from and os.path.realpath(self._loaded_from) != os.path.realpath(output_dir):
            inputs.append(self._loaded_from)
        check_checkpoint_target(output_dir, inputs=inputs, overwrite=overwrite)
        text = None
        if card:
            text = render_card(self.config)
        save_checkpoint(output_dir, self._to_data(), card=text, inputs=inputs, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: Optional[str] = None,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        revision: Optional[str] = None,
        *,
        license: Optional[str] = None,
        parent_commit: Optional[str] = None,
    ):
        """Upload the checkpoint with its model card to a Hub repo, in one commit.

        With ``parent_commit``, push only if the branch is still at that commit (else a
        :class:`~lorashare.errors.HubError`, nothing pushed): for read-modify-write updates.

        Returns the ``CommitInfo`` (``.commit_url``, ``.oid``); ``str(info)`` is not the url,
        use ``info.repo_url`` for the repo.

        Example:
            >>> info = share.push_to_hub("acme/support-share", private=True)  # doctest: +SKIP
        """
        from . import hub

        hub.check_repo_id(repo_id)
        license = check_license(license) if license else self.config.card.license  # before anything changes
        self.config.card = dataclasses.replace(self.config.card, repo_id=repo_id, license=license)
        with tempfile.TemporaryDirectory(prefix="lorashare-push-") as tmp:
            folder = os.path.join(tmp, "ckpt")
            self.save_pretrained(folder)
            return hub.push_folder(
                folder, repo_id, private=private, token=token, commit_message=commit_message or
                f"Upload SHARE checkpoint ({self.config.num_adapters} adapters)", create_pr=create_pr, revision=revision,
                parent_commit=parent_commit,
            )

    # ----------------------------------------------------------- use adapters
    @property
    def adapter_names(self) -> List[str]:
        """Names of the adapters in this model."""
        return list(self.records)

    def _check(self, name: str) -> None:
        if name not in self.records:
            raise UnknownAdapterError(
                f"adapter {name!r} not found. Available: {self.adapter_names}.", adapter=name
            )

    def reconstruct(
        self, adapter_name: str, output_dir: Optional[Union[str, os.PathLike]] = None, *, overwrite: bool = False
    ) -> Dict[str, torch.Tensor]:
        """Rebuild one adapter as a PEFT state dict (LoRA factors + its heads).

        With ``output_dir``, also write a standard PEFT adapter folder that
        ``PeftModel.from_pretrained`` loads.  It may be new, empty, or an adapter lorashare
        rebuilt before; any other folder is refused unless ``overwrite=True``, and a file,
        ``.``, the checkpoint or an ancestor of it never is.

        Example:
            >>> sd = share.reconstruct("billing", output_dir="billing_adapter")  # doctest: +SKIP
        """
        self._check(adapter_name)
        out = self._state_dict(adapter_name)
        if output_dir is not None:
            inputs = self._input_folders + ([self._loaded_from] if self._loaded_from else [])
            write_peft_adapter(os.fspath(output_dir), out, self._peft_config(adapter_name), inputs=inputs,
                               overwrite=overwrite)
        return out

    def _state_dict(self, name: str, *, peft_keys: bool = False) -> Dict[str, torch.Tensor]:
        """The rebuilt factors and heads, under the adapter's own keys, or PEFT's saved form with ``peft_keys``."""
        rec = self.records[name]
        own = {} if peft_keys else rec.lora_keys
        out: Dict[str, torch.Tensor] = {}
        for key, L in rec.loadings.items():
            module, side = split_group_key(key)
            W = S.reconstruct_rows(self.components[key], L)  # (r, d)
            out[own.get(key) or lora_key(module, side)] = (W if side == "A" else W.T).contiguous()
        out.update(rec.heads)
        return out

    def _peft_config(self, name: str) -> Dict[str, Any]:
        cfg = dict(self.records[name].config)
        if not cfg:
            # Never invent one from checkpoint-wide values: a wrong lora_alpha or a lost
            # use_rslora rescales the adapter without a word.
            raise AdapterError(
                f"adapter {name!r} has no LoRA config (its adapter_config.json), so it cannot be rebuilt as a "
                "PEFT adapter. Give it in adapter_configs, or compress the adapter again from its folder.",
                adapter=name,
            )
        return cfg

    def apply(self, base_model: Any, adapter_name: str) -> Any:
        """Return a ``PeftModel`` of ``base_model`` with this adapter loaded (no temp folder).

        Example:
            >>> peft_model = share.apply(AutoModelForSequenceClassification.from_pretrained(base), "billing")  # doctest: +SKIP
        """
        return self.load_into(base_model, [adapter_name])

    def load_into(self, model: Any, names: Optional[Iterable[str]] = None) -> Any:
        """Register several reconstructed adapters on one model; switch with ``set_adapter(name)``.

        ``model`` is a base model (a ``PeftModel`` is created, first adapter active)
        or an existing ``PeftModel`` (adapters are added to it).

        Example:
            >>> pm = share.load_into(base_model, ["billing", "refunds"])  # doctest: +SKIP
            >>> pm.set_adapter("refunds")  # doctest: +SKIP
        """
        from peft import (
            PeftConfig,
            PeftModel,
            get_peft_model,
            set_peft_model_state_dict,
        )

        names = self.adapter_names if names is None else list(names)
        for n in names:
            self._check(n)
        self._check_fits(model, names)
        # PEFT cannot load a head-less adapter once another adapter has wrapped a head
        # (modules_to_save), so head-less adapters go in first; the active one is names[0].
        for n in sorted(names, key=lambda n: bool(self.records[n].heads)):
            cfg = PeftConfig.from_peft_type(**self._peft_config(n))
            cfg.inference_mode = True
            if isinstance(model, PeftModel):
                model.add_adapter(n, cfg)
            else:
                model = get_peft_model(model, cfg, adapter_name=n)
            # PEFT's saved key form, whatever keys the adapter had: set_peft_model_state_dict
            # needs the base_model.model. prefix and no adapter-name infix.
            result = set_peft_model_state_dict(model, self._state_dict(n, peft_keys=True), adapter_name=n)
            missing = [k for k in result.missing_keys if "lora_" in k and f".{n}." in k]
            if missing:
                raise AdapterError(f"adapter {n!r}: the model has no weights for {missing[0]}", adapter=n)
        if names:
            model.set_adapter(names[0])
        model.eval()
        return model

    def _check_fits(self, model: Any, names: Sequence[str]) -> None:
        """Refuse a base model whose modules do not have the adapters' shapes, before PEFT touches it."""
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        modules = dict(base.named_modules())
        this = getattr(base, "name_or_path", None) or type(base).__name__
        for n in names:
            trained = self.records[n].config.get("base_model_name_or_path") or self.config.base_model_name_or_path
            hint = f"The adapters were trained on {trained!r}; load that base model." if trained else \
                "Load the base model the adapters were trained on."
            for key in self.records[n].loadings:
                module, side = split_group_key(key)
                if side != "A" or group_key(module, "B") not in self.components:
                    continue
                want = (int(self.components[key].shape[0]), int(self.components[group_key(module, "B")].shape[0]))
                if module not in modules:
                    raise AdapterError(
                        f"adapter {n!r}: module {module} is not in the model ({this}). {hint}", adapter=n, layer=module)
                have = _features(modules[module])
                if have is not None and have != want:
                    raise AdapterError(
                        f"adapter {n!r}: module {module} expects {want[0]} → {want[1]} features (lora_A (r, {want[0]}), "
                        f"lora_B ({want[1]}, r)), but in the model ({this}) it maps {have[0]} → {have[1]}. {hint}",
                        adapter=n, layer=module,
                    )

    # ------------------------------------------------------------ statistics
    def _refresh_stats(self, explained: Optional[Dict[str, float]] = None, capped: Optional[List[str]] = None) -> None:
        cfg = self.config
        elem = lambda t: t.numel() * t.element_size()  # noqa: E731
        # What the files hold: codes and scales for quantized storage (bases are stored k × d)
        store = (lambda t, basis: stored_nbytes(cfg.dtype, *((t.shape[1], t.shape[0]) if basis else t.shape))) \
            if is_quantized(cfg.dtype) else (lambda t, basis: elem(t))
        shared = sum(store(U, True) for U in self.components.values())
        per_adapter = {n: sum(store(L, False) for L in r.loadings.values()) for n, r in self.records.items()}
        loadings = sum(per_adapter.values())
        original = sum(int(r.lora_bytes or 0) for r in self.records.values())
        heads = sum(elem(t) for r in self.records.values() for t in r.heads.values())
        errs = [e for r in self.records.values() for e in r.errors.values()]
        old = cfg.compression_stats or {}
        explained = explained if explained is not None else old.get("per_layer_explained_variance", {})
        ev = list(explained.values())
        params = lambda b: int(b // bytes_per_value(cfg.dtype))  # noqa: E731
        stats = {
            # 0.1.x keys (parameter counts)
            "original_total_params": original // 4 if original else 0,
            "compressed_total_params": params(shared + loadings),
            "shared_component_params": params(shared),
            "per_adapter_loading_params": params(loadings // max(1, len(per_adapter))),
            "mean_explained_variance": sum(ev) / len(ev) if ev else 0.0,
            "min_explained_variance": min(ev) if ev else 0.0,
            "per_layer_explained_variance": explained,
            # v1: bytes, both ratios with their meaning
            "original_lora_bytes": original,
            "shared_bytes": shared,
            "loadings_bytes": loadings,
            "heads_bytes": heads,
            "compressed_bytes": shared + loadings,
            "compression_ratio": original / (shared + loadings) if shared + loadings else 0.0,
            "compression_ratio_excluding_basis": original / loadings if loadings else 0.0,
            "delta_w_rel_error_mean": sum(errs) / len(errs) if errs else None,
            "delta_w_rel_error_max": max(errs) if errs else None,
            "largest_saving_k": self._largest_saving_k() if original else None,
            # module sides whose k auto/budget stopped at the break-even (a record of the compression run)
            "capped_groups": list(capped) if capped is not None else list(old.get("capped_groups", [])),
        }
        cfg.compression_stats = stats
        cfg.adapters = {n: r.info() for n, r in self.records.items()}
        cfg.num_adapters = len(self.records)
        cfg.adapter_names = self.adapter_names
        cfg.k_per_group = {k: int(U.shape[1]) for k, U in self.components.items()}

    def _warn_if_larger(self) -> None:
        """Say so when the bases cost more than they save (k too large for so few adapters)."""
        st = self.config.compression_stats
        if not st.get("original_lora_bytes") or st.get("compression_ratio", 1.0) >= 1.0:
            return
        k = st.get("largest_saving_k") or 0
        fix = (f"use num_components={k} or less (CLI: -k {k}), or compress more adapters together" if k else
               "no k saves space for so few adapters: compress more adapters together, or keep them as they are")
        logger.warning(
            "the checkpoint's bases and loadings (%d bytes) are larger than the adapters' LoRA factors (%d bytes): "
            "the shared bases cost more than they save; %s.", st["compressed_bytes"], st["original_lora_bytes"], fix,
        )

    def _largest_saving_k(self) -> int:
        """The largest k per module and side at which every module's bases + loadings are smaller than its factors.

        Per module and side, a basis of k columns costs ``k·(d + n)`` values against the adapters'
        ``n·d`` (n = the sum of their ranks), each value at its own byte size; 0 if no k saves.
        """
        storage = bytes_per_value(self.config.dtype)
        elem: Dict[str, float] = {}  # bytes per value of each adapter's original factors
        for n, r in self.records.items():
            values = sum(int(L.shape[1]) * int(self.components[k].shape[0]) for k, L in r.loadings.items() if k in self.components)
            lora_bytes = int(r.lora_bytes or 0)
            elem[n] = lora_bytes / values if lora_bytes and values else 4.0
        best: Optional[int] = None
        for key, U in self.components.items():
            d = int(U.shape[0])
            ranks = [(n, int(r.loadings[key].shape[1])) for n, r in self.records.items() if key in r.loadings]
            if not ranks:
                continue
            original = sum(r * d * elem[n] for n, r in ranks)
            width = (d + sum(r for _, r in ranks)) * storage
            k = S.largest_saving_k(original, width)
            best = k if best is None else min(best, k)
        return best or 0

    def summary(self) -> Dict[str, Any]:
        """Print and return the compression statistics.

        ``compression_ratio`` counts the shared bases (what you store and ship);
        ``compression_ratio_excluding_basis`` is the marginal cost of one more
        adapter and is *not* the compression ratio.
        """
        cfg, st = self.config, self.config.compression_stats
        rule = "=" * 60
        lines = [
            rule,
            "  SHARE Compression Summary",  # lorashare 0.1.x's heading, which scripts match on
            rule,
            f"  base model          {cfg.base_model_name_or_path or '?'}",
            f"  adapters            {cfg.num_adapters}: {', '.join(cfg.adapter_names)}",
            f"  modules             {len(cfg.layer_keys)} ({', '.join(cfg.target_modules)})",
            f"  k per module/side   {k_range(cfg.k_per_group, cfg.num_components)} ({cfg.component_selection}, {cfg.dtype})",
        ]
        if st.get("original_lora_bytes"):
            lines += [
                f"  original LoRA       {size(st['original_lora_bytes'])}",
                f"  compressed          {size(st['compressed_bytes'])} = bases {size(st['shared_bytes'])} + loadings {size(st['loadings_bytes'])}",
                f"  compression ratio   {st['compression_ratio']:.2f}x (bases counted)",
                f"  excluding bases     {st['compression_ratio_excluding_basis']:.2f}x (marginal cost per adapter, not the ratio)",
            ]
            if st["compression_ratio"] < 1:
                k = st.get("largest_saving_k")
                lines.append("  note                larger than the adapters: the bases cost more than they save"
                             + (f"; k ≤ {k} would save space" if k else "; compress more adapters together"))
        if st.get("capped_groups"):
            lines.append(f"  capped at break-even {len(st['capped_groups'])} module sides (a larger k would cost more "
                         "than the factors it replaces)")
        if st.get("delta_w_rel_error_mean") is not None:
            lines.append(
                f"  ΔW relative error   mean {st['delta_w_rel_error_mean']:.4f}, max {st['delta_w_rel_error_max']:.4f}"
            )
        if st.get("per_layer_explained_variance"):
            lines.append(
                f"  explained energy    mean {st['mean_explained_variance']:.4f}, min {st['min_explained_variance']:.4f}"
            )
        lines.append(rule)
        print("\n".join(lines))
        return dict(st)

    def reconstruction_error(
        self,
        adapter_name: str,
        original_weights: Optional[Dict[str, torch.Tensor]] = None,
        original_path: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Relative error of ΔW = s·B·A per module, against the original adapter.

        Returns ``{"per_layer": {module: error}, "mean": …, "max": …}``.  With
        neither ``original_weights`` nor ``original_path``, returns the errors
        measured at compression time.

        Example:
            >>> share.reconstruction_error("billing", original_path="runs/billing")["max"]  # doctest: +SKIP
            0.031
        """
        self._check(adapter_name)
        if original_weights is None and original_path is None:
            per = dict(self.records[adapter_name].errors)
        else:
            if original_weights is None:
                a = open_adapter(original_path, name=adapter_name)
                try:
                    original_weights = {}
                    for m in a.modules:
                        original_weights[lora_key(m, "A")] = a.read_factor(m, "A")
                        original_weights[lora_key(m, "B")] = a.read_factor(m, "B")
                finally:
                    a.close()
            per = _delta_w_errors(original_weights, self.reconstruct(adapter_name))
        vals = list(per.values())
        return {"per_layer": per, "mean": sum(vals) / len(vals) if vals else 0.0, "max": max(vals) if vals else 0.0}

    # -------------------------------------------------------------- editing
    def add_adapter(
        self,
        adapter: str,
        name: Optional[str] = None,
        variance_threshold: Optional[float] = None,
        device: Optional[str] = None,
        force_recompute: bool = False,
        *,
        token: Optional[str] = None,
        originals: Optional[Mapping[str, str]] = None,
    ) -> Dict[str, Any]:
        """Add an adapter: project it onto the bases if they explain it well enough, else recompute.

        The new adapter is projected when, in every module, the bases keep at least
        ``variance_threshold`` of its ΔW energy.  Otherwise every adapter is
        recompressed: from its original (``originals[name]``, a folder or Hub id, else its
        recorded source) when that still has the recorded fingerprint, else from its
        reconstruction.

        Returns ``{"method": "projection" | "recompute", "adapter_name", "min_explained_variance",
        "mean_explained_variance", "reason"}``.

        Example:
            >>> share.add_adapter("runs/legal")["method"]  # doctest: +SKIP
            'projection'
        """
        threshold = self.config.variance_threshold if variance_threshold is None else check_number(
            "variance_threshold", variance_threshold, low=0.0, high=1.0, low_open=False, expected="a number in [0, 1]")
        device = _device(device)  # a bad device fails now, not after the projection test
        new = open_adapter(adapter, name, **({"token": token} if token else {}))
        try:
            if new.name in self.records:
                raise DuplicateAdapterError(
                    f"adapter {new.name!r} already exists. Pass name=... to add it under another name, "
                    "or remove_adapter() it first.",
                    adapter=new.name,
                )
            expl = self._explained(new)
            lo = min(expl.values()) if expl else 0.0
            mean = sum(expl.values()) / len(expl) if expl else 0.0
            uncovered = [m for m in new.modules if group_key(m, "A") not in self.components]
            if force_recompute:
                reason = "forced"
            elif uncovered:
                reason = f"module {uncovered[0]} has no shared basis yet"
            elif lo < threshold:
                reason = f"bases keep only {lo:.1%} of its ΔW energy (< {threshold:.1%})"
            else:
                self._project_in(new)
                return {"method": "projection", "adapter_name": new.name, "min_explained_variance": lo,
                        "mean_explained_variance": mean, "reason": f"bases keep {lo:.1%} of its ΔW energy"}
        finally:
            new.close()
        self._recompute(extra=new, device=device, originals=originals, token=token)
        return {"method": "recompute", "adapter_name": new.name, "min_explained_variance": lo,
                "mean_explained_variance": mean, "reason": reason}

    def _explained(self, a: Adapter) -> Dict[str, float]:
        """Share of each module's ΔW energy that the current bases keep."""
        out = {}
        for m in a.modules:
            ka, kb = group_key(m, "A"), group_key(m, "B")
            if ka not in self.components:
                continue
            A, B = a.read_factor(m, "A").float(), a.read_factor(m, "B").float()
            UA, UB = self.components[ka].float(), self.components[kb].float()
            if UA.shape[0] != A.shape[1] or UB.shape[0] != B.shape[0]:
                raise AdapterError(
                    f"adapter {a.name!r}: {m} has shape {tuple(B.shape)}·{tuple(A.shape)}, but the shared bases "
                    f"are for {UB.shape[0]}×{UA.shape[0]}. Is it for the same base model?",
                    adapter=a.name,
                    layer=m,
                )
            err, orig = S.delta_w_error(A, B, (UA @ (UA.T @ A.T)).T, UB @ (UB.T @ B))
            out[m] = 1.0 if float(orig) == 0 else max(0.0, 1.0 - float(err) / float(orig))
        return out

    def _project_in(self, a: Adapter) -> None:
        check_compatible([self._ref_adapter_stub(), a]) if self.config.base_model_name_or_path else None
        dtype = DTYPES.get(self.config.dtype, torch.float32)
        loads, errs, stored = {}, {}, {}
        for m in a.modules:
            A, B = a.read_factor(m, "A").float(), a.read_factor(m, "B").float()
            ka, kb = group_key(m, "A"), group_key(m, "B")
            UA, UB = self.components[ka].float(), self.components[kb].float()
            LA, LB = UA.T @ A.T, UB.T @ B
            if is_quantized(self.config.dtype):
                sa, sb = quantize(LA, self.config.dtype), quantize(LB, self.config.dtype)
                LA, LB = sa.dequantize(), sb.dequantize()
                stored[ka], stored[kb] = (LA, sa), (LB, sb)
            else:
                LA, LB = LA.to(dtype), LB.to(dtype)
            check_storable(m, self.config.dtype, [(a.name, LA), (a.name, LB)])
            loads[ka], loads[kb] = LA, LB
            err, orig = S.delta_w_error(A, B, S.reconstruct_rows(UA, LA), S.reconstruct_rows(UB, LB).T)
            errs[m] = 0.0 if float(orig) == 0 else float((err / orig).sqrt())
        self.records[a.name] = _record(a, loads, a.read_heads() if a.head_keys else {}, errs, a.sha256())
        self.records[a.name].stored = stored
        self._input_folders.append(a.folder)
        self._refresh_stats()

    def _ref_adapter_stub(self) -> Adapter:
        return Adapter(name=self.adapter_names[0], source="", folder="", config={"base_model_name_or_path": self.config.base_model_name_or_path}, modules={}, head_keys=[])

    def _recompute(self, extra: Optional[Adapter] = None, device: Optional[str] = None, *,
                   originals: Optional[Mapping[str, str]] = None, token: Optional[str] = None) -> None:
        """Recompress every adapter (plus ``extra``) from the best available copy of its weights."""
        opts = CompressOptions(
            num_components=self.config.requested_components or (
                "auto" if self.config.component_selection == "auto" else self.config.num_components),
            variance_threshold=self.config.variance_threshold,
            budget_bytes=self.config.budget_bytes if self.config.component_selection == "budget" else None,
            dtype=self.config.dtype,
            device=_device(device),
        )
        with tempfile.TemporaryDirectory(prefix="lorashare-recompute-") as tmp:
            opened: List[Adapter] = []
            try:
                for n in self.adapter_names:
                    opened.append(self._best_copy(n, tmp, (originals or {}).get(n), token))
                if extra is not None:
                    opened.append(open_adapter(extra.source, extra.name) if os.path.isdir(extra.folder) else extra)
                rebuilt = type(self)._build(opened, opts)
            finally:
                for a in opened:
                    a.close()
        # A record rebuilt from a reconstructed copy keeps where the original came from.
        for n, old in self.records.items():
            new = rebuilt.records[n]
            new.source, new.revision, new.sha256, new.lora_bytes = old.source, old.revision, old.sha256, old.lora_bytes
        rebuilt.config.card = self.config.card
        self.config, self.components, self.records = rebuilt.config, rebuilt.components, rebuilt.records
        self._stored_components = rebuilt._stored_components
        if extra is not None:
            self._input_folders.append(extra.folder)
        self._refresh_stats()

    def _best_copy(self, name: str, tmp: str, original: Optional[str] = None, token: Optional[str] = None) -> Adapter:
        rec = self.records[name]
        for src in ([original] if original else []) + ([rec.source] if os.path.isdir(rec.source) else []):
            try:
                a = open_adapter(src, name, **({"token": token} if token else {}))
                if rec.sha256 and a.sha256() == rec.sha256:
                    return a
                a.close()
            except LoraShareError:
                pass
        logger.info("adapter %r: original not available or changed; recompressing from its reconstruction", name)
        folder = os.path.join(tmp, name)
        self.reconstruct(name, output_dir=folder)
        return open_adapter(folder, name)

    def remove_adapter(self, adapter_name: str) -> None:
        """Drop an adapter; the others are untouched (their loadings and the bases stay as they are).

        The last adapter cannot be removed (as in lorashare 0.1.x): a checkpoint holds at least one.
        """
        self._check(adapter_name)
        if len(self.records) <= 1:
            raise CheckpointError(
                f"cannot remove {adapter_name!r}: it is the last adapter, and a SHARE checkpoint holds at least one. "
                "Add another adapter first, or delete the checkpoint itself if you no longer need it.",
                adapter=adapter_name,
            )
        del self.records[adapter_name]
        self._refresh_stats()

    def __repr__(self) -> str:
        return f"SHAREModel(adapters={self.adapter_names}, k={self.config.num_components}, dtype={self.config.dtype})"

    def serve(self, base_model: Any, *, adapters: Optional[Iterable[str]] = None, dtype: Any = None) -> Any:
        """Serve the adapters (all, or ``adapters``) on ``base_model``, each row of a batch with its own.

        Returns a :class:`lorashare.serve.ServedModel`: the base model's API plus
        ``adapter_names=[...]`` (one per row, ``"__base__"`` for none) in ``forward`` and
        ``generate``, ``set_adapter`` and ``refresh``.  It adds only the shared bases, the
        loadings and the heads to the base model, which is changed in place (``unload()``
        restores it).  Adapters added to or removed from this ``SHAREModel`` later are picked
        up on the next call; the served model does not keep it alive.

        Example:
            >>> model = share.serve(base_model)  # doctest: +SKIP
            >>> model(**batch, adapter_names=["billing", "refunds", "__base__"]).logits  # doctest: +SKIP
        """
        from .serve import serve

        return serve(self, base_model, adapters=None if adapters is None else list(adapters), dtype=dtype)


_DEVICES = "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"


def _device(device: Any) -> Optional[str]:
    """The device to compute on (``None`` = the CPU); a GPU that is not there falls back to the CPU with a warning."""
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "cpu":
        return None
    if not isinstance(device, str):
        raise ConfigError(f"device={device!r}: expected a string, one of {_DEVICES}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={device!r}: expected {_DEVICES}.")
    if dev.type == "cpu":
        return None
    backend = torch.cuda if dev.type == "cuda" else torch.backends.mps
    if not backend.is_available():
        logger.warning("device=%r requested but %s is not available; using the CPU", device, dev.type.upper())
        return None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0."
        )
    return device


def _record(a: Adapter, loadings: Dict[str, torch.Tensor], heads: Dict[str, torch.Tensor],
            errors: Dict[str, float], sha256: str) -> AdapterRecord:
    """The record of a freshly compressed (or projected) adapter."""
    return AdapterRecord(
        loadings=loadings, config=dict(a.config), heads=heads, source=a.source, revision=a.revision, sha256=sha256,
        lora_bytes=_lora_bytes(a), errors=errors, lora_keys=_own_keys(a),
    )


def _still_stored(floats: Mapping[str, torch.Tensor], pairs: Mapping[str, Any]) -> Dict[str, Stored]:
    """The stored forms whose float tensor is still the one in ``floats`` (a replaced one is quantized anew)."""
    return {k: st for k, (t, st) in pairs.items() if floats.get(k) is t}


def _lora_bytes(a: Adapter) -> int:
    tf = a._tf()
    return sum(tf.infos[k].nbytes for m in a.modules.values() for k in (m.a_key, m.b_key))


def _features(module: Any) -> Optional[tuple]:
    """``(in, out)`` features of a linear-like module (PEFT-wrapped or not), ``None`` if not linear-like."""
    getter = getattr(module, "get_base_layer", None)  # a PEFT LoRA layer wraps the original
    m = getter() if callable(getter) else module
    if isinstance(m, torch.nn.Linear):
        return int(m.in_features), int(m.out_features)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:  # GPT-2's: weight is (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None


def _own_keys(a: Adapter) -> Dict[str, str]:
    """``{"<module>:<A|B>": key}`` for the factors whose key is not PEFT's default (``lora_key``)."""
    out = {}
    for m in a.modules.values():
        for side, key in (("A", m.a_key), ("B", m.b_key)):
            if key != lora_key(m.module, side):
                out[group_key(m.module, side)] = key
    return out


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


def _delta_w_errors(original: Mapping[str, torch.Tensor], rebuilt: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """Per-module ‖ΔW − ΔŴ‖/‖ΔW‖ for two PEFT state dicts (the scale cancels)."""
    def factors(sd: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, torch.Tensor]]:
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for k, v in sd.items():
            p = parse_lora_key(k)
            if p:
                out.setdefault(p[0], {})[p[1]] = v
        return out

    fo, fr = factors(original), factors(rebuilt)
    per = {}
    for m, f in fo.items():
        if m not in fr or set(f) != {"A", "B"}:
            continue
        err, orig = S.delta_w_error(f["A"], f["B"], fr[m]["A"], fr[m]["B"])
        per[m] = 0.0 if float(orig) == 0 else float((err / orig).sqrt())
    return per
