"""Repair of a layer inside the network, its activation patterns kept: the optimum against an independent
LP of the same program, the guarantee on the saved float32 file, the certificate, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn
from torch.func import functional_call, jacrev

from cnnrepair import CnnRepairError, Points, RepairSpec, repair_classifier
from cnnrepair.cli import main
from cnnrepair.repair.hidden import LayerChange, hidden_program, solve_hidden, written
from tests.helpers import last_error_line


def _independent_optimum(model: nn.Sequential, layer: str, x: torch.Tensor, labels: np.ndarray, required: np.ndarray,
                         pools: dict[str, tuple[int, int, int]] | None = None, later: tuple[str, ...] = (), norm: str = "l1",
                         max_change: float | None = None):
    """The whole pattern-preserving program written out row by row from the real network's Jacobians with respect to the
    layer's weight and bias (and the biases of the layers ``later``; float64, torch.func), solved by scipy's HiGHS: every
    margin of every point, every ReLU input after the layer, every max-pool window (2x2, stride 2) after it; the change
    minimal in ``norm`` (an L-infinity part as a variable t >= d+ + d- of every entry), each entry within
    ``max_change``. Returns scipy's result (``n_rows``: its rows)."""
    model = model.double()
    x = x.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    wn, bn = f"{layer}.weight", f"{layer}.bias"
    moved = [wn, bn, *(f"{name}.bias" for name in later)]

    def row(grads):  # d+ and d- of every moved tensor
        return np.concatenate([np.concatenate([g, -g]) for g in grads])

    order = list(dict(model.named_children()))
    watched = [(n, m) for n, m in model.named_children() if isinstance(m, (nn.ReLU, nn.MaxPool2d)) and order.index(n) > order.index(layer)]
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0])) for _, m in watched]
    rows, rhs = [], []
    try:
        for k in range(len(x)):
            def f(*tensors, k=k):
                seen.clear()
                out = functional_call(model, {**params, **dict(zip(moved, tensors))}, (x[k:k + 1],))
                return (out.reshape(-1), *[a.reshape(-1) for a in seen])

            vals = f(*(params[n] for n in moved))
            jac = jacrev(f, argnums=tuple(range(len(moved))))(*(params[n] for n in moved))
            logits, J = vals[0], jac[0]
            for j in range(len(logits)):
                if j != labels[k]:
                    rows.append(row([(t[labels[k]] - t[j]).reshape(-1).numpy() for t in J]))
                    rhs.append(required[k] - float(logits[labels[k]] - logits[j]))
            for (name, mod), p, J in zip(watched, vals[1:], jac[1:]):
                p = p.detach()
                if isinstance(mod, nn.ReLU):
                    for i in range(len(p)):
                        s = 1.0 if p[i] > 0 else -1.0
                        rows.append(row([s * t[i].reshape(-1).numpy() for t in J]))
                        rhs.append(-s * float(p[i]))
                    continue
                C, H, W = pools[name]
                for c in range(C):
                    for a in range(0, H - 1, 2):
                        for b in range(0, W - 1, 2):
                            window = [c * H * W + (a + u) * W + (b + v) for u in range(2) for v in range(2)]
                            best = max(window, key=lambda t: float(p[t]))
                            for o in window:
                                if o != best:
                                    rows.append(row([(t[best] - t[o]).reshape(-1).numpy() for t in J]))
                                    rhs.append(-float(p[best] - p[o]))
    finally:
        for h in hooks:
            h.remove()
        model.float()
    A = np.array(rows)
    n = A.shape[1] // 2  # entries that may change (d+ and d- of each)
    a, b = {"l1": (1.0, 0.0), "linf": (0.0, 1.0), "l1+linf": (1.0 / n, 1.0)}[norm]
    A_ub, b_ub, cost = -A, -np.array(rhs), np.full(2 * n, a)
    if b:  # one more column t, and d+_e + d-_e - t <= 0 for every entry e (the entries' d+ and d- lie in the blocks of row())
        A_ub = np.hstack([A_ub, np.zeros((len(A_ub), 1))])
        link, at = [], 0
        for size in (int(params[name].numel()) for name in moved):
            for e in range(size):
                r = np.zeros(2 * n + 1)
                r[at + e] = r[at + size + e] = 1.0
                r[-1] = -1.0
                link.append(r)
            at += 2 * size
        A_ub, b_ub, cost = np.vstack([A_ub, link]), np.concatenate([b_ub, np.zeros(len(link))]), np.append(cost, b)
    res = linprog(cost, A_ub=A_ub, b_ub=b_ub, bounds=(0, max_change), method="highs")
    res.n_rows = len(rows)
    return res


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 4)).eval()


