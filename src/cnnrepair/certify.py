"""Certified accuracy: which inputs provably keep their label over a whole L-infinity ball, and an attack to test it.

``certify`` bounds the features of the network's frozen part over each ball
(:func:`cnnrepair.bounds.feature_bounds`) and takes the worst case of every logit difference of
the (linear) last layer over that box: a point is certified when the worst case of
``logit[y] - logit[j]`` is positive for every other class ``j``. Because the frozen part does not
change under last-layer repair, the same bounds certify the original and every repaired layer:
:meth:`Certification.with_layer` re-scores them without propagating again.

``pgd_accuracy`` is the other side: projected gradient descent on the margin, with random restarts,
inside the very box that was certified. Sound bounds imply ``pgd_accuracy >= certified accuracy``
on the same points, always; a test and the benchmark check it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnrepair.bounds import BallInputs, FeatureBounds, feature_bounds
from cnnrepair.repair.layer import last_layer
from cnnrepair.repair.program import MarginProblem


@dataclass
class Certification:
    """Worst-case margins of points over their balls (certified where > 0), and the bounds behind them."""

    eps: float
    method: str
    labels: np.ndarray
    margins: np.ndarray
    bounds: FeatureBounds
    layer: str
    seconds: float

    @property
    def certified(self) -> np.ndarray:
        return self.margins > 0

    @property
    def accuracy(self) -> float:
        """Certified accuracy: the share of points whose whole ball keeps the label."""
        return float(self.certified.mean()) if len(self.margins) else 0.0

    def with_layer(self, weight: np.ndarray, bias: np.ndarray) -> Certification:
        """The same balls under another last layer (a repaired one): the feature bounds do not change."""
        margins = worst_margins(self.bounds, self.labels, weight, bias)
        return Certification(self.eps, self.method, self.labels, margins, self.bounds, self.layer, self.seconds)


def worst_margins(bounds: FeatureBounds, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per point, min over other classes j of the smallest ``logit[y] - logit[j]`` over its feature box."""
    problem = MarginProblem(weight, bias, bounds.centre, labels, 0.0, radii=bounds.radius)
    return problem.point_margins()


def certify(model: nn.Module, x, y, eps, method: str = "crown", layer: str | None = None, inputs: BallInputs | None = None,
            **old) -> Certification:
    """Certify each input ``x`` (model units) with label ``y`` over its ball of radius ``eps`` (pixels; one, or one
    per input), taken as ``inputs`` says (:class:`cnnrepair.bounds.BallInputs`: the model's mean/std, the pixel
    range; default: pixels as they are, in [0, 1]). ``mean=``, ``std=``, ``domain=`` (0.1) still work for one
    release, with a DeprecationWarning."""
    if old:
        import warnings

        unknown = sorted(set(old) - {"mean", "std", "domain"})
        if unknown:
            raise TypeError(f"certify() got an unexpected keyword argument {unknown[0]!r}")
        warnings.warn("certify(mean=, std=, domain=) is deprecated: pass inputs=BallInputs(mean, std, domain)", DeprecationWarning,
                      stacklevel=2)
        base = inputs or BallInputs()
        inputs = BallInputs(old.get("mean", base.mean), old.get("std", base.std), old.get("domain", base.domain))
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    lo, hi = (inputs or BallInputs()).boxes(xt, eps)
    return certify_boxes(model, lo, hi, y, method, layer, eps=float(np.max(eps)))


def certify_boxes(model: nn.Module, lower, upper, y, method: str = "crown", layer: str | None = None,
                  eps: float = float("nan"), progress=None) -> Certification:
    """Certify each input box ``[lower, upper]`` (model units) with label ``y`` (``progress``: see ``feature_bounds``)."""
    t0 = time.perf_counter()
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, torch.Tensor) else lower).double()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, torch.Tensor) else upper).double()
    labels = np.asarray(y, np.int64)
    lay = last_layer(model, ((lower[:2] + upper[:2]) / 2).float(), layer)
    fb = feature_bounds(model, lay.name, lower, upper, method, progress=progress)
    margins = worst_margins(fb, labels, lay.weight, lay.bias)
    return Certification(eps, method, labels, margins, fb, lay.name, time.perf_counter() - t0)


def pgd_accuracy(model: nn.Module, lower, upper, y, steps: int = 50, restarts: int = 5, seed: int = 0,
                 batch_size: int = 256) -> np.ndarray:
    """Per input, True when PGD (margin loss, ``restarts`` random starts, ``steps`` steps each) finds no input of the
    box ``[lower, upper]`` (model units) that the model labels other than ``y``."""
    gen = torch.Generator().manual_seed(seed)
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, torch.Tensor) else lower).float()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, torch.Tensor) else upper).float()
    labels = torch.as_tensor(np.asarray(y, np.int64))
    robust = np.ones(len(labels), bool)
    for i in range(0, len(labels), batch_size):
        lo, hi, yb = lower[i:i + batch_size], upper[i:i + batch_size], labels[i:i + batch_size]
        step = 2.5 * (hi - lo) / 2 / steps
        alive = torch.ones(len(yb), dtype=torch.bool)
        for _ in range(restarts):
            x = lo + (hi - lo) * torch.rand(lo.shape, generator=gen)
            for _ in range(steps + 1):
                x.requires_grad_(True)
                out = model(x)
                while isinstance(out, (tuple, list)):
                    out = out[0]
                own = out.gather(1, yb[:, None])[:, 0]
                other = out.masked_fill(nn.functional.one_hot(yb, out.shape[1]).bool(), float("-inf")).max(1).values
                margin = own - other
                alive &= (margin > 0).detach()
                grad, = torch.autograd.grad(margin.sum(), x)
                with torch.no_grad():
                    x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), hi)
        robust[i:i + batch_size] = alive.numpy()
    return robust


__all__ = ["Certification", "certify", "certify_boxes", "pgd_accuracy", "worst_margins"]
