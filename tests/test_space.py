"""The Hugging Face Space (``space/app.py``), end to end through ``gradio_client``.

The app runs as a subprocess (``python space/app.py``) on a free port of 127.0.0.1, pointed at a
local Hub-compatible server (:class:`tests.hubserver.HubServer`) through ``HF_ENDPOINT``, with its
own ``HF_HOME``, ``TMPDIR`` and ``GRADIO_TEMP_DIR`` under a pytest temp folder.  One app serves the
whole module; each test uses fresh clients (fresh sessions).

The helpers here (:func:`seed_hub`, :func:`launch_space`) are shared with
``tests/test_space_browser.py``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import torch
import yaml

if importlib.util.find_spec("gradio") is None:  # not imported here: only the app process needs it
    pytest.skip("the Space needs gradio: pip install -e '.[dev]'", allow_module_level=True)
gradio_client = pytest.importorskip("gradio_client")
httpx = pytest.importorskip("httpx")

from gradio_client.exceptions import AppError  # noqa: E402

from lorashare import SHAREModel  # noqa: E402
from tests.conftest import load_state, make_adapter  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "space" / "app.py"
TOKEN = "hf_spaceTestSecret0123456789"  # any token passes the test Hub; it must never reach a log
MAX_ADAPTERS = 6
MAX_BYTES = 1_000_000
THREE = "tester/billing-lora\ntester/refunds-lora@v1\ntester/multi-lora/legal"
#: Advice a visitor of the Space cannot follow (environment variables, command-line flags, Python keywords):
#: no message the Space shows may name any of it.
NOT_FOR_VISITORS = ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "LORASHARE_", "--", "token=", "overwrite=",
                    "dtype=", "in Python", "hf auth login", "delete it from the cache")


# ------------------------------------------------------------------------------- helpers


def folder_files(folder: str, prefix: str = "") -> Dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def put(hub: HubServer, repo_id: str, files: Dict[str, bytes], **repo_kwargs) -> str:
    try:
        hub.repo(repo_id)
    except Exception:  # noqa: BLE001 - the server's own HubError: not there yet
        hub.create_repo(repo_id, **repo_kwargs)
    return hub.commit(repo_id, files, lfs=[p for p in files if p.endswith(".safetensors")])


def seed_hub(hub: HubServer, root: Path) -> Dict[str, str]:
    """Adapters on the test Hub; returns ``{name: local folder}`` of what each id serves."""
    made = {name: make_adapter(str(root / name), seed=i, head=(i % 2 == 0)) for i, name in
            enumerate(["billing", "refunds", "legal", "extra", "refunds_v2"])}
    put(hub, "tester/billing-lora", folder_files(made["billing"]))
    put(hub, "tester/refunds-lora", folder_files(made["refunds"]))
    hub.create_tag("tester/refunds-lora", "v1")
    put(hub, "tester/refunds-lora", folder_files(made["refunds_v2"]))  # main moves on; @v1 stays
    put(hub, "tester/multi-lora", {**folder_files(made["legal"], "legal/"), **folder_files(made["extra"], "extra/")})
    other = make_adapter(str(root / "other"), seed=9, base_name="some-other-base")
    put(hub, "tester/other-base-lora", folder_files(other))
    huge = {"adapter_config.json": (Path(made["billing"]) / "adapter_config.json").read_bytes(),
            "adapter_model.safetensors": bytes(2 * MAX_BYTES)}  # never downloaded: refused on its size
    put(hub, "tester/huge-lora", huge)
    put(hub, "tester/gated-lora", folder_files(made["extra"]), gated=True)
    put(hub, "tester/private-lora", folder_files(made["extra"]), private=True)
    seed = SHAREModel.from_adapters({"billing-lora": made["billing"], "legal": made["legal"]}, num_components=8,
                                    progress=False)
    seed.save_pretrained(str(root / "seed-share"))
    put(hub, "tester/seed-share", folder_files(str(root / "seed-share")))
    return made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Space:
    url: str
    hub: HubServer
    tmpdir: Path  # the app's TMPDIR: must be empty between requests
    log: Path
    root: Path
    adapters: Dict[str, str]
    proc: subprocess.Popen

    def client(self, **kwargs) -> "gradio_client.Client":
        downloads = self.root / "downloads"
        downloads.mkdir(exist_ok=True)
        return gradio_client.Client(self.url, verbose=False, download_files=str(downloads), analytics_enabled=False,
                                    **kwargs)


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Iterator[Space]:
    with launch_space(tmp_path_factory.mktemp("space")) as s:
        yield s


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Space exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the Space did not start in {timeout}s:\n{log.read_text()[-4000:]}")


class launch_space:  # noqa: N801 - used as a context manager, like open()
    """Seed a test Hub, start ``space/app.py`` against it; stop both on exit.

    ``hub``: use that (running) server instead, and leave it running; ``python``, ``app`` and
    ``cwd``: run another build of the Space (tests/test_space_deploy.py).
    """

    def __init__(self, root: Path, *, seed: bool = True, hub: Optional[HubServer] = None, python: str = sys.executable,
                 app: Path = APP, cwd: Path = ROOT, **env: str) -> None:
        self.root, self.seed, self.env = root, seed, env
        self.given_hub, self.python, self.app, self.cwd = hub, python, app, cwd

    def __enter__(self) -> Space:
        root = self.root
        self.hub = self.given_hub or HubServer().start()
        adapters = seed_hub(self.hub, root / "adapters") if self.seed else {}
        tmpdir = root / "app_tmp"
        tmpdir.mkdir()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "GRADIO_", "SPACE_", "LORASHARE_"))}
        env.update({
            "HF_ENDPOINT": self.hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(root / "hf_home"),
            "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": TOKEN,  # the app must ignore an ambient token
            "TMPDIR": str(tmpdir), "GRADIO_TEMP_DIR": str(root / "gradio_cache"), "GRADIO_SERVER_PORT": str(port),
            "LORASHARE_SPACE_MAX_ADAPTERS": str(MAX_ADAPTERS), "LORASHARE_SPACE_MAX_BYTES": str(MAX_BYTES),
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env)
        log = root / "app.log"
        self.log_file = open(log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen([self.python, str(self.app)], cwd=str(self.cwd), env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait_ready(url, self.proc, log)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return Space(url, self.hub, tmpdir, log, root, adapters, self.proc)

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        if self.given_hub is None:
            self.hub.stop()


def table(value: dict) -> List[dict]:
    """A Dataframe output as a list of row dicts."""
    return [dict(zip(value["headers"], row)) for row in value["data"]]


def plot_rows(value: dict) -> List[list]:
    """A plot output's rows (plain, or inside a component update)."""
    return (value.get("value") or value)["data"]


