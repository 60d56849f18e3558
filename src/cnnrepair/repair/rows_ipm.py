"""Structured interior point for the L1 margin program, with row generation around it.

On a set of margin rows (point ``k``, rival class ``j``) the L1 program in standard form is

    min  a 1.(p + q) + price.e   s.t.  A (p - q) + B e - s = r,   p, q, e, s >= 0,

with ``p - q`` the change of every weight and bias entry (scaled units), ``e`` one shortfall per
point (hard points are elastic at a high price) and ``s`` the surplus of each row. Mehrotra's
predictor-corrector needs the normal matrix ``A D A^T + B D_e B^T + D_s``: it is rows x rows, and a
row touches only its label's and its rival's entries, so it is built class by class as symmetric
rank-k updates of the features (one triangle) and factored in place by LAPACK's Cholesky. Every
entry stays in the program, so only rows are generated: a round solves the rows that bind or nearly
bind, then the rows the change violates join. A round stops at a loose gap (it only picks rows);
once no row is violated, the same solve goes on to the certified gap.

Every product with more than a vector goes through SciPy's BLAS: NumPy carries a second OpenBLAS
whose threads, spinning after each call, took the cores from SciPy's (on 2 cores, alternating the
two made the whole solve about twice as slow in development runs).

Every iterate is judged by a certificate computed from the problem's data only: the objective of
the change (shortfalls taken as they are) against the weak-duality bound of the row multipliers
scaled into the dual feasible set.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
from scipy.linalg.blas import dgemm, dsyrk
from scipy.linalg.lapack import dpotrf

from cnnrepair.repair.program import FEAS, GAP, MarginProblem, MarginSolution, certified_lower_bound

_GAP = 1e-8  # certified relative gap the last round aims for
_ROUND_GAP = 1e-2  # ... and a round that only picks rows
_HARD_PRICE = 1e4  # elastic price of hard points (scaled units)
_NEAR = 0.02  # rows this close to binding (scaled units: the largest required change is 1) join a round
_PATIENCE = 6  # iterations without a better certificate before a solve stops
_MAX_ITER = 200
_TIGHT = 1e-3  # rows whose surplus is below this (scaled units) enter the support's program
_SUPPORT = 1e-6  # entries the interior point moved by more than this share of its largest change


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b without NumPy's BLAS (see the module docstring)."""
    return float(np.multiply(a, b).sum())


def _max_step(v: list[np.ndarray], dv: list[np.ndarray]) -> float:
    """Largest step in [0, 1] that keeps every block of ``v + step * dv`` non-negative."""
    ratios = [np.min(-x[dx < 0] / dx[dx < 0], initial=np.inf) for x, dx in zip(v, dv)]
    return min(1.0, min(ratios))


