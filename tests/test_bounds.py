"""Bounds on the specification (margin_bounds), alpha-CROWN, batching, and CROWN against an independent textbook version."""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.bounds import textbook_crown
from cnnrepair.bounds import METHODS as BOUND_METHODS, ball_box, feature_bounds, frozen_graph, margin_bounds, margin_rows, rival_bounds, spec_bounds
from cnnrepair.certify import certify, worst_margins
from cnnrepair.repair import last_layer

from tests.helpers import pgd_in_box
from tests.test_certified import _nets

METHODS = list(BOUND_METHODS)  # every method, alpha-crown-full included


def _graph(model, x):
    return frozen_graph(model, last_layer(model, x[:2]).name, x[:2], through=True)


def _margins(model, x, y):
    with torch.no_grad():
        out = model(x.float()).double()
    own = out.gather(1, y[:, None])[:, 0]
    other = out.masked_fill(nn.functional.one_hot(y, out.shape[1]).bool(), float("-inf")).max(1).values
    return (own - other).numpy()


def _pgd_margin(model, lo, hi, y):
    """The smallest margin PGD finds in each box."""
    def lost(x):
        out = model(x)
        own = out.gather(1, y[:, None])[:, 0]
        return out.masked_fill(nn.functional.one_hot(y, out.shape[1]).bool(), float("-inf")).max(1).values - own

    return np.min([_margins(model, x, y) for x in pgd_in_box(lost, lo, hi)], axis=0)


