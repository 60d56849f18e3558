"""The smallest change of a linear last layer after which whole boxes of features keep their labels.

A point ``k`` whose frozen features are only known to lie in a box ``c_k +- r_k`` (sound bounds
over an input ball, :mod:`cnnrepair.bounds`) keeps label ``y`` with margin ``m_k`` for *every*
feature vector of the box iff, for each other class ``j``, with ``D = W_y - W_j`` after the change,

    min over the box of  D . f + (b_y - b_j)  =  D . c_k - r_k . |D| + (b_y - b_j)  >=  m_k.

With an auxiliary ``u >= |D|`` per class pair and feature this is linear (``D . c_k - r_k . u + ... >= m_k``),
and exact for the box: ``u = |D|`` is always allowed, and a larger ``u`` only makes the row harder.
Points with their own output rows (:mod:`cnnrepair.repair.outputs`: ``a . z >= b + m_k``) are the
same with ``D = W^T a``: ``u`` is shared by the rows of one direction (``a`` up to sign; a class pair
is the direction ``e_y - e_j``). Points with ``r_k = 0`` are the pointwise rows of
:mod:`cnnrepair.repair.margins` (which takes label rows only: problems with output rows come here). The
program is solved by HiGHS over every weight and bias entry, with rows generated (a row enters when
the current change violates it) and ``u`` columns made for the directions those rows use.

Certified lower bound: for any ``sigma`` in [-1, 1] per (direction, feature), ``|D| >= sigma . D``, so every
feasible change also meets the pointwise rows with features ``c_k - sigma r_k``; weak duality on
that relaxation (:func:`cnnrepair.repair.program.certified_lower_bound`) bounds the optimum from the
margin rows' multipliers and ``sigma`` read off the direction rows' multipliers.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from cnnrepair.repair.margins import CONFLICT_SECONDS, find_conflicts
from cnnrepair.repair.program import FEAS as _FEAS
from cnnrepair.repair.program import MarginProblem, MarginSolution, certified_lower_bound, row_coefs

_NEAR = 0.05  # rows within this share of the largest required change join the first round


def row_directions(A: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(directions M x C, each row's direction index, each row's sign): rows' coefficient vectors up to sign (the first
    non-zero coefficient of a direction is positive), so that ``a_r = sign_r * directions[index_r]``. Rows of one direction
    share their ``u >= |W^T d|`` columns."""
    A = np.asarray(A, np.float64).reshape(len(A), -1)
    if not len(A):
        return np.zeros((0, A.shape[1])), np.zeros(0, np.int64), np.zeros(0)
    first = np.argmax(A != 0, axis=1)
    sign = np.sign(A[np.arange(len(A)), first])
    dirs, index = np.unique(A * sign[:, None], axis=0, return_inverse=True)
    return dirs, index.reshape(-1).astype(np.int64), sign


def pair_directions(pairs: np.ndarray, classes: int) -> np.ndarray:
    """The directions of class pairs ``(u, v)``, ``u < v`` (as certificates before output rows record them): ``e_u - e_v``,
    and ``e_u`` where ``v`` is the zero rival (index ``classes``)."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    D = np.zeros((len(pairs), classes))
    D[np.arange(len(pairs)), pairs[:, 0]] = 1.0
    real = pairs[:, 1] < classes
    D[np.flatnonzero(real), pairs[real, 1]] = -1.0
    return D


def sigma_rows(p: MarginProblem, point: np.ndarray, cls: np.ndarray, directions: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per row, the sign vector its relaxation uses: its direction's sigma, times the row's sign along that direction
    (0 for a row whose direction has none)."""
    A, _ = row_coefs(p, point, cls)
    _, _, sign = row_directions(A)
    first = np.argmax(A != 0, axis=1) if len(A) else np.zeros(0, np.int64)
    key = {tuple(d): i for i, d in enumerate(np.asarray(directions, np.float64))}
    out = np.zeros((len(A), p.weight.shape[1]))
    for r in range(len(A)):
        i = key.get(tuple(A[r] * sign[r]))
        if i is not None and A[r, first[r]] != 0:
            out[r] = sigma[i] * sign[r]
    return out


