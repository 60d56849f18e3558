"""Provable repair of a classifier's last layer: the margin program, the API, certificates and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from cnnrepair import RepairSpec, repair_classifier
from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.repair import MarginProblem, certified_lower_bound, margins_of, solve_margins

from tests.helpers import random_points, small_mlp


def reference_optimum(p: MarginProblem) -> float:
    """The same spec as one dense LP for scipy's linprog: variables d (free), u >= |d|, t >= max u, soft shortfalls."""
    C, n = p.weight.shape
    nc = n if p.freeze_bias else n + 1
    E, N = C * nc, len(p.labels)
    L0 = p.features @ p.weight.T + p.bias
    if p.zero_rival:  # one more rival per point: a logit fixed at 0 (class C, no variables)
        L0 = np.hstack([L0, np.zeros((N, 1))])
    a, b = p.norm_coefficients()
    soft = np.flatnonzero(np.isfinite(p.prices))
    pos = {k: i for i, k in enumerate(soft)}
    nv = 2 * E + 1 + len(soft)
    c = np.concatenate([np.zeros(E), np.full(E, a), [b], p.prices[soft]])
    rows, rhs = [], []
    for k in range(N):
        f = p.features[k] if p.freeze_bias else np.append(p.features[k], 1.0)
        y = p.labels[k]
        for j in range(C + int(p.zero_rival)):
            if j == y:
                continue
            row = np.zeros(nv)
            row[y * nc:(y + 1) * nc] -= f
            if j < C:
                row[j * nc:(j + 1) * nc] += f
            if k in pos:
                row[2 * E + 1 + pos[k]] = -1.0
            rows.append(row)
            rhs.append(-(p.margins[k] - (L0[k, y] - L0[k, j])))
    eye = np.eye(E)
    for sign in (1.0, -1.0):  # |d| <= u
        blk = np.zeros((E, nv))
        blk[:, :E], blk[:, E:2 * E] = sign * eye, -eye
        rows += list(blk)
        rhs += [0.0] * E
    blk = np.zeros((E, nv))  # u <= t
    blk[:, E:2 * E], blk[:, 2 * E] = eye, -1.0
    rows += list(blk)
    rhs += [0.0] * E
    B = p.max_change
    bounds = [(-B, B) if B else (None, None)] * E + [(0, None)] * (E + 1 + len(soft))
    res = linprog(c, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    return res.fun if res.status == 0 else (np.inf if res.status == 2 else np.nan)


def _problem(seed: int, norm: str, freeze_bias: bool, keep: str, max_change: float | None, scale: float = 1.0) -> MarginProblem:
    rng = np.random.default_rng(seed)
    C, n, K, NK = 4, 7, 8, 6
    W, b = rng.normal(size=(C, n)), rng.normal(size=C)
    F = np.maximum(rng.normal(size=(K + NK, n)), 0) + 0.05
    pred = (F @ W.T + b).argmax(1)
    labels = pred.copy()
    labels[:K] = (pred[:K] + 1 + rng.integers(0, C - 1, K)) % C
    margins = np.concatenate([np.full(K, 0.1), np.full(NK, 0.02)])
    prices = None if keep == "none" else np.concatenate([np.full(K, np.inf), np.full(NK, np.inf if keep == "hard" else 0.7)])
    if keep == "none":
        F, labels, margins = F[:K], labels[:K], margins[:K]
    return MarginProblem(W * scale, b * scale, F, labels, margins * scale, prices, norm, freeze_bias,
                         None if max_change is None else max_change * scale)


def _feasible(norm: str, freeze_bias: bool, keep: str, max_change: float | None, seeds: int = 3):
    """(problem, linprog's optimum) for each seed whose problem the reference finds feasible."""
    for seed in range(seeds):
        p = _problem(seed, norm, freeze_bias, keep, max_change)
        ref = reference_optimum(p)
        if np.isfinite(ref):
            yield p, ref


CASES = [(norm, fb, keep, mc) for norm in ("l1", "linf", "l1+linf") for fb in (False, True)
         for keep, mc in (("none", None), ("hard", None), ("soft", None), ("hard", 4.0))]


@pytest.mark.parametrize("method", ["auto", "ipm", "highs"])
@pytest.mark.parametrize("norm,freeze_bias,keep,max_change", CASES)
def test_the_margin_program_reaches_an_independent_linprog_optimum(norm, freeze_bias, keep, max_change, method):
    """Each solver on its own (the interior point with no HiGHS behind it, HiGHS alone) and the default."""
    solved = 0
    for seed in range(3):
        p = _problem(seed, norm, freeze_bias, keep, max_change)
        ref = reference_optimum(p)
        s = solve_margins(p, method=method)
        if not np.isfinite(ref):
            if method == "ipm":  # the interior point proves nothing about infeasibility: it says so, HiGHS finds the conflict
                assert s.status == "not_converged"
            else:
                assert s.status == "infeasible" and len(s.conflicts) >= 1
            continue
        solved += 1
        assert s.ok, s.status
        assert (s.size.get("method") == "interior point") == (method != "highs")
        assert s.objective == pytest.approx(ref, rel=1e-6, abs=1e-9)
        assert s.gap <= 1e-6 and s.lower_bound <= ref * (1 + 1e-9) + 1e-12  # a certified bound never exceeds the optimum
        m = margins_of(p.logits(s.delta_weight, s.delta_bias), p.labels)
        hard = np.isinf(p.prices)
        # to the solvers' feasibility tolerance: 1e-8 of the largest required change (the float32 re-solve raises the
        # margins by float32's far larger rounding, so a saved model's margins are met outright)
        need = float((p.margins - margins_of(p.logits(), p.labels)).max())
        assert np.all(m[hard] >= p.margins[hard] - 1e-8 * max(need, 1e-12) - 1e-12)
        if freeze_bias:
            assert not s.delta_bias.any()
        if max_change is not None:
            assert np.abs(s.delta_weight).max() <= max_change * (1 + 1e-9)
    assert solved >= 1  # every case is checked against the reference at least once


def _same_solution_on(device: str, cases) -> int:
    """Solve each case on the CPU (SciPy) and with the normal matrix on ``device``; they must agree to 1e-9."""
    compared = 0
    for norm, freeze_bias, keep, max_change in cases:
        for seed in range(2):
            p = _problem(seed, norm, freeze_bias, keep, max_change)
            cpu, other = solve_margins(p, method="ipm"), solve_margins(p, method="ipm", device=device)
            assert cpu.status == other.status
            if not cpu.ok:
                continue
            compared += 1
            assert cpu.size["device"] == "cpu" and other.size["device"] == ("cpu (torch)" if device == "torch:cpu" else
                                                                           str(torch.device(device)))
            assert other.objective == pytest.approx(cpu.objective, rel=1e-9, abs=1e-12)
            scale = max(1.0, float(np.abs(cpu.delta_weight).max()))
            assert np.abs(other.delta_weight - cpu.delta_weight).max() <= 1e-7 * scale  # the same iterates, up to rounding
    return compared


@pytest.mark.parametrize("device", ["cpu", "torch:cpu"])
def test_the_normal_matrix_solves_with_the_matrix_written_out_whole(device):
    """The interior point's normal matrix, built class by class (SciPy on one triangle; torch), solves with
    A diag(theta) A^T + B diag(De) B^T + diag(Ds) + kappa g g^T written out whole, to 1e-10: rows in any order, rows
    touching one class only (the zero rival), a class with no free entries, several rows per point."""
    from cnnrepair.repair.normal import normal_matrix

    rng = np.random.default_rng(3)
    C, nc, m = 5, 7, 60
    lab = rng.integers(0, C, m)
    riv = (lab + 1 + rng.integers(0, C, m)) % (C + 1)  # C: the zero rival, no entries
    riv[riv == lab] = C
    point = rng.integers(0, 25, m)
    free = np.array([e for e in range(C * nc) if e // nc != 3])  # class 3 has no free entries
    G = rng.normal(size=(m, nc))
    A = np.zeros((m, len(free)))
    by_class = []
    for c in range(C):
        idx = np.flatnonzero((lab == c) | (riv == c))
        sign = np.where(lab[idx] == c, 1.0, -1.0)
        pos = np.flatnonzero(free // nc == c)
        Gc = sign[:, None] * G[np.ix_(idx, free[pos] % nc)]
        A[np.ix_(idx, pos)] += Gc
        by_class.append((idx, np.asfortranarray(Gc), pos))
    points, row_point = np.unique(point, return_inverse=True)
    ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")
    pair = (row_point[ii] == row_point[jj]) & (ii >= jj)
    same = (ii[pair], jj[pair], row_point[ii[pair]])
    theta, De, Ds = rng.uniform(0.1, 2.0, len(free)), rng.uniform(0.1, 2.0, len(points)), rng.uniform(0.1, 2.0, m)
    g, kappa = rng.normal(size=m), 0.7
    B = np.zeros((m, len(points)))
    B[np.arange(m), row_point] = 1.0
    M = A @ np.diag(theta) @ A.T + B @ np.diag(De) @ B.T + np.diag(Ds) + kappa * np.outer(g, g)
    normal = normal_matrix(m, by_class, same, device)
    rhs = rng.normal(size=m)
    for rank_one in (None, (kappa, g)):
        assert normal.factor(theta, De, Ds, rank_one)
        want = np.linalg.solve(M if rank_one else M - kappa * np.outer(g, g), rhs)
        assert np.abs(normal.solve(rhs) - want).max() <= 1e-10 * np.abs(want).max()


def test_the_torch_normal_matrix_gives_the_cpu_answer_for_every_norm_and_bound():
    """The torch implementation of the interior point's normal matrix (the CUDA path), run on the CPU, reaches the SciPy
    path's optimum to 1e-9 relative in every norm x bias x keep x bound case, and the solution records where it ran."""
    assert _same_solution_on("torch:cpu", CASES) >= len(CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: the CUDA path is compared on a GPU only")
def test_the_cuda_path_gives_the_cpu_answer_for_every_norm_and_bound():
    assert _same_solution_on("cuda", CASES) >= len(CASES)


def test_the_solver_device_is_checked_when_the_options_are_made_and_recorded_in_the_certificate():
    from cnnrepair.repair import SolveOptions

    if not torch.cuda.is_available():
        with pytest.raises(CnnRepairError, match="no CUDA device.*--device cpu"):
            SolveOptions(device="cuda")
    with pytest.raises(CnnRepairError, match="not a device"):
        SolveOptions(device="tpu:9")
    assert SolveOptions(device="cpu").solver_device is None
    model = small_mlp()
    x, pred = random_points(model, 12)
    res = repair_classifier(model, x[:4], (pred[:4] + 1) % 5, RepairSpec(margin=0.1), keep=x[4:], options=SolveOptions(device="cpu"))
    assert res.ok and res.certificate.solver["device"] == "cpu"


@pytest.mark.parametrize("norm,bound", [("l1", None), ("l1", 0.7), ("linf", None), ("linf", 0.7), ("l1+linf", None), ("l1+linf", 0.7)])
def test_the_dual_bound_is_the_best_scaling_of_the_multipliers(norm, bound):
    """dual_bound against a fine grid over the scaling s: never above the grid's best by more than the grid's step
    (it is a valid bound for any s) and never below it (it finds the best s exactly)."""
    from cnnrepair.repair.program import dual_bound

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        E = int(rng.integers(1, 25))
        z = np.abs(rng.normal(size=E)) * rng.choice([0.1, 1.0, 10.0])
        base = float(rng.normal() * 5 + 2)
        a, b = {"l1": (1.0, 0.0), "linf": (0.0, 1.0), "l1+linf": (1.0 / E, 1.0)}[norm]
        s = np.linspace(0.0, 1.0, 100_001)
        excess = np.maximum(s[:, None] * z[None] - a, 0.0).sum(1) - b
        values = np.where(excess <= 0, s * base, -np.inf if bound is None else s * base - bound * excess)
        grid = max(0.0, float(values.max()))
        got = dual_bound(base, z, a, b, bound)
        step = 1e-5 * (abs(base) + (0.0 if bound is None else bound * z.sum()))
        assert grid - 1e-9 <= got <= grid + step + 1e-9
        checked += grid > 0
    assert checked >= 10  # most draws have a positive bound to find


def test_a_solve_reports_its_rounds_and_starts_from_a_previous_solution():
    """progress hears of every round (rows, gap, seconds) and of the end; a re-solve started from the rows of a
    previous solution (margins raised a little, as the float32 re-solve does) reaches the same optimum as a cold one."""
    from benchmarks.margin_speed import problem

    import cnnrepair.repair.program as program

    p = problem(60, 40, 200)
    heard: list[tuple[str, int, int]] = []
    program.QUIET_SECONDS, quiet = 0.0, program.QUIET_SECONDS  # every round reports, however quick
    try:
        first = solve_margins(p, progress=lambda desc, done, total: heard.append((desc, done, total)))
    finally:
        program.QUIET_SECONDS = quiet
    assert first.ok and first.size["method"] == "interior point"
    assert heard and all(h[0].startswith("interior point: round ") and " rows, gap " in h[0] for h in heard)
    assert heard[-1][1:] == (1, 1) and all(h[1:] == (0, 1) for h in heard[:-1])
    raised = MarginProblem(p.weight, p.bias, p.features, p.labels, p.margins + 1e-4, p.prices, p.norm)
    warm, cold = solve_margins(raised, start=first), solve_margins(raised)
    assert warm.ok and cold.ok
    assert warm.objective == pytest.approx(cold.objective, rel=1e-6)
    assert warm.rounds <= cold.rounds


def test_a_program_the_interior_point_cannot_certify_goes_to_highs_and_says_so():
    """An infeasible program: the interior point certifies nothing, HiGHS proves it and names the conflict."""
    p = _problem(0, "l1", False, "hard", None)
    p = MarginProblem(p.weight, p.bias, np.vstack([p.features, p.features[:1]]), np.append(p.labels, (p.labels[0] + 1) % p.num_classes),
                      np.append(p.margins, 0.1), None, "l1")
    s = solve_margins(p)
    assert s.status == "infeasible" and len(s.conflicts) >= 2
    assert s.size.get("interior_point") == "not certified"



def test_highs_starts_from_the_rows_of_an_interior_point_it_takes_over_from(monkeypatch):
    """When the interior point cannot certify its answer, HiGHS starts from its rows and still reaches the optimum."""
    import cnnrepair.repair.rows_ipm as rows_ipm

    p = _problem(1, "l1+linf", False, "hard", 4.0)
    ref = reference_optimum(p)
    monkeypatch.setattr(rows_ipm, "_acceptable", lambda *args: False)  # every answer refused: the hand-over
    s = solve_margins(p)
    assert s.ok and s.size.get("interior_point") == "not certified"
    assert s.objective == pytest.approx(ref, rel=1e-6, abs=1e-9)
    assert s.gap <= 1e-6


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e6])
def test_the_answer_is_relative_at_any_scale_of_the_logits(scale):
    base = solve_margins(_problem(4, "l1", False, "hard", None))
    s = solve_margins(_problem(4, "l1", False, "hard", None, scale=scale))
    assert s.ok and s.gap <= 1e-6
    assert s.objective == pytest.approx(base.objective * scale, rel=1e-7)


def test_any_multipliers_give_a_valid_lower_bound():
    rng = np.random.default_rng(7)
    for norm in ("l1", "linf", "l1+linf"):
        p = _problem(1, norm, False, "soft", None)
        ref = reference_optimum(p)
        for _ in range(20):
            pts = rng.integers(0, len(p.labels), 12)
            cls = (p.labels[pts] + rng.integers(1, p.num_classes, 12)) % p.num_classes
            assert certified_lower_bound(p, pts, cls, rng.exponential(size=12) * 10 ** rng.uniform(-3, 2)) <= ref * (1 + 1e-9) + 1e-12


def test_identical_features_with_two_labels_are_named_as_the_conflict():
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    F = np.maximum(rng.normal(size=(6, 5)), 0) + 0.1
    F[4] = F[1]
    labels = np.array([0, 1, 2, 0, 2, 1])
    s = solve_margins(MarginProblem(W, b, F, labels, 0.1))
    assert s.status == "infeasible"
    assert sorted(s.conflicts.tolist()) == [1, 4]


def test_the_conflict_search_stops_at_its_deadline_with_a_set_that_still_conflicts(monkeypatch):
    """Past its deadline the deletion filter stops: the set it returns is still proven infeasible, and flagged."""
    import cnnrepair.repair.margins as M

    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    F = np.maximum(rng.normal(size=(12, 5)), 0) + 0.1
    F[4] = F[1]
    labels = np.array([0, 1, 2, 0, 2, 1, 0, 1, 2, 0, 1, 2])
    p = MarginProblem(W, b, F, labels, 0.1)
    monkeypatch.setattr(M, "CONFLICT_SECONDS", 0.0)
    s = solve_margins(p)
    assert s.status == "infeasible" and s.size["conflicts_irreducible"] is False
    assert {1, 4} <= set(s.conflicts.tolist()) and M._hard_feasible(p, s.conflicts.tolist()) is False
    monkeypatch.setattr(M, "CONFLICT_SECONDS", 30.0)
    s = solve_margins(p)
    assert s.size["conflicts_irreducible"] is True and sorted(s.conflicts.tolist()) == [1, 4]


def test_an_undecided_feasibility_check_never_empties_the_conflicts():
    """An oracle that cannot decide (its LP hit the deadline) keeps every hard point: never an empty set."""
    from cnnrepair.repair import find_conflicts

    p = _problem(0, "l1", False, "hard", None)
    out = find_conflicts(p, [0, 1], feasible=lambda pts: None)
    assert sorted(out.tolist()) == list(range(len(p.labels)))


def _restricted_optimum(p: MarginProblem, support: np.ndarray) -> float:
    """The L1 program (hard points, every row) with only the ``support`` entries free, for linprog."""
    from cnnrepair.repair.program import margin_rows

    A, rhs = margin_rows(p, np.arange(len(p.labels)))
    A = A.toarray()[:, support]
    res = linprog(np.ones(2 * len(support)), A_ub=-np.hstack([A, -A]), b_ub=-rhs, bounds=(0, None), method="highs")
    return res.fun if res.status == 0 else np.inf


def test_the_interior_point_on_a_support_reaches_the_restricted_optimum():
    """RowsIPM with some entries fixed at zero: same optimum as linprog on the remaining entries, nothing else moves."""
    from cnnrepair.repair.rows_ipm import RowsIPM

    solved = 0
    for seed in range(3):
        p = _problem(seed, "l1", False, "hard", None)
        rng = np.random.default_rng(seed)
        support = np.sort(rng.choice(p.num_entries, p.num_entries * 2 // 3, replace=False))
        ref = _restricted_optimum(p, support)
        if not np.isfinite(ref):
            continue
        solved += 1
        N, C = len(p.labels), p.num_classes
        pts, cls = np.repeat(np.arange(N), C), np.tile(np.arange(C), N)
        rival = cls != p.labels[pts]
        pts, cls = pts[rival], cls[rival]
        L0 = p.logits()
        r = p.margins[pts] - (L0[pts, p.labels[pts]] - L0[pts, cls])
        ipm = RowsIPM(p, p.features, 1.0, pts, cls, r, np.full(N, 1e4), support)
        status, d, y = ipm.solve(None)
        assert status == "optimal"
        moved = np.flatnonzero(d.ravel())
        assert set(moved.tolist()) <= set(support.tolist())
        assert np.abs(d).sum() == pytest.approx(ref, rel=1e-6)
        assert (ipm.A(d.ravel()[support]) >= r - 1e-7).all()
    assert solved >= 2  # the loop checked real solves, not only skipped infeasible seeds


def test_an_interior_point_that_leaves_dust_is_re_solved_on_its_support(monkeypatch):
    """When dropping the tiny changes of an interior point breaks a hard margin, the solve goes on with only the
    entries that moved: still the optimum, every hard margin met, and no more entries changed than that support."""
    import cnnrepair.repair.rows_ipm as R

    calls = []
    original = R._on_support
    monkeypatch.setattr(R, "_sparsify", lambda *a: None)  # as if the dust could not simply be dropped
    monkeypatch.setattr(R, "_on_support", lambda *a: calls.append(original(*a)) or calls[-1])
    solved = 0
    for p, ref in _feasible("l1", False, "hard", None):
        solved += 1
        s = solve_margins(p)
        assert calls and calls[-1] is not None
        assert s.ok and s.size.get("method") == "interior point"
        assert s.objective == pytest.approx(ref, rel=1e-6) and s.gap <= 1e-6
        assert np.all(margins_of(p.logits(s.delta_weight, s.delta_bias), p.labels) >= p.margins - 1e-7)
        assert np.count_nonzero(np.hstack([s.delta_weight, s.delta_bias[:, None]])) < p.num_entries
    assert solved >= 2


# the library API on torch models -------------------------------------------------------------------

_mlp, _points = small_mlp, random_points


@pytest.mark.parametrize("norm", ["l1", "linf", "l1+linf"])
def test_repair_classifier_fixes_every_point_on_the_float32_model_and_changes_only_the_last_layer(norm):
    model = _mlp()
    x, pred = _points(model, 40)
    y = (pred + 1) % 5
    keep_x = x[12:]
    r = repair_classifier(model, x[:12], y[:12], RepairSpec(margin=0.1, norm=norm), keep=keep_x)
    assert r.ok and r.layer == "3"
    with torch.no_grad():
        out = r.model(x[:12]).double().numpy()
        keep_out = r.model(keep_x).argmax(1).numpy()
    assert np.all(margins_of(out, y[:12]) >= 0.1)  # measured on the float32 model, as it runs
    assert np.array_equal(keep_out, pred[12:])
    for (name, p0), (_, p1) in zip(model.named_parameters(), r.model.named_parameters()):
        assert torch.equal(p0, p1) == (not name.startswith("3."))
    c = r.certificate
    assert c.status == "repaired" and c.gap <= 1e-6 and c.keep.count == 28
    assert min(p.margin_after for p in c.points) >= 0.1


def test_the_keyword_arguments_of_0_1_still_repair_with_a_warning():
    from cnnrepair import CnnRepairError, Points, SolveOptions

    model = _mlp()
    x, pred = _points(model, 20)
    y = (pred + 1) % 5
    new = repair_classifier(model, x[:5], y[:5], RepairSpec(margin=0.1), keep=Points(x[5:], pred[5:]),
                            options=SolveOptions(time_limit=60, threads=1))
    with pytest.warns(DeprecationWarning, match="keep_x"):
        old = repair_classifier(model, x[:5], y[:5], RepairSpec(margin=0.1), keep_x=x[5:], keep_y=pred[5:], time_limit=60, threads=1)
    assert new.ok and old.ok and old.certificate.to_dict() == {**new.certificate.to_dict(), "solver": old.certificate.solver}
    with pytest.warns(DeprecationWarning, match="Certificate"):
        assert old.certificate["gap"] == old.certificate.gap
    pair = repair_classifier(model, Points(x[:5], y[:5]), spec=RepairSpec(margin=0.1), keep=(x[5:], pred[5:]))
    assert pair.certificate.objective == new.certificate.objective
    with pytest.raises(TypeError, match="keep_points"):
        repair_classifier(model, x[:5], y[:5], keep_points=x[5:])
    with pytest.raises(CnnRepairError, match="once"), pytest.warns(DeprecationWarning):
        repair_classifier(model, x[:5], y[:5], keep=x[5:], keep_x=x[5:])
    with pytest.raises(CnnRepairError, match="need labels"):
        repair_classifier(model, x[:5])
    for bad in ({"time_limit": 0}, {"time_limit": float("nan")}, {"threads": 0}):
        with pytest.raises(CnnRepairError, match="time limit|threads"):
            SolveOptions(**bad)


def test_frozen_bias_and_a_layer_without_bias():
    model = _mlp()
    x, pred = _points(model, 10)
    r = repair_classifier(model, x, (pred + 2) % 5, RepairSpec(freeze_bias=True))
    assert r.ok and torch.equal(r.model[3].bias, model[3].bias)
    nobias = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False)).eval()
    x, pred = _points(nobias, 6)
    r = repair_classifier(nobias, x, (pred + 1) % 5)
    assert r.ok and r.certificate.spec["freeze_bias"] is True


def test_lh_and_kh_heads_are_repaired_through_the_same_call():
    from cnnrepair.paper.hybrid import HybridNet, fit_linear_svm, fit_rbf_svm

    rng = np.random.default_rng(0)
    feats = nn.Flatten()
    X = rng.normal(size=(90, 6)).astype(np.float32)
    Y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    for fit in (fit_linear_svm, fit_rbf_svm):
        head = fit(X, Y)[0]
        net = HybridNet(feats, head).eval()
        xt = torch.from_numpy(X).reshape(90, 1, 6)
        with torch.no_grad():
            pred = net(xt).argmax(1).numpy()
        y = (pred[:3] + 1) % 3
        r = repair_classifier(net, xt[:3], y, RepairSpec(margin=0.05), keep=xt[6:16])
        assert r.ok, r.notes
        assert r.layer == "head" and r.certificate.layer_kind == ("svm-linear" if fit is fit_linear_svm else "svm-rbf")
        with torch.no_grad():
            assert np.all(margins_of(r.model(xt[:3]).double().numpy(), y) >= 0.05)
            assert np.array_equal(r.model(xt[6:16]).argmax(1).numpy(), pred[6:16])
        if fit is fit_rbf_svm:  # only the dual coefficients and biases move
            assert torch.equal(r.model.head.support_vectors, head.support_vectors)
            assert not torch.equal(r.model.head.coef, head.coef)


def test_the_papers_targets_spec_runs_through_the_same_call_and_promises_nothing():
    model = _mlp()
    x, pred = _points(model, 20)
    r = repair_classifier(model, x[:8], (pred[:8] + 1) % 5, RepairSpec(kind="targets"), keep=x[8:])
    assert r.ok and r.certificate.lower_bound is None and "guarantees nothing" in r.certificate.note
    assert torch.equal(r.model[3].bias, model[3].bias)  # the paper's program edits weights only


def test_api_rejects_bad_points_with_one_line_errors():
    model = _mlp()
    x, pred = _points(model, 4)
    with pytest.raises(CnnRepairError, match="labels must lie in 0..4"):
        repair_classifier(model, x, np.array([0, 1, 2, 9]))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CnnRepairError, match="NaN"):
        repair_classifier(model, bad, pred)
    with pytest.raises(CnnRepairError, match="no linear layer named 'fc'"):
        repair_classifier(model, x, pred, layer="fc")
    inner = repair_classifier(model, x, pred, layer="1")  # a layer inside the network: repaired with its patterns kept
    assert inner.certificate.layer_kind == "hidden-linear" and inner.status in ("repaired", "infeasible")
    with pytest.raises(CnnRepairError, match="margin must be"):
        RepairSpec(margin=-0.1)
    squashed = nn.Sequential(_mlp(), nn.Sigmoid()).eval()  # a softmax, log-softmax or ReLU is accepted (tests/test_endings.py)
    with pytest.raises(CnnRepairError, match="no linear layer ends this model"):
        repair_classifier(squashed, x, pred)


# the command line on a torch.export file -------------------------------------------------------------

@pytest.fixture()
def exported(tmp_path):
    model = _mlp()
    program = torch.export.export(model, (torch.zeros(2, 1, 3, 4),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    x, pred = _points(model, 30)
    np.savez(tmp_path / "p.npz", x=x[:8].numpy(), y=((pred[:8] + 1) % 5).astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[8:].numpy())
    return tmp_path


def test_cli_repair_writes_a_loadable_program_and_a_certificate_that_verify_checks(exported):
    d = exported
    out = d / "out"
    assert main(["repair", str(d / "m.pt2"), "--points", str(d / "p.npz"), "--keep", str(d / "k.npz"), "--out", str(out),
                 "--margin", "0.2", "--norm", "l1+linf"]) == 0
    program = torch.export.load(str(out / "repaired.pt2"))  # plain torch, no cnnrepair
    data = np.load(d / "p.npz")
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(data["x"])).double().numpy()
    assert np.all(margins_of(logits, data["y"]) >= 0.2)
    cert = json.loads((out / "certificate.json").read_text())
    for key in ("model", "layer", "spec", "status", "objective", "lower_bound", "change", "points", "keep"):
        assert key in cert
    assert cert["spec"]["norm"] == "l1+linf" and cert["status"] == "repaired"
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(d / "p.npz"),
            "--keep", str(d / "k.npz"), "--original", str(d / "m.pt2")]
    assert main(args) == 0
    # an altered model fails: the original put in place of the repaired one
    (d / "altered.pt2").write_bytes((d / "m.pt2").read_bytes())
    assert main([*args[:3], str(d / "altered.pt2"), *args[4:]]) == 1
    # a certificate claiming a smaller change than the model holds fails against the original
    cert["objective"] *= 0.5
    (out / "certificate.json").write_text(json.dumps(cert))
    assert main(args) == 1


def test_cli_infeasible_spec_names_the_conflict_and_writes_no_model(exported, capsys):
    d = exported
    x = np.load(d / "p.npz")["x"]
    np.savez(d / "dup.npz", x=np.concatenate([x[:3], x[:1]]), y=np.array([0, 1, 2, 3], np.int64))
    out = d / "inf"
    assert main(["repair", str(d / "m.pt2"), "--points", str(d / "dup.npz"), "--out", str(out)]) == 1
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "infeasible" and not (out / "repaired.pt2").exists()
    assert sorted(c["index"] for c in cert["conflicts"]) == [0, 3]
    err = capsys.readouterr().err
    assert "points[0]" in err and "time limit" not in err and cert["solver"]["conflicts_irreducible"] is True


def test_cli_infeasible_spec_says_when_the_conflict_search_ran_out_of_time(exported, capsys, monkeypatch):
    import cnnrepair.repair.api as api
    import cnnrepair.repair.margins as M

    monkeypatch.setattr(M, "CONFLICT_SECONDS", 0.0)
    monkeypatch.setattr(api, "conflicting_pairs", lambda *args: [])  # the LP's own conflict search, not the coinciding check
    d = exported
    x = np.load(d / "p.npz")["x"]
    np.savez(d / "dup.npz", x=np.concatenate([x[:3], x[:1]]), y=np.array([0, 1, 2, 3], np.int64))
    assert main(["repair", str(d / "m.pt2"), "--points", str(d / "dup.npz"), "--out", str(d / "inf")]) == 1
    cert = json.loads((d / "inf" / "certificate.json").read_text())
    assert cert["solver"]["conflicts_irreducible"] is False and {0, 3} <= {c["index"] for c in cert["conflicts"]}
    assert "stopped at its time limit" in capsys.readouterr().err


@pytest.mark.parametrize("make,extra,message", [
    (lambda d: None, ["--layer", "9"], "no linear layer named '9'"),
    (lambda d: None, ["--layer", "1", "--spec", "ball", "--eps", "0.01"], "repairs the last layer only"),
    (lambda d: None, ["--margin", "-1"], "margin must be"),
    (lambda d: np.savez(d / "p.npz", x=np.zeros((2, 3, 3), np.float32), y=np.zeros(2, np.int64)), [], "the model takes (1, 3, 4)"),
    (lambda d: np.savez(d / "p.npz", x=np.zeros((2, 1, 3, 4), np.float32), y=np.array([0, 7])), [], "labels must lie in 0..4"),
    (lambda d: np.savez(d / "p.npz", x=np.full((2, 1, 3, 4), np.nan, np.float32), y=np.zeros(2, np.int64)), [], "NaN"),
    (lambda d: (d / "m.pt2").write_bytes(b"not a program"), [], "not a readable torch.export program"),
    (lambda d: None, ["--device", "gpu0"], "--device 'gpu0' is not a device"),
] + ([] if torch.cuda.is_available() else [(lambda d: None, ["--device", "cuda"], "no CUDA device")]))
def test_cli_bad_input_is_one_line_exit_2_and_nothing_written(exported, capsys, make, extra, message):
    d = exported
    make(d)
    out = d / "out"
    assert main(["repair", str(d / "m.pt2"), "--points", str(d / "p.npz"), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnnrepair: error:") and message in err[0]
    assert not out.exists()


def test_the_readme_repair_example_runs_as_written(capsys, readme_example):
    example = readme_example("repair_classifier(")
    exec(compile(example, "README.md", "exec"), {})
    status, layer, changed, certified = capsys.readouterr().out.split()
    assert status == "repaired" and layer == "2" and int(changed) > 0 and certified == "True"


def test_the_papers_experiment_runs_the_pointwise_spec_on_the_same_points(digits_run, tmp_path):
    import shutil

    from cnnrepair.paper.rundir import RunDir

    run = RunDir(shutil.copytree(digits_run, tmp_path / "run"))
    base = ["--quiet", "repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--eval-images", "60",
            "--selection", "none", "--k", "5", "--extra-anchors", "20"]
    assert main([*base, "--spec", "pointwise", "--margin", "0.1", "--variant", "pw"]) == 0
    entry = run.results["repair_variants"]["pw"]["entries"][0]
    assert entry["spec"] == "pointwise" and entry["lp"]["status"] == "optimal" and entry["lp"]["gap"] <= 1e-6
    assert entry["efficacy"] == 1.0  # every repair point fixed, by construction
    assert main([*base, "--spec", "pointwise", "--selection", "none,wilcoxon", "--variant", "pw2"]) == 2


def test_highs_takes_dual_simplex_for_a_few_short_points_and_its_interior_point_for_many(monkeypatch):
    """The HiGHS path's algorithm follows the points short at the start (highs_algorithm), is recorded in the solution's
    size, and either reaches the reference optimum."""
    import cnnrepair.repair.margins as M

    assert M.highs_algorithm(M._IPM_POINTS - 1) == "simplex" and M.highs_algorithm(M._IPM_POINTS) == "ipm"
    default, solved = M._IPM_POINTS, 0
    for p, ref in _feasible("l1", False, "hard", None):
        solved += 1
        assert int((p.row_shortfall().max(1) > 0).sum()) < default
        for threshold, algorithm in ((default, "simplex"), (1, "ipm")):
            monkeypatch.setattr(M, "_IPM_POINTS", threshold)
            s = solve_margins(p, method="highs")
            assert s.ok and s.size["highs_algorithm"] == algorithm
            assert s.objective == pytest.approx(ref, rel=1e-6) and s.gap <= 1e-6
    assert solved >= 1


@pytest.mark.parametrize("keep,freeze_bias", [("none", False), ("hard", True), ("soft", False)])
def test_the_interior_point_path_reaches_the_same_optimum(keep, freeze_bias):
    solved = 0
    for p, ref in _feasible("l1", freeze_bias, keep, None):
        solved += 1
        s = solve_margins(p)
        assert s.ok and s.size.get("method") == "interior point"
        assert s.objective == pytest.approx(ref, rel=1e-6) and s.gap <= 1e-6
        assert s.lower_bound <= ref * (1 + 1e-9)
        m = margins_of(p.logits(s.delta_weight, s.delta_bias), p.labels)
        hard = np.isinf(p.prices)
        assert np.all(m[hard] >= p.margins[hard] - 1e-7)  # the solve tolerance: 1e-8 of the largest required change
    assert solved >= 2


@pytest.mark.parametrize("head", ["lh", "kh"])
def test_an_exported_hybrid_program_is_repaired_from_its_file(tmp_path, head):
    """Our own exported hybrids compute ``x @ W.T + b`` (LH) or ``kernel(x) @ coef.T + b`` (KH) in
    float64: the file-level repair finds that layer too (for KH, in its dual coefficients)."""
    from cnnrepair.paper.hybrid import HybridNet, fit_linear_svm, fit_rbf_svm
    from cnnrepair.modelrepair import RepairFiles, prepare, run

    rng = np.random.default_rng(0)
    X = rng.normal(size=(90, 6)).astype(np.float32)
    Y = (X[:, 0] > 0).astype(int) + (X[:, 1] > 0.5).astype(int)
    fitted = fit_linear_svm(X, Y) if head == "lh" else fit_rbf_svm(X, Y, n_jobs=1)
    net = HybridNet(nn.Flatten(), fitted[0]).eval()
    xt = torch.from_numpy(X).reshape(90, 1, 6)
    program = torch.export.export(net, (xt[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "lh.pt2"))
    with torch.no_grad():
        pred = net(xt).argmax(1).numpy()
    y = ((pred[:3] + 1) % 3).astype(np.int64)
    np.savez(tmp_path / "p.npz", x=X[:3].reshape(3, 1, 6), y=y)
    job = prepare(RepairFiles(tmp_path / "lh.pt2", tmp_path / "p.npz"), RepairSpec(margin=0.05))
    assert job.layer == "head"
    cert = run(job, tmp_path / "out")
    assert cert.status == "repaired"
    saved = torch.export.load(str(tmp_path / "out" / "repaired.pt2")).module()
    with torch.no_grad():
        assert np.all(margins_of(saved(xt[:3]).double().numpy(), y) >= 0.05)
