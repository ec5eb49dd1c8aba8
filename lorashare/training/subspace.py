"""Learning in the shared subspace: a new adapter trained as loadings over frozen bases.

:func:`subspace_model` returns a standard PEFT ``PeftModel`` (LoRA) whose factors are computed
from the checkpoint's frozen bases, ``lora_A = (U_A · L_A)ᵀ`` and ``lora_B = U_B · L_B``: only the
loadings ``L`` (k × r per module and side) and the modules it saves whole (a new head) are
parameters.  It is PEFT's own model, so ``transformers.Trainer``, accelerate, checkpoints, resume
and mixed precision work as for any LoRA; the factors are a ``torch.nn.utils.parametrize``
parametrization of the LoRA weights, so every PEFT code path (forward, merge, dropout) sees
ordinary weights.  :func:`add_trained` stores the loadings as they were trained: the training
forward already used the checkpoint's storage (a bfloat16 cast, or int8/nf4 codes, through a
straight-through estimator), so the stored adapter computes exactly what the trained model did.

peft is imported only here and in :mod:`lorashare.training.refit`, when a model is built.

Example:
    >>> model = subspace_model(share.state, base_model, "refunds_v2", modules_to_save=["classifier"])  # doctest: +SKIP
    >>> # ... train it ...
    >>> state2, report = add_trained(share.state, model)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..codec.state import AdapterRecord, SHAREState, Weight, as_float, check_adapter, rebuild
from ..codec.stats import delta_w_errors
from ..errors import AdapterError, ConfigError, DuplicateAdapterError, TrainingError
from ..format.checkpoint import describe_nonfinite
from ..format.storage import DTYPES, is_quantized, quantize
from ..peft.adapters import lora_key, open_adapter, write_peft_adapter
from ..serving.peftload import check_module, has_peft_layers, load_hint, peft_name
from ..utils.names import check_name, group_key

logger = logging.getLogger(__name__)

__all__ = ["SubspaceFactor", "SubspaceRun", "subspace_model", "add_trained", "trainable_parameters",
           "stored_as", "lora_init"]

#: The attribute of a ``PeftModel`` built by :func:`subspace_model` that says what it was built on.
MARK = "lorashare_subspace"
#: The adapter name refit gives the original (teacher) adapter while it runs.
TEACHER = "lorashare_teacher"
#: How a refused trained adapter ends: nothing was added, and what to do about a diverged run.
DIVERGED_FIX = ("It was not added and the checkpoint is unchanged. NaN or infinite values mean the training run "
                "diverged: train it again with a lower learning rate (or gradient clipping, max_grad_norm).")


# --------------------------------------------------------------------------- the math
class _StraightThrough(torch.autograd.Function):
    """Forward: the stored value of a loading; backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return stored

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad, None


def stored_as(L: torch.Tensor, scheme: str) -> torch.Tensor:
    """``L`` as a checkpoint of ``scheme`` stores it, with the gradient of the identity.

    float32 is ``L`` itself; float16/bfloat16 the cast; int8/nf4 the decoded codes.  Training
    through this means the saved adapter computes exactly what the trained model did.

    Example:
        >>> stored_as(torch.tensor([[1.0, 0.3]]), "bfloat16").tolist()
        [[1.0, 0.30078125]]
    """
    if scheme == "float32":
        return L
    with torch.no_grad():
        if is_quantized(scheme):
            value = quantize(L, scheme).dequantize(device=L.device, dtype=L.dtype)
        else:
            value = L.to(DTYPES[scheme]).to(L.dtype)
    return _StraightThrough.apply(L, value)


