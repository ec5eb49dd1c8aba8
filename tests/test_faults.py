"""Network faults injected into the local test Hub, against the real ``huggingface_hub`` client.

Every fault of :class:`tests.hubserver.HubServer` (5xx, dropped connections, slow answers, a
truncated body, a wrong ETag, a corrupted body of the same size) is aimed at the requests that
``SHAREModel.from_pretrained(repo_id)`` and ``push_to_hub`` make.  The only allowed outcomes:

* a download succeeds and every file's sha256 verifies (``from_pretrained`` checks them all), or
* it fails with a :class:`LoraShareError` that names the repo (never another exception type);
* a corrupted weights file is caught by the checkpoint's sha256 check (:class:`IntegrityError`);
* a failed push leaves the remote repo unchanged (same head, same files) or adds one complete
  commit, and the local checkpoint still loads.

Faults that fired are counted per kind; the totals are printed at the end of the module and, if
``LORASHARE_RELIABILITY_REPORT`` names a file, merged into that JSON file (key ``faults``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import _http as hf_http

import lorashare.hub
from lorashare import LoraShareError, SHAREModel
from lorashare.errors import CheckpointError, HubError, IntegrityError
from tests.hub_fixtures import HUB_TOKEN, fresh_cache
from tests.hubserver import HubServer
from tests.reliability_report import report

CKPT = "tester/faulty-share"
FAULTS: Counter = Counter()
OUTCOMES: Counter = Counter()  # the fault storm: 'ok' or the LoraShareError subclass raised


# ------------------------------------------------------------------------------- reporting


@pytest.fixture(scope="module", autouse=True)
def fault_summary() -> Iterator[None]:
    yield
    total = sum(FAULTS.values())
    line = f"faults injected: {total} ({', '.join(f'{k}={v}' for k, v in sorted(FAULTS.items()))})"
    print("\n" + line)
    report("faults", {"total": total, "by_kind": dict(sorted(FAULTS.items())), "storm_outcomes": dict(OUTCOMES)})


# -------------------------------------------------------------------------------- fixtures
@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """``hub`` as lorashare's endpoint (LFS uploads, no Xet), isolated cache, a token; counts faults."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_mode = True
    injections: List = []
    original = hub.inject

    def counting_inject(rule, times=None):
        inj = original(rule, times=times)
        injections.append(inj)
        return inj

    monkeypatch.setattr(hub, "inject", counting_inject)
    yield hub
    for inj in injections:
        FAULTS[inj.kind] += inj.fired
    assert not hub.internal_errors, hub.internal_errors[0]


class _NoSleep:
    """Stands in for the ``time`` module of one library: ``sleep`` records instead of sleeping."""

    def __init__(self, log: List[float]) -> None:
        self.sleep = log.append

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> List[float]:
    """lorashare's back-off delays, recorded not slept (huggingface_hub's own back-off is skipped too).

    Only those two modules' ``time`` is replaced, not ``time.sleep`` itself: the server's
    ``("delay", s)`` fault must still sleep.
    """
    delays: List[float] = []
    monkeypatch.setattr(lorashare.hub.client, "time", _NoSleep(delays))
    monkeypatch.setattr(hf_http, "time", _NoSleep([]))
    return delays


@pytest.fixture(scope="module")
def share(adapter_dirs) -> SHAREModel:
    return SHAREModel.from_adapters(adapter_dirs, num_components=4, progress=False)


@pytest.fixture(scope="module")
def share_b(adapter_dirs) -> SHAREModel:
    return SHAREModel.from_adapters(adapter_dirs[:3], num_components=2, progress=False)


@pytest.fixture
def published(env: HubServer, share: SHAREModel, tmp_path: Path) -> str:
    """``share`` committed to ``CKPT`` server-side (no client request); returns the head sha."""
    folder = tmp_path / "published"
    share.save_pretrained(folder)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    env.create_repo(CKPT)
    return env.commit(CKPT, files, lfs=[p for p in files if p.endswith(".safetensors")], message="publish")


def fault(hub: HubServer, action, *, method: Optional[str] = None, path: Optional[str] = None, times: Optional[int] = 1):
    inj = hub.inject_when(action, method=method, path_regex=path, times=times)
    inj.kind = action[0] if action[0] != "status" else f"http{action[1]}"
    return inj


def same(a: SHAREModel, b: SHAREModel) -> bool:
    if sorted(a.adapter_names) != sorted(b.adapter_names):
        return False
    for n in a.adapter_names:
        x, y = a.reconstruct(n), b.reconstruct(n)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def load_or_error(repo: str = CKPT):
    """``from_pretrained`` → the model, or the LoraShareError it raised; anything else fails the test."""
    try:
        return SHAREModel.from_pretrained(repo)
    except LoraShareError as exc:
        assert repo in str(exc) or isinstance(exc, CheckpointError), f"error does not name the repo: {exc}"
        return exc


