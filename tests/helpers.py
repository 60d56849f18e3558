"""Small models and points shared by several test modules."""

from __future__ import annotations

import torch
from torch import nn


def small_mlp(seed: int = 0) -> nn.Module:
    """A 12 -> 24 -> 5 ReLU MLP on 1 x 3 x 4 inputs, seeded, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


def random_points(model: nn.Module, n: int, seed: int = 1):
    """``n`` seeded standard-normal inputs of shape 1 x 3 x 4 and the model's predictions on them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 3, 4, generator=g)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    return x, pred


def copy_run(digits_run, tmp_path, name: str = "run"):
    """A private copy of the session's digits run directory, as a RunDir."""
    import shutil

    from cnnrepair.paper.rundir import RunDir

    dest = tmp_path / name
    shutil.copytree(digits_run, dest)
    return RunDir(dest)


def last_error_line(capsys) -> str:
    """The last line the command wrote to stderr (there must be one)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "expected an error line"
    return lines[-1]


def pgd_in_box(objective, lo, hi, steps: int = 40, restarts: int = 3) -> list:
    """The end points (float32) of signed-gradient ascent on ``objective(x).sum()`` inside the box ``[lo, hi]``, one per
    random start: the attack the bound tests hold their bounds against."""
    ends = []
    for r in range(restarts):
        g = torch.Generator().manual_seed(r)
        x = (lo + (hi - lo) * torch.rand(lo.shape, generator=g, dtype=torch.float64)).float()
        for _ in range(steps):
            x.requires_grad_(True)
            grad, = torch.autograd.grad(objective(x).sum(), x)
            with torch.no_grad():
                x = torch.minimum(torch.maximum(x + 0.1 * (hi - lo).float() * grad.sign(), lo.float()), hi.float())
        ends.append(x.detach())
    return ends
