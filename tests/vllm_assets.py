"""A tiny Llama and three LoRA adapters for it, made offline, for the vLLM tests and benchmark.

The base model is built from a config with random weights and a byte-level BPE tokenizer
trained here on generated text, so nothing is downloaded.  Its head size (64) is one vLLM's CPU
attention supports.  The adapters target q/k/v/o with mixed ranks (4, 8, 16) and rsLoRA on one,
with B drawn at random (not PEFT's zeros) so that each adapter changes the greedy completions.

Run it alone to make the files: ``python -m tests.vllm_assets OUT``.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Dict, List

import torch

HIDDEN = 128
HEADS = 2  # head size 64
VOCAB = 384
ADAPTERS: Dict[str, Dict] = {
    "alpha": {"r": 8, "lora_alpha": 16, "use_rslora": False, "seed": 1},
    "beta": {"r": 4, "lora_alpha": 8, "use_rslora": False, "seed": 2},
    "gamma": {"r": 16, "lora_alpha": 4, "use_rslora": True, "seed": 3},  # rsLoRA: scale alpha / sqrt(r)
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPTS: List[str] = [
    "the quick brown fox", "once upon a time", "a model of the sea", "red green blue",
    "the river runs", "tell me about stars",
]
_WORDS = ("the quick brown fox jumps over a lazy dog once upon time there was model of sea red green blue river "
          "runs tell me about stars light night day sun moon tree stone water fire wind cloud rain snow road").split()


def _corpus(n: int = 4000) -> List[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]


def make_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer of :data:`VOCAB` tokens, trained on generated text, saved for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)


def make_base(folder: str) -> str:
    """The base model (float32 safetensors) and its tokenizer in ``folder``; return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    make_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=256,
                      initializer_range=0.08, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      torch_dtype="float32")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_adapter(base: str, folder: str, name: str) -> str:
    """Adapter ``name`` of :data:`ADAPTERS` for the model at ``base``, saved by PEFT into ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    spec = ADAPTERS[name]
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"], use_rslora=spec["use_rslora"], target_modules=TARGETS,
                     lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(spec["seed"])
    pm = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(100 + spec["seed"])
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    pm.save_pretrained(folder)
    return folder


def make_all(root: str) -> Dict[str, str]:
    """The base and the three adapters under ``root``: ``{"base": path, name: path, ...}``."""
    paths = {"base": make_base(os.path.join(root, "base"))}
    for name in ADAPTERS:
        paths[name] = make_adapter(paths["base"], os.path.join(root, "adapters", name), name)
    return paths


if __name__ == "__main__":  # pragma: no cover - a helper for running things by hand
    print(json.dumps(make_all(sys.argv[1] if len(sys.argv) > 1 else "vllm-assets"), indent=2))
