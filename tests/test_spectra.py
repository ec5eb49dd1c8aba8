"""Partial spectra for auto and budget modes, and the break-even cap (issue #14)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import lorashare.codec.compress as C
from lorashare import SHAREModel
from lorashare.codec import subspace as S
from lorashare.errors import CheckpointError

THRESHOLDS = (0.5, 0.9)


@pytest.fixture(scope="module")
def diff_seed(tmp_path_factory):
    """20 RoBERTa-shaped adapters (d = 768, r = 8, 4 modules) with independent A inits: a slowly decaying A spectrum."""
    synth = pytest.importorskip("benchmarks.synth")
    root = tmp_path_factory.mktemp("synth")
    dirs = synth.ensure_subset(synth.ensure_adapter_set("roberta", 20, "diff-seed", root), 4, root / "four")
    return [str(d) for d in dirs]


@pytest.fixture
def partial(monkeypatch):
    """Force the partial-spectrum paths, even where a full eigh would be cheaper."""
    monkeypatch.setattr(C, "EXACT_SPECTRUM_ROWS", 0)
    monkeypatch.setattr(C, "_exact_cheaper", lambda *a, **k: False)


def _exact(monkeypatch):
    monkeypatch.setattr(C, "EXACT_SPECTRUM_ROWS", 10**9)


def _stacks(seed: int = 0, N: int = 24, r: int = 8, d: int = 512, G: int = 2):
    """Factor stacks of one chunk: A independent per adapter (flat spectrum), B mostly shared (fast decay)."""
    g = torch.Generator().manual_seed(seed)
    ranks = (r,) * N
    FA = torch.rand(G, N * r, d, generator=g) * 2 - 1
    shared = torch.randn(G, 12, d, generator=g)
    FB = torch.randn(G, N * r, 12, generator=g) @ shared + 0.3 * torch.randn(G, N * r, d, generator=g)
    return FA, FB, ranks


# ------------------------------------------------------------------------------ pure math
def test_largest_saving_k_is_the_break_even():
    # d = 4096, n = 16·200: k·(d + n) < d·n holds up to 1796 and fails from 1797 on
    d, n = 4096, 3200
    k = S.largest_saving_k(4 * d * n, 4 * (d + n))
    assert k * (d + n) < d * n <= (k + 1) * (d + n) and k == 1796
    assert S.largest_saving_k(10, 10) == 0  # one column already costs as much as everything
    assert S.largest_saving_k(2 * d * n, 4 * (d + n)) == S.largest_saving_k(d * n, 2 * (d + n))  # bytes, not values
    with pytest.raises(ValueError):
        S.largest_saving_k(100, 0)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_threshold_bases_pick_the_exact_k(threshold):
    FA, FB, ranks = _stacks()
    _, _, WA, WB, _, totals = C._weights(FA, FB, ranks)
    for side, F, W in (("A", FA, WA), ("B", FB, WB)):
        evals, _ = S.top_eigh(S.weighted_gram(F, W, ranks))
        exact = [S.choose_k(e, threshold) for e in evals]
        Us, kept, capped = S.threshold_bases(F, W, ranks, totals[side], threshold, [10**6] * F.shape[0])
        for g, (U, kk) in enumerate(zip(Us, kept)):
            k = U.shape[1]
            # Ritz values never exceed the exact ones, so the partial k is never below the exact k
            assert exact[g] <= k <= exact[g] + max(2, 0.06 * exact[g]), (side, g, k, exact[g])
            assert float(kk.sum()) >= (threshold - 1e-9) * float(totals[side][g])
            assert torch.allclose(U.T @ U, torch.eye(k), atol=1e-4)
            # the basis keeps (nearly) what the exact top-k subspace keeps
            X = F[g].T @ torch.block_diag(*[w[g] for w in W]).float()
            assert (U.T @ X).square().sum() >= 0.99 * evals[g, :k].sum()
        assert not any(capped)


def test_threshold_bases_stop_at_the_cap():
    FA, FB, ranks = _stacks()
    _, _, WA, _, _, totals = C._weights(FA, FB, ranks)
    Us, _, capped = S.threshold_bases(FA, WA, ranks, totals["A"], 0.99, [40, 10**6])
    assert Us[0].shape[1] == 40 and capped[0]
    assert not capped[1] and Us[1].shape[1] > 40


def test_spectrum_to_depth_matches_the_top_eigenvalues():
    FA, FB, ranks = _stacks()
    _, _, _, WB, _, _ = C._weights(FA, FB, ranks)
    evals, _ = S.top_eigh(S.weighted_gram(FB, WB, ranks))
    part = S.spectrum_to_depth(FB, WB, ranks, 24)
    assert part.shape == (2, 24)
    assert torch.all(part <= evals[:, :24] * (1 + 1e-5) + 1e-9)  # interlacing: never above the exact
    assert torch.allclose(part[:, :12], evals[:, :12], rtol=1e-3)  # the dominant part is exact


def test_partial_spectra_follow_the_input_dtype_and_device():
    """No tensor on a fixed device or dtype: everything follows the input's (run on CUDA when present)."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        FA, FB, ranks = _stacks(N=8)
        FA, FB = FA.double().to(dev), FB.double().to(dev)
        _, _, WA, _, _, totals = C._weights(FA, FB, ranks)
        Us, kept, _ = S.threshold_bases(FA, WA, ranks, totals["A"], 0.9, [10**6] * 2, start=8)
        assert all(U.device.type == dev and U.dtype == torch.float64 for U in Us)
        assert all(k.device.type == dev for k in kept)
        sp = S.spectrum_to_depth(FA, WA, ranks, 10)
        assert sp.device.type == dev
        Q, B = S.extend_range(FA, WA, ranks, FA.new_zeros(2, FA.shape[-1], 0), 6)
        assert Q.device.type == dev and Q.dtype == torch.float64 and B.device.type == dev


