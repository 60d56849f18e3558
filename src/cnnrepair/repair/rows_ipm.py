"""Structured interior point for the margin program, every norm and bound, with row generation around it.

On a set of margin rows (point ``k``, rival class ``j``) the program in standard form is

    min  a 1.(p + q) + b t + price.e
    s.t. A (p - q) + B e - s = r          (margin rows)
         p + q + w - t = 0                 (|d| <= t per entry: L-infinity terms; t = U fixed for L1 with a bound U)
         t + v = U                         (t <= U: a bound with an L-infinity term)
         p, q, e, s, w, t, v >= 0,

with ``d = p - q`` the change of every weight and bias entry (scaled units), ``e`` one shortfall per
point (hard points are elastic at a high price) and ``s`` the surplus of each row; the ``w``, ``t``,
``v`` blocks are there only when the norm or bound needs them. Mehrotra's predictor-corrector needs
the normal matrix of all rows. The per-entry rows are eliminated in closed form (diagonal plus one
rank-one term through ``t``), leaving ``A diag(theta) A^T + B diag(De) B^T + diag(Ds) + kappa g g^T``
over the margin rows: rows x rows, and a row touches only its label's and its rival's entries, so
it is built class by class from the features, the rank-one term added (Sherman-Morrison on the factor
lost every digit late in a solve), and factored by Cholesky, on the CPU or a torch device
(:mod:`cnnrepair.repair.normal`; every vector of the iteration stays on the CPU). Every entry stays
in the program, so only rows are generated: a round solves the rows that bind or nearly bind, then
each point that the change leaves short enters with its most violated row, and rows left far from
binding leave (each at most once, so the rounds end). A round stops at a loose gap (it only picks
rows); once no row is violated, the same solve goes on to the certified gap.

Every product with more than a vector goes through SciPy's BLAS: NumPy carries a second OpenBLAS
whose threads, spinning after each call, took the cores from SciPy's (on 2 cores, alternating the
two made the whole solve about twice as slow in development runs).

Every iterate is judged by a certificate computed from the problem's data only: the objective of
the change (clipped to its bound, shortfalls taken as they are) against the weak-duality bound of
the row multipliers (:func:`cnnrepair.repair.program.dual_bound`, the closed form
:func:`~cnnrepair.repair.program.certified_lower_bound` uses).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.linalg.blas import dgemm

from cnnrepair.repair.normal import NormalMatrix, normal_matrix
from cnnrepair.repair.program import FEAS, GAP, MarginProblem, MarginSolution, SolveClock, certified_lower_bound, dual_bound

_GAP = 1e-8  # certified relative gap the last round aims for
_ROUND_GAP = 1e-2  # ... and a round that only picks rows
_HARD_PRICE = 1e4  # elastic price of hard points (scaled units), raised 100-fold while it binds ...
_PRICE_MAX = 1e10  # ... up to this
_NEAR = 0.02  # rows this close to binding (scaled units: the largest required change is 1) start in the set
_HARD_SHORT = 10 * FEAS  # an iterate counts only if no hard point falls shorter than this (scaled units: of the largest required change)
_FAR = 0.05  # rows whose surplus exceeds this after a round leave the set (once each)
_PATIENCE = 6  # iterations without a better certificate before a solve stops
_MAX_ITER = 200
_REFINE = 2
_TIGHT = 1e-3  # rows whose surplus is below this (scaled units) enter the support's program
_SUPPORT = 1e-6  # entries the interior point moved by more than this share of its largest change


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b without NumPy's BLAS (see the module docstring)."""
    return float(np.multiply(a, b).sum())


def _per_entry_solve(f: np.ndarray, Omega: np.ndarray, kappa: float) -> np.ndarray:
    """``(diag(Omega) + gamma 1 1^T)^-1 f`` by Sherman-Morrison (``kappa = gamma / (1 + gamma sum 1/Omega)``): the
    per-entry rows' block, diagonal but for the one variable ``t`` they share."""
    u = f / Omega
    return u - kappa * u.sum() / Omega if kappa else u


def _max_step(v: list[np.ndarray], dv: list[np.ndarray]) -> float:
    """Largest step in [0, 1] that keeps every block of ``v + step * dv`` non-negative."""
    ratios = [np.min(-x[dx < 0] / dx[dx < 0], initial=np.inf) for x, dx in zip(v, dv)]
    return min(1.0, min(ratios))


