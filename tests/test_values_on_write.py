"""What lorashare accepts and writes, it can read again: values are checked on the way in and on the
way out with the reader's own rules, and a reader allocates only what a checkpoint's files justify.

- a diverged training run (NaN or Inf loadings, a NaN head) is refused by ``add_trained`` by name, and
  a hand-built state holding such values is refused by ``save_pretrained``, which writes nothing;
- PEFT ``target_parameters`` adapters (dense, and MoE experts of a tiny Mixtral) are refused where
  adapters come in, saying what is unsupported, so nothing accepted fails to load later;
- a checkpoint whose (re-hashed) files declare a huge rebuild (a d × 1 basis and a 1 × r loading with
  d = r = 65536) is refused before anything is allocated, within a limit the user can raise;
- a basis of no rows, and a float16 export of factors above 65504, are refused with clear messages.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from examples.make_adapters import tiny_bert
from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import AdapterError, CheckpointError, ConfigError, StorageRangeError
from lorashare.serving.cache import AdapterCache, parse_checkpoints
from lorashare.serving.export import export_adapters
from tests.test_hostile_checkpoints import _cfg, _snapshot
from tests.test_hostile_checkpoints import _write_cfg as _rehash  # every fingerprint recomputed, as a forger would
from tests.test_hostile_inputs import _one_line_error as _one_line

peft = pytest.importorskip("peft")

BASES = "shared_components.safetensors"
NAME = "task1"  # no head


# ============================================================================ helpers
@pytest.fixture
def share(adapter_dirs) -> SHAREModel:
    return SHAREModel.from_adapters(adapter_dirs[:3], num_components=3, progress=False)


@pytest.fixture(scope="module")
def saved(adapter_dirs, tmp_path_factory) -> Path:
    """A float32 checkpoint of task0..task2 (task0 and task2 with heads)."""
    ck = tmp_path_factory.mktemp("values") / "ck"
    SHAREModel.from_adapters(adapter_dirs[:3], num_components=3, progress=False).save_pretrained(ck)
    return ck


@pytest.fixture
def ck(saved, tmp_path) -> Path:
    out = tmp_path / "ck"
    shutil.copytree(saved, out)
    return out


def _loadings_param(model, key: str) -> torch.nn.Parameter:
    from lorashare.training.subspace import factor_of

    return factor_of(model, "new", key)[0].parametrizations.weight.original


def _poison(t: torch.Tensor, value: float, n: int) -> None:
    with torch.no_grad():
        t.view(-1)[:n] = value


# ============================================================================ item 7: values checked on write
@pytest.mark.parametrize("value,what", [(float("nan"), r"3 NaN"), (float("inf"), r"3 infinite"),
                                        (float("-inf"), r"3 infinite")])
def test_add_trained_refuses_a_diverged_loading_and_changes_nothing(share, tmp_path, value, what):
    model = share.subspace_model(tiny_bert(), "new", seed=0)
    key = sorted(k for k in share.components if k.endswith(":A"))[0]
    _poison(_loadings_param(model, key), value, 3)
    share.save_pretrained(tmp_path / "ck")
    before_state, before_files = share.state, _snapshot(tmp_path / "ck")
    with pytest.raises(AdapterError) as info:
        share.add_trained(model)
    msg = str(info.value)
    assert "adapter 'new'" in msg and repr(key) in msg, msg
    assert f"holds NaN or infinite values ({what})" in msg, msg
    assert "diverged" in msg and "learning rate" in msg and "not added" in msg, msg
    assert info.value.adapter == "new" and info.value.layer == key
    assert share.state is before_state and "new" not in share.adapter_names
    share.save_pretrained(tmp_path / "ck")
    assert _snapshot(tmp_path / "ck") == before_files  # the checkpoint is unchanged


def test_add_trained_refuses_a_nan_head(share, tmp_path):
    model = share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=0)
    head = next(p for n, p in model.named_parameters() if "modules_to_save.new" in n and n.endswith("weight"))
    _poison(head, float("nan"), 2)
    before = share.state
    with pytest.raises(AdapterError, match=r"adapter 'new': adapters/new/classifier_head\.safetensors \(in memory\): "
                                           r"tensor '.*classifier.*' holds NaN or infinite values \(2 NaN\).*diverged"):
        share.add_trained(model)
    assert share.state is before


def test_add_trained_refuses_nan_rank_update_directions(share):
    model = share.subspace_model(tiny_bert(), "new", rank_updates=2, seed=0)
    extra = next(p for n, p in model.named_parameters() if n.endswith(".extra"))
    _poison(extra, float("nan"), 1)  # a NaN sum is not "> 0": without the check it would be dropped silently
    before = share.state
    with pytest.raises(AdapterError, match=r"rank-update directions of '.*' hold NaN or infinite values \(1 NaN\)"):
        share.add_trained(model)
    assert share.state is before


def test_a_healthy_trained_adapter_still_saves_and_loads_alone(share, tmp_path):
    model = share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    assert share.add_trained(model)["method"] == "trained"
    share.save_pretrained(tmp_path / "ck")
    alone = SHAREModel.from_pretrained(tmp_path / "ck", adapters=["new"])
    for k, t in share.reconstruct("new").items():
        assert torch.equal(alone.reconstruct("new")[k], t), k


def _hand_built(share: SHAREModel, change: Callable[[dict, dict, dict], None]) -> SHAREModel:
    """lorashare 0.1.x's constructor, with ``change(components, loadings, heads)`` applied to copies."""
    comps = {k: v.clone() for k, v in share.components.items()}
    loadings = {n: {k: v.clone() for k, v in d.items()} for n, d in share.all_loadings.items()}
    heads = {n: {k: v.clone() for k, v in d.items()} for n, d in share.all_classifier_heads.items()}
    change(comps, loadings, heads)
    return SHAREModel(copy.deepcopy(share.config), comps, loadings, dict(share.adapter_configs), heads)