def _cnn(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def _task(model, x, k):
    with torch.no_grad():
        out = model(x)
    labels = out.argmax(1).numpy().copy()
    labels[:k] = out.argsort(1)[:k, -2].numpy()  # the runner-up class: a label the model does not give yet
    return labels


@pytest.mark.parametrize("case", ["mlp-hidden", "mlp-hidden-no-keep", "cnn-conv", "cnn-fc", "mlp-later-biases", "cnn-conv-later-biases"])
def test_the_optimum_equals_an_independent_lp_of_the_same_pattern_preserving_program(case):
    torch.manual_seed(7)
    if case.startswith("mlp"):
        model, layer, x, pools = _mlp(), "2", torch.randn(40 if case == "mlp-hidden" else 5, 6), None
    else:
        model, layer, x, pools = _cnn(), "2" if case == "cnn-conv" else "6", torch.rand(12, 1, 8, 8), {"4": (8, 4, 4)}
    if case == "mlp-later-biases":
        model, layer, x = _mlp(), "0", torch.randn(20, 6)
    later_biases = case.endswith("later-biases")
    later = tuple(n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d)) and int(n) > int(layer)) if later_biases else ()
    K = 5 if case.startswith("mlp") else 2
    labels = _task(model, x, K)
    required = np.concatenate([np.full(K, 0.05), np.zeros(len(x) - K)])
    # every keep point in the program from the start: the whole pattern-preserving program
    prog = hidden_program(model, layer, x, labels, required, K, LayerChange(later_biases=later_biases))
    assert [name for name, _, _ in prog.later] == list(later)
    prog.warm["active"] = np.ones(len(x), bool)
    sol = solve_hidden(prog)
    ref = _independent_optimum(model, layer, x, labels, required, pools, later)
    assert ref.status == 0 and sol.ok
    assert abs(sol.objective - ref.fun) <= 1e-6 * ref.fun
    assert sol.lower_bound <= sol.objective and sol.gap <= 1e-6
    assert 0 < sol.size["pattern_rows"] and sol.size["rows"] < ref.n_rows  # rows were generated, not all written down
    if case == "mlp-hidden":  # a ReLU right after the layer: the points with u columns hold those patterns as bounds
        assert 0 < sol.size["pattern_bounds"] <= sol.size["pattern_rows"]
    if later_biases:  # more freedom: never a larger change than the layer alone (when the layer alone can do it)
        assert len(sol.delta_later) == sum(size for _, _, size in prog.later)
        fixed = _independent_optimum(model, layer, x, labels, required, pools)
        assert fixed.status == 2 or sol.objective <= fixed.fun * (1 + 1e-6)
    # as repair runs it: keep points enter only when the change would cost them their margin; the optimum is then the
    # independent program's over the points that entered, and every other keep point keeps its margin on the network
    prog = hidden_program(model, layer, x, labels, required, K, LayerChange(later_biases=later_biases))
    sol = solve_hidden(prog)
    active = prog.warm["active"]
    assert sol.ok and active[:K].all()
    ref = _independent_optimum(model, layer, x[torch.as_tensor(active)], labels[active], required[active], pools, later)
    assert ref.status == 0 and abs(sol.objective - ref.fun) <= 1e-6 * ref.fun
    with torch.no_grad():
        out = written(prog, model, sol.delta_weight, sol.delta_bias, sol.delta_later).double()(x.double()).numpy()
    own = out[np.arange(len(x)), labels]
    other = np.where(np.eye(out.shape[1], dtype=bool)[labels], -np.inf, out).max(1)
    assert (own - other >= required - 1e-5)[~active].all()  # the written model is float32


