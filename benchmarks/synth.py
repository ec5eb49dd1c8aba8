"""Synthetic PEFT LoRA adapter sets at realistic shapes, for benchmarking.

Each generated adapter is a folder laid out exactly like ``peft`` writes it::

    adapter_007/
        adapter_config.json          # peft_type "LORA", r, lora_alpha, target_modules, ...
        adapter_model.safetensors    # base_model.model.<module>.lora_A.weight (r, d_in)
                                     # base_model.model.<module>.lora_B.weight (d_out, r), fp32

Generative model
----------------
For every adapted module (e.g. ``model.layers.3.self_attn.q_proj``) there is a
*module-level* structure shared by all adapters of the set (drawn once per set):

* ``U_s`` (d_out x s): task-common output directions (Gaussian / sqrt(d_out),
  i.e. nearly orthonormal columns in high dimension);
* ``V_s`` (d_in x s_in): task-common input directions;
* ``M_0`` (s x r): a common mixing, so different tasks are correlated;
* ``A_0`` (r x d_in): the shared LoRA-A init, only for the ``same-seed`` variant.

Adapter ``i`` is then, per module::

    A0_i = A_0 (same-seed)  or  fresh draw (diff-seed),  both ~ U(-1/sqrt(d_in), 1/sqrt(d_in))
                                  # = PEFT's kaiming_uniform_(a=sqrt(5)) init of lora_A
    A_i  = A0_i + a_shared * C_i V_s^T / sqrt(s_in) + a_iso * G_i / sqrt(d_in)
                                  # training drifts A a little (~10% of its norm),
                                  # partly along the shared input directions
    M_i  = (M_0 + tau * Z_i) / sqrt(1 + tau^2)
                                  # task mixing = common part + task-specific part
    B_i  = b_scale * ( U_s M_i / sqrt(s) + beta_spec * U_i N_i / sqrt(p) + sigma * E_i )
                                  # B "trained away from zero": shared directions +
                                  # an adapter-specific rank-p part + small noise

with ``C_i, G_i, Z_i, N_i, E_i`` standard Gaussian and ``U_i`` (d_out x p)
Gaussian / sqrt(d_out). Hence the ΔW_i = (alpha/r) B_i A_i of different adapters
share a column subspace (``U_s``) and, for same-seed sets, also most of their
row subspace (``A_0``), but they are not identical (task-specific mixing, the
rank-p private part, drift and noise). For diff-seed sets the row spaces are
essentially independent random r-dimensional subspaces, as in practice.

Every set is fully deterministic: the seed is derived from
(shape, N, variant, generator version), and adapter ``i`` uses its own
generator, so sets are reproducible across runs and machines.

Generation is vectorised over all modules of an adapter (batched matmuls), so
the 7B shape (128 modules x 64 MiB per adapter) is bound by disk writes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger("benchmarks.synth")

# Bump when the generative model changes, so stale cached sets are regenerated.
GENERATOR_VERSION = 1

VARIANTS = ("same-seed", "diff-seed")


@dataclass(frozen=True)
class ShapeSpec:
    """Architecture of the adapted model as seen by LoRA."""

    name: str
    module_paths: tuple[str, ...]
    d_in: int
    d_out: int
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    base_model: str
    task_type: str

    @property
    def num_modules(self) -> int:
        """Number of adapted modules (each gives an A group and a B group)."""
        return len(self.module_paths)


@dataclass(frozen=True)
class GenParams:
    """Knobs of the generative model (see module docstring)."""

    shared_out_dims: int  # s
    shared_in_dims: int  # s_in
    specific_dims: int  # p
    a_shared: float = 0.05  # A drift along shared input directions (A0 row norm ~0.58)
    a_iso: float = 0.02  # isotropic A drift
    tau: float = 0.7  # task-specific share of the mixing
    b_scale: float = 0.05  # column norm of B ~ 0.05, entries ~1e-3 like trained LoRA
    beta_spec: float = 0.5  # adapter-specific part relative to the shared part
    sigma: float = 0.05  # B noise relative to the shared part


def _roberta_modules(layers: int) -> tuple[str, ...]:
    return tuple(
        f"roberta.encoder.layer.{i}.attention.self.{m}"
        for i in range(layers)
        for m in ("query", "value")
    )


def _llama_modules(layers: int) -> tuple[str, ...]:
    return tuple(
        f"model.layers.{i}.self_attn.{m}"
        for i in range(layers)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj")
    )


SHAPES: dict[str, ShapeSpec] = {
    "roberta": ShapeSpec(
        "roberta",
        _roberta_modules(12),
        768,
        768,
        8,
        16,
        ("query", "value"),
        "FacebookAI/roberta-base",
        "FEATURE_EXTRACTION",
    ),
    "7b": ShapeSpec(
        "7b",
        _llama_modules(32),
        4096,
        4096,
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "meta-llama/Llama-2-7b-hf",
        "CAUSAL_LM",
    ),
    # Two layers of q/v at d=4096: the auto/budget speed benchmark (benchmarks/spectra.py), N up to 800.
    "7b-qv2": ShapeSpec(
        "7b-qv2",
        tuple(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")),
        4096,
        4096,
        16,
        32,
        ("q_proj", "v_proj"),
        "meta-llama/Llama-2-7b-hf",
        "CAUSAL_LM",
    ),
    # A quarter of the 7B shape (8 decoder layers, 32 modules): run.py --baselines at N=100, where the full
    # 128 modules would take hours on 2 cores and one layer leaves an adapter's budget too few modules.
    "7b-8layers": ShapeSpec(
        "7b-8layers",
        _llama_modules(8),
        4096,
        4096,
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "meta-llama/Llama-2-7b-hf",
        "CAUSAL_LM",
    ),
    # One decoder layer of the 7B shape: per-group timing at d=4096 in seconds.
    "7b-slice": ShapeSpec(
        "7b-slice",
        _llama_modules(1),
        4096,
        4096,
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "meta-llama/Llama-2-7b-hf",
        "CAUSAL_LM",
    ),
}


def default_params(shape: ShapeSpec) -> GenParams:
    """Subspace sizes scaled with the LoRA rank."""
    return GenParams(
        shared_out_dims=shape.r,
        shared_in_dims=shape.r,
        specific_dims=max(1, shape.r // 2),
    )


def set_seed(shape: str, n: int, variant: str) -> int:
    """Deterministic seed per (shape, N, variant); crc32 is stable across runs."""
    key = f"{shape}|{n}|{variant}|v{GENERATOR_VERSION}".encode()
    return zlib.crc32(key)


def adapter_config(shape: ShapeSpec) -> dict:
    """An adapter_config.json with the fields PEFT's LoraConfig writes."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": shape.base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": shape.lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.1,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": shape.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(shape.target_modules),
        "task_type": shape.task_type,
        "use_dora": False,
        "use_rslora": False,
    }


