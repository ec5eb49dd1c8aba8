"""One deadline per Hub operation: a Hub that stalls, trickles or resets fails fast, in one line.

A stalled Hub used to take 268 s and 114 lines of stderr to fail (lorashare's retries times
huggingface_hub's, each with its own timeouts).  Here every fault of the local test Hub that can
hang a client (``stall``: never answers; ``trickle``: a few bytes per second; ``reset``: TCP RST
before or during the answer) is aimed at one request of each operation (fetching adapters for
``from_adapters``, ``from_pretrained``, ``push_to_hub``, and the CLI's ``reconstruct``), with the
deadline at a few seconds (``LORASHARE_HUB_TIMEOUT``).  Each must fail with a :class:`HubError`
(exit code 1) of one line that names the repo, within the deadline plus a generous margin, log no
retry warning, and leave nothing behind: no output folder, no commit; and once the Hub recovers,
the same call succeeds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import pytest
from huggingface_hub import constants

import lorashare.hub
from lorashare import SHAREModel
from lorashare.errors import ConfigError, HubError
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import Action, HubServer
from tests.reliability_report import report

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 2.0  # seconds; every case below must end within DEADLINE + MARGIN
MARGIN = 10.0
CKPT = "tester/ckpt"
ADAPTERS = ("tester/x", "tester/y")

FAULTS: Dict[str, Action] = {
    "stall": ("stall",),
    "trickle": ("trickle", 4, 0.25),  # 16 bytes/s: every read succeeds, no answer ever completes
    "reset": ("reset",),
    "reset-mid-body": ("reset", 40),
}
INFO = r"^/api/models/tester/[^/]+(/revision/|$)"  # model_info / repo_info: the first request of most operations
RESOLVE = r"/resolve/"  # HEAD and GET of files
WEIGHTS = r"/resolve/[^/]+/.*\.safetensors$"
COMMIT = rf"^/api/models/{CKPT}/commit/"
LFS_UPLOAD = r"^/__lfs/upload/"  # from huggingface_hub's worker threads, without lorashare's tag


OUTCOMES: Dict[str, Dict[str, object]] = {}  # case -> seconds and the one line, printed at the end


# -------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def deadline_summary() -> Iterator[None]:
    yield
    for case, got in sorted(OUTCOMES.items()):
        print(f"\n{case}: {got['seconds']:.1f} s: {got['message']}", end="")
    print()
    report("deadlines", {"deadline_s": DEADLINE, "cases": OUTCOMES})


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """``hub`` as lorashare's endpoint (LFS uploads, no Xet), a token, the deadline at DEADLINE seconds."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv(lorashare.hub.TIMEOUT_ENV, str(DEADLINE))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_mode = True
    yield hub
    assert not hub.internal_errors, hub.internal_errors[0]


@pytest.fixture(scope="module")
def share(adapter_dirs: List[str]) -> SHAREModel:
    """What the tests push."""
    return SHAREModel.from_adapters(adapter_dirs, num_components=4, progress=False)


@pytest.fixture(scope="module")
def share_b(adapter_dirs: List[str]) -> SHAREModel:
    """What the Hub holds before: other bases, so that every push has weights to upload and a commit to make."""
    return SHAREModel.from_adapters(adapter_dirs[:3], num_components=2, progress=False)


def _files(folder: Path) -> Dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def published(env: HubServer, share_b: SHAREModel, adapter_dirs: List[str], tmp_path: Path) -> HubServer:
    """Two adapter repos and a SHARE checkpoint, committed server-side (no client request)."""
    for repo, folder in zip(ADAPTERS, adapter_dirs):
        env.create_repo(repo)
        env.commit(repo, _files(Path(folder)), lfs=["adapter_model.safetensors"])
    share_b.save_pretrained(tmp_path / "published")
    files = _files(tmp_path / "published")
    env.create_repo(CKPT)
    env.commit(CKPT, files, lfs=[p for p in files if p.endswith(".safetensors")], message="publish")
    env.reset_log()
    return env


# ------------------------------------------------------------------------------------ operations


def op_from_adapters(hub: HubServer, share: SHAREModel, tmp_path: Path) -> Callable[[], object]:
    return lambda: SHAREModel.from_adapters(list(ADAPTERS), num_components=2, progress=False)


def op_from_pretrained(hub: HubServer, share: SHAREModel, tmp_path: Path) -> Callable[[], object]:
    return lambda: SHAREModel.from_pretrained(CKPT)


def op_push(hub: HubServer, share: SHAREModel, tmp_path: Path) -> Callable[[], object]:
    return lambda: share.push_to_hub(CKPT, commit_message="must not land")