def _nan_loading(comps, loadings, heads):
    loadings[NAME][sorted(loadings[NAME])[0]].view(-1)[:3] = float("nan")


def _inf_loading(comps, loadings, heads):
    loadings[NAME][sorted(loadings[NAME])[-1]].view(-1)[0] = float("inf")


def _nan_head(comps, loadings, heads):
    heads["task0"][sorted(heads["task0"])[0]].view(-1)[0] = float("nan")


def _nan_basis(comps, loadings, heads):
    comps[sorted(comps)[0]][0, 0] = float("nan")


def _wrong_shape(comps, loadings, heads):
    key = sorted(loadings[NAME])[0]
    loadings[NAME][key] = torch.zeros(loadings[NAME][key].shape[0] + 1, loadings[NAME][key].shape[1])


def _wrong_rank(comps, loadings, heads):  # both sides of a module at rank 5, while the adapter's config says r=4
    module = sorted(loadings[NAME])[0][:-2]
    for side in "AB":
        loadings[NAME][f"{module}:{side}"] = torch.zeros(loadings[NAME][f"{module}:{side}"].shape[0], 5)


HAND_BUILT = [
    (_nan_loading, rf"adapter '{NAME}': adapters/{NAME}/loadings\.safetensors \(in memory\): loading '.*:A' holds NaN "
                   r"or infinite values \(3 NaN\)"),
    (_inf_loading, rf"adapter '{NAME}': .*loading '.*:B' holds NaN or infinite values \(1 infinite\)"),
    (_nan_head, r"adapter 'task0': adapters/task0/classifier_head\.safetensors \(in memory\): tensor '.*' holds NaN"),
    (_nan_basis, r"shared_components\.safetensors \(in memory\): basis '.*' holds NaN or infinite values \(1 NaN\)"),
    (_wrong_shape, rf"adapter '{NAME}': loading '.*' is \(4, 4\) but its basis is \(32, 3\)"),
    (_wrong_rank, rf"adapter '{NAME}': .* at rank 5, but .*original_config says r=4"),
]


