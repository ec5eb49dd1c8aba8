"""One source of truth: the spec, the state and the served tables never go out of step.

Each of the first four tests reproduces a failure of the design before the state existed:
a replaced adapter kept being served, a call in flight during an edit mixed two revisions,
settings (``weighting``, ``progress``) were lost on recompute and on save/load, and int8/nf4
codes were matched by identity so an in-place edit saved stale codes.  Then a stress test
(readers and an editor in threads), and a round trip of every field of the spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pytest
import torch

from lorashare import SHAREModel
from lorashare.codec.state import SHAREState
from lorashare.format.spec import CompressionSpec
from lorashare.sync.manifest import parse_manifest
from tests.conftest import make_adapter, tiny_bert


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> Dict[str, str]:
    """Five adapters: t0..t3 to compress, ``other`` to replace one of them with."""
    root = tmp_path_factory.mktemp("state")
    out = {f"t{i}": make_adapter(str(root / f"t{i}"), seed=40 + i) for i in range(4)}
    out["other"] = make_adapter(str(root / "other"), seed=77)
    out["far"] = make_adapter(str(root / "far"), seed=78, shared=0.0)
    return out


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(1, 100, (6, 7), generator=torch.Generator().manual_seed(5))


def _share(dirs: Dict[str, str], k: int = 16, **kw) -> SHAREModel:
    return SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2", "t3")}, num_components=k,
                                    progress=False, **kw)


def _logits(share: SHAREModel, batch: torch.Tensor, rows: Sequence[str]) -> torch.Tensor:
    """What a fresh serve() of this model gives (the reference for its current revision)."""
    with torch.no_grad():
        return share.serve(tiny_bert())(input_ids=batch, adapter_names=list(rows)).logits


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Far apart compared with float error (tiny BERT's logits are about 1e-2)."""
    return float((a - b).abs().max() / b.abs().max()) > 1e-2


def _of(state: SHAREState) -> SHAREModel:
    return SHAREModel._of(state, progress=False)


