"""One run directory per experiment: config and seed, checkpoints, caches, results and report."""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import read_json, write_json

RESULTS = "results.json"
CONFIG = "config.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on."""
    import numpy
    import scipy
    import sklearn
    import torch

    import cnnrepair

    out = {"python": platform.python_version(), "cnnrepair": cnnrepair.__version__, "torch": torch.__version__,
           "numpy": numpy.__version__, "scipy": scipy.__version__, "scikit-learn": sklearn.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("highspy", "foolbox", "cvxopt", "cvxpy", "onnx", "onnxruntime", "ml_dtypes"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


class RunDir:
    """A directory holding everything one experiment wrote, with atomic JSON updates."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def sub(self, *parts: str) -> Path:
        """A path inside the run directory (parents created)."""
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def _read(self, name: str) -> dict[str, Any]:
        p = self.path / name
        if not p.is_file():
            return {}
        obj = read_json(p)
        if not isinstance(obj, dict):
            raise CnnRepairError(f"{p}: not a cnnrepair {name} (holds a JSON {type(obj).__name__}, not an object); "
                                 f"delete it and rerun the step that writes it")
        return obj

    @property
    def config(self) -> dict[str, Any]:
        return self._read(CONFIG)

    def check(self, dataset: str | None = None) -> None:
        """Fail now, before any work, on an unreadable config/results file or a run made for another dataset."""
        if self.path.exists() and not self.path.is_dir():
            raise CnnRepairError(f"{self.path}: exists and is not a directory; choose another --out")
        cfg = self.config
        self.results  # noqa: B018 - reading validates it
        if dataset is not None and cfg and cfg.get("dataset") != dataset:
            raise CnnRepairError(f"{self.path}: run directory was made for dataset {cfg.get('dataset')!r}, not {dataset!r}; choose another --out")

    def init(self, dataset: str, settings: dict[str, Any]) -> dict[str, Any]:
        """Create or reopen the run for ``dataset``; refuse a run directory made for another dataset."""
        self.check(dataset)
        cfg = self.config
        cfg.setdefault("dataset", dataset)
        cfg.update(settings)
        cfg["versions"] = library_versions()
        cfg["argv"] = sys.argv
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.path / CONFIG, cfg)
        return cfg

    def require(self) -> dict[str, Any]:
        """The config of an existing run, or a one-line error saying how to make one."""
        cfg = self.config
        if not cfg:
            raise CnnRepairError(f"{self.path}: not a cnnrepair run directory (no {CONFIG}); run `cnnrepair train --out {self.path}` first")
        return cfg

    @property
    def results(self) -> dict[str, Any]:
        return self._read(RESULTS)

    def write_results(self, res: dict[str, Any]) -> None:
        """Replace results.json with ``res``, atomically (for removing stale entries, which a merge cannot)."""
        write_json(self.path / RESULTS, res)

    def update_results(self, **sections: Any) -> dict[str, Any]:
        """Merge ``sections`` into results.json (dicts merged one level deep), atomically."""
        res = self.results
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(res.get(key), dict):
                res[key] = {**res[key], **value}
            else:
                res[key] = value
        write_json(self.path / RESULTS, res)
        return res