def lora_init(k: int, r: int, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A random loading (k × r) whose factor rows have the norm of PEFT's LoRA init.

    PEFT draws ``lora_A`` (r × d) from U(−1/√d, 1/√d), so each row has squared norm 1/3 in
    expectation; with an orthonormal basis, U(−1/√k, 1/√k) on a (k × r) loading gives the same.
    """
    bound = 1.0 / math.sqrt(k)
    return (torch.rand(k, r, generator=generator) * 2 - 1) * bound


class _Clock:
    """Counts a model's forward calls (a forward pre-hook): a factor computed during one call is
    reused within that call only, so PEFT's second read of a weight (its dtype, then the product)
    costs nothing and no autograd graph outlives its backward."""

    def __init__(self) -> None:
        self.tick = 0

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.tick += 1


class SubspaceFactor(nn.Module):
    """A parametrization of a LoRA factor by its loading on a frozen basis.

    ``weight = (U · L)ᵀ`` for ``lora_A`` (r × d_in), ``U · L`` for ``lora_B`` (d_out × r), where
    ``U`` (d × k) is the shared basis (a buffer, never saved by PEFT: it is the checkpoint's) and
    ``L`` (k × r) the trainable loading.  With ``extra > 0`` the basis has ``extra`` more trainable
    directions (rank updates), and ``L`` as many more rows.
    """

    def __init__(self, basis: torch.Tensor, side: str, scheme: str, extra: int = 0, *,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.side, self.scheme = side, scheme
        self.register_buffer("basis", basis.detach().to(torch.float32).clone(), persistent=False)
        self.clock: Optional[_Clock] = None
        self._cache: Optional[Tuple[Tuple[Any, ...], torch.Tensor]] = None
        self.extra = None
        if extra:
            # Small random directions: a zero one would get no gradient through a zero loading row.
            self.extra = nn.Parameter(torch.randn(basis.shape[0], extra, generator=generator) * 1e-3)

    def full_basis(self) -> torch.Tensor:
        return self.basis if self.extra is None else torch.cat([self.basis, self.extra.to(self.basis.dtype)], 1)

    def forward(self, loading: torch.Tensor) -> torch.Tensor:
        key = None
        if self.clock is not None:
            # Same call, same tensors, same values (an optimizer step bumps _version), same modes.
            key = (self.clock.tick, loading.data_ptr(), loading._version, self.basis.data_ptr(),
                   None if self.extra is None else self.extra._version, torch.is_grad_enabled(),
                   torch.is_autocast_enabled(loading.device.type))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        L = stored_as(loading, self.scheme) if self.extra is None else loading
        W = self.full_basis().to(L.dtype) @ L  # (d, r), as reconstruct_rows computes it
        W = W.T if self.side == "A" else W
        if key is not None:
            self._cache = (key, W)
        return W

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # a computed weight carries its autograd graph; copies and pickles start fresh
        return state

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """A factor's coordinates in the basis (what ``weight = ...`` assigns)."""
        F = weight.T if self.side == "A" else weight
        return self.full_basis().T.to(F.dtype) @ F


# --------------------------------------------------------------------------- building a model
@dataclass(frozen=True)
class SubspaceRun:
    """What a :func:`subspace_model` was built on (kept on the model as ``model.lorashare_subspace``).

    Attributes:
        name: the new adapter's name.
        keys: the ``"<module>:<A|B>"`` bases it trains loadings on.
        scheme: the checkpoint's storage the training forward used.
        rank_updates: extra trainable directions per module and side.
        refit_of: the adapter a refit trains (its loadings started from the stored ones).
    """

    name: str
    keys: Tuple[str, ...]
    scheme: str
    rank_updates: int = 0
    refit_of: Optional[str] = None


def _lora_layer(model: Any, module: str) -> Any:
    return model.base_model.model.get_submodule(module)


def factor_of(model: Any, name: str, key: str) -> Tuple[nn.Module, SubspaceFactor]:
    """The LoRA factor module of ``key`` and its parametrization."""
    module, side = key.rsplit(":", 1)
    lin = getattr(_lora_layer(model, module), f"lora_{side}")[peft_name(name)]
    return lin, lin.parametrizations.weight[0]


def _modules(state: SHAREState, target_modules: Optional[Sequence[str]]) -> List[str]:
    have = [k[:-2] for k in state.bases if k.endswith(":A") and group_key(k[:-2], "B") in state.bases]
    if target_modules is None:
        return have
    if isinstance(target_modules, str) or not all(isinstance(t, str) for t in target_modules):
        raise ConfigError(f"target_modules={target_modules!r}: expected a list of module names or suffixes, "
                          "e.g. ['query', 'value'].")
    chosen = [m for m in have if any(m == t or m.endswith("." + t) for t in target_modules)]
    unmatched = [t for t in target_modules if not any(m == t or m.endswith("." + t) for m in have)]
    if unmatched or not chosen:
        sample = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in have})) or "none"
        raise ConfigError(f"target_modules: {unmatched or list(target_modules)} match no module with shared bases. "
                          f"The checkpoint has bases for modules ending in: {sample}.")
    return chosen


