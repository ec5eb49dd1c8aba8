"""The Space's "Try it" tab: one text through several adapters of a Hub checkpoint, in one batch.

Through ``gradio_client`` against ``space/app.py`` and a local test Hub (as ``tests/test_space.py``):
a tiny BERT with SEQ_CLS adapters (each row's probabilities must equal its own ``PeftModel``'s), a
tiny GPT-2 with CAUSAL_LM adapters (each row's greedy continuation must equal its ``PeftModel``'s),
and base models refused before any weight is downloaded (too many parameters by their config.json,
pickled weights only).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch

from tests.test_space import (
    MAX_BYTES,
    NOT_FOR_VISITORS,
    ROOT,
    Space,
    assert_clean_error,
    folder_files,
    launch_space,
    put,
    table,
)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client.exceptions import AppError  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from lorashare import SHAREModel  # noqa: E402
from tests.conftest import make_adapter, tiny_bert  # noqa: E402
from tests.hubserver import HubServer  # noqa: E402

#: BERT with 4,000,000 positions of width 64: 256 M position values in a model of 0.1 M otherwise.
LONG_CONFIG = {"model_type": "bert", "architectures": ["BertForSequenceClassification"], "vocab_size": 100,
               "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 4_000_000, "num_labels": 3}
WORDS = ["the", "film", "was", "good", "bad", "refund", "my", "order", "please", "great", "slow", "fast", "not"]
TEXT = "the film was not good"


def bert_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1, eos_token_id=1,
                     pad_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def gpt2_adapter(folder: str, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                                task_type="CAUSAL_LM", lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    pm.peft_config["default"].base_model_name_or_path = "tester/tiny-gpt2"
    pm.save_pretrained(folder)
    return folder


def seed(hub: HubServer, root: Path) -> Dict[str, Dict[str, str]]:
    """Base models and SHARE checkpoints on the test Hub; returns the local adapter folders per checkpoint."""
    bert = root / "tiny-bert"
    tiny_bert(num_labels=3).save_pretrained(str(bert))
    bert_tokenizer(root / "bert-tok").save_pretrained(str(bert))
    put(hub, "tester/tiny-bert", folder_files(str(bert)))
    bert_adapters = {f"task{i}": make_adapter(str(root / f"task{i}"), seed=i, head=True, base_name="tester/tiny-bert")
                     for i in range(3)}
    share = SHAREModel.from_adapters(bert_adapters, num_components=12, progress=False)  # 3 · r 4: lossless
    share.save_pretrained(str(root / "bert-share"))
    put(hub, "tester/bert-share", folder_files(str(root / "bert-share")))

    plain = {f"p{i}": make_adapter(str(root / f"p{i}"), seed=20 + i, base_name="tester/tiny-bert") for i in range(2)}
    SHAREModel.from_adapters(plain, num_components=8, progress=False).save_pretrained(str(root / "plain-share"))
    put(hub, "tester/plain-share", folder_files(str(root / "plain-share")))  # no task_type: not runnable here

    gpt = root / "tiny-gpt2"
    tiny_gpt2().save_pretrained(str(gpt))
    word_tokenizer().save_pretrained(str(gpt))
    put(hub, "tester/tiny-gpt2", folder_files(str(gpt)))
    gpt_adapters = {f"style{i}": gpt2_adapter(str(root / f"style{i}"), 10 + i) for i in range(2)}
    share = SHAREModel.from_adapters(gpt_adapters, num_components=8, progress=False)
    share.save_pretrained(str(root / "gpt2-share"))
    put(hub, "tester/gpt2-share", folder_files(str(root / "gpt2-share")))

    # A 7B-sized config with weights that must never be downloaded, and a base with pickled weights only.
    big = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "vocab_size": 32000, "tie_word_embeddings": False}
    put(hub, "tester/big-base", {"config.json": json.dumps(big).encode(), "model.safetensors": bytes(2 * MAX_BYTES)})
    pickled = {"config.json": (bert / "config.json").read_bytes(), "pytorch_model.bin": b"not really a pickle"}
    put(hub, "tester/pickle-base", pickled)
    # The hostile case: a small BERT whose config.json asks for 4,000,000 positions, with the position table left
    # out of model.safetensors. By the old estimate (from the config) it is tiny; built, the table alone is 1 GB.
    long_base = root / "long-base"
    long_base.mkdir()
    (long_base / "config.json").write_text(json.dumps(LONG_CONFIG))
    short = BertForSequenceClassification(BertConfig(**{**LONG_CONFIG, "max_position_embeddings": 64}))
    weights = {k: v.contiguous() for k, v in short.state_dict().items() if "position_embeddings" not in k}
    save_file(weights, str(long_base / "model.safetensors"))
    put(hub, "tester/long-base", {**folder_files(str(bert), ""), **folder_files(str(long_base))})
    for base in ("big-base", "pickle-base", "long-base"):
        made = {f"a{i}": make_adapter(str(root / base / f"a{i}"), seed=i, head=True, base_name=f"tester/{base}")
                for i in range(2)}
        SHAREModel.from_adapters(made, num_components=8, progress=False).save_pretrained(str(root / f"{base}-share"))
        put(hub, f"tester/{base}-share", folder_files(str(root / f"{base}-share")))
    return {"bert": bert_adapters, "gpt2": gpt_adapters, "bert_folder": {"": str(bert)}, "gpt2_folder": {"": str(gpt)}}


@pytest.fixture(scope="module")
def space(tmp_path_factory) -> Iterator[Space]:
    root = tmp_path_factory.mktemp("space_try")
    hub = HubServer().start()
    try:
        made = seed(hub, root / "seed")
        with launch_space(root, seed=False, hub=hub) as s:
            s.adapters = made  # type: ignore[assignment]
            yield s
    finally:
        hub.stop()


def run(space: Space, repo: str, adapters: List[str], text: str = TEXT, include_base: bool = True):
    return space.client().predict(repo, "", adapters, text, include_base, "", api_name="/try_run")


def test_list_adapters_and_the_base_models_size(space):
    info, pick = space.client().predict("tester/bert-share", "", "", api_name="/try_list")
    assert "3 adapters" in info and "tester/tiny-bert" in info
    assert re.search(r"about [1-9]\d{0,2}(,\d{3})* parameters", info), info  # a small model: counted, not "0.0 M"
    assert sorted(pick["value"] if isinstance(pick, dict) else pick) == ["task0", "task1", "task2"]


def test_classification_rows_match_each_adapters_peft_model(space):
    from peft import PeftModel
    from transformers import AutoTokenizer

    names = ["task2", "task0", "task1"]
    summary, out = run(space, "tester/bert-share", names)
    rows = table(out)
    assert [r["adapter"] for r in rows] == names + ["base model"]
    assert "one batch" in summary.replace("**", "")
    tok = AutoTokenizer.from_pretrained(space.adapters["bert_folder"][""])
    enc = tok([TEXT], return_tensors="pt")
    with torch.no_grad():
        for row in rows:
            folder = space.adapters["bert"].get(row["adapter"])
            model = PeftModel.from_pretrained(tiny_bert(num_labels=3), folder) if folder else tiny_bert(num_labels=3)
            want = model.eval()(**enc).logits.softmax(-1)[0]
            got = [float(part.split(": ")[1]) for part in row["detail"].split(", ")]
            assert max(abs(g - float(w)) for g, w in zip(got, want)) < 1.5e-3, (row, want)
            assert row["output"] == f"LABEL_{int(want.argmax())}"
    # The rows differ: each adapter's own head and update.
    assert len({r["detail"] for r in rows}) == len(rows)


def test_generation_rows_match_each_adapters_peft_model(space):
    from peft import PeftModel
    from transformers import AutoTokenizer

    summary, out = run(space, "tester/gpt2-share", ["style0", "style1"])
    rows = table(out)
    assert [r["adapter"] for r in rows] == ["style0", "style1", "base model"]
    tok = AutoTokenizer.from_pretrained(space.adapters["gpt2_folder"][""])
    enc = tok([TEXT], return_tensors="pt")
    enc.pop("token_type_ids", None)
    for row in rows:
        folder = space.adapters["gpt2"].get(row["adapter"])
        model = PeftModel.from_pretrained(tiny_gpt2(), folder) if folder else tiny_gpt2()
        ids = model.eval().generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=1)
        assert row["output"] == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert len({r["output"] for r in rows}) > 1


def test_big_or_pickled_base_models_are_refused_before_any_weight_download(space):
    space.hub.reset_log()
    with pytest.raises(AppError) as err:
        run(space, "tester/big-base-share", ["a0", "a1"])
    assert_clean_error(err.value, "about 6,738 M parameters", "runs base models of up to 200 M", "own machine")
    assert space.hub.served_files("tester/big-base") <= {"config.json"}
    with pytest.raises(AppError) as err:
        space.client().predict("tester/big-base-share", "", "", api_name="/try_list")
    assert_clean_error(err.value, "6,738 M parameters")
    with pytest.raises(AppError) as err:
        run(space, "tester/pickle-base-share", ["a0"])
    assert_clean_error(err.value, "never pickled ones")
    assert "pytorch_model.bin" not in space.hub.served_files("tester/pickle-base")


@pytest.mark.parametrize("adapters, text, expected", [
    (["nope"], TEXT, "has no adapter 'nope'"),
    ([], TEXT, "Pick at least one adapter"),
    (["task0"], "   ", "Type a text"),
    ([f"task{i % 3}x{i}" for i in range(9)], TEXT, "at most 8"),
])
def test_bad_requests_are_readable(space, adapters, text, expected):
    with pytest.raises(AppError) as err:
        run(space, "tester/bert-share", adapters, text)
    assert_clean_error(err.value, expected)


def test_adapters_without_a_task_type_are_refused(space):
    with pytest.raises(AppError) as err:
        run(space, "tester/plain-share", ["p0", "p1"])
    assert_clean_error(err.value, "task types are none", "SEQ_CLS or CAUSAL_LM")


def test_no_temp_files_left(space):
    assert not any(os.scandir(space.tmpdir))


def test_fetch_files_takes_exact_root_file_names_only(hub, hf_cache, monkeypatch):
    """``lorashare.hub.fetch_files``, which the tab uses: exactly the named files, nothing else, no patterns."""
    from lorashare import hub as lorashare_hub
    from lorashare.errors import HubError

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    put(hub, "tester/model", {"config.json": b"{}", "model.safetensors": b"x" * 64, "sub/config.json": b"{}"})
    folder = lorashare_hub.fetch_files("tester/model", ["config.json"])
    assert sorted(os.listdir(folder)) == ["config.json"] and hub.served_files("tester/model") == {"config.json"}
    for bad in ("sub/config.json", "*.json", "../config.json", "", "model.*"):
        with pytest.raises(HubError, match="not a file name at the repo's root"):
            lorashare_hub.fetch_files("tester/model", [bad])


def _peak_rss(pid: int) -> int:
    """The peak resident memory of process ``pid`` so far (``VmHWM``), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the Space's peak memory from /proc")
