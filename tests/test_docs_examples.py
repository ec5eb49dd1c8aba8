"""The examples of the README and the documentation, run as they are written.

A fenced block that follows a line ``<!-- run: NAME -->`` is taken from the page and run: Python
blocks with ``exec`` (a block that continues another, as the README's serving snippet continues
its quickstart, runs in the namespace the first one left), ``bash`` blocks command by command, each ``lorashare ...`` in this process through ``lorashare.cli.main`` (exit
code 0 required). A block that follows ``<!-- output: NAME -->`` is what ``NAME`` prints, compared
line by line, numbers to 3 significant digits. Every ``python``, ``bash`` and ``yaml`` block of
the pages in ``PAGES`` carries either marker or ``<!-- not run: why -->``, so a new example that
nobody runs fails :func:`test_every_example_is_marked`. Editing a page changes what runs.

Everything runs in a scratch folder holding a copy of ``examples/`` (the bundled adapters and
``make_adapters.py``), against the local Hub-compatible server of ``tests/hubserver.py``.
:data:`PLACEHOLDERS` says what stands in for each name the pages use without defining it.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch

from examples.make_adapters import tiny_bert
from lorashare import SHAREModel
from lorashare.cli import main as lorashare_main
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
ADAPTERS = ROOT / "examples" / "adapters"

#: The pages whose examples are checked. Not here: docs/cli.md (generated from the parser and
#: checked by tests/test_docs.py), docs/changelog.md and docs/contributing.md (they include
#: CHANGELOG.md and CONTRIBUTING.md), and the pages of the Action and the Space, docs/action.md
#: and docs/space.md, which are checked with them (tests/test_manifest_example.py, tests/test_space*.py).
PAGES = ["README.md", "CONTRIBUTING.md"] + [
    f"docs/{p}" for p in ("index.md", "getting-started.md", "hub.md", "serving.md", "training.md", "vllm.md", "how-it-works.md",
                          "format.md", "api.md", "modules.md", "reliability.md", "benchmarks.md")]

#: What stands in for the placeholders of the pages. Folders are copies of the bundled adapters in
#: the scratch folder; Hub ids are repos of the local test Hub, published by :func:`publish`.
PLACEHOLDERS: Dict[str, str] = {
    "runs/billing": "examples/adapters/task0 (SEQ_CLS, with a classifier head)",
    "runs/a": "examples/adapters/task0",
    "runs/b": "examples/adapters/task1 (no head)",
    "acme/refunds-lora@v3": "task1 in a Hub repo, tag v3",
    "acme/multi-lora/legal": "task2 in the subfolder legal/ of a Hub repo (tag v3 too)",
    "acme/c-lora@v2": "task2 in a Hub repo, tag v2",
    "acme/support-share": "created by the pages' own pushes; for docs/serving.md, pushed by the test",
    "base_model": "tiny_bert() (or a tiny Llama), built afresh for each block, as the pages ask",
    "batch": "a tokenized batch of 3 rows (input_ids, attention_mask)",
    "batches": "a few tokenized batches of unlabelled inputs",
    "train_dataset": "a torch Dataset of 32 rows (input_ids, attention_mask, labels)",
    "hf_...": "the local Hub's test token",
}
LOCAL = {"runs/billing": "task0", "runs/a": "task0", "runs/b": "task1"}
HUB_ADAPTERS = [  # (repo, bundled adapter, subfolder, tag)
    ("acme/refunds-lora", "task1", "", "v3"),
    ("acme/multi-lora", "task2", "legal", "v3"),
    ("acme/c-lora", "task2", "", "v2"),
]
TOKENS = {"hf_...": HUB_TOKEN}
#: Steps of a command line that install software: skipped, the tests run in the installed venv.
INSTALL = [("python3", "-m", "venv"), ("pip", "install")]


# --------------------------------------------------------------------------- reading the pages
class Block(NamedTuple):
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    marker: Optional[Tuple[str, str]]  # ("run" | "output" | "not run", name or reason)
    code: str


_MARKER = re.compile(r"^<!-- (run|output|not run): (.+?) -->$")
_FENCE = re.compile(r"^(`{3,})([\w-]*)\s*$")


def blocks(page: str) -> List[Block]:
    """The fenced blocks of ``page`` (top level, not indented), each with the marker line before it."""
    lines = (ROOT / page).read_text(encoding="utf-8").splitlines()
    out, marker, i = [], None, 0
    while i < len(lines):
        m = _MARKER.match(lines[i])
        f = _FENCE.match(lines[i])
        if m:
            marker = (m.group(1), m.group(2))
        elif f:
            fence, start = f.group(1), i
            i += 1
            body = []
            while i < len(lines) and lines[i].rstrip() != fence:
                body.append(lines[i])
                i += 1
            out.append(Block(page, start + 1, f.group(2), marker, "\n".join(body) + "\n"))
            marker = None
        elif lines[i].strip():
            marker = None  # a marker belongs to the block right after it (blank lines allowed)
        i += 1
    return out


def all_blocks() -> List[Block]:
    return [b for page in PAGES for b in blocks(page)]


def block(kind: str, name: str) -> Block:
    found = [b for b in all_blocks() if b.marker == (kind, name)]
    assert len(found) == 1, f"expected one block marked <!-- {kind}: {name} -->, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------- running them
def run_python(b: Block, ns: Dict[str, Any], *, drop: Sequence[str] = ()) -> str:
    """Exec ``b`` in ``ns``; lines containing one of ``drop`` are left out (each must be there). Returns stdout."""
    code = b.code
    for d in drop:
        kept = [line for line in code.splitlines() if d not in line]
        assert len(kept) < len(code.splitlines()), f"{b.page}:{b.line}: no line with {d!r} to leave out"
        code = "\n".join(kept) + "\n"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and transformers' own warnings
        exec(compile(code, f"{b.page}:{b.line}", "exec"), ns)  # noqa: S102 - the documentation's own examples
    return out.getvalue()


class Ran(NamedTuple):
    argv: List[str]
    stdout: str
    stderr: str


def _commands(code: str) -> Iterable[List[str]]:
    """Each simple command of a bash block: lines joined at a trailing backslash, split at ``&&``."""
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        cmd: List[str] = []
        for w in words:
            if w == "&&":
                yield cmd
                cmd = []
            else:
                cmd.append(w)
        if cmd:
            yield cmd


_ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def _substitute(word: str) -> str:
    """``word`` with a placeholder token (also as ``NAME=hf_...``) replaced by the local Hub's."""
    if _ASSIGN.match(word):
        name, value = word.split("=", 1)
        return f"{name}={TOKENS.get(value, value)}"
    return TOKENS.get(word, word)


