"""The built wheel ships the model-card template and the license, and an install of it renders cards.

The wheel is built offline (no build isolation, no index) from a copy of the project's
top-level files and package folders in ``tmp_path``, so the build leaves nothing
(``build/``, ``*.egg-info``) in the checkout.  It is then installed with
``pip install --no-deps --target`` and used from a subprocess that imports lorashare from
that target, not from the source tree.  The sdist is built the same way: it carries the license and
leaves the tests out (they need the whole repository).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("lorashare", "hub_templates")  # pyproject: lorashare + lorashare.hub_templates (from hub_templates/)
TEMPLATE = "lorashare/hub_templates/model_card.md"
QUIET_PIP = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", "PIP_NO_INPUT": "1"}


def _backend_unavailable() -> str:
    """Why no wheel can be built offline here, or '' if one can."""
    if importlib.util.find_spec("build") is not None:
        return ""
    if importlib.util.find_spec("setuptools") is None:
        return "neither `build` nor setuptools (the build backend) is installed, and the build is offline"
    import setuptools

    major_minor = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        return f"setuptools {setuptools.__version__} needs the `wheel` package to build wheels, and it is not installed"
    return ""


def _copy_project(dst: Path, *extra_dirs: str) -> Path:
    """The files a build reads: top-level files (pyproject.toml, README.md, LICENSE, ...) and the package folders."""
    dst.mkdir()
    for p in ROOT.iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
    for d in PACKAGE_DIRS + extra_dirs:
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _build_wheel(src: Path, out: Path) -> Path:
    env = {**os.environ, **QUIET_PIP}
    if importlib.util.find_spec("build") is not None:
        # Offline: the installed setuptools is the backend (_backend_unavailable() has checked it can).
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check", "--outdir", str(out), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(src), timeout=120)
    assert r.returncode == 0, f"wheel build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = sorted(out.glob("lorashare-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    why = _backend_unavailable()
    if why:
        pytest.skip(f"cannot build a wheel offline: {why}")
    tmp = tmp_path_factory.mktemp("wheel")
    return _build_wheel(_copy_project(tmp / "src"), tmp / "dist")


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    if importlib.util.find_spec("build") is None:
        pytest.skip("building an sdist offline needs `build` (pip install -e .[dev])")
    tmp = tmp_path_factory.mktemp("sdist")
    src = _copy_project(tmp / "src", "tests")  # with the tests, to see that they stay out
    r = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--skip-dependency-check",
                        "--outdir", str(tmp / "dist"), str(src)], capture_output=True, text=True,
                       env={**os.environ, **QUIET_PIP}, cwd=str(src), timeout=120)
    assert r.returncode == 0, f"sdist build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    (found,) = (tmp / "dist").glob("lorashare-*.tar.gz")
    return found


@pytest.mark.slow
def test_wheel_carries_the_license_and_its_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert zf.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        meta = zf.read(f"{dist_info}/METADATA").decode()
    headers = [line for line in meta.split("\n\n", 1)[0].splitlines()]
    assert "License-Expression: Apache-2.0" in headers and "License-File: LICENSE" in headers
    assert not any(h.startswith("License:") or h.startswith("Classifier: License ::") for h in headers)
    assert any(h.startswith("Project-URL: Source, https://github.com/") for h in headers)
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


@pytest.mark.slow
def test_sdist_carries_the_license_and_leaves_the_tests_out(sdist):
    import tarfile

    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
        top = next(iter(tf.getnames())).split("/")[0]
        assert tf.extractfile(f"{top}/LICENSE").read() == (ROOT / "LICENSE").read_bytes()
    assert {"pyproject.toml", "README.md", "LICENSE", "lorashare/hub/card.py", "hub_templates/model_card.md"} <= names
    assert not [n for n in names if n.startswith("tests/")], sorted(n for n in names if n.startswith("tests"))


@pytest.mark.skipif(tomllib is None, reason="tomllib is Python >= 3.11")
def test_build_requirements_and_extras_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["requires"] == ["setuptools>=77"]  # PEP 639; no `wheel` needed
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    extras = project["project"]["optional-dependencies"]
    gradio = {extra: [r for r in reqs if r.startswith("gradio")] for extra, reqs in extras.items()}
    assert len({tuple(v) for v in gradio.values() if v}) == 1, gradio  # the same bounds in every extra that has it


@pytest.mark.slow
def test_wheel_contains_the_templates(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert TEMPLATE in names
        assert zf.read(TEMPLATE) == (ROOT / "hub_templates" / "model_card.md").read_bytes()
        assert {"lorashare/__init__.py", "lorashare/hub/card.py", "lorashare/hub/client.py", "lorashare/py.typed"} <= names
        assert not any(n.startswith(("tests/", "benchmarks/", "hub_templates/")) for n in names)
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "lorashare = lorashare.cli:main" in zf.read(entry_points).decode()


RENDER = r"""
import json, os, sys
from importlib import resources
import lorashare
from lorashare import SHAREModel
from lorashare.hub.card import load_template

target = os.path.realpath(sys.argv[1])
share = SHAREModel.from_adapters(sys.argv[2:4], num_components=4, progress=False)
share.save_pretrained(sys.argv[4])
print(json.dumps({
    "lorashare": os.path.realpath(lorashare.__file__),
    "templates": os.path.realpath(str(resources.files("lorashare.hub_templates").joinpath("model_card.md"))),
    "template": load_template(),
    "target": target,
}))
"""


@pytest.mark.slow
def test_installed_wheel_renders_the_card(wheel, adapter_dirs, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, env={**os.environ, **QUIET_PIP}, timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (target / TEMPLATE).is_file()

    out = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_ENDPOINT", None)
    r = subprocess.run([sys.executable, "-c", RENDER, str(target), adapter_dirs[0], adapter_dirs[1], str(out)],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    # lorashare and its template come from the install, not from the source tree.
    assert got["lorashare"].startswith(got["target"] + os.sep)
    assert got["templates"] == os.path.join(got["target"], *TEMPLATE.split("/"))
    assert got["template"] == (ROOT / "hub_templates" / "model_card.md").read_text(encoding="utf-8")
    card = (out / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\nlibrary_name: lorashare\n")
    assert "| task0 | task0 | – | 4 |" in card and "Written by lorashare" in card and "$" not in card


def _readme_commands() -> list:
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_commands():
    first, second = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci  # the test command, exactly as the README writes it
    assert "-e ." in first and "[dev]" not in first  # the first command installs only what compression needs
    assert ".venv/bin/pip install -q torch==2.13.0 -e ." in ci


# A bare `pip install lorashare` gives PyPI's 0.1.x, another code base: every mention must say so.
BARE = re.compile(r"pip install (?:-U |--upgrade |--force-reinstall )?[\"']?lorashare(?![\w=<>~!@\[-])(?!\s+@)")


def test_no_file_says_pip_install_lorashare_without_the_release():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    offenders = []
    for rel in filter(None, listed):
        path = ROOT / rel
        if rel.startswith("tests/") or not path.is_file() or path.suffix in (".safetensors", ".png"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if BARE.search(line) and "0.1" not in line:
                offenders.append(f"{rel}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders)
    assert BARE.search("run pip install lorashare now") and BARE.search("pip install -U lorashare.")
    assert not BARE.search('pip install "lorashare @ git+https://x"') and not BARE.search("pip install lorashare==0.1.3")
