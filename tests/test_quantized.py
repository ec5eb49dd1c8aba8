"""8-bit and 4-bit storage (int8, nf4): the math, the format, budgets on disk, and what older readers do."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import CheckpointError
from lorashare.format.storage import (
    NF4_BLOCK,
    NF4_LEVELS,
    error_bound,
    header_nbytes,
    nf4_levels_formula,
    quantize,
    stored_entries,
    stored_nbytes,
)
from lorashare.format.tensorfile import read_header, save_bytes

QUANTIZED = ("int8", "nf4")


# ------------------------------------------------------------------------------------------------ the math
def test_nf4_levels_are_qlora_normal_float():
    # bitsandbytes' table (QLoRA) is the float32 rounding of QLoRA's own construction
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and 0.0 in NF4_LEVELS
    assert list(NF4_LEVELS) == sorted(set(NF4_LEVELS))
    assert max(abs(a - b) for a, b in zip(nf4_levels_formula(), NF4_LEVELS)) < 2e-7


def test_nf4_matches_torchao():
    """Our codes and packing against torchao's NF4 (skipped where torchao is not installed)."""
    nf4mod = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    NF4Tensor = nf4mod.NF4Tensor
    x = torch.randn(64 * 256, 1, generator=torch.Generator().manual_seed(0))  # torchao: whole blocks of scalers
    theirs = NF4Tensor.from_tensor(x.reshape(-1), NF4_BLOCK, 256)
    assert torch.allclose(theirs.nf4.float(), torch.tensor(NF4_LEVELS), atol=5e-5)  # their table has 4 decimals
    ours = quantize(x, "nf4")
    # k × 1, component-major: pairs of consecutive values share a byte, the first in the high nibble, as in torchao
    same = (ours.codes.reshape(-1) == theirs.quantized_data.reshape(-1)).float().mean()
    assert same > 0.995, float(same)  # differences only at near-ties, from their rounded table
    absmax = x.reshape(-1, NF4_BLOCK).abs().amax(1)
    assert torch.equal(ours.scale, absmax)


@pytest.mark.parametrize("scheme", QUANTIZED)
@pytest.mark.parametrize("shape,transposed", [((16, 8), False), ((7, 5), False), ((300, 13), True), ((1, 1), False)])
def test_round_trip_within_the_schemes_bound(scheme, shape, transposed):
    """int8: |err| ≤ scale/2 per value (scale = absmax of its block of 64 / 127);
    nf4: |err| ≤ absmax of its block × (largest gap between NF4 levels) / 2."""
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[-1])  # rows/columns of very different sizes
    st = quantize(x, scheme, transposed=transposed)
    y = st.dequantize()
    assert y.shape == x.shape and y.dtype == torch.float32
    err = (x - y).abs()
    bound = error_bound(st)
    assert bool((err.T if transposed else err).le(bound * (1 + 1e-6) + 1e-12).all())
    # deterministic, and a stored tensor re-quantizes to the same bytes
    again = quantize(x, scheme, transposed=transposed)
    assert torch.equal(again.codes, st.codes) and torch.equal(again.scale, st.scale)
    back = quantize(y, scheme, transposed=transposed)
    assert torch.equal(back.codes, st.codes) and torch.equal(back.scale, st.scale)
    assert st.nbytes == stored_nbytes(scheme, *st.shape)


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_zeros_and_exact_values(scheme):
    z = quantize(torch.zeros(3, 4), scheme)
    assert torch.equal(z.dequantize(), torch.zeros(3, 4))
    x = torch.tensor([[1.0, -1.0, 0.0, 0.5]])
    assert quantize(x, scheme).dequantize()[0, :3].tolist() == [1.0, -1.0, 0.0]  # ±absmax and 0 are exact