def solve_ball(p: MarginProblem, time_limit: float | None = None, max_rounds: int = 100) -> MarginSolution:
    """Solve the margin program with feature boxes (``p.radii``) exactly; see the module docstring."""
    from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, run as run_highs

    t0 = time.perf_counter()
    C, n = p.weight.shape
    N = len(p.labels)
    zero = (np.zeros((C, n)), np.zeros(C))
    R0 = p.row_shortfall()  # required change per (point, class) at no change, worst case over each box
    need = R0.max(1) > 0 if N else np.zeros(0, bool)
    if not need.any():
        return MarginSolution("optimal", *zero, 0.0, 0.0, time.perf_counter() - t0, size={"method": "box LP"})
    radii = p.radii if p.radii is not None else np.zeros_like(p.features)
    alpha = float(max(np.abs(p.features).max(), radii.max())) or 1.0
    beta = float(R0[need].max())
    in_set = np.isfinite(R0) & (R0 / beta > -_NEAR)  # (-inf: no such row, as at a point's own label)
    wide = np.flatnonzero(radii.max(0) > 0)  # features whose value moves within some box
    rounds, status = 0, "optimal"
    while True:
        pts, cls = np.nonzero(in_set)
        lp = _BoxLP(p, pts, cls, wide, alpha, beta)
        h = new_highs(None if time_limit is None else max(1e-3, time_limit - (time.perf_counter() - t0)), "simplex")
        for opt in ("primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            h.setOptionValue(opt, _FEAS)
        pass_lp(h, lp.cost, lp.A, lp.upper, lp.row_lower, np.full(len(lp.row_lower), np.inf))
        run_highs(h)
        name = highs_status(h)
        if name not in ("optimal", "infeasible", "time_limit"):  # numerical trouble in simplex: the interior point, then crossover
            h.setOptionValue("solver", "ipm")
            h.setOptionValue("run_crossover", "on")
            h.clearSolver()
            run_highs(h)
            name = highs_status(h)
        rounds += 1
        if name != "optimal":
            status = {"infeasible": "infeasible", "time_limit": "time_limit"}.get(name, f"failed ({name})")
            break
        sol = h.getSolution()
        x, duals = np.asarray(sol.col_value), np.maximum(np.asarray(sol.row_dual), 0.0)
        dW, db = lp.change(x)
        short = p.row_shortfall(dW, db)
        short[in_set] = -np.inf
        allowed = np.zeros(N)
        allowed[lp.soft_points] = x[lp.slack_cols] * beta
        bad = short - allowed[:, None] > 10 * _FEAS * beta
        if not bad.any() or rounds >= max_rounds:
            status = "optimal" if not bad.any() else "not_converged"
            break
        in_set |= bad | (short - allowed[:, None] > -_NEAR * beta)
    seconds = time.perf_counter() - t0
    size = {"rows": int(in_set.sum()), "entries": int(C * lp.ncoef), "directions": int(len(lp.dirs)), "box_features": int(len(wide)),
            "points": N, "full_rows": N * (p.num_rivals - 1), "full_entries": int(C * lp.ncoef), "method": "box LP"}
    if status == "infeasible":
        hard = [k for k in range(N) if not np.isfinite(p.prices[k])]
        deadline = time.perf_counter() + CONFLICT_SECONDS
        if time_limit is not None:
            deadline = min(deadline, t0 + time_limit)
        conflicts = find_conflicts(p, hard, feasible=lambda ks: _feasible(p, ks, wide, deadline), deadline=deadline)
        size["conflicts_irreducible"] = time.perf_counter() < deadline  # else: they conflict, but a smaller set may too
        return MarginSolution("infeasible", *zero, np.inf, 0.0, time.perf_counter() - t0, rounds, size, conflicts=conflicts)
    if status != "optimal":
        return MarginSolution(status, *zero, np.inf, 0.0, seconds, rounds, size)
    y = duals[:lp.n_margin] / alpha
    sigma = lp.sigma(duals)
    srows = lp.sigma_rows(sigma)
    lower = certified_lower_bound(p, pts, cls, y, sigma_rows=srows)
    obj = p.objective(dW, db)
    witness = {"point": pts.astype(np.int64), "class": cls.astype(np.int64), "multiplier": y,
               "directions": lp.dirs, "sigma": sigma}
    return MarginSolution("optimal", dW, db, obj, lower, seconds, rounds, size, witness)


def _feasible(p: MarginProblem, points: list[int], wide: np.ndarray, deadline: float | None = None) -> bool | None:
    """Can these hard points all keep their boxes' labels with some change? One exact LP (None: undecided at
    ``deadline``, so that the point stays in the conflicting set)."""
    from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, run as run_highs

    sub = p.subset(np.asarray(points, np.int64))
    R = sub.row_shortfall()
    pts, cls = np.nonzero(np.isfinite(R))  # every row each point has
    scale = float(np.abs(R[np.isfinite(R)]).max(initial=1.0)) or 1.0
    alpha = float(max(np.abs(sub.features).max(initial=0.0), 0.0 if sub.radii is None else sub.radii.max(initial=0.0))) or 1.0
    lp = _BoxLP(sub, pts, cls, wide, alpha, scale)
    h = new_highs(None if deadline is None else max(1e-3, deadline - time.perf_counter()), "simplex")
    pass_lp(h, np.zeros(len(lp.cost)), lp.A, lp.upper, lp.row_lower, np.full(len(lp.row_lower), np.inf))
    run_highs(h)
    return {"infeasible": False, "time_limit": None}.get(highs_status(h), True)


class _BoxLP:
    """The program on a set of rows, in scaled units (features / alpha, logit changes / beta).

    Columns: d+ and d- per entry (class-major, bias last per class), an L-infinity level t if the
    norm has one, a shortfall per soft point with rows, and u per (row direction, wide feature).
    Rows: margin rows first, then |d| <= t rows, then u >= +-(W^T d) rows per direction and feature.
    """

    def __init__(self, p: MarginProblem, pts: np.ndarray, cls: np.ndarray, wide: np.ndarray, alpha: float, beta: float):
        C, n = p.weight.shape
        self.p, self.alpha, self.beta, self.n = p, alpha, beta, n
        self.pts, self.cls = pts, cls
        nc = self.ncoef = n if p.freeze_bias else n + 1
        E = C * nc
        a, b = p.norm_coefficients()
        Arow, off = row_coefs(p, pts, cls)  # rows x C: each row's coefficients on the logits
        self.dirs, self.row_dir, self.row_sign = row_directions(Arow)
        soft = np.unique(pts[np.isfinite(p.prices[pts])])
        self.soft_points = soft
        W = len(wide)
        M = len(self.dirs)
        col_t = 2 * E
        n_t = 1 if b > 0 else 0
        col_s = col_t + n_t
        col_u = col_s + len(soft)
        ncols = col_u + M * W
        self.slack_cols = col_s + np.arange(len(soft))
        slack_of = {int(k): col_s + i for i, k in enumerate(soft)}
        bound = np.inf if p.max_change is None else p.max_change * alpha / beta
        # scaled objective = actual * alpha / beta: a soft point's price per unit of (beta-scaled) shortfall is price * alpha
        self.cost = np.concatenate([np.full(2 * E, a), np.full(n_t, b), p.prices[soft] * alpha, np.zeros(M * W)])
        self.upper = np.concatenate([np.full(2 * E, bound), np.full(n_t + len(soft) + M * W, np.inf)])
        rows, cols, vals = [], [], []
        G = p.features / alpha
        radii = p.radii if p.radii is not None else np.zeros_like(p.features)
        Rr = radii / alpha
        # u carries all of |W^T d|, the old part included: a row's right-hand side holds the unchanged layer's value
        own = np.einsum("rc,rc->r", Arow, p.features[pts] @ p.weight.T + p.bias) if len(pts) else np.zeros(0)
        lower = list((p.margins[pts] + off - own) / beta)
        for r, k in enumerate(pts):
            f = G[k]
            nz = np.flatnonzero(f)
            for c in np.flatnonzero(Arow[r]):
                sgn = Arow[r, c]
                e = c * nc + nz
                cols += [e, E + e]
                vals += [sgn * f[nz], -sgn * f[nz]]
                rows += [np.full(2 * len(nz), r)]
                if not p.freeze_bias:
                    cols += [np.array([c * nc + n, E + c * nc + n])]
                    vals += [np.array([sgn, -sgn]) / alpha]
                    rows += [np.full(2, r)]
            rad = Rr[k, wide]
            live = np.flatnonzero(rad > 0)
            if len(live):
                cols += [col_u + self.row_dir[r] * W + live]
                vals += [-rad[live]]
                rows += [np.full(len(live), r)]
            if k in slack_of:
                cols += [np.array([slack_of[int(k)]])]
                vals += [np.array([1.0])]
                rows += [np.array([r])]
        r = self.n_margin = len(pts)
        if n_t:
            for e in range(E):
                cols += [np.array([e, E + e, col_t])]
                vals += [np.array([1.0, 1.0, -1.0])]
                rows += [np.full(3, r)]
                lower.append(-np.inf)  # written as -d+ - d- + t >= 0 below
                r += 1
        self.pair_row0 = r
        D0 = (self.dirs @ p.weight)[:, wide] * alpha / beta if M else np.zeros((0, W))
        for i, d in enumerate(self.dirs):
            for sgn in (1.0, -1.0):  # u >= sgn * (D0 + sum_c d_c dW_c), i.e. u - sgn sum_c d_c dW_c >= sgn * D0
                ucol = col_u + i * W + np.arange(W)
                rr = r + np.arange(W)
                cols += [ucol]
                vals += [np.ones(W)]
                rows += [rr]
                for c in np.flatnonzero(d):
                    ec = c * nc + wide
                    cols += [ec, E + ec]
                    vals += [np.full(W, -sgn * d[c]), np.full(W, sgn * d[c])]
                    rows += [rr, rr]
                lower.extend((sgn * D0[i]).tolist())
                r += W
        rows_a, cols_a, vals_a = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        if n_t:  # flip the |d| <= t rows to >= form
            flip = (rows_a >= self.n_margin) & (rows_a < self.pair_row0)
            vals_a = np.where(flip, -vals_a, vals_a)
            lower = np.asarray(lower, float)
            lower[self.n_margin:self.pair_row0] = 0.0
        self.row_lower = np.asarray(lower, float)
        self.A = sp.csc_matrix((vals_a, (rows_a, cols_a)), shape=(r, ncols))
        self.wide, self.W, self.E = wide, W, E

    def change(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.p.split_change(x[:self.E] - x[self.E:2 * self.E], self.beta / self.alpha)

    def sigma(self, duals: np.ndarray) -> np.ndarray:
        """Per direction and feature, ``(mu+ - mu-) / sum_rows y r``: the multipliers of its two u rows over the
        radius-weighted multipliers of its margin rows (what stationarity in u makes them add up to, or exceed); 0 off the
        wide features."""
        out = np.zeros((len(self.dirs), self.n))
        weight = np.zeros((len(self.dirs), self.W))
        y = duals[:self.n_margin]
        radii = self.p.radii if self.p.radii is not None else np.zeros_like(self.p.features)
        np.add.at(weight, self.row_dir, y[:, None] * radii[self.pts][:, self.wide] / self.alpha)
        for i in range(len(self.dirs)):
            s = self.pair_row0 + 2 * i * self.W
            diff = duals[s:s + self.W] - duals[s + self.W:s + 2 * self.W]
            out[i, self.wide] = np.where(weight[i] > 0, diff / np.where(weight[i] > 0, weight[i], 1.0), 0.0)
        return np.clip(out, -1.0, 1.0)

    def sigma_rows(self, sigma: np.ndarray) -> np.ndarray:
        """Per margin row, its direction's sigma times its sign (what :func:`sigma_rows` recomputes from a witness)."""
        return sigma[self.row_dir] * self.row_sign[:, None] if len(self.pts) else np.zeros((0, self.n))
