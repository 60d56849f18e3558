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


_GENERAL = "".join(f"(declare-const X_{i} Real)" for i in range(6)) + "".join(f"(declare-const Y_{j} Real)" for j in range(3)) + \
    "".join(f"(assert (>= X_{i} 0.1))(assert (<= X_{i} 0.3))" for i in range(6)) + "(assert (or (<= Y_0 0.2) (>= (+ Y_1 Y_2) 0.5)))"
"""A general linear output constraint over 6 inputs and 3 outputs: it holds when Y_0 > 0.2 and Y_1 + Y_2 < 0.5."""

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
    assert parse_vnnlib(base + "(assert (>= Y_0 Y_1))").robustness() == (1, (0,))  # ... robustness against that one
    assert parse_vnnlib(base + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_1))))").robustness() == (1, (0, 2))
    assert parse_vnnlib(base + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_0))))").label() is None
    assert parse_vnnlib(base + "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_0))))").robustness() is None  # two labels


def test_a_targeted_property_is_violated_only_when_its_own_classes_win():
    from cnnrepair.vnnlib import check_properties

    model = nn.Linear(2, 3).eval()  # Y_0 = x_0, Y_1 = x_1, Y_2 = -10: class 2 never wins
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    box = "".join(f"(declare-const X_{i} Real)(assert (<= X_{i} 1))(assert (>= X_{i} 0))" for i in range(2))
    box += "".join(f"(declare-const Y_{j} Real)" for j in range(3))
    targeted = parse_vnnlib(box + "(assert (>= Y_2 Y_0))", "t.vnnlib")  # label 0 against class 2 only: it holds
    untargeted = parse_vnnlib(box + "(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))", "u.vnnlib")  # class 1 wins at (0, 1)
    t, u = check_properties(model, [targeted, untargeted], (2,))
    assert u.status == "violated" and u.rivals is None
    assert t.status == "holds" and t.rivals == (2,) and t.label == 0  # PGD's class-1 winners are no counterexample to it,
    assert t.bound >= 10 - 1e-6 and u.bound < 0  # and its own bound (Y_0 - Y_2 = x_0 + 10) proves it


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
    with pytest.raises(CnnRepairError, match="lin.vnnlib: case 2 of its violation is a conjunction of 2 output comparisons"):
        check_properties(model, [two_rows], (1, 2, 3))
    relu = nn.Sequential(nn.Flatten(), nn.Linear(6, 3), nn.ReLU()).eval()
    general = parse_vnnlib(_GENERAL.replace("Y_0 0.2", "Y_0 0.2"), "general.vnnlib")
    with pytest.raises(CnnRepairError, match="general.vnnlib: a relu ends the model"):
        check_properties(relu, [general], (1, 2, 3))


# cnnrepair repair MODEL --vnnlib / --instances: the verification workflow from the command line -------------------------

import json  # noqa: E402


