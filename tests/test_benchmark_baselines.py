"""benchmarks/baselines.py: the per-adapter SVD + quantization and mean-adapter baselines at equal bytes."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
bl = pytest.importorskip("benchmarks.baselines")

from lorashare.format import storage  # noqa: E402


def _lora(d_out=96, d_in=96, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=g) * 0.05, torch.rand(r, d_in, generator=g) / d_in**0.5


def test_factored_svd_is_the_svd_of_the_dense_delta_w():
    B, A = _lora(40, 30, 6)
    U, S, Vh = bl.factored_svd(B, A, 2.0)
    dense = 2.0 * B.double() @ A.double()
    assert torch.allclose(U @ torch.diag(S) @ Vh, dense, atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:6], rtol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(96, 96), (80, 48)])
def test_float32_at_a_large_budget_keeps_every_component_and_rebuilds_delta_w_exactly(shape):
    B, A = _lora(*shape)
    Bh, Ah, n = bl.truncate_quantized(B, A, 2.0, 10**9, "float32")
    assert Bh.shape == (shape[0], 8) and Ah.shape == (8, shape[1])
    assert n == 4 * 8 * sum(shape)  # the factors themselves: no more bytes than the LoRA
    assert bl.relative_error(B, A, 2.0, Bh, Ah) < 1e-6
    assert torch.allclose(Bh.double() @ Ah.double(), 2.0 * B.double() @ A.double(), atol=1e-7)


@pytest.mark.parametrize("scheme", ["int8", "nf4", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", [(96, 96), (80, 48)])
def test_the_bytes_reported_are_what_the_stored_tensors_take(scheme, shape):
    B, A = _lora(*shape)
    for rank in range(0, 9):
        U, S, Vh = bl.factored_svd(B, A, 2.0)
        Bh, Ah, stored = bl._store(*bl._split(U, S, Vh, rank), scheme)
        taken = sum(s.nbytes if isinstance(s, storage.Stored) else s.numel() * s.element_size() for s in stored)
        assert bl.truncate_at_rank(B, A, 2.0, rank, scheme)[2] == taken == bl.factor_nbytes(*shape, rank, scheme)
        assert Bh.shape == (shape[0], rank) and Ah.shape == (rank, shape[1])
    for nbytes in (500, 2000, 5000, 20000):
        Bh, Ah, n = bl.truncate_quantized(B, A, 2.0, nbytes, scheme)
        assert n <= nbytes and n == bl.factor_nbytes(*shape, Bh.shape[1], scheme)
        if Bh.shape[1] < 8:  # the largest rank that fits: one more component would not
            assert bl.factor_nbytes(*shape, Bh.shape[1] + 1, scheme) > nbytes


def test_quantized_factors_are_decoded_by_lorashares_own_storage():
    """The baseline's error includes its quantization error: the decoded factors are exactly what
    lorashare.format.storage decodes, not the float factors."""
    B, A = _lora()
    U, S, Vh = bl.factored_svd(B, A, 2.0)
    Bf, Af = bl._split(U, S, Vh, 4)
    Bh, Ah, _ = bl.truncate_at_rank(B, A, 2.0, 4, "nf4")
    ref = storage.quantize(torch.cat([Bf.T, Af]), "nf4").dequantize()
    assert torch.equal(Bh, ref[:4].T) and torch.equal(Ah, ref[4:])
    assert not torch.equal(Bh, Bf)
    exact = bl.truncate_at_rank(B, A, 2.0, 4, "float32")
    assert bl.relative_error(B, A, 2.0, Bh, Ah) > bl.relative_error(B, A, 2.0, *exact[:2])


@pytest.mark.parametrize("scheme", ["int8", "nf4", "float16"])
def test_the_error_decreases_as_the_bytes_increase(scheme):
    B, A = _lora(128, 128, 8, seed=3)
    errors, nbytes = [], []
    for budget in range(0, 12000, 250):
        Bh, Ah, n = bl.truncate_quantized(B, A, 2.0, budget, scheme)
        errors.append(bl.relative_error(B, A, 2.0, Bh, Ah))
        nbytes.append(n)
    assert errors[0] == 1.0 and nbytes[0] == 0  # nothing fits: ΔŴ = 0
    assert all(b >= a for a, b in zip(nbytes, nbytes[1:]))
    assert all(e2 <= e1 + 1e-12 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 0.3 * errors[1]  # nf4 keeps ~0.1 of quantization error at full rank


def test_an_adapters_file_is_counted_as_written_and_fits_its_budget(tmp_path):
    from safetensors import safe_open

    from lorashare.format.tensorfile import write_tensors

    g = torch.Generator().manual_seed(1)
    modules = {f"layer.{i}.q": (torch.randn(128, 8, generator=g), torch.randn(8, 128, generator=g), 0.5)
               for i in range(3)}
    modules["layer.0.o"] = (torch.randn(64, 8, generator=g), torch.randn(8, 128, generator=g), 0.5)  # not square
    for scheme in ("nf4", "int8", "float16", "float32"):
        previous = -1
        for budget in (2000, 6000, 12000, 40000):
            rebuilt, n, ranks, file_tensors = bl.truncate_adapter(modules, budget, scheme)
            assert n <= budget
            stored = {m: bl._store(*bl._split(*bl.factored_svd(*modules[m]), k), scheme)[2]
                      for m, k in ranks.items() if k}
            tensors = bl.adapter_file_tensors(stored, scheme)
            assert tensors.keys() == file_tensors.keys()
            assert all(torch.equal(tensors[k], file_tensors[k]) for k in tensors)
            path = tmp_path / f"{scheme}-{budget}.safetensors"
            with open(path, "wb") as f:  # lorashare's own writer, as its checkpoints are written
                write_tensors(f, tensors, bl.META)
            assert os.path.getsize(path) == n == bl.adapter_file_nbytes(stored, scheme)
            with safe_open(str(path), framework="pt") as f:  # a valid safetensors file, holding what was stored
                assert all(torch.equal(f.get_tensor(k), t) for k, t in tensors.items())
            # the same count from lorashare.format.storage's byte formulas (what its budgets use)
            shapes = [kc for m in sorted(ranks) if ranks[m] for kc in bl.factor_shapes(
                modules[m][0].shape[0], modules[m][1].shape[1], ranks[m])]
            data = sum(storage.stored_nbytes(scheme, k, c) for k, c in shapes)
            if storage.is_quantized(scheme):
                head = storage.header_nbytes(storage.packed_entries(scheme, shapes), bl.META) + 8 * len(shapes)
            else:
                head = storage.header_nbytes([e for key, t in tensors.items()
                                              for e in storage.stored_entries(key, scheme, *t.shape)], bl.META)
            assert n == head + data
            captured = sum(ranks.values())
            assert captured >= previous
            previous = captured
            for m, (B, A, _) in modules.items():
                assert rebuilt[m][0].shape == (B.shape[0], ranks[m]) and rebuilt[m][1].shape == (ranks[m], A.shape[1])


def test_modules_of_one_shape_share_the_budget_evenly():
    g = torch.Generator().manual_seed(2)
    spectra = [torch.linspace(1.0, 0.1, 8) * (1 + 0.01 * float(torch.rand(1, generator=g))) for _ in range(10)]
    one = bl.factor_nbytes(256, 256, 1, "nf4")  # each further component; the first also pays its index entry
    first = one + bl.INDEX_BYTES
    ranks = bl.allocate_ranks(spectra, [(256, 256)] * 10, 10 * first + 25 * one + one // 2, "nf4")
    assert sum(ranks) == 35 and max(ranks) - min(ranks) <= 1
    assert bl.allocate_ranks(spectra, [(256, 256)] * 10, first - 1, "nf4") == [0] * 10


def test_the_leave_one_out_mean_matches_the_dense_computation():
    g = torch.Generator().manual_seed(4)
    ranks = [4, 4, 2, 6, 4]
    Bs = [torch.randn(24, r, generator=g) for r in ranks]
    As = [torch.randn(r, 20, generator=g) for r in ranks]
    scales = [0.5, 1.0, 2.0, 1.5, 1.0]
    dense = [s * b.double() @ a.double() for b, a, s in zip(Bs, As, scales)]
    errs = bl.loo_mean_errors(Bs, As, scales)
    for i in range(5):
        mean = sum(dense[j] for j in range(5) if j != i) / 4
        want = float((dense[i] - mean).norm() / dense[i].norm())
        assert abs(float(errs[i]) - want) < 1e-9
        Bm, Am = bl.mean_adapter(Bs, As, scales, exclude=i)
        assert torch.allclose(Bm @ Am, mean, atol=1e-12)
        assert abs(bl.relative_error(Bs[i], As[i], scales[i], Bm, Am) - want) < 1e-6
    same = bl.loo_mean_errors([Bs[0]] * 3, [As[0]] * 3, [1.0] * 3)
    assert float(same.max()) < 1e-6  # identical adapters: the mean of the others is exact


@pytest.mark.slow
def test_run_py_baselines_mode_prints_both_tables(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "baselines.json"
    r = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "run.py"), "--baselines", "--shapes", "roberta", "--ns", "6",
         "--variants", "same-seed", "--ratios", "16", "--schemes", "nf4", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=root, env=dict(os.environ, PYTHONPATH=root),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| config | budget | method |" in r.stdout and "| lorashare best / per-adapter best |" in r.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(x["method"], x["scheme"]) for x in rows} == {("lorashare", "nf4"), ("per-adapter SVD", "nf4"),
                                                          ("mean adapter", "-")}
    ours = next(x for x in rows if x["method"] == "lorashare")
    alone = next(x for x in rows if x["method"] == "per-adapter SVD")
    assert alone["bytes"] <= ours["bytes"] and alone["bytes_per_adapter_max"] <= ours["bytes"] // 6
    assert all(0 <= x["err_mean"] <= x["err_max_adapter"] for x in rows)
    assert out.with_suffix(".md").read_text().startswith("### lorashare vs each adapter compressed alone")
