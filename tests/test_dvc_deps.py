"""dvc.yaml declares, for every stage, each in-repository module its command runs: a change to any
of them reruns the stage (editing the LPIPS module reruns training, editing evaluation code reruns
fid_ref), while a module the stage never imports leaves it cached."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unite", "stages", "flows")
# `data.source: "unite.data.loaders:shard_loader"`: modules named in strings are imported at run time.
MODULE_STRING = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(PACKAGES))


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(path: Path) -> set[str]:
    """Every module an in-repo file imports, at the top or inside functions, or names as 'mod:attr'."""
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (match := MODULE_STRING.match(node.value)):
            names.add(match.group(1))
    return {n for n in names if n.split(".")[0] in PACKAGES}


def modules_run_by(module: str) -> set[Path]:
    """The in-repo files executed by `python -m module`: its imports, transitively, with every
    package __init__ on the way."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(imported_names(path))
    return {p.relative_to(ROOT) for p in seen}


def stage_modules(cmd: str) -> list[str]:
    return re.findall(r"-m\s+([\w.]+)", cmd)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    spec = STAGES[stage]
    modules = stage_modules(spec["cmd"])
    assert modules, f"{stage}: cmd {spec['cmd']!r} runs no `-m module` this test can follow"
    deps = [Path(dep) for dep in spec.get("deps", [])]
    ran = set().union(*(modules_run_by(m) for m in modules))
    missing = sorted(str(f) for f in ran if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage} runs these files but does not depend on them: {missing}"


def test_the_import_walk_follows_lazy_imports_and_module_strings() -> None:
    # unite.model imports unite.perceptual inside UNITE.__init__; stages.train names its loader as a string.
    assert Path("unite/perceptual.py") in modules_run_by("unite.model")
    assert Path("unite/data/loaders.py") in modules_run_by("stages.train")
    assert Path("unite/data/__init__.py") in modules_run_by("unite.data.loaders")
