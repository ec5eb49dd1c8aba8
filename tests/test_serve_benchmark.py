"""``benchmarks/serve.py --quick`` runs from a fresh clone and writes well-formed results (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def test_serving_benchmark_quick_run(tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "serve.py"), "--quick", "--shapes", "7b", "--ns", "3",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| shape | N | checkpoint MB | ours MB |" in r.stdout and "| phase | tokens/row |" in r.stdout
    data = json.loads(out.read_text())
    mem = {m["impl"]: m for m in data["memory"]}
    assert set(mem) == {"ours", "peft", "load_into"} and not any("error" in m for m in mem.values())
    assert mem["ours"]["added_bytes"] <= 1.1 * mem["ours"]["checkpoint"]["total"]
    assert mem["peft"]["added_bytes"] > mem["ours"]["added_bytes"]
    layer = data["layer"][0]["results"]
    assert {(x["phase"], x["distinct"]) for x in layer} == {(p, d) for p in ("decode", "prefill") for d in (1, 8, 64)}
    assert all(x["ours_ms"] > 0 and x["peft_ms"] > 0 for x in layer)
    assert data["machine"] and data["goals"]