@pytest.mark.parametrize("norm, max_change", [("linf", None), ("l1+linf", None), ("l1", 0.02), ("linf", 0.5), ("l1+linf", 3.0),
                                               ("l1", "tight"), ("l1+linf", "tight")])
@pytest.mark.parametrize("net", ["mlp", "cnn-conv", "mlp-later-biases", "mlp-columns-generated"])
def test_every_norm_and_bound_reaches_the_optimum_of_an_independent_lp(norm, max_change, net, monkeypatch):
    if net == "mlp-columns-generated":  # weight entries enter 25 at a time, priced by their excess (not all from the start)
        import cnnrepair.repair.hidden as hidden

        monkeypatch.setattr(hidden, "ALL_COLUMNS", 0)
        monkeypatch.setattr(hidden, "COLUMNS_PER_ROUND", 25)
    torch.manual_seed(7)
    if net == "cnn-conv":
        model, layer, x, pools, K = _cnn(), "2", torch.rand(12, 1, 8, 8), {"4": (8, 4, 4)}, 2
    else:
        model, layer, x, pools, K = _mlp(), "0" if net == "mlp-later-biases" else "2", torch.randn(30, 6), None, 5
    later = ("2", "4") if net == "mlp-later-biases" else ()
    labels = _task(model, x, K)
    required = np.concatenate([np.full(K, 0.05), np.zeros(len(x) - K)])
    for keep in (True, False):  # every keep point in the program, then the repair points alone
        n = len(x) if keep else K
        bound = max_change
        if max_change == "tight":  # a bound that binds: 10% above the smallest largest change (the L-infinity optimum)
            smallest = _independent_optimum(model, layer, x[:n], labels[:n], required[:n], pools, later, "linf")
            if smallest.status == 2:  # infeasible whatever the bound (checked by the unbounded cases)
                continue
            bound = 1.1 * smallest.fun
        change = LayerChange(norm=norm, max_change=bound, later_biases=bool(later))
        ref = _independent_optimum(model, layer, x[:n], labels[:n], required[:n], pools, later, norm, bound)
        prog = hidden_program(model, layer, x[:n], labels[:n], required[:n], K, change)
        prog.warm["active"] = np.ones(n, bool)
        sol = solve_hidden(prog)
        if ref.status == 2:  # a tight bound can make the program infeasible: then both must say so
            assert sol.status == "infeasible", (norm, max_change, net, keep)
            continue
        assert ref.status == 0 and sol.ok, (sol.status, norm, max_change, net, keep)
        assert abs(sol.objective - ref.fun) <= 1e-6 * ref.fun, (sol.objective, ref.fun)
        assert sol.lower_bound <= sol.objective and sol.gap <= 1e-6
        dW, db, de = sol.delta_weight, sol.delta_bias, sol.delta_later if later else np.zeros(0)
        d = np.concatenate([dW.ravel(), db, de])
        assert bound is None or np.abs(d).max() <= bound * (1 + 1e-9)
        assert abs(prog.change_cost(dW, db, de) - sol.objective) <= 1e-12 * (1 + sol.objective)
        if net == "mlp-columns-generated":
            assert sol.size["columns"] - 30 < prog.weight.size or norm != "l1"  # L1 leaves entries out; the other norms may not
    assert ref.status == 0 or max_change not in (None, "tight")  # without a bound (or one that allows a change) every case is feasible


def test_an_infeasible_program_is_infeasible_for_the_independent_lp_too_and_names_points():
    model = _cnn()
    x = torch.rand(12, 1, 8, 8)
    labels = _task(model, x, 2)
    required = np.concatenate([np.full(2, 0.05), np.zeros(10)])
    sol = solve_hidden(hidden_program(model, "0", x, labels, required, 2))
    assert _independent_optimum(model, "0", x, labels, required, {"4": (8, 4, 4)}).status == 2  # infeasible
    assert sol.status == "infeasible" and len(sol.conflicts) >= 1