@pytest.mark.parametrize("name", ["cnn", "residual", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_margin_bounds_hold_at_every_sampled_corner_and_pgd_point_of_the_ball(name, method):
    model = _nets()[name]
    torch.manual_seed(4)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    lo, hi = ball_box(x, 0.03)
    bound = margin_bounds(_graph(model, x), lo, hi, y.numpy(), method)
    tol = 1e-5
    for trial in range(30):
        u = torch.rand(lo.shape, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        xs = lo + (hi - lo) * (u.round() if trial % 2 else u)
        assert (bound <= _margins(model, xs, y) + tol).all()
    assert (bound <= _pgd_margin(model, lo, hi, y) + tol).all()
    assert (bound <= _margins(model, x, y) + tol).all()


@pytest.mark.parametrize("zero_rival", [False, True])
def test_each_rival_bound_holds_on_its_own_and_their_minimum_is_the_margin_bound(zero_rival):
    model = _nets()["cnn"]
    torch.manual_seed(5)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    lo, hi = ball_box(x, 0.03)
    graph = _graph(model, x)
    rows = rival_bounds(graph, lo, hi, y.numpy(), "crown", zero_rival=zero_rival)
    C = _classes(model, x)
    assert rows.shape == (5, C - 1 + int(zero_rival))
    assert np.array_equal(rows.min(1), margin_bounds(graph, lo, hi, y.numpy(), "crown", zero_rival=zero_rival))
    R = margin_rows(y.numpy(), C, zero_rival).numpy()  # the rows in the order rival_bounds bounds them
    for trial in range(20):
        u = torch.rand(lo.shape, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        with torch.no_grad():
            out = model((lo + (hi - lo) * u).float()).double().numpy()
        assert (rows <= np.einsum("nrc,nc->nr", R, out) + 1e-5).all()  # every row's bound holds on its own


def _classes(model, x) -> int:
    """How many outputs ``model`` has."""
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


@pytest.mark.parametrize("name", ["cnn", "residual", "mlp"])
def test_the_specification_bounded_itself_is_never_looser_than_the_feature_box_and_methods_tighten_in_order(name):
    model = _nets()[name]
    torch.manual_seed(5)
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    lo, hi = ball_box(x, 0.04)
    lay = last_layer(model, x[:2])
    graph = _graph(model, x)
    found = {m: margin_bounds(graph, lo, hi, y, m) for m in METHODS}
    for m in METHODS:
        box = worst_margins(feature_bounds(model, lay.name, lo, hi, m), y, lay.weight, lay.bias)
        assert (found[m] >= box - 1e-7 * (1 + np.abs(box))).all(), m  # equal for IBP, but for the widening against roundoff
    assert (found["crown"] >= found["ibp"] - 1e-9).all() and (found["alpha-crown"] >= found["crown"] - 1e-9).all()
    assert found["crown"].sum() > found["ibp"].sum()
    # every walk's slopes optimised: each box is at least CROWN's, so the relaxations after it are built on tighter boxes
    # (not tighter for every row: a ReLU's lower line may switch), and the bounds as a whole are tighter than alpha-crown's
    assert found["alpha-crown-full"].sum() > found["alpha-crown"].sum()


@pytest.mark.parametrize("name", ["cnn", "residual", "mlp"])
def test_alpha_crown_feature_bounds_are_sound_and_never_looser_than_crown(name):
    model = _nets()[name]
    torch.manual_seed(6)
    x = torch.rand(5, 1, 8, 8)
    lay = last_layer(model, x[:2])
    lo, hi = ball_box(x, 0.08)
    crown, alpha = (feature_bounds(model, lay.name, lo, hi, m) for m in ("crown", "alpha-crown"))
    assert (alpha.lower >= crown.lower - 1e-9).all() and (alpha.upper <= crown.upper + 1e-9).all()
    for trial in range(20):
        u = torch.rand(lo.shape, generator=torch.Generator().manual_seed(trial), dtype=torch.float64)
        f = lay.features((lo + (hi - lo) * (u.round() if trial % 2 else u)).float())
        assert (f >= alpha.lower - 1e-5).all() and (f <= alpha.upper + 1e-5).all()


@pytest.mark.parametrize("method", METHODS)
def test_bounds_do_not_depend_on_the_batch(method):
    """Each input's bounds are the same alone, in a small batch and in the whole batch (whose unstable neurons differ)."""
    torch.manual_seed(7)
    for name, model in _nets().items():
        x = torch.rand(7, 1, 8, 8)
        x[3:] *= 0.3  # other inputs, other unstable neurons
        lo, hi = ball_box(x, torch.linspace(0.0, 0.1, 7))
        lay = last_layer(model, x[:2])
        whole = feature_bounds(model, lay.name, lo, hi, method)
        for bs in (1, 3):
            part = feature_bounds(model, lay.name, lo, hi, method, batch_size=bs)
            assert np.allclose(part.lower, whole.lower, rtol=1e-9, atol=1e-10) and np.allclose(part.upper, whole.upper, rtol=1e-9, atol=1e-10)
        graph = _graph(model, x)
        with torch.no_grad():
            y = model(x).argmax(1).numpy()
        rows = margin_rows(y, 3 if name == "cnn" else 4 if name == "residual" else 5)
        full = spec_bounds(graph, lo, hi, rows, method)
        for i in range(7):
            one = spec_bounds(graph, lo[i:i + 1], hi[i:i + 1], rows[i:i + 1], method)
            assert torch.allclose(one[0], full[i], rtol=1e-9, atol=1e-10), (name, i)


def test_crown_is_at_least_textbook_crown_on_mlps():
    torch.manual_seed(8)
    for widths in ((30, 30), (40, 25, 20, 15)):
        layers, d = [nn.Flatten()], 64
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        model = nn.Sequential(*layers, nn.Linear(d, 6)).eval()
        x = torch.rand(10, 1, 8, 8)
        with torch.no_grad():
            y = model(x).argmax(1).numpy()
        lo, hi = ball_box(x, 0.02)
        ours = margin_bounds(_graph(model, x), lo, hi, y, "crown")
        rows = margin_rows(y, 6).numpy()
        Ws = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
        bs = [m.bias.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
        ref = np.array([textbook_crown(Ws, bs, lo[i].reshape(-1).numpy(), hi[i].reshape(-1).numpy(), rows[i]).min() for i in range(10)])
        assert (ours >= ref - 1e-7 * (1 + np.abs(ref))).all()
        assert np.abs(ours - ref).max() <= 1e-6 * (1 + np.abs(ref).max())  # the same method: the same numbers


def test_margin_bounds_of_a_tiny_network_are_exact_without_unstable_neurons_and_close_with_them():
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.tensor([[0.3, 0.6]])
    grid = torch.stack(torch.meshgrid(torch.linspace(0.2, 0.4, 201), torch.linspace(0.5, 0.7, 201), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        y = int(net(x).argmax(1))
        out = net(grid).double()
    exact = (out[:, y:y + 1] - out).numpy()
    exact = np.delete(exact, y, axis=1).min(1).min()
    lo, hi = ball_box(x, 0.1)
    graph = frozen_graph(net, "2", x, through=True)
    for m in METHODS:
        b = margin_bounds(graph, lo, hi, [y], m)[0]
        assert b <= exact + 1e-6
    b = margin_bounds(graph, lo, hi, [y], "crown")[0]
    assert exact - b <= 0.5 * abs(exact) + 0.05
    point = margin_bounds(graph, x.double(), x.double(), [y], "crown")[0]  # a box of one point: its margin
    assert np.isclose(point, _margins(net, x, torch.tensor([y]))[0], atol=1e-5)


def test_certify_and_the_ball_repair_record_the_method_and_alpha_crown_certifies_at_least_what_crown_does():
    model = _nets()["mlp"]
    torch.manual_seed(10)
    x = torch.rand(20, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    c, a = certify(model, x, y, 0.02, "crown"), certify(model, x, y, 0.02, "alpha-crown")
    assert a.method == "alpha-crown" and (a.margins >= c.margins - 1e-9).all() and a.accuracy >= c.accuracy



def test_certify_on_a_dask_cluster_gets_the_local_results():
    distributed = pytest.importorskip("distributed")
    model = _nets()["cnn"]
    torch.manual_seed(11)
    x = torch.rand(9, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    local = certify(model, x, y, 0.03, "crown")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        remote = certify(model, x, y, 0.03, "crown", scheduler=cluster.scheduler_address)
        with distributed.Client(cluster) as client:  # five batches on two workers: each traced the graph once
            traced = client.run(lambda: __import__("cnnrepair.certify", fromlist=["GRAPHS_TRACED"]).GRAPHS_TRACED)
    assert np.allclose(remote.margins, local.margins, rtol=1e-9, atol=1e-12) and remote.accuracy == local.accuracy
    assert 1 <= sum(traced.values()) <= len(traced) == 2


def test_an_unreachable_scheduler_is_one_line(monkeypatch):
    from cnnrepair.errors import CnnRepairError

    pytest.importorskip("distributed")
    monkeypatch.setattr(sys.modules["cnnrepair.certify"], "_CONNECT_S", 1)
    model = _nets()["mlp"]
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(CnnRepairError, match="could not reach the Dask scheduler"):
        certify(model, x, [0, 1], 0.01, scheduler="tcp://127.0.0.1:9")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_bounds_on_cuda_agree_with_the_cpu():
    for name, model in _nets().items():
        x = torch.rand(5, 1, 8, 8)
        with torch.no_grad():
            y = model(x).argmax(1).numpy()
        lo, hi = ball_box(x, 0.03)
        lay = last_layer(model, x[:2]).name
        for method in METHODS:
            cpu = margin_bounds(frozen_graph(model, lay, x, through=True), lo, hi, y, method)
            gpu = margin_bounds(frozen_graph(model, lay, x, through=True, device="cuda"), lo, hi, y, method)
            assert np.allclose(cpu, gpu, rtol=1e-9, atol=1e-9), (name, method)
            fc = feature_bounds(frozen_graph(model, lay, x), lay, lo, hi, method)
            fg = feature_bounds(frozen_graph(model, lay, x, device="cuda"), lay, lo, hi, method)
            assert np.allclose(fc.lower, fg.lower, rtol=1e-9, atol=1e-9) and np.allclose(fc.upper, fg.upper, rtol=1e-9, atol=1e-9)


def _conv_stack():
    """Convolutions (padding, stride 2), ReLUs and max-pools, disjoint and overlapping, then a batch norm and linear layers."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 2), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.BatchNorm2d(5), nn.Conv2d(5, 4, 1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    net[8].running_mean.uniform_(-0.5, 0.5)
    net[8].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _conv_stack_boxes(eps: float):
    """The propagate module, the conv stack's bound graph, three inputs' boxes of radius ``eps`` and their labels."""
    import importlib

    propagate = importlib.import_module("cnnrepair.bounds.propagate")
    model = _conv_stack()
    x = torch.rand(3, 1, 16, 16)
    lo, hi = ball_box(x, eps)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    return propagate, _graph(model, x), lo, hi, y


@pytest.mark.parametrize("method, budget", [("crown", None), ("crown", 40), ("alpha-crown-full", None)])
def test_convolution_neurons_walked_in_windows_get_the_bounds_of_the_rows_written_out_whole(monkeypatch, method, budget):
    """CROWN's walk from convolution neurons in windows of their receptive field is the same walk without the zeros: every
    node's bounds and the specification's agree with the dense walk to roundoff, blocks at the map's edges and one-row
    chunks (``budget``: a tiny memory budget, one position per block) included; with every walk's slopes optimised
    (alpha-crown-full), slopes held on each walk's windows reach the same bounds as slopes over the whole map."""
    propagate, graph, lo, hi, y = _conv_stack_boxes(0.1)
    alpha = propagate.AlphaSettings(steps=5) if method in propagate.ALPHA_METHODS else None
    if budget is not None:
        monkeypatch.setattr(propagate, "memory_budget", lambda device="cpu": budget)
    walked = []
    by_window = propagate._tighten_by_window
    monkeypatch.setattr(propagate, "_tighten_by_window", lambda *a: walked.append(a[2]) or by_window(*a))
    out = {}
    for windows in (True, False):
        monkeypatch.setattr(propagate, "WINDOWS", windows)
        graph.cache.clear()
        out[windows] = (propagate.node_bounds(graph, lo, hi, method, alpha),
                        spec_bounds(graph, lo, hi, margin_rows(y, 3), method, alpha))
    convs = [op.node for op in graph.ops if op.window is not None]
    walks = convs[1:3]  # the first is exact (its input is the box); the last has no unstable neuron in IBP's box already
    assert len(convs) == 4 and set(walked) == set(walks)
    (win_nodes, win_spec), (dense_nodes, dense_spec) = out[True], out[False]
    for node, (l_d, h_d) in dense_nodes.items():
        l_w, h_w = win_nodes[node]
        assert torch.allclose(l_w, l_d, rtol=1e-12, atol=1e-12) and torch.allclose(h_w, h_d, rtol=1e-12, atol=1e-12), node
    assert torch.allclose(win_spec, dense_spec, rtol=1e-12, atol=1e-12)
    ibp = propagate.node_bounds(graph, lo, hi, "ibp")
    assert all(float((dense_nodes[n][1] - dense_nodes[n][0]).sum()) < 0.999 * float((ibp[n][1] - ibp[n][0]).sum())
               for n in walks)  # every walk tightened IBP's box
    if alpha is not None:  # and the windows' slopes moved: tighter than CROWN on the walked convolution and after it
        crown = propagate.node_bounds(graph, lo, hi, "crown")
        width = lambda b, n: float((b[n][1] - b[n][0]).sum())  # noqa: E731
        assert all(width(win_nodes, n) < width(crown, n) for n in (walks[0], graph.target))


@pytest.mark.parametrize("features", [False, True])
def test_crown_walks_every_neuron_whose_box_a_max_pool_reads_through_its_relu(monkeypatch, features):
    """CROWN walks back only the neurons whose box matters; a stable neuron's ReLU is exact, but a max-pool after it
    builds its relaxation from the ReLU's output box, so the neurons that are not dead must be walked too (they once were
    not: the paper's MNIST CNN got looser bounds than auto_LiRPA's CROWN). The bounds equal those of walking every
    neuron of every layer, and are tighter than without the live neurons."""
    propagate, graph, lo, hi, y = _conv_stack_boxes(0.02)
    rows = margin_rows(y, 3)
    plan = propagate._plan

    def bound(rule):
        graph.cache.clear()
        monkeypatch.setattr(propagate, "_plan", lambda g, f: rule(plan(g, f)))
        nodes = propagate.node_bounds(graph, lo, hi, "crown", features=features)
        return nodes, spec_bounds(graph, lo, hi, rows, "crown")

    every = propagate._Plan({n: "all" for n, w in plan(graph, features).widen.items() if w}, plan(graph, features).widen, {})
    (nodes, spec), (all_nodes, all_spec) = bound(lambda p: p), bound(lambda p: every)
    live = [n for n, v in plan(graph, features).need.items() if v == "live"]
    assert live  # the convolution before the overlapping max-pool
    assert torch.allclose(spec, all_spec, rtol=1e-9, atol=1e-9)
    for n in live:  # its ReLU's output box, the max-pool's input, as tight as walking everything
        assert torch.allclose(nodes[n][1].clamp(min=0), all_nodes[n][1].clamp(min=0), rtol=1e-9, atol=1e-9)
        assert torch.allclose(nodes[n][0].clamp(min=0), all_nodes[n][0].clamp(min=0), rtol=1e-9, atol=1e-9)
    unstable_only = lambda p: propagate._Plan({n: ("unstable" if v == "live" else v) for n, v in p.need.items()}, p.widen, p.final)
    _, loose = bound(unstable_only)
    assert float(spec.sum()) > float(loose.sum()) + 1e-6  # the live neurons' walks tighten the specification's bound


def test_a_convolutions_window_adjoint_is_its_dense_adjoint_cropped():
    """On every corner and edge of the map: the window's rows on the input, written out whole, are the dense adjoint's."""
    from cnnrepair.bounds.window import Window

    model = _conv_stack()
    x = torch.rand(2, 1, 16, 16)
    graph = _graph(model, x)
    for op in (o for o in graph.ops if o.window is not None):
        src_shape = graph.op(op.inputs[0]).shape
        C, H, W = op.shape
        for top, left, h, w in ((0, 0, 1, 1), (H - 1, W - 1, 1, 1), (0, max(0, W - 2), min(2, H), min(2, W)), (H // 2, 0, 1, W)):
            a = torch.randn(2, 3, C, h, w, dtype=torch.float64)
            win = Window(a, top, left, (C, H, W))
            got, const = op.window(win, src_shape)
            grad, bias = op.transpose(win.dense().reshape(6, C, H, W), src_shape)
            assert torch.allclose(got.dense(), grad.reshape(2, 3, *src_shape), atol=1e-12)
            assert torch.allclose(const, win.dense().reshape(2, 3, -1) @ bias.reshape(-1), atol=1e-12)
