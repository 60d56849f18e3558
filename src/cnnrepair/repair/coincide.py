"""Points that are one point to float32: shared features, the noise of computing them, coinciding pairs.

A network run in float32 gives an input slightly different features in different batches (BLAS
picks its kernels by shape). A repair program that sees two inputs whose features differ only by
that noise, with different labels, is infeasible in exact arithmetic, yet an LP solver finds a
"solution" with huge weights that separates the two noise-sized differences, and that solution
flips with the batch. Three defences live here:

* :func:`shared_features`: every distinct input is computed once, so the same input gets one
  feature vector wherever it appears (repair points and keep points alike);
* :func:`feature_noise`: how far a batched feature vector lies from the same input's features
  computed alone, measured on a sample, floored at a few float32 roundings of the feature scale;
* :func:`coinciding_pairs`: pairs of points within a few times that noise of each other (L-infinity),
  found by sorting one random projection (no N^2 scan); with different labels they conflict.
"""

from __future__ import annotations

import numpy as np
import torch

NOISE_SAMPLE = 64  # inputs whose features are recomputed one at a time to measure the noise
NOISE_FLOOR = 16  # the noise is at least this many roundings of the largest feature
TOLERANCE = 4  # points within this many noise levels of each other coincide


def shared_features(lay, *sets: torch.Tensor | None) -> list[np.ndarray | None]:
    """Features of several input sets (same per-example shape), computed once per distinct input."""
    present = [x for x in sets if x is not None and len(x)]
    if not present:
        return [None if x is None else np.zeros((0, lay.shape[1])) for x in sets]
    allx = torch.cat([x.reshape(len(x), *present[0].shape[1:]) for x in present])
    flat = np.ascontiguousarray(allx.reshape(len(allx), -1).cpu().numpy())
    rows = flat.view(np.dtype((np.void, flat.dtype.itemsize * flat.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    feats = lay.features(allx[torch.as_tensor(first)])[inverse.ravel()]
    out, at = [], 0
    for x in sets:
        if x is None:
            out.append(None)
        elif not len(x):
            out.append(np.zeros((0, feats.shape[1])))
        else:
            out.append(feats[at:at + len(x)])
            at += len(x)
    return out


def feature_noise(lay, x: torch.Tensor, F: np.ndarray, eps: float) -> float:
    """Largest L-infinity difference between ``F`` (batched) and features computed one input at a time,
    over up to :data:`NOISE_SAMPLE` inputs, and at least ``NOISE_FLOOR * eps * max|F|``."""
    floor = NOISE_FLOOR * eps * float(np.abs(F).max(initial=0.0))
    if len(x) == 0:
        return floor
    idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), NOISE_SAMPLE)).astype(np.int64))
    alone = np.concatenate([lay.features(x[int(i):int(i) + 1]) for i in idx])
    return max(floor, float(np.abs(alone - F[idx]).max(initial=0.0)))


def coinciding_pairs(F: np.ndarray, tol: float, labels: np.ndarray | None = None, limit: int = 1000) -> list[tuple[int, int, float]]:
    """(i, j, distance) for points with ``max|F_i - F_j| <= tol``, i < j, at most ``limit`` pairs
    (only pairs with different ``labels`` when labels are given)."""
    n = len(F)
    if n < 2:
        return []
    r = np.random.default_rng(0).standard_normal(F.shape[1])
    p = F @ r
    width = tol * float(np.abs(r).sum()) * (1 + 1e-9) + 1e-300  # |p_i - p_j| <= tol * |r|_1 for coinciding points
    order = np.argsort(p, kind="stable")
    ps = p[order]
    ends = np.searchsorted(ps, ps + width, side="right")
    pairs: list[tuple[int, int, float]] = []
    for a in range(n):
        if ends[a] <= a + 1:
            continue
        cand = order[a + 1:ends[a]]
        dist = np.abs(F[cand] - F[order[a]]).max(1)
        hit = dist <= tol
        if labels is not None:
            hit &= labels[cand] != labels[order[a]]
        for b, d in zip(cand[hit], dist[hit]):
            i, j = sorted((int(order[a]), int(b)))
            pairs.append((i, j, float(d)))
            if len(pairs) >= limit:
                return pairs
    return pairs


def conflicting_pairs(F: np.ndarray, labels: np.ndarray, hard: np.ndarray, tol: float) -> list[tuple[int, int, float]]:
    """Coinciding pairs of hard points with different labels: no change of the layer can separate them."""
    idx = np.flatnonzero(hard)
    return [(int(idx[i]), int(idx[j]), d) for i, j, d in coinciding_pairs(F[idx], tol, np.asarray(labels)[idx])]