def unzip(path: str, dest: Path) -> Path:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names), names
        z.extractall(dest)
    tops = {n.split("/")[0] for n in names}
    assert len(tops) == 1, tops
    return dest / tops.pop()


def snapshot_to(hub: HubServer, repo_id: str, dest: Path, revision: str = "main") -> Path:
    for rel, data in hub.snapshot(repo_id, revision).items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def assert_clean_error(exc: BaseException, *expected: str) -> str:
    message = str(exc)
    assert isinstance(exc, AppError), repr(exc)
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    for leak in ("Traceback", 'File "', "site-packages", "lorashare-space-", TOKEN, str(ROOT)):
        assert leak not in message, f"{leak!r} leaked into {message!r}"
    for advice in NOT_FOR_VISITORS:
        assert advice not in message, f"{advice!r} (not a visitor's fix) in {message!r}"
    return message


def compress(client, ids: str, mode: str = "number", k: int = 8, threshold: float = 0.95, token: str = "",
             storage: str = "float32"):
    return client.predict(ids, mode, k, threshold, token, storage, api_name="/compress")


# --------------------------------------------------------------------------------- tests


def buttons(url: str) -> List[str]:
    config = httpx.get(url + "config", timeout=10).json()
    return [c["props"].get("value") for c in config["components"] if c.get("type") == "button"]


