"""SIGKILL during ``push_to_hub`` and during ``lorashare sync``: the Hub repo is never half-written.

The local test Hub (:class:`tests.hubserver.HubServer`) runs in this process, in a thread, so it
survives the kills; the pushing process is a subprocess killed at a random moment (a delay
injected on the server's commit and LFS endpoints widens the window in which a request is in
flight).  After every kill:

* the repo's head is the previous commit or a complete new one: every commit in its history
  has a ``share_config.json`` whose listed files all exist with the recorded sha256 (checked on
  the server's bytes), and ``SHAREModel.from_pretrained(repo_id)`` from an empty cache works;
* the local checkpoints (push) or the workspace (sync: manifest + adapter folders) are
  byte-for-byte unchanged and still load.

Counts go to the JSON file named by ``LORASHARE_RELIABILITY_REPORT`` (key ``kill_trials``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest
from huggingface_hub import constants

from lorashare import SHAREModel
from tests.hub_fixtures import HUB_TOKEN, fresh_cache
from tests.hubserver import HubServer
from tests.reliability_report import report

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "tester/crash-share"
TRIALS = 12  # per scenario: a third killed at a random moment of the run, the rest during the upload
MAX_DELAY = 0.15  # seconds the server holds a commit / LFS upload (after reading it)
RESULTS: Dict[str, Dict[str, int]] = {}




@pytest.fixture(scope="module", autouse=True)
def kill_summary() -> Iterator[None]:
    yield
    print("\nkill trials survived: " + ", ".join(f"{k}={v['survived']}/{v['trials']}" for k, v in RESULTS.items()))
    report("kill_trials", RESULTS)


# -------------------------------------------------------------------------------- helpers
@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_mode = True
    rng = random.Random(1234)

    def slow(method: str, path: str):  # hold commits and LFS uploads a random while (after reading them)
        if (method == "POST" and "/commit/" in path) or (method == "PUT" and path.startswith("/__lfs/upload/")):
            return ("delay", rng.uniform(0.0, MAX_DELAY))
        return None

    hub.inject(slow, times=None)
    yield hub
    assert not hub.internal_errors, hub.internal_errors[0]


def child_env(hub: HubServer, tmp: Path) -> Dict[str, str]:
    """A subprocess's environment: the test Hub, a token, its own HF home and temp dir."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE", "GITHUB_", "RUNNER_", "ACTIONS_"))}
    (tmp / "tmp").mkdir(parents=True, exist_ok=True)
    env.update({
        "HF_ENDPOINT": hub.url, "HF_TOKEN": HUB_TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home"),
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
        "TMPDIR": str(tmp / "tmp"), "PYTHONPATH": ROOT,
    })
    return env


