"""A checkpoint whose config lies about its files is refused on load, whatever its hashes say.

A hostile Hub repo controls its sha256 fingerprints too, so every row here recomputes them: only
the checks of what ``share_config.json`` and ``adapter_meta.json`` claim (keys, k, shapes, ranks)
against the tensors, and of the decoded values, can catch it.  Table-driven, for float32, int8 and
nf4 checkpoints built with the public API:

- a refused row raises a LoraShareError subclass whose one-line message names the file, field or
  key; ``lorashare info`` and ``lorashare reconstruct`` exit 1 with one line on stderr; the bytes
  on disk are unchanged and no output folder is created;
- an accepted row rebuilds every adapter with finite values, the config's keys and shapes, and a
  config that PEFT loads (the loader's promise);
- a FIFO (or a folder) in place of any file that is read fails at once, never blocks (each runs in
  a thread with a deadline, and a hung one is released by opening the FIFO's other end).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import AdapterError, CheckpointError, IntegrityError, LoraShareError
from lorashare.format.loraconfig import pattern_value
from lorashare.format.schema import AdapterInfo, AdapterMeta, CompressionStats, SHAREConfig, validate
from lorashare.format.storage import NF4_BLOCK
from tests.conftest import tiny_bert

DTYPES = ("float32", "int8", "nf4")
NAME = "task1"  # the adapter most rows tamper with (no head)
HEADED = "task0"  # has a classifier head
BASES = "shared_components.safetensors"
DEADLINE = 20.0  # seconds a FIFO row may take before it counts as hung


# ============================================================================ checkpoints
@pytest.fixture(scope="module")
def saved(adapter_dirs, tmp_path_factory) -> Dict[str, Path]:
    """One small checkpoint per storage scheme: task0, task1, task2 (task0 and task2 with heads)."""
    root = tmp_path_factory.mktemp("hostile_ckpts")
    out = {}
    for dtype in DTYPES:
        out[dtype] = root / dtype
        SHAREModel.from_adapters(adapter_dirs[:3], num_components=3, dtype=dtype, progress=False).save_pretrained(out[dtype])
    return out


def _cfg(ck: Path) -> dict:
    return json.loads((ck / "share_config.json").read_text())


def _write_cfg(ck: Path, cfg: dict) -> None:
    """Write the config with every fingerprint recomputed, as a careful forger would."""
    for rel in cfg.get("files", {}):
        if (ck / rel).is_file():
            cfg["files"][rel] = hashlib.sha256((ck / rel).read_bytes()).hexdigest()
    (ck / "share_config.json").write_text(json.dumps(cfg))


def _rehash(ck: Path) -> None:
    _write_cfg(ck, _cfg(ck))


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _first(keys, side: str = "A", module: str = "") -> str:
    return sorted(k for k in keys if k.endswith(f":{side}") and module in k)[0]


# ---------------------------------------------------------------------------- packed files (format 2)
# An independent reader/writer of the packed layout (index rows: position in sorted k_per_group, c),
# so that a row can edit one tensor of an int8/nf4 file and write a file the loader parses.
Blocks = Dict[str, Tuple[torch.Tensor, torch.Tensor]]  # key → (codes (rows × c), scales)


def _unpack(t: Dict[str, torch.Tensor], kpg: Dict[str, int], scheme: str) -> Blocks:
    groups, out, at, sat = sorted(kpg), {}, 0, 0
    for g, c in t["index"].tolist():
        k = kpg[groups[g]]
        rows = k if scheme == "int8" else -(-k // 2)
        n, ns = rows * c, -(-k * c // NF4_BLOCK)
        out[groups[g]] = (t["codes"][at:at + n].reshape(rows, c).clone(), t["scales"][sat:sat + ns].clone())
        at, sat = at + n, sat + ns
    return out


def _pack(blocks: Blocks, kpg: Dict[str, int]) -> Dict[str, torch.Tensor]:
    pos = {g: i for i, g in enumerate(sorted(kpg))}
    keys = sorted(blocks, key=pos.__getitem__)
    return {"codes": torch.cat([blocks[k][0].reshape(-1) for k in keys]),
            "index": torch.tensor([[pos[k], blocks[k][0].shape[1]] for k in keys], dtype=torch.int32),
            "scales": torch.cat([blocks[k][1] for k in keys])}


# ---------------------------------------------------------------------------- edits
Edit = Callable[[Path, str], None]  # (checkpoint, dtype)


def tensors(rel: str, fn: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]) -> Edit:
    """Edit a safetensors file as its raw tensors (for packed files: codes, index, scales)."""
    def run(ck: Path, dtype: str) -> None:
        save_file(fn(load_file(str(ck / rel))), str(ck / rel))
        _rehash(ck)
    return run


def floats(rel: str, fn: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]) -> Edit:
    """Edit the float tensors of a float32 file (bases, loadings, heads)."""
    return tensors(rel, lambda t: fn({k: v.clone() for k, v in t.items()}))


def blocks(rel: str, fn: Callable[[Blocks], Blocks]) -> Edit:
    """Edit the per-key codes and scales of a packed int8/nf4 file."""
    def run(ck: Path, dtype: str) -> None:
        kpg = _cfg(ck)["k_per_group"]
        save_file(_pack(fn(_unpack(load_file(str(ck / rel)), kpg, dtype)), kpg), str(ck / rel))
        _rehash(ck)
    return run


def cfg_edit(fn: Callable[[dict], None]) -> Edit:
    def run(ck: Path, dtype: str) -> None:
        cfg = _cfg(ck)
        fn(cfg)
        _write_cfg(ck, cfg)
    return run


def meta_edit(fn: Callable[[dict], None], name: str = NAME) -> Edit:
    def run(ck: Path, dtype: str) -> None:
        p = ck / "adapters" / name / "adapter_meta.json"
        meta = json.loads(p.read_text())
        fn(meta)
        p.write_text(json.dumps(meta))
        _rehash(ck)
    return run


def both(*edits: Edit) -> Edit:
    def run(ck: Path, dtype: str) -> None:
        for e in edits:
            e(ck, dtype)
    return run


def _set_first(side: str, value: float) -> Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
    def fn(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        t[_first(t, side)].view(-1)[1] = value
        return t
    return fn


def _scale(factor: float, key_filter: Callable[[str], bool] = lambda k: True):
    def fn(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v * factor if key_filter(k) else v for k, v in t.items()}
    return fn


def _scales_to(value: float) -> Callable[[Blocks], Blocks]:
    return lambda b: {k: (codes, torch.full_like(sc, value)) for k, (codes, sc) in b.items()}


def _scales_times(factor: float) -> Callable[[Blocks], Blocks]:
    return lambda b: {k: (codes, sc * factor) for k, (codes, sc) in b.items()}


def _slice_rank(r: int, module: str = "query") -> Callable:
    """Both loadings of the first module named ``module`` cut to rank ``r`` (a float dict or packed blocks)."""
    def fn(t):
        for side in "AB":
            key = _first(t, side, module)
            v = t[key]
            # packed: (codes, scales); k·r ≤ 64 here, so the one block scale stays the one
            t[key] = (v[0][:, :r].contiguous(), v[1]) if isinstance(v, tuple) else v[:, :r].contiguous()
        return t
    return fn


def sliced(r: int) -> Edit:
    """A loading sliced to rank ``r`` in any storage."""
    def run(ck: Path, dtype: str) -> None:
        rel = f"adapters/{NAME}/loadings.safetensors"
        (floats(rel, _slice_rank(r)) if dtype == "float32" else blocks(rel, _slice_rank(r)))(ck, dtype)
    return run


def _add_first_keys(cfg: dict) -> None:
    """The issue's attack: two keys that sort first shift every packed index position."""
    cfg["k_per_group"] = {"0:A": 3, "0:B": 3, **cfg["k_per_group"]}