def _eran_style(tmp_path, seed: int = 0, final_relu: bool = True):
    """A tiny ONNX network as ERAN writes them (Gemm, Relu, Gemm, then a final Relu unless ``final_relu`` is False), and
    eight box properties around points: two the model violates at their centres, six that hold there."""
    from onnx import TensorProto, helper, numpy_helper
    import onnx

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    with torch.no_grad():
        net[2].bias += 1.0  # logits mostly above 0, as a trained ERAN net's winning logit is
    W1, b1, W2, b2 = (t.detach().numpy() for t in (net[0].weight, net[0].bias, net[2].weight, net[2].bias))
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h0"], name="fc1", transB=1), helper.make_node("Relu", ["h0"], ["h1"]),
             helper.make_node("Gemm", ["h1", "W2", "b2"], ["z"], name="fc2", transB=1),
             helper.make_node("Relu" if final_relu else "Identity", ["z"], ["y"])]
    inits = [numpy_helper.from_array(a, n) for a, n in ((W1, "W1"), (b1, "b1"), (W2, "W2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "eran", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "eran.onnx"))
    x = np.random.default_rng(seed).random((8, 5))
    with torch.no_grad():
        pred = net(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy()
    labels = np.concatenate([(pred[:2] + 1) % 3, pred[2:]])
    paths = []
    for i, (xi, li) in enumerate(zip(x, labels)):
        path = tmp_path / f"prop_{i}.vnnlib"
        path.write_text(BoxProperty(xi - 0.01, xi + 0.01, int(li), 3).text())
        paths.append(path)
    return tmp_path / "eran.onnx", paths, net


def test_repair_from_vnnlib_fixes_the_violated_properties_keeps_the_others_and_verify_recomputes_them(tmp_path, capsys):
    model, props, _ = _eran_style(tmp_path)
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--out", str(out), "--margin", "0.02"]) == 0
    said = capsys.readouterr().err
    assert "8 properties on eran.onnx: 2 violated" in said
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "repaired" and cert["ending"]["name"] == "relu" and cert["ball"]["boxes"] == "points file"
    assert [p["file"] for p in cert["properties"] if p["set"] == "points"] == ["prop_0.vnnlib", "prop_1.vnnlib"]
    report = json.loads((out / "properties.json").read_text())["properties"]
    assert [r["before"] for r in report[:2]] == ["violated", "violated"]
    assert all(r["after"] == "holds" for r in report if r["role"] == "repaired")
    assert all(r["after"] == "holds" for r in report if r["before"] == "holds")  # what held is proved still
    data = np.load(out / "points.npz")
    for k in range(2):  # the repair's boxes are the files' boxes, to the last digit
        prop = read_vnnlib(props[k])
        assert np.array_equal(data["lower"][k].reshape(-1), prop.lower) and np.array_equal(data["upper"][k].reshape(-1), prop.upper)
    rows = (out / "instances.csv").read_text().splitlines()
    assert len(rows) == sum(r["after"] == "holds" for r in report) and rows[0].startswith("repaired.onnx,proved_0_prop_0.vnnlib,")
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(out / "points.npz"),
            "--keep", str(out / "keep.npz"), "--original", str(model)]
    assert main([*args, "--vnnlib", *map(str, props)]) == 0
    capsys.readouterr()
    assert main(args) == 0 and "VNN-LIB files' boxes and labels (needs --vnnlib)" in capsys.readouterr().err
    # a property file edited after the repair (another box): verify names it
    props[0].write_text(props[0].read_text().replace("(assert (<= X_0", "(assert (<= X_0 1.0)) ; was: (<= X_0", 1))
    assert main([*args, "--vnnlib", *map(str, props)]) == 1
    assert "prop_0.vnnlib" in capsys.readouterr().err


def test_drop_conflicts_drops_the_most_violated_of_a_conflicting_set_and_repairs_the_rest(tmp_path, capsys):
    model, props, _ = _eran_style(tmp_path)
    prop = read_vnnlib(props[0])
    twin = tmp_path / "prop_twin.vnnlib"  # the same box as property 0, another label: no change gives both
    twin.write_text(BoxProperty(prop.lower, prop.upper, (prop.label() + 1) % 3, 3).text())
    files = [*map(str, props), str(twin)]
    stuck = tmp_path / "stuck"
    assert main(["repair", str(model), "--vnnlib", *files, "--out", str(stuck), "--margin", "0.02"]) == 1
    assert json.loads((stuck / "certificate.json").read_text())["status"] == "infeasible"
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *files, "--out", str(out), "--margin", "0.02", "--drop-conflicts"]) == 0
    assert "1 dropped (they conflicted)" in capsys.readouterr().err
    report = {r["file"]: r for r in json.loads((out / "properties.json").read_text())["properties"]}
    dropped = [f for f, r in report.items() if r["role"] == "dropped"]
    assert len(dropped) == 1 and dropped[0] in ("prop_0.vnnlib", "prop_twin.vnnlib")
    other = "prop_twin.vnnlib" if dropped[0] == "prop_0.vnnlib" else "prop_0.vnnlib"
    assert report[dropped[0]]["bound_before"] <= report[other]["bound_before"]  # the more violated one went
    assert all(r["after"] == "holds" for r in report.values() if r["role"] == "repaired")
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "repaired" and dropped[0] in cert["notes"][-1] and len(cert["points"]) == 2
    assert dropped[0] not in {p["file"] for p in cert["properties"]}  # the certificate names what it covers
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(out / "points.npz"),
                 "--keep", str(out / "keep.npz"), "--original", str(model), "--vnnlib", *files]) == 0
    x = tmp_path / "p.npz"
    np.savez(x, x=np.zeros((1, 5), np.float32), y=[0])
    assert main(["repair", str(model), "--points", str(x), "--out", str(tmp_path / "o"), "--drop-conflicts"]) == 2