def _uniform(gen: torch.Generator, size: tuple[int, ...], bound: float) -> torch.Tensor:
    """U(-bound, bound): what kaiming_uniform_(a=sqrt(5)) gives for lora_A."""
    return torch.rand(size, generator=gen).mul_(2 * bound).sub_(bound)


@dataclass
class _SetStructure:
    """Module-level tensors shared by all adapters of one set, stacked over modules."""

    u_s: torch.Tensor  # (G, d_out, s)
    v_s: torch.Tensor  # (G, d_in, s_in)
    m_0: torch.Tensor  # (G, s, r)
    a_0: torch.Tensor | None  # (G, r, d_in), same-seed only


def _set_structure(
    shape: ShapeSpec, p: GenParams, seed: int, same_seed: bool
) -> _SetStructure:
    g = torch.Generator().manual_seed(seed)
    n_mod = shape.num_modules
    u_s = torch.randn(n_mod, shape.d_out, p.shared_out_dims, generator=g) / math.sqrt(
        shape.d_out
    )
    v_s = torch.randn(n_mod, shape.d_in, p.shared_in_dims, generator=g) / math.sqrt(
        shape.d_in
    )
    m_0 = torch.randn(n_mod, p.shared_out_dims, shape.r, generator=g)
    a_0 = None
    if same_seed:
        a_0 = _uniform(g, (n_mod, shape.r, shape.d_in), 1.0 / math.sqrt(shape.d_in))
    return _SetStructure(u_s, v_s, m_0, a_0)


def generate_adapter(
    shape: ShapeSpec, p: GenParams, st: _SetStructure, seed: int, index: int
) -> dict[str, torch.Tensor]:
    """One adapter's PEFT state dict (all modules drawn at once, batched)."""
    # Own generator per adapter: reproducible independently of generation order.
    g = torch.Generator().manual_seed((seed * 1_000_003 + index + 1) % (2**63))
    n_mod, r, d_in, d_out = shape.num_modules, shape.r, shape.d_in, shape.d_out
    if st.a_0 is not None:
        a = st.a_0.clone()
    else:
        a = _uniform(g, (n_mod, r, d_in), 1.0 / math.sqrt(d_in))
    c = torch.randn(n_mod, r, p.shared_in_dims, generator=g)
    a.add_(
        torch.bmm(c, st.v_s.transpose(1, 2)),
        alpha=p.a_shared / math.sqrt(p.shared_in_dims),
    )
    a.add_(torch.randn(n_mod, r, d_in, generator=g), alpha=p.a_iso / math.sqrt(d_in))

    z = torch.randn(n_mod, p.shared_out_dims, r, generator=g)
    mix = (st.m_0 + p.tau * z) / math.sqrt(1.0 + p.tau**2)
    b = torch.bmm(st.u_s, mix).div_(math.sqrt(p.shared_out_dims))
    u_i = torch.randn(n_mod, d_out, p.specific_dims, generator=g) / math.sqrt(d_out)
    n_i = torch.randn(n_mod, p.specific_dims, r, generator=g)
    b.add_(torch.bmm(u_i, n_i), alpha=p.beta_spec / math.sqrt(p.specific_dims))
    b.add_(torch.randn(n_mod, d_out, r, generator=g), alpha=p.sigma / math.sqrt(d_out))
    b.mul_(p.b_scale)

    state: dict[str, torch.Tensor] = {}
    for j, path in enumerate(shape.module_paths):
        # clone(): safetensors refuses tensors sharing one storage.
        state[f"base_model.model.{path}.lora_A.weight"] = a[j].clone()
        state[f"base_model.model.{path}.lora_B.weight"] = b[j].clone()
    return state