def folder_hashes(folder: Path) -> Dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


RESOLVE = r"/resolve/"
SHARED = r"/resolve/[^/]+/shared_components\.safetensors$"
LOADINGS = r"/resolve/[^/]+/adapters/[^/]+/loadings\.safetensors$"
CONFIG = r"/resolve/[^/]+/share_config\.json$"
INFO = rf"^/api/models/{CKPT}(/revision/|$)"
COMMIT = rf"^/api/models/{CKPT}/commit/"


# ------------------------------------------------------------------------------- downloads
@pytest.mark.parametrize("code, path", [(500, SHARED), (503, LOADINGS), (502, INFO), (429, CONFIG)])
def test_transient_errors_are_retried_then_succeed(env, published, share, no_sleep, code, path):
    f = fault(env, ("status", code), method="GET", path=path, times=2)
    loaded = SHAREModel.from_pretrained(CKPT)
    # snapshot_download fetches files in parallel (both faults may land in one attempt), and
    # huggingface_hub retries some answers itself (429, HEAD 5xx) before lorashare sees them.
    assert f.fired == 2 and no_sleep in ([], [0.5], [0.5, 1.0])
    assert same(loaded, share)


@pytest.mark.parametrize("action, path", [
    (("status", 500), SHARED), (("status", 503), INFO), (("drop",), LOADINGS), (("drop",), INFO),
])
def test_persistent_faults_fail_clearly_naming_the_repo(env, published, no_sleep, action, path):
    f = fault(env, action, path=path, times=None)
    with pytest.raises(HubError) as err:
        SHAREModel.from_pretrained(CKPT)
    assert CKPT in str(err.value) and "after 4 attempts" in str(err.value), str(err.value)
    assert no_sleep == [0.5, 1.0, 2.0] and f.fired >= 4


@pytest.mark.parametrize("path", [SHARED, LOADINGS, CONFIG, INFO])
def test_dropped_connection_once_is_retried(env, published, share, no_sleep, path):
    f = fault(env, ("drop",), method="GET", path=path, times=1)
    assert same(SHAREModel.from_pretrained(CKPT), share)
    assert f.fired == 1


def test_slow_responses_below_the_timeout_succeed(env, published, share, no_sleep):
    f = fault(env, ("delay", 0.3), path=RESOLVE, times=6)
    g = fault(env, ("delay", 0.3), path=INFO, times=2)
    assert same(SHAREModel.from_pretrained(CKPT), share)
    assert f.fired >= 3 and g.fired >= 1 and no_sleep == []


@pytest.mark.parametrize("path", [SHARED, LOADINGS, CONFIG])
@pytest.mark.parametrize("action", [("truncate", 7), ("truncate", 0), ("bad_etag",)])
def test_truncated_or_mislabelled_download_verifies_or_fails_clearly(env, published, share, no_sleep, action, path,
                                                                      tmp_path, monkeypatch):
    f = fault(env, action, method="GET", path=path, times=1)
    out = load_or_error()
    assert f.fired == 1
    if isinstance(out, SHAREModel):
        assert same(out, share)  # from_pretrained verified every file's sha256
    # Whatever happened, the next attempt from a clean cache gets the right bytes.
    fresh_cache(monkeypatch, tmp_path / "again")
    assert same(SHAREModel.from_pretrained(CKPT), share)


@pytest.mark.parametrize("path", [SHARED, LOADINGS])
def test_corrupted_weights_same_size_raise_integrity_error(env, published, no_sleep, path):
    f = fault(env, ("corrupt",), method="GET", path=path, times=None)
    with pytest.raises(IntegrityError) as err:
        SHAREModel.from_pretrained(CKPT)
    assert f.fired >= 1 and "sha256" in str(err.value)


def test_corrupted_config_is_a_checkpoint_error(env, published, no_sleep):
    f = fault(env, ("corrupt",), method="GET", path=CONFIG, times=None)
    out = load_or_error()
    assert f.fired >= 1 and isinstance(out, CheckpointError), out