def test_a_targeted_property_is_repaired_against_its_own_class_at_no_more_cost_and_verified(tmp_path, capsys):
    model, props, net = _eran_style(tmp_path)
    prop = read_vnnlib(props[0])
    with torch.no_grad():
        winner = int(net(torch.as_tensor((prop.lower + prop.upper) / 2, dtype=torch.float32)[None]).argmax())
    label = prop.label()
    full = tmp_path / "full"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--out", str(full), "--margin", "0.02"]) == 0
    text = props[0].read_text()
    targeted = text[:text.index("(assert (or")] + f"(assert (>= Y_{winner} Y_{label}))\n"  # oval21's form: one target class
    props[0].write_text(targeted)
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--out", str(out), "--margin", "0.02"]) == 0
    report = json.loads((out / "properties.json").read_text())["properties"]
    assert report[0]["before"] == "violated" and report[0]["rivals"] == [winner] and "its own classes" in report[0]["form"]
    assert report[0]["after"] == "holds" and "rivals" not in report[1]
    with np.load(out / "points.npz") as pts:  # its rows: the label against the target, and (a ReLU ends the model) nothing more
        live = np.isfinite(pts["rows_offset"][0])
        assert live.sum() == 1 and np.array_equal(pts["rows_coef"][0][live][0], np.eye(3)[label] - np.eye(3)[winner])
    cert, cert_full = (json.loads((d / "certificate.json").read_text()) for d in (out, full))
    assert cert["output_rows"]["repair_points"]["pairwise"] and cert_full.get("output_rows") is None
    assert cert["objective"] <= cert_full["objective"] * (1 + 1e-6)  # a weaker property never costs more
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(out / "points.npz"),
            "--keep", str(out / "keep.npz"), "--original", str(model), "--vnnlib", *map(str, props)]
    assert main(args) == 0
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    code, _, _ = _marabou(out / "repaired.onnx", props[0])  # an independent complete verifier proves it on the saved file
    assert code == "unsat"


def test_general_linear_output_constraints_are_repaired_kept_verified_and_proved_by_marabou(tmp_path, capsys):
    model, props, net = _eran_style(tmp_path, seed=2, final_relu=False)
    with torch.no_grad():
        centre = [net(torch.as_tensor((read_vnnlib(p).lower + read_vnnlib(p).upper) / 2, dtype=torch.float32)[None])[0].numpy()
                  for p in props[:3]]
    head = props[0].read_text()
    for i, shift in ((0, 0.3), (2, -2.0)):  # property 0 is violated (Y_0 must rise by 0.3), property 2 holds with room
        text = props[i].read_text()
        y = centre[i]
        props[i].write_text(text[:text.index("(assert (or")] + f"(assert (or (<= Y_0 {y[0] + shift:.6f}) (>= (+ Y_1 Y_2) {y[1] + y[2] + 1.0:.6f})))\n")
    assert head != props[0].read_text()
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--out", str(out), "--margin", "0.02"]) == 0
    report = json.loads((out / "properties.json").read_text())["properties"]
    assert report[0]["before"] == "violated" and report[0]["label"] is None and "linear output" in report[0]["form"]
    assert report[2]["before"] == "holds" and report[2]["role"] == "kept" and report[2]["after"] == "holds"
    assert report[0]["after"] == "holds"
    cert = json.loads((out / "certificate.json").read_text())
    rows = cert["output_rows"]
    assert rows["repair_points"]["pairwise"] is False and rows["keep_points"]["pairwise"] is False and cert["gap"] <= 1e-6
    props_set = {e["file"]: e["set"] for e in cert["properties"]}
    assert props_set["prop_0.vnnlib"] == "points" and props_set["prop_2.vnnlib"] == "keep"
    with np.load(out / "keep.npz") as keep:  # the held general property keeps its own rows, the labelled ones their labels' rows
        assert np.isfinite(keep["rows_offset"]).sum(1)[0] == 2 and len(keep["rows_offset"]) == sum(r["role"] == "kept" for r in report)
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(out / "points.npz"),
            "--keep", str(out / "keep.npz"), "--original", str(model), "--vnnlib", *map(str, props)]
    assert main(args) == 0
    pts = dict(np.load(out / "points.npz"))
    pts["rows_offset"] = pts["rows_offset"] - 0.5  # weaker rows than the property's: verify --vnnlib names the mismatch
    np.savez(tmp_path / "weaker.npz", **pts)
    from cnnrepair.vnnlib.repair import check_property_files
    from cnnrepair.modelrepair import load_points
    from cnnrepair.repair.certificate import Certificate

    problems, _ = check_property_files(Certificate.read(out / "certificate.json"), props, load_points(tmp_path / "weaker.npz", "points"),
                                       load_points(out / "keep.npz", "keep", labels_required=False))
    assert problems and "output rows are not the points file's rows" in problems[0]
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    code, _, _ = _marabou(out / "repaired.onnx", props[0])  # an independent complete verifier proves it on the saved file
    assert code == "unsat"
    code, _, _ = _marabou(model, props[0])  # and finds it violated before
    assert code == "sat"


