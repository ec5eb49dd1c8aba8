"""One benchmark measurement in a fresh process; prints exactly one JSON line.

Run by ``benchmarks/run.py``; each implementation gets its own interpreter so
that two packages both named ``lorashare`` never meet, and so peak-RSS numbers
are not polluted by earlier work.

Modes (``--impl``):

* ``ours``       -- the package in this repository (repo root put first on sys.path);
* ``reference``  -- lorashare 0.1.3 installed with ``pip --target`` in ``--reference-dir``;
* ``floor``      -- no compression: time to load_file every adapter and read each byte once.

For ``ours``/``reference`` the worker compresses (``from_adapters`` +
``save_pretrained``), measures peak RSS over the post-import baseline, sizes
the checkpoint, reloads it, times ``reconstruct`` and computes the ΔW error of
every module of every adapter against the original files.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import inspect
import json
import logging
import os
import shutil
import statistics
import struct
import sys
import time
import traceback
from pathlib import Path
from typing import Any

logger = logging.getLogger("benchmarks.worker")

REPO_ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ itself, for oracle.py
from oracle import adapter_errors  # noqa: E402  (imports no lorashare: either one may load here)

# ── process memory ────────────────────────────────────────────────────────────


def _status_kb(field: str) -> int | None:
    """A ``VmXXX`` field of /proc/self/status in kB (None off Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS so the peak covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    t = os.times()
    return t.user + t.system


# ── file helpers ──────────────────────────────────────────────────────────────


def dir_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all files, number of files) under ``path``."""
    total = count = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
            count += 1
    return total, count


def safetensors_payload_bytes(path: Path) -> int:
    """Tensor bytes (excluding header) of every .safetensors file under ``path``."""
    total = 0
    for p in path.rglob("*.safetensors"):
        with open(p, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(hlen))
        for key, meta in header.items():
            if key != "__metadata__":
                start, end = meta["data_offsets"]
                total += end - start
    return total


# ── ΔW fidelity ───────────────────────────────────────────────────────────────


def evaluate_errors(
    model, adapters: dict[str, str], max_adapters: int | None
) -> dict[str, Any]:
    """ΔW relative error of every module of (up to max_adapters) adapters, by benchmarks/oracle.py."""
    from safetensors.torch import load_file

    names = list(adapters)
    if max_adapters and len(names) > max_adapters:
        # Evenly spaced so the sample covers the whole set.
        step = len(names) / max_adapters
        names = [names[int(i * step)] for i in range(max_adapters)]
    errors: list[float] = []
    missing = rank_changed = 0
    for name in names:
        path = Path(adapters[name])
        cfg = json.loads((path / "adapter_config.json").read_text())
        # The reconstruction carries the original adapter_config, hence the same scales.
        res = adapter_errors(load_file(str(path / "adapter_model.safetensors")), cfg, model.reconstruct(name), cfg)
        errors += res["errors"].values()
        missing += len(res["missing"])
        rank_changed += res["rank_changed"]
    return {
        "err_mean": statistics.fmean(errors) if errors else None,
        "err_max": max(errors) if errors else None,
        "err_median": statistics.median(errors) if errors else None,
        "err_modules": len(errors),
        "err_adapters": len(names),
        "err_missing_modules": missing,
        "err_rank_changed_modules": rank_changed,
    }


# ── implementations ───────────────────────────────────────────────────────────


def import_impl(impl: str, reference_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Import SHAREModel of the chosen implementation; also describe it."""
    if impl == "reference":
        sys.path.insert(0, str(reference_dir.resolve()))
    else:
        sys.path.insert(0, str(REPO_ROOT))
    import lorashare  # imported late: which one depends on impl

    # A folder without __init__.py (package still being written) has no __file__.
    origin = getattr(lorashare, "__file__", None) or next(iter(lorashare.__path__), "?")
    where = Path(origin).resolve()
    from_ref = reference_dir.resolve() in where.parents
    if (impl == "reference") != from_ref:
        raise ImportError(f"imported the wrong lorashare for impl={impl}: {where}")
    from lorashare import SHAREModel

    version = None
    if impl == "reference":
        for dist in importlib.metadata.distributions(path=[str(reference_dir)]):
            if dist.metadata["Name"] == "lorashare":
                version = dist.version
    else:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            version = importlib.metadata.version("lorashare")
    info = {
        "impl_version": version or getattr(lorashare, "__version__", None),
        "impl_module_version": getattr(lorashare, "__version__", None),
        "impl_file": str(where),
    }
    return SHAREModel, info


