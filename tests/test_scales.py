"""Adapters at extreme scales: the bases, the loadings and the recorded ΔW errors stay right.

Factors of 1e-40 (float32 subnormals) or 1e12 make float32 Grams underflow or overflow. The
compression rescales them by exact powers of two, so what ``share_config.json`` records as each
adapter's ΔW error equals a dense float64 oracle, and a lossless k rebuilds every adapter.
"""

from __future__ import annotations

import json
import os
from typing import List

import pytest
import torch
from safetensors.torch import save_file

from lorashare import SHAREModel

MODULES = ("enc.q", "enc.v")


def _adapters(root: str, scales: List[float], seed: int = 0) -> List[str]:
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i, scale in enumerate(scales):
        d = os.path.join(root, f"a{i}")
        os.makedirs(d)
        sd = {}
        for m in MODULES:
            sd[f"base_model.model.{m}.lora_A.weight"] = torch.randn(4, 48, generator=g)
            sd[f"base_model.model.{m}.lora_B.weight"] = (torch.randn(48, 4, generator=g).double() * scale).float()
        save_file(sd, os.path.join(d, "adapter_model.safetensors"))
        with open(os.path.join(d, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q", "v"]}, f)
        dirs.append(d)
    return dirs


def _oracle(folder: str, share: SHAREModel, name: str) -> float:
    """max over modules of ‖ΔW − ΔŴ‖/‖ΔW‖, with dense float64 ΔW (no Gram, no expansion)."""
    from safetensors.torch import load_file

    orig = load_file(os.path.join(folder, "adapter_model.safetensors"))
    rebuilt = share.reconstruct(name)
    worst = 0.0
    for m in MODULES:
        a, b = (f"base_model.model.{m}.lora_{s}.weight" for s in "AB")
        dw = orig[b].double() @ orig[a].double()
        dw_hat = rebuilt[b].double() @ rebuilt[a].double()
        worst = max(worst, float(torch.linalg.norm(dw - dw_hat) / torch.linalg.norm(dw)))
    return worst


# lorashare refuses factors over 1e15 (float32 products would overflow): 1e12 is the huge case.
SCALES = {"all tiny": [1e-40] * 3, "all huge": [1e12] * 3, "mixed": [1e-40, 1e-20, 1.0, 1e12], "normal": [1.0] * 3}


@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("weighting", ["delta_w", "factors"])
@pytest.mark.parametrize("case", list(SCALES))
def test_recorded_errors_match_a_dense_oracle(tmp_path, case, weighting, dtype):
    dirs = _adapters(str(tmp_path), SCALES[case])
    share = SHAREModel.from_adapters(dirs, num_components=5, weighting=weighting, dtype=dtype, progress=False)
    for name, folder in zip(share.adapter_names, dirs):
        recorded = share.reconstruction_error(name)["max"]
        truth = _oracle(folder, share, name)
        assert truth > 1e-3  # k=5 < N·r: lossy, so a wrong 0 would show
        assert abs(recorded - truth) <= 1e-3 * truth + 1e-6, (name, recorded, truth)
        assert all(torch.isfinite(t).all() for t in share.reconstruct(name).values())


@pytest.mark.parametrize("case", ["all tiny", "all huge", "mixed"])
def test_lossless_k_rebuilds_adapters_at_every_scale(tmp_path, case):
    dirs = _adapters(str(tmp_path), SCALES[case])
    share = SHAREModel.from_adapters(dirs, num_components=4 * len(dirs), progress=False)
    for name, folder in zip(share.adapter_names, dirs):
        assert _oracle(folder, share, name) < 1e-4, name
        assert share.reconstruction_error(name)["max"] < 1e-4
