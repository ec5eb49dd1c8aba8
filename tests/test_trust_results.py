"""Issue 11, sections 2, 4 and 5: no silently wrong result, 0.1.3 compatibility, messages.

Each case checks the exception type (or the CLI exit code) and the message; after a refused
command, the bytes on disk are unchanged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Dict, List

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorashare.hub
from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import (
    AdapterError,
    CheckpointError,
    CheckpointNotFoundError,
    DuplicateAdapterError,
    HubError,
    LoraShareError,
)
from tests.conftest import load_state
from tests.hub_fixtures import HUB_TOKEN

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "adapters")
WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------- helpers
def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _rekey(folder: str, rename) -> Dict[str, str]:
    """Rewrite the keys of an adapter's weights with ``rename``; return {old: new}."""
    path = os.path.join(folder, WEIGHTS)
    sd = load_file(path)
    mapping = {k: rename(k) for k in sd}
    save_file({mapping[k]: v for k, v in sd.items()}, path)
    return mapping


def _scale_b(folder: str, factor: float) -> None:
    path = os.path.join(folder, WEIGHTS)
    sd = load_file(path)
    save_file({k: v * factor if "lora_B" in k else v for k, v in sd.items()}, path)


def _snapshot(folder) -> Dict[str, bytes]:
    out = {}
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _strict_json(text: str):
    """Parse one JSON line, refusing NaN/Infinity as the JSON spec does."""
    def refuse(const):
        raise AssertionError(f"non-JSON constant {const} in --json output")

    return json.loads(text, parse_constant=refuse)


