"""Certified repair: sound bounds (IBP, CROWN), the ball program, certified accuracy, and independent checks."""

import itertools
import json
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from cnnrepair.bounds import ball_box, feature_bounds, frozen_graph
from tests.helpers import pgd_in_box
from cnnrepair.certify import certify, pgd_accuracy, worst_margins
from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.repair import MarginProblem, Points, RepairSpec, last_layer, repair_classifier, solve_ball


class Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).reshape(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


def _nets():
    """Small networks with every layer type the bounds support, with trained-looking batch-norm statistics."""
    torch.manual_seed(0)
    cnn = nn.Sequential(Normalise([0.4], [0.3]), nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 6, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    res = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), Residual(3), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(48, 10), nn.ReLU(), nn.Dropout(0.1), nn.Linear(10, 4))
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    for net in (cnn, res):
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(-1.5, 1.5)
    return {"cnn": cnn.eval(), "residual": res.eval(), "mlp": mlp.eval()}


def _features(model, layer, x):
    return last_layer(model, x[:2], layer).features(x)


def _pgd_extremes(model, layer, lo, hi, feats: list[int], steps=40, restarts=3):
    """The smallest and largest value of chosen features that PGD finds in the box."""
    lay = last_layer(model, lo[:2].float(), layer)
    out = []
    for f in feats:
        for sign in (1.0, -1.0):
            def feature(x, f=f, sign=sign):
                seen = {}
                handle = lay._module().register_forward_hook(lambda m, a, o: seen.setdefault("in", a[0]))
                try:
                    model(x)
                finally:
                    handle.remove()
                return sign * seen["in"][:, f]

            best = None
            for x in pgd_in_box(feature, lo, hi, steps, restarts):
                v = _features(model, layer, x)[:, f]
                best = v if best is None else (np.maximum(best, v) if sign > 0 else np.minimum(best, v))
            out.append((f, sign, best))
    return out


@pytest.mark.parametrize("name", ["cnn", "residual", "mlp"])
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_hold_every_sampled_corner_and_pgd_point_of_the_ball(name, method):
    model = _nets()[name]
    torch.manual_seed(1)
    x = torch.rand(6, 1, 8, 8)
    layer = last_layer(model, x).name
    eps = 0.08
    lo, hi = ball_box(x, eps)
    fb = feature_bounds(model, layer, lo, hi, method)
    assert fb.lower.shape == fb.upper.shape == _features(model, layer, x).shape
    tol = 1e-5
    for trial in range(30):
        g = torch.Generator().manual_seed(trial)
        u = torch.rand(lo.shape, generator=g, dtype=torch.float64)
        xs = lo + (hi - lo) * (u.round() if trial % 2 else u)  # corners and interior points
        f = _features(model, layer, xs.float())
        assert (f >= fb.lower - tol).all() and (f <= fb.upper + tol).all()
    for f, sign, val in _pgd_extremes(model, layer, lo, hi, feats=[0, 3, 7]):
        assert ((val <= fb.upper[:, f] + tol) if sign > 0 else (val >= fb.lower[:, f] - tol)).all()


def test_crown_is_never_looser_than_ibp_and_bounds_of_a_point_are_its_features():
    for name, model in _nets().items():
        x = torch.rand(4, 1, 8, 8)
        layer = last_layer(model, x).name
        lo, hi = ball_box(x, 0.05)
        ibp, crown = feature_bounds(model, layer, lo, hi, "ibp"), feature_bounds(model, layer, lo, hi, "crown")
        assert (crown.lower >= ibp.lower - 1e-9).all() and (crown.upper <= ibp.upper + 1e-9).all(), name
        assert (crown.upper - crown.lower).sum() < (ibp.upper - ibp.lower).sum(), name
        point = feature_bounds(model, layer, x, x, "crown")
        assert np.allclose(point.lower, _features(model, layer, x), atol=1e-5) and np.allclose(point.upper, point.lower, atol=1e-5)


