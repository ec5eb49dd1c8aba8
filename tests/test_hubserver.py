"""Self-test of the local Hub server, driven by the real huggingface_hub client over HTTP.

Every call passes ``endpoint=`` (or uses an ``HfApi`` bound to ``hub.url``): ``HF_ENDPOINT`` is
read at import time, so setting it inside a test would have no effect.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

# Fixtures (hub, hf_cache, hub_api, hub_endpoint, hf_offline) come from tests/conftest.py's
# ``pytest_plugins = ["tests.hub_fixtures"]``.
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer, git_blob_sha1

REPO = "tester/adapter"
FILES = {
    "adapter_config.json": b'{"r": 8, "lora_alpha": 16}',
    "adapter_model.safetensors": b"\x00" * 64 + b"weights",
    "extra/notes.txt": b"hello",
}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A local folder shaped like a PEFT adapter."""
    root = tmp_path / "adapter"
    for rel, content in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return root


@pytest.fixture
def uploaded(hub: HubServer, hub_api: HfApi, folder: Path) -> str:
    """REPO created and filled with FILES in one commit; returns the commit sha."""
    hub_api.create_repo(REPO)
    return hub_api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add adapter").oid


def download(hub: HubServer, filename: str, cache: Path, **kwargs: object) -> bytes:
    """Download one file of REPO through the real client and return its content."""
    return Path(hf_hub_download(REPO, filename, endpoint=hub.url, cache_dir=cache, **kwargs)).read_bytes()


# ---- repo creation and upload ------------------------------------------------------------------


def test_create_repo_twice_with_exist_ok(hub: HubServer, hub_api: HfApi) -> None:
    url = hub_api.create_repo(REPO)
    assert url.repo_id == REPO
    assert hub_api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_repo(REPO)
    assert excinfo.value.response.status_code == 409
    # A bare name lands in the user's namespace, as on the Hub.
    assert hub_api.create_repo("solo").repo_id == "tester/solo"


def test_upload_folder_is_one_commit(hub: HubServer, hub_api: HfApi, uploaded: str) -> None:
    assert hub.count("POST", "commit") == 1
    assert set(hub_api.list_repo_files(REPO)) == {".gitattributes", *FILES}
    info = hub_api.model_info(REPO)
    assert info.sha == uploaded == hub.resolve(REPO)
    assert {s.rfilename for s in info.siblings or []} == {".gitattributes", *FILES}
    assert hub.snapshot(REPO) == {**FILES, ".gitattributes": hub.snapshot(REPO)[".gitattributes"]}
    assert hub_api.list_repo_commits(REPO)[0].title == "add adapter"


def test_unchanged_files_are_not_recommitted(hub: HubServer, hub_api: HfApi, folder: Path, uploaded: str) -> None:
    # The preupload answer carries each remote file's oid; the client skips identical files.
    again = hub_api.upload_folder(repo_id=REPO, folder_path=folder)
    assert again.oid == uploaded
    assert hub.count("POST", "commit") == 1


def test_tree_listing(hub_api: HfApi, uploaded: str) -> None:
    top = {entry.path: entry for entry in hub_api.list_repo_tree(REPO)}
    assert isinstance(top["extra"], RepoFolder)
    config = top["adapter_config.json"]
    assert isinstance(config, RepoFile)
    assert config.blob_id == git_blob_sha1(FILES["adapter_config.json"])
    nested = list(hub_api.list_repo_tree(REPO, path_in_repo="extra", expand=True))
    assert [e.path for e in nested] == ["extra/notes.txt"]
    assert nested[0].last_commit is not None and nested[0].last_commit.oid == uploaded


# ---- downloads -------------------------------------------------------------------------------


def test_hf_hub_download_then_cache_hit(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]
    assert hub.served_files(REPO) == {"adapter_config.json"}
    hub.reset_log()
    # Second call: a HEAD to check the ETag, no GET.
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]
    assert [m for m, _ in hub.requests] == ["HEAD"]


