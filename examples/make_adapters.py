"""Make small real PEFT LoRA adapters of a tiny randomly initialised BERT (no downloads).

The bundled ``examples/adapters/`` were made with ``python examples/make_adapters.py``;
the tests use the same functions.  "Training" is simulated: lora_B (and the
classifier head, when there is one) get values away from PEFT's zero init,
with a part shared by every adapter, as real task adapters share structure.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

BASE_NAME = "tiny-bert-for-tests"


def tiny_bert(num_labels: int = 3, seed: int = 1234):
    """A 2-layer BERT for sequence classification (hidden 32), deterministic."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
    )
    model = BertForSequenceClassification(cfg)
    model.config._name_or_path = BASE_NAME
    model.name_or_path = BASE_NAME
    return model.eval()


def make_adapter(
    folder: str,
    *,
    seed: int,
    init_seed: Optional[int] = None,
    r: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = ("query", "value"),
    head: bool = False,
    base_name: str = BASE_NAME,
    shared: float = 0.7,
) -> str:
    """Save a PEFT LoRA adapter of :func:`tiny_bert` to ``folder`` and return it."""
    from peft import LoraConfig, get_peft_model

    base = tiny_bert()
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(target_modules),
        modules_to_save=["classifier"] if head else None,
        task_type="SEQ_CLS" if head else None,
    )
    torch.manual_seed(seed if init_seed is None else init_seed)
    pm = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    common = torch.Generator().manual_seed(999)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                c = torch.randn(p.shape, generator=common)
                p.copy_(0.1 * (shared * c + (1 - shared) * torch.randn(p.shape, generator=gen)))
            elif "lora_A" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    pm.peft_config["default"].base_model_name_or_path = base_name
    pm.save_pretrained(folder)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", default=os.path.join(os.path.dirname(__file__), "adapters"))
    p.add_argument("-n", type=int, default=4)
    args = p.parse_args()
    for i in range(args.n):
        folder = make_adapter(os.path.join(args.output, f"task{i}"), seed=i, init_seed=0, head=(i % 2 == 0))
        print(folder)


if __name__ == "__main__":
    main()
