"""What lorashare reads from a LoRA ``adapter_config.json``: its checks, PEFT's patterns, the scale.

One owner for these facts, used for adapters as they are read (:mod:`lorashare.peft.adapters`), for the
copies kept in checkpoints (:mod:`lorashare.format.checkpoint`) and for serving.

It is also the one definition of what PEFT computes for an adapter config: :func:`module_scale`
gives each module's scale as ``PeftModel.from_pretrained`` sets it, and :func:`peft_features`
lists the config values with which PEFT computes more than ``W x + s·B·A x`` on the saved
modules.  Whatever computes an adapter without PEFT (``serve()``, and the folders written for
inference engines) refuses those with :func:`check_forward`, naming the adapter and the value.
"""

from __future__ import annotations

import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Type

from ..errors import AdapterError, LoraShareError

__all__ = ["check_lora_config", "pattern_value", "module_alpha", "module_scale", "PEFT_DEFAULT_ALPHA", "Feature",
           "peft_features", "engine_features", "check_forward", "engine_config"]

#: ``LoraConfig.lora_alpha``'s default in PEFT: the alpha of an ``adapter_config.json`` that has none
#: (``PeftModel.from_pretrained`` builds its ``LoraConfig`` from the file, so the default fills the gap).
PEFT_DEFAULT_ALPHA = 8


