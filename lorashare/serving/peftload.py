"""PEFT loading: rebuilt adapters of a state registered on a transformers model as a ``PeftModel``.

peft is imported only here, and only when a model is loaded.  PEFT computes each adapter itself,
so every config PEFT loads is loaded as PEFT would load the original adapter.

An adapter whose name holds a dot (``billing-v1.2``, which lorashare accepts) cannot keep it in
PEFT, whose adapter names are torch module names: it is registered as :func:`peft_name` of it,
the dots turned into underscores (``billing-v1_2``), and that is the name to give the returned
``PeftModel`` (``set_adapter``, ``save_pretrained``'s subfolder).

Example:
    >>> pm = load_into(share.state, base_model, ["billing", "refunds"])  # doctest: +SKIP
    >>> pm.set_adapter("refunds")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..codec.state import SHAREState, peft_config, rebuild
from ..errors import AdapterError, ConfigError
from ..utils.names import group_key, split_group_key

logger = logging.getLogger(__name__)

__all__ = ["load_into", "check_fits", "check_module", "has_peft_layers", "load_hint", "peft_name"]


def peft_name(name: str) -> str:
    """The name adapter ``name`` has inside a ``PeftModel``: itself, its dots turned into underscores.

    PEFT keeps adapters in torch ``ModuleDict``s, whose keys cannot hold a dot.

    Example:
        >>> peft_name("billing-v1.2"), peft_name("refunds")
        ('billing-v1_2', 'refunds')
    """
    return name.replace(".", "_")


def _check_peft_names(names: Sequence[str], held: Sequence[str] = ()) -> None:
    """Refuse an adapter whose PEFT name is taken: by another of ``names`` (``a.b`` and ``a_b``), or in ``held``
    (the adapters a ``PeftModel`` holds already)."""
    seen: Dict[str, str] = {}
    for n in names:
        pn = peft_name(n)
        why = " (PEFT's adapter names cannot hold a dot: lorashare turns dots into underscores)" if pn != n else ""
        if pn in held:
            raise ConfigError(
                f"adapter {n!r} would be {pn!r} in PEFT, which this PeftModel already holds{why}. Load it into a "
                f"freshly loaded base model, or remove that one first (delete_adapter({pn!r})).", adapter=n)
        other = seen.setdefault(pn, n)
        if other != n:
            raise ConfigError(
                f"adapters {other!r} and {n!r} would both be {pn!r} in PEFT, whose adapter names cannot hold a dot "
                "(lorashare turns dots into underscores there). Load them into separate models, or rename one "
                "(remove_adapter, then add it under another name).", adapter=n)


def load_hint(state: SHAREState, name: str, model: Any) -> str:
    """How to load the base model ``name`` was trained on: its id, and the class its task type needs.

    Example:
        >>> load_hint(state, "billing", bert_model)  # doctest: +SKIP
        "adapter 'billing' is a SEQ_CLS adapter of 'bert-base-uncased': load it with AutoModelForSequenceClassification..."
    """
    from ..hub.card import model_class
    from ..peft.adapters import num_labels

    rec = state.records[name]
    trained = rec.config.get("base_model_name_or_path") or state.base_model
    task = rec.config.get("task_type")
    cls = model_class(task)
    have = type(model).__name__
    if task and not have.endswith(cls.replace("AutoModel", "")):
        labels = num_labels(rec.heads)
        args = f"{trained!r}" + (f", num_labels={labels}" if labels and task == "SEQ_CLS" else "")
        return (f"Adapter {name!r} is a {task} adapter, and this model is a {have}: load the base model with "
                f"{cls}.from_pretrained({args}).")
    if trained:
        return f"The adapters were trained on {trained!r}; load that base model."
    return "Load the base model the adapters were trained on."


def load_into(state: SHAREState, model: Any, names: Sequence[str]) -> Any:
    """Register the adapters ``names`` of ``state`` on ``model`` (a base model or a ``PeftModel``); ``names[0]`` is active.

    Each adapter is named :func:`peft_name` of its name in the returned ``PeftModel`` (the name itself
    unless it holds a dot).
    """
    from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict

    if not isinstance(model, PeftModel) and has_peft_layers(model):
        raise ConfigError(
            f"this {type(model).__name__} already holds PEFT LoRA layers: apply() and load_into() change the base "
            "model in place. Pass a freshly loaded base model, or the PeftModel they returned to add adapters to it.")
    check_fits(state, model, names)
    _check_peft_names(names, list(model.peft_config) if isinstance(model, PeftModel) else ())
    if isinstance(model, PeftModel):
        with_head = [a for a, c in model.peft_config.items() if getattr(c, "modules_to_save", None)]
        headless = [n for n in names if not state.records[n].heads]
        if with_head and headless:
            raise ConfigError(
                f"adapter {headless[0]!r} has no saved head, and this PeftModel already holds {with_head[0]!r}, which "
                "saves one (modules_to_save): PEFT cannot add a head-less adapter after it. Load them in one call on "
                f"a fresh base model: share.load_into(base_model, {[*headless, *with_head]!r}).")
    # PEFT cannot load a head-less adapter once another adapter has wrapped a head
    # (modules_to_save), so head-less adapters go in first; the active one is names[0].
    for n in sorted(names, key=lambda n: bool(state.records[n].heads)):
        cfg = PeftConfig.from_peft_type(**peft_config(state.records[n], n))
        cfg.inference_mode = True
        pn = peft_name(n)
        if pn != n:
            logger.info("adapter %r is %r in the PeftModel (PEFT's adapter names cannot hold a dot)", n, pn)
        if isinstance(model, PeftModel):
            model.add_adapter(pn, cfg)
        else:
            model = get_peft_model(model, cfg, adapter_name=pn)
        # PEFT's saved key form, whatever keys the adapter had: set_peft_model_state_dict
        # needs the base_model.model. prefix and no adapter-name infix.
        result = set_peft_model_state_dict(model, rebuild(state, n, peft_keys=True), adapter_name=pn)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{pn}." in k]
        if missing:
            raise AdapterError(f"adapter {n!r}: the model has no weights for {missing[0]}", adapter=n)
    if names:
        model.set_adapter(peft_name(names[0]))
    model.eval()
    return model


def has_peft_layers(model: Any) -> bool:
    """Whether PEFT already wrapped layers of ``model`` (an earlier ``get_peft_model`` changed it in place)."""
    return getattr(model, "peft_config", None) is not None or any(
        hasattr(m, "lora_A") for m in model.modules()) if isinstance(model, torch.nn.Module) else False


def check_fits(state: SHAREState, model: Any, names: Sequence[str]) -> None:
    """Refuse a base model whose modules do not have the adapters' shapes, before PEFT touches it."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    comps = state.components
    for n in names:
        hint = load_hint(state, n, base)
        for key in state.records[n].weights:
            module, side = split_group_key(key)
            if side != "A" or group_key(module, "B") not in comps:
                continue
            check_module(base, module, int(comps[key].shape[0]), int(comps[group_key(module, "B")].shape[0]),
                         adapter=n, hint=hint)


