"""What a visitor of the Space reads when something fails: only fixes they can do in the Space.

lorashare's messages speak to Python callers and to the machine's operator (``HF_HUB_OFFLINE=1``,
``LORASHARE_HUB_TIMEOUT``, ``token=...``, ``overwrite=True``, ``--overwrite``); a visitor can sign in,
paste a token, fix the ids, pick fewer adapters or try again later, and nothing else.  Each case
here raises a real error through lorashare's public API, against the local test Hub
(:class:`tests.hubserver.HubServer`), and renders it exactly as the Space does
(``space/app.py``'s ``_readable_errors``), in this process: no app is started.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Callable, List

import pytest
import torch

if importlib.util.find_spec("gradio") is None:
    pytest.skip("the Space needs gradio: pip install -e '.[dev]'", allow_module_level=True)

from lorashare import SHAREModel, errors  # noqa: E402
from lorashare import hub as lorashare_hub  # noqa: E402
from lorashare.codec.compress import check_storable  # noqa: E402
from lorashare.format.tensorfile import read_header  # noqa: E402
from lorashare.utils.names import check_name  # noqa: E402
from tests.conftest import make_adapter  # noqa: E402
from tests.test_space import APP, NOT_FOR_VISITORS, folder_files, put  # noqa: E402


@pytest.fixture(scope="module")
def app():
    """``space/app.py`` as a module; the environment changes it makes at import are undone after."""
    saved = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("lorashare_space_app", APP)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


def shown(app, call: Callable[[], object]) -> str:
    """The message the Space shows for what ``call`` raises (through the Space's own error handler)."""
    import gradio as gr

    with pytest.raises(gr.Error) as err:
        with app._readable_errors():
            call()
    return str(err.value.message)


def assert_for_visitors(message: str, *expected: str) -> None:
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    for advice in NOT_FOR_VISITORS:
        assert advice not in message, f"{advice!r} (not a visitor's fix) in {message!r}"


@pytest.fixture
def online(hub, hf_cache, monkeypatch):
    """The test Hub for lorashare.hub, with one adapter and one SHARE checkpoint on it."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.delenv("LORASHARE_HUB_TIMEOUT", raising=False)
    return hub


def two_adapters(root: Path, base_name: str = "tiny-bert-for-tests") -> dict:
    return {f"a{i}": make_adapter(str(root / f"a{i}"), seed=i, head=True, base_name=base_name) for i in range(2)}


def refs(text: str):
    return lorashare_hub.parse_adapter_id(text)


# ---------------------------------------------------------------------------- the Hub


def test_hub_unreachable(app, online, monkeypatch):
    online.inject_when(("drop",), path_regex=r"tester/dropped", times=None)
    message = shown(app, lambda: lorashare_hub.remote_sizes("tester/dropped", ["adapter_config.json"]))
    assert_for_visitors(message, "cannot reach the Hub", "tester/dropped", "try again in a few minutes")


def test_hub_timeout(app, online, monkeypatch):
    monkeypatch.setenv("LORASHARE_HUB_TIMEOUT", "1")
    online.inject_when(("delay", 3), path_regex=r"tester/slow", times=None)
    message = shown(app, lambda: lorashare_hub.remote_sizes("tester/slow", ["adapter_config.json"]))
    assert_for_visitors(message, "did not answer in time", "tester/slow", "try again")


def test_hub_failing(app, online):
    online.inject_when(("status", 503), path_regex=r"tester/down", times=None)
    message = shown(app, lambda: lorashare_hub.remote_sizes("tester/down", ["adapter_config.json"]))
    assert_for_visitors(message, "tester/down", "try again later")


def test_gated_private_and_forbidden_repos(app, online, tmp_path):
    files = folder_files(make_adapter(str(tmp_path / "a"), seed=0))
    put(online, "tester/gated-lora", files, gated=True)
    put(online, "tester/private-lora", files, private=True)
    gated = shown(app, lambda: lorashare_hub.remote_sizes("tester/gated-lora", ["adapter_model.safetensors"],
                                                          probe="adapter_model.safetensors"))
    assert_for_visitors(gated, "tester/gated-lora", "gated", "accept its conditions", "sign in", "token field")
    private = shown(app, lambda: lorashare_hub.fetch_adapter(refs("tester/private-lora")))
    assert_for_visitors(private, "repo not found", "tester/private-lora", "Check the id", "sign in", "token field")
    online.inject_when(("status", 403), path_regex=r"tester/forbidden", times=None)
    forbidden = shown(app, lambda: lorashare_hub.remote_sizes("tester/forbidden", ["adapter_config.json"]))
    assert_for_visitors(forbidden, "not authorised", "tester/forbidden", "sign in", "token field")


def test_offline_server(app, online, request, tmp_path):
    share = SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False)
    request.getfixturevalue("hf_offline")  # the operator set HF_HUB_OFFLINE=1
    fetch = shown(app, lambda: lorashare_hub.fetch_adapter(refs("tester/never-cached")))
    assert_for_visitors(fetch, "tester/never-cached", "cannot download it", "Try again later")
    push = shown(app, lambda: share.push_to_hub("tester/offline-share", token="hf_anything"))
    assert_for_visitors(push, "cannot push to tester/offline-share", "push it from your own machine")


def test_push_without_a_token(app, online, tmp_path):
    share = SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False)
    message = shown(app, lambda: share.push_to_hub("tester/no-token-share"))
    assert_for_visitors(message, "tester/no-token-share", "sign in", "write access")


def test_a_misconfigured_server_says_so_without_the_setting(app, online, monkeypatch):
    monkeypatch.setenv("LORASHARE_HUB_TIMEOUT", "soon")  # the operator's typo
    message = shown(app, lambda: lorashare_hub.remote_sizes("tester/x", ["adapter_config.json"]))
    assert_for_visitors(message, "current settings", "Try again later")


# ------------------------------------------------------------------------- ids and names


@pytest.mark.parametrize("ids, expected", [
    ("foo\ntester/b", ["line 1", "`foo` is not a Hub id", "owner/name"]),
    ("tester/a/../x\ntester/b", ["line 1", "bad subfolder"]),
    ("bad name=tester/a\ntester/b", ["line 1", "'bad name' is not allowed", "Pick another name before the `=`"]),
    ("x=tester/a\nx=tester/b", ["line 2", "the name `x` is already given on line 1", "its own name"]),
    ("tester/a\ntester/a", ["line 2", "listed twice (first on line 1)"]),
], ids=["bad-id", "bad-subfolder", "invalid-name", "duplicate-name", "listed-twice"])
def test_bad_ids_and_names(app, ids, expected):
    assert_for_visitors(shown(app, lambda: app.parse_ids(ids)), *expected)


def test_names_refused_by_lorashare(app, tmp_path):
    assert_for_visitors(shown(app, lambda: check_name("a b")), "'a b' is not allowed", "Pick another name")
    share = SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False)
    duplicate = shown(app, lambda: share.add_adapter(str(tmp_path / "a0"), name="a1"))
    assert_for_visitors(duplicate, "'a1'", "another name", "name=owner/name")
    assert_for_visitors(shown(app, lambda: app._adapter_name("../x")), "'../x' is not allowed",
                        "Pick one of the checkpoint's adapters")


# --------------------------------------------------------------- files and checkpoints


def test_a_tampered_checkpoint_is_refused(app, tmp_path):
    folder = tmp_path / "ckpt"
    SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False).save_pretrained(str(folder))
    loadings = folder / "adapters" / "a0" / "loadings.safetensors"
    data = bytearray(loadings.read_bytes())
    data[-1] ^= 0x01  # one bit of one value
    loadings.write_bytes(bytes(data))
    message = shown(app, lambda: SHAREModel.from_pretrained(str(folder)))
    assert_for_visitors(message, "loadings.safetensors", "sha256", "pick another repo", "push it")
    assert "re-download" not in message.lower()


def test_a_broken_config_is_refused(app, tmp_path):
    folder = tmp_path / "ckpt"
    SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False).save_pretrained(str(folder))
    config = json.loads((folder / "share_config.json").read_text())
    config["k_per_group"] = {key: k + 1 for key, k in config["k_per_group"].items()}
    (folder / "share_config.json").write_text(json.dumps(config))
    message = shown(app, lambda: SHAREModel.from_pretrained(str(folder)))
    assert_for_visitors(message, "k_per_group", "This Space cannot use that repo's files")


def test_a_file_declaring_a_huge_tensor(app, tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}).encode()
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    message = shown(app, lambda: read_header(str(path), error=errors.AdapterError, who="tester/huge"))
    assert_for_visitors(message, "tester/huge", "byte limit per tensor", "pick another repo")


def test_storage_that_overflows(app):
    message = shown(app, lambda: check_storable("q", "float16", [("a0", torch.tensor([float("inf")]))]))
    assert_for_visitors(message, "float16", "Pick float32 or bfloat16 under Storage")


def test_a_local_base_model_is_not_pushed(app, online, tmp_path):
    share = SHAREModel.from_adapters(two_adapters(tmp_path, base_name="/srv/models/bert"), num_components=4,
                                     progress=False)
    message = shown(app, lambda: share.push_to_hub("tester/local-base-share", token="hf_anything"))
    assert_for_visitors(message, "a local folder", "adapter_config.json", "own machine")


def test_the_server_s_own_folders(app, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    share = SHAREModel.from_adapters(two_adapters(tmp_path), num_components=4, progress=False)
    message = shown(app, lambda: share.save_pretrained(str(foreign)))
    assert_for_visitors(message, "will not write", "the Space's fault", "try again")


def test_a_full_disk(app):
    # The message of lorashare.format.atomic's SaveError for ENOSPC (a full disk cannot be made here).
    exc = errors.SaveError("could not save the SHARE checkpoint to /tmp/x: No space left on device (/tmp/x/a). "
                           "Nothing was changed there. Free some disk space, or save elsewhere.", path="/tmp/x")

    def fail():
        raise exc

    assert_for_visitors(shown(app, fail), "No space left on device", "try again later")


# ------------------------------------------------------------------- the safety net


@pytest.mark.parametrize("message, kept, dropped", [
    ("The adapter is odd. Set LORASHARE_FOO=1 to allow it.", ["The adapter is odd."], ["Set"]),
    ("Line one is fine.\nLine two is odd. Pass --force to go on. Or wait.",
     ["Line one is fine.\nLine two is odd. Or wait."], ["force"]),
    ("Line one is fine.\nline two: pass --force to go on.", ["current settings"], ["Line one", "force"]),
    ("Set HF_HUB_OFFLINE=1 and try again.", ["current settings"], ["Set"]),
])
def test_advice_nobody_taught_the_space_is_dropped(app, message, kept, dropped):
    shown_text = app._public(message)
    assert_for_visitors(shown_text, *kept)
    for text in dropped:
        assert text not in shown_text


def test_every_visitor_message_of_the_space_itself(app):
    """The Space's own refusals, as written in space/app.py: none names a setting or a flag."""
    source = APP.read_text()
    strings: List[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("UserError", "_fail"):
            strings += [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert len(strings) > 30, strings  # the parse found them
    for text in strings:
        for advice in NOT_FOR_VISITORS:
            assert advice not in text, f"{advice!r} in the Space's message {text!r}"
