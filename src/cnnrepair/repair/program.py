"""A linear last layer, the points it must label with a margin, and a certified bound on the smallest change.

Logits are ``L = F W^T + b`` for features ``F`` (N x n) of the frozen part of a network. A point
``k`` with label ``y_k`` and required margin ``m_k`` asks, for every other class ``j``,

    (W_y + dW_y - W_j - dW_j) . f_k + (b_y + db_y - b_j - db_j) >= m_k,
    i.e. (dW_y - dW_j) . f_k + (db_y - db_j) >= r_kj = m_k - (L_ky - L_kj).

With ``zero_rival`` (a ReLU after the layer: :mod:`cnnrepair.repair.ending`) every point has one
more rival, class index ``C``, whose logit is 0 and never changes: ``dW_y . f_k + db_y >= m_k - L_ky``.

Hard points must meet every such row; soft points pay ``price_k`` per unit of their largest
shortfall. The change is measured in ``a * ||d||_1 + b * ||d||_inf`` over weight and bias entries
together (L1: a=1, b=0; L-infinity: a=0, b=1; ``l1+linf``: PRDNN's mean|d| + max|d|, a=1/#entries,
b=1), optionally with ``|d| <= max_change`` on each entry.

The lower bound is certified independently of any solver: any multipliers ``y >= 0`` on margin
rows give ``N(d) >= r.y + min_d [N(d) - (A^T y).d]`` (weak duality), computed in closed form for
this norm family (:func:`certified_lower_bound`), after scaling ``y`` into the dual-feasible set.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.outputs import OutputRows, program_rows

NORMS = ("l1", "linf", "l1+linf")
GAP = 1e-6  # certified relative gap a solve must reach
FEAS = 1e-9  # primal / dual feasibility tolerance of the scaled program
QUIET_SECONDS = 3.0  # a solve reports progress once it has run this long


@dataclass
class MarginProblem:
    """A linear last layer (``weight`` C x n, ``bias`` C) and the points it must label.

    ``features`` (N x n) and ``labels`` (N) list every point; ``margins`` (N) is each one's required
    margin; ``prices`` (N) is ``inf`` for a hard point and the price per unit of shortfall for a
    soft one.
    """

    weight: np.ndarray
    bias: np.ndarray
    features: np.ndarray
    labels: np.ndarray
    margins: np.ndarray
    prices: np.ndarray | None = None
    norm: str = "l1"
    freeze_bias: bool = False
    max_change: float | None = None
    radii: np.ndarray | None = None  # N x n: a point's features lie anywhere in features +- radii (its whole box must keep the label)
    zero_rival: bool = False  # one more rival per point: a logit fixed at 0 (class index C; a ReLU after the layer)
    rows: OutputRows | None = None  # each point's own rows over the logits (cnnrepair.repair.outputs) in place of its label's

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, np.float64)
        self.bias = np.asarray(self.bias, np.float64).reshape(-1)
        self.features = np.asarray(self.features, np.float64)
        self.labels = np.asarray(self.labels).reshape(-1).astype(np.int64)
        N = len(self.labels)
        self.features = self.features.reshape(N, -1) if self.features.size or N == 0 else self.features
        self.margins = np.broadcast_to(np.asarray(self.margins, np.float64), (N,)).copy()
        self.prices = np.full(N, np.inf) if self.prices is None else np.broadcast_to(np.asarray(self.prices, np.float64), (N,)).copy()
        C, n = self.weight.shape if self.weight.ndim == 2 else (0, 0)
        if self.weight.ndim != 2 or self.bias.shape != (C,) or C < 2:
            raise CnnRepairError(f"the layer must map n features to C >= 2 classes (weight C x n, bias C); got weight {self.weight.shape}, bias {self.bias.shape}")
        if self.features.shape != (N, n):
            raise CnnRepairError(f"points have {self.features.shape[1:]} features but the layer takes {n}; the features do not belong to this layer")
        if N and (self.labels.min() < 0 or self.labels.max() >= C):
            raise CnnRepairError(f"labels must lie in 0..{C - 1} for a {C}-class layer; got {self.labels.min()}..{self.labels.max()}")
        for name, arr in (("weight", self.weight), ("bias", self.bias), ("features", self.features), ("margins", self.margins)):
            if not np.isfinite(arr).all():
                raise CnnRepairError(f"{name} contain NaN or infinite values; check the model and the points")
        if np.any(self.prices <= 0) or np.isnan(self.prices).any():
            raise CnnRepairError("prices of soft points must be > 0 (inf for hard points)")
        if self.norm not in NORMS:
            raise CnnRepairError(f"unknown change norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.max_change is not None and not self.max_change > 0:
            raise CnnRepairError(f"max_change must be > 0 (got {self.max_change})")
        if self.radii is not None:
            self.radii = np.asarray(self.radii, np.float64).reshape(self.features.shape)
            if not np.isfinite(self.radii).all() or (self.radii < 0).any():
                raise CnnRepairError("feature radii must be finite and >= 0")
            if not self.radii.any():
                self.radii = None
        if self.rows is not None:
            if len(self.rows) != N or self.rows.num_classes != C:
                raise CnnRepairError(f"output rows for {len(self.rows)} points over {self.rows.num_classes} logits, but there are {N} "
                                     f"points and {C} logits")
            if self.zero_rival:
                raise CnnRepairError("output rows carry a final ReLU's rows themselves (OutputRows.with_zero_rival); "
                                     "leave zero_rival off")

    @property
    def has_boxes(self) -> bool:
        return self.radii is not None

    def subset(self, points: np.ndarray) -> MarginProblem:
        """The same layer and spec for some of the points."""
        idx = np.asarray(points, np.int64)
        return MarginProblem(self.weight, self.bias, self.features[idx], self.labels[idx], self.margins[idx], self.prices[idx],
                             self.norm, self.freeze_bias, self.max_change, None if self.radii is None else self.radii[idx],
                             self.zero_rival, None if self.rows is None else self.rows.subset(idx))

    @property
    def num_rivals(self) -> int:
        """Columns of :meth:`row_shortfall`: the classes, and the fixed zero logit (index C) with ``zero_rival``; each
        point's own rows (:attr:`rows`) when it has them."""
        return self.rows.num_rows if self.rows is not None else self.num_classes + int(self.zero_rival)

    def padded(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) after a change, with the zero rival's row (all zeros) appended when there is one."""
        W = self.weight if dW is None else self.weight + dW
        b = self.bias if db is None else self.bias + db
        if self.zero_rival:
            W, b = np.vstack([W, np.zeros((1, W.shape[1]))]), np.append(b, 0.0)
        return W, b

    def row_shortfall(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> np.ndarray:
        """N x C (C + 1 with the zero rival): required margin minus the (worst-case, over each box) logit difference to each
        rival; -inf at the label. With :attr:`rows`: N x rows, the margin minus each row's worst-case value (-inf: no row)."""
        if self.rows is not None:
            W = self.weight if dW is None else self.weight + dW
            b = self.bias if db is None else self.bias + db
            return self.margins[:, None] - self.rows.box_values(W, b, self.features, self.radii)
        W, b = self.padded(dW, db)
        N = len(self.labels)
        out = np.empty((N, W.shape[0]))
        for y in np.unique(self.labels):
            k = np.flatnonzero(self.labels == y)
            D = W[y][None, :] - W
            worst = self.features[k] @ D.T + (b[y] - b)[None, :]
            if self.radii is not None:
                worst -= self.radii[k] @ np.abs(D).T
            out[k] = self.margins[k, None] - worst
        out[np.arange(N), self.labels] = -np.inf
        return out

    def point_margins(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> np.ndarray:
        """Per point, the smallest margin over the other classes (over its whole box when it has one)."""
        if not len(self.labels):
            return np.zeros(0)
        return self.margins - self.row_shortfall(dW, db).max(1)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def num_entries(self) -> int:
        """How many numbers may change: every weight, and the biases unless frozen."""
        C, n = self.weight.shape
        return C * (n if self.freeze_bias else n + 1)

    def split_change(self, d: np.ndarray, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """(dW, db) from a change of the entries (C x nc or flat, class-major, bias last unless frozen), times ``factor``."""
        C, n = self.weight.shape
        D = np.asarray(d, np.float64).reshape(C, -1) * factor
        return D[:, :n].copy(), (D[:, n].copy() if not self.freeze_bias else np.zeros(C))

    def norm_coefficients(self) -> tuple[float, float]:
        """(a, b) of the change's cost ``a ||d||_1 + b ||d||_inf``."""
        return norm_coefficients(self.norm, self.num_entries)

    def logits(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> np.ndarray:
        W = self.weight if dW is None else self.weight + dW
        b = self.bias if db is None else self.bias + db
        return self.features @ W.T + b

    def shortfall(self, logits: np.ndarray) -> np.ndarray:
        """Per point: how far its smallest margin over the other classes (and the zero rival) is below its required margin (>= 0)."""
        got = self.rows.margins(logits) if self.rows is not None else margins_of(logits, self.labels, self.zero_rival)
        return np.maximum(0.0, self.margins - got)

    def change_cost(self, dW: np.ndarray, db: np.ndarray) -> float:
        """The norm of a change (frozen biases must be zero)."""
        return change_cost(np.concatenate([dW.ravel(), [] if self.freeze_bias else db.ravel()]), self.norm)

    def objective(self, dW: np.ndarray, db: np.ndarray) -> float:
        """Change cost plus the price of every soft point's shortfall."""
        soft = np.isfinite(self.prices)
        short = np.maximum(0.0, self.margins - self.point_margins(dW, db)) if soft.any() else None
        pen = float((self.prices[soft] * short[soft]).sum()) if soft.any() else 0.0
        return self.change_cost(dW, db) + pen


def box_margins(weight: np.ndarray, bias: np.ndarray, centre: np.ndarray, radius: np.ndarray | None, labels: np.ndarray,
                zero_rival: bool = False, rows: OutputRows | None = None) -> np.ndarray:
    """Per point, the smallest margin of a linear layer over the point's feature box ``centre +- radius`` (``None``: the
    point itself): min over the other classes j of ``logit[y] - logit[j]`` there (and of ``logit[y]`` itself with
    ``zero_rival``); with ``rows``, of the points' own rows as a program holds them (:func:`program_rows`). Exact for a
    box: each row is linear in the features."""
    if rows is not None:
        return program_rows([(rows, labels)], np.shape(weight)[0], zero_rival).box_margins(weight, bias, centre, radius)
    return MarginProblem(weight, bias, centre, labels, 0.0, radii=radius, zero_rival=zero_rival).point_margins()


def norm_coefficients(norm: str, num_entries: int) -> tuple[float, float]:
    """(a, b) of the cost ``a ||d||_1 + b ||d||_inf`` that ``norm`` names, for a change of ``num_entries`` numbers
    (``l1+linf`` is PRDNN's mean|d| + max|d|)."""
    if norm not in NORMS:
        raise CnnRepairError(f"unknown change norm {norm!r}; choose one of {', '.join(NORMS)}")
    return {"l1": (1.0, 0.0), "linf": (0.0, 1.0), "l1+linf": (1.0 / max(int(num_entries), 1), 1.0)}[norm]


def change_cost(d: np.ndarray, norm: str) -> float:
    """The cost of a change ``d`` (every number that may change, flattened) in ``norm``."""
    d = np.abs(np.asarray(d, np.float64).ravel())
    a, b = norm_coefficients(norm, d.size)
    return float(a * d.sum() + b * d.max(initial=0.0))


def margins_of(logits: np.ndarray, labels: np.ndarray, zero_rival: bool = False) -> np.ndarray:
    """logit[y] - max_{j != y} logit[j] per row (float64); with ``zero_rival`` at most logit[y] itself (a rival at 0)."""
    L = np.asarray(logits, np.float64)
    if zero_rival:
        L = np.hstack([L, np.zeros((len(L), 1))])
    idx = np.arange(len(labels))
    own = L[idx, labels]
    other = L.copy()
    other[idx, labels] = -np.inf
    return own - other.max(1)


def certified_lower_bound(p: MarginProblem, point: np.ndarray, cls: np.ndarray, y: np.ndarray,
                          sigma_rows: np.ndarray | None = None) -> float:
    """A lower bound on the optimum from multipliers ``y >= 0`` of rows (point, cls); valid for any y.

    Weak duality: for feasible d, ``N(d) + sum price*s >= r.y + min_d [N(d) - z.d] + min_s s.(price - y_k)``
    with ``z = A^T y``. Soft points' multipliers are capped at their price, then ``y`` is scaled by
    ``s`` in [0, 1]; ``min_{|d|<=B} [a|d|_1 + b|d|_inf - z.d] = -B * max(0, sum (s|z_e| - a)+ - b)``.
    For points with feature boxes each row's features are ``c - sigma_rows * r`` (any sigma in
    [-1, 1] gives a relaxation, :mod:`cnnrepair.repair.ball`). Uses only the problem's data, so a
    third party can recompute it from the multipliers.
    """
    point, cls = np.asarray(point, np.int64), np.asarray(cls, np.int64)
    y = np.maximum(np.asarray(y, np.float64), 0.0)
    if len(y) == 0:
        return 0.0
    y = y.copy()
    soft = np.isfinite(p.prices[point])
    if soft.any():
        total = np.bincount(point, weights=y, minlength=len(p.labels))
        cap = np.where(total > 0, np.minimum(1.0, p.prices / np.maximum(total, 1e-300)), 1.0)
        y[soft] *= cap[point[soft]]
    F = p.features[point]
    if p.radii is not None:
        sig = np.zeros_like(F) if sigma_rows is None else np.clip(np.asarray(sigma_rows, np.float64), -1.0, 1.0)
        F = F - sig * p.radii[point]
    A, off = row_coefs(p, point, cls)
    r = p.margins[point] + off - (np.einsum("ic,ic->i", A, F @ p.weight.T + p.bias))
    base = float(r @ y)
    Ay = A * y[:, None]  # rows x C: each row's multiplier on every class's logit
    z = np.abs((Ay.T @ F).ravel())
    if not p.freeze_bias:
        z = np.concatenate([z, np.abs(Ay.sum(0))])
    a, b = p.norm_coefficients()
    return dual_bound(base, z, a, b, p.max_change)


def row_coefs(p: MarginProblem, point: np.ndarray, cls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coefficients on the C logits, offsets) of rows (point, cls): ``e_y - e_cls`` (``e_y`` for the zero rival, class C)
    and offset 0 in the label form, the points' own rows (:attr:`MarginProblem.rows`, ``cls`` their row index) otherwise."""
    point, cls = np.asarray(point, np.int64), np.asarray(cls, np.int64)
    if p.rows is not None:
        return p.rows.coef[point, cls], p.rows.offset[point, cls]
    C = p.num_classes
    A = np.zeros((len(point), C))
    A[np.arange(len(point)), p.labels[point]] = 1.0
    real = cls < C
    A[np.flatnonzero(real), cls[real]] -= 1.0
    return A, np.zeros(len(point))


def dual_bound(base: float, z: np.ndarray, a: float, b: float, bound: float | None) -> float:
    """``max over s in [0, 1] of s * base + min_{|d| <= bound} [a |d|_1 + b |d|_inf - s z.d]``, and at least 0.

    Multipliers ``y`` scaled by ``s`` keep weak duality, and ``base = r.y``, ``z = |A^T y|``. The inner
    minimum is ``-bound * max(0, sum_e (s z_e - a)+ - b)`` (``-inf`` without a bound if that is
    positive). The function of ``s`` is concave and piecewise linear, so its maximum lies at ``s = 1``,
    at the largest ``s`` whose excess is zero, or where another entry's excess starts (``s = a / z_e``):
    all are evaluated exactly (sorted ``z``, no bisection).
    """
    z = np.sort(np.abs(np.asarray(z, np.float64)))[::-1]
    z = z[z > 0]
    S = np.concatenate([[0.0], np.cumsum(z)])  # S[k]: the k largest

    def excess(s: np.ndarray) -> np.ndarray:
        k = np.searchsorted(-z, -a / np.maximum(s, 1e-300), side="left") if a > 0 else np.full(len(s), len(z))
        return s * S[k] - k * a - b  # entries with s z_e > a are the k largest

    starts = a / z if a > 0 else np.zeros(0)
    cand = np.concatenate([starts[(starts > 0) & (starts < 1.0)], [1.0]])
    ex = excess(cand)
    if ex[-1] <= 0:
        s_star = 1.0
    else:
        first = int(np.argmax(ex > 0))
        k = int((starts < cand[first]).sum()) if a > 0 else len(z)  # in excess on the segment that ends at cand[first]
        s_star = float(min(max((b + k * a) / S[k] * (1.0 - 1e-12), 0.0), 1.0)) if S[k] > 0 else 0.0  # a hair inside: no rounding past zero
    best = s_star * base if excess(np.array([s_star]))[0] <= 0 else 0.0
    if bound is not None and np.isfinite(bound):
        pts = np.concatenate([[s_star], cand[cand > s_star]])
        vals = pts * base - bound * np.maximum(excess(pts), 0.0)
        best = max(best, float(vals.max()))
    return max(0.0, float(best))


@dataclass(frozen=True)
class SolveClock:
    """When a solve started (``time.perf_counter``), how long it may take, and whom it tells how it goes."""

    t0: float
    time_limit: float | None = None
    progress: Callable[[str, int, int], None] | None = None

    @property
    def deadline(self) -> float | None:
        return None if self.time_limit is None else self.t0 + self.time_limit

    def report(self, solver: str, rounds: int, rows: int, gap: float, done: bool = False) -> None:
        """One line: the round, the rows in the program, the certified gap so far (inf: none yet), the seconds; nothing
        while the solve is younger than :data:`QUIET_SECONDS` (a quick solve needs no progress line)."""
        elapsed = time.perf_counter() - self.t0
        if self.progress is not None and elapsed >= QUIET_SECONDS:
            g = "-" if not np.isfinite(gap) else f"{max(gap, 0.0):.1e}"
            self.progress(f"{solver}: round {rounds}, {rows:,} rows, gap {g}, {elapsed:.0f} s", int(done), 1)


@dataclass
class MarginSolution:
    """What :func:`solve_margins` found: the change, its cost, a certified bound, or the conflicts."""

    status: str
    delta_weight: np.ndarray
    delta_bias: np.ndarray
    objective: float
    lower_bound: float
    seconds: float
    rounds: int = 0
    size: dict[str, int] = field(default_factory=dict)
    witness: dict[str, np.ndarray] = field(default_factory=dict)
    conflicts: np.ndarray | None = None
    delta_later: np.ndarray | None = None  # a repair inside the network with its later biases free: their change

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    @property
    def gap(self) -> float:
        """(objective - lower bound) / objective; 0 when both are 0."""
        if not np.isfinite(self.objective):
            return float("inf")
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.lower_bound) / self.objective)


def margin_rows(p: MarginProblem, points: np.ndarray, cls: np.ndarray | None = None) -> tuple[sp.csc_matrix, np.ndarray]:
    """Margin rows written out: ``A d >= rhs`` over the entries (class-major, bias last per class).

    Rows (points[i], cls[i]) when ``cls`` is given, else every rival class of each point.
    """
    C, n = p.weight.shape
    R = p.num_rivals
    nc = n if p.freeze_bias else n + 1
    pts = np.asarray(points, np.int64)
    if cls is None:
        pts = np.repeat(pts, R)
        cls = np.tile(np.arange(R), len(points))
        rival = cls != p.labels[pts]
        pts, cls = pts[rival], cls[rival]
    cls = np.asarray(cls, np.int64)
    L0 = np.hstack([p.logits(), np.zeros((len(p.labels), R - C))])
    rhs = p.margins[pts] - (L0[pts, p.labels[pts]] - L0[pts, cls])
    Fb = p.features[pts] if p.freeze_bias else np.hstack([p.features[pts], np.ones((len(pts), 1))])
    m = len(pts)
    rows = np.repeat(np.arange(m), 2 * nc)
    cols = np.stack([p.labels[pts][:, None] * nc + np.arange(nc), cls[:, None] * nc + np.arange(nc)], 1).reshape(-1)
    vals = np.stack([Fb, -Fb], 1).reshape(-1)
    real = cols < C * nc  # the zero rival has no entries
    return sp.csc_matrix((vals[real], (rows[real], cols[real])), shape=(m, C * nc)), rhs