OPERATIONS = {"from_adapters": op_from_adapters, "from_pretrained": op_from_pretrained, "push_to_hub": op_push}
NAMES = {"from_adapters": ADAPTERS[0], "from_pretrained": CKPT, "push_to_hub": CKPT}

# (operation, fault, the requests it hits): each fault on the first request, and on later ones.
CASES = [
    ("from_adapters", "stall", INFO, None),
    ("from_adapters", "trickle", WEIGHTS, "GET"),
    ("from_adapters", "reset", RESOLVE, None),
    ("from_pretrained", "stall", RESOLVE, None),
    ("from_pretrained", "trickle", INFO, None),
    ("from_pretrained", "reset-mid-body", WEIGHTS, "GET"),
    ("push_to_hub", "stall", COMMIT, "POST"),
    ("push_to_hub", "stall", LFS_UPLOAD, "PUT"),
    ("push_to_hub", "trickle", INFO, None),
    ("push_to_hub", "reset", COMMIT, "POST"),
]


@pytest.mark.parametrize("operation, fault, path, method", CASES, ids=[f"{o}-{f}-{m or 'any'}" for o, f, _, m in CASES])
def test_a_hanging_hub_fails_within_the_deadline_in_one_line(published, share, tmp_path, capfd, caplog,
                                                             operation, fault, path, method):
    hub = published
    head, files = hub.resolve(CKPT), hub.snapshot(CKPT)
    run = OPERATIONS[operation](hub, share, tmp_path)
    injection = hub.inject_when(FAULTS[fault], method=method, path_regex=path, times=None)
    capfd.readouterr()
    t0 = time.monotonic()
    with caplog.at_level(logging.DEBUG), pytest.raises(HubError) as err:
        run()
    elapsed = time.monotonic() - t0
    message = str(err.value)
    OUTCOMES[f"{operation}/{fault}/{method or 'any'} {path}"] = {"seconds": round(elapsed, 2), "message": message}
    assert injection.fired >= 1, "the fault never hit: the case tests nothing"
    assert elapsed < DEADLINE + MARGIN, (elapsed, message)
    assert "\n" not in message and NAMES[operation] in message, message
    if not fault.startswith("reset"):  # a reset fails fast, after lorashare's few attempts; the rest only by the deadline
        assert f"within {DEADLINE:g} s" in message and lorashare.hub.TIMEOUT_ENV in message, message
    # Retries are logged at DEBUG, never as warnings (neither lorashare's nor huggingface_hub's).
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith(("lorashare", "huggingface_hub"))]
    assert not loud, [r.getMessage() for r in loud]
    assert not any(w in capfd.readouterr().err for w in ("Retrying", "thrown while requesting", "WARNING"))
    # Nothing left behind: no commit on the Hub.
    assert (hub.resolve(CKPT), hub.snapshot(CKPT)) == (head, files)
    # The deadline ended this operation only: once the Hub recovers, the same call works.
    hub.clear_injections()
    assert run() is not None


# -------------------------------------------------------------------------------------------- CLI


def _cli(hub: HubServer, home: Path, out: Path, *args: str, repo: str = CKPT) -> "tuple[subprocess.CompletedProcess, float]":
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "LORASHARE_"))}
    # Progress bars off: huggingface_hub draws its download bars on stderr even when it is not a terminal;
    # what is checked here is everything else the CLI writes there.
    env.update({"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "LORASHARE_HUB_TIMEOUT": str(DEADLINE), "PYTHONPATH": str(ROOT)})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lorashare", "reconstruct", repo, *args, "-o", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))
    return proc, time.monotonic() - t0


_BASELINE: List[float] = []


@pytest.fixture
def cli_baseline(published: HubServer, tmp_path: Path) -> float:
    """Seconds the CLI takes to fail at once (a repo that does not exist): its start-up time on this machine."""
    if not _BASELINE:
        proc, elapsed = _cli(published, tmp_path / "home-baseline", tmp_path / "out-baseline", "--adapter", "task0",
                             repo="tester/missing")
        assert proc.returncode == 1 and "tester/missing" in proc.stderr, proc.stderr
        _BASELINE.append(elapsed)
    return _BASELINE[0]


CLI_CASES = [("stall", RESOLVE, None), ("trickle", WEIGHTS, "GET"), ("reset", INFO, None)]