def test_repair_classifier_on_a_hidden_layer_changes_only_it_and_every_margin_holds_in_float32():
    model = _mlp()
    x = torch.randn(40, 6)
    labels = _task(model, x, 5)
    r = repair_classifier(model, x[:5], labels[:5], RepairSpec(margin=0.05), keep=x[5:], layer="2")
    assert r.ok, r.notes
    with torch.no_grad():
        out = r.model(x).double().numpy()
    own = out[np.arange(40), labels]
    other = np.where(np.eye(4, dtype=bool)[labels], -np.inf, out).max(1)
    assert (own[:5] - other[:5] >= 0.05).all() and (own[5:] - other[5:] >= 0).all()
    for (name, p0), (_, p1) in zip(model.named_parameters(), r.model.named_parameters()):
        assert torch.equal(p0, p1) == (not name.startswith("2."))
    c = r.certificate
    assert c.layer_kind == "hidden-linear" and c.patterns["kept"] and c.gap <= 1e-6 and c.keep.labels_kept == 35
    assert r.tensors == ("2.weight", "2.bias")


@pytest.fixture
def files(tmp_path):
    model = _cnn()
    x = torch.rand(60, 1, 8, 8)
    program = torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    labels = _task(model, x, 3)
    np.savez(tmp_path / "p.npz", x=x[:3].numpy(), y=labels[:3].astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[3:40].numpy())
    return tmp_path


def test_cli_repairs_a_hidden_layer_of_a_pt2_and_verify_rechecks_it_and_fails_when_altered(files, capsys):
    out = files / "o"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--layer", "6"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["layer"] == "6" and cert["layer_kind"] == "hidden-linear" and cert["patterns"]["kept"] is True
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(files / "p.npz"),
            "--keep", str(files / "k.npz"), "--original", str(files / "m.pt2")]
    capsys.readouterr()
    assert main(args) == 0
    assert "activation pattern" in capsys.readouterr().err
    (files / "altered.pt2").write_bytes((files / "m.pt2").read_bytes())  # the original in place of the repair
    assert main([*args[:3], str(files / "altered.pt2"), *args[4:]]) == 1
    listed = cert["patterns"]["keep_points_with_patterns"]
    assert all(0 <= k < 37 for k in listed) and listed == sorted(set(listed))
    cert["patterns"]["keep_points_with_patterns"] = [37]  # no such keep point: a malformed certificate
    (files / "edited.json").write_text(json.dumps(cert))
    capsys.readouterr()
    assert main([args[0], str(files / "edited.json"), *args[2:]]) == 2
    assert "keep_points_with_patterns" in last_error_line(capsys)
    cert["patterns"]["keep_points_with_patterns"] = listed
    cert["objective"] *= 0.5
    (files / "edited.json").write_text(json.dumps(cert))
    assert main([args[0], str(files / "edited.json"), *args[2:]]) == 1


def test_cli_repairs_a_hidden_layer_in_prdnns_norm_with_a_bound_and_verify_recomputes_that_objective(files, capsys):
    out = files / "mm"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--layer", "6", "--norm", "l1+linf", "--max-change", "0.065"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    original = torch.export.load(str(files / "m.pt2")).module().state_dict()
    repaired = torch.export.load(str(out / "repaired.pt2")).module().state_dict()
    d = torch.cat([(repaired[k].double() - original[k].double()).ravel() for k in ("6.weight", "6.bias")])
    assert cert["spec"]["norm"] == "l1+linf" and float(d.abs().max()) <= 0.065 * (1 + 1e-6)
    objective = float(d.abs().mean() + d.abs().max())  # PRDNN's mean |d| + max |d| over the layer's weight and bias
    assert abs(cert["objective"] - objective) <= 1e-6 * objective and cert["gap"] <= 1e-6
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(files / "p.npz"),
            "--keep", str(files / "k.npz"), "--original", str(files / "m.pt2")]
    assert main(args) == 0
    cert["spec"]["norm"] = "l1"  # the same change claimed minimal in another norm: its objective is not that norm's
    (files / "edited.json").write_text(json.dumps(cert))
    capsys.readouterr()
    assert main([args[0], str(files / "edited.json"), *args[2:]]) == 1
    assert "l1 norm" in capsys.readouterr().err


