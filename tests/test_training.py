"""Learning in the shared subspace: new adapters trained as loadings, add_trained, refit, Trainer.

All on the tiny BERT of ``examples/make_adapters.py`` (no downloads); the real-task numbers are
``benchmarks/subspace.py``'s.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from examples.make_adapters import make_adapter, tiny_bert
from lorashare import SHAREModel
from lorashare.errors import AdapterError, ConfigError, DuplicateAdapterError, TrainingError
from lorashare.training import stored_as, trainable_parameters

peft = pytest.importorskip("peft")


def _batch(seed: int = 0, n: int = 6, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, length), generator=g),
            "attention_mask": torch.ones(n, length, dtype=torch.long)}


def _labels(seed: int = 0, n: int = 6):
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed + 100))


def _train(model, steps: int = 4, lr: float = 5e-2, seed: int = 0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**_batch(seed + i)).logits, _labels(seed + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.fixture(scope="module")
def strong_dirs(tmp_path_factory):
    """Adapters whose update moves the outputs visibly (lora_B ×30), so a refit has something to match."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("strong")
    out = []
    for i in range(4):
        folder = make_adapter(str(root / f"s{i}"), seed=i, head=(i % 2 == 0))
        path = os.path.join(folder, "adapter_model.safetensors")
        save_file({k: v * 30 if "lora_B" in k else v for k, v in load_file(path).items()}, path)
        out.append(folder)
    return out


@pytest.fixture
def share(adapter_dirs):
    return SHAREModel.from_adapters(adapter_dirs, num_components=6, progress=False)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------- what trains
def test_only_the_loadings_and_the_head_require_grad(share):
    model = share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing trains"
    for n in trainable:
        assert n.endswith("parametrizations.weight.original") and ".new." in n or "modules_to_save.new." in n, n
    n_loadings = [n for n in trainable if "parametrizations" in n]
    assert len(n_loadings) == len([k for k in share.components]), "one loading per module and side"
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "parametrizations" in n}
    assert shapes == {(6, 4)}, shapes  # k × r, the checkpoint's k and the adapters' rank
    # The bases are buffers, not parameters, and PEFT never saves them.
    assert not any("basis" in n for n, _ in model.named_parameters())
    assert not any("basis" in k for k in peft.get_peft_model_state_dict(model, adapter_name="new"))
    n_train, n_all = trainable_parameters(model)
    assert n_train == sum(p.numel() for n, p in model.named_parameters() if n in trainable) < n_all / 10


def test_target_modules_limit_what_trains(share):
    model = share.subspace_model(tiny_bert(), "new", target_modules=["value"], seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad and "parametrizations" in n]
    assert names and all(".value." in n for n in names)
    with pytest.raises(ConfigError, match="key.*match no module|match no module"):
        share.subspace_model(tiny_bert(), "new2", target_modules=["key"])


def test_a_step_changes_only_the_trainable_tensors(share):
    model = share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=0)
    before = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    _train(model, steps=1)
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, t in before.items() if not torch.equal(t, after[n])}
    assert changed, "the step changed nothing"
    assert changed <= trainable, sorted(changed - trainable)
    # lora_A starts random and lora_B at zero, as LoRA does: both loadings move once B has moved.
    assert any("lora_B" in n for n in changed)


def test_the_untrained_model_computes_the_base_model(share):
    base = tiny_bert()
    want = _logits(copy.deepcopy(base), _batch())
    model = share.subspace_model(base, "new", seed=0)
    assert torch.equal(_logits(model, _batch()), want)  # B starts at zero
    model_a = share.subspace_model(tiny_bert(), "other", init_zero="A", seed=0)
    assert torch.allclose(_logits(model_a, _batch()), want)
    weights = [p for n, p in model_a.named_parameters() if "lora_B" in n and "parametrizations" in n]
    assert all(float(w.abs().sum()) > 0 for w in weights)


def test_options_reach_the_lora_config(share):
    model = share.subspace_model(tiny_bert(), "new", r=2, lora_alpha=5, lora_dropout=0.1, use_rslora=True, seed=0)
    cfg = model.peft_config["new"]
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora) == (2, 5, 0.1, True)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "parametrizations" in n}
    assert shapes == {(6, 2)}
    _train(model, steps=2)
    report = share.add_trained(model)
    assert report["rank"] == 2 and share.adapter_configs["new"]["lora_alpha"] == 5
    assert share.adapter_configs["new"]["use_rslora"] is True


