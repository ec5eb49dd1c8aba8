"""First-run stumbles of the library: each shows the message or behaviour a newcomer now gets.

* ``apply()``/``serve()`` onto the wrong model class names the adapter's task type and the class to load;
* adapters trained from a local base folder: ``base_model=`` (API, CLI) names the Hub id, and a push
  that would publish a local path as the base model is refused before any request;
* ``serve()`` without ``adapter_names`` or ``set_adapter()`` uses the first adapter, and says so once.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lorashare import SHAREModel
from lorashare.cli import main
from lorashare.errors import AdapterError, LocalBaseModelError
from tests.conftest import tiny_bert
from tests.hubserver import HubServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"


@pytest.fixture(scope="module")
def share() -> SHAREModel:
    return SHAREModel.from_adapters({f"t{i}": str(EXAMPLES / f"task{i}") for i in range(4)}, num_components=8,
                                    progress=False)


@pytest.fixture
def env(hub: HubServer, hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return hub


# --------------------------------------------------------------------------- the wrong model class
def test_apply_and_serve_onto_the_wrong_class_name_the_task_type_and_the_class(share):
    heads = [n for n in share.adapter_names if share.adapter_configs[n].get("task_type") == "SEQ_CLS"]
    assert heads, "the bundled examples include SEQ_CLS adapters"
    plain = tiny_bert().bert  # what AutoModel gives: no classifier, and no 'bert.' prefix
    want = (f"Adapter {heads[0]!r} is a SEQ_CLS adapter, and this model is a BertModel: load the base model with "
            "AutoModelForSequenceClassification.from_pretrained('tiny-bert-for-tests', num_labels=3).")
    with pytest.raises(AdapterError) as err:
        share.apply(plain, heads[0])
    assert want in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(AdapterError) as err:
        share.serve(tiny_bert().bert, adapters=[heads[0]])
    assert want in str(err.value)
    # The class it names works.
    with torch.no_grad():
        assert torch.isfinite(share.apply(tiny_bert(), heads[0])(input_ids=torch.ones(1, 4, dtype=torch.long)).logits).all()


# --------------------------------------------------------------------------- a local base model
def test_a_local_base_model_is_never_pushed_and_base_model_names_the_hub_id(env, tmp_path):
    local = tmp_path / "my-local-bert"
    local.mkdir()
    dirs = {}
    for i in range(2):
        dirs[f"t{i}"] = tmp_path / f"t{i}"
        shutil.copytree(EXAMPLES / f"task{i}", dirs[f"t{i}"])
        cfg = json.loads((dirs[f"t{i}"] / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(local)  # trained from a local folder
        (dirs[f"t{i}"] / "adapter_config.json").write_text(json.dumps(cfg))
    share = SHAREModel.from_adapters({n: str(d) for n, d in dirs.items()}, num_components=4, progress=False)
    assert share.config.base_model_name_or_path == str(local)
    with pytest.raises(LocalBaseModelError) as err:
        share.push_to_hub("tester/local-base")
    message = str(err.value)
    assert repr(str(local)) in message and "set_base_model('OWNER/NAME')" in message and "--" not in message
    assert env.records == []  # refused before any request
    # The CLI says how to fix it there, and its fix works.
    share.save_pretrained(tmp_path / "ck")
    assert main(["push", str(tmp_path / "ck"), "tester/local-base"]) == 2
    assert env.records == []
    assert main(["push", str(tmp_path / "ck"), "tester/local-base", "--base-model", "google/bert_uncased_L-2_H-128_A-2",
                 "--json"]) == 0
    pushed = SHAREModel.from_pretrained("tester/local-base")
    assert pushed.config.base_model_name_or_path == "google/bert_uncased_L-2_H-128_A-2"
    card = (Path(pushed.state.origin.folder) / "README.md").read_text()
    assert "base_model: google/bert_uncased_L-2_H-128_A-2" in card and str(local) not in card
    # The library keyword does the same at compression time.
    named = SHAREModel.from_adapters({n: str(d) for n, d in dirs.items()}, num_components=4, progress=False,
                                     base_model="google/bert_uncased_L-2_H-128_A-2")
    assert named.config.base_model_name_or_path == "google/bert_uncased_L-2_H-128_A-2" and named.state.revision == 0


def test_the_cli_push_message_names_the_cli_fix(env, tmp_path, capsys):
    local = tmp_path / "base"
    local.mkdir()
    share = SHAREModel.from_adapters({f"t{i}": str(EXAMPLES / f"task{i}") for i in range(2)}, num_components=4,
                                     progress=False, base_model=str(local))
    share.save_pretrained(tmp_path / "ck")
    capsys.readouterr()
    assert main(["push", str(tmp_path / "ck"), "tester/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--base-model OWNER/NAME" in err and "set_base_model" not in err, err


# --------------------------------------------------------------------------- serve's default adapter
def test_serve_without_adapter_names_uses_the_first_adapter_and_says_so_once(share, caplog):
    served = share.serve(tiny_bert())
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="lorashare.serving.serve"), torch.no_grad():
        default = served(input_ids=ids).logits
        served(input_ids=ids)
    said = [r.getMessage() for r in caplog.records if "every row uses the first served adapter" in r.getMessage()]
    assert said == [f"no adapter_names and no set_adapter(): every row uses the first served adapter, "
                    f"{share.adapter_names[0]!r}"]
    with torch.no_grad():
        first = served(input_ids=ids, adapter_names=[share.adapter_names[0]] * 2).logits
    assert torch.equal(default, first)
    assert "first served adapter" in (type(served).forward.__doc__ or "")


def test_peft_loading_mistakes_get_a_clear_error_not_peft_internals(share):
    """apply() changes its base model in place: a second apply() on it, or a head-less adapter added to a
    PeftModel that already saves a head, are refused with the fix (never PEFT's raw KeyError/ValueError)."""
    from lorashare.errors import ConfigError

    heads = [n for n in share.adapter_names if share.all_classifier_heads.get(n)]
    plain = [n for n in share.adapter_names if n not in heads]
    base = tiny_bert()
    pm = share.apply(base, heads[0])
    with pytest.raises(ConfigError, match=r"already holds PEFT LoRA layers: apply\(\) and load_into\(\) change"):
        share.apply(base, heads[1])
    with pytest.raises(ConfigError, match=rf"adapter {plain[0]!r} has no saved head, and this PeftModel already holds "
                                          rf"{heads[0]!r}.*share\.load_into\(base_model, \[{plain[0]!r}, {heads[0]!r}\]\)"):
        share.load_into(pm, [plain[0]])
    # The fix it names works, and each adapter gives its own outputs.
    both = share.load_into(tiny_bert(), [plain[0], heads[0]])
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both.set_adapter(heads[0])
        mixed = both(input_ids=ids).logits
        alone = share.apply(tiny_bert(), heads[0])(input_ids=ids).logits
    assert torch.allclose(mixed, alone, atol=1e-6)
