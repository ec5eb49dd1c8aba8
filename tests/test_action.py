"""The GitHub Action (``action.yml``) and the example workflow: static checks, then real runs.

Static: the metadata validates against the GitHub Actions schema and the workflow against the
workflows schema (check-jsonschema's vendored schemas, offline), actionlint and zizmor (offline)
find nothing, no ``${{`` reaches a ``run:`` script, third-party actions are pinned to commit shas.

Runs: :class:`tests.action_runner.ActionRunner` executes the action's bash steps as written, with a
simulated runner environment, against the local test Hub (``HF_ENDPOINT``).  One test runs the real
install, default inputs, into a fresh venv from a copy of this checkout (what a workflow that pins
the action gets), then ``lorashare sync`` from that venv: it needs a package index and takes about
a minute with a warm pip cache.  The other runs short-circuit the install with
``LORASHARE_ACTION_PYTHON`` (a documented input of the action's environment, for self-hosted
runners), set to a wrapper around this interpreter that records its argv, so the tests can also
check that the token never reaches a command line.  One test runs the install branch with a fake
Python, to check the exact pip commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import pytest
import yaml

from tests.action_runner import ActionResult, ActionRunner, ActionRunnerError, parse_output_file
from tests.fresh_venv import checkout_copy, pip_environment
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
WORKFLOW = ROOT / "examples" / "workflows" / "lorashare.yml"
BIN = Path(sys.executable).parent
REPO = "tester/support-share"
TOKEN = "hf_ActionSecretToken0123456789"
SHA = re.compile(r"^[0-9a-f]{40}$")


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if not found:
            pytest.skip(f"{name} is not installed (pip install -e .[dev])")
        return found
    return str(path)


def action() -> dict:
    return yaml.safe_load(ACTION.read_text())


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def run_blocks(doc: dict) -> List[str]:
    steps = list((doc.get("runs") or {}).get("steps") or [])
    for job in (doc.get("jobs") or {}).values():
        steps += job.get("steps") or []
    return [s["run"] for s in steps if "run" in s]


def uses_refs(doc: dict) -> List[str]:
    steps = list((doc.get("runs") or {}).get("steps") or [])
    for job in (doc.get("jobs") or {}).values():
        steps += job.get("steps") or []
    return [s["uses"] for s in steps if "uses" in s]


# ----------------------------------------------------------------------------------- static
@pytest.mark.parametrize("schema, path", [("vendor.github-actions", ACTION), ("vendor.github-workflows", WORKFLOW)])
def test_schema(schema, path):
    proc = subprocess.run([tool("check-jsonschema"), "--builtin-schema", schema, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_example_workflow():
    proc = subprocess.run([tool("actionlint"), "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_checks_inputs_against_the_local_action(tmp_path):
    """actionlint validates ``with:`` of a local ``uses: ./`` against action.yml: use the example's inputs."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(ACTION, repo / "action.yml")
    wf = WORKFLOW.read_text().replace("lorashare/lorashare@v0", "./")
    (repo / ".github" / "workflows" / "lorashare.yml").write_text(wf)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    proc = subprocess.run([tool("actionlint"), "-no-color"], capture_output=True, text=True, cwd=repo)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (repo / ".github" / "workflows" / "lorashare.yml").write_text(wf.replace("hf-token:", "hf_token:"))
    proc = subprocess.run([tool("actionlint"), "-no-color"], capture_output=True, text=True, cwd=repo)
    assert proc.returncode != 0 and "hf_token" in proc.stdout  # the check is live


