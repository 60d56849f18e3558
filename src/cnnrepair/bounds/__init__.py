"""Sound bounds on what a network's frozen part computes over an L-infinity ball around each input.

    from cnnrepair.bounds import ball_box, feature_bounds
    lo, hi = ball_box(x, eps=0.02)                          # the ball, clipped to pixels in [0, 1]
    fb = feature_bounds(model, "head.2", lo, hi, "crown")   # fb.lower <= features(x') <= fb.upper for every x' in it

Two methods behind one call (:mod:`cnnrepair.bounds.propagate`): interval bound propagation
(``ibp``) and a linear relaxation (``crown``), over the graph :mod:`cnnrepair.bounds.graph`
extracts from any model ``torch.export`` can trace (convolution, linear, batch norm, average and
max pooling, ReLU, flatten/reshape, normalisation by stored tensors, residual sums).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cnnrepair.bounds.graph import FrozenGraph, frozen_graph
from cnnrepair.bounds.propagate import METHODS, propagate
from cnnrepair.errors import CnnRepairError


_CROWN_LIMIT = 60_000_000  # float64 numbers in one linear bound (~480 MB; a few are alive at once)


@dataclass
class FeatureBounds:
    """Per input (rows), a box ``lower <= features <= upper`` holding the features of every point of its ball."""

    lower: np.ndarray
    upper: np.ndarray
    method: str
    seconds: float

    @property
    def centre(self) -> np.ndarray:
        return (self.lower + self.upper) / 2

    @property
    def radius(self) -> np.ndarray:
        return (self.upper - self.lower) / 2


def ball_box(x, eps, mean=None, std=None, domain: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
    """The box ``{x' : |x' - x|_inf <= eps in pixels, pixels in domain}`` in the model's input units.

    ``x`` (N x input shape) is in model units; with ``mean``/``std`` (per channel) the model takes
    ``(pixels - mean) / std``, so the ball is taken in pixels and mapped back. ``eps`` is one number
    or one per input (0 for a point).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()
    e = torch.as_tensor(np.asarray(eps, np.float64)).reshape(-1)
    if e.numel() not in (1, len(x)):
        raise CnnRepairError(f"give one eps or one per input ({len(x)}); got {e.numel()}")
    if (e < 0).any() or not torch.isfinite(e).all():
        raise CnnRepairError("eps must be finite and >= 0 (pixels)")
    e = e.reshape(-1, *([1] * (x.ndim - 1)))
    channels = x.shape[1] if x.ndim > 1 else 1
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and np.asarray(v).size not in (1, channels):
            raise CnnRepairError(f"--{name} has {np.asarray(v).size} values but the inputs have {channels} channel(s); give 1 or {channels}")
    if std is not None and (np.asarray(std, np.float64) <= 0).any():
        raise CnnRepairError(f"--std must be positive (got {std})")
    shape = [1, -1] + [1] * (x.ndim - 2)
    m = torch.zeros(1, dtype=torch.float64) if mean is None else torch.as_tensor(np.asarray(mean, np.float64)).reshape(shape)
    s = torch.ones(1, dtype=torch.float64) if std is None else torch.as_tensor(np.asarray(std, np.float64)).reshape(shape)
    pix = x * s + m
    lo_d, hi_d = domain
    if ((pix < lo_d - 1e-6) | (pix > hi_d + 1e-6)).any():
        raise CnnRepairError(f"inputs lie outside the pixel range [{lo_d}, {hi_d}] after undoing the normalisation; "
                             "give the model's --mean/--std or the right --range")
    lo = ((pix - e).clamp(lo_d, hi_d) - m) / s
    hi = ((pix + e).clamp(lo_d, hi_d) - m) / s
    return torch.minimum(lo, x), torch.maximum(hi, x)


@dataclass(frozen=True)
class BallInputs:
    """How balls are taken around inputs: in pixels, for a model taking ``(pixels - mean) / std`` (per channel;
    None: the pixels as they are), clipped to ``domain`` (None: not clipped)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    domain: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.domain is not None and not (len(self.domain) == 2 and float(self.domain[0]) < float(self.domain[1])):
            raise CnnRepairError(f"the pixel range {self.domain} is empty; give LOW,HIGH with LOW < HIGH (e.g. 0,1)")

    def boxes(self, x, eps) -> tuple[Tensor, Tensor]:
        """Each input's ball of radius ``eps`` (one, or one per input) as a box in the model's units: :func:`ball_box`."""
        lo, hi = self.domain if self.domain is not None else (-np.inf, np.inf)
        return ball_box(x, eps, self.mean, self.std, (lo, hi))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "domain": self.domain}


def feature_bounds(model: nn.Module | FrozenGraph, layer: str, lower, upper, method: str = "crown",
                   batch_size: int | None = None, progress=None) -> FeatureBounds:
    """Bounds on the input of ``layer`` (the repaired linear layer) over each box ``[lower, upper]``.

    ``model`` may be a graph from :func:`frozen_graph` (reused across calls); ``progress(desc, done,
    total)`` is called after each batch. Sound in exact
    arithmetic and widened against float64 roundoff; the model itself runs in float32, whose
    rounding (about 1e-6 relative) the margins asked of repair must cover.
    """
    if method not in METHODS:
        raise CnnRepairError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, Tensor) else lower).double()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, Tensor) else upper).double()
    if lower.shape != upper.shape or (lower > upper).any():
        raise CnnRepairError("the boxes' lower corners must have the upper corners' shape and lie below them")
    t0 = time.perf_counter()
    graph = model if isinstance(model, FrozenGraph) else frozen_graph(model, layer, lower[:2].float())
    if tuple(lower.shape[1:]) != graph.input_shape:
        raise CnnRepairError(f"boxes of shape {tuple(lower.shape[1:])} for a model taking {graph.input_shape}")
    widest = max(int(np.prod(op.shape)) for op in graph.ops)
    per_point = int(np.prod(graph.input_shape)) * widest  # numbers in one linear bound of the widest value, per input
    if method == "crown" and per_point > _CROWN_LIMIT:
        raise CnnRepairError(f"crown bounds on this model would hold {per_point:,} numbers per input and value (input size x widest "
                             f"layer; the limit is {_CROWN_LIMIT:,}): use --bounds ibp, or a smaller model")
    if batch_size is None:  # CROWN's linear bounds hold (input size x widest value) numbers per point
        batch_size = 256 if method == "ibp" else max(1, 12_000_000 // (int(np.prod(graph.input_shape)) * widest))
    los, his = [], []
    with torch.no_grad():
        for i in range(0, len(lower), batch_size):
            lo, hi = propagate(graph, lower[i:i + batch_size], upper[i:i + batch_size], method)
            los.append(lo.reshape(len(lo), -1).numpy())
            his.append(hi.reshape(len(hi), -1).numpy())
            if progress is not None:
                progress(f"{method} bounds", min(i + batch_size, len(lower)), len(lower))
    n = int(np.prod(graph.op(graph.target).shape))
    lo = np.concatenate(los) if los else np.zeros((0, n))
    hi = np.concatenate(his) if his else np.zeros((0, n))
    return FeatureBounds(lo, hi, method, time.perf_counter() - t0)


__all__ = ["METHODS", "BallInputs", "FeatureBounds", "FrozenGraph", "ball_box", "feature_bounds", "frozen_graph", "propagate"]
