"""The model card (README.md) of a SHARE checkpoint, from ``hub_templates/``.

Rendered with ``string.Template`` (no jinja2 dependency).  The YAML metadata
round-trips through ``huggingface_hub.ModelCard.load(...).data``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from importlib import resources
from string import Template
from typing import Any, Dict, List, Optional, Tuple

import yaml

from .. import __version__
from ..errors import ConfigError, LocalBaseModelError, LoraShareError
from ..format.checkpoint import CardData, SHAREConfig
from ..utils.fmt import k_range, md_cell, size
from .client import endpoint as hub_endpoint
from .client import parse_adapter_id

__all__ = ["render_card", "card_metadata", "load_template", "check_license", "check_card_options", "check_publishable_base", "model_class",
           "pipeline_tag",
           "HUB_LICENSES", "TASK_MODEL_CLASSES", "INSTALL"]

TEMPLATE = "model_card.md"

INSTALL = 'pip install "lorashare @ git+https://github.com/lorashare/lorashare"'
"""How to install this lorashare. 0.2.0 is not on PyPI yet: ``pip install lorashare`` gives 0.1.x,
an older code base. Change this (and the README's Install section) when it is released."""

# The transformers class that loads the base model for an adapter of each PEFT task type (the
# head included), and the Hub's pipeline tag for it.  Other or missing task types: AutoModel.
TASK_MODEL_CLASSES: Dict[str, str] = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_PIPELINE_TAGS: Dict[str, str] = {
    "SEQ_CLS": "text-classification",
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}

# The license ids the Hub accepts in a card's metadata, from its documentation
# (https://huggingface.co/docs/hub/repositories-licenses); anything else is `other` with a
# `license_name` and a LICENSE file in the repo.
HUB_LICENSES: Tuple[str, ...] = (
    "apache-2.0", "mit", "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "afl-3.0", "artistic-2.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "c-uda", "cc", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cc-by-sa-3.0", "cc-by-sa-4.0", "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0",
    "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "wtfpl", "ecl-2.0", "epl-1.0", "epl-2.0",
    "etalab-2.0", "eupl-1.1", "agpl-3.0", "gfdl", "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0",
    "isc", "lppl-1.3c", "ms-pl", "mpl-2.0", "odc-by", "odbl", "openrail++", "osl-3.0", "postgresql", "ofl-1.1",
    "ncsa", "unlicense", "zlib", "pddl", "lgpl-lr", "deepfloyd-if-license", "llama2", "llama3", "llama3.1",
    "llama3.2", "llama3.3", "llama4", "gemma", "unknown", "other",
)


def check_license(license: str) -> str:
    """The Hub's id for ``license`` (case and surrounding blanks ignored); a :class:`ConfigError` otherwise.

    Example:
        >>> check_license("Apache-2.0")
        'apache-2.0'
    """
    text = str(license).strip()
    if text.lower() in HUB_LICENSES:
        return text.lower()
    # "MIT License" -> "mit", "Apache License 2.0" -> "apache-2.0": suggest from the words that matter.
    words = [w for w in re.split(r"[\s_]+", text.lower()) if w not in ("license", "licence", "the", "")]
    close = difflib.get_close_matches("-".join(words), HUB_LICENSES, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(
        f"license {text[:60]!r} is not one of the Hub's license ids: {hint}use an id such as apache-2.0, mit or "
        "cc-by-4.0 (the list: https://huggingface.co/docs/hub/repositories-licenses), or `other` for a license "
        "the Hub does not list."
    )


def model_class(task_type: Optional[str]) -> str:
    """The transformers ``Auto*`` class that loads a base model for an adapter of ``task_type``.

    Example:
        >>> model_class("SEQ_CLS"), model_class(None)
        ('AutoModelForSequenceClassification', 'AutoModel')
    """
    return TASK_MODEL_CLASSES.get(str(task_type or ""), "AutoModel")


def pipeline_tag(task_type: Optional[str]) -> Optional[str]:
    """The Hub's pipeline tag for adapters of ``task_type``, or None when the task type says none.

    Example:
        >>> pipeline_tag("CAUSAL_LM")
        'text-generation'
    """
    return _PIPELINE_TAGS.get(str(task_type or ""))


def load_template(name: str = TEMPLATE) -> str:
    """Read a template shipped in the wheel (``lorashare/hub_templates``) or the source tree.

    ``lorashare.hub_templates`` is a namespace package (no ``__init__.py``), which
    ``importlib.resources`` only handles from Python 3.10, so plain paths are tried too.
    """
    try:
        return resources.files("lorashare.hub_templates").joinpath(name).read_text(encoding="utf-8")
    except (ImportError, OSError, TypeError, AttributeError):
        pass
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # lorashare/, this file is in lorashare/hub
    for folder in (os.path.join(package, "hub_templates"), os.path.join(os.path.dirname(package), "hub_templates")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError(
        f"lorashare's template {name!r} is missing from lorashare/hub_templates: the install is incomplete. "
        f"Reinstall lorashare: {INSTALL.replace('pip install', 'pip install --force-reinstall', 1)}."
    )


def card_metadata(config: SHAREConfig, *, license: Optional[str] = None) -> Dict[str, Any]:
    """The card's YAML metadata as a dict.

    ``base_model`` (and the ``base_model:adapter:<id>`` tag PEFT's own cards carry) is only set
    when it is a Hub model id: the Hub rejects a card whose ``base_model`` is a local path.
    ``pipeline_tag`` is set when every adapter has the same PEFT task type.  A ``license`` that
    is not a Hub license id is a :class:`ConfigError`.

    Example:
        >>> card_metadata(SHAREConfig(base_model_name_or_path="roberta-base"))["base_model"]
        'roberta-base'
    """
    meta: Dict[str, Any] = {"library_name": "lorashare"}
    base = config.base_model_name_or_path
    tags = ["lora", "peft", "transformers", "share", "lorashare"]
    if is_model_id(base):
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter"
        tags.append(f"base_model:adapter:{base}")
    tasks = {str(_info(config, n).get("task_type") or "") for n in config.adapter_names}
    tag = pipeline_tag(tasks.pop()) if len(tasks) == 1 else None  # mixed tasks: no single pipeline
    if tag:
        meta["pipeline_tag"] = tag
    meta["tags"] = tags
    if license:
        meta["license"] = check_license(license)
    return meta


def _info(config: SHAREConfig, name: str) -> Dict[str, Any]:
    info = config.adapters.get(name)
    return info if isinstance(info, dict) else {}


_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_model_id(name: Optional[str]) -> bool:
    """``owner/name`` or a canonical ``name``, and not a folder on this machine: what a card may link as its base model.

    Example:
        >>> is_model_id("roberta-base"), is_model_id("/srv/models/roberta")
        (True, False)
    """
    return bool(name) and bool(_MODEL_ID.match(str(name))) and ".." not in str(name) and not os.path.isdir(str(name))


def check_card_options(options: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """The card's own options (``repo_id``, ``license``, ``description``), checked; a license as the Hub spells it."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(CardData)})
    if unknown:
        raise ConfigError(f"set_card: unknown options {unknown}; expected repo_id, license or description.")
    return {**options, "license": check_license(options["license"])} if options.get("license") else dict(options)


def check_publishable_base(base: Optional[str]) -> None:
    """Refuse a base model that is a local folder: a card on the Hub would publish that path as the base model.

    Example:
        >>> check_publishable_base("FacebookAI/roberta-base")
    """
    if base and not is_model_id(base):
        problem = (f"the base model is {base!r}, a local folder: the model card on the Hub would publish that "
                   "path as the base model.")
        raise LocalBaseModelError(f"{problem} Name its Hub id first: share.set_base_model('OWNER/NAME') (or "
                                  "from_adapters(..., base_model='OWNER/NAME')).", base_model=base, problem=problem)


def _source_cell(src: str, revision: Optional[str], endpoint: str) -> str:
    """A Hub source as a link to the exact revision and subfolder; a local one as its folder name."""
    if revision:  # only Hub sources have a resolved revision
        try:
            ref = parse_adapter_id(src)
        except LoraShareError:
            ref = None
        if ref is not None:
            sub = f"/{ref.subfolder}" if ref.subfolder else ""
            return f"[{md_cell(src)}]({endpoint}/{ref.repo_id}/tree/{revision}{sub})"
    return md_cell(os.path.basename(src.rstrip("/\\")) or src)


def render_card(config: SHAREConfig, *, repo_id: Optional[str] = None, license: Optional[str] = None,
                description: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """Render README.md for a checkpoint from its config alone (no tensor is needed).

    ``repo_id``, ``license`` and ``description`` default to ``config.card``; links go to
    ``endpoint`` (default: the Hub, or ``HF_ENDPOINT``).

    Example:
        >>> print(render_card(share.config, repo_id="acme/support-share"))  # doctest: +SKIP
    """
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cfg, st = config, config.compression_stats or {}
    repo_id = repo_id or cfg.card.repo_id
    license = license or cfg.card.license
    description = description or cfg.card.description or ""
    rows: List[str] = []
    for name in cfg.adapter_names:
        info = _info(cfg, name)
        src = str(info.get("source") or "local")
        rev = info.get("revision")
        mean, worst = info.get("delta_w_error_mean"), info.get("delta_w_error_max")
        le = "≤ " if info.get("delta_w_error_bound") else ""  # an upper bound, not a measurement
        err = f"{le}{mean:.4f} / {le}{worst:.4f}" if mean is not None and worst is not None else "–"
        rows.append(f"| {md_cell(name)} | {_source_cell(src, rev, endpoint)} | {str(rev)[:10] if rev else '–'} | "
                    f"{info.get('rank', cfg.lora_rank)} | {err} |")
    base = cfg.base_model_name_or_path or "unknown"
    first = cfg.adapter_names[0] if cfg.adapter_names else None
    task = str(_info(cfg, first).get("task_type") or "") if first else ""
    labels = _info(cfg, first).get("num_labels") if first else None
    values = {
        "metadata": yaml.safe_dump(card_metadata(cfg, license=license), sort_keys=False).strip(),
        "title": f"SHARE checkpoint: {repo_id.split('/')[-1]}" if repo_id else "SHARE checkpoint",
        "description": description,
        "num_adapters": cfg.num_adapters,
        "base_model": base,
        "base_model_url": f"{endpoint}/{base}" if is_model_id(cfg.base_model_name_or_path) else "#",
        "adapter_rows": "\n".join(rows),
        "bound_note": "A value after ≤ is an upper bound against the original adapter, not a measurement: the "
                      "adapter was recompressed from its reconstruction, its original being unavailable then."
                      if any(_info(cfg, n).get("delta_w_error_bound") for n in cfg.adapter_names) else "",
        "original": size(st.get("original_lora_bytes")),
        "compressed": size(st.get("compressed_bytes")),
        "ratio": f"{st['compression_ratio']:.2f}×" if st.get("compression_ratio") else "?",
        "ratio_marginal": f"{st['compression_ratio_excluding_basis']:.2f}×" if st.get("compression_ratio_excluding_basis") else "?",
        "k_range": k_range(cfg.k_per_group, cfg.num_components),
        "selection": cfg.component_selection,
        "dtype": cfg.dtype,
        "heads": size(st.get("heads_bytes"), missing="none"),
        "repo_id": repo_id or "path/to/share_checkpoint",
        "first_adapter": first or "adapter",
        "install": INSTALL,
        "model_class": model_class(task),
        "model_kwargs": f", num_labels={labels}" if labels and task in ("SEQ_CLS", "TOKEN_CLS") else "",
        "version": __version__,
    }
    text = Template(load_template()).safe_substitute(values)
    return re.sub(r"\n{3,}", "\n\n", text)  # an empty description leaves no gap