# ---------------------------------------------------------------- adding what was trained
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "nf4"])
def test_saved_loaded_rebuilt_adapter_computes_the_trained_model(adapter_dirs, tmp_path, dtype):
    share = SHAREModel.from_adapters(adapter_dirs, num_components=6, dtype=dtype, progress=False)
    model = _train(share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=1), steps=5)
    batch = _batch(7)
    want = _logits(model, batch)
    assert not torch.allclose(want, _logits(tiny_bert(), batch), atol=1e-3), "training changed nothing"
    report = share.add_trained(model)
    assert report["method"] == "trained" and report["delta_w_error_max"] < 1e-6
    share.save_pretrained(tmp_path / "ckpt")
    loaded = SHAREModel.from_pretrained(tmp_path / "ckpt")
    assert torch.allclose(_logits(loaded.apply(tiny_bert(), "new"), batch), want, atol=1e-5)
    # ... and as a standard PEFT folder.
    loaded.reconstruct("new", tmp_path / "peft_new")
    pm = peft.PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "peft_new"))
    assert torch.allclose(_logits(pm, batch), want, atol=1e-5)


def test_stored_as_is_what_the_checkpoint_decodes():
    L = torch.randn(7, 3)
    from lorashare.format.storage import quantize

    for scheme in ("int8", "nf4"):
        assert torch.equal(stored_as(L, scheme), quantize(L, scheme).value())
    assert torch.equal(stored_as(L, "float16"), L.half().float())
    L.requires_grad_(True)
    stored_as(L, "nf4").sum().backward()
    assert torch.equal(L.grad, torch.ones_like(L))  # straight through


def test_adding_changes_no_other_adapter_and_no_basis(share, tmp_path):
    share.save_pretrained(tmp_path / "ckpt")
    before = {n: share.reconstruct(n) for n in share.adapter_names}
    bases = {k: v.clone() for k, v in share.components.items()}
    files = {n: (tmp_path / "ckpt" / "adapters" / n / "loadings.safetensors").read_bytes() for n in share.adapter_names}
    for i in range(3):  # continual: one after another, each saved and loaded
        model = _train(share.subspace_model(tiny_bert(), f"new{i}", seed=i), steps=2, seed=i)
        share.add_trained(model)
        share.save_pretrained(tmp_path / "ckpt")
        share = SHAREModel.from_pretrained(tmp_path / "ckpt")
        for n, sd in before.items():
            again = share.reconstruct(n)
            assert set(again) == set(sd) and all(torch.equal(again[k], v) for k, v in sd.items()), n
            assert (tmp_path / "ckpt" / "adapters" / n / "loadings.safetensors").read_bytes() == files[n]
        assert set(share.components) == set(bases) and all(torch.equal(share.components[k], v) for k, v in bases.items())
        before[f"new{i}"] = share.reconstruct(f"new{i}")
        files[f"new{i}"] = (tmp_path / "ckpt" / "adapters" / f"new{i}" / "loadings.safetensors").read_bytes()
    assert share.adapter_names[-3:] == ["new0", "new1", "new2"]


def test_a_trained_adapter_is_served_in_a_mixed_batch(share):
    model = _train(share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], seed=2), steps=3)
    batch = _batch(3, n=4)
    want = _logits(model, batch)
    share.add_trained(model)
    other = _logits(share.apply(tiny_bert(), "task0"), batch)
    served = share.serve(tiny_bert())
    with torch.no_grad():
        out = served(**batch, adapter_names=["new", "task0", "new", "task0"]).logits
    assert torch.allclose(out[[0, 2]], want[[0, 2]], atol=1e-5)
    assert torch.allclose(out[[1, 3]], other[[1, 3]], atol=1e-5)


def test_rank_updates_train_extra_directions_and_refit_the_bases(adapter_dirs):
    share = SHAREModel.from_adapters(adapter_dirs, num_components=6, progress=False)
    old = {n: share.reconstruct(n) for n in share.adapter_names}
    model = share.subspace_model(tiny_bert(), "new", rank_updates=2, seed=0)
    extra = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".extra")]
    assert len(extra) == len(share.components)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if "parametrizations.weight.original" in n}
    assert shapes == {(8, 4)}  # k + 2 rows
    _train(model, steps=3)
    from lorashare.training import trained_factors

    factors = trained_factors(model)
    report = share.add_trained(model)
    assert report["method"] == "recompute" and "rank updates" in report["reason"]
    rebuilt = share.reconstruct("new")
    from lorashare.peft.adapters import lora_key

    # k=6 < N·r: the refit bases are lossy, but they now hold the new adapter's own directions.
    err = [float(((rebuilt[lora_key(m, "B")] @ rebuilt[lora_key(m, "A")]) - B @ A).norm() / (B @ A).norm())
           for m, (A, B) in factors.items()]
    assert max(err) < 0.9
    assert any(not torch.equal(share.reconstruct(n)[k], v) for n, sd in old.items() for k, v in sd.items()), \
        "a recompute re-projects the others"


