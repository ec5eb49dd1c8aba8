"""Benchmark our lorashare against the reference lorashare 0.1.3.

For every configuration (shape, number of adapters N, A-init variant) this
runs, each in its own subprocess (``benchmarks/_worker.py``):

* ``floor``     -- the I/O floor: best-of-3 time to ``load_file`` every adapter
                   and read each of its bytes once;
* ``reference`` -- lorashare 0.1.3 at k=32 (fp32), possibly on a subset of
                   module groups and extrapolated linearly per group;
* ``ours``      -- at k=32 fp32 (same k), and at "equal bytes": ``budget_bytes``
                   = the reference's checkpoint tensor bytes at k=32, fp16.

It prints one Markdown results table plus a ratios table and writes the raw
results (with machine info and versions) as JSON under ``benchmarks/results/``.

Usage::

    python benchmarks/run.py --quick          # < 2 min on 2 cores
    python benchmarks/run.py                  # full: RoBERTa N=6/20/100, 7B N=10/100
    python benchmarks/run.py --shapes roberta --ns 20 --variants same-seed
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

try:
    import synth  # run as a script: benchmarks/ is sys.path[0]
    from oracle import adapter_errors, ensure_reference, module_scale, split_lora
except ImportError:  # run as python -m benchmarks.run
    from benchmarks import synth
    from benchmarks.oracle import adapter_errors, ensure_reference, module_scale, split_lora

logger = logging.getLogger("benchmarks.run")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
WORKER = BENCH_DIR / "_worker.py"
FP32_BYTES = 4
# 1-minute load average above which a row is flagged: our worker alone is ~cpu_count.
BUSY_LOAD = (os.cpu_count() or 1) + 1.0

# Values the reference's numbers are scaled by when it ran on a subset of groups.
EXTRAPOLATED_FIELDS = (
    "from_adapters_s",
    "save_s",
    "compress_s",
    "compress_cpu_s",
    "load_s",
    "reconstruct_ms",
    "rss_peak_over_baseline_mb",
    "ckpt_bytes",
    "ckpt_tensor_bytes",
)


@dataclass(frozen=True)
class BenchConfig:
    """One adapter set to compress."""

    shape: str
    n: int
    variant: str
    ref_modules: int | None = None  # reference runs on the first M modules only

    @property
    def label(self) -> str:
        return f"{self.shape} N={self.n} {self.variant}"

    @property
    def spec(self) -> synth.ShapeSpec:
        return synth.SHAPES[self.shape]


def plan(
    quick: bool,
    shapes: list[str] | None,
    ns: list[int] | None,
    variants: list[str],
    ref_modules_7b: int,
) -> list[BenchConfig]:
    """The configurations of a quick or full run, filtered by the CLI."""
    if quick:
        # 7b-slice: one decoder layer (8 groups at d=4096); the reference's eigh
        # on a 4096^2 covariance takes 4-10 s per group on 2 cores, so it gets one module.
        table = {"roberta": ([6, 20], None), "7b-slice": ([10], 1)}
        default_shapes = ["roberta", "7b-slice"]
    else:
        table = {
            "roberta": ([6, 20, 100], None),
            "7b": ([10, 100], ref_modules_7b),
            "7b-slice": ([10], 1),
        }
        default_shapes = ["roberta", "7b"]
    configs = []
    for shape in shapes or default_shapes:
        if shape not in table:
            raise SystemExit(f"--shapes {shape}: not a shape of this mode (one of {', '.join(table)}; "
                             "--baselines takes any shape)")
        shape_ns, ref_mod = table[shape]
        # The slice exists only to show per-group speed: one variant is enough in quick mode.
        shape_variants = variants[:1] if (quick and shape == "7b-slice") else variants
        for n in ns or shape_ns:
            for v in shape_variants:
                configs.append(BenchConfig(shape, n, v, ref_mod))
    return configs


def reference_tensor_bytes(spec: synth.ShapeSpec, n: int, k: int) -> int:
    """Tensor bytes of a 0.1.3 checkpoint: per (module, side) group a (feature_dim, k)
    fp32 component matrix, plus a (k, r) fp32 loading per adapter per group."""
    per_module = (spec.d_in + spec.d_out) * k + n * 2 * k * spec.r
    return spec.num_modules * per_module * FP32_BYTES


def worker_env(threads: int | None) -> dict[str, str]:
    """Environment of the workers; ``threads`` pins torch's intra-op thread count."""
    env = dict(os.environ)
    if threads:
        # On a shared host, fewer threads avoid OpenMP spin-waits on descheduled peers.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(
    impl: str,
    adapter_dirs: list[Path],
    extra: list[str],
    timeout: float,
    threads: int | None = None,
) -> dict[str, Any]:
    """Run one measurement subprocess and return its JSON line (or an error dict)."""
    partial = Path(tempfile.gettempdir()) / f"lorashare-bench-{os.getpid()}-{impl}.json"
    partial.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(WORKER),
        "--impl",
        impl,
        *extra,
        "--partial-out",
        str(partial),
        "--adapters",
        *map(str, adapter_dirs),
    ]
    # Other jobs on the host inflate wall times; the load average lets readers judge that.
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=worker_env(threads),
        )
    except subprocess.TimeoutExpired:
        # Keep what the worker had measured, and say in which phase it ran out of time.
        result = json.loads(partial.read_text()) if partial.exists() else {"impl": impl}
        result.update(
            ok=False,
            error=f"timed out after {timeout:.0f} s in {result.get('phase', '?')}",
            loadavg_before=load_before,
        )
        partial.unlink(missing_ok=True)
        return result
    partial.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = proc.stderr.strip().splitlines()[-3:]
        return {
            "impl": impl,
            "ok": False,
            "returncode": proc.returncode,
            "error": f"worker exited {proc.returncode} without a result: {' | '.join(tail)}",
        }
    result["process_wall_s"] = wall
    result["loadavg_before"] = load_before
    result["loadavg_after"] = os.getloadavg()[0]
    if not result.get("ok"):
        logger.warning("%s failed: %s", impl, result.get("error"))
    return result


