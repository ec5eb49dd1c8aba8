"""The benchmark runs from a fresh clone and prints a well-formed table (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(lines, header_start):
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[0], rows[2:]


def test_quick_benchmark_runs_and_prints_tables(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header, rows = _table(lines, "| config | impl |")
    assert {"compress s", "floor s", "RSS MB", "bytes MB", "ΔW err mean", "reconstruct ms"} <= set(header)
    impls = {row[header.index("impl")] for row in rows}
    assert {"ours", "reference"} <= impls
    for row in rows:
        if row[header.index("impl")] == "ours":
            float(row[header.index("compress s")])  # a number, not a failure marker
            assert 0 <= float(row[header.index("ΔW err mean")]) < 1.5
    rheader, rrows = _table(lines, "| config | ours op")
    assert any("time ours/ref" in h for h in rheader) and rrows
    data = json.loads(out.read_text())
    assert data["rows"] and data["machine"] and data["versions"]