class RowsIPM:
    """The L1 margin program on rows (``pts``, ``cls``) with right-hand sides ``r``.

    ``G`` holds the scaled features (N x n), ``alpha`` their scale (a bias column is ``1/alpha``),
    ``price`` the per-point price of shortfall (scaled units). ``support`` (flat indices into the
    C x nc entries) lists the entries that may change; by default every one.
    """

    def __init__(self, p: MarginProblem, G: np.ndarray, alpha: float, pts: np.ndarray, cls: np.ndarray, r: np.ndarray,
                 price: np.ndarray, support: np.ndarray | None = None):
        self.p = p
        self.pts, self.cls, self.r = pts, cls, r
        self.lab = p.labels[pts]
        self.C = p.num_classes
        self.n = G.shape[1]
        self.nc = self.n + (0 if p.freeze_bias else 1)
        Gp = G[pts] if p.freeze_bias else np.hstack([G[pts], np.full((len(pts), 1), 1.0 / alpha)])
        self.Gp = np.ascontiguousarray(Gp)  # m x nc: the features of each row's point
        self.points, self.row_point = np.unique(pts, return_inverse=True)
        self.price = price[self.points]
        self.hard = ~np.isfinite(p.prices[self.points])
        m = len(pts)
        self.B = sp.csr_matrix((np.ones(m), (np.arange(m), self.row_point)), shape=(m, len(self.points)))
        self.free = np.arange(self.C * self.nc) if support is None else np.asarray(support, np.int64)
        free_cls, free_feat = np.divmod(self.free, self.nc)
        self.by_class = []  # per class: its rows, their signed features on its free entries, those entries' positions
        for c in range(self.C):
            idx = np.flatnonzero((self.lab == c) | (self.cls == c))
            sign = np.where(self.lab[idx] == c, 1.0, -1.0)
            pos = np.flatnonzero(free_cls == c)
            self.by_class.append((idx, np.asfortranarray(sign[:, None] * self.Gp[np.ix_(idx, free_feat[pos])]), pos))
        self.flat_index = [(idx[:, None] * m + idx[None, :]).reshape(-1) for idx, _, _ in self.by_class]
        # rows of one point share its shortfall: the (i >= j) pairs of rows with the same point
        order = np.argsort(self.row_point, kind="stable")
        starts = np.searchsorted(self.row_point[order], np.arange(len(self.points) + 1))
        I, J = [], []
        for a, b in zip(starts[:-1], starts[1:]):
            rows = order[a:b]
            ii, jj = np.meshgrid(rows, rows, indexing="ij")
            keep = ii >= jj
            I.append(ii[keep])
            J.append(jj[keep])
        self.same_i, self.same_j = np.concatenate(I), np.concatenate(J)
        self.same_point = self.row_point[self.same_i]
        self._buffer: np.ndarray | None = None
        self.state: tuple[list[np.ndarray], list[np.ndarray], np.ndarray] | None = None

    def full(self, d: np.ndarray) -> np.ndarray:
        """The C x nc change whose free entries are d."""
        out = np.zeros(self.C * self.nc)
        out[self.free] = d
        return out.reshape(self.C, self.nc)

    def At(self, y: np.ndarray) -> np.ndarray:
        """A^T y on the free entries (one product: +y at each row's label, -y at its rival)."""
        Y = np.zeros((self.C, len(y)))
        rows = np.arange(len(y))
        Y[self.lab, rows] = y
        Y[self.cls, rows] = -y
        return dgemm(1.0, self.Gp.T, Y.T).T.reshape(-1)[self.free]

    def A(self, d: np.ndarray) -> np.ndarray:
        """A d for a change d of the free entries: the logit-difference change of every row."""
        L = dgemm(1.0, self.Gp.T, self.full(d).T, trans_a=1)
        rows = np.arange(len(self.pts))
        return L[rows, self.lab] - L[rows, self.cls]

    def normal_factor(self, theta: np.ndarray, De: np.ndarray, Ds: np.ndarray) -> np.ndarray | None:
        """Cholesky factor (lower triangle, Fortran order) of ``A diag(theta) A^T + B diag(De) B^T + diag(Ds)``;
        None when it cannot be factored. Only the upper triangle is built, in C order: its transpose is the
        lower triangle in the Fortran order LAPACK factors in place. A failed factorisation (late, ill-conditioned
        iterations) is retried with the diagonal raised, no more than needed."""
        m = len(self.pts)
        if self._buffer is None:
            self._buffer = np.empty((m, m))
        M = self._buffer
        flat = M.reshape(-1)
        reg, top = 0.0, None
        while True:
            M.fill(0.0)
            for c, (idx, Gc, pos) in enumerate(self.by_class):
                if len(idx) and len(pos):  # the block's lower triangle, transposed: C order, upper triangle
                    block = dsyrk(1.0, Gc * np.sqrt(theta[pos]), lower=1).T
                    at = self.flat_index[c]
                    flat[at] = flat[at] + block.reshape(-1)
            M[self.same_j, self.same_i] += De[self.same_point]
            diag = M.diagonal() + Ds
            top = float(diag.max()) if top is None else top
            M[np.diag_indices(m)] = diag + reg
            factor, info = dpotrf(M.T, lower=1, clean=0, overwrite_a=1)
            if info == 0:
                return factor
            if reg > 1e-4 * top:
                return None
            reg = 1e-14 * top if reg == 0.0 else reg * 100.0

    def start(self, a: float) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """A strictly positive first iterate (X, Z, y): every entry and shortfall at one shift, small multipliers."""
        m, P = len(self.pts), len(self.points)
        E = len(self.free)
        t = 1.0 + float(np.abs(self.r).mean())
        short0 = np.zeros(P)
        np.maximum.at(short0, self.row_point, np.maximum(self.r, 0.0))
        X = [np.full(E, t), np.full(E, t), short0 + t, None]
        X[3] = self.B @ X[2] - self.r
        Aty1 = np.abs(self.At(np.ones(m))).max()
        eta = min(0.5 * a / max(Aty1, 1e-300), 0.5 * float(self.price.min()) / max(1.0, float(np.bincount(self.row_point).max())))
        y = np.full(m, eta)
        Aty = self.At(y)
        Z = [a - Aty, a + Aty, self.price - self.B.T @ y, y.copy()]
        return X, Z, y

    def solve(self, a: float, deadline: float | None, gap: float = _GAP) -> tuple[str, np.ndarray, np.ndarray]:
        """(status, d, y): the change (C x nc, scaled units) and row multipliers of the best certified iterate.

        A second call goes on from where the first stopped (say, to a tighter gap on the same rows).
        """
        if self.state is None:
            self.state = self.start(a)
        X, Z, y = self.state
        m, P = len(self.pts), len(self.points)
        E = len(self.free)
        w = self.price
        n_all = 2 * E + P + m
        best, best_it = (np.inf, None, None), 0  # (relative gap, d, y)
        with np.errstate(all="ignore"):
            for it in range(_MAX_ITER):
                d = X[0] - X[1]
                Ad = self.A(d)
                Aty = self.At(y)
                short = self._shortfall(Ad)
                rel = self._gap(short, d, y, Aty, a)
                hard_ok = bool((short[self.hard] <= 10 * FEAS).all())
                if np.isfinite(rel) and rel < best[0] and hard_ok:
                    best, best_it = (rel, d.copy(), y.copy()), it
                if rel <= gap and hard_ok:
                    return "optimal", self.full(d), y
                if it - best_it > _PATIENCE:  # late iterations are ill-conditioned: keep the best certificate
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    return "time_limit", self.full(d), y
                rd = [a - Aty - Z[0], a + Aty - Z[1], w - self.B.T @ y - Z[2], y - Z[3]]
                rp = self.r - (Ad + self.B @ X[2] - X[3])
                mu = sum(_dot(x, z) for x, z in zip(X, Z)) / n_all
                D = [x / z for x, z in zip(X, Z)]
                factor = self.normal_factor(D[0] + D[1], D[2], D[3])
                if factor is None:
                    break

                def direction(comp):
                    q = [(cm - x * r_) / z for cm, x, r_, z in zip(comp, X, rd, Z)]
                    rhs = rp - (self.A(q[0] - q[1]) + self.B @ q[2] - q[3])
                    dy = sla.cho_solve((factor, True), rhs, check_finite=False)
                    Atdy = self.At(dy)
                    Btdy = self.B.T @ dy
                    dX = [q[0] + D[0] * Atdy, q[1] - D[1] * Atdy, q[2] + D[2] * Btdy, q[3] - D[3] * dy]
                    dZ = [rd[0] - Atdy, rd[1] + Atdy, rd[2] - Btdy, rd[3] + dy]
                    return dy, dX, dZ

                dy, dX, dZ = direction([-x * z for x, z in zip(X, Z)])
                ap, ad = _max_step(X, dX), _max_step(Z, dZ)
                mu_aff = sum(_dot(x + ap * dx, z + ad * dz) for x, dx, z, dz in zip(X, dX, Z, dZ)) / n_all
                sigma = (mu_aff / mu) ** 3
                dy, dX, dZ = direction([-x * z + sigma * mu - dx * dz for x, z, dx, dz in zip(X, Z, dX, dZ)])
                ap, ad = 0.995 * _max_step(X, dX), 0.995 * _max_step(Z, dZ)
                X = [x + ap * dx for x, dx in zip(X, dX)]
                Z = [z + ad * dz for z, dz in zip(Z, dZ)]
                y = y + ad * dy
                self.state = (X, Z, y)
        if best[1] is not None and best[0] <= max(gap, 0.1 * GAP):  # stalled a hair above its aim, well within the contract
            return "optimal", self.full(best[1]), best[2]
        return "not_converged", self.full(X[0] - X[1]), y

    def shortfall(self, d: np.ndarray) -> np.ndarray:
        """Per point of the rows: its largest shortfall under the change d (C x nc)."""
        return self._shortfall(self.A(d.reshape(-1)[self.free]))

    def _shortfall(self, Ad: np.ndarray) -> np.ndarray:
        short = np.zeros(len(self.points))
        np.maximum.at(short, self.row_point, np.maximum(self.r - Ad, 0.0))
        return short

    def _gap(self, short: np.ndarray, d: np.ndarray, y: np.ndarray, Aty: np.ndarray, a: float) -> float:
        """Relative gap between the elastic objective at d (points' shortfalls ``short``) and the certified lower bound from y."""
        upper = a * float(np.abs(d).sum()) + _dot(self.price, short)
        cap = np.zeros(len(self.points))
        np.add.at(cap, self.row_point, y)
        s = min(1.0, a / max(float(np.abs(Aty).max()), 1e-300), float(np.min(self.price / np.maximum(cap, 1e-300))))
        return (upper - s * _dot(self.r, y)) / max(abs(upper), 1e-300)


