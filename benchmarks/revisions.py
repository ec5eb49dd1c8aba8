"""Two revisions of lorashare side by side: compress, save, load, rebuild and serve, timed alternately.

The baseline is a git revision (default ``HEAD``) checked out in a temporary worktree; the
candidate is this working tree.  Each measurement runs in a fresh interpreter that imports
lorashare from one tree (the benchmark helpers always come from this tree), the two trees
alternate, and the tables give medians and the ratio candidate / baseline (below 1 is faster).

    python benchmarks/revisions.py                 # HEAD vs the working tree, 5 rounds (~3 min on 2 cores)
    python benchmarks/revisions.py --base v0.2.0 --rounds 9 --threads 1

Results: ``benchmarks/results/revisions-<date>.{json,md}``.
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
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TASKS = ("compress-fp32", "compress-int8", "load", "rebuild", "serve-build", "serve-decode")


def _worker(task: str, cache: Path) -> Dict[str, Any]:
    """One measurement (in the tree's interpreter): seconds per operation, best of a few calls."""
    import torch

    sys.path.insert(0, str(HERE))
    import synth  # noqa: E402  (this tree's generator: the same adapters for both revisions)

    from lorashare import SHAREModel

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    dirs = [str(d) for d in synth.ensure_adapter_set("roberta", 20, "same-seed", cache)]

    def best(fn, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    if task.startswith("compress"):
        dtype = task.split("-")[1].replace("fp32", "float32")
        return {"seconds": best(lambda: SHAREModel.from_adapters(dirs, num_components=32, dtype=dtype, progress=False))}
    with tempfile.TemporaryDirectory() as tmp:
        if task in ("load", "rebuild"):
            SHAREModel.from_adapters(dirs, num_components=32, progress=False).save_pretrained(f"{tmp}/ck")
            if task == "load":
                return {"seconds": best(lambda: SHAREModel.from_pretrained(f"{tmp}/ck"))}
            share = SHAREModel.from_pretrained(f"{tmp}/ck")
            return {"seconds": best(lambda: [share.reconstruct(n) for n in share.adapter_names])}
    import serve as bench_serve  # noqa: E402

    model = bench_serve.build_base("minilm")
    share = bench_serve.synth_share(model, "minilm", 100, 32)
    if task == "serve-build":
        return {"seconds": best(lambda: share.serve(model).unload(), repeats=3)}
    served = share.serve(model)
    names = share.adapter_names[:64]
    ids = torch.randint(1, 1000, (64, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):
            served(input_ids=ids, adapter_names=names)
        return {"seconds": best(lambda: served(input_ids=ids, adapter_names=names), repeats=20)}


def _run(tree: Path, task: str, cache: Path, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker", task, "--cache-dir", str(cache)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=str(tree))
    if out.returncode != 0:
        raise RuntimeError(f"{task} in {tree} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not Path(result["module"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"{task}: imported {result['module']}, not the lorashare of {tree}")
    return float(result["seconds"])


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="HEAD", help="git revision of the baseline (default HEAD)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        result = _worker(args.worker, args.cache_dir)
        import lorashare

        print(json.dumps({**result, "module": lorashare.__file__}))
        return 0
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="lorashare-base-") as tmp:
        base = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), rev], cwd=ROOT, check=True)
        try:
            times: Dict[str, Dict[str, List[float]]] = {}
            for task in args.tasks.split(","):
                times[task] = {"base": [], "candidate": []}
                for i in range(args.rounds):
                    order = [("base", base), ("candidate", ROOT)] if i % 2 == 0 else [("candidate", ROOT), ("base", base)]
                    for label, tree in order:
                        times[task][label].append(_run(tree, task, args.cache_dir, args.threads))
                print(task, {k: round(statistics.median(v), 4) for k, v in times[task].items()}, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    today = _dt.date.today().isoformat()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    candidate = f"working tree at {head}" + (" (with uncommitted changes)" if dirty else "")
    rows = [{"task": t, "base_s": statistics.median(v["base"]), "candidate_s": statistics.median(v["candidate"]),
             "ratio": statistics.median(v["candidate"]) / statistics.median(v["base"])} for t, v in times.items()]
    meta = {"date": today, "base": rev, "candidate": candidate, "rounds": args.rounds, "threads": args.threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "command": "python benchmarks/revisions.py "
            + " ".join(a for a in (argv or sys.argv[1:]))}
    out = args.out or HERE / "results" / f"revisions-{today}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows, "raw": times}, indent=2))
    md = [f"# {rev} vs the {candidate} ({today}, {meta['machine']}, {args.threads} thread(s), {args.rounds} rounds)", "",
          f"`{meta['command'].strip()}`", "", "| task | base (s) | candidate (s) | candidate / base |", "|---|---|---|---|"]
    md += [f"| {r['task']} | {r['base_s']:.4f} | {r['candidate_s']:.4f} | {r['ratio']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