def test_snapshot_download_allow_patterns_is_partial(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    path = snapshot_download(REPO, endpoint=hub.url, cache_dir=hf_cache, allow_patterns=["*.json"])
    assert Path(path, "adapter_config.json").read_bytes() == FILES["adapter_config.json"]
    assert not Path(path, "adapter_model.safetensors").exists()
    assert hub.served_files(REPO) == {"adapter_config.json"}


def test_pinned_commit_and_tag(hub: HubServer, hub_api: HfApi, hf_cache: Path, uploaded: str) -> None:
    hub_api.create_tag(REPO, tag="v1")
    v2 = hub_api.upload_file(path_or_fileobj=b'{"r": 16}', path_in_repo="adapter_config.json", repo_id=REPO).oid
    assert v2 != uploaded
    assert download(hub, "adapter_config.json", hf_cache, revision=uploaded) == FILES["adapter_config.json"]
    assert download(hub, "adapter_config.json", hf_cache, revision="v1") == FILES["adapter_config.json"]
    assert download(hub, "adapter_config.json", hf_cache) == b'{"r": 16}'
    old = snapshot_download(REPO, endpoint=hub.url, cache_dir=hf_cache, revision=uploaded)
    assert Path(old).name == uploaded
    refs = hub_api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": uploaded}
    assert hub.history(REPO)[:2] == [v2, uploaded]


def test_branch_and_pull_request_refs(hub: HubServer, hub_api: HfApi, hf_cache: Path, uploaded: str) -> None:
    hub_api.create_branch(REPO, branch="dev")
    hub_api.create_branch(REPO, branch="dev", exist_ok=True)
    hub_api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=REPO, revision="dev")
    pr = hub_api.upload_file(path_or_fileobj=b"pr", path_in_repo="pr.txt", repo_id=REPO, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    # Revisions with slashes travel URL-encoded (refs%2Fpr%2F1) in /resolve and /api URLs.
    assert download(hub, "pr.txt", hf_cache, revision="refs/pr/1") == b"pr"
    assert hub_api.file_exists(REPO, "dev.txt", revision="dev")
    assert not hub_api.file_exists(REPO, "dev.txt")
    assert not hub_api.file_exists(REPO, "pr.txt")
    assert hub.resolve(REPO) == uploaded
    assert {b.name for b in hub_api.list_repo_refs(REPO).branches} == {"main", "dev"}


def test_file_exists(hub_api: HfApi, uploaded: str) -> None:
    assert hub_api.file_exists(REPO, "adapter_config.json")
    assert not hub_api.file_exists(REPO, "missing.bin")
    assert not hub_api.file_exists("tester/nope", "adapter_config.json")
    assert hub_api.repo_exists(REPO)
    assert not hub_api.revision_exists(REPO, "nope")


def test_lfs_files_via_seeding(hub: HubServer, hf_cache: Path) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, {"big.bin": b"b" * 1000}, lfs=True)
    url = hf_hub_url(REPO, "big.bin", endpoint=hub.url)
    meta = get_hf_file_metadata(url)
    assert meta.etag == hub.repo(REPO).commits[hub.resolve(REPO)].files["big.bin"].sha256
    assert meta.size == 1000 and meta.xet_file_data is None
    assert download(hub, "big.bin", hf_cache) == b"b" * 1000
    assert Path(hf_cache, "models--tester--adapter", "blobs", meta.etag).exists()


# The client itself passes a file object as ``data=`` to httpx for LFS PUTs; not our warning.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_lfs_upload_without_xet(
    hub: HubServer, hub_api: HfApi, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # read at call time, unlike the env var
    hub.lfs_mode = True
    hub_api.create_repo(REPO)
    hub_api.upload_file(path_or_fileobj=b"w" * 2048, path_in_repo="weights.bin", repo_id=REPO)
    assert hub.count("POST", "lfs-batch") == 1 and hub.count("PUT", "lfs-upload") == 1
    (entry,) = [e for e in hub_api.list_repo_tree(REPO) if e.path == "weights.bin"]
    assert isinstance(entry, RepoFile) and entry.lfs is not None and entry.lfs.size == 2048
    assert download(hub, "weights.bin", hf_cache) == b"w" * 2048


# ---- errors ----------------------------------------------------------------------------------


