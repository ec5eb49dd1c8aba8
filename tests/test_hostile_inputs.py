"""Hostile inputs end as one LoraShareError that names the file and the field, never a raw traceback.

Table-driven: each row is a corruption of a real PEFT adapter, of a saved checkpoint (with its
sha256 fingerprints recomputed, so that only the field checks can catch it), or a bad API
argument.  Each row runs through the public API (exception type and message) and through the
CLI (exit code, one line on stderr, no traceback), and the input bytes are checked unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple, Type

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save, save_file

import lorashare.codec.subspace
from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import (
    AdapterError,
    CheckpointError,
    ConfigError,
    IntegrityError,
    LoraShareError,
)
from lorashare.format.jsonfile import MAX_DEPTH, loads
from lorashare.format.tensorfile import read_header, save_bytes
from tests.reliability_report import report
from tests.test_legacy import _legacy_checkpoint

DEEP = 100_000
COUNTS: Dict[str, int] = {}


@pytest.fixture(scope="module", autouse=True)
def hostile_summary() -> Iterator[None]:
    yield
    report("hostile_inputs", {"total": sum(COUNTS.values()), "by_kind": dict(sorted(COUNTS.items()))})


def _count(kind: str) -> None:
    COUNTS[kind] = COUNTS.get(kind, 0) + 1


def _snapshot(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture, command: str) -> str:
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1, cap.err
    assert lines[0].startswith(f"lorashare {command}: error: "), lines[0]
    return lines[0]


# ============================================================================ adapters
def _cfg_path(d: Path) -> Path:
    return d / "adapter_config.json"


def _weights(d: Path) -> Path:
    return d / "adapter_model.safetensors"


def edit_config(**changes: Any) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        cfg = json.loads(_cfg_path(d).read_text())
        cfg.update(changes)
        _cfg_path(d).write_text(json.dumps(cfg))
    return run


def raw_config(raw: bytes) -> Callable[[Path], None]:
    return lambda d: _cfg_path(d).write_bytes(raw)


def _split(blob: bytes) -> Tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def edit_header(fn: Callable[[dict, bytes], Tuple[dict, bytes]]) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        header, data = _split(_weights(d).read_bytes())
        _weights(d).write_bytes(_join(*fn(header, data)))
    return run


def _lora_keys(header: dict, side: str) -> List[str]:
    return sorted(k for k in header if f"lora_{side}" in k)


def _overlap(header: dict, data: bytes) -> Tuple[dict, bytes]:
    a, b = _lora_keys(header, "A")[:2]  # query and value lora_A: same shape
    header[b] = dict(header[b], data_offsets=header[a]["data_offsets"])
    return header, data


def _hole(header: dict, data: bytes) -> Tuple[dict, bytes]:
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last] = dict(header[last], data_offsets=[begin + 8, end + 8])
    return header, data + b"\0" * 8


def _trailing(header: dict, data: bytes) -> Tuple[dict, bytes]:
    return header, data + b"\0" * 8


def raw_weights(blob: bytes) -> Callable[[Path], None]:
    return lambda d: _weights(d).write_bytes(blob)


def scale_factor(side: str, factor: float) -> Callable[[Path], None]:
    def run(d: Path) -> None:
        sd = load_file(str(_weights(d)))
        key = _lora_keys(sd, side)[0]  # type: ignore[arg-type]
        sd[key] = sd[key] * factor
        save_file(sd, str(_weights(d)))
    return run


@dataclass(frozen=True)
class AdapterCase:
    id: str
    corrupt: Callable[[Path], None]
    error: Type[LoraShareError]
    match: str  # regex on the message: it names the file or field
    at_open: bool = True  # found when the adapter is opened, so on_error='skip' skips it


ADAPTER_CASES = [
    AdapterCase("config-deep-open", raw_config(b"[" * DEEP), AdapterError, r"adapter 'bad'.*adapter_config\.json.*nested deeper than 64"),
    AdapterCase("config-deep-closed", raw_config(b"[" * DEEP + b"]" * DEEP), AdapterError, r"adapter_config\.json.*nested deeper than 64"),
    AdapterCase("config-deep-objects", raw_config(b'{"a":' * DEEP + b"1" + b"}" * DEEP), AdapterError, r"adapter_config\.json.*nested deeper"),
    AdapterCase("config-nested-100", edit_config(extra=json.loads("[" * 100 + "]" * 100)), AdapterError, r"adapter_config\.json.*nested deeper than 64"),
    AdapterCase("config-huge-int", raw_config(b'{"peft_type": "LORA", "r": ' + b"7" * 5000 + b"}"), AdapterError, r"adapter_config\.json.*not valid JSON"),
    AdapterCase("config-not-utf8", raw_config(b'\xff\xfe{"r": 4}'), AdapterError, r"adapter_config\.json.*not UTF-8"),
    AdapterCase("rank-pattern-bad-regex", edit_config(rank_pattern={"query(": 8}), AdapterError, r"rank_pattern key 'query\(' in .*adapter_config\.json is not a valid regular expression.*re\.escape"),
    AdapterCase("rank-pattern-unbalanced", edit_config(rank_pattern={"a)|(b": 8, "[z": 2}), AdapterError, r"rank_pattern key '\[z'.*not a valid regular expression"),
    AdapterCase("rank-pattern-list", edit_config(rank_pattern=["query", 8]), AdapterError, r"rank_pattern is \['query', 8\] in .*adapter_config\.json, expected an object"),
    AdapterCase("rank-pattern-string", edit_config(rank_pattern="query"), AdapterError, r"rank_pattern is 'query'.*expected an object"),
    AdapterCase("rank-pattern-value-str", edit_config(rank_pattern={"query": "8"}), AdapterError, r"rank_pattern\['query'\] is '8'.*expected an integer"),
    AdapterCase("rank-pattern-value-zero", edit_config(rank_pattern={"query": 0}), AdapterError, r"rank_pattern\['query'\] is 0.*expected an integer ≥ 1"),
    AdapterCase("alpha-pattern-bad-regex", edit_config(alpha_pattern={"*value": 16}), AdapterError, r"alpha_pattern key '\*value'.*not a valid regular expression"),
    AdapterCase("alpha-pattern-list", edit_config(alpha_pattern=[16]), AdapterError, r"alpha_pattern is \[16\].*expected an object"),
    AdapterCase("alpha-pattern-value-bool", edit_config(alpha_pattern={"value": True}), AdapterError, r"alpha_pattern\['value'\] is True.*expected a finite number"),
    AdapterCase("lora-alpha-str", edit_config(lora_alpha="16"), AdapterError, r"lora_alpha is '16' in .*adapter_config\.json, expected a finite number"),
    AdapterCase("lora-alpha-list", edit_config(lora_alpha=[16]), AdapterError, r"lora_alpha is \[16\]"),
    AdapterCase("use-rslora-str", edit_config(use_rslora="false"), AdapterError, r"use_rslora is 'false'.*expected true or false"),
    AdapterCase("r-float", edit_config(r=4.0), AdapterError, r"\br is 4\.0 in .*adapter_config\.json, expected an integer"),
    AdapterCase("base-model-number", edit_config(base_model_name_or_path=7), AdapterError, r"base_model_name_or_path is 7.*expected a string"),
    AdapterCase("header-deep", raw_weights(struct.pack("<Q", DEEP) + b"[" * DEEP), AdapterError, r"bad: .*adapter_model\.safetensors is not a valid safetensors file: its header is JSON nested deeper than 64"),
    AdapterCase("header-over-limit", raw_weights(struct.pack("<Q", 101 * 1024 * 1024) + b"{}"), AdapterError, r"adapter_model\.safetensors.*header length is 105906176 bytes, over the safetensors limit of 104857600 bytes \(100 MB\)"),
    AdapterCase("offsets-overlap", edit_header(_overlap), AdapterError, r"adapter_model\.safetensors.*overlaps the previous tensor"),
    AdapterCase("offsets-hole", edit_header(_hole), AdapterError, r"adapter_model\.safetensors.*leaves 8 unused bytes before it"),
    AdapterCase("offsets-trailing", edit_header(_trailing), AdapterError, r"adapter_model\.safetensors.*8 bytes unaccounted for"),
    AdapterCase("factor-B-1e20", scale_factor("B", 1e20), AdapterError, r"adapter 'bad'.*module .*lora_B\.weight holds values up to .*over the 1e\+15", at_open=False),
    AdapterCase("factor-A-1e20", scale_factor("A", 1e20), AdapterError, r"adapter 'bad'.*module .*lora_A\.weight holds values up to .*over the 1e\+15", at_open=False),
    AdapterCase("factor-B-neg-1e18", scale_factor("B", -1e18), AdapterError, r"adapter 'bad'.*lora_B\.weight holds values up to", at_open=False),
]


def _bad_adapter(case: AdapterCase, src: str, tmp_path: Path) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    case.corrupt(bad)
    return bad


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: c.id)
def test_adapter_api(case: AdapterCase, adapter_dirs, tmp_path):
    bad = _bad_adapter(case, adapter_dirs[1], tmp_path)
    before = _snapshot(bad)
    with pytest.raises(LoraShareError) as ei:  # anything else (RecursionError, re.error...) fails the test
        SHAREModel.from_adapters([adapter_dirs[0], str(bad)], num_components=3, progress=False)
    assert type(ei.value) is case.error, repr(ei.value)
    assert re.search(case.match, str(ei.value)), str(ei.value)
    assert "\n" not in str(ei.value)
    assert _snapshot(bad) == before
    _count("adapter")


@pytest.mark.parametrize("case", ADAPTER_CASES, ids=lambda c: c.id)
def test_adapter_cli(case: AdapterCase, adapter_dirs, tmp_path, capsys):
    bad = _bad_adapter(case, adapter_dirs[1], tmp_path)
    before = _snapshot(bad)
    out = tmp_path / "out"
    rc = main(["compress", adapter_dirs[0], str(bad), "-o", str(out), "-k", "3", "-q"])
    line = _one_line_error(capsys, "compress")
    assert rc == 1
    assert re.search(case.match, line), line
    assert not out.exists()
    assert _snapshot(bad) == before
    _count("adapter_cli")


@pytest.mark.parametrize("case", [c for c in ADAPTER_CASES if c.at_open], ids=lambda c: c.id)
def test_adapter_skipped_with_on_error_skip(case: AdapterCase, adapter_dirs, tmp_path, caplog):
    bad = _bad_adapter(case, adapter_dirs[1], tmp_path)
    share = SHAREModel.from_adapters([adapter_dirs[0], str(bad), adapter_dirs[2]], num_components=3,
                                     on_error="skip", progress=False)
    assert share.adapter_names == ["task0", "task2"]
    assert "skipping adapter" in caplog.text and str(bad) in caplog.text
    _count("adapter_skip")


def test_cli_on_error_skip_skips_deep_json(adapter_dirs, tmp_path, capsys):
    bad = _bad_adapter(ADAPTER_CASES[0], adapter_dirs[1], tmp_path)
    out = tmp_path / "out"
    rc = main(["compress", adapter_dirs[0], str(bad), adapter_dirs[2], "-o", str(out), "-k", "3", "-q",
               "--on-error", "skip", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert json.loads(cap.out)["adapters"] == ["task0", "task2"]
    assert SHAREModel.from_pretrained(out).adapter_names == ["task0", "task2"]


def test_linalg_failure_names_the_module(adapter_dirs, tmp_path, monkeypatch, capsys):
    """A last line of defence: torch.linalg failing inside the fit is an AdapterError naming the module."""

    def boom(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(lorashare.codec.subspace, "top_eigh", boom)
    with pytest.raises(AdapterError, match=r"module bert\.encoder\.layer\.\d\.attention\.self\.\w+.*linear algebra "
                                           r"failed on the factors of adapters \['task0', 'task1'\]") as ei:
        SHAREModel.from_adapters(adapter_dirs[:2], num_components=3, progress=False)
    assert ei.value.layer.startswith("bert.encoder.layer.")
    out = tmp_path / "out"
    assert main(["compress", *adapter_dirs[:2], "-o", str(out), "-k", "3", "-q"]) == 1
    assert "linear algebra failed" in _one_line_error(capsys, "compress")
    assert not out.exists()


def test_rank_pattern_matches_like_peft(adapter_dirs, tmp_path, caplog):
    """Valid patterns still work, with PEFT's grouping: 'query|value' matches both modules."""
    good = tmp_path / "good"
    shutil.copytree(adapter_dirs[1], good)
    edit_config(rank_pattern={"query|value": 4}, alpha_pattern={"layer\\.0\\..*query": 16})(good)
    share = SHAREModel.from_adapters([adapter_dirs[0], str(good)], num_components=3, progress=False)
    assert "config says r=" not in caplog.text
    from lorashare.peft.adapters import module_scale

    cfg = share.adapter_configs["good"]
    assert module_scale(cfg, "bert.encoder.layer.0.attention.self.query", 4) == 16 / 4
    assert module_scale(cfg, "bert.encoder.layer.1.attention.self.query", 4) == 8 / 4


