"""Deploy the lorashare Space in one command: ``python space/deploy.py OWNER/NAME [--private]``.

Creates the Space (Gradio SDK) if needed and makes its files, in ONE commit:

* ``app.py``, ``README.md`` (the Space's front matter: sdk, sdk_version, python_version, OAuth) and
  ``requirements.txt`` from this folder;
* the ``lorashare`` package of this checkout next to ``app.py``, with its model-card template
  (``lorashare/hub_templates/``), and the project's ``LICENSE``.

The Space is self-contained: the Spaces builder installs gradio at the README's ``sdk_version``,
then ``requirements.txt`` before the rest of the repo is there, so that file names packages of the
index only (checked here, before anything is sent); lorashare itself is not on the index in this
version, and travels in the repo.  Files of the Space that the deploy does not write are deleted in
the same commit.  The token comes from ``HF_TOKEN`` and the endpoint from ``HF_ENDPOINT``, as
everywhere in lorashare; every Hub call goes through ``lorashare.hub``.

Exit codes: 0 deployed, 1 failed, 2 bad usage or a bad file here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # this checkout's lorashare: the one that is deployed, and the one that deploys

from lorashare import __version__, hub  # noqa: E402
from lorashare.errors import ConfigError, LoraShareError  # noqa: E402

SPACE_FILES = ("app.py", "README.md", "requirements.txt")
_INDEX_OPTIONS = ("--extra-index-url", "--index-url", "-i")


def check_requirements(text: str, *, path: str = "requirements.txt") -> List[str]:
    """The requirement lines of ``text``; a :class:`ConfigError` for anything the builder cannot install.

    The builder runs ``pip install -r requirements.txt`` before the repo is there, so a local path,
    a ``file:`` or any other URL, a VCS spec (``git+…``, ``name @ url``) or an option other than an
    index (``-e``, ``-r``, ``-c``, ``--find-links``) would fail or install something else.
    """
    found: List[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        option = line.split()[0].split("=")[0]
        if option in _INDEX_OPTIONS:
            continue
        bad = (
            "an option other than an index" if line.startswith("-")
            else "a URL" if "://" in line or line.startswith("file:")
            else "a direct reference (name @ url)" if "@" in line
            else "a local path" if line.startswith((".", "/", "~")) or "\\" in line or "/" in line
            else ""
        )
        if bad:
            raise ConfigError(
                f"{path}:{number}: {line!r} is {bad}: the Spaces builder installs this file before the repo is "
                "there, so it may name only packages of the index (name==version). lorashare travels in the "
                "Space itself (deploy.py copies it next to app.py).", path=path)
        found.append(line)
    return found


def stage(dst: Path) -> Path:
    """Lay out the Space repo in ``dst`` (an empty or new folder); return it."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copy2(HERE / name, dst / name)
    check_requirements((dst / "requirements.txt").read_text(encoding="utf-8"), path=str(HERE / "requirements.txt"))
    readme = (dst / "README.md").read_text(encoding="utf-8")
    for key in ("sdk: gradio", "app_file: app.py", "sdk_version:"):
        if f"\n{key}" not in readme.split("\n---", 1)[0]:
            raise ConfigError(f"{HERE / 'README.md'}: the front matter lacks `{key}`, which the Space needs.",
                              path=str(HERE / "README.md"))
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "lorashare", dst / "lorashare", ignore=skip)
    # Where lorashare.hub.card finds it in an install: the wheel maps hub_templates/ to lorashare/hub_templates/.
    shutil.copytree(ROOT / "hub_templates", dst / "lorashare" / "hub_templates", ignore=skip)
    shutil.copy2(ROOT / "LICENSE", dst / "LICENSE")
    return dst


def deploy(repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
    """Stage the Space and push it in one commit; return the Space's URL."""
    if not hub.is_hub_id(repo_id) or repo_id.count("/") != 1 or "@" in repo_id:
        raise ConfigError(f"{repo_id!r} is not a Space id: expected OWNER/NAME.")
    token = token or os.environ.get("HF_TOKEN") or None
    if not token:
        raise ConfigError("no Hugging Face token: set HF_TOKEN to a token with write access to the Space's owner.")
    with tempfile.TemporaryDirectory(prefix="lorashare-space-deploy-") as tmp:
        folder = stage(Path(tmp) / "space")
        info = hub.push_space(str(folder), repo_id, private=private, token=token,
                              commit_message=f"Deploy the lorashare Space (lorashare {__version__})")
    url = f"{hub.endpoint()}/spaces/{repo_id}"
    print(f"deployed lorashare {__version__} to {url} (commit {getattr(info, 'oid', '?')})")
    return url


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python space/deploy.py", description="Create or update the lorashare Space in one commit.",
        epilog="The token comes from HF_TOKEN, the Hub from HF_ENDPOINT (default https://huggingface.co).")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the Space to create or update")
    parser.add_argument("--private", action="store_true",
                        help="create the Space private (an existing one keeps its visibility)")
    args = parser.parse_args(argv)
    try:
        deploy(args.repo_id, private=args.private)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except LoraShareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
