"""dvc.yaml names every project module a stage imports, so DVC never calls stale outputs up to date."""

import ast
from pathlib import Path

import pytest
import yaml

from migm_shortcut.config import CONFIG_DIR, EXPERIMENT

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("migm_shortcut", "stages")
# Modules that only log to MLflow or switch telemetry off: a change there (or in what only they
# import) alters no DVC output, and listing them would rerun the whole pipeline for a logging fix.
NO_OUTPUT_EFFECT = {"migm_shortcut/telemetry.py", "migm_shortcut/tracking.py", "migm_shortcut/shortcut_model.py"}


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a package's __init__.py), None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = REPO / name.replace(".", "/")
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules `path` imports anywhere (also inside functions), by dotted name."""
    package = ".".join(path.relative_to(REPO).parent.parts)  # what a level-1 relative import names
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {n for n in names if module_file(n)}


def project_imports(module: str) -> set[str]:
    """Files (relative to the repo) of `module` and every project module it imports, transitively,
    with the __init__.py of every package on the way (Python runs them)."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:i]))
            rel = path.relative_to(REPO).as_posix() if path else None
            if rel and rel not in seen:
                seen.add(rel)
                todo += imported_modules(path) if rel not in NO_OUTPUT_EFFECT else []
    return seen


def runs_code(file: str) -> bool:
    """False for a package __init__.py that holds only a docstring (nothing an output depends on)."""
    body = ast.parse((REPO / file).read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_runs_a_stages_module():
    for name, stage in STAGES.items():
        assert stage["cmd"].startswith("python -m stages."), f"{name}: cmd {stage['cmd']!r}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_every_project_module_a_stage_imports(stage):
    module = STAGES[stage]["cmd"].split()[2]
    needed = {f for f in project_imports(module) - NO_OUTPUT_EFFECT if runs_code(f)}
    assert f"{module.replace('.', '/')}.py" in needed  # the derivation found the entry point itself
    missing = sorted(f for f in needed if not covered(f, STAGES[stage]["deps"]))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_that_tracks_a_section_depends_on_its_config_file(stage):
    """A section's settings live in params.yaml (the experiment, and keys added there) and in
    config/<section>.yaml: a stage tracking the section must depend on both, or a change to one
    of its config settings would leave stale outputs up to date. A single key tracked alone must be
    one of params.yaml's own."""
    params, deps = STAGES[stage]["params"], STAGES[stage]["deps"]
    sections = {p for p in params if "." not in p}
    wanted = {f"{CONFIG_DIR}/{s}.yaml" for s in sections if (REPO / CONFIG_DIR / f"{s}.yaml").is_file()}
    assert {d for d in deps if d.startswith(f"{CONFIG_DIR}/")} == wanted
    for key in (p for p in params if "." in p):
        section, name = key.split(".", 1)
        assert name in EXPERIMENT.get(section, ()), f"{stage} tracks {key}, a key of config/{section}.yaml"