def _drop_kpg(cfg: dict) -> None:
    del cfg["k_per_group"][_first(cfg["k_per_group"], "B")]


def _rename_module(old: str, new: str, *, layer_keys: bool = False) -> Callable[[dict], None]:
    """Rename a module in k_per_group (its position in sorted order stays the same)."""
    def fn(cfg: dict) -> None:
        cfg["k_per_group"] = {k.replace(old, new): v for k, v in cfg["k_per_group"].items()}
        if layer_keys:
            cfg["layer_keys"] = [m.replace(old, new) for m in cfg["layer_keys"]]
    return fn


Q0 = "bert.encoder.layer.0.attention.self.query"


# ============================================================================ the table
@dataclass(frozen=True)
class Row:
    id: str
    edit: Edit
    error: Optional[Type[LoraShareError]]  # None: the checkpoint is valid and must load
    match: str = ""
    dtypes: Tuple[str, ...] = DTYPES
    adapter: str = NAME  # the adapter the CLI rebuilds


def _load_rel(name: str = NAME) -> str:
    return rf"adapters/{name}/loadings\.safetensors"


ROWS: List[Row] = [
    # ---- accepted: nothing the loader relies on is wrong
    Row("untouched", lambda ck, d: None, None),
    Row("rehashed-only", lambda ck, d: _rehash(ck), None),
    Row("k-per-group-reordered", cfg_edit(lambda c: c.update(k_per_group=dict(reversed(list(c["k_per_group"].items()))))), None),
    Row("unknown-top-level-field", cfg_edit(lambda c: c.update(written_by_a_newer_lorashare=1)), None),
    Row("compression-spec-valid", cfg_edit(lambda c: c.update(compression={"num_components": 3, "dtype": c["dtype"]})), None),
    Row("compression-spec-other-dtype", cfg_edit(lambda c: c.update(compression={
        "dtype": "bfloat16" if c["dtype"] != "bfloat16" else "float32"})), CheckpointError,
        r"share_config\.json: field 'compression\.dtype' is .*, expected the checkpoint's dtype"),
    Row("compression-spec-unknown-setting", cfg_edit(lambda c: c.update(compression={"chunk": 1})), CheckpointError,
        r"compression"),
    Row("int8-scales-rebalanced",  # the bases × 1e10, the loadings × 1e-10: the same factors, finite
        both(blocks(BASES, _scales_times(1e10)), *[blocks(f"adapters/{n}/loadings.safetensors", _scales_times(1e-10))
                                                    for n in ("task0", "task1", "task2")]), None, dtypes=("int8",)),
    # ---- non-finite values, after decoding
    Row("basis-nan", floats(BASES, _set_first("A", float("nan"))), CheckpointError,
        r"shared_components\.safetensors in .*: basis '.*query:A' holds NaN or infinite values", dtypes=("float32",)),
    Row("basis-inf", floats(BASES, _set_first("B", float("inf"))), CheckpointError,
        r"shared_components\.safetensors in .*: basis '.*query:B' holds NaN or infinite", dtypes=("float32",)),
    Row("loading-nan", floats(f"adapters/{NAME}/loadings.safetensors", _set_first("A", float("nan"))), CheckpointError,
        _load_rel() + r" in .*: loading '.*query:A' holds NaN or infinite values", dtypes=("float32",)),
    Row("basis-scales-3e38", blocks(BASES, _scales_to(3e38)), CheckpointError,
        r"shared_components\.safetensors in .*: basis '.*:A' holds NaN or infinite values once decoded \(codes × scales\)",
        dtypes=("int8",)),
    Row("loading-scales-3e38", blocks(f"adapters/{NAME}/loadings.safetensors", _scales_to(3e38)), CheckpointError,
        _load_rel() + r" in .*: loading '.*' holds NaN or infinite values once decoded", dtypes=("int8",)),
    Row("scales-3e38-everywhere",  # nf4 levels are ≤ 1, so each value is finite: their product is not
        both(blocks(BASES, _scales_to(3e38)), blocks("adapters/task0/loadings.safetensors", _scales_to(3e38))),
        CheckpointError, r"adapter 'task0': rebuilding '.*' from its basis and loading overflows float32", dtypes=("nf4",),
        adapter="task0"),
    Row("product-overflows", both(floats(BASES, _scale(1e30)), floats(f"adapters/{NAME}/loadings.safetensors", _scale(1e30))),
        CheckpointError, r"adapter 'task1': rebuilding '.*' from its basis and loading overflows float32", dtypes=("float32",)),
    Row("head-nan", floats(f"adapters/{HEADED}/classifier_head.safetensors", lambda t: {
        k: v.fill_(float("nan")) if k.endswith("weight") else v for k, v in t.items()}), CheckpointError,
        r"adapter 'task0': adapters/task0/classifier_head\.safetensors in .*: tensor '.*weight' holds NaN or infinite",
        adapter=HEADED),
    Row("head-named-like-a-factor", floats(f"adapters/{HEADED}/classifier_head.safetensors", lambda t: {
        **t, f"base_model.model.{Q0}.lora_A.weight": torch.zeros(4, 32)}), CheckpointError,
        r"classifier_head\.safetensors in .* holds 'base_model\.model\..*query\.lora_A\.weight', a LoRA factor's name",
        adapter=HEADED),
    # ---- keys of the config against the bases
    Row("k-per-group-two-keys-sorting-first", cfg_edit(_add_first_keys), CheckpointError,
        r"share_config\.json in .*: k_per_group names '.*', which has no basis in shared_components\.safetensors"),
    Row("k-per-group-key-dropped", cfg_edit(_drop_kpg), CheckpointError,
        r"(k_per_group has no k for the basis '.*:B'|shared_components\.safetensors in .*: 'index' row|"
        r"basis '.*' has no other side)"),
    Row("k-per-group-wrong-k", cfg_edit(lambda c: c["k_per_group"].update({_first(c["k_per_group"]): 2})), CheckpointError,
        r"shared_components\.safetensors in .*(: basis '.*query:A' is \(32, 3\), k = 3, but share_config\.json's "
        r"k_per_group\['.*query:A'\] is 2|'codes' and 'scales'|needs codes|has padding codes)"),
    Row("k-per-group-one-side-renamed", cfg_edit(lambda c: c.update(k_per_group={
        (k.replace("query:A", "querz:A") if k.startswith(Q0) else k): v for k, v in c["k_per_group"].items()})),
        CheckpointError, r"(basis '.*quer[yz]:[AB]' has no other side|k_per_group names '.*querz:A')"),
    Row("k-per-group-module-renamed", cfg_edit(_rename_module(Q0, Q0[:-1] + "z")), CheckpointError,
        r"(layer_keys (names|lacks) '.*quer[yz]'|k_per_group names)"),
    Row("module-renamed-with-layer-keys", cfg_edit(_rename_module(Q0, Q0[:-1] + "z", layer_keys=True)), CheckpointError,
        r"adapter 'task[01]': .* has a loading for .*querz, which adapters/task[01]/adapter_meta\.json's "
        r"original_config\.target_modules \['(query|value)', '(query|value)'\] does not match", dtypes=("int8", "nf4")),
    Row("layer-keys-extra", cfg_edit(lambda c: c["layer_keys"].append("bert.pooler.dense")), CheckpointError,
        r"share_config\.json in .*: layer_keys names 'bert\.pooler\.dense', which has no basis"),
    Row("layer-keys-missing", cfg_edit(lambda c: c["layer_keys"].pop(0)), CheckpointError,
        r"share_config\.json in .*: layer_keys lacks '.*layer\.0\..*', which has bases"),
    Row("basis-without-other-side", both(floats(BASES, lambda t: {k: v for k, v in t.items() if k != _first(t, "B")}),
                                         cfg_edit(_drop_kpg)), CheckpointError,
        r"shared_components\.safetensors in .*: basis '.*query:A' has no other side", dtypes=("float32",)),
    Row("basis-not-a-module-path", both(floats(BASES, lambda t: {k.replace(Q0, "bert encoder"): v for k, v in t.items()}),
                                        cfg_edit(_rename_module(Q0, "bert encoder"))), CheckpointError,
        r"shared_components\.safetensors in .*: tensor 'bert encoder:A' does not name a module path", dtypes=("float32",)),
    Row("basis-1d", floats(BASES, lambda t: {**t, _first(t): t[_first(t)].reshape(-1)}), CheckpointError,
        r"shared_components\.safetensors in .*: '.*query:A' is \(96,\) torch\.float32; expected a 2-D float basis",
        dtypes=("float32",)),
    Row("basis-int", floats(BASES, lambda t: {**t, _first(t): t[_first(t)].to(torch.int32)}), CheckpointError,
        r"shared_components\.safetensors in .*: '.*query:A' is \(32, 3\) torch\.int32", dtypes=("float32",)),
    # ---- loadings against the bases, the adapter's LoRA config and its entry in "adapters"
    Row("loading-rank-sliced-to-2", sliced(2), CheckpointError,
        _load_rel() + r" in .* has bert\.encoder\.layer\.0\.attention\.self\.query at rank 2, but "
        r"adapters/task1/adapter_meta\.json's original_config says r=4"),
    Row("meta-r-8", meta_edit(lambda m: m["original_config"].update(r=8)), CheckpointError,
        _load_rel() + r" in .* has .* at rank 4, but adapters/task1/adapter_meta\.json's original_config says r=8"),
    Row("meta-rank-pattern-8", meta_edit(lambda m: m["original_config"].update(rank_pattern={"value": 8})), CheckpointError,
        r"has bert\.encoder\.layer\.0\.attention\.self\.value at rank 4, but .*original_config says r=8"),
    Row("meta-target-modules-narrowed", meta_edit(lambda m: m["original_config"].update(target_modules=["query"])),
        CheckpointError, r"has a loading for .*value, which adapters/task1/adapter_meta\.json's original_config\."
        r"target_modules \['query'\] does not match"),
    Row("meta-target-modules-regex", meta_edit(lambda m: m["original_config"].update(target_modules=r".*\.query")),
        CheckpointError, r"has a loading for .*value, which .*target_modules '\.\*\\\\\.query' does not match"),
    Row("meta-delta-w-error-unknown-module", meta_edit(lambda m: m["delta_w_error"].update({"bert.pooler.dense": 0.1})),
        CheckpointError, r"adapters/task1/adapter_meta\.json in .* has a delta_w_error for 'bert\.pooler\.dense', "
        r"which has no loading"),
    Row("meta-of-another-adapter", meta_edit(lambda m: m.update(adapter_name="task2")), CheckpointError,
        r"adapters/task1/adapter_meta\.json in .* is adapter 'task2''s \(its adapter_name\), not 'task1''s"),
    Row("info-rank-8", cfg_edit(lambda c: c["adapters"][NAME].update(rank=8)), CheckpointError,
        r"share_config\.json's adapters\.task1\.rank is 8, but its loadings in " + _load_rel() + " have rank 4"),
    Row("loading-without-basis", floats(f"adapters/{NAME}/loadings.safetensors", lambda t: {
        **t, "bert.pooler.dense:A": torch.zeros(3, 4), "bert.pooler.dense:B": torch.zeros(3, 4)}), CheckpointError,
        r"adapter 'task1' has a loading for 'bert\.pooler\.dense:A' but shared_components\.safetensors has no basis",
        dtypes=("float32",)),
    Row("loading-k-2", floats(f"adapters/{NAME}/loadings.safetensors", lambda t: {
        k: v[:2].contiguous() if k.startswith(Q0) else v for k, v in t.items()}), CheckpointError,
        r"adapter 'task1': loading '.*query:A' is \(2, 4\) but its basis is \(32, 3\)", dtypes=("float32",)),
    Row("loadings-empty", tensors(f"adapters/{NAME}/loadings.safetensors", lambda t: {}), CheckpointError,
        _load_rel() + r" in .* holds no loadings", dtypes=("float32",)),
    # ---- the schema (lorashare.format.schema) of the new fields
    Row("compression-bad-threshold", cfg_edit(lambda c: c.update(compression={"variance_threshold": 2})), CheckpointError,
        r"share_config\.json: field 'compression' is .*, expected null or a compression spec .*variance_threshold=2"),
    Row("compression-unknown-setting", cfg_edit(lambda c: c.update(compression={"magic": 1})), CheckpointError,
        r"share_config\.json: field 'compression' is .*unknown settings \['magic'\]"),
    Row("compression-list", cfg_edit(lambda c: c.update(compression=[3])), CheckpointError,
        r"share_config\.json: field 'compression' is \[3\], expected null or a compression spec"),
    Row("stats-largest-saving-k-str", cfg_edit(lambda c: c["compression_stats"].update(largest_saving_k="3")),
        CheckpointError, r"share_config\.json: field 'compression_stats\.largest_saving_k' is '3', expected an integer"),
    Row("stats-capped-groups-bad", cfg_edit(lambda c: c["compression_stats"].update(capped_groups=["x"])),
        CheckpointError, r"field 'compression_stats\.capped_groups' is \['x'\], expected a list of \"<module>:<A\|B>\" keys"),
    Row("meta-lora-keys-list", meta_edit(lambda m: m.update(lora_keys=["x"])), CheckpointError,
        r"adapter_meta\.json: field 'lora_keys' is \['x'\], expected an object"),
    Row("adapter-num-labels-zero", cfg_edit(lambda c: c["adapters"][NAME].update(num_labels=0)), CheckpointError,
        r"field 'adapters\.task1\.num_labels' is 0, expected an integer ≥ 1"),
]