def test_named_endpoints_and_no_login_button_locally(space):
    api = space.client().view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/compress", "/push", "/explore", "/reconstruct", "/try_list", "/try_run"}
    # Not on a Space: no sign-in button (Gradio would need this machine's own login), the token field instead.
    assert "Compress" in buttons(space.url) and "Sign in with Hugging Face" not in buttons(space.url)


#: Every endpoint's outputs, by the names gradio_client gives them (from each component's label).
RETURNS = {
    "/compress": ["status", "compression_statistics", "fidelity_per_adapter", "explained_variance",
                  "bytes_before_and_after", "share_checkpoint_zip"],
    "/push": ["push_result"],
    "/explore": ["checkpoint_summary", "adapters", "compression_statistics", "explained_variance",
                 "bytes_before_and_after", "adapter_to_reconstruct"],
    "/reconstruct": ["peft_adapter_zip", "how_to_load_it"],
    "/try_list": ["checkpoint_and_base_model", "adapters_to_run"],
    "/try_run": ["batch_summary", "each_adapters_output"],
}


def test_the_api_names_every_endpoint_input_and_output(space):
    from gradio_client.utils import sanitize_parameter_names

    client = space.client()
    api = client.view_api(return_format="dict", print_info=False)
    assert api["unnamed_endpoints"] == {}  # the k toggle is private: no endpoint at all
    named = api["named_endpoints"]
    returns = {name: [sanitize_parameter_names(r["label"]) for r in ep["returns"]] for name, ep in named.items()}
    assert returns == RETURNS
    generated = re.compile(r"(value|parameter)_\d+")
    for name, ep in named.items():
        params = [p["parameter_name"] for p in ep["parameters"]]
        assert params and not [p for p in params if generated.fullmatch(p)], (name, params)
        assert "token_text" in params, name  # each takes the visitor's token the same way
        description = ep["description"]
        assert len(description) > 40 and "``" not in description and "Gradio" not in description, (name, description)
    text = client.view_api(return_format="str", print_info=False)
    assert not generated.search(text), generated.search(text)


def test_server_files_are_not_served(space):
    for path in (APP, Path("/etc/passwd"), space.log):
        for route in (f"gradio_api/file={path}", f"file={path}"):
            response = httpx.get(space.url + route, timeout=10)
            assert response.status_code in (403, 404), (route, response.status_code)
            assert b"import gradio" not in response.content and b"root:" not in response.content


def test_sign_in_button_on_a_space(tmp_path):
    oauth = {"SYSTEM": "spaces", "SPACE_ID": "tester/lorashare", "OAUTH_CLIENT_ID": "client", "OAUTH_CLIENT_SECRET": "x",
             "OAUTH_SCOPES": "openid profile read-repos write-repos manage-repos",
             "OPENID_PROVIDER_URL": "http://127.0.0.1:9"}  # never reached: nobody signs in here
    with launch_space(tmp_path, seed=False, **oauth) as s:
        assert "Sign in with Hugging Face" in buttons(s.url)
        with pytest.raises(AppError) as err:  # not signed in, no token: still a clean answer
            s.client().predict("tester/nothing-here", "", "", api_name="/explore")
        assert_clean_error(err.value, "not found")


def test_compress_to_nf4_storage(space, tmp_path):
    status, *_, archive = compress(space.client(), THREE, storage="nf4")
    assert "3 adapters" in status
    share = SHAREModel.from_pretrained(unzip(archive, tmp_path))
    assert share.config.dtype == "nf4" and share.config.format_version == 2


