"""Convex repair of a linear head by linear programming (Guidotti & Leofante 2020, equation 3).

For repair points with features ``X`` (K x d) and target decision values ``Y`` (K x k), find weight
changes ``gamma`` (k x d) and slacks ``delta`` (K x k, >= 0) that

    minimise   sum_ij |gamma_ij| + lambda * sum_ki delta_ki
    subject to Y_ki - delta_ki <= sum_j (W_ij + gamma_ij) X_kj + b_i <= Y_ki + delta_ki.

Row ``i`` of ``W`` owns its own gamma and delta, so the program splits exactly into k independent
LPs, one per class. Each is written with gamma = g+ - g- (g+, g- >= 0). Two exact reductions keep
them small: features outside the mask, and features that are zero on every repair point, cannot
lower the objective, so their gamma is fixed at 0 and their columns are dropped. The constraint
matrix is sparse (ReLU features are mostly zero).

Backends: HiGHS (default, through ``highspy``) and cvxopt (the paper's solver). Constraint families
are objects that emit rows, so hard margins or clean points to preserve can be added beside the
targets without touching the solver code.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from cnnrepair.errors import CnnRepairError

SOLVERS = ("highs", "highs-ipm", "cvxopt")


@dataclass
class RepairProblem:
    """Arrays of one repair: head ``W`` (k x d), ``b`` (k), points ``X`` (K x d), targets ``Y`` (K x k).

    ``delta_weight`` (lambda) prices every slack; ``point_weights`` scales it per point (e.g. to
    weigh clean anchor points, whose targets are LH's own values, against adversarial ones);
    ``max_change`` bounds every |gamma_ij|; ``hard`` forbids slack (the LP may then be infeasible).
    """

    W: np.ndarray
    b: np.ndarray
    X: np.ndarray
    Y: np.ndarray
    mask: np.ndarray | None = None
    delta_weight: float = 1.0
    max_change: float | None = None
    hard: bool = False
    point_weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.W = np.asarray(self.W, np.float64)
        self.b = np.asarray(self.b, np.float64).reshape(-1)
        self.X = np.atleast_2d(np.asarray(self.X, np.float64))
        self.Y = np.atleast_2d(np.asarray(self.Y, np.float64))
        k, d = self.W.shape if self.W.ndim == 2 else (0, 0)
        if self.W.ndim != 2 or self.b.shape != (k,):
            raise CnnRepairError(f"repair: W must be k x d and b of length k, got W {self.W.shape} and b {self.b.shape}")
        if self.X.shape[1] != d:
            raise CnnRepairError(f"repair: X has {self.X.shape[1]} features but W has {d}; features and head do not belong together")
        if self.Y.shape != (self.X.shape[0], k):
            raise CnnRepairError(f"repair: Y must be {self.X.shape[0]} x {k} (one target per point and class), got {self.Y.shape}")
        for name, arr in (("W", self.W), ("b", self.b), ("X", self.X), ("Y", self.Y)):
            if not np.isfinite(arr).all():
                raise CnnRepairError(f"repair: {name} contains NaN or infinite values; check the features and the head")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, bool).reshape(-1)
            if self.mask.shape != (d,):
                raise CnnRepairError(f"repair: mask has {self.mask.size} entries, W has {d} features")
            if not self.mask.any():
                raise CnnRepairError("repair: the feature mask selects nothing; raise the selection threshold (--select-p) or drop selection")
        if self.point_weights is not None:
            self.point_weights = np.asarray(self.point_weights, np.float64).reshape(-1)
            if self.point_weights.shape != (self.X.shape[0],) or not np.all(self.point_weights > 0):
                raise CnnRepairError(f"repair: point_weights must be {self.X.shape[0]} positive numbers, one per point")
        if self.delta_weight <= 0:
            raise CnnRepairError(f"repair: delta_weight must be > 0 (got {self.delta_weight})")
        if self.max_change is not None and self.max_change <= 0:
            raise CnnRepairError(f"repair: max_change must be > 0 (got {self.max_change})")

    @property
    def num_classes(self) -> int:
        return self.W.shape[0]

    def columns(self) -> np.ndarray:
        """Features whose weights may change and can matter: in the mask and non-zero on some point."""
        live = np.abs(self.X).max(0) > 0
        return np.flatnonzero(live if self.mask is None else live & self.mask)


@dataclass
class ClassLP:
    """One class's LP in the form: minimise c x s.t. A x <= ub, 0 <= x <= upper."""

    c: np.ndarray
    A: sp.csr_matrix
    ub: np.ndarray
    upper: np.ndarray
    n_gamma: int

    @property
    def size(self) -> dict[str, int]:
        return {"variables": int(self.A.shape[1]), "constraints": int(self.A.shape[0]), "nonzeros": int(self.A.nnz)}


class TargetConstraints:
    """Two-sided target family: |(w_i + gamma_i) x_k + b_i - y_ki| <= delta_ki for every point k."""

    def rows(self, p: RepairProblem, i: int, Xc: sp.csr_matrix, cols: np.ndarray) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray, np.ndarray]:
        """(coefficients on gamma, on this family's slacks, right-hand side, slack costs) for class i."""
        r = p.Y[:, i] - p.X @ p.W[i] - p.b[i]
        K = Xc.shape[0]
        eye = sp.identity(K, format="csr")
        cost = p.delta_weight * (p.point_weights if p.point_weights is not None else np.ones(K))
        return sp.vstack([Xc, -Xc], format="csr"), sp.vstack([-eye, -eye], format="csr"), np.concatenate([r, -r]), cost


