"""Sound bounds on a network's values over an input box: IBP, CROWN and alpha-CROWN.

* ``ibp`` (interval bound propagation): each operation maps a box to a box containing its image;
  affine maps as centre +- |L| radius, ReLU and max-pooling by monotonicity. Fast and loose.
* ``crown`` (linear relaxation with back-substitution, as in CROWN / DeepPoly): a value is bounded
  by a linear function of the input, found by walking the graph backwards from it, each ReLU
  relaxed between two lines (the chord above; the identity or zero below, whichever is closer)
  and each max-pool window between its largest-lower-bound input and a constant, then minimised
  over the input box in closed form. Every value a relaxation needs a box for (the unstable
  inputs of a ReLU; every input of a max-pool or of a kind without linear rules; the features) is
  bounded this way first, layer by layer, each from the bounds already found before it, and every
  CROWN bound is intersected with IBP's. Values whose IBP box is already exact (one affine map of
  the input box) are not walked.
* ``alpha-crown``: CROWN, then the lower ReLU slopes of the last walk (the features, or the
  specification's rows) optimised by projected gradient steps, one slope per row and neuron; every
  slope in [0, 1] gives a sound bound, so every step's bound is kept where it is tighter.
* ``alpha-crown-full``: the same for every walk, the intermediate values' too (each neuron's bound
  with slopes of its own), as auto_LiRPA's alpha-CROWN optimises every layer's: tighter boxes, and so
  tighter relaxations after them, at about twenty walks for each one. A convolution's neurons are
  walked in windows here too, with slopes only for the part of each ReLU their window covers.

How each kind of operation is crossed (its interval and backward rules) is one registered object
per kind in :mod:`cnnrepair.bounds.kinds`; this module runs the passes. A walk's rows are chunked so
that no tensor of it holds more than a memory budget (:func:`memory_budget`); a neuron is walked in
every batch it needs it in, and its result does not depend on the other inputs of the batch.

All arithmetic is float64, on the device of the boxes (CPU or CUDA); the bounds of every affine map
are widened outward by a rounding-sized amount (``_WIDEN``, ``_FLOOR``) so that float64 roundoff
cannot make them unsound (ReLU, max-pooling and reshapes are exact on their input's box, so a dead
neuron's output stays exactly 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from cnnrepair.bounds.graph import PASS_THROUGH, FrozenGraph, Op
from cnnrepair.bounds.kinds import KINDS, box_constant, row_signs
from cnnrepair.bounds.window import Window, add, crop, dense
from cnnrepair.errors import CnnRepairError

METHODS = ("ibp", "crown", "alpha-crown", "alpha-crown-full")
ALPHA_METHODS = ("alpha-crown", "alpha-crown-full")  # the methods that optimise slopes
_WIDEN = 1e-9  # relative (to the bound's magnitude plus its width) outward widening of every result
_FLOOR = 1e-12  # absolute part of that widening
_MAX_BUDGET = 1_000_000  # elements of one back-substitution tensor at most (float64: 8 MB; measured: larger ones run slower)
WINDOWS = True  # a convolution's neurons walked back in windows (False: rows written out whole; for side-by-side timing and tests)


@dataclass(frozen=True)
class AlphaSettings:
    """alpha-CROWN's optimisation: ``steps`` Adam steps of size ``lr`` on the lower ReLU slopes."""

    steps: int = 20
    lr: float = 0.1

    def __post_init__(self) -> None:
        if self.steps < 1 or not self.lr > 0:
            raise CnnRepairError(f"alpha-CROWN needs steps >= 1 and a learning rate > 0 (got steps={self.steps}, lr={self.lr})")