def test_compress_three_hub_adapters_and_load_the_zip(space, tmp_path):
    status, stats, fidelity, ev, sizes, archive = compress(space.client(), THREE)

    assert "3 adapters" in status and "Excluding bases" in status
    rows = {r["statistic"]: r for r in table(stats)}
    assert rows["compression ratio"]["value"].endswith("×")
    assert "not the compression ratio" in rows["compression ratio excluding bases"]["meaning"]
    fid = table(fidelity)
    assert [r["adapter"] for r in fid] == ["billing-lora", "refunds-lora", "legal"]
    assert all(0 <= r["ΔW error mean"] <= r["ΔW error max"] < 1 for r in fid)
    assert {row[2] for row in plot_rows(ev)} == {"A", "B"} and len(plot_rows(ev)) == 8  # 4 modules × 2 sides
    assert {row[1] for row in sizes["data"]} == {"LoRA factors", "shared bases", "loadings"}

    share = SHAREModel.from_pretrained(unzip(archive, tmp_path))
    assert share.adapter_names == ["billing-lora", "refunds-lora", "legal"]
    info = share.config.adapters
    assert info["refunds-lora"]["source"] == "tester/refunds-lora@v1"
    assert info["refunds-lora"]["revision"] == space.hub.resolve("tester/refunds-lora", "v1")  # not main
    assert info["legal"]["source"] == "tester/multi-lora/legal"

    # The same compression done by the library from the same adapters gives the same adapters back.
    a = space.adapters
    local = SHAREModel.from_adapters({"billing-lora": a["billing"], "refunds-lora": a["refunds"], "legal": a["legal"]},
                                     num_components=8, progress=False)
    for name in share.adapter_names:
        mine, theirs = share.reconstruct(name), local.reconstruct(name)
        assert mine.keys() == theirs.keys()
        assert all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine), name


def test_a_checkpoint_larger_than_its_adapters_says_how_to_shrink_it(space):
    client = space.client()
    two = "tester/billing-lora\ntester/multi-lora/legal"
    status, stats, *_ = compress(client, two, k=8)  # 2 adapters of rank 4: k = 8 keeps everything, saves nothing
    assert float({r["statistic"]: r for r in table(stats)}["compression ratio"]["value"].rstrip("×")) < 1
    found = re.search(r"\*\*Note:\*\* this checkpoint is [\d.]+× the size .* to number with k = (\d+) or less", status)
    assert found, status
    assert not [a for a in NOT_FOR_VISITORS if a in status], status
    status, stats, *_ = compress(client, two, k=int(found[1]))  # as the note says
    assert float({r["statistic"]: r for r in table(stats)}["compression ratio"]["value"].rstrip("×")) > 1
    assert "Note:" not in status


def test_push_explore_and_reconstruct(space, tmp_path):
    client = space.client(oauth_token=TOKEN)  # as if signed in: the token reaches gr.OAuthToken
    compress(client, "tester/billing-lora\ntester/multi-lora/legal", mode="auto", threshold=0.99)
    result = client.predict("tester/space-share", False, "apache-2.0", "", api_name="/push")

    head = space.hub.resolve("tester/space-share")
    assert f"{space.hub.url}/tester/space-share" in result and head in result
    files = space.hub.snapshot("tester/space-share")
    assert {"README.md", "share_config.json", "shared_components.safetensors"} <= set(files)
    card = files["README.md"].decode()
    assert "library_name: lorashare" in card and "license: apache-2.0" in card and "billing-lora" in card
    assert not space.hub.repo("tester/space-share").private

    # Explore reads the config only: no adapter loadings, whatever the revision form.
    for revision in ("", head):
        space.hub.reset_log()
        text, adapters, stats, ev, sizes, pick = space.client().predict(
            "tester/space-share", revision, "", api_name="/explore")
        assert "tiny-bert-for-tests" in text and "apache-2.0" in text
        assert [r["adapter"] for r in table(adapters)] == ["billing-lora", "legal"]
        assert {r["rank"] for r in table(adapters)} == {4}
        assert any(r["statistic"] == "compression ratio" for r in table(stats))
        assert len(plot_rows(ev)) == 8
        assert pick["value"] == "billing-lora" and [c[0] for c in pick["choices"]] == ["billing-lora", "legal"]
        assert not [f for f in space.hub.served_files("tester/space-share") if f.startswith("adapters/")]

    space.hub.reset_log()
    archive, snippet = space.client().predict("tester/space-share", "", "legal", "", api_name="/reconstruct")
    assert "PeftModel.from_pretrained" in snippet and "AutoModel" in snippet
    served = space.hub.served_files("tester/space-share")
    assert not [f for f in served if f.startswith("adapters/billing-lora/")]  # only the one asked for

    folder = unzip(archive, tmp_path / "zip")
    assert folder.name == "legal" and {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    expected = SHAREModel.from_pretrained(snapshot_to(space.hub, "tester/space-share", tmp_path / "ckpt")).reconstruct("legal")
    got = load_state(str(folder))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)

    from peft import PeftModel

    from examples.make_adapters import tiny_bert

    PeftModel.from_pretrained(tiny_bert(), str(folder))  # a standard PEFT adapter


