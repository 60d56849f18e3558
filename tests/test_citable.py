"""Numbers a researcher can cite (issue 28): drawdown on images the repair never saw, layouts never
guessed, a word when accuracy is near chance, VNN-LIB balls in the model's units, conflicts named,
shortfalls said, and robustness after repair reported."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from cnnrepair import CnnRepairError
from cnnrepair.cli import main
from cnnrepair.points import InputSpec


@pytest.fixture(scope="module")
def digits_model(digits_run):
    """The digits run's NN as a .pt2 file (a user's model)."""
    assert main(["--quiet", "export", "--out", str(digits_run)]) == 0
    return digits_run / "export" / "nn.pt2"


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# -- 1. points, keep points, held-out points and evaluation images are disjoint ------------------------
@pytest.mark.parametrize("keep_split", ["train", "test"])
def test_evaluate_never_measures_drawdown_on_images_a_point_set_came_from(digits_model, tmp_path, capsys, keep_split):
    pts = tmp_path / "pts"
    assert main(["points", str(digits_model), "--dataset", "digits", "--kind", "fgsm", "--eps", "0.1", "--n", "10",
                 "--held-out", "10", "--keep", "60", "--keep-split", keep_split, "--out", str(pts)]) == 0
    keep = np.load(pts / "keep.npz")
    assert str(keep["split"]) == keep_split and str(np.load(pts / "points.npz")["split"]) == "test"
    assert main(["repair", str(digits_model), "--points", str(pts / "points.npz"), "--keep", str(pts / "keep.npz"),
                 "--out", str(tmp_path / "fixed")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(digits_model), "--repaired", str(tmp_path / "fixed" / "repaired.pt2"), "--dataset", "digits",
                 "--eps", "0.05", "--n", "100000", "--points", str(pts / "points.npz"), "--keep", str(pts / "keep.npz"),
                 "--held-out", str(pts / "held_out.npz"), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    used = report["images_used"]
    assert used["overlap"] == {"points": 0, "keep": 0, "held_out": 0}
    taken = set(used["indices"])
    for name in ("points", "held_out") + (("keep",) if keep_split == "test" else ()):
        idx = set(np.load(pts / f"{name}.npz")["index"].tolist())
        assert idx and not (idx & taken) and used["excluded"][name] >= len(idx)
    from cnnrepair.data import load_digits

    assert used["count"] == len(load_digits().y_test) - len(set().union(
        *[set(np.load(pts / f"{n}.npz")["index"].tolist()) for n in ("points", "held_out", "keep")
          if n != "keep" or keep_split == "test"]))
    assert "no point set was made from" in capsys.readouterr().err


def test_a_points_file_without_indices_is_avoided_by_content(digits_model, tmp_path):
    from cnnrepair.assess import PointSet, source_indices
    from cnnrepair.data import load_digits, to_float

    ds = load_digits()
    spec = InputSpec(shape=(1, 8, 8))
    x = spec.to_model(to_float(ds.x_test[[3, 17, 40]])).numpy().astype(np.float32)
    assert source_indices(ds.x_test, spec, PointSet(x, ds.y_test[[3, 17, 40]]), "test").tolist() == [3, 17, 40]


# -- 2. NHWC inputs are laid out, never reshaped; an ambiguous flat input is refused --------------------
class _ChannelsLast(nn.Module):
    """The same network taking N x H x W x C."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.permute(0, 3, 1, 2))


def _rgb_task(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4)).eval()
    images = np.random.default_rng(0).integers(0, 256, (300, 3, 4, 4), dtype=np.uint8)
    with torch.no_grad():
        labels = net(torch.from_numpy(images).float() / 255).argmax(1).numpy()  # the NCHW net is right on every image
    np.savez(tmp_path / "rgb.npz", x=images, y=labels)
    return net


