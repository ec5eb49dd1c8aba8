"""The model card (README.md) of a SHARE checkpoint: metadata, table, ratios, usage, citation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Dict

import pytest
from huggingface_hub import HfApi, ModelCard

from lorashare import SHAREModel, __version__
from lorashare.errors import ConfigError
from lorashare.hub.card import (
    HUB_LICENSES,
    INSTALL,
    TASK_MODEL_CLASSES,
    card_metadata,
    check_license,
    load_template,
    model_class,
    pipeline_tag,
    render_card,
)
from tests.hub_fixtures import HUB_TOKEN
from tests.hubserver import HubServer

TAGS = ["lora", "peft", "transformers", "share", "lorashare", "base_model:adapter:tiny-bert-for-tests"]  # PEFT's own three too
REPO = "tester/share-card"


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


def _put_adapter(hub: HubServer, repo_id: str, folder: str, sub: str = "") -> str:
    try:
        hub.repo(repo_id)
    except Exception:  # noqa: BLE001 - HubServer's HubApiError: not there yet
        hub.create_repo(repo_id)
    files = {f"{sub + '/' if sub else ''}{p.name}": p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}
    return hub.commit(repo_id, files)


def _load(text: str, tmp_path: Path) -> ModelCard:
    path = tmp_path / "card" / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return ModelCard.load(path)


def _rows(text: str) -> Dict[str, list]:
    """The adapter table as ``{adapter: [cells]}``."""
    table = text.split("## Adapters", 1)[1].strip().split("\n\n", 1)[0]
    rows = [r.strip().strip("|").split(" | ") for r in table.strip().splitlines()[2:]]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}


def test_metadata_round_trips_through_model_card(adapter_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    share = SHAREModel.from_adapters(adapter_dirs, num_components=8, progress=False)
    share.save_pretrained(tmp_path / "ck")
    readme = (tmp_path / "ck" / "README.md").read_text(encoding="utf-8")
    assert readme == render_card(share.config)  # save_pretrained writes the rendered card

    data = ModelCard.load(tmp_path / "ck" / "README.md").data.to_dict()
    assert data["library_name"] == "lorashare"
    assert data["base_model"] == "tiny-bert-for-tests"
    assert data["base_model_relation"] == "adapter"
    assert data["tags"] == TAGS
    assert "license" not in data
    assert "pipeline_tag" not in data  # SEQ_CLS adapters and adapters without a task type: no single pipeline
    assert data == card_metadata(share.config)

    with_license = _load(render_card(share.config, license="mit"), tmp_path).data
    assert with_license.license == "mit" and with_license.library_name == "lorashare"

    # The card is fingerprinted like every other file of the checkpoint.
    cfg = json.loads((tmp_path / "ck" / "share_config.json").read_text())
    assert cfg["files"]["README.md"] == hashlib.sha256(readme.encode("utf-8")).hexdigest()


def test_card_body(adapter_dirs, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    share = SHAREModel.from_adapters(adapter_dirs, num_components=8, progress=False)
    text = render_card(share.config)
    st = share.config.compression_stats
    assert "$" not in text.replace("$$", "")  # every placeholder filled
    assert text.startswith("---\n") and "# SHARE checkpoint" in text
    assert f"**{len(adapter_dirs)} LoRA adapters** of [`tiny-bert-for-tests`](https://huggingface.co/tiny-bert-for-tests)" in text

    rows = _rows(text)
    assert list(rows) == share.adapter_names
    for name in share.adapter_names:
        source, revision, rank, err = rows[name]
        assert source == name  # a local source: its folder name only, never the full path
        assert revision == "–" and rank == "4"
        errs = list(share.delta_w_errors[name].values())
        assert err == f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}"
    assert str(Path(adapter_dirs[0]).parent) not in text
    assert "ΔW error (mean / max)" in text and "‖ΔW − ΔŴ‖/‖ΔW‖" in text

    # Both ratios, each with what it means.
    assert f"**compression ratio** (bases counted) | **{st['compression_ratio']:.2f}×**" in text
    assert f"marginal ratio (bases not counted) | {st['compression_ratio_excluding_basis']:.2f}×" in text
    assert "The compression ratio counts the shared bases" in text
    assert "it is not the compression ratio" in text

    # Usage, citation, version.
    assert "from lorashare import SHAREModel" in text
    assert f'SHAREModel.from_pretrained("path/to/share_checkpoint", adapters=["{share.adapter_names[0]}"])' in text
    # The first adapter is a SEQ_CLS one with a 3-label head: its class, and the head's size.
    assert "from transformers import AutoModelForSequenceClassification" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("tiny-bert-for-tests", num_labels=3)' in text
    assert INSTALL in text and "pip install lorashare\n" not in text and "not on PyPI yet" in text
    assert "@article{kaushik2026share" in text and "arXiv:2602.06043" in text
    assert f"Written by lorashare {__version__}." in text


def test_card_for_hub_sources_and_license_via_push(env, adapter_dirs, tmp_path):
    v1 = _put_adapter(env, "tester/a", adapter_dirs[0])
    env.create_tag("tester/a", "v1")
    multi = _put_adapter(env, "tester/multi", adapter_dirs[1], sub="legal")
    share = SHAREModel.from_adapters({"billing": "tester/a@v1", "legal": "tester/multi/legal", "local": adapter_dirs[2]},
                                     num_components=8, progress=False)
    share.push_to_hub(REPO, license="apache-2.0", token=HUB_TOKEN)  # a push needs a token (issue 11)
    pushed = env.snapshot(REPO)["README.md"].decode("utf-8")

    data = _load(pushed, tmp_path).data
    assert data.license == "apache-2.0" and data.library_name == "lorashare" and data.tags == TAGS
    assert data.base_model == "tiny-bert-for-tests" and data.to_dict()["base_model_relation"] == "adapter"
    # The Hub's own reading of the card (repo info cardData) agrees.
    card_data = HfApi(endpoint=env.url).model_info(REPO).card_data
    assert card_data is not None and card_data.license == "apache-2.0" and card_data.library_name == "lorashare"

    rows = _rows(pushed)
    assert rows["billing"][0] == f"[tester/a@v1]({env.url}/tester/a/tree/{v1})"
    assert rows["legal"][0] == f"[tester/multi/legal]({env.url}/tester/multi/tree/{multi}/legal)"
    assert rows["local"][0] == Path(adapter_dirs[2]).name
    assert rows["billing"][1] == v1[:10] and rows["legal"][1] == multi[:10] and rows["local"][1] == "–"
    assert all(r[2] == "4" for r in rows.values())
    assert all(re.fullmatch(r"\d\.\d{4} / \d\.\d{4}", r[3]) for r in rows.values())

    assert "# SHARE checkpoint: share-card" in pushed
    assert f'SHAREModel.from_pretrained("{REPO}", adapters=["billing"])' in pushed
    # After the push, save_pretrained writes the same card, and so does a reload from the Hub.
    share.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck" / "README.md").read_text(encoding="utf-8") == pushed
    assert render_card(SHAREModel.from_pretrained(REPO).config) == pushed


def test_card_never_links_local_paths(adapter_dirs, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    # A relative local path that looks like owner/name is still a local source (no revision).
    share.config.adapters["task0"]["source"] = "runs/task0"
    share.config.base_model_name_or_path = str(tmp_path)  # a local base model: not Hub metadata
    text = render_card(share.config)
    assert _rows(text)["task0"][0] == "task0"
    assert "](https://huggingface.co/runs" not in text
    data = _load(text, tmp_path).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert f"[`{tmp_path}`](#)" in text


def test_template_is_found():
    text = load_template()
    for placeholder in ("$metadata", "$adapter_rows", "$ratio", "$ratio_marginal", "$repo_id", "$version"):
        assert placeholder in text


def test_license_must_be_a_hub_license_id(adapter_dirs, env):
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=4, progress=False)
    assert check_license(" MIT ") == "mit" and check_license("Apache-2.0") == "apache-2.0"
    assert card_metadata(share.config, license="CC-BY-4.0")["license"] == "cc-by-4.0"
    assert {"apache-2.0", "mit", "other", "unknown", "cc-by-nc-4.0", "llama3.1", "gemma"} <= set(HUB_LICENSES)
    for bad, hint in (("Apache 2", "did you mean apache-2.0"), ("MIT License", "did you mean mit"), ("free for all", "")):
        with pytest.raises(ConfigError) as err:
            render_card(share.config, license=bad)
        message = str(err.value)
        assert repr(bad) in message and hint in message and "repositories-licenses" in message, message
    with pytest.raises(ConfigError, match="'Apache 2' is not one of the Hub's license ids"):
        share.push_to_hub(REPO, license="Apache 2", token="hf_x")
    assert env.count("POST") == 0 and env.count() == 0  # refused before any request


@pytest.mark.parametrize("task, cls, tag", [
    ("SEQ_CLS", "AutoModelForSequenceClassification", "text-classification"),
    ("CAUSAL_LM", "AutoModelForCausalLM", "text-generation"),
    ("SEQ_2_SEQ_LM", "AutoModelForSeq2SeqLM", "text2text-generation"),
    ("TOKEN_CLS", "AutoModelForTokenClassification", "token-classification"),
    ("QUESTION_ANS", "AutoModelForQuestionAnswering", "question-answering"),
    ("FEATURE_EXTRACTION", "AutoModel", "feature-extraction"),
    (None, "AutoModel", None),
])
def test_usage_and_pipeline_tag_follow_the_task_type(plain_adapter_dirs, monkeypatch, task, cls, tag):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    share = SHAREModel.from_adapters(plain_adapter_dirs, num_components=4, progress=False)
    for name in share.adapter_names:
        share.config.adapters[name]["task_type"] = task  # the card reads the task type from the config
    text = render_card(share.config)
    assert f"from transformers import {cls}\n" in text
    assert f'base = {cls}.from_pretrained("tiny-bert-for-tests")\n' in text  # no head here: no num_labels
    assert card_metadata(share.config).get("pipeline_tag") == tag and model_class(task) == cls and pipeline_tag(task) == tag


def test_every_peft_task_type_has_a_transformers_class():
    import transformers
    from peft import TaskType

    for task in TaskType:
        assert task.value in TASK_MODEL_CLASSES, task
        assert hasattr(transformers, TASK_MODEL_CLASSES[task.value]), TASK_MODEL_CLASSES[task.value]


def test_the_usage_snippet_runs(adapter_dirs, tmp_path, monkeypatch):
    """The card's Python snippet, run as written: the base model id names a local folder here."""
    from examples.make_adapters import tiny_bert

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    share = SHAREModel.from_adapters(adapter_dirs[:2], num_components=8, progress=False)  # task0: SEQ_CLS, 3 labels
    text = render_card(share.config)
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    tiny_bert(num_labels=3).save_pretrained("tiny-bert-for-tests")
    share.save_pretrained("path/to/share_checkpoint")
    scope: Dict[str, object] = {}
    exec(compile(code, "model_card.md", "exec"), scope)  # noqa: S102 - our own template
    model = scope["model"]
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    assert (tmp_path / "task0" / "adapter_model.safetensors").is_file()
