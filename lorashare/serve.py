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

Rows pick their adapter through a router that the top-level ``forward``/``generate``
sets for the duration of one call (``adapter_names=[...]``, one per row, PEFT's
convention with ``"__base__"``); without it, the adapter chosen with ``set_adapter``
applies to every row.  Classifier heads and other ``modules_to_save`` are routed per
row too: each group of rows runs the module with its own adapter's tensors.

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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .compress import group_key, split_group_key
from .errors import AdapterError, ConfigError, UnknownAdapterError
from .loraconfig import module_scale
from .storage import DTYPES

logger = logging.getLogger(__name__)

__all__ = ["serve", "ServedModel", "BASE"]

#: The name that selects the plain base model for a row (PEFT's convention).
BASE = "__base__"

_MTS_INFIX = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")
_SAVED_PREFIX = "base_model.model."


# --------------------------------------------------------------------------- routing
class _Route:
    """Which adapter each row of the current call uses (global indices; 0 is the base model)."""

    __slots__ = ("rows", "idx", "single", "uniques", "expand", "_cache")

    def __init__(self, idx: Optional[torch.Tensor], single: Optional[int], *, expand: bool = False) -> None:
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
        self.default = _Route(None, 0)
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


@dataclass
class _HeadPlan:
    """The per-adapter tensors of one ``modules_to_save`` module."""

    module: str
    slots: List[int]  # global index → 1 + position in ``tensors`` (0 = the base module's own)
    tensors: List[Dict[str, torch.Tensor]] = field(default_factory=list)  # {param path inside the module: tensor}


@dataclass
class _Plan:
    names: List[str]
    linears: Dict[str, _LinearPlan]
    heads: Dict[str, _HeadPlan]


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


def _mismatch_hint(share: Any, base_model: torch.nn.Module) -> str:
    trained = getattr(share.config, "base_model_name_or_path", "") or ""
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