# ------------------------------------------------------------------------------ the pipeline
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_auto_partial_selection_agrees_with_the_full_eigh(diff_seed, threshold, monkeypatch):
    _exact(monkeypatch)
    exact = SHAREModel.from_adapters(diff_seed, num_components="auto", variance_threshold=threshold, progress=False)
    monkeypatch.setattr(C, "EXACT_SPECTRUM_ROWS", 0)
    monkeypatch.setattr(C, "_exact_cheaper", lambda *a, **k: False)
    fast = SHAREModel.from_adapters(diff_seed, num_components="auto", variance_threshold=threshold, progress=False)
    ke, kf = exact.config.k_per_group, fast.config.k_per_group
    assert ke.keys() == kf.keys()
    err_e = exact.config.compression_stats["delta_w_rel_error_mean"]
    err_f = fast.config.compression_stats["delta_w_rel_error_mean"]
    if ke != kf:  # then the ΔW error is within 1%, and no side keeps fewer directions than the threshold needs
        assert abs(err_f - err_e) <= 0.01 * err_e, (err_f, err_e)
        assert all(kf[g] >= ke[g] or g in fast.config.compression_stats["capped_groups"] for g in ke)
    assert fast.config.compression_stats["capped_groups"] == exact.config.compression_stats["capped_groups"]


def test_budget_partial_selection_agrees_with_the_full_eigh(diff_seed, monkeypatch):
    ref = SHAREModel.from_adapters(diff_seed, num_components=6, progress=False)
    budget = ref.config.compression_stats["compressed_bytes"]
    _exact(monkeypatch)
    exact = SHAREModel.from_adapters(diff_seed, budget_bytes=budget, progress=False)
    monkeypatch.setattr(C, "EXACT_SPECTRUM_ROWS", 0)
    monkeypatch.setattr(C, "_exact_cheaper", lambda *a, **k: False)
    fast = SHAREModel.from_adapters(diff_seed, budget_bytes=budget, progress=False)
    for share in (exact, fast):
        assert share.config.compression_stats["compressed_bytes"] <= budget
    ke, kf = exact.config.k_per_group, fast.config.k_per_group
    err_e = exact.config.compression_stats["delta_w_rel_error_mean"]
    err_f = fast.config.compression_stats["delta_w_rel_error_mean"]
    assert ke == kf or abs(err_f - err_e) <= 0.01 * err_e, (ke, kf, err_e, err_f)


def test_budget_deepens_a_spectrum_the_budget_reaches(diff_seed, monkeypatch, partial):
    """A first depth far too shallow: the sides that bought every computed direction are deepened."""
    calls = []
    real = C._spectra

    def spy(adapters, plans, opts, depth, *rest):
        calls.append(len(plans))
        return real(adapters, plans, opts, {k: min(v, 4) if not calls[1:] else v for k, v in depth.items()}, *rest)

    monkeypatch.setattr(C, "_spectra", spy)
    ref = SHAREModel.from_adapters(diff_seed, num_components=12, progress=False)
    budget = ref.config.compression_stats["compressed_bytes"]
    share = SHAREModel.from_adapters(diff_seed, budget_bytes=budget, progress=False)
    assert len(calls) >= 2  # depth 4 cannot hold an allocation of ~12 per side
    assert max(share.config.k_per_group.values()) > 4
    assert share.config.compression_stats["compressed_bytes"] <= budget


def test_auto_is_capped_at_the_break_even_and_says_so(diff_seed, tmp_path, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="lorashare.codec.compress"):
        share = SHAREModel.from_adapters(diff_seed, num_components="auto", variance_threshold=0.999, progress=False)
    st = share.config.compression_stats
    assert st["capped_groups"], "0.999 of a flat A spectrum needs nearly all n directions"
    for key, U in share.components.items():
        d, k = U.shape
        n = sum(int(r.loadings[key].shape[1]) for r in share.records.values())
        assert k * (d + n) < d * n, (key, k)  # never larger than the factors it replaces
        if key in st["capped_groups"]:
            assert (k + 1) * (d + n) >= d * n  # stopped exactly at the break-even
    warned = [r.getMessage() for r in caplog.records if "break-even" in r.getMessage()]
    assert warned and st["capped_groups"][0] in warned[0] and f"{len(st['capped_groups'])} of" in warned[0]
    share.summary()
    assert "capped at break-even" in capsys.readouterr().out
    # the record survives a save and load, and a malformed one is refused by name
    share.save_pretrained(tmp_path / "ckpt")
    again = SHAREModel.from_pretrained(str(tmp_path / "ckpt"))
    assert again.config.compression_stats["capped_groups"] == st["capped_groups"]
    cfg_path = tmp_path / "ckpt" / "share_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["compression_stats"]["capped_groups"] = ["not a key"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="capped_groups"):
        SHAREModel.from_pretrained(str(tmp_path / "ckpt"))


def test_budget_never_buys_past_the_break_even(diff_seed):
    lora = sum(4 * 8 * 768 * 2 * 4 for _ in diff_seed)  # float32 A and B of 4 modules, r = 8
    share = SHAREModel.from_adapters(diff_seed, budget_bytes=10 * lora, progress=False)
    for key, U in share.components.items():
        d, k = U.shape
        n = sum(int(r.loadings[key].shape[1]) for r in share.records.values())
        assert k * (d + n) < d * n, (key, k)
    assert share.config.compression_stats["compressed_bytes"] < lora
    assert share.config.compression_stats["capped_groups"]  # the budget could have bought more