CASES = [pytest.param(row, dtype, id=f"{dtype}-{row.id}") for row in ROWS for dtype in row.dtypes]


def _tampered(row: Row, dtype: str, saved: Dict[str, Path], tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(saved[dtype], ck)
    row.edit(ck, dtype)
    return ck


def _one_line(capsys: pytest.CaptureFixture, command: str) -> str:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"lorashare {command}: error: "), lines[0]
    return lines[0]


def assert_rebuilds(ck: Path, adapter_dirs: List[str]) -> None:
    """The loader's promise: every adapter rebuilds with finite values, the config's keys and shapes,
    and a config that PEFT loads (and applies)."""
    from peft import LoraConfig, PeftConfig

    cfg = _cfg(ck)
    share = SHAREModel.from_pretrained(ck)
    assert share.adapter_names == cfg["adapter_names"] == ["task0", "task1", "task2"]
    assert set(cfg["k_per_group"]) == {f"{m}:{s}" for m in cfg["layer_keys"] for s in "AB"}
    for name, folder in zip(share.adapter_names, adapter_dirs):
        sd = share.reconstruct(name)
        original = load_file(os.path.join(folder, "adapter_model.safetensors"))
        oc = json.loads((ck / "adapters" / name / "adapter_meta.json").read_text())["original_config"]
        assert sorted(sd) == sorted(original), name  # the same keys as the adapter that was compressed
        for key, t in sd.items():
            assert t.shape == original[key].shape, key
            assert bool(torch.isfinite(t).all()), key
        for m in cfg["layer_keys"]:
            r = pattern_value(oc.get("rank_pattern") or {}, m, oc["r"])
            assert sd[f"base_model.model.{m}.lora_A.weight"].shape[0] == r
            assert sd[f"base_model.model.{m}.lora_B.weight"].shape[1] == r
        init = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        assert LoraConfig(**{k: v for k, v in oc.items() if k in init}).r == oc["r"]
        PeftConfig.from_peft_type(**oc)
        with torch.no_grad():
            logits = share.apply(tiny_bert(), name)(input_ids=torch.randint(0, 100, (2, 8))).logits
        assert bool(torch.isfinite(logits).all()), name