@pytest.mark.parametrize("change,pattern", HAND_BUILT, ids=[c.__name__.strip("_") for c, _ in HAND_BUILT])
def test_a_hand_built_state_no_reader_accepts_is_never_written(share, tmp_path, change, pattern):
    bad = _hand_built(share, change)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=pattern) as info:
        bad.save_pretrained(out)
    assert "Nothing was saved" in str(info.value)
    assert not out.exists()
    # Over an existing checkpoint: every byte stays.
    share.save_pretrained(tmp_path / "ck")
    before = _snapshot(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=pattern):
        bad.save_pretrained(tmp_path / "ck")
    assert _snapshot(tmp_path / "ck") == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folder left beside it either


def test_a_hand_built_state_without_a_lora_config_is_not_written(share, tmp_path):
    bare = SHAREModel(share.config, dict(share.components), dict(share.all_loadings),
                      {n: c for n, c in share.adapter_configs.items() if n != NAME})
    with pytest.raises(CheckpointError, match=rf"adapter '{NAME}' has no LoRA config.*Nothing was saved"):
        bare.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unchanged_hand_built_state_saves_and_loads(share, tmp_path):
    same = _hand_built(share, lambda comps, loadings, heads: None)
    same.save_pretrained(tmp_path / "ck")
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    assert loaded.adapter_names == share.adapter_names


def test_add_adapter_refuses_a_nan_head_at_the_door(share, adapter_dirs, tmp_path):
    src = tmp_path / "nanhead"
    shutil.copytree(adapter_dirs[0], src)  # task0 has a classifier head
    path = src / "adapter_model.safetensors"
    sd = load_file(str(path))
    head = next(k for k in sd if "lora_" not in k)
    sd[head] = sd[head].clone()
    sd[head].view(-1)[:2] = float("nan")
    save_file(sd, str(path))
    before = share.state
    with pytest.raises(AdapterError, match=r"adapter 'nanhead' .*holds NaN or infinite values \(2 NaN\).*diverged"):
        share.add_adapter(str(src))
    assert share.state is before
    with pytest.raises(AdapterError, match=r"adapter 'nanhead'.*\(2 NaN\)"):
        SHAREModel.from_adapters([str(src), adapter_dirs[1]], num_components=2, progress=False)


# ============================================================================ item 8: target_parameters
@pytest.fixture(scope="module")
def dense_tp(tmp_path_factory) -> str:
    """A PEFT adapter of tiny BERT with LoRA on the query/value weights through target_parameters."""
    from peft import LoraConfig, get_peft_model

    folder = str(tmp_path_factory.mktemp("tp") / "dense")
    torch.manual_seed(0)
    pm = get_peft_model(tiny_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=[
        "attention.self.query.weight", "attention.self.value.weight"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn(p.shape))
    pm.peft_config["default"].base_model_name_or_path = "tiny-bert-for-tests"
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_tp(tmp_path_factory) -> str:
    """A PEFT adapter of a tiny Mixtral (built from a config, no download): LoRA on its experts' 3-D
    parameters through target_parameters, and on q_proj as a plain module."""
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = str(tmp_path_factory.mktemp("tp") / "moe")
    torch.manual_seed(0)
    base = MixtralForCausalLM(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=32))
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.add_(0.1 * torch.randn(p.shape))
    pm.save_pretrained(folder)
    return folder


def test_the_fixtures_are_what_peft_writes(dense_tp, moe_tp):
    """Guards the tests below: the dense one looks like a plain LoRA, the MoE one spans experts."""
    dense = load_file(os.path.join(dense_tp, "adapter_model.safetensors"))
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in dense) and len(dense) == 8
    moe = load_file(os.path.join(moe_tp, "adapter_model.safetensors"))
    assert any("experts.base_layer.lora_A" in k for k in moe)
    assert json.loads(Path(moe_tp, "adapter_config.json").read_text())["target_parameters"]


