"""The lorashare command, end to end (in process and as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from lorashare import SHAREModel
from lorashare.cli import main
from tests.conftest import load_state


def test_cli_roundtrip(adapter_dirs, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main(["compress", *adapter_dirs, "-o", str(ck), "-k", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lorashare"] == 1 and out["command"] == "compress"
    assert out["adapters"] == [os.path.basename(d) for d in adapter_dirs]
    assert out["stats"]["delta_w_rel_error_max"] < 1e-5

    assert main(["info", str(ck), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["adapters"]) == set(out["adapters"]) and info["format_version"] == 1

    assert main(["info", str(ck)]) == 0
    assert "compression ratio" in capsys.readouterr().out

    assert main(["reconstruct", str(ck), "--all", "-o", str(tmp_path / "rec"), "-q"]) == 0
    for d in adapter_dirs:
        name = os.path.basename(d)
        orig, rec = load_state(d), load_state(str(tmp_path / "rec" / name))
        assert orig.keys() == rec.keys()
        for k in orig:
            assert torch.allclose(orig[k], rec[k], atol=1e-5)
        assert json.load(open(tmp_path / "rec" / name / "adapter_config.json"))["peft_type"] == "LORA"

    assert main(["reconstruct", str(ck), "--adapter", "task1", "-o", str(tmp_path / "one")]) == 0
    assert (tmp_path / "one" / "adapter_model.safetensors").exists()

    assert main(["remove", str(ck), "task3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["adapters"] == ["task0", "task1", "task2"]
    assert main(["add", str(ck), adapter_dirs[3], "--name", "again", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["method"] in ("projection", "recompute") and rep["adapter_name"] == "again"
    assert SHAREModel.from_pretrained(ck).adapter_names[-1] == "again"


def test_cli_named_and_auto(adapter_dirs, tmp_path, capsys):
    ck = tmp_path / "named"
    args = ["compress", "--name", f"alpha={adapter_dirs[0]}", "--name", f"beta={adapter_dirs[1]}",
            "-o", str(ck), "--auto", "--variance", "0.9", "--dtype", "float16", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["adapters"] == ["alpha", "beta"]
    cfg = json.load(open(ck / "share_config.json"))
    assert cfg["component_selection"] == "auto" and cfg["dtype"] == "float16"


def test_cli_subprocess_help_and_exit_codes(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    for verb in ("compress", "info", "reconstruct", "export", "add", "remove", "push"):
        r = subprocess.run([sys.executable, "-m", "lorashare", verb, "--help"], capture_output=True, text=True, env=env)
        assert r.returncode == 0 and "usage: lorashare" in r.stdout, verb
    r = subprocess.run([sys.executable, "-m", "lorashare", "info", str(tmp_path / "missing")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "not a folder" in r.stderr or "not" in r.stderr
    assert "Traceback" not in r.stderr