@pytest.mark.parametrize("row,dtype", CASES)
def test_checkpoint(row: Row, dtype: str, saved, adapter_dirs, tmp_path, capsys):
    ck = _tampered(row, dtype, saved, tmp_path)
    before = _snapshot(ck)
    out = tmp_path / "rebuilt"
    if row.error is None:
        assert_rebuilds(ck, adapter_dirs[:3])
        assert main(["reconstruct", str(ck), "--adapter", row.adapter, "-o", str(out)]) == 0
        from peft import PeftModel

        PeftModel.from_pretrained(tiny_bert(), str(out))  # what reconstruct wrote, PEFT loads
        assert _snapshot(ck) == before
        return
    with pytest.raises(LoraShareError) as ei:  # never a raw RuntimeError, ValueError or TypeError
        share = SHAREModel.from_pretrained(ck)
        share.reconstruct(row.adapter)  # (only reached if loading wrongly succeeded)
    assert isinstance(ei.value, row.error), repr(ei.value)
    assert re.search(row.match, str(ei.value)), str(ei.value)
    assert "\n" not in str(ei.value)
    capsys.readouterr()
    assert main(["info", str(ck)]) == 1
    assert re.search(row.match, _one_line(capsys, "info"))
    assert main(["reconstruct", str(ck), "--adapter", row.adapter, "-o", str(out)]) == 1
    assert re.search(row.match, _one_line(capsys, "reconstruct"))
    assert not out.exists()
    assert _snapshot(ck) == before


