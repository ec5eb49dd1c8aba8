"""``lorashare sync``: manifest validation, the plan (pure), and runs in process against the test Hub.

Runs use :class:`tests.hubserver.HubServer` through the ``hub``/``hf_cache`` fixtures (see
``tests/hub_fixtures.py``); ``HF_ENDPOINT`` and ``HF_TOKEN`` are read by lorashare at call time.
Every test starts outside GitHub Actions (the ``clean_env`` fixture), even when the suite itself
runs on a GitHub runner, so nothing writes to the real runner's files.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

from lorashare import sync as S
from lorashare.cli import main
from lorashare.errors import ConfigError, LoraShareError
from lorashare.format.checkpoint import CardData, SHAREConfig
from tests.action_runner import parse_output_file
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubApiError, HubServer

REPO = "tester/support-share"
RUNNER_VARS = (
    "GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_WORKSPACE", "GITHUB_ENV", "RUNNER_TEMP",
    "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN",
)


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in RUNNER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # sync may point it at RUNNER_TEMP


@pytest.fixture
def ws(tmp_path: Path, adapter_dirs, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository checkout: ``.git``, ``adapters/{billing,refunds,legal,spare}``; the cwd."""
    root = tmp_path / "repo"
    (root / ".git").mkdir(parents=True)
    for name, src in zip(["billing", "refunds", "legal", "spare"], adapter_dirs):
        shutil.copytree(src, root / "adapters" / name)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    return hub


def manifest_text(adapters: Dict[str, str], *, compression: str = "{num_components: 32}", extra: str = "") -> str:
    lines = [f"repo_id: {REPO}", f"compression: {compression}", "adapters:"]
    lines += [f"  {n}: {s}" for n, s in adapters.items()]
    return "\n".join(lines) + "\n" + extra


def write(ws: Path, text: str, name: str = "lorashare.yaml") -> Path:
    p = ws / name
    p.write_text(text, encoding="utf-8")
    return p


def parse(ws: Path, text: str) -> S.Manifest:
    return S.parse_manifest(text, path=str(ws / "lorashare.yaml"), root=str(ws))


def head_title(hub: HubServer) -> str:
    """The summary line of the checkpoint repo's head commit."""
    return hub.repo(REPO).commits[hub.resolve(REPO)].title