def build_kwargs(
    share_cls, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, bool]]:
    """from_adapters kwargs for this operating point, feature-detected."""
    params = inspect.signature(share_cls.from_adapters).parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    supports = {
        "dtype": "dtype" in params or has_var_kw,
        "budget_bytes": "budget_bytes" in params or has_var_kw,
    }
    kwargs: dict[str, Any] = {}
    if args.budget_bytes is not None:
        if not supports["budget_bytes"]:
            raise NotImplementedError("from_adapters has no budget_bytes parameter")
        # The budget decides the per-module k (water-filling), so no num_components.
        kwargs["budget_bytes"] = args.budget_bytes
    else:
        kwargs["num_components"] = args.k
    if args.dtype is not None and supports["dtype"]:
        kwargs["dtype"] = args.dtype
    if "progress" in params:
        # Progress bars cost time and are not part of the work being measured.
        kwargs["progress"] = False
    return kwargs, supports


def describe_k(model) -> Any:
    """Whatever k the model reports (int, 'auto', or a per-module summary)."""
    cfg = getattr(model, "config", None)
    k = getattr(cfg, "num_components", None)
    try:
        json.dumps(k)
    except TypeError:
        k = str(k)
    return k


def save_partial(args: argparse.Namespace, result: dict[str, Any], phase: str) -> None:
    """Record progress so a timed-out run still tells which phase was too slow."""
    result["phase"] = phase
    if args.partial_out is not None:
        tmp = args.partial_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.partial_out)


def _warm_up(share_cls: Any) -> None:
    """Compress and save two tiny PEFT-format adapters (d=16, r=2) in a temp folder."""
    import json as _json
    import tempfile

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="bench-warm-") as tmp:
        dirs = {}
        for i in range(2):
            d = Path(tmp) / f"w{i}"
            d.mkdir()
            g = torch.Generator().manual_seed(i)
            save_file({
                "base_model.model.m.q.lora_A.weight": torch.randn(2, 16, generator=g),
                "base_model.model.m.q.lora_B.weight": torch.randn(16, 2, generator=g),
            }, str(d / "adapter_model.safetensors"))
            (d / "adapter_config.json").write_text(_json.dumps(
                {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "base_model_name_or_path": "warm"}))
            dirs[f"w{i}"] = str(d)
        m = share_cls.from_adapters(dirs, num_components=4)
        m.save_pretrained(str(Path(tmp) / "ckpt"))
        m.reconstruct("w0")