def test_the_table_is_large_and_its_edits_are_real(saved, tmp_path):
    """≥ 40 rows, most of them refusals; and each refused edit changes the checkpoint's bytes."""
    assert len(CASES) >= 40
    assert sum(row.error is not None for row, _ in (c.values for c in CASES)) >= 35
    for row, dtype in (c.values for c in CASES):
        if row.error is not None:
            ck = tmp_path / f"{dtype}-{row.id}"
            shutil.copytree(saved[dtype], ck)
            row.edit(ck, dtype)
            assert _snapshot(ck) != _snapshot(saved[dtype]), row.id


def test_the_forgers_hashes_are_valid(saved, tmp_path):
    """The rows get past the fingerprints: a rehashed tampered file is not an IntegrityError."""
    ck = tmp_path / "ck"
    shutil.copytree(saved["int8"], ck)
    cfg_edit(_add_first_keys)(ck, "int8")
    with pytest.raises(CheckpointError) as ei:
        SHAREModel.from_pretrained(ck)
    assert not isinstance(ei.value, IntegrityError)


def test_unpack_pack_round_trip(saved, tmp_path):
    """The tests' own packed-file codec writes back the very bytes lorashare wrote."""
    for dtype in ("int8", "nf4"):
        ck = tmp_path / dtype
        shutil.copytree(saved[dtype], ck)
        before = _snapshot(ck)
        for rel in (BASES, f"adapters/{NAME}/loadings.safetensors"):
            t = load_file(str(ck / rel))
            again = _pack(_unpack(t, _cfg(ck)["k_per_group"], dtype), _cfg(ck)["k_per_group"])
            assert all(torch.equal(t[k], again[k]) for k in t)
        assert _snapshot(ck) == before


