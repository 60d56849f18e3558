"""Points with their own linear rows over the logits (cnnrepair.repair.outputs): the programs, against independent LPs."""

import numpy as np
import pytest
import scipy.optimize as so

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.ball import solve_ball
from cnnrepair.repair.certificate import witness_bound
from cnnrepair.repair.margins import solve_margins
from cnnrepair.repair.outputs import OutputRows
from cnnrepair.repair.program import MarginProblem, margins_of


def _layer(seed=0, C=4, n=6, N=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(C, n)), rng.normal(size=C) * 0.1, np.abs(rng.normal(size=(N, n))), rng


def _independent(W, b, F, radii, A, off, m):
    """min ||dW||_1 + ||db||_1 over every (point, row): a.((W+dW) c + b + db) - r.u >= off + m, u >= +-(W+dW)^T a, with a
    u of its own per row (scipy's HiGHS, written from the definition, no cnnrepair code)."""
    C, n = W.shape
    rows = [(k, r) for k in range(A.shape[0]) for r in range(A.shape[1]) if np.isfinite(off[k, r])]
    E = C * (n + 1)
    nu = len(rows) * n
    nv = 2 * E + nu
    cost = np.concatenate([np.ones(2 * E), np.zeros(nu)])
    G, h = [], []
    for q, (k, r) in enumerate(rows):
        a = A[k, r]
        g = np.zeros(nv)
        for c in range(C):
            coef = np.concatenate([F[k], [1.0]]) * a[c]  # d entries of class c: weights then bias
            g[c * (n + 1):(c + 1) * (n + 1)] -= coef
            g[E + c * (n + 1):E + (c + 1) * (n + 1)] += coef
        g[2 * E + q * n:2 * E + (q + 1) * n] = radii[k]
        G.append(g)
        h.append(a @ (W @ F[k] + b) - off[k, r] - m)
        for s in (1.0, -1.0):  # u >= s (W^T a + dW^T a)  ->  -u + s dW^T a <= -s W^T a
            for i in range(n):
                g = np.zeros(nv)
                g[2 * E + q * n + i] = -1.0
                for c in range(C):
                    g[c * (n + 1) + i] += s * a[c]
                    g[E + c * (n + 1) + i] -= s * a[c]
                G.append(g)
                h.append(-s * (W[:, i] @ a))
    res = so.linprog(cost, A_ub=np.array(G), b_ub=np.array(h), bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun


def _rows(rng, N, C, R=3):
    A = rng.normal(size=(N, R, C))
    off = rng.normal(size=(N, R))
    off[::3, 2] = -np.inf  # some points have fewer rows
    return OutputRows.of(A, off)


@pytest.mark.parametrize("boxes", [False, True])
def test_general_rows_reach_the_independent_optimum_with_a_certified_bound(boxes):
    W, b, F, rng = _layer()
    rows = _rows(rng, len(F), W.shape[0])
    radii = 0.05 * np.abs(rng.normal(size=F.shape)) if boxes else None
    p = MarginProblem(W, b, F, np.zeros(len(F), np.int64), 0.1, radii=radii, rows=rows)
    sol = solve_ball(p, time_limit=60)
    assert sol.ok
    want = _independent(W, b, F, np.zeros_like(F) if radii is None else radii, rows.coef, rows.offset, 0.1)
    assert sol.objective == pytest.approx(want, rel=1e-6)
    assert sol.lower_bound <= sol.objective * (1 + 1e-9) and sol.gap <= 1e-6
    assert witness_bound(p, {k: np.asarray(v).tolist() for k, v in sol.witness.items()}) == pytest.approx(sol.lower_bound, rel=1e-9)
    worst = rows.box_margins(W + sol.delta_weight, b + sol.delta_bias, F, radii)
    assert (worst >= 0.1 - 1e-7).all()
    assert (p.point_margins() < 0.1).any()  # the rows asked for a change


@pytest.mark.parametrize("boxes", [False, True])
def test_label_rows_are_the_label_program(boxes):
    W, b, F, rng = _layer(1)
    y = rng.integers(0, W.shape[0], len(F))
    radii = 0.03 * np.abs(rng.normal(size=F.shape)) if boxes else None
    for zero in (False, True):
        by_label = MarginProblem(W, b, F, y, 0.2, radii=radii, zero_rival=zero)
        by_rows = MarginProblem(W, b, F, y, 0.2, radii=radii, rows=OutputRows.from_labels(y, W.shape[0], zero))
        np.testing.assert_allclose(by_rows.row_shortfall(), by_label.row_shortfall(), rtol=1e-12, atol=1e-12)
        a = (solve_ball if boxes else solve_margins)(by_label, time_limit=60)
        r = solve_ball(by_rows, time_limit=60)
        with pytest.raises(CnnRepairError, match="need the box program"):
            solve_margins(by_rows)
        assert a.ok and r.ok
        assert r.objective == pytest.approx(a.objective, rel=1e-6)
        assert OutputRows.from_labels(y, W.shape[0], zero).margins(F @ W.T + b) == pytest.approx(margins_of(F @ W.T + b, y, zero))


def test_targeted_rows_cost_at_most_the_label_rows_and_hold():
    W, b, F, rng = _layer(2)
    y = rng.integers(0, W.shape[0], len(F))
    full = OutputRows.from_labels(y, W.shape[0])
    coef = full.coef.copy()
    off = full.offset.copy()
    target = (y + 1) % W.shape[0]
    off[:] = -np.inf  # every row off ...
    off[np.arange(len(y)), target] = 0.0  # ... but the target's
    targeted = OutputRows.of(coef, off)
    assert targeted.pairwise() and full.pairwise()
    t = solve_ball(MarginProblem(W, b, F, y, 0.3, rows=targeted), time_limit=60)
    a = solve_margins(MarginProblem(W, b, F, y, 0.3), time_limit=60)
    assert t.ok and a.ok and t.objective <= a.objective * (1 + 1e-9)
    L = F @ (W + t.delta_weight).T + b + t.delta_bias
    assert (L[np.arange(len(y)), y] - L[np.arange(len(y)), target] >= 0.3 - 1e-7).all()


def test_a_final_relu_adds_the_label_row_to_pairwise_rows_only():
    y = np.array([0, 2])
    rows = OutputRows.from_labels(y, 3)
    z = rows.with_zero_rival()
    assert z.num_rows == 4 and np.array_equal(z.coef[:, 3], np.eye(3)[y])
    two = OutputRows.of(np.array([[[1.0, -1.0, 0.0], [0.0, -1.0, 1.0]]]), np.zeros((1, 2)))  # Y_0 > Y_1 and Y_2 > Y_1
    z2 = two.with_zero_rival()
    assert sorted(map(tuple, z2.coef[0][z2.live[0]][2:])) == [(0.0, 0.0, 1.0), (1.0, 0.0, 0.0)]  # both favoured logits beat 0
    general = OutputRows.of(np.ones((2, 1, 3)), np.zeros((2, 1)))
    with pytest.raises(CnnRepairError, match="ReLU"):
        general.with_zero_rival()


def test_rows_are_scaled_and_bad_rows_refused():
    r = OutputRows.of(np.array([[[2.0, -4.0]]]), np.array([[8.0]]))
    assert np.array_equal(r.coef, [[[0.5, -1.0]]]) and r.offset[0, 0] == 2.0
    with pytest.raises(CnnRepairError, match="every coefficient 0"):
        OutputRows.of(np.zeros((1, 1, 2)), np.zeros((1, 1)))
    with pytest.raises(CnnRepairError, match="no row"):
        OutputRows.of(np.ones((1, 1, 2)), np.full((1, 1), -np.inf))
    with pytest.raises(CnnRepairError, match="N x rows x classes"):
        OutputRows.of(np.ones((1, 2)), np.zeros(1))
    with pytest.raises(CnnRepairError, match="leave zero_rival off"):
        MarginProblem(np.eye(2), np.zeros(2), np.ones((1, 2)), [0], 0.0, zero_rival=True, rows=r)


def _tiny_model(seed=0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


def test_repair_classifier_enforces_general_rows_on_the_saved_model():
    import torch

    from cnnrepair import Points, RepairSpec, repair_classifier
    from cnnrepair.repair.measure import model_logits

    model = _tiny_model()
    x = torch.rand(6, 5, dtype=torch.float64)
    L = model_logits(model, x)
    # each point: logit 1 at least 0.5 above its current value, and logit 0 + logit 2 <= current sum (row -z0 - z2 >= -s)
    coef = np.zeros((6, 2, 3))
    coef[:, 0, 1] = 1.0
    coef[:, 1, [0, 2]] = -1.0
    off = np.stack([L[:, 1] + 0.5, -(L[:, 0] + L[:, 2])], 1)
    rows = OutputRows.of(coef, off)
    keep = torch.rand(20, 5, dtype=torch.float64)
    res = repair_classifier(model, Points(x, np.zeros(6, np.int64), rows=rows), spec=RepairSpec(margin=0.01), keep=Points(keep))
    assert res.status == "repaired", res.notes
    after = model_logits(res.model, x)
    assert (rows.margins(after) >= 0.01 - 1e-9).all()
    assert [p.margin_after for p in res.certificate.points] == pytest.approx(rows.margins(after), abs=1e-9)
    assert (model_logits(res.model, keep).argmax(1) == model_logits(model, keep).argmax(1)).all()
    assert res.certificate.gap <= 1e-6


def test_general_rows_are_refused_through_a_softmax_and_under_the_targets_spec():
    import torch

    from cnnrepair import Points, RepairSpec, repair_classifier

    soft = torch.nn.Sequential(_tiny_model(), torch.nn.Softmax(-1))
    x = torch.rand(2, 5, dtype=torch.float64)
    rows = OutputRows.of(np.ones((2, 1, 3)), np.zeros((2, 1)))
    with pytest.raises(CnnRepairError, match="softmax follows"):
        repair_classifier(soft, Points(x, [0, 0], rows=rows), spec=RepairSpec())
    with pytest.raises(CnnRepairError, match="targets spec"):
        repair_classifier(_tiny_model(), Points(x, [0, 0], rows=rows), spec=RepairSpec(kind="targets"))
    with pytest.raises(CnnRepairError, match="drop --layer"):
        repair_classifier(_tiny_model(), Points(x, [0, 0]), spec=RepairSpec(), keep=Points(x, rows=rows), layer="0")


def test_a_points_file_with_bad_rows_is_refused_in_one_line(tmp_path):
    from cnnrepair.modelrepair import load_points

    x = np.zeros((2, 3), np.float32)
    np.savez(tmp_path / "half.npz", x=x, y=[0, 1], rows_coef=np.ones((2, 1, 3)))
    with pytest.raises(CnnRepairError, match="need both 'rows_coef' and 'rows_offset'"):
        load_points(tmp_path / "half.npz", "points file")
    np.savez(tmp_path / "count.npz", x=x, y=[0, 1], rows_coef=np.ones((3, 1, 3)), rows_offset=np.zeros((3, 1)))
    with pytest.raises(CnnRepairError, match="rows for 3 points but 'x' holds 2"):
        load_points(tmp_path / "count.npz", "points file")
    np.savez(tmp_path / "zero.npz", x=x, y=[0, 1], rows_coef=np.zeros((2, 1, 3)), rows_offset=np.zeros((2, 1)))
    with pytest.raises(CnnRepairError, match="zero.npz: output rows: a row has every coefficient 0"):
        load_points(tmp_path / "zero.npz", "points file")
    np.savez(tmp_path / "good.npz", x=x, y=[0, 1], rows_coef=np.full((2, 1, 3), 2.0), rows_offset=np.ones((2, 1)))
    rows = load_points(tmp_path / "good.npz", "points file").rows
    assert rows is not None and rows.coef.max() == 1.0 and rows.offset[0, 0] == 0.5


def test_keep_points_keep_their_own_rows():
    import torch

    from cnnrepair import Points, RepairSpec, repair_classifier
    from cnnrepair.repair.measure import model_logits

    model = _tiny_model(3)
    x = torch.rand(4, 5, dtype=torch.float64)
    kx = torch.rand(15, 5, dtype=torch.float64)
    L, K = model_logits(model, x), model_logits(model, kx)
    y = (L.argmax(1) + 1) % 3  # every repair point must change its label
    coef = np.zeros((15, 1, 3))
    coef[:, 0, 2] = -1.0  # keep: logit 2 may not rise by more than 0.05
    keep_rows = OutputRows.of(coef, -(K[:, 2:3] + 0.05))
    res = repair_classifier(model, Points(x, y), spec=RepairSpec(margin=0.1), keep=Points(kx, rows=keep_rows))
    assert res.status == "repaired", res.notes
    after = model_logits(res.model, kx)
    assert (after[:, 2] <= K[:, 2] + 0.05 + 1e-9).all()
    assert res.certificate.keep.smallest_margin_after == pytest.approx(keep_rows.margins(after).min(), abs=1e-9)
    assert set(res.certificate.output_rows) == {"keep_points", "note"}
    free = repair_classifier(model, Points(x, y), spec=RepairSpec(margin=0.1))
    assert free.certificate.objective <= res.certificate.objective * (1 + 1e-9)
