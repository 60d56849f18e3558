"""Sound bounds on what a network computes over an L-infinity ball around each input.

    from cnnrepair.bounds import ball_box, feature_bounds
    lo, hi = ball_box(x, eps=0.02)                          # the ball, clipped to pixels in [0, 1]
    fb = feature_bounds(model, "head.2", lo, hi, "crown")   # fb.lower <= features(x') <= fb.upper for every x' in it
    g = frozen_graph(model, "head.2", x[:2], through=True)
    m = margin_bounds(g, lo, hi, y, "crown")                # m[i] <= logit[y] - logit[j] for every j != y, every x' in ball i

Two kinds of result: :func:`feature_bounds`, a box on the repaired layer's input (what the repair
LP constrains: each feature's own range), and :func:`margin_bounds`, the specification itself (the
logit differences, the last layer folded into the backward pass), which certified accuracy uses and
which is tighter than the worst case of the last layer over the feature box. Four methods behind
both (:mod:`cnnrepair.bounds.propagate`): interval bound propagation (``ibp``), CROWN's linear
relaxation with back-substitution (``crown``), its last walk's slopes optimised (``alpha-crown``)
and every walk's (``alpha-crown-full``, as auto_LiRPA's alpha-CROWN), over the
graph :mod:`cnnrepair.bounds.graph` extracts from any model ``torch.export`` can trace (convolution,
linear, batch norm, average and max pooling, ReLU, flatten/reshape, normalisation by stored
tensors, residual sums). Inputs are bounded in batches sized to the memory free
(:func:`~cnnrepair.bounds.propagate.memory_budget`); the results do not depend on the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from cnnrepair.bounds.graph import FrozenGraph, frozen_graph
from cnnrepair.bounds.propagate import METHODS, AlphaSettings, memory_budget, propagate, spec_bounds
from cnnrepair.errors import CnnRepairError


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


def ball_box(x, eps, mean=None, std=None, domain: tuple[float, float] = (0.0, 1.0), channel_axis: int = 1) -> tuple[Tensor, Tensor]:
    """The box ``{x' : |x' - x|_inf <= eps in pixels, pixels in domain}`` in the model's input units.

    ``x`` (N x input shape) is in model units; with ``mean``/``std`` (per channel, along ``channel_axis``: 1 for
    NCHW inputs, 3 for NHWC) the model takes ``(pixels - mean) / std``, so the ball is taken in pixels and mapped
    back. ``eps`` is one number or one per input (0 for a point).
    """
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).double()
    e = torch.as_tensor(np.asarray(eps, np.float64)).reshape(-1)
    if e.numel() not in (1, len(x)):
        raise CnnRepairError(f"give one eps or one per input ({len(x)}); got {e.numel()}")
    if (e < 0).any() or not torch.isfinite(e).all():
        raise CnnRepairError("eps must be finite and >= 0 (pixels)")
    e = e.reshape(-1, *([1] * (x.ndim - 1)))
    channel_axis = channel_axis % x.ndim if x.ndim > 1 else 0
    channels = x.shape[channel_axis] if x.ndim > 1 else 1
    for name, v in (("mean", mean), ("std", std)):
        if v is not None and np.asarray(v).size not in (1, channels):
            raise CnnRepairError(f"--{name} has {np.asarray(v).size} values but the inputs have {channels} channel(s); give 1 or {channels}")
    if std is not None and (np.asarray(std, np.float64) <= 0).any():
        raise CnnRepairError(f"--std must be positive (got {std})")
    shape = [1] * max(x.ndim, 1)
    shape[channel_axis] = -1
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


BALL_LAYOUTS = ("auto", "nchw", "nhwc")


@dataclass(frozen=True)
class BallInputs:
    """How balls are taken around inputs: in pixels, for a model taking ``(pixels - mean) / std`` (per channel;
    None: the pixels as they are), clipped to ``domain`` (None: not clipped)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    domain: tuple[float, float] | None = (0.0, 1.0)
    layout: str = "auto"  # where an image input's channels are: nchw, nhwc, or auto (the one axis that fits mean / std)

    def __post_init__(self) -> None:
        if self.domain is not None and not (len(self.domain) == 2 and float(self.domain[0]) < float(self.domain[1])):
            raise CnnRepairError(f"the pixel range {self.domain} is empty; give LOW,HIGH with LOW < HIGH (e.g. 0,1)")
        if self.layout not in BALL_LAYOUTS:
            raise CnnRepairError(f"--layout must be one of {', '.join(BALL_LAYOUTS)} (got {self.layout!r})")

    def channel_axis(self, x) -> int:
        """The axis of ``x`` (N x input shape) that holds the channels of ``mean`` / ``std``: 1 (NCHW) or 3 (NHWC) for
        images, 1 otherwise. ``auto`` takes the one of the two whose size is the number of values given, and refuses
        when both are."""
        shape = tuple(x.shape)
        if len(shape) != 4 or self.layout == "nchw":
            return 1
        if self.layout == "nhwc":
            return 3
        k = max(np.asarray(v).size if v is not None else 1 for v in (self.mean, self.std))
        fits = [a for a in (1, 3) if shape[a] == k]
        if k > 1 and len(fits) == 2:
            raise CnnRepairError(f"inputs of shape {shape[1:]}: both their first and their last axis could hold the {k} channels of "
                                 "--mean / --std; give --layout nchw (channels first) or --layout nhwc (channels last)")
        return fits[0] if k > 1 and fits else 1

    def resolved(self, x) -> BallInputs:
        """The same convention with the layout read from ``x`` (``nchw`` / ``nhwc`` for images): what a certificate records."""
        if len(tuple(x.shape)) != 4:
            return self
        return replace(self, layout="nhwc" if self.channel_axis(x) == 3 else "nchw")

    def boxes(self, x, eps) -> tuple[Tensor, Tensor]:
        """Each input's ball of radius ``eps`` (one, or one per input) as a box in the model's units: :func:`ball_box`."""
        lo, hi = self.domain if self.domain is not None else (-np.inf, np.inf)
        return ball_box(x, eps, self.mean, self.std, (lo, hi), self.channel_axis(x))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "domain": self.domain, "layout": self.layout}


