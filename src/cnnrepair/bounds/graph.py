"""The frozen part of a classifier as a graph the bound methods can walk.

Any model (an ``nn.Module``, a module read from ONNX, a ``torch.export`` program) is exported to
an ATen graph; :func:`frozen_graph` keeps the nodes between the input and the input of the layer
being repaired and sorts each into one of a few kinds the bound methods know:

* ``affine``: a map that is affine in its one input-dependent argument (convolution, linear,
  batch norm in eval mode, average pooling, flatten/reshape, adding, multiplying or dividing by a
  stored tensor: the normalisation layers of most models); ``apply`` runs it on a batch, and
  ``abs_linear`` applies ``|L|`` (the absolute value of its linear part) for interval arithmetic.
* ``sum``: the sum (or difference) of two input-dependent tensors (residual connections).
* ``relu`` and ``maxpool``: the non-linear operations, relaxed by each method in its own way.

Everything else is refused with the operator's name: a bound is only as sound as the rules applied.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnrepair.bounds.window import ConvWindow
from cnnrepair.errors import CnnRepairError
from cnnrepair.graph_linear import linear_nodes

aten = torch.ops.aten

# affine maps whose linear part has a signed weight tensor at args[1]: |L| is the same call with |weight|, no bias
_WEIGHTED = {aten.conv2d.default, aten.conv1d.default, aten.linear.default, aten.convolution.default}
# affine maps whose linear part has non-negative coefficients: |L| x = L x
_MONOTONE = {
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.transpose.int, aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
    aten.dropout.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
    aten.mean.dim, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.to.dtype, aten._to_copy.default,
    aten.to.dtype_layout, aten.add.Tensor, aten.sub.Tensor, aten.feature_dropout.default,
}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
# single-input maps that only move, copy or cast values (a feature vector's bounds are their input's)
PASS_THROUGH = {aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
                aten.clone.default, aten.alias.default, aten.detach.default, aten.dropout.default, aten.feature_dropout.default,
                aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, operator.getitem} | _CASTS
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SCALE = {aten.mul.Tensor, aten.div.Tensor}
_BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_RELU = {aten.relu.default, aten.relu_.default}
_MAXPOOL = {aten.max_pool2d.default, aten.max_pool2d_with_indices.default}
_SKIP = {aten._assert_tensor_metadata.default}
_PADS = {aten.pad.default, aten.constant_pad_nd.default}  # zero padding: linear, with 0/1 coefficients
_AVERAGES = {aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.mean.dim}


@dataclass
class Op:
    """One input-dependent node: its kind, the input-dependent arguments and how to run it."""

    node: torch.fx.Node
    kind: str  # input | affine | sum | relu | maxpool
    inputs: list[torch.fx.Node]
    run: object = None  # affine: x -> L x + c on a batch; maxpool: its (kernel, stride, padding, dilation, ceil)
    abs_linear: object = None  # affine: x -> |L| x
    signs: tuple[float, ...] = (1.0, 1.0)  # sum: coefficient of each input
    linear: object = None  # affine: x -> L x, the linear part (no constant)
    transpose: object = None  # affine, optional: (rows of coefficients on the output, input shape) -> (L^T rows, constant c or None)
    rows_of: object = None  # affine, optional: (B x S output neuron indices, input shape) -> (their rows of L, B x S x input shape; c, B x S)
    window: object = None  # affine, optional: (a Window of rows on the output, input shape) -> (their Window on the input, constant B x S)
    shape: tuple[int, ...] = ()  # per-example output shape
    diagonal: bool = False  # affine: each output is one input times a constant plus a constant (the image of a box is a box)


@dataclass
class FrozenGraph:
    """The ops from the input to ``target`` (the repaired layer's input), in topological order."""

    ops: list[Op]
    target: torch.fx.Node
    input_shape: tuple[int, ...]
    constants: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # what the bound passes derive from the graph alone
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where its stored tensors are

    def op(self, node: torch.fx.Node) -> Op:
        return self._index[node]

    def upto(self, node: torch.fx.Node) -> list[Op]:
        """The ops from the input to ``node``, ``node``'s own included (what a walk back from it crosses)."""
        return self.ops[:self._position[node] + 1]

    def widest(self, node: torch.fx.Node | None = None) -> int:
        """Values per example of the widest op up to ``node`` (default: the whole graph)."""
        ops = self.ops if node is None else self.upto(node)
        return max(int(np.prod(op.shape)) if op.shape else 1 for op in ops)

    def __post_init__(self) -> None:
        self._index = {op.node: op for op in self.ops}
        self._position = {op.node: i for i, op in enumerate(self.ops)}


def export_graph(model: nn.Module, sample: Tensor) -> torch.fx.GraphModule:
    """``model`` as an ATen graph (``torch.export``; a graph module as it is), traced on ``sample``: one-line error if it cannot be."""
    if isinstance(model, torch.fx.GraphModule):
        return model
    try:
        return torch.export.export(model, (sample,)).module()
    except Exception as exc:  # noqa: BLE001 - the exporter's many failure types mean one thing to the user
        where = "".join(f" {note}" for note in getattr(exc, "__notes__", []) if note.startswith("in ONNX node"))
        raise CnnRepairError(f"the model could not be traced to an ATen graph ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                             f"{where}; export it with torch.export first") from None


def _get_attr(gm: torch.fx.GraphModule, target: str) -> Tensor:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def frozen_graph(model: nn.Module, layer: str, sample: Tensor, through: bool = False, device: str | torch.device = "cpu") -> FrozenGraph:
    """The graph of ``model`` up to the input of its linear layer ``layer`` (a name from ``candidate_layers``), or with
    ``through`` up to its output (the logits, when the layer ends the model: what a specification is written on).
    Its stored tensors are put on ``device`` (``cuda``: the bounds are computed there)."""
    gm = export_graph(model, sample[:2].float())
    lins = linear_nodes(gm)
    if layer not in lins:
        raise CnnRepairError(f"layer {layer!r} is not a linear layer of the traced model (found: {', '.join(lins) or 'none'}); "
                             "bounds need the features of a linear last layer (an RBF head's kernel values are not supported)")
    target = lins[layer].out if through else lins[layer].inp
    needed = _ancestors(target)
    consts: dict[torch.fx.Node, object] = {}
    ops: list[Op] = []
    dep: set[torch.fx.Node] = set()
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise CnnRepairError(f"the model takes {len(inputs)} inputs; bounds need a classifier with one input tensor")
    shapes = _shapes(gm, sample[:2].float(), needed)
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "placeholder":
            ops.append(Op(node, "input", [], shape=tuple(sample.shape[1:])))
            dep.add(node)
        elif node.op == "get_attr":
            consts[node] = _as64(_get_attr(gm, str(node.target)), device)
        elif node.op == "call_module":
            continue
        elif node.op == "call_function":
            if node.target in _SKIP:
                continue
            args_dep = [a for a in _flat_args(node) if isinstance(a, torch.fx.Node) and a in dep]
            if not args_dep:
                consts[node] = _as64(_run_const(node, consts), device)
                continue
            op = classify_node(node, args_dep, consts, shapes[node])
            op.shape = shapes[node]
            if op.diagonal and node.target not in _PADS and any(np.prod(shapes[n]) != np.prod(op.shape) for n in op.inputs):
                op.diagonal = False  # broadcast to more values: each one still exact, but not a box
            ops.append(op)
            dep.add(node)
        else:
            raise CnnRepairError(f"unexpected graph node {node.op} {node.target}; bound propagation cannot read this model")
    if target not in dep:
        raise CnnRepairError(f"layer {layer!r} does not depend on the model's input; nothing to bound")
    return FrozenGraph(ops, target, tuple(sample.shape[1:]), consts, device=torch.device(device))


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _shapes(gm: torch.fx.GraphModule, sample: Tensor, needed: set) -> dict:
    """Per-example output shape of every needed node, from one run of the graph."""
    shapes = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in needed and isinstance(out, Tensor):
                shapes[n] = tuple(out.shape[1:])
            elif n in needed and isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
                shapes[n] = tuple(out[0].shape[1:])
            return out

    with torch.no_grad():
        Record(gm).run(sample)
    return shapes


def _as64(v, device="cpu"):
    if not isinstance(v, Tensor):
        return v
    return (v.detach().double() if v.is_floating_point() else v).to(device)


def _flat_args(node: torch.fx.Node) -> list:
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _sub(value, consts):
    if isinstance(value, torch.fx.Node):
        return consts[value]
    if isinstance(value, (list, tuple)):
        return type(value)(_sub(v, consts) for v in value)
    return value


def _run_const(node: torch.fx.Node, consts: dict):
    args = _sub(node.args, consts)
    kwargs = {k: _sub(v, consts) for k, v in node.kwargs.items()}
    if node.target is operator.getitem:
        return args[0][args[1]]
    return node.target(*args, **kwargs)


@dataclass
class Site:
    """A node being classified for the bounds: its input-dependent arguments (``deps``), the constants,
    its per-example output shape, and for a node with one input-dependent argument, which (``src``, at
    position ``pos`` of its arguments) and how to call it on a batch (``call``, ``run``)."""

    node: torch.fx.Node
    deps: list[torch.fx.Node]
    consts: dict
    shape: tuple[int, ...]

    @property
    def single(self) -> bool:
        return len(self.deps) == 1

    @property
    def src(self) -> torch.fx.Node:
        return self.deps[0]

    @property
    def pos(self) -> int | None:
        return next(i for i, a in enumerate(self.node.args) if a is self.src) if self.src in self.node.args else None

    def call(self, x, replace=None):
        node, t = self.node, self.node.target
        args = list(_sub(list(node.args), {**self.consts, self.src: x}))
        if replace:
            for i, v in replace.items():
                args[i] = v
        if t in _RESHAPES:  # the batch may differ from the traced one; every other size is the traced example's
            args[1] = [-1, *self.shape]
        return t(*args, **{k: _sub(v, self.consts) for k, v in node.kwargs.items()})

    def run(self, x):
        if self.node.target in _CASTS:  # bounds stay in float64: a cast to the model's dtype would round them
            return x
        out = self.call(x)
        return out[0] if isinstance(out, (tuple, list)) else out


# -- the rule registry: for each ATen target, the rules that may classify its node, tried in order --
Rule = Callable[[Site], "Op | None"]
RULES: dict[object, list[Rule]] = {}


def bound_rule(*targets) -> Callable[[Rule], Rule]:
    """Register the decorated function as a rule for nodes calling one of ``targets``: it returns the
    node's :class:`Op` (a kind the bound methods know and how to run it), or None to leave the node to
    the next rule. A node that no rule classifies is refused with its operator's name."""

    def register(fn: Rule) -> Rule:
        for t in targets:
            RULES.setdefault(t, []).append(fn)
        return fn

    return register


def classify_node(node: torch.fx.Node, deps: list[torch.fx.Node], consts: dict, shape: tuple[int, ...]) -> Op:
    """The node's :class:`Op` by the first registered rule that takes it; a node no rule takes is refused by name."""
    site = Site(node, deps, consts, shape)
    for rule in RULES.get(node.target, ()):
        op = rule(site)
        if op is not None:
            return op
    if not site.single:
        raise CnnRepairError(f"operator {node.target} combines {len(deps)} input-dependent tensors; bound propagation supports sums only")
    if site.pos is None:
        raise CnnRepairError(f"operator {node.target} takes the input-dependent tensor in an unsupported position")
    raise CnnRepairError(f"operator {node.target} is not supported by the bound propagation (supported: convolution, linear, batch norm, "
                         "average and max pooling, ReLU, reshapes, sums, and scaling by stored tensors)")


@bound_rule(operator.getitem)
def _getitem(site: Site) -> Op:
    src = site.node.args[0]
    if site.node.args[1] != 0:
        raise CnnRepairError(f"output {site.node.args[1]} of {src.target} is not supported by the bound propagation")
    return Op(site.node, "affine", [src], run=lambda x: x, abs_linear=lambda x: x, linear=lambda x: x, diagonal=True)


@bound_rule(*_RELU)
def _relu(site: Site) -> Op:
    return Op(site.node, "relu", site.deps)


@bound_rule(*_MAXPOOL)
def _maxpool(site: Site) -> Op:
    a = list(site.node.args) + [None] * 6
    kernel = a[1]
    stride = a[2] or kernel
    pool = (kernel, stride, a[3] if a[3] is not None else 0, a[4] if a[4] is not None else 1, bool(a[5]))
    return Op(site.node, "maxpool", [site.node.args[0]], run=pool)


@bound_rule(aten.add.Tensor, aten.sub.Tensor)
def _sum(site: Site) -> Op | None:
    node = site.node
    if len(site.deps) == 2 and node.args[0] in site.deps and node.args[1] in site.deps:
        alpha = float(node.kwargs.get("alpha", 1.0))
        return Op(node, "sum", [node.args[0], node.args[1]], signs=(1.0, alpha if node.target == aten.add.Tensor else -alpha))
    return None


def _at(site: Site, *positions: int) -> bool:
    """A node with one input-dependent argument, at one of ``positions``."""
    return site.single and site.pos in positions


@bound_rule(*_WEIGHTED)
def _weighted(site: Site) -> Op | None:
    if not _at(site, 0):
        return None
    node, consts = site.node, site.consts

    def abs_lin(x):
        return site.call(x, {1: consts[node.args[1]].abs(), 2: None})

    return Op(node, "affine", [site.src], run=site.run, abs_linear=abs_lin, linear=lambda x: site.call(x, {2: None}),
              transpose=_weighted_transpose(node, consts), rows_of=_weighted_rows(node, consts), window=_weighted_window(node, consts))


@bound_rule(*(PASS_THROUGH - {operator.getitem}))
def _pass_through(site: Site) -> Op | None:
    if not _at(site, 0):
        return None
    return Op(site.node, "affine", [site.src], run=site.run, abs_linear=site.run, linear=site.run,
              transpose=lambda a, shape: (a.reshape(len(a), *shape), None), diagonal=True)


@bound_rule(*_BATCH_NORM)
def _batch_norm(site: Site) -> Op | None:
    if not _at(site, 0):
        return None
    node, t = site.node, site.node.target

    def bn_scale(x):
        args = list(_sub(list(node.args), {**site.consts, site.src: x}))
        w, var, eps = args[1], args[4], args[7] if t == aten.batch_norm.default else args[6]
        scale = (w if w is not None else 1.0) / torch.sqrt(var + eps)
        return scale.reshape(1, -1, *([1] * (x.ndim - 2)))

    return Op(node, "affine", [site.src], run=site.run, abs_linear=lambda x: x * bn_scale(x).abs(), linear=lambda x: x * bn_scale(x),
              diagonal=True)


@bound_rule(*_SCALE)
def _scale(site: Site) -> Op | None:
    if not site.single or site.pos is None:
        return None
    node, t, pos = site.node, site.node.target, site.pos
    c = torch.as_tensor(_sub(node.args[1 - pos], site.consts), dtype=torch.float64)
    if t == aten.div.Tensor and pos == 1:
        raise CnnRepairError("dividing by an input-dependent tensor is not supported by the bound propagation")
    k = c if t == aten.mul.Tensor else 1.0 / c
    return Op(node, "affine", [site.src], run=site.run, abs_linear=lambda x: x * k.abs(), linear=lambda x: x * k, diagonal=True)


@bound_rule(aten.neg.default, aten.sub.Tensor)
def _negation(site: Site) -> Op | None:
    if not site.single or site.pos is None or (site.node.target == aten.sub.Tensor and site.pos != 1):
        return None
    return Op(site.node, "affine", [site.src], run=site.run, abs_linear=lambda x: x, linear=lambda x: -x, diagonal=True)


@bound_rule(aten.matmul.default, aten.mm.default)
def _matmul(site: Site) -> Op | None:
    if not _at(site, 0):
        return None
    t, w = site.node.target, site.consts[site.node.args[1]]
    return Op(site.node, "affine", [site.src], run=site.run, abs_linear=lambda x: t(x, w.abs()), linear=lambda x: t(x, w))


@bound_rule(*_PADS)
def _pad(site: Site) -> Op | None:
    if not _at(site, 0):
        return None
    node, t = site.node, site.node.target
    value = node.args[3] if t == aten.pad.default and len(node.args) > 3 else node.args[2] if t == aten.constant_pad_nd.default \
        and len(node.args) > 2 else node.kwargs.get("value", 0.0)
    mode = node.args[2] if t == aten.pad.default and len(node.args) > 2 else node.kwargs.get("mode", "constant")
    if mode != "constant" or (value not in (None, 0, 0.0) and any(node.args[1])):
        raise CnnRepairError(f"padding with mode {mode!r} and value {value!r} is not supported by the bound propagation (zero padding is)")
    return Op(node, "affine", [site.src], run=site.run, abs_linear=site.run, linear=site.run, diagonal=True)


@bound_rule(*_MONOTONE)
def _monotone(site: Site) -> Op | None:
    if not site.single or site.pos is None or not (site.pos == 0 or site.node.target == aten.add.Tensor):
        return None
    zero_shift = {}

    def abs_mono(x):
        if "c" not in zero_shift:
            zero_shift["c"] = site.run(torch.zeros_like(x[:1]))
        return site.run(x) - zero_shift["c"]

    return Op(site.node, "affine", [site.src], run=site.run, abs_linear=abs_mono, linear=abs_mono,
              diagonal=site.node.target not in _AVERAGES)


def pair(v) -> tuple[int, int]:
    """A 2-d setting (kernel, stride, padding, dilation) as (height, width), however the node wrote it."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v, v)


def _conv_args(node: torch.fx.Node) -> tuple:
    """A 2-d convolution node's (stride, padding, dilation, groups), ATen's defaults where the node leaves them out; stride,
    dilation and a numeric padding as (height, width) pairs (a padding such as "same" stays a string)."""
    a = list(node.args) + [None] * 7
    padding = a[4] or [0, 0]
    return pair(a[3] or [1, 1]), padding if isinstance(padding, str) else pair(padding), pair(a[5] or [1, 1]), a[6] or 1


def _bias(node: torch.fx.Node, consts: dict) -> Tensor | None:
    """A linear layer's or convolution's bias, None when it has none."""
    bias_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return consts.get(bias_arg) if isinstance(bias_arg, torch.fx.Node) else None


def _weighted_transpose(node: torch.fx.Node, consts: dict):
    """The adjoint of a linear layer or 2-d convolution, applied to rows of output coefficients."""
    t = node.target
    w, b = consts[node.args[1]], _bias(node, consts)
    if t == aten.linear.default:
        return lambda a, shape: (a @ w, None if b is None else b)
    if t != aten.conv2d.default:
        return None
    st, pd, dl, groups = _conv_args(node)
    if isinstance(pd, str):
        return None

    def adjoint(rows, shape):
        h, wd = shape[-2:]
        k = w.shape[-2:]
        out_pad = [(size + 2 * pd[i] - dl[i] * (k[i] - 1) - 1) % st[i] for i, size in enumerate((h, wd))]
        grad = F.conv_transpose2d(rows, w, None, st, pd, out_pad, groups, dl)
        const = None if b is None else b.reshape(-1, 1, 1).expand(*rows.shape[1:])
        return grad, const
    return adjoint


def _weighted_window(node: torch.fx.Node, consts: dict):
    """The adjoint of a 2-d convolution on rows that sit in one window of its output (:mod:`cnnrepair.bounds.window`);
    None for any other layer, grouped or dilated convolutions and string paddings."""
    w = consts[node.args[1]]
    st, pd, dl, groups = _conv_args(node)
    if node.target != aten.conv2d.default or isinstance(pd, str) or groups != 1 or w.ndim != 4 or dl != (1, 1):
        return None
    return ConvWindow(w, _bias(node, consts), st, pd)


def _weighted_rows(node: torch.fx.Node, consts: dict):
    """Rows of a linear layer's or 2-d convolution's matrix by output neuron, read off the weight (a walk from single
    neurons starts there instead of multiplying one-hot rows through the layer)."""
    t = node.target
    w, b = consts[node.args[1]], _bias(node, consts)

    def const(c):
        return torch.zeros(c.shape, dtype=w.dtype, device=c.device) if b is None else b[c]

    if t == aten.linear.default and w.ndim == 2:
        return lambda idx, shape: (w[idx], const(idx))
    st, pd, dl, groups = _conv_args(node)
    if t != aten.conv2d.default or isinstance(pd, str) or groups != 1 or w.ndim != 4:
        return None
    cout, cin, kh, kw = w.shape

    def rows(idx, shape):
        h, wd = shape[-2:]
        ho = (h + 2 * pd[0] - dl[0] * (kh - 1) - 1) // st[0] + 1
        wo = (wd + 2 * pd[1] - dl[1] * (kw - 1) - 1) // st[1] + 1
        c, pos = idx // (ho * wo), idx % (ho * wo)
        top, left = (pos // wo) * st[0], (pos % wo) * st[1]  # the window's corner in the padded input
        B, S = idx.shape
        out = torch.zeros(B, S, cin, h + 2 * pd[0] + st[0], wd + 2 * pd[1] + st[1], dtype=w.dtype, device=w.device)
        ys = top[..., None, None] + (torch.arange(kh, device=w.device) * dl[0])[:, None]  # B x S x kh x 1
        xs = left[..., None, None] + (torch.arange(kw, device=w.device) * dl[1])[None, :]  # B x S x 1 x kw
        bi = torch.arange(B, device=w.device)[:, None, None, None, None]
        si = torch.arange(S, device=w.device)[None, :, None, None, None]
        ci = torch.arange(cin, device=w.device)[None, None, :, None, None]
        out[bi, si, ci, ys[:, :, None], xs[:, :, None]] = w[c]  # B x S x cin x kh x kw
        return out[..., pd[0]:pd[0] + h, pd[1]:pd[1] + wd], const(c)
    return rows


def maxpool(x: Tensor, pool, indices: bool = False):
    """``F.max_pool2d`` with an op's stored settings."""
    kernel, stride, padding, dilation, ceil = pool
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil, return_indices=indices)
