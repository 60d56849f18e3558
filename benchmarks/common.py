"""What every benchmark shares: where results go, the machine record, a run's results, writing one file."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT.parent / "README.md"


def machine() -> dict:
    """Core count, platform, library versions and the date: recorded with every result."""
    from cnnrepair.rundir import library_versions

    return {"cores": os.cpu_count(), "platform": sys.platform, "versions": library_versions(),
            "measured": time.strftime("%Y-%m-%d", time.gmtime())}


def load_run(run: Path) -> dict:
    """A finished run's results.json, with its config.json under ``_config``."""
    res = json.loads((run / "results.json").read_text())
    res["_config"] = json.loads((run / "config.json").read_text())
    return res


def write_result(name: str, obj: dict) -> Path:
    """``benchmarks/results/NAME`` (written atomically)."""
    from cnnrepair.io import write_json

    path = RESULTS / name
    write_json(path, obj)
    return path