def sync_json(capsys, *args: str) -> dict:
    rc = main(["sync", "--json", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


ABC = {"billing": "adapters/billing", "refunds": "adapters/refunds", "legal": "adapters/legal"}


# ------------------------------------------------------------------------ manifest: valid
def test_full_manifest_parses_with_kinds_and_lines(ws):
    text = (
        "version: 1\n"
        "repo_id: acme/support-adapters-share\n"
        "private: true\n"
        "compression: {num_components: auto, variance_threshold: 0.9, dtype: float16}\n"
        "adapters:\n"
        "  billing: ./adapters/billing/\n"
        "  refunds: acme/refunds-lora@v3\n"
        "  legal: acme/multi-lora/legal\n"
        f"  spare: {ws / 'adapters' / 'spare'}\n"
        "card: {license: apache-2.0, description: \"Support adapters\"}\n"
    )
    m = parse(ws, text)
    assert m.repo_id == "acme/support-adapters-share" and m.private is True
    assert m.compression == S.Compression("auto", 0.9, "float16", None)
    assert m.card == S.CardOptions("apache-2.0", "Support adapters")
    b, r, legal, s = (m.adapters[n] for n in ("billing", "refunds", "legal", "spare"))
    assert (b.kind, b.text, b.folder) == ("folder", "adapters/billing", str(ws / "adapters" / "billing"))
    assert s.kind == "folder" and s.text == "adapters/spare"  # absolute inside the workspace: fine, recorded relative
    assert (r.kind, r.ref.repo_id, r.ref.revision) == ("hub", "acme/refunds-lora", "v3")
    assert (legal.kind, legal.ref.repo_id, legal.ref.subfolder, legal.ref.revision) == ("hub", "acme/multi-lora", "legal", None)
    assert (b.line, r.line, legal.line) == (6, 7, 8)
    assert m.lines["compression"] == 4 and m.lines["card"] == 10


def test_defaults_and_subfolder_manifest(ws):
    (ws / "config").mkdir()
    text = "repo_id: a/b\nadapters:\n  x: ../adapters/billing\n  y: ../adapters/refunds\n"
    m = S.load_manifest(str(write(ws / "config", text)))
    assert m.compression == S.Compression() and m.card == S.CardOptions() and m.private is False
    assert m.file == "config/lorashare.yaml" and m.root == str(ws)
    assert m.adapters["x"].text == "../adapters/billing" and m.adapters["x"].kind == "folder"


# ----------------------------------------------------------------------- manifest: errors
@pytest.mark.parametrize("text, pattern", [
    ("repo_id: a/b\nadapters:\n  billing: adapters/billing\n  refunds: not a hub id!\n",
     r"^lorashare\.yaml:4: adapters\.refunds: 'not a hub id!' is not a folder and not a Hub id"),
    ("repo_id: a/b\nadapter:\n  x: y/z\n", r"^lorashare\.yaml:2: adapter: unknown key; did you mean 'adapters'\?"),
    ("repo_id: a/b\ncompresion: {}\nadapters: {x: a/b, y: a/c}\n", r"lorashare\.yaml:2: compresion: .*did you mean 'compression'"),
    ("repo_id: a/b\ncompression:\n  num_component: 4\nadapters: {x: a/b, y: a/c}\n",
     r"lorashare\.yaml:3: compression\.num_component: unknown key; did you mean 'num_components'"),
    ("repo_id: a/b\ncard: {licence: mit}\nadapters: {x: a/b, y: a/c}\n", r":2: card\.licence: .*did you mean 'license'"),
    ("repo_id: a/b\nadapters:\n  x: a/b\n  x: a/c\n", r":4: adapters\.x: duplicate key \(first on line 3\)"),
    ("repo_id: a/b\nadapters:\n  x: a/b\n", r":3: adapters: needs at least 2 adapters"),
    ("adapters: {x: a/b, y: a/c}\n", r"missing 'repo_id'"),
    ("repo_id: a/b\n", r"missing 'adapters'"),
    ("repo_id: nope\nadapters: {x: a/b, y: a/c}\n", r":1: repo_id: 'nope' is not a Hub repo id"),
    ("repo_id: a/b\nprivate: maybe\nadapters: {x: a/b, y: a/c}\n", r":2: private: expected true or false"),
    ("repo_id: a/b\ncompression: {num_components: 0}\nadapters: {x: a/b, y: a/c}\n", r"num_components: expected an integer ≥ 1 or 'auto'"),
    ("repo_id: a/b\ncompression: {num_components: true}\nadapters: {x: a/b, y: a/c}\n", r"num_components: expected"),
    ("repo_id: a/b\ncompression: {variance_threshold: 1.5}\nadapters: {x: a/b, y: a/c}\n", r"variance_threshold: expected a number in \(0, 1\]"),
    ("repo_id: a/b\ncompression: {dtype: float61}\nadapters: {x: a/b, y: a/c}\n", r"dtype: expected one of .*did you mean"),
    ("repo_id: a/b\ncompression: {budget_bytes: -1}\nadapters: {x: a/b, y: a/c}\n", r"budget_bytes: expected"),
    ("repo_id: a/b\nversion: 2\nadapters: {x: a/b, y: a/c}\n", r":2: version: unsupported manifest version"),
    ("repo_id: a/b\nadapters:\n  bad/name: a/b\n  y: a/c\n", r":3: adapters\.bad/name: bad adapter name"),
    ("repo_id: a/b\nadapters:\n  '..': a/b\n  y: a/c\n", r"adapters\.\.\.: bad adapter name"),
    ("repo_id: a/b\nadapters:\n  x: [a/b]\n  y: a/c\n", r":3: adapters\.x: expected a single value, got a list"),
    ("repo_id: a/b\nadapters:\n  1: a/b\n  y: a/c\n", r":3: adapters: keys must be plain names"),
    ("- a\n- b\n", r"^lorashare\.yaml:1: expected a mapping"),
    ("repo_id: [a\n", r"^lorashare\.yaml:\d+: invalid YAML"),
    ("", r"the manifest is empty"),
])
def test_manifest_errors_name_line_and_key(ws, text, pattern):
    with pytest.raises(S.ManifestError, match=pattern) as info:
        parse(ws, text)
    assert isinstance(info.value, ConfigError)


def test_escapes_are_refused(ws, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(ws / "adapters" / "spare", outside)
    (ws / "adapters" / "link").symlink_to(outside, target_is_directory=True)
    sneaky = ws / "adapters" / "sneaky"
    sneaky.mkdir()
    shutil.copy(ws / "adapters" / "spare" / "adapter_config.json", sneaky)
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    base = "repo_id: a/b\nadapters:\n  ok: adapters/billing\n  x: {}\n"
    for source, pattern in [
        ("../outside", r":4: adapters\.x: '\.\./outside' is outside the workspace"),
        ("adapters/../../outside", r"outside the workspace"),
        (str(outside), r"outside the workspace"),
        ("/etc", r"outside the workspace"),
        ("adapters/link", r"resolves outside the workspace \(a symlink"),
        ("adapters/sneaky", r"adapter_model\.safetensors is a symlink that resolves outside"),
        ("./adapters/missing", r":4: adapters\.x: \./adapters/missing does not exist \(adapters has billing, legal"),
        ("adapters/billing/adapter_config.json", r"is a file, not an adapter folder"),
        ("./.git", r"has no adapter_config\.json"),
    ]:
        with pytest.raises(S.ManifestError, match=pattern):
            parse(ws, base.format(source))


def test_manifest_outside_workspace_and_missing_file(ws, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    path = write(other, manifest_text(ABC))
    with pytest.raises(S.ManifestError, match="outside the workspace"):
        S.load_manifest(str(path), root=str(ws))
    with pytest.raises(S.ManifestError, match="no such file"):
        S.load_manifest(str(ws / "nope.yaml"))


NASTY = [
    b"", b"\x00", b"\xff\xfe\x00", "\ufeffrepo_id: a/b".encode(), "repo_id: a/b".encode("utf-16"),
    b"[" * 5000 + b"]" * 5000, b"{" * 3000, b"&a [*a]", b"a: &a [*a, *a]\nrepo_id: *a\n",
    b"!!python/object/apply:os.system ['echo hi']", b"repo_id: !!python/name:os.system\n",
    b"repo_id: !!int abc\nadapters: {}\n", b"repo_id: !!float x\n", b"repo_id: !!binary '%%%'\n",
    b"? [a, b]\n: c\n", b"<<: {a: 1}\nrepo_id: a/b\n", b"---\na: 1\n---\nb: 2\n", b"%YAML 9.9\n---\na: 1\n",
    b"repo_id: a/b\nadapters:\n  x: \x00\n", b"repo_id: a/b\nadapters:\n  x: \"a/b\\0\"\n  y: a/c\n",
    b"repo_id: a/b\nadapters:\n  x: .\n  y: ..\n", b"repo_id: a/b\nadapters:\n  x: ~\n  y: a/c\n",
    b"repo_id: 1e400\n", b"repo_id: a/b\ncompression: {num_components: 99999999999999999999999}\nadapters: {x: a/b, y: a/c}\n",
    b"repo_id: a/b\ncompression: {variance_threshold: .nan}\nadapters: {x: a/b, y: a/c}\n",
    b"repo_id: a/b\ncompression: ~\ncard: ~\nadapters: {x: a/b, y: a/c}\n",
    b"repo_id: a/b\nadapters: {x: a/b, y: 'a/b@'}\n", b"repo_id: 2001-01-01\n", b"x" * (S.MAX_MANIFEST_BYTES + 10),
]


def test_parse_only_raises_config_errors_on_garbage(ws):
    rng = random.Random(1234)
    samples = list(NASTY)
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(150)]
    tokens = ["repo_id", "adapters", "compression", "card", ":", " ", "\n", "  ", "- ", "{", "}", "[", "]", ",", "a/b",
              "./adapters/billing", "&x", "*x", "!!str", "!!map", "~", "true", "1.5", "'", '"', "#", "?", "|", ">", "@",
              "num_components", "auto", "license", "..", "/", "\t", "%", "!", "<<"]
    samples += ["".join(rng.choice(tokens) for _ in range(rng.randrange(1, 40))).encode() for _ in range(300)]
    for data in samples:
        for payload in (data, data.decode("utf-8", "replace")):
            try:
                S.parse_manifest(payload, path=str(ws / "lorashare.yaml"), root=str(ws))
            except ConfigError:
                pass
            except BaseException as exc:  # noqa: BLE001 - the assertion is the point
                pytest.fail(f"{type(exc).__name__} escaped for {payload[:80]!r}: {exc}")


def test_valid_after_nasty_hub_text_is_ok(ws):
    m = parse(ws, "repo_id: a/b\nadapters: {x: a/b, y: 'a/b@v1'}\n")
    assert m.adapters["y"].ref.revision == "v1"


# ---------------------------------------------------------------------------- plan (pure)
def published_config(adapters: Dict[str, Dict], **kw) -> SHAREConfig:
    cfg = SHAREConfig(format_version=1, adapter_names=list(adapters), adapters=adapters, requested_components=32,
                      component_selection="fixed", num_components=32, variance_threshold=0.95, dtype="float32")
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def hub_manifest(ws) -> S.Manifest:
    return parse(ws, manifest_text({"billing": "adapters/billing", "refunds": "acme/refunds@v3", "legal": "acme/multi/legal"}))


FP = {"billing": "a" * 64, "refunds": "b" * 40, "legal": "c" * 40}


def entry(source: str, *, sha256: str = "0" * 64, revision: Optional[str] = None) -> Dict:
    return {"source": source, "sha256": sha256, "revision": revision}


def same_as_published(**changes) -> Dict[str, Dict]:
    base = {"billing": entry("adapters/billing", sha256=FP["billing"]),
            "refunds": entry("acme/refunds@v3", revision=FP["refunds"]),
            "legal": entry("acme/multi/legal", revision=FP["legal"])}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def test_plan_none_create_add(hub_manifest):
    p = S.plan_sync(hub_manifest, FP, None)
    assert p.action == "create" and p.changed and p.by_status("added") == ["billing", "refunds", "legal"]
    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published()), base_sha="f" * 40)
    assert p.action == "none" and not p.changed and p.base_sha == "f" * 40
    assert {a.status for a in p.adapters} == {"unchanged"}
    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published(legal=None)))
    assert p.action == "add" and p.by_status("added") == ["legal"] and p.reasons == ["legal added"]