def test_an_infeasible_hidden_layer_repair_says_it_is_infeasible_with_the_patterns_kept_not_in_general(files, capsys):
    out = files / "inf"
    capsys.readouterr()
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--layer", "0"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "that keeps the activation patterns of the repair points" in line and "not searched for a smaller set" in line
    assert "time limit" not in line  # no search was made, so none stopped
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["status"] == "infeasible" and cert["conflicts"] and not (out / "repaired.pt2").exists()


def test_a_keep_point_enters_the_program_only_when_the_change_would_cost_its_margin():
    torch.manual_seed(3)
    model = _mlp()
    x = torch.randn(200, 6)
    labels = _task(model, x, 5)
    prog = hidden_program(model, "2", x, labels, np.concatenate([np.full(5, 0.05), np.zeros(195)]), 5)
    sol = solve_hidden(prog)
    active = prog.warm["active"]
    assert sol.ok and active[:5].all() and active[5:].sum() < 195  # not every keep point was needed
    patterns_kept = {w[1] for w in prog.warm["rows"].what if w[0] == "relu"}
    assert patterns_kept <= set(np.flatnonzero(active).tolist())  # rows only at points in the program


def test_the_time_limit_of_a_re_solved_highs_instance_counts_from_its_time_so_far():
    from cnnrepair.repair.highs import set_time_limit

    class Fake:
        options: dict = {}

        def getRunTime(self):
            return 12.5

        def setOptionValue(self, key, value):
            self.options[key] = value

    h = Fake()
    set_time_limit(h, 3.0)
    assert h.options["time_limit"] == 15.5  # HiGHS compares its limit with the instance's run time over every solve


def test_cli_lists_the_layers_as_json(files, capsys):
    capsys.readouterr()
    assert main(["layers", str(files / "m.pt2"), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in layers] == ["0", "2", "6", "8"]
    assert [entry["kind"] for entry in layers] == ["conv2d", "conv2d", "linear", "linear"]
    assert layers[0]["after"] == ["2", "6", "8"] and [e["ends_model"] for e in layers] == [False, False, False, True]


@pytest.mark.parametrize("bad, message", [(["--layer", "4"], "no linear layer named '4'"),
                                          (["--layer", "6", "--spec", "ball", "--eps", "0.01"], "last layer only"),
                                          (["--layer", "6", "--keep-price", "1"], "hard keep points")])
def test_bad_input_for_a_hidden_layer_is_one_line_and_writes_nothing(files, capsys, bad, message):
    out = files / "bad"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(out), *bad]) == 2
    assert message in last_error_line(capsys) and not out.exists()


