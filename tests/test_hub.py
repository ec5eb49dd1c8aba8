"""lorashare and the Hugging Face Hub, end to end over HTTP.

Every test drives the real ``huggingface_hub`` client against :class:`tests.hubserver.HubServer`
(a local Hub-compatible server).  ``lorashare.hub`` reads ``HF_ENDPOINT``/``HF_TOKEN``/
``HF_HUB_OFFLINE`` at call time, so the tests set them with ``monkeypatch``; the cache locations,
which huggingface_hub reads at import, are patched by the ``hf_cache`` fixture (and by
:func:`fresh_cache` for a second, empty cache in the middle of a test).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from huggingface_hub import constants

import lorashare.hub
from lorashare import LoraShareError, SHAREModel
from lorashare.cli import main
from lorashare.errors import (
    AdapterNotFoundError,
    HubError,
    HubNotFoundError,
    IntegrityError,
)
from tests.conftest import load_state
from tests.hub_fixtures import HUB_TOKEN, fresh_cache
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]
CKPT = "tester/share-ckpt"
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """``hub`` as lorashare's endpoint, with an isolated empty cache and no ambient token."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> List[float]:
    """Record retry back-off delays instead of sleeping (keeps retry tests fast)."""
    delays: List[float] = []
    monkeypatch.setattr(lorashare.hub.client.time, "sleep", delays.append)
    return delays


