"""``space/deploy.py``: one command deploys a self-contained Space, which builds from its own files.

The module deploys to the local test Hub, downloads the Space repo, and builds it the way the Spaces
builder does: a fresh venv, gradio at the README's ``sdk_version``, then ``requirements.txt`` alone
(nothing else of the repo is there yet), then the rest of the repo.  It starts that ``app.py`` and
drives ``/compress`` with the adapter ids alone through ``gradio_client``.  The build needs a
package index and takes about two minutes with a warm pip cache: it is done once for the module.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator

import pytest
import yaml

if importlib.util.find_spec("gradio") is None:
    pytest.skip("the Space needs gradio: pip install -e '.[dev]'", allow_module_level=True)
gradio_client = pytest.importorskip("gradio_client")

from lorashare import __version__  # noqa: E402
from lorashare import hub as lhub  # noqa: E402
from lorashare.errors import ConfigError  # noqa: E402
from tests.fresh_venv import pip_environment  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402
from tests.test_space import TOKEN, Space, launch_space, seed_hub  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "space" / "deploy.py"
SPACE = "tester/lorashare"


def load_deploy():
    spec = importlib.util.spec_from_file_location("space_deploy", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def run_deploy(hub: HubServer, *args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                "HF_HOME": tempfile.mkdtemp(prefix="deploy-hf-home-")})
    return subprocess.run([sys.executable, str(DEPLOY), *args], env=env, capture_output=True, text=True, timeout=300)


def front_matter(readme: str) -> Dict[str, object]:
    return yaml.safe_load(readme.split("---", 2)[1])


# ------------------------------------------------------------------------------ fast checks
def test_requirements_name_index_packages_only():
    deploy = load_deploy()
    lines = deploy.check_requirements((ROOT / "space" / "requirements.txt").read_text())
    names = {line.split("==")[0].lower() for line in lines}
    # Every runtime dependency of lorashare is there (the Space cannot install lorashare itself) ...
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert wanted <= names, wanted - names
    assert "lorashare" not in names and "gradio" not in names  # gradio comes from sdk_version
    assert "torch==2.13.0+cpu" in lines  # the CPU build, from the index named in the file
    for bad in ("-e .", "lorashare @ git+https://github.com/lorashare/lorashare", "./lorashare",
                "file:///tmp/lorashare-0.2.0-py3-none-any.whl", "git+https://github.com/a/b", "-r more.txt",
                "https://example.org/x.whl", "../lorashare-0.2.0.tar.gz"):
        with pytest.raises(ConfigError, match="packages of the index"):
            deploy.check_requirements(f"torch==2.13.0\n{bad}\n")


def test_staged_space_is_self_contained(tmp_path):
    folder = load_deploy().stage(tmp_path / "space")
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "LICENSE", "lorashare/__init__.py", "lorashare/hub/client.py",
            "lorashare/hub_templates/model_card.md"} <= files
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    template = (folder / "lorashare" / "hub_templates" / "model_card.md").read_bytes()
    assert template == (ROOT / "hub_templates" / "model_card.md").read_bytes()
    meta = front_matter((folder / "README.md").read_text())
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["sdk_version"]
    readme = (folder / "README.md").read_text()
    assert f'pip install "gradio[oauth]=={meta["sdk_version"]}" -r requirements.txt' in readme  # run it locally
    assert "pip install lorashare" not in readme


def test_deploy_is_one_commit_and_replaces_the_files(hub, hf_cache, tmp_path, monkeypatch):
    r = run_deploy(hub, SPACE, "--private")
    assert r.returncode == 0, r.stderr
    assert f"{hub.url}/spaces/{SPACE}" in r.stdout and __version__ in r.stdout
    repo = hub.repo(SPACE, repo_type="space")
    assert repo.private and len(hub.history(SPACE, repo_type="space")) == 2  # the repo's first commit + the deploy
    head = hub.snapshot(SPACE, repo_type="space")
    assert head["app.py"] == (ROOT / "space" / "app.py").read_bytes()

    # A file the deploy does not write goes, in the same single commit as the update.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "old.py").write_text("print('old')\n")
    (stale / "README.md").write_text("---\nsdk: gradio\n---\n")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    lhub.push_space(str(stale), SPACE, token=TOKEN)
    assert set(hub.snapshot(SPACE, repo_type="space")) == {".gitattributes", "old.py", "README.md"}
    r = run_deploy(hub, SPACE)
    assert r.returncode == 0, r.stderr
    files = hub.snapshot(SPACE, repo_type="space")
    assert "old.py" not in files and "lorashare/hub/card.py" in files
    assert len(hub.history(SPACE, repo_type="space")) == 4 and repo.private  # an existing Space keeps its visibility


def test_deploy_usage_errors(hub):
    r = run_deploy(hub, "not-a-space-id")
    assert r.returncode == 2 and "OWNER/NAME" in r.stderr
    r = run_deploy(hub, SPACE, token="")
    assert r.returncode == 2 and "HF_TOKEN" in r.stderr
    assert hub.count("POST") == 0


# ------------------------------------------------------------------ built as the builder does
@dataclass
class Built:
    space: Space
    python: str
    app_dir: Path
    sdk_version: str


def _pip(python: str, *args: str, cwd: Path, env: Dict[str, str]) -> None:
    r = subprocess.run([python, "-m", "pip", "install", *args], cwd=str(cwd), env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, f"pip install {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Iterator[Built]:
    root = tmp_path_factory.mktemp("space-build")
    from huggingface_hub import constants, snapshot_download

    with HubServer() as hub, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite runs offline; this download is from the test Hub
        seed_hub(hub, root / "adapters")
        r = run_deploy(hub, SPACE, "--private")
        assert r.returncode == 0, r.stderr
        repo = Path(snapshot_download(SPACE, repo_type="space", endpoint=hub.url, token=TOKEN,
                                      cache_dir=str(root / "hf-cache")))
        sdk_version = str(front_matter((repo / "README.md").read_text())["sdk_version"])

        # The builder: a fresh venv, gradio at sdk_version, then requirements.txt with nothing else there.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(root / "home"), "LANG": "C.UTF-8",
               **pip_environment(root, pin_torch=False)}
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
        python = str(root / "venv" / "bin" / "python")
        app_dir = root / "app"
        app_dir.mkdir()
        _pip(python, f"gradio[oauth]=={sdk_version}", cwd=app_dir, env=env)
        shutil.copy2(repo / "requirements.txt", app_dir / "requirements.txt")
        assert sorted(p.name for p in app_dir.iterdir()) == ["requirements.txt"]
        _pip(python, "-r", "requirements.txt", cwd=app_dir, env=env)
        for item in repo.iterdir():  # then the rest of the repo
            if item.name != "requirements.txt":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, app_dir / item.name)

        (root / "run").mkdir()
        with launch_space(root / "run", seed=False, hub=hub, python=python, app=app_dir / "app.py", cwd=app_dir,
                          PYTHONPATH="") as space:
            yield Built(space, python, app_dir, sdk_version)


def _in_venv(built: Built, code: str, cwd: Path) -> str:
    r = subprocess.run([built.python, "-c", code], cwd=str(cwd), capture_output=True, text=True, timeout=120,
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ""})
    return (r.stdout + r.stderr).strip()


@pytest.mark.slow
def test_the_build_holds_what_the_space_asked_for(built, tmp_path):
    # gradio stayed at sdk_version through requirements.txt, torch is the CPU build, and lorashare is
    # nowhere in the venv: the only one is the folder next to app.py.
    assert _in_venv(built, "import importlib.metadata as m; print(m.version('gradio'))", tmp_path) == built.sdk_version
    assert _in_venv(built, "import torch; print(torch.__version__)", tmp_path).endswith("+cpu")
    assert "ModuleNotFoundError: No module named 'lorashare'" in _in_venv(built, "import lorashare", tmp_path)
    where = _in_venv(built, "import lorashare; print(lorashare.__file__)", built.app_dir)
    assert where == str(built.app_dir / "lorashare" / "__init__.py")


@pytest.mark.slow
def test_compress_with_the_ids_alone(built, tmp_path):
    client = built.space.client()
    status, stats, fidelity, _ev, _sizes, archive = client.predict(
        "tester/billing-lora\ntester/multi-lora/legal", api_name="/compress")
    assert "Compressed **2 adapters**" in status
    assert [r[0] for r in fidelity["data"]] == ["billing-lora", "legal"]
    with zipfile.ZipFile(archive) as z:
        card = z.read("share_checkpoint/README.md").decode()
    # The card comes from the template shipped inside the Space's lorashare folder.
    assert card.startswith("---\nlibrary_name: lorashare\n") and f"Written by lorashare {__version__}." in card
    assert TOKEN not in built.space.log.read_text()