# ---------------------------------------------------------------- transformers.Trainer
def test_trainer_checkpoint_and_resume_give_the_uninterrupted_result(share, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Data(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.randint(0, 100, (32, 10), generator=g)
            self.y = torch.randint(0, 3, (32,), generator=g)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": self.y[i]}

    def run(out, resume=None):
        model = share.subspace_model(tiny_bert(), "new", modules_to_save=["classifier"], lora_dropout=0.1, seed=0)
        args = TrainingArguments(str(out), max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                                 learning_rate=1e-2, save_steps=4, report_to=[], bf16=True, use_cpu=True, seed=0,
                                 disable_tqdm=True, logging_steps=100)
        Trainer(model=model, args=args, train_dataset=Data()).train(resume_from_checkpoint=resume)
        return model

    whole = run(tmp_path / "a")
    assert (tmp_path / "a" / "checkpoint-4").is_dir()
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-4"))
    trained = {n: p for n, p in whole.named_parameters() if p.requires_grad}
    start = share.subspace_model(tiny_bert(), "x", modules_to_save=["classifier"], seed=0)
    moved = [n for n, p in start.named_parameters() if p.requires_grad and "lora_B" in n]
    assert all(float(trained[n.replace(".x.", ".new.")].abs().sum()) > 0 for n in moved), "Trainer trained nothing"
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[n]), n
    share.add_trained(resumed)
    assert "new" in share.adapter_names


# ---------------------------------------------------------------- refit
@pytest.mark.parametrize("dtype", ["float32", "nf4"])
def test_refit_matches_the_original_better_and_changes_nothing_else(strong_dirs, dtype, tmp_path):
    adapter_dirs = strong_dirs
    share = SHAREModel.from_adapters(adapter_dirs, num_components=2, dtype=dtype, progress=False)  # very lossy
    name = share.adapter_names[0]
    others = {n: share.reconstruct(n) for n in share.adapter_names if n != name}
    bases = {k: v.clone() for k, v in share.components.items()}
    heads = {k: v.clone() for k, v in share.records[name].heads.items()}
    batches = [_batch(s, n=8) for s in range(6)]
    report = share.refit(name, batches, base_model=tiny_bert(), epochs=15, lr=1e-2, progress=False)
    assert report["kept"] and report["inputs"] == 48 and report["steps"] == 90
    assert report["loss_after"] < 0.7 * report["loss_before"]
    assert report["agreement_after"] >= report["agreement_before"]
    for key in ("delta_w_error_before", "delta_w_error_after"):
        assert 0 < report[key] < 10
    # the record's errors are the new ΔW errors, measured against the original
    assert sum(share.delta_w_errors[name].values()) / len(share.delta_w_errors[name]) == pytest.approx(
        report["delta_w_error_after"])
    for n, sd in others.items():
        again = share.reconstruct(n)
        assert all(torch.equal(again[k], v) for k, v in sd.items()), n
    assert all(torch.equal(share.components[k], v) for k, v in bases.items())
    assert all(torch.equal(share.records[name].heads[k], v) for k, v in heads.items())
    # and the refit adapter computes closer to the original on the inputs
    orig = peft.PeftModel.from_pretrained(tiny_bert(), adapter_dirs[0])
    refit = share.apply(tiny_bert(), name)
    before = SHAREModel.from_adapters(adapter_dirs, num_components=2, dtype=dtype, progress=False).apply(tiny_bert(), name)
    b = batches[0]
    assert (_logits(refit, b) - _logits(orig, b)).norm() < (_logits(before, b) - _logits(orig, b)).norm()
    # saved and loaded, the refit adapter computes what the refit measured (its storage was trained through)
    share.save_pretrained(tmp_path / "ckpt")
    again = SHAREModel.from_pretrained(tmp_path / "ckpt").apply(tiny_bert(), name)
    assert torch.allclose(_logits(again, b), _logits(refit, b), atol=1e-5)


def test_refit_leaves_the_base_model_as_it_was(adapter_dirs):
    share = SHAREModel.from_adapters(adapter_dirs, num_components=2, progress=False)
    base = tiny_bert()
    want = _logits(copy.deepcopy(base), _batch())
    share.refit(share.adapter_names[0], [_batch(1)], base_model=base, epochs=1, progress=False)
    assert not any(hasattr(m, "lora_A") for m in base.modules())
    assert torch.equal(_logits(base, _batch()), want)


def test_refit_needs_the_original_with_its_fingerprint(adapter_dirs, tmp_path):
    share = SHAREModel.from_adapters(adapter_dirs, num_components=2, progress=False)
    name = share.adapter_names[1]
    other = make_adapter(str(tmp_path / "other"), seed=99)
    with pytest.raises(TrainingError, match="not the adapter it was compressed from") as e:
        share.refit(name, [_batch()], base_model=tiny_bert(), original=other, progress=False)
    assert e.value.adapter == name
    share.set_source(name, "")
    with pytest.raises(TrainingError, match="original="):
        share.refit(name, [_batch()], base_model=tiny_bert(), progress=False)
    report = share.refit(name, [_batch()], base_model=tiny_bert(), original=adapter_dirs[1], epochs=2, progress=False)
    assert report["adapter_name"] == name
    with pytest.raises(ConfigError, match="empty"):
        share.refit(name, [], base_model=tiny_bert(), original=adapter_dirs[1])


# ---------------------------------------------------------------- bad input
def test_an_existing_name_is_refused_before_and_after_training(share):
    with pytest.raises(DuplicateAdapterError, match="already exists") as e:
        share.subspace_model(tiny_bert(), share.adapter_names[0])
    assert e.value.adapter == share.adapter_names[0]
    model = share.subspace_model(tiny_bert(), "new", seed=0)
    share.add_trained(model)
    with pytest.raises(DuplicateAdapterError, match="replace=True"):
        share.add_trained(model)
    assert share.add_trained(model, replace=True)["method"] == "trained"


def test_a_model_not_built_by_subspace_model_is_refused(share, adapter_dirs):
    pm = peft.PeftModel.from_pretrained(tiny_bert(), adapter_dirs[0])
    for bad in (pm, tiny_bert(), object()):
        with pytest.raises(TrainingError, match="subspace_model"):
            share.add_trained(bad)


def test_a_base_model_that_does_not_fit_is_refused(share):
    from transformers import BertConfig, BertForSequenceClassification

    wrong = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=48))
    with pytest.raises(AdapterError, match=r"expects 32 → 32 features.*48 → 48") as e:
        share.subspace_model(wrong, "new")
    assert e.value.layer and e.value.layer.endswith("query") or e.value.layer.endswith("value")
    used = share.subspace_model(tiny_bert(), "a", seed=0)
    with pytest.raises(TrainingError, match="PEFT LoRA layers"):
        share.subspace_model(used.get_base_model(), "b")