def run_bash(b: Block, monkeypatch: pytest.MonkeyPatch) -> List[Ran]:
    """Run the ``lorashare`` commands of a bash block in this process, in order; any other command fails.

    As bash would: words with ``*``, ``?`` or ``[`` are expanded (sorted), ``NAME=value`` before a
    command sets it for that command, ``export NAME=value`` for the rest of the block.
    """
    assert b.lang == "bash", f"{b.page}:{b.line}: a {b.lang} block"
    ran = []
    for cmd in _commands(b.code):
        cmd = [x for w in cmd for x in (sorted(glob.glob(w)) or [w] if re.search(r"[*?[]", w) else [_substitute(w)])]
        if cmd[0] == "export":
            for assign in cmd[1:]:
                name, value = assign.split("=", 1)
                monkeypatch.setenv(name, value)
            continue
        env = {}
        while cmd and _ASSIGN.match(cmd[0]):
            name, value = cmd.pop(0).split("=", 1)
            env[name] = value
        program = os.path.basename(cmd[0])
        if any(tuple(os.path.basename(w) for w in cmd[: len(step)]) == step for step in INSTALL):
            continue
        assert program == "lorashare", f"{b.page}:{b.line}: cannot run {' '.join(cmd)!r} here"
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as m, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            for name, value in env.items():
                m.setenv(name, value)
            rc = lorashare_main(cmd[1:])
        assert rc == 0, f"{b.page}:{b.line}: {' '.join(cmd)} exited {rc}:\n{err.getvalue()}{out.getvalue()}"
        ran.append(Ran(cmd, out.getvalue(), err.getvalue()))
    return ran


_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def _normal(line: str) -> str:
    return " ".join(_NUMBER.sub(lambda m: f"{float(m.group(0)):.3g}", line).split())