def test_plan_changes_removals_settings_force_card(hub_manifest):
    pub = same_as_published(billing=entry("adapters/billing", sha256="9" * 64),
                            refunds=entry("acme/refunds@v3", revision="8" * 40), old=entry("adapters/old"))
    p = S.plan_sync(hub_manifest, FP, published_config(pub))
    assert p.action == "recompute"
    assert p.by_status("changed") == ["billing", "refunds"] and p.by_status("removed") == ["old"]
    assert p.reasons == ["billing changed (sha256 99999999 → aaaaaaaa)", "refunds changed (commit 88888888 → bbbbbbbb)", "old removed"]
    assert S.commit_message(p) == ("lorashare sync: recompute: billing changed (sha256 99999999 → aaaaaaaa), "
                                   "refunds changed (commit 88888888 → bbbbbbbb), old removed")

    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published(legal=entry("acme/multi/legal@v1", revision=FP["legal"]))))
    assert p.action == "recompute" and p.reasons == ["legal changed (source 'acme/multi/legal@v1' → 'acme/multi/legal')"]
    # a folder that became a Hub id with the same text is a change too
    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published(refunds=entry("acme/refunds@v3", sha256=FP["refunds"]))))
    assert p.by_status("changed") == ["refunds"]

    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published(), dtype="float16", requested_components="auto"))
    assert p.action == "recompute" and p.settings == ["num_components auto → 32", "dtype float16 → float32"]
    assert "compression settings changed (num_components auto → 32, dtype float16 → float32)" in p.reasons

    p = S.plan_sync(hub_manifest, FP, published_config(same_as_published(legal=None)), force=True)
    assert p.action == "recompute" and p.reasons == ["forced", "legal added"]
    assert S.commit_message(p) == "lorashare sync: recompute: forced, legal added"

    pub = published_config(same_as_published())
    pub.card = CardData(license="mit")
    p = S.plan_sync(hub_manifest, FP, pub)
    assert p.action == "card" and p.reasons == ["model card license changed"]


def test_plan_budget_and_legacy_settings(ws):
    m = parse(ws, manifest_text(ABC, compression="{budget_bytes: 1000, num_components: 8}"))
    fp = {n: "a" * 64 for n in ABC}
    pub = {n: entry(s, sha256="a" * 64) for n, s in ABC.items()}
    assert S.plan_sync(m, fp, published_config(pub, component_selection="budget", budget_bytes=1000)).action == "none"
    assert S.plan_sync(m, fp, published_config(pub, component_selection="budget", budget_bytes=999)).settings == ["budget_bytes 999 → 1000"]
    m = parse(ws, manifest_text(ABC, compression="{num_components: auto}"))
    legacy = published_config(pub, requested_components=None, component_selection="auto")
    assert S.plan_sync(m, fp, legacy).action == "none"


