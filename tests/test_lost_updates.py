"""Edits of a checkpoint folder are serialised: a lost update is impossible, or the loser fails and writes nothing.

Two ``lorashare add`` at once both land (they wait for each other); a library save over a checkpoint that changed
since it was loaded raises :class:`~lorashare.errors.ConflictError`; the lock itself is re-entrant, shared by threads
and processes, and bounded in time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lorashare import SHAREModel
from lorashare.errors import ConflictError
from lorashare.format.lock import folder_lock

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpt(tmp_path: Path, adapter_dirs) -> Path:
    out = tmp_path / "ckpt"
    SHAREModel.from_adapters(adapter_dirs[:2], num_components=32, progress=False).save_pretrained(out)
    return out


def names(folder: Path) -> list:
    return json.loads((folder / "share_config.json").read_text())["adapter_names"]


@pytest.mark.parametrize("trial", range(3))
def test_two_cli_adds_at_once_both_land(ckpt, adapter_dirs, trial):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORASHARE_LOCK_TIMEOUT": "300"}
    runs = [subprocess.Popen([sys.executable, "-m", "lorashare", "add", str(ckpt), adapter_dirs[2 + i], "--name",
                              f"new{i}", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(2)]
    outs = [r.communicate(timeout=600) for r in runs]
    for r, (out, err) in zip(runs, outs):
        assert r.returncode == 0, err
        assert json.loads(out)["method"] in ("projection", "recompute")
    assert sorted(names(ckpt)) == ["new0", "new1", "task0", "task1"]
    whole = SHAREModel.from_pretrained(ckpt)
    assert set(whole.adapter_names) == {"new0", "new1", "task0", "task1"}


def test_library_save_over_a_checkpoint_changed_since_loading_refuses(ckpt, adapter_dirs):
    first = SHAREModel.from_pretrained(ckpt)
    second = SHAREModel.from_pretrained(ckpt)
    first.add_adapter(adapter_dirs[2], name="by_first")
    first.save_pretrained(ckpt)
    first.set_card(description="saved twice by the same model")  # its own save is not a conflict
    first.save_pretrained(ckpt)
    before = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    second.add_adapter(adapter_dirs[3], name="by_second")
    with pytest.raises(ConflictError, match="changed since this model was loaded") as err:
        second.save_pretrained(ckpt)
    assert "load the checkpoint again and redo the edit" in str(err.value)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == before
    assert names(ckpt) == ["task0", "task1", "by_first"]
    # Saved elsewhere it is a plain save; loaded again, the edit can be redone.
    second.save_pretrained(ckpt.parent / "elsewhere")
    third = SHAREModel.from_pretrained(ckpt)
    third.add_adapter(adapter_dirs[3], name="by_second")
    third.save_pretrained(ckpt)
    assert names(ckpt) == ["task0", "task1", "by_first", "by_second"]


def test_a_full_model_whose_folder_was_deleted_may_save_it_again(ckpt):
    share = SHAREModel.from_pretrained(ckpt)
    shutil.rmtree(ckpt)
    share.save_pretrained(ckpt)
    assert names(ckpt) == ["task0", "task1"]


def test_the_lock_is_reentrant_and_threads_take_turns(tmp_path):
    target = tmp_path / "ckpt"
    order = []
    with folder_lock(target):
        with folder_lock(target):  # the CLI holds it, and the save inside takes it again
            order.append("outer")

        def other() -> None:
            with folder_lock(target):
                order.append("thread")

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        order.append("still mine")
    t.join(10)
    assert order == ["outer", "still mine", "thread"]


def test_a_lock_held_by_another_process_times_out_with_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom lorashare.format.lock import folder_lock\n"
         f"with folder_lock({str(target)!r}):\n    print('held', flush=True)\n    time.sleep(30)\n"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setenv("LORASHARE_LOCK_TIMEOUT", "0.5")
        with pytest.raises(ConflictError, match="being edited by another lorashare process") as err:
            with folder_lock(target):
                pass
        assert "LORASHARE_LOCK_TIMEOUT" in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(target, timeout=5):  # the kernel released it with the process
        pass
