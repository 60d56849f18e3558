"""Classifiers that end in a ReLU, a softmax or a log-softmax after the repaired layer (ERAN's and exported models)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cnnrepair.repair import MarginProblem, margins_of, solve_margins
from cnnrepair.repair.ball import solve_ball

from tests.test_provable_repair import CASES, _problem, reference_optimum


def _relu_problem(seed: int, norm: str, freeze_bias: bool, keep: str, max_change: float | None) -> MarginProblem:
    """A problem whose zero rival binds: the labels' logits are pushed below the margin for some points."""
    p = _problem(seed, norm, freeze_bias, keep, max_change)
    return replace(p, bias=p.bias - 1.5, zero_rival=True)


@pytest.mark.parametrize("method", ["auto", "ipm", "highs"])
@pytest.mark.parametrize("norm,freeze_bias,keep,max_change", CASES)
def test_the_zero_rival_program_reaches_an_independent_linprog_optimum(norm, freeze_bias, keep, max_change, method):
    solved = binding = 0
    for seed in range(3):
        p = _relu_problem(seed, norm, freeze_bias, keep, max_change)
        ref = reference_optimum(p)
        s = solve_margins(p, method=method)
        if not np.isfinite(ref):
            assert s.status == ("not_converged" if method == "ipm" else "infeasible")
            continue
        solved += 1
        assert s.ok, s.status
        assert s.objective == pytest.approx(ref, rel=1e-6, abs=1e-9)
        assert s.gap <= 1e-6 and s.lower_bound <= ref * (1 + 1e-9) + 1e-12
        L = p.logits(s.delta_weight, s.delta_bias)
        hard = np.isinf(p.prices)
        need = float(p.row_shortfall().max())
        got = margins_of(L, p.labels, zero_rival=True)
        assert np.all(got[hard] >= p.margins[hard] - 1e-8 * need - 1e-12)
        own = L[np.arange(len(L)), p.labels]
        binding += int(np.any(np.abs(own[hard] - p.margins[hard]) < 1e-6 * need))  # the label's logit itself bounds
        without = reference_optimum(replace(p, zero_rival=False))
        assert ref >= without - 1e-9  # the zero rival only adds rows
    assert solved >= 1 and binding >= 1


def test_the_zero_rival_is_in_the_margins_and_the_lower_bound():
    p = _relu_problem(0, "l1", False, "none", None)
    L = p.logits()
    base = margins_of(L, p.labels)
    with_zero = margins_of(L, p.labels, zero_rival=True)
    assert np.all(with_zero <= base) and np.any(with_zero < base)
    assert np.allclose(p.point_margins(), with_zero)
    assert p.row_shortfall().shape == (len(p.labels), p.num_classes + 1)


def test_the_zero_rival_with_feature_boxes_reaches_the_pointwise_optimum_at_zero_radius_and_bounds_soundly():
    p = _relu_problem(1, "l1", False, "hard", None)
    point = solve_margins(p)
    boxed = solve_ball(replace(p, radii=np.full_like(p.features, 1e-12)))
    assert boxed.ok and boxed.objective == pytest.approx(point.objective, rel=1e-6)
    wide = replace(p, radii=np.full_like(p.features, 0.02))
    sol = solve_ball(wide)
    assert sol.ok and sol.objective >= point.objective * (1 - 1e-9) and sol.lower_bound <= sol.objective * (1 + 1e-9)
    worst = wide.point_margins(sol.delta_weight, sol.delta_bias)
    assert np.all(worst >= wide.margins - 1e-7)
    # the worst case over each box, the zero rival included, by sampling corners
    rng = np.random.default_rng(0)
    for _ in range(50):
        F = wide.features + wide.radii * rng.choice([-1.0, 1.0], size=wide.features.shape)
        L = F @ (wide.weight + sol.delta_weight).T + wide.bias + sol.delta_bias
        assert np.all(margins_of(L, wide.labels, zero_rival=True) >= worst - 1e-9)


# whole models that end in a ReLU (ERAN's convention), a softmax or a log-softmax, in ONNX and torch.export --------------

import json  # noqa: E402

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from cnnrepair import RepairSpec, repair_classifier  # noqa: E402
from cnnrepair.cli import main  # noqa: E402
from cnnrepair.errors import CnnRepairError  # noqa: E402
from cnnrepair.repair import last_layer  # noqa: E402

ENDS = {"relu": nn.ReLU(), "softmax": nn.Softmax(dim=1), "log_softmax": nn.LogSoftmax(dim=1)}
ONNX_OPS = {"relu": "Relu", "softmax": "Softmax", "log_softmax": "LogSoftmax"}


