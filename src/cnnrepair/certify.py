"""Certified accuracy: which inputs provably keep their label over a whole L-infinity ball, and an attack to test it.

``certify`` bounds the specification itself: for every other class ``j``, a lower bound of
``logit[y] - logit[j]`` over each ball, the last layer folded into the bound's backward pass
(:func:`cnnrepair.bounds.margin_bounds`); a point is certified when every such bound is positive.
This is tighter than bounding the features first and taking the last layer's worst case over that
box (:func:`worst_margins`, what the ball repair program constrains).

``pgd_accuracy`` is the other side: projected gradient descent on the margin, with random restarts,
inside the very box that was certified. Sound bounds imply ``pgd_accuracy >= certified accuracy``
on the same points, always; a test and the benchmark check it.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnrepair.bounds import BallInputs, FeatureBounds, frozen_graph, margin_bounds
from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.layer import last_layer
from cnnrepair.repair.program import box_margins
from cnnrepair.runtime import first_output, model_device


@dataclass
class Certification:
    """Per point, a lower bound of its worst margin over its ball (certified where > 0), and how it was found."""

    eps: float
    method: str
    labels: np.ndarray
    margins: np.ndarray
    layer: str
    seconds: float

    @property
    def certified(self) -> np.ndarray:
        return self.margins > 0

    @property
    def accuracy(self) -> float:
        """Certified accuracy: the share of points whose whole ball keeps the label."""
        return float(self.certified.mean()) if len(self.margins) else 0.0


def worst_margins(bounds: FeatureBounds, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray, zero_rival: bool = False) -> np.ndarray:
    """Per point, min over other classes j of the smallest ``logit[y] - logit[j]`` over its feature box (and of ``logit[y]``
    itself with ``zero_rival``: a ReLU after the layer)."""
    return box_margins(weight, bias, bounds.centre, bounds.radius, labels, zero_rival)


def certify(model: nn.Module, x, y, eps, method: str = "crown", layer: str | None = None, inputs: BallInputs | None = None,
            *, scheduler: str | None = None, **old) -> Certification:
    """Certify each input ``x`` (model units) with label ``y`` over its ball of radius ``eps`` (pixels; one, or one
    per input), taken as ``inputs`` says (:class:`cnnrepair.bounds.BallInputs`: the model's mean/std, the pixel
    range; default: pixels as they are, in [0, 1]); ``scheduler``: a Dask scheduler's address, whose workers bound
    batches of the inputs (the results are the same as here). ``mean=``, ``std=``, ``domain=`` (0.1) still work for
    one release, with a DeprecationWarning."""
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
    return certify_boxes(model, lo, hi, y, method, layer, eps=float(np.max(eps)), scheduler=scheduler)


def certify_boxes(model: nn.Module, lower, upper, y, method: str = "crown", layer: str | None = None,
                  eps: float = float("nan"), progress=None, scheduler: str | None = None) -> Certification:
    """Certify each input box ``[lower, upper]`` (model units) with label ``y`` (``progress``: see ``feature_bounds``;
    ``scheduler``: see :func:`certify`)."""
    t0 = time.perf_counter()
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, torch.Tensor) else lower).double()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, torch.Tensor) else upper).double()
    labels = np.asarray(y, np.int64)
    sample = ((lower[:2] + upper[:2]) / 2).float()
    lay = last_layer(model, sample, layer)
    if scheduler is not None:
        margins = _on_cluster(scheduler, model, lay, (lower, upper, labels), method, progress)
    else:
        graph = frozen_graph(model, lay.name, sample, through=True)
        margins = margin_bounds(graph, lower, upper, labels, method, progress=progress, zero_rival=lay.zero_rival)
    return Certification(eps, method, labels, margins, lay.name, time.perf_counter() - t0)


_CONNECT_S = 20  # seconds to wait for a Dask scheduler


# On a Dask worker: the frozen graph of each model it was sent (the scattered copy; dropped with it) and layer, traced by the
# first batch and reused by the next ones (a torch.export per batch was most of a small batch's time); graphs traced so far.
_WORKER_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WORKER_LOCK = threading.Lock()
GRAPHS_TRACED = 0


def _margins_of(model: nn.Module, layer: str, lower: torch.Tensor, upper: torch.Tensor, labels: np.ndarray, method: str,
                zero_rival: bool = False) -> np.ndarray:
    """One batch of boxes' margin bounds, as a Dask worker computes them."""
    global GRAPHS_TRACED
    with _WORKER_LOCK:
        graphs = _WORKER_GRAPHS.setdefault(model, {})
        graph = graphs.get(layer)
        if graph is None:  # the graph does not depend on the batch it is traced with (certify_boxes traces it once for all)
            graph = graphs[layer] = frozen_graph(model, layer, ((lower[:2] + upper[:2]) / 2).float(), through=True)
            GRAPHS_TRACED += 1
    return margin_bounds(graph, lower, upper, labels, method, zero_rival=zero_rival)


