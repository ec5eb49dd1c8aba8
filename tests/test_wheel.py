"""The built wheel ships the model-card template, and an install of it renders cards.

The wheel is built offline (no build isolation, no index) from a copy of the project's
top-level files and package folders in ``tmp_path``, so the build leaves nothing
(``build/``, ``*.egg-info``) in the checkout.  It is then installed with
``pip install --no-deps --target`` and used from a subprocess that imports lorashare from
that target, not from the source tree.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


def _copy_project(dst: Path) -> Path:
    """The files a build reads: top-level files (pyproject.toml, README.md, ...) and the package folders."""
    dst.mkdir()
    for p in ROOT.iterdir():
        if p.is_file() and not p.name.startswith("."):
            shutil.copy2(p, dst / p.name)
    for d in PACKAGE_DIRS:
        shutil.copytree(ROOT / d, dst / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def _build_wheel(src: Path, out: Path) -> Path:
    env = {**os.environ, **QUIET_PIP}
    if importlib.util.find_spec("build") is not None:
        # pyproject lists `wheel` as a build requirement; setuptools >= 70.1 builds wheels without it,
        # and _backend_unavailable() has checked that the backend can.
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


def test_wheel_contains_the_templates(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert TEMPLATE in names
        assert zf.read(TEMPLATE) == (ROOT / "hub_templates" / "model_card.md").read_bytes()
        assert {"lorashare/__init__.py", "lorashare/card.py", "lorashare/hub.py"} <= names
        assert not any(n.startswith(("tests/", "benchmarks/", "hub_templates/")) for n in names)
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "lorashare = lorashare.cli:main" in zf.read(entry_points).decode()


RENDER = r"""
import json, os, sys
from importlib import resources
import lorashare
from lorashare import SHAREModel
from lorashare.card import load_template

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