def _export_as(module: nn.Module, shape: tuple, path):
    program = torch.export.export(module.eval(), (torch.zeros(2, *shape),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(path))


def test_an_nhwc_model_gets_its_images_in_its_layout(tmp_path, capsys):
    net = _rgb_task(tmp_path)
    _export_as(_ChannelsLast(net), (4, 4, 3), tmp_path / "nhwc.pt2")
    assert main(["points", str(tmp_path / "nhwc.pt2"), "--npz", str(tmp_path / "rgb.npz"), "--kind", "fgsm", "--eps", "0.2",
                 "--n", "5", "--keep", "20", "--out", str(tmp_path / "p")]) == 0
    info = json.loads((tmp_path / "p" / "points.json").read_text())
    assert info["clean_accuracy"] == 1.0 and info["input"]["layout"] == "nhwc"
    assert np.load(tmp_path / "p" / "points.npz")["x"].shape[1:] == (4, 4, 3)


def test_a_flat_multichannel_input_needs_its_layout_given(tmp_path, capsys):
    net = _rgb_task(tmp_path)

    class Flat(nn.Module):  # takes N x 48, pixels with their channels together (NHWC order)
        def forward(self, x):
            return net(x.reshape(-1, 4, 4, 3).permute(0, 3, 1, 2))

    _export_as(Flat(), (48,), tmp_path / "flat.pt2")
    assert main(["points", str(tmp_path / "flat.pt2"), "--npz", str(tmp_path / "rgb.npz"), "--out", str(tmp_path / "p")]) == 2
    err = _err_lines(capsys)
    assert len(err) == 1 and "--layout nchw" in err[0] and "--layout nhwc" in err[0]
    assert main(["points", str(tmp_path / "flat.pt2"), "--npz", str(tmp_path / "rgb.npz"), "--layout", "nhwc", "--kind", "fgsm",
                 "--eps", "0.2", "--n", "3", "--keep", "5", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "points.json").read_text())["clean_accuracy"] == 1.0
    with pytest.raises(CnnRepairError, match="pixel order"):
        InputSpec(shape=(48,)).check((3, 4, 4))


# -- 3. a clean accuracy near chance is said --------------------------------------------------------------
def test_a_clean_accuracy_near_chance_is_warned(digits_model, tmp_path, capsys):
    assert main(["points", str(digits_model), "--dataset", "digits", "--std", "100", "--n", "5", "--keep", "5",
                 "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert "warning: clean accuracy" in err and "near chance" in err and "--mean/--std" in err
    info = json.loads((tmp_path / "p" / "points.json").read_text())
    assert info["clean_accuracy"] < 0.3 and any("near chance" in w for w in info["warnings"])
    assert main(["points", str(digits_model), "--dataset", "digits", "--n", "5", "--keep", "5", "--out", str(tmp_path / "q")]) == 0
    assert "near chance" not in capsys.readouterr().err


# -- 4. VNN-LIB balls in the model's input units, per channel ----------------------------------------------
def _boxes(path) -> tuple[np.ndarray, np.ndarray]:
    text = path.read_text()
    lo = {int(i): float(v) for i, v in re.findall(r"\(assert \(>= X_(\d+) (\S+)\)\)", text)}
    hi = {int(i): float(v) for i, v in re.findall(r"\(assert \(<= X_(\d+) (\S+)\)\)", text)}
    return np.array([lo[i] for i in sorted(lo)]), np.array([hi[i] for i in sorted(hi)])


def test_vnnlib_takes_the_ball_in_pixels_through_the_models_normalisation(tmp_path, capsys):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    pixels = np.random.default_rng(1).uniform(0.2, 0.8, (2, 3, 2, 2))
    x = ((pixels - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))).astype(np.float32)
    np.savez(tmp_path / "p.npz", x=x, y=np.array([0, 1], np.int64))
    torch.manual_seed(0)
    _export_as(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2), tmp_path / "m.pt2")
    assert main(["vnnlib", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--eps", "0.01", "--mean",
                 ",".join(map(str, mean)), "--std", ",".join(map(str, std)), "--out", str(tmp_path / "v")]) == 0
    lo, hi = _boxes(tmp_path / "v" / "point_0.vnnlib")
    assert np.all(lo <= x[0].reshape(-1)) and np.all(x[0].reshape(-1) <= hi)
    width = np.repeat(0.02 / np.asarray(std), 4)
    assert np.allclose(hi - lo, width, rtol=1e-6)
    capsys.readouterr()
    assert main(["vnnlib", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--eps", "0.01",
                 "--out", str(tmp_path / "w")]) == 2  # normalised points outside [0, 1]: the convention is missing
    assert "--mean/--std" in _err_lines(capsys)[0] and not (tmp_path / "w").exists()


# -- 5. identical features are a conflict named before solving ------------------------------------------
def _dead_net(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.ones(6, 4))
        net[1].bias.fill_(-10.0)  # every input with pixel sum < 10 leaves the hidden layer all zero
    _export_as(net, (1, 2, 2), tmp_path / "dead.pt2")
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 2, 2)).astype(np.float32)
    np.savez(tmp_path / "dead.npz", x=x, y=np.array([0, 1, 2, 1], np.int64))