def _plan(share: Any, model: torch.nn.Module, names: Sequence[str], dtype: Optional[torch.dtype],
          router: "_Router") -> _Plan:
    """Every table for ``names``, checked against ``model``; nothing in ``model`` changes."""
    modules = _plain_modules(model, router)
    hint = _mismatch_hint(share, model)
    index = {n: i + 1 for i, n in enumerate(names)}
    all_loadings, configs, heads = share.all_loadings, share.adapter_configs, share.all_classifier_heads
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
        for key in loadings:
            module, side = split_group_key(key)
            if side != "A":
                continue
            kb = group_key(module, "B")
            if kb not in loadings or key not in share.components or kb not in share.components:
                raise AdapterError(
                    f"adapter {n!r}: module {module} lacks its {'B' if kb not in loadings else 'A'} loading or "
                    "its shared basis in the checkpoint. The checkpoint is corrupt; save it again from its adapters.",
                    adapter=n, layer=module,
                )
            la, lb = loadings[key], loadings[kb]
            if la.dim() != 2 or lb.dim() != 2 or la.shape[1] != lb.shape[1] \
                    or la.shape[0] != share.components[key].shape[1] or lb.shape[0] != share.components[kb].shape[1]:
                raise AdapterError(
                    f"adapter {n!r}: module {module} has loadings {tuple(la.shape)} (A) and {tuple(lb.shape)} (B) "
                    f"for bases of k = {share.components[key].shape[1]} and {share.components[kb].shape[1]}; "
                    "expected (k_A, r) and (k_B, r). The checkpoint is corrupt; save it again from its adapters.",
                    adapter=n, layer=module,
                )
            rank = int(la.shape[1])
            members.setdefault(module, []).append((index[n], n, la, lb, module_scale(config, module, rank)))

    linears: Dict[str, _LinearPlan] = {}
    for module, group in members.items():
        ua_src, ub_src = share.components[group_key(module, "A")], share.components[group_key(module, "B")]
        if module not in modules:
            raise AdapterError(
                f"adapter {group[0][1]!r}: module {module} is not in the base model. {hint}",
                adapter=group[0][1], layer=module,
            )
        target = modules[module]
        if hasattr(target, "lora_A") or hasattr(target, "base_layer"):
            raise AdapterError(
                f"module {module} is already a PEFT LoRA layer ({type(target).__name__}). serve() needs the plain "
                "base model: pass a freshly loaded one, or peft_model.unload().", layer=module,
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
    """A linear layer plus, per row, its adapter's update through the shared bases."""

    def __init__(self, base_layer: torch.nn.Module, router: _Router, plan: _LinearPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._router = router
        self.load(plan)

    def load(self, plan: _LinearPlan) -> None:
        """Replace the tables (a refresh); the base layer stays."""
        self.module_name = plan.module
        self.slots = list(plan.slots)
        self.is_core = plan.core is not None
        self.register_buffer("u_a", plan.u_a, persistent=False)
        self.register_buffer("u_b", plan.u_b, persistent=False)
        self.register_buffer("slot_map", torch.tensor(plan.slots, dtype=torch.long, device=plan.u_a.device),
                             persistent=False)
        self.register_buffer("core", plan.core, persistent=False)
        self.register_buffer("la", plan.la, persistent=False)
        self.register_buffer("lb", plan.lb, persistent=False)
        self._cache: Optional[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def extra_repr(self) -> str:
        table = self.core if self.is_core else self.la
        return f"{self.module_name}, k=({self.u_a.shape[1]}, {self.u_b.shape[1]}), adapters={table.shape[0] - 1}, " \
               f"table={'cores' if self.is_core else 'loadings'}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        route = self._router.current()
        if route.idx is None:  # one adapter for every row, whatever the shape of x
            slot = self.slots[route.single]
            return out if slot == 0 else self._add(out, *self._single(x, slot))
        idx = route.index(int(x.shape[0]), x.device, self.module_name)  # checks the row count, even with no delta
        local = sorted({self.slots[g] for g in route.uniques})
        if local == [0]:
            return out
        if len(local) == 1:
            return self._add(out, *self._single(x, local[0]))
        return self._add(out, *self._mixed(x, self.slot_map[idx], local))

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

    def _factors(self, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """One adapter's ``(U_A s L_A, (U_B L_B)ᵀ)`` (d_in × r, r × d_out), cached for the latest slot."""
        c = self._cache
        if c is not None and c[0] == slot and c[1] is self.la:
            return c[2], c[3]
        a, b = self.u_a @ self.la[slot], (self.u_b @ self.lb[slot]).mT
        self._cache = (slot, self.la, a, b)
        return a, b

    def _single(self, x: torch.Tensor, slot: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every row with one adapter: ``delta = left @ right`` over the flattened tokens."""
        x2 = x.to(self.u_a.dtype).reshape(-1, int(x.shape[-1]))
        if self.is_core:
            return (x2 @ self.u_a) @ self.core[slot], self.u_b.mT
        a, b = self._factors(slot)
        return x2 @ a, b

    def _mixed(self, x: torch.Tensor, local: torch.Tensor, slots: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows with different adapters: shared products, or per-row factors when the rows are long."""
        n, d_in = int(x.shape[0]), int(x.shape[-1])
        x3 = x.to(self.u_a.dtype).reshape(n, -1, d_in)
        m = int(x3.shape[1])
        d_out, ka, kb = int(self.u_b.shape[0]), int(self.u_a.shape[1]), int(self.u_b.shape[1])
        if self.is_core:
            z = torch.bmm(x3 @ self.u_a, self.core[local])
        else:
            r = int(self.la.shape[2])
            if _per_row_cheaper(n, m, len(slots), d_in, d_out, ka, kb, r):
                u = torch.tensor(slots, device=local.device)
                pos = torch.zeros(self.la.shape[0], dtype=torch.long, device=local.device)
                pos[u] = torch.arange(len(slots), device=local.device)
                inv = pos[local]
                a = (self.u_a @ self.la[u])[inv]  # (n, d_in, r)
                b = (self.u_b @ self.lb[u])[inv]  # (n, d_out, r)
                return torch.bmm(x3, a), b.mT
            z = torch.bmm(torch.bmm(x3 @ self.u_a, self.la[local]), self.lb[local].mT)
        return z.reshape(n * m, kb), self.u_b.mT


def _batch_first(value: Any) -> Optional[int]:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() > 0 else None


class _ServedHead(torch.nn.Module):
    """A ``modules_to_save`` module (a classifier head...): each row runs it with its adapter's tensors.

    Each adapter gets its own copy of the module, sharing every tensor it does not replace
    with the original: a copy per adapter (as PEFT does) keeps concurrent calls apart,
    where swapping tensors in and out of one module would not.
    """

    def __init__(self, base_layer: torch.nn.Module, router: _Router, plan: _HeadPlan) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._router = router
        self.load(plan)

    def load(self, plan: _HeadPlan) -> None:
        self.module_name = plan.module
        self.slots = list(plan.slots)
        self.copies = torch.nn.ModuleList([self._copy(tensors) for tensors in plan.tensors])

    def _copy(self, tensors: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        base = self.base_layer
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

    def own_tensors(self) -> List[torch.Tensor]:
        """The adapters' tensors (not the ones shared with the original module)."""
        shared = {id(t) for t in (*self.base_layer.parameters(), *self.base_layer.buffers())}
        return [t for c in self.copies for t in (*c.parameters(), *c.buffers()) if id(t) not in shared]

    def extra_repr(self) -> str:
        return f"{self.module_name}, adapters={len(self.copies)}"

    def _run(self, slot: int, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        return (self.base_layer if slot == 0 else self.copies[slot - 1])(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = self._router.current()
        if route.single is not None and route.idx is None:
            return self._run(self.slots[route.single] if route.single < len(self.slots) else 0, args, kwargs)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        if first is None:
            raise ConfigError(f"module {self.module_name} got no tensor input to route per row.",
                              layer=self.module_name)
        n = int(first.shape[0])
        idx = route.index(n, torch.device("cpu"), self.module_name)
        local = torch.tensor(self.slots, dtype=torch.long)[idx]
        groups = sorted(set(local.tolist()))
        if len(groups) == 1:
            return self._run(groups[0], args, kwargs)
        out: Optional[torch.Tensor] = None
        for slot in groups:
            rows = torch.nonzero(local == slot).squeeze(1)
            def pick(v: Any, rows: torch.Tensor = rows) -> Any:
                return v.index_select(0, rows.to(v.device)) if _batch_first(v) == n else v

            part = self._run(slot, [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()})
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

    def __init__(self, share: Any, model: torch.nn.Module, *, adapters: Optional[Sequence[str]] = None,
                 dtype: Any = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(f"serve() needs a torch model (a transformers model), got {type(model).__name__}.")
        if getattr(model, "peft_config", None) is not None:  # a PeftModel, or PEFT adapters loaded by transformers
            raise ConfigError(
                f"serve() needs the plain base model, got a {type(model).__name__}. Pass a freshly loaded base "
                "model, or peft_model.unload().")
        self.model = model
        # A weak reference: the served model keeps its own tables, so dropping the SHAREModel frees its
        # copy of the loadings; keep it to add or remove adapters later (refresh).
        self._share_ref = weakref.ref(share)
        self._dtype = _resolve_dtype(dtype)
        self._requested = None if adapters is None else self._check_requested(adapters)
        self._router = _Router()
        self._names: List[str] = []
        self._index: Dict[str, int] = {}
        self._active = BASE
        self._seen: Tuple[Any, ...] = ()
        self.refresh()
        self._active = self._names[0] if self._names else BASE
        self._router.default = _Route(None, self._index.get(self._active, 0))

    @property
    def share(self) -> Any:
        """The :class:`SHAREModel` served from; ``None`` once it has been dropped (then nothing is refreshed)."""
        return self._share_ref()

    def _live_share(self) -> Any:
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
        """The adapters this model serves, in table order."""
        return list(self._names)

    @property
    def active_adapter(self) -> str:
        """The adapter applied to every row when ``adapter_names`` is not given."""
        return self._active

    def set_adapter(self, name: str) -> None:
        """Apply ``name`` (or ``"__base__"``) to every row of calls without ``adapter_names``."""
        self._sync()
        if name != BASE and name not in self._index:
            raise UnknownAdapterError(
                f"adapter {name!r} is not served. Served: {_few(self._names)} (or {BASE!r}).", adapter=name)
        self._active = name
        self._router.default = _Route(None, self._index.get(name, 0))

    def get_base_model(self) -> torch.nn.Module:
        """The wrapped base model (its targeted layers are the serving wrappers)."""
        return self.model

    def refresh(self, adapters: Optional[Sequence[str]] = None) -> None:
        """Pick up adapters added to or removed from the checkpoint since ``serve()`` (automatic on each call).

        ``adapters`` changes the served set (default: the set given to ``serve()``, or all).
        Tables are rebuilt; the base model's weights are never copied.  On an error the model
        keeps serving what it served before.

        Example:
            >>> share.add_adapter("runs/legal"); model.refresh()  # doctest: +SKIP
        """
        if adapters is not None:
            self._requested = self._check_requested(adapters)
        share = self._live_share()
        current = share.adapter_names
        if self._requested is None:
            names = list(current)
        else:
            present = set(current)
            gone = [n for n in self._requested if n not in present]
            if gone:
                logger.info("no longer serving %s: removed from the checkpoint", ", ".join(gone))
            names = [n for n in self._requested if n in present]
        if BASE in names:
            raise ConfigError(f"an adapter is named {BASE!r}, the name reserved for the base model in adapter_names. "
                              "Rename it (remove_adapter, then add it under another name).", adapter=BASE)
        plan = _plan(share, self.model, names, self._dtype, self._router) if names else _Plan([], {}, {})
        self._install(plan)
        self._seen = self._signature()

    def _signature(self) -> Tuple[Any, ...]:
        share = self._share_ref()
        return self._seen if share is None else (tuple(share.adapter_names), id(share.components))

    def _sync(self) -> None:
        if self._signature() != self._seen:
            logger.info("the checkpoint changed since serve(): refreshing the served adapters")
            self.refresh()

    def _install(self, plan: _Plan) -> None:
        # Wrappers for modules no longer needed go first, so their originals are back in place.
        for cls, wanted in ((_ServedLinear, plan.linears), (_ServedHead, plan.heads)):
            for path, mod in list(self.model.named_modules()):
                if isinstance(mod, cls) and path not in wanted:
                    _set_child(self.model, path, mod.base_layer)
        for path, lp in plan.linears.items():
            mod = self.model.get_submodule(path)
            if isinstance(mod, _ServedLinear):
                mod.load(lp)
            else:
                _set_child(self.model, path, _ServedLinear(mod, self._router, lp))
        for path, hp in plan.heads.items():
            mod = self.model.get_submodule(path)
            if isinstance(mod, _ServedHead):
                mod.load(hp)
            else:
                _set_child(self.model, path, _ServedHead(mod, self._router, hp))
        self._names = list(plan.names)
        self._index = {n: i + 1 for i, n in enumerate(self._names)}
        if self._active != BASE and self._active not in self._index:
            new = self._names[0] if self._names else BASE
            logger.warning("active adapter %r is no longer served; now %r", self._active, new)
            self._active = new
        self._router.default = _Route(None, self._index.get(self._active, 0))

    def unload(self) -> torch.nn.Module:
        """Put the original layers back and return the plain base model."""
        self._install(_Plan([], {}, {}))
        return self.model

    def served_bytes(self) -> Dict[str, int]:
        """Bytes this model adds to the base model: ``bases``, ``tables`` (cores/loadings), ``heads``, ``index``,
        ``cache`` (one adapter's factors per layer, after a single-adapter call) and ``total``."""
        out = {"bases": 0, "tables": 0, "heads": 0, "index": 0, "cache": 0}
        size = lambda t: t.numel() * t.element_size() if t is not None else 0  # noqa: E731
        for mod in self.model.modules():
            if isinstance(mod, _ServedLinear):
                out["bases"] += size(mod.u_a) + size(mod.u_b)
                out["tables"] += size(mod.core) + size(mod.la) + size(mod.lb)
                out["index"] += size(mod.slot_map)
                if mod._cache is not None:
                    out["cache"] += size(mod._cache[2]) + size(mod._cache[3])
            elif isinstance(mod, _ServedHead):
                out["heads"] += sum(size(t) for t in mod.own_tensors())
        out["total"] = sum(out.values())
        return out

    # ------------------------------------------------------------ calls
    def _route(self, adapter_names: Any, args: Sequence[Any], kwargs: Mapping[str, Any], *, expand: bool) -> _Route:
        self._sync()
        if adapter_names is None:
            return self._router.default
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise ConfigError(
                f"adapter_names={adapter_names!r}: expected a list with one adapter name per row of the batch "
                f"(or {BASE!r}); for one adapter on every row, use set_adapter(name).")
        idx = []
        for i, n in enumerate(adapter_names):
            if n == BASE:
                idx.append(0)
            elif n in self._index:
                idx.append(self._index[n])
            else:
                raise UnknownAdapterError(
                    f"adapter_names[{i}] is {n!r}, which this model does not serve. Served: {_few(self._names)} "
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
        return _Route(torch.tensor(idx, dtype=torch.long), None, expand=expand)

    def forward(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's forward; ``adapter_names`` (one per row) picks each row's adapter."""
        with self._router.use(self._route(adapter_names, args, kwargs, expand=False)):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Optional[Sequence[str]] = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; beams and ``num_return_sequences`` keep each row's adapter."""
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
        return f"ServedModel(adapters={_few(self._names)}, active={self._active!r},\n  model={self.model!r})"


def _few(names: Any, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', … {len(names) - limit} more' if len(names) > limit else ''}]"


def serve(share: Any, base_model: torch.nn.Module, *, adapters: Optional[Sequence[str]] = None,
          dtype: Union[None, str, torch.dtype] = None) -> ServedModel:
    """Serve ``share``'s adapters (all, or ``adapters``) on ``base_model``, one adapter per row.

    ``base_model`` is changed in place: its LoRA-targeted linear layers (and the modules
    that adapters save whole, like classifier heads) are wrapped; ``unload()`` restores them.
    Bases and tables take the base model's dtype and device unless ``dtype`` is given.

    Example:
        >>> model = serve(share, base_model, adapters=["billing", "refunds"])  # doctest: +SKIP
    """
    return ServedModel(share, base_model, adapters=adapters, dtype=dtype)
