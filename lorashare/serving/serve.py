"""Serve every adapter of a SHARE checkpoint from one base model, mixed in one batch.

Each LoRA-targeted linear layer of the base model is wrapped.  The wrapper keeps the
module's two shared bases ``U_A`` (d_in × k_A) and ``U_B`` (d_out × k_B) once, plus a
stacked table of every served adapter's small per-module part, and adds to the base
output, row by row, ``ΔW_i x = U_B (s_i L_B,i L_A,iᵀ) U_Aᵀ x``.  A batch in which every
row uses another adapter then costs two shared products (``x·U_A`` and ``·U_Bᵀ``) and
a few k × r products per row, instead of one sub-batch per adapter as in PEFT.

Which table?  Per module, the smaller of the adapters' cores ``C_i = s_i L_A,i L_B,iᵀ``
(k_A × k_B each) and their scaled loadings (``s_i L_A,i``: k_A × r, ``L_B,i``: k_B × r).
Memory and per-row work are both proportional to that size, so the same rule picks the
smaller and the faster: loadings unless k < 2r, cores otherwise.

Tables belong to a *snapshot*: every table of one revision of the SHARE model, built
once per revision.  A call takes the snapshot of the latest revision when it starts and
every layer reads that one, so an edit made during a call (another thread adding,
removing or replacing an adapter) is served from the next call on, never half-way.

Rows pick their adapter through a router that the top-level ``forward``/``generate``
sets for the duration of one call (``adapter_names=[...]``, one per row, PEFT's
convention with ``"__base__"``); without it, the adapter chosen with ``set_adapter``
applies to every row.  Classifier heads and other ``modules_to_save`` are routed per
row too: each group of rows runs the module with its own adapter's tensors.

Each row gets what ``PeftModel.from_pretrained`` computes for its adapter.  An adapter whose
config makes PEFT compute more than ``W x + s·B·A x`` (a PiSSA or OLoRA init, aLoRA, trained
biases...: :func:`lorashare.format.loraconfig.peft_features`) is refused by name; ``apply()``
loads it through PEFT.

Example:
    >>> share = SHAREModel.from_pretrained("acme/support-share")  # doctest: +SKIP
    >>> model = share.serve(AutoModelForSequenceClassification.from_pretrained(base_id))  # doctest: +SKIP
    >>> model(**batch, adapter_names=["billing", "refunds", "__base__"]).logits  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch

from ..codec.state import SHAREState
from ..errors import AdapterError, ConfigError, UnknownAdapterError
from ..format.loraconfig import check_forward, module_scale
from ..format.storage import DTYPES
from ..utils.names import group_key, split_group_key
from .peftload import load_hint

logger = logging.getLogger(__name__)

__all__ = ["serve", "ServedModel", "BASE"]

#: The name that selects the plain base model for a row (PEFT's convention).
BASE = "__base__"

_MTS_INFIX = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
#: PEFT's LoRA layer keeps the original layer as ``base_layer``: a saved ``X.base_layer.weight`` is ``X.weight``.
_BASE_LAYER_INFIX = re.compile(r"\.base_layer(?=\.)")
_SAVED_PREFIX = "base_model.model."


class Servable(Protocol):
    """What serving needs of a SHARE model (a :class:`~lorashare.model.SHAREModel`): its current state."""

    @property
    def state(self) -> SHAREState: ...

    @property
    def adapter_names(self) -> List[str]: ...


# --------------------------------------------------------------------------- routing
class _Route:
    """Which adapter each row of the current call uses (global indices; 0 is the base model)."""

    __slots__ = ("plan", "rows", "idx", "single", "uniques", "expand", "_cache")

    def __init__(self, plan: "_Plan", idx: Optional[torch.Tensor], single: Optional[int], *,
                 expand: bool = False) -> None:
        self.plan = plan  # the snapshot every layer of this call reads
        self.idx = idx  # (rows,) int64 on the CPU, or None when every row shares ``single``
        self.rows = None if idx is None else int(idx.shape[0])
        self.single = single
        self.uniques: Tuple[int, ...] = (single,) if idx is None else tuple(sorted(set(idx.tolist())))
        if len(self.uniques) == 1:
            self.single = self.uniques[0]
        self.expand = expand
        self._cache: Dict[Tuple[int, str], torch.Tensor] = {}

    def index(self, n: int, device: torch.device, layer: str) -> torch.Tensor:
        """The per-row indices for a tensor of ``n`` rows on ``device``.

        Inside ``generate``, beams and ``num_return_sequences`` repeat each row
        (``repeat_interleave``), so a multiple of the batch is expanded the same way.
        """
        key = (n, str(device))
        got = self._cache.get(key)
        if got is not None:
            return got
        idx = self.idx
        if n != self.rows:
            if not (self.expand and n % self.rows == 0):
                raise ConfigError(
                    f"layer {layer} got {n} rows, but adapter_names names {self.rows} (one per row of the batch). "
                    "Give one adapter name per row; a layer whose input is not batch-first (rows first) cannot "
                    "be routed per row: use set_adapter() for such a model.",
                    layer=layer,
                )
            idx = idx.repeat_interleave(n // self.rows)
        got = idx.to(device)
        self._cache[key] = got
        return got


class _Router:
    """The served model's routing state, per thread (a call in one thread never sees another's rows)."""

    def __init__(self) -> None:
        self.default = _Route(_Plan([], {}, {}), None, 0)
        self._local = threading.local()

    def current(self) -> _Route:
        return getattr(self._local, "route", None) or self.default

    @contextlib.contextmanager
    def use(self, route: _Route) -> Iterator[None]:
        prev = getattr(self._local, "route", None)
        self._local.route = route
        try:
            yield
        finally:
            self._local.route = prev


# --------------------------------------------------------------------------- plans
@dataclass
class _LinearPlan:
    """The tables of one wrapped linear layer."""

    module: str
    u_a: torch.Tensor  # d_in × k_A
    u_b: torch.Tensor  # d_out × k_B
    slots: List[int]  # global index → row of the table (0 = no delta)
    core: Optional[torch.Tensor] = None  # (S+1) × k_A × k_B
    la: Optional[torch.Tensor] = None  # (S+1) × k_A × r, scale folded in
    lb: Optional[torch.Tensor] = None  # (S+1) × k_B × r
    slot_map: Optional[torch.Tensor] = None  # ``slots`` as a tensor, on the tables' device


@dataclass
class _HeadPlan:
    """The per-adapter tensors of one ``modules_to_save`` module."""

    module: str
    slots: List[int]  # global index → 1 + position in ``tensors`` (0 = the base module's own)
    tensors: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # {param path inside the module: tensor}
    copies: List[torch.nn.Module] = field(default_factory=list)  # per adapter, the module with its tensors


@dataclass
class _Plan:
    """A snapshot: every table of one revision, for one served set of adapters (never changed once built)."""

    names: List[str]
    linears: Dict[str, _LinearPlan]
    heads: Dict[str, _HeadPlan]
    state: Any = None  # a weak reference to the state it was built from (None: nothing served)
    placement: Any = None  # the base model's (device, dtype) the tables were built for
    requested: Optional[Tuple[str, ...]] = None

    def __post_init__(self) -> None:
        self.index = {n: i + 1 for i, n in enumerate(self.names)}
        for lp in self.linears.values():
            lp.slot_map = torch.tensor(lp.slots, dtype=torch.long, device=lp.u_a.device)

    def built_from(self, state: Any) -> bool:
        return self.state is not None and self.state() is state


def _linear_features(module: torch.nn.Module) -> Optional[Tuple[int, int]]:
    """``(in, out)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored in × out); else ``None``."""
    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    w = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    return None


def _module_device(module: torch.nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _placement(model: torch.nn.Module) -> Tuple[torch.device, Optional[torch.dtype]]:
    """Where and in which float dtype the base model computes: tables follow it (``.to()`` moves them)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.device, t.dtype
    return _module_device(model), None