def _common(values: Iterable[Any], default: Any) -> Any:
    """The most frequent value (ties: the first seen), else ``default``."""
    seen: Dict[Any, int] = {}
    for v in values:
        if v is not None:
            seen[v] = seen.get(v, 0) + 1
    return max(seen, key=seen.__getitem__) if seen else default


def _json_config(cfg: Any) -> Dict[str, Any]:
    """A PEFT config as plain JSON values (sets as sorted lists), as ``adapter_config.json`` holds it."""
    return json.loads(json.dumps(cfg.to_dict(), default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


def subspace_model(
    state: SHAREState,
    base_model: Any,
    name: str,
    *,
    r: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    target_modules: Optional[Sequence[str]] = None,
    modules_to_save: Optional[Sequence[str]] = None,
    lora_dropout: float = 0.0,
    init_zero: str = "B",
    rank_updates: int = 0,
    use_rslora: bool = False,
    task_type: Optional[str] = None,
    seed: Optional[int] = None,
) -> Any:
    """A ``PeftModel`` of ``base_model`` with one new LoRA adapter ``name`` that trains only loadings.

    Args:
        state: the SHARE state whose bases the adapter is learned in.
        base_model: a transformers model (not yet a ``PeftModel``); PEFT changes it in place.
        name: the new adapter's name (not one the checkpoint has).
        r: the rank of the loadings (default: the adapters' most common rank).
        lora_alpha: the LoRA scale's alpha (default: the adapters' most common alpha, else 2r).
        target_modules: the modules to train (names or suffixes of modules with shared bases;
            default: all of them).
        modules_to_save: modules trained whole and saved with the adapter (a new head).  PEFT adds
            ``classifier``/``score`` itself for ``SEQ_CLS``.
        lora_dropout: dropout on the LoRA path, as in ``LoraConfig``.
        init_zero: the side that starts at zero, ``"B"`` (LoRA's default: the model starts as the
            base model) or ``"A"``; the other side is random at LoRA's init scale.
        rank_updates: extra trainable directions per module and side, for a task that the bases
            do not span; adding such an adapter refits the bases (a recompute).
        use_rslora: scale by alpha/√r instead of alpha/r.
        task_type: PEFT's task type (default: the adapters' most common one).
        seed: seeds the random init (default: torch's global generator).

    Example:
        >>> model = subspace_model(share.state, base, "refunds_v2", modules_to_save=["classifier"])  # doctest: +SKIP
        >>> model.print_trainable_parameters()  # doctest: +SKIP
    """
    from peft import LoraConfig

    check_name(name)
    if name in state.records:
        raise DuplicateAdapterError(
            f"adapter {name!r} already exists. Pick another name for the new adapter, or remove_adapter({name!r}) "
            "first to train it again.", adapter=name)
    if init_zero not in ("A", "B"):
        raise ConfigError(f"init_zero={init_zero!r}: expected 'B' (as LoRA: lora_B starts at zero) or 'A'.")
    if isinstance(rank_updates, bool) or not isinstance(rank_updates, int) or rank_updates < 0:
        raise ConfigError(f"rank_updates={rank_updates!r}: expected an integer ≥ 0 (extra directions per module).")
    configs = [rec.config for rec in state.records.values()]
    r = _common((c.get("r") for c in configs), 8) if r is None else r
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"r={r!r}: expected an integer ≥ 1 (the rank of the new loadings).")
    if lora_alpha is None:
        lora_alpha = _common((c.get("lora_alpha") for c in configs if c.get("r") == r), 2 * r)
    task_type = task_type or _common((c.get("task_type") for c in configs), None)
    modules = _modules(state, target_modules)
    check_base_model(state, base_model, name, modules)

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(modules), lora_dropout=lora_dropout,
                     modules_to_save=list(modules_to_save) if modules_to_save else None, task_type=task_type,
                     use_rslora=use_rslora, bias="none")
    return build_peft_model(state, base_model, name, cfg, modules, init_zero=init_zero, rank_updates=rank_updates, seed=seed)