def test_not_found_errors(hub: HubServer, hub_api: HfApi, hf_cache: Path, uploaded: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hub_api.model_info("tester/nope")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/nope", "x", endpoint=hub.url, cache_dir=hf_cache)
    with pytest.raises(RepositoryNotFoundError):
        hub_api.list_repo_refs("tester/nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, "adapter_config.json", hf_cache, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hub_api.model_info(REPO, revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(hub, "missing.bin", hf_cache)
    # X-Repo-Commit on the 404 lets the client remember the absence in its cache.
    assert Path(hf_cache, "models--tester--adapter", ".no_exist", uploaded, "missing.bin").exists()


def test_gated_repo(hub: HubServer, hf_cache: Path) -> None:
    hub.create_repo(REPO, gated="auto")
    hub.commit(REPO, FILES)
    api = HfApi(endpoint=hub.url, token=HUB_TOKEN)
    assert api.model_info(REPO).gated == "auto"  # metadata stays visible, like on the Hub
    with pytest.raises(GatedRepoError):
        download(hub, "adapter_config.json", hf_cache, token=HUB_TOKEN)
    with pytest.raises(GatedRepoError):
        api.file_exists(REPO, "adapter_config.json")
    hub.repo(REPO).granted_tokens.add(HUB_TOKEN)
    assert download(hub, "adapter_config.json", hf_cache, token=HUB_TOKEN) == FILES["adapter_config.json"]


def test_private_repo_and_required_token(hub: HubServer, hf_cache: Path) -> None:
    hub.create_repo(REPO, private=True)
    hub.commit(REPO, FILES)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url).model_info(REPO)
    assert HfApi(endpoint=hub.url, token=HUB_TOKEN).model_info(REPO).private is True
    hub.required_token = "secret"
    assert HfApi(endpoint=hub.url, token="secret").whoami()["name"] == "tester"
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(endpoint=hub.url, token="wrong").whoami()
    assert excinfo.value.response.status_code == 401
    assert download(hub, "adapter_config.json", hf_cache, token="secret") == FILES["adapter_config.json"]


# ---- commits -----------------------------------------------------------------------------------


def test_commit_is_atomic_and_checks_parent(hub: HubServer, hub_api: HfApi, uploaded: str) -> None:
    before = hub.snapshot(REPO)
    bad_ops = [
        CommitOperationAdd(path_in_repo="new.txt", path_or_fileobj=b"new"),
        CommitOperationDelete(path_in_repo="does-not-exist.txt"),
    ]
    with pytest.raises(EntryNotFoundError):
        hub_api.create_commit(REPO, bad_ops, commit_message="half")
    assert hub.snapshot(REPO) == before and hub.resolve(REPO) == uploaded
    hub.commit(REPO, {"concurrent.txt": "someone else"})
    with pytest.raises(HfHubHTTPError) as excinfo:
        hub_api.create_commit(
            REPO,
            [CommitOperationAdd(path_in_repo="late.txt", path_or_fileobj=b"late")],
            commit_message="stale",
            parent_commit=uploaded,
        )
    assert excinfo.value.response.status_code == 412
    hub_api.create_commit(REPO, [CommitOperationDelete(path_in_repo="extra/")], commit_message="rm folder")
    assert "extra/notes.txt" not in hub.snapshot(REPO)


@pytest.mark.parametrize("path", ["../evil.txt", "/etc/passwd", "a/../../b", "a//b"])
def test_commit_rejects_unsafe_paths(hub: HubServer, uploaded: str, path: str) -> None:
    # Raw HTTP: the client validates some paths itself, the server must not rely on that.
    lines = [
        {"key": "header", "value": {"summary": "evil"}},
        {"key": "file", "value": {"path": path, "content": "eA==", "encoding": "base64"}},
    ]
    request = urllib.request.Request(
        f"{hub.url}/api/models/{REPO}/commit/main",
        data="\n".join(json.dumps(line) for line in lines).encode(),
        headers={"Content-Type": "application/x-ndjson"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request, timeout=5)
    excinfo.value.close()  # HTTPError holds the socket open until closed
    assert excinfo.value.code == 400
    assert hub.resolve(REPO) == uploaded


# ---- offline / cache-only ----------------------------------------------------------------------


def test_offline_redownload_from_cache(
    hub: HubServer, hf_cache: Path, uploaded: str, request: pytest.FixtureRequest
) -> None:
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]
    snapshot_download(REPO, endpoint=hub.url, cache_dir=hf_cache, allow_patterns=["*.json"])
    hub.reset_log()
    # 1) per call: local_files_only=True never touches the network.
    assert download(hub, "adapter_config.json", hf_cache, local_files_only=True) == FILES["adapter_config.json"]
    with pytest.raises(LocalEntryNotFoundError):
        download(hub, "extra/notes.txt", hf_cache, local_files_only=True)
    # 2) process-wide: HF_HUB_OFFLINE (the constant; the env var is only read at import).
    request.getfixturevalue("hf_offline")
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]
    path = snapshot_download(REPO, endpoint=hub.url, cache_dir=hf_cache, allow_patterns=["*.json"])
    assert Path(path).name == uploaded
    assert hub.requests == []