def _mismatch_hint(state: SHAREState, base_model: torch.nn.Module) -> str:
    trained = state.base_model or ""
    this = getattr(base_model, "name_or_path", None) or type(base_model).__name__
    if trained and trained != this:
        return f"The adapters were trained on {trained!r}, and this model is {this!r}; load that base model."
    where = f" ({trained!r})" if trained else ""
    return f"Load the base model, with the config, that the adapters were trained on{where}."


def _plain_modules(model: torch.nn.Module, router: "_Router") -> Dict[str, torch.nn.Module]:
    """``{path: module}`` of ``model`` as it was before serving: this router's wrappers count as their originals."""
    out: Dict[str, torch.nn.Module] = {}

    def walk(mod: torch.nn.Module, path: str) -> None:
        if isinstance(mod, (_ServedLinear, _ServedHead)):
            if mod._router is not router:
                raise ConfigError(
                    f"module {path} is already served: this base model was passed to serve() before. Keep using "
                    "that served model (refresh() picks up changes), or unload() it first.", layer=path,
                )
            mod = mod.base_layer
        out[path] = mod
        for name, child in mod.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return out


def _plan(state: SHAREState, model: torch.nn.Module, names: Sequence[str], dtype: Optional[torch.dtype],
          router: "_Router") -> _Plan:
    """Every table of ``state`` for ``names``, checked against ``model``; nothing in ``model`` changes."""
    modules = _plain_modules(model, router)
    hint = _mismatch_hint(state, model)
    index = {n: i + 1 for i, n in enumerate(names)}
    components = state.components
    all_loadings = {n: r.loadings for n, r in state.records.items()}
    configs = {n: r.config for n, r in state.records.items()}
    heads = {n: r.heads for n, r in state.records.items() if r.heads}
    # module → [(global index, adapter, L_A, L_B, scale)]
    members: Dict[str, List[Tuple[int, str, torch.Tensor, torch.Tensor, float]]] = {}
    for n in names:
        loadings = all_loadings[n]
        config = configs.get(n) or {}
        if not config:
            raise AdapterError(
                f"adapter {n!r} has no LoRA config (its adapter_config.json), so its scale (lora_alpha/r) is "
                "unknown. Compress the adapter again from its folder, or give its config in adapter_configs.",
                adapter=n,
            )
        # Served as W x + s·B·A x: an adapter with which PEFT computes anything else is refused by name.
        check_forward(config, n)
        for key in loadings:
            module, side = split_group_key(key)
            if side != "A":
                continue
            kb = group_key(module, "B")
            if kb not in loadings or key not in components or kb not in components:
                raise AdapterError(
                    f"adapter {n!r}: module {module} lacks its {'B' if kb not in loadings else 'A'} loading or "
                    "its shared basis in the checkpoint. The checkpoint is corrupt; save it again from its adapters.",
                    adapter=n, layer=module,
                )
            la, lb = loadings[key], loadings[kb]
            if la.dim() != 2 or lb.dim() != 2 or la.shape[1] != lb.shape[1] \
                    or la.shape[0] != components[key].shape[1] or lb.shape[0] != components[kb].shape[1]:
                raise AdapterError(
                    f"adapter {n!r}: module {module} has loadings {tuple(la.shape)} (A) and {tuple(lb.shape)} (B) "
                    f"for bases of k = {components[key].shape[1]} and {components[kb].shape[1]}; "
                    "expected (k_A, r) and (k_B, r). The checkpoint is corrupt; save it again from its adapters.",
                    adapter=n, layer=module,
                )
            rank = int(la.shape[1])
            members.setdefault(module, []).append((index[n], n, la, lb, module_scale(config, module, rank)))

    linears: Dict[str, _LinearPlan] = {}
    for module, group in members.items():
        ua_src, ub_src = components[group_key(module, "A")], components[group_key(module, "B")]
        if module not in modules:
            raise AdapterError(
                f"adapter {group[0][1]!r}: module {module} is not in the base model. "
                f"{load_hint(state, group[0][1], model)}", adapter=group[0][1], layer=module,
            )
        target = modules[module]
        if hasattr(target, "lora_A") or hasattr(target, "base_layer"):
            raise AdapterError(
                f"module {module} is already a PEFT LoRA layer ({type(target).__name__}). serve() needs the plain "
                "base model: pass a freshly loaded one (PEFT's unload() keeps an adapter's copy of its head).", layer=module,
            )
        features = _linear_features(target)
        if features is None:
            raise AdapterError(
                f"adapter {group[0][1]!r}: module {module} is a {type(target).__name__}; serving supports LoRA on "
                "torch.nn.Linear and GPT-2's Conv1D only. Use share.apply() / load_into() for this model.",
                adapter=group[0][1], layer=module,
            )
        want = (int(ua_src.shape[0]), int(ub_src.shape[0]))
        if features != want:
            raise AdapterError(
                f"adapter {group[0][1]!r}: module {module} expects {want[0]} → {want[1]} features, but in the base "
                f"model it maps {features[0]} → {features[1]}. {hint}",
                adapter=group[0][1], layer=module,
            )
        device = _module_device(target)
        weight = getattr(target, "weight", None)
        floating = isinstance(weight, torch.Tensor) and weight.is_floating_point()
        dt = dtype or (weight.dtype if floating else torch.float32)
        linears[module] = _linear_plan(module, ua_src, ub_src, group, len(names), dt, device)

    head_plans = _head_plans(names, index, heads, configs, modules, set(linears), dtype, hint)
    for root, hp in head_plans.items():
        hp.copies = [_head_copy(modules[root], tensors) for tensors in hp.tensors]
    return _Plan(list(names), linears, head_plans)