# ============================================================================ files that are not files
def _run_with_deadline(fn: Callable[[], Any], fifos: List[Path]) -> Any:
    """``fn()`` in a thread; past the deadline, release a reader blocked on a FIFO and fail."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(DEADLINE)
    if t.is_alive():
        for f in fifos:  # a writer that closes at once gives the blocked reader EOF
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(DEADLINE)
        pytest.fail(f"blocked for {DEADLINE:.0f}s on {[str(f) for f in fifos]}: a FIFO must be refused, never waited on")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _make_special(path: Path, kind: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:  # a character device: /dev/null's numbers
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except (PermissionError, AttributeError, OSError) as exc:
            pytest.skip(f"cannot make a device node here ({exc})")


CK_FILES = ["share_config.json", BASES, f"adapters/{NAME}/loadings.safetensors", f"adapters/{NAME}/adapter_meta.json",
            f"adapters/{HEADED}/classifier_head.safetensors"]
SPECIAL_CASES = [(rel, kind) for rel in CK_FILES for kind in ("fifo", "folder")] + [(BASES, "device"),
                                                                                   ("share_config.json", "device")]
_KIND = {"fifo": "a FIFO", "folder": "a folder", "device": "a character device"}


@pytest.mark.parametrize("rel,kind", SPECIAL_CASES, ids=[f"{k}-{r}" for r, k in SPECIAL_CASES])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_special_file_in_a_checkpoint_fails_at_once(rel, kind, verify, saved, tmp_path, capsys):
    ck = tmp_path / "ck"
    shutil.copytree(saved["float32"], ck)
    _make_special(ck / rel, kind)
    before = _snapshot(ck)
    adapter = HEADED if HEADED in rel else NAME
    with pytest.raises(CheckpointError) as ei:
        _run_with_deadline(lambda: SHAREModel.from_pretrained(ck, verify=verify), [ck / rel])
    msg = str(ei.value)
    assert rel in msg and f"it is {_KIND[kind]}, not a regular file" in msg, msg
    assert "\n" not in msg
    capsys.readouterr()
    out = tmp_path / "rebuilt"
    for argv, cmd in ((["info", str(ck)], "info"), (["reconstruct", str(ck), "--adapter", adapter, "-o", str(out)],
                                                    "reconstruct")):
        assert _run_with_deadline(lambda argv=argv: main(argv), [ck / rel]) == 1
        assert rel in _one_line(capsys, cmd)
    assert not out.exists()
    assert _snapshot(ck) == before


ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("kind", ["fifo", "folder"])
@pytest.mark.parametrize("fname", ADAPTER_FILES)
def test_special_file_in_an_adapter_fails_at_once(fname, kind, adapter_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dirs[1], bad)
    _make_special(bad / fname, kind)
    with pytest.raises(AdapterError) as ei:
        _run_with_deadline(lambda: SHAREModel.from_adapters([adapter_dirs[0], str(bad)], num_components=2,
                                                            progress=False), [bad / fname])
    assert fname in str(ei.value) and _KIND[kind] in str(ei.value), str(ei.value)
    capsys.readouterr()
    out = tmp_path / "out"
    assert _run_with_deadline(lambda: main(["compress", adapter_dirs[0], str(bad), "-o", str(out), "-k", "2", "-q"]),
                              [bad / fname]) == 1
    assert fname in _one_line(capsys, "compress")
    assert not out.exists()


def test_tensorfile_refuses_a_fifo_without_blocking(tmp_path):
    """The low-level reader itself (adapters.py reads weights through it) refuses at once."""
    from lorashare.format.tensorfile import TensorFile, read_header

    fifo = tmp_path / "adapter_model.safetensors"
    os.mkfifo(fifo)
    for opener in (read_header, TensorFile):
        with pytest.raises(AdapterError, match=r"x: cannot read .*adapter_model\.safetensors: it is a FIFO"):
            _run_with_deadline(lambda opener=opener: opener(str(fifo), error=AdapterError, who="x"), [fifo])


# ============================================================================ a save while a reader loads
@pytest.mark.parametrize("when", ["first-tensor", "last-meta"])
def test_a_save_during_a_load_says_the_checkpoint_changed(when, saved, adapter_dirs, tmp_path, monkeypatch):
    """A concurrent save is reported as such, not as a corrupted or tampered file."""
    import lorashare.format.checkpoint as checkpoint
    import lorashare.format.tensorfile as tensorfile

    ck = tmp_path / "ck"
    shutil.copytree(saved["float32"], ck)
    other = SHAREModel.from_adapters(adapter_dirs[1:4], num_components=2, progress=False)
    swapped: List[bool] = []

    def swap() -> None:
        if not swapped:
            swapped.append(True)
            other.save_pretrained(ck, card=False)  # no README: after the last meta, nothing is left to read

    if when == "first-tensor":
        real_init = tensorfile.TensorFile.__init__

        def init(self, path, **kw):
            swap()
            real_init(self, path, **kw)
        monkeypatch.setattr(tensorfile.TensorFile, "__init__", init)
    else:
        real_read, metas = checkpoint.read_json, []

        def read_json(path, **kw):
            value = real_read(path, **kw)
            metas.append(path)
            if len(metas) == 3:  # the last adapter's meta, read before the swap: every read succeeded
                swap()
            return value
        monkeypatch.setattr(checkpoint, "read_json", read_json)
    with pytest.raises(CheckpointError, match=r"the checkpoint at .* changed while it was read: its share_config\.json "
                                              r"was replaced or rewritten .* Try again") as ei:
        SHAREModel.from_pretrained(ck)
    assert swapped and "tampered" not in str(ei.value)
    monkeypatch.undo()
    assert SHAREModel.from_pretrained(ck).adapter_names == ["task1", "task2", "task3"]  # the new one, whole


def test_a_resave_of_the_same_bytes_is_no_change(saved, tmp_path, monkeypatch):
    """The stamp is the config's bytes: a save that writes the same checkpoint again does not fail a reader."""
    import lorashare.format.tensorfile as tensorfile

    ck = tmp_path / "ck"
    shutil.copytree(saved["float32"], ck)
    same = SHAREModel.from_pretrained(ck)
    real_init, calls = tensorfile.TensorFile.__init__, []

    def init(self, path, **kw):
        if not calls:
            calls.append(path)
            same.save_pretrained(ck)
        real_init(self, path, **kw)
    monkeypatch.setattr(tensorfile.TensorFile, "__init__", init)
    before = _snapshot(ck)
    assert SHAREModel.from_pretrained(ck).adapter_names == ["task0", "task1", "task2"]
    assert calls and _snapshot(ck) == before  # it did re-save, byte-identical


