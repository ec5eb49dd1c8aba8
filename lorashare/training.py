"""Learning in the shared subspace: a new adapter trained as loadings over frozen bases, and refit.

:func:`subspace_model` returns a standard PEFT ``PeftModel`` (LoRA) whose factors are computed
from the checkpoint's frozen bases, ``lora_A = (U_A · L_A)ᵀ`` and ``lora_B = U_B · L_B``: only the
loadings ``L`` (k × r per module and side) and the modules it saves whole (a new head) are
parameters.  It is PEFT's own model, so ``transformers.Trainer``, accelerate, checkpoints, resume
and mixed precision work as for any LoRA; the factors are a ``torch.nn.utils.parametrize``
parametrization of the LoRA weights, so every PEFT code path (forward, merge, dropout) sees
ordinary weights.  :func:`add_trained` stores the loadings as they were trained: the training
forward already used the checkpoint's storage (a bfloat16 cast, or int8/nf4 codes, through a
straight-through estimator), so the stored adapter computes exactly what the trained model did.

:func:`refit` trains an adapter's loadings to reproduce its original adapter's outputs
(distillation) on a few hundred unlabelled inputs.

peft is imported only here, when a model is built.

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
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .adapters import lora_key, open_adapter, write_peft_adapter
from .errors import AdapterError, ConfigError, DuplicateAdapterError, TrainingError
from .names import check_name, group_key
from .peftload import check_module, has_peft_layers, load_hint, peft_config
from .state import AdapterRecord, SHAREState, Weight, as_float, rebuild
from .stats import delta_w_errors
from .storage import DTYPES, is_quantized, quantize

logger = logging.getLogger(__name__)

__all__ = ["SubspaceFactor", "SubspaceRun", "subspace_model", "add_trained", "refit", "trainable_parameters",
           "stored_as", "lora_init"]

#: The attribute of a ``PeftModel`` built by :func:`subspace_model` that says what it was built on.
MARK = "lorashare_subspace"
#: The adapter name refit gives the original (teacher) adapter while it runs.
TEACHER = "lorashare_teacher"


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


def _factor(model: Any, name: str, key: str) -> Tuple[nn.Module, SubspaceFactor]:
    """The LoRA factor module of ``key`` and its parametrization."""
    module, side = key.rsplit(":", 1)
    lin = getattr(_lora_layer(model, module), f"lora_{side}")[name]
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
    _check_base(state, base_model, name, modules)

    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(modules), lora_dropout=lora_dropout,
                     modules_to_save=list(modules_to_save) if modules_to_save else None, task_type=task_type,
                     use_rslora=use_rslora, bias="none")
    return _build(state, base_model, name, cfg, modules, init_zero=init_zero, rank_updates=rank_updates, seed=seed)


def _build(state: SHAREState, base_model: Any, name: str, cfg: Any, modules: Sequence[str], *, init_zero: str = "B",
           rank_updates: int = 0, seed: Optional[int] = None, refit_of: Optional[str] = None) -> Any:
    """``get_peft_model`` with ``cfg``, then each module's factors parametrized by loadings on the bases."""
    from peft import get_peft_model
    from torch.nn.utils import parametrize

    base = base_model
    cfg.base_model_name_or_path = None  # PEFT fills in the model's own path; the checkpoint's base model is set below
    model = get_peft_model(base_model, cfg, adapter_name=name)
    model.peft_config[name].base_model_name_or_path = state.base_model or getattr(base, "name_or_path", None)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    scheme, comps = state.spec.dtype, state.components
    clock = _Clock()
    model.register_forward_pre_hook(clock)
    for m in modules:
        for side in "AB":
            key = group_key(m, side)
            lin = getattr(_lora_layer(model, m), f"lora_{side}")[name]
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


def _check_base(state: SHAREState, base_model: Any, name: str, modules: Sequence[str]) -> None:
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
        raise TrainingError(
            f"this {type(model).__name__} was not built by subspace_model(): add_trained() takes the model that "
            "share.subspace_model(base_model, name) returned (after training it). To add a PEFT LoRA adapter "
            "trained elsewhere, save it and use share.add_adapter(folder).")
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
            A = _factor(model, run.name, group_key(module, "A"))[0].weight
            B = _factor(model, run.name, group_key(module, "B"))[0].weight
            out[module] = (A.detach().float().cpu(), B.detach().float().cpu())
    return out


