"""The smallest change of a linear last layer that gives points their labels with a margin: exact, certified.

The program is :class:`cnnrepair.repair.program.MarginProblem`'s. Its margin rows couple the
classes, so the per-class split of the paper's program does not apply, and the full linear program
(2 C (n+1) columns, N (C-1) rows) is slow for general LP codes (see the speed tables in docs/results.md). Its
optimum is sparse: few rows bind (the runner-up class of some points, a few keep points), and for
L1 few entries change. Every program goes first to the structured interior point of
:mod:`cnnrepair.repair.rows_ipm` (every norm, with or without ``max_change``), which holds every
entry and generates rows. When it cannot certify its answer (an infeasible program, or numerical
trouble) HiGHS solves it here: a restricted program, rows added when a point's margin is violated by
the current change, entries added while their reduced cost is negative (``|A^T y| > a``), every
round on dual simplex warm-started from the last one's basis, or on HiGHS's interior point when many
points are short at the start (:func:`highs_algorithm`); it stops only when no row is violated and no entry
prices out, which is optimality for the full program. Either way the answer ends on the certified
lower bound of :func:`~cnnrepair.repair.program.certified_lower_bound`. Hard points are made
elastic at a price that grows until their shortfall is zero; if it cannot be, a deletion filter
names a small set of conflicting points (an irreducible infeasible subset of the points).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.program import FEAS, MarginProblem, MarginSolution, SolveClock, certified_lower_bound, margin_rows
from cnnrepair.repair.rows_ipm import solve_rows_ipm

_CROSSOVER = "on"
_IPM_POINTS = 300  # from this many points short at the start on, every HiGHS round runs HiGHS's interior point (highs_algorithm)
METHODS = ("auto", "ipm", "highs")
_PRICE_START, _PRICE_MAX = 1e3, 1e9  # elastic price of hard points, scaled units
CONFLICT_SECONDS = 30.0  # the search for a small conflicting set stops here (with the set found so far)


class _Master:
    """The restricted program in HiGHS, in scaled units (features / alpha, margins / beta)."""

    def __init__(self, p: MarginProblem, alpha: float, beta: float, time_limit: float | None):
        from cnnrepair.repair.highs import new_highs

        self.p, self.alpha, self.beta = p, alpha, beta
        C, n = p.weight.shape
        self.C, self.n = C, n
        self.G = p.features / alpha
        self.ncoef = n if p.freeze_bias else n + 1  # entries per class
        self.a, self.b = p.norm_coefficients()
        self.bound = np.inf if p.max_change is None else p.max_change * alpha / beta
        self.h = new_highs(time_limit, "simplex")
        for opt in ("primal_feasibility_tolerance", "dual_feasibility_tolerance"):
            self.h.setOptionValue(opt, FEAS)
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
        return self.p.split_change(d, self.beta / self.alpha)

    def prices_out(self, y: np.ndarray) -> np.ndarray:
        """|A^T y| per entry in scaled units (the reduced cost of d+/- is a -+ it)."""
        Ymat = np.zeros((len(self.p.labels), self.p.num_rivals))
        if len(self.rows):
            pts = np.array([k for k, _ in self.rows])
            cls = np.array([j for _, j in self.rows])
            np.add.at(Ymat, (pts, self.p.labels[pts]), y)
            np.add.at(Ymat, (pts, cls), -y)
        Ymat = Ymat[:, :self.C]  # the zero rival has no entries
        Z = Ymat.T @ self.G
        if not self.p.freeze_bias:
            Z = np.hstack([Z, Ymat.sum(0)[:, None] / self.alpha])
        return np.abs(Z.ravel())


def highs_algorithm(short_points: int) -> str:
    """HiGHS's algorithm for every round of the generation, from the number of points the unchanged layer leaves short:
    ``ipm`` (HiGHS's interior point, then crossover) from :data:`_IPM_POINTS` on, else ``simplex`` (dual simplex, each
    round warm-started from the last one's basis). Each short point binds at the optimum, so they count the pivots a
    simplex needs; a few hundred keep rows added later need few. Measured side by side (``python -m benchmarks.run
    highs-rule``, benchmarks/results/highs_rule.json): on 100 repair + 1,000 keep points of three MNIST MLPs HiGHS's
    interior point in every round took 2.9-8.6x the dual simplex's time (the rule before, the interior point for
    every round of 300 rows or more, sent these to it); on 100 random repair points 2.1x for L1 but 0.82x for PRDNN's
    program (the one row this rule loses); on 1,000 short points of 512 features the dual simplex did not finish in
    150 s, the interior point did in 79 s."""
    return "ipm" if short_points >= _IPM_POINTS else "simplex"


def solve_margins(p: MarginProblem, time_limit: float | None = None, max_rounds: int = 10_000, method: str = "auto",
                  start: MarginSolution | None = None, progress: Callable[[str, int, int], None] | None = None,
                  device: str | None = None) -> MarginSolution:
    """Solve the margin program exactly (structured interior point or HiGHS, with generation); see the module docstring.

    ``method``: ``auto`` (the interior point; HiGHS when it cannot certify the answer), ``ipm`` (the
    interior point only: ``not_converged`` when it cannot) or ``highs`` (HiGHS only). ``start``: a
    solution of the same points (say, before their margins were raised by float32 rounding) whose
    rows the interior point starts from; it changes how fast, not what is found. ``progress(desc, done,
    total)`` hears of every round: the solver, the round, the rows in the program, the gap, the seconds.
    ``device``: where the interior point factors its normal matrix (None or ``cpu``: SciPy on the CPU;
    ``cuda``, ``cuda:N``: torch in float64 there); recorded in the solution's ``size["device"]``.

    Status ``optimal`` comes with a certified lower bound whose relative gap to the objective is at
    most 1e-6; ``infeasible`` with ``conflicts`` (indices of points that cannot all meet their margins).
    """
    from cnnrepair.repair.highs import highs_status, set_time_limit, run as run_highs

    if p.has_boxes or p.rows is not None:
        raise CnnRepairError("points with feature boxes or their own output rows need the box program: cnnrepair.repair.ball.solve_ball")
    t0 = time.perf_counter()
    C, n = p.weight.shape
    N = len(p.labels)
    zero = (np.zeros((C, n)), np.zeros(C))
    R0 = p.row_shortfall()  # required change per (point, rival)
    need = R0.max(1) > 0 if N else np.zeros(0, bool)
    if not need.any():
        return MarginSolution("optimal", *zero, 0.0, 0.0, time.perf_counter() - t0)
    alpha = float(np.abs(p.features).max()) or 1.0
    beta = float(R0[need].max())
    if method not in METHODS:
        raise CnnRepairError(f"unknown margin solver {method!r}; choose one of {', '.join(METHODS)}")
    clock = SolveClock(t0, time_limit, progress)  # one clock for the interior point and HiGHS after it
    if method != "highs":
        hint = None if start is None or "point" not in start.witness else (start.witness["point"], start.witness["class"])
        found = solve_rows_ipm(p, R0, alpha, beta, clock, hint, device)
        if found.ok or method == "ipm" or found.status == "time_limit":
            return found if found.ok else replace(found, witness={})
        fallback = True  # recorded with HiGHS's answer: the interior point could not certify one
        seed_rows = [(int(k), int(j)) for k, j in zip(found.witness["point"], found.witness["class"]) if R0[k, j] <= 0]
    else:
        fallback, seed_rows = False, []
    master = _Master(p, alpha, beta, time_limit)
    ncoef = master.ncoef
    # first rows: every (point, class) the unchanged layer violates, and those the interior point had
    first = [(int(k), int(j)) for k, j in zip(*np.nonzero(R0 > 0))] + seed_rows
    master.add_rows(first, R0[tuple(np.array(first).T)] / beta)
    in_master = np.zeros(R0.shape, bool)
    in_master[tuple(np.array(first).T)] = True
    # first entries: for each such row, the largest features of its two classes (and biases)
    seed = set()
    for k, j in first:
        top = np.argsort(-np.abs(p.features[k]))[:3]
        for c in (int(p.labels[k]), j) if j < C else (int(p.labels[k]),):
            seed.update(c * ncoef + int(i) for i in top if p.features[k, i] != 0)
            if not p.freeze_bias:
                seed.add(c * ncoef + n)
    if master.a == 0:  # pure L-infinity: every entry may as well move; no column generation
        seed = set(range(C * ncoef))
    master.add_entries(np.array(sorted(seed), np.int64))
    rounds = 0
    status = "optimal"
    master.h.setOptionValue("run_crossover", _CROSSOVER)
    algorithm = highs_algorithm(int(need.sum()))
    master.h.setOptionValue("solver", algorithm)
    while True:
        if time_limit is not None:
            set_time_limit(master.h, time_limit - (time.perf_counter() - t0))
        clock.report("HiGHS", rounds + 1, len(master.rows), np.inf)
        run_highs(master.h)
        rounds += 1
        name = highs_status(master.h)
        if name != "optimal":
            status = "time_limit" if name == "time_limit" else "failed"
            break
        d, y, slack = master.solution()
        # entries that price out
        z = master.prices_out(y)
        z[master.entries] = 0.0
        entering = np.flatnonzero(z > master.a * (1 + 1e-9) + FEAS)
        if len(entering):
            limit = max(100, 2 * len(master.rows))
            entering = entering[np.argsort(-z[entering])][:limit]
            master.add_entries(entering)
        # rows violated by the current change, beyond the point's own shortfall
        dW, db = master.unscale(d)
        Rk = p.row_shortfall(dW, db) / beta
        Rk[in_master] = -np.inf
        allowed = np.zeros(N)
        for k, s in slack.items():
            allowed[k] = s
        bad_k, bad_j = np.nonzero(Rk - allowed[:, None] > 10 * FEAS)
        pairs = list(zip(bad_k.tolist(), bad_j.tolist()))
        if pairs:
            master.add_rows(pairs, R0[bad_k, bad_j] / beta)
            in_master[bad_k, bad_j] = True
        if not len(entering) and not pairs:
            hard_short = [k for k, s in slack.items() if not np.isfinite(p.prices[k]) and s > FEAS * 10]
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
    size = {"rows": len(master.rows), "entries": len(master.entries), "points": N, "full_rows": N * (p.num_rivals - 1),
            "full_entries": C * ncoef, "device": "cpu", "highs_algorithm": algorithm, **({"interior_point": "not certified"} if fallback else {})}
    if status == "infeasible":
        deadline = time.perf_counter() + CONFLICT_SECONDS
        if time_limit is not None:
            deadline = min(deadline, t0 + time_limit)
        conflicts = find_conflicts(p, [k for k, s in slack.items() if not np.isfinite(p.prices[k]) and s > FEAS * 10],
                                   master, deadline=deadline)
        size["conflicts_irreducible"] = time.perf_counter() < deadline  # else: they conflict, but a smaller set may too
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


def _hard_feasible(p: MarginProblem, points: list[int], deadline: float | None = None) -> bool | None:
    """Can these points all meet their margins with some change (within ``max_change``)? One exact LP
    (None: undecided at ``deadline``)."""
    from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, run as run_highs

    A, rhs = margin_rows(p, np.asarray(points, np.int64))
    scale = float(np.abs(A.data).max(initial=0.0)) or 1.0
    A = sp.hstack([A, -A], format="csc") / scale
    rscale = float(np.abs(rhs).max()) or 1.0
    upper = np.full(A.shape[1], np.inf if p.max_change is None else p.max_change * scale / rscale)
    h = new_highs(None if deadline is None else max(1e-3, deadline - time.perf_counter()), "simplex")
    pass_lp(h, np.zeros(A.shape[1]), A, upper, rhs / rscale, np.full(len(rhs), np.inf))
    run_highs(h)
    return {"infeasible": False, "time_limit": None}.get(highs_status(h), True)


def find_conflicts(p: MarginProblem, suspects: list[int], master: _Master | None = None, feasible=None,
                   deadline: float | None = None) -> np.ndarray:
    """A small set of hard points that cannot all meet their margins: irreducible (drop any one and the rest can).

    Starts from the suspects (falls back to every hard point) and deletes chunks, then single points,
    while the rest is proven infeasible (a deletion filter). ``feasible(points)`` decides a subset:
    True, False, or None when undecided (default: the pointwise feasibility LP, undecided past
    ``deadline``). Past ``deadline`` (perf_counter seconds) it stops deleting: the set returned still
    conflicts but may not be irreducible.
    """
    feasible = feasible or (lambda pts: _hard_feasible(p, pts, deadline))
    hard = [k for k in range(len(p.labels)) if not np.isfinite(p.prices[k])]
    cands = sorted(set(suspects))
    if master is not None:
        cands = sorted(set(cands) | {k for k, _ in master.rows if not np.isfinite(p.prices[k])})
    if not cands or feasible(cands) is not False:
        cands = hard
        if feasible(cands) is True:
            return np.zeros(0, np.int64)
    chunk = max(1, len(cands) // 2)
    while True:
        i = 0
        while i < len(cands) and (deadline is None or time.perf_counter() < deadline):
            trial = cands[:i] + cands[i + chunk:]
            if trial and feasible(trial) is False:
                cands = trial
            else:
                i += chunk
        if chunk == 1:
            break
        chunk = max(1, chunk // 2)
    return np.asarray(cands, np.int64)