def test_zizmor_offline():
    proc = subprocess.run([tool("zizmor"), "--offline", "--persona=auditor", "--no-progress", str(ACTION), str(WORKFLOW)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_expressions_in_run_blocks_and_token_only_in_env():
    for doc in (action(), workflow()):
        for script in run_blocks(doc):
            assert "${{" not in script, script
    steps = action()["runs"]["steps"]
    token_refs = [(s.get("id"), k) for s in steps for k, v in (s.get("env") or {}).items() if "inputs.hf-token" in str(v)]
    assert token_refs == [("sync", "LORASHARE_HF_TOKEN")]
    assert not any("inputs.hf-token" in json.dumps(s.get("with") or {}) for s in steps)
    sync_script = next(s["run"] for s in steps if s.get("id") == "sync")
    assert "HF_TOKEN=\"$LORASHARE_HF_TOKEN\"" in sync_script and "unset LORASHARE_HF_TOKEN" in sync_script


def test_third_party_actions_pinned_to_shas():
    for ref in uses_refs(action()) + uses_refs(workflow()):
        name, _, version = ref.partition("@")
        if name == "lorashare/lorashare":  # the action itself, in the example: documented to pin in copies
            continue
        assert SHA.match(version), f"{ref} is not pinned to a commit sha"


def test_metadata_contract():
    a = action()
    assert a["runs"]["using"] == "composite" and a["branding"]["icon"] and a["branding"]["color"]
    ins = a["inputs"]
    assert set(ins) >= {"config", "hf-token", "dry-run", "force", "python-version", "lorashare-version"}
    assert ins["config"]["default"] == "lorashare.yaml" and ins["python-version"]["default"] == "3.11"
    assert ins["lorashare-version"]["default"] == ""  # the action's own checkout, never an index release
    outs = a["outputs"]
    assert set(outs) == {"changed", "action", "repo-url", "commit-sha", "compression-ratio", "adapters"}
    for name, spec in outs.items():
        assert spec["value"] == f"${{{{ steps.sync.outputs.{name} }}}}"
    setup = next(s for s in a["runs"]["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    # No pip cache: setup-python can only key it on workspace files, and the manifest says nothing
    # about what gets installed.
    assert setup["with"]["update-environment"] is False and "cache" not in setup["with"]
    assert "cache-dependency-path" not in setup["with"]
    install = next(s for s in a["runs"]["steps"] if s.get("id") == "install")
    assert install["env"]["LORASHARE_SRC"] == "${{ github.action_path }}"
    assert "id-token: write" in ACTION.read_text()


def test_example_workflow_shape():
    wf = workflow()
    on = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads `on` as true
    assert set(on["push"]["paths"]) == {"adapters/**", "lorashare.yaml"} and on["schedule"] and "workflow_dispatch" in on
    assert wf["concurrency"]["group"] and wf["concurrency"]["cancel-in-progress"] is False
    step = next(s for s in wf["jobs"]["sync"]["steps"] if s.get("uses", "").startswith("lorashare/lorashare@"))
    assert step["with"]["hf-token"] == "${{ secrets.HF_TOKEN }}"
    assert set(step["with"]) <= set(action()["inputs"])


def test_example_manifest_parses():
    """The shipped example names the bundled adapters, relative to its own folder (tests/test_manifest_example.py
    runs sync --check and --dry-run on it)."""
    from lorashare.sync.manifest import load_manifest

    m = load_manifest(str(ROOT / "examples" / "lorashare.yaml"))
    assert m.repo_id == "acme/support-adapters-share"
    assert [(n, s.kind) for n, s in m.adapters.items()] == [(f"task{i}", "folder") for i in range(4)]
    assert all(os.path.isdir(s.folder) for s in m.adapters.values())


# ---------------------------------------------------------------------- the install step
FAKE_PYTHON = """#!/usr/bin/env bash
for a in "$@"; do printf '%s\\n' "$a"; done >> "$FAKE_LOG"
printf -- '--\\n' >> "$FAKE_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
if [ "$1" = "-c" ]; then echo "lorashare 0.0.0-fake"; fi
exit 0
"""


def test_install_step_creates_venv_in_runner_temp(tmp_path):
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "argv.log"
    ws, rt = tmp_path / "ws", tmp_path / "rt"
    ws.mkdir()
    runner = ActionRunner(ROOT, workspace=ws, runner_temp=rt, env={"FAKE_LOG": str(log)},
                          stubs={"actions/setup-python": lambda w: {"python-path": str(fake)}})
    spec = "lorashare @ git+https://github.com/lorashare/lorashare@0123456789abcdef0123456789abcdef01234567"
    res = runner.run({"lorashare-version": spec, "hf-token": TOKEN, "python-version": "3.12"}, only=["python", "install"])
    assert res.rc == 0, res.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
    venv = str(rt / "lorashare-venv")
    assert calls[0] == ["-m", "venv", venv]
    assert calls[1] == ["-m", "pip", "install", "--index-url", "https://download.pytorch.org/whl/cpu", "torch"]
    assert calls[2] == ["-m", "pip", "install", spec]  # one argument, whatever it contains
    assert res.step("install").outputs == {"python": f"{venv}/bin/python"}
    assert runner.with_seen["python"] == {"python-version": "3.12", "update-environment": "false"}
    assert TOKEN not in log.read_text() + res.stdout + res.stderr

    log.write_text("")
    res = runner.run({"torch-index-url": ""}, only=["python", "install"])
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("--\n") if c.strip()]
    assert [c[:2] for c in calls[1:]] == [["-m", "pip"], ["-c", calls[2][1]]] and "lorashare" in calls[2][1]
    assert calls[1] == ["-m", "pip", "install", str(ROOT)]  # default: the action's own checkout


def test_runner_refuses_expressions_in_run(tmp_path):
    bad = tmp_path / "act"
    bad.mkdir()
    (bad / "action.yml").write_text(
        "name: x\ndescription: x\ninputs: {a: {default: '1'}}\nruns:\n  using: composite\n  steps:\n"
        "    - {shell: bash, run: 'echo ${{ inputs.a }}'}\n")
    with pytest.raises(ActionRunnerError, match="pass values through env"):
        ActionRunner(bad, workspace=tmp_path, runner_temp=tmp_path / "rt").run()
    assert parse_output_file("a=1\nb<<EOF\nx\ny\nEOF\n") == {"a": "1", "b": "x\ny"}


# ---------------------------------------------------------------------------- scenarios
ABC = {"billing": "adapters/billing", "refunds": "adapters/refunds", "legal": "adapters/legal"}


def manifest(adapters: Dict[str, str]) -> str:
    lines = [f"repo_id: {REPO}", "compression: {num_components: 32}", "card: {license: apache-2.0}", "adapters:"]
    return "\n".join(lines + [f"  {n}: {s}" for n, s in adapters.items()]) + "\n"


class Env:
    """A workspace with adapters, the test Hub, and a runner for the action.

    By default the install step is short-circuited (``LORASHARE_ACTION_PYTHON``, a wrapper around
    this interpreter); ``real_install`` gives the action nothing preinstalled, only ``pip_env``.
    """

    def __init__(self, hub: HubServer, tmp: Path, adapter_dirs: List[str], *, action_dir: Path = ROOT,
                 real_install: bool = False, pip_env: Optional[Mapping[str, str]] = None) -> None:
        self.hub = hub
        self.ws = tmp / "ws"
        self.runner_temp = tmp / "runner-temp"
        for name, src in zip(["billing", "refunds", "legal", "spare"], adapter_dirs):
            shutil.copytree(src, self.ws / "adapters" / name)
        self.argv_log = tmp / "python-argv.log"
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp / "hf-home"),
               "HF_HUB_DISABLE_TELEMETRY": "1", **(pip_env or {})}
        if not real_install:
            wrapper = tmp / "python-wrapper"
            wrapper.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{self.argv_log}"\nexec "{sys.executable}" "$@"\n')
            wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
            env["LORASHARE_ACTION_PYTHON"] = str(wrapper)
        self.runner = ActionRunner(action_dir, workspace=self.ws, runner_temp=self.runner_temp, env=env)

    def write(self, adapters: Dict[str, str]) -> None:
        (self.ws / "lorashare.yaml").write_text(manifest(adapters))

    def run(self, timeout: float = 300, **inputs: str) -> ActionResult:
        inputs.setdefault("hf-token", TOKEN)
        res = self.runner.run(inputs, timeout=timeout)
        self.check_no_leak(res)
        return res

    def check_no_leak(self, res: ActionResult) -> None:
        """The token only ever appears in the ::add-mask:: line the runner consumes."""
        stdout = res.stdout.replace(f"::add-mask::{TOKEN}\n", "")
        for where, text in [("stdout", stdout), ("stderr", res.stderr), ("summary", res.summary),
                            ("outputs", json.dumps(res.outputs)), ("step outputs", json.dumps([s.outputs for s in res.steps])),
                            ("argv", self.argv_log.read_text() if self.argv_log.exists() else ""), ("log", res.log)]:
            assert TOKEN not in text, f"token leaked into {where}"

    def commits(self) -> int:
        try:
            return len(self.hub.history(REPO))
        except Exception:  # noqa: BLE001 - no repo yet
            return 0

    def head_title(self) -> str:
        return self.hub.repo(REPO).commits[self.hub.resolve(REPO)].title


@pytest.fixture
def act(hub: HubServer, tmp_path: Path, adapter_dirs) -> Env:
    hub.required_token = TOKEN  # the token must really be used
    return Env(hub, tmp_path, adapter_dirs)


def ok(res: ActionResult) -> ActionResult:
    assert res.rc == 0, res.stdout + res.stderr
    assert res.groups_balanced and res.errors == []
    assert res.masks == [TOKEN]
    assert res.stdout.startswith("Using the preinstalled lorashare")
    sync_out = res.step("sync").stdout
    assert sync_out.startswith(f"::add-mask::{TOKEN}\n")  # before anything else lorashare prints
    return res


def test_first_run_publishes_second_is_a_no_op(act):
    act.write(ABC)
    res = ok(act.run())
    out = res.outputs
    assert out["changed"] == "true" and out["action"] == "create"
    assert out["commit-sha"] == act.hub.resolve(REPO) and out["repo-url"] == f"{act.hub.url}/{REPO}"
    assert json.loads(out["adapters"]) == list(ABC) and float(out["compression-ratio"]) > 0
    assert act.commits() == 2 and act.head_title() == "lorashare sync: first publish (3 adapters: billing, refunds, legal)"
    assert "**Published**" in res.summary and "| Compression ratio |" in res.summary
    rows = [line for line in res.summary.splitlines() if line.startswith("| billing |")]
    assert len(rows) == 1 and "`adapters/billing`" in rows[0] and "| added |" in rows[0]
    assert "sync --config lorashare.yaml" in act.argv_log.read_text()

    res = ok(act.run())
    assert res.outputs["changed"] == "false" and res.outputs["action"] == "none" and res.outputs["commit-sha"] == ""
    assert res.outputs["compression-ratio"] == out["compression-ratio"]
    assert act.commits() == 2 and "**No change**" in res.summary and "| unchanged |" in res.summary


def test_adding_an_adapter_projects(act):
    act.write(ABC)
    ok(act.run())
    shutil.copytree(act.ws / "adapters" / "billing", act.ws / "adapters" / "billing2")
    act.write({**ABC, "billing2": "adapters/billing2"})
    res = ok(act.run())
    assert res.outputs["action"] == "add" and res.outputs["changed"] == "true"
    assert act.head_title() == "lorashare sync: added billing2 (projection, 100.0% explained)"
    assert json.loads(res.outputs["adapters"]) == [*ABC, "billing2"]
    assert act.commits() == 3 and res.outputs["commit-sha"] == act.hub.resolve(REPO)


def test_changed_folder_recompresses_and_dry_run_pushes_nothing(act):
    act.write(ABC)
    ok(act.run())
    shutil.rmtree(act.ws / "adapters" / "refunds")
    shutil.copytree(act.ws / "adapters" / "spare", act.ws / "adapters" / "refunds")
    res = ok(act.run(**{"dry-run": "true"}))
    assert res.outputs["changed"] == "true" and res.outputs["action"] == "recompute" and res.outputs["commit-sha"] == ""
    assert act.commits() == 2 and "**Dry run**" in res.summary
    res = ok(act.run())
    assert res.outputs["action"] == "recompute"
    assert act.head_title().startswith("lorashare sync: recompute: refunds changed (sha256 ")
    assert act.commits() == 3 and "| changed (sha256 " in res.summary


def test_removal_recompresses(act):
    act.write(ABC)
    ok(act.run())
    act.write({"billing": "adapters/billing", "refunds": "adapters/refunds"})
    res = ok(act.run())
    assert res.outputs["action"] == "recompute" and json.loads(res.outputs["adapters"]) == ["billing", "refunds"]
    assert act.head_title() == "lorashare sync: recompute: legal removed"
    assert not any(p.startswith("adapters/legal/") for p in act.hub.snapshot(REPO))
    assert "| legal | `adapters/legal` |" in res.summary and "| removed |" in res.summary


def test_bad_manifest_fails_with_error_and_pushes_nothing(act):
    act.write(ABC)
    ok(act.run())
    (act.ws / "lorashare.yaml").write_text(manifest(ABC).replace("  legal: adapters/legal", "  legal: adapters/../../etc"))
    res = act.run()
    assert res.rc == 2 and res.step("sync").rc == 2
    assert len(res.errors) == 1
    assert res.errors[0].startswith("::error file=lorashare.yaml,line=7,title=lorashare sync::lorashare.yaml:7: adapters.legal: ")
    assert "outside the workspace" in res.errors[0]
    assert act.commits() == 2 and res.outputs["changed"] == ""
    assert "lorashare sync failed" in res.summary


def test_bad_boolean_input_and_missing_token(act):
    act.write(ABC)
    res = act.run(force="yes please")
    assert res.rc == 2 and res.errors == ["::error title=lorashare sync::the force input must be true or false"]
    res = act.runner.run({})  # no hf-token input, no OIDC
    assert res.rc == 2 and "hf-token" in res.errors[0] and act.commits() == 0


def test_trusted_publishing_without_a_token(act):
    """No hf-token, `id-token: write`: the runner's id token is exchanged for a repo-scoped token."""
    hub = act.hub
    hub.trusted_publishers[REPO] = hub.github_id_token
    hub.required_token = hub.oidc_access_token  # only the exchanged token may push
    act.runner.extra_env.update({"ACTIONS_ID_TOKEN_REQUEST_URL": hub.url + "/__github/id-token",
                                 "ACTIONS_ID_TOKEN_REQUEST_TOKEN": hub.github_request_token})
    act.write(ABC)
    res = act.runner.run({})
    assert res.rc == 0, res.stdout + res.stderr
    assert res.outputs["changed"] == "true" and res.outputs["commit-sha"] == hub.resolve(REPO)
    assert res.masks == [hub.oidc_access_token] and hub.id_token_audiences == [hub.url]
    sync_out = res.step("sync").stdout
    mask = f"::add-mask::{hub.oidc_access_token}\n"
    assert sync_out.count(mask) == 1  # masked before anything could print it, and nowhere else
    assert hub.oidc_access_token not in sync_out.replace(mask, "") + res.stderr + res.summary
    assert sync_out.index(hub.oidc_access_token) == sync_out.index(mask) + len("::add-mask::")


# --------------------------------------------------------------- the real install, default inputs
@pytest.mark.slow
def test_default_inputs_install_this_checkout_and_sync(hub, tmp_path, adapter_dirs):
    """The action as a workflow runs it: its own checkout installed into a fresh venv, then sync."""
    hub.required_token = TOKEN
    action_dir = checkout_copy(tmp_path / "action")
    act = Env(hub, tmp_path, adapter_dirs, action_dir=action_dir, real_install=True, pip_env=pip_environment(tmp_path))
    act.write(ABC)
    res = act.run(timeout=1200)
    assert res.rc == 0, (res.stdout + res.stderr)[-6000:]

    venv = act.runner_temp / "lorashare-venv"
    python = res.step("install").outputs["python"]
    assert python == f"{venv}/bin/python"
    from lorashare import __version__

    site = subprocess.run([python, "-c", "import lorashare, sys; print(lorashare.__file__); print(sys.prefix)"],
                          capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    installed = Path(site[0]).parent
    assert site[1] == str(venv) and installed.is_relative_to(venv / "lib")
    assert f"lorashare {__version__} from {installed / '__init__.py'}" in res.step("install").stdout
    # What runs is the action's checkout, byte for byte (not an index release, not this source tree).
    for rel, src in (("sync/run.py", "lorashare/sync/run.py"), ("hub/client.py", "lorashare/hub/client.py"),
                     ("hub_templates/model_card.md", "hub_templates/model_card.md")):
        digest = hashlib.sha256((installed / rel).read_bytes()).digest()
        assert digest == hashlib.sha256((action_dir / src).read_bytes()).digest(), rel

    # sync ran from that venv, against the test Hub, and published.
    out = res.outputs
    assert out["changed"] == "true" and out["action"] == "create" and out["commit-sha"] == hub.resolve(REPO)
    assert json.loads(out["adapters"]) == list(ABC) and act.commits() == 2
    assert res.masks == [TOKEN] and res.errors == [] and res.groups_balanced
    assert "**Published**" in res.summary
    act.check_no_leak(res)
