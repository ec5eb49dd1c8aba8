"""First-run stumbles of the command line (the "newcomer's path"): each test shows the message or
behaviour a new user now gets.

* a typo in a folder path is a missing folder, named with what is beside it, and never a Hub request;
* a shell pattern that matched nothing, and a folder *of* adapters, say so instead of "got 1 adapter";
* with ``--target-ratio`` / ``--budget-bytes`` the ratio printed is the one the budget counts (on disk);
* ``--help`` (and the Space) describe int8/nf4 storage as it is: one float32 scale per block;
* advice is printed once, and a ``-k`` above the lossless k is said, not silently cut;
* the flags' errors name the flags, not the Python keywords.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from lorashare import SHAREModel, hub
from lorashare.cli import main
from lorashare.errors import AdapterNotFoundError, ConfigError
from lorashare.format.storage import NF4_BLOCK
from lorashare.peft.adapters import is_local_source
from lorashare.sync.manifest import parse_manifest
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "adapters"
TASKS = [f"examples/adapters/task{i}" for i in range(4)]


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding a copy of the bundled examples at examples/adapters/task0..3, as the cwd."""
    shutil.copytree(EXAMPLES, tmp_path / "examples" / "adapters")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def test_hub(here: Path, hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.reset_log()
    return hub


def _error_line(err: str, verb: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith(f"lorashare {verb}: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _cli(*args: str, cwd: Path, extra_env: dict = None) -> subprocess.CompletedProcess:
    """``lorashare ARGS`` as a real process (stderr a pipe, not a terminal), through bash so that globs expand."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(extra_env or {}))
    command = " ".join([f"{sys.executable} -m lorashare", *args])
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


# --------------------------------------------------------------------------- 1. a typo in a path
@pytest.mark.parametrize("typo", ["examples/adapters/task9", "./examples/adapters/task9"])
def test_a_typo_in_a_folder_path_names_the_missing_folder_and_asks_no_hub(test_hub, here, capsys, typo):
    rc = main(["compress", "examples/adapters/task0", typo, "-o", "X"])
    line = _error_line(capsys.readouterr().err, "compress")
    assert rc == 1
    assert f"{typo} does not exist (examples/adapters has task0, task1, task2, task3)." in line
    assert "Hub" not in line and "@main" not in line
    assert test_hub.requests == []
    assert not (here / "X").exists()


def test_add_with_a_typo_names_the_missing_folder_and_asks_no_hub(test_hub, here, capsys):
    assert main(["compress", *TASKS[:2], "-o", "ck", "-k", "4", "-q"]) == 0
    capsys.readouterr()
    assert main(["add", "ck", "examples/adapters/tsk2"]) == 1
    line = _error_line(capsys.readouterr().err, "add")
    assert "examples/adapters/tsk2 does not exist (examples/adapters has task0, task1, task2, task3; " \
           "did you mean examples/adapters/task2?)" in line
    assert test_hub.requests == []


def test_a_typo_works_with_the_hub_unreachable_and_offline_mode_unset(here, hf_cache, monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: a request would fail
    assert main(["compress", "examples/adapters/task0", "examples/adapters/task9", "-o", "X"]) == 1
    line = _error_line(capsys.readouterr().err, "compress")
    assert "examples/adapters/task9 does not exist (examples/adapters has task0, task1, task2, task3)." in line
    assert "reach the Hub" not in line
    # a checkpoint path with a typo is a missing folder too, not a Hub repo
    assert main(["info", "examples/ck"]) == 1
    line = _error_line(capsys.readouterr().err, "info")
    assert "no SHARE checkpoint at examples/ck: the folder does not exist" in line and "reach the Hub" not in line


def test_the_path_rule_holds_in_the_manifest_too(here):
    text = "repo_id: acme/share\nadapters:\n  a: examples/adapters/task0\n  b: examples/adapters/task9\n"
    with pytest.raises(ConfigError) as err:
        parse_manifest(text, path=str(here / "lorashare.yaml"))
    assert "examples/adapters/task9" in str(err.value) and "not a Hub id" not in str(err.value)
    assert "task0" in str(err.value)  # what is there instead
    hub_source = parse_manifest("repo_id: acme/share\nadapters:\n  a: examples/adapters/task0\n  b: acme/x-lora@v3\n",
                                path=str(here / "lorashare.yaml")).adapters["b"]
    assert hub_source.kind == "hub"


def test_the_path_rule(here):
    # leading folders that exist make a path; an owner/name with no such folder stays a Hub id
    assert hub.is_local_path("examples/adapters/task9") and not hub.is_local_path("acme/refunds-lora@v3")
    assert hub.is_local_path("examples/nope") and hub.is_local_path("a/b/../c") and hub.is_local_path("./x/y")
    assert not hub.is_local_path("acme/multi-lora/legal") and not hub.is_local_path("examples@v1/x")
    assert hub.is_local_path("examples/adapter/*")  # a pattern the shell left alone: never a Hub id
    assert not hub.is_local_path("examples/adapters/task9", base=str(here / "examples"))
    assert is_local_source("task9") and not is_local_source("acme/refunds-lora@v3")  # a Hub id has an owner


# --------------------------------------------------------------------------- 2. a pattern, a folder of adapters
def test_a_pattern_that_matched_nothing_says_so_in_a_real_shell(here):
    r = _cli("compress", "examples/adapter/*", "-o", "X", cwd=here)  # bash passes the unmatched pattern as it is
    line = _error_line(r.stderr, "compress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert ("the wildcard pattern examples/adapter/* matches nothing (examples has no adapter; it has adapters; "
            "did you mean examples/adapters/*?)") in line
    assert "matched nothing" in line and "at least 2" not in line and "glob.glob" not in line


def test_a_folder_of_adapters_lists_them_and_says_how_to_pass_them(here, capsys):
    assert main(["compress", "examples/adapters", "-o", "X"]) == 1
    line = _error_line(capsys.readouterr().err, "compress")
    assert "examples/adapters is a folder of 4 adapters (task0, task1, task2, task3), not an adapter" in line
    assert "Pass them all with examples/adapters/*" in line and "at least 2" not in line
    assert main(["compress", *TASKS[:2], "-o", "ck", "-k", "4", "-q"]) == 0
    capsys.readouterr()
    assert main(["add", "ck", "examples/adapters"]) == 1
    line = _error_line(capsys.readouterr().err, "add")
    assert "is a folder of 4 adapters" in line and "lorashare add ck examples/adapters/NAME" in line


def test_a_quoted_pattern_says_to_drop_the_quotes(here, capsys):
    assert main(["compress", "examples/adapters/*", "-o", "X"]) == 1  # what the shell passes for '…/*'
    line = _error_line(capsys.readouterr().err, "compress")
    assert "examples/adapters/* is a wildcard pattern, which lorashare does not expand (it matches task0, task1, " \
           "task2, task3)" in line
    assert "write it without quotes" in line and "glob.glob" not in line


def test_the_library_says_the_same_with_python_fixes(here):
    with pytest.raises(AdapterNotFoundError) as err:
        SHAREModel.from_adapters(["examples/adapters", "examples/adapters/task0"], progress=False)
    assert "folder of 4 adapters (task0, task1, task2, task3)" in str(err.value)
    assert "'examples/adapters/task0'" in str(err.value) and "--" not in str(err.value)
    with pytest.raises(AdapterNotFoundError) as err:
        SHAREModel.from_adapters(["examples/adapters/*", "examples/adapters/task0"], progress=False)
    assert "sorted(glob.glob('examples/adapters/*'))" in str(err.value)
    with pytest.raises(AdapterNotFoundError) as err:
        SHAREModel.from_adapters(["examples/adapters/task0/adapter_model.safetensors", TASKS[1]], progress=False)
    assert "is a file of the adapter; give its folder, examples/adapters/task0" in str(err.value)


# --------------------------------------------------------------------------- 3. the ratio the budget counts
def _disk_bytes(ckpt: Path) -> int:
    return (ckpt / "shared_components.safetensors").stat().st_size + sum(
        p.stat().st_size for p in (ckpt / "adapters").glob("*/loadings.safetensors"))


@pytest.mark.parametrize("target, dtype", [(2, "float32"), (4, "nf4")])
def test_a_target_ratio_is_reported_on_disk_as_the_budget_counts_it(here, capsys, target, dtype):
    assert main(["compress", *TASKS, "-o", "ck", "--target-ratio", str(target), "--dtype", dtype, "-q"]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((here / "ck" / "share_config.json").read_text())
    st = cfg["compression_stats"]
    on_disk = st["original_lora_bytes"] / _disk_bytes(here / "ck")
    m = re.search(r": ([0-9.]+)x on disk \(target ([0-9.]+)x", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(on_disk, abs=0.006) and m.group(2) == str(target)
    assert target <= on_disk <= 1.05 * target
    tensor_ratio = f"{st['compression_ratio']:.2f}x"
    assert abs(st["compression_ratio"] - on_disk) > 0.05 and tensor_ratio not in out  # never the tensor bytes
    assert main(["compress", *TASKS, "-o", "ck", "--target-ratio", str(target), "--dtype", dtype, "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["stats"]["compression_ratio_on_disk"] == pytest.approx(on_disk)
    assert body["stats"]["compressed_bytes_on_disk"] == _disk_bytes(here / "ck")
    assert body["target_ratio"] == target and body["budget_bytes"] == int(st["original_lora_bytes"] / target)


def test_a_byte_budget_is_reported_in_the_bytes_it_counts(here, capsys):
    assert main(["compress", *TASKS, "-o", "ck", "--budget-bytes", "5000", "--dtype", "int8", "-q"]) == 0
    out = capsys.readouterr().out
    disk = _disk_bytes(here / "ck")
    assert disk <= 5000 and f": {disk} bytes on disk (budget 5000;" in out


# --------------------------------------------------------------------------- 5. what int8 and nf4 store
def test_the_help_says_one_float32_scale_per_block(capsys):
    assert main(["compress", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"one float32 scale per block of {NF4_BLOCK} values" in text
    assert "per component)" not in text


def test_the_space_storage_hint_says_one_float32_scale_per_block():
    tree = ast.parse((ROOT / "space" / "app.py").read_text(encoding="utf-8"))
    hints: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and any(k.arg == "elem_id" and getattr(k.value, "value", None) == "storage"
                                              for k in node.keywords):
            info = next(k.value for k in node.keywords if k.arg == "info")
            hints.append(eval(compile(ast.Expression(info), "app.py", "eval"), {"NF4_BLOCK": NF4_BLOCK}))
    assert len(hints) == 1
    assert f"one float32 scale per block of {NF4_BLOCK} values" in hints[0] and "per component" not in hints[0]


# --------------------------------------------------------------------------- 8. advice once; k above lossless
def test_k_16_prints_its_advice_once_in_a_real_process(here):
    r = _cli("compress", *TASKS, "-o", "X", "-k", "16", "-q", cwd=here)
    assert r.returncode == 0, r.stderr
    advice = [line for line in r.stderr.splitlines() if "cost more than they save" in line]
    assert len(advice) == 1 and advice[0].startswith("lorashare compress: note:") and "-k 10 or lower" in advice[0]
    assert "num_components" not in r.stderr  # the Python keyword has no place on the command line


def test_k_above_lossless_is_said_once_even_with_verbose_logs(here):
    r = _cli("compress", *TASKS, "-o", "X", "-k", "1000", "-v", "-q", cwd=here)
    assert r.returncode == 0, r.stderr
    capped = [line for line in r.stderr.splitlines() if "need to be lossless" in line]
    assert capped == ["lorashare compress: note: -k 1000 is more than the 16 components these adapters need to be "
                      "lossless (k = N·r, their ranks summed); using k=16."]
    assert len([line for line in r.stderr.splitlines() if "cost more than they save" in line]) == 1
    assert "num_components" not in r.stderr
    cfg = json.loads((here / "X" / "share_config.json").read_text())
    assert set(cfg["k_per_group"].values()) == {16}


def test_the_library_logs_a_capped_k_once(here, caplog):
    with caplog.at_level(logging.INFO, logger="lorashare"):
        share = SHAREModel.from_adapters(TASKS, num_components=1000, progress=False)
    notes = [r.getMessage() for r in caplog.records if "need to be lossless" in r.getMessage()]
    assert notes == ["num_components=1000 is more than the 16 components these adapters need to be lossless "
                     "(k = N·r, their ranks summed); using k=16."]
    assert set(share.config.k_per_group.values()) == {16}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lorashare"):
        SHAREModel.from_adapters(TASKS, num_components=8, progress=False)
    assert not [r for r in caplog.records if "need to be lossless" in r.getMessage()]


def test_the_default_k_says_nothing_about_lossless_on_the_command_line(here, capsys):
    assert main(["compress", *TASKS, "-o", "X", "-q"]) == 0  # k=32 by default, cut to 16: not asked for
    assert "need to be lossless" not in capsys.readouterr().err


# --------------------------------------------------------------------------- 9. the flags' own errors
@pytest.mark.parametrize("flags, want", [
    (["--target-ratio", "0"], "lorashare compress: error: --target-ratio 0: expected a number > 0"),
    (["--variance", "2", "--auto"], "lorashare compress: error: --variance 2: expected a number in (0, 1]"),
    (["--device", "gpu"], "lorashare compress: error: --device gpu: expected 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"),
    (["--budget-bytes", "0"], "lorashare compress: error: --budget-bytes 0: expected a positive integer"),
    (["--target-ratio", "4", "--budget-bytes", "5000"], "argument --budget-bytes: not allowed with argument --target-ratio"),
], ids=["ratio", "variance", "device", "budget", "both"])
def test_bad_flags_are_named_as_flags(here, capsys, flags, want):
    assert main(["compress", *TASKS[:2], "-o", "X", *flags]) == 2
    err = capsys.readouterr().err
    assert want in err
    assert not re.search(r"\b(target_ratio|variance_threshold|budget_bytes|device)=", err)
    assert not (here / "X").exists()


def test_a_bad_add_variance_is_named_as_the_flag(here, capsys):
    assert main(["compress", *TASKS[:2], "-o", "ck", "-k", "4", "-q"]) == 0
    capsys.readouterr()
    assert main(["add", "ck", TASKS[2], "--variance", "2"]) == 2
    assert _error_line(capsys.readouterr().err, "add").startswith("lorashare add: error: --variance 2: expected")
