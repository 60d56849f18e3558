"""The network after a layer, as a function of that layer's output (and of later biases' changes).

A repair of a layer inside the network needs the part of the graph that depends on the layer's
output: :func:`build_suffix` cuts it out of the model's ``torch.export`` graph, checks that every
operator in it is piecewise linear (the bound rules' classification; others are named and refused),
and returns it as a function ``(x, z, *e) -> (logits, every ReLU input, every max-pool input)``,
where ``e`` adds a per-point change to the output of each later layer whose bias may move. The same
cut lists the layers a repair can edit (:func:`repairable_layers`), reads a model's activation
pattern after a layer (:func:`patterns`) and counts how it changed (:func:`pattern_changes`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnrepair.bounds.graph import classify_node, export_graph
from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.layer import get_tensor
from cnnrepair.runtime import eval_mode

aten = torch.ops.aten
LINEAR = {aten.linear.default}
CONV = {aten.conv2d.default, aten.convolution.default}
RELU = {aten.relu.default, aten.relu_.default}
MAXPOOL = {aten.max_pool2d.default, aten.max_pool2d_with_indices.default}
# what may end the model after its logits (cnnrepair.repair.ending): the suffix stops before it, and the program is told
ENDING_OPS = {aten.relu.default: "relu", aten.relu_.default: "relu", aten._softmax.default: "softmax", aten.softmax.int: "softmax",
              aten._log_softmax.default: "log_softmax", aten.log_softmax.int: "log_softmax"}


@dataclass(frozen=True)
class LayerInfo:
    """A layer repair can edit: its name (the weight's module path), kind, weight shape, and the layers after it."""

    name: str
    kind: str  # linear | conv2d
    weight_shape: tuple[int, ...]
    after: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape), "after": list(self.after)}


