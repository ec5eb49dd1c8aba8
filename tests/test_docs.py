"""The documentation: generated pages match their sources, the README stays short, no project tracking.

* ``docs/gen_pages.py`` (the mkdocs hook) generates the command-line page from
  ``lorashare.cli.build_parser()`` and the Action page from ``action.yml``: every verb, argument,
  option, input and output must be on them, with its description and default.
* The README opens with the two commands that work on a fresh machine and stays under 12.5 KB;
  the reference material lives on the site.
* The README and the site say what the software does and what was measured: no issue numbers,
  goals, targets or closing notes.
* ``mkdocs build --strict`` succeeds (slow; skipped when the ``docs`` extra is not installed).
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorashare.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 12_500

FIRST = ("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/lorashare compress "
         "examples/adapters/* -o share_ckpt -k 8 && .venv/bin/lorashare info share_ckpt")
SECOND = '.venv/bin/pip install -e ".[dev]" && .venv/bin/python -m pytest -q'


def _gen():
    spec = importlib.util.spec_from_file_location("lorashare_docs_gen_pages", DOCS / "gen_pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen()


def _words(text: str) -> str:
    return " ".join(str(text).split())


def _sections(markdown: str) -> dict:
    """``{verb: its section}`` of the generated CLI page."""
    parts = re.split(r"^## `lorashare ([a-z-]+)`.*$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _options(parser: argparse.ArgumentParser):
    for a in gen.visible_actions(parser):
        if isinstance(a, argparse._SubParsersAction):
            continue
        yield a, (a.option_strings or [a.metavar or a.dest])


# --------------------------------------------------------------------------- the CLI page
def test_cli_page_has_every_verb_and_option_of_the_parser():
    parser = build_parser()
    page = gen.cli_markdown(parser)
    verbs = gen.subcommands(parser)
    assert {"compress", "info", "reconstruct", "export", "add", "remove", "push", "sync"} <= set(verbs)
    sections = _sections(page)
    assert list(sections) == list(verbs), "one section per verb, in the parser's order"
    for verb, sub in verbs.items():
        section = sections[verb]
        assert f"usage: lorashare {verb}" in section
        for action, names in _options(sub):
            for name in names:
                assert f"`{name}`" in section, f"lorashare {verb}: {name} is missing from the CLI page"
            if action.choices and action.option_strings:
                assert all(f"`{c}`" in section for c in action.choices), (verb, names)
            if action.default not in (None, False, True, argparse.SUPPRESS) and action.option_strings:
                assert f"`{action.default}`" in section, (verb, names, action.default)
        for action in sub._actions:
            if action.help is argparse.SUPPRESS:
                for name in action.option_strings:
                    assert f"`{name}`" not in section, f"hidden option {name} is on the page"
    for _action, names in _options(parser):
        assert all(f"`{n}`" in page for n in names)


def test_cli_page_is_generated_at_build_time():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert gen.MARKERS["cli"] in text
    assert "## `lorashare" not in text, "docs/cli.md must not hold a hand-written copy of the reference"
    assert gen.fill(text).count("## `lorashare ") == len(gen.subcommands(build_parser()))


def test_cli_page_generator_handles_a_new_option():
    parser = build_parser()
    sub = gen.subcommands(parser)["info"]
    sub.add_argument("--brand-new", choices=["x", "y"], default="x", help="a [new] option_with *marks*")
    sub.add_argument("--secret", help=argparse.SUPPRESS)
    section = _sections(gen.cli_markdown(parser))["info"]
    assert "`--brand-new`" in section and "`x` \\| `y`" in section and "`--secret`" not in section
    assert "a \\[new\\] option\\_with \\*marks\\*" in section  # shown literally, never a link or emphasis


# --------------------------------------------------------------------------- the Action page
def test_action_page_has_every_input_and_output_of_action_yml():
    meta = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    page = gen.action_markdown()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([a-z-]+)` \|.*$", page, flags=re.M)}
    assert meta["inputs"] and meta["outputs"]
    for name, spec in meta["inputs"].items():
        assert name in rows, f"input {name} is missing from the Action page"
        default = spec.get("default", "")
        assert (f"| `{default}` |" if default != "" else "| (empty) |") in rows[name], (name, default)
        assert _words(spec["description"]) in rows[name].replace("\\|", "|"), name
    for name, spec in meta["outputs"].items():
        assert name in rows, f"output {name} is missing from the Action page"
        assert _words(spec["description"]) in rows[name].replace("\\|", "|"), name
    text = (DOCS / "action.md").read_text(encoding="utf-8")
    assert gen.MARKERS["action"] in text


def test_modules_page_lists_every_module():
    page = gen.modules_markdown()
    package = ROOT / "lorashare"
    modules = sorted("lorashare." + p.relative_to(package).with_suffix("").as_posix().replace("/", ".")
                     for p in package.rglob("*.py") if p.stem not in ("__init__", "__main__"))
    assert sorted(re.findall(r"^::: (lorashare[\w.]*)$", page, flags=re.M)) == modules
    assert gen.MARKERS["modules"] in (DOCS / "modules.md").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- the README
def test_readme_is_short_and_opens_with_the_two_commands():
    raw = README.read_bytes()
    assert len(raw) <= README_MAX_BYTES, f"README.md is {len(raw)} bytes; move reference material to docs/"
    text = raw.decode("utf-8")
    head = text.split("\n## ", 1)[0]  # before the first section
    block = head.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == [FIRST, SECOND]
    assert text.index("```bash") < text.index("\n## ")


def test_readme_links_resolve():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


# --------------------------------------------------------------------------- no project tracking
TRACKING = [
    (r"\bissues?\s*#?\d+", "an issue number"),
    (r"(?<![\w&/#`])#\d+\b", "an issue number"),
    (r"\bclosing notes?\b", "a closing note"),
    (r"\bnarrowly missed\b", "a missed goal"),
    (r"\bgoals?\b", "a goal"),
    (r"\b(?:targets?|stretch)\b[^.\n]{0,40}?\b(?:met|missed|reached)\b", "a target"),
    (r"\b(?:met|missed|reached|short of|within)\s+(?:the\s+)?(?:\S+\s+)?targets?\b", "a target"),
    (r"\btargets?\s*[:(]?\s*[≤≥<>~]?\s*\d", "a target figure"),
    (r"\d\s*[×x%]?\s+targets?\b", "a target figure"),
]


def tracking_words(text: str) -> list:
    found = []
    for pattern, what in TRACKING:
        for m in re.finditer(pattern, text, flags=re.I):
            line = text.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {m.group(0)!r} ({what})")
    return found


def _user_pages():
    pages = {"README.md": README, "CHANGELOG.md": ROOT / "CHANGELOG.md", "CONTRIBUTING.md": ROOT / "CONTRIBUTING.md"}
    pages.update({f"docs/{p.name}": p for p in sorted(DOCS.glob("*.md"))})
    return pages


@pytest.mark.parametrize("name", sorted(_user_pages()))
def test_no_project_tracking_in_user_documentation(name):
    text = _user_pages()[name].read_text(encoding="utf-8")
    if name.startswith("docs/"):
        text = gen.fill(text)  # the generated parts too
    found = tracking_words(text)
    assert not found, f"{name} holds project tracking, not user documentation:\n" + "\n".join(found)


def test_the_tracking_check_catches_what_it_should():
    caught = ["issue 14", "(#14)", "the closing notes of the issue", "all three narrowly missed",
              "Goals of the serving work", "the 30× target", "target 99%", "short of the 1.5× target",
              "targets are met", "stretch missed"]
    for text in caught:
        assert tracking_words(text), text
    fine = ["target modules", "--target-ratio 6", "`target_ratio=6`", "target repo, owner/name", "LoRA-targeted",
            "the same target (only folders lorashare named)", "`#lorashare-compress`", "k=32 fp32", "C#"]
    for text in fine:
        assert not tracking_words(text), text


# --------------------------------------------------------------------------- the site builds
@pytest.mark.slow
def test_mkdocs_build_strict_succeeds(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the docs extra is not installed ({', '.join(missing)}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HTTP_PROXY": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9"}  # offline: anything fetched would fail the build
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    cli = html.unescape((site / "cli" / "index.html").read_text(encoding="utf-8"))
    for verb, sub in gen.subcommands(build_parser()).items():
        assert f"lorashare {verb}" in cli
        for _, names in _options(sub):
            assert all(n in cli for n in names), (verb, names)
    action = html.unescape((site / "action" / "index.html").read_text(encoding="utf-8"))
    meta = yaml.safe_load((ROOT / "action.yml").read_text(encoding="utf-8"))
    assert all(name in action for name in [*meta["inputs"], *meta["outputs"]])
    assert (site / "space.png").is_file() and (site / "api" / "index.html").is_file()
    for page in site.rglob("*.html"):
        assert "fonts.googleapis.com" not in page.read_text(encoding="utf-8"), page
