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
    from cnnrepair.paper.rundir import library_versions

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


def compare(row: dict, other: str, ratio: str) -> None:
    """Where ``row["ours"]`` and ``row[other]`` both have an objective: their relative difference (to ours) and
    ``row[ratio]`` = other's seconds / ours (above 1: ours is faster)."""
    a, b = row[other].get("objective"), row["ours"].get("objective")
    if a is not None and b is not None:
        row["relative_difference"] = abs(a - b) / max(abs(b), 1e-300)
        row[ratio] = row[other]["seconds"] / row["ours"]["seconds"]


def run_cnnrepair(args: list[str]):
    """``cnnrepair --quiet ARGS`` in its own process, as a user runs it: (wall seconds, the completed process)."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cnnrepair.cli", "--quiet", *args], capture_output=True, text=True)
    return time.perf_counter() - t0, proc


def fit(model, x, y, epochs: int, seed: int) -> float:
    """Train ``model`` in place with Adam (lr 1e-3, batch 128, seeded shuffles) and leave it in eval mode; the seconds taken."""
    import time

    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return time.perf_counter() - t0
