"""The smallest change of a linear last layer that gives points their labels with a margin: exact, certified.

Logits are ``L = F W^T + b`` for features ``F`` (N x n) of the frozen part of a network. A point
``k`` with label ``y_k`` and required margin ``m_k`` asks, for every other class ``j``,

    (W_y + dW_y - W_j - dW_j) . f_k + (b_y + db_y - b_j - db_j) >= m_k,
    i.e. (dW_y - dW_j) . f_k + (db_y - db_j) >= r_kj = m_k - (L_ky - L_kj).

Hard points must meet every such row; soft points pay ``price_k`` per unit of their largest
shortfall. The change is measured in ``a * ||d||_1 + b * ||d||_inf`` over weight and bias entries
together (L1: a=1, b=0; L-infinity: a=0, b=1; ``l1+linf``: PRDNN's mean|d| + max|d|, a=1/#entries,
b=1), optionally with ``|d| <= max_change`` on each entry.

The margin rows couple the classes, so the per-class split of the paper's program does not apply,
and the full linear program (2 C (n+1) columns, N (C-1) rows) is slow for general LP codes (see the
README's speed table). Its optimum is sparse twice over: few rows bind (the runner-up class of each
point) and, for L1, few entries change. :func:`solve_margins` exploits both, exactly: HiGHS dual
simplex on a restricted program, rows added when a point's margin is violated by the current
change, entries added while their reduced cost is negative (``|A^T y| > a``), warm-started each
round. It stops only when no row is violated and no entry prices out, which is optimality for the
full program. L1 problems with many violated rows (``_IPM_ROWS``, no ``max_change``) go first to a
structured interior point (``_RowsIPM``): its normal matrix is rows x rows, built class by class,
and holds every entry, so only rows are generated; each solve ends on the certificate below. Hard points are made elastic at a price that grows until their shortfall is zero; if
it cannot be, a deletion filter names a small set of conflicting points (an irreducible infeasible
subset of the points).

The lower bound is certified independently of the solver: any multipliers ``y >= 0`` on margin
rows give ``N(d) >= r.y + min_d [N(d) - (A^T y).d]`` (weak duality), computed in closed form for
this norm family (:func:`certified_lower_bound`), after scaling ``y`` into the dual-feasible set.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from cnnrepair.errors import CnnRepairError

NORMS = ("l1", "linf", "l1+linf")
GAP = 1e-6  # certified relative gap the solve must reach
_FEAS = 1e-9  # primal / dual feasibility tolerance of the scaled program
_CROSSOVER = "on"
_IPM_ROWS = 300  # from this many margin rows on, a round runs HiGHS's interior point
_PRICE_START, _PRICE_MAX = 1e3, 1e9  # elastic price of hard points, scaled units


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

    @property
    def has_boxes(self) -> bool:
        return self.radii is not None

    def subset(self, points: np.ndarray) -> MarginProblem:
        """The same layer and spec for some of the points."""
        idx = np.asarray(points, np.int64)
        return MarginProblem(self.weight, self.bias, self.features[idx], self.labels[idx], self.margins[idx], self.prices[idx],
                             self.norm, self.freeze_bias, self.max_change, None if self.radii is None else self.radii[idx])

    def row_shortfall(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> np.ndarray:
        """N x C: required margin minus the (worst-case, over each box) logit difference to each class; -inf at the label."""
        W = self.weight if dW is None else self.weight + dW
        b = self.bias if db is None else self.bias + db
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

    def norm_coefficients(self) -> tuple[float, float]:
        """(a, b) of the change's cost ``a ||d||_1 + b ||d||_inf``."""
        return {"l1": (1.0, 0.0), "linf": (0.0, 1.0), "l1+linf": (1.0 / self.num_entries, 1.0)}[self.norm]

    def logits(self, dW: np.ndarray | None = None, db: np.ndarray | None = None) -> np.ndarray:
        W = self.weight if dW is None else self.weight + dW
        b = self.bias if db is None else self.bias + db
        return self.features @ W.T + b

    def shortfall(self, logits: np.ndarray) -> np.ndarray:
        """Per point: how far its smallest margin over the other classes is below its required margin (>= 0)."""
        return np.maximum(0.0, self.margins - margins_of(logits, self.labels))

    def change_cost(self, dW: np.ndarray, db: np.ndarray) -> float:
        """The norm of a change (frozen biases must be zero)."""
        a, b = self.norm_coefficients()
        d = np.concatenate([dW.ravel(), [] if self.freeze_bias else db.ravel()])
        return float(a * np.abs(d).sum() + b * np.abs(d).max(initial=0.0))

    def objective(self, dW: np.ndarray, db: np.ndarray) -> float:
        """Change cost plus the price of every soft point's shortfall."""
        soft = np.isfinite(self.prices)
        short = np.maximum(0.0, self.margins - self.point_margins(dW, db)) if soft.any() else None
        pen = float((self.prices[soft] * short[soft]).sum()) if soft.any() else 0.0
        return self.change_cost(dW, db) + pen