def assert_prints(expected: Block, stdout: str) -> None:
    """Every line of ``expected`` is in ``stdout``, in order (numbers to 3 significant digits)."""
    got = [_normal(x) for x in stdout.splitlines() if x.strip()]
    at = 0
    for want in (_normal(x) for x in expected.code.splitlines() if x.strip()):
        assert want in got[at:], f"{expected.page}:{expected.line}: {want!r} is not printed; got:\n{stdout}"
        at = got.index(want, at) + 1


def quoted(page: str, text: str) -> bool:
    """Whether ``text`` is on ``page``, whatever the line breaks."""
    return " ".join(text.split()) in " ".join((ROOT / page).read_text(encoding="utf-8").split())


# --------------------------------------------------------------------------- the scratch folder
@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder like the checkout's root for the examples: ``examples/`` and the ``runs/`` folders."""
    work = tmp_path / "work"
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    for path, name in LOCAL.items():
        shutil.copytree(ADAPTERS / name, work / path)
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def local_hub(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The local test Hub as lorashare's endpoint, holding the adapter repos of :data:`HUB_ADAPTERS`."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for repo, name, sub, tag in HUB_ADAPTERS:
        publish(hub, repo, ADAPTERS / name, sub=sub)
        if tag not in hub.repo(repo).tags:
            hub.create_tag(repo, tag)
    return hub


def publish(hub: HubServer, repo: str, folder: Path, *, sub: str = "") -> str:
    """Commit the files of ``folder`` (into ``sub/``) to ``repo``, creating it; returns the commit sha."""
    try:
        hub.repo(repo)
    except Exception:  # noqa: BLE001 - HubServer's HubApiError: not there yet
        hub.create_repo(repo)
    files = {(f"{sub}/" if sub else "") + p.relative_to(folder).as_posix(): p.read_bytes()
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return hub.commit(repo, files, lfs=[f for f in files if f.endswith(".safetensors")])


def bert_batch() -> Dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (3, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def namespace(**extra: Any) -> Dict[str, Any]:
    return {"__name__": "__docs_example__", **extra}


# --------------------------------------------------------------------------- the markers
def test_every_example_is_marked():
    names: Dict[str, Block] = {}
    for b in all_blocks():
        if b.lang in ("python", "bash", "yaml"):
            assert b.marker and b.marker[0] in ("run", "not run"), (
                f"{b.page}:{b.line}: a {b.lang} block without <!-- run: NAME --> or <!-- not run: why --> before it")
        if b.marker and b.marker[0] == "run":
            assert b.marker[1] not in names, f"{b.page}:{b.line}: <!-- run: {b.marker[1]} --> is used twice"
            names[b.marker[1]] = b
        if b.marker and b.marker[0] == "output":
            assert ("run", b.marker[1]) in [x.marker for x in all_blocks()], f"{b.page}:{b.line}: output of nothing"
    assert set(names) == RUN, f"marked but not run: {sorted(set(names) - RUN)}; run but not on a page: {sorted(RUN - set(names))}"


def test_the_placeholders_are_the_pages_own():
    text = "\n".join((ROOT / p).read_text(encoding="utf-8") for p in PAGES)
    assert set(LOCAL) <= set(PLACEHOLDERS) and set(TOKENS) <= set(PLACEHOLDERS)
    assert all(any(key.startswith(repo) for key in PLACEHOLDERS) for repo, *_ in HUB_ADAPTERS)
    unused = [key for key in PLACEHOLDERS if key not in text]
    assert not unused, f"PLACEHOLDERS names {unused}, which no page uses any more"


RUN = {"bundled-example", "walkthrough-cli", "walkthrough-python", "readme-library", "readme-cli", "readme-serving",
       "hub-adapters", "hub-push", "hub-cli", "serving", "api-import", "vllm-export", "training", "refit"}


def test_the_readme_opens_with_the_bundled_example():
    first = next(b for b in blocks("README.md") if b.lang == "bash")
    command = [line for line in first.code.splitlines() if line.strip() and not line.startswith("#")][0]
    assert command in block("run", "bundled-example").code.splitlines()


# --------------------------------------------------------------------------- getting started
def test_bundled_example(scratch, monkeypatch):
    ran = run_bash(block("run", "bundled-example"), monkeypatch)
    assert [r.argv[1] for r in ran] == ["compress", "info"]
    assert_prints(block("output", "bundled-example"), "".join(r.stdout for r in ran))


def test_getting_started_walkthrough(scratch, monkeypatch):
    ran = run_bash(block("run", "walkthrough-cli"), monkeypatch)
    assert [r.argv[1] for r in ran] == ["compress", "info", "reconstruct", "add", "remove", "info"]
    assert list(json.loads(ran[1].stdout)["adapters"]) == ["task0", "task1", "task2"]
    assert (scratch / "task0_adapter" / "adapter_config.json").is_file()
    assert quoted("docs/getting-started.md", ran[3].stdout.strip()), f"the page does not show what add printed: {ran[3].stdout}"
    assert "3: task0, task2, task3" in ran[5].stdout

    ns = namespace()
    out = run_python(block("run", "walkthrough-python"), ns)
    assert "torch.Size([3, 3])" in out and ns["report"]["method"] in ("projection", "recompute")
    assert ns["share"].adapter_names == ["billing", "legal", "task3"]
    assert max(ns["errors"]["per_layer"].values()) < 0.5
    assert (scratch / "billing_adapter" / "adapter_model.safetensors").is_file()
    assert SHAREModel.from_pretrained("share_ckpt").adapter_names == ["billing", "refunds", "legal"]


# --------------------------------------------------------------------------- the README
def test_readme_quickstart(scratch, local_hub, monkeypatch):
    ns = namespace(base_model=tiny_bert(), batch=bert_batch())
    run_python(block("run", "readme-library"), ns)
    assert type(ns["peft_model"]).__name__.startswith("PeftModel")
    assert ns["share"].adapter_names == ["billing", "refunds"]
    assert (scratch / "billing_adapter" / "adapter_config.json").is_file()

    ran = run_bash(block("run", "readme-cli"), monkeypatch)
    assert [r.argv[1] for r in ran] == ["compress", "info", "reconstruct", "push"]
    assert "3: a, b, c-lora" in ran[1].stdout and (scratch / "a_adapter" / "adapter_config.json").is_file()
    assert local_hub.repo("acme/support-share").private and len(local_hub.history("acme/support-share")) == 2

    # The serving snippet continues the quickstart (its `share`) on a freshly loaded base model, as
    # the README says; the tiny BERT classifier cannot generate, so `generate` runs in test_serving_page.
    ns["base_model"] = tiny_bert()
    run_python(block("run", "readme-serving"), ns, drop=["model.generate("])
    assert tuple(ns["out"].logits.shape) == (3, 3)


# --------------------------------------------------------------------------- Hugging Face Hub
def test_hub_page(scratch, local_hub, monkeypatch):
    ns = namespace(base_model=tiny_bert())
    run_python(block("run", "hub-adapters"), ns)
    share = ns["share"]
    assert share.config.adapters["refunds"]["revision"] == local_hub.resolve("acme/refunds-lora", "v3")
    for repo, *_ in HUB_ADAPTERS[:2]:
        assert {Path(f).name for f in local_hub.served_files(repo)} == {"adapter_config.json", "adapter_model.safetensors"}
    share.save_pretrained("share_ckpt")  # the folder the page's command line pushes

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)  # "a push needs a token"
    local_hub.reset_log()
    out = run_python(block("run", "hub-push"), ns)
    head = local_hub.resolve("acme/support-share")
    assert head in out and local_hub.repo("acme/support-share").private
    assert len(local_hub.history("acme/support-share")) == 2, "one commit after the repo's initial one"
    assert local_hub.served_files("acme/support-share") == {
        "share_config.json", "README.md", "shared_components.safetensors",
        "adapters/refunds/loadings.safetensors", "adapters/refunds/adapter_meta.json"}
    assert ns["share"].adapter_names == ["refunds"] and type(ns["model"]).__name__ == "PeftModel"

    monkeypatch.delenv("HF_TOKEN")
    ran = run_bash(block("run", "hub-cli"), monkeypatch)
    assert [r.argv[1] for r in ran] == ["push", "info", "reconstruct"]
    assert sorted(json.loads(ran[1].stdout)["adapters"]) == ["billing", "legal", "refunds"]
    assert (scratch / "refunds_adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- serving
def tiny_llama():
    """A 2-layer Llama built from a config (no download), for ``generate``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.name_or_path = model.config._name_or_path = "tiny-llama-for-tests"
    return model


def llama_adapters(root: Path) -> Dict[str, str]:
    from peft import LoraConfig, get_peft_model

    out = {}
    for seed, name in enumerate(["billing", "refunds"], start=1):
        torch.manual_seed(seed)
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for key, p in pm.named_parameters():
                if "lora_B" in key:
                    p.normal_(0, 0.1)
        pm.save_pretrained(str(root / name), save_embedding_layers=False)  # no lookup of the base model on the Hub
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_llama"])
def test_serving_page(model, scratch, local_hub, monkeypatch):
    if model == "tiny_bert":
        sources, make, drop = {"billing": str(ADAPTERS / "task0"), "refunds": str(ADAPTERS / "task1")}, tiny_bert, ["model.generate("]
        batch = bert_batch()
    else:
        sources, make, drop = llama_adapters(scratch / "llama"), tiny_llama, []
        ids = torch.randint(3, 96, (3, 6), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SHAREModel.from_adapters(sources, num_components=8, progress=False).push_to_hub("acme/support-share", token=HUB_TOKEN)
    ns = namespace(base_model=make(), batch=batch)
    run_python(block("run", "serving"), ns, drop=drop)
    served, out = ns["model"], ns["out"]
    assert served.adapter_names == ["billing", "refunds"] and served.active_adapter == "billing"
    with torch.no_grad():
        want = [SHAREModel.from_pretrained("acme/support-share").apply(make(), n)(**batch).logits[i]
                for i, n in enumerate(["billing", "refunds"])] + [make()(**batch).logits[2]]
    for i, w in enumerate(want):  # each row with its own adapter (serving's exactness is tests/test_serve.py's)
        torch.testing.assert_close(out.logits[i], w, rtol=1e-4, atol=1e-5)
    if model == "tiny_llama":
        assert ns["ids"].shape == (3, 6 + 32)


# --------------------------------------------------------------------------- the API page
def test_vllm_page_export(scratch, monkeypatch):
    ran = run_bash(block("run", "vllm-export"), monkeypatch)
    assert [r.argv[1] for r in ran] == ["compress", "export", "export"]
    assert_prints(block("output", "vllm-export"), ran[1].stdout)
    assert json.loads(ran[2].stdout.strip().splitlines()[-1])["ranks"] == {"task3": 4}
    for name in ("task1", "task3"):
        assert (scratch / "exported" / name / "adapter_model.safetensors").is_file()
    assert sorted(os.listdir(scratch / "exported-bf16")) == ["task3"]
    # The refusal the page quotes is what the command says.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert lorashare_main(["export", "share_ckpt", "-o", "small", "--max-rank", "2"]) == 2
    said = err.getvalue().split("error: ", 1)[1].strip()
    assert quoted("docs/vllm.md", said), said
    assert not (scratch / "small").exists()


def test_api_page_import():
    ns = namespace()
    run_python(block("run", "api-import"), ns)
    assert {"SHAREModel", "SHAREConfig", "LoraShareError"} <= set(ns)


# --------------------------------------------------------------------------- learning in the subspace
class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randint(0, 100, (n, 10), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": self.y[i]}


def test_training_page(scratch, local_hub):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SHAREModel.from_adapters({"billing": str(ADAPTERS / "task0"), "refunds": str(ADAPTERS / "task1")},
                                 num_components=4, progress=False).push_to_hub("acme/support-share", token=HUB_TOKEN)
    ns = namespace(base_model=tiny_bert(), train_dataset=_Rows())
    out = run_python(block("run", "training"), ns)
    assert "trainable params" in out
    assert ns["report"]["method"] == "trained" and (scratch / "runs" / "refunds_v2").is_dir()
    loaded = SHAREModel.from_pretrained("share_ckpt")
    assert loaded.adapter_names == ["billing", "refunds", "refunds_v2"]
    with torch.no_grad():
        want, got = ns["model"].eval()(**bert_batch()).logits, loaded.apply(tiny_bert(), "refunds_v2")(**bert_batch()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    share = SHAREModel.from_adapters({"billing": str(ADAPTERS / "task0"), "refunds": str(ADAPTERS / "task1")},
                                     num_components=1, progress=False)
    ns = namespace(share=share, base_model=tiny_bert(), batches=[bert_batch(), bert_batch()])
    out = run_python(block("run", "refit"), ns)
    assert "agreement" in out and ns["report"]["adapter_name"] == "billing"
