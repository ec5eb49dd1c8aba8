"""The house rules, checked on the source: no import cycle, fronts through the public API only,
and every module named (with its one job) in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorashare"
# The fronts: they call the library's public API and nothing else of it.
FRONTS = ["lorashare/cli.py", "lorashare/sync.py", "lorashare/sync_plan.py", "lorashare/sync_apply.py",
          "lorashare/github_actions.py", "lorashare/manifest.py", "space/app.py", "space/deploy.py"]


def _modules() -> Dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.AST) -> Iterator[ast.ImportFrom]:
    """Every ``from … import …`` that runs: top level and inside functions, not under ``if TYPE_CHECKING``."""
    def walk(node: ast.AST) -> Iterator[ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                yield child
            yield from walk(child)
    return walk(tree)


def _internal_deps(name: str, tree: ast.Module, known: Set[str]) -> Set[str]:
    deps: Set[str] = set()
    for node in _imports(tree):
        if node.level == 1:
            targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        elif node.module and node.module.split(".")[0] == "lorashare":
            parts = node.module.split(".")
            targets = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
        else:
            continue
        deps.update(t for t in targets if t in known and t != name)
    return deps


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    graph = {name: _internal_deps(name, tree, set(mods)) for name, tree in mods.items()}
    assert graph["model"] and graph["cli"], "the scan found no imports at all: it is broken"
    cycles: Set[Tuple[str, ...]] = set()

    def visit(node: str, path: List[str]) -> None:
        for dep in graph[node]:
            if dep in path:
                cycle = path[path.index(dep):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            else:
                visit(dep, path + [dep])

    for name in graph:
        visit(name, [name])
    assert not cycles, f"import cycles: {sorted(cycles)}"


def _private_uses(path: Path) -> List[str]:
    """Private names of lorashare or huggingface_hub that ``path`` imports or reaches through a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: List[str] = []
    module_aliases: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = ("." * node.level) + (node.module or "")
            ours = node.level > 0 or mod.split(".")[0] in ("lorashare", "huggingface_hub")
            if not ours:
                continue
            if any(part.startswith("_") for part in (node.module or "").split(".")):
                found.append(f"{path.name}:{node.lineno}: from {mod} import …")
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno}: from {mod} import {alias.name}")
                module_aliases.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("lorashare", "huggingface_hub"):
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(f"{path.name}:{node.lineno}: import {alias.name}")
                    module_aliases.add((alias.asname or alias.name).split(".")[0])
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in module_aliases):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_fronts_use_only_public_names():
    for rel in FRONTS:
        assert (ROOT / rel).is_file(), rel
    bad = [use for rel in FRONTS for use in _private_uses(ROOT / rel)]
    assert not bad, "fronts reach private names:\n" + "\n".join(bad)


def test_the_private_name_scan_catches_what_it_should(tmp_path):
    sample = tmp_path / "front.py"
    sample.write_text(
        "from lorashare import hub\nfrom lorashare.hub import _api\nfrom huggingface_hub._oidc import x\n"
        "import lorashare.checkpoint as ck\nhub._retry(1)\nck._inside('a', 'b')\nhub.endpoint()\n"
    )
    found = _private_uses(sample)
    assert len(found) == 4, found
    assert not any("endpoint" in f for f in found)


def test_readme_names_every_module_and_its_job():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## How it works", 1)[1]
    rows = dict(re.findall(r"^\| `lorashare/([a-z_]+\.py)` \| ([^|]+?) \|", section, flags=re.M))
    files = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(rows) == files, "README's module table and lorashare/*.py differ"
    assert all(len(job.split()) >= 2 for job in rows.values())
