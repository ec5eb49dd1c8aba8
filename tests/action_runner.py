"""Run a composite GitHub Action (``action.yml``) locally, the way a runner would, for tests.

What it does, per step, in order:

* ``run:`` steps are executed as written with ``bash --noprofile --norc -eo pipefail FILE`` (what
  GitHub runs for ``shell: bash``), in the workspace, with a simulated runner environment:
  ``GITHUB_ACTIONS=true``, ``GITHUB_WORKSPACE``, ``RUNNER_TEMP``, ``GITHUB_ACTION_PATH``, and a fresh
  ``GITHUB_OUTPUT``, ``GITHUB_STEP_SUMMARY``, ``GITHUB_ENV`` and ``GITHUB_PATH`` file per step (``GITHUB_ENV``
  and ``GITHUB_PATH`` apply to later steps, as on GitHub).  The process environment is *not*
  inherited: only ``PATH``, ``LANG`` and what the caller passes in ``env`` (plus a private ``HOME``).
* ``env:`` values and ``with:`` values have their ``${{ ... }}`` expressions substituted.  Supported:
  ``inputs.NAME`` (declared inputs only; defaults applied), ``steps.ID.outputs.NAME``,
  ``github.action_path``, ``github.workspace``, ``runner.temp``, ``runner.os``.  Anything else is an
  error, and so is any ``${{`` inside a ``run:`` script (inputs must travel through ``env:``).
* ``uses:`` steps are stubbed: a callable per action (``owner/name`` without the ref) returns the
  step's outputs.  The default stub for ``actions/setup-python`` answers ``python-path`` = this
  interpreter.  An action with no stub is an error.
* A failing step stops the action (later steps are skipped, as with the default ``if: success()``);
  step ``if:`` conditions are not supported (an error, so the action must not rely on them).

The result holds each step's exit code, stdout, stderr and outputs, the action's outputs (its
``outputs.*.value`` expressions), the concatenated job summary, and the workflow commands seen on
stdout/stderr (``::add-mask::`` values, ``::error`` lines, group nesting).  ``log`` is the
combined stdout+stderr with masked values replaced by ``***``, as the runner would show it.

The install step runs for real (a venv under ``RUNNER_TEMP``, ``pip install`` of the action's own
checkout) unless ``LORASHARE_ACTION_PYTHON`` is in ``env``: the step then uses that interpreter
(documented behaviour of the action, also meant for self-hosted runners), and everything else runs
unchanged.  A real install needs a package index: pass pip's settings (``PIP_*``) in ``env``, since
nothing else of this process's environment reaches the steps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import yaml

__all__ = ["ActionRunner", "ActionResult", "StepResult", "ActionRunnerError", "parse_output_file"]

EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
Stub = Callable[[Dict[str, str]], Dict[str, str]]


class ActionRunnerError(Exception):
    """The action uses something this runner does not model (or breaks a rule it enforces)."""


@dataclass
class StepResult:
    id: str
    name: str
    rc: int
    stdout: str = ""
    stderr: str = ""
    outputs: Dict[str, str] = field(default_factory=dict)
    summary: str = ""
    env: Dict[str, str] = field(default_factory=dict)  # the step's own env: values, substituted
    argv: List[str] = field(default_factory=list)


@dataclass
class ActionResult:
    rc: int
    steps: List[StepResult]
    outputs: Dict[str, str]
    summary: str
    masks: List[str]
    errors: List[str]  # "::error ...::message" lines
    groups_balanced: bool

    @property
    def stdout(self) -> str:
        return "".join(s.stdout for s in self.steps)

    @property
    def stderr(self) -> str:
        return "".join(s.stderr for s in self.steps)

    @property
    def log(self) -> str:
        text = self.stdout + self.stderr
        for m in sorted(self.masks, key=len, reverse=True):
            text = text.replace(m, "***")
        return text

    def step(self, step_id: str) -> StepResult:
        for s in self.steps:
            if s.id == step_id:
                return s
        raise KeyError(step_id)


def parse_output_file(text: str) -> Dict[str, str]:
    """Parse a ``GITHUB_OUTPUT``/``GITHUB_ENV`` file: ``name=value`` lines and ``name<<DELIM`` blocks."""
    out: Dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.strip():
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            body: List[str] = []
            while i < len(lines) and lines[i] != delim:
                body.append(lines[i])
                i += 1
            if i >= len(lines):
                raise ActionRunnerError(f"unterminated {name}<<{delim} block")
            i += 1
            out[name] = "\n".join(body)
        elif "=" in line:
            name, value = line.split("=", 1)
            out[name] = value
        else:
            raise ActionRunnerError(f"bad output line {line!r}")
    return out


def _setup_python_stub(with_: Dict[str, str]) -> Dict[str, str]:
    return {"python-path": sys.executable, "python-version": "{}.{}.{}".format(*sys.version_info[:3]), "cache-hit": "false"}


class ActionRunner:
    """Run ``action.yml``'s composite steps; see the module docstring."""

    def __init__(self, action_dir: os.PathLike | str, *, workspace: os.PathLike | str, runner_temp: os.PathLike | str,
                 env: Optional[Mapping[str, str]] = None, stubs: Optional[Mapping[str, Stub]] = None) -> None:
        self.action_dir = Path(action_dir).resolve()
        self.workspace = Path(workspace).resolve()
        self.runner_temp = Path(runner_temp).resolve()
        self.extra_env = dict(env or {})
        self.stubs: Dict[str, Stub] = {"actions/setup-python": _setup_python_stub, **(stubs or {})}
        self.action = self.load(self.action_dir / "action.yml")
        self.with_seen: Dict[str, Dict[str, str]] = {}

    @staticmethod
    def load(path: Path) -> Dict[str, Any]:
        action = yaml.safe_load(path.read_text(encoding="utf-8"))
        runs = action.get("runs") or {}
        if runs.get("using") != "composite":
            raise ActionRunnerError(f"{path}: runs.using is {runs.get('using')!r}, this runner runs composite actions")
        return action

    # ------------------------------------------------------------------ expressions
    def _eval(self, expr: str, inputs: Mapping[str, str], steps: Mapping[str, StepResult]) -> str:
        m = re.fullmatch(r"inputs\.([A-Za-z_][A-Za-z0-9_-]*)", expr)
        if m:
            if m.group(1) not in inputs:
                raise ActionRunnerError(f"${{{{ {expr} }}}}: no such input")
            return inputs[m.group(1)]
        m = re.fullmatch(r"steps\.([A-Za-z_][A-Za-z0-9_-]*)\.outputs\.([A-Za-z_][A-Za-z0-9_-]*)", expr)
        if m:
            step = steps.get(m.group(1))
            return step.outputs.get(m.group(2), "") if step else ""
        fixed = {
            "github.action_path": str(self.action_dir),
            "github.workspace": str(self.workspace),
            "runner.temp": str(self.runner_temp),
            "runner.os": "Linux",
        }
        if expr in fixed:
            return fixed[expr]
        raise ActionRunnerError(f"unsupported expression ${{{{ {expr} }}}}")

    def substitute(self, value: Any, inputs: Mapping[str, str], steps: Mapping[str, StepResult]) -> str:
        text = "" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        return EXPR.sub(lambda m: self._eval(m.group(1), inputs, steps), text)

    # ------------------------------------------------------------------------ run
    def inputs_with_defaults(self, given: Mapping[str, str]) -> Dict[str, str]:
        declared = self.action.get("inputs") or {}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            raise ActionRunnerError(f"inputs not declared by the action: {unknown}")
        out: Dict[str, str] = {}
        for name, spec in declared.items():
            spec = spec or {}
            if name in given:
                out[name] = str(given[name])
            else:
                default = spec.get("default", "")
                out[name] = str(default).lower() if isinstance(default, bool) else str(default)
        return out

    def base_env(self) -> Dict[str, str]:
        home = self.runner_temp / "_home"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_ACTION_PATH": str(self.action_dir),
            "RUNNER_TEMP": str(self.runner_temp),
            "RUNNER_OS": "Linux",
            "GITHUB_REPOSITORY": "acme/support-adapters",
            "GITHUB_SHA": "0" * 40,
            "GITHUB_EVENT_NAME": "push",
        }
        env.update(self.extra_env)
        return env

    def run(self, inputs: Optional[Mapping[str, str]] = None, *, only: Optional[Sequence[str]] = None,
            timeout: float = 300) -> ActionResult:
        """Run the steps (all, or those whose id is in ``only``); return an :class:`ActionResult`."""
        ins = self.inputs_with_defaults(inputs or {})
        env = self.base_env()
        results: Dict[str, StepResult] = {}
        ordered: List[StepResult] = []
        rc = 0
        self.runner_temp.mkdir(parents=True, exist_ok=True)
        for index, step in enumerate(self.action["runs"]["steps"]):
            sid = str(step.get("id") or f"__step{index}")
            if only is not None and sid not in only:
                continue
            if "if" in step:
                raise ActionRunnerError(f"step {sid}: `if:` is not supported by this runner")
            if "uses" in step:
                res = self._uses(step, sid, ins, results)
            elif "run" in step:
                res = self._run_step(step, sid, ins, results, env, timeout)
            else:
                raise ActionRunnerError(f"step {sid}: neither run nor uses")
            results[sid] = res
            ordered.append(res)
            if res.rc != 0:
                rc = res.rc
                break
        outputs = {name: self.substitute((spec or {}).get("value", ""), ins, results)
                   for name, spec in (self.action.get("outputs") or {}).items()}
        masks, errors, balanced = _commands("".join(s.stdout + s.stderr for s in ordered))
        return ActionResult(rc=rc, steps=ordered, outputs=outputs, summary="".join(s.summary for s in ordered),
                            masks=masks, errors=errors, groups_balanced=balanced)

    def _uses(self, step: Mapping[str, Any], sid: str, ins: Mapping[str, str], results: Mapping[str, StepResult]) -> StepResult:
        ref = str(step["uses"])
        name = ref.split("@", 1)[0]
        stub = self.stubs.get(name)
        if stub is None:
            raise ActionRunnerError(f"step {sid}: no stub for {ref}")
        with_ = {k: self.substitute(v, ins, results) for k, v in (step.get("with") or {}).items()}
        self.with_seen[sid] = with_
        return StepResult(id=sid, name=str(step.get("name", ref)), rc=0, outputs=dict(stub(with_)), env=with_)

    def _run_step(self, step: Mapping[str, Any], sid: str, ins: Mapping[str, str], results: Mapping[str, StepResult],
                  env: Dict[str, str], timeout: float) -> StepResult:
        script = str(step["run"])
        if "${{" in script:
            raise ActionRunnerError(f"step {sid}: `${{{{` inside run: — pass values through env: instead")
        shell = step.get("shell")
        if shell != "bash":
            raise ActionRunnerError(f"step {sid}: shell {shell!r}; this runner runs `shell: bash` steps")
        step_env = {k: self.substitute(v, ins, results) for k, v in (step.get("env") or {}).items()}
        files = {}
        runner_dir = self.runner_temp / "_runner"
        runner_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"step-{sid}-", dir=runner_dir))
        for var in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV", "GITHUB_PATH"):
            files[var] = tmp / var.lower()
            files[var].write_text("")
        script_path = tmp / "script.sh"
        script_path.write_text(script, encoding="utf-8")
        full_env = {**env, **step_env, **{k: str(v) for k, v in files.items()}}
        argv = ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_path)]
        proc = subprocess.run(argv, cwd=str(step.get("working-directory") or self.workspace), env=full_env,
                              capture_output=True, text=True, timeout=timeout)
        outputs = parse_output_file(files["GITHUB_OUTPUT"].read_text(encoding="utf-8"))
        env.update(parse_output_file(files["GITHUB_ENV"].read_text(encoding="utf-8")))
        extra_path = [p for p in files["GITHUB_PATH"].read_text(encoding="utf-8").splitlines() if p.strip()]
        if extra_path:
            env["PATH"] = os.pathsep.join(list(reversed(extra_path)) + [env["PATH"]])
        return StepResult(id=sid, name=str(step.get("name", sid)), rc=proc.returncode, stdout=proc.stdout,
                          stderr=proc.stderr, outputs=outputs, summary=files["GITHUB_STEP_SUMMARY"].read_text(encoding="utf-8"),
                          env=step_env, argv=argv)


def _commands(text: str) -> tuple:
    """``(add-mask values, ::error lines, groups balanced)`` from workflow commands in ``text``."""
    masks: List[str] = []
    errors: List[str] = []
    depth = 0
    balanced = True
    for line in text.splitlines():
        if line.startswith("::add-mask::"):
            masks.append(line[len("::add-mask::"):])
        elif line.startswith("::error"):
            errors.append(line)
        elif line.startswith("::group::"):
            if depth:
                balanced = False  # GitHub does not nest groups
            depth += 1
        elif line.startswith("::endgroup::"):
            depth -= 1
            if depth < 0:
                balanced = False
    return masks, errors, balanced and depth == 0