def test_a_config_implying_huge_tensors_is_refused_before_any_is_allocated(space):
    """The position table config.json implies (4,000,000 × 64) is counted before the model is built."""
    # The honest small model still runs (and this loads everything the check itself needs).
    _, out = run(space, "tester/bert-share", ["task0"], include_base=False)
    assert [r["adapter"] for r in table(out)] == ["task0"]
    before = _peak_rss(space.proc.pid)
    space.hub.reset_log()
    with pytest.raises(AppError) as err:
        run(space, "tester/long-base-share", ["a0", "a1"])
    grown = _peak_rss(space.proc.pid) - before
    message = assert_clean_error(err.value, "embeddings.position_embeddings.weight 4000000 × 64",
                                 "this Space's limit of 200.0 M", "own machine")
    # 256 M in the position table, 8 M in the position and token-type id buffers of the same length
    assert re.search(r"config\.json implies 26\d\.\d M parameters", message), message
    assert grown < 300e6, f"the Space grew by {grown / 1e6:.0f} MB while refusing"
    assert space.hub.served_files("tester/long-base") <= {"config.json"}  # refused before the weights came
    with pytest.raises(AppError) as err:
        space.client().predict("tester/long-base-share", "", "", api_name="/try_list")
    assert_clean_error(err.value, "config.json implies", "4000000 × 64")
    assert _peak_rss(space.proc.pid) - before < 300e6


