"""Fuzzing ``lorashare.sync.parse_manifest``: a valid Manifest or a LoraShareError, nothing else.

Three generators (hypothesis): random bytes and text; random YAML documents (any nesting of
scalars, lists and mappings, dumped with PyYAML); and documents of the manifest's own shape
with random keys and values, including adapter sources such as ``../x``, absolute paths,
symlinks out of the workspace, NUL bytes and weird Hub ids.  Each parse runs under a 10 s
alarm (a hang fails).  Besides the type, the test checks that errors were produced on
purpose: the parser's last-resort guard ("cannot read the manifest (SomeError: ...)"), which
converts unexpected exceptions, must never fire.  Valid manifests must keep folders inside the
workspace.

The number of cases run goes to the JSON file named by ``LORASHARE_RELIABILITY_REPORT``
(key ``fuzz_manifest``).
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorashare import LoraShareError
from lorashare import sync as S
from tests.reliability_report import report

CASES: Counter = Counter()
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




@pytest.fixture(scope="module", autouse=True)
def fuzz_summary() -> Iterator[None]:
    yield
    total = sum(v for k, v in CASES.items() if not k.startswith("outcome:"))
    print(f"\nmanifest fuzz cases: {total} ({dict(CASES)})")
    report("fuzz_manifest", {"cases": total, "by_generator_and_outcome": dict(sorted(CASES.items()))})


@pytest.fixture(scope="module")
def ws(tmp_path_factory, adapter_dirs) -> Path:
    """A workspace with two real adapter folders, a file, and symlinks leading out of it."""
    import shutil

    root = tmp_path_factory.mktemp("fuzzws") / "repo"
    (root / ".git").mkdir(parents=True)
    for name, src in zip(["a", "b"], adapter_dirs):
        shutil.copytree(src, root / "adapters" / name)
    (root / "adapters" / "file.txt").write_text("not an adapter")
    outside = root.parent / "outside"
    shutil.copytree(adapter_dirs[2], outside)
    (root / "adapters" / "escape").symlink_to(outside, target_is_directory=True)
    (root / "adapters" / "half").mkdir()
    (root / "adapters" / "half" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    (root / "adapters" / "half" / "adapter_model.safetensors").write_bytes(b"")
    return root


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only on a hang
    raise _Hang("parse_manifest took over 10 s")


def check(ws: Path, data: Any, generator: str) -> None:
    CASES[generator] += 1
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        m = S.parse_manifest(data, path=str(ws / "lorashare.yaml"), root=str(ws))
    except LoraShareError as exc:
        msg = str(exc)
        assert "cannot read the manifest (" not in msg, f"unexpected exception reached the guard: {msg}"
        assert msg.startswith("lorashare.yaml"), msg
        CASES[f"outcome:{type(exc).__name__}"] += 1
        return
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert isinstance(m, S.Manifest)
    assert len(m.adapters) >= 2 and "/" in m.repo_id
    real_ws = os.path.realpath(ws)
    for src in m.adapters.values():
        assert src.kind in ("folder", "hub")
        if src.kind == "folder":
            assert os.path.commonpath([os.path.realpath(src.folder), real_ws]) == real_ws, src
    CASES["outcome:valid"] += 1


# ------------------------------------------------------------------------------ generators
@SETTINGS
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=400),
                      st.binary(max_size=200).map(lambda b: b"repo_id: a/b\nadapters:\n" + b)))
def test_random_bytes_and_text(ws, data):
    check(ws, data, "bytes/text")


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.binary(max_size=10),
)
_trees = st.recursive(_scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.integers(), st.booleans()), kids, max_size=4)), max_leaves=20)


@SETTINGS
@given(doc=_trees, style=st.sampled_from([None, True, False]))
def test_random_yaml_documents(ws, doc, style):
    check(ws, yaml.safe_dump(doc, default_flow_style=style, allow_unicode=True), "yaml")


_ids = st.one_of(
    st.sampled_from(["acme/x", "a/b", "acme/multi-lora/legal", "acme/r@v3", "a/b@", "@v1", "a", "a/b/../c", "a//b",
                     "a/b@../../x", "-a/b", "a/b c", "ａ/ｂ", "a/" + "b" * 200, "a/b/\\c", "a/b@ x", "a/b\x00"]),
    st.text(max_size=40),
)
_sources = st.one_of(
    _ids,
    st.sampled_from(["adapters/a", "./adapters/b", "adapters/a/", "../outside", "../../etc", "/etc", "/", ".", "..",
                     "adapters/escape", "adapters/half", "adapters/file.txt", "adapters/missing", "adapters/../adapters/a",
                     "adapters\\a", "~/x", "adapters/a\x00", "", " "]),
    st.builds(lambda p: str(p), st.sampled_from(["/tmp", "/proc/self", "/dev/null"])),
    _scalars, st.lists(st.text(max_size=5), max_size=2), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
)
_names = st.one_of(st.sampled_from(["a", "b", "billing", ".", "..", "a/b", "x" * 200, "con", "-x", "é", "a b", "1"]),
                   st.text(max_size=12), st.integers(), st.booleans(), st.none())
_values = st.one_of(_scalars, st.sampled_from(["auto", "float16", "bfloat16", "float32", "fp16", 0, -1, 1, 2**70,
                                               0.95, 1.5, float("nan"), "1e400", True]))


@st.composite
def _manifests(draw):
    doc: Dict[Any, Any] = {}
    if draw(st.booleans()):
        doc["version"] = draw(st.one_of(st.just(1), _values))
    if draw(st.integers(0, 9)):
        doc["repo_id"] = draw(st.one_of(st.just("acme/share"), _ids, _scalars))
    if draw(st.booleans()):
        doc["private"] = draw(_values)
    if draw(st.booleans()):
        doc["compression"] = draw(st.one_of(_scalars, st.dictionaries(
            st.one_of(st.sampled_from(S.COMPRESSION_KEYS), st.text(max_size=8)), _values, max_size=4)))
    if draw(st.booleans()):
        doc["card"] = draw(st.one_of(_scalars, st.dictionaries(
            st.one_of(st.sampled_from(S.CARD_KEYS), st.text(max_size=8)), st.one_of(_values, st.text(max_size=60)),
            max_size=3)))
    if draw(st.integers(0, 9)):
        doc["adapters"] = draw(st.one_of(
            st.dictionaries(_names, _sources, min_size=0, max_size=5),
            st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                            st.sampled_from(["adapters/a", "./adapters/b", "acme/x", "acme/y@v1"]), min_size=2, max_size=4),
            _scalars, st.lists(_sources, max_size=3)))
    if draw(st.integers(0, 5)) == 0:
        doc[draw(st.one_of(st.text(max_size=10), st.integers()))] = draw(_values)
    return doc


@SETTINGS
@given(doc=_manifests(), flow=st.sampled_from([None, True, False]))
def test_schema_shaped_documents(ws, doc, flow):
    check(ws, yaml.safe_dump(doc, default_flow_style=flow, allow_unicode=True), "schema")


_VALID = {"version": 1, "repo_id": "acme/share", "private": False,
          "compression": {"num_components": 2, "variance_threshold": 0.9, "dtype": "float16"},
          "card": {"license": "mit", "description": "x"},
          "adapters": {"a": "adapters/a", "b": "./adapters/b", "c": "acme/x@v1", "d": "acme/multi/legal"}}


@st.composite
def _mutated(draw):
    """A valid manifest with one or two random edits: a field replaced, dropped, or an adapter added."""
    doc = json.loads(json.dumps(_VALID))
    for _ in range(draw(st.integers(1, 2))):
        where = draw(st.sampled_from(["top", "compression", "card", "adapters", "drop"]))
        if where == "top":
            doc[draw(st.sampled_from(list(S.TOP_KEYS)))] = draw(st.one_of(_values, _ids))
        elif where == "drop":
            doc.pop(draw(st.sampled_from(list(doc) or ["x"])), None)
        elif isinstance(doc.get(where), dict):
            doc[where][draw(st.one_of(_names.filter(lambda n: isinstance(n, str)), st.sampled_from(
                list(S.COMPRESSION_KEYS) + list(S.CARD_KEYS))))] = draw(st.one_of(_values, _sources))
    return doc


@SETTINGS
@given(doc=_mutated())
def test_mutated_valid_manifests(ws, doc):
    check(ws, yaml.safe_dump(doc, allow_unicode=True), "mutated")


def test_some_fuzzed_manifests_are_valid():
    """The schema generator reaches the valid path, not only errors (checked after the runs above)."""
    assert CASES["outcome:valid"] >= 5, dict(CASES)
