"""Shared fixtures: a small trained digits run, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CNNREPAIR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A digits run directory with NN, LH and KH fitted (few epochs: fast, still well above chance)."""
    from cnnrepair.cli import main

    out = tmp_path_factory.mktemp("digits_run")
    assert main(["--quiet", "train", "--out", str(out), "--epochs", "12"]) == 0
    assert main(["--quiet", "hybrid", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def digits():
    from cnnrepair.data import load_digits

    return load_digits()


@pytest.fixture
def readme_example():
    """``find(marker)``: the first python block of the README, then the guide, that contains ``marker``, as source to run."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text() + "\n" + (root / "docs" / "guide.md").read_text()
    blocks = [blk.split("```", 1)[0] for blk in text.split("```python\n")[1:]]

    def find(marker: str) -> str:
        return next(blk for blk in blocks if marker in blk)

    return find
