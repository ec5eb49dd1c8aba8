"""``SHAREModel``: the public facade over one published :class:`~lorashare.codec.state.SHAREState`.

Source-compatible with lorashare 0.1.x (same methods, arguments and attributes).  The model
holds one immutable state; every edit builds the next state (:mod:`lorashare.codec.edit`) and
publishes it in one step, so readers (a served call, a save) always see one whole revision.
Building is :mod:`lorashare.codec.build`, statistics :mod:`lorashare.codec.stats`, PEFT loading
:mod:`lorashare.serving.peftload`, the format on disk :mod:`lorashare.format.checkpoint`.
"""

from __future__ import annotations

import logging
import os
import threading
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from . import hub
from .codec import edit
from .codec.build import build_from_sources
from .codec.compress import resolve_device
from .codec.persist import push_state, save_state
from .codec.state import (
    AdapterRecord,
    SHAREState,
    from_parts,
    load_state,
    peft_config,
    rebuild,
)
from .codec.stats import config_of, reconstruction_error, summary_text
from .errors import ConfigError
from .format.checkpoint import SHAREConfig
from .format.spec import CompressionSpec, check_number, resolve_spec
from .hub.card import check_card_options, check_license, check_publishable_base
from .peft.adapters import open_adapter, write_peft_adapter
from .serving.export import check_rebuild_target
from .serving.peftload import load_into

if TYPE_CHECKING:
    from .serving.serve import ServedModel

logger = logging.getLogger(__name__)

__all__ = ["SHAREModel", "AdapterRecord"]

AdapterSources = Union[Sequence[str], Mapping[str, str]]


class _PerAdapter:
    """A read-only ``{adapter: record.<field>}`` view of the current state (0.1.x's attributes)."""

    def __init__(self, field: str, doc: str, *, only_set: bool = False) -> None:
        self.field, self.only_set, self.__doc__ = field, only_set, doc

    def __get__(self, model: Optional["SHAREModel"], owner: type) -> Any:
        if model is None:
            return self
        values = ((n, getattr(r, self.field)) for n, r in model.state.records.items())
        return MappingProxyType({n: v for n, v in values if v or not self.only_set})


