"""GitHub Actions I/O for ``lorashare sync``: workflow commands, masking, outputs and the job summary."""

from __future__ import annotations

import os
from typing import IO, Any, List, Mapping, Optional, Sequence

from .. import hub
from ..utils.fmt import k_range, md_cell, size
from .plan import AdapterPlan, Plan

__all__ = ["Reporter", "summary_markdown"]


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_prop(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


class Reporter:
    """Workflow commands, outputs and the job summary; every text goes through ``redact``."""

    def __init__(self, *, gha: bool, stream: IO[str], secrets: Sequence[str] = ()) -> None:
        self.gha = gha
        self.stream = stream
        self.secrets: List[str] = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "***")
        return hub.redact(text)

    def mask(self, secret: Optional[str]) -> None:
        """Register a secret: masked in the runner's log, and redacted from everything we print."""
        if not secret:
            return
        if self.gha:
            for part in secret.splitlines():
                if part.strip():
                    self.stream.write(f"::add-mask::{part}\n")
            self.stream.flush()
        self.secrets.append(secret)

    def command(self, text: str) -> None:
        if self.gha:
            self.stream.write(self.redact(text) + "\n")
            self.stream.flush()

    def group(self, title: str) -> None:
        self.command(f"::group::{title}")

    def endgroup(self) -> None:
        self.command("::endgroup::")

    def error(self, message: str, *, file: Optional[str] = None, line: Optional[int] = None) -> None:
        props = ["title=lorashare sync"]
        if file:
            props.insert(0, f"file={_escape_prop(file)}")
            if line:
                props.insert(1, f"line={line}")
        self.command(f"::error {','.join(props)}::{_escape_data(self.redact(message))}")

    def outputs(self, values: Mapping[str, str]) -> None:
        path = os.environ.get("GITHUB_OUTPUT")
        if not (self.gha and path):
            return
        with open(path, "a", encoding="utf-8") as f:
            for k, v in values.items():
                v = self.redact(str(v))
                if "\n" in v or "\r" in v:
                    delim = f"lorashare_{os.urandom(8).hex()}"
                    f.write(f"{k}<<{delim}\n{v}\n{delim}\n")
                else:
                    f.write(f"{k}={v}\n")

    def summary(self, markdown: str) -> None:
        path = os.environ.get("GITHUB_STEP_SUMMARY")
        if not (self.gha and path):
            return
        with open(path, "a", encoding="utf-8") as f:
            f.write(self.redact(markdown).rstrip("\n") + "\n")


def _fp_label(a: AdapterPlan) -> str:
    fp = a.fingerprint or a.previous
    if not fp:
        return "–"
    return f"{'rev' if a.kind == 'hub' else 'sha256'} `{fp[:10]}`"


def summary_markdown(result: Any, plan: Plan, share: Any, published: Any) -> str:
    """The job summary: the verdict, the compression stats and a table of the adapters."""
    r = result
    lines = [f"## lorashare sync: `{md_cell(r.repo_id)}`", ""]
    if r.dry_run:
        verdict = (f"**Dry run**: would `{plan.action}` — {md_cell('; '.join(plan.reasons))}. Nothing was pushed."
                   if plan.changed else "**Dry run**: no change; nothing would be pushed.")
    elif r.commit_sha:
        link = f"[`{r.commit_sha[:10]}`]({r.commit_url})" if r.commit_url else f"`{r.commit_sha[:10]}`"
        verdict = f"**Published** {link} to [{md_cell(r.repo_id)}]({r.repo_url}): {md_cell(r.message or '')}"
    else:
        verdict = f"**No change**: the checkpoint at [{md_cell(r.repo_id)}]({r.repo_url}) matches the manifest; no commit."
    lines += [verdict, ""]
    cfg = share.config if share is not None else published
    st = cfg.compression_stats if cfg is not None and isinstance(cfg.compression_stats, dict) else {}
    lines += ["| | |", "|---|---|", f"| Action | `{plan.action}` |", f"| Adapters | {len(r.adapters)} |"]
    if st.get("compression_ratio"):
        lines.append(f"| Compression ratio | {st['compression_ratio']:.2f}× (bases counted) |")
        lines.append(f"| Original LoRA → compressed | {size(st.get('original_lora_bytes'))} → {size(st.get('compressed_bytes'))} |")
    if cfg is not None and getattr(cfg, "k_per_group", None):
        k = k_range(cfg.k_per_group)
        lines.append(f"| k per module/side | {k} ({cfg.component_selection}, {cfg.dtype}) |")
    if st.get("delta_w_rel_error_mean") is not None:
        lines.append(f"| ΔW relative error | mean {st['delta_w_rel_error_mean']:.4f}, max {st['delta_w_rel_error_max']:.4f} |")
    lines += ["", "### Adapters", "",
              "| Adapter | Source | Fingerprint | Status | ΔW error mean | ΔW error max |",
              "|---|---|---|---|---|---|"]
    errors = share.delta_w_errors if share is not None else {}
    for a in plan.adapters:
        errs = list((errors.get(a.name) or {}).values())
        mean = f"{sum(errs) / len(errs):.4f}" if errs else "–"
        mx = f"{max(errs):.4f}" if errs else "–"
        status = a.status + (f" ({md_cell(a.reason)})" if a.reason and a.status == "changed" else "")
        lines.append(f"| {md_cell(a.name)} | `{md_cell(a.source)}` | {_fp_label(a)} | {status} | {mean} | {mx} |")
    return "\n".join(lines) + "\n"