def build_peft_model(state: SHAREState, base_model: Any, name: str, cfg: Any, modules: Sequence[str], *, init_zero: str = "B",
           rank_updates: int = 0, seed: Optional[int] = None, refit_of: Optional[str] = None) -> Any:
    """``get_peft_model`` with ``cfg``, then each module's factors parametrized by loadings on the bases."""
    from peft import get_peft_model
    from torch.nn.utils import parametrize

    base = base_model
    cfg.base_model_name_or_path = None  # PEFT fills in the model's own path; the checkpoint's base model is set below
    # A dotted name is no torch module name: PEFT gets peft_name(name) (dots → underscores).
    model = get_peft_model(base_model, cfg, adapter_name=peft_name(name))
    model.peft_config[peft_name(name)].base_model_name_or_path = state.base_model or getattr(base, "name_or_path", None)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    scheme, comps = state.spec.dtype, state.components
    clock = _Clock()
    model.register_forward_pre_hook(clock)
    for m in modules:
        for side in "AB":
            key = group_key(m, side)
            lin = getattr(_lora_layer(model, m), f"lora_{side}")[peft_name(name)]
            factor = SubspaceFactor(comps[key], side, scheme, rank_updates, generator=gen).to(lin.weight.device)
            factor.clock = clock
            r = int(lin.weight.shape[0 if side == "A" else 1])
            parametrize.register_parametrization(lin, "weight", factor, unsafe=True)
            original = lin.parametrizations.weight.original
            with torch.no_grad():
                if refit_of is not None:
                    original.copy_(as_float(state.records[refit_of].weights[key]).to(original))
                elif side == init_zero:
                    original.zero_()
                else:
                    original.copy_(lora_init(original.shape[0], r, generator=gen))
    setattr(model, MARK, SubspaceRun(name, tuple(group_key(m, s) for m in modules for s in "AB"), scheme,
                                     rank_updates, refit_of))
    return model


def check_base_model(state: SHAREState, base_model: Any, name: str, modules: Sequence[str]) -> None:
    """Refuse anything but a plain base model whose modules have the bases' shapes."""
    if not isinstance(base_model, nn.Module) or has_peft_layers(base_model):
        what = type(base_model).__name__
        raise TrainingError(
            f"base_model is a {what}{' that already holds PEFT LoRA layers' if isinstance(base_model, nn.Module) else ''}: "
            "pass a freshly loaded transformers base model (the LoRA layers are added to it here).", adapter=name)
    comps = state.components
    for m in modules:
        check_module(base_model, m, int(comps[group_key(m, "A")].shape[0]), int(comps[group_key(m, "B")].shape[0]),
                     adapter=name, hint=_hint(state, base_model))


def _hint(state: SHAREState, model: Any) -> str:
    return load_hint(state, state.names[0], model) if state.names else "Load the base model the checkpoint was built on."


def trainable_parameters(model: Any) -> Tuple[int, int]:
    """``(trainable, all)`` parameter counts of ``model``."""
    n_all = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), n_all


# --------------------------------------------------------------------------- adding a trained adapter
def _run_of(model: Any) -> SubspaceRun:
    run = getattr(model, MARK, None)
    inner = getattr(model, "module", None)  # DistributedDataParallel and friends
    if run is None and inner is not None:
        run = getattr(inner, MARK, None)
    if not isinstance(run, SubspaceRun):
        # What merge_and_unload() returns: a plain model with the update merged in, which has no loadings to read.
        merged = (" If it is what merge_and_unload() returned, pass the PeftModel itself, before merging."
                  if isinstance(model, nn.Module) and not has_peft_layers(model) else "")
        raise TrainingError(
            f"this {type(model).__name__} was not built by subspace_model(): add_trained() takes the model that "
            "share.subspace_model(base_model, name) returned (after training it). To add a PEFT LoRA adapter "
            f"trained elsewhere, save it and use share.add_adapter(folder).{merged}")
    return run


def _unwrapped(model: Any) -> Any:
    return model if getattr(model, MARK, None) is not None else model.module


