"""VNN-LIB hand-off: properties any VNN-COMP verifier reads; Marabou proves what the repair made true."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cnnrepair.cli import main
from cnnrepair.vnnlib import BallProperty


def test_a_property_file_says_ball_and_violation_in_vnnlib():
    text = BallProperty(np.array([[0.0, 0.5]]), 1, 0.1, 3).text()
    assert "(declare-const X_1 Real)" in text and "(declare-const Y_2 Real)" in text
    assert "(assert (>= X_0 0.0))" in text and "(assert (<= X_0 0.1))" in text  # clipped to the domain [0, 1]
    assert "(assert (>= X_1 0.4))" in text and "(assert (<= X_1 0.6))" in text
    assert "(assert (or (and (>= Y_0 Y_1)) (and (>= Y_2 Y_1))))" in text


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
