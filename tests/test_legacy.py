"""A checkpoint in lorashare 0.1.x's documented layout loads and reconstructs identically.

The fixture is built here from the layout (share_config.json with 0.1.x fields,
shared_components.safetensors "<module>:<A|B>" → (d × k), adapters/<name>/
loadings.safetensors (k × r), classifier_head.safetensors, adapter_meta.json),
not with 0.1.x's code.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from lorashare import SHAREModel
from tests.conftest import tiny_bert


def _legacy_checkpoint(root, k=5, r=4):
    torch.manual_seed(0)
    modules = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    comps = {}
    for m in modules:
        for side in "AB":
            comps[f"{m}:{side}"] = torch.linalg.qr(torch.randn(32, k))[0].contiguous()
    os.makedirs(root)
    save_file(comps, os.path.join(root, "shared_components.safetensors"))
    cfg = {
        "share_version": "0.1.0", "num_components": k, "component_selection": "fixed", "variance_threshold": 0.95,
        "base_model_name_or_path": "tiny-bert-for-tests", "target_modules": ["query", "value"], "lora_rank": r,
        "lora_alpha": 8, "adapter_names": ["cola", "sst2"], "num_adapters": 2, "layer_keys": modules,
        "compression_stats": {"compression_ratio": 1.5},
    }
    json.dump(cfg, open(os.path.join(root, "share_config.json"), "w"))
    loads = {}
    for name in ("cola", "sst2"):
        d = os.path.join(root, "adapters", name)
        os.makedirs(d)
        loads[name] = {key: torch.randn(k, r) for key in comps}
        save_file(loads[name], os.path.join(d, "loadings.safetensors"))
        peft_cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["query", "value"],
                    "base_model_name_or_path": "tiny-bert-for-tests", "task_type": None}
        meta = {"adapter_name": name, "original_config": peft_cfg, "original_adapter_path": f"./{name}"}
        json.dump(meta, open(os.path.join(d, "adapter_meta.json"), "w"))
    head = {"base_model.model.classifier.weight": torch.randn(3, 32)}
    save_file(head, os.path.join(root, "adapters", "cola", "classifier_head.safetensors"))
    return comps, loads, head


def test_legacy_checkpoint_loads_and_reconstructs(tmp_path):
    comps, loads, head = _legacy_checkpoint(str(tmp_path / "old"))
    share = SHAREModel.from_pretrained(tmp_path / "old")
    assert share.adapter_names == ["cola", "sst2"]
    assert share.config.format_version == 0 and share.config.num_components == 5
    sd = share.reconstruct("cola")
    for key, U in comps.items():
        module, side = key.rsplit(":", 1)
        rec = U @ loads["cola"][key]
        want = rec.T if side == "A" else rec
        assert torch.equal(sd[f"base_model.model.{module}.lora_{side}.weight"], want.contiguous())
    assert torch.equal(sd["base_model.model.classifier.weight"], head["base_model.model.classifier.weight"])
    assert share.adapter_sources["cola"] == "./cola"
    # applies as a PeftModel and re-saves as format v1
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(share.apply(tiny_bert(), "sst2")(input_ids=x).logits).all()
    share.save_pretrained(tmp_path / "new")
    again = SHAREModel.from_pretrained(tmp_path / "new")
    assert again.config.format_version == 1
    assert all(torch.equal(again.reconstruct("cola")[k], sd[k]) for k in sd)