def _assert_same(orig: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert set(got) == set(orig)
    for k in orig:
        assert torch.allclose(orig[k].float(), got[k].float(), atol=atol), k


def _strip_prefix(key: str) -> str:
    return key.replace("base_model.model.", "", 1)


def _name_infix(key: str) -> str:
    return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")


# --------------------------------------------------------------- GPT-2 adapters (Conv1D, no prefix)
GPT2_BASE = "tiny-gpt2-for-tests"


def _tiny_gpt2(n_embd: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(4321)
    cfg = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.name_or_path = GPT2_BASE
    return model.eval()


def _gpt2_adapter(folder: str, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(_tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape))
    pm.peft_config["default"].base_model_name_or_path = GPT2_BASE
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory) -> Dict[str, List[str]]:
    """Three GPT-2 adapters as PEFT saved them, and the same with keys like ``transformer.h.0.attn.c_attn.lora_A.weight``."""
    root = tmp_path_factory.mktemp("gpt2")
    peft_form = [_gpt2_adapter(str(root / "peft" / f"g{i}"), seed=i) for i in range(3)]
    bare = []
    for d in peft_form:
        b = _copy(d, root / "bare" / os.path.basename(d))
        _rekey(b, _strip_prefix)
        bare.append(b)
    return {"peft": peft_form, "bare": bare}


# ======================================================================= 2. silently wrong results
# --------------------------------------------------------------------------- float16 range
@pytest.fixture
def big_adapter(adapter_dirs, tmp_path) -> str:
    big = _copy(adapter_dirs[1], tmp_path / "big")
    _scale_b(big, 1e6)
    return big


def test_float16_overflow_is_refused_naming_adapter_module_and_fix(adapter_dirs, big_adapter):
    with pytest.raises(AdapterError) as ei:
        SHAREModel.from_adapters([adapter_dirs[0], big_adapter, adapter_dirs[2]], dtype="float16", num_components=4,
                                 progress=False)
    msg = str(ei.value)
    assert "'big'" in msg and "float16" in msg and "65504" in msg
    assert "float32" in msg and "bfloat16" in msg
    assert ei.value.adapter == "big" and ei.value.layer and ei.value.layer in msg
    assert "'task0'" not in msg  # only the culprit is named


def test_bfloat16_holds_the_range_and_stores_only_finite_values(adapter_dirs, big_adapter):
    share = SHAREModel.from_adapters([adapter_dirs[0], big_adapter, adapter_dirs[2]], dtype="bfloat16",
                                     num_components=4, progress=False)
    stored = list(share.components.values()) + [L for ls in share.all_loadings.values() for L in ls.values()]
    assert stored and all(bool(torch.isfinite(t.float()).all()) for t in stored)
    assert all(math.isfinite(e) for es in share.delta_w_errors.values() for e in es.values())


def test_cli_float16_overflow_exit_1_and_writes_nothing(adapter_dirs, big_adapter, tmp_path, capsys):
    out = tmp_path / "ck16"
    rc = main(["compress", adapter_dirs[0], big_adapter, "-o", str(out), "--dtype", "float16", "-k", "4", "-q"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "error:" in err and "'big'" in err and "--dtype float32" in err and "--dtype bfloat16" in err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("how", [{"variance_threshold": 1e-6}, {"force_recompute": True}], ids=["projection", "recompute"])
def test_add_adapter_into_float16_checkpoint_refuses_overflow(adapter_dirs, big_adapter, how):
    share = SHAREModel.from_adapters(adapter_dirs[:3], dtype="float16", num_components=12, progress=False)
    before = {n: {k: v.clone() for k, v in ls.items()} for n, ls in share.all_loadings.items()}
    with pytest.raises(AdapterError, match=r"'big'.*float16's range") as ei:
        share.add_adapter(big_adapter, **how)
    assert ei.value.adapter == "big"
    assert share.adapter_names == ["task0", "task1", "task2"] and "big" not in share.config.adapters
    assert all(torch.equal(before[n][k], share.all_loadings[n][k]) for n in before for k in before[n])


def test_json_output_never_holds_nan_or_infinity(adapter_dirs, tmp_path, capsys, monkeypatch):
    ck = tmp_path / "ck"
    SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False).save_pretrained(ck)
    bad = {"per_layer": {"m": float("nan")}, "mean": float("nan"), "max": float("inf")}
    monkeypatch.setattr(SHAREModel, "reconstruction_error", lambda self, name, *a, **k: bad)
    assert main(["info", str(ck), "--json"]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["adapters"]["task0"]["delta_w_error"] == {"per_layer": {"m": None}, "mean": None, "max": None}


def test_json_errors_are_strict_json_too(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope"), "--json"]) == 1
    out = _strict_json(capsys.readouterr().out)
    assert out["type"] == "CheckpointNotFoundError" and "does not exist" in out["error"]
    assert main(["compress", "-o", str(tmp_path / "x"), "--json"]) == 2
    out = _strict_json(capsys.readouterr().out)
    assert out["type"] == "UsageError" and "at least 2 adapters" in out["error"]


# --------------------------------------------------------------------------- own key names
KEY_FORMS = {
    "peft": lambda k: k,
    "no-prefix": _strip_prefix,
    "name-infix": _name_infix,
    "both": lambda k: _name_infix(_strip_prefix(k)),
}


@pytest.fixture
def keyed_dirs(adapter_dirs, tmp_path) -> Dict[str, str]:
    """One copy of each fixture adapter per key form (task0: PEFT's, task1: no prefix, ...)."""
    out = {}
    for (form, rename), src in zip(KEY_FORMS.items(), adapter_dirs):
        d = _copy(src, tmp_path / "keyed" / form)
        _rekey(d, rename)
        out[form] = d
    return out


def test_reconstruct_returns_the_adapters_own_keys_at_lossless_k(keyed_dirs, tmp_path):
    share = SHAREModel.from_adapters(keyed_dirs, num_components=64, progress=False)  # k ≥ N·r: lossless
    for form, d in keyed_dirs.items():
        _assert_same(load_state(d), share.reconstruct(form))
    share.save_pretrained(tmp_path / "ck")
    metas = {f: json.load(open(tmp_path / "ck" / "adapters" / f / "adapter_meta.json")) for f in keyed_dirs}
    assert "lora_keys" not in metas["peft"]  # only stored when a key differs from PEFT's default
    assert all("lora_keys" in metas[f] for f in ("no-prefix", "name-infix", "both"))
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    for form, d in keyed_dirs.items():
        _assert_same(load_state(d), loaded.reconstruct(form))
    # the CLI writes them too
    assert main(["reconstruct", str(tmp_path / "ck"), "--adapter", "no-prefix", "-o", str(tmp_path / "rec"), "-q"]) == 0
    _assert_same(load_state(keyed_dirs["no-prefix"]), load_state(str(tmp_path / "rec")))


@pytest.mark.parametrize("force_recompute", [False, True], ids=["projection", "recompute"])
def test_add_adapter_keeps_own_keys(keyed_dirs, adapter_dirs, tmp_path, force_recompute):
    share = SHAREModel.from_adapters(keyed_dirs, num_components=64, progress=False)
    extra = _copy(adapter_dirs[0], tmp_path / "extra")
    _rekey(extra, _strip_prefix)
    rep = share.add_adapter(extra, force_recompute=force_recompute)
    assert rep["method"] == ("recompute" if force_recompute else "projection")
    share.save_pretrained(tmp_path / "ck")
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    for name, d in {**keyed_dirs, "extra": extra}.items():
        assert set(loaded.reconstruct(name)) == set(load_state(d)), name
        _assert_same(load_state(d), loaded.reconstruct(name), atol=1e-4)


def test_recompute_from_reconstructions_keeps_own_keys(keyed_dirs, adapter_dirs, tmp_path):
    share = SHAREModel.from_adapters(keyed_dirs, num_components=64, progress=False)
    share.save_pretrained(tmp_path / "ck")
    originals = {form: load_state(d) for form, d in keyed_dirs.items()}
    for d in keyed_dirs.values():  # the originals are gone: recompute must start from reconstructions
        shutil.rmtree(d)
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    assert loaded.add_adapter(adapter_dirs[3], name="late", force_recompute=True)["method"] == "recompute"
    for form, orig in originals.items():
        _assert_same(orig, loaded.reconstruct(form), atol=1e-4)


def test_apply_with_unprefixed_keys_matches_peft(gpt2_dirs):
    from peft import PeftModel

    share = SHAREModel.from_adapters(gpt2_dirs["bare"], num_components=64, progress=False)
    for d in gpt2_dirs["bare"]:
        assert set(share.reconstruct(os.path.basename(d))) == set(load_state(d))
        assert all(k.startswith("transformer.h.") for k in share.reconstruct(os.path.basename(d)))
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    for i, name in enumerate(("g0", "g2")):
        ref = PeftModel.from_pretrained(_tiny_gpt2(), gpt2_dirs["peft"][2 * i]).eval()
        got = share.apply(_tiny_gpt2(), name)
        with torch.no_grad():
            want, have = ref(ids).logits, got(ids).logits
        assert torch.allclose(want, have, atol=1e-5)
        assert not torch.allclose(want, _tiny_gpt2()(ids).logits, atol=1e-4)  # the adapter does change outputs


def test_bad_lora_keys_in_a_meta_are_refused(keyed_dirs, tmp_path):
    ck = tmp_path / "ck"
    SHAREModel.from_adapters(keyed_dirs, num_components=8, progress=False).save_pretrained(ck)
    meta_path = ck / "adapters" / "no-prefix" / "adapter_meta.json"
    meta = json.load(open(meta_path))
    gk = sorted(meta["lora_keys"])[0]
    meta["lora_keys"][gk] = "some.other.module.lora_B.weight"
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(CheckpointError) as ei:
        SHAREModel.from_pretrained(ck, verify=False)  # past the hashes: the field check itself
    assert "adapter_meta.json" in str(ei.value) and "lora_keys" in str(ei.value) and gk in str(ei.value)


# ==================================================================== 4. compatibility with 0.1.3
@pytest.mark.parametrize(
    "layout, expected",
    [
        (["runs/v1/adapter", "runs/v2/adapter"], ["adapter", "adapter_1"]),
        (["runs/v1/adapter", "runs/v1/adapter"], ["adapter", "adapter_1"]),  # one path given twice
        (["runs/v1/adapter", "runs/v2/adapter", "runs/v3/adapter"], ["adapter", "adapter_1", "adapter_2"]),
        (["runs/v1/adapter", "runs/v2/adapter", "runs/x/adapter_1"], ["adapter", "adapter_1", "adapter_1_1"]),
    ],
    ids=["two-folders", "same-path-twice", "three", "suffix-taken"],
)
def test_clashing_folder_names_get_suffixes_as_in_0_1_3(adapter_dirs, tmp_path, caplog, layout, expected):
    paths = []
    for i, rel in enumerate(layout):
        p = tmp_path / rel
        if not p.exists():
            _copy(adapter_dirs[i], p)
        paths.append(str(p))
    with caplog.at_level(logging.INFO, logger="lorashare"):
        share = SHAREModel.from_adapters(paths, num_components=4, progress=False)
    assert share.adapter_names == expected
    assert f"naming the second {expected[1]!r}" in caplog.text and paths[1] in caplog.text
    assert "adapter names:" in caplog.text and all(n in caplog.text for n in expected)


def test_cli_clashing_positional_names(adapter_dirs, tmp_path, capsys):
    a, b = _copy(adapter_dirs[0], tmp_path / "v1" / "adapter"), _copy(adapter_dirs[1], tmp_path / "v2" / "adapter")
    assert main(["compress", a, b, "-o", str(tmp_path / "ck"), "-k", "4", "--json"]) == 0
    assert _strict_json(capsys.readouterr().out)["adapters"] == ["adapter", "adapter_1"]
    # a positional whose derived name is taken by --name gets the next suffix
    assert main(["compress", "--name", f"adapter={a}", b, "-o", str(tmp_path / "ck2"), "-k", "4", "--json"]) == 0
    assert _strict_json(capsys.readouterr().out)["adapters"] == ["adapter", "adapter_1"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--name", "x={0}", "--name", "x={1}"], "--name 'x' is given twice"),
        (["{0}", "{1}", "--names", "x", "x"], "duplicate adapter name 'x'"),
    ],
    ids=["--name-twice", "--names-twice"],
)
def test_cli_explicit_duplicate_names_stay_usage_errors(adapter_dirs, tmp_path, capsys, args, expected):
    argv = ["compress", *[a.format(*adapter_dirs) for a in args], "-o", str(tmp_path / "ck")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage error" in err and expected in err and not (tmp_path / "ck").exists()


def test_remove_last_adapter_is_refused(adapter_dirs, tmp_path, capsys):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    share.remove_adapter("task0")
    with pytest.raises(ValueError) as ei:  # 0.1.3 raised ValueError: code catching it keeps working
        share.remove_adapter("task1")
    assert isinstance(ei.value, CheckpointError)
    assert "'task1'" in str(ei.value) and "last adapter" in str(ei.value) and "at least one" in str(ei.value)
    assert share.adapter_names == ["task1"] and set(share.reconstruct("task1"))

    ck = tmp_path / "ck"
    share.save_pretrained(ck)
    before = _snapshot(ck)
    assert main(["remove", str(ck), "task1"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "last adapter" in err and "Traceback" not in err
    assert _snapshot(ck) == before


def test_summary_heading_is_0_1_3s(adapter_dirs, tmp_path, capsys):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    share.summary()
    lines = capsys.readouterr().out.splitlines()
    assert "  SHARE Compression Summary" in lines and "=" * 60 in lines
    share.save_pretrained(tmp_path / "ck")
    assert main(["info", str(tmp_path / "ck")]) == 0
    assert "SHARE Compression Summary" in capsys.readouterr().out


# ============================================================================== 5. messages
@pytest.mark.parametrize("form", ["absolute", "dot-slash", "dot-dot", "tilde", "file"])
def test_missing_local_checkpoint_says_the_folder_does_not_exist(tmp_path, capsys, monkeypatch, form):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "afile").write_text("x")
    path, expected = {
        "absolute": (str(tmp_path / "abs" / "path" / "missing"), "the folder does not exist"),
        "dot-slash": ("./missing/ckpt", "the folder does not exist"),
        "dot-dot": ("../missing-lorashare-ckpt", "the folder does not exist"),
        "tilde": ("~/missing/ckpt", "the folder does not exist"),
        "file": ("afile", "it is a file, not a folder"),
    }[form]
    with pytest.raises(CheckpointNotFoundError) as ei:
        SHAREModel.from_pretrained(path)
    assert expected in str(ei.value) and "subfolder" not in str(ei.value)
    assert main(["info", path]) == 1
    err = capsys.readouterr().err
    assert expected in err and "subfolder" not in err and "Traceback" not in err


def test_relative_missing_path_with_slashes_explains_both_readings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointNotFoundError) as ei:
        SHAREModel.from_pretrained("runs/share/ckpt")
    assert "no such local folder" in str(ei.value) and "repo's root" in str(ei.value)


def test_apply_on_a_base_model_of_other_shapes_names_module_shapes_and_base(adapter_dirs):
    from transformers import BertConfig, BertForSequenceClassification

    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    torch.manual_seed(0)
    wide = BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=64, num_labels=3))
    with pytest.raises(AdapterError) as ei:
        share.apply(wide, "task0")
    msg = str(ei.value)
    assert "'task0'" in msg and "bert.encoder.layer.0.attention.self.query" in msg
    assert "32 → 32" in msg and "48 → 48" in msg and "'tiny-bert-for-tests'" in msg
    assert ei.value.layer == "bert.encoder.layer.0.attention.self.query"


def test_apply_checks_gpt2_conv1d_shapes_and_missing_modules(gpt2_dirs, adapter_dirs):
    share = SHAREModel.from_adapters(gpt2_dirs["bare"], num_components=8, progress=False)
    with pytest.raises(AdapterError) as ei:
        share.apply(_tiny_gpt2(n_embd=48), "g1")
    msg = str(ei.value)
    assert "transformer.h.0.attn.c_attn" in msg and "32 → 96" in msg and "48 → 144" in msg and GPT2_BASE in msg
    from examples.make_adapters import tiny_bert

    with pytest.raises(AdapterError) as ei:
        share.load_into(tiny_bert(), ["g1"])
    assert "transformer.h.0.attn.c_attn is not in the model" in str(ei.value) and GPT2_BASE in str(ei.value)


def test_load_into_an_existing_peft_model_checks_shapes_through_lora_layers(adapter_dirs):
    from examples.make_adapters import tiny_bert

    share = SHAREModel.from_adapters(adapter_dirs, num_components=64, progress=False)
    pm = share.load_into(tiny_bert(), ["task1"])
    pm = share.load_into(pm, ["task3"])  # its modules are LoRA layers now: the check reads their base layers
    pm.set_adapter("task3")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(pm(ids).logits, share.apply(tiny_bert(), "task3")(ids).logits, atol=1e-6)


def test_checkpoint_larger_than_its_input_is_said_with_a_k_that_helps(tmp_path, capsys, caplog):
    examples = [os.path.join(EXAMPLES, f"task{i}") for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="lorashare"):
        assert main(["compress", *examples, "-o", str(tmp_path / "ck"), "-q"]) == 0  # default k=32
    err = capsys.readouterr().err
    st = json.load(open(tmp_path / "ck" / "share_config.json"))["compression_stats"]
    k = st["largest_saving_k"]
    assert st["compression_ratio"] < 1 and isinstance(k, int) and k >= 1
    notes = [line for line in err.splitlines() if "note:" in line]
    assert len(notes) == 1 and f"-k {k} or lower" in notes[0] and "1.50x the size of the adapters" in notes[0]
    assert "cost more than they save" in caplog.text and f"num_components={k}" in caplog.text
    # the k given helps, and it is the largest that does
    at_k = SHAREModel.from_adapters(examples, num_components=k, progress=False).config.compression_stats
    above = SHAREModel.from_adapters(examples, num_components=k + 1, progress=False).config.compression_stats
    assert at_k["compression_ratio"] > 1 > above["compression_ratio"]
    assert main(["compress", *examples, "-o", str(tmp_path / "ck2"), "-k", str(k), "-q"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("argv, got", [([], 0), (["{0}"], 1)], ids=["zero", "one"])
def test_cli_too_few_adapters_is_a_usage_error(adapter_dirs, tmp_path, capsys, argv, got):
    rc = main(["compress", *[a.format(*adapter_dirs) for a in argv], "-o", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert rc == 2 and "usage error" in err and "at least 2 adapters" in err and f"got {got}" in err
    assert "skipping" not in err and not (tmp_path / "ck").exists()


def test_library_says_skipping_only_when_something_was_skipped(adapter_dirs, tmp_path):
    with pytest.raises(AdapterError) as ei:
        SHAREModel.from_adapters([], progress=False)
    assert "got 0." in str(ei.value) and "skipping" not in str(ei.value)
    broken = _copy(adapter_dirs[1], tmp_path / "broken")
    os.remove(os.path.join(broken, WEIGHTS))
    with pytest.raises(AdapterError) as ei:
        SHAREModel.from_adapters([adapter_dirs[0], broken], on_error="skip", progress=False)
    assert "got 1 after skipping 1 bad one." in str(ei.value)


def test_add_existing_name_library_and_cli_each_give_their_fix(adapter_dirs, tmp_path, capsys):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    with pytest.raises(DuplicateAdapterError) as ei:
        share.add_adapter(adapter_dirs[1])
    assert isinstance(ei.value, AdapterError) and isinstance(ei.value, ValueError)
    assert "'task1' already exists" in str(ei.value) and "name=..." in str(ei.value) and "remove_adapter()" in str(ei.value)

    ck = tmp_path / "ck"
    share.save_pretrained(ck)
    before = _snapshot(ck)
    assert main(["add", str(ck), adapter_dirs[1]]) == 1
    err = capsys.readouterr().err
    assert "'task1' is already in" in err and "--name NAME" in err and f"lorashare remove {ck} task1" in err
    assert "name=..." not in err and "remove_adapter()" not in err
    assert main(["add", str(ck), adapter_dirs[1], "--json"]) == 1
    out = _strict_json(capsys.readouterr().out)
    assert out["type"] == "DuplicateAdapterError" and "--name NAME" in out["error"]
    assert _snapshot(ck) == before


@pytest.fixture
def no_token_hub(hub, hf_cache, monkeypatch):
    """The local Hub as the endpoint, no HF_TOKEN, no stored login."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    return hub


def test_push_without_a_token_fails_before_any_request(no_token_hub, adapter_dirs, tmp_path, capsys):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    with pytest.raises(HubError) as ei:
        share.push_to_hub("tester/share")
    msg = str(ei.value)
    assert "tester/share" in msg and "no Hugging Face token" in msg and "HF_TOKEN" in msg and "hf auth login" in msg
    share.save_pretrained(tmp_path / "ck")
    assert main(["push", str(tmp_path / "ck"), "tester/share"]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "HF_TOKEN" in err and "Traceback" not in err
    assert no_token_hub.records == []  # not one request, let alone retries


def test_push_uses_the_stored_login(no_token_hub, hf_cache, adapter_dirs):
    (hf_cache.parent / "token").write_text(HUB_TOKEN)  # as `hf auth login` leaves it
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    info = share.push_to_hub("tester/share")
    assert info.oid == no_token_hub.resolve("tester/share")
    assert {r.token for r in no_token_hub.records} == {HUB_TOKEN}


def test_every_error_here_is_a_lorashare_error():
    for cls in (DuplicateAdapterError, CheckpointNotFoundError, HubError):
        assert issubclass(cls, LoraShareError)
    assert lorashare.hub.is_local_path("/x") and not lorashare.hub.is_local_path("owner/name")
