"""The documentation pages generated from the code, so that they cannot drift from it.

A mkdocs hook (``hooks:`` in ``mkdocs.yml``): each marker below, on a line of its own in a page of
``docs/``, is replaced at build time by Markdown generated from the source of truth:

* ``<!-- generated: cli -->``: every verb, argument and option of ``lorashare.cli.build_parser()``;
* ``<!-- generated: action -->``: the inputs and outputs of ``action.yml``;
* ``<!-- generated: modules -->``: every module of ``lorashare/``, with its one job (the table of
  ``docs/modules.md``) and its docstring (mkdocstrings).

The functions are plain too: ``tests/test_docs.py`` calls them and compares their output with the
parser and with ``action.yml``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
MARKERS = {
    "cli": "<!-- generated: cli -->",
    "action": "<!-- generated: action -->",
    "modules": "<!-- generated: modules -->",
}
USAGE_WIDTH = 100


def _cell(text: object) -> str:
    """``text`` made safe for one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def _plain(text: object) -> str:
    """Plain text (argparse's help) shown literally in Markdown: no link, emphasis or HTML."""
    text = _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%(" in text:
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        text = text % params
    return text


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        return " \\| ".join(f"`{c}`" for c in action.choices)
    metavar = action.metavar or (action.dest if not action.option_strings else action.dest.upper())
    if action.nargs in ("*", "+"):
        return f"`{metavar} ...`"
    return f"`{metavar}`"


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    if isinstance(action.default, bool):
        return ""
    return f"`{action.default}`"


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def visible_actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    """The arguments and options that ``--help`` shows (suppressed ones left out)."""
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS]


def subcommands(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    """``{verb: its parser}``, in the order the CLI defines them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _subcommand_help(parser: argparse.ArgumentParser) -> Dict[str, str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _exclusive(parser: argparse.ArgumentParser) -> Dict[int, str]:
    """For each action in a mutually exclusive group: a note naming the others."""
    notes = {}
    for group in parser._mutually_exclusive_groups:
        names = [a.option_strings[-1] if a.option_strings else a.dest for a in group._group_actions]
        for a in group._group_actions:
            others = ", ".join(f"`{n}`" for n in names if n != (a.option_strings[-1] if a.option_strings else a.dest))
            notes[id(a)] = f"not with {others}" + ("; one of them is required" if group.required else "")
    return notes


def _arguments_table(parser: argparse.ArgumentParser) -> List[str]:
    rows = ["| argument or option | value | default | what it does |", "|---|---|---|---|"]
    notes = _exclusive(parser)
    for a in visible_actions(parser):
        if isinstance(a, argparse._SubParsersAction):
            continue
        names = ", ".join(f"`{s}`" for s in a.option_strings) if a.option_strings else f"`{a.metavar or a.dest}`"
        value = _value(a) if a.option_strings else ("`...`" if a.nargs in ("*", "+") else "")
        what = _plain(_help(a, parser.prog))
        extra = [n for n in (("required" if a.required and a.option_strings else ""), notes.get(id(a), "")) if n]
        if extra:
            what = f"{what} ({'; '.join(extra)})" if what else "; ".join(extra)
        rows.append(f"| {names} | {value} | {_default(a)} | {what} |")
    return rows


def cli_markdown(parser: Optional[argparse.ArgumentParser] = None) -> str:
    """The command-line reference: one section per verb, each with its usage and every option."""
    if parser is None:
        from lorashare.cli import build_parser

        parser = build_parser()
    verbs = subcommands(parser)
    helps = _subcommand_help(parser)
    out = ["```text", _usage(parser), "```", ""]
    if parser.description:
        out += [_plain(parser.description), ""]
    out += ["| verb | what it does |", "|---|---|"]
    out += [f"| [`{name}`](#{parser.prog}-{name}) | {_plain(helps.get(name, ''))} |" for name in verbs]
    out += [""]
    if parser.epilog:
        out += [_plain(parser.epilog), ""]
    out += ["Options of `lorashare` itself:", ""] + _arguments_table(parser) + [""]
    for name, sub in verbs.items():
        out += [f"## `{parser.prog} {name}` {{#{parser.prog}-{name}}}", ""]
        out += [_plain(sub.description or helps.get(name, "")), ""]
        out += ["```text", _usage(sub), "```", ""]
        out += _arguments_table(sub) + [""]
    return "\n".join(out)


def action_markdown(path: Path = ROOT / "action.yml") -> str:
    """The Action's inputs and outputs, as ``action.yml`` declares them."""
    meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    out = [f"**{meta.get('name', '')}**: {_cell(meta.get('description', ''))}", "", "### Inputs", ""]
    out += ["| input | default | required | description |", "|---|---|---|---|"]
    for name, spec in (meta.get("inputs") or {}).items():
        spec = spec or {}
        default = spec.get("default", "")
        default = f"`{default}`" if default != "" else "(empty)"
        required = "yes" if spec.get("required") else "no"
        out.append(f"| `{name}` | {default} | {required} | {_cell(spec.get('description', ''))} |")
    out += ["", "### Outputs", "", "| output | description |", "|---|---|"]
    for name, spec in (meta.get("outputs") or {}).items():
        out.append(f"| `{name}` | {_cell((spec or {}).get('description', ''))} |")
    return "\n".join(out) + "\n"


def module_jobs(page: Path = ROOT / "docs" / "modules.md") -> Dict[str, str]:
    """``{"codec/subspace.py": "its one job", ...}`` from the table of ``docs/modules.md``."""
    text = page.read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `lorashare/([a-z_/]+\.py)` \| ([^|]+?) \|", text, flags=re.M))


def modules_markdown(package: Path = ROOT / "lorashare") -> str:
    """One section per module of ``lorashare/``, room by room: its job, then its docstring (mkdocstrings)."""
    jobs = module_jobs()
    out = []
    for path in sorted(package.rglob("*.py"), key=lambda p: (len(p.relative_to(package).parts), str(p))):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        rel = path.relative_to(package).as_posix()
        mod = "lorashare." + rel[:-3].replace("/", ".")
        out += [f"## `{mod}`", ""]
        if rel in jobs:
            out += [f"*{jobs[rel].strip()}*", ""]
        out += [f"::: {mod}", "    options:", "      members: false", "      show_root_heading: false", ""]
    return "\n".join(out)


GENERATORS = {"cli": cli_markdown, "action": action_markdown, "modules": modules_markdown}


def fill(markdown: str) -> str:
    """``markdown`` with every marker replaced by its generated text."""
    for key, marker in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, GENERATORS[key]())
    return markdown


# --------------------------------------------------------------------------- mkdocs hook
def on_startup(command, dirty):  # noqa: ARG001 - mkdocs' signature
    if str(ROOT) not in sys.path:  # so that lorashare imports from this checkout
        sys.path.insert(0, str(ROOT))


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 - mkdocs' signature
    return fill(markdown)