def set_dir(cache_dir: Path, shape: str, n: int, variant: str) -> Path:
    """Cache folder of one adapter set."""
    return Path(cache_dir) / "adapters" / f"{shape}-n{n}-{variant}"


def _manifest(shape: ShapeSpec, n: int, variant: str, seed: int, p: GenParams) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "shape": asdict(shape),
        "n": n,
        "variant": variant,
        "seed": seed,
        "params": asdict(p),
    }


def _adapter_names(n: int) -> list[str]:
    width = max(3, len(str(n - 1)))
    return [f"adapter_{i:0{width}d}" for i in range(n)]


def _set_is_complete(out: Path, manifest: dict, names: list[str]) -> bool:
    """True when a previous run wrote this exact set to completion."""
    mpath = out / "manifest.json"
    if not mpath.exists():
        return False
    try:
        old = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        return False
    old.pop("files", None)
    if json.loads(json.dumps(manifest)) != old:
        return False
    return all((out / nm / "adapter_model.safetensors").exists() for nm in names)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def ensure_adapter_set(
    shape_name: str, n: int, variant: str, cache_dir: Path
) -> list[Path]:
    """Return the adapter folders of a set, generating (once) into the cache."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    shape = SHAPES[shape_name]
    p = default_params(shape)
    seed = set_seed(shape_name, n, variant)
    out = set_dir(cache_dir, shape_name, n, variant)
    names = _adapter_names(n)
    manifest = _manifest(shape, n, variant, seed, p)
    if _set_is_complete(out, manifest, names):
        logger.info("reusing cached adapter set %s", out)
        return [out / nm for nm in names]

    logger.info("generating %d %s adapters (%s) into %s", n, shape_name, variant, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # incomplete until rewritten
    st = _set_structure(shape, p, seed, same_seed=(variant == "same-seed"))
    cfg = adapter_config(shape)
    for i, nm in enumerate(names):
        adir = out / nm
        adir.mkdir(exist_ok=True)
        state = generate_adapter(shape, p, st, seed, i)
        save_file(
            state, str(adir / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        (adir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    manifest["files"] = names
    _write_json_atomic(out / "manifest.json", manifest)
    return [out / nm for nm in names]


def ensure_subset(full_dirs: list[Path], num_modules: int, dest: Path) -> list[Path]:
    """Copies of adapters restricted to their first ``num_modules`` modules.

    Used to time the reference on a few module groups of a huge shape; only
    the needed tensors are read (safe_open), so this is cheap.
    """
    names = [d.name for d in full_dirs]
    marker = dest / "subset.json"
    want = {
        "num_modules": num_modules,
        "source": str(full_dirs[0].parent),
        "names": names,
    }
    if marker.exists() and json.loads(marker.read_text()) == want:
        return [dest / nm for nm in names]
    dest.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for src in full_dirs:
        path = src / "adapter_model.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            modules = _modules_in_order(keys)
            keep = set(modules[:num_modules])
            state = {k: f.get_tensor(k) for k in keys if k.split(".lora_")[0] in keep}
        (dest / src.name).mkdir(exist_ok=True)
        save_file(
            state,
            str(dest / src.name / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
        cfg = (src / "adapter_config.json").read_text()
        (dest / src.name / "adapter_config.json").write_text(cfg)
    _write_json_atomic(marker, want)
    return [dest / nm for nm in names]


def _modules_in_order(keys: list[str]) -> list[str]:
    """Module prefixes ordered by (layer index, name) so 'first M' means first layers."""
    mods = {k.split(".lora_")[0] for k in keys if ".lora_" in k}

    def sort_key(m: str) -> tuple:
        parts = m.split(".")
        return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in parts)

    return sorted(mods, key=sort_key)


def main() -> None:
    """CLI: generate (or reuse) one adapter set and print its folder."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("-n", "--num-adapters", type=int, required=True)
    ap.add_argument("--variant", choices=VARIANTS, default="same-seed")
    ap.add_argument("--cache-dir", type=Path, default=Path(__file__).parent / ".cache")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dirs = ensure_adapter_set(
        args.shape, args.num_adapters, args.variant, args.cache_dir
    )
    print(dirs[0].parent)


if __name__ == "__main__":
    main()
