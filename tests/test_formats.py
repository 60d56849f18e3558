"""Models from files: ONNX graphs run, repair and save back as ONNX (onnxruntime is the judge)."""

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import load_model


class _Block(nn.Module):
    """A residual block: conv-bn-relu-conv-bn plus the input, then relu."""

    def __init__(self, c: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


def _resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Block(8), nn.AvgPool2d(2), _Block(8),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 24), nn.ReLU(), nn.Linear(24, 10))


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _trained(make, digits, steps: int = 60, seed: int = 0) -> nn.Module:
    """A few full-batch Adam steps on the embedded digits, with BN statistics from them."""
    torch.manual_seed(seed)
    model = make()
    x = torch.as_tensor(digits.x_train[:600], dtype=torch.float32) / 255.0
    y = torch.as_tensor(digits.y_train[:600], dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _export(model: nn.Module, path, batch_one: bool = False) -> None:
    x = torch.zeros(1, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated; it needs no onnxscript
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes=None if batch_one else {"x": {0: "batch"}, "logits": {0: "batch"}})


def _ort(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    if sess.get_inputs()[0].shape[0] == 1:
        return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return sess.run(None, {name: x})[0]


def _repair_to_runner_up(src, x: np.ndarray, ref: np.ndarray, n: int, keep_from: int, tmp_path, *extra: str):
    """The first ``n`` inputs relabelled with the model's runner-up class (labels it does not give), the
    inputs from ``keep_from`` on as keep points, repaired from ``src`` with margin 0.1; returns (out, labels)."""
    lab = np.argsort(-ref, 1)[:n, 1]
    np.savez(tmp_path / "p.npz", x=x[:n], y=lab.astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[keep_from:])
    out = tmp_path / "out"
    assert main(["repair", str(src), "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"), "--margin", "0.1",
                 "--out", str(out), *extra]) == 0
    return out, lab


def _smallest_margin(logits: np.ndarray, labels: np.ndarray) -> float:
    """min over rows of logit[label] - largest other logit."""
    rows = np.arange(len(labels))
    others = logits.copy()
    others[rows, labels] = -np.inf
    return float((logits[rows, labels] - others.max(1)).min())


@pytest.fixture(scope="module")
def digits():
    from cnnrepair.data import load_dataset

    return load_dataset("digits")


def _images(digits, n, start=600):
    return (digits.x_train[start:start + n].astype(np.float32) / 255.0).reshape(n, 1, 8, 8)


@pytest.mark.parametrize("make", [_mlp, _cnn, _resnet], ids=["mlp", "cnn", "resnet"])
def test_an_onnx_classifier_runs_as_exported_and_its_repair_is_saved_as_onnx(make, digits, tmp_path, capsys):
    model = _trained(make, digits)
    src = tmp_path / "model.onnx"
    _export(model, src)
    x = _images(digits, 300)
    loaded = load_model(src)
    assert loaded.format == "onnx" and loaded.input_shape == (1, 8, 8)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).numpy(), ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_ort(src, x), ref, atol=1e-5, rtol=1e-5)

    x = x[np.r_[0:8, 100:250]]  # 8 repair points, then 150 keep points
    ref = ref[np.r_[0:8, 100:250]]
    out, lab = _repair_to_runner_up(src, x, ref, 8, 8, tmp_path)
    saved = out / "repaired.onnx"
    onnx.checker.check_model(onnx.load(str(saved)))
    after = _ort(saved, x)  # plain onnxruntime, no cnnrepair
    assert _smallest_margin(after[:8], lab) >= 0.1 - 1e-5
    assert np.all(after[8:].argmax(1) == ref[8:].argmax(1))
    # only the last layer's initializers changed; the graph is the same graph
    a, b = onnx.load(str(src)), onnx.load(str(saved))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    cert = json.loads((out / "certificate.json").read_text())
    changed = {i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))}
    src_layer = load_model(src).module.linear_sources[cert["layer"]]
    assert changed and changed <= {src_layer.weight, src_layer.bias}
    assert main(["verify", str(out / "certificate.json"), "--model", str(saved), "--points", str(tmp_path / "p.npz"),
                 "--keep", str(tmp_path / "k.npz"), "--original", str(src)]) == 0