def margins_of(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """logit[y] - max_{j != y} logit[j] per row (float64)."""
    L = np.asarray(logits, np.float64)
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
    lab = p.labels[point]
    F = p.features[point]
    if p.radii is not None:
        sig = np.zeros_like(F) if sigma_rows is None else np.clip(np.asarray(sigma_rows, np.float64), -1.0, 1.0)
        F = F - sig * p.radii[point]
    r = p.margins[point] - (np.einsum("ij,ij->i", F, p.weight[lab] - p.weight[cls]) + p.bias[lab] - p.bias[cls])
    base = float(r @ y)
    C, n = p.weight.shape
    Z = np.zeros((C, n))
    np.add.at(Z, lab, y[:, None] * F)
    np.add.at(Z, cls, -y[:, None] * F)
    z = np.abs(Z.ravel())
    if not p.freeze_bias:
        z = np.concatenate([z, np.abs(np.bincount(lab, y, C) - np.bincount(cls, y, C))])
    a, b = p.norm_coefficients()
    B = p.max_change

    def excess(s: float) -> float:
        return float(np.maximum(s * z - a, 0.0).sum() - b)

    def bound(s: float) -> float:
        e = excess(s)
        if e <= 0:
            return s * base
        return -np.inf if B is None else s * base - B * e

    lo, hi = 0.0, 1.0
    if excess(1.0) > 0:
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if excess(mid) <= 0 else (lo, mid)
    else:
        lo = 1.0
    return max(0.0, bound(1.0), bound(lo))


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

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    @property
    def gap(self) -> float:
        """(objective - lower bound) / objective; 0 when both are 0."""
        if not np.isfinite(self.objective):
            return float("inf")
        return 0.0 if self.objective <= 0 else max(0.0, (self.objective - self.lower_bound) / self.objective)


class _Master:
    """The restricted program in HiGHS, in scaled units (features / alpha, margins / beta)."""

    def __init__(self, p: MarginProblem, alpha: float, beta: float, time_limit: float | None):
        from cnnrepair.repair.targets import _new_highs

        self.p, self.alpha, self.beta = p, alpha, beta
        C, n = p.weight.shape
        self.C, self.n = C, n
        self.G = p.features / alpha
        self.ncoef = n if p.freeze_bias else n + 1  # entries per class
        self.a, self.b = p.norm_coefficients()
        self.bound = np.inf if p.max_change is None else p.max_change * alpha / beta
        self.h = _new_highs(time_limit, "simplex")
        for opt in ("primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            self.h.setOptionValue(opt, _FEAS)
        self.h.setOptionValue("simplex_strategy", 1)  # dual simplex: rows are added far more often than columns
        self.ncols = 0
        self.entry_col: dict[int, int] = {}  # entry -> its d+ column (d- is the next one)
        self.entries: list[int] = []
        self.linf_row: dict[int, int] = {}
        self.t_col = None
        self.slack_col: dict[int, int] = {}  # point -> its shortfall column
        self.rows: list[tuple[int, int]] = []
        self.row_pos: list[int] = []  # HiGHS row of each margin row (|d| <= t rows sit between them)
        self.row_index: dict[tuple[int, int], int] = {}
        self.hard_price = _PRICE_START
        if self.b > 0:
            self.t_col = self._add_cols(np.array([self.b]), np.array([0.0]), np.array([np.inf]))

    def _add_cols(self, cost, lower, upper, starts=None, idx=None, vals=None) -> int:
        first = self.ncols
        k = len(cost)
        if starts is None:
            starts, idx, vals = np.zeros(k, np.int32), np.zeros(0, np.int32), np.zeros(0)
        self.h.addCols(k, np.asarray(cost, float), np.asarray(lower, float), np.asarray(upper, float), len(vals),
                       np.asarray(starts, np.int32), np.asarray(idx, np.int32), np.asarray(vals, float))
        self.ncols += k
        return first

    def entry_coef(self, e: int, points: np.ndarray) -> np.ndarray:
        """Scaled coefficient of entry e (class c, feature i; i == n is the bias) in rows of ``points`` for class c."""
        c, i = divmod(e, self.ncoef)
        return self.G[points, i] if i < self.n else np.full(len(points), 1.0 / self.alpha)

    def add_rows(self, pairs: list[tuple[int, int]], rhs: np.ndarray) -> None:
        """Margin rows for (point, class) pairs; each point gets its shortfall column first."""
        new_pts = sorted({k for k, _ in pairs if k not in self.slack_col})
        if new_pts:
            cost = [self._slack_price(k) for k in new_pts]
            first = self._add_cols(np.array(cost), np.zeros(len(new_pts)), np.full(len(new_pts), np.inf))
            for off, k in enumerate(new_pts):
                self.slack_col[k] = first + off
        # column-wise lookup of active entries by class, for speed
        by_class: dict[int, list[tuple[int, int]]] = {}
        for e in self.entries:
            c, i = divmod(e, self.ncoef)
            by_class.setdefault(c, []).append((i, self.entry_col[e]))
        starts, idx, vals = [], [], []
        base = self.h.getNumRow()
        for (k, j) in pairs:
            starts.append(len(vals))
            yk = int(self.p.labels[k])
            for c, sign in ((yk, 1.0), (j, -1.0)):
                for i, col in by_class.get(c, ()):
                    v = sign * (self.G[k, i] if i < self.n else 1.0 / self.alpha)
                    if v != 0.0:
                        idx += [col, col + 1]
                        vals += [v, -v]
            idx.append(self.slack_col[k])
            vals.append(1.0)
            self.row_index[(k, j)] = len(self.rows)
            self.row_pos.append(base + len(starts) - 1)
            self.rows.append((k, j))
        self.h.addRows(len(pairs), np.asarray(rhs, float), np.full(len(pairs), np.inf), len(vals),
                       np.asarray(starts, np.int32), np.asarray(idx, np.int32), np.asarray(vals, float))

    def _slack_price(self, k: int) -> float:
        price = self.p.prices[k]
        return self.hard_price if not np.isfinite(price) else price * self.alpha

    def raise_hard_price(self, factor: float) -> None:
        self.hard_price *= factor
        hard = [col for k, col in self.slack_col.items() if not np.isfinite(self.p.prices[k])]
        if hard:
            self.h.changeColsCost(len(hard), np.asarray(hard, np.int32), np.full(len(hard), self.hard_price))

    def add_entries(self, entries: np.ndarray) -> None:
        """Columns d+ and d- for new entries (and their |d| <= t rows for an L-infinity term)."""
        if len(entries) == 0:
            return
        pts = np.array([k for k, _ in self.rows], np.int64)
        cls = np.array([j for _, j in self.rows], np.int64)
        lab = self.p.labels[pts] if len(pts) else pts
        pos = np.asarray(self.row_pos, np.int64)
        starts, idx, vals = [], [], []
        for e in entries:
            c, i = divmod(int(e), self.ncoef)
            sel = np.flatnonzero((lab == c) | (cls == c))
            coef = self.entry_coef(int(e), pts[sel]) * np.where(lab[sel] == c, 1.0, -1.0)
            nz = coef != 0
            for sign in (1.0, -1.0):
                starts.append(len(vals))
                idx.extend(pos[sel[nz]].tolist())
                vals.extend((sign * coef[nz]).tolist())
        k = 2 * len(entries)
        cost = np.full(k, self.a)
        first = self._add_cols(cost, np.zeros(k), np.full(k, self.bound), np.asarray(starts), np.asarray(idx), np.asarray(vals))
        for off, e in enumerate(entries):
            self.entry_col[int(e)] = first + 2 * off
            self.entries.append(int(e))
        if self.t_col is not None:  # d+ + d- - t <= 0 (at most one of d+, d- is non-zero at a vertex that matters)
            m = len(entries)
            st = np.arange(m, dtype=np.int32) * 3
            ix = np.ravel([[first + 2 * o, first + 2 * o + 1, self.t_col] for o in range(m)]).astype(np.int32)
            vv = np.tile([1.0, 1.0, -1.0], m)
            base = self.h.getNumRow()
            self.h.addRows(m, np.full(m, -np.inf), np.zeros(m), len(vv), st, ix, vv)
            for off, e in enumerate(entries):
                self.linf_row[int(e)] = base + off

    def solution(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(change in scaled units per entry, margin-row duals, shortfall per point with a column)."""
        sol = self.h.getSolution()
        x = np.asarray(sol.col_value)
        d = np.zeros(self.C * self.ncoef)
        for e in self.entries:
            col = self.entry_col[e]
            d[e] = x[col] - x[col + 1]
        duals = np.asarray(sol.row_dual)
        y = np.maximum(duals[np.asarray(self.row_pos, np.int64)], 0.0) if self.rows else np.zeros(0)
        slack = {k: x[c] for k, c in self.slack_col.items()}
        return d, y, slack

    def unscale(self, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = d.reshape(self.C, self.ncoef) * self.beta / self.alpha
        dW = D[:, :self.n].copy()
        db = D[:, self.n].copy() if not self.p.freeze_bias else np.zeros(self.C)
        return dW, db

    def prices_out(self, y: np.ndarray) -> np.ndarray:
        """|A^T y| per entry in scaled units (the reduced cost of d+/- is a -+ it)."""
        Ymat = np.zeros((len(self.p.labels), self.C))
        if len(self.rows):
            pts = np.array([k for k, _ in self.rows])
            cls = np.array([j for _, j in self.rows])
            np.add.at(Ymat, (pts, self.p.labels[pts]), y)
            np.add.at(Ymat, (pts, cls), -y)
        Z = Ymat.T @ self.G
        if not self.p.freeze_bias:
            Z = np.hstack([Z, Ymat.sum(0)[:, None] / self.alpha])
        return np.abs(Z.ravel())


def solve_margins(p: MarginProblem, time_limit: float | None = None, max_rounds: int = 10_000) -> MarginSolution:
    """Solve the margin program exactly (structured interior point or HiGHS, with generation); see the module docstring.

    Status ``optimal`` comes with a certified lower bound whose relative gap to the objective is at
    most 1e-6; ``infeasible`` with ``conflicts`` (indices of points that cannot all meet their margins).
    """
    from cnnrepair.repair.targets import _highs_status

    if p.has_boxes:
        raise CnnRepairError("points with feature boxes need the box program: cnnrepair.repair.ball.solve_ball")
    t0 = time.perf_counter()
    C, n = p.weight.shape
    N = len(p.labels)
    zero = (np.zeros((C, n)), np.zeros(C))
    L0 = p.logits()
    R0 = p.margins[:, None] - (L0[np.arange(N), p.labels][:, None] - L0)  # required change per (point, class)
    if N:
        R0[np.arange(N), p.labels] = -np.inf
    need = R0.max(1) > 0 if N else np.zeros(0, bool)
    if not need.any():
        return MarginSolution("optimal", *zero, 0.0, 0.0, time.perf_counter() - t0)
    alpha = float(np.abs(p.features).max()) or 1.0
    beta = float(R0[need].max())
    if p.norm == "l1" and p.max_change is None and int((R0 > 0).sum()) >= _IPM_ROWS:
        found = _solve_rows_ipm(p, R0, alpha, beta, t0, time_limit)
        if found is not None:
            return found
    master = _Master(p, alpha, beta, time_limit)
    ncoef = master.ncoef
    # first rows: every (point, class) the unchanged layer violates
    first = [(int(k), int(j)) for k, j in zip(*np.nonzero(R0 > 0))]
    master.add_rows(first, R0[tuple(np.array(first).T)] / beta)
    in_master = np.zeros((N, C), bool)
    in_master[tuple(np.array(first).T)] = True
    # first entries: for each such row, the largest features of its two classes (and biases)
    seed = set()
    for k, j in first:
        top = np.argsort(-np.abs(p.features[k]))[:3]
        for c in (int(p.labels[k]), j):
            seed.update(c * ncoef + int(i) for i in top if p.features[k, i] != 0)
            if not p.freeze_bias:
                seed.add(c * ncoef + n)
    if master.a == 0:  # pure L-infinity: every entry may as well move; no column generation
        seed = set(range(C * ncoef))
    master.add_entries(np.array(sorted(seed), np.int64))
    rounds = 0
    status = "optimal"
    master.h.setOptionValue("run_crossover", _CROSSOVER)
    while True:
        # many dense rows: HiGHS's interior point (with crossover) beat warm-started dual simplex by 10x in our runs
        master.h.setOptionValue("solver", "ipm" if len(master.rows) >= _IPM_ROWS else "simplex")
        if time_limit is not None:
            master.h.setOptionValue("time_limit", max(1e-3, time_limit - (time.perf_counter() - t0)))
        master.h.run()
        rounds += 1
        name = _highs_status(master.h)
        if name != "optimal":
            status = "time_limit" if name == "time_limit" else "failed"
            break
        d, y, slack = master.solution()
        # entries that price out
        z = master.prices_out(y)
        z[master.entries] = 0.0
        entering = np.flatnonzero(z > master.a * (1 + 1e-9) + _FEAS)
        if len(entering):
            limit = max(100, 2 * len(master.rows))
            entering = entering[np.argsort(-z[entering])][:limit]
            master.add_entries(entering)
        # rows violated by the current change, beyond the point's own shortfall
        dW, db = master.unscale(d)
        L = p.logits(dW, db)
        Rk = (p.margins[:, None] - (L[np.arange(N), p.labels][:, None] - L)) / beta
        Rk[np.arange(N), p.labels] = -np.inf
        Rk[in_master] = -np.inf
        allowed = np.zeros(N)
        for k, s in slack.items():
            allowed[k] = s
        bad_k, bad_j = np.nonzero(Rk - allowed[:, None] > 10 * _FEAS)
        pairs = list(zip(bad_k.tolist(), bad_j.tolist()))
        if pairs:
            master.add_rows(pairs, R0[bad_k, bad_j] / beta)
            in_master[bad_k, bad_j] = True
        if not len(entering) and not pairs:
            hard_short = [k for k, s in slack.items() if not np.isfinite(p.prices[k]) and s > _FEAS * 10]
            if not hard_short:
                break
            if master.hard_price >= _PRICE_MAX:
                status = "infeasible"
                break
            master.raise_hard_price(100.0)
        if rounds >= max_rounds:
            status = "not_converged"
            break
    seconds = time.perf_counter() - t0
    size = {"rows": len(master.rows), "entries": len(master.entries), "points": N, "full_rows": N * (C - 1),
            "full_entries": C * ncoef}
    if status == "infeasible":
        conflicts = find_conflicts(p, [k for k, s in slack.items() if not np.isfinite(p.prices[k]) and s > _FEAS * 10],
                                   master)
        return MarginSolution("infeasible", *zero, np.inf, 0.0, time.perf_counter() - t0, rounds, size, conflicts=conflicts)
    if status != "optimal":
        return MarginSolution(status, *zero, np.inf, 0.0, seconds, rounds, size)
    dW, db = master.unscale(d)
    pts = np.array([k for k, _ in master.rows], np.int64)
    cls = np.array([j for _, j in master.rows], np.int64)
    ydual = y / alpha
    lb = certified_lower_bound(p, pts, cls, ydual)
    obj = p.objective(dW, db)
    witness = {"point": pts, "class": cls, "multiplier": ydual}
    return MarginSolution("optimal", dW, db, obj, lb, seconds, rounds, size, witness)


def margin_rows(p: MarginProblem, points: np.ndarray) -> tuple[sp.csc_matrix, np.ndarray]:
    """Every margin row of ``points`` written out: ``A d >= rhs`` over the entries (class-major, bias last per class)."""
    C, n = p.weight.shape
    nc = n if p.freeze_bias else n + 1
    pts = np.repeat(np.asarray(points, np.int64), C)
    cls = np.tile(np.arange(C), len(points))
    rival = cls != p.labels[pts]
    pts, cls = pts[rival], cls[rival]
    L0 = p.logits()
    rhs = p.margins[pts] - (L0[pts, p.labels[pts]] - L0[pts, cls])
    Fb = p.features[pts] if p.freeze_bias else np.hstack([p.features[pts], np.ones((len(pts), 1))])
    m = len(pts)
    rows = np.repeat(np.arange(m), 2 * nc)
    cols = np.stack([p.labels[pts][:, None] * nc + np.arange(nc), cls[:, None] * nc + np.arange(nc)], 1).reshape(-1)
    vals = np.stack([Fb, -Fb], 1).reshape(-1)
    return sp.csc_matrix((vals, (rows, cols)), shape=(m, C * nc)), rhs


def _hard_feasible(p: MarginProblem, points: list[int]) -> bool:
    """Can these points all meet their margins with some change (within ``max_change``)? One exact LP."""
    from cnnrepair.repair.targets import _highs_status, _new_highs, _pass_lp

    A, rhs = margin_rows(p, np.asarray(points, np.int64))
    scale = float(np.abs(A.data).max(initial=0.0)) or 1.0
    A = sp.hstack([A, -A], format="csc") / scale
    rscale = float(np.abs(rhs).max()) or 1.0
    upper = np.full(A.shape[1], np.inf if p.max_change is None else p.max_change * scale / rscale)
    h = _new_highs(None, "simplex")
    _pass_lp(h, np.zeros(A.shape[1]), A, upper, rhs / rscale, np.full(len(rhs), np.inf))
    h.run()
    return _highs_status(h) != "infeasible"


def find_conflicts(p: MarginProblem, suspects: list[int], master: _Master | None = None, feasible=None,
                   deadline: float | None = None) -> np.ndarray:
    """A small set of hard points that cannot all meet their margins: irreducible (drop any one and the rest can).

    Starts from the suspects (falls back to every hard point) and deletes chunks, then single points,
    while the rest stays infeasible (a deletion filter). ``feasible(points)`` decides a subset
    (default: the pointwise feasibility LP). Past ``deadline`` (perf_counter seconds) it stops
    deleting: the set returned still conflicts but may not be irreducible.
    """
    feasible = feasible or (lambda pts: _hard_feasible(p, pts))
    hard = [k for k in range(len(p.labels)) if not np.isfinite(p.prices[k])]
    cands = sorted(set(suspects))
    if master is not None:
        cands = sorted(set(cands) | {k for k, _ in master.rows if not np.isfinite(p.prices[k])})
    if not cands or feasible(cands):
        cands = hard
        if feasible(cands):
            return np.zeros(0, np.int64)
    chunk = max(1, len(cands) // 2)
    while True:
        i = 0
        while i < len(cands) and (deadline is None or time.perf_counter() < deadline):
            trial = cands[:i] + cands[i + chunk:]
            if trial and not feasible(trial):
                cands = trial
            else:
                i += chunk
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    return np.asarray(cands, np.int64)


_IPM_GAP = 1e-8  # certified relative gap each interior-point solve aims for
_IPM_HARD_PRICE = 1e4  # elastic price of hard points in the interior point (scaled units)
_NEAR = 0.02  # scaled units (the largest required change is 1)
_IPM_PATIENCE = 6  # iterations without a better certificate before an interior-point solve stops


def _max_step(v: list[np.ndarray], dv: list[np.ndarray]) -> float:
    """Largest step in [0, 1] that keeps every block of ``v + step * dv`` non-negative."""
    ratios = [np.min(-x[dx < 0] / dx[dx < 0], initial=np.inf) for x, dx in zip(v, dv)]
    return min(1.0, min(ratios))


class _RowsIPM:
    """Mehrotra predictor-corrector for the L1 margin program on a set of rows, with every entry.

    Standard form: ``A(p - q) + B e - s = r`` with p, q (entries), e (one shortfall per point),
    s (surplus) >= 0; costs a, a, price, 0. The normal matrix ``A D A^T + B D_e B^T + D_s`` is
    rows x rows and is built class by class (a row touches its label's and its rival's entries
    only), so all ``C (n+1)`` entries cost only a product with the features: no column generation.
    """

    def __init__(self, p: MarginProblem, G: np.ndarray, alpha: float, pts: np.ndarray, cls: np.ndarray, r: np.ndarray,
                 price: np.ndarray):
        self.p, self.G, self.alpha = p, G, alpha
        self.pts, self.cls, self.r = pts, cls, r
        self.lab = p.labels[pts]
        self.C = p.num_classes
        self.nc = G.shape[1] + (0 if p.freeze_bias else 1)
        self.Gt = G if p.freeze_bias else np.hstack([G, np.full((len(G), 1), 1.0 / alpha)])
        self.points, self.row_point = np.unique(pts, return_inverse=True)
        self.price = price[self.points]
        m = len(pts)
        self.B = sp.csr_matrix((np.ones(m), (np.arange(m), self.row_point)), shape=(m, len(self.points)))
        self.by_class = []
        for c in range(self.C):
            idx = np.flatnonzero((self.lab == c) | (self.cls == c))
            sign = np.where(self.lab[idx] == c, 1.0, -1.0)
            self.by_class.append((idx, sign[:, None] * self.Gt[pts[idx]]))

    def At(self, y: np.ndarray) -> np.ndarray:
        """A^T y as a C x nc matrix."""
        Z = np.zeros((self.C, self.nc))
        for c, (idx, Gc) in enumerate(self.by_class):
            Z[c] = y[idx] @ Gc
        return Z

    def A(self, d: np.ndarray) -> np.ndarray:
        """A d for a change d (C x nc): the logit-difference change of every row."""
        L = self.Gt[self.pts] @ d.T
        rows = np.arange(len(self.pts))
        return L[rows, self.lab] - L[rows, self.cls]

    def solve(self, a: float, deadline: float | None) -> tuple[str, np.ndarray, np.ndarray]:
        """(status, d, y): the change (C x nc, scaled units) and row multipliers of the best certified iterate."""
        import scipy.linalg as sla

        m, P = len(self.pts), len(self.points)
        E = self.C * self.nc
        w = self.price
        t = 1.0 + float(np.abs(self.r).mean())
        short0 = np.zeros(P)
        np.maximum.at(short0, self.row_point, np.maximum(self.r, 0.0))
        X = [np.full(E, t), np.full(E, t), short0 + t, None]
        X[3] = self.B @ X[2] - self.r
        Aty1 = np.abs(self.At(np.ones(m))).max()
        eta = min(0.5 * a / max(Aty1, 1e-300), 0.5 * float(w.min()) / max(1.0, float(np.bincount(self.row_point).max())))
        y = np.full(m, eta)
        Aty = self.At(y).ravel()
        Z = [a - Aty, a + Aty, w - self.B.T @ y, y.copy()]
        n_all = 2 * E + P + m
        best, best_it = (np.inf, None, None), 0  # (relative gap, d, y)
        with np.errstate(all="ignore"):
            for it in range(200):
                d = (X[0] - X[1]).reshape(self.C, self.nc)
                upper, lower = self._bounds(d, y, a)
                rel = (upper - lower) / max(abs(upper), 1e-300)
                if np.isfinite(rel) and rel < best[0] and self._hard_ok(d):
                    best, best_it = (rel, d.copy(), y.copy()), it
                if it - best_it > _IPM_PATIENCE:  # late iterations are ill-conditioned: keep the best certificate
                    break
                if upper - lower <= _IPM_GAP * abs(upper) and self._hard_ok(d):
                    return "optimal", d, y
                if deadline is not None and time.perf_counter() > deadline:
                    return "time_limit", d, y
                Aty = self.At(y).ravel()
                rd = [a - Aty - Z[0], a + Aty - Z[1], w - self.B.T @ y - Z[2], y - Z[3]]
                rp = self.r - (self.A(d) + self.B @ X[2] - X[3])
                mu = sum(x @ z for x, z in zip(X, Z)) / n_all
                D = [x / z for x, z in zip(X, Z)]
                theta = (D[0] + D[1]).reshape(self.C, self.nc)
                M = np.zeros((m, m))
                for c, (idx, Gc) in enumerate(self.by_class):
                    if len(idx):
                        M[np.ix_(idx, idx)] += (Gc * theta[c]) @ Gc.T
                M += (self.B.multiply(D[2][None, :]) @ self.B.T).toarray()
                M[np.diag_indices(m)] += D[3]
                factor, reg = None, 1e-14 * float(M.diagonal().max())
                while factor is None and reg < 1e-4 * float(M.diagonal().max()):
                    try:
                        factor = np.linalg.cholesky(M)
                    except np.linalg.LinAlgError:
                        M[np.diag_indices(m)] += reg
                        reg *= 100.0
                if factor is None:
                    break

                def direction(comp):
                    q = [(cm - x * r_) / z for cm, x, r_, z in zip(comp, X, rd, Z)]
                    rhs = rp - (self.A((q[0] - q[1]).reshape(self.C, self.nc)) + self.B @ q[2] - q[3])
                    dy = sla.solve_triangular(factor, sla.solve_triangular(factor, rhs, lower=True, check_finite=False),
                                              lower=True, trans="T", check_finite=False)
                    Atdy = self.At(dy).ravel()
                    Btdy = self.B.T @ dy
                    dX = [q[0] + D[0] * Atdy, q[1] - D[1] * Atdy, q[2] + D[2] * Btdy, q[3] - D[3] * dy]
                    dZ = [rd[0] - Atdy, rd[1] + Atdy, rd[2] - Btdy, rd[3] + dy]
                    return dy, dX, dZ

                dy, dX, dZ = direction([-x * z for x, z in zip(X, Z)])
                ap, ad = _max_step(X, dX), _max_step(Z, dZ)
                mu_aff = sum((x + ap * dx) @ (z + ad * dz) for x, dx, z, dz in zip(X, dX, Z, dZ)) / n_all
                sigma = (mu_aff / mu) ** 3
                dy, dX, dZ = direction([-x * z + sigma * mu - dx * dz for x, z, dx, dz in zip(X, Z, dX, dZ)])
                ap, ad = 0.995 * _max_step(X, dX), 0.995 * _max_step(Z, dZ)
                X = [x + ap * dx for x, dx in zip(X, dX)]
                Z = [z + ad * dz for z, dz in zip(Z, dZ)]
                y = y + ad * dy
        if best[1] is not None and best[0] <= 0.1 * GAP:  # stalled a hair above its aim, well within the contract
            return "optimal", best[1], best[2]
        return "not_converged", (X[0] - X[1]).reshape(self.C, self.nc), y

    def _shortfall(self, d: np.ndarray) -> np.ndarray:
        short = np.zeros(len(self.points))
        np.maximum.at(short, self.row_point, np.maximum(self.r - self.A(d), 0.0))
        return short

    def _hard_ok(self, d: np.ndarray) -> bool:
        hard = ~np.isfinite(self.p.prices[self.points])
        return bool((self._shortfall(d)[hard] <= 10 * _FEAS).all())

    def _bounds(self, d: np.ndarray, y: np.ndarray, a: float) -> tuple[float, float]:
        """Elastic objective at d, and the certified lower bound of the same elastic program from y."""
        short = self._shortfall(d)
        upper = a * float(np.abs(d).sum()) + float(self.price @ short)
        z = np.abs(self.At(y)).max()
        cap = np.zeros(len(self.points))
        np.add.at(cap, self.row_point, y)
        s = min(1.0, a / max(z, 1e-300), float(np.min(self.price / np.maximum(cap, 1e-300))))
        return upper, s * float(self.r @ y)


def _solve_rows_ipm(p: MarginProblem, R0: np.ndarray, alpha: float, beta: float, t0: float,
                    time_limit: float | None) -> MarginSolution | None:
    """L1 without bounds, many rows: the structured interior point with row generation (None: let simplex do it)."""
    N, C = R0.shape
    G = p.features / alpha
    price = np.where(np.isfinite(p.prices), p.prices * alpha, _IPM_HARD_PRICE)
    in_set = R0 / beta > -_NEAR
    in_set[np.arange(N), p.labels] = False
    deadline = None if time_limit is None else t0 + time_limit
    rounds = 0
    while True:
        pts, cls = np.nonzero(in_set)
        ipm = _RowsIPM(p, G, alpha, pts, cls, R0[pts, cls] / beta, price)
        status, d, y = ipm.solve(1.0, deadline)
        rounds += 1
        if status != "optimal":
            return None
        nc = ipm.nc
        D = d * beta / alpha
        dW, db = D[:, :p.weight.shape[1]], (D[:, -1] if not p.freeze_bias else np.zeros(C))
        L = p.logits(dW, db)
        Rk = (p.margins[:, None] - (L[np.arange(N), p.labels][:, None] - L)) / beta
        Rk[np.arange(N), p.labels] = -np.inf
        Rk[in_set] = -np.inf
        allowed = np.zeros(N)
        allowed[ipm.points] = ipm._shortfall(d)
        allowed[~np.isfinite(p.prices)] = 0.0
        bad = Rk - allowed[:, None] > 10 * _FEAS
        if not bad.any():
            break
        # rows within a hair of binding bind after the next change as often as not: add them now, saving rounds
        in_set |= bad | (Rk - allowed[:, None] > -_NEAR)
    # an interior point is not a vertex: drop changes too small to matter when the certificate survives it
    ydual = y / alpha
    lower = certified_lower_bound(p, pts, cls, ydual)
    for threshold in (1e-6, 1e-8, 1e-10, 0.0):
        keep = np.abs(D) > threshold * np.abs(D).max(initial=0.0)
        D2 = np.where(keep, D, 0.0)
        dW2, db2 = D2[:, :p.weight.shape[1]], (D2[:, -1] if not p.freeze_bias else np.zeros(C))
        short = p.shortfall(p.logits(dW2, db2))
        hard = ~np.isfinite(p.prices)
        obj = p.objective(dW2, db2)
        if (short[hard] <= 10 * _FEAS * beta).all() and obj - lower <= GAP * obj:
            dW, db = dW2.copy(), db2.copy()
            break
    size = {"rows": int(in_set.sum()), "entries": C * nc, "points": N, "full_rows": N * (C - 1), "full_entries": C * nc}
    witness = {"point": pts.astype(np.int64), "class": cls.astype(np.int64), "multiplier": ydual}
    obj = p.objective(dW, db)
    if obj - lower > GAP * obj:
        return None
    return MarginSolution("optimal", dW, db, obj, lower, time.perf_counter() - t0, rounds, {**size, "method": "interior point"}, witness)