def settle(hub: HubServer) -> None:
    """Let requests the killed client left in flight finish on the server (a held commit still lands)."""
    time.sleep(MAX_DELAY + 0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # a logged request gets its status once its route has run
        with hub._lock:  # taken by every repo mutation: waits for one in progress
            if all(r.status is not None for r in hub.records):
                return
        time.sleep(0.02)
    raise AssertionError("the server still has requests in flight 10 s after the kill")


def assert_every_commit_complete(hub: HubServer) -> None:
    """Every commit holding a checkpoint has all the files its share_config.json lists, sha256-exact."""
    for oid in hub.history(REPO):
        files = hub.snapshot(REPO, oid)
        if "share_config.json" not in files:
            continue  # the repo's initial commit (.gitattributes only)
        cfg = json.loads(files["share_config.json"])
        listed = dict(cfg["files"])
        for name in cfg["adapters"]:
            assert any(k.startswith(f"adapters/{name}/") for k in listed), f"{oid[:8]}: no files for {name}"
        for rel, sha in listed.items():
            assert rel in files, f"{oid[:8]}: {rel} listed but missing"
            assert hashlib.sha256(files[rel]).hexdigest() == sha, f"{oid[:8]}: {rel} sha256 mismatch"
        assert "README.md" in files, oid


def tree_hashes(folder: Path) -> Dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def wait_request(hub: HubServer, method: str, path: str, start: int, proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Wait until the server has seen ``method path`` after request number ``start`` (False: proc ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m == method and p == path for m, p in list(hub.requests[start:])):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    raise AssertionError(f"no {method} {path} within {timeout}s")


def kill_point(hub: HubServer, proc: subprocess.Popen, trial: int, rng: random.Random, start: int, anytime: float) -> int:
    """Kill ``proc`` at a random moment: of the whole run (every third trial), else of its upload.

    The upload starts with ``create_repo`` (POST /api/repos/create); the kill then comes within
    0.8 s, while the preupload, LFS batch, LFS PUTs (held up to MAX_DELAY each) or commit run.
    """
    if trial % 3 == 0:
        return kill_at(proc, rng.uniform(0.0, anytime))
    if not wait_request(hub, "POST", "/api/repos/create", start, proc):
        return proc.wait()
    return kill_at(proc, rng.uniform(0.0, 0.8))


def kill_at(proc: subprocess.Popen, when: float) -> int:
    """SIGKILL ``proc`` ``when`` seconds from now (unless it exits first); return its exit status."""
    try:
        return proc.wait(timeout=when)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait()


# --------------------------------------------------------------------------- push_to_hub
def test_sigkill_during_push_to_hub(env, adapter_dirs, tmp_path, monkeypatch):
    a = SHAREModel.from_adapters(adapter_dirs, num_components=4, progress=False)
    b = SHAREModel.from_adapters(adapter_dirs[:3], num_components=2, progress=False)
    a.save_pretrained(tmp_path / "state_a")
    b.save_pretrained(tmp_path / "state_b")
    local = {n: tree_hashes(tmp_path / n) for n in ("state_a", "state_b")}
    names = {tuple(sorted(a.adapter_names)), tuple(sorted(b.adapter_names))}
    a.push_to_hub(REPO)
    script = textwrap.dedent(f"""
        import sys
        from lorashare import SHAREModel
        a = SHAREModel.from_pretrained({str(tmp_path / 'state_a')!r})
        b = SHAREModel.from_pretrained({str(tmp_path / 'state_b')!r})
        print("ready", flush=True)
        i = int(sys.argv[1]) * 1001  # the trial's parity, and descriptions no earlier trial pushed
        while True:
            share = a if i % 2 else b
            share.config.card.description = f"push {{i}}"  # never a no-op, also across trials
            share.push_to_hub({REPO!r}, commit_message=f"push {{i}}")
            print("pushed", i, flush=True)
            i += 1
    """)
    rng = random.Random(7)
    survived = pushes = cut = 0
    for trial in range(TRIALS):
        before = env.resolve(REPO)
        n_before = len(env.history(REPO))
        start = len(env.requests)
        proc = subprocess.Popen([sys.executable, "-c", script, str(trial)], stdout=subprocess.PIPE, text=True,
                                env=child_env(env, tmp_path / f"child{trial}"))
        assert proc.stdout.readline().strip() == "ready"
        kill_point(env, proc, trial, rng, start, 1.5)
        done = sum(1 for line in proc.stdout if line.startswith("pushed"))
        proc.stdout.close()
        settle(env)
        history = env.history(REPO)
        # the head moved only by whole pushes: the ones that finished, plus at most the one cut off
        assert done <= len(history) - n_before <= done + 1, (trial, done, len(history) - n_before)
        assert_every_commit_complete(env)
        fresh_cache(monkeypatch, tmp_path / f"verify{trial}")
        loaded = SHAREModel.from_pretrained(REPO)  # verifies every file's sha256
        assert tuple(sorted(loaded.adapter_names)) in names
        assert env.resolve(REPO) == before or env.resolve(REPO) in history
        for n, hashes in local.items():
            assert tree_hashes(tmp_path / n) == hashes, (trial, n)
        pushes += done
        cut += len(history) - n_before - done  # the push in flight at the kill landed anyway
        survived += 1
    for n in local:
        SHAREModel.from_pretrained(str(tmp_path / n))
    RESULTS["push_to_hub"] = {"trials": TRIALS, "survived": survived, "completed_pushes": pushes, "landed_after_kill": cut,
                              "commits": len(env.history(REPO))}


# ----------------------------------------------------------------------------------- sync
def test_sigkill_during_lorashare_sync(env, adapter_dirs, tmp_path, monkeypatch):
    ws = tmp_path / "repo"
    (ws / ".git").mkdir(parents=True)
    for name, src in zip(["billing", "refunds", "legal"], adapter_dirs):
        shutil.copytree(src, ws / "adapters" / name)

    def manifest(k: int, note: str) -> Dict[str, str]:
        """Write lorashare.yaml (every trial changes k and the card: each run has a commit to make)."""
        (ws / "lorashare.yaml").write_text(
            f"repo_id: {REPO}\ncompression: {{num_components: {k}}}\ncard: {{description: {note!r}}}\n"
            "adapters:\n  billing: adapters/billing\n  refunds: adapters/refunds\n  legal: ./adapters/legal\n")
        return tree_hashes(ws)

    manifest(2, "first")
    argv = [sys.executable, "-m", "lorashare", "sync", "--json"]

    start = time.monotonic()
    first = subprocess.run(argv, cwd=ws, env=child_env(env, tmp_path / "first"), capture_output=True, text=True,
                           timeout=120)
    full = time.monotonic() - start
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(first.stdout)["commit_sha"] == env.resolve(REPO)

    rng = random.Random(11)
    survived = killed = finished = landed_killed = 0
    for trial in range(TRIALS):
        workspace = manifest(3 + trial % 2, f"trial {trial}")
        n_before = len(env.history(REPO))
        start = len(env.requests)
        proc = subprocess.Popen(argv, cwd=ws, env=child_env(env, tmp_path / f"sync{trial}"),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        rc = kill_point(env, proc, trial, rng, start, 1.1 * full)
        out = proc.stdout.read()
        proc.stdout.close()
        if rc == 0:
            finished += 1
            assert json.loads(out)["commit_sha"] in env.history(REPO)
        else:
            assert rc == -signal.SIGKILL, (rc, out)
            killed += 1
            settle(env)
            landed_killed += len(env.history(REPO)) - n_before
        settle(env)
        assert len(env.history(REPO)) - n_before in (0, 1), trial
        assert_every_commit_complete(env)
        fresh_cache(monkeypatch, tmp_path / f"verify{trial}")
        loaded = SHAREModel.from_pretrained(REPO)
        assert sorted(loaded.adapter_names) == ["billing", "legal", "refunds"]
        assert tree_hashes(ws) == workspace, trial  # sync writes nothing into the workspace
        survived += 1
    RESULTS["lorashare_sync"] = {"trials": TRIALS, "survived": survived, "killed": killed,
                                 "finished_before_kill": finished, "killed_but_commit_landed": landed_killed, "commits": len(env.history(REPO)),
                                 "full_run_s": round(full, 2)}