# --------------------------------------------------------------------------- 1. replaced adapter
def test_a_replaced_adapter_is_served_as_the_new_one_without_refresh(dirs, batch):
    share = _share(dirs)
    served = share.serve(tiny_bert())
    rows = ["t3"] * 6
    with torch.no_grad():
        before = served(input_ids=batch, adapter_names=rows).logits
    share.remove_adapter("t3")
    report = share.add_adapter(dirs["other"], name="t3", variance_threshold=0.0)
    assert report["method"] == "projection"  # neither the names nor the bases object changed
    with torch.no_grad():
        after = served(input_ids=batch, adapter_names=rows).logits
    fresh = _logits(share, batch, rows)
    assert torch.allclose(after, fresh, atol=1e-6, rtol=0)
    assert _differ(after, before)  # the old t3 is gone
    # The atomic form does the same in one step.
    share.add_adapter(dirs["t3"], name="t3", replace=True, variance_threshold=0.0)
    with torch.no_grad():
        again = served(input_ids=batch, adapter_names=rows).logits
    assert torch.allclose(again, _logits(share, batch, rows), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- 2. a call in flight
def test_a_call_in_flight_keeps_the_revision_it_started_with(dirs, batch):
    share = _share(dirs)
    rows = ["t1", "t2", "t3", "t1", "t2", "t3"]
    expected_old = _logits(share, batch, rows)
    base = tiny_bert()
    served = share.serve(base)
    reached, go = threading.Event(), threading.Event()
    pausing = threading.local()

    def pause(module, args):  # inside layer 1 of the paused call only
        if getattr(pausing, "on", False):
            reached.set()
            assert go.wait(30)

    handle = base.bert.encoder.layer[1].register_forward_pre_hook(pause)
    result: Dict[str, torch.Tensor] = {}
    failure: List[BaseException] = []

    def call() -> None:
        pausing.on = True
        try:
            with torch.no_grad():
                result["out"] = served(input_ids=batch, adapter_names=rows).logits
        except BaseException as exc:  # noqa: BLE001 — reported below
            failure.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert reached.wait(30)
    # Meanwhile: t3 removed and re-added under the same name, t0 removed (slots move), and a call.
    share.remove_adapter("t3")
    share.add_adapter(dirs["other"], name="t3", variance_threshold=0.0)
    share.remove_adapter("t0")
    with torch.no_grad():
        during = served(input_ids=batch, adapter_names=rows).logits
    go.set()
    t.join(60)
    handle.remove()
    assert not failure, failure
    assert torch.allclose(result["out"], expected_old, atol=1e-6, rtol=0)
    assert torch.allclose(during, _logits(share, batch, rows), atol=1e-6, rtol=0)
    assert _differ(during, expected_old)


# --------------------------------------------------------------------------- 3. settings kept
def _subspace_distance(U: torch.Tensor, V: torch.Tensor) -> float:
    """‖P_U − P_V‖ of two orthonormal bases (0 for the same subspace)."""
    return float(torch.linalg.matrix_norm(U @ U.T - V @ V.T, ord=2))


def test_recompute_and_save_load_keep_every_setting(dirs, tmp_path):
    share = _share(dirs, k=6, weighting="factors")
    assert share.spec.weighting == "factors"
    share.add_adapter(dirs["other"], name="t4", force_recompute=True)
    fit = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2", "t3", "other")}, num_components=6,
                                   weighting="factors", progress=False)
    fit = SHAREModel(fit.config, dict(fit.components), {n if n != "other" else "t4": dict(v) for n, v in
                                                       fit.all_loadings.items()}, {})
    for key, U in share.components.items():
        assert _subspace_distance(U.double(), fit.components[key].double()) < 1e-4, key
    share.save_pretrained(tmp_path / "ck")
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    assert loaded.spec == share.spec
    loaded.add_adapter(dirs["far"], name="t5", force_recompute=True)
    assert loaded.spec.weighting == "factors"
    # ΔW weighting would give other bases: the setting is what makes them agree.
    dw = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2", "t3", "other", "far")}, num_components=6,
                                  progress=False)
    fx = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2", "t3", "other", "far")}, num_components=6,
                                  weighting="factors", progress=False)
    key = next(iter(loaded.components))
    assert _subspace_distance(loaded.components[key].double(), fx.components[key].double()) < 1e-4
    assert _subspace_distance(dw.components[key].double(), fx.components[key].double()) > 1e-2


def test_progress_setting_is_kept_on_recompute(dirs, monkeypatch):
    import lorashare.codec.compress as C

    asked: List[bool] = []
    real = C._progress
    monkeypatch.setattr(C, "_progress", lambda opts, total: (asked.append(opts.progress), real(opts, total))[1])
    for progress in (False, True):
        share = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1")}, num_components=4, progress=progress)
        share.add_adapter(dirs["other"], name="t4", force_recompute=True)
        assert asked == [progress, progress], (progress, asked)  # the first compression, then the recompute
        asked.clear()


# --------------------------------------------------------------------------- 4. quantized values
@pytest.mark.parametrize("dtype", ["int8", "nf4"])
def test_an_in_place_edit_of_a_quantized_loading_is_saved(dirs, tmp_path, dtype):
    share = _share(dirs, k=8, dtype=dtype)
    share.save_pretrained(tmp_path / "a")
    key = next(iter(share.all_loadings["t1"]))
    untouched = share.all_loadings["t2"][key].clone()
    share.all_loadings["t1"][key].mul_(2.0)
    edited = share.all_loadings["t1"][key].clone()
    share.save_pretrained(tmp_path / "b")
    back = SHAREModel.from_pretrained(tmp_path / "b")
    from lorashare.format.storage import quantize

    assert torch.equal(back.all_loadings["t1"][key], quantize(edited, dtype).dequantize())
    assert torch.equal(back.all_loadings["t2"][key], untouched)
    # Unedited tensors keep their codes: the files of an untouched adapter are byte-identical.
    same = (tmp_path / "a" / "adapters" / "t2" / "loadings.safetensors").read_bytes()
    assert (tmp_path / "b" / "adapters" / "t2" / "loadings.safetensors").read_bytes() == same
    assert (tmp_path / "b" / "adapters" / "t1" / "loadings.safetensors").read_bytes() != \
        (tmp_path / "a" / "adapters" / "t1" / "loadings.safetensors").read_bytes()


