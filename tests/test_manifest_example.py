"""The shipped ``examples/lorashare.yaml`` works as it is, and the manifest's keys are documented in one place.

* The example passes ``lorashare sync --check`` (offline: no request reaches the test Hub), plans a
  first publish with ``--dry-run`` against the local test Hub, and publishes for real there.
* Its commented-out lines are valid too, once uncommented.
* Every key the parser knows (and every storage dtype) is in the ``lorashare.sync.manifest``
  docstring, whose schema block is itself a valid manifest; the example, ``sync --help`` and
  ``docs/action.md`` all point to that docstring.
* The pre-commit hook of ``docs/action.md`` runs a command the CLI accepts, on the right files.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from lorashare.cli import build_parser, main
from lorashare.format.storage import SCHEMES
from lorashare.peft.adapters import file_sha256
from lorashare.sync import manifest as M
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "lorashare.yaml"
EXAMPLE_REPO = "acme/support-adapters-share"
TASKS = ["task0", "task1", "task2", "task3"]
RUNNER_VARS = ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_WORKSPACE", "RUNNER_TEMP",
               "ACTIONS_ID_TOKEN_REQUEST_URL", "ACTIONS_ID_TOKEN_REQUEST_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
               "HF_OIDC_ID_TOKEN")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Outside GitHub Actions, in a foreign cwd: the example is found by its path alone."""
    for name in RUNNER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)
    monkeypatch.chdir(tmp_path)


def run_json(capsys, *args: str, rc: int = 0) -> dict:
    code = main(["sync", "--json", "--config", str(EXAMPLE), *args])
    cap = capsys.readouterr()
    assert code == rc, cap.out + cap.err
    return json.loads(cap.out)