@pytest.mark.parametrize("spec", ["pointwise", "ball"])
def test_points_with_identical_features_are_named_as_conflicting(tmp_path, capsys, spec):
    _dead_net(tmp_path)
    extra = ["--spec", "ball", "--eps", "0.001", "--bounds", "ibp"] if spec == "ball" else []
    assert main(["repair", str(tmp_path / "dead.pt2"), "--points", str(tmp_path / "dead.npz"), "--out", str(tmp_path / "o"),
                 *extra]) == 1
    err = capsys.readouterr().err
    assert "these points conflict" in err and "solver stopped" not in err
    cert = json.loads((tmp_path / "o" / "certificate.json").read_text())
    assert cert["status"] == "infeasible" and len(cert["conflicts"]) == 2 and cert["coinciding"]


def test_an_infeasible_program_without_an_isolated_set_says_so(tmp_path, capsys, monkeypatch):
    import cnnrepair.repair.api as api
    from cnnrepair.repair.program import MarginSolution

    torch.manual_seed(0)
    _export_as(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), (1, 2, 2), tmp_path / "m.pt2")
    np.savez(tmp_path / "p.npz", x=np.random.default_rng(0).uniform(0, 1, (3, 1, 2, 2)).astype(np.float32),
             y=np.array([0, 1, 2], np.int64))

    def nothing_isolated(problem, time_limit=None):
        w = np.zeros_like(problem.weight)
        return MarginSolution("infeasible", w, np.zeros_like(problem.bias), float("nan"), float("nan"), 0.0,
                              size={"conflicts_irreducible": True}, conflicts=np.zeros(0, np.int64))

    monkeypatch.setattr(api, "solve_ball", nothing_isolated)
    assert main(["repair", str(tmp_path / "m.pt2"), "--points", str(tmp_path / "p.npz"), "--spec", "ball", "--eps", "0.01",
                 "--bounds", "ibp", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "no smaller conflicting set was isolated" in err and "conflict: ." not in err
    cert = json.loads((tmp_path / "o" / "certificate.json").read_text())
    assert cert["conflicts"] == [] and cert["solver"]["conflicts_irreducible"] is False


# -- 6. fewer points than asked are said ------------------------------------------------------------------
def test_points_says_when_it_found_fewer_than_asked(digits_model, tmp_path, capsys):
    assert main(["points", str(digits_model), "--dataset", "digits", "--n", "3", "--held-out", "5000", "--keep", "10",
                 "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    info = json.loads((tmp_path / "p" / "points.json").read_text())
    assert info["held_out"] < 5000 and f"found {info['held_out']}" in err and "asked for 5000 held-out points" in err


# -- 7. robustness after repair is reported; adversarial keep points hold it --------------------------------
def test_evaluate_reports_robustness_after_repair_and_adversarial_keep_points_are_offered(digits_model, tmp_path, capsys):
    pts = tmp_path / "pts"
    assert main(["points", str(digits_model), "--dataset", "digits", "--n", "10", "--keep", "40", "--keep-kind", "fgsm",
                 "--keep-eps", "0.05", "--out", str(pts)]) == 0
    keep = np.load(pts / "keep.npz")
    from cnnrepair.data import load_digits, to_float
    from cnnrepair.formats import load_model

    model = load_model(digits_model).module
    with torch.no_grad():
        assert (model(torch.from_numpy(keep["x"])).argmax(1).numpy() == keep["y"]).all()  # still right under attack
    clean = to_float(load_digits().x_train[keep["index"]]).numpy()
    assert np.abs(keep["x"] - clean).max() > 0.01  # attacked, not the clean images
    assert np.abs(keep["x"] - clean).max() <= 0.05 + 1e-6
    assert main(["repair", str(digits_model), "--points", str(pts / "points.npz"), "--keep", str(pts / "keep.npz"),
                 "--out", str(tmp_path / "fixed")]) == 0
    assert main(["evaluate", str(digits_model), "--repaired", str(tmp_path / "fixed" / "repaired.pt2"), "--dataset", "digits",
                 "--eps", "0.05,0.1", "--n", "200", "--points", str(pts / "points.npz"), "--keep", str(pts / "keep.npz"),
                 "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    change = report["models"]["repaired"]["robustness_change"]
    assert set(change) == {"0.05", "0.1"}
    base, rep = report["models"]["original"]["attack"], report["models"]["repaired"]["attack"]
    assert all(abs(change[e] - 100 * (rep[e] - base[e])) < 1e-9 for e in change)
    with pytest.raises(CnnRepairError, match="--keep-eps"):
        from cnnrepair.points import PointsSettings

        PointsSettings(keep_kind="fgsm").check()


def test_an_nhwc_onnx_model_is_repaired_end_to_end_pointwise_and_over_balls(tmp_path, capsys):
    """marabou-cifar10's convention: an ONNX graph taking N x H x W x C (a Transpose first). Points in its layout, a
    pointwise and a ball repair from the file (the bounds go through the Transpose), each verified against the original."""
    import warnings

    net = _rgb_task(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ChannelsLast(net).eval(), (torch.zeros(1, 4, 4, 3),), str(tmp_path / "nhwc.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    assert main(["points", str(tmp_path / "nhwc.onnx"), "--npz", str(tmp_path / "rgb.npz"), "--kind", "fgsm", "--eps", "0.2",
                 "--n", "4", "--keep", "30", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "points.json").read_text())["input"]["layout"] == "nhwc"
    pts, keep = tmp_path / "p" / "points.npz", tmp_path / "p" / "keep.npz"
    for name, extra in (("pointwise", []), ("ball", ["--spec", "ball", "--eps", "0.002"])):
        out = tmp_path / name
        assert main(["repair", str(tmp_path / "nhwc.onnx"), "--points", str(pts), "--keep", str(keep), "--out", str(out),
                     "--margin", "0.05", *extra]) == 0, name
        cert = json.loads((out / "certificate.json").read_text())
        assert cert["status"] == "repaired"
        if name == "ball":
            assert min(p["certified_margin_after"] for p in cert["points"]) >= 0.05
        assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(pts),
                     "--keep", str(keep), "--original", str(tmp_path / "nhwc.onnx")]) == 0, name


def test_a_ball_on_nhwc_inputs_takes_per_channel_mean_and_std_on_the_last_axis():
    from cnnrepair import BallInputs, CnnRepairError

    rng = np.random.default_rng(0)
    pix = torch.as_tensor(rng.uniform(0, 1, (5, 3, 4, 4)))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    nchw = ((pix - m) / s).float()
    nhwc = nchw.permute(0, 2, 3, 1).contiguous()
    lo, hi = BallInputs(mean, std).boxes(nchw, 0.01)
    lo2, hi2 = BallInputs(mean, std).boxes(nhwc, 0.01)  # auto: the last axis is the one with 3 entries
    assert torch.equal(lo2, lo.permute(0, 2, 3, 1)) and torch.equal(hi2, hi.permute(0, 2, 3, 1))
    assert BallInputs(mean, std).resolved(nhwc).layout == "nhwc" and BallInputs(mean, std).resolved(nchw).layout == "nchw"
    square = torch.zeros(2, 3, 4, 3)  # 3 on both axes: the layout cannot be read from the shape
    with pytest.raises(CnnRepairError, match="--layout nchw"):
        BallInputs(mean, std).boxes(square, 0.01)
    lo3, _ = BallInputs(mean, std, layout="nhwc").boxes(square + 0.5, 0.01)
    assert torch.allclose(lo3[0, 0, 0], ((torch.clamp(0.5 * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)
                                                      - 0.01, 0, 1) - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)))


def test_a_ball_repair_of_an_nhwc_model_with_per_channel_normalisation_records_the_layout_and_verify_uses_it(tmp_path, capsys):
    import warnings

    net = _rgb_task(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_ChannelsLast(net).eval(), (torch.zeros(1, 4, 4, 3),), str(tmp_path / "nhwc.onnx"), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    norm = ["--mean", "0.5,0.4,0.3", "--std", "0.2,0.25,0.3"]
    assert main(["points", str(tmp_path / "nhwc.onnx"), "--npz", str(tmp_path / "rgb.npz"), "--kind", "fgsm", "--eps", "0.2",
                 "--n", "4", "--keep", "30", "--out", str(tmp_path / "p"), *norm]) == 0
    pts, keep = tmp_path / "p" / "points.npz", tmp_path / "p" / "keep.npz"
    out = tmp_path / "ball"
    assert main(["repair", str(tmp_path / "nhwc.onnx"), "--points", str(pts), "--keep", str(keep), "--out", str(out),
                 "--spec", "ball", "--eps", "0.002", *norm]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["ball"]["layout"] == "nhwc" and cert["ball"]["mean"] == [0.5, 0.4, 0.3]
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.onnx"), "--points", str(pts), "--keep", str(keep),
            "--original", str(tmp_path / "nhwc.onnx")]
    assert main(args) == 0
    cert["ball"]["layout"] = "nchw"  # the channels claimed on another axis: the balls cannot be rebuilt as certified
    (tmp_path / "edited.json").write_text(json.dumps(cert))
    assert main([args[0], str(tmp_path / "edited.json"), *args[2:]]) != 0
    capsys.readouterr()
    assert main(["repair", str(tmp_path / "nhwc.onnx"), "--points", str(pts), "--out", str(tmp_path / "bad"), "--layout", "nhwc"]) == 2
    assert "--spec ball" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_graph_the_bound_tracer_cannot_follow_is_refused_naming_its_onnx_node(tmp_path):
    """A reshape whose target is computed data (Shape, then Mul: no longer a shape the interpreter keeps static) runs,
    repairs, but cannot be traced for bounds: the one-line refusal names the node and its operator."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cnnrepair import CnnRepairError, certify
    from cnnrepair.formats import load_model

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "one"], ["t"]),
             helper.make_node("Reshape", ["x", "t"], ["r"], name="reshape_dd"), helper.make_node("Gemm", ["r", "W", "b"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(np.array([1, 1], np.int64), "one"),
             numpy_helper.from_array(np.random.default_rng(0).random((3, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    graph = helper.make_graph(nodes, "dd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "dd.onnx"))
    model = load_model(tmp_path / "dd.onnx").module
    x = torch.rand(4, 4)
    y = model(x).argmax(1).numpy()
    with pytest.raises(CnnRepairError, match=r"in ONNX node 'reshape_dd' \(Reshape\)") as err:
        certify(model, x, y, eps=0.01)
    assert "\n" not in str(err.value)