def test_a_dense_target_parameters_adapter_is_refused_at_the_door(dense_tp, adapter_dirs, share, tmp_path, capsys):
    for attempt in (lambda: SHAREModel.from_adapters([dense_tp, adapter_dirs[0]], num_components=2, progress=False),
                    lambda: share.add_adapter(dense_tp)):
        before = share.state
        with pytest.raises(AdapterError) as info:
            attempt()
        msg = str(info.value)
        assert msg.startswith("adapter 'dense' uses PEFT target_parameters (LoRA on parameters: "
                              "attention.self.query.weight, attention.self.value.weight)"), msg
        assert "does not compress yet" in msg and "plain PEFT adapter" in msg, msg
        assert "target_modules=['query', 'value']" in msg, msg  # the supported way to the same LoRA
        assert "save the adapter again" not in msg
        assert share.state is before
    share.save_pretrained(tmp_path / "ck")
    before = _snapshot(tmp_path / "ck")
    assert main(["add", str(tmp_path / "ck"), dense_tp]) == 1
    assert "target_parameters" in _one_line(capsys, "add")
    assert _snapshot(tmp_path / "ck") == before


def test_a_moe_target_parameters_adapter_is_refused_with_what_is_unsupported(moe_tp, tmp_path):
    with pytest.raises(AdapterError) as info:
        SHAREModel.from_adapters([moe_tp, moe_tp], num_components=2, progress=False)
    msg = str(info.value)
    assert "uses PEFT target_parameters (LoRA on parameters: mlp.experts." in msg, msg
    assert "mlp.experts.down_proj" in msg and "mlp.experts.gate_up_proj" in msg, msg
    assert "MoE" in msg and "plain PEFT adapter" in msg, msg
    # The old refusal blamed the ranks (r × experts) and advised saving it again with PEFT, which cannot help.
    assert "save the adapter again" not in msg and "rank" not in msg.split("(")[0]


def test_a_checkpoint_holding_a_target_parameters_config_says_so(ck):
    meta_path = ck / "adapters" / NAME / "adapter_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["original_config"]["target_parameters"] = ["attention.self.query.weight"]
    meta_path.write_text(json.dumps(meta))
    _rehash(ck, _cfg(ck))
    with pytest.raises(CheckpointError, match=rf"adapter '{NAME}' uses PEFT original_config\.target_parameters"):
        SHAREModel.from_pretrained(ck, adapters=[NAME])


def test_an_adapter_config_without_r_is_refused_at_the_door(adapter_dirs, tmp_path):
    """A checkpoint's copy of the config needs r (PEFT would take its default rank): so does the door."""
    src = tmp_path / "nor"
    shutil.copytree(adapter_dirs[1], src)
    config = json.loads((src / "adapter_config.json").read_text())
    del config["r"]
    (src / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapter 'nor': r is None in .*adapter_config\.json, expected an integer"):
        SHAREModel.from_adapters([str(src), adapter_dirs[0]], num_components=2, progress=False)


def test_whatever_is_accepted_round_trips(adapter_dirs, tmp_path):
    """The invariant: an adapter from_adapters/add_adapter accept saves and loads, alone too, and PEFT
    loads its rebuild with the original's keys and shapes."""
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=3, progress=False)
    share.add_adapter(adapter_dirs[2])
    share.save_pretrained(tmp_path / "ck")
    for n in share.adapter_names:
        alone = SHAREModel.from_pretrained(tmp_path / "ck", adapters=[n])
        alone.reconstruct(n, output_dir=tmp_path / f"peft_{n}")
        pm = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / f"peft_{n}"))
        assert pm is not None
        got = load_file(str(tmp_path / f"peft_{n}" / "adapter_model.safetensors"))
        want = load_file(os.path.join(adapter_dirs[share.adapter_names.index(n)], "adapter_model.safetensors"))
        assert {k: t.shape for k, t in got.items()} == {k: t.shape for k, t in want.items()}


