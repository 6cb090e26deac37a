"""dvc.yaml declares, for every stage, each in-repository module its command runs and each params
section it reads: a change to any of them reruns the stage (editing the LPIPS module reruns training,
editing evaluation code reruns fid_ref), while code a stage never runs leaves it cached (editing the
trainer does not reshard ImageNet). Its command gives the stage exactly the data paths declared as
its deps and outs."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from stages.params import STAGE_SECTIONS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unite", "stages", "flows")
# `data.source: "unite.data.loaders:shard_loader"`: modules named in strings are imported at run time.
MODULE_STRING = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(PACKAGES))
# stages/params.py imports code only inside the checks of the sections that need it: a stage runs
# a function's imports only when it reads the function's section (STAGE_SECTIONS).
PARAMS_MODULE = Path("stages/params.py")
PARAMS_FUNCTION_SECTIONS = {"train_config": "train", "_check_train": "train", "_check_sweep_kid": "sweep"}
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# Declared but not given: data/raw orders manifest after demo_data (the folder it lists is the param manifest.root).
NOT_GIVEN = {("manifest", Path("data/raw"))}


def module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported_names(path: Path, skip_functions: frozenset[str] = frozenset()) -> set[str]:
    """Modules an in-repo file imports (at the top, and inside functions other than `skip_functions`)
    or names as 'module:attribute'; `if TYPE_CHECKING:` blocks never run."""
    names = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    pending = list(ast.parse(path.read_text()).body)
    while pending:
        node = pending.pop()
        if _is_type_checking(node) or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                                       and node.name in skip_functions):
            continue
        pending.extend(ast.iter_child_nodes(node))
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


def modules_run_by(*modules: str, sections: tuple[str, ...] = ()) -> set[Path]:
    """The in-repo files executed by `python -m module`: its imports, transitively, with every
    package __init__ on the way. Of stages/params.py's functions that import, only those of the
    params `sections` the stage reads are followed."""
    skipped = frozenset(name for name, section in PARAMS_FUNCTION_SECTIONS.items() if section not in sections)
    seen: set[Path] = set()
    pending = list(modules)
    while pending:
        parts = pending.pop().split(".")
        for depth in range(1, len(parts) + 1):
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                is_params = path.relative_to(ROOT) == PARAMS_MODULE
                pending.extend(imported_names(path, skipped if is_params else frozenset()))
    return {p.relative_to(ROOT) for p in seen}


def stage_modules(stage: str, cmd: str) -> list[str]:
    """The modules `cmd` runs; `python -m stages.launch NAME` also runs stages.NAME under torchrun."""
    modules = re.findall(r"-m\s+([\w.]+)", cmd)
    if "stages.launch" in modules:
        modules += [f"stages.{name}" for name in re.findall(r"-m\s+stages\.launch\s+(\w+)", cmd)]
    return modules


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_runs_is_a_dependency(stage: str) -> None:
    spec = STAGES[stage]
    modules = stage_modules(stage, spec["cmd"])
    assert modules, f"{stage}: cmd {spec['cmd']!r} runs no `-m module` this test can follow"
    deps = [Path(dep) for dep in spec.get("deps", [])]
    ran = modules_run_by(*modules, sections=STAGE_SECTIONS.get(stage, ()))
    missing = sorted(str(f) for f in ran if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {stage} runs these files but does not depend on them: {missing}"


def test_no_code_dependency_is_empty() -> None:
    """DVC warns "'<file>' is empty." for every empty dependency, at every stage it checks."""
    code = {Path(dep) for spec in STAGES.values() for dep in spec.get("deps", []) if Path(dep).parts[0] in PACKAGES}
    empty = sorted(str(path) for path in code if (ROOT / path).stat().st_size == 0)
    assert not empty, f"empty files in dvc.yaml's deps make DVC warn on every run; give each a docstring: {empty}"


@pytest.mark.parametrize("stage", sorted(STAGE_SECTIONS))
def test_every_params_section_a_stage_reads_is_declared(stage: str) -> None:
    declared = STAGES[stage].get("params", [])
    if any(isinstance(item, dict) and "params.yaml" in item for item in declared):
        return  # the whole file
    sections = {str(item).split(".")[0] for item in declared}
    missing = sorted(set(STAGE_SECTIONS[stage]) - sections)
    assert not missing, f"dvc.yaml stage {stage} reads params sections {missing} without declaring them"


def test_the_import_walk_follows_lazy_imports_and_module_strings() -> None:
    # unite.model imports unite.perceptual inside UNITE.__init__; stages.train names its loader as a string.
    assert Path("unite/perceptual.py") in modules_run_by("unite.model")
    assert Path("unite/data/loaders.py") in modules_run_by("stages.train")
    assert Path("unite/data/__init__.py") in modules_run_by("unite.data.loaders")
    # The trainer is reached through params.py only where the train section is read, the evaluation
    # code only where the sweep section is.
    assert Path("unite/train_config.py") not in modules_run_by("stages.shard", sections=("manifest", "shard"))
    assert Path("unite/train_config.py") in modules_run_by("stages.shard", sections=("train",))
    assert Path("unite/evaluation.py") not in modules_run_by("stages.params", sections=("train",))
    assert Path("unite/evaluation.py") in modules_run_by("stages.params", sections=("sweep",))


def test_every_function_of_params_that_imports_names_its_section() -> None:
    """A new lazy import in stages/params.py must say which section's check runs it, or the walk
    above would follow it for every stage or for none."""
    tree = ast.parse((ROOT / PARAMS_MODULE).read_text())
    importing = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                 and any(isinstance(inner, (ast.Import, ast.ImportFrom)) for inner in ast.walk(node))}
    assert importing == set(PARAMS_FUNCTION_SECTIONS)
    assert set(PARAMS_FUNCTION_SECTIONS.values()) <= {s for sections in STAGE_SECTIONS.values() for s in sections}


def declared(spec: dict, *keys: str) -> set[Path]:
    """The data paths (not code) under the stage's `keys`; an entry is a path or {path: options}."""
    entries = [entry for key in keys for entry in spec.get(key, [])]
    paths = {Path(next(iter(entry)) if isinstance(entry, dict) else entry) for entry in entries}
    return {path for path in paths if path.parts[0] not in PACKAGES}