@pytest.mark.parametrize(
    "ids, expected",
    [
        ("foo\ntester/billing-lora", ["`foo` is not a Hub id (expected owner/name"]),
        ("tester/nope-lora\ntester/billing-lora", ["repo not found", "tester/nope-lora"]),
        ("tester/billing-lora\ntester/other-base-lora", ["base model", "some-other-base"]),
        ("tester/billing-lora\ntester/huge-lora", ["at most 1.00 MB", "per request", "Compress fewer adapters"]),
        ("tester/billing-lora\ntester/gated-lora", ["gated"]),
        ("tester/billing-lora\ntester/private-lora", ["not found", "token field"]),
        ("tester/billing-lora\ntester/refunds-lora@no-such-tag", ["revision not found"]),
        ("examples/adapters/task0\nexamples/adapters/task1", ["`examples/adapters/task0` is not a Hub id"]),
        ("/etc/passwd\ntester/billing-lora", ["`/etc/passwd` is not a Hub id"]),
        ("tester/billing-lora/../../etc\ntester/billing-lora", ["bad subfolder"]),
        ("tester/billing-lora", ["at least 2"]),
        ("\n".join(f"tester/billing-lora/part{i}" for i in range(MAX_ADAPTERS + 1)), [f"at most {MAX_ADAPTERS}"]),
        ("tester/billing-lora\ntester/refunds-lora\ntester/billing-lora", ["line 3", "listed twice (first on line 1)"]),
    ],
    ids=["bad-id", "missing-repo", "mixed-base", "too-big", "gated", "private", "bad-revision", "local-folder",
         "abs-path", "dotdot", "one", "too-many", "listed-twice"],
)
def test_compress_errors_are_readable(space, ids, expected):
    space.hub.reset_log()
    with pytest.raises(AppError) as err:
        compress(space.client(), ids)
    assert_clean_error(err.value, *expected)
    assert not space.hub.served_files("tester/huge-lora")  # refused on its size, before any download


def test_every_error_names_only_what_a_visitor_can_do(space, tmp_path):
    """A table of failures, each through the app: the problem, and a fix a visitor can do in the Space."""
    files = space.hub.snapshot("tester/seed-share")
    rel = "adapters/legal/loadings.safetensors"
    files[rel] = files[rel][:-1] + bytes([files[rel][-1] ^ 1])  # one bit: its sha256 no longer matches
    put(space.hub, "tester/tampered-share", files)
    client = space.client()
    cases = [
        ("unreachable", lambda: compress(client, "tester/billing-lora\ntester/unreachable-lora"),
         ["cannot reach the Hub", "tester/unreachable-lora", "try again in a few minutes"]),
        ("gated", lambda: compress(client, "tester/billing-lora\ntester/gated-lora"),
         ["tester/gated-lora", "accept its conditions", "sign in", "token field"]),
        ("private", lambda: client.predict("tester/private-lora", "", "", api_name="/explore"),
         ["repo not found", "Check the id", "token field"]),
        ("bad-id", lambda: compress(client, "foo\ntester/billing-lora"), ["line 1", "`foo` is not a Hub id"]),
        ("duplicate-name", lambda: compress(client, "x=tester/billing-lora\nx=tester/multi-lora/legal"),
         ["line 2", "the name `x` is already given on line 1"]),
        ("invalid-name", lambda: compress(client, "bad name=tester/billing-lora\ntester/multi-lora/legal"),
         ["line 1", "'bad name' is not allowed", "Pick another name"]),
        ("checkpoint-refused", lambda: client.predict("tester/tampered-share", "", "legal", "", api_name="/reconstruct"),
         ["loadings.safetensors in tester/tampered-share@", "sha256", "pick another repo"]),
        ("bad-adapter-name", lambda: client.predict("tester/seed-share", "", "../x", "", api_name="/reconstruct"),
         ["'../x' is not allowed", "Pick one of the checkpoint's adapters"]),
        ("too-big", lambda: compress(client, "tester/billing-lora\ntester/huge-lora"),
         ["at most 1.00 MB", "Compress fewer adapters"]),
    ]
    dropped = space.hub.inject_when(("drop",), path_regex=r"tester/unreachable-lora", times=None)
    try:
        for case, call, expected in cases:
            with pytest.raises(AppError) as err:
                call()
            message = assert_clean_error(err.value, *expected)
            assert "Re-download" not in message and "re-download" not in message, (case, message)
    finally:
        dropped.remaining = 0
    assert dropped.fired >= 2  # the Space tried again before giving up


