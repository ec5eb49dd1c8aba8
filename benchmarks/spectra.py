"""Auto and budget modes against fixed k: how fast, and which k they pick.

For each adapter set (synthetic, ``benchmarks/synth.py``; default: two layers of
q/v at d=4096, r=16, independent A inits) this times, in this process with the
threads pinned (``--threads``), the median of ``--repeats`` runs of
``SHAREModel.from_adapters`` in each mode:

* ``fixed``  -- ``num_components=32``;
* ``auto``   -- ``num_components="auto"``, ``variance_threshold=0.9`` (partial spectra);
* ``budget`` -- ``budget_bytes`` = the fixed-k checkpoint's tensor bytes (partial spectra);
* ``fixed@auto`` -- fixed k at the largest k that ``auto`` chose: the same-size fit, for scale;
* ``exact``  -- ``auto`` with every spectrum from a full ``eigh`` (the previous method, as the
  reference for the k chosen), only up to ``--exact-max-n`` adapters since it is cubic in N.

It writes ``benchmarks/results/<date>-spectra.{json,md}`` with the machine and its
load average before and after each row (a busy machine inflates the times).

Usage::

    python benchmarks/spectra.py --quick          # N=50, one repeat
    python benchmarks/spectra.py --ns 50 200 800
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

try:
    import synth  # run as a script: benchmarks/ is sys.path[0]
    from run import git_revision, machine_info
except ImportError:  # run as python -m benchmarks.spectra
    from benchmarks import synth
    from benchmarks.run import git_revision, machine_info

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"


def _run(dirs: List[Path], **kwargs: Any) -> Dict[str, Any]:
    from lorashare import SHAREModel

    t0 = time.perf_counter()
    share = SHAREModel.from_adapters([str(d) for d in dirs], progress=False, **kwargs)
    sec = time.perf_counter() - t0
    st = share.config.compression_stats
    ks = list(share.config.k_per_group.values())
    return {
        "seconds": sec,
        "k_min": min(ks),
        "k_max": max(ks),
        "k_per_group": dict(share.config.k_per_group),
        "tensor_bytes": st["compressed_bytes"],
        "delta_w_rel_error_mean": st["delta_w_rel_error_mean"],
        "capped_groups": st.get("capped_groups", []),
    }


def _timed(dirs: List[Path], repeats: int, **kwargs: Any) -> Dict[str, Any]:
    load_before = os.getloadavg()[0]
    runs = [_run(dirs, **kwargs) for _ in range(repeats)]
    out = dict(runs[-1])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["seconds_all"] = [r["seconds"] for r in runs]
    out["loadavg_before"], out["loadavg_after"] = load_before, os.getloadavg()[0]
    return out


def bench(shape: str, n: int, variant: str, args: argparse.Namespace) -> Dict[str, Any]:
    from lorashare.codec import compress
    dirs = synth.ensure_adapter_set(shape, n, variant, args.cache_dir)
    row: Dict[str, Any] = {"shape": shape, "n": n, "variant": variant}
    row["fixed"] = _timed(dirs, args.repeats, num_components=args.k, dtype=args.dtype)
    if "auto" in args.modes:
        row["auto"] = _timed(dirs, args.repeats, num_components="auto", variance_threshold=args.threshold, dtype=args.dtype)
    if "budget" in args.modes:
        row["budget"] = _timed(dirs, args.repeats, budget_bytes=row["fixed"]["tensor_bytes"], dtype=args.dtype)
    if "auto" in args.modes and not args.quick:
        row["fixed@auto"] = _timed(dirs, 1, num_components=row["auto"]["k_max"], dtype=args.dtype)
    if "auto" in args.modes and n <= args.exact_max_n:
        saved = compress.EXACT_SPECTRUM_ROWS
        compress.EXACT_SPECTRUM_ROWS = 10**9  # every spectrum by a full eigh: the exact selection
        try:
            row["exact"] = _timed(dirs, 1, num_components="auto", variance_threshold=args.threshold, dtype=args.dtype)
        finally:
            compress.EXACT_SPECTRUM_ROWS = saved
        a, e = row["auto"], row["exact"]
        row["k_diff_max"] = max(abs(a["k_per_group"][g] - e["k_per_group"][g]) for g in e["k_per_group"])
        row["error_rel_diff"] = (a["delta_w_rel_error_mean"] - e["delta_w_rel_error_mean"]) / e["delta_w_rel_error_mean"]
    logging.getLogger("benchmarks.spectra").info("%s", {k: v for k, v in row.items() if not isinstance(v, dict)})
    return row


def _s(row: Dict[str, Any], mode: str) -> str:
    r = row.get(mode)
    return f"{r['seconds']:.2f} s" if r else "–"


def table(rows: List[Dict[str, Any]]) -> str:
    lines = [
        "| set | fixed k=32 | auto (0.9) | budget (= fixed's bytes) | auto / fixed | budget / fixed | auto k | "
        "fixed at auto's max k | exact (full eigh) auto | k vs exact | ΔW error vs exact | capped sides | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f = r["fixed"]["seconds"]
        ratio = lambda m: f"{r[m]['seconds'] / f:.2f}×" if m in r else "–"  # noqa: E731
        kd = f"max {r['k_diff_max']}" if "k_diff_max" in r else "–"
        ed = f"{100 * r['error_rel_diff']:+.2f}%" if "error_rel_diff" in r else "–"
        load = max(r[m]["loadavg_after"] for m in ("fixed", "auto", "budget") if m in r)
        ks = f"{r['auto']['k_min']}–{r['auto']['k_max']}" if "auto" in r else "–"
        capped = len(r["auto"]["capped_groups"]) if "auto" in r else "–"
        lines.append(
            f"| {r['shape']} N={r['n']} {r['variant']} | {f:.2f} s | {_s(r, 'auto')} | {_s(r, 'budget')} | "
            f"{ratio('auto')} | {ratio('budget')} | {ks} | {_s(r, 'fixed@auto')} | {_s(r, 'exact')} | "
            f"{kd} | {ed} | {capped} | {load:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="7b-qv2", choices=sorted(synth.SHAPES))
    ap.add_argument("--ns", type=int, nargs="+", default=[50, 200, 800])
    ap.add_argument("--variant", default="diff-seed", choices=synth.VARIANTS)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (pinned)")
    ap.add_argument("--exact-max-n", type=int, default=50, help="largest N for the full-eigh reference")
    ap.add_argument("--modes", nargs="+", default=["auto", "budget"], choices=["auto", "budget"],
                    help="modes timed besides fixed k")
    ap.add_argument("--quick", action="store_true", help="N=50, one repeat, no fixed@auto")
    ap.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache")
    args = ap.parse_args()
    if args.quick:
        args.ns, args.repeats = [50], 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("lorashare").setLevel(logging.WARNING)  # the cap warnings stay; the adapter lists go
    import torch

    torch.set_num_threads(args.threads)
    RESULTS.mkdir(exist_ok=True)
    ns = "-".join(str(n) for n in args.ns)
    stem = RESULTS / f"{dt.date.today().isoformat()}-spectra-{args.shape}-n{ns}{'-quick' if args.quick else ''}"
    meta = {"machine": machine_info(), "git": git_revision(), "args": {k: str(v) for k, v in vars(args).items()}}
    rows: List[Dict[str, Any]] = []
    for n in args.ns:  # written after every row: a long run leaves what it measured
        rows.append(bench(args.shape, n, args.variant, args))
        md = table(rows)
        meta["loadavg_end"] = os.getloadavg()
        stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        stem.with_suffix(".md").write_text(
            f"# auto/budget speed ({dt.date.today().isoformat()})\n\n{md}\n\nMachine: {meta['machine']['cpu_model']}, "
            f"{args.threads} torch threads, load average at start {meta['machine']['loadavg_at_start'][0]:.1f} "
            f"(the 'load' column is the highest after a row; other jobs shared the machine).\n")
    print(table(rows))


if __name__ == "__main__":
    main()