def folder_files(folder: str, prefix: str = "") -> Dict[str, bytes]:
    """``{prefix/relpath: bytes}`` of every file under ``folder``."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[prefix + p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def put_adapter(hub: HubServer, repo_id: str, folder: str, *, sub: str = "", extra: Optional[Dict[str, bytes]] = None,
                message: str = "add adapter") -> str:
    """Commit a PEFT adapter folder (into ``sub/``) plus ``extra`` files to ``repo_id``; return the sha."""
    try:
        hub.repo(repo_id)
    except Exception:  # noqa: BLE001 - HubServer's own HubApiError: not there yet
        hub.create_repo(repo_id)
    files = {**folder_files(folder, f"{sub}/" if sub else ""), **(extra or {})}
    return hub.commit(repo_id, files, lfs=[p for p in files if p.endswith((".safetensors", ".bin", ".pt"))], message=message)


def build(sources, **kwargs) -> SHAREModel:
    return SHAREModel.from_adapters(sources, num_components=32, progress=False, **kwargs)


def assert_bit_equal(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ push


def test_push_one_commit_then_load_in_fresh_cache_bit_exact(env, adapter_dirs, tmp_path, monkeypatch):
    # Non-empty files go through the LFS batch API, as safetensors do on the Hub (Xet is not served here).
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    env.lfs_mode = True
    share = build(adapter_dirs)
    info = share.push_to_hub(CKPT, token=HUB_TOKEN)

    head = env.resolve(CKPT)
    assert info.oid == head and len(info.oid) == 40
    assert info.commit_url.startswith(env.url) and head in info.commit_url
    assert str(info.repo_url).rstrip("/").endswith(CKPT)
    # One commit for the whole checkpoint (after the repo's initial commit).
    assert env.count("POST", "commit", CKPT) == 1
    assert len(env.history(CKPT)) == 2
    share.save_pretrained(tmp_path / "local")
    remote = env.snapshot(CKPT)
    local = folder_files(str(tmp_path / "local"))
    assert set(remote) - {".gitattributes"} == set(local)
    assert remote["README.md"] == local["README.md"]
    assert env.count("POST", "lfs-batch", CKPT) >= 1 and env.repo(CKPT).commits[head].files["shared_components.safetensors"].lfs

    fresh_cache(monkeypatch, tmp_path / "elsewhere")
    env.reset_log()
    loaded = SHAREModel.from_pretrained(CKPT)
    assert loaded.adapter_names == share.adapter_names
    for name in share.adapter_names:
        assert_bit_equal(loaded.reconstruct(name), share.reconstruct(name))
    assert set(env.served_files(CKPT)) == set(local)


def test_push_bad_repo_id_sends_nothing(env, adapter_dirs):
    share = build(adapter_dirs[:2])
    with pytest.raises(HubError, match="not a Hub repo id"):
        share.push_to_hub("no slash here")
    assert env.records == []


def test_push_create_pr_then_remove_adapter_deletes_its_files_in_one_commit(env, adapter_dirs):
    share = build(adapter_dirs)
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    main_sha = env.resolve(CKPT)

    share.remove_adapter("task3")
    pr = share.push_to_hub(CKPT, token=HUB_TOKEN, create_pr=True)
    assert pr.pr_num == 1 and pr.pr_url
    assert env.repo(CKPT).pull_requests == {1: pr.oid}
    assert env.resolve(CKPT) == main_sha  # main untouched
    assert not any(p.startswith("adapters/task3/") for p in env.snapshot(CKPT, "refs/pr/1"))
    assert any(p.startswith("adapters/task3/") for p in env.snapshot(CKPT))
    assert SHAREModel.from_pretrained(CKPT, revision="refs/pr/1").adapter_names == ["task0", "task1", "task2"]

    commits = env.count("POST", "commit", CKPT)
    info = share.push_to_hub(CKPT, token=HUB_TOKEN)
    assert env.count("POST", "commit", CKPT) == commits + 1
    assert env.history(CKPT)[:2] == [info.oid, main_sha]
    files = env.snapshot(CKPT)
    assert not any(p.startswith("adapters/task3/") for p in files)
    assert {p.split("/")[1] for p in files if p.startswith("adapters/")} == {"task0", "task1", "task2"}
    cfg = json.loads(files["share_config.json"])
    assert cfg["adapter_names"] == ["task0", "task1", "task2"] and "task3" not in cfg["adapters"]

    # A branch that does not exist yet is created from main, and gets the one commit.
    dev = share.push_to_hub(CKPT, token=HUB_TOKEN, revision="dev", commit_message="to dev")
    assert env.resolve(CKPT, "dev") == dev.oid and env.resolve(CKPT) == info.oid
    # (safetensors' metadata order varies between saves: either one commit on top of main, or none
    # at all when every byte is unchanged: huggingface_hub then skips the empty commit.)
    assert info.oid in env.history(CKPT, "dev")[:2]


# ---------------------------------------------------------------------- adapters by Hub id


def test_hub_adapters_pinned_revision_subfolder_and_local(env, adapter_dirs, tmp_path):
    v1 = put_adapter(env, "tester/a", adapter_dirs[0])
    env.create_tag("tester/a", "v1")
    v2 = put_adapter(env, "tester/a", adapter_dirs[1], message="retrain")  # main moves on
    multi = put_adapter(env, "tester/multi", adapter_dirs[2], sub="legal")
    multi = put_adapter(env, "tester/multi", adapter_dirs[3], sub="medical")
    assert v1 != v2

    share = build({"tag": "tester/a@v1", "sha": f"tester/a@{v1}", "main": "tester/a",
                   "legal": "tester/multi/legal", "local": adapter_dirs[3]})
    assert assert_close(share.reconstruct("tag"), load_state(adapter_dirs[0]))
    assert assert_close(share.reconstruct("sha"), load_state(adapter_dirs[0]))
    assert not assert_close(share.reconstruct("tag"), load_state(adapter_dirs[1]))
    assert assert_close(share.reconstruct("main"), load_state(adapter_dirs[1]))
    assert assert_close(share.reconstruct("legal"), load_state(adapter_dirs[2]))
    assert assert_close(share.reconstruct("local"), load_state(adapter_dirs[3]))

    share.save_pretrained(tmp_path / "ck")
    adapters = json.loads((tmp_path / "ck" / "share_config.json").read_text())["adapters"]
    assert adapters["tag"]["revision"] == v1 and adapters["sha"]["revision"] == v1
    assert adapters["main"]["revision"] == v2
    assert adapters["legal"]["revision"] == multi
    assert adapters["local"]["revision"] is None
    assert adapters["tag"]["source"] == "tester/a@v1" and adapters["legal"]["source"] == "tester/multi/legal"
    assert adapters["tag"]["sha256"] == sha256(os.path.join(adapter_dirs[0], "adapter_model.safetensors"))
    assert adapters["legal"]["sha256"] == sha256(os.path.join(adapter_dirs[2], "adapter_model.safetensors"))


def test_hub_adapter_downloads_only_its_two_files(env, adapter_dirs):
    big = os.urandom(3 * 1024 * 1024)
    put_adapter(env, "tester/big", adapter_dirs[0], extra={
        "optimizer.pt": big, "training_args.bin": b"\x80\x04pickle", "README.md": "# my adapter",
        "checkpoint-500/adapter_model.safetensors": big,
    })
    put_adapter(env, "tester/multi", adapter_dirs[1], sub="legal")
    put_adapter(env, "tester/multi", adapter_dirs[2], sub="medical", extra={"legal/optimizer.pt": big})

    share = build(["tester/big", "tester/multi/legal", adapter_dirs[3]])
    assert share.adapter_names == ["big", "legal", "task3"]
    assert env.served_files("tester/big") == ADAPTER_FILES
    assert env.served_files("tester/multi") == {f"legal/{f}" for f in ADAPTER_FILES}


def test_partial_download_fetches_only_the_named_adapter(env, adapter_dirs, tmp_path, monkeypatch):
    share = build(adapter_dirs)
    share.push_to_hub(CKPT, token=HUB_TOKEN)

    fresh_cache(monkeypatch, tmp_path / "other")
    env.reset_log()
    one = SHAREModel.from_pretrained(CKPT, adapters=["task1"])
    assert one.adapter_names == ["task1"]
    assert env.served_files(CKPT) == {
        "share_config.json", "shared_components.safetensors", "README.md",
        "adapters/task1/loadings.safetensors", "adapters/task1/adapter_meta.json",
    }
    assert_bit_equal(one.reconstruct("task1"), share.reconstruct("task1"))

    env.reset_log()  # an adapter with a head: its head file too, and nothing cached is fetched again
    two = SHAREModel.from_pretrained(CKPT, adapters=["task0"])
    assert env.served_files(CKPT) == {
        "adapters/task0/loadings.safetensors", "adapters/task0/classifier_head.safetensors",
        "adapters/task0/adapter_meta.json",
    }
    assert_bit_equal(two.reconstruct("task0"), share.reconstruct("task0"))


# ----------------------------------------------------------------------------------- offline


def test_offline_reload_from_cache(env, adapter_dirs, tmp_path, request):
    put_adapter(env, "tester/a", adapter_dirs[0])
    env.create_tag("tester/a", "v1")
    share = build(["tester/a@v1", adapter_dirs[1]])
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    online = SHAREModel.from_pretrained(CKPT)
    partial = SHAREModel.from_pretrained("tester/share-ckpt", adapters=["a"])

    request.getfixturevalue("hf_offline")
    env.reset_log()
    offline = SHAREModel.from_pretrained(CKPT)
    for name in share.adapter_names:
        assert_bit_equal(offline.reconstruct(name), online.reconstruct(name))
    assert_bit_equal(SHAREModel.from_pretrained(CKPT, adapters=["a"]).reconstruct("a"), partial.reconstruct("a"))
    again = build(["tester/a@v1", adapter_dirs[1]])  # Hub adapters come from the cache as well
    assert again.config.adapters["a"]["revision"] == share.config.adapters["a"]["revision"]
    assert env.records == []  # not a single request


def test_offline_partial_cache_is_a_clear_error(env, adapter_dirs, request):
    build(adapter_dirs[:3]).push_to_hub(CKPT, token=HUB_TOKEN)
    SHAREModel.from_pretrained(CKPT, adapters=["task1"])
    request.getfixturevalue("hf_offline")
    with pytest.raises(LoraShareError) as exc:
        SHAREModel.from_pretrained(CKPT, adapters=["task2"])
    assert CKPT in str(exc.value) and "offline" in str(exc.value).lower() and "cache" in str(exc.value)


def test_offline_with_empty_cache_is_a_clear_error(hf_offline, adapter_dirs, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never contacted
    with pytest.raises(LoraShareError) as exc:
        SHAREModel.from_pretrained("tester/nothing-cached")
    msg = str(exc.value)
    assert "tester/nothing-cached" in msg and "offline" in msg.lower() and "cache" in msg
    with pytest.raises(LoraShareError) as exc:
        build(["tester/nothing-cached", adapter_dirs[0]])
    msg = str(exc.value)
    assert "tester/nothing-cached" in msg and "offline" in msg.lower() and "cache" in msg
    with pytest.raises(HubError, match="offline"):
        build(adapter_dirs[:2]).push_to_hub(CKPT, token=HUB_TOKEN)


# ------------------------------------------------------------------------------------ errors


def _fails(sources, err=LoraShareError, **kwargs) -> str:
    with pytest.raises(err) as exc:
        build(sources, **kwargs)
    assert "Traceback" not in str(exc.value)
    return str(exc.value)


def test_error_repo_not_found(env, adapter_dirs):
    msg = _fails(["tester/missing", adapter_dirs[0]], HubNotFoundError)
    assert "repo not found" in msg and "tester/missing" in msg
    with pytest.raises(HubNotFoundError, match="tester/missing"):
        SHAREModel.from_pretrained("tester/missing")


def test_error_revision_not_found(env, adapter_dirs):
    put_adapter(env, "tester/a", adapter_dirs[0])
    msg = _fails(["tester/a@v9", adapter_dirs[1]], HubNotFoundError)
    assert "revision not found" in msg and "tester/a@v9" in msg
    msg = _fails([f"tester/a@{'0' * 40}", adapter_dirs[1]], HubNotFoundError)
    assert "revision not found" in msg and "0" * 40 in msg
    build(adapter_dirs[:2]).push_to_hub(CKPT, token=HUB_TOKEN)
    with pytest.raises(HubNotFoundError, match=f"{CKPT}@nope"):
        SHAREModel.from_pretrained(CKPT, revision="nope")


def test_error_not_a_peft_adapter(env, adapter_dirs):
    env.create_repo("tester/x")
    env.commit("tester/x", {"README.md": "just a readme", "model.safetensors": b"x"})
    msg = _fails(["tester/x", adapter_dirs[0]], AdapterNotFoundError)
    assert "not a PEFT adapter: no adapter_config.json in tester/x@main" in msg
    put_adapter(env, "tester/multi", adapter_dirs[1], sub="legal")
    msg = _fails(["tester/multi/medical", adapter_dirs[0]], AdapterNotFoundError)
    assert "tester/multi/medical@main" in msg
    with pytest.raises(LoraShareError, match="tester/x@main"):
        SHAREModel.from_pretrained("tester/x")  # a repo, but not a SHARE checkpoint


def test_error_gated_repo(env, adapter_dirs, monkeypatch):
    env.create_repo("tester/gated", gated=True)
    put_adapter(env, "tester/gated", adapter_dirs[0])
    msg = _fails(["tester/gated", adapter_dirs[1]], HubError)
    assert "gated" in msg and "tester/gated" in msg
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    msg = _fails(["tester/gated", adapter_dirs[1]], HubError)  # a token, but no access yet
    assert "gated" in msg
    env.repo("tester/gated").granted_tokens.add(HUB_TOKEN)
    assert build(["tester/gated", adapter_dirs[1]]).adapter_names == ["gated", "task1"]


def test_error_private_repo_without_token(env, adapter_dirs, monkeypatch):
    env.create_repo("tester/private", private=True)
    put_adapter(env, "tester/private", adapter_dirs[0])
    msg = _fails(["tester/private", adapter_dirs[1]], HubError)
    assert "tester/private" in msg and "token" in msg
    assert build(["tester/private", adapter_dirs[1]], token=HUB_TOKEN).adapter_names == ["private", "task1"]
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert build(["tester/private", adapter_dirs[1]]).adapter_names == ["private", "task1"]


def test_hf_token_is_respected(env, adapter_dirs, monkeypatch):
    secret = "hf_requiredSecretToken123"
    put_adapter(env, "tester/a", adapter_dirs[0])
    env.required_token = secret
    msg = _fails(["tester/a", adapter_dirs[1]], HubError)
    assert "tester/a" in msg and "HF_TOKEN" in msg and "401" in msg
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenValue999")
    msg = _fails(["tester/a", adapter_dirs[1]], HubError)
    assert "hf_wrongTokenValue999" not in msg
    monkeypatch.setenv("HF_TOKEN", secret)
    env.reset_log()
    share = build(["tester/a", adapter_dirs[1]])
    assert env.records and {r.token for r in env.records} == {secret}
    share.push_to_hub(CKPT)
    assert SHAREModel.from_pretrained(CKPT).adapter_names == ["a", "task1"]


def test_transient_5xx_is_retried(env, adapter_dirs, no_sleep):
    put_adapter(env, "tester/a", adapter_dirs[0])
    weights = env.inject_when(("status", 500), method="GET", path_regex=r"/resolve/.*/adapter_model\.safetensors$", times=2)
    share = build(["tester/a", adapter_dirs[1]])
    assert weights.fired == 2 and no_sleep == [0.5, 1.0]
    assert assert_close(share.reconstruct("a"), load_state(adapter_dirs[0]))

    # The repo-info call failing (snapshot_download turns it into "not in the cache") is transient too.
    no_sleep.clear()
    put_adapter(env, "tester/b", adapter_dirs[2])
    api = env.inject_when(("status", 503), method="GET", path_regex=r"^/api/models/tester/b/revision/", times=2)
    assert build(["tester/b", adapter_dirs[1]]).adapter_names == ["b", "task1"]
    assert api.fired == 2 and no_sleep == [0.5, 1.0]

    share.push_to_hub(CKPT, token=HUB_TOKEN)
    no_sleep.clear()
    loadings = env.inject_when(("status", 502), method="GET", path_regex=r"/resolve/.*/adapters/a/loadings\.safetensors$", times=2)
    assert SHAREModel.from_pretrained(CKPT).adapter_names == ["a", "task1"]
    assert loadings.fired == 2 and no_sleep == [0.5, 1.0]


def test_persistent_5xx_fails_clearly_after_retries(env, adapter_dirs, no_sleep):
    put_adapter(env, "tester/a", adapter_dirs[0])
    fault = env.inject_when(("status", 500), method="GET", path_regex=r"/resolve/.*/adapter_model\.safetensors$", times=None)
    msg = _fails(["tester/a", adapter_dirs[1]], HubError)
    assert "tester/a@main" in msg and "500" in msg and "4 attempts" in msg
    assert fault.fired == 4 and no_sleep == [0.5, 1.0, 2.0]

    no_sleep.clear()
    env.inject_when(("status", 503), method="GET", path_regex=r"^/api/models/tester/c/", times=None)
    put_adapter(env, "tester/c", adapter_dirs[2])
    msg = _fails(["tester/c", adapter_dirs[1]], HubError)
    assert "tester/c@main" in msg and "503" in msg and "offline" not in msg.lower()


# --------------------------------------------------------------------------------- integrity


def test_tampered_download_raises_integrity_error(env, adapter_dirs, tmp_path, monkeypatch):
    build(adapter_dirs).push_to_hub(CKPT, token=HUB_TOKEN)
    rel = "adapters/task1/loadings.safetensors"
    blob = bytearray(env.snapshot(CKPT)[rel])
    blob[-1] ^= 0x01  # a flipped bit in the last weight: still a valid safetensors file
    env.commit(CKPT, {rel: bytes(blob)}, message="tamper", lfs=True)

    fresh_cache(monkeypatch, tmp_path / "victim")
    with pytest.raises(IntegrityError) as exc:
        SHAREModel.from_pretrained(CKPT)
    assert rel in str(exc.value) and "sha256" in str(exc.value)
    with pytest.raises(IntegrityError, match=rel):
        SHAREModel.from_pretrained(CKPT, adapters=["task1"])
    assert SHAREModel.from_pretrained(CKPT, adapters=["task2"]).adapter_names == ["task2"]


# -------------------------------------------------------------------------------------- CLI


def test_cli_info_and_reconstruct_from_hub(env, adapter_dirs, tmp_path, capsys):
    share = build(adapter_dirs)
    share.push_to_hub(CKPT, token=HUB_TOKEN)

    assert main(["info", CKPT, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["checkpoint"] == CKPT and set(out["adapters"]) == set(share.adapter_names)

    env.reset_log()
    assert main(["reconstruct", CKPT, "--adapter", "task1", "-o", str(tmp_path / "rec")]) == 0
    assert_bit_equal(load_state(str(tmp_path / "rec")), share.reconstruct("task1"))
    assert not any(p.startswith(("adapters/task0/", "adapters/task2/", "adapters/task3/")) for p in env.served_files(CKPT))

    assert main(["info", "tester/does-not-exist", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["type"] == "HubNotFoundError"
    assert "tester/does-not-exist" in captured.err and "Traceback" not in captured.err


def test_cli_push_private_with_hf_token_never_printed(env, adapter_dirs, tmp_path):
    secret = "hf_cliPushSecret0123456789"
    env.required_token = secret
    build(adapter_dirs[:3]).save_pretrained(tmp_path / "ck")
    cli_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    cli_env.update(HF_ENDPOINT=env.url, HF_HOME=str(tmp_path / "cli_home"), HF_TOKEN=secret, PYTHONPATH=str(ROOT),
                   HF_HUB_DISABLE_XET="1")
    cmd = [sys.executable, "-m", "lorashare", "push", str(tmp_path / "ck"), "tester/cli-share", "--private", "--json", "-v"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["commit_sha"] == env.resolve("tester/cli-share") and out["repo_id"] == "tester/cli-share"
    assert env.repo("tester/cli-share").private
    assert secret not in r.stdout and secret not in r.stderr
    assert {r.token for r in env.records} == {secret}

    del cli_env["HF_TOKEN"]  # without the token: a clear one-line error, still no token anywhere
    r = subprocess.run(cmd, capture_output=True, text=True, env=cli_env, timeout=120)
    assert r.returncode == 1 and "tester/cli-share" in r.stderr and "HF_TOKEN" in r.stderr
    assert "Traceback" not in r.stderr and secret not in r.stdout + r.stderr
