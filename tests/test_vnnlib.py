"""VNN-LIB hand-off: properties any VNN-COMP verifier reads; Marabou proves what the repair made true."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.vnnlib import BallProperty, BoxProperty, parse_vnnlib, read_instances, read_vnnlib


def test_a_property_file_says_ball_and_violation_in_vnnlib():
    text = BallProperty(np.array([[0.0, 0.5]]), 1, 0.1, 3).text()
    assert "(declare-const X_1 Real)" in text and "(declare-const Y_2 Real)" in text
    assert "(assert (>= X_0 0.0))" in text and "(assert (<= X_0 0.1))" in text  # clipped to the domain [0, 1]
    assert "(assert (>= X_1 0.4))" in text and "(assert (<= X_1 0.6))" in text
    assert "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_1))))" in text


def test_a_written_property_reads_back_as_its_box_and_label(tmp_path):
    """What we write, we read: the box to the last digit, the robustness form as its label, and a gzipped copy too."""
    import gzip

    lo, hi = np.array([-0.25, 0.0, 0.5]), np.array([0.25, 1e-3, 0.5])
    text = BoxProperty(lo, hi, 2, 4).text()
    prop = parse_vnnlib(text)
    assert np.array_equal(prop.lower, lo) and np.array_equal(prop.upper, hi) and prop.num_outputs == 4
    assert prop.label() == 2 and len(prop.violation) == 3
    assert prop.violated_by(np.array([[0, 0, 1, 0], [0, 1.5, 1, 0], [1, 0, 1, 0]])).tolist() == [False, True, True]
    (tmp_path / "p.vnnlib.gz").write_bytes(gzip.compress(text.encode()))
    again = read_vnnlib(tmp_path / "p.vnnlib.gz")
    assert np.array_equal(again.lower, lo) and again.label() == 2


VNNCOMP_STYLE = """; mnistfc-style: comments, and-blocks of input bounds, strict and reversed comparisons, linear terms
(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
(assert (and (<= X_0 0.5) (>= X_0 -0.5)))
(assert (> 1.0 X_1))
(assert (>= X_1 (* 2 0.25)))
(assert (or (and (<= (- Y_0 Y_1) 0.0)) (and (<= (+ Y_0 (* -1 Y_2)) -0.1) (< Y_1 (+ Y_2 1)))))
"""


def test_every_construct_the_reader_accepts_becomes_a_box_and_linear_cases():
    prop = parse_vnnlib(VNNCOMP_STYLE)
    assert prop.lower.tolist() == [-0.5, 0.5] and prop.upper.tolist() == [0.5, 1.0]
    assert prop.label() is None  # two rows in one case: not the robustness form
    (a, b) = prop.violation
    assert a.A.tolist() == [[1.0, -1.0, 0.0]] and a.b.tolist() == [0.0]
    assert b.A.tolist() == [[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]] and b.b.tolist() == [-0.1, 1.0]
    y = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.5], [1.0, 0.0, 0.0]])
    assert prop.violated_by(y).tolist() == [True, True, False]


def test_the_robustness_form_needs_every_rival():
    base = "".join(f"(declare-const X_{i} Real)(assert (<= X_{i} 1))(assert (>= X_{i} 0))" for i in range(2))
    base += "".join(f"(declare-const Y_{j} Real)" for j in range(3))
    assert parse_vnnlib(base + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_1))))").label() == 1
    assert parse_vnnlib(base + "(assert (>= Y_0 Y_1))").label() is None  # a targeted property: one rival only
    assert parse_vnnlib(base + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_0))))").label() is None


@pytest.mark.parametrize("tail,message", [
    ("(assert (or (and (<= X_0 1) (>= X_0 0)) (and (<= X_0 3) (>= X_0 2))))(assert (>= Y_0 Y_1))", "disjunction over inputs"),
    ("(assert (<= X_0 Y_0))", "mixes inputs and outputs"),
    ("(assert (<= (* Y_0 Y_1) 0))", "multiplies two variables"),
    ("(assert (<= (exp Y_0) 0))", "operator 'exp'"),
    ("(assert (<= Y_7 0))", "never declared"),
    ("(assert (>= Y_0 Y_1))(declare-fun f () Real)", "'declare-fun' is not read"),
    ("(assert (<= X_0 -1))(assert (>= Y_0 Y_1))", "above its upper bound"),
    ("(assert (>= Y_0 Y_1)", "never closed"),
])
def test_what_the_reader_does_not_take_is_refused_in_one_line_by_name(tail, message):
    head = "(declare-const X_0 Real)(declare-const Y_0 Real)(declare-const Y_1 Real)(assert (<= X_0 1))(assert (>= X_0 0))"
    with pytest.raises(CnnRepairError, match=message) as err:
        parse_vnnlib(head + tail, "p.vnnlib")
    assert str(err.value).startswith("p.vnnlib: ") and "\n" not in str(err.value)


def test_an_input_without_both_bounds_and_a_file_of_no_outputs_are_refused():
    with pytest.raises(CnnRepairError, match="X_1 has no upper bound"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const X_1 Real)(declare-const Y_0 Real)(declare-const Y_1 Real)"
                     "(assert (<= X_0 1))(assert (>= X_0 0))(assert (>= X_1 0))(assert (>= Y_0 Y_1))")
    with pytest.raises(CnnRepairError, match="nothing about the outputs"):
        parse_vnnlib("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))")


def test_instances_csv_lists_model_property_and_timeout_relative_to_its_folder(tmp_path):
    (tmp_path / "instances.csv").write_text("onnx/m.onnx,vnnlib/p0.vnnlib,60\nonnx/m.onnx,vnnlib/p1.vnnlib,30.5\n\n")
    rows = read_instances(tmp_path / "instances.csv")
    assert rows == [(tmp_path / "onnx/m.onnx", tmp_path / "vnnlib/p0.vnnlib", 60.0), (tmp_path / "onnx/m.onnx", tmp_path / "vnnlib/p1.vnnlib", 30.5)]
    (tmp_path / "bad.csv").write_text("m.onnx,p.vnnlib\n")
    with pytest.raises(CnnRepairError, match="bad.csv:1: a line of instances.csv is model,property,timeout"):
        read_instances(tmp_path / "bad.csv")


def _interval_margin(W1, b1, W2, b2, x, eps, label) -> float:
    """A sound lower bound of logit[label] - max other logit over the box (interval arithmetic)."""
    lo, hi = np.clip(x - eps, 0, 1), np.clip(x + eps, 0, 1)
    c, r = (lo + hi) / 2, (hi - lo) / 2
    hc, hr = W1 @ c + b1, np.abs(W1) @ r
    hlo, hhi = np.maximum(hc - hr, 0), np.maximum(hc + hr, 0)
    c2, r2 = (hlo + hhi) / 2, (hhi - hlo) / 2
    best = np.inf
    for j in range(len(b2)):
        if j != label:
            d = W2[label] - W2[j]
            best = min(best, d @ c2 - np.abs(d) @ r2 + b2[label] - b2[j])
    return best


def _marabou(onnx_path, prop_path):
    from maraboupy import Marabou, MarabouCore

    net = Marabou.read_onnx(str(onnx_path))
    options = MarabouCore.Options()
    exit_code, values, _ = net.solve(verbose=False, options=options, propertyFilename=str(prop_path))
    return exit_code, values, net


def test_marabou_proves_the_ball_property_that_the_repair_made_true(tmp_path, capsys):
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    src = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 4),), str(src), dynamo=False, input_names=["x"], output_names=["y"])
    x = np.array([[0.3, 0.7, 0.2, 0.5]], np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()[0]
    label = int(np.argsort(-logits)[1])  # the model says otherwise: the property is false before repair
    np.savez(tmp_path / "p.npz", x=x, y=np.array([label]))
    assert main(["repair", str(src), "--points", str(tmp_path / "p.npz"), "--margin", "0.5", "--out", str(tmp_path / "r")]) == 0
    repaired = tmp_path / "r" / "repaired.onnx"
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(repaired)).graph.initializer}
    W1, b1, W2, b2 = inits["0.weight"], inits["0.bias"], inits["2.weight"], inits["2.bias"]
    eps = 0.05
    while _interval_margin(W1, b1, W2, b2, x[0], eps, label) <= 0:  # a ball our own bound already proves
        eps /= 2
    assert eps > 1e-4
    for name, path in (("before", src), ("after", repaired)):
        assert main(["vnnlib", str(path), "--points", str(tmp_path / "p.npz"), "--eps", str(eps), "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    code, _, _ = _marabou(repaired, tmp_path / "after" / "point_0.vnnlib")
    assert code == "unsat"  # an independent, complete verifier: every input of the ball has the label
    code, values, net = _marabou(src, tmp_path / "before" / "point_0.vnnlib")
    assert code == "sat"  # before repair Marabou finds a counterexample; check it on the model itself
    cex = np.array([values[v] for v in net.inputVars[0].reshape(-1)], np.float32)
    assert np.all(np.abs(cex - x[0]) <= eps + 1e-6)
    with torch.no_grad():
        assert model(torch.from_numpy(cex[None])).numpy()[0].argmax() != label


def test_a_violated_property_read_from_vnnlib_is_repaired_and_then_proved(tmp_path):
    """The verification workflow in the Python API: read VNN-LIB, check (PGD finds the counterexample), repair the box
    with the ball spec, check again (our bounds prove it; PGD finds nothing), and write what now holds for any verifier."""
    from cnnrepair import Points, RepairSpec, repair_classifier
    from cnnrepair.vnnlib import check_properties, property_boxes, write_boxes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.rand(8, 1, 2, 3)
    with torch.no_grad():
        pred = model(x).argmax(1).numpy()
    eps = 0.02
    want = (pred[:2] + 1) % 3  # two properties the model violates at their centres; six it satisfies there
    labels = np.concatenate([want, pred[2:]])
    for i, (xi, li) in enumerate(zip(x.numpy().reshape(8, -1), labels)):
        (tmp_path / f"p{i}.vnnlib").write_text(BoxProperty(xi - eps, xi + eps, int(li), 3).text())
    props = [read_vnnlib(tmp_path / f"p{i}.vnnlib") for i in range(8)]
    before = check_properties(model, props, (1, 2, 3))
    assert [c.status for c in before[:2]] == ["violated", "violated"]
    for c, p in zip(before[:2], props):  # the counterexample lies in the box and the model gives it another label
        assert (c.counterexample.reshape(-1) >= p.lower).all() and (c.counterexample.reshape(-1) <= p.upper).all()
        assert int(model(torch.as_tensor(c.counterexample[None])).argmax(1)) != c.label
    held = [i for i, c in enumerate(before) if c.status == "holds"]
    assert all(c.status != "violated" for c in before[2:]) and held
    lo, hi, y = property_boxes(props, (1, 2, 3), 3)  # float64, as the files say: the repair's boxes are exactly theirs
    centre = torch.as_tensor((lo + hi) / 2, dtype=torch.float32)
    bad = [0, 1]
    res = repair_classifier(model, Points(centre[bad], y[bad], boxes=(lo[bad], hi[bad])), spec=RepairSpec(kind="ball", margin=0.01),
                            keep=Points(centre[held], y[held], boxes=(lo[held], hi[held])))
    assert res.ok, res.notes
    assert res.certificate.keep.balls_certified_before == res.certificate.keep.balls_certified_after == len(held)  # boxes kept
    after = check_properties(res.model, props, (1, 2, 3))
    assert [after[i].status for i in bad + held] == ["holds"] * (2 + len(held))  # the repaired and the kept ones proved
    assert all(after[i].bound >= 0.01 - 1e-6 for i in bad)
    write_boxes(tmp_path / "repaired.onnx", lo[bad].reshape(2, -1), hi[bad].reshape(2, -1), y[bad], 3, tmp_path / "proved")
    again = [read_vnnlib(tmp_path / "proved" / f"point_{i}.vnnlib") for i in range(2)]
    assert [p.label() for p in again] == y[bad].tolist()
    assert all(np.array_equal(a.lower, props[i].lower) and np.array_equal(a.upper, props[i].upper) for a, i in zip(again, bad))
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    for net, name in ((model, "before.onnx"), (res.model, "after.onnx")):
        with warnings.catch_warnings():  # without the Flatten: the same network on flat inputs, as VNN-LIB numbers them
            warnings.simplefilter("ignore")
            torch.onnx.export(nn.Sequential(*list(net.children())[1:]).eval(), (torch.zeros(1, 6),), str(tmp_path / name), dynamo=False,
                              input_names=["x"], output_names=["y"])
    for i in bad:  # an independent complete verifier on the very property files: false before, proved after
        assert _marabou(tmp_path / "before.onnx", tmp_path / f"p{i}.vnnlib")[0] == "sat"
        assert _marabou(tmp_path / "after.onnx", tmp_path / f"p{i}.vnnlib")[0] == "unsat"


def test_checking_refuses_a_property_the_model_cannot_take_in_one_line():
    from cnnrepair.vnnlib import check_properties

    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    prop = parse_vnnlib(BoxProperty(np.zeros(4), np.ones(4), 1, 3).text(), "small.vnnlib")
    with pytest.raises(CnnRepairError, match="small.vnnlib: declares 4 inputs but the model takes 6"):
        check_properties(model, [prop], (1, 2, 3))
    two_rows = parse_vnnlib(VNNCOMP_STYLE.replace("X_1 Real)", "X_1 Real)" + "".join(f"(declare-const X_{i} Real)(assert (<= X_{i} 1))"
                                                                                      f"(assert (>= X_{i} 0))" for i in range(2, 6))), "lin.vnnlib")
    with pytest.raises(CnnRepairError, match="lin.vnnlib: its output constraint is not the robustness form"):
        check_properties(model, [two_rows], (1, 2, 3))