def test_other_errors_are_readable_and_the_app_stays_usable(space):
    client = space.client()
    cases = [
        (lambda: compress(client, THREE, k=0), ["less than minimum value 1"]),  # gradio checks k itself
        (lambda: client.predict("tester/x", True, "", TOKEN, api_name="/push"), ["compress adapters first"]),
        (lambda: client.predict("tester/nope", "", "", api_name="/explore"), ["not found"]),
        (lambda: client.predict("tester/billing-lora", "", "", api_name="/explore"), ["not a SHARE checkpoint"]),
        (lambda: client.predict("../etc", "", "", api_name="/explore"), ["not a Hub repo id"]),
        (lambda: client.predict("examples/adapters", "", "", api_name="/explore"), ["not a Hub repo id"]),
    ]
    for call, expected in cases:
        with pytest.raises(AppError) as err:
            call()
        assert_clean_error(err.value, *expected)

    _, _, fidelity, *_ = compress(client, "mine = tester/billing-lora\ntester/multi-lora/extra")
    assert [r["adapter"] for r in table(fidelity)] == ["mine", "extra"]
    with pytest.raises(AppError) as err:
        client.predict("tester/x", True, "", "", api_name="/push")  # no token, not signed in
    assert_clean_error(err.value, "paste a token")
    with pytest.raises(AppError) as err:
        client.predict("not a repo", True, "", TOKEN, api_name="/push")
    assert_clean_error(err.value, "not a Hub repo id")
    client.predict("tester/usable-share", True, "", TOKEN, api_name="/push")
    with pytest.raises(AppError) as err:
        client.predict("tester/usable-share", "", "nobody", TOKEN, api_name="/reconstruct")
    assert_clean_error(err.value, "nobody")
    archive, _ = client.predict("tester/usable-share", "", "extra", TOKEN, api_name="/reconstruct")
    assert archive.endswith(".zip")
    assert TOKEN not in space.log.read_text()


def test_concurrent_requests_good_and_bad_leave_no_temp_files(space):
    jobs = []  # (kind, future)
    clients = [space.client() for _ in range(4)]
    good = ["tester/billing-lora\ntester/refunds-lora", THREE, "tester/multi-lora/legal\ntester/multi-lora/extra"]
    bad = [("nope\ntester/billing-lora", "is not a Hub id"), ("tester/ghost-lora\ntester/billing-lora", "repo not found"),
           ("tester/billing-lora\ntester/other-base-lora", "base model")]
    for i in range(20):
        c = clients[i % len(clients)]
        if i % 4 == 3:  # 5 bad ones
            ids, expected = bad[i % len(bad)]
            jobs.append(("bad", expected, c.submit(ids, "number", 8, 0.95, "", api_name="/compress")))
        elif i % 5 == 4:
            jobs.append(("explore", None, c.submit("tester/seed-share", "", "", api_name="/explore")))
        elif i % 7 == 6:
            jobs.append(("reconstruct", None, c.submit("tester/seed-share", "", "legal", "", api_name="/reconstruct")))
        else:
            jobs.append(("good", None, c.submit(good[i % len(good)], "auto", 8, 0.95, "", api_name="/compress")))
    assert sum(kind == "bad" for kind, _, _ in jobs) == 5
    assert {kind for kind, _, _ in jobs} == {"good", "bad", "explore", "reconstruct"}

    for kind, expected, job in jobs:
        if kind == "good":
            status, *_rest, archive = job.result(timeout=120)
            assert "Compressed" in status and archive.endswith(".zip")
        elif kind == "explore":
            assert "tiny-bert-for-tests" in job.result(timeout=120)[0]
        elif kind == "reconstruct":
            assert job.result(timeout=120)[0].endswith("legal-peft-adapter.zip")
        else:
            with pytest.raises(AppError) as err:
                job.result(timeout=120)
            assert_clean_error(err.value, expected)
    leftovers = sorted(p.name for p in space.tmpdir.iterdir())
    assert leftovers == [], leftovers


