#!/usr/bin/env python
"""Learning in the shared subspace on real tasks: new tasks, refit, and continual additions.

    python benchmarks/subspace.py            # the full run (~1 h on 2 cores, most of it training)
    python benchmarks/subspace.py --quick    # 3 new tasks, 1 refit, 2 additions: a smoke run

Same base model, tasks, splits and LoRA recipe as ``benchmarks/fidelity.py`` (its trained adapters
are reused from ``benchmarks/.cache/fidelity``): all-MiniLM-L6-v2, LoRA r=8 alpha=16 on
query/value, an 8-output head trained through ``modules_to_save``, 2 epochs, batch 16, AdamW with
6% warm-up then linear decay, max length 64.

**1. A new task trained in the subspace.**  For each new task T, a checkpoint is compressed from
the 8 *other* tasks' LoRAs (``num_components=K``, float32) and T is trained in it with
``share.subspace_model(base, T)`` (only the loadings and the head train), against a LoRA on the
same data, same r, same batches in the same order and the same number of steps.  Each method
gets two learning rates and keeps the better one (LoRA: 3e-3, the fidelity adapters, and 1e-3;
subspace: 1e-2 and 3e-2, fewer parameters taking larger steps).  The trained subspace adapter is added to the checkpoint
(``add_trained``), saved, loaded and applied with ``share.apply``: its test predictions are
compared with the trained model's.  New tasks are the tasks whose LoRA beats the majority class by
at least 5 points (the others would measure nothing).  Parameters are counted as PEFT counts them
(``requires_grad``), the head included on both sides.

**Speed.** Both models train on the same 40 batches, one step of each in turn (after 5 warm-up
steps of each), in one process; the table gives the median seconds per optimizer step.

**2. Refit.**  All 9 LoRAs compressed at 1/32 of their LoRA bytes in nf4 (``target_ratio=32``;
the tensor bytes of bases and loadings are checked against 1/32 of the LoRA tensors), then
``share.refit(name, batches, base_model=...)`` on the first 500 *unlabelled* training inputs of
each task.  Accuracy and agreement with the original adapter's predictions are measured on the
held-out test split, before and after.

**3. Continual.**  A checkpoint of 4 LoRAs (k=K, float32); 5 more tasks are trained in the
subspace and added one by one (1 epoch each, lr 1e-2).  After each addition the checkpoint is
saved and loaded again, and every earlier adapter is rebuilt and compared bit for bit
(``torch.equal``) with its rebuild before any addition; its files' sha256 are compared too.

Results: ``benchmarks/results/subspace-<date>[-quick].{json,md}``; trained runs are cached under
``benchmarks/.cache/subspace`` (delete it to retrain).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import fidelity as F  # noqa: E402  (first: it sets the offline environment)
from benchmarks import realtasks as rt  # noqa: E402
from lorashare import SHAREModel  # noqa: E402
from lorashare.training import trainable_parameters  # noqa: E402

log = logging.getLogger("subspace")

CACHE = REPO / "benchmarks" / ".cache" / "subspace"
RESULTS = REPO / "benchmarks" / "results"
K = 20  # components per module and side: ours trains 2·(K+K)·r per layer, LoRA 2·(384+384)·r
LORA_LRS = (3e-3, 1e-3)
OURS_LRS = (1e-2, 3e-2)
REFIT_INPUTS = 500
REFIT = {"epochs": 6, "lr": 5e-3, "temperature": 2.0, "anchor": 0.3, "hidden": 1.0}  # refit's defaults
CONTINUAL_BASE = ["polarity", "fine_foods", "multiemo-hotels", "fact_checker"]
CONTINUAL_NEW = ["multiemo-reviews", "strategyqa", "winowhy", "sports_understanding", "intent_recognition"]
VERSION = 1  # bump to retrain every cached run


def _hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _cached(key: Dict[str, Any], compute) -> Dict[str, Any]:
    path = CACHE / "runs" / f"{key['kind']}-{key.get('task', '')}-{_hash({**key, 'v': VERSION})}.json"
    hit = F._read_json(path)
    if hit is not None:
        return hit
    res = compute()
    F._write_json(path, res)
    return res


def _acc_agree(pred: Sequence[int], gold: Sequence[int], ref: Sequence[int]) -> Dict[str, float]:
    return {"accuracy": F._acc(pred, gold), "agreement": F._acc(pred, ref)}


def _steps(n_train: int, setup: F.Setup) -> int:
    return setup.epochs * -(-n_train // setup.batch_size)


# ───────────────────────────── 1. new tasks ─────────────────────────────
def loo_share(task: str, adapters: Dict[str, Path]) -> SHAREModel:
    others = {n: str(p) for n, p in adapters.items() if n != task}
    return SHAREModel.from_adapters(others, num_components=K, progress=False)


def lora_run(task: str, lr: float, split: Dict[str, Any], setup: F.Setup, adapters: Dict[str, Path],
             originals: Dict[str, Any]) -> Dict[str, Any]:
    if lr == setup.lr:  # the fidelity adapter: same recipe
        meta = F._read_json(adapters[task] / "train_meta.json") or {}
        return {"accuracy": originals[task]["accuracy"], "lr": lr, "train_seconds": meta.get("train_seconds"),
                "steps": _steps(len(split["train"].texts), setup), "trainable": _lora_trainable(),
                "predictions": originals[task]["predictions"], "source": str(adapters[task].relative_to(REPO))}

    def compute() -> Dict[str, Any]:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(F.init_seed(task))
        model = get_peft_model(rt.load_base(F.HEAD_LABELS), LoraConfig(
            r=setup.r, lora_alpha=2 * setup.r, target_modules=["query", "value"], task_type="SEQ_CLS",
            modules_to_save=["classifier"]))
        t0 = time.time()
        times = rt.fit(model, split["train"], epochs=setup.epochs, lr=lr, batch_size=setup.batch_size,
                       init_seed=F.init_seed(task), max_length=setup.max_length, schedule=setup.schedule)
        pred = F._predict(model, split["test"], setup)
        return {"accuracy": F._acc(pred, split["test"].labels), "lr": lr, "train_seconds": time.time() - t0,
                "steps": len(times), "step_median": statistics.median(times),
                "trainable": trainable_parameters(model)[0], "predictions": pred}

    return _cached({"kind": "lora", "task": task, "lr": lr, "data": split["data_hash"], "setup": setup.__dict__},
                   compute)


def _lora_trainable() -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(rt.load_base(F.HEAD_LABELS), LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]))
    return trainable_parameters(model)[0]


def ours_run(task: str, lr: float, split: Dict[str, Any], setup: F.Setup, adapters: Dict[str, Path]) -> Dict[str, Any]:
    def compute() -> Dict[str, Any]:
        share = loo_share(task, adapters)
        model = share.subspace_model(rt.load_base(F.HEAD_LABELS), task, modules_to_save=["classifier"],
                                     seed=F.init_seed(task))
        trainable = trainable_parameters(model)[0]
        t0 = time.time()
        times = rt.fit(model, split["train"], epochs=setup.epochs, lr=lr, batch_size=setup.batch_size,
                       init_seed=F.init_seed(task), max_length=setup.max_length, schedule=setup.schedule)
        secs = time.time() - t0
        pred = F._predict(model, split["test"], setup)
        report = share.add_trained(model)
        with tempfile.TemporaryDirectory() as tmp:
            share.save_pretrained(tmp)
            loaded = SHAREModel.from_pretrained(tmp)
        stored = F._predict(loaded.apply(rt.load_base(F.HEAD_LABELS), task), split["test"], setup)
        return {"accuracy": F._acc(pred, split["test"].labels), "lr": lr, "train_seconds": secs, "steps": len(times),
                "step_median": statistics.median(times), "trainable": trainable, "predictions": pred,
                "stored_accuracy": F._acc(stored, split["test"].labels), "stored_agreement": F._acc(stored, pred),
                "add_method": report["method"], "k": K, "checkpoint_adapters": sorted(a for a in adapters if a != task)}

    return _cached({"kind": "ours", "task": task, "lr": lr, "k": K, "data": split["data_hash"],
                    "others": sorted(str(p.name) for n, p in adapters.items() if n != task), "setup": setup.__dict__},
                   compute)


def step_speed(task: str, split: Dict[str, Any], setup: F.Setup, adapters: Dict[str, Path], n: int = 40) -> Dict[str, Any]:
    """Median seconds per optimizer step, LoRA and subspace interleaved on the same batches."""
    from peft import LoraConfig, get_peft_model

    tok = rt.tokenizer()
    data = list(rt.batches(tok, split["train"], setup.batch_size, setup.max_length, shuffle_seed=0))[: n + 5]
    lora = get_peft_model(rt.load_base(F.HEAD_LABELS), LoraConfig(
        r=setup.r, lora_alpha=2 * setup.r, target_modules=["query", "value"], task_type="SEQ_CLS",
        modules_to_save=["classifier"]))
    ours = loo_share(task, adapters).subspace_model(rt.load_base(F.HEAD_LABELS), task, modules_to_save=["classifier"])
    models = {"lora": lora, "ours": ours}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}
    times: Dict[str, List[float]] = {"lora": [], "ours": []}
    n_labels = split["train"].num_labels
    for i, (enc, y) in enumerate(data):
        for key in (("lora", "ours") if i % 2 == 0 else ("ours", "lora")):
            m, opt = models[key], opts[key]
            m.train()
            t0 = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(m(**enc).logits[:, :n_labels], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 5:
                times[key].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"task": task, "steps_each": len(times["lora"]), "lora_median_s": med["lora"], "ours_median_s": med["ours"],
            "ratio": med["ours"] / med["lora"]}


# ───────────────────────────── 2. refit ─────────────────────────────
def refit_all(adapters: Dict[str, Path], splits: Dict[str, Dict[str, Any]], originals: Dict[str, Any],
              setup: F.Setup, tasks: Sequence[str]) -> Dict[str, Any]:
    def compute() -> Dict[str, Any]:
        share = SHAREModel.from_adapters({n: str(p) for n, p in adapters.items()}, dtype="nf4", target_ratio=32,
                                         progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            share.save_pretrained(tmp)
            nbytes = F.checkpoint_bytes(Path(tmp))
        lora_bytes = sum(F.lora_bytes(p) for p in adapters.values())
        tok = rt.tokenizer()
        per: Dict[str, Any] = {}
        for name in tasks:
            split = splits[name]
            ref = originals[name]["predictions"]
            gold = split["test"].labels
            before = F._predict(share.apply(rt.load_base(F.HEAD_LABELS), name), split["test"], setup)
            inputs = rt.Task(name, split["train"].texts[:REFIT_INPUTS], [0] * min(REFIT_INPUTS, len(split["train"].texts)))
            batches = [enc for enc, _ in rt.batches(tok, inputs, setup.batch_size, setup.max_length)]
            t0 = time.time()
            n_labels = split["test"].num_labels  # the head has 8 outputs; the task reads its first n_labels
            rep = share.refit(name, batches, base_model=rt.load_base(F.HEAD_LABELS), progress=False,
                              select=lambda out: out.logits[:, :n_labels], **REFIT)
            secs = time.time() - t0
            after = F._predict(share.apply(rt.load_base(F.HEAD_LABELS), name), split["test"], setup)
            orig = originals[name]["accuracy"]
            b, a = _acc_agree(before, gold, ref), _acc_agree(after, gold, ref)
            per[name] = {"original_accuracy": orig, "before": b, "after": a,
                         "retained_before": b["accuracy"] / orig, "retained_after": a["accuracy"] / orig,
                         "report": rep, "refit_seconds": secs, "inputs": rep["inputs"]}
            log.info("refit %-22s acc %.3f → %.3f (orig %.3f)  agree %.3f → %.3f  ΔW %.3f → %.3f  %.0f s", name,
                     b["accuracy"], a["accuracy"], orig, b["agreement"], a["agreement"], rep["delta_w_error_before"],
                     rep["delta_w_error_after"], secs)
        return {"bytes": nbytes, "lora_bytes": lora_bytes, "fraction": nbytes["files_bytes"] / lora_bytes, "tasks": per,
                "settings": {"dtype": "nf4", "target_ratio": 32, **REFIT, "inputs_per_task": REFIT_INPUTS}}

    return _cached({"kind": "refit", "adapters": sorted(p.name for p in adapters.values()), "tasks": list(tasks),
                    "refit": REFIT, "n": REFIT_INPUTS, "setup": setup.__dict__}, compute)


# ───────────────────────────── 3. continual ─────────────────────────────
def _sha(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "README.md" and p.parent != folder}


def continual(adapters: Dict[str, Path], splits: Dict[str, Dict[str, Any]], setup: F.Setup,
              base: Sequence[str], new: Sequence[str]) -> Dict[str, Any]:
    share = SHAREModel.from_adapters({n: str(adapters[n]) for n in base}, num_components=K, progress=False)
    first = {n: share.reconstruct(n) for n in base}
    bases = {k: v.clone() for k, v in share.components.items()}
    steps = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        share.save_pretrained(folder)
        files = {n: _sha(folder / "adapters" / n) for n in base}
        for name in new:
            split = splits[name]
            torch.manual_seed(0)  # dropout draws from the global generator: the same for every run
            model = share.subspace_model(rt.load_base(F.HEAD_LABELS), name, modules_to_save=["classifier"], seed=0)
            rt.fit(model, split["train"], epochs=1, lr=1e-2, batch_size=setup.batch_size, init_seed=0,
                   max_length=setup.max_length, schedule=setup.schedule)
            acc = F._acc(F._predict(model, split["test"], setup), split["test"].labels)
            share.add_trained(model)
            share.save_pretrained(folder)
            share = SHAREModel.from_pretrained(folder)
            first[name] = share.reconstruct(name)
            files[name] = _sha(folder / "adapters" / name)
            earlier = [n for n in first if n != name]
            same = {n: all(torch.equal(first[n][k], v) for k, v in share.reconstruct(n).items()) and
                    set(first[n]) == set(share.reconstruct(n)) for n in earlier}
            same_files = {n: _sha(folder / "adapters" / n) == files[n] for n in earlier}
            bases_same = set(share.components) == set(bases) and all(
                torch.equal(share.components[k], v) for k, v in bases.items())
            steps.append({"added": name, "accuracy": acc, "earlier": len(earlier),
                          "earlier_bit_identical": all(same.values()), "earlier_files_identical": all(same_files.values()),
                          "bases_identical": bases_same, "adapters_now": len(share.adapter_names)})
            log.info("continual: added %s (acc %.3f); %d earlier adapters bit-identical: %s", name, acc, len(earlier),
                     all(same.values()))
    return {"base": list(base), "added": list(new), "k": K, "steps": steps,
            "all_bit_identical": all(s["earlier_bit_identical"] and s["earlier_files_identical"] and s["bases_identical"]
                                     for s in steps)}


# ───────────────────────────── report ─────────────────────────────
def _pct(x: Optional[float], d: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{d}f}"


def markdown(rep: Dict[str, Any]) -> str:
    lines = [f"### Learning in the shared subspace ({rep['date']}; {rep['environment']['cpus']} CPUs, "
             f"torch {rep['environment']['torch']}; this invocation {rep['run_seconds'] / 60:.0f} min, trained runs and "
             "refits read from the cache when they were there)", ""]
    nt = rep["new_tasks"]
    lines += [f"**New tasks** (checkpoint of the 8 other tasks' LoRAs, k={K}; best of two learning rates each; "
              "test accuracy, %):", "",
              "| task | train/test | steps | LoRA acc (lr) | subspace acc (lr) | ratio | stored = trained |",
              "|---|---|---|---|---|---|---|"]
    for t, r in nt["tasks"].items():
        lines.append(f"| {t} | {r['n_train']}/{r['n_test']} | {r['steps']} | {_pct(r['lora']['accuracy'])} "
                     f"({r['lora']['lr']:g}) | {_pct(r['ours']['accuracy'])} ({r['ours']['lr']:g}) | "
                     f"{_pct(r['ratio'])} | {_pct(r['ours']['stored_agreement'])} |")
    s = nt["summary"]
    rows = nt["tasks"]
    acc = {m: statistics.mean(r[m]["accuracy"] for r in rows.values()) for m in ("lora", "ours")}
    below = [t for t, r in rows.items() if r["ratio"] < 0.97]
    best = max(rows, key=lambda t: rows[t]["ratio"])
    rest = [r["ratio"] for t, r in rows.items() if t != best]
    lines += ["", f"Mean accuracy: LoRA {_pct(acc['lora'])}%, subspace {_pct(acc['ours'])}% "
              f"(**{_pct(acc['ours'] / acc['lora'])}%** of LoRA's; goal ≥ 97%: "
              f"{'met' if acc['ours'] >= 0.97 * acc['lora'] else 'missed'}). Mean of the per-task ratios "
              f"{_pct(s['mean_ratio'])}%, median {_pct(statistics.median(r['ratio'] for r in rows.values()))}%, "
              f"worst {_pct(s['min_ratio'])}%; without {best} (ratio {_pct(rows[best]['ratio'])}%) the mean ratio is "
              f"{_pct(statistics.mean(rest))}%. Below 97%: {', '.join(below) or 'none'}. Trainable parameters: LoRA "
              f"{s['lora_trainable']:,}, subspace {s['ours_trainable']:,} (**1/{s['lora_trainable'] / s['ours_trainable']:.1f}**, "
              f"head included; goal ≤ 1/10: {'met' if s['ours_trainable'] * 10 <= s['lora_trainable'] else 'missed'})."]
    sp = rep["speed"]
    lines += [f"Per optimizer step ({sp['task']}, {sp['steps_each']} interleaved steps each): LoRA "
              f"{1000 * sp['lora_median_s']:.0f} ms, subspace {1000 * sp['ours_median_s']:.0f} ms "
              f"(**{sp['ratio']:.2f}×**; goal ≤ 1: {'met' if sp['ratio'] <= 1.0 else 'missed'}).", ""]
    rf = rep["refit"]
    st = rf["settings"]
    lines += [f"**Refit** (all 9 tasks at {_pct(rf['fraction'], 2)}% of the LoRA bytes, nf4; {st['inputs_per_task']} "
              f"unlabelled training inputs per task, {st['epochs']} epochs, lr {st['lr']:g}, KL at temperature "
              f"{st['temperature']:g} + hidden states ×{st['hidden']:g} + ΔW anchor ×{st['anchor']:g}; "
              "held-out test split, %):", "",
              "| task | original acc | acc before → after | retained before → after | agreement before → after | ΔW error before → after |",
              "|---|---|---|---|---|---|"]
    for t, r in rf["tasks"].items():
        rp = r["report"]
        lines.append(f"| {t}{'' if t in rep['eligible'] else ' *'} | {_pct(r['original_accuracy'])} | "
                     f"{_pct(r['before']['accuracy'])} → {_pct(r['after']['accuracy'])} | {_pct(r['retained_before'])} → "
                     f"{_pct(r['retained_after'])} | {_pct(r['before']['agreement'])} → {_pct(r['after']['agreement'])} | "
                     f"{rp['delta_w_error_before']:.3f} → {rp['delta_w_error_after']:.3f} |")
    s = rf["summary"]
    lines += ["", "\\* within 5 points of the majority class: left out of the retention mean (kept in agreement).",
              f"Retained (eligible tasks): before {_pct(s['retained_before'])}%, after **{_pct(s['retained_after'])}%** "
              f"(worst {_pct(s['retained_after_min'])}%; goals ≥ 99% / ≥ 98%: "
              f"{'met' if s['retained_after'] >= 0.99 and s['retained_after_min'] >= 0.98 else 'missed'}). Agreement (all "
              f"tasks): before {_pct(s['agreement_before'])}%, after **{_pct(s['agreement_after'])}%** (worst "
              f"{_pct(s['agreement_after_min'])}%; goal ≥ 98%: {'met' if s['agreement_after'] >= 0.98 else 'missed'}).", ""]
    c = rep["continual"]
    lines += [f"**Continual**: {len(c['base'])} LoRAs, then {len(c['added'])} tasks trained in the subspace and added one "
              f"by one ({', '.join(c['added'])}); after every addition (saved and loaded) each earlier adapter rebuilt "
              f"bit for bit and its files byte for byte: **{'yes' if c['all_bit_identical'] else 'NO'}**."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 new tasks, 1 refit, 2 additions")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, help="only print (and rewrite the .md of) an earlier run's JSON")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.report:
        md = markdown(json.loads(args.report.read_text()))
        args.report.with_suffix(".md").write_text(md)
        print(md)
        return 0
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("lorashare", "peft", "transformers", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    date = datetime.date.today().isoformat()
    setup = F.Setup(tasks=F.ALL_TASKS)
    splits = F.load_splits(setup)
    adapters = {n: F.ensure_adapter(n, splits[n], setup) for n in setup.tasks}
    originals = {n: F.evaluate_original(n, adapters[n], splits[n], setup) for n in setup.tasks}
    eligible = F.eligible(originals)
    new_tasks = eligible[:3] if args.quick else eligible

    rows: Dict[str, Any] = {}
    for t in new_tasks:
        split = splits[t]
        loras = [lora_run(t, lr, split, setup, adapters, originals) for lr in LORA_LRS]
        ours = [ours_run(t, lr, split, setup, adapters) for lr in OURS_LRS]
        best_l, best_o = max(loras, key=lambda r: r["accuracy"]), max(ours, key=lambda r: r["accuracy"])
        rows[t] = {"n_train": len(split["train"].texts), "n_test": len(split["test"].texts), "steps": best_o["steps"],
                   "lora": {k: v for k, v in best_l.items() if k != "predictions"},
                   "ours": {k: v for k, v in best_o.items() if k != "predictions"},
                   "all_lora": [{k: v for k, v in r.items() if k != "predictions"} for r in loras],
                   "all_ours": [{k: v for k, v in r.items() if k != "predictions"} for r in ours],
                   "ratio": best_o["accuracy"] / best_l["accuracy"]}
        log.info("%-22s LoRA %.3f (lr %g)  subspace %.3f (lr %g)  ratio %.3f", t, best_l["accuracy"], best_l["lr"],
                 best_o["accuracy"], best_o["lr"], rows[t]["ratio"])
    ratios = [r["ratio"] for r in rows.values()]
    new_summary = {"mean_ratio": sum(ratios) / len(ratios), "min_ratio": min(ratios),
                   "lora_trainable": next(iter(rows.values()))["lora"]["trainable"],
                   "ours_trainable": next(iter(rows.values()))["ours"]["trainable"]}
    speed = step_speed(new_tasks[0], splits[new_tasks[0]], setup, adapters)
    log.info("speed: LoRA %.0f ms, subspace %.0f ms per step (%.2f×)", 1000 * speed["lora_median_s"],
             1000 * speed["ours_median_s"], speed["ratio"])

    refit_tasks = [eligible[0]] if args.quick else list(setup.tasks)
    rf = refit_all(adapters, splits, originals, setup, refit_tasks)
    el = [t for t in rf["tasks"] if t in eligible]
    rf["summary"] = {
        "retained_before": statistics.mean(rf["tasks"][t]["retained_before"] for t in el),
        "retained_after": statistics.mean(rf["tasks"][t]["retained_after"] for t in el),
        "retained_after_min": min(rf["tasks"][t]["retained_after"] for t in el),
        "agreement_before": statistics.mean(r["before"]["agreement"] for r in rf["tasks"].values()),
        "agreement_after": statistics.mean(r["after"]["agreement"] for r in rf["tasks"].values()),
        "agreement_after_min": min(r["after"]["agreement"] for r in rf["tasks"].values()),
    }
    cont = continual(adapters, splits, setup, CONTINUAL_BASE, CONTINUAL_NEW[:2] if args.quick else CONTINUAL_NEW)

    report = {
        "benchmark": "subspace", "date": date, "quick": args.quick, "run_seconds": time.time() - t_start,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "peft": __import__("peft").__version__, "transformers": __import__("transformers").__version__,
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.machine()},
        "setup": setup.__dict__, "k": K, "lora_lrs": LORA_LRS, "ours_lrs": OURS_LRS, "eligible": eligible,
        "originals": {n: {k: v for k, v in o.items() if k != "predictions"} for n, o in originals.items()},
        "new_tasks": {"tasks": rows, "summary": new_summary}, "speed": speed, "refit": rf, "continual": cont,
    }
    out = args.out or RESULTS / f"subspace-{date}{'-quick' if args.quick else ''}.json"
    F._write_json(out, report)
    md = markdown(report)
    out.with_suffix(".md").write_text(md)
    print(md)
    log.info("wrote %s in %.0f min", out, (time.time() - t_start) / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