# ============================================================================ item 13: bounded rebuilds
def _huge(ck: Path, d: int, r: int, name: str = NAME) -> str:
    """Make one module of ``name`` rebuild two d × r factors from a d × 1 basis and a 1 × r loading per side,
    with every claim consistent (k_per_group, rank_pattern, adapters.rank) and every hash recomputed.
    The files grow by a few × 4·(d + r) bytes only."""
    cfg = _cfg(ck)
    module = sorted(cfg["layer_keys"])[0]
    bases = load_file(str(ck / BASES))
    for side in "AB":
        bases[f"{module}:{side}"] = torch.full((d, 1), 1.0 / d ** 0.5)
        cfg["k_per_group"][f"{module}:{side}"] = 1
    save_file(bases, str(ck / BASES))
    for n in cfg["adapter_names"]:  # every adapter's loadings of the module follow its new k
        rel = ck / "adapters" / n / "loadings.safetensors"
        loadings = load_file(str(rel))
        width = r if n == name else loadings[f"{module}:A"].shape[1]
        for side in "AB":
            loadings[f"{module}:{side}"] = torch.full((1, width), 0.01)
        save_file(loadings, str(rel))
    meta_path = ck / "adapters" / name / "adapter_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["original_config"]["rank_pattern"] = {module: r}
    meta_path.write_text(json.dumps(meta))
    cfg["adapters"][name]["rank"] = max(r, cfg["adapters"][name]["rank"])
    _rehash(ck, cfg)
    return module


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def test_a_one_megabyte_checkpoint_cannot_make_a_reader_allocate_34_gb(ck, tmp_path, capsys):
    module = _huge(ck, 65536, 65536)
    assert sum(p.stat().st_size for p in ck.rglob("*") if p.is_file()) < 2 * 1024 ** 2
    before = _snapshot(ck)
    rss = _peak_rss_mb()
    started = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        SHAREModel.from_pretrained(ck, adapters=[NAME])
    assert time.monotonic() - started < 10
    msg = str(info.value)
    assert f"adapter '{NAME}'" in msg and f"'{module}:A'" in msg and "65536 × 65536" in msg, msg
    assert "17.18 GB" in msg and "LORASHARE_MAX_TENSOR_BYTES" in msg and "nothing was allocated" in msg, msg
    assert info.value.layer == module
    # Every reader goes through the same check: the CLI, and the vLLM resolver's cache.
    out = tmp_path / "rebuilt"
    assert main(["reconstruct", str(ck), "--adapter", NAME, "-o", str(out)]) == 1
    assert "65536 × 65536" in _one_line(capsys, "reconstruct")
    cache = AdapterCache(parse_checkpoints(f"support={ck}"), str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="65536 × 65536"):
        cache.folder_for(f"support/{NAME}")
    assert _peak_rss_mb() - rss < 1024, "the refusal must come before the allocation"
    assert not out.exists() and _snapshot(ck) == before
    # The other adapters of the checkpoint still load.
    assert SHAREModel.from_pretrained(ck, adapters=["task0"]).reconstruct("task0")


