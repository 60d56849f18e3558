"""Sound bounds on a network's intermediate values over an input box: IBP and CROWN.

* ``ibp`` (interval bound propagation): each operation maps a box to a box containing its image;
  affine maps as centre +- |L| radius, ReLU and max-pooling by monotonicity. Fast and loose.
* ``crown`` (linear relaxation, back-substitution as in CROWN / DeepPoly): a value's bound is
  written as a linear function of the input by walking the graph backwards, relaxing each ReLU
  between two lines (the chord above; the identity or zero below, whichever is closer) and each
  max-pool window between its largest-lower-bound input and a constant, then minimised over the
  input box in closed form. The ReLU and max-pool inputs that need it (unstable neurons) are
  bounded this way first, layer by layer, and every CROWN bound is intersected with IBP's.

All arithmetic is float64, whatever the model's dtype; the bounds of every affine map are widened
outward by a rounding-sized amount (``_WIDEN``, ``_FLOOR``) so that float64 roundoff cannot make
them unsound (ReLU, max-pooling and reshapes are exact on their input's box, so a dead neuron's
output stays exactly 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cnnrepair.bounds.graph import PASS_THROUGH, FrozenGraph, Op, maxpool

METHODS = ("ibp", "crown")
_WIDEN = 1e-9  # relative (to the bound's magnitude plus its width) outward widening of every result
_FLOOR = 1e-12  # absolute part of that widening
_BUDGET = 12_000_000  # elements of one back-substitution tensor (float64: ~100 MB); larger ones are split


def propagate(graph: FrozenGraph, lower: Tensor, upper: Tensor, method: str = "crown") -> tuple[Tensor, Tensor]:
    """Bounds (B x target shape) on the graph's target over the boxes ``[lower, upper]`` (B x input shape)."""
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")
    lower, upper = lower.double(), upper.double()
    bounds: dict[torch.fx.Node, tuple[Tensor, Tensor]] = {}
    linear: dict[torch.fx.Node, tuple] = {}
    uses = {op.node: sum(op.node in o.inputs for o in graph.ops) for op in graph.ops}
    behind = _behind(graph)
    final = _feature_source(graph, behind) if method == "crown" else None
    for op in graph.ops:
        lo, hi = _ibp(op, bounds, lower, upper)
        if method == "crown":
            linear[op.node] = _forward(op, linear, bounds, lower, upper)
            if behind[op.node] and op.kind in ("affine", "sum") and op.node.target not in PASS_THROUGH:
                # elsewhere IBP is already exact (before any relaxation) or the tightest box (ReLU, max-pool, reshapes)
                flo, fhi = _concretise(linear[op.node], lower, upper)
                lo, hi = torch.maximum(lo, flo), torch.minimum(hi, fhi)
            if op.node is final:
                clo, chi = crown(graph, bounds, op.node, lower, upper, ibp=(lo, hi))
                lo, hi = torch.maximum(lo, clo), torch.minimum(hi, chi)
            for src in op.inputs:  # a value's linear bounds are dropped after its last use
                uses[src] -= 1
                if uses[src] == 0:
                    linear.pop(src, None)
        if op.kind in ("affine", "sum") and op.node.target not in PASS_THROUGH:
            # against float64 roundoff; ReLU, max-pool and reshapes are exact on their input's (widened) box
            pad = _WIDEN * (lo.abs() + hi.abs() + (hi - lo)) + _FLOOR
            lo, hi = lo - pad, hi + pad
        bounds[op.node] = (lo, hi)
    return bounds[graph.target]


