"""The layers import downwards only: launcher -> trainer -> data_pipeline."""

from __future__ import annotations

import ast

import pytest

from helpers import REPO

FORBIDDEN = {"data_pipeline": {"trainer", "launcher"}, "trainer": {"launcher"}}


def imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    for path in files:
        wrong = imported_packages(path) & FORBIDDEN[package]
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


# DeepSpeed lives behind the engine boundary; the plan compares with DeepSpeed's own memory estimators.
DEEPSPEED_ALLOWED = ("trainer/engine/", "launcher/plan.py")


def test_only_the_engine_imports_deepspeed():
    for package in ("launcher", "trainer", "data_pipeline"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = str(path.relative_to(REPO))
            if "deepspeed" in imported_packages(path):
                assert name.startswith(DEEPSPEED_ALLOWED), f"{name} imports deepspeed"


def test_the_deepspeed_version_is_named_once():
    """The version every repair and limit was measured with: one constant (trainer/engine/__init__.py)."""
    named = [str(path.relative_to(REPO)) for package in ("launcher", "trainer", "data_pipeline")
             for path in sorted((REPO / package).rglob("*.py")) if "0.19.8" in path.read_text()]
    assert named == ["trainer/engine/__init__.py"]


LONGEST = 60  # lines of a function: longer ones decide too much in one place
ALLOWED = {("launcher/cli.py", "_parser")}  # the argparse builder: one flat list of flags


def test_functions_are_short():
    long = []
    for package in ("launcher", "trainer", "data_pipeline"):
        for path in sorted((REPO / package).rglob("*.py")):
            name = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (name, node.name) not in ALLOWED:
                    lines = node.end_lineno - node.lineno + 1
                    if lines > LONGEST:
                        long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