def _linear_plan(
    module: str,
    ua_src: torch.Tensor,
    ub_src: torch.Tensor,
    group: Sequence[Tuple[int, str, torch.Tensor, torch.Tensor, float]],
    n_names: int,
    dtype: torch.dtype,
    device: torch.device,
) -> _LinearPlan:
    ka, kb = int(ua_src.shape[1]), int(ub_src.shape[1])
    r_max = max(int(la.shape[1]) for _, _, la, _, _ in group)
    slots = [0] * (n_names + 1)
    for pos, (g, *_rest) in enumerate(group):
        slots[g] = pos + 1
    plan = _LinearPlan(module, ua_src.to(device=device, dtype=dtype), ub_src.to(device=device, dtype=dtype), slots)
    if ka * kb < (ka + kb) * r_max:  # cores are the smaller table (and the fewer flops per row)
        core = torch.zeros(len(group) + 1, ka, kb, dtype=torch.float32, device=device)
        for pos, (_, _, la, lb, s) in enumerate(group):
            f32 = dict(device=device, dtype=torch.float32)
            core[pos + 1] = s * (la.to(**f32) @ lb.to(**f32).T)
        plan.core = core.to(dtype)
    else:  # loadings, zero-padded to the module's largest rank: zero columns add nothing
        la_t = torch.zeros(len(group) + 1, ka, r_max, dtype=torch.float32, device=device)
        lb_t = torch.zeros(len(group) + 1, kb, r_max, dtype=torch.float32, device=device)
        for pos, (_, _, la, lb, s) in enumerate(group):
            r = int(la.shape[1])
            la_t[pos + 1, :, :r] = s * la.float()
            lb_t[pos + 1, :, :r] = lb.float()
        plan.la, plan.lb = la_t.to(dtype), lb_t.to(dtype)
    return plan


def _head_root(owner: str, patterns: Sequence[str], modules: Mapping[str, torch.nn.Module]) -> str:
    """The ``modules_to_save`` module that holds ``owner``: its outermost ancestor named in ``patterns``."""
    parts = owner.split(".")
    for i in range(1, len(parts) + 1):
        cand = ".".join(parts[:i])
        if any(cand == p or cand.endswith("." + p) for p in patterns) and cand in modules:
            return cand
    return owner


