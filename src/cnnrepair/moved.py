"""Modules that moved: their old import paths keep working for one release, with a DeprecationWarning.

``import cnnrepair.training`` (0.1's path) gives the module now at ``cnnrepair.paper.training``:
the same module object, so state (registered heads, patched names) is shared. The table is the
record of what moved and where to.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old path -> new path
MOVED_MODULES = {f"cnnrepair.{name}": f"cnnrepair.paper.{name}"
                 for name in ("models", "training", "hybrid", "evaluation", "experiment", "pipeline", "rundir", "report")}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there (the old path goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.new)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module) -> None:  # the module is the new one, already executed
        return None


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old path of a moved module and hands back the new module."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
