"""The shape of the code, checked: the core never imports the paper's application, and no module
imports another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cnnrepair"
# the paper's pipeline, an application on top of the core, and the command line beside it
APPLICATION = {"training", "hybrid", "experiment", "evaluation", "pipeline", "rundir", "report", "models", "cli"}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cnnrepair"):
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cnnrepair"):
                    yield a.name, []


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def test_the_core_imports_nothing_of_the_paper_application():
    core = [p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0].removesuffix(".py") not in APPLICATION]
    assert len(core) > 20
    bad = [(_module(p), mod) for p in core for mod, _ in _imports(p)
           if mod.split(".")[1:2] and mod.split(".")[1] in APPLICATION]
    assert bad == []


def test_no_module_imports_a_private_name_of_another():
    bad = [(_module(p), mod, name) for p in SRC.rglob("*.py") for mod, names in _imports(p) for name in names
           if name.startswith("_") and not name.startswith("__")]
    assert bad == []