def _head_plans(
    names: Sequence[str],
    index: Mapping[str, int],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Mapping[str, Any]],
    modules: Mapping[str, torch.nn.Module],
    lora_modules: set,
    dtype: Optional[torch.dtype],
    hint: str,
) -> Dict[str, _HeadPlan]:
    """Map every adapter's non-LoRA tensors to the base model's modules (PEFT's saved or in-model keys)."""
    found: Dict[str, Dict[str, Tuple[str, str, torch.Tensor]]] = {}  # adapter → {param path: (owner, param, tensor)}
    roots: Dict[str, set] = {}
    for n in names:
        tensors = heads.get(n) or {}
        patterns = [p for p in ((configs.get(n) or {}).get("modules_to_save") or []) if isinstance(p, str)]
        for key, t in tensors.items():
            path = key[len(_SAVED_PREFIX):] if key.startswith(_SAVED_PREFIX) else key
            path = _MTS_INFIX.sub("", path)
            if _BASE_LAYER_INFIX.search(path):
                # A LoRA layer's own base weight (PEFT saves it for a LoRA on lm_head or an embedding):
                # PEFT loads it into that layer, which serve() keeps once for every adapter.
                _check_base_weight(n, key, _BASE_LAYER_INFIX.sub("", path), t, modules, hint)
                continue
            owner, _, pname = path.rpartition(".")
            target = modules.get(owner) if owner else None
            have = None
            if target is not None:
                have = dict(target.named_parameters(recurse=False)).get(pname)
                if have is None:
                    have = dict(target.named_buffers(recurse=False)).get(pname)
            if have is None:
                raise AdapterError(
                    f"adapter {n!r}: its tensor {key!r} (a classifier head or modules_to_save) is not a parameter "
                    f"of the base model ({path!r} not found). {hint} Serving supports heads and modules_to_save; "
                    "trainable tokens and other PEFT extras are not.",
                    adapter=n, layer=owner or path,
                )
            if tuple(have.shape) != tuple(t.shape):
                raise AdapterError(
                    f"adapter {n!r}: its tensor {key!r} has shape {tuple(t.shape)}, but {path} in the base model has "
                    f"{tuple(have.shape)}. {hint} (For a classifier, load the base with the adapter's num_labels.)",
                    adapter=n, layer=owner,
                )
            found.setdefault(n, {})[path] = (owner, pname, t)
            roots.setdefault(_head_root(owner, patterns, modules), set()).add(n)
    # Nested roots (one adapter saved "classifier", another "classifier.dense") use the outermost.
    outer = {r: min((o for o in roots if r == o or r.startswith(o + ".")), key=len) for r in roots}
    plans: Dict[str, _HeadPlan] = {}
    for root in sorted(set(outer.values())):
        inner = [m for m in lora_modules if m == root or m.startswith(root + ".")]
        if inner or root == "":
            who = sorted(n for r, o in outer.items() if o == root for n in roots[r])[0]
            raise AdapterError(
                f"adapter {who!r}: module {root or '(the whole model)'} is saved whole (modules_to_save) and also "
                f"holds LoRA layers{f' ({inner[0]})' if inner else ''}; serving does not support that. Use "
                "share.apply() for this adapter.", adapter=who, layer=root,
            )
        plans[root] = _HeadPlan(root, [0] * (len(names) + 1))
    for n in names:
        per_root: Dict[str, Dict[str, torch.Tensor]] = {}
        for path, (owner, pname, t) in (found.get(n) or {}).items():
            root = next(o for r, o in outer.items() if path.startswith(r + ".") and o in plans)
            base_t = dict(modules[owner].named_parameters(recurse=False)).get(pname)
            if base_t is None:
                base_t = dict(modules[owner].named_buffers(recurse=False))[pname]
            dt = dtype if (dtype is not None and base_t.is_floating_point()) else base_t.dtype
            per_root.setdefault(root, {})[path[len(root) + 1:]] = t.to(device=base_t.device, dtype=dt)
        for root, tensors in per_root.items():
            plan = plans[root]
            plan.tensors.append(tensors)
            plan.slots[index[n]] = len(plan.tensors)
    return plans


def _check_base_weight(name: str, key: str, path: str, t: torch.Tensor, modules: Mapping[str, torch.nn.Module],
                       hint: str) -> None:
    """Accept a saved base weight of a LoRA layer only when it is the base model's own (then loading it changes nothing)."""
    owner, _, pname = path.rpartition(".")
    target = modules.get(owner)
    have = dict(target.named_parameters(recurse=False)).get(pname) if target is not None else None
    if have is None:
        raise AdapterError(
            f"adapter {name!r}: its tensor {key!r} is the base weight of LoRA layer {owner!r} (PEFT saves it with a "
            f"LoRA on lm_head or an embedding), but the base model has no {path!r}. {hint}", adapter=name, layer=owner)
    same = tuple(have.shape) == tuple(t.shape) and torch.equal(t.to(device=have.device, dtype=have.dtype), have.detach())
    if not same:
        raise AdapterError(
            f"adapter {name!r}: its tensor {key!r} replaces {path} of the base model (PEFT saves a LoRA-targeted "
            f"{owner}'s own weight with the adapter, and loads it), and it differs from this base model's "
            f"{tuple(have.shape)} {path}. serve() keeps one {path} for every adapter, so it cannot serve this one: "
            f"load the base model the adapter was trained on (a resized vocabulary?), or use share.apply(base_model, "
            f"{name!r}).", adapter=name, layer=owner)


# --------------------------------------------------------------------------- wrappers
def _per_row_cheaper(n: int, m: int, distinct: int, d_in: int, d_out: int, ka: int, kb: int, r: int) -> bool:
    """Whether ``n`` rows of ``m`` tokens with ``distinct`` adapters go faster through per-row factors.

    The shared path costs ``n·m·(d_in·k_A + k_A·r + r·k_B + k_B·d_out)``; per-row factors
    ``U_A s L_A,i`` and ``U_B L_B,i`` cost ``distinct·(d_in·k_A + d_out·k_B)·r`` to build, then
    ``n·(m+1)·(d_in + d_out)·r``.  That is fewer flops when k ≫ r and rows are long (prefill), but
    as many small batched products they ran 1.6–3× slower per flop than the shared ones here:
    hence the factor 2.
    """
    shared = n * m * (d_in * ka + ka * r + r * kb + kb * d_out) + n * (ka + kb) * r
    per_row = distinct * (d_in * ka + d_out * kb) * r + n * (m + 1) * (d_in + d_out) * r
    return 2 * per_row < shared


