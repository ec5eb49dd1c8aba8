"""Fresh virtual environments for the delivery tests: the Action's real install and the Space's build.

Both start from nothing, as a runner or the Spaces builder would, so they need a package index; they
reuse this machine's pip settings and wheel cache, which keeps each build to a minute or two.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

ROOT = Path(__file__).resolve().parents[1]


def checkout_copy(dst: Path) -> Path:
    """The files a checkout of this repository holds (tracked, or new and not ignored), copied to ``dst``.

    A workflow that pins the action gets such a checkout as ``$GITHUB_ACTION_PATH``; a copy also
    keeps pip's in-tree build (``build/``, ``*.egg-info``) out of this working tree.
    """
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # deleted but not yet staged files are listed too
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def pip_environment(tmp: Path, *, pin_torch: bool = True) -> Dict[str, str]:
    """Environment variables for pip in a fresh venv run with a clean environment (and its own HOME).

    This machine's pip settings (its environment and its config files, user ones included, as
    ``pip config list`` reads them) and proxies are handed over as variables, with its wheel cache.
    ``PIP_RETRIES=0`` gives up on an unreachable index at once (the CPU torch index is one here)
    instead of retrying it for minutes.  ``pin_torch``: a constraint holds torch at this
    interpreter's release, which picks the CPU build where the CPU wheel index cannot be reached.
    """
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    env = {"PIP_" + m.group(1).upper().replace("-", "_"): m.group(2)
           for m in re.finditer(r"^(?:global|install)\.([a-z0-9-]+)='(.*)'$", listed, re.M)}
    env.update({k: v for k, v in os.environ.items()
                if k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy", "no_proxy", "ssl_cert_file")})
    user_cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    cache = os.environ.get("PIP_CACHE_DIR") or os.path.join(user_cache, "pip")
    env.update({"PIP_CACHE_DIR": cache, "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    if pin_torch:
        import torch

        constraints = tmp / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
        env["PIP_CONSTRAINT"] = str(constraints)
    return env