def _net(end: str, seed: int = 0, shift: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 64), nn.ReLU(), nn.Linear(64, 4))  # 64 features: 50 points in general position
    with torch.no_grad():
        net[2].bias += shift
    return nn.Sequential(*net, ENDS[end]).eval() if end != "none" else net.eval()


def _onnx_of(net: nn.Sequential, end: str, path) -> None:
    """The network as ERAN and exporters write it: Gemm, Relu, Gemm, then the ending node (opset 17, any batch)."""
    W1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    W2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h0"], name="fc1", transB=1), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("Gemm", ["h1", "W2", "b2"], ["z"], name="fc2", transB=1),
             helper.make_node(ONNX_OPS[end], ["z"], ["out"], **({"axis": 1} if end != "relu" else {}))]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (b1, "b1"), (W2, "W2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _runtime_margins(path, x: np.ndarray, y: np.ndarray, end: str) -> np.ndarray:
    """Margins on the saved file in its own runtime, through the ending (log-probabilities for a softmax)."""
    if str(path).endswith(".onnx"):
        import onnxruntime as ort

        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].astype(np.float64)
    else:
        with torch.no_grad():
            out = torch.export.load(str(path)).module()(torch.from_numpy(x)).double().numpy()
    if end == "softmax":
        out = np.log(np.maximum(out, 1e-45))
    return margins_of(out, y)


@pytest.mark.parametrize("end", ["relu", "softmax", "log_softmax"])
def test_the_ending_is_found_and_a_probe_tells_a_relu_from_nothing(end):
    net = _net(end, shift=50.0)  # every logit positive on these inputs: a ReLU changes nothing there
    x = torch.rand(5, 6)
    lay = last_layer(net, x)
    assert lay.name == "2" and lay.ending == end and lay.zero_rival == (end == "relu")
    assert last_layer(_net("none"), x).ending == "none"


def test_an_ending_none_of_the_registered_ones_is_still_refused():
    net = nn.Sequential(*_net("none"), nn.Sigmoid()).eval()
    with pytest.raises(CnnRepairError, match="no linear layer ends this model"):
        repair_classifier(net, torch.rand(3, 6), np.zeros(3, np.int64))


def test_a_final_relu_makes_the_labels_own_logit_reach_the_margin():
    net = _net("relu", seed=3, shift=-0.8)  # many logits below 0: the zero rival binds
    x = torch.rand(60, 6)
    with torch.no_grad():
        z = net[:3](x)
    y = ((z.argmax(1) + 1) % 4).numpy()
    r = repair_classifier(net, x[:10], y[:10], RepairSpec(margin=0.3), keep=x[10:])
    assert r.ok and r.certificate.ending["name"] == "relu"
    with torch.no_grad():
        out = r.model(x).double().numpy()
        logits = r.model[:3](x).double().numpy()
    assert np.all(margins_of(out[:10], y[:10]) >= 0.3)
    assert np.all(logits[np.arange(10), y[:10]] >= 0.3 - 1e-6)  # the label's logit itself, not only its lead over rivals
    plain = repair_classifier(_net("none", seed=3, shift=-0.8), x[:10], y[:10], RepairSpec(margin=0.3), keep=x[10:])
    assert r.certificate.objective >= plain.certificate.objective * (1 - 1e-6)  # the zero rival only adds rows (to the certified gap)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("end", ["relu", "softmax", "log_softmax"])