@pytest.mark.parametrize("fault, path, method", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_reconstruct_fails_within_the_deadline_in_one_line(published, share_b, cli_baseline, tmp_path,
                                                               fault, path, method):
    injection = published.inject_when(FAULTS[fault], method=method, path_regex=path, times=None)
    out = tmp_path / "out"
    proc, elapsed = _cli(published, tmp_path / "home", out, "--adapter", share_b.adapter_names[0])
    lines = proc.stderr.strip().splitlines()
    OUTCOMES[f"cli/{fault}/{method or 'any'} {path}"] = {"seconds": round(elapsed - cli_baseline, 2),
                                                         "message": proc.stderr.strip()}
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and CKPT in lines[0], proc.stderr
    if fault != "reset":
        assert f"within {DEADLINE:g} s" in lines[0] and "LORASHARE_HUB_TIMEOUT" in lines[0], proc.stderr
    assert "WARNING" not in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < cli_baseline + DEADLINE + MARGIN, (elapsed, cli_baseline)
    assert injection.fired >= 1 and not out.exists() and proc.stdout == ""


# --------------------------------------------------------------------------------- the setting


def test_the_default_deadline_is_60_seconds_and_documented(monkeypatch):
    monkeypatch.delenv(lorashare.hub.TIMEOUT_ENV, raising=False)
    assert lorashare.hub.DEFAULT_TIMEOUT == 60 and lorashare.hub.hub_timeout() == 60.0
    assert lorashare.hub.TIMEOUT_ENV == "LORASHARE_HUB_TIMEOUT"
    for doc in (lorashare.hub.__doc__, lorashare.hub.hub_timeout.__doc__ or "",
                lorashare.hub.fetch_checkpoint.__doc__ or "", lorashare.hub.push_folder.__doc__ or ""):
        assert "LORASHARE_HUB_TIMEOUT" in doc and "60" in doc, doc


@pytest.mark.parametrize("value, expected", [("5", 5.0), (" 0.5 ", 0.5), ("", 60.0), (None, 60.0)])
def test_the_deadline_is_read_at_call_time(monkeypatch, value: Optional[str], expected: float):
    if value is None:
        monkeypatch.delenv(lorashare.hub.TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(lorashare.hub.TIMEOUT_ENV, value)
    assert lorashare.hub.hub_timeout() == expected
    assert lorashare.hub.hub_timeout(7) == 7.0  # the keyword wins over the environment


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_deadline_is_one_clear_error(monkeypatch, value: str):
    monkeypatch.setenv(lorashare.hub.TIMEOUT_ENV, value)
    with pytest.raises(ConfigError) as err:
        lorashare.hub.hub_timeout()
    assert "LORASHARE_HUB_TIMEOUT" in str(err.value) and repr(value) in str(err.value) and "\n" not in str(err.value)


def test_the_keyword_overrides_the_environment(published, monkeypatch):
    """``timeout=`` of the public functions: a longer deadline outlasts a slow answer the default would not."""
    monkeypatch.setenv(lorashare.hub.TIMEOUT_ENV, "1")
    published.inject_when(("delay", 1.5), path_regex=INFO, times=None)
    ref = lorashare.hub.parse_adapter_id(ADAPTERS[0])
    with pytest.raises(HubError, match="within 1 s"):
        lorashare.hub.resolve_revision(ref)
    assert lorashare.hub.resolve_revision(ref, timeout=6) == published.resolve(ADAPTERS[0])


def test_the_library_keyword_and_the_timeout_error_type(published, monkeypatch, tmp_path):
    """``hub_timeout=`` of from_pretrained outlasts a slow answer that LORASHARE_HUB_TIMEOUT=1 does not; the
    error is a HubTimeoutError (also a TimeoutError), so callers can catch the deadline on its own."""
    from lorashare.errors import HubTimeoutError

    monkeypatch.setenv(lorashare.hub.TIMEOUT_ENV, "1")
    published.inject_when(("delay", 1.5), path_regex=INFO, times=None)
    with pytest.raises(HubTimeoutError, match="within 1 s") as err:
        SHAREModel.from_pretrained(CKPT)
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, HubError)
    assert SHAREModel.from_pretrained(CKPT, hub_timeout=8).adapter_names


def test_cli_hub_timeout_flag_and_quiet_download_bars(published, share_b, tmp_path):
    """--hub-timeout sets the deadline for the run (a bad value is a usage error, exit 2); without
    HF_HUB_DISABLE_PROGRESS_BARS, a failure on a non-terminal stderr is still one line (no download bars)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "LORASHARE_"))}
    env.update({"HF_ENDPOINT": published.url, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(ROOT)})

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lorashare", "reconstruct", CKPT, "--adapter",
                               share_b.adapter_names[0], "-o", str(tmp_path / "out"), *args],
                              env=env, capture_output=True, text=True, timeout=120, cwd=str(ROOT))

    bad = cli("--hub-timeout", "0")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--hub-timeout 0" in bad.stderr, bad.stderr
    published.inject_when(("stall",), path_regex=WEIGHTS, method="GET", times=None)
    t0 = time.monotonic()
    proc = cli("--hub-timeout", str(DEADLINE))
    assert proc.returncode == 1 and f"within {DEADLINE:g} s" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "out").exists()