def test_a_resave_is_byte_identical_for_every_dtype(dirs, tmp_path):
    for dtype in ("float32", "bfloat16", "int8", "nf4"):
        _share(dirs, k=8, dtype=dtype).save_pretrained(tmp_path / dtype)
        SHAREModel.from_pretrained(tmp_path / dtype).save_pretrained(tmp_path / f"{dtype}-again")
        for f in sorted((tmp_path / dtype).rglob("*")):
            if f.is_file():
                twin = tmp_path / f"{dtype}-again" / f.relative_to(tmp_path / dtype)
                assert twin.read_bytes() == f.read_bytes(), (dtype, f.name)


# --------------------------------------------------------------------------- the state
def test_every_edit_publishes_one_new_revision_and_leaves_the_old_state_alone(dirs):
    share = _share(dirs)
    s0 = share.state
    names0, comps0 = s0.names, dict(s0.components)
    share.add_adapter(dirs["other"], name="t4", variance_threshold=0.0)
    s1 = share.state
    share.remove_adapter("t0")
    share.set_source("t1", "adapters/t1")
    share.add_adapter(dirs["far"], name="t5", force_recompute=True)
    revisions = [s0.revision, s1.revision, share.state.revision]
    assert revisions == [0, 1, 4]
    assert s0.names == names0 and all(torch.equal(comps0[k], v) for k, v in s0.components.items())
    assert share.config.adapter_names == list(share.state.names) == share.adapter_names
    assert share.config.num_adapters == len(share.state.records)
    assert share.config.adapters["t1"]["source"] == "adapters/t1" and share.adapter_sources["t1"] == "adapters/t1"
    with pytest.raises(TypeError):
        share.all_loadings["t1"]["x"] = torch.zeros(1)  # views are read-only: edits go through the methods
    with pytest.raises(dataclasses.FrozenInstanceError):
        share.state.revision = 9