def trained_factors(model: Any) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (lora_A (r × d_in), lora_B (d_out × r))}`` as the trained model computes them (float32)."""
    run = _run_of(model)
    model = _unwrapped(model)
    out = {}
    with torch.no_grad():
        for key in run.keys[::2]:
            module = key[:-2]
            A = factor_of(model, run.name, group_key(module, "A"))[0].weight
            B = factor_of(model, run.name, group_key(module, "B"))[0].weight
            out[module] = (A.detach().float().cpu(), B.detach().float().cpu())
    return out


def _check_layers(model: Any, run: SubspaceRun) -> None:
    """The adapter's LoRA layers are still in ``model`` (merge_and_unload, unload or delete_adapter remove them)."""
    for key in run.keys:
        module, side = key.rsplit(":", 1)
        try:
            layer = _lora_layer(model, module)
        except AttributeError:
            layer = None
        factors = getattr(layer, f"lora_{side}", None)
        if factors is None:
            raise TrainingError(
                f"adapter {run.name!r}: {module} has no LoRA layer any more: the model was merged or unloaded "
                "(merge_and_unload() or unload()), which removes the trained loadings. Pass the PeftModel returned by "
                "subspace_model() before merging (merge a copy for inference: copy.deepcopy(model).merge_and_unload()).",
                adapter=run.name, layer=module)
        if peft_name(run.name) not in factors:
            raise TrainingError(
                f"adapter {run.name!r}: {module} no longer holds it (delete_adapter()?). Pass the PeftModel returned "
                "by subspace_model() as it was trained.", adapter=run.name, layer=module)


def _check_bases(state: SHAREState, model: Any, run: SubspaceRun) -> Optional[torch.dtype]:
    """Refuse a model trained on other bases; returns the dtype the model's bases were cast to, if any."""
    cast = None
    for key in run.keys:
        _, factor = factor_of(model, run.name, key)
        basis = factor.basis.detach().cpu()
        ours = state.components[key].to(torch.float32) if key in state.bases else None
        if ours is not None and basis.dtype != torch.float32 and tuple(ours.shape) == tuple(basis.shape) \
                and torch.equal(ours.to(basis.dtype), basis):
            cast = basis.dtype  # model.to(torch.bfloat16) after subspace_model(): the same basis, rounded
            continue
        if ours is None or not torch.equal(ours, basis):
            also = (f" (The model's weights were also cast to {str(basis.dtype).replace('torch.', '')}, which alone "
                    "would not matter.)" if basis.dtype != torch.float32 else "")
            raise TrainingError(
                f"adapter {run.name!r}: the shared basis of {key} is not the one the model was trained on (the "
                f"checkpoint was recomputed, or reloaded from another one, since subspace_model()).{also} Its "
                "loadings are coordinates in the old bases; train again on this checkpoint, or add it to the one it "
                "was built from.", adapter=run.name, layer=key[:-2])
    if run.scheme != state.spec.dtype:
        raise TrainingError(
            f"adapter {run.name!r} was trained for {run.scheme} storage and the checkpoint now stores {state.spec.dtype}. "
            "Train it again on this checkpoint.", adapter=run.name)
    return cast


def _heads(model: Any, name: str) -> Dict[str, torch.Tensor]:
    """The modules saved whole (heads), under the keys PEFT saves them with."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=peft_name(name))
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if "lora_" not in k}


def stored_weight(L: torch.Tensor, scheme: str) -> Weight:
    if is_quantized(scheme):
        return quantize(L, scheme)
    return L.to(DTYPES[scheme]).contiguous()


def _as_peft(factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {lora_key(m, side): f for m, (A, B) in factors.items() for side, f in (("A", A), ("B", B))}


def stored_errors(state: SHAREState, name: str, rec: AdapterRecord,
            factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, float]:
    """ΔW relative error per module of ``rec``, as adapter ``name`` of ``state``, against ``factors``."""
    probe = dataclasses.replace(state, records={**state.records, name: rec})
    return delta_w_errors(_as_peft(factors), rebuild(probe, name, peft_keys=True))


def _lora_bytes(factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> int:
    """What PEFT's float32 ``adapter_model.safetensors`` spends on these factors."""
    return sum(4 * (A.numel() + B.numel()) for A, B in factors.values())