def build_class_lp(p: RepairProblem, i: int, cols: np.ndarray, Xc: sp.csr_matrix, families=None) -> ClassLP:
    """Assemble class i's LP over variables [g+ (m), g- (m), slacks of each family]."""
    families = families or [TargetConstraints()]
    blocks, slack_blocks, rhs, costs = [], [], [], []
    for fam in families:
        G, S, h, cost = fam.rows(p, i, Xc, cols)
        blocks.append(G)
        slack_blocks.append(S)
        rhs.append(h)
        costs.append(cost)
    n_slack = [S.shape[1] for S in slack_blocks]
    m = len(cols)
    rows = []
    offset = 0
    for G, S in zip(blocks, slack_blocks):
        left = sp.csr_matrix((S.shape[0], offset))
        right = sp.csr_matrix((S.shape[0], sum(n_slack) - offset - S.shape[1]))
        rows.append(sp.hstack([G, -G, left, S, right], format="csr"))
        offset += S.shape[1]
    A = sp.vstack(rows, format="csr")
    c = np.concatenate([np.ones(2 * m), *costs])
    upper = np.full(A.shape[1], np.inf)
    if p.max_change is not None:
        upper[:2 * m] = p.max_change
    if p.hard:
        upper[2 * m:] = 0.0
    return ClassLP(c, A, np.concatenate(rhs), upper, m)


@dataclass
class RepairResult:
    """The solved repair: weight changes, slacks, optimum and what the solver said, per class."""

    gamma: np.ndarray
    delta: np.ndarray
    objective: float
    status: str
    solver: str
    seconds: float
    size: dict[str, int]
    per_class: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "optimal"

    def summary(self) -> dict:
        """JSON-ready description (no arrays)."""
        return {"status": self.status, "solver": self.solver, "objective": self.objective, "seconds": self.seconds,
                "size": self.size, "gamma_l1": float(np.abs(self.gamma).sum()), "gamma_linf": float(np.abs(self.gamma).max(initial=0.0)),
                "gamma_nonzero": int((self.gamma != 0).sum()), "delta_sum": float(self.delta.sum()),
                "per_class": self.per_class}