def test_bounds_equal_the_exact_range_on_tiny_networks():
    """Affine maps are bounded exactly by both methods; one ReLU layer: the exact ReLU of an exact range."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.tensor([[0.3, 0.6]])
    lo, hi = ball_box(x, 0.1)
    grid = torch.stack(torch.meshgrid(torch.linspace(0.2, 0.4, 101), torch.linspace(0.5, 0.7, 101), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        hidden = torch.relu(net[0](grid.double().float())).numpy()
    for method in ("ibp", "crown"):
        fb = feature_bounds(net, "2", lo, hi, method)
        assert np.allclose(fb.lower[0], hidden.min(0), atol=1e-6) and np.allclose(fb.upper[0], hidden.max(0), atol=1e-6)
    deep = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        exact = torch.relu(deep[2](torch.relu(deep[0](grid)))).numpy()
    for method in ("ibp", "crown"):
        fb = feature_bounds(deep, "4", lo, hi, method)
        assert (fb.lower[0] <= exact.min(0) + 1e-6).all() and (fb.upper[0] >= exact.max(0) - 1e-6).all()
    crown = feature_bounds(deep, "4", lo, hi, "crown")
    assert np.all(crown.upper[0] - exact.max(0) <= 0.5 * (exact.max(0) - exact.min(0)) + 1e-6)  # close, not just sound


def test_ball_box_takes_the_ball_in_pixels_through_the_normalisation():
    x01 = torch.tensor([[[[0.0, 0.5], [1.0, 0.98]]]])
    x = (x01 - 0.5) / 0.25
    lo, hi = ball_box(x, 0.04, mean=[0.5], std=[0.25])
    assert torch.allclose(lo * 0.25 + 0.5, torch.tensor([[[[0.0, 0.46], [0.96, 0.94]]]], dtype=torch.float64))
    assert torch.allclose(hi * 0.25 + 0.5, torch.tensor([[[[0.04, 0.54], [1.0, 1.0]]]], dtype=torch.float64))
    with pytest.raises(CnnRepairError, match="outside the pixel range"):
        ball_box(x, 0.04)  # the normalised inputs are not pixels: the convention is missing


def test_unsupported_operators_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.sigmoid(x))

    with pytest.raises(CnnRepairError, match="sigmoid"):
        frozen_graph(Odd().eval(), "fc", torch.rand(2, 4))


def _corner_lp(p: MarginProblem):
    """The same program written independently: one margin row per box corner, solved by linprog."""
    C, n = p.weight.shape
    nc = n if p.freeze_bias else n + 1
    E = C * nc
    a, b = p.norm_coefficients()
    rows, rhs = [], []
    for k in range(len(p.labels)):
        y = p.labels[k]
        for corner in itertools.product((-1, 1), repeat=n):
            f = p.features[k] + np.array(corner) * p.radii[k]
            for j in range(C):
                if j == y:
                    continue
                row = np.zeros(E)
                row[y * nc:y * nc + n] += f
                row[j * nc:j * nc + n] -= f
                if not p.freeze_bias:
                    row[y * nc + n] += 1
                    row[j * nc + n] -= 1
                rows.append(np.concatenate([row, -row, [0]]))
                rhs.append(p.margins[k] - ((p.weight[y] - p.weight[j]) @ f + p.bias[y] - p.bias[j]))
    A_ub, b_ub = -np.array(rows), -np.array(rhs)
    if b > 0:
        A_ub = np.vstack([A_ub, np.hstack([np.eye(E), np.eye(E), -np.ones((E, 1))])])
        b_ub = np.concatenate([b_ub, np.zeros(E)])
    res = linprog(np.concatenate([np.full(2 * E, a), [b]]), A_ub=A_ub, b_ub=b_ub,
                  bounds=[(0, p.max_change)] * (2 * E) + [(0, None)], method="highs")
    return res.fun if res.status == 0 else None


@pytest.mark.parametrize("norm", ["l1", "linf", "l1+linf"])
@pytest.mark.parametrize("freeze_bias", [False, True])
def test_box_program_reaches_the_optimum_of_the_corner_lp_and_its_worst_case_is_the_corner_minimum(norm, freeze_bias):
    rng = np.random.default_rng(7 + len(norm) + freeze_bias)
    C, n, N = 3, 4, 5
    for _ in range(3):
        p = MarginProblem(rng.normal(size=(C, n)), rng.normal(size=C), rng.normal(size=(N, n)), rng.integers(0, C, N), 0.1,
                          norm=norm, freeze_bias=freeze_bias, radii=rng.uniform(0, 0.3, (N, n)) * (rng.random((N, n)) > 0.3))
        sol = solve_ball(p)
        ref = _corner_lp(p)
        if ref is None:
            assert sol.status == "infeasible" and len(sol.conflicts)
            continue
        assert sol.ok and abs(sol.objective - ref) <= 1e-6 * max(1.0, ref)
        assert sol.gap <= 1e-6 and sol.lower_bound <= ref * (1 + 1e-9)
        W, b = p.weight + sol.delta_weight, p.bias + sol.delta_bias
        for k in range(N):  # the program's worst case is the true minimum over the box's corners
            y = p.labels[k]
            corners = np.array([p.features[k] + np.array(c) * p.radii[k] for c in itertools.product((-1, 1), repeat=n)])
            L = corners @ W.T + b
            brute = min((L[:, y] - L[:, j]).min() for j in range(C) if j != y)
            assert abs(p.point_margins(sol.delta_weight, sol.delta_bias)[k] - brute) <= 1e-9 * (1 + abs(brute))
            assert brute >= 0.1 - 1e-7


def test_box_program_with_soft_keep_points_and_a_bound_on_each_change():
    rng = np.random.default_rng(3)
    C, n, N = 3, 4, 6
    radii = np.where(np.arange(N)[:, None] < 3, 0.2, 0.0) * np.ones((N, n))  # three boxes, three pointwise (keep) points
    p = MarginProblem(rng.normal(size=(C, n)), rng.normal(size=C), rng.normal(size=(N, n)), rng.integers(0, C, N), 0.1,
                      prices=np.array([np.inf] * 3 + [0.5] * 3), max_change=2.0, radii=radii)
    sol = solve_ball(p)
    assert sol.ok and sol.gap <= 1e-6
    assert np.abs(np.concatenate([sol.delta_weight.ravel(), sol.delta_bias])).max() <= 2.0 + 1e-9
    assert (p.point_margins(sol.delta_weight, sol.delta_bias)[:3] >= 0.1 - 1e-7).all()


def _trained_digits_cnn(digits):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(96, 24), nn.ReLU(), nn.Linear(24, 10))
    x = torch.as_tensor(digits.x_train[:600]).float() / 255
    y = torch.as_tensor(digits.y_train[:600])
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


def test_ball_repair_certifies_every_ball_and_pgd_with_restarts_never_beats_the_certificate(digits):
    net = _trained_digits_cnn(digits)
    x = torch.as_tensor(digits.x_test).float() / 255
    y = np.asarray(digits.y_test, np.int64)
    eps = 0.02
    before = certify(net, x[:200], y[:200], eps, "crown")
    idx = np.flatnonzero(~before.certified)[:8]
    keep = np.flatnonzero(before.certified)[:60]
    assert len(idx) >= 4
    spec = RepairSpec(kind="ball", eps=eps, margin=0.05, keep_eps=eps)
    result = repair_classifier(net, x[idx], y[idx], spec, keep=Points(x[keep], y[keep]))
    assert result.ok, result.notes
    cert = result.certificate
    assert all(p.certified_margin_after >= 0.05 for p in cert.points) and cert.gap <= 1e-6
    # the program sees each keep ball through its feature box, looser than the specification certify bounds
    assert cert.keep.balls_certified_after == cert.keep.balls_certified_before >= len(keep) // 2
    lay = last_layer(result.model, x[:2])
    after = certify(result.model, x[idx], y[idx], eps, "crown")
    # the specification bounded itself is never looser than the feature box the program constrained
    assert after.certified.all() and (after.margins >= np.array([p.certified_margin_after for p in cert.points]) - 1e-6).all()
    lo, hi = ball_box(x[idx], eps)
    assert pgd_accuracy(result.model, lo, hi, y[idx], steps=40, restarts=10).all()
    unseen = certify(result.model, x[200:400], y[200:400], eps, "crown")
    robust = pgd_accuracy(result.model, *ball_box(x[200:400], eps), y[200:400], steps=30, restarts=4)
    assert (robust | ~unseen.certified).all() and robust.mean() >= unseen.accuracy  # PGD never beats a certificate
    box = worst_margins(feature_bounds(result.model, lay.name, *ball_box(x[keep], eps), "crown"), y[keep], lay.weight, lay.bias)
    assert (certify(result.model, x[keep], y[keep], eps, "crown").margins >= box - 1e-9).all()


def test_ball_spec_refuses_an_rbf_head_and_a_box_without_its_point():
    from cnnrepair.paper.hybrid import HybridNet, RBFHead

    torch.manual_seed(0)
    sv = np.random.rand(5, 4)
    head = RBFHead(np.zeros(4), np.ones(4), sv, np.random.randn(3, 5), np.zeros(3), 0.5)
    model = HybridNet(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), head).eval()
    x = torch.rand(3, 4)
    with pytest.raises(CnnRepairError, match="RBF"):
        repair_classifier(model, x, np.array([0, 1, 2]), RepairSpec(kind="ball", eps=0.01))
    mlp = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with pytest.raises(CnnRepairError, match="its own box"):
        repair_classifier(mlp, Points(x, np.array([0, 1, 2]), boxes=(x + 0.1, x + 0.2)), spec=RepairSpec(kind="ball"))


def _export(model, x, path):
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))


def test_cli_ball_repair_writes_a_certificate_that_verify_rechecks_and_rejects_when_altered(tmp_path, digits, capsys):
    net = _trained_digits_cnn(digits)
    x = torch.as_tensor(digits.x_test[:150]).float() / 255
    y = np.asarray(digits.y_test[:150], np.int64)
    _export(net, x, tmp_path / "m.pt2")
    before = certify(net, x, y, 0.02, "ibp")
    idx = np.flatnonzero(~before.certified)[:5]
    keep = np.flatnonzero(before.certified)[:40]
    eps = np.full(len(idx), 0.02)
    eps[0] = 0.0  # a pointwise point beside the balls
    np.savez(tmp_path / "p.npz", x=x[idx].numpy(), y=y[idx], eps=eps)
    np.savez(tmp_path / "k.npz", x=x[keep].numpy(), y=y[keep])
    out = tmp_path / "fixed"
    args = ["repair", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"),
            "--spec", "ball", "--eps", "0.02", "--bounds", "ibp", "--keep-eps", "0.02", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "keeps its label" in err and f"{len(keep)}/{len(keep)} certified before stay certified" in err
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["ball"]["point_eps"][0] == 0.0 and cert["spec"]["bounds"] == "ibp"
    assert all(p["certified_margin_after"] >= 0.05 for p in cert["points"])
    verify = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(tmp_path / "p.npz"),
              "--keep", str(tmp_path / "k.npz"), "--original", str(tmp_path / "m.pt2")]
    assert main(verify) == 0
    assert "certificate holds" in capsys.readouterr().err
    program = torch.export.load(str(out / "repaired.pt2"))
    name = cert["layer"] + ".bias"
    program.state_dict[name] = nn.Parameter(program.state_dict[name] - 10.0 * (torch.arange(10) == int(y[idx[1]])), requires_grad=False)
    torch.export.save(program, str(tmp_path / "altered.pt2"))
    verify[3] = str(tmp_path / "altered.pt2")
    assert main(verify) == 1
    err = capsys.readouterr().err
    assert "sha256 differs" in err and "not certified" in err


@pytest.mark.parametrize("extra, message", [
    ([], "needs --eps"),
    (["--eps", "0.01", "--spec", "pointwise"], "add --spec ball"),
    (["--eps", "2"], "eps must lie in"),
    (["--eps", "0.01", "--mean", "0.5,0.5", "--std", "0.2,0.2"], "channel"),
])
def test_cli_ball_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(4, 1, 4, 4)
    _export(net, x, tmp_path / "m.pt2")
    np.savez(tmp_path / "p.npz", x=x.numpy(), y=np.array([0, 1, 2, 0]))
    args = ["repair", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")]
    args += extra if "--spec" in extra else ["--spec", "ball", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "o").exists()


def test_marabou_agrees_that_the_repaired_balls_are_robust(tmp_path, capsys):
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    from maraboupy import Marabou, MarabouCore

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    src = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 4),), str(src), dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}})
    x = torch.rand(3, 4)
    with torch.no_grad():
        labels = (model(x).argmax(1) + 1) % 3  # every ball is wrong before the repair
    np.savez(tmp_path / "p.npz", x=x.numpy(), y=labels.numpy())
    eps = 0.03
    assert main(["repair", str(src), "--points", str(tmp_path / "p.npz"), "--spec", "ball", "--eps", str(eps),
                 "--margin", "0.05", "--out", str(tmp_path / "r")]) == 0
    repaired = tmp_path / "r" / "repaired.onnx"
    for name, path in (("before", src), ("after", repaired)):
        assert main(["vnnlib", str(path), "--points", str(tmp_path / "p.npz"), "--eps", str(eps), "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    for i in range(3):
        for name, path, expected in (("after", repaired, "unsat"), ("before", src, "sat")):
            net = Marabou.read_onnx(str(path))
            code, _, _ = net.solve(verbose=False, options=MarabouCore.Options(),
                                   propertyFilename=str(tmp_path / name / f"point_{i}.vnnlib"))
            assert code == expected, (i, name)


def test_bounds_of_an_onnx_file_equal_those_of_the_torch_model_it_came_from(tmp_path):
    from cnnrepair.formats import load_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "c.onnx"), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    onnx_model = load_model(tmp_path / "c.onnx").module  # batch norm folded into the conv by the exporter, zero pads explicit
    x = torch.rand(5, 1, 8, 8)
    y = np.zeros(5, np.int64)
    for method in ("ibp", "crown"):
        a, b = certify(net, x, y, 0.02, method, layer="7"), certify(onnx_model, x, y, 0.02, method)
        assert np.allclose(a.margins, b.margins, atol=1e-6)


def test_evaluate_reports_certified_accuracy_that_the_attack_never_beats(tmp_path, digits, capsys):
    net = _trained_digits_cnn(digits)
    x = torch.as_tensor(digits.x_test[:80]).float() / 255
    _export(net, x, tmp_path / "m.pt2")
    np.savez(tmp_path / "imgs.npz", x=digits.x_test[:80], y=digits.y_test[:80])
    assert main(["evaluate", str(tmp_path / "m.pt2"), "--npz", str(tmp_path / "imgs.npz"), "--eps", "0.01,0.04", "--attack", "pgd",
                 "--certify", "crown", "--n", "80", "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["models"]["original"]
    assert set(report["certified"]) == {"0.01", "0.04"}
    for eps, acc in report["certified"].items():
        assert 0 < acc <= report["attack"][eps]
    assert report["certified"]["0.04"] <= report["certified"]["0.01"]
    assert "certified eps 0.01" in capsys.readouterr().err


def test_a_model_too_wide_for_one_walk_is_bounded_in_chunks_with_the_same_bounds(monkeypatch):
    """No refusal for size: the rows of a walk are split to fit the memory budget, and the bounds do not change."""
    import sys

    P = sys.modules["cnnrepair.bounds.propagate"]
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(4096, 20), nn.ReLU(),
                          nn.Linear(20, 10)).eval()  # input size x widest value: 805M numbers, once refused
    x = torch.rand(3, 3, 64, 64)
    lo, hi = ball_box(x, 0.01)
    wide = feature_bounds(model, "6", lo, hi, "crown")
    monkeypatch.setattr(P, "memory_budget", lambda device="cpu": 1_000_000)  # a few rows a walk
    chunked = feature_bounds(model, "6", lo, hi, "crown", batch_size=2)
    assert np.allclose(wide.lower, chunked.lower, rtol=1e-9, atol=1e-9) and np.allclose(wide.upper, chunked.upper, rtol=1e-9, atol=1e-9)
    ibp = feature_bounds(model, "6", lo, hi, "ibp")
    assert (wide.upper - wide.lower).sum() < (ibp.upper - ibp.lower).sum()


def test_the_readme_ball_example_runs_as_written(capsys, readme_example):
    example = readme_example('kind="ball"')
    exec(compile(example, "README.md", "exec"), {})
    status, accuracy, kept, attack_agrees = capsys.readouterr().out.split()
    assert status == "repaired" and float(accuracy) == 1.0 and int(kept) > 0 and attack_agrees == "True"