# ============================================================================ API arguments
ARG_CASES: List[Tuple[str, Any]] = [
    ("variance_threshold", "abc"),
    ("variance_threshold", float("nan")),
    ("variance_threshold", 1.5),
    ("variance_threshold", 0),
    ("variance_threshold", True),
    ("variance_threshold", None),
    ("variance_threshold", [0.9]),
    ("target_ratio", "abc"),
    ("target_ratio", "6"),
    ("target_ratio", 0),
    ("target_ratio", -2),
    ("target_ratio", float("inf")),
    ("target_ratio", True),
    ("target_ratio", 10**400),
    ("device", "bogus"),
    ("device", "cuda:x"),
    ("device", "meta"),
    ("device", ""),
    ("device", 3),
    ("num_components", "many"),
    ("num_components", 2.5),
    ("budget_bytes", "1MB"),
    ("budget_bytes", True),
    ("dtype", ["float32"]),
    ("dtype", "float64"),
    ("weighting", {}),
]


@pytest.mark.parametrize("arg,value", ARG_CASES, ids=[f"{a}={v!r}"[:40] for a, v in ARG_CASES])
def test_bad_api_argument(arg, value, adapter_dirs):
    with pytest.raises(ConfigError) as ei:
        SHAREModel.from_adapters(adapter_dirs[:2], progress=False, **{arg: value})
    msg = str(ei.value)
    assert msg.startswith(f"{arg}="), msg
    assert "expected" in msg
    _count("argument")


