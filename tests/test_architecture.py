"""The house rules, checked on the source: the package is laid out by layer, no import runs upward
or forms a cycle, the fronts use the public API only, and every module is named (with its one job)
in the README."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lorashare"
# The fronts: they call the library's public API and nothing else of it.
FRONTS = ["lorashare/cli.py", "lorashare/sync/run.py", "lorashare/sync/plan.py", "lorashare/sync/apply.py",
          "lorashare/sync/github_actions.py", "lorashare/sync/manifest.py", "space/app.py", "space/deploy.py"]
# The rooms of lorashare/, bottom to top: a module imports only from its own room or from rooms below it.
LAYERS = [
    {"errors", "utils"},  # the error tree; safe names and paths, human-readable text
    {"format"},           # the SHARE format on disk, and the values saved whole
    {"hub"},              # every Hub call; the model card
    {"peft"},             # PEFT adapters in (and rebuilt ones written out)
    {"codec"},            # the math, plan → fit → state, edits, statistics
    {"serving"},          # PeftModels, PEFT folders for engines, mixed batches, vLLM
    {"training"},         # learning in the subspace
    {"model"},            # SHAREModel, the facade
    {"sync"},             # a front: lorashare.yaml → Hub
    {"cli", "__main__"},  # the command
]
# Top-level modules are those users import (the package, its errors, the facade, the command).
TOP_LEVEL = {"__init__", "__main__", "errors", "model", "cli"}
FACADE_LINES = 400


def _name(path: Path) -> str:
    """``codec.state`` for lorashare/codec/state.py, ``hub`` for lorashare/hub/__init__.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> Dict[str, ast.Module]:
    return {_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


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


def _internal_deps(name: str, tree: ast.Module, known: Set[str], is_package: bool) -> Set[str]:
    """The modules of lorashare that ``name`` imports (a package counts as its ``__init__``)."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    deps: Set[str] = set()
    for node in _imports(tree):
        if node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            stem = base + (node.module.split(".") if node.module else [])
        elif node.module and node.module.split(".")[0] == "lorashare":
            stem = node.module.split(".")[1:]
        else:
            continue
        for alias in node.names:
            full = ".".join(stem + [alias.name])
            target = full if full in known else ".".join(stem) if stem else "__init__"
            if target in known and target != name:
                deps.add(target)
    return deps


def _graph() -> Dict[str, Set[str]]:
    mods = _modules()
    packages = {_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {n: _internal_deps(n, t, set(mods), n in packages) for n, t in mods.items()}


def _layer(module: str) -> int:
    room = module.split(".")[0]
    return next(i for i, rooms in enumerate(LAYERS) if room in rooms)


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert graph["model"] and graph["cli"] and graph["codec.build"], "the scan found no imports at all: it is broken"
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
        if name != "__init__":  # the package root re-exports the facade; its modules import only __version__
            visit(name, [name])
    assert not cycles, f"import cycles: {sorted(cycles)}"


def test_every_module_lives_in_a_room_and_imports_only_downward():
    graph = _graph()
    rooms = {room for layer in LAYERS for room in layer}
    top = {n for n in graph if "." not in n and not (PACKAGE / n).is_dir()}
    assert top == TOP_LEVEL, f"top-level modules other than the ones users import: {sorted(top ^ TOP_LEVEL)}"
    assert {n.split(".")[0] for n in graph if n != "__init__"} <= rooms
    upward = sorted(f"{n} → {d}" for n, deps in graph.items() if n != "__init__"
                    for d in deps if d != "__init__" and _layer(d) > _layer(n))
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    tree = ast.parse("from ..codec.state import SHAREState\nfrom . import storage\nfrom .. import hub\n")
    known = {"format.checkpoint", "format.storage", "codec.state", "hub"}
    deps = _internal_deps("format.checkpoint", tree, known, False)
    assert deps == {"codec.state", "format.storage", "hub"}
    assert [d for d in deps if _layer(d) > _layer("format.checkpoint")] != []


def test_the_facade_stays_thin():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SHAREModel")
    lines = cls.end_lineno - cls.lineno + 1
    assert lines <= FACADE_LINES, f"SHAREModel is {lines} lines (at most {FACADE_LINES}): move the work behind functions"


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
        "import lorashare.format.checkpoint as ck\nhub._retry(1)\nck._inside('a', 'b')\nhub.endpoint()\n"
    )
    found = _private_uses(sample)
    assert len(found) == 4, found
    assert not any("endpoint" in f for f in found)


def module_jobs() -> Dict[str, str]:
    """``{"codec/state.py": "its one job", ...}`` from docs/modules.md's table."""
    text = (ROOT / "docs" / "modules.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| `lorashare/([a-z_/]+\.py)` \| ([^|]+?) \|", text, flags=re.M))


def test_every_module_is_named_with_its_job():
    rows = module_jobs()
    files = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(rows) == files, "docs/modules.md's table and lorashare/**/*.py differ"
    assert all(len(job.split()) >= 2 for job in rows.values())


def test_every_room_says_what_it_holds():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 8, f"{init.relative_to(ROOT)} has no docstring saying what the room holds"
