"""Adapters for inference engines: ``lorashare export``, the on-demand cache and the vLLM resolver's core.

The cache is driven against the local Hub (:mod:`tests.hubserver`) over HTTP, and its log says
what was downloaded.  The resolver's vLLM hook itself runs against a real engine in
``tests/test_vllm.py``; here its lorashare side (configuration, one-line errors) is tested
without vLLM.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from huggingface_hub import constants

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import CheckpointError, ConfigError, IntegrityError, LoraShareError
from lorashare.format.checkpoint import load_checkpoint
from lorashare.serving.cache import AdapterCache, CheckpointRef, parse_checkpoints
from lorashare.serving.export import export_adapters
from lorashare.serving.vllm_plugin import SHAREResolver, cache_from_env
from tests.conftest import load_state
from tests.hub_fixtures import HUB_TOKEN, fresh_cache
from tests.hubserver import HubServer

CKPT = "tester/support-share"
BASES = "shared_components.safetensors"


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_mode = True
    return hub


@pytest.fixture(scope="module")
def share(adapter_dirs) -> SHAREModel:
    return SHAREModel.from_adapters(adapter_dirs[1:], num_components=6, progress=False)  # task1..task3, no heads


def rebuilt(folder: str) -> Dict[str, torch.Tensor]:
    return load_state(folder)


def assert_equal_tensors(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k


def files_fetched(hub: HubServer) -> set:
    return set(hub.served_files(CKPT))


# ------------------------------------------------------------------------------------ export


def test_export_writes_peft_folders_equal_to_reconstruct(share, tmp_path):
    out = export_adapters(share.state, str(tmp_path / "exp"), progress=False)
    assert sorted(out) == share.adapter_names
    for name, folder in out.items():
        assert os.path.isabs(folder) and Path(folder).name == name
        assert_equal_tensors(rebuilt(folder), share.reconstruct(name))
        cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
        assert cfg == share.adapter_configs[name]  # the adapter's own config, as PEFT saved it


def test_export_in_bfloat16_casts_only_the_factors(share, tmp_path):
    folder = export_adapters(share.state, str(tmp_path / "exp"), ["task1"], dtype="bfloat16", progress=False)["task1"]
    got, want = rebuilt(folder), share.reconstruct("task1")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for k in want:
        assert torch.equal(got[k], want[k].to(torch.bfloat16)), k


def test_export_max_rank_refuses_before_writing_anything(adapter_dirs, tmp_path):
    from examples.make_adapters import make_adapter

    wide = make_adapter(str(tmp_path / "wide"), seed=5, r=8)
    model = SHAREModel.from_adapters([adapter_dirs[1], wide], num_components=4, progress=False)
    with pytest.raises(ConfigError) as exc:
        export_adapters(model.state, str(tmp_path / "exp"), max_rank=4, progress=False)
    msg = str(exc.value)
    assert "'wide' has rank 8" in msg and "max_lora_rank 4" in msg and "--max-lora-rank 8" in msg
    assert "task1" not in msg.split(" Start")[0]  # rank 4 fits: only the culprit is named
    assert not (tmp_path / "exp").exists()
    assert export_adapters(model.state, str(tmp_path / "exp"), max_rank=8, progress=False).keys() == {"task1", "wide"}


def test_export_refuses_unknown_names_and_dtypes(share, tmp_path):
    with pytest.raises(LoraShareError, match="nope"):
        export_adapters(share.state, str(tmp_path / "exp"), ["task1", "nope"], progress=False)
    with pytest.raises(ConfigError, match="float8"):
        export_adapters(share.state, str(tmp_path / "exp"), dtype="float8", progress=False)
    assert not (tmp_path / "exp").exists()


def test_cli_export_json_and_max_rank_exit_codes(share, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    share.save_pretrained(ckpt)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "all"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(out["written"]) == share.adapter_names
    assert out["ranks"] == {n: 4 for n in share.adapter_names}
    for name, folder in out["written"].items():
        assert_equal_tensors(rebuilt(folder), share.reconstruct(name))

    assert main(["export", str(ckpt), "-o", str(tmp_path / "some"), "--adapter", "task2", "--adapter", "task3",
                 "--max-rank", "4"]) == 0
    assert sorted(os.listdir(tmp_path / "some")) == ["task2", "task3"]
    capsys.readouterr()

    assert main(["export", str(ckpt), "-o", str(tmp_path / "small"), "--max-rank", "2", "--json"]) == 2
    captured = capsys.readouterr()
    err = json.loads(captured.out.strip().splitlines()[-1])
    assert err["type"] == "ConfigError" and "--max-rank 2" in captured.err and "'task3' (rank 4)" in captured.err
    assert not (tmp_path / "small").exists()

    assert main(["export", "--help"]) == 0
    assert "max_lora_rank" in capsys.readouterr().out


# ----------------------------------------------------------------------- configuration


def test_parse_checkpoints(tmp_path):
    (tmp_path / "ckpt").mkdir()
    refs = parse_checkpoints(f"support=acme/support-share@v3, local={tmp_path / 'ckpt'}\nother=acme/other")
    assert refs["support"] == CheckpointRef("support", "acme/support-share", "v3", is_hub=True)
    assert refs["local"] == CheckpointRef("local", str(tmp_path / "ckpt"))
    assert refs["other"].revision is None and refs["other"].is_hub
    assert parse_checkpoints("") == {} and parse_checkpoints(" , ") == {}


@pytest.mark.parametrize("text, culprit", [
    ("support", "'support' is not alias=checkpoint"),
    ("a/b=acme/x", "alias 'a/b'"),
    ("a=acme/x,a=acme/y", "alias 'a' is given twice"),
    ("a=not a repo", "'not a repo' (alias 'a') is neither a folder nor a Hub repo id"),
    ("a=acme/x/sub", "names a subfolder"),
    ("a=", "is not alias=checkpoint"),
])
def test_parse_checkpoints_names_the_bad_entry(text, culprit):
    with pytest.raises(ConfigError) as exc:
        parse_checkpoints(text)
    assert culprit in str(exc.value)


def test_cache_from_env(tmp_path):
    assert cache_from_env({}) is None
    cache = cache_from_env({"LORASHARE_VLLM_CHECKPOINTS": "s=acme/s@v1", "LORASHARE_VLLM_CACHE": str(tmp_path),
                            "LORASHARE_VLLM_DTYPE": "bfloat16", "LORASHARE_VLLM_REFRESH": "5"})
    assert cache.root == str(tmp_path) and cache.dtype == "bfloat16" and cache.refresh == 5.0
    with pytest.raises(ConfigError, match="LORASHARE_VLLM_DTYPE"):
        cache_from_env({"LORASHARE_VLLM_CHECKPOINTS": "s=acme/s", "LORASHARE_VLLM_DTYPE": "int3"})
    with pytest.raises(ConfigError, match="LORASHARE_VLLM_REFRESH"):
        cache_from_env({"LORASHARE_VLLM_CHECKPOINTS": "s=acme/s", "LORASHARE_VLLM_REFRESH": "soon"})


def test_cache_splits_names():
    cache = AdapterCache(parse_checkpoints("support=acme/s"), "/nonexistent")
    assert cache.split("support/refunds")[1] == "refunds"
    assert cache.split("other/refunds") is None and cache.split("support") is None
    assert cache.folder_for("other/x") is None  # not ours: no request, no error


# ------------------------------------------------------------------------ the cache, Hub


def test_cold_adapter_downloads_bases_once_then_only_its_files(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    env.reset_log()
    one = cache.folder_for("support/task1")
    assert files_fetched(env) == {"share_config.json", BASES,
                                  "adapters/task1/loadings.safetensors", "adapters/task1/adapter_meta.json"}
    assert_equal_tensors(rebuilt(one), share.reconstruct("task1"))
    assert json.loads(Path(one, "adapter_config.json").read_text()) == share.adapter_configs["task1"]

    env.reset_log()
    two = cache.folder_for("support/task2")  # an adapter with a classifier head: its head file too
    assert files_fetched(env) == {"adapters/task2/loadings.safetensors", "adapters/task2/adapter_meta.json",
                                  "adapters/task2/classifier_head.safetensors"}
    assert_equal_tensors(rebuilt(two), share.reconstruct("task2"))

    env.reset_log()
    assert cache.folder_for("support/task1") == one  # warm: no request at all within the refresh time
    assert env.records == [] and (cache.built, cache.reused) == (2, 1)


def test_each_file_is_fetched_once_with_one_get(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    cache.folder_for("support/task1")
    env.reset_log()
    cache.folder_for("support/task3")
    gets = sorted(r.filename for r in env.records if r.kind == "resolve")
    assert gets == ["adapters/task3/adapter_meta.json", "adapters/task3/loadings.safetensors"]
    assert [r.method for r in env.records] == ["GET", "GET"]  # no HEAD, no listing: one request a file


def test_a_tampered_download_is_never_kept(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    env.inject(lambda method, path: ("corrupt",) if path.endswith("task3/loadings.safetensors") else None, times=1)
    with pytest.raises(IntegrityError, match="adapters/task3/loadings.safetensors"):
        cache.folder_for("support/task3")
    blobs = Path(cache.root, ".blobs")
    sha = cache._views["support"].config.files["adapters/task3/loadings.safetensors"]
    assert not (blobs / sha).exists() and not [p for p in blobs.iterdir() if ".tmp-" in p.name]
    assert_equal_tensors(rebuilt(cache.folder_for("support/task3")), share.reconstruct("task3"))  # the next try


def test_warm_folder_survives_a_restart_and_a_new_hub_cache(env, share, tmp_path, monkeypatch):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    root = str(tmp_path / "cache")
    first = AdapterCache(parse_checkpoints(f"support={CKPT}"), root).folder_for("support/task3")
    fresh_cache(monkeypatch, tmp_path / "hf2")
    env.reset_log()
    again = AdapterCache(parse_checkpoints(f"support={CKPT}"), root)  # a restarted server
    assert again.folder_for("support/task3") == first
    assert files_fetched(env) == set() and again.built == 0  # which commit main is, and nothing else


def test_unknown_adapter_is_none_and_bad_names_never_reach_the_hub(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    assert cache.folder_for("support/nope") is None
    env.reset_log()
    assert cache.folder_for("support/../../etc") is None and cache.folder_for("support/a/b") is None
    assert env.records == []
    assert [p.name for p in Path(cache.root).iterdir() if not p.name.startswith(".")] == []  # nothing rebuilt


def test_pinned_revision_and_new_revisions(env, share, adapter_dirs, tmp_path):
    info = share.push_to_hub(CKPT, token=HUB_TOKEN)
    pinned = AdapterCache(parse_checkpoints(f"old={CKPT}@{info.oid}"), str(tmp_path / "cache"))
    moving = AdapterCache(parse_checkpoints(f"new={CKPT}"), str(tmp_path / "cache"), refresh=0)
    old_task1 = pinned.folder_for("old/task1")

    grown = SHAREModel.from_pretrained(CKPT)
    assert grown.add_adapter(adapter_dirs[0], name="task0", variance_threshold=0.0)["method"] == "projection"
    grown.push_to_hub(CKPT, token=HUB_TOKEN)

    assert pinned.folder_for("old/task0") is None  # the pinned commit has no task0
    new0 = moving.folder_for("new/task0")  # the branch moved: new adapters resolve without a restart
    assert_equal_tensors(rebuilt(new0), grown.reconstruct("task0"))
    # task1's files and the bases are unchanged by a projection: the same content, the same folder.
    assert moving.folder_for("new/task1") == old_task1


def test_tampered_checkpoint_raises_and_others_still_resolve(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    rel = "adapters/task2/loadings.safetensors"
    blob = bytearray(env.snapshot(CKPT)[rel])
    blob[-1] ^= 0x01
    env.commit(CKPT, {rel: bytes(blob)}, message="tamper", lfs=True)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    with pytest.raises(IntegrityError, match=rel):
        cache.folder_for("support/task2")
    assert cache.folder_for("support/task1") is not None
    assert [p.name for p in Path(cache.root).iterdir() if p.name.startswith("task2")] == []


def test_resolver_logs_one_line_and_returns_none(env, share, tmp_path, caplog):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    resolver = SHAREResolver(AdapterCache(parse_checkpoints("gone=tester/deleted-repo"), str(tmp_path / "c")))
    with caplog.at_level(logging.ERROR, logger="lorashare"):
        assert resolver.folder("base", "gone/task1") is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "\n" not in lines[0] and "gone/task1" in lines[0] and "tester/deleted-repo" in lines[0]


def test_two_racing_requests_build_one_folder(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    caches = [AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache")) for _ in range(2)]
    got: List[str] = []
    start = threading.Barrier(4)

    def resolve(c: AdapterCache) -> None:
        start.wait()
        got.append(c.folder_for("support/task1"))

    threads = [threading.Thread(target=resolve, args=(c,)) for c in caches + caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 1
    assert sum(c.built for c in caches) == 1 and sum(c.reused for c in caches) == 3
    done = Path(got[0]).name
    leftovers = [p.name for p in Path(tmp_path / "cache").iterdir()
                 if p.name not in (".locks", ".blobs", ".hub", done, f"{done}.crc32.json")]
    assert leftovers == []
    assert_equal_tensors(rebuilt(got[0]), share.reconstruct("task1"))


# ---------------------------------------------------------------------- the cache, folder


def test_local_checkpoint_reads_bases_once_and_follows_a_resave(share, adapter_dirs, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    share.save_pretrained(ckpt)
    reads: List[tuple] = []
    real = load_checkpoint

    def counting(folder, **kw):
        reads.append((tuple(kw.get("adapters") or ()), kw.get("bases") is not None))
        return real(folder, **kw)

    monkeypatch.setattr("lorashare.serving.cache.load_checkpoint", counting)
    cache = AdapterCache(parse_checkpoints(f"local={ckpt}"), str(tmp_path / "cache"))
    for name in share.adapter_names:
        assert_equal_tensors(rebuilt(cache.folder_for(f"local/{name}")), share.reconstruct(name))
    assert reads == [((), False)] + [((n,), True) for n in share.adapter_names]  # the bases: read once

    grown = SHAREModel.from_pretrained(ckpt)
    grown.add_adapter(adapter_dirs[0], name="task0")
    grown.save_pretrained(ckpt, overwrite=True)
    assert_equal_tensors(rebuilt(cache.folder_for("local/task0")), grown.reconstruct("task0"))


def test_bases_of_another_config_are_refused(share, tmp_path):
    share.save_pretrained(tmp_path / "a")
    other = SHAREModel.from_pretrained(tmp_path / "a")
    other.remove_adapter("task3")
    other.save_pretrained(tmp_path / "b")
    bases = load_checkpoint(str(tmp_path / "a"), adapters=[])
    with pytest.raises(CheckpointError, match="not the config the bases were read with"):
        load_checkpoint(str(tmp_path / "b"), adapters=["task1"], bases=bases)


def test_a_torn_cached_folder_is_rebuilt_not_served(share, tmp_path):
    """Folders are written without fsync: after a crash, files that do not match the sidecar are rebuilt."""
    ckpt = tmp_path / "ckpt"
    share.save_pretrained(ckpt)
    root = str(tmp_path / "cache")
    folder = AdapterCache(parse_checkpoints(f"local={ckpt}"), root).folder_for("local/task1")
    weights = Path(folder, "adapter_model.safetensors")
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])  # what a crash before the data reached the disk can leave
    again = AdapterCache(parse_checkpoints(f"local={ckpt}"), root)
    assert again.folder_for("local/task1") == folder and again.built == 1
    assert weights.read_bytes() == good

    Path(folder + ".crc32.json").unlink()  # no sidecar: never known whole
    third = AdapterCache(parse_checkpoints(f"local={ckpt}"), root)
    assert third.folder_for("local/task1") == folder and third.built == 1
    assert_equal_tensors(rebuilt(folder), share.reconstruct("task1"))


def test_cold_adapters_resolved_at_once_download_the_bases_once(env, share, tmp_path):
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"))
    env.reset_log()
    start = threading.Barrier(3)

    def resolve(name: str) -> None:
        start.wait()
        cache.folder_for(f"support/{name}")

    threads = [threading.Thread(target=resolve, args=(n,)) for n in share.adapter_names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gets = [r.filename for r in env.records if r.method == "GET" and r.kind == "resolve"]
    assert gets.count(BASES) == 1, gets
    assert cache.built == 3


def test_a_silent_hub_keeps_the_revision_known_before(env, share, tmp_path, monkeypatch, caplog):
    import lorashare.hub

    monkeypatch.setenv("LORASHARE_HUB_TIMEOUT", "5")
    monkeypatch.setattr(lorashare.hub.client.time, "sleep", lambda seconds: None)  # retries without their back-off
    share.push_to_hub(CKPT, token=HUB_TOKEN)
    cache = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "cache"), refresh=0)
    first = cache.folder_for("support/task1")  # the bases and task1 are here now
    env.inject(lambda method, path: ("status", 503) if "/api/models/" in path else None)
    with caplog.at_level(logging.WARNING, logger="lorashare"):
        assert cache.folder_for("support/task1") == first
        assert_equal_tensors(rebuilt(cache.folder_for("support/task2")), share.reconstruct("task2"))
    assert any("staying at commit" in r.getMessage() for r in caplog.records)
    cold = AdapterCache(parse_checkpoints(f"support={CKPT}"), str(tmp_path / "other"))
    with pytest.raises(LoraShareError, match=CKPT):  # nothing known before: the error, named
        cold.folder_for("support/task1")


def test_export_never_replaces_a_foreign_folder_or_writes_into_the_checkpoint(share, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    share.save_pretrained(ckpt)
    out = tmp_path / "exp"
    (out / "task2").mkdir(parents=True)
    (out / "task2" / "notes.txt").write_text("mine")
    assert main(["export", str(ckpt), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(out / "task2") in err and "--overwrite" in err
    assert sorted(os.listdir(out)) == ["task2"] and (out / "task2" / "notes.txt").read_text() == "mine"

    assert main(["export", str(ckpt), "-o", str(ckpt / "adapters")]) == 1  # inside the checkpoint it reads
    assert str(ckpt) in capsys.readouterr().err
    assert sorted(os.listdir(ckpt / "adapters")) == share.adapter_names

    assert main(["export", str(ckpt), "-o", str(out), "--overwrite"]) == 0
    assert_equal_tensors(rebuilt(str(out / "task2")), share.reconstruct("task2"))