def _boxes(lower, upper) -> tuple[Tensor, Tensor]:
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, Tensor) else lower).double()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, Tensor) else upper).double()
    if lower.shape != upper.shape or (lower > upper).any():
        raise CnnRepairError("the boxes' lower corners must have the upper corners' shape and lie below them")
    return lower, upper


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise CnnRepairError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")


def _check_shape(graph: FrozenGraph, lower: Tensor) -> None:
    if tuple(lower.shape[1:]) != graph.input_shape:
        raise CnnRepairError(f"boxes of shape {tuple(lower.shape[1:])} for a model taking {graph.input_shape}")


def batch_for(graph: FrozenGraph, method: str, device="cpu") -> int:
    """Inputs bounded at once: CROWN's walks hold (inputs x rows x widest value) numbers, kept within the memory
    budget with at least 16 rows a walk; IBP holds a few boxes per input."""
    widest = graph.widest()
    if method == "ibp":
        return max(1, min(1024, memory_budget(device) // (8 * widest)))
    return max(1, min(256, memory_budget(device) // (2 * 16 * widest)))


def feature_bounds(model: nn.Module | FrozenGraph, layer: str, lower, upper, method: str = "crown",
                   batch_size: int | None = None, progress=None) -> FeatureBounds:
    """Bounds on the input of ``layer`` (the repaired linear layer) over each box ``[lower, upper]``.

    ``model`` may be a graph from :func:`frozen_graph` (reused across calls); ``progress(desc, done,
    total)`` is called after each batch. Sound in exact
    arithmetic and widened against float64 roundoff; the model itself runs in float32, whose
    rounding (about 1e-6 relative) the margins asked of repair must cover.
    """
    lower, upper = _boxes(lower, upper)
    _check_method(method)  # before the graph is traced
    t0 = time.perf_counter()
    graph = model if isinstance(model, FrozenGraph) else frozen_graph(model, layer, lower[:2].float())
    _check_shape(graph, lower)
    lower, upper = lower.to(graph.device), upper.to(graph.device)
    batch_size = batch_size or batch_for(graph, method, graph.device)
    los, his = [], []
    with torch.no_grad():
        for i in range(0, len(lower), batch_size):
            lo, hi = propagate(graph, lower[i:i + batch_size], upper[i:i + batch_size], method)
            los.append(lo.reshape(len(lo), -1).cpu().numpy())
            his.append(hi.reshape(len(hi), -1).cpu().numpy())
            if progress is not None:
                progress(f"{method} bounds", min(i + batch_size, len(lower)), len(lower))
    n = int(np.prod(graph.op(graph.target).shape))
    lo = np.concatenate(los) if los else np.zeros((0, n))
    hi = np.concatenate(his) if his else np.zeros((0, n))
    return FeatureBounds(lo, hi, method, time.perf_counter() - t0)


def margin_rows(labels, classes: int, zero_rival: bool = False) -> Tensor:
    """B x (classes - 1) x classes: per input with label y, the rows ``e_y - e_j`` for every other class j; with
    ``zero_rival`` (a ReLU after the logits) one more row ``e_y``: the label's logit itself must stay above 0."""
    labels = torch.as_tensor(np.asarray(labels, np.int64))
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise CnnRepairError(f"labels must lie in 0..{classes - 1} for a model with {classes} outputs")
    others = torch.arange(classes).repeat(len(labels), 1)
    others = others[others != labels[:, None]].reshape(len(labels), classes - 1)
    rows = torch.zeros(len(labels), classes - 1, classes, dtype=torch.float64)
    rows.scatter_(2, labels.reshape(-1, 1, 1).expand(-1, classes - 1, 1), 1.0)
    rows.scatter_(2, others.unsqueeze(2), -1.0)
    if zero_rival:
        own = torch.zeros(len(labels), 1, classes, dtype=torch.float64)
        own.scatter_(2, labels.reshape(-1, 1, 1), 1.0)
        rows = torch.cat([rows, own], 1)
    return rows


def margin_bounds(graph: FrozenGraph, lower, upper, labels, method: str = "crown", progress=None, zero_rival: bool = False) -> np.ndarray:
    """Per box, a lower bound of ``min_j logit[y] - logit[j]`` over it (``graph``: :func:`frozen_graph` with
    ``through=True``, so its target is the logits); positive means the whole box keeps label y. ``zero_rival``: the
    logits go through a ReLU, so ``logit[y]`` itself is one more rival difference (:func:`margin_rows`)."""
    rows = rival_bounds(graph, lower, upper, labels, method, progress, zero_rival)
    return rows.min(1) if len(rows) else np.zeros(0)


def rival_bounds(graph: FrozenGraph, lower, upper, labels, method: str = "crown", progress=None, zero_rival: bool = False) -> np.ndarray:
    """Per box, a lower bound of each row of :func:`margin_rows` over it (B x rows: ``logit[y] - logit[j]`` for every
    other class j in increasing order, then ``logit[y]`` itself with ``zero_rival``); :func:`margin_bounds` is their
    minimum, a property against some of the classes takes the minimum over its own."""
    lower, upper = _boxes(lower, upper)
    _check_method(method)
    _check_shape(graph, lower)
    classes = int(np.prod(graph.op(graph.target).shape))
    rows = margin_rows(labels, classes, zero_rival).to(graph.device)
    if len(rows) != len(lower):
        raise CnnRepairError(f"{len(rows)} labels for {len(lower)} boxes")
    lower, upper = lower.to(graph.device), upper.to(graph.device)
    batch_size = batch_for(graph, method, graph.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(lower), batch_size):
            sl = slice(i, i + batch_size)
            out.append(spec_bounds(graph, lower[sl], upper[sl], rows[sl], method).cpu().numpy())
            if progress is not None:
                progress(f"{method} bounds", min(i + batch_size, len(lower)), len(lower))
    return np.concatenate(out) if out else np.zeros((0, rows.shape[1]))


__all__ = ["METHODS", "AlphaSettings", "BallInputs", "FeatureBounds", "FrozenGraph", "ball_box", "batch_for", "feature_bounds", "frozen_graph",
           "margin_bounds", "margin_rows", "memory_budget", "propagate", "rival_bounds", "spec_bounds"]
