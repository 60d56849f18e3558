"""Linear rows over a classifier's outputs: what a point must satisfy when it is more than "keep the label".

A point's requirement is a set of rows ``a_r . z >= b_r + m`` over the logits ``z`` of the layer
being repaired (``m``: the point's margin). The label form is one case: rows ``e_y - e_j`` (every
other class ``j``), offsets 0. A targeted property (label ``y`` against some classes only) keeps
the rows of those classes; a general linear output constraint (VNN-LIB's ``Y_0 >= 3.99``) is any
row. The *margin* of a point is ``min_r (a_r . z - b_r)``: with label rows it is the usual logit
margin. Each row is scaled so that its largest coefficient is 1 in magnitude, so that a margin is
in logit units whatever the scale a property was written in.

:class:`OutputRows` holds them for N points as arrays: ``coef`` (N x R x C) and ``offset`` (N x R),
``-inf`` offsets marking rows a point does not have (points may have different numbers of rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnrepair.errors import CnnRepairError


@dataclass(frozen=True)
class OutputRows:
    """Per point ``k``, the rows ``coef[k, r] . z >= offset[k, r] + margin`` over the C logits ``z`` (``offset`` -inf: no
    row ``r`` for that point). Built by :meth:`of` (rows scaled, checked), :meth:`from_labels` or :meth:`stack`."""

    coef: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, coef, offset) -> OutputRows:
        """Rows from arrays (``coef`` N x R x C, ``offset`` N x R; -inf or NaN-free), each scaled to a largest |coefficient|
        of 1; a one-line error for bad shapes, non-finite coefficients, a row of zeros, or a point without rows."""
        A = np.asarray(coef, np.float64)
        b = np.asarray(offset, np.float64)
        if A.ndim != 3 or b.shape != A.shape[:2]:
            raise CnnRepairError(f"output rows: coefficients must be N x rows x classes and offsets N x rows (got {A.shape} and {b.shape})")
        if A.shape[2] < 1 or not np.isfinite(A).all() or np.isnan(b).any() or (b == np.inf).any():
            raise CnnRepairError("output rows: coefficients must be finite and offsets finite or -inf (no such row)")
        live = np.isfinite(b)
        scale = np.abs(A).max(2)
        if (live & (scale == 0)).any():
            raise CnnRepairError("output rows: a row has every coefficient 0 (it constrains nothing, or nothing can meet it)")
        if len(b) and not live.any(1).all():
            raise CnnRepairError("output rows: a point has no row (give each point at least one)")
        s = np.where(live, scale, 1.0)
        return cls(np.where(live[..., None], A / s[..., None], 0.0), np.where(live, b / s, -np.inf))

    @classmethod
    def from_labels(cls, labels, classes: int, zero_rival: bool = False) -> OutputRows:
        """The label form: row ``j`` of point ``k`` is ``e_y - e_j`` (none at ``j = y``); with ``zero_rival`` one more row
        ``e_y`` (index ``classes``: the label's logit beats a rival fixed at 0)."""
        y = np.asarray(labels, np.int64).reshape(-1)
        N, R = len(y), classes + int(zero_rival)
        A = np.zeros((N, R, classes))
        idx = np.arange(N)
        A[idx, :, y] = 1.0
        A[:, np.arange(classes), np.arange(classes)] -= 1.0
        b = np.zeros((N, R))
        b[idx, y] = -np.inf
        A[idx, y] = 0.0
        return cls(A, b)

    @classmethod
    def stack(cls, parts: list[OutputRows]) -> OutputRows:
        """The points of every part, in order (padded to the most rows with rows a point does not have)."""
        R = max(p.num_rows for p in parts)
        C = {p.num_classes for p in parts}
        if len(C) != 1:
            raise CnnRepairError(f"output rows over different numbers of classes ({sorted(C)}) cannot be stacked")
        pad = [(np.pad(p.coef, ((0, 0), (0, R - p.num_rows), (0, 0))),
                np.pad(p.offset, ((0, 0), (0, R - p.num_rows)), constant_values=-np.inf)) for p in parts]
        return cls(np.concatenate([a for a, _ in pad]), np.concatenate([b for _, b in pad]))

    def __len__(self) -> int:
        return self.coef.shape[0]

    @property
    def num_rows(self) -> int:
        return self.coef.shape[1]

    @property
    def num_classes(self) -> int:
        return self.coef.shape[2]

    @property
    def live(self) -> np.ndarray:
        """N x R: which rows each point has."""
        return np.isfinite(self.offset)

    def record(self) -> dict:
        """What a certificate records of them (the rows themselves live in the points file its sha256 names)."""
        return {"points": len(self), "rows": int(self.live.sum()), "pairwise": self.pairwise()}

    def subset(self, points) -> OutputRows:
        idx = np.asarray(points, np.int64)
        return OutputRows(self.coef[idx], self.offset[idx])

    def pairwise(self) -> bool:
        """Is every row ``e_y - e_j`` with offset 0 (the label form, or a targeted one)? Those keep their meaning through a
        softmax, a log-softmax or a final ReLU (with :meth:`with_zero_rival`); other rows need the logits themselves."""
        live = self.live
        A = self.coef[live]
        ones, minus = (A == 1.0).sum(1), (A == -1.0).sum(1)
        return bool(((ones == 1) & (minus == 1) & ((A != 0).sum(1) == 2)).all() and (self.offset[live] == 0).all())

    def with_zero_rival(self) -> OutputRows:
        """Pairwise rows for logits a ReLU follows: each point gets one more row ``e_p`` per class ``p`` its rows favour (that
        class's own logit beats 0), so that ``relu(z_p) - relu(z_j) >= m`` whenever the program's rows hold
        (:mod:`cnnrepair.repair.ending`)."""
        if not self.pairwise():
            raise CnnRepairError("a ReLU follows the repaired layer: only rows 'Y_label > Y_j' (the label form or a targeted one) "
                                 "keep their meaning through it; general linear output rows need the logits themselves")
        N, C = len(self), self.num_classes
        favoured = (np.where(self.live[..., None], self.coef, 0.0) == 1.0).any(1)  # N x C: the classes some row of a point favours
        E = max(int(favoured.sum(1).max(initial=0)), 1)
        own, off = np.zeros((N, E, C)), np.full((N, E), -np.inf)
        for k in range(N):
            for e, p in enumerate(np.flatnonzero(favoured[k])):
                own[k, e, p], off[k, e] = 1.0, 0.0
        return OutputRows(np.concatenate([self.coef, own], 1), np.concatenate([self.offset, off], 1))

    def values(self, logits: np.ndarray) -> np.ndarray:
        """N x R: ``coef . z - offset`` per row (-inf where a point has no row)."""
        L = np.asarray(logits, np.float64)
        v = np.einsum("nrc,nc->nr", self.coef, L) - np.where(self.live, self.offset, 0.0)
        return np.where(self.live, v, np.inf)

    def margins(self, logits: np.ndarray) -> np.ndarray:
        """Per point, its smallest row value ``min_r (a_r . z - b_r)`` (the logit margin for the label form)."""
        if not len(self):
            return np.zeros(0)
        return self.values(logits).min(1)

    def box_values(self, weight: np.ndarray, bias: np.ndarray, centre: np.ndarray, radius: np.ndarray | None) -> np.ndarray:
        """N x R: each row's smallest value over the point's feature box ``centre +- radius`` under the linear layer
        ``z = W f + b``: ``a.(W c + b) - r.|W^T a| - offset`` (exact for a box; inf where a point has no row)."""
        W, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
        c = np.asarray(centre, np.float64).reshape(len(self), -1)
        v = self.values(c @ W.T + b)
        if radius is not None:
            D = np.einsum("nrc,ci->nri", self.coef, W)
            v = v - np.einsum("nri,ni->nr", np.abs(D), np.asarray(radius, np.float64).reshape(c.shape))
        return np.where(self.live, v, np.inf)

    def box_margins(self, weight: np.ndarray, bias: np.ndarray, centre: np.ndarray, radius: np.ndarray | None) -> np.ndarray:
        """Per point, the smallest row value over its feature box (see :meth:`box_values`)."""
        if not len(self):
            return np.zeros(0)
        return self.box_values(weight, bias, centre, radius).min(1)


def program_rows(parts: list[tuple[OutputRows | None, np.ndarray]], classes: int, zero_rival: bool) -> OutputRows | None:
    """The rows a repair's program holds for sets of points in order (repair points, then keep points): each set's own
    rows (with a final ReLU's label rows, :meth:`OutputRows.with_zero_rival`) or, for a set without rows (None), its
    labels' rows; None when no set has rows of its own (labels say it all). What :mod:`cnnrepair.verify` rebuilds."""
    if all(rows is None for rows, _ in parts):
        return None
    return OutputRows.stack([OutputRows.from_labels(labels, classes, zero_rival) if rows is None
                             else (rows.with_zero_rival() if zero_rival else rows) for rows, labels in parts])


def rows_record(points: OutputRows | None, keep: OutputRows | None) -> dict | None:
    """The certificate's ``output_rows`` block: each set's counts (absent: that set keeps labels), None when neither has rows."""
    if points is None and keep is None:
        return None
    out = {key: rows.record() for key, rows in (("repair_points", points), ("keep_points", keep)) if rows is not None}
    out["note"] = ("a point with rows has as its margin its smallest row value coef . output - offset (rows_coef, rows_offset of "
                   "its file, each row scaled to a largest |coefficient| of 1), not a label's margin")
    return out


def as_rows(value, num_points: int, classes: int) -> OutputRows | None:
    """``value`` (None, OutputRows, or a pair ``(coef, offset)``) as rows for ``num_points`` points over ``classes`` logits."""
    if value is None:
        return None
    rows = value if isinstance(value, OutputRows) else OutputRows.of(*value)
    if len(rows) != num_points:
        raise CnnRepairError(f"output rows are given for {len(rows)} points but there are {num_points}")
    if rows.num_classes != classes:
        raise CnnRepairError(f"output rows are over {rows.num_classes} outputs but the layer has {classes}")
    return rows