class _ServedLinear(torch.nn.Module):
    """A linear layer plus, per row, its adapter's update through the shared bases.

    It holds no table itself: each call reads the tables of its own snapshot (``route.plan``),
    so a call that started before an edit keeps the tables it started with.
    """

    def __init__(self, base_layer: torch.nn.Module, router: _Router, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._router = router
        self.module_name = module_name
        # One adapter's factors for the latest (tables, slot): decode steps reuse them.
        self._cache: Optional[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = None

    @property
    def tables(self) -> Optional[_LinearPlan]:
        """This layer's tables in the latest snapshot (``None``: no served adapter targets it)."""
        return self._router.default.plan.linears.get(self.module_name)

    # The latest snapshot's tensors, for inspection (a call reads its own snapshot's).
    u_a = property(lambda self: getattr(self.tables, "u_a", None))
    u_b = property(lambda self: getattr(self.tables, "u_b", None))
    core = property(lambda self: getattr(self.tables, "core", None))
    la = property(lambda self: getattr(self.tables, "la", None))
    lb = property(lambda self: getattr(self.tables, "lb", None))

    def extra_repr(self) -> str:
        lp = self.tables
        if lp is None:
            return f"{self.module_name}, no adapter"
        table = lp.core if lp.core is not None else lp.la
        return f"{self.module_name}, k=({lp.u_a.shape[1]}, {lp.u_b.shape[1]}), adapters={table.shape[0] - 1}, " \
               f"table={'cores' if lp.core is not None else 'loadings'}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        route = self._router.current()
        lp = route.plan.linears.get(self.module_name)
        if route.idx is None:  # one adapter for every row, whatever the shape of x
            slot = lp.slots[route.single] if lp is not None else 0
            return out if slot == 0 else self._add(out, *self._single(lp, x, slot))
        idx = route.index(int(x.shape[0]), x.device, self.module_name)  # checks the row count, even with no delta
        if lp is None:
            return out
        local = sorted({lp.slots[g] for g in route.uniques})
        if local == [0]:
            return out
        if len(local) == 1:
            return self._add(out, *self._single(lp, x, local[0]))
        return self._add(out, *self._mixed(lp, x, lp.slot_map[idx], local))

    def _add(self, out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``out + left @ right``, in place when the dtypes allow: no full-size temporary at prefill."""
        d_out = int(out.shape[-1])
        if out.dtype == left.dtype and out.is_contiguous():
            if left.dim() == 2:
                out.view(-1, d_out).addmm_(left, right)
            else:
                out.view(left.shape[0], -1, d_out).baddbmm_(left, right)
            return out
        return out + (left @ right).reshape(out.shape).to(out.dtype)

    def _factors(self, lp: _LinearPlan, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One adapter's ``(U_A s L_A, (U_B L_B)ᵀ)`` (d_in × r, r × d_out), cached for the latest slot."""
        c = self._cache
        if c is not None and c[0] == slot and c[1] is lp.la:
            return c[2], c[3]
        a, b = lp.u_a @ lp.la[slot], (lp.u_b @ lp.lb[slot]).mT
        self._cache = (slot, lp.la, a, b)
        return a, b

    def _single(self, lp: _LinearPlan, x: torch.Tensor, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every row with one adapter: ``delta = left @ right`` over the flattened tokens."""
        x2 = x.to(lp.u_a.dtype).reshape(-1, int(x.shape[-1]))
        if lp.core is not None:
            return (x2 @ lp.u_a) @ lp.core[slot], lp.u_b.mT
        a, b = self._factors(lp, slot)
        return x2 @ a, b

    def _mixed(self, lp: _LinearPlan, x: torch.Tensor, local: torch.Tensor,
               slots: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows with different adapters: shared products, or per-row factors when the rows are long."""
        n, d_in = int(x.shape[0]), int(x.shape[-1])
        x3 = x.to(lp.u_a.dtype).reshape(n, -1, d_in)
        m = int(x3.shape[1])
        d_out, ka, kb = int(lp.u_b.shape[0]), int(lp.u_a.shape[1]), int(lp.u_b.shape[1])
        if lp.core is not None:
            z = torch.bmm(x3 @ lp.u_a, lp.core[local])
        else:
            r = int(lp.la.shape[2])
            if _per_row_cheaper(n, m, len(slots), d_in, d_out, ka, kb, r):
                u = torch.tensor(slots, device=local.device)
                pos = torch.zeros(lp.la.shape[0], dtype=torch.long, device=local.device)
                pos[u] = torch.arange(len(slots), device=local.device)
                inv = pos[local]
                a = (lp.u_a @ lp.la[u])[inv]  # (n, d_in, r)
                b = (lp.u_b @ lp.lb[u])[inv]  # (n, d_out, r)
                return torch.bmm(x3, a), b.mT
            z = torch.bmm(torch.bmm(x3 @ lp.u_a, lp.la[local]), lp.lb[local].mT)
        return z.reshape(n * m, kb), lp.u_b.mT


def _batch_first(value: Any) -> Optional[int]:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def _head_copy(base: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``base`` with ``tensors`` in place of its own, sharing every other tensor with it."""
    memo: Dict[int, Any] = {id(t): t for t in (*base.parameters(), *base.buffers())}  # shared, not copied
    mod = copy.deepcopy(base, memo)
    for path, t in tensors.items():
        owner, _, name = path.rpartition(".")
        sub = mod.get_submodule(owner)
        if name in sub._parameters:
            sub._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        else:
            sub._buffers[name] = t
    return mod


class _ServedHead(torch.nn.Module):
    """A ``modules_to_save`` module (a classifier head...): each row runs it with its adapter's tensors.

    Each adapter gets its own copy of the module (built with the snapshot), sharing every tensor
    it does not replace with the original: a copy per adapter (as PEFT does) keeps concurrent
    calls apart, where swapping tensors in and out of one module would not.
    """

    def __init__(self, base_layer: torch.nn.Module, router: _Router, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._router = router
        self.module_name = module_name

    @property
    def copies(self) -> List[torch.nn.Module]:
        """The per-adapter copies of this module in the latest snapshot."""
        hp = self._router.default.plan.heads.get(self.module_name)
        return list(hp.copies) if hp is not None else []

    def extra_repr(self) -> str:
        return f"{self.module_name}, adapters={len(self.copies)}"

    def _run(self, hp: Optional[_HeadPlan], slot: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return (self.base_layer if slot == 0 or hp is None else hp.copies[slot - 1])(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self._router.current()
        hp = route.plan.heads.get(self.module_name)
        slots = hp.slots if hp is not None else [0]
        if route.single is not None and route.idx is None:
            return self._run(hp, slots[route.single] if route.single < len(slots) else 0, args, kwargs)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is None:
            raise ConfigError(f"module {self.module_name} got no tensor input to route per row.",
                              layer=self.module_name)
        n = int(first.shape[0])
        idx = route.index(n, torch.device("cpu"), self.module_name)
        if hp is None:
            return self._run(None, 0, args, kwargs)
        local = torch.tensor(slots, dtype=torch.long)[idx]
        groups = sorted(set(local.tolist()))
        if len(groups) == 1:
            return self._run(hp, groups[0], args, kwargs)
        out: Optional[torch.Tensor] = None
        for slot in groups:
            rows = torch.nonzero(local == slot).squeeze(1)
            def pick(v: Any, rows: torch.Tensor = rows) -> Any:
                return v.index_select(0, rows.to(v.device)) if _batch_first(v) == n else v

            part = self._run(hp, slot, [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()})
            if not isinstance(part, torch.Tensor) or _batch_first(part) != len(rows):
                raise ConfigError(
                    f"module {self.module_name} (modules_to_save) returned {type(part).__name__}, not a batch-first "
                    "tensor, so it cannot be routed per row. Serve one adapter at a time here (set_adapter).",
                    layer=self.module_name,
                )
            if out is None:
                out = part.new_empty((n, *part.shape[1:]))
            out[rows.to(part.device)] = part
        return out


# --------------------------------------------------------------------------- the served model
def _resolve_dtype(dtype: Any) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ConfigError(f"dtype={dtype!r}: expected None (the base model's), or one of {', '.join(DTYPES)}.")


def _set_child(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


class ServedModel(torch.nn.Module):
    """A base model that runs every served adapter of a SHARE checkpoint, one per row.

    Keeps the base model's API (``forward``, ``generate``, ``.config``, ``.device``, ``.to()``;
    other attributes are the base model's).  Build it with :meth:`SHAREModel.serve`.

    Example:
        >>> model = share.serve(base_model)  # doctest: +SKIP
        >>> model(**batch, adapter_names=["billing", "__base__"]).logits  # doctest: +SKIP
        >>> model.set_adapter("refunds"); model.generate(**batch, max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(self, share: Servable, model: torch.nn.Module, *, adapters: Optional[Sequence[str]] = None,
                 dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"serve() needs a torch model (a transformers model), got {type(model).__name__}.")
        if getattr(model, "peft_config", None) is not None:  # a PeftModel, or PEFT adapters loaded by transformers
            raise ConfigError(
                f"serve() needs the plain base model, got a {type(model).__name__}. Pass a freshly loaded base "
                "model (PEFT's unload() keeps an adapter's copy of its head, which would serve the wrong rows).")
        self.model = model
        # A weak reference: the served model keeps its own tables, so dropping the SHAREModel frees its
        # copy of the loadings; keep it to add or remove adapters later.
        self._share_ref = weakref.ref(share)
        self._dtype = _resolve_dtype(dtype)
        self._requested = None if adapters is None else self._check_requested(adapters)
        self._router = _Router()
        self._lock = threading.Lock()  # one snapshot is built at a time; calls never wait for another's
        self._active: Optional[str] = None  # None: the first served adapter (logged once)
        self._told_default = False
        self._plan = _Plan([], {}, {})
        self.refresh()

    @property
    def share(self) -> Optional[Servable]:
        """The :class:`SHAREModel` served from; ``None`` once it has been dropped (then nothing changes)."""
        return self._share_ref()

    def _live_share(self) -> Servable:
        share = self._share_ref()
        if share is None:
            raise ConfigError(
                "the SHAREModel this model was served from no longer exists, so there is nothing to refresh from. "
                "Keep a reference to it (share = SHAREModel.from_pretrained(...); model = share.serve(...)) to "
                "add or remove adapters while serving.")
        return share

    def _check_requested(self, adapters: Sequence[str]) -> List[str]:
        if isinstance(adapters, str):
            raise ConfigError(f"adapters={adapters!r}: expected a list of adapter names, e.g. [{adapters!r}].")
        names = list(adapters)
        if not names:
            raise ConfigError("adapters=[]: name at least one adapter to serve, or leave adapters=None for all.")
        _check_names("adapters", names)
        known = set(self._live_share().adapter_names)
        for n in names:
            if n not in known:
                raise UnknownAdapterError(f"adapter {n!r} is not in the checkpoint. Available: {_few(known)}.",
                                          adapter=n)
        if len(set(names)) != len(names):
            raise ConfigError(f"adapters={names!r} names an adapter twice.")
        return names

    # ------------------------------------------------------------ state
    @property
    def adapter_names(self) -> List[str]:
        """The adapters this model serves (in the latest snapshot), in table order."""
        return list(self._snapshot().names)

    @property
    def active_adapter(self) -> str:
        """The adapter applied to every row when ``adapter_names`` is not given.

        Raises :class:`~lorashare.errors.UnknownAdapterError` when the adapter chosen with
        ``set_adapter`` is no longer served (removed from the SHARE model), as such a call would.
        """
        return self._active_in(self._snapshot(), strict=True) or BASE

    def _active_in(self, plan: _Plan, *, strict: bool = False) -> Optional[str]:
        """The active adapter in ``plan``: ``None`` (``strict``: an error) when the one chosen is not served.

        Never another adapter in its place: rows meant for a removed adapter must not get a neighbour's output.
        """
        if self._active is None:
            return plan.names[0] if plan.names else BASE
        if self._active == BASE or self._active in plan.index:
            return self._active
        if strict:
            raise self._active_gone(plan)
        return None

    def _active_gone(self, plan: _Plan) -> UnknownAdapterError:
        share = self._share_ref()
        removed = share is None or self._active not in share.state.names
        why = "was removed" if removed else "is no longer served (refresh(adapters=...) left it out)"
        return UnknownAdapterError(
            f"the active adapter {self._active!r} {why}; call set_adapter(...) with one of "
            f"{_few([*plan.names, BASE])}, or pass adapter_names=[...] (one per row).", adapter=str(self._active))

    def set_adapter(self, name: str) -> None:
        """Apply ``name`` (or ``"__base__"``) to every row of calls without ``adapter_names``."""
        if not isinstance(name, str):
            raise ConfigError(f"set_adapter({name!r}): expected one adapter name (a string), or {BASE!r}; "
                              "for one adapter per row, pass adapter_names=[...] to the call.")
        plan = self._snapshot()
        if name != BASE and name not in plan.index:
            raise UnknownAdapterError(
                f"adapter {name!r} is not served. Served: {_few(plan.names)} (or {BASE!r}).", adapter=name)
        self._active = name
        self._router.default = _Route(plan, None, plan.index.get(name, 0))

    def get_base_model(self) -> torch.nn.Module:
        """The wrapped base model (its targeted layers are the serving wrappers)."""
        return self.model

    def refresh(self, adapters: Optional[Sequence[str]] = None) -> None:
        """Rebuild the tables now, optionally serving another set of ``adapters``.

        Each call already serves the latest revision of the SHARE model, so this is only
        needed to change the served set (default: the set given to ``serve()``, or all).
        The base model's weights are never copied.  On an error the model keeps serving
        what it served before.

        Example:
            >>> model.refresh(adapters=["billing"])  # doctest: +SKIP
        """
        requested = self._requested if adapters is None else self._check_requested(adapters)
        share = self._live_share()
        with self._lock:
            self._plan = self._build(share.state, requested)
            self._requested = requested
            self._router.default = _Route(self._plan, None, self._plan.index.get(self._active_in(self._plan), 0))

    def _build(self, state: SHAREState, requested: Optional[List[str]]) -> _Plan:
        """The snapshot of ``state``, with wrappers installed for every module it needs."""
        current = list(state.names)
        if requested is None:
            names = current
        else:
            present = set(current)
            gone = [n for n in requested if n not in present]
            if gone:
                logger.info("no longer serving %s: removed from the checkpoint", ", ".join(gone))
            names = [n for n in requested if n in present]
        if BASE in names:
            raise ConfigError(f"an adapter is named {BASE!r}, the name reserved for the base model in adapter_names. "
                              "Rename it (remove_adapter, then add it under another name).", adapter=BASE)
        plan = _plan(state, self.model, names, self._dtype, self._router) if names else _Plan([], {}, {})
        plan.state, plan.placement = weakref.ref(state), _placement(self.model)
        plan.requested = None if requested is None else tuple(requested)
        self._wrap(plan)
        return plan

    def _snapshot(self) -> _Plan:
        """The snapshot of the SHARE model's latest revision (built on first use after an edit)."""
        plan = self._plan
        share = self._share_ref()
        if share is None:
            return plan
        state = share.state
        if plan.built_from(state) and plan.placement == _placement(self.model):
            return plan
        with self._lock:
            plan = self._plan
            if not (plan.built_from(state) and plan.placement == _placement(self.model)):
                logger.debug("serving revision %d of the SHARE model", state.revision)
                plan = self._plan = self._build(state, self._requested)
                self._router.default = _Route(plan, None, plan.index.get(self._active_in(plan), 0))
        return plan

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ServedModel":
        # .to() / .half() / .cuda(): tables follow the base model now, not only at the next call.
        out = super()._apply(fn, *args, **kwargs)
        if getattr(self, "_plan", None) is not None:
            self._snapshot()
        return out

    def _wrap(self, plan: _Plan) -> None:
        """Wrap every module ``plan`` has tables for; wrappers stay while serving (without tables they
        pass through), so a call in flight never finds a module swapped under it."""
        for cls, wanted in ((_ServedLinear, plan.linears), (_ServedHead, plan.heads)):
            for path in wanted:
                mod = self.model.get_submodule(path)
                if not isinstance(mod, cls):
                    _set_child(self.model, path, cls(mod, self._router, path))

    def unload(self) -> torch.nn.Module:
        """Put the original layers back and return the plain base model."""
        with self._lock:
            for path, mod in list(self.model.named_modules()):
                if isinstance(mod, (_ServedLinear, _ServedHead)):
                    _set_child(self.model, path, mod.base_layer)
            self._plan = _Plan([], {}, {})
            self._router.default = _Route(self._plan, None, 0)
        return self.model

    def served_bytes(self) -> Dict[str, int]:
        """Bytes this model adds to the base model: ``bases``, ``tables`` (cores/loadings), ``heads``, ``index``,
        ``cache`` (one adapter's factors per layer, after a single-adapter call) and ``total``."""
        out = {"bases": 0, "tables": 0, "heads": 0, "index": 0, "cache": 0}
        size = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
        plan = self._snapshot()
        for lp in plan.linears.values():
            out["bases"] += size(lp.u_a) + size(lp.u_b)
            out["tables"] += size(lp.core) + size(lp.la) + size(lp.lb)
            out["index"] += size(lp.slot_map)
        for mod in self.model.modules():
            if isinstance(mod, _ServedLinear) and mod._cache is not None:
                out["cache"] += size(mod._cache[2]) + size(mod._cache[3])
        for path, hp in plan.heads.items():
            base = self.model.get_submodule(path)
            base = base.base_layer if isinstance(base, _ServedHead) else base
            shared = {id(t) for t in (*base.parameters(), *base.buffers())}
            out["heads"] += sum(size(t) for c in hp.copies for t in (*c.parameters(), *c.buffers())
                                if id(t) not in shared)
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------ calls
    def _route(self, adapter_names: Any, args: Sequence[Any], kwargs: Mapping[str, Any], *, expand: bool) -> _Route:
        plan = self._snapshot()  # this call's tables, from its first layer to its last
        if adapter_names is None:
            if self._active is None and plan.names and not self._told_default:
                self._told_default = True
                logger.info("no adapter_names and no set_adapter(): every row uses the first served adapter, %r",
                            plan.names[0])
            return _Route(plan, None, plan.index.get(self._active_in(plan, strict=True), 0))
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ConfigError(
                f"adapter_names={adapter_names!r}: expected a list with one adapter name per row of the batch "
                f"(or {BASE!r}); for one adapter on every row, use set_adapter(name).")
        _check_names("adapter_names", adapter_names)
        idx = []
        for i, n in enumerate(adapter_names):
            if n == BASE:
                idx.append(0)
            elif n in plan.index:
                idx.append(plan.index[n])
            else:
                raise UnknownAdapterError(
                    f"adapter_names[{i}] is {n!r}, which this model does not serve. Served: {_few(plan.names)} "
                    f"(or {BASE!r} for the base model). Add it to the checkpoint (share.add_adapter) or serve it "
                    "(refresh(adapters=[...])).", adapter=str(n))
        rows = next((b for b in (_batch_first(kwargs.get(k)) for k in ("input_ids", "inputs_embeds")) if b is not None),
                    None)
        if rows is None:
            rows = next((_batch_first(a) for a in args if _batch_first(a) is not None), None)
        if rows is not None and rows != len(idx):
            raise ConfigError(
                f"adapter_names has {len(idx)} names but the batch has {rows} rows: give exactly one adapter name "
                f"per row (use {BASE!r} for rows without an adapter).")
        if not idx:
            raise ConfigError("adapter_names is empty: give one adapter name per row of the batch.")
        return _Route(plan, torch.tensor(idx, dtype=torch.long), None, expand=expand)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row, ``"__base__"`` for none) picks each
        row's adapter.  Without it, every row uses the adapter of ``set_adapter()`` (by default the
        first served adapter)."""
        with self._router.use(self._route(adapter_names, args, kwargs, expand=False)):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; beams and ``num_return_sequences`` keep each row's adapter.

        ``adapter_names`` works as in :meth:`forward`."""
        with self._router.use(self._route(adapter_names, args, kwargs, expand=True)):
            return self.model.generate(*args, **kwargs)

    @property
    def device(self) -> torch.device:
        dev = getattr(self.model, "device", None)
        return dev if isinstance(dev, torch.device) else _module_device(self.model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def __repr__(self) -> str:
        plan = self._plan
        active = self._active_in(plan) or f"{self._active} (no longer served)"
        return f"ServedModel(adapters={_few(plan.names)}, active={active!r},\n  model={self.model!r})"


def _check_names(what: str, names: Sequence[Any]) -> None:
    """Every adapter name must be a string: a list or dict inside would fail deep in torch."""
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise ConfigError(f"{what}[{i}] is {type(n).__name__} {n!r}: expected an adapter name (a string), "
                              f"one per row (or {BASE!r}).")


def _few(names: Any, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', … {len(names) - limit} more' if len(names) > limit else ''}]"


def serve(share: Servable, base_model: torch.nn.Module, *, adapters: Optional[Sequence[str]] = None,
          dtype: Union[None, str, torch.dtype] = None) -> ServedModel:
    """Serve ``share``'s adapters (all, or ``adapters``) on ``base_model``, one adapter per row.

    ``base_model`` is changed in place: its LoRA-targeted linear layers (and the modules
    that adapters save whole, like classifier heads) are wrapped; ``unload()`` restores them.
    Bases and tables take the base model's dtype and device unless ``dtype`` is given.

    Example:
        >>> model = serve(share, base_model, adapters=["billing", "refunds"])  # doctest: +SKIP
    """
    return ServedModel(share, base_model, adapters=adapters, dtype=dtype)