def _pattern_regex(pat: str) -> "re.Pattern[str]":
    """The regex PEFT builds from a ``rank_pattern`` / ``alpha_pattern`` key (``peft.utils.other.get_pattern_key``)."""
    return re.compile(rf"(.*\.)?({pat})")


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matches a module-path suffix.

    The keys were checked by :func:`check_lora_config`, so each compiles.
    """
    for pat, value in (patterns or {}).items():
        if module == pat or _pattern_regex(pat).fullmatch(module):
            return value
    return default


def module_alpha(config: Mapping[str, Any], module: str) -> float:
    """The ``lora_alpha`` PEFT gives ``module``: its ``alpha_pattern`` entry, else ``lora_alpha``, else PEFT's default.

    Example:
        >>> module_alpha({"r": 4}, "q"), module_alpha({"lora_alpha": 16, "alpha_pattern": {"q": 2}}, "layer.0.q")
        (8.0, 2.0)
    """
    alpha = config.get("lora_alpha")
    alpha = PEFT_DEFAULT_ALPHA if alpha is None else alpha  # a null one is refused by peft_features
    return float(pattern_value(config.get("alpha_pattern") or {}, module, alpha))


def module_scale(config: Mapping[str, Any], module: str, rank: int) -> float:
    """The LoRA scaling ``s`` in ``ΔW = s·B·A`` for one module, as PEFT sets it: alpha/r, or alpha/√r with rsLoRA.

    ``rank`` is the module's own rank (``rank_pattern`` applied, as its factors have it).

    Example:
        >>> module_scale({"r": 4, "lora_alpha": 8}, "q", 4), module_scale({"r": 4}, "q", 4)
        (2.0, 2.0)
        >>> module_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}, "q", 16)
        2.0
    """
    alpha = module_alpha(config, module)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


@dataclass(frozen=True)
class Feature:
    """A value of an adapter config with which PEFT computes more than ``s·B·A`` on the saved modules.

    Attributes:
        key: the config key (``init_lora_weights``).
        value: its value, as the config holds it.
        why: what PEFT (or, for an engine, the engine) does with it, in a few words.
    """

    key: str
    value: Any
    why: str

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} ({self.why})"


#: ``init_lora_weights`` values whose init touches only the LoRA factors, which the saved ones replace
#: on load: ``PeftModel.from_pretrained`` then computes ``W x + s·B·A x`` with the base weight as loaded.
#: (``lora_ga`` falls back to the default init when, as on load, no gradients are attached; ``mica``
#: only freezes ``lora_B``.  Checked against peft 0.22 by tests/test_serve_equals_peft.py.)
_PLAIN_INITS = frozenset({True, False, "gaussian", "orthogonal", "eva", "nora", "mica", "lora_ga"})
#: Inits that rewrite the base weight when PEFT builds the layer, on load too (``update_layer``).
_BASE_REWRITES = {
    "pissa": "PEFT rewrites the base weight to W − s·B₀A₀ (its top singular directions) on load",
    "olora": "PEFT rewrites the base weight to W − s·B₀A₀ (a QR of W) on load",
    "corda": "PEFT rewrites the base weight to W − s·B₀A₀ (CorDA's decomposition) on load",
    "astra": "PEFT rewrites the base weight to W − s·B₀A₀ (ASTRA's decomposition) on load",
    "loftq": "PEFT replaces the base weight by its LoftQ quantization on load",
}
#: Keys PEFT reads that change nothing beyond which modules get ``s·B·A`` (the saved factors say that),
#: the scale (:func:`module_scale`), training only (dropout, sub-configs of other inits), or
#: metadata.  Any other key with a set value is refused: lorashare cannot say what PEFT does with it.
_PLAIN_KEYS = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "fan_in_fan_out", "lora_dropout",
    "modules_to_save", "megatron_core", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "loftq_config", "eva_config", "corda_config", "astra_config", "lora_ga_config", "init_lora_weights", "bias",
})
#: Keys whose set value changes PEFT's forward: what it then does.
_FORWARD_KEYS = {
    "use_dora": "DoRA rescales each output column by a learned magnitude",
    "alora_invocation_tokens": "aLoRA applies the adapter only from the invocation tokens on",
    "lora_bias": "lora_B has a trained bias",
    "target_parameters": "LoRA on nn.Parameters (such as MoE experts), not on layers",
    "layer_replication": "PEFT duplicates decoder layers",
    "megatron_config": "LoRA on Megatron's parallel layers",
    "use_qalora": "QA-LoRA pools the input features",
    "trainable_token_indices": "trainable token embeddings (a delta on the embedding's rows)",
    "velora_config": "a LoRA variant (VeLoRA)",
    "monteclora_config": "a LoRA variant (MonteCLoRA)",
    "use_bdlora": "a LoRA variant (BD-LoRA)",
    "arrow_config": "a LoRA variant (Arrow routing among adapters)",
    "kasa_config": "a LoRA variant (KaSA)",
}


def _is_set(value: Any) -> bool:
    """Whether a config value asks for something: not null, false, 0, an empty list/dict or ``"none"``."""
    return value not in (None, False, 0, "", "none") and not (isinstance(value, (list, dict, tuple)) and not value)


def peft_features(config: Mapping[str, Any]) -> List[Feature]:
    """The values of ``config`` with which ``PeftModel.from_pretrained`` computes more than ``W x + s·B·A x``.

    ``W`` is the base model's own weight, ``s`` :func:`module_scale`, and ``B·A`` the saved factors
    of the saved modules (``modules_to_save`` heads replace their modules, as the saved tensors say).
    An empty list means serving the factors at that scale is exactly what PEFT computes.

    Example:
        >>> [f.key for f in peft_features({"r": 4, "init_lora_weights": "pissa", "alora_invocation_tokens": [5]})]
        ['init_lora_weights', 'alora_invocation_tokens']
    """
    out: List[Feature] = []
    if "lora_alpha" in config and config["lora_alpha"] is None:
        out.append(Feature("lora_alpha", None, "PEFT cannot build a layer with a null lora_alpha"))
    init = config.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _PLAIN_INITS:
        kind = next((k for k in _BASE_REWRITES if isinstance(init, str) and init.lower().startswith(k)), None)
        why = _BASE_REWRITES[kind] if kind else "an init lorashare does not know, which may change the base weight on load"
        out.append(Feature("init_lora_weights", init, why))
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        out.append(Feature("bias", bias, "PEFT trains and saves base-model biases with the adapter, and loads them"))
    for key, why in _FORWARD_KEYS.items():
        if _is_set(config.get(key)):
            out.append(Feature(key, config[key], why))
    for key in sorted(set(config) - _PLAIN_KEYS - set(_FORWARD_KEYS)):
        if _is_set(config[key]):
            out.append(Feature(key, config[key], "a PEFT setting lorashare does not know, which may change the forward"))
    return out


def engine_features(config: Mapping[str, Any], ranks: Mapping[str, int]) -> List[Feature]:
    """:func:`peft_features`, and what an inference engine (vLLM) computes differently from PEFT.

    vLLM reads only ``r``, ``lora_alpha`` and ``use_rslora`` for the scale, one for every module
    (it has no ``rank_pattern``/``alpha_pattern``), so a module whose PEFT scale differs from that
    one is listed.  ``ranks``: ``{module: its rank}`` as the factors have it.

    Example:
        >>> engine_features({"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 8}}, {"l.q": 8, "l.v": 2})[0].key
        'rank_pattern'
    """
    out = peft_features(config)
    r = config.get("r")
    if not (config.get("rank_pattern") or config.get("alpha_pattern")) or not isinstance(r, int) or r < 1:
        return out
    one = module_scale({k: config.get(k) for k in ("lora_alpha", "use_rslora")}, "", r)
    for module, rank in sorted(ranks.items()):
        s = module_scale(config, module, rank)
        if not math.isclose(s, one, rel_tol=1e-6):
            key = "rank_pattern" if rank != r else "alpha_pattern"
            out.append(Feature(key, config.get(key), f"module {module} has scale {s:g} in PEFT, and vLLM scales every "
                               f"module by lora_alpha/{'√' if config.get('use_rslora') else ''}r = {one:g}"))
            break
    return out


def check_forward(config: Mapping[str, Any], who: str, *, engine: bool = False,
                  ranks: Optional[Mapping[str, int]] = None) -> None:
    """Refuse adapter ``who`` if serving its factors at :func:`module_scale` is not what PEFT computes.

    ``engine=True`` checks a folder written for an inference engine (:func:`engine_features`, with
    ``ranks``); otherwise lorashare's own ``serve()`` (:func:`peft_features`).

    Example:
        >>> check_forward({"r": 4, "init_lora_weights": "pissa"}, "billing")
        Traceback (most recent call last):
        lorashare.errors.AdapterError: adapter 'billing': its adapter_config.json has init_lora_weights='pissa' ...
    """
    found = engine_features(config, ranks or {}) if engine else peft_features(config)
    if not found:
        return
    f = found[0]
    more = f" (and {', '.join(g.key for g in found[1:])})" if len(found) > 1 else ""
    if engine:
        fix = ("An inference engine would serve it without that, so it is not written for one. Serve it with PEFT: "
               f"share.apply(base_model, {who!r}), or retrain it without {f.key}.")
    else:
        fix = (f"serve() computes W x + s·B·A x only, so it refuses this adapter rather than serve other outputs "
               f"than PEFT's. Use PEFT itself: share.apply(base_model, {who!r}) (or load_into), or serve without "
               f"it (adapters=[...]).")
    raise AdapterError(f"adapter {who!r}: its adapter_config.json has {f}{more}. {fix}", adapter=who,
                       problem=f"adapter {who!r}: its adapter_config.json has {f}{more}.")


def engine_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    """``config`` as written for an inference engine: PEFT's defaults that engines require made explicit.

    vLLM requires ``lora_alpha``; a config without one is PEFT's default alpha (:data:`PEFT_DEFAULT_ALPHA`).

    Example:
        >>> engine_config({"r": 4})["lora_alpha"]
        8
    """
    out = dict(config)
    if out.get("lora_alpha") is None:
        out["lora_alpha"] = PEFT_DEFAULT_ALPHA
    return out


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    """A finite JSON number (``true`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_target_parameters(config: Mapping[str, Any], who: str, path: str, *, error: Type[LoraShareError],
                             prefix: str, fix: str) -> None:
    """Refuse PEFT's ``target_parameters`` (LoRA on ``nn.Parameter``s, PEFT's ``ParamWrapper``: MoE experts).

    For a 3-D experts parameter one ``lora_A``/``lora_B`` pair spans every expert (rank r × experts) under a
    module that is no linear layer (``experts.base_layer``); for a 2-D weight the factors look like a plain
    LoRA's, but the config targets no module, so a checkpoint made from it would not load, and what serves
    or exports it computes LoRA layers, not ``ParamWrapper``'s.  So it is refused where adapters come in
    (and in a checkpoint's copy of the config), saying what is unsupported.  Null or ``[]`` is PEFT's default.
    """
    params = config.get("target_parameters")
    if params is None or params == []:
        return
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise error(f"adapter {who!r}: {prefix}target_parameters is {reprlib.repr(params)} in {path}, expected a list "
                    f"of parameter names (or null). {fix}", adapter=who, path=path)
    shown = ", ".join(params[:4]) + (f", … ({len(params)} in all)" if len(params) > 4 else "")
    linear = sorted({p[: -len(".weight")].rsplit(".", 1)[-1] for p in params if p.endswith(".weight")})
    hint = (f" For the weights of linear layers, target_modules={linear!r} trains the same LoRA as plain "
            "modules, which lorashare compresses." if linear else "")
    raise error(
        f"adapter {who!r} uses PEFT {prefix}target_parameters (LoRA on parameters: {shown}) in {path}, which "
        "lorashare does not compress yet: PEFT applies those factors to the parameter itself (its ParamWrapper, "
        "not a LoRA layer), and for 3-D MoE expert parameters one lora_A/lora_B pair spans every expert. Keep it "
        f"as a plain PEFT adapter, outside the SHARE checkpoint.{hint}",
        adapter=who, path=path)


def check_lora_config(
    config: Dict[str, Any],
    who: str,
    path: str,
    *,
    error: Type[LoraShareError] = AdapterError,
    prefix: str = "",
    require_r: bool = False,
    fix: str = "Fix the value, or re-save the adapter with PEFT (LoraConfig validates it).",
) -> None:
    """Check the fields of a LoRA ``adapter_config.json`` that lorashare reads.

    Also checks the copy kept in a checkpoint's ``adapter_meta.json`` (``error=CheckpointError``,
    ``prefix="original_config."``, where ``r`` is required); ``fix`` ends each message.
    """

    def fail(key: str, value: Any, expected: str) -> LoraShareError:
        return error(
            f"adapter {who!r}: {prefix}{key} is {reprlib.repr(value)} in {path}, expected {expected}. {fix}",
            adapter=who,
            path=path,
        )

    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise error(
            f"adapter {who!r}: {prefix}peft_type is {reprlib.repr(peft_type)} in {path}, expected 'LORA'. "
            "lorashare compresses LoRA adapters only.",
            adapter=who,
            path=path,
        )
    for flag in ("use_dora", "use_rslora"):
        if config.get(flag) is not None and not isinstance(config.get(flag), bool):
            raise fail(flag, config[flag], "true or false")
    if config.get("use_dora"):
        raise error(
            f"adapter {who!r}: use_dora=True in {path}. DoRA's magnitude vectors make ΔW more than "
            "B·A, which a shared basis cannot represent; merge or retrain it as plain LoRA.",
            adapter=who,
            path=path,
        )
    _check_target_parameters(config, who, path, error=error, prefix=prefix, fix=fix)
    r = config.get("r")
    if (r is not None or require_r) and not _is_int(r):
        raise fail("r", r, "an integer ≥ 1 (the LoRA rank)")
    alpha = config.get("lora_alpha")
    if alpha is not None and not _is_number(alpha):
        raise fail("lora_alpha", alpha, "a finite number")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise fail("base_model_name_or_path", base, "a string (a Hub model id or a folder)")
    for key, is_value, expected in (
        ("rank_pattern", _is_int, "an integer ≥ 1"),
        ("alpha_pattern", _is_number, "a finite number"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise fail(key, patterns, 'an object {"<module regex>": value, ...} (or null)')
        for pat, value in patterns.items():
            try:
                _pattern_regex(pat)
            except (re.error, RecursionError, OverflowError, ValueError) as exc:
                raise error(
                    f"adapter {who!r}: {prefix}{key} key {reprlib.repr(pat)} in {path} is not a valid regular "
                    f"expression ({exc}). PEFT matches these keys as regexes against module paths: fix the key, "
                    "or escape it (re.escape) to match a name literally.",
                    adapter=who,
                    path=path,
                ) from None
            if not is_value(value):
                raise fail(f"{key}[{pat!r}]", value, expected)