def test_header_nbytes_is_what_the_writer_writes():
    tensors = {"m.q:A": torch.zeros(16, 8, dtype=torch.int8), "m.q:A.scale": torch.zeros(16),
               "m.v:B": torch.zeros(8, 768, dtype=torch.uint8)}
    blob = save_bytes(tensors, {"format": "pt"})
    entries = [(k, {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32"}[t.dtype], list(t.shape))
               for k, t in tensors.items()]
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    assert header_nbytes(entries, {"format": "pt"}) == len(blob) - data
    assert stored_entries("k", "nf4", 16, 768) == [("k", "U8", [8, 768]), ("k.scale", "F32", [192])]


# ------------------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def quantized(adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for scheme in QUANTIZED:
        share = SHAREModel.from_adapters(adapter_dirs, num_components=8, dtype=scheme, progress=False)
        share.save_pretrained(root / scheme)
        out[scheme] = (share, root / scheme)
    return out


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_errors_are_measured_on_what_is_stored(quantized, adapter_dirs, scheme):
    share, folder = quantized[scheme]
    loaded = SHAREModel.from_pretrained(folder)
    for name, src in zip(share.adapter_names, adapter_dirs):
        recorded = share.reconstruction_error(name)["per_layer"]
        actual = loaded.reconstruction_error(name, original_path=src)["per_layer"]
        assert recorded.keys() == actual.keys()
        for m in recorded:
            assert recorded[m] == pytest.approx(actual[m], rel=1e-4, abs=1e-6), (name, m)
    # public views are float tensors, on what is stored
    assert all(U.dtype == torch.float32 for U in loaded.components.values())
    assert all(L.dtype == torch.float32 for ls in loaded.all_loadings.values() for L in ls.values())
    for key, U in share.components.items():
        assert torch.equal(loaded.components[key], U)


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_format_v2_layout(quantized, scheme):
    share, folder = quantized[scheme]
    cfg = json.loads((folder / "share_config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["dtype"] == scheme
    assert cfg["storage"] == {"bases": scheme, "loadings": scheme, "block_size": 64, "layout": "packed"}
    infos, _ = read_header(str(folder / "shared_components.safetensors"))
    assert sorted(infos) == ["codes", "index", "scales"]  # three headers per file, not two per tensor
    codes = torch.int8 if scheme == "int8" else torch.uint8
    assert infos["codes"].dtype == codes and infos["scales"].dtype == torch.float32
    assert infos["index"].dtype == torch.int32 and infos["index"].shape == (len(share.components), 2)
    # codes: k·d per basis (int8) or ceil(k/2)·d (nf4, two per byte); one scale per 64 values
    want = sum((k if scheme == "int8" else -(-k // 2)) * d for d, k in (U.shape for U in share.components.values()))
    assert infos["codes"].shape == (want,)
    assert infos["scales"].shape == (sum(-(-U.numel() // 64) for U in share.components.values()),)
    # the stats count the data the files hold (codes + scales)
    st = share.config.compression_stats
    assert st["shared_bytes"] == infos["codes"].nbytes + infos["scales"].nbytes


@pytest.mark.parametrize("scheme", QUANTIZED)
def test_resave_is_bit_identical(quantized, scheme, tmp_path):
    _, folder = quantized[scheme]
    SHAREModel.from_pretrained(folder).save_pretrained(tmp_path / "again")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for rel in files:
        assert (folder / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_edits_keep_stored_forms_and_quantize_new_ones(quantized, adapter_dirs, tmp_path):
    share, folder = quantized["nf4"]
    loaded = SHAREModel.from_pretrained(folder)
    loaded.remove_adapter(loaded.adapter_names[-1])
    loaded.add_adapter(adapter_dirs[-1], name="again", variance_threshold=0.0)  # projected onto the nf4 bases
    assert all(L.dtype == torch.float32 for L in loaded.all_loadings["again"].values())
    loaded.save_pretrained(tmp_path / "edited")
    back = SHAREModel.from_pretrained(tmp_path / "edited")
    for name in back.adapter_names:
        for key, L in loaded.all_loadings[name].items():
            assert torch.equal(back.all_loadings[name][key], L), (name, key)
    first = share.adapter_names[0]
    rel = f"adapters/{first}/loadings.safetensors"
    assert (folder / rel).read_bytes() == (tmp_path / "edited" / rel).read_bytes()


def test_apply_and_load_into_use_dequantized_floats(quantized):
    from examples.make_adapters import tiny_bert

    share, _ = quantized["int8"]
    name = share.adapter_names[0]
    pm = share.apply(tiny_bert(), name)
    sd = share.reconstruct(name)
    weights = {k: v for k, v in pm.state_dict().items() if "lora_A" in k}
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    one = next(k for k in sd if "lora_A" in k)
    loaded = next(v for k, v in weights.items() if one.split("lora_A")[0].split("base_model.model.")[-1] in k)
    assert torch.equal(loaded, sd[one])


# ---------------------------------------------------------------------------------- malformed files
def _refingerprint(folder: Path) -> None:
    """Make the edited files pass the sha256 check, so that the reader's own checks are what refuses."""
    cfg_path = folder / "share_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["files"] = {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in cfg["files"]}
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _edit_tensors(rel: str, fn: Callable[[Dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        from lorashare.format.tensorfile import TensorFile

        with TensorFile(str(folder / rel)) as tf:
            tensors = tf.load_all()
        fn(tensors)
        (folder / rel).write_bytes(save_bytes(tensors, {"format": "pt"}))
    return run


def _edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def run(folder: Path) -> None:
        cfg = json.loads((folder / "share_config.json").read_text())
        fn(cfg)
        (folder / "share_config.json").write_text(json.dumps(cfg))
    return run


def _set(t, key, value):
    t[key] = value


def _poke(t, key, at, value):
    t[key].reshape(-1)[at] = value


BASES = "shared_components.safetensors"
MALFORMED = {
    "codes in the wrong dtype": (lambda t: _set(t, "codes", t["codes"].float()), "'codes' is"),
    "codes as a matrix": (lambda t: _set(t, "codes", t["codes"].reshape(1, -1)), "'codes' is"),
    "codes too short": (lambda t: _set(t, "codes", t["codes"][:-1].clone()), "needs codes up to|accounts for"),
    "codes too long": (lambda t: _set(t, "codes", torch.cat([t["codes"], t["codes"][:1]])), "accounts for"),
    "missing scales": (lambda t: t.pop("scales"), "a .* file holds exactly"),
    "missing index": (lambda t: t.pop("index"), "a .* file holds exactly"),
    "a tensor per key": (lambda t: _set(t, "m.q:A", torch.zeros(2, 2)), "a .* file holds exactly"),
    "NaN scale": (lambda t: _poke(t, "scales", 0, float("nan")), "NaN"),
    "infinite scale": (lambda t: _poke(t, "scales", 0, float("inf")), "infinite"),
    "negative scale": (lambda t: _poke(t, "scales", 0, -1.0), "negative"),
    "float16 scales": (lambda t: _set(t, "scales", t["scales"].half()), "float32 scales"),
    "scales too short": (lambda t: _set(t, "scales", t["scales"][:-1].clone()), "scales up to|accounts for"),
    "index in int64": (lambda t: _set(t, "index", t["index"].long()), "'index' is"),
    "index out of range": (lambda t: _poke(t, "index", 0, 10**6), "is not \\(a position"),
    "index negative": (lambda t: _poke(t, "index", 0, -1), "is not \\(a position"),
    "index width 0": (lambda t: _poke(t, "index", 1, 0), "is not \\(a position|accounts for"),
    "index twice": (lambda t: t["index"][1].copy_(t["index"][0]), "a second time|accounts for|needs codes"),
}
@pytest.mark.parametrize("scheme", QUANTIZED)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_quantized_files_are_refused(quantized, scheme, case, tmp_path):
    import shutil

    _, folder = quantized[scheme]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    fn, message = MALFORMED[case]
    rel = BASES if "scale" in case or "index" in case else "adapters/" + json.loads(
        (bad / "share_config.json").read_text())["adapter_names"][0] + "/loadings.safetensors"
    _edit_tensors(rel, fn)(bad)
    _refingerprint(bad)
    with pytest.raises(CheckpointError, match=message) as info:
        SHAREModel.from_pretrained(bad)
    assert rel in str(info.value) or "share_config.json" in str(info.value)


def test_int8_code_minus_128_and_nf4_padding_are_refused(adapter_dirs, tmp_path):
    import shutil

    share = SHAREModel.from_adapters(adapter_dirs, num_components=7, dtype="nf4", progress=False)  # odd k: padded
    share.save_pretrained(tmp_path / "nf4")
    shutil.copytree(tmp_path / "nf4", tmp_path / "pad")
    d, k = next(iter(share.components.values())).shape  # the first in the index: sorted keys
    first = sorted(share.components)[0]
    d, k = share.components[first].shape
    _edit_tensors(BASES, lambda t: _poke(t, "codes", (k // 2) * d, 0xFF))(tmp_path / "pad")  # last row, low nibble
    _refingerprint(tmp_path / "pad")
    with pytest.raises(CheckpointError, match="padding codes"):
        SHAREModel.from_pretrained(tmp_path / "pad")
    int8 = SHAREModel.from_adapters(adapter_dirs, num_components=7, dtype="int8", progress=False)
    int8.save_pretrained(tmp_path / "int8")
    _edit_tensors(BASES, lambda t: _poke(t, "codes", 0, -128))(tmp_path / "int8")
    _refingerprint(tmp_path / "int8")
    with pytest.raises(CheckpointError, match="-128"):
        SHAREModel.from_pretrained(tmp_path / "int8")


CONFIG_EDITS = {
    "no storage layout": (lambda c: c.pop("storage"), "storage"),
    "a float dtype with a layout": (lambda c: c.__setitem__("dtype", "float16"), "storage"),
    "format_version 1 with nf4": (lambda c: c.__setitem__("format_version", 1), "format_version"),
    "an unknown layout": (lambda c: c["storage"].__setitem__("layout", "component-major"), "storage"),
    "an unknown block size": (lambda c: c["storage"].__setitem__("block_size", 128), "storage"),
    "an unknown scheme": (lambda c: c["storage"].__setitem__("bases", "fp4"), "storage"),
    "no k for a group": (lambda c: c["k_per_group"].pop(sorted(c["k_per_group"])[0]), "k_per_group"),
    "a k that disagrees": (lambda c: c["k_per_group"].__setitem__(sorted(c["k_per_group"])[0], 3),
                          "accounts for|needs codes|padding codes"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_inconsistent_storage_config_is_refused(quantized, case, tmp_path):
    import shutil

    _, folder = quantized["nf4"]
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    fn, message = CONFIG_EDITS[case]
    _edit_config(fn)(bad)
    with pytest.raises(CheckpointError, match=message):
        SHAREModel.from_pretrained(bad)


def test_newer_format_is_refused_with_a_hint(quantized, tmp_path):
    """What lorashare 0.2.0 (formats ≤ 1) does with a v2 file, here one version up."""
    import shutil

    _, folder = quantized["int8"]
    shutil.copytree(folder, tmp_path / "v3")
    _edit_config(lambda c: c.__setitem__("format_version", 3))(tmp_path / "v3")
    with pytest.raises(CheckpointError, match="format_version 3; this lorashare reads up to 2. Upgrade"):
        SHAREModel.from_pretrained(tmp_path / "v3")


def test_float_storage_still_writes_format_1(adapter_dirs, tmp_path):
    SHAREModel.from_adapters(adapter_dirs, num_components=4, dtype="float16", progress=False).save_pretrained(tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "share_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["storage"] is None


# ------------------------------------------------------------------------------------ budget on disk
def _disk_bytes(folder: Path) -> int:
    """The bases' and loadings' files, headers included."""
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors") if "classifier_head" not in p.name)


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    synth = pytest.importorskip("benchmarks.synth")
    return synth.ensure_adapter_set("roberta", 10, "diff-seed", tmp_path_factory.mktemp("synth"))


@pytest.mark.parametrize("dtype,ratio", [("nf4", 16), ("int8", 16), ("float16", 6), ("nf4", 32)])
def test_target_ratio_is_met_on_disk(synthetic_set, dtype, ratio, tmp_path):
    lora = sum(os.path.getsize(d / "adapter_model.safetensors") for d in synthetic_set)
    share = SHAREModel.from_adapters([str(d) for d in synthetic_set], target_ratio=ratio, dtype=dtype, progress=False)
    share.save_pretrained(tmp_path / "ckpt")
    budget = share.config.budget_bytes
    on_disk = _disk_bytes(tmp_path / "ckpt")
    assert on_disk <= budget, (on_disk, budget)
    assert on_disk >= 0.9 * budget, (on_disk, budget)
    assert budget <= lora / ratio


# ------------------------------------------------------------------------------------- CLI, manifest
@pytest.mark.parametrize("scheme", QUANTIZED)
def test_cli_dtype(adapter_dirs, scheme, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["compress", *adapter_dirs, "-o", str(out), "-k", "4", "--dtype", scheme, "--json"]) == 0
    cfg = json.loads((out / "share_config.json").read_text())
    assert cfg["dtype"] == scheme and cfg["format_version"] == 2


def test_manifest_dtype_nf4(tmp_path):
    from lorashare.sync.manifest import load_manifest

    (tmp_path / "lorashare.yaml").write_text(
        "repo_id: acme/share\nadapters:\n  a: acme/a-lora\n  b: acme/b-lora\ncompression:\n  dtype: nf4\n")
    for n in "ab":
        (tmp_path / n).mkdir()
    m = load_manifest(str(tmp_path / "lorashare.yaml"))
    assert m.compression.dtype == "nf4"