def _forward(op: Op, linear: dict, bounds: dict, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear functions of the input below and above ``op``'s output: (LA, La, UA, Ua), coefficients B x D x shape.

    Forward linear relaxation (DeepPoly without back-substitution): each op maps its input's two
    linear bounds to its output's, ReLUs and max-pools relaxed with the box bounds of their input.
    """
    B = lower.shape[0]
    if op.kind == "input":
        D = lower[0].numel()
        eye = torch.eye(D, dtype=torch.float64).reshape(1, D, *lower.shape[1:]).expand(B, D, *lower.shape[1:])
        zero = torch.zeros_like(lower)
        return eye, zero, eye, zero
    if op.kind == "sum":
        (LA1, La1, UA1, Ua1), (LA2, La2, UA2, Ua2) = (linear[n] for n in op.inputs)
        s = op.signs[1]
        if s >= 0:
            return LA1 + s * LA2, La1 + s * La2, UA1 + s * UA2, Ua1 + s * Ua2
        return LA1 + s * UA2, La1 + s * Ua2, UA1 + s * LA2, Ua1 + s * La2
    LA, La, UA, Ua = linear[op.inputs[0]]
    D = LA.shape[1]
    if op.kind == "affine":
        with torch.no_grad():
            c0 = op.run(torch.zeros_like(La[:1]))
            new_La, new_Ua = _combine(op, La.unsqueeze(1), Ua.unsqueeze(1), B, 1)
            if LA is UA:  # exact so far (no relaxation upstream): one linear map serves both
                new = op.linear(LA.reshape(B * D, *LA.shape[2:]))
                new = new.reshape(B, D, *new.shape[1:])
                return new, new_La[:, 0] + c0, new, new_Ua[:, 0] + c0
            new_LA, new_UA = _combine(op, LA, UA, B, D)
        return new_LA, new_La[:, 0] + c0, new_UA, new_Ua[:, 0] + c0
    lo, hi = bounds[op.inputs[0]]
    if op.kind == "relu":
        up_slope, up_const, low_slope = _relu_lines(lo, hi)
        return LA * low_slope.unsqueeze(1), La * low_slope, UA * up_slope.unsqueeze(1), Ua * up_slope + up_const
    # max-pool: above the input with the largest lower bound; below the largest upper bound (or that input, when it dominates)
    idx, exact, hi_out = _pool_choice(op, lo, hi)
    C = lo.shape[1]
    gi = idx.flatten(2)
    new_LA = LA.flatten(3).gather(3, gi.unsqueeze(1).expand(B, D, C, -1)).reshape(B, D, *idx.shape[1:])
    new_La = La.flatten(2).gather(2, gi).reshape(idx.shape)
    sel_UA = UA.flatten(3).gather(3, gi.unsqueeze(1).expand(B, D, C, -1)).reshape(B, D, *idx.shape[1:])
    sel_Ua = Ua.flatten(2).gather(2, gi).reshape(idx.shape)
    ex = exact.double()
    return new_LA, new_La, sel_UA * ex.unsqueeze(1), sel_Ua * ex + hi_out * (1 - ex)


def _combine(op: Op, LA: Tensor, UA: Tensor, B: int, D: int) -> tuple[Tensor, Tensor]:
    """(P LA + N UA, P UA + N LA) for coefficient tensors (B x D x shape), run as a batch of B*D inputs.

    With P = (L + |L|)/2 and N = (L - |L|)/2 (the linear part's positive and negative entries) this is
    (L S -+ |L| E)/2 for S = LA + UA, E = UA - LA: two applications of the map instead of four."""
    shape = LA.shape[2:]
    sym = op.linear((LA + UA).reshape(B * D, *shape))
    spread = op.abs_linear((UA - LA).reshape(B * D, *shape))
    out = sym.shape[1:]
    return ((sym - spread) / 2).reshape(B, D, *out), ((sym + spread) / 2).reshape(B, D, *out)


def _concretise(lin: tuple, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The box the two linear functions span over the input box."""
    LA, La, UA, Ua = lin
    B, D = LA.shape[:2]
    xl = lower.reshape(B, D, *([1] * (LA.ndim - 2)))
    xu = upper.reshape(B, D, *([1] * (LA.ndim - 2)))
    lo = La + (LA.clamp(min=0) * xl + LA.clamp(max=0) * xu).sum(1)
    hi = Ua + (UA.clamp(min=0) * xu + UA.clamp(max=0) * xl).sum(1)
    return lo, hi


def _ibp(op: Op, bounds: dict, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    if op.kind == "input":
        return lower, upper
    if op.kind == "sum":
        (l1, h1), (l2, h2) = (bounds[n] for n in op.inputs)
        s = op.signs[1]
        return (l1 + s * l2, h1 + s * h2) if s >= 0 else (l1 + s * h2, h1 + s * l2)
    lo, hi = bounds[op.inputs[0]]
    if op.kind == "relu":
        return lo.clamp(min=0), hi.clamp(min=0)
    if op.kind == "maxpool":
        return maxpool(lo, op.run), maxpool(hi, op.run)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    with torch.no_grad():
        centre, radius = op.run(mid), op.abs_linear(rad)
    return centre - radius, centre + radius


def _behind(graph: FrozenGraph) -> dict[torch.fx.Node, bool]:
    """Per node: is there a non-linearity between the input and it?"""
    behind: dict[torch.fx.Node, bool] = {}
    for op in graph.ops:
        behind[op.node] = op.kind in ("relu", "maxpool") or (op.kind != "input" and any(behind[n] for n in op.inputs))
    return behind


def _feature_source(graph: FrozenGraph, behind: dict) -> torch.fx.Node | None:
    """The value the features are a ReLU or reshape of, when it is a linear map behind a non-linearity:
    CROWN back-substitutes every one of its neurons (each feature's box matters to repair)."""
    node = graph.target
    while graph.op(node).kind == "relu" or (graph.op(node).kind == "affine" and node.target in PASS_THROUGH):
        node = graph.op(node).inputs[0]
    return node if graph.op(node).kind in ("affine", "sum") and behind[node] else None


def crown(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, lower: Tensor, upper: Tensor,
          ibp: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """CROWN bounds on every neuron of ``node`` (B x its shape), by back-substitution to the input."""
    lo, hi = ibp[0].clone(), ibp[1].clone()
    B = lo.shape[0]
    flat_lo, flat_hi = lo.reshape(B, -1), hi.reshape(B, -1)
    widest = max(int(np.prod(op.shape)) for op in graph.ops)
    idx = torch.arange(flat_lo.shape[1])
    chunk = max(1, _BUDGET // (2 * B * widest))
    for start in range(0, len(idx), chunk):
        sel = idx[start:start + chunk]
        clo, chi = _back_substitute(graph, bounds, node, sel, lower, upper)
        flat_lo[:, sel] = torch.maximum(flat_lo[:, sel], clo)
        flat_hi[:, sel] = torch.minimum(flat_hi[:, sel], chi)
    return flat_lo.reshape(lo.shape), flat_hi.reshape(hi.shape)


def _back_substitute(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, sel: Tensor, lower: Tensor,
                     upper: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (B x len(sel)) of the selected neurons of ``node``."""
    B, S = lower.shape[0], len(sel)
    shape = graph.op(node).shape
    eye = torch.zeros(S, int(np.prod(shape)), dtype=torch.float64)
    eye[torch.arange(S), sel] = 1.0
    start = eye.reshape(1, S, *shape).expand(B, S, *shape)
    A: dict[torch.fx.Node, Tensor] = {node: torch.cat([start, start], 1)}  # lower-bound rows, then upper-bound rows
    bias = torch.zeros(B, 2 * S, dtype=torch.float64)
    order = [op for op in graph.ops]
    pos = {op.node: i for i, op in enumerate(order)}
    for op in reversed(order[:pos[node] + 1]):
        if op.node not in A or op.kind == "input":
            continue
        a = A.pop(op.node)
        for src, a_src, b in _backward(op, a, bounds, S):
            A[src] = A[src] + a_src if src in A else a_src
            bias = bias + b
    inp = graph.ops[0].node
    a = A.get(inp)
    if a is None:
        out = bias
    else:
        al, au = a[:, :S].flatten(2), a[:, S:].flatten(2)
        xl, xu = lower.reshape(B, 1, -1), upper.reshape(B, 1, -1)
        lo = (al.clamp(min=0) * xl + al.clamp(max=0) * xu).sum(-1)
        hi = (au.clamp(min=0) * xu + au.clamp(max=0) * xl).sum(-1)
        out = bias + torch.cat([lo, hi], 1)
    return out[:, :S], out[:, S:]


def _backward(op: Op, a: Tensor, bounds: dict, S: int):
    """(source node, coefficients on it, constant) for coefficients ``a`` (B x 2S x op shape) on ``op``'s output.

    The first S rows bound from below, the last S from above: each relaxation picks its lower or
    upper line by the row's half and the coefficient's sign.
    """
    B = a.shape[0]
    if op.kind == "sum":
        zero = torch.zeros(B, 2 * S, dtype=torch.float64)
        return [(op.inputs[0], a * op.signs[0], zero), (op.inputs[1], a * op.signs[1], zero)]
    src = op.inputs[0]
    if op.kind == "affine":
        return [(src, *_affine_back(op, a, src_shape=bounds[src][0].shape[1:]))]
    lo, hi = bounds[src]
    if op.kind == "relu":
        return [(src, *_relu_back(a, lo, hi, S))]
    return [(src, *_maxpool_back(op, a, lo, hi, S))]


def _affine_back(op: Op, a: Tensor, src_shape) -> tuple[Tensor, Tensor]:
    B, R = a.shape[:2]
    fast = op.transpose(a.reshape(B * R, *a.shape[2:]), src_shape) if op.transpose is not None else None
    if fast is not None:
        grad, const = fast
        b = (a * const.reshape(1, 1, *a.shape[2:])).flatten(2).sum(-1) if const is not None else torch.zeros(B, R, dtype=a.dtype)
        return grad.reshape(B, R, *src_shape), b
    x = torch.zeros((B * R, *src_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = op.run(x)
        grad, = torch.autograd.grad(out, x, grad_outputs=a.reshape(B * R, *out.shape[1:]))
    const = out.detach()[:1]  # the map at 0: the same for every row
    b = (a * const.reshape(1, 1, *const.shape[1:])).flatten(2).sum(-1)
    return grad.reshape(B, R, *src_shape), b


def _relu_lines(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU's relaxation on [lo, hi]: the line above (slope, constant: the chord where the neuron is unstable) and the
    slope of the line below (through 0: 1 or 0, whichever is closer to the chord; exact where the neuron is stable)."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(unstable, hi / width, active.double())
    up_const = torch.where(unstable, -hi * lo / width, torch.zeros_like(hi))
    low_slope = torch.where(unstable, (hi > -lo).double(), active.double())
    return up_slope, up_const, low_slope


def _relu_back(a: Tensor, lo: Tensor, hi: Tensor, S: int) -> tuple[Tensor, Tensor]:
    up_slope, up_const, low_slope = _relu_lines(lo.unsqueeze(1), hi.unsqueeze(1))
    al, au = a[:, :S], a[:, S:]
    new_l = al.clamp(min=0) * low_slope + al.clamp(max=0) * up_slope
    new_u = au.clamp(min=0) * up_slope + au.clamp(max=0) * low_slope
    bl = (al.clamp(max=0) * up_const).flatten(2).sum(-1)
    bu = (au.clamp(min=0) * up_const).flatten(2).sum(-1)
    return torch.cat([new_l, new_u], 1), torch.cat([bl, bu], 1)


def _pool_choice(op: Op, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per window: the input with the largest lower bound (its index in the channel), whether its lower bound
    beats every other input's upper bound (then it is the maximum), and the largest upper bound."""
    kernel, stride, padding, dilation, _ = op.run
    _, idx = maxpool(lo, op.run, indices=True)
    lo_sel = lo.flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
    hi_out = maxpool(hi, op.run)
    k = kernel if isinstance(kernel, (list, tuple)) else (kernel, kernel)
    s = stride if isinstance(stride, (list, tuple)) else (stride, stride)
    p = padding if isinstance(padding, (list, tuple)) else (padding, padding)
    d = dilation if isinstance(dilation, (list, tuple)) else (dilation, dilation)
    exact = torch.zeros_like(lo_sel, dtype=torch.bool)
    if tuple(k) == tuple(s) and all(v == 0 for v in p) and all(v == 1 for v in d):  # disjoint windows
        others = hi.flatten(2).clone()
        others.scatter_(2, idx.flatten(2), float("-inf"))
        exact = lo_sel >= maxpool(others.reshape(hi.shape), op.run)
    return idx, exact, hi_out


def _maxpool_back(op: Op, a: Tensor, lo: Tensor, hi: Tensor, S: int) -> tuple[Tensor, Tensor]:
    """Each window's output lies above its input with the largest lower bound, and below the largest upper
    bound (or, when that input's lower bound beats every other input's upper bound, equals it)."""
    idx, exact, hi_out = _pool_choice(op, lo, hi)
    B, C = lo.shape[:2]
    exact = exact.unsqueeze(1).double()
    al, au = a[:, :S], a[:, S:]
    coef_l = al.clamp(min=0) + al.clamp(max=0) * exact
    coef_u = au.clamp(max=0) + au.clamp(min=0) * exact
    const = hi_out.unsqueeze(1) * (1 - exact)
    bl = (al.clamp(max=0) * const).flatten(2).sum(-1)
    bu = (au.clamp(min=0) * const).flatten(2).sum(-1)
    coef = torch.cat([coef_l, coef_u], 1)  # B x 2S x C x Ho x Wo
    R = coef.shape[1]
    out = torch.zeros(B, R, C, lo.shape[2] * lo.shape[3], dtype=torch.float64)
    out.scatter_add_(3, idx.flatten(2).unsqueeze(1).expand(B, R, C, -1), coef.flatten(3))
    return out.reshape(B, R, *lo.shape[1:]), torch.cat([bl, bu], 1)