def memory_budget(device: torch.device | str = "cpu") -> int:
    """Elements (float64) one back-substitution tensor may hold: an eightieth of the memory free now (a walk keeps
    a few such tensors and their products alive at once), at most ``_MAX_BUDGET``: tensors that large are
    allocated afresh for every operation, and the page faults cost more than the calls that smaller ones add."""
    device = torch.device(device)
    try:
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError, RuntimeError):
        free = 8 * _MAX_BUDGET * 10
    return int(max(250_000, min(_MAX_BUDGET, free // 80)))


def propagate(graph: FrozenGraph, lower: Tensor, upper: Tensor, method: str = "crown",
              alpha: AlphaSettings | None = None) -> tuple[Tensor, Tensor]:
    """Bounds (B x target shape) on the graph's target over the boxes ``[lower, upper]`` (B x input shape)."""
    bounds = node_bounds(graph, lower, upper, method, alpha)
    return bounds[graph.target]


def node_bounds(graph: FrozenGraph, lower: Tensor, upper: Tensor, method: str = "crown",
                alpha: AlphaSettings | None = None, features: bool = True) -> dict:
    """Bounds on every value of the graph, by node. ``features``: the target's every neuron matters (repair's
    feature box); otherwise (a specification on the target is bounded next) only what relaxations need."""
    _check(method)
    lower, upper = lower.double(), upper.double()
    plan = _plan(graph, features)
    bounds: dict[torch.fx.Node, tuple[Tensor, Tensor]] = {}
    for op in graph.ops:
        kind = _kind(op)
        lo, hi = kind.ibp(op, bounds, lower, upper)
        need = plan.need.get(op.node)
        if method != "ibp" and need is not None:
            rows = _unstable(lo, hi) if need == "unstable" else hi > 0 if need == "live" else torch.ones_like(lo, dtype=torch.bool)
            every = method == "alpha-crown-full" or (method == "alpha-crown" and op.node in plan.final)
            optimise = (alpha or AlphaSettings()) if every else None
            lo, hi = _tighten(graph, bounds, op.node, rows, (lo, hi), (lower, upper), optimise)
        if plan.widen[op.node]:
            # against float64 roundoff; ReLU, max-pool and reshapes are exact on their input's (widened) box
            pad = _WIDEN * (lo.abs() + hi.abs() + (hi - lo)) + _FLOOR
            lo, hi = lo - pad, hi + pad
        bounds[op.node] = (lo, hi)
    return bounds


def spec_bounds(graph: FrozenGraph, lower: Tensor, upper: Tensor, rows: Tensor, method: str = "crown",
                alpha: AlphaSettings | None = None) -> Tensor:
    """Lower bounds (B x R) of the linear functions ``rows`` (B x R x target shape) of the graph's target over
    each box: the specification itself bounded (e.g. logit differences), not a box around the target first."""
    lower, upper = lower.double(), upper.double()
    rows = rows.double().to(lower.device)
    bounds = node_bounds(graph, lower, upper, method, alpha, features=False)
    target = graph.target
    if method == "ibp":  # the target's last affine map taken exactly, its input's box for the rest
        op = graph.op(target)
        stop = set(op.inputs) if _kind(op).linear_map else {target}
        out = _backward(graph, bounds, target, rows, rows.shape[1], (lower, upper), stop=stop)
    elif method in ALPHA_METHODS:
        out = _optimised(graph, bounds, target, rows, rows.shape[1], (lower, upper), alpha or AlphaSettings())
    else:
        out = _backward(graph, bounds, target, rows, rows.shape[1], (lower, upper))
    tlo, thi = bounds[target]
    scale = (rows.abs() * (tlo.abs() + thi.abs()).unsqueeze(1)).flatten(2).sum(-1)
    return out - _WIDEN * (out.abs() + scale) - _FLOOR


def _check(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r}; choose one of {', '.join(METHODS)}")


def _kind(op: Op):
    kind = KINDS.get(op.kind)
    if kind is None:
        raise ValueError(f"no bound kind {op.kind!r} is registered (cnnrepair.bounds.kinds.bound_kind); known: {', '.join(KINDS)}")
    return kind


def _unstable(lo: Tensor, hi: Tensor) -> Tensor:
    return (lo < 0) & (hi > 0)


@dataclass
class _Plan:
    """Per node: which of its neurons CROWN walks back (``need``: "unstable", "live" (not dead), "all", absent:
    none), whether its results are widened against roundoff, and the nodes whose walks alpha-CROWN optimises
    (``final``: those the features are read from)."""

    need: dict
    widen: dict
    final: dict


def _plan(graph: FrozenGraph, features: bool) -> _Plan:
    key = ("plan", features)
    if key in graph.cache:
        return graph.cache[key]
    consumers: dict[torch.fx.Node, list[Op]] = {op.node: [] for op in graph.ops}
    for op in graph.ops:
        for src in op.inputs:
            consumers[src].append(op)

    def through(node):  # the operations reading a value, seen through reshapes
        out = []
        for c in consumers[node]:
            out.extend(through(c.node) if _passes(c) else [c])
        return out

    box, exact, widen = {}, {}, {}
    for op in graph.ops:  # box: the values over the input box are exactly a box; exact: IBP's per-neuron bounds are exact
        kind = _kind(op)
        src_box = bool(op.inputs) and all(box[n] for n in op.inputs)
        box[op.node] = op.kind == "input" or (op.kind == "affine" and op.diagonal and src_box)
        exact[op.node] = box[op.node] or (op.kind == "affine" and src_box)
        widen[op.node] = kind.linear_map and not _passes(op)

    def box_read(node):  # a max-pool (or another kind but ReLU whose relaxation is built from the box) reads the value
        return any(r.kind != "relu" and _kind(r).nonlinear for r in through(node))

    final = _feature_sources(graph) if features else {}
    need = {}
    for op in graph.ops:
        if not widen[op.node] or exact[op.node]:
            continue
        readers = through(op.node)
        relus = [r for r in readers if r.kind == "relu"]
        if op.node in final:
            need[op.node] = final[op.node]
        elif box_read(op.node):
            need[op.node] = "all"  # a max-pool (or a kind crossed by its box) reads it directly
        elif any(box_read(r.node) for r in relus):
            # a ReLU whose output a max-pool reads: a stable neuron's ReLU is exact, but the max-pool's relaxation is
            # built from the ReLU's output box, so every neuron that is not dead (whose output is not exactly 0) matters
            need[op.node] = "live"
        elif relus:  # a stable neuron's ReLU is exact whatever its box
            need[op.node] = "unstable"
    plan = _Plan(need, widen, final)
    graph.cache[key] = plan
    return plan


def _passes(op: Op) -> bool:
    return op.kind == "affine" and op.node.target in PASS_THROUGH


def _feature_sources(graph: FrozenGraph) -> dict:
    """The linear maps the features are read from through ReLUs, max-pools and reshapes only: CROWN walks each of
    their neurons back (each feature's box matters to repair), all of them, or with a ReLU on the way the live
    ones (a dead neuron's ReLU is 0 whatever its box)."""
    found: dict = {}
    stack = [(graph.target, False)]
    while stack:
        node, via_relu = stack.pop()
        op = graph.op(node)
        if op.kind in ("relu", "maxpool") or _passes(op):
            stack.extend((src, via_relu or op.kind == "relu") for src in op.inputs)
        elif _kind(op).linear_map and found.get(node) != "all":
            found[node] = "live" if via_relu else "all"
    return found


def _tighten(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, rows: Tensor, box: tuple[Tensor, Tensor],
             inputs: tuple[Tensor, Tensor], alpha: AlphaSettings | None) -> tuple[Tensor, Tensor]:
    """IBP's box of ``node`` intersected with CROWN's bounds of the neurons ``rows`` marks (per input)."""
    lo, hi = box
    B = lo.shape[0]
    want = rows.reshape(B, -1)
    if not B or not want.any():
        return lo, hi
    op = graph.op(node)
    if WINDOWS and op.window is not None and len(op.shape) == 3:
        return _tighten_by_window(graph, bounds, node, want, box, inputs, alpha)
    flat_lo, flat_hi = lo.reshape(B, -1).clone(), hi.reshape(B, -1).clone()

    def walk(part: Tensor, ok: Tensor) -> Tensor:
        S = part.shape[1]
        okf = ok.to(torch.float64)
        if op.rows_of is not None:  # the layer's own rows: the walk starts at its input
            src = op.inputs[0]
            rows, const = op.rows_of(part, bounds[src][0].shape[1:])
            rows = rows * okf.reshape(B, S, *([1] * (rows.ndim - 2)))  # a padding row is all zero
            a, bias, at = torch.cat([rows, rows], 1), torch.cat([const, const], 1) * torch.cat([okf, okf], 1), src
        else:
            a, bias, at = _one_hot(part, ok, want.shape[1]).reshape(B, 2 * S, *op.shape), 0.0, node
        return bias + (_optimised(graph, bounds, at, a, S, inputs, alpha) if alpha else _backward(graph, bounds, at, a, S, inputs))

    _walk_marked(want, (flat_lo, flat_hi), max(1, memory_budget(lo.device) // (2 * B * graph.widest(node))), walk)
    return flat_lo.reshape(lo.shape), flat_hi.reshape(hi.shape)


def _walk_marked(want: Tensor, box: tuple[Tensor, Tensor], chunk: int, walk) -> None:
    """Tighten ``box`` (B x n lower and upper bounds, in place) at the neurons ``want`` marks (B x n): each input's own
    neurons first (a stable sort keeps them in order), padded to the largest count, ``chunk`` at a time;
    ``walk(part, ok)`` bounds the neurons ``part`` (B x S indices; ``ok``: not padding) as B x 2S rows, lower then upper."""
    flat_lo, flat_hi = box
    counts = want.sum(1)
    R = int(counts.max()) if len(counts) else 0
    order = torch.sort((~want).to(torch.int8), dim=1, stable=True).indices[:, :R]
    valid = torch.arange(R, device=want.device).unsqueeze(0) < counts.unsqueeze(1)
    for start in range(0, R, chunk):
        part, ok = order[:, start:start + chunk], valid[:, start:start + chunk]
        S = part.shape[1]
        out = walk(part, ok)
        cur_lo, cur_hi = flat_lo.gather(1, part), flat_hi.gather(1, part)
        flat_lo.scatter_(1, part, torch.where(ok, torch.maximum(cur_lo, out[:, :S]), cur_lo))
        flat_hi.scatter_(1, part, torch.where(ok, torch.minimum(cur_hi, out[:, S:]), cur_hi))


def _one_hot(part: Tensor, ok: Tensor, n: int) -> Tensor:
    """B x 2S x n: a one-hot row per neuron of ``part`` (zero where ``ok`` marks padding), twice (lower, then upper)."""
    B, S = part.shape
    one = torch.zeros(B, S, n, dtype=torch.float64, device=part.device)
    one.scatter_(2, part.unsqueeze(2), ok.to(torch.float64).unsqueeze(2))
    return torch.cat([one, one], 1)


def _tighten_by_window(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, want: Tensor, box: tuple[Tensor, Tensor],
                       inputs: tuple[Tensor, Tensor], alpha: AlphaSettings | None) -> tuple[Tensor, Tensor]:
    """:func:`_tighten` for a convolution's neurons, walked back a block of output positions at a time as rows in a
    window (:mod:`cnnrepair.bounds.window`): the same bounds, without the zeros outside each block's receptive field
    (with ``alpha``, each walk's slopes optimised, held only on the windows it crosses)."""
    lo, hi = box
    B = lo.shape[0]
    C, H, W = graph.op(node).shape
    want = want.reshape(B, C, H, W)
    new_lo, new_hi = lo.clone(), hi.clone()
    side, chunk = _window_block(graph, node, B, lo.device)
    for top in range(0, H, side):
        for left in range(0, W, side):
            here = want[:, :, top:top + side, left:left + side]
            if not here.any():
                continue
            h, w = here.shape[-2:]
            block = (slice(None), slice(None), slice(top, top + h), slice(left, left + w))
            blo, bhi = new_lo[block].reshape(B, -1), new_hi[block].reshape(B, -1)

            def walk(part: Tensor, ok: Tensor, h=h, w=w, top=top, left=left) -> Tensor:
                rows = Window(_one_hot(part, ok, C * h * w).reshape(B, -1, C, h, w), top, left, (C, H, W))
                if alpha is not None:
                    return _optimised(graph, bounds, node, rows, part.shape[1], inputs, alpha)
                return _backward(graph, bounds, node, rows, part.shape[1], inputs)

            _walk_marked(here.reshape(B, -1), (blo, bhi), chunk, walk)
            new_lo[block], new_hi[block] = blo.reshape(B, C, h, w), bhi.reshape(B, C, h, w)
    return new_lo, new_hi


def _window_block(graph: FrozenGraph, node: torch.fx.Node, batch: int, device) -> tuple[int, int]:
    """(side of the square blocks of output positions walked together, rows per walk) for a convolution's neurons:
    the largest side whose every neuron fits in one walk under the memory budget, from how far each block's window
    grows on the way back (each kind's ``window_extent``; from an operation that has none on, the walk is written out
    whole)."""
    budget = memory_budget(device)
    key = ("window block", node, batch, budget)
    if key in graph.cache:
        return graph.cache[key]
    C, H, W = graph.op(node).shape

    def per_row(side: int) -> int:
        h = w = side
        widest, cur = C * h * w, node
        for op in reversed(graph.upto(node)):
            if op.node != cur:
                continue
            if op.kind == "input":
                break
            cur = op.inputs[0]
            shape = graph.op(cur).shape
            grown = _kind(op).window_extent(op, (h, w), shape) if len(shape) == 3 else None
            if grown is None:
                return max(widest, graph.widest(op.node))  # written out whole from here on
            h, w = grown
            widest = max(widest, shape[0] * h * w)
        return widest

    side = 1
    while side < max(H, W) and (2 * side) ** 2 * C <= budget // (2 * batch * per_row(2 * side)):
        side *= 2
    chunk = max(1, budget // (2 * batch * per_row(side)))
    graph.cache[key] = (side, chunk)
    return side, chunk


def _backward(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, a: Tensor | Window, n_low: int, inputs: tuple[Tensor, Tensor],
              slopes: dict | None = None, stop: set | None = None, crossed: dict | None = None) -> Tensor:
    """B x rows: lower bounds of the first ``n_low`` rows' linear functions (``a``: B x rows x node's shape, or a
    :class:`Window` of them) of ``node``'s value over the input box, upper bounds of the others. ``slopes``: alpha-CROWN's lower ReLU
    slopes by ReLU node (over the whole map, or a :class:`Window` of the part the walk crosses); ``stop``: nodes whose
    box is taken instead of walking further back; ``crossed``: filled with where the walk meets each ReLU (by node: the
    window's (top, left, size), or None where its rows are written out whole)."""
    lower, upper = inputs
    rows = a.a if isinstance(a, Window) else a
    B = rows.shape[0]
    A: dict[torch.fx.Node, Tensor | Window] = {node: a}
    bias = torch.zeros(B, rows.shape[1], dtype=torch.float64, device=rows.device)
    for op in reversed(graph.upto(node)):
        if op.node not in A or op.kind == "input":
            continue
        coef = A.pop(op.node)
        if stop and op.node in stop:
            bias = bias + box_constant(dense(coef), *bounds[op.node], n_low)
            continue
        kind = _kind(op)
        if crossed is not None and op.kind == "relu":
            crossed[op.node] = (coef.top, coef.left, coef.size) if isinstance(coef, Window) else None
        kwargs = {"slopes": slopes[op.node]} if slopes and op.node in slopes else {}
        steps = kind.backward_window(op, coef, bounds, n_low, **kwargs) if isinstance(coef, Window) else None
        if steps is None:
            steps = kind.backward(op, dense(coef), bounds, n_low, **kwargs)
        for src, a_src, b in steps:
            A[src] = add(A[src], a_src) if src in A else a_src
            bias = bias + b
    a_in = A.get(graph.ops[0].node)
    if a_in is None:
        return bias
    if isinstance(a_in, Window):
        return bias + box_constant(a_in.a, a_in.crop(lower), a_in.crop(upper), n_low)
    return bias + box_constant(dense(a_in), lower, upper, n_low)


def _optimised(graph: FrozenGraph, bounds: dict, node: torch.fx.Node, a: Tensor | Window, n_low: int,
               inputs: tuple[Tensor, Tensor], alpha: AlphaSettings) -> Tensor:
    """:func:`_backward` with each row's lower ReLU slopes optimised (alpha-CROWN): the tightest bound any step found.
    Slopes are made for every ReLU the walk crosses (the one it may start at included) with an unstable neuron where
    the walk's rows are non-zero: on the window the walk has there, or the whole map."""
    crossed: dict = {}
    best = _backward(graph, bounds, node, a, n_low, inputs, crossed=crossed)
    rows = a.a if isinstance(a, Window) else a
    params, slopes = {}, {}
    for relu, where in crossed.items():
        lo, hi = bounds[graph.op(relu).inputs[0]]
        full = tuple(lo.shape[1:])
        if where is not None:
            lo, hi = crop(lo, *where), crop(hi, *where)
        if _unstable(lo, hi).any():
            init = (hi > -lo).double().unsqueeze(1).expand(rows.shape[0], rows.shape[1], *lo.shape[1:])
            params[relu] = init.clone().requires_grad_(True)
            slopes[relu] = params[relu] if where is None else Window(params[relu], where[0], where[1], full)
    if not params:
        return best
    sign = row_signs(best, n_low)
    opt = torch.optim.Adam(list(params.values()), lr=alpha.lr)
    for _ in range(alpha.steps):
        with torch.enable_grad():
            out = _backward(graph, bounds, node, a, n_low, inputs, slopes=slopes)
            best = torch.where(sign > 0, torch.maximum(best, out.detach()), torch.minimum(best, out.detach()))
            loss = -(out * sign).sum()
            opt.zero_grad()
            loss.backward()
        with torch.no_grad():
            opt.step()
            for p in params.values():
                p.clamp_(0.0, 1.0)
    with torch.no_grad():  # the last step's slopes too (each step is sound: keep the tightest bound per row)
        out = _backward(graph, bounds, node, a, n_low, inputs, slopes=slopes)
    return torch.where(sign > 0, torch.maximum(best, out), torch.minimum(best, out))