def test_a_graph_exported_for_one_example_runs_on_batches(digits, tmp_path):
    """VNN-COMP models are often exported with batch 1: their reshapes keep the batch here."""
    model = _trained(_cnn, digits, steps=5)
    _export(model, tmp_path / "one.onnx", batch_one=True)
    x = _images(digits, 7)
    with torch.no_grad():
        np.testing.assert_allclose(load_model(tmp_path / "one.onnx").module(torch.from_numpy(x)).numpy(),
                                   model(torch.from_numpy(x)).numpy(), atol=1e-5)


class _Reshaping(nn.Module):
    """A CNN whose flatten is a reshape by its input's batch: exported for one example, the graph holds Reshape(1, 32)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 8, 3, stride=2), nn.Linear(8 * 3 * 3, 24), nn.Linear(24, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc2(torch.relu(self.fc1(h.reshape(x.shape[0], -1))))


def test_a_batch_one_graph_is_repaired_into_a_file_that_takes_any_batch(digits, tmp_path):
    """A VNN-COMP-style graph fixed at batch 1 (its reshape's target a constant 1 x 72): the repaired file takes any
    batch (input and output dimension 0 named, the reshape taking the batch from its input), onnxruntime gives a batch
    what it gives each input alone, and the certificate's margins, measured on that file, hold."""
    model = _trained(_Reshaping, digits, steps=5)
    src = tmp_path / "one.onnx"
    _export(model, src, batch_one=True)
    g = onnx.load(str(src)).graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    assert any(n.op_type == "Reshape" and consts.get(n.input[1], np.zeros(0)).tolist()[:1] == [1] for n in g.node)  # the hard case
    x = _images(digits, 60)
    ref = _ort(src, x)
    out, lab = _repair_to_runner_up(src, x, ref, 6, 10, tmp_path)
    saved = out / "repaired.onnx"
    sess = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_outputs()[0].shape[0] == "batch"
    together = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    alone = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0] for i in range(len(x))])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    assert _smallest_margin(together[:6], lab) >= 0.1 - 1e-5
    assert np.all(together[10:].argmax(1) == ref[10:].argmax(1))
    assert main(["verify", str(out / "certificate.json"), "--model", str(saved), "--points", str(tmp_path / "p.npz"),
                 "--keep", str(tmp_path / "k.npz"), "--original", str(src)]) == 0


def test_a_graph_that_computes_its_reshape_from_its_input_shape_runs_and_is_bounded(digits, tmp_path):
    """torch.onnx writes x.reshape(x.shape[0], -1) with a dynamic batch as Shape -> Gather -> Unsqueeze -> Concat -> Reshape:
    it runs on any batch (a 0-d Gather index used to break it), and it is traced for bounds (the shape stays static where
    it is known, instead of data torch.export refused: GuardOnDataDependentSymNode), with the torch model's own bounds."""
    from cnnrepair import certify

    model = _trained(_Reshaping, digits, steps=5)
    src = tmp_path / "dyn.onnx"
    _export(model, src)
    assert {"Shape", "Gather", "Unsqueeze", "Concat"} <= {n.op_type for n in onnx.load(str(src)).graph.node}
    loaded = load_model(src).module
    x = torch.from_numpy(_images(digits, 9))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)
        y = model(x).argmax(1).numpy()
    ours, theirs = certify(loaded, x, y, 0.01, "crown"), certify(model, x, y, 0.01, "crown")
    np.testing.assert_allclose(ours.margins, theirs.margins, rtol=1e-6, atol=1e-6)