def test_the_weights_file_and_the_config_are_each_bounded(tmp_path):
    """Both counts, in a process of their own with a small limit: the file's tensors by its header, and the
    tensors the config implies (a big classifier head here), each named in the refusal."""
    folder = tmp_path / "base"
    folder.mkdir()
    tiny_bert(num_labels=3).save_pretrained(str(folder))
    code = (
        "import sys, json; sys.path.insert(0, 'space'); import app\n"
        f"folder = {str(folder)!r}\n"
        "count, nbytes = app.weights_params(folder + '/model.safetensors', 'tester/b')\n"
        "total, largest = app.implied_params(folder, 'SEQ_CLS', 100_000)\n"
        "out = {'count': count, 'nbytes': nbytes, 'total': total, 'largest': largest}\n"
        "for check in (lambda: app._check_weights('tester/b', folder),\n"
        "              lambda: app._check_built_size('tester/b', folder, 'SEQ_CLS', 100_000),\n"
        "              lambda: app._check_built_size('tester/b', folder, 'SEQ_CLS', 10**9)):\n"
        "    try:\n"
        "        check()\n"
        "    except app.UserError as exc:\n"
        "        out.setdefault('refused', []).append(str(exc))\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, "LORASHARE_SPACE_TRY_MAX_PARAMS": "10000", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    model = tiny_bert(num_labels=3)
    assert got["count"] == sum(p.numel() for p in model.state_dict().values())  # every tensor in the file
    assert got["nbytes"] == 4 * got["count"]  # float32, from the header alone
    assert got["total"] > 100_000 * 33 and got["largest"] == "classifier.weight 100000 × 32"
    weights, built, labels = got["refused"]
    assert f"model.safetensors holds {got['count']:,} parameters" in weights, weights
    assert "config.json implies 3.3 M parameters" in built and "classifier.weight 100000 × 32" in built, built
    assert all("this Space's limit of 10,000 parameters" in m and "own machine" in m for m in (weights, built))
    assert not [m for m in (weights, built, labels) for advice in NOT_FOR_VISITORS if advice in m]
    # so many labels that even reading the config would be slow (a name each): refused before that
    assert "1,000,000,000 labels" in labels and "at most 100,000" in labels, labels