def test_the_total_limit_is_the_users_to_raise(ck, monkeypatch):
    module = _huge(ck, 4096, 512)  # 8 MB per factor, 16 MB for the module
    monkeypatch.setenv("LORASHARE_MAX_REBUILD_BYTES", str(10 * 1024 ** 2))
    with pytest.raises(CheckpointError) as info:
        SHAREModel.from_pretrained(ck, adapters=[NAME])
    msg = str(info.value)
    assert f"adapter '{NAME}'" in msg and "LORASHARE_MAX_REBUILD_BYTES" in msg and "10.49 MB" in msg, msg
    assert f"'{module}:" in msg and "4096 × 512" in msg and "set LORASHARE_MAX_REBUILD_BYTES to at least" in msg, msg
    need = int(msg.split("to at least ")[1].split(".")[0])
    monkeypatch.setenv("LORASHARE_MAX_REBUILD_BYTES", str(need))
    sd = SHAREModel.from_pretrained(ck, adapters=[NAME]).reconstruct(NAME)
    assert sd[f"base_model.model.{module}.lora_A.weight"].shape == (512, 4096)
    assert sum(4 * t.numel() for t in sd.values()) == need  # the limit counts exactly what a rebuild allocates
    monkeypatch.delenv("LORASHARE_MAX_REBUILD_BYTES")
    assert SHAREModel.from_pretrained(ck, adapters=[NAME])  # the default (16 GiB) allows it


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
def test_a_bad_limit_is_named(ck, monkeypatch, value):
    monkeypatch.setenv("LORASHARE_MAX_REBUILD_BYTES", value)
    with pytest.raises(ConfigError, match=rf"LORASHARE_MAX_REBUILD_BYTES='{value}': expected a positive whole number"):
        SHAREModel.from_pretrained(ck, adapters=[NAME])


def test_a_hand_built_huge_rebuild_is_not_written(share, tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHARE_MAX_REBUILD_BYTES", "1000")  # the tiny adapters rebuild ~4 kB each
    with pytest.raises(CheckpointError, match=r"over the limit of 1\.0 kB \(LORASHARE_MAX_REBUILD_BYTES\)"):
        share.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ============================================================================ item 14
def test_a_basis_of_no_rows_is_a_checkpoint_error(ck, capsys):
    bases = load_file(str(ck / BASES))
    key = sorted(bases)[0]
    bases[key] = torch.zeros(0, bases[key].shape[1])
    save_file(bases, str(ck / BASES))
    _rehash(ck, _cfg(ck))
    with pytest.raises(CheckpointError, match=rf"{BASES} in .*: '{key}' is \(0, 3\) torch\.float32; expected a 2-D "
                                              r"float basis \(d × k, d ≥ 1\)"):
        SHAREModel.from_pretrained(ck)
    assert main(["info", str(ck)]) == 1
    assert "(0, 3)" in _one_line(capsys, "info")


@pytest.fixture
def loud(share) -> SHAREModel:
    """task1's loadings × 1e6: its rebuilt factors reach far above float16's 65504 (finite in float32)."""
    def scale(comps, loadings, heads):
        loadings[NAME] = {k: v * 1e6 for k, v in loadings[NAME].items()}
    return _hand_built(share, scale)


def test_a_float16_export_that_would_write_inf_is_refused(loud, tmp_path):
    peak = max(float(t.abs().max()) for k, t in loud.reconstruct(NAME).items())
    assert peak > 65504
    with pytest.raises(StorageRangeError) as info:
        export_adapters(loud.state, str(tmp_path / "out"), [NAME], dtype="float16", progress=False)
    msg = str(info.value)
    assert f"adapter '{NAME}': base_model.model." in msg and "beyond float16's largest (6.55e+04)" in msg, msg
    assert "nothing was written" in msg and "bfloat16" in msg, msg
    assert info.value.adapter == NAME and info.value.dtype == "float16"
    assert not (tmp_path / "out" / NAME).exists()
    # The fix the message names works, and keeps every value finite.
    export_adapters(loud.state, str(tmp_path / "out"), [NAME], dtype="bfloat16", progress=False)
    sd = load_file(str(tmp_path / "out" / NAME / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) and t.dtype == torch.bfloat16 for t in sd.values())
    # A quiet adapter still exports in float16.
    export_adapters(loud.state, str(tmp_path / "quiet"), ["task0"], dtype="float16", progress=False)


def test_the_cli_export_float16_refuses_in_one_line(loud, tmp_path, capsys):
    loud.save_pretrained(tmp_path / "ck")
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "ck"), "-o", str(out), "--adapter", NAME, "--dtype", "float16"]) == 1
    line = _one_line(capsys, "export")
    assert "float16" in line and "--dtype bfloat16" in line, line
    assert not (out / NAME).exists()