def test_a_batch_one_graph_with_reshape_targets_as_initializers_verifies_against_its_original(tmp_path):
    """Written by hand, as other exporters write it: the reshape targets are initializers, so the loaded module holds them
    as tensors; verify --original accepts exactly the change that lets them take any batch, and nothing else."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(16, 4)).astype(np.float32), rng.normal(size=(3, 16)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "s4"], ["x4"]), helper.make_node("Gemm", ["x4", "W1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Gemm", ["r", "W2", "b2"], ["logits"], transB=1, name="head")]
    inits = [numpy_helper.from_array(np.array([1, 4], np.int64), "s4"), numpy_helper.from_array(W1, "W1"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b1"), numpy_helper.from_array(W2, "W2"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 2])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])], inits)
    src = tmp_path / "one.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    x = rng.normal(size=(30, 2, 2)).astype(np.float32)
    out, lab = _repair_to_runner_up(src, x, _ort(src, x), 3, 24, tmp_path)
    saved = out / "repaired.onnx"
    assert numpy_helper.to_array(next(i for i in onnx.load(str(saved)).graph.initializer if i.name == "s4")).tolist() == [0, 4]
    assert _ort(saved, x).shape == (30, 3) and ort.InferenceSession(str(saved)).get_inputs()[0].shape[0] == "batch"
    assert any("takes any batch" in n for n in json.loads((out / "certificate.json").read_text())["notes"])
    args = ["verify", str(out / "certificate.json"), "--model", str(saved), "--points", str(tmp_path / "p.npz"), "--keep",
            str(tmp_path / "k.npz"), "--original", str(src)]
    assert main(args) == 0
    m = onnx.load(str(saved))  # any other change of that tensor is still caught
    next(i for i in m.graph.initializer if i.name == "s4").CopyFrom(numpy_helper.from_array(np.array([0, -1], np.int64), "s4"))
    onnx.save(m, str(saved))
    assert main(args) == 1


def _matmul_add_graph(path, W: np.ndarray, b: np.ndarray, op: str = "Relu") -> None:
    """x -> MatMul(W1^T) + b1 -> op -> MatMul(W^T) + b: a graph written by hand, as other exporters write it."""
    rng = np.random.default_rng(0)
    W1 = rng.normal(size=(6, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1t"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node(op, ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "Wt"], ["z"], name="head"),
             helper.make_node("Add", ["b", "z"], ["logits"])]
    inits = [numpy_helper.from_array(W1.T.copy(), "W1t"), numpy_helper.from_array(np.zeros(6, np.float32), "b1"),
             numpy_helper.from_array(W.T.copy(), "Wt"), numpy_helper.from_array(b, "b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_matmul_plus_add_is_a_linear_layer_and_is_written_back_transposed(tmp_path):
    rng = np.random.default_rng(1)
    W, b = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    _matmul_add_graph(tmp_path / "mm.onnx", W, b)
    loaded = load_model(tmp_path / "mm.onnx")
    assert set(loaded.module.linear_sources) == {"fc1", "head"}
    assert loaded.module.linear_sources["head"].weight_transposed
    x = rng.normal(size=(40, 4)).astype(np.float32)
    np.testing.assert_allclose(loaded.module(torch.from_numpy(x)).detach().numpy(), _ort(tmp_path / "mm.onnx", x), atol=1e-5)
    y = _ort(tmp_path / "mm.onnx", x).argmin(1)
    np.savez(tmp_path / "p.npz", x=x[:5], y=y[:5].astype(np.int64))
    assert main(["repair", str(tmp_path / "mm.onnx"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")]) == 0
    after = _ort(tmp_path / "o" / "repaired.onnx", x[:5])
    assert np.all(after.argmax(1) == y[:5])


def _bad(args, capsys) -> str:
    capsys.readouterr()  # only this command's output counts
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("cnnrepair: error:")
    return err[0]


def test_bad_onnx_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(2)
    W, b = rng.normal(size=(3, 6)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    np.savez(tmp_path / "p.npz", x=rng.normal(size=(4, 4)).astype(np.float32), y=np.zeros(4, np.int64))
    _matmul_add_graph(tmp_path / "erf.onnx", W, b, op="Erf")
    msg = _bad(["repair", str(tmp_path / "erf.onnx"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o1")], capsys)
    assert "'Erf'" in msg and "not supported" in msg and not (tmp_path / "o1").exists()
    # a classifier whose output is not a linear layer's (a sigmoid after the head)
    _matmul_add_graph(tmp_path / "ok.onnx", W, b)
    m = onnx.load(str(tmp_path / "ok.onnx"))
    m.graph.node[-1].output[0] = "z2"
    m.graph.node.append(helper.make_node("Sigmoid", ["z2"], ["logits"]))
    onnx.save(m, str(tmp_path / "sig.onnx"))
    msg = _bad(["repair", str(tmp_path / "sig.onnx"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o2")], capsys)
    assert "no linear layer ends this model" in msg and not (tmp_path / "o2").exists()
    # points for another input shape
    np.savez(tmp_path / "wide.npz", x=rng.normal(size=(4, 5)).astype(np.float32), y=np.zeros(4, np.int64))
    msg = _bad(["repair", str(tmp_path / "ok.onnx"), "--points", str(tmp_path / "wide.npz"), "--out", str(tmp_path / "o3")], capsys)
    assert "shape (5,)" in msg and "(4,)" in msg
    # not an ONNX file at all
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    msg = _bad(["repair", str(tmp_path / "junk.onnx"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o4")], capsys)
    assert "not a readable ONNX model" in msg


def test_a_fixed_batch_larger_than_one_is_refused(tmp_path):
    m = onnx.helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "b4.onnx"))
    with pytest.raises(CnnRepairError, match="fixed batch of 4"):
        load_model(tmp_path / "b4.onnx")


class _Denormalise(nn.Module):
    """A model that expects normalised inputs: model(z * std + mean)."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, z):
        return self.model(z * self.std + self.mean)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_points_from_data_then_repair_is_a_two_command_workflow(fmt, digits, tmp_path, capsys):
    mean, std = 0.3, 0.4
    model = _Denormalise(_trained(_cnn, digits), mean, std).eval()
    src = tmp_path / f"model.{fmt}"
    if fmt == "onnx":
        _export(model, src)
    else:
        x0 = torch.zeros(2, 1, 8, 8)
        torch.export.save(torch.export.export(model, (x0,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(src))
    pts = tmp_path / "pts"
    assert main(["points", str(src), "--dataset", "digits", "--kind", "fgsm", "--eps", "0.15", "--n", "10", "--keep", "120",
                 "--held-out", "15", "--mean", str(mean), "--std", str(std), "--out", str(pts)]) == 0
    p, k = np.load(pts / "points.npz"), np.load(pts / "keep.npz")
    info = json.loads((pts / "points.json").read_text())
    assert len(p["y"]) == info["points"] > 0 and len(k["y"]) == 120
    assert info["input"]["mean"] == [mean] and info["model"]["file"] == src.name
    test_x = digits.x_test.astype(np.float32) / 255.0
    pixels = p["x"] * std + mean  # model units back to pixels
    assert np.all(np.abs(pixels - test_x[p["index"]]) <= 0.15 + 1e-5) and pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    with torch.no_grad():
        assert np.all(model(torch.from_numpy(p["x"])).argmax(1).numpy() != p["y"])  # adversarial: the model is wrong on them
        assert np.all(model(torch.from_numpy(k["x"])).argmax(1).numpy() == k["y"])  # keep points: it is right
    assert str(k["split"]) == "train" and np.array_equal(k["y"], digits.y_train[k["index"]])  # keep points: never test images
    assert np.array_equal(p["y"], digits.y_test[p["index"]])
    out = tmp_path / "rep"
    assert main(["repair", str(src), "--points", str(pts / "points.npz"), "--keep", str(pts / "keep.npz"), "--out", str(out)]) == 0
    saved = out / f"repaired.{fmt}"
    if fmt == "onnx":
        after = _ort(saved, np.concatenate([p["x"], k["x"]]))
    else:
        after = torch.export.load(str(saved)).module()(torch.from_numpy(np.concatenate([p["x"], k["x"]]))).detach().numpy()
    assert np.all(after.argmax(1) == np.concatenate([p["y"], k["y"]]))
    held = np.load(pts / "held_out.npz")
    assert len(held["y"]) == info["held_out"] > 0 and set(held["index"]).isdisjoint(p["index"])
    rep = tmp_path / "report"
    assert main(["evaluate", str(src), "--repaired", str(saved), "--dataset", "digits", "--eps", "0.05,0.15", "--n", "150",
                 "--points", str(pts / "points.npz"), "--held-out", str(pts / "held_out.npz"), "--mean", str(mean), "--std", str(std),
                 "--out", str(rep)]) == 0
    report = json.loads((rep / "report.json").read_text())
    orig, fixed = report["models"]["original"], report["models"]["repaired"]
    assert fixed["efficacy"] == 1.0 and orig["repair_points_accuracy"] == 0.0
    assert fixed["drawdown"] == pytest.approx(100 * (orig["clean_accuracy"] - fixed["clean_accuracy"]))
    assert fixed["generalisation"] == pytest.approx(100 * (fixed["held_out_accuracy"] - orig["held_out_accuracy"]))
    assert orig["held_out_accuracy"] == 0.0  # held-out adversarial examples fool the original by construction
    assert set(orig["attack"]) == {"0.05", "0.15"} and orig["attack"]["0.15"] <= orig["clean_accuracy"]
    assert (rep / "report.png").stat().st_size > 0 and report["files"]["repaired"]["file"] == saved.name


def test_points_refuse_a_normalisation_for_other_channels(digits, tmp_path, capsys):
    src = tmp_path / "m.onnx"
    _export(_trained(_cnn, digits, steps=2), src)
    msg = _bad(["points", str(src), "--dataset", "digits", "--mean", "0.1,0.2,0.3", "--out", str(tmp_path / "o")], capsys)
    assert "3 values but the images have 1 channel" in msg and not (tmp_path / "o").exists()
    msg = _bad(["points", str(src), "--dataset", "digits", "--kind", "pgd", "--out", str(tmp_path / "o")], capsys)
    assert "needs --eps" in msg


def test_the_projects_own_models_export_to_onnx_and_load_back(digits_run, digits):
    """NN, LH and KH as ONNX: onnxruntime and our loader both reproduce the torch models; KH's last
    layer (kernel values times dual coefficients) is the linear layer a repair edits."""
    from cnnrepair.paper.pipeline import export_models, load_models
    from cnnrepair.repair import last_layer
    from cnnrepair.paper.rundir import RunDir

    run = RunDir(digits_run)
    models = load_models(run)
    export_models(run, models, (1, 8, 8))
    written = run.results["exports_onnx"]
    assert set(written) == {"nn", "lh", "kh"}
    x = torch.as_tensor(digits.x_test[:50]).float().div(255)
    for name, rel in written.items():
        path = digits_run / rel
        with torch.no_grad():
            ref = models[name](x).double().numpy()
        np.testing.assert_allclose(_ort(path, x.numpy()), ref, rtol=1e-5, atol=1e-5)
        loaded = load_model(path)
        with torch.no_grad():
            np.testing.assert_allclose(loaded.module(x).double().numpy(), ref, rtol=1e-5, atol=1e-5)
        layer = last_layer(loaded.module, x[:2])
        assert layer.shape[0] == 10
        if name == "kh":
            assert layer.shape[1] == models["kh"].head.coef.shape[1]  # one weight per support vector


_FACTORY = '''
from torch import nn


def make():
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 24), nn.ReLU(), nn.Linear(24, 10))
'''


@pytest.mark.parametrize("nested", [False, True])
def test_a_state_dict_with_its_factory_is_repaired_into_a_state_dict(nested, digits, tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(_FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _trained(_cnn, digits)  # the same architecture as mynets.make
    src = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3} if nested else model.state_dict(), src)
    x = _images(digits, 60)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    y = np.argsort(-ref, 1)[:, 1][:6]
    np.savez(tmp_path / "p.npz", x=x[:6], y=y.astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[6:])
    assert main(["repair", str(src), "--factory", "mynets:make", "--points", str(tmp_path / "p.npz"), "--keep",
                 str(tmp_path / "k.npz"), "--out", str(tmp_path / "o")]) == 0
    saved = torch.load(str(tmp_path / "o" / "repaired.pt"), weights_only=True)  # plain torch
    if nested:
        assert saved["epoch"] == 3
        saved = saved["state_dict"]
    import mynets

    fresh = mynets.make().eval()
    fresh.load_state_dict(saved)
    with torch.no_grad():
        after = fresh(torch.from_numpy(x)).numpy()
    assert np.all(after[:6].argmax(1) == y) and np.all(after[6:].argmax(1) == ref[6:].argmax(1))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, saved[k])]
    assert set(changed) <= {"8.weight", "8.bias"} and changed
    assert main(["verify", str(tmp_path / "o" / "certificate.json"), "--model", str(tmp_path / "o" / "repaired.pt"),
                 "--factory", "mynets:make", "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"),
                 "--original", str(src)]) == 0