def check_module(model: Any, module: str, d_in: int, d_out: int, *, adapter: str, hint: str) -> None:
    """Refuse ``model`` unless ``module`` is in it and maps ``d_in`` → ``d_out`` features (if linear-like)."""
    this = getattr(model, "name_or_path", None) or type(model).__name__
    try:
        found = model.get_submodule(module)
    except AttributeError:
        raise AdapterError(
            f"adapter {adapter!r}: module {module} is not in the model ({this}). {hint}", adapter=adapter, layer=module,
        ) from None
    have = _features(found)
    if have is not None and have != (d_in, d_out):
        raise AdapterError(
            f"adapter {adapter!r}: module {module} expects {d_in} → {d_out} features (lora_A (r, {d_in}), "
            f"lora_B ({d_out}, r)), but in the model ({this}) it maps {have[0]} → {have[1]}. {hint}",
            adapter=adapter, layer=module,
        )


def _features(module: Any) -> Optional[Tuple[int, int]]:
    """``(in, out)`` features of a linear-like module (PEFT-wrapped or not), ``None`` if not linear-like."""
    getter = getattr(module, "get_base_layer", None)  # a PEFT LoRA layer wraps the original
    m = getter() if callable(getter) else module
    if isinstance(m, torch.nn.Linear):
        return int(m.in_features), int(m.out_features)
    w = getattr(m, "weight", None)
    if type(m).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:  # GPT-2's: weight is (in, out)
        return int(w.shape[0]), int(w.shape[1])
    return None
