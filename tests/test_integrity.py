"""Integrity and hostile input: every file verified, every failure a LoraShareError."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashare import SHAREModel
from lorashare.errors import CheckpointError, IntegrityError, LoraShareError
from lorashare.format.checkpoint import load_checkpoint
from lorashare.format.tensorfile import read_header
from lorashare.peft.adapters import open_local

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def saved(adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "ck"
    SHAREModel.from_adapters(adapter_dirs, num_components=3, progress=False).save_pretrained(root)
    return root


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "share_config.json")


def test_every_file_is_fingerprinted_and_a_flipped_byte_is_named(saved, tmp_path):
    files = _files(saved)
    assert len(files) >= 8
    for rel in files:
        ck = tmp_path / rel.replace("/", "_")
        shutil.copytree(saved, ck)
        p = ck / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        with pytest.raises(IntegrityError) as ei:
            SHAREModel.from_pretrained(ck)
        assert rel in str(ei.value), rel


def test_truncated_files_give_clear_errors(saved, tmp_path):
    ck = tmp_path / "t"
    shutil.copytree(saved, ck)
    p = ck / "shared_components.safetensors"
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(IntegrityError, match="shared_components"):
        SHAREModel.from_pretrained(ck)
    with pytest.raises(CheckpointError, match="truncated|does not match|not a valid"):
        SHAREModel.from_pretrained(ck, verify=False)
    cfg = ck / "share_config.json"
    cfg.write_text(cfg.read_text()[:-20])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SHAREModel.from_pretrained(ck)


def test_unfingerprinted_extra_adapter_is_refused(saved, tmp_path):
    ck = tmp_path / "extra"
    shutil.copytree(saved, ck)
    cfg = json.loads((ck / "share_config.json").read_text())
    name = cfg["adapter_names"][0]
    shutil.copytree(ck / "adapters" / name, ck / "adapters" / "intruder")
    cfg["adapter_names"].append("intruder")
    (ck / "share_config.json").write_text(json.dumps(cfg))
    with pytest.raises(IntegrityError, match="intruder.*no fingerprint"):
        SHAREModel.from_pretrained(ck)


def test_symlink_escape_is_refused(saved, tmp_path):
    ck = tmp_path / "link"
    shutil.copytree(saved, ck)
    secret = tmp_path / "secret.safetensors"
    shutil.copy(ck / "shared_components.safetensors", secret)
    os.remove(ck / "shared_components.safetensors")
    os.symlink(secret, ck / "shared_components.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint"):
        SHAREModel.from_pretrained(ck)


def test_traversal_name_in_config_is_refused(saved, tmp_path):
    ck = tmp_path / "trav"
    shutil.copytree(saved, ck)
    cfg = json.loads((ck / "share_config.json").read_text())
    cfg["adapter_names"].append("../../etc")
    (ck / "share_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoraShareError, match="not allowed"):
        SHAREModel.from_pretrained(ck)


def test_huge_declared_shape_is_refused_before_reading(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 4 << 40]}}).encode()
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(LoraShareError, match="limit"):
        read_header(str(p))


def _adapter_with_weights(src, dst, blob: bytes):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "adapter_model.safetensors").write_bytes(blob)
    return dst


@FUZZ
@given(blob=st.binary(max_size=512))
def test_fuzz_adapter_reader_random_bytes(adapter_dirs, tmp_path_factory, blob):
    d = _adapter_with_weights(adapter_dirs[0], tmp_path_factory.mktemp("fz"), blob)
    try:
        open_local(str(d), "fz")
    except LoraShareError:
        pass


_dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "Q4", "", 3])
_shape = st.lists(st.integers(min_value=-2, max_value=70), max_size=3)
_entry = st.fixed_dictionaries(
    {"dtype": _dtypes, "shape": _shape, "data_offsets": st.lists(st.integers(min_value=-5, max_value=5000), min_size=0, max_size=3)}
)
_keys = st.sampled_from([
    "base_model.model.x.lora_A.weight", "base_model.model.x.lora_B.weight", "base_model.model.head.weight",
    "x.lora_embedding_A", "__metadata__", "y.lora_A.default.weight",
])


@FUZZ
@given(header=st.dictionaries(_keys, _entry, max_size=4), pad=st.integers(min_value=0, max_value=4096))
def test_fuzz_adapter_reader_random_headers(adapter_dirs, tmp_path_factory, header, pad):
    raw = json.dumps(header).encode()
    d = _adapter_with_weights(adapter_dirs[0], tmp_path_factory.mktemp("fh"), struct.pack("<Q", len(raw)) + raw + os.urandom(pad))
    try:
        a = open_local(str(d), "fh")
        for m in a.modules:
            a.read_factor(m, "A")
            a.read_factor(m, "B")
        a.read_heads()
    except LoraShareError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(doc=_json, keep=st.booleans())
def test_fuzz_checkpoint_reader_random_config(saved, tmp_path_factory, doc, keep):
    ck = tmp_path_factory.mktemp("fc") / "ck"
    shutil.copytree(saved, ck)
    if keep and isinstance(doc, dict):  # mutate a real config instead of replacing it
        cfg = json.loads((ck / "share_config.json").read_text())
        cfg.update(doc)
        doc = cfg
    (ck / "share_config.json").write_text(json.dumps(doc))
    try:
        load_checkpoint(str(ck))
    except LoraShareError:
        pass


@FUZZ
@given(blob=st.binary(max_size=300), which=st.sampled_from(["shared_components.safetensors", "loadings"]))
def test_fuzz_checkpoint_reader_random_tensors(saved, tmp_path_factory, blob, which):
    ck = tmp_path_factory.mktemp("ft") / "ck"
    shutil.copytree(saved, ck)
    name = json.loads((ck / "share_config.json").read_text())["adapter_names"][0]
    target = ck / which if which.endswith("safetensors") else ck / "adapters" / name / "loadings.safetensors"
    target.write_bytes(blob)
    try:
        load_checkpoint(str(ck), verify=False)
    except LoraShareError:
        pass