def test_commit_message_for_additions():
    plan = S.Plan("add", ["x added"], [S.AdapterPlan("x", "added", "a/x", "hub", "1" * 40),
                                       S.AdapterPlan("y", "added", "a/y", "hub", "2" * 40)])
    reports = {"x": {"method": "projection", "min_explained_variance": 0.971}, "y": {"method": "projection", "min_explained_variance": 1.0}}
    assert S.commit_message(plan, reports) == "lorashare sync: added x (projection, 97.1% explained), y (projection, 100.0% explained)"
    long = S.Plan("recompute", [f"adapter{i} removed" for i in range(50)], [])
    assert len(S.commit_message(long)) == 200


# --------------------------------------------------------------------- runs against the Hub
def test_dry_run_needs_no_token_and_pushes_nothing(env, ws, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    write(ws, manifest_text(ABC))
    out = sync_json(capsys, "--dry-run")
    assert out["command"] == "sync" and out["lorashare"] == 1
    assert out["changed"] is True and out["action"] == "create" and out["dry_run"] is True
    assert out["commit_sha"] is None and out["adapters"] == list(ABC)
    assert out["plan"]["billing"]["fingerprint"] == S.fingerprint_sources(S.load_manifest("lorashare.yaml"))["billing"]
    assert env.count("POST") == 0 and env.count(kind="commit") == 0
    with pytest.raises(HubApiError):
        env.repo(REPO)


def test_publish_then_nothing_changed(env, ws, capsys):
    write(ws, manifest_text(ABC, extra="card: {license: apache-2.0, description: Our support adapters}\n"))
    out = sync_json(capsys)
    assert out["changed"] is True and out["action"] == "create"
    assert out["commit_sha"] == env.resolve(REPO) and out["repo_url"] == f"{env.url}/{REPO}"
    assert out["compression_ratio"] > 0 and out["reasons"] == ["first publish of 3 adapters"]
    files = env.snapshot(REPO)
    cfg = json.loads(files["share_config.json"])
    assert cfg["adapter_names"] == list(ABC)
    assert cfg["adapters"]["billing"]["source"] == "adapters/billing"  # no runner path
    assert str(ws) not in files["share_config.json"].decode() and str(ws) not in files["README.md"].decode()
    readme = files["README.md"].decode()
    assert "license: apache-2.0" in readme and "Our support adapters" in readme
    assert env.count("POST", "commit", REPO) == 1
    env.reset_log()

    again = sync_json(capsys)
    assert again["changed"] is False and again["action"] == "none" and again["commit_sha"] is None
    assert again["compression_ratio"] == pytest.approx(out["compression_ratio"])
    assert env.count("POST", "commit", REPO) == 0 and len(env.history(REPO)) == 2
    # only share_config.json was downloaded to decide
    assert env.served_files(REPO) == {"share_config.json"}


def test_text_output(env, ws, capsys):
    write(ws, manifest_text(ABC))
    assert main(["sync", "-q"]) == 0
    text = capsys.readouterr().out
    assert f"lorashare sync: {REPO}: create" in text and "pushed" in text and "billing" in text


def test_add_projects_then_change_and_removal_recompute(env, ws, capsys):
    write(ws, manifest_text(ABC))
    sync_json(capsys)
    shutil.copytree(ws / "adapters" / "billing", ws / "adapters" / "billing2")
    write(ws, manifest_text({**ABC, "billing2": "adapters/billing2"}))
    out = sync_json(capsys)
    assert out["action"] == "add" and out["changed"]
    head_title_ = head_title(env)
    assert head_title_.startswith("lorashare sync: added billing2 (projection, 100.0% explained)")
    assert out["reasons"] == ["billing2 added by projection (100.0% of its ΔW energy explained)"]
    assert json.loads(env.snapshot(REPO)["share_config.json"])["adapter_names"] == [*ABC, "billing2"]

    shutil.rmtree(ws / "adapters" / "refunds")
    shutil.copytree(ws / "adapters" / "spare", ws / "adapters" / "refunds")
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["plan"]["refunds"]["status"] == "changed"
    assert head_title(env).startswith("lorashare sync: recompute: refunds changed (sha256 ")

    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "adapters/refunds"}))
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["adapters"] == ["billing", "refunds"]
    assert head_title(env) == "lorashare sync: recompute: legal removed, billing2 removed"
    files = env.snapshot(REPO)
    assert not any(p.startswith(("adapters/legal/", "adapters/billing2/")) for p in files)
    assert sync_json(capsys)["action"] == "none"


def test_poorly_explained_addition_recompresses_from_sources(env, ws, capsys):
    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "adapters/refunds"},
                            compression="{num_components: 1, variance_threshold: 0.99}"))
    sync_json(capsys)
    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "adapters/refunds", "spare": "adapters/spare"},
                            compression="{num_components: 1, variance_threshold: 0.99}"))
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["reasons"][0].startswith("spare added: bases keep only")
    msg = head_title(env)
    assert msg.startswith("lorashare sync: recompute: spare added: bases keep only")
    cfg = json.loads(env.snapshot(REPO)["share_config.json"])
    assert cfg["adapter_names"] == ["billing", "refunds", "spare"] and cfg["requested_components"] == 1
    assert cfg["adapters"]["spare"]["source"] == "adapters/spare"
    # the recompute read every adapter from its source, as a fresh compression does (not from reconstructions)
    from safetensors.torch import load as load_bytes

    from lorashare import SHAREModel

    fresh = SHAREModel.from_adapters({n: str(ws / "adapters" / n) for n in ("billing", "refunds", "spare")},
                                     num_components=1, variance_threshold=0.99, progress=False)
    published = load_bytes(env.snapshot(REPO)["shared_components.safetensors"])
    assert published.keys() == fresh.components.keys()
    assert all(torch.allclose(published[k], fresh.components[k], atol=1e-6) for k in published)
    assert sync_json(capsys)["action"] == "none"