def _check_bases(state: SHAREState, model: Any, run: SubspaceRun) -> None:
    for key in run.keys:
        _, factor = _factor(model, run.name, key)
        if key not in state.bases or not torch.equal(state.components[key].to(torch.float32), factor.basis.detach().cpu()):
            raise TrainingError(
                f"adapter {run.name!r}: the shared basis of {key} is not the one the model was trained on (the "
                "checkpoint was recomputed, or reloaded from another one, since subspace_model()). Its loadings are "
                "coordinates in the old bases; train again on this checkpoint, or add it to the one it was built from.",
                adapter=run.name, layer=key[:-2])
    if run.scheme != state.spec.dtype:
        raise TrainingError(
            f"adapter {run.name!r} was trained for {run.scheme} storage and the checkpoint now stores {state.spec.dtype}. "
            "Train it again on this checkpoint.", adapter=run.name)


def _heads(model: Any, name: str) -> Dict[str, torch.Tensor]:
    """The modules saved whole (heads), under the keys PEFT saves them with."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().cpu().contiguous().clone() for k, v in sd.items() if "lora_" not in k}


def _stored_weight(L: torch.Tensor, scheme: str) -> Weight:
    if is_quantized(scheme):
        return quantize(L, scheme)
    return L.to(DTYPES[scheme]).contiguous()


def _as_peft(factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {lora_key(m, side): f for m, (A, B) in factors.items() for side, f in (("A", A), ("B", B))}


def _errors(state: SHAREState, name: str, rec: AdapterRecord,
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
    _check_bases(state, model, run)
    factors = trained_factors(model)
    config = _json_config(model.peft_config[name])
    config["inference_mode"] = True
    heads = _heads(model, name)
    extras = [f.extra for key in run.keys for f in [_factor(model, name, key)[1]] if f.extra is not None]
    if any(bool(e.detach().abs().sum() > 0) for e in extras):
        return _add_with_rank_updates(state, name, factors, heads, config, replace=replace, device=device,
                                      progress=progress, rank_updates=run.rank_updates)
    weights: Dict[str, Weight] = {}
    for key in run.keys:
        L = _factor(model, name, key)[0].parametrizations.weight.original.detach().float().cpu()
        weights[key] = _stored_weight(L[: state.components[key].shape[1]].contiguous(), state.spec.dtype)
    # No source or fingerprint: a recompute must rebuild it from its loadings, never from an older original.
    rec = AdapterRecord(weights=weights, config=config, heads=heads, lora_bytes=_lora_bytes(factors))
    errors = _errors(state, name, rec, factors)
    rec = rec.replace(errors=errors)
    records = dict(state.records)
    records[name] = rec
    report = {"method": "trained", "adapter_name": name, "rank": rec.rank, "modules": len(factors),
              "delta_w_error_max": max(errors.values(), default=0.0),
              "reason": f"loadings stored as trained ({state.spec.dtype}) on the shared bases; no other adapter changed"}
    return state.next(records=records), report


def _add_with_rank_updates(state: SHAREState, name: str, factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                           heads: Dict[str, torch.Tensor], config: Dict[str, Any], *, replace: bool,
                           device: Optional[str], progress: bool, rank_updates: int) -> Tuple[SHAREState, Dict[str, Any]]:
    from . import edit

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


# --------------------------------------------------------------------------- refit
def _outputs(out: Any) -> torch.Tensor:
    t = getattr(out, "logits", None)
    if t is None:
        t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", None)
    if not isinstance(t, torch.Tensor):
        raise TrainingError(f"the model returned {type(out).__name__} without logits or a hidden state to match: "
                            "pass select=lambda out: ... to say which tensor of its output to match.")
    return t


def _n_rows(batch: Mapping[str, Any]) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            return int(v.shape[0])
    raise ConfigError("refit: a batch holds no tensor (expected the model's inputs, e.g. a tokenizer's output).")


def _mask(batch: Mapping[str, Any], t: torch.Tensor) -> torch.Tensor:
    """Which positions count: every row, or for token outputs the attention mask."""
    m = batch.get("attention_mask") if t.dim() == 3 else None
    if isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(t.shape[:2]):
        return m.bool()
    return torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)


def _loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str, temperature: float) -> torch.Tensor:
    s, t = student[mask], teacher[mask]
    if kind == "mse":
        return torch.nn.functional.mse_loss(s, t)
    T = temperature
    return torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1), log_target=True,
                                      reduction="batchmean") * T * T


def _on(batch: Mapping[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _run(model: Any, b: Mapping[str, Any], select: Callable[[Any], torch.Tensor], hidden: bool
         ) -> Tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """The matched output and, with ``hidden``, every layer's hidden states (not the embeddings)."""
    out = model(**b, output_hidden_states=True) if hidden else model(**b)
    states = (getattr(out, "hidden_states", None) or ())[1:] if hidden else ()
    return select(out).float(), [h.float() for h in states]