def _on_cluster(scheduler: str, model: nn.Module, lay, boxes: tuple, method: str, progress) -> np.ndarray:
    """Margin bounds of the boxes, in batches spread over a Dask cluster's workers (each batch bounded as here)."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise CnnRepairError("--scheduler needs Dask's distributed package: pip install 'cnnrepair[dask]'") from None
    lower, upper, labels = boxes
    try:
        client = Client(scheduler, timeout=_CONNECT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        raise CnnRepairError(f"could not reach the Dask scheduler at {scheduler} ({type(exc).__name__}); "
                             "give the address its scheduler prints, e.g. tcp://host:8786") from None
    try:
        workers = max(1, len(client.scheduler_info().get("workers", {})))
        size = max(1, -(-len(lower) // (4 * workers)))  # about four batches a worker
        remote = client.scatter(model, broadcast=True)
        futures = {client.submit(_margins_of, remote, lay.name, lower[i:i + size], upper[i:i + size], labels[i:i + size], method,
                                 lay.zero_rival, pure=False): i for i in range(0, len(lower), size)}
        out = np.zeros(len(lower))
        done = 0
        for fut in as_completed(futures):
            i = futures[fut]
            part = fut.result()
            out[i:i + len(part)] = part
            done += len(part)
            if progress is not None:
                progress(f"{method} bounds on {workers} worker(s)", done, len(lower))
        return out
    finally:
        client.close()


def pgd_counterexamples(model: nn.Module, lower, upper, y, steps: int = 50, restarts: int = 5, seed: int = 0,
                        batch_size: int = 256) -> list[np.ndarray | None]:
    """Per box ``[lower, upper]`` (model units, float32), the first input PGD (margin loss, ``restarts`` random starts,
    ``steps`` steps each, on the model's device) visits that the model does not give label ``y`` (its margin not > 0), or
    None. ``y`` may also be :class:`cnnrepair.repair.outputs.OutputRows` over the model's outputs: the margin is then the
    smallest row value. A box with no float32 point (lower above upper somewhere) is never searched."""
    gen = torch.Generator().manual_seed(seed)
    dev = model_device(model)
    lower = torch.as_tensor(np.asarray(lower) if not isinstance(lower, torch.Tensor) else lower).float()
    upper = torch.as_tensor(np.asarray(upper) if not isinstance(upper, torch.Tensor) else upper).float()
    margin_of = _margin_fn(y)
    found: list[np.ndarray | None] = [None] * len(lower)
    for i in range(0, len(lower), batch_size):
        lo, hi = lower[i:i + batch_size], upper[i:i + batch_size]
        searchable = (lo <= hi).flatten(1).all(1)
        top = hi.maximum(lo)
        width = (hi - lo).clamp(min=0)
        step = 2.5 * width / 2 / steps
        for _ in range(restarts):
            x = torch.minimum(lo + width * torch.rand(lo.shape, generator=gen), top)
            for _ in range(steps + 1):
                x.requires_grad_(True)
                margin = margin_of(first_output(model(x.to(dev))).cpu(), slice(i, i + len(x)))
                for k in torch.nonzero(~(margin > 0).detach() & searchable).flatten().tolist():  # NaN counts as found
                    if found[i + k] is None:
                        found[i + k] = x[k].detach().numpy().copy()
                grad, = torch.autograd.grad(margin.sum(), x)
                with torch.no_grad():
                    x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), top)
    return found


def _margin_fn(y):
    """``(outputs, batch slice) -> margins``: a label's (own output minus the best other), or the smallest row value."""
    from cnnrepair.repair.outputs import OutputRows

    if isinstance(y, OutputRows):
        coef, live = torch.as_tensor(y.coef), torch.as_tensor(y.live)
        offset = torch.as_tensor(np.where(y.live, y.offset, 0.0))

        def rows(out: torch.Tensor, sl: slice) -> torch.Tensor:
            v = torch.einsum("nrc,nc->nr", coef[sl].to(out.dtype), out) - offset[sl].to(out.dtype)
            return v.masked_fill(~live[sl], float("inf")).min(1).values

        return rows
    labels = torch.as_tensor(np.asarray(y, np.int64))

    def label(out: torch.Tensor, sl: slice) -> torch.Tensor:
        yb = labels[sl]
        own = out.gather(1, yb[:, None])[:, 0]
        other = out.masked_fill(nn.functional.one_hot(yb, out.shape[1]).bool(), float("-inf")).max(1).values
        return own - other

    return label


def pgd_accuracy(model: nn.Module, lower, upper, y, steps: int = 50, restarts: int = 5, seed: int = 0,
                 batch_size: int = 256) -> np.ndarray:
    """Per input, True when PGD (:func:`pgd_counterexamples`) finds no input of the box ``[lower, upper]`` (model units)
    that the model labels other than ``y``."""
    return np.array([f is None for f in pgd_counterexamples(model, lower, upper, y, steps, restarts, seed, batch_size)], bool)


__all__ = ["Certification", "certify", "certify_boxes", "pgd_accuracy", "pgd_counterexamples", "worst_margins"]
