"""The model card (README.md) of a SHARE checkpoint, from ``hub_templates/``.

Rendered with ``string.Template`` (no jinja2 dependency).  The YAML metadata
round-trips through ``huggingface_hub.ModelCard.load(...).data``.
"""

from __future__ import annotations

import os
from importlib import resources
from string import Template
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import yaml

from . import __version__

if TYPE_CHECKING:  # pragma: no cover
    from .model import SHAREModel

__all__ = ["render_card", "card_metadata", "load_template"]

TEMPLATE = "model_card.md"


def load_template(name: str = TEMPLATE) -> str:
    """Read a template shipped in the wheel (``lorashare/hub_templates``) or the source tree."""
    try:
        return resources.files("lorashare.hub_templates").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hub_templates", name)
        with open(here, encoding="utf-8") as f:
            return f.read()


def card_metadata(share: "SHAREModel", *, license: Optional[str] = None) -> Dict[str, Any]:
    """The card's YAML metadata as a dict."""
    meta: Dict[str, Any] = {"library_name": "lorashare"}
    base = share.config.base_model_name_or_path
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "adapter"
    meta["tags"] = ["lora", "peft", "share", "lorashare"]
    if license:
        meta["license"] = license
    return meta


def _is_hub_id(source: str) -> bool:
    parts = source.split("@", 1)[0].split("/")
    return not os.path.isabs(source) and len(parts) in (2, 3) and all(parts) and not os.path.exists(source)


def _size(n: Optional[int]) -> str:
    if not n:
        return "?"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_card(share: "SHAREModel", *, repo_id: Optional[str] = None, license: Optional[str] = None,
                description: Optional[str] = None, endpoint: str = "https://huggingface.co") -> str:
    """Render README.md for ``share``.

    Example:
        >>> print(render_card(share, repo_id="acme/support-share"))  # doctest: +SKIP
    """
    cfg, st = share.config, share.config.compression_stats or {}
    card_opts = st.get("card", {}) if isinstance(st.get("card"), dict) else {}
    license = license or card_opts.get("license")
    description = description or card_opts.get("description") or ""
    rows: List[str] = []
    for name in share.adapter_names:
        info = cfg.adapters.get(name, {})
        src = str(info.get("source") or share.adapter_sources.get(name, "") or "local")
        if _is_hub_id(src):
            repo = src.split("@", 1)[0]
            repo = "/".join(repo.split("/")[:2])
            src_cell = f"[{_cell(src)}]({endpoint}/{repo})"
        else:
            src_cell = _cell(os.path.basename(src.rstrip("/\\")) or src)
        rev = info.get("revision")
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
        "base_model_url": f"{endpoint}/{base}" if _is_hub_id(base) else "#",
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
    return Template(load_template()).safe_substitute(values)