def _violated(p: MarginProblem, in_set: np.ndarray, ipm: RowsIPM, d: np.ndarray, alpha: float,
              beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows outside the set that the change d (scaled) violates beyond their point's shortfall, and those within _NEAR of it."""
    N = len(p.labels)
    Rk = p.row_shortfall(*p.split_change(d, beta / alpha)) / beta
    Rk[in_set] = -np.inf
    allowed = np.zeros(N)
    allowed[ipm.points] = ipm.shortfall(d)
    allowed[~np.isfinite(p.prices)] = 0.0
    return Rk - allowed[:, None] > 10 * FEAS, Rk - allowed[:, None] > -_NEAR


def _on_support(p: MarginProblem, solved: RowsIPM, price: np.ndarray, d: np.ndarray, lower: float,
                scale: tuple[float, float], deadline: float | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The rows of ``solved`` that bind (or nearly) at its change ``d``, with only the entries ``d`` moved (more
    than ``_SUPPORT`` of its largest change) free: on a degenerate optimum an interior point spreads dust
    over every entry, and keep points binding at their margin can need it. None unless every hard margin
    holds and the certified gap is met."""
    alpha, beta = scale
    flat = np.abs(d.ravel())
    support = np.flatnonzero(flat > _SUPPORT * flat.max(initial=0.0))
    tight = solved.A(d.reshape(-1)[solved.free]) - solved.r < _TIGHT
    ipm = RowsIPM(p, p.features / alpha, alpha, solved.pts[tight], solved.cls[tight], solved.r[tight], price, support)
    status, d2, _ = ipm.solve(1.0, deadline, _GAP)
    if status != "optimal":
        return None
    dW, db = p.split_change(d2, beta / alpha)
    return (dW, db) if _acceptable(p, dW, db, lower, beta) else None


def _sparsify(p: MarginProblem, dW: np.ndarray, db: np.ndarray, lower: float, beta: float,
              thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """An interior point is not a vertex: drop changes below each threshold (a share of the largest change) in
    turn, and keep the first result whose hard margins and certified gap survive it (None when none does)."""
    D = np.hstack([dW, db[:, None]])
    for threshold in thresholds:
        D2 = np.where(np.abs(D) > threshold * np.abs(D).max(initial=0.0), D, 0.0)
        dW2, db2 = D2[:, :-1], D2[:, -1]
        if _acceptable(p, dW2, db2, lower, beta):
            return dW2, db2
    return None


def _acceptable(p: MarginProblem, dW: np.ndarray, db: np.ndarray, lower: float, beta: float) -> bool:
    """Every hard margin met (to the solve's tolerance) and the objective within the certified gap of ``lower``."""
    obj = p.objective(dW, db)
    hard = ~np.isfinite(p.prices)
    return bool((p.shortfall(p.logits(dW, db))[hard] <= 10 * FEAS * beta).all()) and obj - lower <= GAP * obj


def solve_rows_ipm(p: MarginProblem, R0: np.ndarray, alpha: float, beta: float, t0: float,
                   time_limit: float | None) -> MarginSolution | None:
    """L1 without bounds, many rows: the structured interior point with row generation (None: let simplex do it)."""
    N, C = R0.shape
    G = p.features / alpha
    price = np.where(np.isfinite(p.prices), p.prices * alpha, _HARD_PRICE)
    in_set = R0 / beta > -_NEAR
    in_set[np.arange(N), p.labels] = False
    deadline = None if time_limit is None else t0 + time_limit
    rounds, ipm, gap = 0, None, _ROUND_GAP
    while True:
        pts, cls = np.nonzero(in_set)
        if ipm is None:
            ipm = RowsIPM(p, G, alpha, pts, cls, R0[pts, cls] / beta, price)
            rounds += 1
        status, d, y = ipm.solve(1.0, deadline, gap)
        if status != "optimal":
            return None
        bad, near = _violated(p, in_set, ipm, d, alpha, beta)
        if bad.any():  # rows within a hair of binding bind after the next change as often as not: add them now, saving rounds
            in_set |= bad | near
            ipm, gap = None, _ROUND_GAP
        elif gap > _GAP:
            gap = _GAP  # the rows are settled: go on to the certified gap from where the round stopped
        else:
            break
    ydual = y / alpha
    lower = certified_lower_bound(p, pts, cls, ydual)
    dW, db = p.split_change(d, beta / alpha)
    sparse = (_sparsify(p, dW, db, lower, beta, (1e-6, 1e-8))
              or _on_support(p, ipm, price, d, lower, (alpha, beta), deadline)
              or _sparsify(p, dW, db, lower, beta, (1e-10,)))
    if sparse is not None:
        dW, db = sparse
    size = {"rows": int(in_set.sum()), "entries": C * ipm.nc, "points": N, "full_rows": N * (C - 1), "full_entries": C * ipm.nc}
    witness = {"point": pts.astype(np.int64), "class": cls.astype(np.int64), "multiplier": ydual}
    obj = p.objective(dW, db)
    if obj - lower > GAP * obj:
        return None
    return MarginSolution("optimal", dW, db, obj, lower, time.perf_counter() - t0, rounds, {**size, "method": "interior point"}, witness)