def extrapolate(result: dict[str, Any], factor: float) -> dict[str, Any]:
    """Scale per-group costs of a subset run to the full set of groups (linear)."""
    out = dict(result)
    for key in EXTRAPOLATED_FIELDS:
        if isinstance(out.get(key), (int, float)):
            out[key] = out[key] * factor
    return out


def bench_config(cfg: BenchConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """All rows (floor, reference, ours k32, ours equal-bytes) of one configuration."""
    cache = args.cache_dir
    dirs = synth.ensure_adapter_set(cfg.shape, cfg.n, cfg.variant, cache)
    common = ["--reference-dir", str(args.reference_dir)]
    if args.max_eval_adapters:
        common += ["--max-eval-adapters", str(args.max_eval_adapters)]
    base = {"config": cfg.label, **asdict(cfg)}
    rows: list[dict[str, Any]] = []

    logger.info("[%s] I/O floor", cfg.label)
    floor = run_worker("floor", dirs, [], args.timeout, args.threads)
    rows.append({**base, "impl": "floor", "op": "floor", "result": floor})

    full_groups = 2 * cfg.spec.num_modules
    ref_dirs, factor, sub_groups = dirs, 1.0, full_groups
    if cfg.ref_modules and cfg.ref_modules < cfg.spec.num_modules:
        sub = cache / "adapters" / f"{dirs[0].parent.name}-first{cfg.ref_modules}mod"
        ref_dirs = synth.ensure_subset(dirs, cfg.ref_modules, sub)
        sub_groups = 2 * cfg.ref_modules
        factor = full_groups / sub_groups
    logger.info(
        "[%s] reference k=%d on %d/%d groups",
        cfg.label,
        args.k,
        sub_groups,
        full_groups,
    )
    ref = run_worker(
        "reference",
        ref_dirs,
        common + ["--k", str(args.k), "--ckpt-dir", str(cache / "ckpt" / "reference")],
        args.timeout,
        args.threads,
    )
    row = {
        **base,
        "impl": "reference",
        "op": f"k={args.k}",
        "result": ref,
        "measured_groups": sub_groups,
        "total_groups": full_groups,
    }
    if factor != 1.0 and ref.get("ok"):
        row["result"] = extrapolate(ref, factor)
        row["result_measured"] = ref
        row["extrapolated_from_groups"] = sub_groups
    rows.append(row)

    logger.info("[%s] ours k=%d fp32", cfg.label, args.k)
    ours = run_worker(
        "ours",
        dirs,
        common
        + [
            "--k",
            str(args.k),
            "--dtype",
            "float32",
            "--ckpt-dir",
            str(cache / "ckpt" / "ours"),
        ],
        args.timeout,
        args.threads,
    )
    rows.append({**base, "impl": "ours", "op": f"k={args.k}", "result": ours})

    budget = reference_tensor_bytes(cfg.spec, cfg.n, args.k)
    measured_ref = row.get("result_measured", ref)
    if (
        factor == 1.0
        and measured_ref.get("ok")
        and measured_ref.get("ckpt_tensor_bytes") != budget
    ):
        logger.warning(
            "reference tensor bytes %s != analytic %s",
            measured_ref.get("ckpt_tensor_bytes"),
            budget,
        )
    logger.info(
        "[%s] ours equal bytes (budget %.2f MB, %s)",
        cfg.label,
        budget / 1e6,
        args.budget_dtype,
    )
    ours_b = run_worker(
        "ours",
        dirs,
        common
        + [
            "--budget-bytes",
            str(budget),
            "--dtype",
            args.budget_dtype,
            "--ckpt-dir",
            str(cache / "ckpt" / "ours-budget"),
        ],
        args.timeout,
        args.threads,
    )
    rows.append(
        {
            **base,
            "impl": "ours",
            "op": "equal-bytes",
            "budget_bytes": budget,
            "dtype": args.budget_dtype,
            "result": ours_b,
        }
    )
    return rows


# ── tables ────────────────────────────────────────────────────────────────────


def _num(x: Any, fmt: str) -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "–"


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b <= 0:
        return "–"
    return f"{a / b:.3g}"


def _mode(row: dict[str, Any]) -> str:
    res = row["result"]
    if row["op"] == "equal-bytes":
        # What the worker actually passed (it drops dtype if unsupported), else what was asked.
        dtype = (
            res.get("kwargs", {}).get("dtype", row.get("dtype", "?"))
            if res.get("ok")
            else row.get("dtype", "?")
        )
        return f"bytes≤{row['budget_bytes'] / 1e6:.3g}MB {dtype}"
    return f"{row['op']} fp32"


def _note(row: dict[str, Any]) -> str:
    res = row["result"]
    notes = []
    if not res.get("ok"):
        notes.append("FAILED: " + str(res.get("error", "?"))[:90])
    if row.get("extrapolated_from_groups"):
        notes.append(
            f"extrapolated from {row['extrapolated_from_groups']}/{row['total_groups']} groups"
            " (err: measured groups)"
        )
    load = res.get("loadavg_after")
    if isinstance(load, float) and load > BUSY_LOAD:
        # Our own worker accounts for ~torch_threads of the load; more means other jobs.
        notes.append(f"host busy (load {load:.1f})")
    if res.get("budget_ok") is False:
        notes.append("OVER BUDGET")
    if (
        row["op"] == "equal-bytes"
        and res.get("ok")
        and res.get("k_reported") is not None
    ):
        notes.append(f"k={res['k_reported']}")
    if res.get("err_missing_modules"):
        notes.append(f"{res['err_missing_modules']} modules missing")
    return "; ".join(notes)


def results_table(rows: list[dict[str, Any]]) -> str:
    """The main Markdown table (one row per impl/operating point)."""
    head = (
        "| config | impl | k/mode | compress s | floor s | ×floor | RSS MB | bytes MB "
        "| ΔW err mean | ΔW err max | reconstruct ms | note |"
    )
    lines = [head, "|" + "---|" * 12]
    floors = {
        r["config"]: r["result"].get("floor_s") for r in rows if r["impl"] == "floor"
    }
    for row in rows:
        if row["impl"] == "floor":
            continue
        res = row["result"]
        floor = floors.get(row["config"])
        rss = res.get("rss_peak_over_baseline_mb")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["config"],
                    row["impl"],
                    _mode(row),
                    _num(res.get("compress_s"), ".3g"),
                    _num(floor, ".3g"),
                    _ratio(res.get("compress_s"), floor),
                    _num(
                        rss * 1024 * 1024 / 1e6
                        if isinstance(rss, (int, float))
                        else None,
                        ".4g",
                    ),
                    _num(
                        res["ckpt_bytes"] / 1e6 if "ckpt_bytes" in res else None, ".4g"
                    ),
                    _num(res.get("err_mean"), ".2e"),
                    _num(res.get("err_max"), ".2e"),
                    _num(res.get("reconstruct_ms"), ".3g"),
                    _note(row),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def ratio_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours/reference (and ×floor) per configuration and operating point."""
    out = []
    by_cfg: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_cfg.setdefault(r["config"], {})[f"{r['impl']}:{r['op']}"] = r["result"]
    for cfg, d in by_cfg.items():
        ref = next((v for k, v in d.items() if k.startswith("reference:")), {})
        floor = d.get("floor:floor", {}).get("floor_s")
        for key, label in ((k, k.split(":", 1)[1]) for k in d if k.startswith("ours:")):
            ours = d[key]
            entry = {"config": cfg, "op": label}
            for name, field in (
                ("time", "compress_s"),
                ("cpu", "compress_cpu_s"),
                ("rss", "rss_peak_over_baseline_mb"),
                ("bytes", "ckpt_bytes"),
                ("err_mean", "err_mean"),
                ("err_max", "err_max"),
            ):
                a, b = ours.get(field), ref.get(field)
                ok = (
                    isinstance(a, (int, float))
                    and isinstance(b, (int, float))
                    and b > 0
                )
                entry[f"{name}_ours_over_ref"] = a / b if ok else None
            for name, res in (("ours", ours), ("ref", ref)):
                t = res.get("compress_s")
                entry[f"{name}_over_floor"] = (
                    t / floor if isinstance(t, (int, float)) and floor else None
                )
            out.append(entry)
    return out


def ratios_table(ratios: list[dict[str, Any]]) -> str:
    """Markdown table of ours/reference ratios (<1 means ours is smaller/faster)."""
    head = (
        "| config | ours op (vs ref k=32) | time ours/ref | CPU time ours/ref | RSS ours/ref "
        "| bytes ours/ref | ΔW err mean ours/ref | ΔW err max ours/ref | ours ×floor | ref ×floor |"
    )
    lines = [head, "|" + "---|" * 10]
    for e in ratios:
        lines.append(
            "| "
            + " | ".join(
                [
                    e["config"],
                    e["op"],
                    *(
                        _num(e[f"{n}_ours_over_ref"], ".3g")
                        for n in ("time", "cpu", "rss", "bytes", "err_mean", "err_max")
                    ),
                    _num(e["ours_over_floor"], ".3g"),
                    _num(e["ref_over_floor"], ".3g"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


# ── baselines at equal bytes (--baselines) ────────────────────────────────────


def _baselines():
    """benchmarks/baselines.py (it imports this repository's lorashare, so only the --baselines mode loads it)."""
    try:
        import baselines  # run as a script: benchmarks/ is sys.path[0]
    except ImportError:  # run as python -m benchmarks.run
        from benchmarks import baselines
    return baselines


def _read_adapter(folder: Path) -> dict[str, tuple[Any, Any, float]]:
    """``{module: (B, A, scale)}`` of one PEFT adapter folder (float32, PEFT's scale)."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    state = split_lora(load_file(str(folder / "adapter_model.safetensors")))
    return {m: (ab["B"].float(), ab["A"].float(), module_scale(cfg, m, ab["A"].shape[0])) for m, ab in state.items()}


@functools.lru_cache(maxsize=4096)
def _adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())


def _read_module(folders: list[Path], module: str) -> tuple[list[Any], list[Any], list[float]]:
    """One module's (B, A, scale) from every adapter, reading only its two tensors."""
    from safetensors import safe_open

    Bs, As, scales = [], [], []
    for folder in folders:
        cfg = _adapter_config(folder)
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").float()
            b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").float()
        Bs.append(b)
        As.append(a)
        scales.append(module_scale(cfg, module, a.shape[0]))
    return Bs, As, scales


def _errors_summary(per_adapter: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per adapter: the mean over its modules; then the mean and the max over adapters (and the worst module)."""
    import statistics

    means = {n: statistics.fmean(e.values()) for n, e in per_adapter.items()}
    worst = max(means, key=means.get)
    return {
        "err_mean": statistics.fmean(means.values()),
        "err_max_adapter": means[worst],
        "err_max_adapter_name": worst,
        "err_max_module": max(v for e in per_adapter.values() for v in e.values()),
        "err_per_adapter": means,
    }


def _lorashare_point(dirs: list[Path], scheme: str, ratio: float, ckpt: Path) -> dict[str, Any]:
    """lorashare (SHARE) at ``target_ratio=ratio``, ``dtype=scheme``: bytes of its bases + loadings files and
    the ΔW error of every module of every adapter (by benchmarks/oracle.py, on ``reconstruct``)."""
    from safetensors.torch import load_file

    from lorashare import SHAREModel

    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    share = SHAREModel.from_adapters({d.name: str(d) for d in dirs}, target_ratio=ratio, dtype=scheme, progress=False)
    share.save_pretrained(str(ckpt))
    compress_s = time.perf_counter() - t0
    files = [p for p in ckpt.rglob("*.safetensors") if "classifier_head" not in p.name]
    nbytes = sum(p.stat().st_size for p in files)
    ks = list(share.config.k_per_group.values())
    per_adapter: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    for d in dirs:
        cfg = json.loads((d / "adapter_config.json").read_text())
        res = adapter_errors(load_file(str(d / "adapter_model.safetensors")), cfg, share.reconstruct(d.name), cfg)
        if res["missing"]:
            raise RuntimeError(f"lorashare lost modules of {d.name}: {res['missing'][:3]}")
        per_adapter[d.name] = res["errors"]
    del share
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"method": "lorashare", "scheme": scheme, "ratio": ratio, "bytes": nbytes, "files": len(files),
            "k_mean": sum(ks) / len(ks), "k_min": min(ks), "k_max": max(ks), "compress_s": compress_s,
            "eval_s": time.perf_counter() - t0, **_errors_summary(per_adapter)}


def _per_adapter_points(dirs: list[Path], budgets: dict[tuple[str, float], int]) -> list[dict[str, Any]]:
    """Per-adapter SVD + quantization at each (scheme, ratio)'s per-adapter byte budget, one adapter at a time."""
    import statistics

    bl = _baselines()
    errs: dict[tuple[str, float], dict[str, dict[str, float]]] = {key: {} for key in budgets}
    nbytes: dict[tuple[str, float], list[int]] = {key: [] for key in budgets}
    ranks: dict[tuple[str, float], list[int]] = {key: [] for key in budgets}
    t0 = time.perf_counter()
    for d in dirs:
        modules = _read_adapter(d)
        for (scheme, ratio), budget in budgets.items():
            rebuilt, n, rk, _ = bl.truncate_adapter(modules, budget, scheme)
            if n > budget:
                raise RuntimeError(f"{d.name}: {n} bytes over the budget of {budget} ({scheme}, 1/{ratio:g})")
            nbytes[(scheme, ratio)].append(n)
            ranks[(scheme, ratio)] += rk.values()
            errs[(scheme, ratio)][d.name] = {
                m: bl.relative_error(B, A, s, *rebuilt[m]) for m, (B, A, s) in modules.items()}
    seconds = time.perf_counter() - t0
    return [{"method": "per-adapter SVD", "scheme": scheme, "ratio": ratio, "bytes": sum(nbytes[(scheme, ratio)]),
             "budget_per_adapter": budget, "bytes_per_adapter_max": max(nbytes[(scheme, ratio)]),
             "k_mean": statistics.fmean(ranks[(scheme, ratio)]), "k_min": min(ranks[(scheme, ratio)]),
             "k_max": max(ranks[(scheme, ratio)]), "compress_s": seconds / len(budgets),
             **_errors_summary(errs[(scheme, ratio)])}
            for (scheme, ratio), budget in budgets.items()]


def _mean_adapter_point(dirs: list[Path]) -> dict[str, Any]:
    """Every adapter replaced by the mean ΔW of the others, module by module (one module of all adapters in memory)."""
    from safetensors import safe_open

    bl = _baselines()
    with safe_open(str(dirs[0] / "adapter_model.safetensors"), framework="pt") as f:
        modules = sorted(split_lora(dict.fromkeys(f.keys())))
    per_adapter: dict[str, dict[str, float]] = {d.name: {} for d in dirs}
    t0 = time.perf_counter()
    for m in modules:
        errs = bl.loo_mean_errors(*_read_module(dirs, m)).tolist()
        for d, e in zip(dirs, errs):
            per_adapter[d.name][m] = e
    return {"method": "mean adapter", "scheme": "-", "ratio": None, "bytes": 0, "compress_s": time.perf_counter() - t0,
            **_errors_summary(per_adapter)}


def baselines_config(cfg: BenchConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """lorashare at each (scheme, 1/ratio) and, at its bytes, each adapter compressed alone; and the mean adapter."""
    dirs = synth.ensure_adapter_set(cfg.shape, cfg.n, cfg.variant, args.cache_dir)
    base = {"config": cfg.label, **asdict(cfg)}
    lora_bytes = cfg.n * cfg.spec.num_modules * cfg.spec.r * (cfg.spec.d_in + cfg.spec.d_out) * FP32_BYTES
    rows: list[dict[str, Any]] = []
    budgets: dict[tuple[str, float], int] = {}
    for scheme in args.schemes:
        for ratio in args.ratios:
            logger.info("[%s] lorashare 1/%g %s", cfg.label, ratio, scheme)
            point = _lorashare_point(dirs, scheme, ratio, args.cache_dir / "ckpt" / "baselines")
            rows.append({**base, **point, "lora_bytes": lora_bytes})
            # each adapter alone gets its share of the bytes lorashare's files take (floor: never more)
            budgets[(scheme, ratio)] = point["bytes"] // cfg.n
    logger.info("[%s] per-adapter SVD at %d byte budgets", cfg.label, len(budgets))
    rows += [{**base, **p, "lora_bytes": lora_bytes} for p in _per_adapter_points(dirs, budgets)]
    logger.info("[%s] mean adapter (leave-one-out)", cfg.label)
    rows.append({**base, **_mean_adapter_point(dirs), "lora_bytes": lora_bytes})
    return rows


def _method_label(row: dict[str, Any]) -> str:
    if row["method"] == "mean adapter":
        return "mean adapter (leave-one-out)"
    return f"{row['method']} + {row['scheme']}" if row["method"] != "lorashare" else f"lorashare {row['scheme']}"


def baselines_tables(rows: list[dict[str, Any]]) -> str:
    """The detail table (every method and budget) and the summary (lorashare's error / the best per-adapter one's)."""
    lines = [
        "| config | budget | method | bytes on disk MB (share of LoRA) | per adapter kB "
        "| k (lorashare, per module side) or r′ (per adapter, per module): mean (min–max) "
        "| ΔW err mean | ΔW err worst adapter | s |",
        "|" + "---|" * 9,
    ]
    order = {"lorashare": 0, "per-adapter SVD": 1, "mean adapter": 2}
    keyed = sorted(rows, key=lambda r: (r["config"], r["ratio"] or math.inf, order[r["method"]], r["scheme"]))
    for r in keyed:
        n = r["n"]
        budget = f"1/{r['ratio']:g}" if r["ratio"] else "–"
        share = f"{r['bytes'] / 1e6:.3f} (1/{r['lora_bytes'] / r['bytes']:.1f})" if r["bytes"] else "0 (no per-adapter bytes)"
        k = f"{r['k_mean']:.1f} ({r['k_min']}–{r['k_max']})" if "k_mean" in r else "–"
        lines.append(
            f"| {r['config']} | {budget} | {_method_label(r)} | {share} | {r['bytes'] / n / 1e3:.1f} | {k} | "
            f"{r['err_mean']:.4f} | {r['err_max_adapter']:.4f} | {r['compress_s']:.1f} |")
    lines += ["", "| config | budget | lorashare nf4 | lorashare int8 | SVD + nf4 | SVD + int8 | mean adapter "
              "| lorashare nf4 / SVD + nf4 | lorashare int8 / SVD + int8 | lorashare best / per-adapter best |",
              "|" + "---|" * 10]
    by: dict[tuple[str, float], dict[str, dict[str, Any]]] = {}
    mean: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["method"] == "mean adapter":
            mean[r["config"]] = r
        else:
            by.setdefault((r["config"], r["ratio"]), {})[f"{r['method']}|{r['scheme']}"] = r
    for (config, ratio), d in sorted(by.items()):
        def err(key):
            return d[key]["err_mean"] if key in d else None

        ours = [e for e in (err("lorashare|nf4"), err("lorashare|int8")) if e is not None]
        alone = [e for e in (err("per-adapter SVD|nf4"), err("per-adapter SVD|int8")) if e is not None]
        lines.append("| " + " | ".join([
            config, f"1/{ratio:g}",
            *(_num(err(k), ".4f") for k in ("lorashare|nf4", "lorashare|int8", "per-adapter SVD|nf4",
                                             "per-adapter SVD|int8")),
            _num(mean.get(config, {}).get("err_mean"), ".4f"),
            _ratio(err("lorashare|nf4"), err("per-adapter SVD|nf4")),
            _ratio(err("lorashare|int8"), err("per-adapter SVD|int8")),
            _ratio(min(ours) if ours else None, min(alone) if alone else None),
        ]) + " |")
    return "\n".join(lines)


def run_baselines(args: argparse.Namespace, t_start: float) -> None:
    """``--baselines``: lorashare vs each adapter compressed alone vs the mean adapter, at equal bytes on disk."""
    configs = [BenchConfig(shape, n, v) for shape in (args.shapes or ["7b-8layers"]) for n in (args.ns or [100])
               for v in args.variants]
    logger.info("baselines, %d configurations: %s", len(configs), ", ".join(c.label for c in configs))
    rows: list[dict[str, Any]] = []
    for cfg in configs:
        rows.extend(baselines_config(cfg, args))
    import lorashare

    mach = machine_info()
    shapes = sorted({c.shape for c in configs})
    md = "\n".join([
        f"### lorashare vs each adapter compressed alone vs the mean adapter, at equal bytes on disk "
        f"({dt.date.today().isoformat()})",
        "",
        f"Machine: {mach['cpu_model']}, {mach['cpus_usable'] or mach['cpu_count']} CPU cores, "
        f"{mach['mem_total_gb'] or 0:.0f} GB; torch {mach['torch']}; lorashare {lorashare.__version__} "
        f"(git {(git_revision() or '?')[:10]}, working tree).  Command: `python benchmarks/run.py "
        f"{' '.join(sys.argv[1:])}` ({(time.perf_counter() - t_start) / 60:.0f} min).",
        "",
        "Shapes: " + "; ".join(
            f"`{sh}` = {synth.SHAPES[sh].num_modules} modules of d_out × d_in = {synth.SHAPES[sh].d_out} × "
            f"{synth.SHAPES[sh].d_in}, r = {synth.SHAPES[sh].r}" for sh in shapes) + ".  "
        "ΔW err: ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F per module, ΔW = s·B·A; averaged over an adapter's modules, then the mean "
        "and the worst over adapters.  Bytes: lorashare's bases + loadings files on disk (headers, index and "
        "scales included); each adapter alone gets lorashare's bytes / N for one file of its own in the same "
        "layout and scheme.",
        "",
        baselines_tables(rows),
    ])
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "baselines",
        "machine": mach,
        "versions": {"ours": {"version": getattr(lorashare, "__version__", None), "file": lorashare.__file__}},
        "git_revision": git_revision(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "configs": [asdict(c) | {"label": c.label} for c in configs],
        "rows": rows,
        "total_wall_s": time.perf_counter() - t_start,
        "loadavg_end": os.getloadavg(),
    }
    write_report(args.out, report, md)


# ── metadata ──────────────────────────────────────────────────────────────────


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python and torch versions."""
    cpu = None
    mem_kb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    import torch

    return {
        "cpu_model": cpu or platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "mem_total_gb": mem_kb / 1024**2 if mem_kb else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg(),
    }


def impl_versions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Version and import location of each implementation, from the workers."""
    out: dict[str, Any] = {"reference": None, "ours": None}
    for r in rows:
        res = r["result"]
        if r["impl"] in out and out[r["impl"]] is None and res.get("impl_file"):
            out[r["impl"]] = {
                "version": res.get("impl_version"),
                "file": res.get("impl_file"),
            }
    for impl, v in out.items():
        if v is None:
            errs = [r["result"].get("error") for r in rows if r["impl"] == impl]
            out[impl] = {"version": None, "error": next((e for e in errs if e), None)}
    return out


def write_report(out: Path, report: dict, md: str) -> None:
    """The run's JSON at ``out``, its Markdown table beside it (``.md``), and the table on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(md + "\n")
    logger.info("wrote %s (+ .md) in %.0f s", out, report["total_wall_s"])
    print(md)


def git_revision() -> str | None:
    """HEAD commit of the repo, if any (the tree may be dirty)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="benchmark ours vs lorashare 0.1.3")
    ap.add_argument("--quick", action="store_true", help="small configs only (< 2 min)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(synth.SHAPES))
    ap.add_argument(
        "--ns", nargs="+", type=int, help="override the numbers of adapters"
    )
    ap.add_argument(
        "--variants", nargs="+", choices=synth.VARIANTS, default=list(synth.VARIANTS)
    )
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument(
        "--budget-dtype", default="float16", help="ours' dtype at equal bytes"
    )
    ap.add_argument(
        "--ref-modules-7b",
        type=int,
        default=4,
        help="7B shape: the reference runs on this many modules (x2 groups) and is "
        "extrapolated; 4 = one decoder layer = 8 groups (~10 s per group)",
    )
    ap.add_argument(
        "--max-eval-adapters",
        type=int,
        default=None,
        help="ΔW error on at most this many (evenly spaced) adapters",
    )
    ap.add_argument("--timeout", type=float, default=None, help="per-worker seconds")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP/MKL threads per worker (default: torch's choice, all cores)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reference-dir", type=Path, default=BENCH_DIR / ".reference")
    ap.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="lorashare vs per-adapter SVD + int8/nf4 vs the mean adapter at equal bytes on disk "
        "(default: --shapes 7b-8layers --ns 100)",
    )
    ap.add_argument(
        "--ratios", nargs="+", type=float, default=[16, 32, 64], help="--baselines: target ratios (1/x of the LoRA bytes)"
    )
    ap.add_argument(
        "--schemes", nargs="+", choices=["int8", "nf4"], default=["nf4", "int8"], help="--baselines: storage schemes"
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    if args.timeout is None:
        args.timeout = 300.0 if args.quick else 1800.0
    if args.out is None:
        if args.baselines:
            shape = "-".join(args.shapes or ["7b-8layers"])
            stem = f"codec-baselines-{shape}-{dt.date.today().isoformat()}"
        else:
            stem = dt.date.today().isoformat() + ("-quick" if args.quick else "")
        args.out = BENCH_DIR / "results" / f"{stem}.json"
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    t_start = time.perf_counter()
    if args.baselines:
        sys.path.insert(1, str(REPO_ROOT))  # the lorashare of this repository
        run_baselines(args, t_start)
        return
    ensure_reference(args.reference_dir)
    configs = plan(args.quick, args.shapes, args.ns, args.variants, args.ref_modules_7b)
    logger.info(
        "%d configurations: %s", len(configs), ", ".join(c.label for c in configs)
    )

    rows: list[dict[str, Any]] = []
    for cfg in configs:
        rows.extend(bench_config(cfg, args))
    ratios = ratio_rows(rows)

    md = "\n\n".join([results_table(rows), ratios_table(ratios)])
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "versions": impl_versions(rows),
        "git_revision": git_revision(),
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
        },
        "configs": [asdict(c) | {"label": c.label} for c in configs],
        "rows": rows,
        "ratios": ratios,
        "total_wall_s": time.perf_counter() - t_start,
        "loadavg_end": os.getloadavg(),
    }
    write_report(args.out, report, md)


if __name__ == "__main__":
    main()