def test_tokens_never_reach_the_logs(space):
    assert space.proc.poll() is None
    assert TOKEN not in space.log.read_text()


def test_what_one_visitor_downloaded_stays_theirs(space):
    """The download cache is shared; access is checked with each visitor's own token every time."""
    gated = space.hub.repo("tester/gated-lora")
    gated.granted_tokens.add(TOKEN)
    private = "tester/billing-lora\ntester/private-lora"
    try:
        status, *_ = compress(space.client(), "tester/billing-lora\ntester/gated-lora", token=TOKEN)
        assert "Compressed 2 adapters" in status.replace("**", "")
        compress(space.client(), private, token=TOKEN)
    finally:
        gated.granted_tokens.discard(TOKEN)
    for ids, expected in (("tester/billing-lora\ntester/gated-lora", "gated"), (private, "not found")):
        with pytest.raises(AppError) as err:
            compress(space.client(), ids)  # anonymous, and HF_TOKEN is set in the app's environment
        assert_clean_error(err.value, expected)


def test_inputs_the_ui_calls_optional_are_optional_in_the_api(space, tmp_path):
    api = space.client().view_api(return_format="dict", print_info=False)["named_endpoints"]
    required = {name: [p["parameter_name"] for p in ep["parameters"] if not p["parameter_has_default"]]
                for name, ep in api.items()}
    assert required == {"/compress": ["adapter_ids"], "/push": ["repo_id"], "/explore": ["repo_id"],
                        "/reconstruct": ["repo_id", "adapter"], "/try_list": ["repo_id"], "/try_run": ["repo_id", "text"]}
    client = space.client()
    status, *_rest, archive = client.predict("tester/billing-lora\ntester/multi-lora/legal", api_name="/compress")
    assert "Compressed **2 adapters**" in status and archive.endswith(".zip")
    client.predict("tester/optional-share", token_text=TOKEN, api_name="/push")  # no license: none in the card
    meta = yaml.safe_load(space.hub.snapshot("tester/optional-share")["README.md"].decode().split("---", 2)[1])
    assert "license" not in meta and meta["pipeline_tag"] == "text-classification"  # both adapters are SEQ_CLS
    assert space.hub.repo("tester/optional-share").private  # the Private box's default
    text, *_ = client.predict("tester/optional-share", token_text=TOKEN, api_name="/explore")  # no revision
    assert "license `not set`" in text
    zip_path, snippet = client.predict("tester/optional-share", adapter="legal", token_text=TOKEN, api_name="/reconstruct")
    assert zip_path.endswith("legal-peft-adapter.zip") and "AutoModelForSequenceClassification" in snippet


def test_license_is_one_of_the_hubs(space):
    client = space.client()
    compress(client, "tester/billing-lora\ntester/multi-lora/legal")
    with pytest.raises(AppError) as err:
        client.predict("tester/licensed-share", True, "Apache 2", TOKEN, api_name="/push")
    assert "Apache 2" in str(err.value)  # gradio refuses a value outside the dropdown's choices
    assert "tester/licensed-share" not in [r.repo_id for r in space.hub.records if r.repo_id]
    client.predict("tester/licensed-share", True, "cc-by-4.0", TOKEN, api_name="/push")
    assert "license: cc-by-4.0" in space.hub.snapshot("tester/licensed-share")["README.md"].decode()
