"""The model card (README.md) of a SHARE checkpoint, from ``hub_templates/``.

Rendered with ``string.Template`` (no jinja2 dependency).  The YAML metadata
round-trips through ``huggingface_hub.ModelCard.load(...).data``.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import yaml

from . import __version__
from .errors import LoraShareError

if TYPE_CHECKING:  # pragma: no cover
    from .model import SHAREModel

__all__ = ["render_card", "card_metadata", "load_template"]

TEMPLATE = "model_card.md"


def load_template(name: str = TEMPLATE) -> str:
    """Read a template shipped in the wheel (``lorashare/hub_templates``) or the source tree.

    ``lorashare.hub_templates`` is a namespace package (no ``__init__.py``), which
    ``importlib.resources`` only handles from Python 3.10, so plain paths are tried too.
    """
    try:
        return resources.files("lorashare.hub_templates").joinpath(name).read_text(encoding="utf-8")
    except (ImportError, OSError, TypeError, AttributeError):
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (os.path.join(here, "hub_templates"), os.path.join(os.path.dirname(here), "hub_templates")):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    raise FileNotFoundError(
        f"lorashare's template {name!r} is missing from lorashare/hub_templates: the install is incomplete. "
        "Reinstall lorashare (pip install --force-reinstall lorashare)."
    )


def card_metadata(share: "SHAREModel", *, license: Optional[str] = None) -> Dict[str, Any]:
    """The card's YAML metadata as a dict.

    ``base_model`` is only set when it is a Hub model id: the Hub rejects a card whose
    ``base_model`` is a local path.
    """
    meta: Dict[str, Any] = {"library_name": "lorashare"}
    base = share.config.base_model_name_or_path
    if _is_model_id(base):
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter"
    meta["tags"] = ["lora", "peft", "share", "lorashare"]
    if license:
        meta["license"] = license
    return meta


_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _is_model_id(name: Optional[str]) -> bool:
    """``owner/name`` or a canonical ``name``, and not a folder on this machine."""
    return bool(name) and bool(_MODEL_ID.match(str(name))) and ".." not in str(name) and not os.path.isdir(str(name))


def _source_cell(src: str, revision: Optional[str], endpoint: str) -> str:
    """A Hub source as a link to the exact revision and subfolder; a local one as its folder name."""
    from .hub import parse_adapter_id

    if revision:  # only Hub sources have a resolved revision
        try:
            ref = parse_adapter_id(src)
        except LoraShareError:
            ref = None
        if ref is not None:
            sub = f"/{ref.subfolder}" if ref.subfolder else ""
            return f"[{_cell(src)}]({endpoint}/{ref.repo_id}/tree/{revision}{sub})"
    return _cell(os.path.basename(src.rstrip("/\\")) or src)


def _size(n: Optional[int]) -> str:
    if not n:
        return "?"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_card(share: "SHAREModel", *, repo_id: Optional[str] = None, license: Optional[str] = None,
                description: Optional[str] = None, endpoint: Optional[str] = None) -> str:
    """Render README.md for ``share``.

    ``repo_id``, ``license`` and ``description`` default to what ``push_to_hub`` recorded in
    ``compression_stats["card"]``; links go to ``endpoint`` (default: the Hub, or ``HF_ENDPOINT``).

    Example:
        >>> print(render_card(share, repo_id="acme/support-share"))  # doctest: +SKIP
    """
    from .hub import endpoint as hub_endpoint

    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cfg, st = share.config, share.config.compression_stats or {}
    card_opts = st.get("card", {}) if isinstance(st.get("card"), dict) else {}
    repo_id = repo_id or card_opts.get("repo_id")
    license = license or card_opts.get("license")
    description = description or card_opts.get("description") or ""
    rows: List[str] = []
    for name in share.adapter_names:
        info = cfg.adapters.get(name, {})
        src = str(info.get("source") or share.adapter_sources.get(name, "") or "local")
        rev = info.get("revision")
        src_cell = _source_cell(src, rev, endpoint)
        errs = list(share.delta_w_errors.get(name, {}).values())
        err = f"{sum(errs) / len(errs):.4f} / {max(errs):.4f}" if errs else "–"
        rows.append(f"| {_cell(name)} | {src_cell} | {str(rev)[:10] if rev else '–'} | {info.get('rank', cfg.lora_rank)} | {err} |")
    ks = sorted(set(cfg.k_per_group.values())) or [cfg.num_components]
    base = cfg.base_model_name_or_path or "unknown"
    values = {
        "metadata": yaml.safe_dump(card_metadata(share, license=license), sort_keys=False).strip(),
        "title": f"SHARE checkpoint: {repo_id.split('/')[-1]}" if repo_id else "SHARE checkpoint",
        "description": description,
        "num_adapters": cfg.num_adapters,
        "base_model": base,
        "base_model_url": f"{endpoint}/{base}" if _is_model_id(cfg.base_model_name_or_path) else "#",
        "adapter_rows": "\n".join(rows),
        "original": _size(st.get("original_lora_bytes")),
        "compressed": _size(st.get("compressed_bytes")),
        "ratio": f"{st['compression_ratio']:.2f}×" if st.get("compression_ratio") else "?",
        "ratio_marginal": f"{st['compression_ratio_excluding_basis']:.2f}×" if st.get("compression_ratio_excluding_basis") else "?",
        "k_range": f"{ks[0]}" + (f"–{ks[-1]}" if len(ks) > 1 else ""),
        "selection": cfg.component_selection,
        "dtype": cfg.dtype,
        "heads": _size(st.get("heads_bytes")) if st.get("heads_bytes") else "none",
        "repo_id": repo_id or "path/to/share_checkpoint",
        "first_adapter": share.adapter_names[0] if share.adapter_names else "adapter",
        "version": __version__,
    }
    text = Template(load_template()).safe_substitute(values)
    return re.sub(r"\n{3,}", "\n\n", text)  # an empty description leaves no gap