def test_repair_from_instances_csv_takes_the_models_lines_and_marabou_proves_what_it_wrote(tmp_path, capsys):
    model, props, net = _eran_style(tmp_path, seed=1)
    (tmp_path / "instances.csv").write_text("".join(f"eran.onnx,{p.name},30\n" for p in props) + "other.onnx,prop_0.vnnlib,30\n")
    out = tmp_path / "out"
    assert main(["repair", str(model), "--instances", str(tmp_path / "instances.csv"), "--out", str(out), "--margin", "0.02"]) == 0
    capsys.readouterr()
    rows = [r.split(",") for r in (out / "instances.csv").read_text().splitlines()]
    assert rows and all(r[0] == "repaired.onnx" and r[2] == "30" for r in rows)
    pytest.importorskip("maraboupy", reason="maraboupy 2.0.0 has wheels for CPython 3.11 only (the test extra installs it there)")
    repaired_violated = [r[1] for r in rows if r[1].split("_", 2)[1] in ("0", "1")]
    assert len(repaired_violated) == 2
    for name in repaired_violated:  # an independent complete verifier proves each repaired property on the saved file
        code, _, _ = _marabou(out / "repaired.onnx", out / name)
        assert code == "unsat"
    code, values, mnet = _marabou(model, props[0])  # and finds the violation before the repair, which the model confirms
    assert code == "sat"
    cex = np.array([values[v] for v in mnet.inputVars[0].reshape(-1)], np.float32)
    with torch.no_grad():
        out0 = torch.relu(net(torch.from_numpy(cex[None])))[0].numpy()
    label = read_vnnlib(props[0]).label()
    assert out0[label] <= np.delete(out0, label).max() + 1e-6