@contextlib.contextmanager
def _stdout_silenced():
    """Point file descriptor 1 at /dev/null for the duration (library code never prints)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _solve_highs(lp: ClassLP, time_limit: float | None, method: str) -> tuple[str, np.ndarray | None, float | None]:
    import highspy

    with _stdout_silenced():  # HiGHS prints a banner on stdout when the first instance is made
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    h.setOptionValue("solver", "ipm" if method == "highs-ipm" else "simplex")
    if method == "highs-ipm":
        h.setOptionValue("run_crossover", "on")
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    A = lp.A.tocsc()
    model = highspy.HighsLp()
    model.num_col_, model.num_row_ = A.shape[1], A.shape[0]
    model.col_cost_ = lp.c
    model.col_lower_ = np.zeros(A.shape[1])
    model.col_upper_ = np.where(np.isinf(lp.upper), highspy.kHighsInf, lp.upper)
    model.row_lower_ = np.full(A.shape[0], -highspy.kHighsInf)
    model.row_upper_ = lp.ub
    model.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    model.a_matrix_.start_ = A.indptr
    model.a_matrix_.index_ = A.indices
    model.a_matrix_.value_ = A.data
    h.passModel(model)
    h.run()
    status = h.getModelStatus()
    names = {highspy.HighsModelStatus.kOptimal: "optimal", highspy.HighsModelStatus.kInfeasible: "infeasible",
             highspy.HighsModelStatus.kUnbounded: "unbounded", highspy.HighsModelStatus.kTimeLimit: "time_limit",
             highspy.HighsModelStatus.kUnboundedOrInfeasible: "infeasible"}
    name = names.get(status, h.modelStatusToString(status).lower().replace(" ", "_"))
    if name != "optimal":
        return name, None, None
    return name, np.asarray(h.getSolution().col_value), float(h.getInfo().objective_function_value)


def _solve_cvxopt(lp: ClassLP, time_limit: float | None) -> tuple[str, np.ndarray | None, float | None]:
    try:
        import cvxopt
        from cvxopt import solvers
    except ImportError:
        raise CnnRepairError("solver cvxopt is not installed; `pip install cvxopt` or use --solver highs") from None
    n = lp.A.shape[1]
    bounded = np.flatnonzero(np.isfinite(lp.upper))
    G = sp.vstack([lp.A, -sp.identity(n, format="csr"), sp.identity(n, format="csr")[bounded]], format="coo")
    h = np.concatenate([lp.ub, np.zeros(n), lp.upper[bounded]])
    Gc = cvxopt.spmatrix(G.data.tolist(), G.row.tolist(), G.col.tolist(), size=G.shape)
    opts = {"show_progress": False, "abstol": 1e-9, "reltol": 1e-9, "feastol": 1e-9, "maxiters": 200}
    sol = solvers.lp(cvxopt.matrix(lp.c), Gc, cvxopt.matrix(h), options=opts)
    status = {"optimal": "optimal", "primal infeasible": "infeasible", "dual infeasible": "unbounded"}.get(sol["status"], "not_converged")
    if sol["x"] is None or status != "optimal":
        return status, None, None
    x = np.asarray(sol["x"]).reshape(-1)
    return status, x, float(lp.c @ x)


def repair(p: RepairProblem, solver: str = "highs", time_limit: float | None = None, families=None, n_jobs: int = 1) -> RepairResult:
    """Solve the repair LP class by class; returns gamma, delta and the optimum.

    A class whose LP is not solved to optimality makes the whole result non-optimal (``status``
    names the first failure); callers must not save such a head as repaired.
    """
    if solver not in SOLVERS:
        raise CnnRepairError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    t0 = time.perf_counter()
    cols = p.columns()
    Xc = sp.csr_matrix(p.X[:, cols])
    k, d = p.W.shape
    K = p.X.shape[0]

    def one(i: int) -> dict:
        ti = time.perf_counter()
        lp = build_class_lp(p, i, cols, Xc, families)
        if solver == "cvxopt":
            status, x, obj = _solve_cvxopt(lp, time_limit)
        else:
            status, x, obj = _solve_highs(lp, time_limit, solver)
        return {"class": i, "status": status, "objective": obj, "seconds": time.perf_counter() - ti, "x": x, "lp": lp}

    if n_jobs == 1 or k == 1:
        outs = [one(i) for i in range(k)]
    else:
        from joblib import Parallel, delayed

        outs = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(i) for i in range(k))
    gamma = np.zeros((k, d))
    delta = np.zeros((K, k))
    size = {"variables": 0, "constraints": 0, "nonzeros": 0}
    status = "optimal"
    for o in outs:
        lp = o.pop("lp")
        for key, v in lp.size.items():
            size[key] += v
        x = o.pop("x")
        if o["status"] != "optimal":
            status = status if status != "optimal" else f"{o['status']} (class {o['class']})"
            continue
        m = lp.n_gamma
        g = x[:m] - x[m:2 * m]
        gamma[o["class"], cols] = np.where(np.abs(g) > 1e-12, g, 0.0)
        delta[:, o["class"]] = np.maximum(x[2 * m:2 * m + K], 0.0)
    weights = p.point_weights if p.point_weights is not None else np.ones(K)
    objective = float(np.abs(gamma).sum() + p.delta_weight * (weights @ delta).sum()) if status == "optimal" else float("nan")
    size["full_variables"] = int(k * (2 * d + K))
    return RepairResult(gamma, delta, objective, status, solver, time.perf_counter() - t0, size, outs)


def wilcoxon_select(clean: np.ndarray, adversarial: np.ndarray, p_threshold: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Wilcoxon signed-rank test per feature on paired clean/adversarial values (SciPy).

    Returns (mask of features with p < threshold, p-values). Features that never change between
    clean and adversarial get p = 1 and are never selected.
    """
    from scipy.stats import wilcoxon

    clean = np.asarray(clean, np.float64)
    adversarial = np.asarray(adversarial, np.float64)
    if clean.shape != adversarial.shape or clean.ndim != 2:
        raise CnnRepairError(f"wilcoxon selection needs paired N x d arrays, got {clean.shape} and {adversarial.shape}")
    if not (0 < p_threshold <= 1):
        raise CnnRepairError(f"selection threshold must be in (0, 1], got {p_threshold}")
    pvals = np.ones(clean.shape[1])
    changing = np.flatnonzero((clean != adversarial).any(0))
    for j in changing:  # one call a feature: SciPy picks the exact or normal method per feature, as by hand
        pvals[j] = np.nan_to_num(float(wilcoxon(clean[:, j], adversarial[:, j], zero_method="wilcox").pvalue), nan=1.0)
    return pvals < p_threshold, pvals