# ============================================================================ the schema's dataclasses
def test_every_saved_key_has_a_typed_field(saved):
    """What a save writes is what the dataclasses describe, key for key and in order."""
    for ck in saved.values():
        cfg = _cfg(ck)
        assert list(cfg) == [f.name for f in dataclasses.fields(SHAREConfig) if f.name in cfg]
        assert set(cfg) - {"compression"} == {f.name for f in dataclasses.fields(SHAREConfig)} - {"compression"}
        st = cfg["compression_stats"]
        assert list(st) == list(CompressionStats().to_dict())
        assert CompressionStats.from_dict(st).to_dict() == st
        for name, info in cfg["adapters"].items():
            assert AdapterInfo.from_dict(info).to_dict() == info
            assert list(info) == list(AdapterInfo(**info).to_dict())
            meta = json.loads((ck / "adapters" / name / "adapter_meta.json").read_text())
            assert AdapterMeta(**meta).to_dict() == meta


def test_to_dicts_are_what_the_writers_wrote():
    info = AdapterInfo(source="runs/a", revision=None, sha256="0" * 64, rank=4, lora_alpha=8, lora_bytes=1024,
                       task_type="SEQ_CLS", num_labels=3)
    assert list(info.to_dict()) == ["source", "revision", "sha256", "rank", "lora_alpha", "lora_bytes", "task_type",
                                    "num_labels"]
    measured = dataclasses.replace(info, delta_w_error_mean=0.1, delta_w_error_max=0.2).to_dict()
    assert list(measured)[-2:] == ["delta_w_error_mean", "delta_w_error_max"] and measured["delta_w_error_max"] == 0.2
    meta = AdapterMeta("a", {"peft_type": "LORA", "r": 4}, "runs/a", None, None, {"m": 0.1}, {"m:B": "k.B", "m:A": "k.A"})
    assert list(meta.to_dict()) == ["adapter_name", "original_config", "original_adapter_path", "revision", "sha256",
                                    "delta_w_error", "lora_keys"]
    assert list(meta.to_dict()["lora_keys"]) == ["m:A", "m:B"]
    assert "lora_keys" not in AdapterMeta("a", {"r": 4}).to_dict()
    assert list(CompressionStats().to_dict()) == [
        "original_total_params", "compressed_total_params", "shared_component_params", "per_adapter_loading_params",
        "mean_explained_variance", "min_explained_variance", "per_layer_explained_variance", "original_lora_bytes",
        "shared_bytes", "loadings_bytes", "heads_bytes", "compressed_bytes", "compression_ratio",
        "compression_ratio_excluding_basis", "delta_w_rel_error_mean", "delta_w_rel_error_max", "largest_saving_k",
        "capped_groups"]