CLI_ARG_CASES = [
    ["--device", "bogus"],
    ["--device", "meta"],
    ["--device", "cuda:x"],
    ["--variance", "1.5", "--auto"],
    ["--variance", "nan", "--auto"],
    ["--target-ratio", "0"],
    ["--target-ratio", "inf"],
    ["--target-ratio", "nan"],
]


@pytest.mark.parametrize("extra", CLI_ARG_CASES, ids=lambda e: " ".join(e))
def test_bad_cli_argument_is_usage_error(extra, adapter_dirs, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["compress", *adapter_dirs[:2], "-o", str(out), "-q", *extra])
    line = _one_line_error(capsys, "compress")
    assert rc == 2
    # the flag and the value typed, not the Python keyword (target_ratio=0.0)
    assert line.startswith(f"lorashare compress: error: {extra[0]} {extra[1]}: expected"), line
    assert not out.exists()
    _count("argument_cli")


@pytest.mark.parametrize("arg,value", [("variance_threshold", "abc"), ("variance_threshold", 2.0), ("device", "bogus")])
def test_bad_add_adapter_argument(arg, value, adapter_dirs, tmp_path, capsys):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=2, progress=False)
    with pytest.raises(ConfigError, match=rf"^{arg}="):
        share.add_adapter(adapter_dirs[2], **{arg: value})
    assert share.adapter_names == ["task0", "task1"]
    if arg == "variance_threshold" and not isinstance(value, str):
        ck = tmp_path / "ck"
        share.save_pretrained(ck)
        before = _snapshot(ck)
        assert main(["add", str(ck), adapter_dirs[2], "--variance", str(value)]) == 2
        assert "error: --variance 2: expected" in _one_line_error(capsys, "add")
        assert _snapshot(ck) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback when CUDA is absent")
def test_cuda_without_gpu_falls_back_to_cpu(adapter_dirs, caplog):
    for device in ("cuda", "cuda:0", "auto", "cpu", torch.device("cpu"), None):
        share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=2, device=device, progress=False)
        assert share.adapter_names == ["task0", "task1"]
    assert "CUDA is not available; using the CPU" in caplog.text