def run_share(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Compress, size, reload, reconstruct, evaluate: fills ``result``."""
    import torch

    share_cls, info = import_impl(args.impl, args.reference_dir)
    result.update(info)
    kwargs, supports = build_kwargs(share_cls, args)
    result["supports"] = supports
    result["kwargs"] = kwargs
    adapters = {Path(p).name: str(p) for p in args.adapters}
    ckpt = Path(args.ckpt_dir)
    shutil.rmtree(ckpt, ignore_errors=True)

    # Warm up lazy init (imports, BLAS/LAPACK, numpy bridge, first page faults) the same way
    # for both impls: one full compress + save of two tiny adapters.  What is timed next is
    # the steady-state work, as in a long-running process (a server, a notebook, the Space).
    torch.linalg.eigh(torch.eye(8) + 0.0)
    _warm_up(share_cls)
    gc.collect()
    baseline_kb = _status_kb("VmRSS")
    result["rss_reset_ok"] = reset_peak_rss()

    save_partial(args, result, "from_adapters")
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    model = share_cls.from_adapters(adapters, **kwargs)
    t1 = time.perf_counter()
    result["from_adapters_s"] = t1 - t0
    save_partial(args, result, "save_pretrained")
    model.save_pretrained(str(ckpt))
    t2 = time.perf_counter()
    # CPU seconds are far less sensitive than wall time to other jobs on the host.
    result["compress_cpu_s"] = _cpu_seconds() - cpu0

    peak_kb = _status_kb("VmHWM")
    result.update(
        from_adapters_s=t1 - t0,
        save_s=t2 - t1,
        compress_s=t2 - t0,
        rss_baseline_mb=(baseline_kb or 0) / 1024,
        rss_peak_over_baseline_mb=((peak_kb or 0) - (baseline_kb or 0)) / 1024,
        k_reported=describe_k(model),
    )
    del model
    gc.collect()

    result["ckpt_bytes"], result["ckpt_files"] = dir_bytes(ckpt)
    result["ckpt_tensor_bytes"] = safetensors_payload_bytes(ckpt)
    if args.budget_bytes is not None:
        result["budget_ok"] = result["ckpt_tensor_bytes"] <= args.budget_bytes

    save_partial(args, result, "from_pretrained")
    t0 = time.perf_counter()
    loaded = share_cls.from_pretrained(str(ckpt))
    result["load_s"] = time.perf_counter() - t0
    names = list(loaded.adapter_names)
    result["adapter_names_ok"] = sorted(names) == sorted(adapters)
    first = min(adapters)
    save_partial(args, result, "reconstruct")
    times = []
    for _ in range(args.reconstruct_repeats):
        t0 = time.perf_counter()
        loaded.reconstruct(first)
        times.append(time.perf_counter() - t0)
    result["reconstruct_ms"] = 1000 * statistics.median(times)
    result["reconstruct_ms_all"] = [1000 * t for t in times]
    save_partial(args, result, "evaluate_errors")
    t0 = time.perf_counter()
    result.update(evaluate_errors(loaded, adapters, args.max_eval_adapters))
    result["eval_s"] = time.perf_counter() - t0
    save_partial(args, result, "done")
    if not args.keep_checkpoint:
        shutil.rmtree(ckpt, ignore_errors=True)


def _read_pass(files: list[str], touch: bool) -> float:
    """Seconds to load_file every file once; ``touch`` reads every byte too."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    for f in files:
        state = load_file(f)
        if touch:
            # load_file maps the file lazily (copy-on-write mmap); summing each tensor
            # is the cheapest way to actually bring every byte into the CPU once.
            for t in state.values():
                t.sum()
        del state
    return time.perf_counter() - t0


def run_floor(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Best-of-N time to read every adapter tensor once (warm page cache)."""
    files = [str(Path(p) / "adapter_model.safetensors") for p in args.adapters]
    result["bytes_read"] = sum(os.path.getsize(f) for f in files)
    # Pass 0 is untimed: it warms the page cache so every timed pass sees the same state.
    _read_pass(files, touch=True)
    times = [_read_pass(files, touch=True) for _ in range(args.floor_repeats)]
    map_times = [_read_pass(files, touch=False) for _ in range(args.floor_repeats)]
    result["floor_s"] = min(times)
    result["floor_s_all"] = times
    result["floor_map_only_s"] = min(map_times)
    result["floor_gb_per_s"] = result["bytes_read"] / result["floor_s"] / 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="one lorashare benchmark measurement")
    ap.add_argument("--impl", choices=("ours", "reference", "floor"), required=True)
    ap.add_argument(
        "--adapters", nargs="+", type=Path, required=True, help="adapter folders"
    )
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument(
        "--dtype", default=None, help="storage dtype, passed only if supported"
    )
    ap.add_argument("--budget-bytes", type=int, default=None)
    ap.add_argument("--ckpt-dir", type=Path, default=None)
    ap.add_argument(
        "--reference-dir", type=Path, default=REPO_ROOT / "benchmarks" / ".reference"
    )
    ap.add_argument("--reconstruct-repeats", type=int, default=5)
    ap.add_argument("--floor-repeats", type=int, default=3)
    ap.add_argument("--max-eval-adapters", type=int, default=None)
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument(
        "--partial-out",
        type=Path,
        default=None,
        help="progress file (JSON), rewritten after each phase",
    )
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    result: dict[str, Any] = {"impl": args.impl, "ok": False}
    # Library prints must not corrupt the one JSON line on stdout.
    real_stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if args.impl == "floor":
                run_floor(args, result)
            else:
                if args.ckpt_dir is None:
                    raise ValueError("--ckpt-dir is required")
                run_share(args, result)
        import torch

        result["torch_version"] = torch.__version__
        result["torch_threads"] = torch.get_num_threads()
        result["ok"] = True
    except ImportError as e:
        result["error"] = f"{args.impl} not importable: {type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=5)
    except Exception as e:  # noqa: BLE001  -- any failure becomes a table row
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc(limit=8)
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