class RowsIPM:
    """The margin program on rows (``pts``, ``cls``) with right-hand sides ``r``, in scaled units.

    ``G`` holds the scaled features (N x n), ``alpha`` their scale (a bias column is ``1/alpha``),
    ``price`` the per-point price of shortfall (scaled units), ``bound`` the largest change of an
    entry (scaled units; None: unbounded). The norm's coefficients are the problem's. ``support``
    (flat indices into the C x nc entries) lists the entries that may change; by default every one. ``device``: where
    the normal matrix is built and factored (:func:`cnnrepair.repair.normal.normal_matrix`; None: the CPU).
    """

    def __init__(self, p: MarginProblem, G: np.ndarray, alpha: float, pts: np.ndarray, cls: np.ndarray, r: np.ndarray,
                 price: np.ndarray, support: np.ndarray | None = None, bound: float | None = None, device=None):
        self.p, self.device = p, device
        self.pts, self.cls, self.r = pts, cls, r
        self.lab = p.labels[pts]
        self.C = p.num_classes
        self.n = G.shape[1]
        self.nc = self.n + (0 if p.freeze_bias else 1)
        self.a, self.b = p.norm_coefficients()
        self.bound = None if bound is None or not np.isfinite(bound) else float(bound)
        self.has_t = self.b > 0  # t is a variable
        self.has_w = self.has_t or self.bound is not None  # per-entry rows p + q + w = t (or = bound)
        self.has_v = self.has_t and self.bound is not None  # t <= bound
        Gp = G[pts] if p.freeze_bias else np.hstack([G[pts], np.full((len(pts), 1), 1.0 / alpha)])
        self.Gp = np.ascontiguousarray(Gp)  # m x nc: the features of each row's point
        self.points, self.row_point = np.unique(pts, return_inverse=True)
        self.price = price[self.points]
        self.hard = ~np.isfinite(p.prices[self.points])
        m = len(pts)
        self.B = sp.csr_matrix((np.ones(m), (np.arange(m), self.row_point)), shape=(m, len(self.points)))
        self.free = np.arange(self.C * self.nc) if support is None else np.asarray(support, np.int64)
        free_cls, free_feat = np.divmod(self.free, self.nc)
        by_class = []  # per class: its rows, their signed features on its free entries, those entries' positions
        for c in range(self.C):
            idx = np.flatnonzero((self.lab == c) | (self.cls == c))
            sign = np.where(self.lab[idx] == c, 1.0, -1.0)
            pos = np.flatnonzero(free_cls == c)
            by_class.append((idx, np.asfortranarray(sign[:, None] * self.Gp[np.ix_(idx, free_feat[pos])]), pos))
        # rows of one point share its shortfall: the (i >= j) pairs of rows with the same point
        order = np.argsort(self.row_point, kind="stable")
        starts = np.searchsorted(self.row_point[order], np.arange(len(self.points) + 1))
        I, J = [], []
        for lo, hi in zip(starts[:-1], starts[1:]):
            rows = order[lo:hi]
            ii, jj = np.meshgrid(rows, rows, indexing="ij")
            keep = ii >= jj
            I.append(ii[keep])
            J.append(jj[keep])
        same_i = np.concatenate(I)
        self.normal: NormalMatrix = normal_matrix(m, by_class, (same_i, np.concatenate(J), self.row_point[same_i]), device)
        self.state: tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray, float] | None = None

    def full(self, d: np.ndarray) -> np.ndarray:
        """The C x nc change whose free entries are d."""
        out = np.zeros(self.C * self.nc)
        out[self.free] = d
        return out.reshape(self.C, self.nc)

    def At(self, y: np.ndarray) -> np.ndarray:
        """A^T y on the free entries (one product: +y at each row's label, -y at its rival)."""
        Y = np.zeros((self.p.num_rivals, len(y)))  # the zero rival's row (index C, no entries) is dropped
        rows = np.arange(len(y))
        Y[self.lab, rows] = y
        Y[self.cls, rows] = -y
        return dgemm(1.0, self.Gp.T, Y[:self.C].T).T.reshape(-1)[self.free]

    def A(self, d: np.ndarray) -> np.ndarray:
        """A d for a change d of the free entries: the logit-difference change of every row."""
        L = dgemm(1.0, self.Gp.T, self.full(d).T, trans_a=1)
        if self.p.zero_rival:  # its logit never changes
            L = np.hstack([L, np.zeros((len(L), 1))])
        rows = np.arange(len(self.pts))
        return L[rows, self.lab] - L[rows, self.cls]

    # the program's blocks, in order; which exist depends on the norm and the bound
    def _names(self) -> list[str]:
        return ["p", "q", "e", "s"] + (["w"] if self.has_w else []) + (["t"] if self.has_t else []) + (["v"] if self.has_v else [])

    def _cost(self) -> dict[str, np.ndarray]:
        E, m = len(self.free), len(self.pts)
        c = {"p": np.full(E, self.a), "q": np.full(E, self.a), "e": self.price, "s": np.zeros(m)}
        if self.has_w:
            c["w"] = np.zeros(E)
        if self.has_t:
            c["t"] = np.array([self.b])
        if self.has_v:
            c["v"] = np.zeros(1)
        return c

    def _K(self, X: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """The rows' values at X: margin rows, per-entry rows, the bound row."""
        R = self.A(X["p"] - X["q"]) + self.B @ X["e"] - X["s"]
        W = (X["p"] + X["q"] + X["w"] - (X["t"][0] if self.has_t else 0.0)) if self.has_w else None
        V = (X["t"] + X["v"]) if self.has_v else None
        return R, W, V

    def _KT(self, y: np.ndarray, lam: np.ndarray | None, mu: np.ndarray | None, Aty: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """K^T (y, lam, mu) block by block."""
        Aty = self.At(y) if Aty is None else Aty
        out = {"p": Aty.copy(), "q": -Aty, "e": self.B.T @ y, "s": -y}
        if self.has_w:
            out["p"] = out["p"] + lam
            out["q"] = out["q"] + lam
            out["w"] = lam
        if self.has_t:
            out["t"] = np.array([-lam.sum() + (mu[0] if self.has_v else 0.0)])
        if self.has_v:
            out["v"] = mu.copy()
        return out

    def _rhs(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        E = len(self.free)
        W = (np.zeros(E) if self.has_t else np.full(E, self.bound)) if self.has_w else None
        V = np.array([self.bound]) if self.has_v else None
        return self.r, W, V

    def start(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray, float]:
        """A strictly positive first iterate (X, Z, y, lam, mu): every entry and shortfall at one shift, small multipliers."""
        m, E = len(self.pts), len(self.free)
        t = 1.0 + float(np.abs(self.r).mean())
        if self.bound is not None:
            t = min(t, 0.25 * self.bound)
        e = self._shortfall(np.zeros(m)) + 1.0 + float(np.abs(self.r).mean())  # each point's shortfall with no change
        X = {"p": np.full(E, t), "q": np.full(E, t), "e": e, "s": self.B @ e - self.r}
        if self.has_w:
            X["w"] = np.full(E, t if self.has_t else max(self.bound - 2 * t, t))
        if self.has_t:
            X["t"] = np.array([3 * t])
        if self.has_v:
            X["v"] = np.array([max(self.bound - 3 * t, t)])
        # multipliers: lam = -zeta on the per-entry rows, y small enough that every dual slack stays positive
        zeta = (0.5 * self.b / max(E, 1)) if self.has_t else (0.5 * max(self.a, 1.0) if self.has_w else 0.0)
        lam = np.full(E, -zeta) if self.has_w else None
        mu = np.array([-zeta]) if self.has_v else None
        room = 0.5 * (self.a + zeta)  # |A^T y| may reach this
        Aty1 = np.abs(self.At(np.ones(m))).max()
        eta = min(room / max(Aty1, 1e-300), 0.5 * float(self.price.min()) / max(1.0, float(np.bincount(self.row_point).max())))
        y = np.full(m, eta)
        cost, KT = self._cost(), self._KT(y, lam, mu)
        Z = {k: cost[k] - KT[k] for k in self._names()}
        return X, Z, y, lam, mu

    def _normal_solve(self, D: dict[str, np.ndarray], fR: np.ndarray, fW: np.ndarray | None,
                      fV: np.ndarray | None, extra: tuple[np.ndarray, np.ndarray, float] | None):
        """(dy, dlam, dmu) from the normal equations (the last factor of ``self.normal``); the per-entry and bound rows
        eliminated in closed form."""
        solve = self.normal.solve
        if not self.has_w:
            dy = solve(fR)
            for _ in range(_REFINE):  # the factor is of a regularised, rounded matrix: refine against the operator itself
                theta = D["p"] + D["q"]
                res = fR - (self.A(theta * self.At(dy)) + self.B @ (D["e"] * (self.B.T @ dy)) + D["s"] * dy)
                dy = dy + solve(res)
            return dy, None, None
        Omega, diff, kappa = extra
        if self.has_v:
            VV = D["t"][0] + D["v"][0]
            fW = fW + D["t"][0] * fV[0] / VV
        dy = solve(fR - self.A(diff * _per_entry_solve(fW, Omega, kappa)))
        dlam = _per_entry_solve(fW - diff * self.At(dy), Omega, kappa)
        dmu = np.array([(fV[0] + D["t"][0] * dlam.sum()) / VV]) if self.has_v else None
        return dy, dlam, dmu

    def _factor(self, D: dict[str, np.ndarray]) -> tuple[bool, tuple[np.ndarray, np.ndarray, float] | None]:
        """Factor the reduced normal matrix (False when it cannot be) and say what its solves need."""
        if not self.has_w:
            return self.normal.factor(D["p"] + D["q"], D["e"], D["s"]), None
        Omega = D["p"] + D["q"] + D["w"]
        diff = D["p"] - D["q"]
        theta = (4.0 * D["p"] * D["q"] + (D["p"] + D["q"]) * D["w"]) / Omega
        if self.has_v:
            gamma = D["t"][0] * D["v"][0] / (D["t"][0] + D["v"][0])
        else:
            gamma = D["t"][0] if self.has_t else 0.0
        kappa = gamma / (1.0 + gamma * float((1.0 / Omega).sum())) if gamma else 0.0
        return self.normal.factor(theta, D["e"], D["s"], (kappa, self.A(diff / Omega)) if kappa else None), (Omega, diff, kappa)

    def solve(self, deadline: float | None, gap: float = _GAP) -> tuple[str, np.ndarray, np.ndarray]:
        """(status, d, y): the change (C x nc, scaled units) and row multipliers of the best certified iterate.

        A second call goes on from where the first stopped (say, to a tighter gap on the same rows).
        """
        if self.state is None:
            self.state = self.start()
        X, Z, y, lam, mu = self.state
        names = self._names()
        cost = self._cost()
        hR, hW, hV = self._rhs()
        n_all = sum(len(X[k]) for k in names)
        best, best_it = (np.inf, None, None), None  # (relative gap, d, y) of the best certified iterate, and its iteration
        mu0 = None  # the first iterate's complementarity
        with np.errstate(all="ignore"):
            for it in range(_MAX_ITER):
                d = X["p"] - X["q"]
                Aty = self.At(y)
                rel, dc = self._gap(d, y)
                if dc is not None and rel < best[0]:
                    best, best_it = (rel, dc, y.copy()), it
                if dc is not None and rel <= gap:
                    return "optimal", self.full(dc), y
                if best_it is not None and best[0] < _ROUND_GAP and it - best_it > _PATIENCE:  # late iterations are ill-conditioned: keep the best certificate
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    return "time_limit", self.full(d), y
                KT = self._KT(y, lam, mu, Aty)
                rd = {k: cost[k] - KT[k] - Z[k] for k in names}
                kR, kW, kV = self._K(X)
                rp = (hR - kR, None if hW is None else hW - kW, None if hV is None else hV - kV)
                mu_c = sum(_dot(X[k], Z[k]) for k in names) / n_all
                mu0 = mu_c if mu0 is None else mu0
                if best_it is None and mu_c < 1e-10 * mu0:  # converged with a hard point short: its elastic price binds
                    return "price", self.full(d), y
                D = {k: X[k] / Z[k] for k in names}
                factored, extra = self._factor(D)
                if not factored:
                    break

                def direction(comp):
                    q = {k: (comp[k] - X[k] * rd[k]) / Z[k] for k in names}
                    qR, qW, qV = self._K(q)
                    fR = rp[0] - qR
                    fW = None if qW is None else rp[1] - qW
                    fV = None if qV is None else rp[2] - qV
                    dy, dlam, dmu = self._normal_solve(D, fR, fW, fV, extra)
                    KTd = self._KT(dy, dlam, dmu)
                    dX = {k: q[k] + D[k] * KTd[k] for k in names}
                    dZ = {k: rd[k] - KTd[k] for k in names}
                    return dy, dlam, dmu, dX, dZ

                dy, dlam, dmu, dX, dZ = direction({k: -X[k] * Z[k] for k in names})
                ap, ad = _max_step([X[k] for k in names], [dX[k] for k in names]), _max_step([Z[k] for k in names], [dZ[k] for k in names])
                mu_aff = sum(_dot(X[k] + ap * dX[k], Z[k] + ad * dZ[k]) for k in names) / n_all
                sigma = (mu_aff / mu_c) ** 3
                dy, dlam, dmu, dX, dZ = direction({k: -X[k] * Z[k] + sigma * mu_c - dX[k] * dZ[k] for k in names})
                ap = 0.995 * _max_step([X[k] for k in names], [dX[k] for k in names])
                ad = 0.995 * _max_step([Z[k] for k in names], [dZ[k] for k in names])
                X = {k: X[k] + ap * dX[k] for k in names}
                Z = {k: Z[k] + ad * dZ[k] for k in names}
                y = y + ad * dy
                lam = None if lam is None else lam + ad * dlam
                mu = None if mu is None else mu + ad * dmu
                self.state = (X, Z, y, lam, mu)
        if best[1] is not None and best[0] <= max(gap, 0.5 * GAP):  # stalled a hair above its aim, within the contract
            return "optimal", self.full(best[1]), best[2]
        return "not_converged", self.full(X["p"] - X["q"]), y

    def shortfall(self, d: np.ndarray) -> np.ndarray:
        """Per point of the rows: its largest shortfall under the change d (C x nc)."""
        return self._shortfall(self.A(d.reshape(-1)[self.free]))

    def _shortfall(self, Ad: np.ndarray) -> np.ndarray:
        short = np.zeros(len(self.points))
        np.maximum.at(short, self.row_point, np.maximum(self.r - Ad, 0.0))
        return short

    def _gap(self, d: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray | None]:
        """(relative gap, change) between the elastic objective at d (clipped to the bound; points' shortfalls as they
        are) and the weak-duality bound from y; the change is None while a hard point falls short."""
        dc = d if self.bound is None else np.clip(d, -self.bound, self.bound)
        short = self._shortfall(self.A(dc))
        if not (short[self.hard] <= _HARD_SHORT).all():
            return np.inf, None
        upper = self.a * float(np.abs(dc).sum()) + self.b * float(np.abs(dc).max(initial=0.0)) + _dot(self.price, short)
        total = np.zeros(len(self.points))
        np.add.at(total, self.row_point, np.maximum(y, 0.0))
        cap = np.minimum(1.0, self.price / np.maximum(total, 1e-300))  # every point's multipliers within its price
        yc = np.maximum(y, 0.0) * cap[self.row_point]
        lower = dual_bound(_dot(self.r, yc), np.abs(self.At(yc)), self.a, self.b, self.bound)
        return (upper - lower) / max(abs(upper), 1e-300), dc


def _violated(p: MarginProblem, in_set: np.ndarray, ipm: RowsIPM, d: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """N x C (C + 1 with the zero rival): for each point the change d (scaled) leaves short beyond its shortfall in the program, its most violated row
    outside the set (a point's margin is its worst rival's: one row per point per round keeps the set near the rows that bind)."""
    N = len(p.labels)
    Rk = p.row_shortfall(*p.split_change(d, beta / alpha)) / beta
    Rk[in_set] = -np.inf
    allowed = np.zeros(N)
    allowed[ipm.points] = ipm.shortfall(d)
    allowed[~np.isfinite(p.prices)] = 0.0
    excess = Rk - allowed[:, None]
    out = np.zeros_like(in_set)
    k = np.flatnonzero((excess > 10 * FEAS).any(1))
    out[k, excess[k].argmax(1)] = True
    return out


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
    ipm = RowsIPM(p, p.features / alpha, alpha, solved.pts[tight], solved.cls[tight], solved.r[tight], price, support, solved.bound,
                  solved.device)
    status, d2, _ = ipm.solve(deadline, _GAP)
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
    """Every hard margin met (to ``_HARD_SHORT`` of the largest required change: the solvers' feasibility tolerance) and
    the objective within the certified gap of ``lower``. (Lifting the hard rows by that much instead cost up to 1e-6 of
    certified gap in development runs: the multipliers of nearly parallel rows are large.)"""
    obj = p.objective(dW, db)
    hard = ~np.isfinite(p.prices)
    return bool((p.shortfall(p.logits(dW, db))[hard] <= _HARD_SHORT * beta).all()) and obj - lower <= GAP * obj


def solve_rows_ipm(p: MarginProblem, R0: np.ndarray, alpha: float, beta: float, clock: SolveClock,
                   rows: tuple[np.ndarray, np.ndarray] | None = None, device=None) -> MarginSolution:
    """Every norm and bound, the structured interior point with row generation. ``rows`` (points, classes): rows to
    start from besides those near binding (a previous solve's). ``device``: where the normal matrix is factored
    (None: the CPU; see :func:`cnnrepair.repair.normal.normal_matrix`). An answer it cannot certify comes back as
    ``not_converged`` (or ``time_limit``) with the rows it had, for simplex to start from."""
    N, R = R0.shape  # R: the classes, and the zero rival when there is one
    G = p.features / alpha
    hard_price = _HARD_PRICE
    price = np.where(np.isfinite(p.prices), p.prices * alpha, hard_price)
    bound = None if p.max_change is None else p.max_change * alpha / beta
    in_set = R0 / beta > -_NEAR
    if rows is not None:
        k, j = (np.asarray(a, np.int64) for a in rows)
        ok = (k >= 0) & (k < N) & (j >= 0) & (j < R)
        in_set[k[ok], j[ok]] = True
    in_set[np.arange(N), p.labels] = False
    left = np.zeros_like(in_set)  # rows that left the set once (they may come back, never leave again)
    deadline = clock.deadline
    rounds, ipm, gap = 0, None, _ROUND_GAP
    while True:
        pts, cls = np.nonzero(in_set)
        if ipm is None:
            ipm = RowsIPM(p, G, alpha, pts, cls, R0[pts, cls] / beta, price, bound=bound, device=device)
            rounds += 1
        clock.report("interior point", rounds, len(pts), np.inf)
        status, d, y = ipm.solve(deadline, gap)
        if status == "price" and hard_price < _PRICE_MAX:  # nearly parallel rows can need multipliers above the price
            hard_price *= 100.0
            price = np.where(np.isfinite(p.prices), p.prices * alpha, hard_price)
            ipm = None
            continue
        if status != "optimal":
            return _uncertified(p, "time_limit" if status == "time_limit" else "not_converged", pts, cls, clock, rounds)
        bad = _violated(p, in_set, ipm, d, alpha, beta)
        if bad.any():
            far = (ipm.A(d.reshape(-1)[ipm.free]) - ipm.r > _FAR) & ~left[pts, cls]
            in_set[pts[far], cls[far]] = False
            left[pts[far], cls[far]] = True
            in_set |= bad
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
    C = p.num_classes
    size = {"rows": int(in_set.sum()), "entries": C * ipm.nc, "points": N, "full_rows": N * (R - 1), "full_entries": C * ipm.nc,
            "device": ipm.normal.device}
    witness = {"point": pts.astype(np.int64), "class": cls.astype(np.int64), "multiplier": ydual}
    obj = p.objective(dW, db)
    if not _acceptable(p, dW, db, lower, beta) or not _within_bound(p, dW, db):
        return _uncertified(p, "not_converged", pts, cls, clock, rounds)
    clock.report("interior point", rounds, len(pts), (obj - lower) / max(obj, 1e-300), done=True)
    return MarginSolution("optimal", dW, db, obj, lower, time.perf_counter() - clock.t0, rounds, {**size, "method": "interior point"}, witness)


def _uncertified(p: MarginProblem, status: str, pts: np.ndarray, cls: np.ndarray, clock: SolveClock, rounds: int) -> MarginSolution:
    C, n = p.weight.shape
    zero = (np.zeros((C, n)), np.zeros(C))
    return MarginSolution(status, *zero, np.inf, 0.0, time.perf_counter() - clock.t0, rounds, {"rows": len(pts), "method": "interior point"},
                          {"point": np.asarray(pts, np.int64), "class": np.asarray(cls, np.int64)})


def _within_bound(p: MarginProblem, dW: np.ndarray, db: np.ndarray) -> bool:
    """No entry moved by more than ``max_change`` (the iterates are clipped to it, so this holds but for rounding)."""
    if p.max_change is None:
        return True
    return float(max(np.abs(dW).max(initial=0.0), np.abs(db).max(initial=0.0))) <= p.max_change * (1 + 1e-12)