def test_hub_endpoint_fixture_routes_default_calls(hub: HubServer, hub_endpoint: str, hf_cache: Path) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, FILES)
    assert Path(hf_hub_download(REPO, "adapter_config.json")).read_bytes() == FILES["adapter_config.json"]
    assert huggingface_hub.file_exists(REPO, "adapter_config.json")
    assert HfApi().model_info(REPO).id == REPO


# ---- fault injection -----------------------------------------------------------------------------


def test_one_500_on_head_then_success(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    # hf_hub_download's first HEAD is not retried, but with nothing cached it retries once
    # (with backoff enabled) on 5xx: a single 500 is absorbed without any sleep.
    hub.reset_log()
    injection = hub.inject_when(("status", 500), method="HEAD", path_regex="/resolve/", times=1)
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]
    assert injection.fired == 1
    assert [m for m, _ in hub.requests] == ["HEAD", "HEAD", "GET"]


def test_500_on_get_is_not_retried(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    hub.inject_when(("status", 500), method="GET", path_regex="/resolve/", times=1)
    with pytest.raises(HfHubHTTPError):
        download(hub, "adapter_config.json", hf_cache)
    assert download(hub, "adapter_config.json", hf_cache) == FILES["adapter_config.json"]


def test_truncated_body_is_resumed_with_range(hub: HubServer, hf_cache: Path) -> None:
    # http_get retries a cut stream after ~1 s and asks for the rest with "Range: bytes=N-", where
    # N counts whole chunks written (DOWNLOAD_CHUNK_SIZE = 10 MiB): the file must exceed one chunk.
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    big = bytes(range(256)) * (chunk // 256) + b"tail" * 100
    hub.create_repo(REPO)
    hub.commit(REPO, {"big.bin": big}, lfs=True)
    hub.inject_when(("truncate", chunk + 100), method="GET", path_regex="/resolve/", times=1)
    assert download(hub, "big.bin", hf_cache) == big
    gets = [(r.status, r.range) for r in hub.records if r.method == "GET"]
    assert gets == [(200, None), (206, f"bytes={chunk}-")]


def test_range_requests(hub: HubServer) -> None:
    hub.create_repo(REPO)
    hub.commit(REPO, {"f.bin": b"0123456789"})
    url = hf_hub_url(REPO, "f.bin", endpoint=hub.url)
    for header, status, body in [("bytes=2-4", 206, b"234"), ("bytes=7-", 206, b"789"), ("bytes=-2", 206, b"89")]:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": header}), timeout=5) as resp:
            assert (resp.status, resp.read()) == (status, body)
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=20-"}), timeout=5)
    excinfo.value.close()
    assert excinfo.value.code == 416


def test_bad_etag_and_corrupt_body(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    url = hf_hub_url(REPO, "adapter_config.json", endpoint=hub.url)
    real = get_hf_file_metadata(url).etag
    hub.inject_when(("bad_etag",), method="HEAD", times=1)
    assert get_hf_file_metadata(url).etag not in (None, real)
    # The client checks sizes, not hashes: a same-length corrupted body is accepted as is.
    hub.inject_when(("corrupt",), method="GET", path_regex="/resolve/", times=1)
    corrupted = download(hub, "adapter_config.json", hf_cache)
    assert corrupted != FILES["adapter_config.json"] and len(corrupted) == len(FILES["adapter_config.json"])


def test_dropped_head_surfaces_as_protocol_error(hub: HubServer, hf_cache: Path, uploaded: str) -> None:
    httpx2 = pytest.importorskip("httpx2")  # the HTTP client this huggingface_hub (2.x) uses
    hub.inject_when(("drop",), method="HEAD", times=1)
    with pytest.raises(httpx2.RemoteProtocolError):
        download(hub, "adapter_config.json", hf_cache)
    assert hub.internal_errors == []


# ---- faults for deadline tests: stall, trickle, reset ----------------------------------------


def _raw_get(url: str, path: str, timeout: float = 5.0) -> socket.socket:
    """A bare HTTP/1.1 GET on its own socket (no client library between the test and the wire)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_until_closed(sock: socket.socket) -> tuple:
    """``(bytes received, the error that ended the stream or None for a clean close)``."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError as exc:
            return data, exc
        if not chunk:
            return data, None
        data += chunk


def test_stall_reads_the_request_and_answers_nothing_until_stop(hf_online: None) -> None:
    server = HubServer().start()
    server.create_repo(REPO)
    server.commit(REPO, FILES)
    stall = server.inject_when(("stall",), method="GET", path_regex="/resolve/", times=1)
    sock = _raw_get(server.url, f"/{REPO}/resolve/main/adapter_config.json", timeout=0.5)
    with pytest.raises(socket.timeout):
        sock.recv(1)  # heard (logged below), never answered
    assert stall.fired == 1 and server.records[-1].path.endswith("adapter_config.json")
    assert server.records[-1].status is None
    sock.settimeout(5)
    t0 = time.monotonic()
    server.stop()  # releases the stalled handler: a test never waits for its own fault
    data, err = _read_until_closed(sock)
    assert time.monotonic() - t0 < 3 and data == b"" and not isinstance(err, socket.timeout)
    sock.close()


def test_stall_for_seconds_then_hangs_up(hub: HubServer, uploaded: str) -> None:
    hub.inject_when(("stall", 0.3), method="GET", times=1)
    sock = _raw_get(hub.url, f"/{REPO}/resolve/main/adapter_config.json")
    t0 = time.monotonic()
    data, err = _read_until_closed(sock)
    sock.close()
    assert data == b"" and err is None and 0.25 < time.monotonic() - t0 < 3


def test_trickle_sends_the_body_a_few_bytes_at_a_time(hub: HubServer) -> None:
    body = bytes(range(40))
    hub.create_repo(REPO)
    hub.commit(REPO, {"f.bin": body})
    hub.inject_when(("trickle", 4, 0.1), method="GET", path_regex="/resolve/", times=1)
    sock = _raw_get(hub.url, f"/{REPO}/resolve/main/f.bin")
    t0 = time.monotonic()
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    first_byte = time.monotonic() - t0
    data, err = _read_until_closed(sock)
    elapsed = time.monotonic() - t0
    sock.close()
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 40" in head and first_byte < 1.0
    assert data == body and err is None
    assert elapsed >= 0.8, elapsed  # 10 pieces, 9 pauses of 0.1 s: every read succeeds, the whole crawls
    # HEAD has no body to trickle: answered at once
    hub.inject_when(("trickle", 1, 5.0), method="HEAD", times=1)
    t0 = time.monotonic()
    meta = get_hf_file_metadata(hf_hub_url(REPO, "f.bin", endpoint=hub.url))
    assert meta.size == 40 and time.monotonic() - t0 < 2


@pytest.mark.parametrize("nbytes", [None, 10])
def test_reset_aborts_the_connection_with_rst(hub: HubServer, nbytes: object) -> None:
    body = b"0123456789abcdefghij"
    hub.create_repo(REPO)
    hub.commit(REPO, {"f.bin": body})
    hub.inject_when(("reset",) if nbytes is None else ("reset", nbytes), method="GET", path_regex="/resolve/", times=1)
    sock = _raw_get(hub.url, f"/{REPO}/resolve/main/f.bin")
    data, err = _read_until_closed(sock)
    sock.close()
    # A reset, not a clean close: the client sees ECONNRESET, after nothing or after part of the body.
    assert isinstance(err, ConnectionResetError), (data, err)
    if nbytes is None:
        assert data == b""
    else:
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"\r\n\r\n" + body[:10])
    # The server carries on: the next request is answered in full.
    assert urllib.request.urlopen(hf_hub_url(REPO, "f.bin", endpoint=hub.url), timeout=5).read() == body
    assert hub.internal_errors == []


def test_bandwidth_paces_bodies_on_one_shared_link_and_counts_bytes():
    import time as _time
    from concurrent.futures import ThreadPoolExecutor
    from urllib.request import urlopen

    with HubServer() as hub:
        hub.create_repo("me/big")
        payload = bytes(range(256)) * 2048  # 512 KiB
        hub.commit("me/big", {"a.bin": payload, "b.bin": payload[::-1]})
        hub.reset_log()
        hub.bandwidth = 4 * 1024 * 1024  # 4 MiB/s: two 512 KiB bodies at once take 0.25 s on the shared link
        start = _time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda f: urlopen(f"{hub.url}/me/big/resolve/main/{f}").read(), ["a.bin", "b.bin"]))
        took = _time.monotonic() - start
        assert got == [payload, payload[::-1]]
        assert hub.bytes_sent == 2 * len(payload)
        assert took >= 0.24, took  # a floor only: the link cannot go faster than its bandwidth
        hub.reset_log()
        assert hub.bytes_sent == 0