# --------------------------------------------------------------------------- works as shipped
def test_example_passes_the_offline_check(hub: HubServer, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    out = run_json(capsys, "--check")
    assert out["ok"] is True and out["problems"] == [] and out["repo_id"] == EXAMPLE_REPO
    assert list(out["adapters"]) == TASKS
    for name, a in out["adapters"].items():
        assert (a["kind"], a["source"], a["checked"]) == ("folder", f"adapters/{name}", True)
        assert a["base_model"] == "tiny-bert-for-tests"
    assert hub.records == []


def test_example_names_every_bundled_adapter():
    m = M.load_manifest(str(EXAMPLE))
    bundled = sorted(p.name for p in (ROOT / "examples" / "adapters").iterdir() if p.is_dir())
    assert bundled == TASKS and list(m.adapters) == TASKS
    assert all(Path(s.folder) == ROOT / "examples" / "adapters" / n for n, s in m.adapters.items())


def test_example_dry_run_plans_a_first_publish(hub: HubServer, hf_cache: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # no token: a dry run needs none
    out = run_json(capsys, "--dry-run")
    assert out["action"] == "create" and out["changed"] is True and out["dry_run"] is True
    assert out["repo_id"] == EXAMPLE_REPO and out["commit_sha"] is None and out["adapters"] == TASKS
    assert out["reasons"] == ["first publish of 4 adapters"]
    for name in TASKS:
        sha = file_sha256(str(ROOT / "examples" / "adapters" / name / "adapter_model.safetensors"))
        assert out["plan"][name] == {"status": "added", "source": f"adapters/{name}", "kind": "folder",
                                     "fingerprint": sha, "previous": None, "reason": "new"}
    assert hub.count("POST") == 0 and hub.count(kind="commit") == 0


def test_example_publishes_then_has_nothing_to_do(hub: HubServer, hf_cache: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    out = run_json(capsys, "-q")
    assert out["action"] == "create" and out["commit_sha"] == hub.resolve(EXAMPLE_REPO)
    files = hub.snapshot(EXAMPLE_REPO)
    cfg = json.loads(files["share_config.json"])
    assert cfg["adapter_names"] == TASKS and cfg["dtype"] == "float32"
    assert [cfg["adapters"][n]["source"] for n in TASKS] == [f"adapters/{n}" for n in TASKS]
    assert "license: apache-2.0" in files["README.md"].decode()
    assert run_json(capsys, "-q")["action"] == "none"


def test_the_commented_lines_of_the_example_are_valid(tmp_path: Path):
    text = EXAMPLE.read_text(encoding="utf-8")
    commented = re.findall(r"^(\s+)# ([a-z_]+: \S+)", text, flags=re.M)
    assert {line.split(":")[0] for _, line in commented} >= {"budget_bytes", "refunds", "legal"}
    uncommented = re.sub(r"^(\s+)# ([a-z_]+: \S+)", r"\1\2", text, flags=re.M)
    shutil.copytree(ROOT / "examples" / "adapters", tmp_path / "adapters")
    m = M.parse_manifest(uncommented, path=str(tmp_path / "lorashare.yaml"), root=str(tmp_path))
    assert m.compression.budget_bytes == 50_000_000
    assert {n: s.kind for n, s in m.adapters.items()} == {**{t: "folder" for t in TASKS}, "refunds": "hub", "legal": "hub"}


# ----------------------------------------------------------------------- one place for every key
def _docstring_schema() -> str:
    doc = M.__doc__ or ""
    block = doc.split("::\n\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines())


def test_every_key_and_dtype_is_in_the_manifest_docstring(tmp_path: Path):
    schema = _docstring_schema()
    keys = set(re.findall(r"^\s*([a-z_]+):", schema, flags=re.M))
    known = set(M.TOP_KEYS) | set(M.COMPRESSION_KEYS) | set(M.CARD_KEYS)
    assert known <= keys, f"keys missing from the lorashare.sync.manifest docstring: {sorted(known - keys)}"
    dtype_line = next(line for line in schema.splitlines() if line.strip().startswith("dtype:"))
    assert all(re.search(rf"\b{d}\b", dtype_line) for d in SCHEMES), dtype_line
    version_line = next(line for line in schema.splitlines() if line.startswith("version:"))
    assert "optional" in version_line and "1" in version_line
    # the schema block is a manifest itself (its budget_bytes and target_ratio are alternatives: keep one)
    (tmp_path / "adapters" / "billing").mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapters" / "billing" / f).write_text("{}")
    one = "\n".join(line for line in schema.splitlines() if not line.strip().startswith("target_ratio:"))
    m = M.parse_manifest(one, path=str(tmp_path / "lorashare.yaml"), root=str(tmp_path))
    assert {n: s.kind for n, s in m.adapters.items()} == {"billing": "folder", "refunds": "hub", "legal": "hub"}
    assert m.lines["version"] == 1


def test_the_example_the_cli_and_the_docs_point_to_that_docstring():
    text = EXAMPLE.read_text(encoding="utf-8")
    assert "lorashare.sync.manifest" in text and "lorashare.sync module" not in text and "README" not in text
    dtype_line = next(line for line in text.splitlines() if line.strip().startswith("dtype:"))
    assert all(re.search(rf"\b{d}\b", dtype_line) for d in SCHEMES), dtype_line
    version_line = next(line for line in text.splitlines() if line.startswith("version:"))
    assert "#" in version_line and "version" in version_line.split("#", 1)[1]
    sync = build_parser()._subparsers._group_actions[0].choices["sync"]
    assert "lorashare.sync.manifest" in sync.description and "examples/lorashare.yaml" in sync.description
    page = (ROOT / "docs" / "action.md").read_text(encoding="utf-8")
    assert "(modules.md#lorasharesyncmanifest)" in page
    assert '--8<-- "examples/lorashare.yaml"' in page  # the page shows the tested example, not a copy


def test_the_pre_commit_hook_in_the_docs_runs_the_check():
    page = (ROOT / "docs" / "action.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", page, flags=re.S) if ".pre-commit-config.yaml" in b)
    hook = yaml.safe_load(block)["repos"][0]["hooks"][0]
    argv = shlex.split(hook["entry"])
    assert argv[0] == "lorashare" and hook["pass_filenames"] is False
    args = build_parser().parse_args(argv[1:])
    assert args.command == "sync" and args.check is True and args.config == "lorashare.yaml"
    files = re.compile(hook["files"])
    assert files.search("lorashare.yaml") and files.search("adapters/billing/adapter_model.safetensors")
    assert not files.search("src/app.py")
