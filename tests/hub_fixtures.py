"""Pytest fixtures around :class:`tests.hubserver.HubServer`.

Register them once in the top-level ``tests/conftest.py``::

    pytest_plugins = ["tests.hub_fixtures"]

(or, in a single test module, ``from tests.hub_fixtures import hub, hf_cache  # noqa: F401``).

Offline by default, online for the test server: a suite may export ``HF_HUB_OFFLINE=1`` before
huggingface_hub is imported, so nothing can reach the real Hub. In offline mode the client refuses
*every* HTTP request, including to 127.0.0.1, so ``hub`` switches the client back online for the
test that uses it (and only for it). ``hf_offline`` switches it off again, after ``hub``.

Why the fixtures patch ``huggingface_hub.constants`` and not only environment variables:
huggingface_hub reads ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_TOKEN_PATH``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once, at import time, into module constants. Setting
the env var inside a test is therefore too late for this process; we set both (env for subprocesses
and libraries that read ``os.environ`` directly, such as PEFT's offline check, constants for
huggingface_hub itself).

Fixtures:

* ``hub``: a started :class:`HubServer` (function scope: fresh repos and request log per test);
  forces online mode for the test.
* ``hf_online``: undo a suite-wide ``HF_HUB_OFFLINE=1`` for one test (``hub`` uses it).
* ``hf_cache``: isolated HF home/cache/token paths under ``tmp_path``; no ambient token.
* ``hub_api``: ``HfApi(endpoint=hub.url, token=HUB_TOKEN)`` with ``hf_cache`` active.
* ``hub_endpoint``: make ``hub.url`` the *default* endpoint, for code that does not pass
  ``endpoint=`` (e.g. PEFT's ``from_pretrained`` or ``huggingface_hub.file_exists``).
* ``hf_offline``: switch huggingface_hub (and PEFT) to offline mode (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub import hf_api as hf_api_module
from huggingface_hub.utils import _cache_manager

from tests.hubserver import HubServer

HUB_TOKEN = "hf_test_token"
"""Token the fixtures use for authenticated calls; any non-empty token is accepted by default."""


@pytest.fixture
def hf_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let huggingface_hub make HTTP requests (undo a suite-wide ``HF_HUB_OFFLINE=1``)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(hf_online: None) -> Iterator[HubServer]:
    """A running in-memory Hub; stopped (and its connections closed) after the test."""
    with HubServer() as server:
        yield server


def fresh_cache(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """Switch huggingface_hub to a new, empty HF_HOME (as on another machine); return its hub cache."""
    cache = home / "hub"
    cache.mkdir(parents=True)
    locations = {
        "HF_HOME": home,
        "HF_HUB_CACHE": cache,
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",
        "HF_STORED_TOKENS_PATH": home / "stored_tokens",
    }
    for name, path in locations.items():
        monkeypatch.setenv(name, str(path))
        monkeypatch.setattr(constants, name, str(path))
    # scan_cache_dir() binds HF_HUB_CACHE at import (``from ..constants import HF_HUB_CACHE``).
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point every huggingface_hub cache/token location into ``tmp_path``; return HF_HUB_CACHE."""
    cache = fresh_cache(monkeypatch, tmp_path / "hf_home")
    # A developer's real token must neither leak to the test server nor change auth behaviour.
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return cache


@pytest.fixture
def hub_api(hub: HubServer, hf_cache: Path) -> HfApi:
    """An authenticated client bound to ``hub`` (endpoint passed explicitly, as it should be)."""
    return HfApi(endpoint=hub.url, token=HUB_TOKEN)


@pytest.fixture
def hub_endpoint(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Route calls that omit ``endpoint=`` to ``hub``; returns ``hub.url``.

    Three places hold the endpoint: ``constants.ENDPOINT`` (read by ``HfApi()`` at construction),
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``, i.e. ``hf_hub_download``), and the
    module-level ``huggingface_hub.hf_api.api`` instance behind ``huggingface_hub.file_exists`` /
    ``model_info`` & co., created at import time.
    """
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api_module.api, "endpoint", hub.url)
    return hub.url


@pytest.fixture
def hf_offline(hf_cache: Path, hf_online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode: huggingface_hub refuses all HTTP (OfflineModeIsEnabled) and uses the cache.

    Depends on ``hf_online`` so that it always runs after it (``hub`` requests ``hf_online``),
    whatever the order of fixtures in the test signature; also works via
    ``request.getfixturevalue("hf_offline")`` in the middle of a test.
    """
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # PEFT reads os.environ directly
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads this constant
