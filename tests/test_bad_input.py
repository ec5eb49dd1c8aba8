"""Bad input fails before anything is written, naming the culprit."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import (
    AdapterError,
    AdapterNotFoundError,
    ConfigError,
    IncompatibleAdaptersError,
    InvalidNameError,
    LoraShareError,
    UnknownAdapterError,
)
from tests.conftest import make_adapter


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(folder, **changes):
    p = os.path.join(folder, "adapter_config.json")
    cfg = json.load(open(p))
    cfg.update(changes)
    json.dump(cfg, open(p, "w"))


def test_fewer_than_two(adapter_dirs):
    with pytest.raises(AdapterError, match="at least 2 adapters"):
        SHAREModel.from_adapters(adapter_dirs[:1], progress=False)


def test_different_base_models(adapter_dirs, tmp_path):
    other = _copy(adapter_dirs[1], tmp_path / "other")
    _edit_config(other, base_model_name_or_path="meta-llama/Llama-2-7b-hf")
    with pytest.raises(IncompatibleAdaptersError, match="other.*Llama-2-7b-hf") as ei:
        SHAREModel.from_adapters([adapter_dirs[0], other], progress=False)
    assert ei.value.adapter == "other"


def test_mismatched_shapes_name_the_layer(adapter_dirs, tmp_path):
    bad = _copy(adapter_dirs[1], tmp_path / "shapes")
    p = os.path.join(bad, "adapter_model.safetensors")
    sd = load_file(p)
    k = next(k for k in sd if k.endswith("layer.1.attention.self.value.lora_A.weight"))
    sd[k] = torch.randn(sd[k].shape[0], 48)
    save_file(sd, p)
    with pytest.raises(IncompatibleAdaptersError, match=r"layer\.1\.attention\.self\.value maps 48") as ei:
        SHAREModel.from_adapters([adapter_dirs[0], bad], progress=False)
    assert ei.value.layer.endswith("layer.1.attention.self.value")


def test_strict_refuses_mixed_ranks_and_modules(adapter_dirs, tmp_path):
    r8 = make_adapter(str(tmp_path / "r8"), seed=5, r=8)
    with pytest.raises(IncompatibleAdaptersError, match="rank 8.*rank 4|rank 4.*rank 8"):
        SHAREModel.from_adapters([adapter_dirs[1], r8], strict=True, progress=False)
    q = make_adapter(str(tmp_path / "q"), seed=6, target_modules=("query",))
    with pytest.raises(IncompatibleAdaptersError, match="other modules"):
        SHAREModel.from_adapters([adapter_dirs[1], q], strict=True, progress=False)


def test_non_lora_peft_type(adapter_dirs, tmp_path):
    ia3 = _copy(adapter_dirs[1], tmp_path / "ia3")
    _edit_config(ia3, peft_type="IA3")
    with pytest.raises(AdapterError, match="'ia3'.*peft_type is 'IA3'.*expected 'LORA'"):
        SHAREModel.from_adapters([adapter_dirs[0], ia3], progress=False)
    dora = _copy(adapter_dirs[1], tmp_path / "dora")
    _edit_config(dora, use_dora=True)
    with pytest.raises(AdapterError, match="use_dora"):
        SHAREModel.from_adapters([adapter_dirs[0], dora], progress=False)


def test_missing_files(adapter_dirs, tmp_path):
    no_cfg = _copy(adapter_dirs[1], tmp_path / "nocfg")
    os.remove(os.path.join(no_cfg, "adapter_config.json"))
    with pytest.raises(AdapterNotFoundError, match="no adapter_config.json in .*nocfg"):
        SHAREModel.from_adapters([adapter_dirs[0], no_cfg], progress=False)
    no_w = _copy(adapter_dirs[1], tmp_path / "noweights")
    os.remove(os.path.join(no_w, "adapter_model.safetensors"))
    with pytest.raises(AdapterNotFoundError, match="no adapter_model.safetensors"):
        SHAREModel.from_adapters([adapter_dirs[0], no_w], progress=False)
    with pytest.raises(AdapterNotFoundError, match=r"nowhere does not exist \(.* has nocfg, noweights\)"):
        SHAREModel.from_adapters([adapter_dirs[0], str(tmp_path / "nowhere")], progress=False)


def test_pickle_only_is_never_loaded(adapter_dirs, tmp_path):
    pk = _copy(adapter_dirs[1], tmp_path / "pickled")
    os.rename(os.path.join(pk, "adapter_model.safetensors"), os.path.join(pk, "adapter_model.bin"))
    with pytest.raises(AdapterNotFoundError, match="pickle.*never loads"):
        SHAREModel.from_adapters([adapter_dirs[0], pk], progress=False)


def test_corrupt_files(adapter_dirs, tmp_path):
    cfg = _copy(adapter_dirs[1], tmp_path / "badjson")
    open(os.path.join(cfg, "adapter_config.json"), "w").write("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        SHAREModel.from_adapters([adapter_dirs[0], cfg], progress=False)
    trunc = _copy(adapter_dirs[1], tmp_path / "truncated")
    p = os.path.join(trunc, "adapter_model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 100])
    with pytest.raises(AdapterError, match="truncated") as ei:
        SHAREModel.from_adapters([adapter_dirs[0], trunc], progress=False)
    assert ei.value.adapter == "truncated"
    garbage = _copy(adapter_dirs[1], tmp_path / "garbage")
    open(os.path.join(garbage, "adapter_model.safetensors"), "wb").write(os.urandom(64))
    with pytest.raises(AdapterError, match="not a valid safetensors file"):
        SHAREModel.from_adapters([adapter_dirs[0], garbage], progress=False)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_weights(adapter_dirs, tmp_path, value):
    bad = _copy(adapter_dirs[1], tmp_path / "nan")
    p = os.path.join(bad, "adapter_model.safetensors")
    sd = load_file(p)
    k = next(k for k in sd if k.endswith("layer.0.attention.self.query.lora_B.weight"))
    sd[k][0, 0] = value
    save_file(sd, p)
    with pytest.raises(AdapterError, match="NaN/Inf") as ei:
        SHAREModel.from_adapters([adapter_dirs[0], adapter_dirs[2], bad], progress=False)
    assert ei.value.adapter == "nan" and ei.value.layer.endswith("layer.0.attention.self.query")


def test_duplicate_names(adapter_dirs, tmp_path):
    # Derived names that clash get a suffix, as in 0.1.3 (issue 11); explicit names cannot clash.
    twin = _copy(adapter_dirs[1], tmp_path / os.path.basename(adapter_dirs[0]))
    share = SHAREModel.from_adapters([adapter_dirs[0], twin], num_components=4, progress=False)
    assert share.adapter_names == ["task0", "task0_1"]


@pytest.mark.parametrize("k", [0, -3, "five", 2.5, True])
def test_bad_k(adapter_dirs, k):
    with pytest.raises(ConfigError, match="num_components"):
        SHAREModel.from_adapters(adapter_dirs, num_components=k, progress=False)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/b", "..", ".", "", "x" * 200, "a\\b", "spa ce"])
def test_names_cannot_escape(adapter_dirs, name):
    with pytest.raises(InvalidNameError):
        SHAREModel.from_adapters({name: adapter_dirs[0], "ok": adapter_dirs[1]}, progress=False)


def test_on_error_skip(adapter_dirs, tmp_path, caplog):
    broken = _copy(adapter_dirs[1], tmp_path / "broken")
    os.remove(os.path.join(broken, "adapter_model.safetensors"))
    share = SHAREModel.from_adapters([adapter_dirs[0], broken, adapter_dirs[2]], on_error="skip", progress=False)
    assert "broken" not in share.adapter_names and len(share.adapter_names) == 2
    assert "skipping adapter" in caplog.text
    with pytest.raises(AdapterError, match="at least 2"):
        SHAREModel.from_adapters([adapter_dirs[0], broken], on_error="skip", progress=False)


def test_unknown_adapter(adapter_dirs):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=2, progress=False)
    with pytest.raises(UnknownAdapterError, match="'nope' not found"):
        share.reconstruct("nope")
    with pytest.raises(KeyError):  # 0.1.x raised KeyError: still catchable as such
        share.reconstruct("nope")


def test_cli_failure_writes_nothing(adapter_dirs, tmp_path, capsys):
    bad = _copy(adapter_dirs[1], tmp_path / "bad")
    _edit_config(bad, peft_type="PREFIX_TUNING")
    out = tmp_path / "out"
    rc = main(["compress", adapter_dirs[0], bad, "-o", str(out), "-q"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "error:" in err and "PREFIX_TUNING" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_cli_usage_errors(adapter_dirs, tmp_path, capsys):
    assert main(["compress", adapter_dirs[0], "-o", str(tmp_path / "x"), "-k", "0"]) == 2
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    assert main(["compress", *adapter_dirs[:2], "-o", str(tmp_path / "y"), "--names", "only-one"]) == 2


def test_all_errors_share_one_base():
    for cls in (AdapterError, ConfigError, IncompatibleAdaptersError, InvalidNameError, UnknownAdapterError):
        assert issubclass(cls, LoraShareError)