def test_bases_changed_since_training_are_refused(adapter_dirs):
    share = SHAREModel.from_adapters(adapter_dirs[:3], num_components=6, progress=False)
    model = _train(share.subspace_model(tiny_bert(), "new", seed=0), steps=1)
    share.add_adapter(adapter_dirs[3], force_recompute=True)
    with pytest.raises(TrainingError, match="not the one the model was trained on") as e:
        share.add_trained(model)
    assert e.value.layer
    assert "new" not in share.adapter_names


def test_bad_options_are_refused(share):
    for kwargs, match in [({"init_zero": "C"}, "init_zero"), ({"rank_updates": -1}, "rank_updates"),
                          ({"r": 0}, "r=0"), ({"target_modules": "query"}, "target_modules")]:
        with pytest.raises(ConfigError, match=match):
            share.subspace_model(tiny_bert(), "new", **kwargs)
    with pytest.raises(Exception, match="not allowed"):
        share.subspace_model(tiny_bert(), "../escape")


def test_the_worked_example_runs(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "learn_in_subspace.py"), "--tiny",
                          "--output", str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = SHAREModel.from_pretrained(tmp_path / "ckpt")
    assert "refunds" in loaded.adapter_names
    assert "added refunds" in out.stdout and "refit" in out.stdout


def test_gradient_accumulation_and_copies_see_fresh_factors(share):
    model = _train(share.subspace_model(tiny_bert(), "new", seed=0), steps=1)
    model.eval()  # no dropout: the two ways must see the same forward
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batches):
        for p in params:
            p.grad = None
        for i in batches:
            torch.nn.functional.cross_entropy(model(**_batch(i)).logits, _labels(i)).backward()
        return [p.grad.clone() for p in params]

    together = grads([1, 2])  # two micro-batches, one step: each forward builds its own graph
    apart = [a + b for a, b in zip(grads([1]), grads([2]))]
    assert all(torch.allclose(t, s, atol=1e-6) for t, s in zip(together, apart))
    twin = copy.deepcopy(model)  # after a forward with grad: no graph is copied
    assert torch.allclose(_logits(twin, _batch(3)), _logits(model, _batch(3)))
    with torch.no_grad():
        params[0].add_(1.0)  # an in-place change is seen by the next call
    assert not torch.allclose(_logits(twin, _batch(3)), _logits(model, _batch(3)))


def test_a_replaced_adapter_forgets_its_original(share, adapter_dirs):
    name = share.adapter_names[0]
    assert share.records[name].sha256  # compressed from an original
    share.remove_adapter(name)
    model = _train(share.subspace_model(tiny_bert(), name, seed=0), steps=2)
    share.add_adapter(adapter_dirs[0], name=name, variance_threshold=0.0)  # the original comes back (projected)
    share.add_trained(model, replace=True)
    rec = share.records[name]
    # a later recompute must rebuild it from its loadings, not from the original that has the recorded fingerprint
    assert rec.sha256 is None and rec.source == ""