def _hidden_loss(s: Sequence[torch.Tensor], t: Sequence[torch.Tensor], b: Mapping[str, Any]) -> torch.Tensor:
    """Mean squared difference of the layers' hidden states, summed over layers (masked positions only)."""
    out = torch.zeros(())
    for hs, ht in zip(s, t):
        m = _mask(b, ht)
        out = out + torch.nn.functional.mse_loss(hs[m], ht[m])
    return out


def _measure(model: Any, name: str, batches: Sequence[Mapping[str, Any]], kind: str, temperature: float,
             device: torch.device, select: Callable[[Any], torch.Tensor], hidden: bool = False) -> Dict[str, float]:
    """Loss, hidden-state loss and top-1 agreement of adapter ``name`` with the teacher on ``batches``."""
    total, total_h, agree, count, n = 0.0, 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            b = _on(b, device)
            model.set_adapter(TEACHER)
            t, th = _run(model, b, select, hidden)
            model.set_adapter(name)
            s, sh = _run(model, b, select, hidden)
            m = _mask(b, t)
            rows = _n_rows(b)
            total += float(_loss(s, t, m, kind, temperature)) * rows
            total_h += float(_hidden_loss(sh, th, b)) * rows
            n += rows
            agree += int((s.argmax(-1) == t.argmax(-1))[m].sum())
            count += int(m.sum())
    return {"loss": total / max(1, n), "hidden": total_h / max(1, n), "agreement": agree / max(1, count)}