def test_an_operator_the_pattern_encoding_does_not_cover_is_named(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    x = torch.randn(6, 6)
    with pytest.raises(CnnRepairError, match="tanh"):
        repair_classifier(model, x[:2], np.array([0, 1]), RepairSpec(), layer="0")
    with pytest.raises(CnnRepairError, match="keep points take no targets"):
        repair_classifier(model, x[:2], np.array([0, 1]), keep=Points(x[2:], targets=np.zeros((4, 3))), layer="0")


def test_cli_repairs_with_the_later_biases_free_and_verify_rechecks_which_tensors_moved(files, capsys):
    out = files / "later"
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--keep", str(files / "k.npz"), "--out", str(out),
                 "--layer", "2", "--later-biases"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["spec"]["later_biases"] is True and cert["later_biases"]["tensors"] == ["6.bias", "8.bias"]
    original = torch.export.load(str(files / "m.pt2")).module().state_dict()
    repaired = torch.export.load(str(out / "repaired.pt2")).module().state_dict()
    moved = {k for k in original if not torch.equal(original[k], repaired[k])}
    assert moved <= {"2.weight", "2.bias", "6.bias", "8.bias"} and "2.weight" in moved
    l1 = sum(float((repaired[k].double() - original[k].double()).abs().sum()) for k in ("6.bias", "8.bias"))
    assert abs(cert["later_biases"]["l1"] - l1) <= 1e-9 * (1 + l1)
    args = ["verify", str(out / "certificate.json"), "--model", str(out / "repaired.pt2"), "--points", str(files / "p.npz"),
            "--keep", str(files / "k.npz"), "--original", str(files / "m.pt2")]
    assert main(args) == 0
    later_moved = sorted(moved & {"6.bias", "8.bias"})
    assert later_moved  # the later biases were used
    cert["later_biases"]["tensors"] = [t for t in ("6.bias", "8.bias") if t != later_moved[0]]  # a moved tensor left off the list
    (files / "edited.json").write_text(json.dumps(cert))
    assert main([args[0], str(files / "edited.json"), *args[2:]]) == 1
    capsys.readouterr()
    assert main(["repair", str(files / "m.pt2"), "--points", str(files / "p.npz"), "--out", str(files / "bad"), "--later-biases"]) == 2
    assert "--layer" in last_error_line(capsys) and not (files / "bad").exists()


_MLP_FACTORY = '''
from torch import nn

def make():
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 4))
'''


@pytest.mark.parametrize("fmt", ["onnx", "state-dict"])
def test_a_hidden_layer_of_an_onnx_file_or_a_state_dict_is_repaired_in_its_format_and_verified(fmt, tmp_path, monkeypatch, capsys):
    import warnings

    model = _mlp()
    x = torch.randn(60, 6)
    labels = _task(model, x, 4)
    np.savez(tmp_path / "p.npz", x=x[:4].numpy(), y=labels[:4].astype(np.int64))
    np.savez(tmp_path / "k.npz", x=x[4:].numpy())
    extra = []
    if fmt == "onnx":
        src = tmp_path / "m.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x[:1],), str(src), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    else:
        (tmp_path / "mlpnets.py").write_text(_MLP_FACTORY)
        monkeypatch.syspath_prepend(str(tmp_path))
        src = tmp_path / "m.pt"
        torch.save(model.state_dict(), src)
        extra = ["--factory", "mlpnets:make", "--input-shape", "6"]
    capsys.readouterr()
    assert main(["layers", str(src), "--json", *extra]) == 0
    names = [e["name"] for e in json.loads(capsys.readouterr().out)]
    assert len(names) == 3
    out = tmp_path / "o"
    assert main(["repair", str(src), *extra, "--points", str(tmp_path / "p.npz"), "--keep", str(tmp_path / "k.npz"), "--out", str(out),
                 "--layer", names[1], "--later-biases"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["layer_kind"] == "hidden-linear" and len(cert["later_biases"]["tensors"]) == 1
    saved = out / ("repaired.onnx" if fmt == "onnx" else "repaired.pt")
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(saved), providers=["CPUExecutionProvider"])  # plain onnxruntime, no cnnrepair
        after = sess.run(None, {"x": x.numpy()})[0]
    else:
        fresh = _mlp()
        fresh.load_state_dict(torch.load(str(saved), weights_only=True))
        with torch.no_grad():
            after = fresh(x).numpy()
    own = after[np.arange(60), labels]
    other = np.where(np.eye(4, dtype=bool)[labels], -np.inf, after).max(1)
    assert (own[:4] - other[:4] >= 0.05 - 1e-6).all() and (own[4:] > other[4:]).all()
    assert main(["verify", str(out / "certificate.json"), "--model", str(saved), *extra, "--points", str(tmp_path / "p.npz"),
                 "--keep", str(tmp_path / "k.npz"), "--original", str(src)]) == 0


def test_pattern_rows_held_as_bounds_or_as_rows_reach_the_same_optimum(monkeypatch):
    """The single-unit pattern rows of points with u columns are column bounds by default; as rows (the benchmark's other
    side) the program is the same: the same optimum, a certified gap both ways."""
    import cnnrepair.repair.hidden as hidden

    torch.manual_seed(7)
    model, x = _mlp(), torch.randn(40, 6)
    labels = _task(model, x, 5)
    required = np.concatenate([np.full(5, 0.05), np.zeros(35)])
    out = {}
    for flag in (True, False):
        monkeypatch.setattr(hidden, "PATTERN_BOUNDS", flag)
        prog = hidden_program(model, "2", x, labels, required, 5)
        prog.warm["active"] = np.ones(len(x), bool)
        sol = solve_hidden(prog)
        assert sol.ok and sol.gap <= 1e-6
        assert (sol.size["pattern_bounds"] > 0) == flag
        out[flag] = sol.objective
    assert abs(out[True] - out[False]) <= 1e-7 * out[False]