def test_a_state_dict_needs_a_factory_that_fits(digits, tmp_path, monkeypatch, capsys):
    (tmp_path / "othernets.py").write_text(_FACTORY + "\n\ndef other():\n    return nn.Linear(3, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(_trained(_cnn, digits, steps=1).state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "p.npz", x=_images(digits, 2), y=np.zeros(2, np.int64))
    base = ["repair", str(tmp_path / "w.pt"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")]
    assert "--factory module:function" in _bad(base, capsys)
    assert "cannot import" in _bad(base + ["--factory", "nosuchmodule:make"], capsys)
    assert "do not fit the model" in _bad(base + ["--factory", "othernets:other"], capsys)
    assert not (tmp_path / "o").exists()


def _save_as(model: nn.Module, fmt: str, path) -> list[str]:
    """``model`` written in ``fmt``; returns the extra CLI arguments its loading needs."""
    if fmt == "pt2":
        x0 = torch.zeros(2, 1, 8, 8)
        torch.export.save(torch.export.export(model, (x0,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
        return []
    torch.save(model.state_dict(), path)
    return ["--factory", f"{__name__}:{model.factory_name}"]


def _run_saved(fmt: str, path, factory, x: np.ndarray) -> np.ndarray:
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(torch.from_numpy(x)).detach().numpy()
    fresh = factory().eval()
    fresh.load_state_dict(torch.load(str(path), weights_only=True))
    with torch.no_grad():
        return fresh(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("fmt", ["pt2", "state_dict"])
@pytest.mark.parametrize("make", [_mlp, _cnn, _resnet], ids=["mlp", "cnn", "resnet"])
def test_every_network_is_repaired_in_every_torch_format(make, fmt, digits, tmp_path):
    """The MLP, CNN and ResNet as torch.export programs and as state dicts: repaired, saved in the same
    format, reloaded with plain torch; repair points get their labels with the margin, keep points keep theirs."""
    model = _trained(make, digits)
    model.factory_name = make.__name__
    src = tmp_path / ("model.pt2" if fmt == "pt2" else "model.pt")
    extra = _save_as(model, fmt, src)
    x = _images(digits, 200)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out, lab = _repair_to_runner_up(src, x, ref, 8, 50, tmp_path, *extra)
    after = _run_saved(fmt, out / f"repaired{src.suffix}", make, x)
    assert _smallest_margin(after[:8], lab) >= 0.1 - 1e-5
    assert np.all(after[50:].argmax(1) == ref[50:].argmax(1))

    def tensors(path):
        return dict(torch.export.load(str(path)).state_dict) if fmt == "pt2" else torch.load(str(path), weights_only=True)

    before, saved = tensors(src), tensors(out / f"repaired{src.suffix}")
    assert before.keys() == saved.keys()
    changed = {k for k in before if not torch.equal(before[k], saved[k])}
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    assert changed and changed <= {f"{last}.weight", f"{last}.bias"}  # only the last layer's tensors differ


def test_the_readme_file_example_runs_as_written(tmp_path, monkeypatch, capsys, readme_example):
    example = readme_example("load_model(")
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(example, "README.md", "exec"), {})
    status, layer = capsys.readouterr().out.split()
    assert status == "repaired" and layer in load_model(tmp_path / "net.onnx").module.linear_sources
    x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
    assert _ort(tmp_path / "net_repaired.onnx", x).shape == (3, 4)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("make", [_mlp, _cnn, _resnet], ids=["mlp", "cnn", "resnet"])
def test_a_torchscript_file_is_repaired_into_a_torchscript_file(make, how, digits, tmp_path, capsys):
    """TorchScript runs through an ONNX export of itself; the repair is written into its own parameters
    and the certificate's margins are measured with torch.jit.load."""
    model = _trained(make, digits)
    x = _images(digits, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.from_numpy(x[:2]))
    src = tmp_path / "model.ts"
    torch.jit.save(scripted, str(src))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out, lab = _repair_to_runner_up(src, x, ref, 6, 20, tmp_path)
    saved = torch.jit.load(str(out / "repaired.ts"))  # plain torch
    with torch.no_grad():
        after = saved(torch.from_numpy(x)).numpy()
    assert _smallest_margin(after[:6], lab) >= 0.1 - 1e-5
    assert np.all(after[20:].argmax(1) == ref[20:].argmax(1))
    before, now = dict(torch.jit.load(str(src)).named_parameters()), dict(saved.named_parameters())
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    changed = {k for k in before if not torch.equal(before[k], now[k])}
    assert changed and changed <= {f"{last}.weight", f"{last}.bias"}
    assert main(["verify", str(out / "certificate.json"), "--model", str(out / "repaired.ts"), "--points", str(tmp_path / "p.npz"),
                 "--keep", str(tmp_path / "k.npz"), "--original", str(src)]) == 0


def test_a_torchscript_file_on_the_wrong_shape_is_one_line(digits, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_trained(_cnn, digits, steps=1)), str(tmp_path / "m.ts"))
    np.savez(tmp_path / "p.npz", x=np.zeros((2, 1, 5, 5), np.float32), y=np.zeros(2, np.int64))
    msg = _bad(["repair", str(tmp_path / "m.ts"), "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")], capsys)
    assert "cannot trace the TorchScript module on inputs of shape (1, 5, 5)" in msg and not (tmp_path / "o").exists()


def test_a_torchscript_file_named_like_a_state_dict_is_told_its_suffix(digits, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(_trained(_cnn, digits, steps=1)), str(tmp_path / "m.pt"))
    np.savez(tmp_path / "p.npz", x=_images(digits, 2), y=np.zeros(2, np.int64))
    msg = _bad(["repair", str(tmp_path / "m.pt"), "--factory", "x:y", "--points", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o")], capsys)
    assert "TorchScript file" in msg and ".ts" in msg


def test_a_rerun_never_replaces_results_without_overwrite(digits, tmp_path, capsys):
    """points, evaluate and vnnlib refuse an --out that already holds their results (maybe made with other
    settings), before loading anything; --overwrite replaces them."""
    src = tmp_path / "m.onnx"
    _export(_trained(_cnn, digits, steps=5), src)
    pts = tmp_path / "pts"
    assert main(["points", str(src), "--dataset", "digits", "--n", "3", "--keep", "5", "--out", str(pts)]) == 0
    first = (pts / "points.npz").read_bytes()
    msg = _bad(["points", str(src), "--dataset", "digits", "--n", "4", "--keep", "5", "--out", str(pts)], capsys)
    assert "already holds" in msg and "points.json" in msg and "--overwrite" in msg and (pts / "points.npz").read_bytes() == first
    assert main(["points", str(src), "--dataset", "digits", "--n", "4", "--keep", "5", "--out", str(pts), "--overwrite"]) == 0
    assert len(np.load(pts / "points.npz")["y"]) == 4
    ev = ["evaluate", str(src), "--dataset", "digits", "--eps", "0.05", "--n", "20", "--out", str(tmp_path / "ev")]
    assert main(ev) == 0
    assert "already holds report.json" in _bad(ev, capsys)
    vn = ["vnnlib", str(src), "--points", str(pts / "points.npz"), "--eps", "0.01", "--out", str(tmp_path / "vn")]
    assert main(vn) == 0
    assert "already holds instances.csv" in _bad(vn, capsys)
    assert main(vn + ["--overwrite"]) == 0
    assert "e.g. 0.05,0.1" in _bad(["evaluate", str(src), "--dataset", "digits", "--eps", "0.05,big", "--out", str(tmp_path / "e2")], capsys)