def refit(
    state: SHAREState,
    name: str,
    batches: Iterable[Mapping[str, Any]],
    *,
    base_model: Any,
    original: Optional[str] = None,
    epochs: int = 6,
    lr: float = 5e-3,
    loss: str = "kl",
    temperature: float = 2.0,
    anchor: float = 0.3,
    hidden: float = 1.0,
    select: Optional[Callable[[Any], torch.Tensor]] = None,
    eval_batches: Optional[Iterable[Mapping[str, Any]]] = None,
    token: Optional[str] = None,
    progress: bool = True,
) -> Tuple[SHAREState, Dict[str, Any]]:
    """Train adapter ``name``'s loadings to reproduce its original adapter's outputs; bases frozen.

    Args:
        state: the SHARE state that holds ``name``.
        name: the adapter to refit.
        batches: the inputs (dicts of tensors, as a tokenizer returns them; no labels needed),
            iterated once per epoch.  A few hundred inputs are enough.
        base_model: a freshly loaded base model of the adapters (PEFT layers are added for the
            refit and removed after it).
        original: the original adapter (folder or Hub id); default: the adapter's recorded
            source.  Its fingerprint must match the one recorded at compression.
        epochs: passes over ``batches``.
        lr: AdamW's learning rate.
        loss: ``"kl"`` (the KL divergence of the output distributions, default) or ``"mse"`` (of
            the outputs: logits, or the last hidden state of a model without logits).
        temperature: the KL loss's softmax temperature.
        anchor: weight of the ΔW term.  The loss is ``out / out₀ + anchor · dist / dist₀``: the
            output loss and the squared distance of the adapter's ΔW to the original's (summed
            over modules), each relative to its value before the refit, so the weight means the
            same for every model.  It keeps a refit on few inputs close to the original's update
            where the inputs say nothing.  0 turns it off.
        hidden: weight of the mean squared difference of every layer's hidden states (relative to
            its value before, like ``anchor``): each layer's update is matched on the inputs' own
            activations, many more numbers per input than the outputs, so a few hundred inputs
            constrain the loadings much more.  0 turns it off.
        select: what to match, as a function of the model's output (default: its logits, else
            its last hidden state), e.g. ``lambda out: out.logits[:, :2]`` for a head whose other
            outputs the task never reads.
        eval_batches: where the report's agreement is measured (default: ``batches``).
        token: Hub token, for an original on the Hub.
        progress: show a progress bar.

    Returns the next state (only ``name``'s loadings and errors changed; unchanged if the refit
    did not lower the loss) and a report with the ΔW error and the agreement before and after.
    """
    from tqdm.auto import tqdm

    from .edit import check_known

    check_known(state, name)
    if loss not in ("kl", "mse"):
        raise ConfigError(f"loss={loss!r}: expected 'kl' or 'mse'.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r}: expected an integer ≥ 1.")
    batches = list(batches)
    if not batches:
        raise ConfigError("refit: batches is empty; give a few hundred of the task's inputs (labels are not needed).")
    evals = list(eval_batches) if eval_batches is not None else batches
    select = select or _outputs
    rec = state.records[name]
    teacher_folder, adapter = _original(state, name, original, token)
    try:
        originals = {m: (adapter.read_factor(m, "A").float(), adapter.read_factor(m, "B").float())
                     for m in adapter.modules if group_key(m, "A") in rec.weights}
    finally:
        adapter.close()
    before_err = _errors(state, name, rec, originals)
    from peft import PeftConfig

    modules = [k[:-2] for k in rec.weights if k.endswith(":A")]
    _check_base(state, base_model, name, modules)
    cfg = PeftConfig.from_peft_type(**peft_config(rec, name))
    cfg.inference_mode = False
    model = _build(state, base_model, name, cfg, modules, refit_of=name)
    _load_heads(model, name, rec)
    try:
        _load_teacher(model, teacher_folder)
        device = next(model.parameters()).device
        params = [_factor(model, name, key)[0].parametrizations.weight.original for key in rec.weights]
        targets = {m: (A.to(device), B.to(device)) for m, (A, B) in originals.items()}
        with torch.no_grad():
            dist0 = float(_delta_w_distance(model, name, targets))
        first = _measure(model, name, batches, loss, temperature, device, select, hidden=bool(hidden))
        before = first if evals is batches else _measure(model, name, evals, loss, temperature, device, select)
        out0, hidden0 = max(first["loss"], 1e-12), first["hidden"]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        n_inputs = sum(_n_rows(b) for b in batches)
        bar = tqdm(total=epochs * len(batches), desc=f"refitting {name}", unit="step", disable=not progress or None)
        for _ in range(epochs):
            for b in batches:
                b = _on(b, device)
                model.eval()  # no dropout: the outputs to match are the original's, deterministic
                with torch.no_grad():
                    model.set_adapter(TEACHER)
                    t, th = _run(model, b, select, hidden0 > 0)
                model.set_adapter(name)
                _freeze_all_but(model, params)
                s, sh = _run(model, b, select, hidden0 > 0)
                value = _loss(s, t, _mask(b, t), loss, temperature) / out0
                if hidden0 > 0:
                    value = value + hidden * _hidden_loss(sh, th, b) / hidden0
                if anchor and dist0 > 0:
                    value = value + anchor * _delta_w_distance(model, name, targets) / dist0
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{float(value.detach()):.4f}")
        bar.close()
        after = _measure(model, name, evals, loss, temperature, device, select)
        weights = dict(rec.weights)
        kept = after["loss"] < before["loss"]
        if kept:
            for key, p in zip(rec.weights, params):
                weights[key] = _stored_weight(p.detach().float().cpu().contiguous(), state.spec.dtype)
        else:
            with torch.no_grad():
                for p, s0 in zip(params, start):
                    p.copy_(s0)
    finally:
        _unload(model)
    new_rec = rec.replace(weights=weights)
    after_err = _errors(state, name, new_rec, originals)
    report = {
        "adapter_name": name, "inputs": n_inputs, "steps": epochs * len(batches), "epochs": epochs, "lr": lr,
        "loss_kind": loss, "anchor": anchor, "hidden": hidden, "kept": kept,
        "delta_w_error_before": _mean(before_err), "delta_w_error_after": _mean(after_err) if kept else _mean(before_err),
        "agreement_before": before["agreement"], "agreement_after": after["agreement"] if kept else before["agreement"],
        "loss_before": before["loss"], "loss_after": after["loss"] if kept else before["loss"],
    }
    if not kept:
        logger.warning("refit of %r did not lower the loss (%.4g → %.4g): the adapter is left as it was", name,
                       before["loss"], after["loss"])
        return state, report
    return state.next(records={**state.records, name: new_rec.replace(errors=after_err)}), report