def test_random_fault_storm_only_lorashare_errors(env, published, share, no_sleep, tmp_path, monkeypatch):
    """Many single faults, one per load, over every request kind: success-and-verified or LoraShareError."""
    actions = [("status", 500), ("status", 503), ("drop",), ("truncate", 3), ("bad_etag",), ("corrupt",), ("delay", 0.05)]
    paths = [SHARED, LOADINGS, CONFIG, INFO]
    outcomes: Counter = Counter()
    for i, action in enumerate(actions):
        for j, path in enumerate(paths):
            fresh_cache(monkeypatch, tmp_path / f"c{i}-{j}")
            env.clear_injections()
            # body faults go to a GET (a HEAD has no body); the others hit the first matching request
            fault(env, action, method="GET" if action[0] in ("truncate", "corrupt") else None, path=path, times=1)
            out = load_or_error()
            if isinstance(out, SHAREModel):
                assert same(out, share)
                outcomes["ok"] += 1
            else:
                outcomes[type(out).__name__] += 1
    OUTCOMES.update(outcomes)
    assert outcomes["ok"] >= len(actions) * len(paths) // 2, outcomes


# ------------------------------------------------------------------------------------ push
def remote_state(hub: HubServer):
    return hub.resolve(CKPT), hub.snapshot(CKPT)


@pytest.mark.parametrize("action, path, method", [
    (("status", 500), COMMIT, "POST"),
    (("drop",), COMMIT, "POST"),
    (("status", 503), rf"^/api/models/{CKPT}/preupload/", "POST"),
    (("drop",), r"/info/lfs/objects/batch$", "POST"),
    (("status", 500), r"^/__lfs/upload/", "PUT"),
])
def test_failed_push_leaves_remote_and_local_unchanged(env, published, share_b, no_sleep, tmp_path, action, path, method):
    local = tmp_path / "local_ckpt"
    share_b.save_pretrained(local)
    before_local = folder_hashes(local)
    head, files = remote_state(env)
    commits = len(env.history(CKPT))
    f = fault(env, action, method=method, path=path, times=None)
    with pytest.raises(HubError) as err:
        lorashare.hub.push_folder(str(local), CKPT, commit_message="should not land")
    assert CKPT in str(err.value) and f.fired >= 1
    assert remote_state(env) == (head, files) and len(env.history(CKPT)) == commits
    assert folder_hashes(local) == before_local
    assert same(SHAREModel.from_pretrained(str(local)), share_b)
    # and the in-memory model pushes fine once the Hub recovers
    env.clear_injections()
    info = share_b.push_to_hub(CKPT)
    assert env.resolve(CKPT) == info.oid and len(env.history(CKPT)) == commits + 1


@pytest.mark.parametrize("action", [("status", 500), ("drop",)])
def test_one_failed_commit_is_retried_into_exactly_one_commit(env, published, share_b, no_sleep, tmp_path, monkeypatch,
                                                             action):
    commits = len(env.history(CKPT))
    f = fault(env, action, method="POST", path=COMMIT, times=1)
    info = share_b.push_to_hub(CKPT)
    assert f.fired == 1 and no_sleep == [0.5]
    assert env.resolve(CKPT) == info.oid and len(env.history(CKPT)) == commits + 1
    fresh_cache(monkeypatch, tmp_path / "other-machine")
    assert same(SHAREModel.from_pretrained(CKPT), share_b)


def test_lost_commit_response_is_one_complete_commit_or_nothing(env, published, share, share_b, no_sleep, tmp_path,
                                                               monkeypatch):
    """The server commits, then the response is cut: the client must not commit twice."""
    commits = len(env.history(CKPT))
    f = fault(env, ("truncate", 5), method="POST", path=COMMIT, times=None)
    try:
        share_b.push_to_hub(CKPT)
    except LoraShareError as exc:
        assert CKPT in str(exc)
    assert f.fired >= 1
    assert len(env.history(CKPT)) in (commits, commits + 1)
    env.clear_injections()
    fresh_cache(monkeypatch, tmp_path / "other-machine")
    loaded = SHAREModel.from_pretrained(CKPT)
    assert same(loaded, share_b) or same(loaded, share)


def test_corruption_in_transit_stays_in_the_cache_until_removed(env, published, share, no_sleep, hf_cache):
    """One corrupted transfer is cached (huggingface_hub keys blobs by ETag, not by content): every
    later load fails with the same clear IntegrityError, which says to delete the cached file;
    after that the next load downloads the good bytes."""
    import shutil

    f = fault(env, ("corrupt",), method="GET", path=SHARED, times=1)
    for _ in range(2):
        with pytest.raises(IntegrityError) as err:
            SHAREModel.from_pretrained(CKPT)
        assert "Re-download it (delete it from the cache)" in str(err.value)
    assert f.fired == 1
    shutil.rmtree(hf_cache / "models--tester--faulty-share")
    assert same(SHAREModel.from_pretrained(CKPT), share)