@pytest.mark.parametrize("schema,data,field_name", [
    (CompressionStats, {"compression_ratio": "3x"}, "compression_ratio"),
    (CompressionStats, {"original_lora_bytes": 10}, "compressed_bytes"),  # a "needs" rule
    (AdapterInfo, {"sha256": "abc"}, "sha256"),
    (AdapterMeta, {"delta_w_error": {"m": -1}}, "delta_w_error"),
    (SHAREConfig, {"adapters": {"a": {"rank": -1}}}, "adapters.a.rank"),  # each entry, by AdapterInfo's rules
    (SHAREConfig, {"compression_stats": {"largest_saving_k": 1.5}}, "compression_stats.largest_saving_k"),
])
def test_one_validator_walks_every_dataclass(schema, data, field_name):
    with pytest.raises(CheckpointError, match=rf"x\.json: field '{re.escape(field_name)}' is .*, expected .* re-save it"):
        validate(data, schema, "x.json")


def test_0_1_x_stats_stay_lenient():
    """0.1.x wrote a few stats and Infinity ratios: they validate, and the rest take defaults."""
    old = {"compression_ratio": float("inf"), "mean_explained_variance": 0.9}
    validate(old, CompressionStats, "share_config.json")
    assert CompressionStats.from_dict(old).original_lora_bytes is None