def test_settings_card_and_force(env, ws, capsys):
    write(ws, manifest_text(ABC))
    sync_json(capsys)
    write(ws, manifest_text(ABC, compression="{num_components: 32, dtype: float16}"))
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["reasons"] == ["compression settings changed (dtype float32 → float16)"]
    assert json.loads(env.snapshot(REPO)["share_config.json"])["dtype"] == "float16"

    write(ws, manifest_text(ABC, compression="{num_components: 32, dtype: float16}", extra="card: {license: mit}\n"))
    out = sync_json(capsys)
    assert out["action"] == "card" and "license: mit" in env.snapshot(REPO)["README.md"].decode()
    assert sync_json(capsys)["action"] == "none"
    out = sync_json(capsys, "--force")
    assert out["action"] == "recompute" and out["reasons"] == ["forced"] and out["commit_sha"] == env.resolve(REPO)


def put_adapter(hub: HubServer, repo_id: str, folder: Path, sub: str = "") -> str:
    try:
        hub.repo(repo_id)
    except Exception:  # noqa: BLE001 - the server's own HubError: not there yet
        hub.create_repo(repo_id)
    prefix = f"{sub}/" if sub else ""
    files = {prefix + p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    return hub.commit(repo_id, files, lfs=[p for p in files if p.endswith(".safetensors")])


def test_hub_sources_pinned_and_followed(env, ws, capsys):
    v1 = put_adapter(env, "tester/refunds", ws / "adapters" / "refunds")
    env.create_tag("tester/refunds", "v1")
    multi = put_adapter(env, "tester/multi", ws / "adapters" / "legal", sub="legal")
    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "tester/refunds@v1", "legal": "tester/multi/legal"}))
    out = sync_json(capsys)
    assert out["plan"]["refunds"] == {"status": "added", "source": "tester/refunds@v1", "kind": "hub", "fingerprint": v1,
                                      "previous": None, "reason": "new"}
    cfg = json.loads(env.snapshot(REPO)["share_config.json"])
    assert cfg["adapters"]["refunds"]["source"] == "tester/refunds@v1" and cfg["adapters"]["refunds"]["revision"] == v1
    assert cfg["adapters"]["legal"]["source"] == "tester/multi/legal" and cfg["adapters"]["legal"]["revision"] == multi

    put_adapter(env, "tester/refunds", ws / "adapters" / "spare")  # main moves; the v1 tag does not
    assert sync_json(capsys)["action"] == "none"

    newer = put_adapter(env, "tester/multi", ws / "adapters" / "spare", sub="legal")
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["reasons"] == [f"legal changed (commit {multi[:8]} → {newer[:8]})"]
    assert json.loads(env.snapshot(REPO)["share_config.json"])["adapters"]["legal"]["revision"] == newer


def test_missing_hub_source_names_line(env, ws, capsys):
    write(ws, manifest_text({"billing": "adapters/billing", "gone": "tester/does-not-exist"}))
    assert main(["sync"]) == 1
    err = capsys.readouterr().err
    assert "lorashare.yaml:5: adapters.gone: repo not found: tester/does-not-exist" in err
    assert env.count("POST", "commit") == 0


def test_no_token_fails_before_any_work(env, ws, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    write(ws, manifest_text(ABC))
    assert main(["sync", "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["type"] == "ConfigError" and "hf-token" in out["error"] and "HF_TOKEN" in out["error"]
    assert env.records == []


def test_bad_manifest_exit_code_2(ws, capsys):
    write(ws, "repo_id: a/b\nadapters:\n  x: a/b\n  x: a/c\n")
    assert main(["sync", "--dry-run"]) == 2
    assert "lorashare.yaml:4: adapters.x: duplicate key" in capsys.readouterr().err


def test_concurrent_change_is_detected(env, ws, capsys, monkeypatch):
    write(ws, manifest_text(ABC))
    sync_json(capsys)
    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "adapters/refunds"}))
    real = S.run.apply_plan

    def racing(*args, **kwargs):
        result = real(*args, **kwargs)
        env.commit(REPO, {"notes.txt": "someone else"}, message="other run")
        return result

    monkeypatch.setattr(S.run, "apply_plan", racing)
    assert main(["sync"]) == 1
    assert "changed since it was read" in capsys.readouterr().err
    assert head_title(env) == "other run"


def test_trained_adapters_are_kept_until_removed_by_name(env, ws, capsys):
    """An adapter trained in the subspace has no source a manifest could list: sync keeps it, recomputes included."""
    from examples.make_adapters import tiny_bert
    from lorashare import SHAREModel

    write(ws, manifest_text(ABC))
    sync_json(capsys)
    share = SHAREModel.from_pretrained(REPO)
    model = share.subspace_model(tiny_bert(), "coached", seed=0)
    torch.manual_seed(0)
    with torch.no_grad():  # as a training run leaves them: loadings moved off their start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    share.add_trained(model)
    share.push_to_hub(REPO, token=HUB_TOKEN)
    coached = share.reconstruct("coached")

    out = sync_json(capsys)
    assert out["action"] == "none" and out["plan"]["coached"]["status"] == "kept"
    assert "lorashare remove" in out["plan"]["coached"]["reason"]
    shutil.rmtree(ws / "adapters" / "refunds")
    shutil.copytree(ws / "adapters" / "spare", ws / "adapters" / "refunds")
    out = sync_json(capsys)
    assert out["action"] == "recompute" and out["plan"]["coached"]["status"] == "kept"
    after = SHAREModel.from_pretrained(REPO)
    assert after.adapter_names == [*ABC, "coached"] and after.adapter_sources["coached"] == ""
    assert json.loads(env.snapshot(REPO)["share_config.json"])["adapters"]["coached"]["sha256"] is None
    rebuilt = after.reconstruct("coached")
    assert set(rebuilt) == set(coached)
    for key, value in coached.items():
        assert torch.allclose(rebuilt[key], value, atol=1e-5), key

    assert main(["remove", REPO, "coached"]) == 0  # removed by name, on the Hub
    capsys.readouterr()
    out = sync_json(capsys)
    assert out["action"] == "none" and "coached" not in out["plan"]
    assert json.loads(env.snapshot(REPO)["share_config.json"])["adapter_names"] == list(ABC)