class SHAREModel:
    """Many LoRA adapters of one base model, stored as shared bases plus tiny loadings.

    Example:
        >>> share = SHAREModel.from_adapters(["runs/billing", "runs/refunds"], num_components=16)  # doctest: +SKIP
        >>> share.save_pretrained("share_ckpt")  # doctest: +SKIP
        >>> state_dict = SHAREModel.from_pretrained("share_ckpt").reconstruct("billing")  # doctest: +SKIP

    0.1.x's attributes (``config``, ``components``, ``all_loadings``, ``adapter_configs``, ``all_classifier_heads``,
    ``adapter_sources``) are read-only views of :attr:`state`, the one immutable value that every edit replaces.
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
        self._publish(from_parts(config, components, all_loadings, adapter_configs, all_classifier_heads,
                                 adapter_sources))

    def _publish(self, state: SHAREState, *, progress: Optional[bool] = None) -> None:
        """Make ``state`` the current one (one attribute write: readers see the old or the new, never a mix)."""
        if not hasattr(self, "_lock"):
            self._lock = threading.RLock()  # edits read-modify-write the state one at a time
            self._progress = True
        if progress is not None:
            self._progress = progress
        self._state = state

    @classmethod
    def _of(cls, state: SHAREState, *, progress: bool = True) -> "SHAREModel":
        model = cls.__new__(cls)
        model._publish(state, progress=progress)
        return model

    @property
    def state(self) -> SHAREState:
        """The current state: spec, bases, records and revision, as one immutable value."""
        return self._state

    @property
    def spec(self) -> CompressionSpec:
        """How the bases were (and will be, on a recompute) compressed."""
        return self._state.spec

    @property
    def config(self) -> SHAREConfig:
        """``share_config.json``'s view of the current state."""
        return config_of(self._state)

    @property
    def records(self) -> Mapping[str, AdapterRecord]:
        """``{adapter: AdapterRecord}``, in order."""
        return self._state.records

    @property
    def components(self) -> Mapping[str, torch.Tensor]:
        """``{"<module>:<A|B>": basis (d × k)}``."""
        return self._state.components

    all_loadings = _PerAdapter("loadings", "``{adapter: {\"<module>:<A|B>\": loading (k × r)}}``.")
    adapter_configs = _PerAdapter("config", "``{adapter: its adapter_config.json}``.")
    all_classifier_heads = _PerAdapter("heads", "``{adapter: {key: tensor}}`` for the adapters that have non-LoRA tensors.",
                                       only_set=True)
    adapter_sources = _PerAdapter("source", "``{adapter: the folder or Hub id it came from}``.")
    delta_w_errors = _PerAdapter("errors", "Per-module ΔW relative errors measured at compression: "
                                           "``{adapter: {module: error}}``.")
    lora_keys = _PerAdapter("lora_keys", "The adapters' own factor keys where they differ from PEFT's default.")

    @property
    def adapter_names(self) -> List[str]:
        """Names of the adapters in this model."""
        return list(self._state.names)

    def __repr__(self) -> str:
        cfg = self.config
        return f"SHAREModel(adapters={self.adapter_names}, k={cfg.num_components}, dtype={cfg.dtype})"

    @classmethod
    def from_adapters(
        cls, adapters: AdapterSources, num_components: Union[int, str] = 32, variance_threshold: float = 0.95,
        device: Optional[str] = None, layer_by_layer: bool = False, chunk_size: Optional[int] = None,
        on_error: str = "raise", *, dtype: str = "float32", budget_bytes: Optional[int] = None, strict: bool = False,
        progress: bool = True, token: Optional[str] = None, weighting: str = "delta_w",
        target_ratio: Optional[float] = None, spec: Optional[CompressionSpec] = None,
        hub_timeout: Optional[float] = None, base_model: Optional[str] = None,
    ) -> "SHAREModel":
        """Compress PEFT LoRA adapters into shared bases.

        Args:
            adapters: folders or Hub ids (``user/repo``, ``user/repo@rev``, ``user/repo/sub``), or a dict ``{name:
                source}``.
            num_components: k per module and side, or ``"auto"`` (per module, from ``variance_threshold`` of the ΔW
                energy).  k ≥ N·r is lossless.
            variance_threshold: energy share to keep with ``"auto"``; also the projection threshold of
                :meth:`add_adapter`.
            device: ``"cuda"`` to run the math on a GPU; default CPU.
            layer_by_layer, chunk_size: accepted for 0.1.x compatibility; lorashare always streams one bounded chunk
                of modules at a time.
            on_error: ``"raise"``, or ``"skip"`` to log and drop unreadable adapters.
            dtype: storage of bases and loadings: ``float32``, ``float16``, ``bfloat16``, ``int8`` (8-bit, a scale per
                block of 64) or ``nf4`` (4-bit NormalFloat); both quantized schemes are dequantized to float32 on
                load.
            budget_bytes: bytes of the bases' and loadings' files on disk (headers and scales included); k is then
                chosen per module by water-filling on the spectra (``num_components`` is ignored).
            target_ratio: the same, as a compression ratio: a budget of the adapters' LoRA bytes divided by
                ``target_ratio`` (e.g. 6 for 1/6 of the size).
            strict: refuse mixed ranks or mixed target modules.
            progress: show a progress bar.
            token: Hugging Face token for private Hub adapters.
            weighting: ``"delta_w"`` (default) fits each basis to the adapters' updates ΔW, each adapter normalised;
                ``"factors"`` is the plain PCA of the factors.
            spec: all compression settings as one :class:`~lorashare.CompressionSpec` (instead of the keywords above,
                which must then keep their defaults).  The settings are kept whole (:attr:`spec`, saved in
                ``share_config.json``): a later recompute compresses the same way.
            hub_timeout: seconds each Hub download may take in all, retries included (default
                ``LORASHARE_HUB_TIMEOUT``, else 60).
            base_model: the Hub id of the base model, when the adapters' configs name a local folder they were trained
                from (the model card links it; a local path is not pushed).

        Example:
            >>> share = SHAREModel.from_adapters({"a": "runs/a", "b": "acme/b-lora@v2"}, num_components="auto")  # doctest: +SKIP
        """
        if on_error not in ("raise", "skip"):
            raise ConfigError(f"on_error={on_error!r}: expected 'raise' or 'skip'.")
        spec = resolve_spec(spec, CompressionSpec(
            num_components=num_components, variance_threshold=variance_threshold, budget_bytes=budget_bytes,
            target_ratio=target_ratio, dtype=dtype, weighting=weighting, strict=strict))
        device = resolve_device(device)
        if layer_by_layer or chunk_size:
            logger.debug("layer_by_layer/chunk_size are accepted for compatibility; streaming is always on")
        state = build_from_sources(adapters, spec, on_error=on_error, device=device, progress=progress,
                                   base_model=base_model, **_hub_kwargs(token, hub_timeout))
        return cls._of(state, progress=progress)

    @classmethod
    def from_pretrained(
        cls, path: Union[str, os.PathLike], *, revision: Optional[str] = None, token: Optional[str] = None,
        adapters: Optional[Iterable[str]] = None, verify: bool = True, hub_timeout: Optional[float] = None,
    ) -> "SHAREModel":
        """Load a SHARE checkpoint from a folder or a Hub repo id.

        Args:
            path: the folder ``save_pretrained`` wrote, or a Hub repo id.
            revision: Hub branch, tag or commit.
            token: Hub token for private repos.
            adapters: load only these adapters (from the Hub, only their files are downloaded).
            verify: check every file read against its sha256 in ``share_config.json``.
            hub_timeout: seconds the whole download may take, retries included (default ``LORASHARE_HUB_TIMEOUT``,
                else 60).

        Example:
            >>> share = SHAREModel.from_pretrained("acme/support-share", adapters=["billing"])  # doctest: +SKIP
        """
        return cls._of(load_state(path, revision=revision, token=token, adapters=adapters, verify=verify,
                                  timeout=hub_timeout))

    def save_pretrained(self, output_dir: Union[str, os.PathLike], *, card: bool = True, overwrite: bool = False) -> None:
        """Write the checkpoint (and its model card, README.md) atomically.

        ``output_dir`` may be new, empty, or a SHARE checkpoint (this one, to save edits in place: the adapters a
        partial load left out are kept, and a :class:`~lorashare.errors.ConflictError` writes nothing if it changed
        since it was read).  Any other folder is refused unless ``overwrite=True``; a file, a symlink, ``.``, an
        ancestor of ``.`` or of the home folder, and an input (or its ancestor) never are.

        Example:
            >>> share.save_pretrained("share_ckpt")  # doctest: +SKIP
        """
        with self._lock:  # one revision from the first file to the last
            self._publish(save_state(self._state, os.fspath(output_dir), card=card, overwrite=overwrite))

    def push_to_hub(
        self, repo_id: str, private: bool = False, token: Optional[str] = None, commit_message: Optional[str] = None,
        create_pr: bool = False, revision: Optional[str] = None, *, license: Optional[str] = None,
        parent_commit: Optional[str] = None, hub_timeout: Optional[float] = None,
    ):
        """Upload the checkpoint with its model card to a Hub repo, in one commit.

        With ``parent_commit``, push only if the branch is still at that commit (else a ``HubConflictError``, nothing
        pushed).  Back to the repo it was loaded from, it keeps what a partial load left out, and if loaded from
        ``main``'s head, sets ``parent_commit`` to it.  Returns the ``CommitInfo`` (``.commit_url``, ``.oid``).

        Example:
            >>> info = share.push_to_hub("acme/support-share", private=True)  # doctest: +SKIP
        """
        hub.check_repo_id(repo_id)
        check_publishable_base(self._state.base_model)
        license = check_license(license) if license else self._state.card.license  # before anything changes
        self.set_card(repo_id=repo_id, license=license)
        with self._lock:
            state, info = push_state(self._state, repo_id, private=private, token=token, create_pr=create_pr,
                                     commit_message=commit_message, revision=revision, parent_commit=parent_commit,
                                     timeout=hub_timeout)
            self._publish(state)
        return info

    def reconstruct(
        self, adapter_name: str, output_dir: Optional[Union[str, os.PathLike]] = None, *, overwrite: bool = False
    ) -> Dict[str, torch.Tensor]:
        """Rebuild one adapter as a PEFT state dict (LoRA factors + its heads).

        With ``output_dir``, also write a standard PEFT adapter folder that ``PeftModel.from_pretrained`` loads.  It
        may be new, empty, or an adapter lorashare rebuilt before; any other folder is refused unless
        ``overwrite=True``, and a file, ``.``, the checkpoint or an ancestor of it never is.

        Example:
            >>> sd = share.reconstruct("billing", output_dir="billing_adapter")  # doctest: +SKIP
        """
        state = self._state
        edit.check_known(state, adapter_name)
        out = rebuild(state, adapter_name)
        if output_dir is not None:
            check_rebuild_target(state, os.fspath(output_dir), overwrite=overwrite)
            write_peft_adapter(os.fspath(output_dir), out, peft_config(state.records[adapter_name], adapter_name),
                               inputs=list(state.inputs), overwrite=overwrite)
        return out

    def apply(self, base_model: Any, adapter_name: str) -> Any:
        """Return a ``PeftModel`` of ``base_model`` with this adapter loaded (no temp folder).

        Example:
            >>> peft_model = share.apply(AutoModelForSequenceClassification.from_pretrained(base), "billing")  # doctest: +SKIP
        """
        return self.load_into(base_model, [adapter_name])

    def load_into(self, model: Any, names: Optional[Iterable[str]] = None) -> Any:
        """Register several reconstructed adapters on ``model``, a base model (a ``PeftModel`` is created, the first
        adapter active) or a ``PeftModel`` (they are added to it); switch with ``set_adapter(name)``.  A name with
        a dot is registered with underscores instead (``billing-v1.2`` as ``billing-v1_2``): PEFT's names cannot hold one.

        Example:
            >>> pm = share.load_into(base_model, ["billing", "refunds"])  # doctest: +SKIP
            >>> pm.set_adapter("refunds")  # doctest: +SKIP
        """
        state = self._state
        names = list(state.names) if names is None else list(names)
        for n in names:
            edit.check_known(state, n)
        return load_into(state, model, names)

    def serve(self, base_model: Any, *, adapters: Optional[Iterable[str]] = None, dtype: Any = None) -> "ServedModel":
        """Serve the adapters (all, or ``adapters``) on ``base_model``, each row of a batch with its own.

        Returns a :class:`lorashare.serving.serve.ServedModel`: the base model's API plus ``adapter_names=[...]`` (one
        per row, ``"__base__"`` for none) in ``forward`` and ``generate``.  ``base_model`` is changed in place
        (``unload()`` restores it); each call serves one revision of this model, from its first layer to its last.

        Example:
            >>> model = share.serve(base_model)  # doctest: +SKIP
            >>> model(**batch, adapter_names=["billing", "refunds", "__base__"]).logits  # doctest: +SKIP
        """
        from .serving.serve import serve

        return serve(self, base_model, adapters=None if adapters is None else list(adapters), dtype=dtype)

    def subspace_model(self, base_model: Any, name: str, **options: Any) -> Any:
        """A ``PeftModel`` of ``base_model`` with a new adapter ``name`` that trains only its loadings over the frozen
        bases; train it as any LoRA (``transformers.Trainer``), then :meth:`add_trained`.  Options: those of
        :func:`lorashare.training.subspace_model`.

        Example:
            >>> model = share.subspace_model(base_model, "refunds_v2", modules_to_save=["classifier"])  # doctest: +SKIP
        """
        from .training import subspace_model

        return subspace_model(self._state, base_model, name, **options)

    def add_trained(self, model: Any, *, replace: bool = False, device: Optional[str] = None) -> Dict[str, Any]:
        """Add the adapter trained in ``model`` (from :meth:`subspace_model`) as it was trained; no other adapter
        changes, unless it was trained with ``rank_updates`` (then the bases are refitted, as a recompute does).
        Returns ``{"method": "trained" | "recompute", "adapter_name", ...}`` (:func:`lorashare.training.add_trained`).

        Example:
            >>> share.add_trained(model)["method"]  # doctest: +SKIP
            'trained'
        """
        from .training import add_trained

        device = resolve_device(device)
        with self._lock:
            nxt, report = add_trained(self._state, model, replace=replace, device=device, progress=self._progress)
            self._publish(nxt)
        return report

    def refit(self, adapter_name: str, batches: Iterable[Mapping[str, Any]], *, base_model: Any, **options: Any
              ) -> Dict[str, Any]:
        """Train one adapter's loadings to reproduce its original adapter's outputs on ``batches`` (a few hundred
        unlabelled inputs); the bases and the other adapters stay.  Options and the report:
        :func:`lorashare.training.refit`.

        Example:
            >>> share.refit("billing", batches, base_model=base)["agreement_after"]  # doctest: +SKIP
            0.994
        """
        from .training import refit
        from .training.refit import merge_refit

        options.setdefault("progress", self._progress)
        state = self._state
        nxt, report = refit(state, adapter_name, batches, base_model=base_model, **options)
        with self._lock:
            self._publish(merge_refit(self._state, state, nxt, adapter_name))
        return report

    def summary(self) -> Dict[str, Any]:
        """Print and return the compression statistics.  ``compression_ratio`` counts the shared bases (what you
        store and ship); ``compression_ratio_excluding_basis`` is the marginal cost of one more adapter, *not* the
        compression ratio."""
        cfg = self.config
        print(summary_text(cfg))
        return dict(cfg.compression_stats)

    def reconstruction_error(self, adapter_name: str, original_weights: Optional[Dict[str, torch.Tensor]] = None,
                             original_path: Optional[str] = None) -> Dict[str, Any]:
        """Relative error of ΔW = s·B·A per module against the original adapter, ``{"per_layer": {module: error},
        "mean": …, "max": …}``; with neither ``original_weights`` nor ``original_path``, as measured at compression.

        Example:
            >>> share.reconstruction_error("billing", original_path="runs/billing")["max"]  # doctest: +SKIP
            0.031
        """
        edit.check_known(self._state, adapter_name)
        return reconstruction_error(self._state, adapter_name, original_weights, original_path)

    def add_adapter(
        self, adapter: str, name: Optional[str] = None, variance_threshold: Optional[float] = None,
        device: Optional[str] = None, force_recompute: bool = False, *, token: Optional[str] = None,
        originals: Optional[Mapping[str, str]] = None, replace: bool = False, strict: bool = False,
    ) -> Dict[str, Any]:
        """Add an adapter: project it onto the bases if they explain it well enough, else recompute.

        Projected when, in every module, the bases keep at least ``variance_threshold`` (default: the spec's) of its
        ΔW energy; otherwise every adapter is recompressed with the spec, from its original (``originals[name]``, else
        its recorded source) when that still has the recorded fingerprint, else from its reconstruction (its error
        then a bound).  ``replace=True`` replaces an adapter of the same name in one step; ``strict=True`` refuses
        (WorsenedError) to raise the others' ΔW error.  Returns ``{"method": "projection" | "recompute", "adapter_name",
        "min_explained_variance", "mean_explained_variance", "reason", "worsened", "reconstructed"}`` (edit.add).

        Example:
            >>> share.add_adapter("runs/legal")["method"]  # doctest: +SKIP
            'projection'
        """
        threshold = None if variance_threshold is None else check_number(
            "variance_threshold", variance_threshold, low=0.0, high=1.0, low_open=False, expected="a number in [0, 1]")
        device = resolve_device(device)  # a bad device fails now, not after the projection test
        new = open_adapter(adapter, name, **_hub_kwargs(token, None))
        try:
            with self._lock:
                state = self._state
                nxt, report = edit.add(
                    state, new, threshold=state.spec.variance_threshold if threshold is None else threshold,
                    force=force_recompute, device=device, originals=originals, token=token, progress=self._progress,
                    replace=replace, strict=strict)
                self._publish(nxt)
        finally:
            new.close()
        return report

    def remove_adapter(self, adapter_name: str) -> None:
        """Drop an adapter; the others are untouched (their loadings and the bases stay as they are).

        The last adapter cannot be removed (as in lorashare 0.1.x): a checkpoint holds at least one.
        """
        with self._lock:
            self._publish(edit.remove(self._state, adapter_name))

    def set_source(self, adapter_name: str, source: str) -> None:
        """Record where an adapter came from, as the card and ``share_config.json`` show it.

        Useful when it was read from a path that means nothing elsewhere (a runner's checkout), e.g. to keep the path
        relative to the repository that holds it.

        Example:
            >>> share.set_source("billing", "adapters/billing")  # doctest: +SKIP
        """
        with self._lock:
            self._publish(edit.set_source(self._state, adapter_name, source))

    def set_base_model(self, base_model: str) -> None:
        """Name the base model the adapters belong to (its Hub id), e.g. when they were trained from a local folder.

        Example:
            >>> share.set_base_model("FacebookAI/roberta-base")  # doctest: +SKIP
        """
        with self._lock:
            self._publish(edit.set_base_model(self._state, base_model))

    def set_card(self, **options: Optional[str]) -> None:
        """Set the model card's own options: ``repo_id``, ``license`` (a Hub license id), ``description``.

        Example:
            >>> share.set_card(license="apache-2.0", description="Support adapters")  # doctest: +SKIP
        """
        options = check_card_options(options)
        with self._lock:
            self._publish(edit.set_card(self._state, **options))


def _hub_kwargs(token: Optional[str], timeout: Optional[float]) -> Dict[str, Any]:
    """What adapter opening passes on to :func:`lorashare.hub.fetch_adapter`."""
    return {**({"token": token} if token else {}), **({"timeout": timeout} if timeout is not None else {})}