def add_trained(state: SHAREState, model: Any, *, replace: bool = False, device: Optional[str] = None,
                progress: bool = True) -> Tuple[SHAREState, Dict[str, Any]]:
    """The next state, with the adapter trained in ``model`` (from :func:`subspace_model`) added.

    Its loadings are stored as they were trained and no other adapter changes.  With rank updates
    the adapter is added as its factors instead, and every adapter is recompressed with the
    state's spec (the bases are refitted), as ``add_adapter`` does when the bases do not explain
    a new adapter.  Returns the next state and a report.
    """
    run = _run_of(model)
    model = _unwrapped(model)
    name = run.name
    if name in state.records and not replace:
        raise DuplicateAdapterError(
            f"adapter {name!r} already exists in the checkpoint (added since subspace_model()?). Pass replace=True "
            "to replace it, or remove_adapter() it first.", adapter=name)
    _check_layers(model, run)
    cast = _check_bases(state, model, run)
    factors = trained_factors(model)
    config = _json_config(model.peft_config[peft_name(name)])
    config["inference_mode"] = True
    heads = _heads(model, name)
    weights: Dict[str, Weight] = {}
    for key in run.keys:
        L = factor_of(model, name, key)[0].parametrizations.weight.original.detach().float().cpu()
        weights[key] = stored_weight(L[: state.components[key].shape[1]].contiguous(), state.spec.dtype)
    # No source or fingerprint: a recompute must rebuild it from its loadings, never from an older original.
    rec = AdapterRecord(weights=weights, config=config, heads=heads, lora_bytes=_lora_bytes(factors))
    # The reader's rules at the door: a diverged run (NaN loadings or head) is refused here by name, not
    # published to fail every later load of the checkpoint.
    check_adapter(state, name, rec, fix=DIVERGED_FIX)
    extras = [f.extra for key in run.keys for f in [factor_of(model, name, key)[1]] if f.extra is not None]
    _check_extras(name, run, model, extras)
    if any(bool(e.detach().abs().sum() > 0) for e in extras):
        return _add_with_rank_updates(state, name, factors, heads, config, replace=replace, device=device,
                                      progress=progress, rank_updates=run.rank_updates)
    errors = stored_errors(state, name, rec, factors)
    rec = rec.replace(errors=errors)
    records = dict(state.records)
    records[name] = rec
    report = {"method": "trained", "adapter_name": name, "rank": rec.rank, "modules": len(factors),
              "delta_w_error_max": max(errors.values(), default=0.0),
              "reason": f"loadings stored as trained ({state.spec.dtype}) on the shared bases; no other adapter changed"}
    if cast is not None:
        what = str(cast).replace("torch.", "")
        report["reason"] += (f"; the model was cast to {what}, so it trained over the bases rounded to {what}, and "
                             "its loadings are stored over the float32 bases")
        logger.warning(
            "adapter %r: the model's weights were cast to %s after subspace_model(), so it trained over the shared "
            "bases rounded to %s; its loadings are stored over the checkpoint's float32 bases (ΔW error up to %.2g "
            "against what the cast model computes). For an exact match keep the weights in float32 and train in "
            "mixed precision (torch.autocast, or Trainer's bf16=True), which rounds activations, not the bases.",
            name, what, what, report["delta_w_error_max"])
    return state.next(records=records), report


def _check_extras(name: str, run: SubspaceRun, model: Any, extras: Sequence[torch.Tensor]) -> None:
    """Rank-update directions are finite (a NaN one would pass for "no update" and be dropped without a word)."""
    keys = [key for key in run.keys if factor_of(model, name, key)[1].extra is not None]
    for key, extra in zip(keys, extras):
        bad = describe_nonfinite(extra.detach())
        if bad:
            raise AdapterError(f"adapter {name!r}: the rank-update directions of {key!r} hold NaN or infinite values "
                               f"({bad}). {DIVERGED_FIX}", adapter=name, layer=key[:-2])


def _add_with_rank_updates(state: SHAREState, name: str, factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                           heads: Dict[str, torch.Tensor], config: Dict[str, Any], *, replace: bool,
                           device: Optional[str], progress: bool, rank_updates: int) -> Tuple[SHAREState, Dict[str, Any]]:
    from ..codec import edit

    tensors = {lora_key(m, "A"): A.contiguous() for m, (A, _) in factors.items()}
    tensors.update({lora_key(m, "B"): B.contiguous() for m, (_, B) in factors.items()})
    tensors.update(heads)
    with tempfile.TemporaryDirectory(prefix="lorashare-trained-") as tmp:
        folder = os.path.join(tmp, name)
        write_peft_adapter(folder, tensors, config)
        a = open_adapter(folder, name)
        try:
            nxt, report = edit.add(state, a, threshold=1.0, force=True, device=device, progress=progress, replace=replace)
        finally:
            a.close()
    rec = nxt.records[name]
    records = dict(nxt.records)
    records[name] = rec.replace(source="", revision=None, sha256=None)
    nxt = nxt.next(records=records, inputs=state.inputs)
    report.update(method="recompute", reason=f"rank updates ({rank_updates} extra directions per module and side) "
                  "reach outside the shared bases: every adapter was recompressed and the bases refitted")
    return nxt, report