def _sq_norm_product(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖B·A‖²`` through r × r products (never d_out × d_in)."""
    return torch.trace((B.T @ B) @ (A @ A.T))


def _delta_w_distance(model: Any, name: str, targets: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``Σ ‖B·A − B₀·A₀‖²`` over modules (the scale is the same on both sides, so it is left out)."""
    out = 0.0
    for m, (A0, B0) in targets.items():
        A = _factor(model, name, group_key(m, "A"))[0].weight.float()
        B = _factor(model, name, group_key(m, "B"))[0].weight.float()
        out = out + _sq_norm_product(B, A) - 2 * torch.trace((B.T @ B0) @ (A0 @ A.T)) + _sq_norm_product(B0, A0)
    return out


def _mean(errs: Mapping[str, float]) -> float:
    return sum(errs.values()) / len(errs) if errs else 0.0


def _freeze_all_but(model: Any, params: Sequence[nn.Parameter]) -> None:
    """Only the loadings learn in a refit (``set_adapter`` makes the adapter's heads trainable again)."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _original(state: SHAREState, name: str, original: Optional[str], token: Optional[str]) -> Tuple[str, Any]:
    """The original adapter's local folder (downloaded if a Hub id) and it opened; its fingerprint checked."""
    rec = state.records[name]
    src = original or rec.source
    if not src:
        raise TrainingError(
            f"adapter {name!r} has no recorded source: refit needs its original adapter to match. Pass "
            "original='path/or/hub-id' (the PEFT adapter it was compressed from).", adapter=name)
    a = open_adapter(src, name, **({"token": token} if token else {}))
    if rec.sha256 and a.sha256() != rec.sha256:
        a.close()
        raise TrainingError(
            f"adapter {name!r}: {src} is not the adapter it was compressed from (sha256 {a.sha256()[:12]}…, the "
            f"checkpoint recorded {rec.sha256[:12]}…). Pass original= the adapter that was compressed.",
            adapter=name, path=src)
    return a.folder, a


def _unload(model: Any) -> None:
    """Remove PEFT's layers from the base model, whose saved-whole modules get their own weights back.

    PEFT's ``unload()`` leaves the active adapter's copy of a ``modules_to_save`` module in the base
    model; the caller's base model must come back as it was given.
    """
    inner = model.base_model.model
    saved = {n: {k: v.detach().clone() for k, v in m.original_module.state_dict().items()}
             for n, m in inner.named_modules() if hasattr(m, "original_module") and hasattr(m, "modules_to_save")}
    base = model.unload()
    for n, sd in saved.items():
        base.get_submodule(n).load_state_dict(sd)


def _load_heads(model: Any, name: str, rec: AdapterRecord) -> None:
    """The adapter's own heads (bit-exact) into the refit model: the loadings are refit under them."""
    from peft import set_peft_model_state_dict

    if not rec.heads:
        return
    result = set_peft_model_state_dict(model, dict(rec.heads), adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"adapter {name!r}: the model has no module for its head tensor {result.unexpected_keys[0]}",
                           adapter=name)


def _load_teacher(model: Any, folder: str) -> None:
    result = model.load_adapter(folder, adapter_name=TEACHER)
    missing = [k for k in getattr(result, "missing_keys", []) if TEACHER in k]
    if missing:
        raise AdapterError(f"the original adapter at {folder} has no weights for {missing[0]}", path=folder)
