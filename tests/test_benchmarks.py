"""The benchmark runs from a fresh clone and prints a well-formed table (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _table(lines, header_start):
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[0], rows[2:]


@pytest.mark.slow
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


def test_the_oracle_matches_dense_delta_w_with_peft_scales():
    """benchmarks/oracle.py against ΔW formed densely, with rsLoRA, rank_pattern and alpha_pattern."""
    import torch

    from benchmarks.oracle import adapter_errors, module_scale

    g = torch.Generator().manual_seed(0)
    cfg = {"r": 4, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"layer.1.q": 2}, "alpha_pattern": {"q": 3}}
    mods = {"layer.0.q": 4, "layer.1.q": 2, "layer.0.v": 4}
    orig, rec = {}, {}
    for m, r in mods.items():
        a, b = torch.randn(r, 16, generator=g), torch.randn(12, r, generator=g)
        orig[f"base_model.model.{m}.lora_A.weight"], orig[f"base_model.model.{m}.lora_B.weight"] = a, b
        rec[f"base_model.model.{m}.lora_A.weight"] = a + 0.01 * torch.randn(r, 16, generator=g)
        rec[f"base_model.model.{m}.lora_B.weight"] = b
    assert module_scale(cfg, "layer.1.q", 2) == 3 / 2 ** 0.5  # alpha_pattern "q" matches the path's suffix
    assert module_scale(cfg, "layer.0.v", 4) == 8 / 2
    res = adapter_errors(orig, cfg, rec, cfg)
    assert set(res["errors"]) == set(mods) and not res["missing"]
    for m, r in mods.items():
        a, b = orig[f"base_model.model.{m}.lora_A.weight"], orig[f"base_model.model.{m}.lora_B.weight"]
        a2 = rec[f"base_model.model.{m}.lora_A.weight"]
        s = module_scale(cfg, m, r)
        dense = float((s * b @ a2 - s * b @ a).norm() / (s * b @ a).norm())
        assert abs(res["errors"][m] - dense) < 1e-6 * max(1.0, dense)
    # a rebuilt config with another scale is an error the oracle sees
    other = dict(cfg, lora_alpha=16, alpha_pattern={})
    assert adapter_errors(orig, cfg, orig, other)["errors"]["layer.0.v"] > 0.5
