"""What ``serve()``, the engine folders and the vLLM resolver compute is what PEFT computes, or refused.

Each adapter here is made with real PEFT on a tiny model, compressed losslessly (k = Σ r), and
either served equal to ``PeftModel.from_pretrained(original)`` within 1e-4, or refused by
``serve()`` with the adapter's name and the config value.  ``apply()`` goes through PEFT, so it
keeps computing what PEFT computes for all of them.  One definition decides:
:func:`lorashare.format.loraconfig.peft_features` (and ``module_scale`` for the scale).

Also here: the active adapter of a served model removed from the checkpoint, adapter names
with a dot in PEFT (apply, load_into, subspace_model, refit), and the resolver cache keyed by
the revision it read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict

import pytest
import torch

from lorashare import SHAREModel
from lorashare.errors import AdapterError, ConfigError, UnknownAdapterError
from lorashare.format.loraconfig import (
    PEFT_DEFAULT_ALPHA,
    check_forward,
    engine_features,
    module_scale,
    peft_features,
)
from tests.conftest import load_state, tiny_bert
from tests.test_serve import randomize_lora, tiny_llama

peft = pytest.importorskip("peft")

TOL = 1e-4
warnings.filterwarnings("ignore", message=".*(attention mask|pad token|fan_in_fan_out|Could not find a config|"
                        "eva_config|init_lora_weights|aLoRA|lora_ga|NoRA|orthogonal).*")

LLAMA_IDS = torch.randint(7, 96, (3, 9), generator=torch.Generator().manual_seed(11))
LLAMA_IDS[0, 3:5] = torch.tensor([5, 6])  # aLoRA's invocation tokens, in one row: the adapter acts from there on
BERT_IDS = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(12))


def make(make_base: Callable[[], torch.nn.Module], folder: Path, seed: int, **lora: Any) -> str:
    """A PEFT LoRA adapter of ``make_base()`` saved to ``folder``, factors (and biases) moved off their init."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(make_base(), LoraConfig(lora_dropout=0.0, **lora))
    randomize_lora(pm, seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and name.endswith(".bias"):  # bias="all" / "lora_only": trained biases
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    pm.save_pretrained(str(folder))
    return str(folder)


def edit_config(folder: str, **changes: Any) -> str:
    """Rewrite keys of ``folder``'s adapter_config.json (``None`` deletes the key)."""
    path = os.path.join(folder, "adapter_config.json")
    cfg = json.loads(Path(path).read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    Path(path).write_text(json.dumps(cfg))
    return folder


def lossless(dirs: Dict[str, str]) -> SHAREModel:
    return SHAREModel.from_adapters(dirs, num_components=16, progress=False)  # ≥ Σ r of every module: lossless


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_logits(make_base: Callable[[], torch.nn.Module], folder: str, ids: torch.Tensor) -> torch.Tensor:
    return logits(peft.PeftModel.from_pretrained(make_base(), folder).eval(), ids)


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------ the table: served equal, or refused
REFUSED = {  # name: (base, LoRA options, the value named in the refusal)
    "pissa": (tiny_llama, dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "olora": (tiny_llama, dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    "alora": (tiny_llama, dict(alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"), "alora_invocation_tokens=[5, 6]"),
    "bias_lora_only": (tiny_bert, dict(bias="lora_only"), "bias='lora_only'"),
    "bias_all": (tiny_bert, dict(bias="all"), "bias='all'"),
}
TARGETS = {tiny_llama: ["q_proj", "v_proj"], tiny_bert: ["query", "value"]}


@pytest.mark.parametrize("name", list(REFUSED))
def test_serve_refuses_what_peft_computes_otherwise_and_apply_matches_peft(name, tmp_path):
    from safetensors.torch import save_file

    base, options, value = REFUSED[name]
    ids = LLAMA_IDS if base is tiny_llama else BERT_IDS
    folder = make(base, tmp_path / name, 1, r=4, lora_alpha=8, target_modules=TARGETS[base], **options)
    partner = make(base, tmp_path / "plain", 2, r=4, lora_alpha=8, target_modules=TARGETS[base])
    share = lossless({name: folder, "plain": partner})
    want = peft_logits(base, folder, ids)
    with pytest.raises(AdapterError, match=rf"adapter '{name}': its adapter_config.json has {re.escape(value)}") as e:
        share.serve(base())
    assert e.value.adapter == name and "share.apply" in str(e.value)
    # Served without it, or asked for the plain one only: the others still serve.
    served = share.serve(base(), adapters=["plain"])
    assert diff(logits(served, ids), peft_logits(base, partner, ids)) <= TOL
    # apply() is PEFT itself: it computes what PEFT computes for this config.
    assert diff(logits(share.apply(base(), name), ids), want) <= TOL
    # The refusal is needed: the same factors as plain LoRA (W x + s·B·A x, what serve() computes) are
    # another model.
    naive = edit_config(shutil.copytree(folder, tmp_path / f"{name}-naive"), init_lora_weights=True, bias="none",
                        alora_invocation_tokens=None)
    save_file({k: v for k, v in load_state(naive).items() if "lora_" in k},
              os.path.join(naive, "adapter_model.safetensors"))
    gap = diff(peft_logits(base, naive, ids), want)
    logging.getLogger(__name__).info("%s: served as plain LoRA it would differ from PEFT by %.3g", name, gap)
    assert gap > 1e-3, gap


def test_an_adapter_config_without_lora_alpha_is_served_with_peft_default(tmp_path):
    """PEFT's LoraConfig default alpha (8) stands in for a missing one; serving once assumed alpha = r."""
    assert peft.LoraConfig().lora_alpha == PEFT_DEFAULT_ALPHA  # the installed PEFT agrees with lorashare
    folder = edit_config(make(tiny_llama, tmp_path / "noalpha", 1, r=16, lora_alpha=32, target_modules=["q_proj"]),
                         lora_alpha=None)
    partner = make(tiny_llama, tmp_path / "plain", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    share = SHAREModel.from_adapters({"noalpha": folder, "plain": partner}, num_components=20, progress=False)
    assert "lora_alpha" not in share.adapter_configs["noalpha"]
    assert module_scale(share.adapter_configs["noalpha"], "model.layers.0.self_attn.q_proj", 16) == 8 / 16
    want = peft_logits(tiny_llama, folder, LLAMA_IDS)
    served = share.serve(tiny_llama())
    got = logits(served, LLAMA_IDS)
    assert diff(got, want) <= TOL, diff(got, want)
    assert diff(logits(tiny_llama(), LLAMA_IDS), want) > 100 * TOL  # the adapter does move the outputs
    # The engine folder says lora_alpha explicitly (vLLM requires it), and PEFT loads it to the same outputs.
    from lorashare.serving.export import export_adapters

    out = export_adapters(share.state, str(tmp_path / "exp"), ["noalpha"], progress=False)["noalpha"]
    assert json.loads(Path(out, "adapter_config.json").read_text())["lora_alpha"] == 8
    assert diff(peft_logits(tiny_llama, out, LLAMA_IDS), want) <= TOL


PLAIN_INITS = ["gaussian", "orthogonal", "eva", "nora", "mica", "lora_ga", False]


@pytest.mark.parametrize("init", PLAIN_INITS)
def test_inits_that_touch_only_the_factors_are_served_equal_to_peft(init, tmp_path):
    """PeftModel.from_pretrained replaces the init's factors by the saved ones and keeps the base weight."""
    folder = make(tiny_llama, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                  init_lora_weights=init)
    partner = make(tiny_llama, tmp_path / "plain", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    share = lossless({"a": folder, "plain": partner})
    assert peft_features(share.adapter_configs["a"]) == []
    got = logits(share.serve(tiny_llama()), LLAMA_IDS)
    assert diff(got, peft_logits(tiny_llama, folder, LLAMA_IDS)) <= TOL


def _untied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_lm_head_lora_is_served_and_a_changed_lm_head_weight_refused(tmp_path):
    """PEFT saves lm_head's own weight (``lm_head.base_layer.weight``) with a LoRA on lm_head and loads it back."""
    from safetensors.torch import save_file

    folder = make(_untied_llama, tmp_path / "head", 1, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    assert "base_model.model.lm_head.base_layer.weight" in load_state(folder)
    partner = make(_untied_llama, tmp_path / "plain", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    share = lossless({"head": folder, "plain": partner})
    served = share.serve(_untied_llama())
    rows = ["head", "plain", "__base__"]
    with torch.no_grad():
        got = served(input_ids=LLAMA_IDS, adapter_names=rows).logits
    want = peft_logits(_untied_llama, folder, LLAMA_IDS)
    assert diff(got[0], want[0]) <= TOL and diff(got[1], peft_logits(_untied_llama, partner, LLAMA_IDS)[1]) <= TOL
    assert diff(got[2], logits(_untied_llama(), LLAMA_IDS)[2]) <= TOL
    # An lm_head trained too (the saved weight is not the base model's): PEFT loads it, serve() cannot.
    changed = shutil.copytree(folder, tmp_path / "changed")
    sd = load_state(changed)
    sd["base_model.model.lm_head.base_layer.weight"] = sd["base_model.model.lm_head.base_layer.weight"] + 0.5
    save_file(sd, os.path.join(changed, "adapter_model.safetensors"))
    assert diff(peft_logits(_untied_llama, changed, LLAMA_IDS), want) > 1e-2
    other = lossless({"changed": changed, "plain": partner})
    with pytest.raises(AdapterError, match=r"adapter 'changed': its tensor 'base_model\.model\.lm_head\.base_layer\."
                                           r"weight' replaces lm_head\.weight of the base model") as e:
        other.serve(_untied_llama())
    assert "not a parameter" not in str(e.value) and e.value.layer == "lm_head"
    assert diff(logits(other.apply(_untied_llama(), "changed"), LLAMA_IDS),
                peft_logits(_untied_llama, changed, LLAMA_IDS)) <= TOL


# ------------------------------------------------------------------ the one definition, value by value
@pytest.mark.parametrize("config,keys", [
    ({"r": 4, "lora_alpha": 8}, []),
    ({"r": 4, "init_lora_weights": "pissa_niter_4"}, ["init_lora_weights"]),
    ({"r": 4, "init_lora_weights": "corda"}, ["init_lora_weights"]),
    ({"r": 4, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, ["init_lora_weights"]),
    ({"r": 4, "init_lora_weights": "a-new-init"}, ["init_lora_weights"]),
    ({"r": 4, "use_dora": True}, ["use_dora"]),
    ({"r": 4, "lora_bias": True}, ["lora_bias"]),
    ({"r": 4, "target_parameters": ["experts.gate_up_proj"]}, ["target_parameters"]),
    ({"r": 4, "layer_replication": [[0, 2], [1, 2]]}, ["layer_replication"]),
    ({"r": 4, "trainable_token_indices": [3, 4]}, ["trainable_token_indices"]),
    ({"r": 4, "megatron_config": {"tp": 2}}, ["megatron_config"]),
    ({"r": 4, "lora_alpha": None}, ["lora_alpha"]),
    ({"r": 4, "a_future_peft_option": True}, ["a_future_peft_option"]),
    ({"r": 4, "a_future_peft_option": None, "eva_config": {"rho": 2}, "megatron_core": "megatron.core",
      "use_rslora": True, "rank_pattern": {"q": 8}, "modules_to_save": ["classifier"]}, []),
])
def test_peft_features_name_what_changes_the_forward(config, keys):
    assert [f.key for f in peft_features(config)] == keys
    if keys:
        with pytest.raises(AdapterError, match=rf"adapter 'x': its adapter_config.json has {keys[0]}="):
            check_forward(config, "x")
    else:
        check_forward(config, "x")


def test_every_field_of_the_installed_lora_config_is_classified():
    """A new PEFT field is a decision: plain (changes nothing served), or a feature that is refused."""
    from lorashare.format import loraconfig

    known = loraconfig._PLAIN_KEYS | set(loraconfig._FORWARD_KEYS)
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields <= known, sorted(fields - known)
    # Defaults are not features: a config PEFT saves for plain LoRA serves.
    assert peft_features(json.loads(json.dumps(peft.LoraConfig(r=4).to_dict(), default=list))) == []


def test_engine_features_add_per_module_scales_an_engine_does_not_have():
    ranks = {"l.0.q": 8, "l.0.v": 2}
    assert engine_features({"r": 2, "lora_alpha": 4}, ranks) == []
    # rank_pattern: PEFT scales q by 4/8, vLLM every module by 4/2.
    (f,) = engine_features({"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 8}}, ranks)
    assert f.key == "rank_pattern" and "module l.0.q has scale 0.5" in f.why
    # An alpha_pattern that keeps every scale equal is what vLLM computes too.
    assert engine_features({"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 8}, "alpha_pattern": {"q": 16}}, ranks) == []
    (f,) = engine_features({"r": 2, "lora_alpha": 4, "alpha_pattern": {"v": 1}}, {"l.0.q": 2, "l.0.v": 2})
    assert f.key == "alpha_pattern"
    with pytest.raises(AdapterError, match=r"adapter 'x': .*rank_pattern=.*vLLM scales every module"):
        check_forward({"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 8}}, "x", engine=True, ranks=ranks)


# ------------------------------------------------------------------ export and the resolver
@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A checkpoint with a plain adapter, a PiSSA one and one whose rank_pattern gives q_proj its own scale."""
    root = tmp_path_factory.mktemp("mixed")
    dirs = {
        "plain": make(tiny_llama, root / "plain", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "pissa": make(tiny_llama, root / "pissa", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      init_lora_weights="pissa"),
        "pattern": make(tiny_llama, root / "pattern", 3, r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                        rank_pattern={"q_proj": 6}),
    }
    share = SHAREModel.from_adapters(dirs, num_components=16, progress=False)
    ckpt = root / "ckpt"
    share.save_pretrained(ckpt)
    return share, dirs, ckpt


def test_export_refuses_adapters_an_engine_would_compute_otherwise(mixed, tmp_path):
    from lorashare.serving.export import export_adapters

    share, dirs, _ = mixed
    with pytest.raises(AdapterError, match=r"adapter 'pissa': its adapter_config.json has init_lora_weights='pissa'"):
        export_adapters(share.state, str(tmp_path / "a"), progress=False)
    assert not (tmp_path / "a").exists()  # refused before anything is written
    with pytest.raises(AdapterError, match=r"adapter 'pattern': .*rank_pattern=\{'q_proj': 6\}"):
        export_adapters(share.state, str(tmp_path / "b"), ["plain", "pattern"], progress=False)
    out = export_adapters(share.state, str(tmp_path / "c"), ["plain"], progress=False)["plain"]
    assert diff(peft_logits(tiny_llama, out, LLAMA_IDS), peft_logits(tiny_llama, dirs["plain"], LLAMA_IDS)) <= TOL
    # serve() has no per-module scale problem: the patterned adapter is served equal to PEFT.
    served = share.serve(tiny_llama(), adapters=["plain", "pattern"])
    with torch.no_grad():
        got = served(input_ids=LLAMA_IDS[:2], adapter_names=["pattern", "plain"]).logits
    assert diff(got[0], peft_logits(tiny_llama, dirs["pattern"], LLAMA_IDS[:2])[0]) <= TOL


def test_resolver_refuses_them_by_name_and_serves_the_rest(mixed, tmp_path, caplog):
    from lorashare.serving.cache import AdapterCache, parse_checkpoints
    from lorashare.serving.vllm_plugin import SHAREResolver

    share, _, ckpt = mixed
    cache = AdapterCache(parse_checkpoints(f"mix={ckpt}"), str(tmp_path / "cache"))
    with pytest.raises(AdapterError, match=r"adapter 'pissa': its adapter_config.json has init_lora_weights='pissa'"):
        cache.folder_for("mix/pissa")
    resolver = SHAREResolver(cache)
    with caplog.at_level(logging.ERROR, logger="lorashare.serving.vllm_plugin"):
        assert resolver.folder("tiny-llama-for-tests", "mix/pattern") is None
    assert "cannot resolve mix/pattern: adapter 'pattern'" in caplog.text and "rank_pattern" in caplog.text
    folder = resolver.folder("tiny-llama-for-tests", "mix/plain")
    assert folder is not None
    got = load_state(folder)
    assert all(torch.equal(got[k], v) for k, v in share.reconstruct("plain").items())
    assert not [p for p in Path(tmp_path / "cache").iterdir() if p.name.startswith(("pissa-", "pattern-"))]


# ------------------------------------------------------------------ the active adapter removed
def test_a_removed_active_adapter_is_an_error_not_another_adapters_output(adapter_dirs):
    share = SHAREModel.from_adapters({"a": adapter_dirs[1], "b": adapter_dirs[3], "c": adapter_dirs[2]},
                                     num_components=12, progress=False)
    served = share.serve(tiny_bert())
    served.set_adapter("c")
    before = logits(served, BERT_IDS)
    assert served.active_adapter == "c"
    share.remove_adapter("c")
    msg = r"the active adapter 'c' was removed; call set_adapter\(\.\.\.\) with one of \['a', 'b', '__base__'\]"
    with pytest.raises(UnknownAdapterError, match=msg) as e:
        served(input_ids=BERT_IDS)
    assert e.value.adapter == "c"
    with pytest.raises(UnknownAdapterError, match=msg):
        served.active_adapter  # noqa: B018
    assert "'c (no longer served)'" in repr(served)
    # Rows that name their adapter are served; set_adapter picks another one.
    with torch.no_grad():
        rows = served(input_ids=BERT_IDS, adapter_names=["a", "b", "__base__"]).logits
    assert diff(rows[2], logits(tiny_bert(), BERT_IDS)[2]) <= TOL
    served.set_adapter("a")
    assert diff(logits(served, BERT_IDS), logits(share.apply(tiny_bert(), "a"), BERT_IDS)) <= TOL
    assert diff(before, logits(served, BERT_IDS)) > 10 * TOL
    # Left out by refresh(adapters=...): said so.
    served.refresh(adapters=["b"])
    with pytest.raises(UnknownAdapterError, match=r"'a' is no longer served \(refresh\(adapters=\.\.\.\) left it out\)"):
        served(input_ids=BERT_IDS)


# ------------------------------------------------------------------ names with a dot in PEFT
@pytest.fixture(scope="module")
def dotted(adapter_dirs):
    return SHAREModel.from_adapters({"billing-v1.2": adapter_dirs[0], "refunds": adapter_dirs[1]},
                                    num_components=8, progress=False)


def test_dotted_names_apply_and_load_into_under_an_underscore_alias(dotted, adapter_dirs):
    from lorashare.serving.peftload import peft_name

    assert peft_name("billing-v1.2") == "billing-v1_2"
    pm = dotted.apply(tiny_bert(), "billing-v1.2")
    assert list(pm.peft_config) == ["billing-v1_2"] and pm.active_adapter == "billing-v1_2"
    want = peft_logits(tiny_bert, adapter_dirs[0], BERT_IDS)
    assert diff(logits(pm, BERT_IDS), want) <= TOL
    both = dotted.load_into(tiny_bert(), ["refunds", "billing-v1.2"])
    assert set(both.peft_config) == {"refunds", "billing-v1_2"}
    both.set_adapter("billing-v1_2")
    assert diff(logits(both, BERT_IDS), want) <= TOL
    # serve() keeps the name as it is.
    served = dotted.serve(tiny_bert())
    with torch.no_grad():
        got = served(input_ids=BERT_IDS, adapter_names=["billing-v1.2"] * 3).logits
    assert diff(got, want) <= TOL


def test_two_names_that_meet_in_peft_are_refused_by_name(adapter_dirs):
    share = SHAREModel.from_adapters({"a.b": adapter_dirs[1], "a_b": adapter_dirs[3]}, num_components=8,
                                     progress=False)
    with pytest.raises(ConfigError, match=r"adapters 'a\.b' and 'a_b' would both be 'a_b' in PEFT"):
        share.load_into(tiny_bert(), ["a.b", "a_b"])
    pm = share.apply(tiny_bert(), "a.b")
    with pytest.raises(ConfigError, match=r"adapter 'a_b' would be 'a_b' in PEFT, which this PeftModel already holds"):
        share.load_into(pm, ["a_b"])


def test_dotted_names_train_in_the_subspace_and_refit(adapter_dirs):
    share = SHAREModel.from_adapters({"billing-v1.2": adapter_dirs[0], "refunds": adapter_dirs[1]},
                                     num_components=8, progress=False)
    model = share.subspace_model(tiny_bert(), "new-v2.0", r=2, seed=0)
    assert list(model.peft_config) == ["new-v2_0"]
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_" in n:
                p.add_(0.1)
    want = logits(model.eval(), BERT_IDS)
    share.add_trained(model)
    assert "new-v2.0" in share.adapter_names
    assert diff(logits(share.apply(tiny_bert(), "new-v2.0"), BERT_IDS), want) <= TOL
    batches = [{"input_ids": BERT_IDS, "attention_mask": torch.ones_like(BERT_IDS)}]
    report = share.refit("billing-v1.2", batches, base_model=tiny_bert(), epochs=1, lr=1e-3, progress=False)
    assert report["adapter_name"] == "billing-v1.2"


# ------------------------------------------------------------------ the resolver cache: one revision
def test_cache_names_a_folder_by_the_revision_it_read(adapter_dirs, tmp_path, monkeypatch):
    """A local checkpoint re-saved between the config read and the rebuild: the folder holds what its name says."""
    from lorashare.format.schema import read_config
    from lorashare.serving import cache as cache_mod
    from lorashare.serving.cache import AdapterCache, content_key, parse_checkpoints

    first = SHAREModel.from_adapters({"x": adapter_dirs[1], "y": adapter_dirs[3]}, num_components=8, progress=False)
    second = SHAREModel.from_adapters({"x": adapter_dirs[3], "y": adapter_dirs[1]}, num_components=8, progress=False)
    ckpt = tmp_path / "ckpt"
    first.save_pretrained(ckpt)
    old_key = content_key(read_config(str(ckpt)), "x", "float32")
    real = cache_mod.load_checkpoint
    saves = []

    def resave_first(folder, **kw):  # the concurrent save lands after the config was read, before any tensor
        if not saves:
            saves.append(1)
            second.save_pretrained(ckpt, overwrite=True)
        return real(folder, **kw)

    monkeypatch.setattr(cache_mod, "load_checkpoint", resave_first)
    cache = AdapterCache(parse_checkpoints(f"c={ckpt}"), str(tmp_path / "cache"))
    folder = cache.folder_for("c/x")
    new_key = content_key(read_config(str(ckpt)), "x", "float32")
    assert new_key != old_key and Path(folder).name == f"x-{new_key[:20]}"
    got = load_state(folder)
    assert all(torch.equal(got[k], v) for k, v in second.reconstruct("x").items())
    assert not Path(tmp_path / "cache", f"x-{old_key[:20]}").exists()  # nothing under the old revision's name
    # Re-saved between the bases and the adapter: the revision there now is read whole, under its own name.
    first.save_pretrained(ckpt, overwrite=True)
    calls = []

    def resave_after_bases(folder, **kw):
        calls.append(kw.get("adapters"))
        if kw.get("adapters") == []:
            out = real(folder, **kw)
            second.save_pretrained(ckpt, overwrite=True)
            return out
        return real(folder, **kw)

    monkeypatch.setattr(cache_mod, "load_checkpoint", resave_after_bases)
    fresh = AdapterCache(parse_checkpoints(f"c={ckpt}"), str(tmp_path / "cache2"))
    folder = fresh.folder_for("c/y")
    key = content_key(read_config(str(ckpt)), "y", "float32")
    assert Path(folder).name == f"y-{key[:20]}" and calls[0] == []
    got = load_state(folder)
    assert all(torch.equal(got[k], v) for k, v in second.reconstruct("y").items())
