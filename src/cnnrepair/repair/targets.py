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

Backends: HiGHS simplex (through ``highspy``), a dense interior-point method of ours that ends with
a duality certificate (:mod:`cnnrepair.repair.ipm`, on the CPU or a GPU; the default for many
points, where simplex slows down), and cvxopt (the paper's solver). Constraint families
are objects that emit rows, so hard margins or clean points to preserve can be added beside the
targets without touching the solver code; a family names the points it constrains, and every
feature non-zero on any of them keeps its column.

Scale: the program is homogeneous in (W, b, Y) (scale them by s and the optimum scales by s), so
each class LP is divided by the largest magnitude of its right-hand side before any solver sees it
and its solution is multiplied back. Every solver path then works at the same scale, and the
interior point's certified gap is relative to the objective itself. Slacks and the objective are
recomputed from the final weight changes, after small changes are zeroed.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair import ipm
from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, set_time_limit
from cnnrepair.repair.highs import run as run_highs

SOLVERS = ("auto", "highs", "highs-cg", "highs-ipm", "ipm", "cvxopt")
AUTO_IPM_POINTS = 50  # from this many repair points on, ``auto`` picks the interior point (see benchmarks)


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

    def slack_weights(self) -> np.ndarray:
        """Price of each point's slack: ``delta_weight`` times its ``point_weights`` entry (1 if none)."""
        K = self.X.shape[0]
        return self.delta_weight * (self.point_weights if self.point_weights is not None else np.ones(K))

    def residual(self, i: int) -> np.ndarray:
        """How far class i's decision values on the points are from their targets: Y_i - (X w_i + b_i)."""
        return self.Y[:, i] - self.X @ self.W[i] - self.b[i]

    def columns(self, families=None) -> np.ndarray:
        """Features whose weights may change and can matter: in the mask and non-zero on some point.

        The points are those of every constraint family (the repair points alone by default): a
        feature that is zero on the repair points may still be needed to keep another family's
        points where they must stay.
        """
        mats = [fam.points(self) for fam in (families or [TargetConstraints()])]
        live = np.zeros(self.W.shape[1], bool)
        for M in mats:
            if len(M):
                live |= np.abs(M).max(0) > 0
        return np.flatnonzero(live if self.mask is None else live & self.mask)


@dataclass
class ClassLP:
    """One class's LP: minimise c x s.t. row_lower <= A x <= row_upper, 0 <= x <= col_upper.

    Columns are [g+ (m), g- (m), slacks of each family]; the first ``m`` features' gamma is
    g+ - g- divided by ``col_scale`` (each gamma column has unit largest entry). Row and column
    bounds are divided by ``scale`` (the largest finite row bound); :meth:`gamma` maps a solution
    back to the class's original units.
    """

    c: np.ndarray
    A: sp.csc_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_upper: np.ndarray
    n_gamma: int
    scale: float = 1.0
    col_scale: np.ndarray | None = None

    def gamma(self, x: np.ndarray) -> np.ndarray:
        """The class's weight change in original units from a solution ``x`` of this LP."""
        h = x[:self.n_gamma] - x[self.n_gamma:2 * self.n_gamma]
        return h * self.scale / (1.0 if self.col_scale is None else self.col_scale)

    @property
    def size(self) -> dict[str, int]:
        return {"variables": int(self.A.shape[1]), "constraints": int(self.A.shape[0]), "nonzeros": int(self.A.nnz)}


class TargetConstraints:
    """Target family: (w_i + gamma_i) x_k + b_i - y_ki = e+_k - e-_k, with delta_k = e+_k + e-_k.

    At the optimum one of e+_k, e-_k is zero, so this is the paper's two-sided constraint with
    slack delta_k, written with one equality row per point instead of two inequality rows.

    A constraint family has three methods: ``points(p)`` (the feature rows it constrains, so their
    live features keep a column), ``rows(p, i, cols)`` (its rows for class i over the features
    ``cols``) and ``penalty(p, i, gamma_i, delta)`` (the cost of its slacks at a weight change,
    recomputed from gamma so that the reported objective is exactly what the change costs; ``delta``
    is the result's own slack matrix, so objective and slacks are one computation).
    """

    def points(self, p: RepairProblem) -> np.ndarray:
        return p.X

    def rows(self, p: RepairProblem, i: int, cols: np.ndarray):
        """(coefficients on gamma, on this family's slacks, row lower, row upper, slack costs) for class i."""
        r = p.residual(i)
        eye = sp.identity(len(r), format="csc")
        w = p.slack_weights()
        return sp.csc_matrix(p.X[:, cols]), sp.hstack([-eye, eye], format="csc"), r, r, np.concatenate([w, w])

    def penalty(self, p: RepairProblem, i: int, gamma_i: np.ndarray, delta: np.ndarray) -> float:
        return float(p.slack_weights() @ delta[:, i])


class BoundConstraints:
    """Hard bounds on the repaired decision values of extra points: lower <= A (w + gamma) + b <= upper.

    ``points`` (n x d) are feature rows, ``lower`` and ``upper`` (n x k) bounds per point and class
    (``-inf``/``inf`` where unbounded). No slack: a spec that cannot hold makes the LP infeasible.
    """

    def __init__(self, points: np.ndarray, lower: np.ndarray, upper: np.ndarray):
        self.A = np.atleast_2d(np.asarray(points, np.float64))
        self.lower = np.asarray(lower, np.float64).reshape(len(self.A), -1)
        self.upper = np.asarray(upper, np.float64).reshape(len(self.A), -1)

    def points(self, p: RepairProblem) -> np.ndarray:
        if self.A.shape[1] != p.W.shape[1] or self.lower.shape[1] != p.W.shape[0]:
            raise CnnRepairError(f"repair: bound points are {self.A.shape} with {self.lower.shape[1]} classes, "
                                 f"the head is {p.W.shape}; give one row of d features and k bounds per point")
        return self.A

    def rows(self, p: RepairProblem, i: int, cols: np.ndarray):
        now = self.A @ p.W[i] + p.b[i]
        return (sp.csc_matrix(self.A[:, cols]), sp.csc_matrix((len(self.A), 0)), self.lower[:, i] - now,
                self.upper[:, i] - now, np.zeros(0))

    def penalty(self, p: RepairProblem, i: int, gamma_i: np.ndarray, delta: np.ndarray) -> float:
        return 0.0


def build_class_lp(p: RepairProblem, i: int, cols: np.ndarray, families=None) -> ClassLP:
    """Assemble class i's LP over the features ``cols`` (the live, masked ones), rescaled (see ClassLP)."""
    families = families or [TargetConstraints()]
    parts = [fam.rows(p, i, cols) for fam in families]
    n_rows = [G.shape[0] for G, *_ in parts]
    n_slack = [S.shape[1] for _, S, *_ in parts]
    G = sp.vstack([G for G, *_ in parts], format="csc")
    S = sp.block_diag([S for _, S, *_ in parts], format="csc") if len(parts) > 1 else parts[0][1]
    assert S.shape == (sum(n_rows), sum(n_slack))
    m = len(cols)
    # column scaling: gamma_j = h_j / c_j with c_j the largest |feature j|, so every column of G
    # has unit size whatever the features' units (the cost of h_j becomes 1 / c_j)
    colmax = np.asarray(abs(G).max(0).todense()).reshape(-1) if m else np.zeros(0)
    colmax[colmax == 0] = 1.0
    G = G @ sp.diags(1.0 / colmax)
    A = sp.hstack([G, -G, S], format="csc")
    c = np.concatenate([1.0 / colmax, 1.0 / colmax, *[cost for *_, cost in parts]])
    lower = np.concatenate([lo for _, _, lo, _, _ in parts])
    upper = np.concatenate([up for _, _, _, up, _ in parts])
    bounds = np.abs(np.concatenate([lower, upper]))
    scale = float(bounds[np.isfinite(bounds)].max(initial=0.0)) or 1.0
    col_upper = np.full(A.shape[1], np.inf)
    if p.max_change is not None:
        col_upper[:2 * m] = np.tile(p.max_change * colmax / scale, 2)
    if p.hard:
        col_upper[2 * m:] = 0.0
    return ClassLP(c, A, lower / scale, upper / scale, col_upper, m, scale, colmax)


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


def _solve_highs(lp: ClassLP, time_limit: float | None, method: str) -> tuple[str, np.ndarray | None, float | None, int]:
    """The whole class LP in one go (simplex or interior point with crossover)."""
    h = new_highs(time_limit, method)
    pass_lp(h, lp.c, lp.A, lp.col_upper, lp.row_lower, lp.row_upper)
    run_highs(h)
    name = highs_status(h)
    if name != "optimal":
        return name, None, None, 1
    return name, np.asarray(h.getSolution().col_value), float(h.getInfo().objective_function_value), 1


def _solve_highs_colgen(lp: ClassLP, time_limit: float | None, batch: int = 200, tol: float = 1e-9,
                        max_rounds: int = 10_000) -> tuple[str, np.ndarray | None, float | None, int]:
    """Exact column generation: start from the slacks and a few gamma columns, add priced-out ones.

    At the L1 optimum most gamma are zero, so the restricted LP stays small. A gamma column j
    (g+ or g-) has reduced cost c_j -+ a_j^T y for row duals y; while some |a_j^T y| > (1 + tol) c_j it
    enters (largest violations first, ``batch`` a round, warm-started). When none is left the
    restricted optimum is optimal for the full LP.
    """
    m = lp.n_gamma
    G = lp.A[:, :m]
    slack = lp.A[:, 2 * m:]
    h = new_highs(time_limit, "simplex")
    start = time.perf_counter()
    # first columns: the features most aligned with the residuals
    score = np.abs(G.T @ np.where(np.isfinite(lp.row_upper), lp.row_upper, 0.0))
    active = list(np.argsort(-score)[:min(m, batch)])
    A0 = sp.hstack([slack, G[:, active], -G[:, active]], format="csc")
    ns = slack.shape[1]
    c0 = np.concatenate([lp.c[2 * m:], lp.c[active], lp.c[[m + j for j in active]]])
    up0 = np.concatenate([lp.col_upper[2 * m:], lp.col_upper[active], lp.col_upper[[m + j for j in active]]])
    pass_lp(h, c0, A0, up0, lp.row_lower, lp.row_upper)
    in_active = np.zeros(m, bool)
    in_active[active] = True
    colmap = [*active, *(m + j for j in active)]  # full-LP index of each restricted gamma column, in order
    rounds = 0
    while True:
        if time_limit is not None:
            set_time_limit(h, float(time_limit) - (time.perf_counter() - start))
        run_highs(h)
        rounds += 1
        name = highs_status(h)
        if name != "optimal":
            return name, None, None, rounds
        y = np.asarray(h.getSolution().row_dual)
        v = np.abs(G.T @ y) / lp.c[:m]
        v[in_active] = 0.0
        new = np.flatnonzero(v > 1.0 + tol)
        if len(new) == 0:
            break
        if rounds >= max_rounds:
            return "not_converged", None, None, rounds
        new = new[np.argsort(-v[new])][:batch]
        block = sp.hstack([G[:, new], -G[:, new]], format="csc")
        cost = np.concatenate([lp.c[new], lp.c[m + new]])
        upper = np.concatenate([lp.col_upper[new], lp.col_upper[m + new]])
        h.addCols(len(cost), cost, np.zeros(len(cost)), upper, block.nnz, block.indptr[:-1], block.indices, block.data)
        in_active[new] = True
        colmap.extend([*new.tolist(), *(m + new).tolist()])
    xr = np.asarray(h.getSolution().col_value)
    x = np.zeros(lp.A.shape[1])
    x[2 * m:] = xr[:ns]
    x[np.asarray(colmap, int)] = xr[ns:]
    return "optimal", x, float(h.getInfo().objective_function_value), rounds


def _solve_cvxopt(lp: ClassLP, time_limit: float | None) -> tuple[str, np.ndarray | None, float | None, int]:
    try:
        import cvxopt
        from cvxopt import solvers
    except ImportError:
        raise CnnRepairError("solver cvxopt is not installed; `pip install cvxopt` or use --solver highs") from None
    n = lp.A.shape[1]
    A = lp.A.tocsr()
    eq = np.flatnonzero(lp.row_lower == lp.row_upper)
    ub = np.flatnonzero((lp.row_lower != lp.row_upper) & np.isfinite(lp.row_upper))
    lb = np.flatnonzero((lp.row_lower != lp.row_upper) & np.isfinite(lp.row_lower))
    bounded = np.flatnonzero(np.isfinite(lp.col_upper))
    eye = sp.identity(n, format="csr")
    G = sp.vstack([A[ub], -A[lb], -eye, eye[bounded]], format="coo")
    h = np.concatenate([lp.row_upper[ub], -lp.row_lower[lb], np.zeros(n), lp.col_upper[bounded]])

    def spm(M):
        M = M.tocoo()
        return cvxopt.spmatrix(M.data.tolist(), M.row.tolist(), M.col.tolist(), size=M.shape)

    opts = {"show_progress": False, "abstol": 1e-9, "reltol": 1e-9, "feastol": 1e-9, "maxiters": 200}
    kwargs = {"A": spm(A[eq]), "b": cvxopt.matrix(lp.row_upper[eq])} if len(eq) else {}
    try:
        sol = solvers.lp(cvxopt.matrix(lp.c), spm(G), cvxopt.matrix(h), options=opts, **kwargs)
    except (ValueError, ArithmeticError):  # cvxopt's singular KKT system: a status, not a crash
        return "numerical_error", None, None, 0
    status = {"optimal": "optimal", "primal infeasible": "infeasible", "dual infeasible": "unbounded"}.get(sol["status"], "not_converged")
    if sol["x"] is None or status != "optimal":
        return status, None, None, int(sol.get("iterations", 0))
    x = np.asarray(sol["x"]).reshape(-1)
    return status, x, float(lp.c @ x), int(sol.get("iterations", 0))


def _solve_ipm(X: torch.Tensor, r: torch.Tensor, w: torch.Tensor,
               time_limit: float | None) -> tuple[str, np.ndarray | None, int, float | None, str]:
    """Certified interior point for one class: (status, weight change g, iterations, certified lower bound, side)."""
    deadline = None if time_limit is None else time.perf_counter() + time_limit
    res = ipm.solve_l1(X, r, w, deadline=deadline)
    if res.status != "optimal":
        return res.status, None, res.iterations, None, res.side
    return "optimal", ipm.sparsify(X, r, w, res), res.iterations, res.lower_bound, res.side


def repair(p: RepairProblem, solver: str = "auto", time_limit: float | None = None, families=None, n_jobs: int = 1,
           threads: int | None = None, device: str | None = None) -> RepairResult:
    """Solve the repair LP class by class; returns gamma, delta and the optimum.

    Solvers: ``auto`` (default: ``highs`` below ``AUTO_IPM_POINTS`` repair points, ``ipm`` from
    there on), ``highs`` (HiGHS dual simplex on the whole class LP: a vertex optimum),
    ``highs-cg`` (HiGHS simplex with exact column generation, faster when few features end up
    changed), ``highs-ipm`` (HiGHS interior point with crossover), ``ipm`` (our dense
    interior point, :mod:`cnnrepair.repair.ipm`, stopped by a duality certificate of relative gap
    <= 1e-9; it factors a points x points or a features x features matrix, whichever is cheaper;
    plain programs only, others go to ``highs``) and ``cvxopt`` (the paper's solver).
    ``device`` (default: the CPU) is where the interior point runs: ``"cuda"``, ``"cuda:1"`` or
    ``"auto"`` (CUDA when present); its certificate is checked the same way on any device. Each class LP is rescaled first
    (see the module docstring), so every path gives the same relative answer at any scale of
    (W, b, Y). A class whose LP is not solved to optimality makes the whole result non-optimal
    (``status`` names the first failure); callers must not save such a head as repaired.
    ``n_jobs`` > 1 (or -1) solves classes in parallel through joblib: threads by default, or any
    joblib backend set by the caller, e.g. ``with joblib.parallel_config(backend="dask")`` to
    spread them over a Dask cluster. ``threads`` caps the BLAS/OpenMP threads of the solve
    (threadpoolctl); ``None`` takes :func:`default_threads`.
    """
    if solver not in SOLVERS:
        raise CnnRepairError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    from threadpoolctl import threadpool_limits

    from cnnrepair.runtime import check_threads, resolve_device

    check_threads(threads)

    dev = resolve_device(device) if device is not None else torch.device("cpu")
    with threadpool_limits(limits=threads or default_threads()), _torch_threads(threads or default_threads()):
        return _repair(p, solver, time_limit, families, n_jobs, dev)


@contextlib.contextmanager
def _torch_threads(n: int):
    """torch's own intra-op threads, capped like the BLAS ones and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_threads() -> int:
    """BLAS/OpenMP threads for a repair solve: ``CNNREPAIR_THREADS`` if set, else 1.

    Measured on 2 cores (docs/results.md, "Threads"): one thread was as fast as two on an idle machine and
    many times faster on a loaded one, where BLAS threads spin against each other and torch's.
    """
    value = os.environ.get("CNNREPAIR_THREADS", "").strip()
    if not value:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise CnnRepairError(f"CNNREPAIR_THREADS={value!r} is not a positive integer; set it to e.g. 1 or 2")
    return int(value)


def _repair(p: RepairProblem, solver: str, time_limit: float | None, families, n_jobs: int, device: torch.device) -> RepairResult:
    t0 = time.perf_counter()
    families = families or [TargetConstraints()]
    cols = p.columns(families)
    m = len(cols)
    Xd = np.ascontiguousarray(p.X[:, cols])
    k, d = p.W.shape
    K = p.X.shape[0]
    plain = len(families) == 1 and isinstance(families[0], TargetConstraints) and not p.hard and p.max_change is None
    use_ipm = plain and m > 0 and (solver == "ipm" or (solver == "auto" and K >= AUTO_IPM_POINTS))
    Xg = torch.as_tensor(Xd, device=device) if use_ipm else None
    wg = torch.as_tensor(p.slack_weights(), device=device) if use_ipm else None
    ipm_size = {"variables": 2 * m + 2 * K, "constraints": K, "nonzeros": 2 * int(np.count_nonzero(Xd)) + 2 * K} if use_ipm else None

    def simplex(i: int, method: str) -> tuple:
        lp = build_class_lp(p, i, cols, families)
        if solver == "cvxopt":
            status, x, _, rounds = _solve_cvxopt(lp, time_limit)
        elif method == "highs-cg" and not p.hard and lp.n_gamma > 0:
            status, x, _, rounds = _solve_highs_colgen(lp, time_limit)
        else:
            status, x, _, rounds = _solve_highs(lp, time_limit, method)
        return status, None if x is None else lp.gamma(x), rounds, lp.size

    def one(i: int) -> dict:
        ti = time.perf_counter()
        if use_ipm:
            r = p.residual(i)
            scale = float(np.abs(r).max(initial=0.0)) or 1.0
            status, g, rounds, lower, side = _solve_ipm(Xg, torch.as_tensor(r / scale, device=device), wg, time_limit)
            g = None if g is None else g * scale
            lp_size = ipm_size
            extra = {"path": "ipm", "side": side, "device": str(device), "lower_bound": None if lower is None else lower * scale}
            if status == "not_converged":  # exact fallback, recorded
                extra = {"path": f"highs (ipm {status})"}
                status, g, rounds, _ = simplex(i, "highs")
        else:
            status, g, rounds, lp_size = simplex(i, solver if solver not in ("auto", "ipm") else "highs")
            extra = {"path": "highs" if solver in ("auto", "ipm") else solver}
        if g is not None:  # roundoff-sized changes are zeroed relative to the largest, then everything is recomputed
            g = np.where(np.abs(g) > 1e-12 * float(np.abs(g).max(initial=0.0)), g, 0.0)
        return {"class": i, "status": status, "seconds": time.perf_counter() - ti, "rounds": rounds, **extra, "g": g, "lp_size": lp_size}

    if n_jobs == 1 or k == 1:
        outs = [one(i) for i in range(k)]
    else:
        from joblib import Parallel, delayed

        outs = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(i) for i in range(k))
    gamma = np.zeros((k, d))
    size = {"variables": 0, "constraints": 0, "nonzeros": 0}
    status = "optimal"
    for o in outs:
        for key, v in o.pop("lp_size").items():
            size[key] += v
        g = o.pop("g")
        if o["status"] != "optimal":
            status = status if status != "optimal" else f"{o['status']} (class {o['class']})"
            continue
        gamma[o["class"], cols] = g
    # slacks, per-class objectives and the total are all computed last, from the final gamma
    delta = np.abs(p.X @ (p.W + gamma).T + p.b - p.Y)
    for o in outs:
        i = o["class"]
        o["objective"] = (float(np.abs(gamma[i]).sum() + sum(f.penalty(p, i, gamma[i], delta) for f in families))
                          if o["status"] == "optimal" else None)
    objective = float(sum(o["objective"] for o in outs)) if status == "optimal" else float("nan")
    size["full_variables"] = int(k * (2 * d + 2 * K))
    used = solver if solver not in ("auto", "ipm") else f"{solver} ({'ipm' if use_ipm else 'highs'})"
    return RepairResult(gamma, delta, objective, status, used, time.perf_counter() - t0, size, outs)


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