# ------------------------------------------------------------------------- GitHub Actions
@pytest.fixture
def gha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, Path]:
    files = {"GITHUB_OUTPUT": tmp_path / "gh_output", "GITHUB_STEP_SUMMARY": tmp_path / "gh_summary"}
    for name, path in files.items():
        path.write_text("")
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    (tmp_path / "runner_temp").mkdir()
    monkeypatch.setenv("RUNNER_TEMP", str(tmp_path / "runner_temp"))
    return files


def test_github_outputs_summary_and_mask(env, ws, gha, capsys, monkeypatch):
    secret = "hf_ThisIsTheSecretToken42"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ws))
    write(ws, manifest_text(ABC, extra="card: {license: apache-2.0}\n"))
    assert main(["sync"]) == 0
    cap = capsys.readouterr()
    lines = cap.out.splitlines()
    assert lines[0] == f"::add-mask::{secret}"
    assert secret not in "\n".join(lines[1:]) + cap.err
    assert lines.count("::group::lorashare sync: plan") == 1 and lines.count("::endgroup::") == 3
    outputs = parse_output_file(gha["GITHUB_OUTPUT"].read_text())
    assert outputs == {"changed": "true", "action": "create", "repo-url": f"{env.url}/{REPO}",
                       "commit-sha": env.resolve(REPO), "compression-ratio": outputs["compression-ratio"],
                       "adapters": json.dumps(list(ABC))}
    assert float(outputs["compression-ratio"]) > 0
    summary = gha["GITHUB_STEP_SUMMARY"].read_text()
    assert summary.startswith(f"## lorashare sync: `{REPO}`") and "**Published**" in summary
    assert "| Compression ratio |" in summary and "| ΔW relative error |" in summary
    assert "| billing | `adapters/billing` | sha256 `" in summary and "| added | 0.0000 |" in summary
    assert secret not in summary and secret not in gha["GITHUB_OUTPUT"].read_text()
    assert tempfile.tempdir == os.environ["RUNNER_TEMP"]


def test_github_error_annotation_for_manifest(ws, gha, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ws))
    (ws / "cfg").mkdir()
    write(ws / "cfg", "repo_id: a/b\nadapters:\n  x: ../adapters/billing\n  y: 'bad, value: 100%'\n")
    assert main(["sync", "--config", "cfg/lorashare.yaml", "--dry-run"]) == 2
    out = capsys.readouterr().out.splitlines()
    errors = [line for line in out if line.startswith("::error")]
    assert len(errors) == 1
    assert errors[0].startswith("::error file=cfg/lorashare.yaml,line=4,title=lorashare sync::cfg/lorashare.yaml:4: adapters.y: ")
    assert "100%25" in errors[0]  # workflow-command escaping
    assert "lorashare sync failed" in gha["GITHUB_STEP_SUMMARY"].read_text()
    assert gha["GITHUB_OUTPUT"].read_text() == ""