def test_a_model_with_an_ending_is_repaired_and_verified_from_its_file(tmp_path, fmt, end):
    net = _net(end, seed=1, shift=-0.3)
    if fmt == "onnx":
        _onnx_of(net, end, tmp_path / "m.onnx")
    else:
        torch.export.save(torch.export.export(net, (torch.zeros(2, 6),), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                          str(tmp_path / "m.pt2"))
    src = tmp_path / f"m.{fmt}"
    rng = np.random.default_rng(0)
    x = rng.random((50, 6)).astype(np.float32)
    with torch.no_grad():
        pred = net[:3](torch.from_numpy(x)).argmax(1).numpy()
    y = (pred[:8] + 1) % 4
    np.savez(tmp_path / "p.npz", x=x[:8], y=y.astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[8:])
    out = tmp_path / "out"
    assert main(["repair", str(src), "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"),
                 "--out", str(out), "--margin", "0.25"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "repaired" and cert["ending"]["name"] == end
    saved = out / f"repaired.{fmt}"
    got = _runtime_margins(saved, x[:8], y, end)
    assert np.all(got >= 0.25 - 1e-5)
    assert np.allclose([p["margin_after"] for p in cert["points"]], got, atol=1e-4)
    args = ["verify", str(out / "certificate.json"), "--model", str(saved), "--points", str(tmp_path / "p.npz"),
            "--keep", str(tmp_path / "k.npz"), "--original", str(src)]
    assert main(args) == 0
    # a certificate that hides the ending claims margins of another model: verify says so
    del cert["ending"]
    (out / "certificate.json").write_text(json.dumps(cert))
    assert main(args) == 1


def test_a_ball_repair_through_a_final_relu_certifies_the_label_logit_over_each_box():
    net = _net("relu", seed=2, shift=-0.5)
    x = torch.rand(20, 6)
    with torch.no_grad():
        y = ((net[:3](x).argmax(1) + 1) % 4).numpy()
    r = repair_classifier(net, x[:4], y[:4], RepairSpec(kind="ball", eps=0.01, margin=0.1, bounds="crown"))
    assert r.ok
    from tests.helpers import pgd_in_box

    for k in range(4):
        lo, hi = (x[k] - 0.01).clamp(0, 1), (x[k] + 0.01).clamp(0, 1)
        assert r.certificate.points[k].certified_margin_after >= 0.1 - 1e-9

        def shortfall(z, k=k):  # minus the margin after the ReLU: PGD ascends it, trying to push the margin below the certified one
            out = r.model(z[None].float())[0].double()
            rival = torch.cat([out[:y[k]], out[y[k] + 1:]]).max()
            return rival - out[y[k]]

        worst = min(-float(shortfall(z).detach()) for z in pgd_in_box(shortfall, lo, hi))
        assert worst >= r.certificate.points[k].certified_margin_after - 1e-5


@pytest.mark.parametrize("end", ["relu", "softmax", "log_softmax"])
def test_a_layer_inside_a_network_with_an_ending_is_repaired_through_it(end):
    """The pattern-preserving program stops before the ending: margins are on the logits (log-probabilities for a softmax),
    and a final ReLU adds the zero rival, so the label's own logit reaches the margin too."""
    net = _net(end, seed=4, shift=-0.6 if end == "relu" else 0.0)
    x = torch.rand(40, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = net[:3](x)
    y = ((z.argmax(1) + 1) % 4).numpy()
    r = repair_classifier(net, x[:3], y[:3], RepairSpec(margin=0.2), layer="0", keep=x[3:])
    assert r.ok, r.notes
    cert = r.certificate
    assert cert.layer_kind == "hidden-linear" and cert.ending["name"] == end and cert.patterns["kept"]
    with torch.no_grad():
        logits = r.model[:3](x[:3]).double().numpy()
    assert np.all(margins_of(logits, y[:3], zero_rival=end == "relu") >= 0.2 - 1e-5)
    assert min(p.margin_after for p in cert.points) >= 0.2  # measured on the model's own output, through its ending
    if end == "relu":  # the final ReLU is not one of the patterns kept: it is the zero rival
        plain = repair_classifier(_net("none", seed=4, shift=-0.6), x[:3], y[:3], RepairSpec(margin=0.2), layer="0", keep=x[3:])
        assert cert.patterns["relu_values"] == plain.certificate.patterns["relu_values"]
        assert cert.objective >= plain.certificate.objective * (1 - 1e-6)


def test_a_hidden_layer_of_an_eran_style_onnx_model_is_repaired_and_verified(tmp_path):
    net = _net("relu", seed=5, shift=-0.2)
    _onnx_of(net, "relu", tmp_path / "m.onnx")
    x = np.random.default_rng(2).random((40, 6)).astype(np.float32)
    with torch.no_grad():
        y = ((net[:3](torch.from_numpy(x)).argmax(1) + 1) % 4).numpy()
    np.savez(tmp_path / "p.npz", x=x[:3], y=y[:3].astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[3:])
    out = tmp_path / "out"
    assert main(["repair", str(tmp_path / "m.onnx"), "--layer", "fc1", "--points", str(tmp_path / "p.npz"), "--keep",
                 str(tmp_path / "k.npz"), "--out", str(out), "--margin", "0.1"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["layer_kind"] == "hidden-linear" and cert["ending"]["name"] == "relu"
    assert np.all(_runtime_margins(out / "repaired.onnx", x[:3], y[:3], "relu") >= 0.1 - 1e-5)
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(tmp_path / "p.npz"),
            "--keep", str(tmp_path / "k.npz"), "--original", str(tmp_path / "m.onnx")]
    assert main(args) == 0
    del cert["ending"]
    (out / "certificate.json").write_text(json.dumps(cert))
    assert main(args) == 1
