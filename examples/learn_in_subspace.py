#!/usr/bin/env python
"""Learn a new task in a SHARE checkpoint's subspace with transformers.Trainer, then refit an adapter.

    python examples/learn_in_subspace.py --checkpoint acme/support-share --base-model BASE \\
        --train refunds.csv --name refunds --refit billing --output ckpt

``--train`` is a CSV file with ``text`` and ``label`` columns (label: an integer class).  The new
adapter ``--name`` trains only its loadings over the checkpoint's frozen bases plus a new
classifier head; it is added to the checkpoint exactly as trained.  ``--refit NAME`` then trains
that existing adapter's loadings to reproduce its original adapter's outputs on the first
``--refit-inputs`` texts of the CSV (their labels are not used).  The result is saved to
``--output`` (a SHARE checkpoint; ``lorashare export`` turns its adapters into PEFT folders).

``--tiny`` runs the same steps offline in seconds: the bundled ``examples/adapters`` (a tiny,
randomly initialised BERT) and a toy word-hash tokenizer instead of a real one.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import zlib
from typing import Callable, Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def read_csv(path: str) -> Dict[str, list]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"text", "label"} <= set(rows[0]):
        raise SystemExit(f"{path}: expected a CSV with 'text' and 'label' columns")
    return {"text": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]}


def word_hash_tokenizer(vocab: int = 100, length: int = 16) -> Callable[[List[str]], Dict[str, torch.Tensor]]:
    """The --tiny stand-in for a tokenizer: each word to an id by CRC-32 (deterministic)."""
    def encode(texts: List[str]) -> Dict[str, torch.Tensor]:
        ids = torch.zeros(len(texts), length, dtype=torch.long)
        mask = torch.zeros(len(texts), length, dtype=torch.long)
        for i, t in enumerate(texts):
            words = [1 + zlib.crc32(w.encode()) % (vocab - 1) for w in t.split()][:length]
            ids[i, : len(words)], mask[i, : len(words)] = torch.tensor(words), 1
        return {"input_ids": ids, "attention_mask": mask}
    return encode


class Encoded(torch.utils.data.Dataset):
    """Tokenized texts with labels, as Trainer reads them."""

    def __init__(self, enc: Dict[str, torch.Tensor], labels: Sequence[int]) -> None:
        self.enc, self.labels = enc, torch.tensor(list(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="SHARE checkpoint: a folder or a Hub repo id")
    ap.add_argument("--base-model", help="the base model (folder or Hub id) the adapters were trained on")
    ap.add_argument("--train", help="CSV with text,label columns for the new task")
    ap.add_argument("--name", default="refunds", help="the new adapter's name (default: refunds)")
    ap.add_argument("--refit", metavar="NAME", help="an existing adapter to refit on the CSV's texts")
    ap.add_argument("--refit-inputs", type=int, default=500, help="texts used by the refit (default: 500)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-2, help="learning rate of the loadings (default: 1e-2)")
    ap.add_argument("--output", required=True, help="folder to save the updated checkpoint to")
    ap.add_argument("--tiny", action="store_true", help="offline demo on the bundled tiny adapters")
    args = ap.parse_args(argv)

    from transformers import Trainer, TrainingArguments

    from lorashare import SHAREModel

    work = args.output.rstrip("/") + "-trainer"  # Trainer's checkpoints: resume_from_checkpoint works on them
    if args.tiny:
        sys.path.insert(0, os.path.dirname(HERE))
        from examples.make_adapters import tiny_bert

        share = SHAREModel.from_adapters([os.path.join(HERE, "adapters", f"task{i}") for i in range(4)],
                                         num_components=4)
        tokenize = word_hash_tokenizer()
        load_base = lambda: tiny_bert(num_labels=3)  # noqa: E731
        refit = args.refit or "task0"
        if not args.train:
            words = "refund charge card late parcel broken thanks hello order invoice".split()
            g = torch.Generator().manual_seed(0)
            texts = [" ".join(words[int(j)] for j in torch.randint(0, len(words), (8,), generator=g)) for _ in range(64)]
            data = {"text": texts, "label": [int("refund" in t) + int("broken" in t) for t in texts]}
        else:
            data = read_csv(args.train)
    else:
        if not (args.checkpoint and args.base_model and args.train):
            ap.error("--checkpoint, --base-model and --train are required (or --tiny)")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        share = SHAREModel.from_pretrained(args.checkpoint)
        tok = AutoTokenizer.from_pretrained(args.base_model)
        tokenize = lambda texts: tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")  # noqa: E731
        data = read_csv(args.train)
        n_labels = max(data["label"]) + 1
        load_base = lambda: AutoModelForSequenceClassification.from_pretrained(args.base_model, num_labels=n_labels)  # noqa: E731
        refit = args.refit

    # 1. A new task, trained in the subspace: only its loadings and its new head learn.
    model = share.subspace_model(load_base(), args.name, modules_to_save=["classifier"], seed=0)
    model.print_trainable_parameters()
    train = Encoded(tokenize(data["text"]), data["label"])
    targs = TrainingArguments(work, num_train_epochs=args.epochs, per_device_train_batch_size=16,
                              learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.06,
                              save_strategy="epoch", report_to=[], logging_steps=10, use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=targs, train_dataset=train).train()
    report = share.add_trained(model)
    print(f"added {report['adapter_name']}: {report['reason']}")

    # 2. Refit an existing adapter on unlabelled inputs: its outputs move back towards its original's.
    if refit:
        texts = data["text"][: args.refit_inputs]
        batches = [tokenize(texts[i : i + 16]) for i in range(0, len(texts), 16)]
        rep = share.refit(refit, batches, base_model=load_base())
        print(f"refit {refit}: agreement with the original {rep['agreement_before']:.1%} → {rep['agreement_after']:.1%}, "
              f"ΔW error {rep['delta_w_error_before']:.3f} → {rep['delta_w_error_after']:.3f} "
              f"({rep['inputs']} inputs, {rep['steps']} steps)")

    share.save_pretrained(args.output)
    print(f"saved {args.output}: {', '.join(share.adapter_names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