def given_paths(cmd: str) -> tuple[set[Path], set[Path]]:
    """The paths `cmd` gives its stage module as inputs and as outputs, by the module's own options."""
    python, flag, module, *options = shlex.split(cmd)
    assert (python, flag) == ("python", "-m"), cmd
    if module == "stages.launch":
        module, options = f"stages.{options[0]}", options[1:]
    parser = importlib.import_module(module).arguments()
    args = parser.parse_args(options)
    inputs = {getattr(args, dest) for dest, option in parser.path_options.items() if option.is_input}
    outputs = {getattr(args, dest) for dest, option in parser.path_options.items() if not option.is_input}
    return inputs, outputs


def _covered(path: Path, given: set[Path]) -> bool:
    """`path` is given, lies in a given folder, or is the file of the same name beside a given one
    (the export's config beside its weights)."""
    return any(path == g or g in path.parents or (path.parent, path.stem) == (g.parent, g.stem) for g in given)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_is_given_exactly_the_data_paths_it_declares(stage: str) -> None:
    spec = STAGES[stage]
    inputs, outputs = given_paths(spec["cmd"])
    deps, outs = declared(spec, "deps"), declared(spec, "outs", "metrics", "plots")
    assert inputs <= deps, f"{stage}: given inputs {sorted(map(str, inputs - deps))} are not deps"
    folders_of_outs = {folder for out in outs for folder in out.parents}
    assert outputs <= outs | folders_of_outs, f"{stage}: given outputs {sorted(map(str, outputs - outs))} are not outs"
    not_given = sorted(str(d) for d in deps if not _covered(d, inputs) and (stage, d) not in NOT_GIVEN)
    assert not not_given, f"{stage}: deps {not_given} are not given to the stage"
    not_written = sorted(str(out) for out in outs if not _covered(out, outputs))
    assert not not_written, f"{stage}: outs {not_written} are not given to the stage"
