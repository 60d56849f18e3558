"""Sound bounds on a network's intermediate values over an input box: IBP and CROWN.

* ``ibp`` (interval bound propagation): each operation maps a box to a box containing its image;
  affine maps as centre +- |L| radius, ReLU and max-pooling by monotonicity. Fast and loose.
* ``crown`` (linear relaxation, back-substitution as in CROWN / DeepPoly): a value's bound is
  written as a linear function of the input by walking the graph backwards, relaxing each ReLU
  between two lines (the chord above; the identity or zero below, whichever is closer) and each
  max-pool window between its largest-lower-bound input and a constant, then minimised over the
  input box in closed form. The ReLU and max-pool inputs that need it (unstable neurons) are
  bounded this way first, layer by layer, and every CROWN bound is intersected with IBP's.

How each kind of operation is crossed (its interval, forward and backward rules) is one registered
object per kind in :mod:`cnnrepair.bounds.kinds`; this module runs the passes.

All arithmetic is float64, whatever the model's dtype; the bounds of every affine map are widened
outward by a rounding-sized amount (``_WIDEN``, ``_FLOOR``) so that float64 roundoff cannot make
them unsound (ReLU, max-pooling and reshapes are exact on their input's box, so a dead neuron's
output stays exactly 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cnnrepair.bounds.graph import PASS_THROUGH, FrozenGraph, Op
from cnnrepair.bounds.kinds import KINDS

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
        kind = _kind(op)
        lo, hi = kind.ibp(op, bounds, lower, upper)
        exact_map = kind.linear_map and op.node.target not in PASS_THROUGH
        if method == "crown":
            linear[op.node] = kind.forward(op, linear, bounds, lower, upper)
            if behind[op.node] and exact_map:
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
        if exact_map:
            # against float64 roundoff; ReLU, max-pool and reshapes are exact on their input's (widened) box
            pad = _WIDEN * (lo.abs() + hi.abs() + (hi - lo)) + _FLOOR
            lo, hi = lo - pad, hi + pad
        bounds[op.node] = (lo, hi)
    return bounds[graph.target]


def _kind(op: Op):
    kind = KINDS.get(op.kind)
    if kind is None:
        raise ValueError(f"no bound kind {op.kind!r} is registered (cnnrepair.bounds.kinds.bound_kind); known: {', '.join(KINDS)}")
    return kind


def _concretise(lin: tuple, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """The box the two linear functions span over the input box."""
    LA, La, UA, Ua = lin
    B, D = LA.shape[:2]
    xl = lower.reshape(B, D, *([1] * (LA.ndim - 2)))
    xu = upper.reshape(B, D, *([1] * (LA.ndim - 2)))
    lo = La + (LA.clamp(min=0) * xl + LA.clamp(max=0) * xu).sum(1)
    hi = Ua + (UA.clamp(min=0) * xu + UA.clamp(max=0) * xl).sum(1)
    return lo, hi


def _behind(graph: FrozenGraph) -> dict[torch.fx.Node, bool]:
    """Per node: is there a non-linearity between the input and it?"""
    behind: dict[torch.fx.Node, bool] = {}
    for op in graph.ops:
        behind[op.node] = _kind(op).nonlinear or any(behind[n] for n in op.inputs)
    return behind


def _feature_source(graph: FrozenGraph, behind: dict) -> torch.fx.Node | None:
    """The value the features are a ReLU or reshape of, when it is a linear map behind a non-linearity:
    CROWN back-substitutes every one of its neurons (each feature's box matters to repair)."""
    node = graph.target
    while graph.op(node).kind == "relu" or (graph.op(node).kind == "affine" and node.target in PASS_THROUGH):
        node = graph.op(node).inputs[0]
    return node if _kind(graph.op(node)).linear_map and behind[node] else None


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
        if op.node not in A or op is graph.ops[0]:  # the input's coefficients are concretised below
            continue
        a = A.pop(op.node)
        for src, a_src, b in _kind(op).backward(op, a, bounds, S):
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
