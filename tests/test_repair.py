import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog
from scipy.stats import wilcoxon

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair import (
    AUTO_IPM_POINTS,
    SOLVERS,
    BoundConstraints,
    RepairProblem,
    repair,
    wilcoxon_select,
)


def _problem(k=4, d=30, K=3, seed=0, sparsity=0.5, **kw):
    rng = np.random.default_rng(seed)
    X = np.maximum(rng.normal(size=(K, d)), 0) * (rng.random((K, d)) > sparsity)
    X[:, 0] = 0.0  # a feature that is zero on every repair point
    return RepairProblem(rng.normal(size=(k, d)), rng.normal(size=k), X, rng.normal(size=(K, k)) * 3, **kw)


def _linprog_reference(p: RepairProblem) -> float:
    """The whole program at once, written independently: gamma free, t >= |gamma|, delta >= 0.

    Each point's slack costs delta_weight times its point weight (1 when none are given).
    """
    k, d = p.W.shape
    K = p.X.shape[0]
    n_g = k * d
    point_price = p.delta_weight * (np.ones(K) if p.point_weights is None else np.asarray(p.point_weights, float))
    # variable order: gamma (k*d, row-major), t (k*d), delta (K*k, point-major)
    c = np.concatenate([np.zeros(n_g), np.ones(n_g), np.repeat(point_price, k)])
    rows, rhs = [], []
    I = sp.identity(n_g, format="csr")
    rows += [sp.hstack([I, -I, sp.csr_matrix((n_g, K * k))]), sp.hstack([-I, -I, sp.csr_matrix((n_g, K * k))])]
    rhs += [np.zeros(n_g), np.zeros(n_g)]
    G = sp.lil_matrix((K * k, n_g))
    D = sp.lil_matrix((K * k, K * k))
    r = np.zeros(K * k)
    for a in range(K):
        for i in range(k):
            row = a * k + i
            G[row, i * d:(i + 1) * d] = p.X[a]
            D[row, row] = -1.0
            r[row] = p.Y[a, i] - p.W[i] @ p.X[a] - p.b[i]
    G, D = G.tocsr(), D.tocsr()
    rows += [sp.hstack([G, sp.csr_matrix((K * k, n_g)), D]), sp.hstack([-G, sp.csr_matrix((K * k, n_g)), D])]
    rhs += [r, -r]
    bounds = [(None, None)] * n_g + [(0, None)] * (n_g + K * k)
    if p.mask is not None:
        for i in range(k):
            for j in np.flatnonzero(~p.mask):
                bounds[i * d + j] = (0, 0)
    res = linprog(c, A_ub=sp.vstack(rows).tocsr(), b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
    assert res.status == 0
    return res.fun


def _check_feasible(p: RepairProblem, r, tol=1e-9):
    """Every constraint holds to ``tol`` relative to the magnitude of the terms it adds up."""
    dec = p.X @ (p.W + r.gamma).T + p.b
    size = np.abs(p.X) @ np.abs(p.W + r.gamma).T + np.abs(p.b) + np.abs(p.Y)
    assert np.all(np.abs(dec - p.Y) <= r.delta + tol * size)
    assert np.all(r.delta >= 0)
    weights = p.point_weights if p.point_weights is not None else np.ones(p.X.shape[0])
    assert r.objective == pytest.approx(np.abs(r.gamma).sum() + p.delta_weight * (weights @ r.delta).sum(), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_backends_agree_with_independent_linprog(seed, masked):
    p = _problem(seed=seed, K=1 + seed * 2)
    if masked:
        p = RepairProblem(p.W, p.b, p.X, p.Y, mask=np.arange(p.W.shape[1]) % 3 != 0)
    ref = _linprog_reference(p)
    results = {s: repair(p, s) for s in SOLVERS}
    for name, r in results.items():
        assert r.ok, name
        assert r.objective == pytest.approx(ref, rel=1e-6), name
        _check_feasible(p, r)
        if masked:
            assert np.all(r.gamma[:, ~p.mask] == 0)
        assert np.all(r.gamma[:, 0] == 0)  # zero on every point: never worth changing


@pytest.mark.parametrize("weighted", [False, True])
def test_default_path_for_many_points_reaches_the_simplex_optimum(weighted):
    """``auto`` switches to the certified interior point for many points: same optimum as simplex."""
    rng = np.random.default_rng(7)
    p = _problem(k=3, d=25, K=AUTO_IPM_POINTS + 10, seed=8, delta_weight=0.7 if weighted else 1.0,
                 point_weights=rng.uniform(0.5, 2.0, AUTO_IPM_POINTS + 10) if weighted else None)
    auto, simplex = repair(p), repair(p, "highs")
    assert auto.ok and simplex.ok
    assert all(c["path"] == "ipm" for c in auto.per_class)
    assert all(c["lower_bound"] <= simplex.per_class[i]["objective"] + 1e-9 for i, c in enumerate(auto.per_class))
    assert auto.objective == pytest.approx(simplex.objective, rel=1e-8)
    _check_feasible(p, auto)
    assert np.all(auto.gamma[:, 0] == 0)


def test_interior_point_leaves_programs_it_does_not_handle_to_simplex():
    p = _problem(seed=6, max_change=0.05)
    r = repair(p, "ipm")
    assert r.ok and all(c["path"] == "highs" for c in r.per_class)
    assert r.objective == pytest.approx(repair(p, "highs").objective, rel=1e-9)


def test_a_stalled_interior_point_hands_the_class_to_simplex(monkeypatch):
    import cnnrepair.repair.targets as R

    p = _problem(k=2, d=20, K=8, seed=10)
    monkeypatch.setattr(R.ipm, "solve_l1", lambda *a, **k: R.ipm.IPMResult("not_converged", None, float("nan"), float("nan"), 150, "points"))
    r = repair(p, "ipm")
    assert r.ok and all(c["path"].startswith("highs (ipm") for c in r.per_class)
    assert r.objective == pytest.approx(repair(p, "highs").objective, rel=1e-9)


def test_parallel_classes_give_the_same_optimum():
    p = _problem(k=6, d=40, K=5, seed=4)
    a, b = repair(p, "highs"), repair(p, "highs", n_jobs=2)
    assert a.objective == pytest.approx(b.objective, rel=1e-9)


def test_single_point_hits_its_targets_with_a_large_enough_budget():
    p = _problem(K=1, seed=3, delta_weight=1e3)
    r = repair(p)
    dec = p.X @ (p.W + r.gamma).T + p.b
    np.testing.assert_allclose(dec, p.Y, atol=1e-7)
    assert r.delta.max() < 1e-9
    # a cheap slack instead leaves targets missed rather than editing weights
    cheap = repair(RepairProblem(p.W, p.b, p.X, p.Y, delta_weight=1e-3))
    assert np.abs(cheap.gamma).sum() == 0 and cheap.delta.sum() > 0


def test_hard_targets_that_cannot_be_met_are_reported_infeasible():
    p = _problem(K=3, seed=5)
    X = p.X.copy()
    X[1] = X[0]  # identical points with different targets: no weights satisfy both exactly
    Y = p.Y.copy()
    Y[1] = Y[0] + 1
    r = repair(RepairProblem(p.W, p.b, X, Y, hard=True))
    assert not r.ok and r.status.startswith("infeasible")
    assert np.isnan(r.objective)


def test_bounded_changes_respect_the_bound():
    p = _problem(seed=6, max_change=0.05)
    r = repair(p, "highs")
    assert r.ok and np.abs(r.gamma).max() <= 0.05 + 1e-9
    rc = repair(p, "cvxopt")
    assert rc.objective == pytest.approx(r.objective, rel=1e-6)


def test_bad_repair_input():
    p = _problem()
    with pytest.raises(CnnRepairError, match="X has 29 features but W has 30"):
        RepairProblem(p.W, p.b, p.X[:, 1:], p.Y)
    with pytest.raises(CnnRepairError, match="Y must be 3 x 4"):
        RepairProblem(p.W, p.b, p.X, p.Y[:, 1:])
    X = p.X.copy()
    X[0, 3] = np.nan
    with pytest.raises(CnnRepairError, match="X contains NaN"):
        RepairProblem(p.W, p.b, X, p.Y)
    with pytest.raises(CnnRepairError, match="mask selects nothing"):
        RepairProblem(p.W, p.b, p.X, p.Y, mask=np.zeros(30, bool))
    with pytest.raises(CnnRepairError, match="unknown solver"):
        repair(p, "gurobi")


def test_wilcoxon_selection_matches_scipy_on_a_hand_made_case():
    rng = np.random.default_rng(0)
    n = 30
    clean = rng.random((n, 4))
    adv = clean.copy()
    adv[:, 0] += 0.5 + 0.01 * rng.random(n)  # always up: tiny p
    adv[:, 1] += rng.normal(scale=0.1, size=n)  # noise: large p
    adv[:5, 2] += 0.1  # a few changes
    # feature 3 never changes
    mask, p = wilcoxon_select(clean, adv, 0.1)
    for j in range(3):
        assert p[j] == pytest.approx(wilcoxon(clean[:, j], adv[:, j]).pvalue)
    assert p[3] == 1.0
    assert mask.tolist() == [True, wilcoxon(clean[:, 1], adv[:, 1]).pvalue < 0.1, p[2] < 0.1, False]
    assert mask[0] and not mask[3]
    with pytest.raises(CnnRepairError, match="paired"):
        wilcoxon_select(clean, adv[:, :3])


@pytest.mark.parametrize("seed", [0, 1])
def test_column_generation_is_exact_on_a_larger_sparse_problem(seed):
    # enough features that column generation needs several pricing rounds
    p = _problem(k=3, d=900, K=40, seed=seed, sparsity=0.7)
    cg, full = repair(p, "highs-cg"), repair(p, "highs")
    assert cg.objective == pytest.approx(full.objective, rel=1e-6)
    assert cg.objective == pytest.approx(_linprog_reference(p), rel=1e-6)
    assert max(o["rounds"] for o in cg.per_class) > 1
    _check_feasible(p, cg)


def test_classes_spread_over_a_dask_cluster_through_joblib():
    """joblib's Dask backend runs the per-class LPs on a (here local, two-process) Dask cluster."""
    from dask.distributed import Client, LocalCluster, get_task_stream
    from joblib import parallel_config

    p = _problem(k=4, d=40, K=AUTO_IPM_POINTS + 5, seed=9)
    local = repair(p)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
        with parallel_config(backend="dask"), get_task_stream(client) as tasks:
            spread = repair(p, n_jobs=-1)
        workers = set(client.scheduler_info()["workers"])
    assert len(tasks.data) == p.num_classes and {t["worker"] for t in tasks.data} <= workers  # one task a class, on the cluster
    assert spread.ok and spread.objective == pytest.approx(local.objective, rel=1e-9)
    np.testing.assert_allclose(spread.gamma, local.gamma, atol=1e-9)


def _weighted_problem(K: int, scale: float = 1.0, seed: int = 11) -> RepairProblem:
    rng = np.random.default_rng(seed)
    base = _problem(k=3, d=20, K=K, seed=seed)
    return RepairProblem(base.W * scale, base.b * scale, base.X, base.Y * scale, delta_weight=0.8,
                         point_weights=rng.uniform(0.3, 3.0, K))


@pytest.mark.parametrize("K", [4, AUTO_IPM_POINTS + 6])
@pytest.mark.parametrize("scale", [1e-8, 1.0, 1e6])
def test_every_solver_gives_the_same_relative_answer_at_any_scale(K, scale):
    """(W, b, Y) scaled by s: the optimum is s times the unscaled one, on every path, weights honoured."""
    ref = _linprog_reference(_weighted_problem(K))
    p = _weighted_problem(K, scale)
    for name in SOLVERS:
        r = repair(p, name)
        assert r.ok, name
        assert r.objective == pytest.approx(scale * ref, rel=1e-6), name
        _check_feasible(p, r)
        if name in ("auto", "ipm") and K >= AUTO_IPM_POINTS:
            assert all(c["path"] == "ipm" for c in r.per_class)
            assert all(c["lower_bound"] <= c["objective"] * (1 + 1e-12) for c in r.per_class)
            assert all(c["objective"] - c["lower_bound"] <= 1e-7 * c["objective"] for c in r.per_class)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_huge_feature_leaves_no_constraint_violated(solver):
    """Slacks are recomputed from the final weight changes, after tiny changes are zeroed.

    Feature 3 is measured in units 1e8 times smaller (W's column rescaled to match), so its weight
    changes are around 1e-8: every path still returns a solution that meets its own constraints.
    """
    p = _weighted_problem(AUTO_IPM_POINTS + 6)
    X, W = p.X.copy(), p.W.copy()
    X[:, 3] *= 1e8
    W[:, 3] /= 1e8
    p = RepairProblem(W, p.b, X, p.Y, delta_weight=p.delta_weight, point_weights=p.point_weights)
    r = repair(p, solver)
    if solver == "cvxopt" and not r.ok:  # the paper's solver stopped short here on one machine (H200 host's CPU):
        assert r.status != "optimal" and np.isnan(r.objective)  # it must say so, never hand back a wrong optimum
        return
    assert r.ok
    _check_feasible(p, r)
    assert r.objective == pytest.approx(repair(p, "highs").objective, rel=1e-6)


@pytest.mark.parametrize("solver", ["auto", "highs", "highs-cg"])
def test_a_feature_scaled_alone_leaves_no_constraint_violated(solver):
    """The review's case: one feature times 1e8 with W unchanged (residuals up to 1e8 beside ones of size 1)."""
    p = _weighted_problem(AUTO_IPM_POINTS + 6)
    X = p.X.copy()
    X[:, 3] *= 1e8
    p = RepairProblem(p.W, p.b, X, p.Y, delta_weight=p.delta_weight, point_weights=p.point_weights)
    r = repair(p, solver)
    assert r.ok
    _check_feasible(p, r)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_family_keeps_the_columns_its_own_points_need(solver):
    """x = [1, 0] must reach 1 exactly while anchor a = [1, 1] stays within 0.01: gamma = [1, -1]."""
    p = RepairProblem(np.zeros((1, 2)), np.zeros(1), np.array([[1.0, 0.0]]), np.array([[1.0]]), hard=True)
    keep = BoundConstraints(np.array([[1.0, 1.0]]), np.array([[-0.01]]), np.array([[0.01]]))
    r = repair(p, solver, families=[TargetConstraintsOnly(), keep])
    assert r.ok, r.status
    assert r.objective == pytest.approx(1.99, rel=1e-6)
    assert abs(np.array([1.0, 1.0]) @ r.gamma[0]) <= 0.01 + 1e-9
    assert np.array([1.0, 0.0]) @ r.gamma[0] == pytest.approx(1.0, abs=1e-9)


def TargetConstraintsOnly():
    from cnnrepair.repair import TargetConstraints

    return TargetConstraints()


def test_the_readme_library_example_runs_as_written(capsys, readme_example):
    example = readme_example("RepairProblem(")
    exec(compile(example, "README.md", "exec"), {})
    status, objective, changed, *_ = capsys.readouterr().out.split()
    assert status == "optimal" and float(objective) > 0 and int(changed) > 0


@pytest.mark.parametrize("K,d", [(120, 15), (15, 60)])
def test_both_sides_of_the_interior_point_reach_the_same_certified_optimum(K, d, monkeypatch):
    """The points x points and the features x features forms solve the same program to the same optimum."""
    import cnnrepair.repair.ipm as ipm

    rng = np.random.default_rng(K + d)
    base = _problem(k=3, d=d, K=K, seed=K)
    p = RepairProblem(base.W, base.b, base.X, base.Y, delta_weight=0.6, point_weights=rng.uniform(0.3, 3.0, K))
    ref = _linprog_reference(p)
    picked = repair(p, "ipm")
    assert {c["side"] for c in picked.per_class} == {"features" if K > d else "points"}
    for side in ("points", "features"):
        monkeypatch.setattr(ipm, "pick_side", lambda K, m, side=side: side)
        r = repair(p, "ipm")
        assert r.ok and {c["side"] for c in r.per_class} == {side}
        assert r.objective == pytest.approx(ref, rel=1e-8), side
        assert all(c["objective"] - c["lower_bound"] <= 1e-9 * c["objective"] for c in r.per_class), side
        _check_feasible(p, r)


def test_more_points_than_the_old_points_side_limit_stay_on_the_interior_point():
    """9,000 points: the features side keeps the certified interior point (it used to fall back to simplex)."""
    p = _problem(k=2, d=12, K=9000, seed=21)
    r, ref = repair(p), repair(p, "highs")
    assert r.ok and all(c["path"] == "ipm" and c["side"] == "features" for c in r.per_class)
    assert r.objective == pytest.approx(ref.objective, rel=1e-8)


def test_the_interior_point_device_is_checked():
    with pytest.raises(CnnRepairError, match="device"):
        repair(_problem(K=AUTO_IPM_POINTS), "ipm", device="cuda:7")
    with pytest.raises(CnnRepairError, match="not a device"):
        repair(_problem(K=AUTO_IPM_POINTS), "ipm", device="gpu0")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (run on the lent GPU machine)")
def test_the_interior_point_on_cuda_gives_the_cpu_answer():
    for K, d in ((AUTO_IPM_POINTS + 10, 25), (3000, 40)):
        p = _problem(k=3, d=d, K=K, seed=K)
        cpu, gpu = repair(p, "ipm"), repair(p, "ipm", device="cuda")
        assert gpu.ok and all(c["device"].startswith("cuda") for c in gpu.per_class)
        assert gpu.objective == pytest.approx(cpu.objective, rel=1e-9)
        _check_feasible(p, gpu)


def test_repair_caps_blas_threads_and_the_knob_is_checked(monkeypatch):
    from threadpoolctl import threadpool_info

    import cnnrepair.repair.targets as R

    seen = []
    real = R._repair

    def spy(*args, **kwargs):
        seen.append(max(p["num_threads"] for p in threadpool_info()))  # the most any BLAS/OpenMP pool may use
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_repair", spy)
    p = R.RepairProblem(np.eye(3), np.zeros(3), np.ones((2, 3)), np.zeros((2, 3)))
    assert R.repair(p).ok and seen[-1] == 1  # default: every pool capped at one thread
    monkeypatch.setenv("CNNREPAIR_THREADS", "2")
    assert R.repair(p).ok and seen[-1] == 2
    monkeypatch.setenv("CNNREPAIR_THREADS", "two")
    with pytest.raises(CnnRepairError, match="CNNREPAIR_THREADS"):
        R.repair(p)
    with pytest.raises(CnnRepairError, match="threads must be an integer >= 1"):
        R.repair(p, threads=0)
