"""Every DVC stage depends on all the code it runs, so `dvc repro` never reports stale results.

A stage's command is ``imgclf <step> ...``: it runs the CLI package, the step handlers in
``imgclf.cli.steps`` and the step module ``imgclf.steps.<step>``, plus everything those import,
including imports inside functions (torch-heavy code is imported lazily). The import closure is
computed from the source with ``ast``, not by importing, so a lazy import counts too. The CLI
dispatches one stage to one step, so the closure does not follow the CLI into other steps.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from _repo_copy import REPO, clone_repo, sh

SRC = REPO / "src"
STAGES = ("ingest", "validate", "train", "evaluate", "deploy")
CLI_ROOTS = ("imgclf", "imgclf.cli", "imgclf.cli.steps", "imgclf.__main__")
# Commands a stage starts in a subprocess: deploy's smoke test runs `imgclf serve`.
SUBPROCESS_ROOTS = {"deploy": ("imgclf.cli.serve",)}


def module_file(name: str) -> Path | None:
    """The source file of an ``imgclf`` module or package, None if there is none."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """The ``imgclf`` modules ``path`` imports anywhere in its body (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *filter(None, [node.module])])
            found.add(base)
            # `from imgclf.steps import train` imports a submodule, not only a name
            found.update(f"{base}.{alias.name}" for alias in node.names)
    modules = set()
    for module in found:
        if module.split(".")[0] != "imgclf":
            continue
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = module.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {m for m in modules if module_file(m) is not None}


def stage_closure(step: str) -> set[Path]:
    """Source files the ``imgclf <step>`` command can execute."""
    others = [s for s in STAGES if s != step]

    def other_step(name: str) -> bool:
        # imgclf.steps.<s> and its helpers imgclf.steps.<s>_* (train_launch) are <s>'s code
        module = name.removeprefix("imgclf.steps.")
        return module != name and any(module == s or module.startswith(f"{s}_") for s in others)

    todo = [*CLI_ROOTS, *SUBPROCESS_ROOTS.get(step, ()), f"imgclf.steps.{step}"]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or other_step(name):
            continue
        seen.add(name)
        path = module_file(name)
        assert path is not None, name
        todo.extend(imported_modules(path, name))
    return {module_file(m) for m in seen}  # type: ignore[misc]


def stage_deps(stage: str) -> list[Path]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    return [REPO / dep for dep in spec["deps"]]


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_depends_on_every_module_its_command_runs(stage: str) -> None:
    deps = stage_deps(stage)
    for dep in deps:
        if SRC in dep.parents:
            assert dep.exists(), f"dvc.yaml stage {stage!r} depends on missing {dep}"
    missing = sorted(str(p.relative_to(REPO)) for p in stage_closure(stage) if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs but does not depend on {missing}"


def test_closure_follows_lazy_imports_and_not_other_steps() -> None:
    train = {str(p.relative_to(SRC)) for p in stage_closure("train")}
    assert "imgclf/training/engine.py" in train  # imported inside a function of the step
    assert "imgclf/steps/ingest.py" not in train
    assert "imgclf/training/engine.py" not in {
        str(p.relative_to(SRC)) for p in stage_closure("ingest")
    }


def _changed_stages(repo: Path) -> set[str]:
    """Stages `dvc status` reports as changed (its JSON keys are the stage names)."""
    status = json.loads(sh(repo, "dvc", "status", "--json").stdout or "{}")
    return set(status)


@pytest.mark.slow
def test_editing_a_shared_module_makes_dvc_rerun_exactly_its_users(tmp_path: Path) -> None:
    repo = clone_repo(tmp_path, min_accuracy=0.0)
    sh(repo, "imgclf", "data", "ensure")
    sh(repo, "dvc", "repro")
    assert _changed_stages(repo) == set()

    users = {
        stage for stage in STAGES if SRC / "imgclf/training/presets.py" in stage_closure(stage)
    }
    assert {"train", "evaluate"} <= users and "ingest" not in users
    for module, expected in (
        ("src/imgclf/training/presets.py", users),
        ("src/imgclf/storage/base.py", set(STAGES)),
    ):
        path = repo / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# an edit\n")
        assert _changed_stages(repo) == expected, module
        path.write_bytes(original)
        assert _changed_stages(repo) == set()
