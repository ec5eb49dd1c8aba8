"""Refit: an adapter's loadings trained to reproduce its original adapter's outputs (distillation).

The student is the adapter as the checkpoint stores it, built by
:func:`lorashare.training.subspace.build_peft_model` over the frozen bases; the teacher is the
original adapter (its fingerprint checked), loaded beside it.  A few hundred unlabelled inputs
are enough.

Example:
    >>> state2, report = refit(share.state, "billing", batches, base_model=base)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from ..codec.state import AdapterRecord, SHAREState, peft_config
from ..errors import AdapterError, ConfigError, LoraShareError, TrainingError
from ..peft.adapters import open_adapter
from ..serving.peftload import peft_name
from ..utils.names import group_key
from .subspace import TEACHER, build_peft_model, check_base_model, factor_of, stored_errors, stored_weight

logger = logging.getLogger(__name__)

__all__ = ["refit", "merge_refit"]


def _outputs(out: Any) -> torch.Tensor:
    t = getattr(out, "logits", None)
    if t is None:
        t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", None)
    if not isinstance(t, torch.Tensor):
        raise TrainingError(f"the model returned {type(out).__name__} without logits or a hidden state to match: "
                            "pass select=lambda out: ... to say which tensor of its output to match.")
    return t


def _check_batches(batches: Sequence[Any], what: str) -> None:
    """Each batch is a mapping that holds the model's inputs as tensors (as a tokenizer returns them)."""
    fix = "e.g. tokenizer(texts, padding=True, return_tensors='pt'); labels are not needed"
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping):
            raise ConfigError(f"refit: {what}[{i}] is a {type(b).__name__}; expected a dict of the model's inputs as "
                              f"tensors (input_ids, attention_mask, ...), {fix}.")
        if not any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in b.values()):
            found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(b.items())[:6]) or "nothing"
            raise ConfigError(f"refit: {what}[{i}] holds no tensor ({found}); expected the model's inputs as "
                              f"tensors (input_ids, attention_mask, ...), {fix}.")


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
             device: torch.device, select: Callable[[Any], torch.Tensor], hidden: bool = False,
             teacher: str = TEACHER) -> Dict[str, float]:
    """Loss, hidden-state loss and top-1 agreement of adapter ``name`` with the teacher on ``batches``."""
    total, total_h, agree, count, n = 0.0, 0.0, 0, 0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            b = _on(b, device)
            model.set_adapter(teacher)
            t, th = _run(model, b, select, hidden)
            model.set_adapter(peft_name(name))
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

    from ..codec.edit import check_known

    check_known(state, name)
    if loss not in ("kl", "mse"):
        raise ConfigError(f"loss={loss!r}: expected 'kl' or 'mse'.")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs={epochs!r}: expected an integer ≥ 1.")
    batches = list(batches)
    if not batches:
        raise ConfigError("refit: batches is empty; give a few hundred of the task's inputs (labels are not needed).")
    evals = list(eval_batches) if eval_batches is not None else batches
    _check_batches(batches, "batches")
    if evals is not batches:
        _check_batches(evals, "eval_batches")
    # The teacher's adapter name must differ from the student's (an adapter may be named like the default).
    teacher = TEACHER if peft_name(name) != TEACHER else f"{TEACHER}_original"
    select = select or _outputs
    rec = state.records[name]
    teacher_folder, adapter = _original(state, name, original, token)
    try:
        originals = {m: (adapter.read_factor(m, "A").float(), adapter.read_factor(m, "B").float())
                     for m in adapter.modules if group_key(m, "A") in rec.weights}
    finally:
        adapter.close()
    before_err = stored_errors(state, name, rec, originals)
    from peft import PeftConfig

    modules = [k[:-2] for k in rec.weights if k.endswith(":A")]
    check_base_model(state, base_model, name, modules)
    cfg = PeftConfig.from_peft_type(**peft_config(rec, name))
    cfg.inference_mode = False
    model = build_peft_model(state, base_model, name, cfg, modules, refit_of=name)
    _load_heads(model, name, rec)
    try:
        _load_teacher(model, teacher_folder, teacher)
        device = next(model.parameters()).device
        params = [factor_of(model, name, key)[0].parametrizations.weight.original for key in rec.weights]
        targets = {m: (A.to(device), B.to(device)) for m, (A, B) in originals.items()}
        with torch.no_grad():
            dist0 = float(_delta_w_distance(model, name, targets))
        try:
            first = _measure(model, name, batches, loss, temperature, device, select, hidden=bool(hidden),
                             teacher=teacher)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, LoraShareError):
                raise
            raise ConfigError(f"refit: the model refused the inputs of batches[0] (keys {sorted(batches[0])}): {exc}. "
                              "Give the model's inputs as tensors, e.g. tokenizer(texts, padding=True, "
                              "return_tensors='pt'), without labels.") from exc
        before = first if evals is batches else _measure(model, name, evals, loss, temperature, device, select,
                                                         teacher=teacher)
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
                    model.set_adapter(teacher)
                    t, th = _run(model, b, select, hidden0 > 0)
                model.set_adapter(peft_name(name))
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
        after = _measure(model, name, evals, loss, temperature, device, select, teacher=teacher)
        weights = dict(rec.weights)
        kept = after["loss"] < before["loss"]
        if kept:
            for key, p in zip(rec.weights, params):
                weights[key] = stored_weight(p.detach().float().cpu().contiguous(), state.spec.dtype)
        else:
            with torch.no_grad():
                for p, s0 in zip(params, start):
                    p.copy_(s0)
    finally:
        _unload(model)
    new_rec = rec.replace(weights=weights)
    after_err = stored_errors(state, name, new_rec, originals)
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
    # Measured against the original: no longer a bound, whatever a recompute had left.
    return state.next(records={**state.records, name: new_rec.replace(errors=after_err, errors_bound=False)}), report


def _sq_norm_product(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``‖B·A‖²`` through r × r products (never d_out × d_in)."""
    return torch.trace((B.T @ B) @ (A @ A.T))


def _delta_w_distance(model: Any, name: str, targets: Mapping[str, Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``Σ ‖B·A − B₀·A₀‖²`` over modules (the scale is the same on both sides, so it is left out)."""
    out = 0.0
    for m, (A0, B0) in targets.items():
        A = factor_of(model, name, group_key(m, "A"))[0].weight.float()
        B = factor_of(model, name, group_key(m, "B"))[0].weight.float()
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
    result = set_peft_model_state_dict(model, dict(rec.heads), adapter_name=peft_name(name))
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"adapter {name!r}: the model has no module for its head tensor {result.unexpected_keys[0]}",
                           adapter=name)


def _load_teacher(model: Any, folder: str, teacher: str = TEACHER) -> None:
    result = model.load_adapter(folder, adapter_name=teacher)
    missing = [k for k in getattr(result, "missing_keys", []) if f".{teacher}." in k or k.endswith(f".{teacher}")]
    if missing:
        raise AdapterError(f"the original adapter at {folder} has no weights for {missing[0]}", path=folder)


def merge_refit(now: SHAREState, before: SHAREState, after: SHAREState, name: str) -> SHAREState:
    """The state to publish once ``name`` was refitted from ``before`` into ``after``, while ``now`` is current.

    Refused when the adapter or its bases changed meanwhile (the refit trained on what is gone).
    """
    if now.records.get(name) is not before.records[name] or any(
            now.bases.get(k) is not before.bases[k] for k in before.records[name].weights):
        raise ConfigError(f"adapter {name!r} or the bases changed while it was refitted; refit it again.")
    return now if after is before else now.next(records={**now.records, name: after.records[name]})
