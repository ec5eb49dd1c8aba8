"""Shared fixtures: real PEFT adapters made from a tiny randomly initialised BERT.

No downloads: the base model is built from a config in code (see
``examples/make_adapters.py``, which also made the bundled example adapters).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

pytest_plugins = ["tests.hub_fixtures"] if os.path.exists(os.path.join(os.path.dirname(__file__), "hub_fixtures.py")) else []

from examples.make_adapters import BASE_NAME, make_adapter, tiny_bert  # noqa: E402,F401


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory) -> List[str]:
    """Four adapters (two with a classifier head), different seeds; made once per session."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_adapter(str(root / f"task{i}"), seed=i, head=(i % 2 == 0))
        for i in range(4)
    ]


@pytest.fixture(scope="session")
def plain_adapter_dirs(tmp_path_factory) -> List[str]:
    """Three adapters without heads, same init seed (as users who train with one seed)."""
    root = tmp_path_factory.mktemp("plain")
    return [make_adapter(str(root / f"p{i}"), seed=10 + i, init_seed=7) for i in range(3)]


def load_state(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))