def attr(node) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def weighted_nodes(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """Linear and convolution calls on stored weights, by the weight's module path, in graph order."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR | CONV:
            continue
        weight = attr(node.args[1])
        if weight and weight.rpartition(".")[2] == "weight":
            found[weight.rpartition(".")[0]] = node
    return found


def repairable_layers(model: nn.Module, sample: Tensor) -> list[LayerInfo]:
    """Every linear and convolution layer of ``model`` in model order (what ``--layer`` accepts)."""
    gm = export_graph(model, torch.as_tensor(sample)[:2])
    nodes = weighted_nodes(gm)
    names = list(nodes)
    out = []
    for i, (name, node) in enumerate(nodes.items()):
        w = get_tensor(gm, attr(node.args[1]))
        out.append(LayerInfo(name, "linear" if node.target in LINEAR else "conv2d", tuple(w.shape), tuple(names[i + 1:])))
    return out


@dataclass
class Suffix:
    """The network after the layer, as a function of ``(x, z)``: the logits, then every ReLU and max-pool input."""

    module: torch.fx.GraphModule
    relus: list[int]  # positions (in the outputs after the logits) of ReLU inputs
    pools: list[tuple[int, tuple]]  # positions of max-pool inputs, with (kernel, stride, padding, dilation)
    added: list[tuple[int, ...]] = field(default_factory=list)  # per later layer whose bias may move: its per-point shape
    ending: str = "none"  # a ReLU, softmax or log-softmax after the logits (the suffix's first output is before it)
    logits_node: object = None  # the graph's node whose value the first output reproduces

    def __call__(self, x: Tensor, z: Tensor, *e: Tensor) -> tuple[Tensor, ...]:
        """The outputs at ``(x, z)``, each later bias changed by ``e`` (per point; zero when not given)."""
        if len(e) < len(self.added):
            e = (*e, *(torch.zeros((len(z), *shape), dtype=z.dtype) for shape in self.added[len(e):]))
        out = self.module(x, z, *e)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def later_biased(gm: torch.fx.GraphModule, layer: torch.fx.Node) -> list[torch.fx.Node]:
    """The linear and convolution calls after ``layer`` (depending on its output) that add a stored bias."""
    dep = {layer}
    for node in gm.graph.nodes:
        if node is not layer and node.op == "call_function" and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return [n for n in weighted_nodes(gm).values() if n in dep and n is not layer and len(n.args) > 2 and attr(n.args[2])]


def build_suffix(gm: torch.fx.GraphModule, layer: torch.fx.Node, values: dict, name: str,
            add_to: list[torch.fx.Node] | tuple = ()) -> Suffix:
    """The part of the graph that depends on the layer's output, checked to be piecewise linear (named operators refused);
    ``values``: every node's value on the points (:func:`node_values`); ``add_to``: later layers whose output gets a
    per-point input added (their bias changes)."""
    dep = {layer}
    for node in gm.graph.nodes:
        if node is not layer and node.op == "call_function" and any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = out_node.args[0]
    logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    if logits not in dep:
        raise CnnRepairError(f"the model's output does not depend on layer {name!r}; nothing to repair there")
    end_node, ending = _ending_node(logits, layer, values)
    if end_node is not None:
        logits = end_node.args[0]
    consts = {n: v for n, v in values.items() if n not in dep}
    watched, relus, pools = [], [], []
    for node in gm.graph.nodes:
        if node not in dep or node is layer or node is end_node:
            continue
        deps = [a for a in node.all_input_nodes if a in dep]
        val = values.get(node)
        val = val[0] if isinstance(val, (tuple, list)) and val else val
        shape = tuple(val.shape[1:]) if isinstance(val, Tensor) else ()
        try:
            op = classify_node(node, deps, consts, shape)
        except CnnRepairError as exc:
            raise CnnRepairError(f"after layer {name!r}: {exc}; repair of a layer needs the network after it to be piecewise "
                                 "linear (linear, convolution, ReLU, max/average pooling, batch norm, reshapes, sums)") from None
        if op.kind not in ("affine", "sum", "relu", "maxpool"):
            raise CnnRepairError(f"after layer {name!r}: operator {node.target} is not piecewise linear; the pattern encoding "
                                 "covers linear, convolution, ReLU, max/average pooling, batch norm, reshapes and sums")
        if node.target in RELU:
            relus.append(len(watched))
            watched.append(node.args[0])
        elif node.target in MAXPOOL:
            a = list(node.args) + [None] * 6
            kernel = a[1]
            stride = a[2] or kernel
            pad = a[3] if a[3] is not None else 0
            dil = a[4] if a[4] is not None else 1
            if a[5]:
                raise CnnRepairError(f"after layer {name!r}: max-pooling with ceil_mode is not supported by the pattern encoding")
            pools.append((len(watched), tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in (kernel, stride, pad, dil))))
            watched.append(node.args[0])
    g = torch.fx.Graph()
    env: dict = {}
    x_in, z_in = g.placeholder("x"), g.placeholder("z")
    e_in = {n: g.placeholder(f"e{i}") for i, n in enumerate(add_to)}
    added = []
    for n in add_to:
        out = values[n]
        added.append((out.shape[1],) + (1,) * (out.ndim - 2))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = x_in
        elif node is layer:
            env[node] = z_in
        elif node.op in ("output", "call_module"):
            continue
        else:
            env[node] = g.node_copy(node, lambda n: env[n])
            if node in e_in:
                env[node] = g.call_function(aten.add.Tensor, (env[node], e_in[node]))
    g.output((env[logits], *[env[w] for w in watched]))
    module = torch.fx.GraphModule(gm, g)
    module.graph.eliminate_dead_code()
    module.recompile()
    return Suffix(module, relus, pools, added, ending, logits)


def _ending_node(out: torch.fx.Node, layer: torch.fx.Node, values: dict) -> tuple[torch.fx.Node | None, str]:
    """The model's output node when it is a registered ending (a ReLU, or a softmax / log-softmax over the last axis) of
    something after ``layer``, and that ending's name; (None, "none") otherwise."""
    name = ENDING_OPS.get(out.target) if isinstance(out, torch.fx.Node) and out.op == "call_function" else None
    if name is None or not isinstance(out.args[0], torch.fx.Node) or out.args[0] is layer:
        return None, "none"
    if name != "relu":
        val = values.get(out)
        dim = out.args[1] if len(out.args) > 1 else out.kwargs.get("dim")
        if not isinstance(val, Tensor) or not isinstance(dim, int) or dim % val.ndim != val.ndim - 1:
            return None, "none"
    return out, name


def traced(model: nn.Module, x: Tensor) -> torch.fx.GraphModule:
    """``model`` as an ATen graph for exactly this batch of points (a graph module, e.g. a loaded .pt2, as it is)."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    return export_graph(model, x)


def node_values(gm: torch.fx.GraphModule, x: Tensor) -> dict:
    """Every node's value on a batch."""
    seen = {}

    class Catch(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n] = out
            return out

    with torch.no_grad():
        Catch(gm).run(x)
    return seen


@functools.lru_cache(maxsize=64)
def pool_windows(shape: tuple[int, ...], pool: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per max-pool output (flattened), the flat indices of its window's inputs (-1: padding) and their validity."""
    kernel, stride, pad, dil = pool
    C, H, W = shape
    idx = torch.arange(1, C * H * W + 1, dtype=torch.float64).reshape(C, 1, H, W)
    cols = F.unfold(idx, kernel, dilation=dil, padding=pad, stride=stride)  # C x (kh*kw) x L; 0 = padding
    win = cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).long() - 1  # (C*L) x (kh*kw)
    return win.numpy(), (win >= 0).numpy()



def _watched(model: nn.Module, name: str, x: Tensor) -> tuple[Suffix, tuple]:
    eval_mode(model)
    gm = traced(model, x)
    node = weighted_nodes(gm)[name]
    vals = node_values(gm, x)
    suf = build_suffix(gm, node, vals, name)
    with torch.no_grad():
        outs = suf(x, vals[node])
    return suf, outs


def suffix_ending(model: nn.Module, name: str, x: Tensor) -> str:
    """What ends the model after its logits, as a repair of layer ``name`` sees it (``none``, ``relu``, ``softmax``, ...)."""
    return _watched(model, name, x)[0].ending


def patterns(model: nn.Module, name: str, x: Tensor) -> list[np.ndarray]:
    """The activation pattern after layer ``name`` of ``model`` at inputs ``x``: per ReLU, which neurons are on;
    per max-pool, each window's chosen input (flat index)."""
    suf, outs = _watched(model, name, x)
    res = []
    for o in suf.relus:
        res.append((outs[1 + o].reshape(len(x), -1) > 0).numpy())
    for o, pool in suf.pools:
        win, valid = pool_windows(tuple(outs[1 + o].shape[1:]), pool)
        p = outs[1 + o].reshape(len(x), -1).double().numpy()
        safe = np.where(valid, win, 0)
        res.append(safe[np.arange(len(win))[None, :], np.where(valid[None], p[:, safe], -np.inf).argmax(2)])
    return res


def pattern_changes(original: nn.Module, repaired: nn.Module, name: str, x: Tensor, rtol: float = 1e-5) -> tuple[int, int]:
    """(activation states after layer ``name`` that differ between the two models at ``x`` beyond float32 rounding, total).

    A ReLU input within ``rtol`` (of its layer's scale) of 0 in either model may read either way (ReLU is continuous
    there); a max-pool window whose originally chosen input ties the new maximum within ``rtol`` is not a change."""
    suf0, o0 = _watched(original, name, x)
    _, o1 = _watched(repaired, name, x)
    changed = total = 0
    for o in suf0.relus:
        p0 = o0[1 + o].reshape(len(x), -1).double().numpy()
        p1 = o1[1 + o].reshape(len(x), -1).double().numpy()
        tol = rtol * (1 + np.abs(p0).max(initial=0.0))
        changed += int((((p0 > 0) != (p1 > 0)) & (np.abs(p0) > tol) & (np.abs(p1) > tol)).sum())
        total += p0.size
    for o, pool in suf0.pools:
        win, valid = pool_windows(tuple(o0[1 + o].shape[1:]), pool)
        safe = np.where(valid, win, 0)
        p0 = o0[1 + o].reshape(len(x), -1).double().numpy()
        p1 = o1[1 + o].reshape(len(x), -1).double().numpy()
        chosen = safe[np.arange(len(win))[None, :], np.where(valid[None], p0[:, safe], -np.inf).argmax(2)]
        best1 = np.where(valid[None], p1[:, safe], -np.inf).max(2)
        tol = rtol * (1 + np.abs(p1).max(initial=0.0))
        changed += int((np.take_along_axis(p1, chosen, 1) < best1 - tol).sum())
        total += chosen.size
    return changed, total


@dataclass(frozen=True)
class LayerRef:
    """A linear or convolution layer of a model by name: its weight and bias (float64) and the tensors that hold them."""

    name: str
    kind: str
    weight: np.ndarray
    bias: np.ndarray
    params: tuple[str, str | None]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def parameter_names(self) -> tuple[str, str | None]:
        return self.params


def layer_ref(model: nn.Module, sample: Tensor, name: str) -> LayerRef:
    """Layer ``name`` of ``model`` (a linear or convolution layer anywhere in it)."""
    gm = export_graph(model, torch.as_tensor(sample)[:2])
    nodes = weighted_nodes(gm)
    if name not in nodes:
        raise CnnRepairError(f"no linear layer named {name!r} in the model (linear and convolution layers: {', '.join(nodes) or 'none'})")
    node = nodes[name]
    wp = attr(node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bp = attr(bias_node)
    W = get_tensor(model, wp).detach().double().cpu().numpy().copy()
    b = get_tensor(model, bp).detach().double().cpu().numpy().copy() if bp else np.zeros(W.shape[0])
    return LayerRef(name, "hidden-" + ("linear" if node.target in LINEAR else "conv2d"), W, b, (wp, bp))