def test_json_mode_sends_workflow_commands_to_stderr(env, ws, gha, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    write(ws, manifest_text(ABC))
    assert main(["sync", "--json", "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["action"] == "create"
    assert "::group::" in cap.err
    assert parse_output_file(gha["GITHUB_OUTPUT"].read_text())["changed"] == "true"
    assert "**Dry run**" in gha["GITHUB_STEP_SUMMARY"].read_text()


@pytest.fixture
def oidc(env: HubServer, hub_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """A GitHub runner with ``id-token: write`` (no HF_TOKEN), against the test Hub's token exchange."""
    from huggingface_hub.utils import _auth

    monkeypatch.setattr(_auth, "_OIDC_TOKEN_CACHE", None)  # huggingface_hub caches the exchanged token per process
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", env.url + "/__github/id-token")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", env.github_request_token)
    return env


def test_trusted_publishing_oidc(oidc, ws, gha, capsys):
    """No HF_TOKEN: the runner's id token is exchanged over HTTP (huggingface_hub's public route)."""
    oidc.trusted_publishers[REPO] = oidc.github_id_token
    oidc.required_token = oidc.oidc_access_token  # every Hub call must use the exchanged token
    write(ws, manifest_text(ABC))
    assert main(["sync"]) == 0
    cap = capsys.readouterr()
    assert oidc.id_token_audiences == [oidc.url]  # the id token is minted for this Hub
    assert oidc.count("POST", "oidc-exchange") == 1
    masks = [line for line in cap.out.splitlines() if line.startswith("::add-mask::")]
    assert masks == [f"::add-mask::{oidc.oidc_access_token}"]
    rest = cap.out.replace(masks[0], "")
    assert oidc.oidc_access_token not in rest + cap.err + gha["GITHUB_STEP_SUMMARY"].read_text()
    assert parse_output_file(gha["GITHUB_OUTPUT"].read_text())["commit-sha"] == oidc.resolve(REPO)
    assert "HF_OIDC_RESOURCE" not in os.environ  # set for the exchange only


def test_oidc_failure_is_a_clear_error(oidc, ws, gha, capsys):
    oidc.trusted_publishers["tester/some-other-repo"] = oidc.github_id_token  # not this repo
    write(ws, manifest_text(ABC))
    assert main(["sync"]) == 1
    out = capsys.readouterr().out
    assert "::error title=lorashare sync::trusted publishing (OIDC) failed for tester/support-share" in out
    assert "invalid_grant" in out and "trusted publisher" in out
    assert oidc.count("POST", "oidc-exchange") == 1 and oidc.count("POST") == 1  # nothing else was sent


def test_oidc_refuses_an_endpoint_huggingface_hub_does_not_use(env, ws, gha, capsys, monkeypatch):
    """huggingface_hub exchanges at the endpoint it read at import: a later HF_ENDPOINT must not split the two."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_URL", env.url + "/__github/id-token")
    monkeypatch.setenv("ACTIONS_ID_TOKEN_REQUEST_TOKEN", env.github_request_token)
    write(ws, manifest_text(ABC))
    assert main(["sync"]) == 2
    out = capsys.readouterr().out
    assert f"HF_ENDPOINT is {env.url} but huggingface_hub was imported with https://huggingface.co" in out
    assert env.count("GET", "github-id-token") == 0 and env.count("POST") == 0


def test_errors_never_leak_the_token(env, ws, capsys, monkeypatch):
    secret = "hf_AnotherSecretValue777"
    monkeypatch.setenv("HF_TOKEN", secret)
    write(ws, manifest_text(ABC))
    err = LoraShareError(f"boom with {secret} inside")
    monkeypatch.setattr(S.run, "fingerprint_sources", lambda *a, **k: (_ for _ in ()).throw(err))
    assert main(["sync", "--json"]) == 1
    cap = capsys.readouterr()
    assert secret not in cap.out + cap.err and "***" in cap.err


# ------------------------------------------------------------------ a typo of a folder is a folder
def test_typo_of_a_folder_names_the_folder_and_its_siblings(ws):
    with pytest.raises(S.ManifestError) as info:
        parse(ws, "repo_id: a/b\nadapters:\n  billing: adapters/billingg\n  refunds: adapters/refunds\n")
    msg = str(info.value)
    assert msg.startswith("lorashare.yaml:3: adapters.billing: adapters/billingg does not exist (adapters has "
                          "billing, legal, refunds, spare; did you mean adapters/billing?)"), msg
    assert "Hub id" not in msg and info.value.line == 3
    # pinned like a Hub id, still a folder of the repository
    with pytest.raises(S.ManifestError, match=r":3: adapters\.x: adapters/billing@v2 does not exist \(adapters has "
                                              r"billing, legal, refunds, spare; did you mean adapters/billing\?\)"):
        parse(ws, "repo_id: a/b\nadapters:\n  x: adapters/billing@v2\n  y: adapters/refunds\n")
    m = parse(ws, "repo_id: a/b\nadapters:\n  x: acme/refunds\n  y: adapters/refunds\n")  # no acme/ here: a Hub id
    assert m.adapters["x"].kind == "hub"


def test_a_folder_written_from_the_repository_root_says_how_to_write_it(ws):
    (ws / "config").mkdir()
    path = write(ws / "config", "repo_id: a/b\nadapters:\n  x: adapters/billing\n  y: ../adapters/refunds\n")
    with pytest.raises(S.ManifestError) as info:
        S.load_manifest(str(path))
    assert str(info.value) == ("config/lorashare.yaml:3: adapters.x: adapters/billing does not exist here: folders are "
                               "relative to the manifest's folder (config/), so write '../adapters/billing'")


# --------------------------------------------------------------------------- sync --check (offline)
def check_json(capsys, *args: str, rc: int = 0) -> dict:
    code = main(["sync", "--check", "--json", *args])
    cap = capsys.readouterr()
    assert code == rc, cap.out + cap.err
    return json.loads(cap.out)


def test_check_makes_no_request_and_needs_no_token(hub, ws, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # a Hub that would answer, and log what it was asked
    write(ws, manifest_text({**ABC, "remote": "tester/refunds@v1", "multi": "tester/multi/legal"}))
    out = check_json(capsys)
    assert out["command"] == "sync" and out["check"] is True and out["ok"] is True and out["problems"] == []
    assert out["repo_id"] == REPO and out["config"] == "lorashare.yaml"
    assert {n: (a["kind"], a["checked"]) for n, a in out["adapters"].items()} == {
        "billing": ("folder", True), "refunds": ("folder", True), "legal": ("folder", True),
        "remote": ("hub", False), "multi": ("hub", False)}
    assert out["adapters"]["billing"]["base_model"] and out["adapters"]["billing"]["ranks"] == [4]
    assert out["adapters"]["legal"]["line"] == 6
    assert hub.records == []  # nothing resolved, nothing asked


def test_check_works_with_the_hub_out_of_reach(ws, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    def no_network(*args, **kwargs):
        raise AssertionError(f"sync --check opened a connection: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    write(ws, manifest_text({**ABC, "remote": "tester/refunds@v1"}))
    assert check_json(capsys)["ok"] is True
    assert main(["sync", "--check", "-q"]) == 0
    assert "lorashare sync --check: lorashare.yaml: ok: tester/support-share, 3 adapter folders read" in capsys.readouterr().out


def test_check_catches_broken_folders_with_file_and_line(ws, capsys):
    (ws / "adapters" / "refunds" / "adapter_config.json").write_text("{not json")
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 5780\n"
    (ws / "adapters" / "legal" / "adapter_model.safetensors").write_bytes(lfs)
    write(ws, manifest_text(ABC))
    out = check_json(capsys, rc=1)
    assert out["ok"] is False and out["type"] == "AdapterError"
    problems = {p["adapter"]: p for p in out["problems"]}
    assert set(problems) == {"refunds", "legal"}  # every broken folder, not only the first
    assert problems["refunds"]["line"] == 5 and problems["refunds"]["file"] == "lorashare.yaml"
    assert problems["refunds"]["message"].startswith("lorashare.yaml:5: adapters.refunds: ")
    assert "not valid JSON" in problems["refunds"]["message"]
    assert problems["legal"]["message"] == ("lorashare.yaml:6: adapters.legal: adapters/legal/adapter_model.safetensors "
                                            "is a Git LFS pointer, not the weights: run `git lfs pull` (in a workflow: "
                                            "actions/checkout with `lfs: true`).")
    assert out["error"] == problems["refunds"]["message"]
    assert out["adapters"]["billing"]["checked"] is True and out["adapters"]["legal"]["checked"] is False
    assert main(["sync", "--check"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"lorashare sync: error: {problems['refunds']['message']}",
                   f"lorashare sync: error: {problems['legal']['message']}"]


def test_check_catches_incompatible_folders_and_strict(ws, capsys):
    cfg = ws / "adapters" / "legal" / "adapter_config.json"
    data = json.loads(cfg.read_text())
    write(ws, manifest_text(ABC, compression="{strict: true}"))
    assert check_json(capsys)["ok"] is True  # the same base, modules and ranks: strict holds
    cfg.write_text(json.dumps({**data, "base_model_name_or_path": "someone/other-base"}))
    out = check_json(capsys, rc=1)
    assert out["type"] == "IncompatibleAdaptersError"
    assert out["error"].startswith("lorashare.yaml:6: adapters.legal: adapter 'legal' was trained on base model "
                                   "'someone/other-base'")


def test_check_rejects_a_bad_manifest_a_missing_file_and_non_regular_files(ws, capsys):
    write(ws, manifest_text({"billing": "adapters/billing", "refunds": "adapters/refundz"}))
    out = check_json(capsys, rc=2)
    assert out["type"] == "ManifestError" and out["error"].startswith(
        "lorashare.yaml:5: adapters.refunds: adapters/refundz does not exist (adapters has billing, legal, refunds")
    (ws / "adapters" / "spare" / "adapter_model.safetensors").unlink()
    write(ws, manifest_text({"billing": "adapters/billing", "spare": "adapters/spare"}))
    assert "lorashare.yaml:5: adapters.spare: 'adapters/spare' has no adapter_model.safetensors" in check_json(capsys, rc=2)["error"]
    (ws / "adapters" / "spare" / "adapter_model.safetensors").mkdir()
    assert "adapter_model.safetensors is not a regular file" in check_json(capsys, rc=2)["error"]
    assert main(["sync", "--check", "--config", "nope.yaml"]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err


def test_check_usage_errors(ws, capsys):
    write(ws, manifest_text(ABC))
    assert main(["sync", "--check", "--force"]) == 2
    assert "--check validates offline and never pushes" in capsys.readouterr().err
    assert main(["sync", "--check", "--dry-run"]) == 2
    assert "not allowed with argument --check" in capsys.readouterr().err


def test_check_notes_a_hub_id_under_a_local_folder(ws, capsys):
    write(ws, manifest_text({"billing": "adapters/billing", "odd": "adapters/gone/deeper"}))
    out = check_json(capsys)
    note = out["adapters"]["odd"]["note"]
    assert out["adapters"]["odd"]["kind"] == "hub" and note.startswith("read as a Hub id, though adapters/ is a folder here")
    assert "adapters/gone/deeper does not exist (adapters has no gone; it has billing, legal, refunds, spare" in note
    assert main(["sync", "--check"]) == 0
    assert "note: lorashare.yaml:5: adapters.odd: read as a Hub id" in capsys.readouterr().out


def test_check_annotates_problems_on_github(ws, gha, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_WORKSPACE", str(ws))
    (ws / "adapters" / "refunds" / "adapter_config.json").write_text("[]")
    write(ws, manifest_text(ABC))
    assert main(["sync", "--check"]) == 1
    errors = [line for line in capsys.readouterr().out.splitlines() if line.startswith("::error")]
    assert len(errors) == 1 and errors[0].startswith(
        "::error file=lorashare.yaml,line=5,title=lorashare sync::lorashare.yaml:5: adapters.refunds: ")
    assert gha["GITHUB_OUTPUT"].read_text() == ""


def test_sync_refuses_weights_that_are_a_git_lfs_pointer(env, ws, capsys):
    (ws / "adapters" / "legal" / "adapter_model.safetensors").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 5780\n")
    write(ws, manifest_text(ABC))
    assert main(["sync", "--dry-run"]) == 1
    assert ("lorashare.yaml:6: adapters.legal: adapters/legal/adapter_model.safetensors is a Git LFS pointer, not the "
            "weights: run `git lfs pull`") in capsys.readouterr().err
    assert env.records == []  # refused before the Hub was asked anything


def test_base_model_key_names_a_local_base_models_hub_id(env, ws, capsys):
    """Adapters trained from a local base folder: sync refuses to publish the path (saying what to add to the
    manifest), and ``base_model:`` names the Hub id; changing it later is a card-only commit."""
    local = ws.parent / "local-base"
    local.mkdir()
    for name in ABC:
        cfg_path = ws / "adapters" / name / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = str(local)
        cfg_path.write_text(json.dumps(cfg))
    write(ws, manifest_text(ABC))
    assert main(["sync"]) == 2
    err = capsys.readouterr().err
    assert "base_model: OWNER/NAME" in err and str(local) in err and "--base-model" not in err, err
    with pytest.raises(HubApiError):
        env.repo(REPO)  # nothing was published: not even the repo
    write(ws, manifest_text(ABC, extra="base_model: google/bert_uncased_L-2_H-128_A-2\n"))
    out = sync_json(capsys)
    assert out["action"] == "create"
    from lorashare import SHAREModel

    published = SHAREModel.from_pretrained(REPO)
    assert published.config.base_model_name_or_path == "google/bert_uncased_L-2_H-128_A-2"
    write(ws, manifest_text(ABC, extra="base_model: google/bert_uncased_L-4_H-256_A-4\n"))
    out = sync_json(capsys)
    assert out["action"] == "card", out
    assert SHAREModel.from_pretrained(REPO).config.base_model_name_or_path == "google/bert_uncased_L-4_H-256_A-4"
    with pytest.raises(ConfigError, match=r"lorashare\.yaml:\d+: base_model: .* is not a Hub model id"):
        parse(ws, manifest_text(ABC, extra=f"base_model: {local}\n"))