@pytest.mark.parametrize("extra,message", [
    (["--points", "p.npz"], "not both"),
    (["--spec", "pointwise"], "drop --spec pointwise"),
    (["--eps", "0.1"], "--eps does not apply"),
    (["--keep-eps", "0.1"], "--keep-eps does not apply"),
])
def test_property_repair_refuses_options_that_do_not_apply_in_one_line(tmp_path, capsys, extra, message):
    model, props, _ = _eran_style(tmp_path)
    rc = main(["repair", str(model), "--vnnlib", str(props[0]), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0] and not (tmp_path / "o").exists()


def test_a_model_the_instances_do_not_name_is_refused(tmp_path, capsys):
    model, props, _ = _eran_style(tmp_path)
    (tmp_path / "instances.csv").write_text(f"other.onnx,{props[0].name},30\n")
    rc = main(["repair", str(model), "--instances", str(tmp_path / "instances.csv"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "no instance names the model eran.onnx (it lists other.onnx)" in capsys.readouterr().err


def test_a_points_file_with_boxes_is_repaired_over_them_and_bad_boxes_are_refused(tmp_path, capsys):
    model, props, _ = _eran_style(tmp_path)
    boxes = [read_vnnlib(p) for p in props[:2]]
    lower, upper = np.stack([b.lower for b in boxes]), np.stack([b.upper for b in boxes])
    x = ((lower + upper) / 2).astype(np.float32)
    y = np.array([b.label() for b in boxes], np.int64)
    np.savez(tmp_path / "p.npz", x=x, y=y, lower=lower, upper=upper)
    out = tmp_path / "o"
    assert main(["repair", str(model), "--points", str(tmp_path / "p.npz"), "--spec", "ball", "--margin", "0.02", "--out", str(out)]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["ball"]["boxes"] == "points file" and cert["ball"]["domain"] is None
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(tmp_path / "p.npz"),
                 "--original", str(model)]) == 0
    capsys.readouterr()
    for arrays, extra, message in [
        (dict(x=x, y=y, lower=lower, upper=upper), [], "they are the ball spec's; add --spec ball"),
        (dict(x=x, y=y, lower=lower, upper=upper), ["--spec", "ball", "--eps", "0.1"], "drop --eps"),
        (dict(x=x, y=y, lower=upper, upper=lower), ["--spec", "ball"], "lower <= upper"),
        (dict(x=x + 1, y=y, lower=lower, upper=upper), ["--spec", "ball"], "outside its own box"),
        (dict(x=x, y=y, lower=lower), ["--spec", "ball"], "need both 'lower' and 'upper'"),
        (dict(x=x, y=y), ["--spec", "ball"], "needs --eps"),
    ]:
        np.savez(tmp_path / "bad.npz", **arrays)
        rc = main(["repair", str(model), "--points", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (message, err)
        assert not (tmp_path / "bad").exists()


def test_keep_points_given_beside_properties_keep_their_labels_after_the_kept_properties(tmp_path, capsys):
    model, props, net = _eran_style(tmp_path)
    x = np.random.default_rng(5).random((30, 5)).astype(np.float32)
    np.savez(tmp_path / "k.npz", x=x)
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *map(str, props), "--keep", str(tmp_path / "k.npz"), "--out", str(out),
                 "--margin", "0.02"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    held = [p for p in cert["properties"] if p["set"] == "keep"]
    assert cert["keep"]["count"] == len(held) + 30 and [p["index"] for p in held] == list(range(len(held)))
    keep = np.load(out / "keep.npz")
    assert np.array_equal(keep["x"][len(held):], x) and np.array_equal(keep["lower"][len(held):], x.astype(np.float64))
    with torch.no_grad():
        pred = torch.relu(net(torch.from_numpy(x))).argmax(1).numpy()
    assert np.array_equal(keep["y"][len(held):], pred)  # the model's own labels, kept
    import onnxruntime as ort

    after = ort.InferenceSession(str(out / "repaired.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.all(margins_of_after(after, pred) >= 0)
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(out / "points.npz"),
                 "--keep", str(out / "keep.npz"), "--original", str(model), "--vnnlib", *map(str, props)]) == 0


def test_keep_points_beside_properties_none_of_which_holds_are_kept(tmp_path, capsys):
    model, props, net = _eran_style(tmp_path)
    x = np.random.default_rng(6).random((12, 5)).astype(np.float32)
    np.savez(tmp_path / "k.npz", x=x)
    out = tmp_path / "out"
    assert main(["repair", str(model), "--vnnlib", *map(str, props[:2]), "--keep", str(tmp_path / "k.npz"), "--out", str(out),
                 "--margin", "0.02"]) == 0  # the two violated properties only: every keep point is the user's
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["keep"]["count"] == 12 and all(p["set"] == "points" for p in cert["properties"])


def margins_of_after(out: np.ndarray, y: np.ndarray) -> np.ndarray:
    own = out[np.arange(len(y)), y]
    rival = out.copy()
    rival[np.arange(len(y)), y] = -np.inf
    return own - rival.max(1)


def test_a_property_check_takes_the_larger_of_its_two_sound_bounds(tmp_path):
    from cnnrepair.bounds import feature_bounds
    from cnnrepair.certify import certify_boxes, worst_margins
    from cnnrepair.repair import last_layer
    from cnnrepair.vnnlib import check_properties, property_boxes

    _, props, net = _eran_style(tmp_path)
    model = nn.Sequential(*net, nn.ReLU()).eval()
    parsed = [read_vnnlib(p) for p in props]
    checks = check_properties(model, parsed, (5,))
    lo, hi, y = property_boxes(parsed, (5,), 3)
    lay = last_layer(model, torch.as_tensor(lo[:2], dtype=torch.float32))
    crown = certify_boxes(model, lo, hi, y).margins
    box = worst_margins(feature_bounds(model, lay.name, torch.as_tensor(lo), torch.as_tensor(hi)), y, lay.weight, lay.bias, True)
    assert np.allclose([c.bound for c in checks], np.maximum(crown, box))
    assert all((c.status == "holds") == (c.bound > 0) for c in checks if c.status != "violated")