# --------------------------------------------------------------------------- stress
def test_readers_and_an_editor_in_threads(dirs, batch):
    """Readers serve mixed batches while an editor adds, removes, replaces and recomputes.

    Every call's output equals, to float precision, a fresh serve() of one revision published
    between its start and its end (so every row is one adapter's output at that revision); no call raises.
    """
    share = _share(dirs)
    served = share.serve(tiny_bert())
    plans = [["t1", "t2", "__base__", "t1", "t2", "t1"], ["t2", "t2", "t1", "__base__", "t1", "t2"]]
    history: List[SHAREState] = [share.state]
    calls: List[Tuple[SHAREState, SHAREState, int, torch.Tensor]] = []
    errors: List[BaseException] = []
    stop = threading.Event()

    def reader(which: int) -> None:
        rows = plans[which]
        n = 0
        while not stop.is_set() and n < 60:
            before = share.state
            try:
                with torch.no_grad():
                    out = served(input_ids=batch, adapter_names=rows).logits
            except BaseException as exc:  # noqa: BLE001 — the test fails below with it
                errors.append(exc)
                return
            calls.append((before, share.state, which, out))
            n += 1

    def editor() -> None:
        edits = [
            lambda: share.add_adapter(dirs["other"], name="x", variance_threshold=0.0),
            lambda: share.add_adapter(dirs["other"], name="t2", replace=True, variance_threshold=0.0),
            lambda: share.remove_adapter("x"),
            lambda: share.add_adapter(dirs["far"], name="y", force_recompute=True),
            lambda: share.remove_adapter("t0"),
            lambda: share.add_adapter(dirs["t2"], name="t2", replace=True),
            lambda: share.remove_adapter("y"),
        ]
        try:
            for e in edits:
                e()
                history.append(share.state)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            stop.set()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)] + [threading.Thread(target=editor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert len(history) == 8 and [s.revision for s in history] == sorted({s.revision for s in history})
    order = {id(s): i for i, s in enumerate(history)}
    expected = {(i, w): _logits(_of(s), batch, plans[w]) for i, s in enumerate(history) for w in range(2)}
    spans = 0
    for before, after, which, out in calls:
        lo, hi = order[id(before)], order[id(after)]
        spans += hi > lo
        matches = [i for i in range(lo, hi + 1) if torch.allclose(out, expected[(i, which)], atol=1e-7, rtol=1e-5)]
        assert matches, (lo, hi, which)
    assert len(calls) >= 20
    # The revisions really differ for these rows (t2 replaced, bases recomputed): the check has teeth.
    assert _differ(expected[(2, 0)], expected[(0, 0)])


# --------------------------------------------------------------------------- the spec
SPECS = [
    CompressionSpec(),
    CompressionSpec(num_components=5, variance_threshold=0.8, dtype="float16"),
    CompressionSpec(num_components="auto", variance_threshold=0.9, dtype="bfloat16", weighting="factors"),
    CompressionSpec(num_components="auto", budget_bytes=60_000, dtype="int8"),
    CompressionSpec(target_ratio=3.0, dtype="nf4", weighting="factors"),
    CompressionSpec(num_components=7, strict=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.to_dict().items()
                                                               if v != getattr(CompressionSpec(), k)) or "default")
def test_spec_round_trip(dirs, tmp_path, spec):
    """from_adapters → save → load → recompute keeps the spec and gives the same bases."""
    keywords = spec.to_dict()
    share = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2")}, progress=False, **keywords)
    assert share.spec == spec
    again = SHAREModel.from_adapters({n: dirs[n] for n in ("t0", "t1", "t2")}, progress=False, spec=spec)
    assert again.spec == spec and all(torch.equal(again.components[k], v) for k, v in share.components.items())
    share.save_pretrained(tmp_path / "ck")
    loaded = SHAREModel.from_pretrained(tmp_path / "ck")
    assert loaded.spec == spec and CompressionSpec.from_dict(loaded.config.compression) == spec
    # A recompute from the same originals fits the same bases again.
    loaded.remove_adapter("t2")
    loaded.add_adapter(dirs["t2"], name="t2", force_recompute=True, originals={n: dirs[n] for n in ("t0", "t1")})
    assert loaded.spec == spec
    for key, U in share.components.items():
        V = loaded.components[key]
        assert U.shape == V.shape, key
        assert _subspace_distance(U.double(), V.double()) < 1e-3, key


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_a_manifest_gives_the_same_spec_as_the_same_keywords(tmp_path, dirs, spec):
    lines = [f"  {k}: {str(v).lower() if isinstance(v, bool) else ('null' if v is None else v)}"
             for k, v in spec.to_dict().items()]
    text = "repo_id: acme/x\ncompression:\n" + "\n".join(lines) + "\nadapters:\n  a: acme/a\n  b: acme/b\n"
    assert parse_manifest(text, root=str(tmp_path)).compression == spec


def test_older_checkpoints_migrate_their_settings(dirs, tmp_path):
    share = _share(dirs, k=6, dtype="float16")
    share.save_pretrained(tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "share_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["compression"]  # as written before the spec existed
    cfg_path.write_text(json.dumps(cfg))
    loaded = SHAREModel.from_pretrained(tmp_path / "ck", verify=False)
    assert loaded.spec == CompressionSpec(num_components=6, dtype="float16")


def test_spec_refuses_bad_values_naming_them():
    from lorashare.errors import ConfigError

    for bad, needle in (({"num_components": 0}, "num_components=0"), ({"dtype": "fp8"}, "dtype='fp8'"),
                        ({"weighting": "pca"}, "weighting='pca'"), ({"budget_bytes": 10, "target_ratio": 2},
                                                                    "both set a byte budget"),
                        ({"strict": "yes"}, "strict='yes'"), ({"variance_threshold": 1.5}, "variance_threshold=1.5")):
        with pytest.raises(ConfigError, match=needle):
            CompressionSpec(**bad)
    with pytest.raises(ConfigError, match=r"unknown settings \['chunk'\]"):
        CompressionSpec.from_dict({"chunk": 3})


# --------------------------------------------------------------------------- older checkpoints
OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "written-by-0.2.0-dev")


@pytest.mark.parametrize("dtype, k", [("float32", 8), ("int8", 6), ("nf4", 5)])
def test_checkpoints_written_before_the_state_rebuild_bit_for_bit(tmp_path, dtype, k):
    """Checkpoints saved by 0.2.0 before the state existed (tests/data) still load, keep their heads
    bit for bit (sha256 recorded then), rebuild every factor as U·L of their stored values, and
    re-save to the very same tensor files, whose rebuild is bit-identical to the first.

    The factors' recorded sha256 came from one CPU's float32 matrix product; another CPU's kernel
    sums in another order (a last-bit difference), so factors are checked against the product in
    float64 instead, to float32 rounding."""
    want = json.load(open(os.path.join(OLD, "rebuilt-sha256.json")))[dtype]
    share = SHAREModel.from_pretrained(os.path.join(OLD, dtype))
    assert share.spec == CompressionSpec(num_components=k, dtype=dtype)  # migrated: no spec was stored then

    def digests(model: SHAREModel) -> Dict[str, Dict[str, str]]:
        return {n: {key: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
                    for key, t in sorted(model.reconstruct(n).items())} for n in model.adapter_names}

    first = digests(share)
    assert {n: set(d) for n, d in first.items()} == {n: set(d) for n, d in want.items()}
    factors = 0
    for n in share.adapter_names:
        rebuilt = share.reconstruct(n)
        for key, loading in share.all_loadings[n].items():
            module, side = key.rsplit(":", 1)
            exact = (share.components[key].double() @ loading.double()).float()  # (d, r)
            got = rebuilt[f"base_model.model.{module}.lora_{side}.weight"]
            got = got.T if side == "A" else got
            torch.testing.assert_close(got, exact, rtol=2e-6, atol=1e-6 * float(exact.abs().max()))
            factors += 1
        heads = share.all_classifier_heads.get(n, {})
        assert {h: first[n][h] for h in heads} == {h: want[n][h] for h in heads}  # copied bit for bit
    assert factors == sum(len(share.all_loadings[n]) for n in share.adapter_names) > 0
    share.save_pretrained(tmp_path / "again")
    assert digests(SHAREModel.from_pretrained(tmp_path / "again")) == first
    # The tensors files are byte-identical: only share_config.json (now with the spec) and the card changed.
    for f in sorted(Path(OLD, dtype).rglob("*.safetensors")):
        assert (tmp_path / "again" / f.relative_to(Path(OLD, dtype))).read_bytes() == f.read_bytes(), f


def test_the_cli_keeps_the_spec_and_replaces_in_one_step(dirs, tmp_path, capsys):
    from lorashare.cli import main

    ck = str(tmp_path / "ck")
    assert main(["compress", dirs["t0"], dirs["t1"], dirs["t2"], "-o", ck, "-k", "5", "--weighting", "factors",
                 "--dtype", "int8", "-q"]) == 0
    capsys.readouterr()
    assert main(["info", ck, "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)["compression"]
    assert CompressionSpec.from_dict(spec) == CompressionSpec(num_components=5, weighting="factors", dtype="int8")
    before = SHAREModel.from_pretrained(ck).reconstruct("t1")
    assert main(["add", ck, dirs["other"], "--name", "t1", "--replace", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter_name"] == "t1"
    after = SHAREModel.from_pretrained(ck)
    assert after.adapter_names == ["t0", "t2", "t1"] and after.spec.weighting == "factors"
    assert any(not torch.equal(before[k], v) for k, v in after.reconstruct("t1").items())
    assert main(["add", ck, dirs["other"], "--name", "t1"]) == 1
    assert "--replace" in capsys.readouterr().err
