"""A view knows it is partial: a model loaded with ``adapters=[...]`` saved or pushed back to its own checkpoint
keeps the adapters it did not load; Hub ids are edited on the Hub; rebuilds never replace their own sources.

Each test names the case of the trust review it closes; they failed on lorashare of 2026-12-03.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Dict

import pytest

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import (
    ConfigError,
    ConflictError,
    DuplicateAdapterError,
    HubError,
    OutputPathError,
    UnknownAdapterError,
)
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer

CKPT = "tester/partial-share"


def files_of(folder: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter_files(files: Dict[str, str], name: str) -> Dict[str, str]:
    return {k: v for k, v in files.items() if k.startswith(f"adapters/{name}/")}


@pytest.fixture
def ckpt(tmp_path: Path, adapter_dirs) -> Path:
    """A lossless checkpoint of the four test adapters (task0..task3)."""
    out = tmp_path / "ckpt"
    SHAREModel.from_adapters(adapter_dirs, num_components=32, progress=False).save_pretrained(out)
    return out


# ------------------------------------------------------------------ case 1: a partial view saved back
def test_partial_view_card_edit_saved_in_place_keeps_the_other_adapters_bit_for_bit(ckpt):
    before = files_of(ckpt)
    view = SHAREModel.from_pretrained(ckpt, adapters=["task0"])
    assert view.adapter_names == ["task0"] and view.state.unseen == ("task1", "task2", "task3")
    view.set_card(description="Billing only, edited from a partial view")
    view.save_pretrained(ckpt)

    after = files_of(ckpt)
    whole = SHAREModel.from_pretrained(ckpt)
    assert whole.adapter_names == ["task0", "task1", "task2", "task3"]
    for name in ("task0", "task1", "task2", "task3"):
        assert adapter_files(after, name) == adapter_files(before, name), name
    assert after["shared_components.safetensors"] == before["shared_components.safetensors"]
    assert "Billing only, edited from a partial view" in (ckpt / "README.md").read_text()
    # The view stays a view, and a second save from it works (it knows the checkpoint it wrote).
    assert view.adapter_names == ["task0"]
    view.set_card(description="second edit")
    view.save_pretrained(ckpt)
    assert SHAREModel.from_pretrained(ckpt).adapter_names == ["task0", "task1", "task2", "task3"]


def test_partial_view_add_and_remove_saved_in_place(ckpt, adapter_dirs):
    before = files_of(ckpt)
    view = SHAREModel.from_pretrained(ckpt, adapters=["task0", "task1"])
    report = view.add_adapter(adapter_dirs[2], name="copy_of_task2")
    assert report["method"] == "projection"
    view.remove_adapter("task0")
    view.save_pretrained(ckpt)

    whole = SHAREModel.from_pretrained(ckpt)
    assert whole.adapter_names == ["task1", "task2", "task3", "copy_of_task2"]
    after = files_of(ckpt)
    for name in ("task1", "task2", "task3"):
        assert adapter_files(after, name) == adapter_files(before, name), name
    assert not adapter_files(after, "task0")
    cfg = json.loads((ckpt / "share_config.json").read_text())
    assert set(cfg["adapters"]) == {"task1", "task2", "task3", "copy_of_task2"}


def test_partial_view_refuses_to_refit_the_bases_and_to_shadow_an_unseen_adapter(ckpt, adapter_dirs):
    before = files_of(ckpt)
    view = SHAREModel.from_pretrained(ckpt, adapters=["task0", "task1"])
    with pytest.raises(ConfigError, match=r"only \['task0', 'task1'\] of the 4 adapters.*task2, task3"):
        view.add_adapter(adapter_dirs[3], name="fresh", force_recompute=True)
    with pytest.raises(DuplicateAdapterError, match="'task2' already exists in .*loaded without it"):
        view.add_adapter(adapter_dirs[2], name="task2")
    with pytest.raises(UnknownAdapterError, match="'task3' is in .* but was not loaded"):
        view.reconstruct("task3")
    assert view.adapter_names == ["task0", "task1"]
    assert files_of(ckpt) == before


def test_partial_view_saved_elsewhere_holds_just_the_view(ckpt, tmp_path):
    view = SHAREModel.from_pretrained(ckpt, adapters=["task2"])
    view.save_pretrained(tmp_path / "only-task2")
    assert SHAREModel.from_pretrained(tmp_path / "only-task2").adapter_names == ["task2"]
    assert SHAREModel.from_pretrained(ckpt).adapter_names == ["task0", "task1", "task2", "task3"]


def test_partial_view_of_a_checkpoint_changed_on_disk_is_not_written(ckpt, adapter_dirs):
    view = SHAREModel.from_pretrained(ckpt, adapters=["task0"])
    other = SHAREModel.from_pretrained(ckpt)
    other.remove_adapter("task3")
    other.save_pretrained(ckpt)
    before = files_of(ckpt)
    view.set_card(description="stale")
    with pytest.raises(ConflictError, match="changed since this model was loaded"):
        view.save_pretrained(ckpt)
    assert files_of(ckpt) == before


# ------------------------------------------------------------------ case 1 on the Hub, and case 4
@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def remote_adapters(hub: HubServer) -> list:
    return json.loads(hub.snapshot(CKPT)["share_config.json"])["adapter_names"]


def test_partial_view_pushed_back_to_its_repo_keeps_the_other_adapters(env, ckpt):
    SHAREModel.from_pretrained(ckpt).push_to_hub(CKPT, token=HUB_TOKEN)
    before = env.snapshot(CKPT)
    view = SHAREModel.from_pretrained(CKPT, adapters=["task1"])
    assert view.state.unseen == ("task0", "task2", "task3")
    view.set_card(description="edited on the Hub from a one-adapter view")
    info = view.push_to_hub(CKPT, token=HUB_TOKEN)

    after = env.snapshot(CKPT)
    assert env.resolve(CKPT) == info.oid
    assert remote_adapters(env) == ["task0", "task1", "task2", "task3"]
    for path, blob in before.items():
        if path.startswith("adapters/") or path == "shared_components.safetensors":
            assert after.get(path) == blob, path
    assert "edited on the Hub from a one-adapter view" in after["README.md"].decode()
    # A second push from the same view builds on the commit it made.
    view.set_card(description="again")
    view.push_to_hub(CKPT, token=HUB_TOKEN)
    assert remote_adapters(env) == ["task0", "task1", "task2", "task3"]


def test_push_back_after_someone_else_pushed_is_refused(env, ckpt):
    SHAREModel.from_pretrained(ckpt).push_to_hub(CKPT, token=HUB_TOKEN)
    mine = SHAREModel.from_pretrained(CKPT)
    theirs = SHAREModel.from_pretrained(CKPT)
    theirs.remove_adapter("task3")
    theirs.push_to_hub(CKPT, token=HUB_TOKEN)
    head = env.resolve(CKPT)
    mine.set_card(description="mine")
    with pytest.raises(HubError, match="nothing was pushed") as err:
        mine.push_to_hub(CKPT, token=HUB_TOKEN)
    assert isinstance(err.value, ConflictError)
    assert env.resolve(CKPT) == head and remote_adapters(env) == ["task0", "task1", "task2"]


def test_cli_remove_and_add_edit_the_hub_repo_and_write_no_local_folder(env, ckpt, adapter_dirs, tmp_path,
                                                                       monkeypatch, capsys):
    SHAREModel.from_pretrained(ckpt).push_to_hub(CKPT, token=HUB_TOKEN)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    commits = len(env.history(CKPT))
    assert main(["remove", CKPT, "task3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == "task3" and out["commit_url"].startswith(env.url)
    assert remote_adapters(env) == ["task0", "task1", "task2"] and len(env.history(CKPT)) == commits + 1
    assert env.repo(CKPT).commits[env.resolve(CKPT)].title == "lorashare remove: task3"

    assert main(["add", CKPT, adapter_dirs[3], "--name", "back"]) == 0
    assert "added back by projection" in capsys.readouterr().out
    assert remote_adapters(env) == ["task0", "task1", "task2", "back"]
    assert list(work.iterdir()) == []  # never a ./tester/partial-share folder that would shadow the repo id

    assert main(["remove", f"{CKPT}@main", "task0"]) == 2
    assert "give the repo id alone" in capsys.readouterr().err
    assert remote_adapters(env) == ["task0", "task1", "task2", "back"]


# ------------------------------------------------------------------ case 5: rebuilds never replace their sources
def test_reconstruct_all_never_replaces_the_checkpoints_own_sources(ckpt, tmp_path, capsys):
    rebuilt = tmp_path / "rebuilt"
    assert main(["reconstruct", str(ckpt), "--all", "-o", str(rebuilt)]) == 0
    second = tmp_path / "second"
    sources = [str(rebuilt / f"task{i}") for i in range(4)]
    SHAREModel.from_adapters(sources, num_components=2, progress=False).save_pretrained(second)  # lossy
    originals = files_of(rebuilt)
    capsys.readouterr()

    rc = main(["reconstruct", str(second), "--all", "-o", str(rebuilt)])
    err = capsys.readouterr().err
    assert rc != 0 and "is the source adapter 'task0' was compressed from" in err and "--overwrite" in err
    assert files_of(rebuilt) == originals
    share = SHAREModel.from_pretrained(second)
    with pytest.raises(OutputPathError, match="lossy copy"):
        share.reconstruct("task1", output_dir=rebuilt / "task1")
    with pytest.raises(OutputPathError):  # the folder holding them: not a rebuilt adapter
        share.reconstruct("task1", output_dir=rebuilt)
    assert files_of(rebuilt) == originals

    # Asked for in so many words, it is done.
    assert main(["reconstruct", str(second), "--all", "-o", str(rebuilt), "--overwrite"]) == 0
    assert files_of(rebuilt) != originals
    shutil.rmtree(rebuilt)
    assert not os.path.exists(rebuilt)