# ============================================================================ checkpoints
@pytest.fixture(scope="module")
def saved(adapter_dirs, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile") / "ck"
    SHAREModel.from_adapters(adapter_dirs[:3], num_components=3, progress=False).save_pretrained(root)
    return root


NAME = "task1"
META = f"adapters/{NAME}/adapter_meta.json"
DELETE = object()


def _rehash(ck: Path, cfg: dict) -> dict:
    """Recompute the fingerprints of the files that are there, as a careful forger would."""
    for rel in list(cfg.get("files") or {}):
        p = ck / rel
        if p.is_file():
            cfg["files"][rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return cfg


def _set(doc: dict, keys: Tuple[str, ...], value: Any) -> None:
    for k in keys[:-1]:
        doc = doc[k]
    if value is DELETE:
        doc.pop(keys[-1], None)
    else:
        doc[keys[-1]] = value


def set_cfg(*keys: str, value: Any) -> Callable[[Path], None]:
    def run(ck: Path) -> None:
        cfg = _rehash(ck, json.loads((ck / "share_config.json").read_text()))
        _set(cfg, keys, value)
        (ck / "share_config.json").write_text(json.dumps(cfg))
    return run


def raw_cfg(raw: bytes) -> Callable[[Path], None]:
    return lambda ck: (ck / "share_config.json").write_bytes(raw)


def _write_meta(ck: Path, raw: bytes) -> None:
    (ck / META).write_bytes(raw)
    cfg = _rehash(ck, json.loads((ck / "share_config.json").read_text()))
    (ck / "share_config.json").write_text(json.dumps(cfg))


def set_meta(*keys: str, value: Any) -> Callable[[Path], None]:
    def run(ck: Path) -> None:
        meta = json.loads((ck / META).read_text())
        _set(meta, keys, value)
        _write_meta(ck, json.dumps(meta).encode())
    return run


def raw_meta(raw: bytes) -> Callable[[Path], None]:
    return lambda ck: _write_meta(ck, raw)


def edit_tensors(rel: str, fn: Callable[[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]) -> Callable[[Path], None]:
    def run(ck: Path) -> None:
        save_file(fn(load_file(str(ck / rel))), str(ck / rel))
        cfg = _rehash(ck, json.loads((ck / "share_config.json").read_text()))
        (ck / "share_config.json").write_text(json.dumps(cfg))
    return run


def _drop_b(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in t.items() if k != sorted(k for k in t if k.endswith(":B"))[0]}


def _rename_side(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    k = sorted(t)[0]
    return {**{x: v for x, v in t.items() if x != k}, k[:-2]: t[k]}


def _rank_mismatch(t: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    k = sorted(k for k in t if k.endswith(":B"))[0]
    return {**t, k: t[k][:, :2].contiguous()}


@dataclass(frozen=True)
class CkCase:
    id: str
    edit: Callable[[Path], None]
    error: Type[LoraShareError]
    match: str


def _field(name: str) -> str:
    return rf"share_config\.json: field '{re.escape(name)}' is "


def _meta_field(name: str) -> str:
    return rf"adapter_meta\.json: field '{re.escape(name)}' is "


CK_CASES = [
    # format_version and integrity data: only a real 0.1.x layout may go without fingerprints
    CkCase("fv-0-files-empty", lambda ck: (set_cfg("format_version", value=0)(ck), set_cfg("files", value={})(ck)), IntegrityError, r"format_version is 0, which no lorashare writes"),
    CkCase("fv-0", set_cfg("format_version", value=0), IntegrityError, r"share_config\.json: format_version is 0"),
    CkCase("fv-negative", set_cfg("format_version", value=-1), IntegrityError, r"format_version is -1"),
    CkCase("fv-3", set_cfg("format_version", value=3), CheckpointError, r"format_version 3; this lorashare reads up to 2\. Upgrade"),
    CkCase("fv-str", set_cfg("format_version", value="1"), CheckpointError, _field("format_version") + r"'1', expected the integer 1"),
    CkCase("fv-bool", set_cfg("format_version", value=True), CheckpointError, _field("format_version") + r"True"),
    CkCase("fv-float", set_cfg("format_version", value=1.0), CheckpointError, _field("format_version") + r"1\.0"),
    CkCase("fv-null", set_cfg("format_version", value=None), CheckpointError, _field("format_version") + r"None"),
    CkCase("fv-removed", set_cfg("format_version", value=DELETE), IntegrityError, r"format-v1 fields \[.*'files'.*\] but no format_version"),
    CkCase("fv-removed-files-removed", lambda ck: (set_cfg("format_version", value=DELETE)(ck), set_cfg("files", value=DELETE)(ck)), IntegrityError, r"format-v1 fields \[.*'adapters'.*\] but no format_version"),
    CkCase("files-empty", set_cfg("files", value={}), IntegrityError, r"shared_components\.safetensors in .* has no fingerprint in share_config\.json's files"),
    CkCase("files-no-meta", set_cfg("files", META, value=DELETE), IntegrityError, rf"{re.escape(META)} in .* has no fingerprint"),
    CkCase("files-no-loadings", set_cfg("files", f"adapters/{NAME}/loadings.safetensors", value=DELETE), IntegrityError, r"loadings\.safetensors in .* has no fingerprint"),
    CkCase("files-bad-hash", set_cfg("files", META, value="abc"), CheckpointError, _field("files") + r"\{.*expected an object \{\"<relative path>\": \"<64 hex"),
    CkCase("files-list", set_cfg("files", value=[]), CheckpointError, _field("files") + r"\[\]"),
    CkCase("meta-missing-listed", lambda ck: os.remove(ck / META), IntegrityError, rf"{re.escape(META)} is listed in share_config\.json's files but is missing"),
    CkCase("loadings-missing-listed", lambda ck: os.remove(ck / f"adapters/{NAME}/loadings.safetensors"), IntegrityError, r"loadings\.safetensors is listed in share_config\.json's files but is missing"),
    # share_config.json fields, types
    CkCase("cfg-deep", raw_cfg(b"[" * DEEP), CheckpointError, r"share_config\.json is not a valid SHARE config: it is JSON nested deeper than 64"),
    CkCase("cfg-deep-in-stats", set_cfg("compression_stats", "x", value=json.loads("[" * 80 + "]" * 80)), CheckpointError, r"share_config\.json.*nested deeper than 64"),
    CkCase("cfg-list", raw_cfg(b"[1, 2]"), CheckpointError, r"share_config\.json must hold a JSON object"),
    CkCase("cfg-not-json", raw_cfg(b"{'a': 1}"), CheckpointError, r"share_config\.json is not a valid SHARE config: it is not valid JSON"),
    CkCase("share-version", set_cfg("share_version", value=0.2), CheckpointError, _field("share_version") + r"0\.2, expected a string"),
    CkCase("num-components-str", set_cfg("num_components", value="3"), CheckpointError, _field("num_components") + r"'3', expected an integer"),
    CkCase("num-components-neg", set_cfg("num_components", value=-3), CheckpointError, _field("num_components")),
    CkCase("component-selection", set_cfg("component_selection", value="magic"), CheckpointError, _field("component_selection") + r"'magic', expected 'fixed', 'auto' or 'budget'"),
    CkCase("variance-threshold-str", set_cfg("variance_threshold", value="high"), CheckpointError, _field("variance_threshold") + r"'high', expected a number in \(0, 1\]"),
    CkCase("variance-threshold-range", set_cfg("variance_threshold", value=7), CheckpointError, _field("variance_threshold") + r"7"),
    CkCase("base-model-list", set_cfg("base_model_name_or_path", value=["x"]), CheckpointError, _field("base_model_name_or_path")),
    CkCase("target-modules-int", set_cfg("target_modules", value=5), CheckpointError, _field("target_modules") + r"5, expected a list"),
    CkCase("target-modules-mixed", set_cfg("target_modules", value=["query", 5]), CheckpointError, _field("target_modules")),
    CkCase("lora-rank-str", set_cfg("lora_rank", value="4"), CheckpointError, _field("lora_rank") + r"'4'"),
    CkCase("lora-alpha-str", set_cfg("lora_alpha", value="8"), CheckpointError, _field("lora_alpha") + r"'8', expected a number"),
    CkCase("adapter-names-str", set_cfg("adapter_names", value="task0,task1"), CheckpointError, _field("adapter_names") + r"'task0,task1', expected a list"),
    CkCase("adapter-names-dup", set_cfg("adapter_names", value=["task0", "task1", "task1"]), CheckpointError, _field("adapter_names") + r".*unique names \('task1' is there twice\)"),
    CkCase("adapter-names-int", set_cfg("adapter_names", value=[1, 2]), CheckpointError, _field("adapter_names") + r"\[1, 2\]"),
    CkCase("num-adapters", set_cfg("num_adapters", value="3"), CheckpointError, _field("num_adapters")),
    CkCase("layer-keys", set_cfg("layer_keys", value={}), CheckpointError, _field("layer_keys") + r"\{\}"),
    CkCase("lorashare-version", set_cfg("lorashare_version", value=None), CheckpointError, _field("lorashare_version")),
    CkCase("dtype-unknown", set_cfg("dtype", value="float64"), CheckpointError, _field("dtype") + r"'float64', expected one of float32, float16, bfloat16, int8, nf4"),
    CkCase("dtype-list", set_cfg("dtype", value=["float32"]), CheckpointError, _field("dtype")),
    CkCase("budget-bytes-str", set_cfg("budget_bytes", value="1MB"), CheckpointError, _field("budget_bytes") + r"'1MB', expected a positive integer"),
    CkCase("requested-components", set_cfg("requested_components", value="many"), CheckpointError, _field("requested_components") + r"'many'"),
    CkCase("k-per-group-str", set_cfg("k_per_group", value={"x:A": "3"}), CheckpointError, _field("k_per_group")),
    CkCase("k-per-group-list", set_cfg("k_per_group", value=[3]), CheckpointError, _field("k_per_group")),
    CkCase("adapters-list", set_cfg("adapters", value=["task0"]), CheckpointError, _field("adapters") + r"\['task0'\], expected an object"),
    CkCase("adapters-entry-str", set_cfg("adapters", NAME, value="x"), CheckpointError, _field("adapters")),
    CkCase("adapter-source-int", set_cfg("adapters", NAME, "source", value=5), CheckpointError, _field(f"adapters.{NAME}.source") + r"5, expected a string"),
    CkCase("adapter-revision-list", set_cfg("adapters", NAME, "revision", value=["main"]), CheckpointError, _field(f"adapters.{NAME}.revision")),
    CkCase("adapter-sha-int", set_cfg("adapters", NAME, "sha256", value=123), CheckpointError, _field(f"adapters.{NAME}.sha256") + r"123, expected 64 hex digits"),
    CkCase("adapter-rank-str", set_cfg("adapters", NAME, "rank", value="4"), CheckpointError, _field(f"adapters.{NAME}.rank")),
    CkCase("adapter-alpha-str", set_cfg("adapters", NAME, "lora_alpha", value="8"), CheckpointError, _field(f"adapters.{NAME}.lora_alpha")),
    CkCase("adapter-bytes-str", set_cfg("adapters", NAME, "lora_bytes", value="4096"), CheckpointError, _field(f"adapters.{NAME}.lora_bytes") + r"'4096'"),
    CkCase("adapter-error-mean-str", set_cfg("adapters", NAME, "delta_w_error_mean", value="low"), CheckpointError, _field(f"adapters.{NAME}.delta_w_error_mean")),
    CkCase("stats-list", set_cfg("compression_stats", value=[]), CheckpointError, _field("compression_stats") + r"\[\], expected an object"),
    CkCase("stats-ratio-str", set_cfg("compression_stats", "compression_ratio", value="3x"), CheckpointError, _field("compression_stats.compression_ratio") + r"'3x', expected a number"),
    CkCase("stats-bytes-str", set_cfg("compression_stats", "original_lora_bytes", value="big"), CheckpointError, _field("compression_stats.original_lora_bytes")),
    CkCase("stats-error-bool", set_cfg("compression_stats", "delta_w_rel_error_mean", value=True), CheckpointError, _field("compression_stats.delta_w_rel_error_mean") + r"True"),
    CkCase("stats-needs-compressed", set_cfg("compression_stats", "compressed_bytes", value=DELETE), CheckpointError, _field("compression_stats.compressed_bytes") + r"None, expected a number \(compression_stats\.original_lora_bytes is set\)"),
    CkCase("stats-needs-error-max", set_cfg("compression_stats", "delta_w_rel_error_max", value=None), CheckpointError, _field("compression_stats.delta_w_rel_error_max")),
    CkCase("stats-per-layer-list", set_cfg("compression_stats", "per_layer_explained_variance", value=[0.9]), CheckpointError, _field("compression_stats.per_layer_explained_variance")),
    CkCase("stats-per-layer-str", set_cfg("compression_stats", "per_layer_explained_variance", "x:A", value="0.9"), CheckpointError, _field("compression_stats.per_layer_explained_variance")),
    CkCase("stats-card-str", set_cfg("compression_stats", "card", value="acme/x"), CheckpointError, _field("compression_stats.card") + r"'acme/x'"),
    CkCase("stats-card-repo-int", set_cfg("compression_stats", "card", value={"repo_id": 5}), CheckpointError, _field("compression_stats.card")),
    CkCase("card-str", set_cfg("card", value="acme/x"), CheckpointError, _field("card") + r"'acme/x'"),
    CkCase("card-license-int", set_cfg("card", value={"license": 5}), CheckpointError, _field("card")),
    CkCase("card-unknown-key", set_cfg("card", value={"licence": "mit"}), CheckpointError, _field("card")),
    CkCase("traversal-name", set_cfg("adapter_names", value=["task0", "../../etc"]), LoraShareError, r"'\.\./\.\./etc' is not allowed"),
    # adapter_meta.json
    CkCase("meta-deep", raw_meta(b"[" * DEEP), CheckpointError, rf"{re.escape(META)} is not a valid adapter meta \(adapter_meta\.json\): it is JSON nested deeper than 64"),
    CkCase("meta-deep-in-config", set_meta("original_config", "extra", value=json.loads("{\"a\":" * 70 + "1" + "}" * 70)), CheckpointError, r"adapter_meta\.json.*nested deeper than 64"),
    CkCase("meta-not-json", raw_meta(b"{"), CheckpointError, r"adapter_meta\.json is not a valid adapter meta.*not valid JSON"),
    CkCase("meta-list", raw_meta(b"[]"), CheckpointError, _meta_field("(the whole file)") + r"\[\], expected a JSON object"),
    CkCase("meta-name-int", set_meta("adapter_name", value=1), CheckpointError, _meta_field("adapter_name")),
    CkCase("meta-config-missing", set_meta("original_config", value=DELETE), CheckpointError, r"adapter_meta\.json: field 'original_config' is missing, so adapter 'task1''s LoRA config"),
    CkCase("meta-config-str", set_meta("original_config", value="LORA"), CheckpointError, _meta_field("original_config") + r"'LORA', expected an object"),
    CkCase("meta-config-empty", set_meta("original_config", value={}), CheckpointError, r"original_config\.peft_type is None in .*adapter_meta\.json, expected 'LORA'"),
    CkCase("meta-config-ia3", set_meta("original_config", "peft_type", value="IA3"), CheckpointError, r"original_config\.peft_type is 'IA3'"),
    CkCase("meta-config-r-str", set_meta("original_config", "r", value="4"), CheckpointError, r"adapter 'task1': original_config\.r is '4' in .*adapter_meta\.json, expected an integer ≥ 1"),
    CkCase("meta-config-r-missing", set_meta("original_config", "r", value=DELETE), CheckpointError, r"original_config\.r is None in .*adapter_meta\.json"),
    CkCase("meta-config-alpha-str", set_meta("original_config", "lora_alpha", value="8"), CheckpointError, r"original_config\.lora_alpha is '8'"),
    CkCase("meta-config-rslora-str", set_meta("original_config", "use_rslora", value="yes"), CheckpointError, r"original_config\.use_rslora is 'yes'"),
    CkCase("meta-config-rank-pattern-list", set_meta("original_config", "rank_pattern", value=["query"]), CheckpointError, r"original_config\.rank_pattern is \['query'\]"),
    CkCase("meta-config-rank-pattern-regex", set_meta("original_config", "rank_pattern", value={"(": 4}), CheckpointError, r"original_config\.rank_pattern key '\(' in .*adapter_meta\.json is not a valid regular expression"),
    CkCase("meta-config-alpha-pattern-val", set_meta("original_config", "alpha_pattern", value={"query": "x"}), CheckpointError, r"original_config\.alpha_pattern\['query'\] is 'x'"),
    CkCase("meta-path-int", set_meta("original_adapter_path", value=5), CheckpointError, _meta_field("original_adapter_path")),
    CkCase("meta-revision-dict", set_meta("revision", value={}), CheckpointError, _meta_field("revision")),
    CkCase("meta-errors-list", set_meta("delta_w_error", value=[0.1]), CheckpointError, _meta_field("delta_w_error") + r"\[0\.1\]"),
    CkCase("meta-errors-str", set_meta("delta_w_error", "m", value="x"), CheckpointError, _meta_field("delta_w_error")),
    CkCase("meta-errors-negative", set_meta("delta_w_error", "m", value=-1.0), CheckpointError, _meta_field("delta_w_error")),
    CkCase("meta-errors-nan", set_meta("delta_w_error", "m", value=float("nan")), CheckpointError, _meta_field("delta_w_error")),
    # tensors whose structure no fingerprint can vouch for
    CkCase("loading-side-missing", edit_tensors(f"adapters/{NAME}/loadings.safetensors", _drop_b), CheckpointError, r"adapter 'task1': loadings\.safetensors has '.*:A' without its other side"),
    CkCase("loading-rank-mismatch", edit_tensors(f"adapters/{NAME}/loadings.safetensors", _rank_mismatch), CheckpointError, r"adapter 'task1': loadings\.safetensors has .*:A' of rank 4 but its other side has rank 2"),
    CkCase("component-key-no-side", edit_tensors("shared_components.safetensors", _rename_side), CheckpointError, r"shared_components\.safetensors in .*: tensor '.*' is not named '<module>:A' or '<module>:B'"),
    CkCase("component-overlap", lambda ck: _overlap_file(ck), CheckpointError, r"shared_components\.safetensors is not a valid safetensors file: tensor .* overlaps"),
]


def _overlap_file(ck: Path) -> None:
    p = ck / "shared_components.safetensors"
    header, data = _split(p.read_bytes())
    keys = sorted(k for k in header if k.endswith(":A"))[:2]
    header[keys[1]] = dict(header[keys[1]], data_offsets=header[keys[0]]["data_offsets"])
    p.write_bytes(_join(header, data))
    cfg = _rehash(ck, json.loads((ck / "share_config.json").read_text()))
    (ck / "share_config.json").write_text(json.dumps(cfg))


def _broken_checkpoint(case: CkCase, saved: Path, tmp_path: Path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    case.edit(ck)
    return ck


def test_rehash_alone_keeps_the_checkpoint_valid(saved, tmp_path):
    """The forger's helper does not break anything by itself: only the edits do."""
    ck = _broken_checkpoint(CkCase("none", set_cfg("share_version", value="0.2.0"), CheckpointError, ""), saved, tmp_path)
    share = SHAREModel.from_pretrained(ck)
    assert share.adapter_names == ["task0", "task1", "task2"]
    share.summary()


@pytest.mark.parametrize("case", CK_CASES, ids=lambda c: c.id)
def test_checkpoint_api(case: CkCase, saved, tmp_path):
    ck = _broken_checkpoint(case, saved, tmp_path)
    before = _snapshot(ck)
    with pytest.raises(LoraShareError) as ei:  # never TypeError, ValueError, AttributeError, RecursionError
        share = SHAREModel.from_pretrained(ck)
        share.summary()  # (only reached if loading wrongly succeeded)
        share.reconstruct(NAME)
    assert isinstance(ei.value, case.error), repr(ei.value)
    assert re.search(case.match, str(ei.value)), str(ei.value)
    assert "\n" not in str(ei.value)
    assert _snapshot(ck) == before
    _count("checkpoint")


@pytest.mark.parametrize("case", CK_CASES, ids=lambda c: c.id)
def test_checkpoint_cli(case: CkCase, saved, tmp_path, capsys):
    ck = _broken_checkpoint(case, saved, tmp_path)
    before = _snapshot(ck)
    assert main(["info", str(ck)]) == 1
    assert re.search(case.match, _one_line_error(capsys, "info"))
    out = tmp_path / "rebuilt"
    assert main(["reconstruct", str(ck), "--adapter", NAME, "-o", str(out)]) == 1
    assert re.search(case.match, _one_line_error(capsys, "reconstruct"))
    assert not out.exists()
    assert _snapshot(ck) == before
    _count("checkpoint_cli")


def test_missing_meta_never_invents_a_config(tmp_path, capsys):
    """The issue's case: an rsLoRA adapter (alpha 64, r 4) must not come back at 1/16 of its scale."""
    from examples.make_adapters import make_adapter

    dirs = [make_adapter(str(tmp_path / f"a{i}"), seed=i) for i in range(2)]
    edit_config(use_rslora=True, lora_alpha=64)(Path(dirs[1]))
    ck = tmp_path / "ck"
    SHAREModel.from_adapters(dirs, num_components=8, progress=False).save_pretrained(ck)
    os.remove(ck / "adapters" / "a1" / "adapter_meta.json")
    with pytest.raises(IntegrityError, match=r"adapters/a1/adapter_meta\.json is listed .* but is missing"):
        SHAREModel.from_pretrained(ck)
    with pytest.raises(CheckpointError, match=r"adapters/a1/adapter_meta\.json is listed .* but is missing"):
        SHAREModel.from_pretrained(ck, verify=False)  # no hashing asked, but still no invented config
    out = tmp_path / "a1_rebuilt"
    assert main(["reconstruct", str(ck), "--adapter", "a1", "-o", str(out)]) == 1
    assert "adapter_meta.json" in _one_line_error(capsys, "reconstruct")
    assert not out.exists()


def test_in_memory_model_without_config_is_refused(adapter_dirs, tmp_path):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=2, progress=False)
    # lorashare 0.1.x's constructor, given no config for task1
    bare = SHAREModel(share.config, share.components, dict(share.all_loadings), {"task0": share.adapter_configs["task0"]})
    with pytest.raises(AdapterError, match=r"adapter 'task1' has no LoRA config"):
        bare.reconstruct("task1", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    bare.reconstruct("task0", output_dir=tmp_path / "out")


# ============================================================================ 0.1.x checkpoints
def _legacy(tmp_path: Path, **changes: Any) -> Path:
    root = tmp_path / "old"
    _legacy_checkpoint(str(root))
    cfg = json.loads((root / "share_config.json").read_text())
    for k, v in changes.items():
        _set(cfg, tuple(k.split("__")), v)
    (root / "share_config.json").write_text(json.dumps(cfg))
    return root


def test_legacy_loads_with_a_warning(tmp_path, caplog):
    share = SHAREModel.from_pretrained(_legacy(tmp_path))
    assert share.config.format_version == 0 and share.adapter_names == ["cola", "sst2"]
    assert "0.1.x checkpoint" in caplog.text and "not verified" in caplog.text


def test_legacy_loose_values_of_0_1_x_still_load(tmp_path):
    """0.1.x copied target_modules and base model from PEFT (a string, null) and wrote Infinity ratios."""
    root = _legacy(tmp_path, target_modules="query|value", base_model_name_or_path=None, lora_alpha=None,
                   compression_stats__compression_ratio=float("inf"))
    share = SHAREModel.from_pretrained(root)
    assert share.config.target_modules == ["query|value"] and share.config.base_model_name_or_path == ""
    assert math.isinf(share.config.compression_stats["compression_ratio"])
    share.summary()
    share.save_pretrained(tmp_path / "resaved")  # renders the card too
    assert SHAREModel.from_pretrained(tmp_path / "resaved").config.format_version == 1


LEGACY_CASES = [
    ({"files": {}}, IntegrityError, r"format-v1 fields \['files'\] but no format_version"),
    ({"dtype": "float32"}, IntegrityError, r"format-v1 fields \['dtype'\]"),
    ({"adapters": {}, "k_per_group": {}}, IntegrityError, r"format-v1 fields \['adapters', 'k_per_group'\]"),
    ({"format_version": 0}, IntegrityError, r"format_version is 0"),
    ({"compression_stats": "x"}, CheckpointError, _field("compression_stats")),
    ({"num_components": "5"}, CheckpointError, _field("num_components")),
]


@pytest.mark.parametrize("changes,error,match", LEGACY_CASES, ids=[str(sorted(c[0]))[:40] for c in LEGACY_CASES])
def test_legacy_layout_is_checked_too(changes, error, match, tmp_path, capsys):
    root = _legacy(tmp_path, **changes)
    with pytest.raises(error, match=match):
        SHAREModel.from_pretrained(root)
    assert main(["info", str(root)]) == 1
    assert re.search(match, _one_line_error(capsys, "info"))
    _count("legacy")


def test_legacy_without_meta_is_refused(tmp_path):
    root = _legacy(tmp_path)
    os.remove(root / "adapters" / "sst2" / "adapter_meta.json")
    with pytest.raises(CheckpointError, match=r"adapters/sst2/adapter_meta\.json is missing from the checkpoint"):
        SHAREModel.from_pretrained(root)


# ============================================================================ safetensors headers
def _f32(begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": [(end - begin) // 4], "data_offsets": [begin, end]}


HEADER_CASES: List[Tuple[str, bytes, str]] = [  # (id, file bytes, regex or "" when valid)
    ("tiled", _join({"a": _f32(0, 8), "b": _f32(8, 16)}, b"\0" * 16), ""),
    ("tiled-unsorted", _join({"b": _f32(8, 16), "a": _f32(0, 8)}, b"\0" * 16), ""),
    ("zero-size-first", _join({"z": _f32(0, 0), "a": _f32(0, 8)}, b"\0" * 8), ""),
    ("zero-size-last", _join({"a": _f32(0, 8), "z": _f32(8, 8)}, b"\0" * 8), ""),
    ("empty", _join({}, b""), ""),
    ("empty-with-metadata", _join({"__metadata__": {"format": "pt"}}, b""), ""),
    ("overlap", _join({"a": _f32(0, 8), "b": _f32(4, 12)}, b"\0" * 16), r"tensor 'b' starts at data offset 4, but the tensors before it end at 8: it overlaps"),
    ("same-bytes", _join({"a": _f32(0, 8), "b": _f32(0, 8)}, b"\0" * 8), r"tensor 'b'.*overlaps the previous tensor"),
    ("zero-size-inside", _join({"a": _f32(0, 8), "z": _f32(4, 4)}, b"\0" * 8), r"tensor 'z'.*overlaps"),
    ("hole", _join({"a": _f32(0, 8), "b": _f32(12, 20)}, b"\0" * 20), r"tensor 'b'.*leaves 4 unused bytes"),
    ("leading-hole", _join({"a": _f32(4, 12)}, b"\0" * 12), r"tensor 'a' starts at data offset 4.*leaves 4 unused bytes"),
    ("trailing", _join({"a": _f32(0, 8)}, b"\0" * 12), r"cover 8 bytes of data but the file holds 12 .*4 bytes unaccounted for"),
    ("empty-trailing", _join({}, b"\0" * 8), r"8 bytes unaccounted for"),
    ("over-limit", struct.pack("<Q", 100 * 1024 * 1024 + 1) + b"{}", r"header length is 104857601 bytes, over the safetensors limit of 104857600 bytes \(100 MB\)"),
    ("does-not-fit", struct.pack("<Q", 64) + b"{}", r"header length 64 does not fit in a file of 10 bytes"),
    ("deep-open", struct.pack("<Q", DEEP) + b"[" * DEEP, r"its header is JSON nested deeper than 64"),
    ("deep-closed", struct.pack("<Q", 2 * DEEP) + b"[" * DEEP + b"]" * DEEP, r"its header is JSON nested deeper than 64"),
    ("not-utf8", struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", r"its header is not UTF-8"),
]


@pytest.mark.parametrize("case_id,blob,match", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_safetensors_header_rules_match_the_library(case_id, blob, match, tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(blob)
    try:
        st_load(blob)
        library_ok = True
    except SafetensorError:
        library_ok = False
    if match:
        with pytest.raises(LoraShareError, match=match):
            read_header(str(p))
        assert not library_ok, "the safetensors library accepts what we refuse"
    else:
        read_header(str(p))
        assert library_ok
    _count("safetensors_header")


def test_files_written_by_safetensors_and_by_us_still_load(tmp_path):
    tensors = {"w": torch.randn(3, 5), "empty": torch.zeros(0), "h": torch.randn(7).to(torch.bfloat16),
               "m": torch.ones(2, 3, dtype=torch.bool), "i": torch.arange(5, dtype=torch.int64)}
    for i, blob in enumerate((save(tensors), save(tensors, metadata={"format": "pt"}), save_bytes(tensors, {"format": "pt"}))):
        p = tmp_path / f"{i}.safetensors"
        p.write_bytes(blob)
        infos, _ = read_header(str(p))
        assert set(infos) == set(tensors)
        assert st_load(blob).keys() == tensors.keys()


# ============================================================================ the JSON reader itself
def test_json_depth_bound_is_exact():
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads(ok, path="x.json", what="test file") == json.loads(ok)
    with pytest.raises(LoraShareError, match=r"x\.json is not a valid test file: it is JSON nested deeper than 64"):
        loads("[" + ok + "]", path="x.json", what="test file")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        loads(b"\xc3\x28", path="x.json", what="test file", error=CheckpointError)
