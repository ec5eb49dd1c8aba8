"""Cold adapters for a vLLM server: lorashare's resolver against downloading each adapter repo whole.

vLLM's Hub resolver answers a request for an adapter it has not loaded by listing the adapter's
repo and downloading all of it.  lorashare's resolver (:mod:`lorashare.serving.vllm_plugin`, through
:class:`lorashare.serving.cache.AdapterCache`) downloads the SHARE checkpoint's bases once, then per
adapter only its loadings, and rebuilds the adapter into a folder.  Both serve the same N
adapters, one cold request after another, from one local Hub (:mod:`tests.hubserver`) whose
responses share one link of a stated bandwidth.  Each side runs in a fresh interpreter with an
empty Hugging Face cache, after an ``os.sync()`` so that it does not pay for the writes of the
side before.

Adapters: the 7B shape of ``synth.py`` (32 layers, q/k/v/o, d=4096, r=16), stored in bfloat16
(33.5 MB each).  The SHARE checkpoint: the same adapters at k=32, bfloat16 storage; the
resolver writes its rebuilt factors in bfloat16 too (``LORASHARE_VLLM_DTYPE=bfloat16``).
"Time to first use" is the time from the request to a folder vLLM can load; vLLM's own load of
the folder is the same for both and not counted.

    python benchmarks/resolver.py               # N=100, 50/100/400 MB/s (about 6 minutes on 2 cores)
    python benchmarks/resolver.py --quick       # N=10, 100 MB/s
    python benchmarks/resolver.py -n 100 --bandwidth 100

Results: ``benchmarks/results/resolver-<date>.{json,md}``.  Goal at N=100 and 100 MB/s: at least
20× fewer bytes and at least 5× less time per cold adapter.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOALS = {"bytes": 20.0, "time": 5.0, "bandwidth_mb_s": 100.0, "n": 100}
MB = 1e6


def _prepare(n: int, k: int, cache: Path) -> Dict[str, Any]:
    """The adapters (bfloat16 files) and the SHARE checkpoint folder, made once into ``cache``."""
    sys.path.insert(0, str(HERE))
    import synth  # noqa: E402
    import torch
    from safetensors.torch import load_file, save_file

    from lorashare import SHAREModel

    dirs = synth.ensure_adapter_set("7b", n, "diff-seed", cache)
    bf16 = cache / "resolver" / f"7b-n{n}-bf16"
    for d in dirs:
        out = bf16 / d.name
        if not (out / "adapter_model.safetensors").exists():
            out.mkdir(parents=True, exist_ok=True)
            tensors = {key: t.to(torch.bfloat16) for key, t in load_file(str(d / "adapter_model.safetensors")).items()}
            (out / "adapter_config.json").write_bytes((d / "adapter_config.json").read_bytes())
            save_file(tensors, str(out / ".tmp.safetensors"), metadata={"format": "pt"})
            os.replace(out / ".tmp.safetensors", out / "adapter_model.safetensors")
    ckpt = cache / "resolver" / f"7b-n{n}-k{k}-bf16-share"
    if not (ckpt / "share_config.json").exists():
        started = time.perf_counter()
        share = SHAREModel.from_adapters([str(bf16 / d.name) for d in dirs], num_components=k, dtype="bfloat16",
                                         progress=False, base_model="bench/llama-7b-shape")
        share.save_pretrained(ckpt, overwrite=True)
        print(f"compressed {n} adapters at k={k} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return {"adapters": [str(bf16 / d.name) for d in dirs], "checkpoint": str(ckpt)}


def _files(folder: str) -> Dict[str, bytes]:
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def _worker(impl: str, url: str, names: List[str], dtype: str) -> Dict[str, Any]:
    """One side, in a fresh interpreter whose HF cache is empty: seconds per cold adapter, in order."""
    seconds: List[float] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        if impl == "whole":
            from huggingface_hub import HfApi, snapshot_download

            api = HfApi(endpoint=url)
            for name in names:
                t = time.perf_counter()
                api.list_repo_files(f"bench/{name}")  # what vLLM's HfHubResolver asks first
                folder = snapshot_download(f"bench/{name}", allow_patterns="*", endpoint=url)
                seconds.append(time.perf_counter() - t)
                assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
        else:
            from lorashare.serving.cache import AdapterCache, parse_checkpoints

            cache = AdapterCache(parse_checkpoints("share=bench/share"), os.path.join(tmp, "rebuilt"), dtype=dtype)
            for name in names:
                t = time.perf_counter()
                folder = cache.folder_for(f"share/{name}")
                seconds.append(time.perf_counter() - t)
                assert folder and os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))
    return {"seconds": seconds}


def _run_side(impl: str, hub: Any, names: List[str], bandwidth: Optional[float], dtype: str,
              threads: int, profile: Optional[Path] = None, tmp: Optional[str] = None) -> Dict[str, Any]:
    hub.bandwidth = bandwidth * MB if bandwidth else None
    hub.reset_log()
    os.sync()  # each side starts with no dirty pages of the one before, which would throttle its writes
    with tempfile.TemporaryDirectory(dir=tmp) as home:
        env = {**os.environ, "HF_HOME": home, **({"BENCH_TMP": tmp} if tmp else {}), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT)}
        env.pop("HF_TOKEN", None)
        started = time.perf_counter()
        extra = ["--profile", str(profile)] if profile else []
        out = subprocess.run([sys.executable, __file__, "--worker", impl, "--url", hub.url, "--dtype", dtype,
                              "--names", ",".join(names), *extra], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if out.returncode:
        raise SystemExit(f"{impl} worker failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    s = result["seconds"]
    return {"impl": impl, "bandwidth_mb_s": bandwidth, "bytes": hub.bytes_sent, "total_s": sum(s), "first_s": s[0],
            "median_rest_s": statistics.median(s[1:]) if len(s) > 1 else s[0], "mean_s": sum(s) / len(s),
            "worker_wall_s": wall, "seconds": s}


def _table(rows: List[Dict[str, Any]], n: int) -> List[str]:
    lines = [f"| bandwidth | side | downloaded | mean per adapter | first | median of the rest | all {n} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bw = f"{r['bandwidth_mb_s']:g} MB/s" if r["bandwidth_mb_s"] else "loopback, unpaced"
        lines.append(f"| {bw} | {r['impl']} | {r['bytes'] / MB:,.1f} MB | {r['mean_s'] * 1000:,.0f} ms | "
                     f"{r['first_s'] * 1000:,.0f} ms | {r['median_rest_s'] * 1000:,.0f} ms | {r['total_s']:,.1f} s |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=100, help="cold adapters (default 100)")
    ap.add_argument("-k", type=int, default=32, help="the checkpoint's components (default 32)")
    ap.add_argument("--bandwidth", default="50,100,400",
                    help="MB/s of the Hub's link, comma-separated; 0 = loopback, unpaced (default 50,100,400)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"],
                    help="the resolver's export dtype (default bfloat16, the adapters' own)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="N=10 at 100 MB/s")
    ap.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--tmp", help="folder for both sides' caches (default: the system's temporary folder); "
                                   "/dev/shm takes the disk out of the measurement")
    ap.add_argument("--sides", default="whole,ours", help="which sides to run (default whole,ours)")
    ap.add_argument("--profile", type=Path, help="write a cProfile of each worker to PROFILE-<side>.prof")
    ap.add_argument("--worker", choices=["whole", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--names", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.profile:
            import cProfile

            prof = cProfile.Profile()
            result = prof.runcall(_worker, args.worker, args.url, args.names.split(","), args.dtype)
            prof.dump_stats(f"{args.profile}-{args.worker}.prof")
        else:
            result = _worker(args.worker, args.url, args.names.split(","), args.dtype)
        print(json.dumps(result))
        return
    if args.quick:
        args.n, args.bandwidth = 10, "100"
    sys.path.insert(0, str(ROOT))
    from tests.hubserver import HubServer

    made = _prepare(args.n, args.k, args.cache_dir)
    names = [Path(p).name for p in made["adapters"]]
    rows: List[Dict[str, Any]] = []
    with HubServer() as hub:
        for folder in made["adapters"]:
            repo = f"bench/{Path(folder).name}"
            hub.create_repo(repo)
            hub.commit(repo, _files(folder), lfs=["adapter_model.safetensors"])
        hub.create_repo("bench/share")
        files = _files(made["checkpoint"])
        hub.commit("bench/share", files, lfs=[p for p in files if p.endswith(".safetensors")])
        for bw in [float(b) for b in args.bandwidth.split(",")]:
            for impl in args.sides.split(","):
                row = _run_side(impl, hub, names, bw or None, args.dtype, args.threads, args.profile, args.tmp)
                rows.append(row)
                print(f"{impl:5s} {bw:g} MB/s: {row['bytes'] / MB:,.1f} MB, mean {row['mean_s'] * 1000:,.0f} ms",
                      file=sys.stderr)
    ratios = []
    for whole, ours in zip(rows[::2], rows[1::2]) if args.sides == "whole,ours" else []:
        ratios.append({"bandwidth_mb_s": whole["bandwidth_mb_s"], "bytes": whole["bytes"] / ours["bytes"],
                       "time": whole["total_s"] / ours["total_s"]})
    today = _dt.date.today().isoformat()
    meta = {"date": today, "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "n": args.n, "k": args.k, "dtype": args.dtype,
            "caches": args.tmp or tempfile.gettempdir(),
            "command": " ".join(["python", "benchmarks/resolver.py"] + sys.argv[1:])}
    lines = [f"{today}, {meta['machine']}; `{meta['command']}`; 7B shape (32 layers × q/k/v/o, d=4096, r=16), "
             f"adapters in bfloat16, checkpoint k={args.k} bfloat16, export {args.dtype}, N={args.n}; caches in "
             f"{meta['caches']}.", ""]
    lines += _table(rows, args.n) + ["", "| bandwidth | bytes: whole / ours | time: whole / ours |", "|---|---|---|"]
    for r in ratios:
        bw = f"{r['bandwidth_mb_s']:g} MB/s" if r["bandwidth_mb_s"] else "loopback, unpaced"
        lines.append(f"| {bw} | {r['bytes']:.1f}× | {r['time']:.1f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    goal = next((r for r in ratios if r["bandwidth_mb_s"] == GOALS["bandwidth_mb_s"]), None)
    if goal and args.n == GOALS["n"]:  # the goal is the project's, not the users': printed, not in the .md
        ok = goal["bytes"] >= GOALS["bytes"] and goal["time"] >= GOALS["time"]
        print(f"Goal at N={GOALS['n']}, {GOALS['bandwidth_mb_s']:g} MB/s: ≥{GOALS['bytes']:g}× fewer bytes, "
              f"≥{GOALS['time']:g}× less time: {'met' if ok else 'missed'} ({goal['bytes']:.1f}×, {goal['time']:.1f}×).")
    out = args.out or HERE / "results" / f"resolver-{today}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "ratios": ratios}, indent=1))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
