"""Provable repair of a linear or convolution layer anywhere in a piecewise-linear network, its activation patterns kept.

For each repair or keep point, the on/off pattern of every ReLU after the repaired layer and the
chosen input of every max-pool window are fixed to the original network's at that point. With the
patterns fixed, the logits and every pre-activation after the layer are affine in the layer's
output ``z`` (the network is linear on that region), and ``z`` is affine in the layer's weight and
bias. So "every repair point gets its label with the margin, every keep point keeps its label, every
pattern stays, the change is minimal in L1" is a linear program, and the real network computes
exactly what it says (ReLU is continuous, so a pre-activation that reaches 0 changes nothing).

The program is never written down whole: a row per point and per neuron after the layer would be
far too many. Its structure is used instead:

* every row is ``g . (dW patches_k + db) >= c`` for the z-gradient ``g`` of one margin or
  pre-activation at point ``k``, which one vector-Jacobian product of the network's part after the
  layer gives for every point at once (``torch.func.vjp``); a row's coefficients on the weight are
  the outer product ``g patches_k^T`` (a linear layer's patch is its input vector, a convolution's
  the unfolded input windows);
* the change that a solve proposes moves every margin and pre-activation of every point by one
  Jacobian-vector product (``torch.func.jvp``): rows are generated (violated ones added, re-solved)
  as the last-layer program does with its margin rows;
* a point with many dense rows gets its own columns ``u_k = dz_k`` (see :class:`_Master`); its pattern
  rows on a single unit (the ReLU right after the layer: ``sign * (z_k + u_k)_i >= 0``) are then
  bounds of one ``u`` column, not rows, so the simplex basis does not grow with them; a bound's
  multiplier is its column's reduced cost;
* L1-minimal changes are sparse: weight entries (columns) are generated too, priced by
  ``|sum_r y_r g_r patches_r^T| > 1`` from the rows' multipliers ``y``, one matrix product.

The change is minimal in ``a ||d||_1 + b ||d||_inf`` over every number that moves (the norms of
:mod:`cnnrepair.repair.program`: L1, L-infinity, PRDNN's mean + max): an L-infinity part is one more
column ``t`` with a row ``d+_e + d-_e <= t`` per entry in the program. A missing entry then prices
out when the excess ``sum (|price_e| - a)+`` over the missing entries is more than ``t``'s reduced
cost can absorb (so under L-infinity every entry with a nonzero price enters: such changes are dense).

At the end no row of any point is violated and no column prices out, so the restricted program's
optimum is the full program's; its multipliers, scaled to dual feasibility over every column, give
the certified lower bound (weak duality, :func:`cnnrepair.repair.program.dual_bound`).
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, run, set_time_limit
from cnnrepair.repair.layer import get_tensor
from cnnrepair.repair.program import NORMS, MarginSolution, change_cost, dual_bound, margins_of, norm_coefficients
from cnnrepair.repair.suffix import (CONV, Suffix, aten, attr, build_suffix, later_biased, node_values, pool_windows, traced,
                                     weighted_nodes)
from cnnrepair.runtime import eval_mode

ELASTIC_PRICE = 1e4  # first price of a unit of (row-scaled) shortfall in the restricted programs, raised while rows stay short
MAX_ELASTIC_PRICE = 1e10
MAX_ROUNDS = 200
ALL_COLUMNS = 2000  # weights up to this size take every entry as a column from the start
COLUMNS_PER_ROUND = 500  # a round adds at most this many priced-out weight entries, or 1 / COLUMN_SHARE of the weight
COLUMN_SHARE = 16  # if that is more: on a large layer most of the time is the re-solve after each round, so it takes
# fewer, larger rounds (docs/design.md: 246 s -> 114 s on a 9x200 layer with 1,000 keep points, development runs)
ROWS_PER_ROUND = 2000
UNIT_ROWS = 3  # a point of a linear layer gets its own z-change columns once it has this many dense rows
PATTERN_BOUNDS = True  # single-unit pattern rows of such points as column bounds (False: as rows; for side-by-side timing)


@dataclass
class _Rows:
    """The generated rows: ``g . dz_k >= rhs`` (``g`` the z-gradient, flattened), with what each row is."""

    point: list[int] = field(default_factory=list)
    grad: list[np.ndarray] = field(default_factory=list)
    rhs: list[float] = field(default_factory=list)
    what: list[tuple] = field(default_factory=list)
    keys: set = field(default_factory=set)

    def add(self, key: tuple, k: int, g: np.ndarray, rhs: float) -> None:
        self.keys.add(key)
        self.point.append(int(k))
        self.grad.append(g)
        self.rhs.append(float(rhs))
        self.what.append(key)

    def __len__(self) -> int:
        return len(self.point)


@dataclass(frozen=True)
class LayerChange:
    """What may change in a repair of a layer inside the network, and how the change is measured.

    ``norm``: ``l1``, ``linf`` or ``l1+linf`` (over the layer's weight, its bias unless frozen, and the later biases
    when they move); ``max_change``: a bound on every entry's change; ``later_biases``: the biases of the linear and
    convolution layers after the layer may move too (APRNN's choice)."""

    norm: str = "l1"
    freeze_bias: bool = False
    max_change: float | None = None
    later_biases: bool = False

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise CnnRepairError(f"unknown change norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        if self.max_change is not None and not self.max_change > 0:
            raise CnnRepairError(f"max_change must be > 0 (got {self.max_change})")


@dataclass
class HiddenProgram:
    """The pattern-preserving program of one layer on a set of points (repair points first, then keep points)."""

    model: nn.Module
    name: str
    kind: str
    weight: np.ndarray  # float64, as stored
    bias: np.ndarray
    has_bias: bool
    weight_param: str
    bias_param: str | None
    x: Tensor  # points, model dtype
    labels: np.ndarray
    required: np.ndarray  # margin each point must have
    n_repair: int
    freeze_bias: bool = False
    max_change: float | None = None
    norm: str = "l1"
    later: list[tuple[str, str, int]] = field(default_factory=list)  # later layers whose bias may move: (layer, bias, size)
    later_bias: np.ndarray = field(default_factory=lambda: np.zeros(0))  # their biases, concatenated (float64)
    suffix: Suffix | None = None
    conv: dict = field(default_factory=dict)
    patches: Tensor | None = None  # N x P x L (float64)
    z0: Tensor | None = None
    outs0: tuple = ()
    suffix64: Suffix | None = None  # the suffix in float64, made once
    pullback: object = None  # its vector-Jacobian product at the points, made once
    warm: dict = field(default_factory=dict)  # the rows and columns an earlier solve generated (a re-solve starts from them)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def num_entries(self) -> int:
        """How many numbers may change: the weight, the bias unless frozen, the later biases that move."""
        return int(self.weight.size + (0 if self.freeze_bias else self.weight.shape[0]) + len(self.later_bias))

    def norm_coefficients(self) -> tuple[float, float]:
        """(a, b) of the change's cost ``a ||d||_1 + b ||d||_inf``."""
        return norm_coefficients(self.norm, self.num_entries)

    def change_cost(self, dW: np.ndarray, db: np.ndarray, de: np.ndarray) -> float:
        """The cost of a change of the weight, bias (ignored when frozen) and later biases in the program's norm."""
        return change_cost(np.concatenate([np.ravel(dW), [] if self.freeze_bias else np.ravel(db), np.ravel(de)]), self.norm)

    @property
    def nz(self) -> int:
        """Entries of the layer's output at one point (a row's gradient holds these, then one per later bias entry)."""
        return int(self.z0[0].numel())


def hidden_program(model: nn.Module, name: str, x: Tensor, labels: np.ndarray, required: np.ndarray, n_repair: int,
                   change: LayerChange = LayerChange()) -> HiddenProgram:
    """Trace ``model``, find layer ``name`` (a linear or convolution layer), and linearise the network after it at every point
    (``x``: repair points first, ``n_repair`` of them, then keep points; ``required``: each one's margin)."""
    eval_mode(model)
    gm = traced(model, x)
    nodes = weighted_nodes(gm)
    if name not in nodes:
        raise CnnRepairError(f"no linear layer named {name!r} in the model (linear and convolution layers: {', '.join(nodes) or 'none'}); "
                             "`cnnrepair layers MODEL` lists them")
    node = nodes[name]
    conv = {}
    if node.target in CONV:
        a = list(node.args) + [None] * 9
        if node.target == aten.convolution.default:
            stride, pad, dil, transposed, groups = a[3], a[4], a[5], a[6], a[8]
            if transposed:
                raise CnnRepairError(f"layer {name!r} is a transposed convolution; repair supports linear and convolution layers")
        else:
            stride, pad, dil, groups = a[3] or 1, a[4] or 0, a[5] or 1, a[7] or 1
        if (groups or 1) != 1:
            raise CnnRepairError(f"layer {name!r} is a grouped convolution ({groups} groups); repair supports groups=1")
        if isinstance(pad, str):
            raise CnnRepairError(f"layer {name!r} uses padding={pad!r}; give the padding as numbers")
        conv = {"stride": stride, "padding": pad, "dilation": dil}
    wparam = attr(node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    bparam = attr(bias_node)
    W = get_tensor(gm, wparam).detach().double().cpu().numpy().copy()
    b = get_tensor(gm, bparam).detach().double().cpu().numpy().copy() if bparam else np.zeros(W.shape[0])
    add_to = later_biased(gm, node) if change.later_biases else []
    for p in (wparam, bparam, *(attr(n.args[2]) for n in add_to)):
        if p is not None:
            try:
                get_tensor(model, p)
            except AttributeError:
                raise CnnRepairError(f"layer {name!r}: the model has no tensor {p!r} to write the repair into") from None
    prog = HiddenProgram(model, name, "hidden-" + ("conv2d" if conv else "linear"), W, b, bparam is not None, wparam, bparam, x,
                         np.asarray(labels, np.int64), np.asarray(required, np.float64), n_repair,
                         change.freeze_bias or bparam is None, change.max_change, change.norm, conv=conv)
    prog.later = [(attr(n.args[1]).rpartition(".")[0], attr(n.args[2]), int(get_tensor(gm, attr(n.args[2])).numel())) for n in add_to]
    prog.later_bias = (np.concatenate([get_tensor(gm, b).detach().double().cpu().numpy().ravel() for _, b, _ in prog.later])
                       if prog.later else np.zeros(0))
    values = node_values(gm, x)
    prog.suffix = build_suffix(gm, node, values, name, add_to)
    h, z = values[node.args[0]].double(), values[node].double()
    if conv:
        kernel = tuple(W.shape[2:])
        prog.patches = F.unfold(h, kernel, dilation=conv["dilation"], padding=conv["padding"], stride=conv["stride"])
    else:
        if h.ndim != 2:
            raise CnnRepairError(f"layer {name!r} receives {h.ndim}-d inputs; a linear layer applied per position is not supported")
        prog.patches = h.unsqueeze(2)
    prog.z0 = z
    with torch.no_grad():
        prog.outs0 = tuple(o.double() for o in _suffix64(prog)(x.double(), z))
    ref = values[prog.suffix.logits_node].double()  # the model's logits (before a ReLU / softmax that ends it)
    if not torch.allclose(prog.outs0[0], ref, rtol=1e-4, atol=1e-5 * (1 + float(ref.abs().max()))):
        raise CnnRepairError(f"the network after layer {name!r} could not be re-run from the layer's output; report it with the model")
    return prog


def _suffix64(prog: HiddenProgram) -> Suffix:
    """The suffix in float64 (once), so that linearisation rounds no more than the LP does."""
    if prog.suffix64 is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            mod = copy.deepcopy(prog.suffix.module).double()
        for t in list(mod.parameters()) + list(mod.buffers()):
            t.requires_grad_(False)
        prog.suffix64 = Suffix(mod, prog.suffix.relus, prog.suffix.pools, prog.suffix.added)
    return prog.suffix64


def _dz(prog: HiddenProgram, dW: np.ndarray, db: np.ndarray) -> Tensor:
    """The change of the layer's output at every point for a change (dW, db): N x z shape."""
    P = prog.patches
    dWm = torch.as_tensor(dW.reshape(dW.shape[0], -1))
    out = torch.einsum("op,npl->nol", dWm, P) + torch.as_tensor(db).reshape(1, -1, 1)
    return out.reshape(prog.z0.shape)


def _later_split(prog: HiddenProgram, de: np.ndarray) -> tuple[Tensor, ...]:
    """A change of the later biases (concatenated) as the per-point inputs the suffix adds (every point the same)."""
    out, at = [], 0
    for (_, _, size), shape in zip(prog.later, prog.suffix.added):
        t = torch.as_tensor(de[at:at + size], dtype=torch.float64).reshape(1, *shape)
        out.append(t.expand(len(prog.x), *shape).contiguous())
        at += size
    return tuple(out)


def _jvp(prog: HiddenProgram, dz: Tensor, de: np.ndarray | None = None) -> tuple[Tensor, ...]:
    suf = _suffix64(prog)
    x = prog.x.double()
    e0 = _later_split(prog, np.zeros(len(prog.later_bias)))
    e1 = _later_split(prog, np.zeros(len(prog.later_bias)) if de is None else de)
    _, tangents = torch.func.jvp(lambda z, *e: suf(x, z, *e), (prog.z0, *e0), (dz, *e1))
    return tuple(t.detach() for t in tangents)


def _vjp_rows(prog: HiddenProgram, cotangents: list[Tensor]) -> np.ndarray:
    """z-gradients (N x z size) for one cotangent per output (logits, then every watched value), all points at once.

    The network after the layer is linearised at the points once (its pullback kept on the program) and reused
    for every row of every round and re-solve."""
    if prog.pullback is None:
        suf = _suffix64(prog)
        x = prog.x.double()
        e0 = _later_split(prog, np.zeros(len(prog.later_bias)))
        _, prog.pullback = torch.func.vjp(lambda z, *e: suf(x, z, *e), prog.z0, *e0)
    grads = prog.pullback(tuple(cotangents))
    return torch.cat([g.detach().reshape(len(g), -1) for g in grads], 1).numpy()


def _passes(points: np.ndarray) -> list[np.ndarray]:
    """Indices of ``points`` split into passes in which each point appears at most once (one VJP serves a pass)."""
    order = np.argsort(points, kind="stable")
    ranked = points[order]
    rank = np.arange(len(ranked)) - np.searchsorted(ranked, ranked, side="left")
    return [order[rank == r] for r in range(int(rank.max(initial=-1)) + 1)]


def _zero_rival(prog: HiddenProgram) -> bool:
    """Does a ReLU end the model, so that each label's logit must also beat a rival fixed at 0 (class index C)?"""
    return prog.suffix.ending == "relu"


def _padded(prog: HiddenProgram, logits: np.ndarray) -> np.ndarray:
    """The logits with the zero rival's column (all 0) appended when there is one."""
    return np.hstack([logits, np.zeros((len(logits), 1))]) if _zero_rival(prog) else logits


def _margin_rows(prog: HiddenProgram, points: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """z-gradients of ``logit[y_k] - logit[j_k]`` for pairs (point k, class j); class C is the zero rival (logit 0)."""
    out = np.zeros((len(points), prog.nz + len(prog.later_bias)))
    C = prog.outs0[0].shape[1]
    for sel in _passes(points):
        cot = [torch.zeros_like(o) for o in prog.outs0]
        pts, cls = points[sel], classes[sel]
        cot[0][pts, prog.labels[pts]] += 1.0
        cot[0][pts[cls < C], cls[cls < C]] -= 1.0
        out[sel] = _vjp_rows(prog, cot)[pts]
    return out


def _unit_rows(prog: HiddenProgram, points: np.ndarray, outputs: np.ndarray, flat: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """z-gradients of ``sum_t signs[r, t] * value[flat[r, t]]`` of watched value ``outputs[r]`` at ``points[r]``, per row r
    (one term: a ReLU input's sign; two: a max-pool window's chosen input over another)."""
    res = np.zeros((len(points), prog.nz + len(prog.later_bias)))
    for sel in _passes(points):
        cot = [torch.zeros_like(o) for o in prog.outs0]
        for o in np.unique(outputs[sel]):
            rows = sel[outputs[sel] == o]
            t = torch.zeros(len(prog.x), prog.outs0[1 + o][0].numel(), dtype=torch.float64)
            for term in range(flat.shape[1]):
                t[points[rows], flat[rows, term]] += torch.as_tensor(signs[rows, term], dtype=torch.float64)
            cot[1 + o] = t.reshape(prog.outs0[1 + o].shape)
        res[sel] = _vjp_rows(prog, cot)[points[sel]]
    return res


def _violations(prog: HiddenProgram, change: tuple, rows: _Rows, tol: float, active: np.ndarray) -> list[tuple]:
    """Every margin and pattern row the change (dW, db, later biases) violates at an ``active`` point and that is not yet a
    row: (key, rhs, excess)."""
    dW, db, de = change
    dz = _dz(prog, dW, db)
    t = _jvp(prog, dz, de)
    found = []
    logits = _padded(prog, (prog.outs0[0] + t[0]).numpy())
    base = _padded(prog, prog.outs0[0].numpy())
    N, C = logits.shape
    lab = prog.labels
    own = logits[np.arange(N), lab][:, None]
    marg = own - logits
    marg[np.arange(N), lab] = np.inf
    base_m = base[np.arange(N), lab][:, None] - base
    short = (marg < prog.required[:, None] - tol * (1 + np.abs(prog.required[:, None]))) & active[:, None]
    for k, j in zip(*np.nonzero(short)):
        key = ("margin", int(k), int(j))
        if key not in rows.keys:
            found.append((key, prog.required[k] - base_m[k, j], float(prog.required[k] - marg[k, j])))
    for o in prog.suffix.relus:
        p0 = prog.outs0[1 + o].reshape(N, -1).numpy()
        p1 = p0 + t[1 + o].reshape(N, -1).numpy()
        s = np.where(p0 > 0, 1.0, -1.0)
        bad = (s * p1 < -tol * (1 + np.abs(p0))) & active[:, None]
        for k, n in zip(*np.nonzero(bad)):
            key = ("relu", int(k), int(o), int(n), float(s[k, n]))
            if key not in rows.keys:
                found.append((key, -s[k, n] * p0[k, n], float(-s[k, n] * p1[k, n])))
    for o, pool in prog.suffix.pools:
        shape = tuple(prog.outs0[1 + o].shape[1:])
        win, valid = pool_windows(shape, pool)
        p0 = prog.outs0[1 + o].reshape(N, -1).numpy()
        p1 = p0 + t[1 + o].reshape(N, -1).numpy()
        safe = np.where(valid, win, 0)
        v0 = np.where(valid[None], p0[:, safe], -np.inf)
        chosen = safe[np.arange(len(win))[None, :], v0.argmax(2)]  # N x windows
        v1 = p1[:, safe]
        c1 = np.take_along_axis(p1, chosen, 1)
        c0 = np.take_along_axis(p0, chosen, 1)
        bad = valid[None] & (v1 > c1[:, :, None] + tol * (1 + np.abs(c0[:, :, None]))) & (safe[None] != chosen[:, :, None])
        bad &= active[:, None, None]
        for k, w, i in zip(*np.nonzero(bad)):
            a, b = int(chosen[k, w]), int(safe[w, i])
            key = ("pool", int(k), int(o), a, b)
            if key not in rows.keys:
                found.append((key, -(p0[k, a] - p0[k, b]), float(v1[k, w, i] - c1[k, w])))
    return found


def _keep_short(prog: HiddenProgram, change: tuple, active: np.ndarray, tol: float, batch: int = 2048) -> np.ndarray:
    """The points not ``active`` (keep points the program has no rows for) whose margin on the network itself, changed by
    (dW, db, later biases) and run in float64 with whatever activation pattern it takes, is below their requirement."""
    idx = np.flatnonzero(~active)
    if not len(idx):
        return idx
    dW, db, de = change
    z = prog.z0 + _dz(prog, dW, db)
    e = _later_split(prog, de)
    suffix = _suffix64(prog)
    short = []
    with torch.no_grad():
        for s in range(0, len(idx), batch):
            sel = idx[s:s + batch]
            t = torch.as_tensor(sel)
            logits = suffix(prog.x[t].double(), z[t], *(v[t] for v in e))[0].numpy()
            req = prog.required[sel]
            short.append(sel[margins_of(logits, prog.labels[sel], _zero_rival(prog)) < req - tol * (1 + np.abs(req))])
    return np.concatenate(short)


def _add_rows(prog: HiddenProgram, rows: _Rows, found: list[tuple]) -> int:
    """Add the most violated of ``found`` (at most ROWS_PER_ROUND), computing their z-gradients in batches."""
    found = sorted(found, key=lambda f: -f[2])[:ROWS_PER_ROUND]
    margin = [f for f in found if f[0][0] == "margin"]
    relu = [f for f in found if f[0][0] == "relu"]
    pool = [f for f in found if f[0][0] == "pool"]
    if margin:
        g = _margin_rows(prog, np.array([f[0][1] for f in margin]), np.array([f[0][2] for f in margin]))
        for f, gi in zip(margin, g):
            rows.add(f[0], f[0][1], gi, f[1])
    if relu:
        pts = np.array([f[0][1] for f in relu])
        g = _unit_rows(prog, pts, np.array([f[0][2] for f in relu]), np.array([[f[0][3]] for f in relu]),
                       np.array([[f[0][4]] for f in relu]))
        for f, gi in zip(relu, g):
            rows.add(f[0], f[0][1], gi, f[1])
    if pool:
        pts = np.array([f[0][1] for f in pool])
        g = _unit_rows(prog, pts, np.array([f[0][2] for f in pool]), np.array([[f[0][3], f[0][4]] for f in pool]),
                       np.tile([1.0, -1.0], (len(pool), 1)))
        for f, gi in zip(pool, g):
            rows.add(f[0], f[0][1], gi, f[1])
    return len(found)


def _row_weight_coef(prog: HiddenProgram, G: np.ndarray, pts: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Coefficients (rows x cols) of rows with z-gradients ``G`` at points ``pts`` on weight entries ``cols`` (flat)."""
    O = prog.weight.shape[0]
    Pn, L = prog.patches.shape[1:]
    patches = prog.patches.numpy()
    G = G[:, :prog.nz]
    if L == 1:  # a linear layer: the outer product of the z-gradient and the input
        i, p = np.divmod(cols, Pn)
        return G[:, i] * patches[pts][:, p, 0]
    out = np.empty((len(G), len(cols)))
    for s in range(0, len(G), 256):  # a convolution: z-gradient (O x L) times the unfolded input (L x P), per row
        full = np.matmul(G[s:s + 256].reshape(-1, O, L), patches[pts[s:s + 256]].transpose(0, 2, 1)).reshape(-1, O * Pn)
        out[s:s + 256] = full[:, cols]
    return out


def _bias_coef(prog: HiddenProgram, G: np.ndarray) -> np.ndarray:
    O = prog.weight.shape[0]
    return G[:, :prog.nz].reshape(len(G), O, -1).sum(2)


def _later_coef(prog: HiddenProgram, G: np.ndarray) -> np.ndarray:
    """Coefficients of rows on the later biases' entries (the tail of each row's gradient)."""
    return G[:, prog.nz:]


def _price(prog: HiddenProgram, G: np.ndarray, pts: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum_r y_r * weight coefficients, the same on the bias): the reduced-cost test of every column."""
    O = prog.weight.shape[0]
    N, Pn, L = prog.patches.shape
    agg = np.zeros((N, O, L))
    np.add.at(agg, pts, (y[:, None] * G[:, :prog.nz]).reshape(len(G), O, L))
    M = np.einsum("nol,npl->op", agg, prog.patches.numpy())
    return M, agg.sum((0, 2))


def _split(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.coo_matrix:
    """Coefficients ``values`` of a change split as ``d+ - d-``: ``+values`` in column ``cols`` (each entry's d+) and
    ``-values`` in ``cols + 1`` (its d-), at ``rows``."""
    return sp.coo_matrix((np.concatenate([values, -values]), (np.concatenate([rows, rows]), np.concatenate([cols, cols + 1]))),
                         shape=shape)


class _Master:
    """The restricted program in one HiGHS instance, grown by rows and columns and re-solved from its last basis.

    Columns: ``d+``, ``d-`` per weight entry in the program and per bias entry (cost 1 / layer scale), and an elastic
    shortfall per margin row (cost ELASTIC_PRICE; a pattern row holds at zero change and needs none); rows:
    ``g . dz_k + shortfall >= rhs``, each scaled by a bound on its coefficients so that every program is O(1) whatever
    the layer's scale.

    For a linear layer, a point with UNIT_ROWS dense rows (margins, or patterns after a later layer) gets its own columns
    ``u_k = dz_k`` (free) and definition rows ``u_k - dW h_k - db = 0``: its rows are then ``g . u_k`` (one entry per
    unit of the layer instead of one per weight entry), far fewer nonzeros when a point has many rows (the C-1 margins
    of a repair point, a keep point's ReLU signs)."""

    def __init__(self, prog: HiddenProgram, scale: float, bound: float | None, time_limit: float | None):
        self.prog, self.scale = prog, scale
        self.upper = np.inf if bound is None else float(bound)
        self.h = new_highs(time_limit, "simplex")
        self.ncols = 0
        self.nrows = 0
        self.price = ELASTIC_PRICE
        self.entries: list[int] = []
        self.entry_col: list[int] = []
        self.row_norm: list[float] = []
        self.row_slack: list[int] = []
        self.row_index: list[int] = []  # the HiGHS row of each generated row
        self.row_in_u: list[bool] = []
        O = prog.weight.shape[0]
        self.a, self.b = prog.norm_coefficients()
        # the dearest shortfall over the cheapest change stays within what HiGHS solves reliably (PRDNN's mean + max has
        # a change cost of 1 / #entries beside the largest change's 1)
        self.max_price = max(ELASTIC_PRICE, MAX_ELASTIC_PRICE * min(c for c in (self.a, self.b) if c > 0) / max(self.a, self.b))
        self.t_col = self._add_cols([self.b / scale], [self.upper]) if self.b > 0 else None  # the largest change, t
        self.nb = 0 if prog.freeze_bias else O
        if self.nb:
            self.bias_col = self._add_cols(np.full(2 * O, self.a / scale), np.full(2 * O, self.upper))
            self._link(self.bias_col, O)
        self.nl = len(prog.later_bias)
        self.later_col = self._add_cols(np.full(2 * self.nl, self.a / scale), np.full(2 * self.nl, self.upper))
        self._link(self.later_col, self.nl)
        self.patch_max = np.abs(prog.patches.numpy()).reshape(len(prog.patches), -1).max(1)
        self.by_unit = prog.patches.shape[2] == 1
        self.u_col: dict[int, int] = {}  # point -> its first u column
        self.def_row: dict[int, int] = {}  # point -> its first definition row
        self.dense_rows: dict[int, int] = {}  # point -> how many dense rows it has
        # a pattern row on one u column (a ReLU right after the layer, at a point with u columns) is that column's bound,
        # not a row: column -> {side: generated row}, and per generated row its column and coefficient (0: a real row)
        self.bound_of: dict[int, dict[str, int]] = {}
        self.row_col: list[int] = []
        self.row_coef: list[float] = []

    def _add_cols(self, cost, upper, starts=None, idx=None, vals=None, lower=None) -> int:
        first, k = self.ncols, len(cost)
        if starts is None:
            starts, idx, vals = np.zeros(k, np.int32), np.zeros(0, np.int32), np.zeros(0)
        lower = np.zeros(k) if lower is None else np.asarray(lower, float)
        self.h.addCols(k, np.asarray(cost, float), lower, np.asarray(upper, float), len(vals), np.asarray(starts, np.int32),
                       np.asarray(idx, np.int32), np.asarray(vals, float))
        self.ncols += k
        return first

    def _add_rows(self, lower: np.ndarray, upper: np.ndarray, A: sp.csr_matrix) -> int:
        first = self.nrows
        self.h.addRows(A.shape[0], np.asarray(lower, float), np.asarray(upper, float), A.nnz, A.indptr.astype(np.int32),
                       A.indices.astype(np.int32), A.data.astype(float))
        self.nrows += A.shape[0]
        return first

    def _link(self, first: int, count: int) -> None:
        """Rows ``d+_e + d-_e - t <= 0`` for the ``count`` entries whose columns start at ``first`` (an L-infinity part)."""
        if self.t_col is None or count == 0:
            return
        r = np.repeat(np.arange(count), 3)
        c = (first + np.stack([2 * np.arange(count), 2 * np.arange(count) + 1, np.full(count, self.t_col - first)], 1)).ravel()
        v = np.tile([1.0, 1.0, -1.0], count)
        self._add_rows(np.full(count, -np.inf), np.zeros(count), sp.csr_matrix((v, (r, c)), shape=(count, self.ncols)))

    def _definitions(self, points: np.ndarray, entries: np.ndarray) -> sp.coo_matrix:
        """Coefficients of weight entries ``entries`` (d+ then d- per entry, in order) in the definition rows of
        ``points``: a (len(points) * O) x (2 * len(entries)) matrix, rows point-major."""
        O, Pn = self.prog.weight.shape[0], self.prog.patches.shape[1]
        unit, inp = np.divmod(entries, Pn)
        H = self.prog.patches.numpy()[points][:, inp, 0] / np.maximum(1.0, self.patch_max[points])[:, None]  # points x entries
        p, c = np.nonzero(H)
        v = -H[p, c]
        r = p * O + unit[c]
        return _split(v, r, 2 * c, (len(points) * O, 2 * len(entries)))

    def _by_unit(self, points: np.ndarray) -> None:
        """Give ``points`` their u columns and definition rows."""
        points = np.asarray([k for k in dict.fromkeys(points.tolist()) if k not in self.u_col], np.int64)
        if not len(points):
            return
        O = self.prog.weight.shape[0]
        n = len(points) * O
        first = self._add_cols(np.zeros(n), np.full(n, np.inf), lower=np.full(n, -np.inf))
        s = np.repeat(1.0 / np.maximum(1.0, self.patch_max[points]), O)
        blocks = [sp.coo_matrix((s, (np.arange(n), first + np.arange(n))), shape=(n, self.ncols))]
        if self.entries:
            D = self._definitions(points, np.asarray(self.entries, np.int64)).tocoo()
            cols = np.stack([np.asarray(self.entry_col), np.asarray(self.entry_col) + 1], 1).ravel()
            blocks.append(sp.coo_matrix((D.data, (D.row, cols[D.col])), shape=(n, self.ncols)))
        if self.nb:
            unit = np.tile(np.arange(O), len(points))
            blocks.append(_split(-s, np.arange(n), self.bias_col + 2 * unit, (n, self.ncols)))
        A = sp.csr_matrix(sum(blocks[1:], blocks[0]))
        row = self._add_rows(np.zeros(n), np.zeros(n), A)
        for j, k in enumerate(points):
            self.u_col[int(k)] = first + j * O
            self.def_row[int(k)] = row + j * O

    def add_cols(self, entries: np.ndarray) -> None:
        """Columns d+ and d- for new weight entries, with their coefficients in every existing row."""
        entries = np.asarray(entries, np.int64)
        if not len(entries):
            return
        rows = self.prog.warm.get("rows")
        mine = np.flatnonzero(~np.asarray(self.row_in_u, bool)) if self.row_norm else np.zeros(0, np.int64)
        blocks = []
        if len(mine):
            coef = _row_weight_coef(self.prog, np.asarray(rows.grad)[mine], np.asarray(rows.point, np.int64)[mine], entries)
            coef = coef / np.asarray(self.row_norm)[mine][:, None]
            C = sp.coo_matrix(np.stack([coef, -coef], 2).reshape(len(mine), -1))
            blocks.append(sp.coo_matrix((C.data, (np.asarray(self.row_index)[mine][C.row], C.col)), shape=(self.nrows, 2 * len(entries))))
        if self.u_col:
            pts = np.asarray(list(self.def_row), np.int64)
            D = self._definitions(pts, entries).tocoo()
            O = self.prog.weight.shape[0]
            starts = np.asarray([self.def_row[int(k)] for k in pts])
            blocks.append(sp.coo_matrix((D.data, (starts[D.row // O] + D.row % O, D.col)), shape=(self.nrows, 2 * len(entries))))
        A = sp.csc_matrix(sum(blocks[1:], blocks[0])) if blocks else sp.csc_matrix((self.nrows, 2 * len(entries)))
        k = 2 * len(entries)
        first = self._add_cols(np.full(k, self.a / self.scale), np.full(k, self.upper), A.indptr[:-1], A.indices, A.data)
        self._link(first, len(entries))
        for off, e in enumerate(entries):
            self.entries.append(int(e))
            self.entry_col.append(first + 2 * off)

    def add_rows(self, rows: _Rows, first: int) -> None:
        """Rows ``first:`` of ``rows`` (a margin row with its own elastic shortfall column)."""
        n = len(rows) - first
        if n <= 0:
            return
        G = np.asarray(rows.grad[first:])
        pts = np.asarray(rows.point[first:], np.int64)
        rhs = np.asarray(rows.rhs[first:])
        L = self.prog.patches.shape[2]
        # a shortfall column only where the row can be short: margin rows (their requirement may exceed the margin the
        # original network has); a pattern row holds at zero change and never needs one (fewer columns, a feasible start)
        elastic = np.array([w[0] == "margin" for w in rows.what[first:]], bool)
        slack = self._add_cols(np.full(int(elastic.sum()), self.price), np.full(int(elastic.sum()), np.inf))
        slack_of = np.full(n, -1, np.int64)
        slack_of[elastic] = slack + np.arange(int(elastic.sum()))
        in_u = np.zeros(n, bool)
        if self.by_unit:  # u columns pay for their O definition rows from a point's UNIT_ROWS-th dense row on
            dense = (G[:, :self.prog.nz] != 0).sum(1) > 1
            for k in pts[dense].tolist():
                self.dense_rows[k] = self.dense_rows.get(k, 0) + 1
            self._by_unit(np.asarray([k for k in pts[dense].tolist() if self.dense_rows[k] >= UNIT_ROWS], np.int64))
            in_u = np.array([int(k) in self.u_col for k in pts], bool)
        Gz, Ge = G[:, :self.prog.nz], _later_coef(self.prog, G)
        norm = np.abs(Gz).max(1) * np.where(in_u, 1.0, np.maximum(1.0, self.patch_max[pts]) * L)
        norm = np.maximum(np.maximum(norm, np.abs(Ge).max(1, initial=0.0)), 1e-300)
        blocks = []
        if (~in_u).any():
            sel = np.flatnonzero(~in_u)
            cols = np.asarray(self.entries, np.int64)
            wcols = np.asarray(self.entry_col, np.int64)
            if len(cols):
                Aw = _row_weight_coef(self.prog, G[sel], pts[sel], cols) / norm[sel][:, None]
                C = sp.coo_matrix(Aw)
                blocks.append(_split(C.data, sel[C.row], wcols[C.col], (n, self.ncols)))
            if self.nb:
                C = sp.coo_matrix(_bias_coef(self.prog, G[sel]) / norm[sel][:, None])
                blocks.append(_split(C.data, sel[C.row], self.bias_col + 2 * C.col, (n, self.ncols)))
        bound = self._bound_rows(Gz, Ge, pts, in_u & ~elastic, norm, first)
        if in_u.any():
            sel = np.flatnonzero(in_u & (bound < 0))
            C = sp.coo_matrix(Gz[sel] / norm[sel][:, None])
            base = np.asarray([self.u_col[int(k)] for k in pts[sel]], np.int64)
            blocks.append(sp.coo_matrix((C.data, (sel[C.row], base[C.row] + C.col)), shape=(n, self.ncols)))
        if self.nl:
            C = sp.coo_matrix(Ge / norm[:, None])
            blocks.append(_split(C.data, C.row, self.later_col + 2 * C.col, (n, self.ncols)))
        e = np.flatnonzero(elastic)
        blocks.append(sp.coo_matrix((np.ones(len(e)), (e, slack_of[e])), shape=(n, self.ncols)))
        real = np.flatnonzero(bound < 0)
        A = sp.csr_matrix(sum(blocks[1:], blocks[0]))[real]
        row = self._add_rows(rhs[real] / norm[real], np.full(len(real), np.inf), A)
        index = np.full(n, -1, np.int64)
        index[real] = row + np.arange(len(real))
        self.row_index.extend(index.tolist())
        self.row_norm.extend(norm.tolist())
        self.row_slack.extend(slack_of.tolist())
        self.row_in_u.extend(in_u.tolist())
        self._apply_bounds(sorted(set(bound[bound >= 0].tolist())), rows.rhs)

    def _bound_rows(self, Gz: np.ndarray, Ge: np.ndarray, pts: np.ndarray, candidate: np.ndarray, norm: np.ndarray,
                    first: int) -> np.ndarray:
        """Per new row, the u column it bounds (-1: a real row). A pattern row whose only coefficient is on one u column
        of its point (``s u >= rhs``: a ReLU right after the layer) becomes that column's lower or upper bound, unless
        another row bounds that side already; its multiplier is then the column's reduced cost (:meth:`solution`).
        ``candidate``: the new rows that may (pattern rows at points with u columns); ``first``: the first one's index."""
        out = np.full(len(pts), -1, np.int64)
        single = candidate & ((Gz != 0).sum(1) == 1) & PATTERN_BOUNDS
        if Ge.shape[1]:
            single &= ~(Ge != 0).any(1)
        for r in np.flatnonzero(single):
            i = int(np.flatnonzero(Gz[r])[0])
            col = self.u_col[int(pts[r])] + i
            coef = float(Gz[r, i] / norm[r])
            side = "lower" if coef > 0 else "upper"
            sides = self.bound_of.setdefault(col, {})
            if side in sides:
                continue
            sides[side] = first + int(r)
            out[r] = col
        self.row_col.extend(out.tolist())
        self.row_coef.extend(np.where(out >= 0, Gz[np.arange(len(pts)), np.argmax(Gz != 0, 1)] / norm, 0.0).tolist())
        return out

    def _apply_bounds(self, cols: list[int], rhs) -> None:
        """Write the bounds of these u columns from the generated rows that bound them (``coef * u >= rhs``, scaled by each
        row's norm; ``rhs``: every generated row's right-hand side)."""
        if not cols:
            return
        lo, hi = np.full(len(cols), -np.inf), np.full(len(cols), np.inf)
        for j, col in enumerate(cols):
            for side, r in self.bound_of[col].items():
                v = rhs[r] / self.row_norm[r] / self.row_coef[r]
                if side == "lower":
                    lo[j] = v
                else:
                    hi[j] = v
        self.h.changeColsBounds(len(cols), np.asarray(cols, np.int32), lo, hi)

    def set_rhs(self, rhs: np.ndarray) -> None:
        """New right-hand sides for every generated row (a re-solve with raised margins starts from the last basis)."""
        n = len(self.row_norm)
        index = np.asarray(self.row_index, np.int64)
        real = np.flatnonzero(index >= 0)
        scaled = np.asarray(rhs[:n]) / np.asarray(self.row_norm)
        self.h.changeRowsBounds(len(real), index[real].astype(np.int32), scaled[real], np.full(len(real), np.inf))
        self._apply_bounds(sorted(self.bound_of), rhs)

    def raise_price(self, factor: float) -> None:
        """Make every row's shortfall ``factor`` times dearer (at most ``max_price``)."""
        self.price = min(self.price * factor, self.max_price)
        cols = np.asarray(self.row_slack, np.int32)
        cols = cols[cols >= 0]
        self.h.changeColsCost(len(cols), cols, np.full(len(cols), self.price))

    def solve(self, time_limit: float | None) -> str:
        if time_limit is not None and np.isfinite(time_limit):
            set_time_limit(self.h, time_limit)
        run(self.h)
        return highs_status(self.h)

    def slack_of_t(self) -> float:
        """How much more excess ``sum (|price_e| - a)+`` of entries outside the program the L-infinity part can absorb (in
        weight units): ``t``'s reduced cost when ``t`` is at 0, else nothing (0 without an L-infinity part)."""
        if self.t_col is None:
            return 0.0
        sol = self.h.getSolution()
        return max(0.0, float(sol.col_dual[self.t_col]) * self.scale) if sol.col_value[self.t_col] <= 0 else 0.0

    def solution(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(dW flat, db, multipliers of the original rows in weight units, shortfall per row, later biases' change)."""
        sol = self.h.getSolution()
        x = np.asarray(sol.col_value)
        O = self.prog.weight.shape[0]
        dW = np.zeros(self.prog.weight.size)
        cols = np.asarray(self.entry_col, np.int64)
        if len(cols):
            dW[np.asarray(self.entries, np.int64)] = x[cols] - x[cols + 1]
        db = x[self.bias_col:self.bias_col + 2 * O:2] - x[self.bias_col + 1:self.bias_col + 2 * O:2] if self.nb else np.zeros(O)
        index = np.asarray(self.row_index, np.int64)
        col, coef = np.asarray(self.row_col, np.int64), np.asarray(self.row_coef)
        dual = np.where(index >= 0, np.asarray(sol.row_dual)[np.maximum(index, 0)], 0.0)
        bounded = col >= 0  # a bound row's multiplier: its column's reduced cost over its coefficient (coef u >= rhs)
        dual[bounded] = np.asarray(sol.col_dual)[col[bounded]] / coef[bounded]
        y = np.maximum(dual, 0.0) / np.asarray(self.row_norm) * self.scale
        slack = np.asarray(self.row_slack, np.int64)
        l0 = self.later_col
        de = x[l0:l0 + 2 * self.nl:2] - x[l0 + 1:l0 + 2 * self.nl:2]
        return dW, db, y, np.where(slack >= 0, x[np.maximum(slack, 0)], 0.0), de


def solve_hidden(prog: HiddenProgram, time_limit: float | None = None) -> MarginSolution:
    """The minimal-L1 change of the layer that meets every margin with every pattern kept (row and column generation)."""
    t0 = time.perf_counter()
    O = prog.weight.shape[0]
    n_w = prog.weight.size
    K = prog.n_repair
    C = prog.outs0[0].shape[1]
    rows = prog.warm.get("rows")
    if rows is None:
        rows = _Rows()
        base = _padded(prog, prog.outs0[0].numpy())
        init = [(("margin", k, j), float(prog.required[k] - (base[k, prog.labels[k]] - base[k, j])), 1.0)
                for k in range(K) for j in range(base.shape[1]) if j != prog.labels[k]]
        _add_rows(prog, rows, init)
    else:  # a re-solve with raised margins: the same rows, their right-hand sides from the new requirements
        for r, key in enumerate(rows.what):
            if key[0] == "margin":
                k, j = key[1], key[2]
                rival = float(prog.outs0[0][k, j]) if j < C else 0.0  # class C: the zero rival
                rows.rhs[r] = float(prog.required[k] - (float(prog.outs0[0][k, prog.labels[k]]) - rival))
    # columns: every entry of a small weight; otherwise the best-priced ones, generated as needed
    cols = prog.warm.get("cols")
    if cols is None and n_w <= ALL_COLUMNS:
        cols = np.arange(n_w)
    elif cols is None:
        M, _ = _price(prog, np.asarray(rows.grad), np.asarray(rows.point), np.ones(len(rows)))
        cols = np.sort(np.argsort(-np.abs(M).ravel())[:_per_round(n_w)])
    prog.warm.update(rows=rows, cols=cols)
    active = prog.warm.get("active")  # the points the program has rows for: every repair point, the keep points it needed
    if active is None:
        active = np.arange(len(prog.labels)) < K
        prog.warm["active"] = active
    scale = float(max(np.abs(prog.weight).max(initial=0.0), np.abs(prog.bias).max(initial=0.0), 1e-12))
    tol = 1e-9
    bound = prog.max_change
    master = prog.warm.get("master")
    if master is None:  # a re-solve keeps the last instance: new right-hand sides, the dual simplex from the last basis
        master = _Master(prog, scale, bound, time_limit)
        master.add_cols(cols)
        master.add_rows(rows, 0)
        prog.warm["master"] = master
    else:
        master.set_rhs(np.asarray(rows.rhs))
    dW, db, de = np.zeros(n_w), np.zeros(O), np.zeros(len(prog.later_bias))
    y = np.zeros(0)
    short = np.zeros(0)
    rounds, status = 0, "optimal"
    for rounds in range(1, MAX_ROUNDS + 1):
        remaining = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if remaining is not None and remaining <= 0:
            status = "time_limit"
            break
        st = master.solve(remaining)
        if st != "optimal" and st != "time_limit" and master.price > ELASTIC_PRICE and (short > 1e-9).any():
            break  # the raised price left HiGHS without an answer: the rows still short go to the feasibility proof below
        if st != "optimal":
            status = st
            break
        dW, db, y, short, de = master.solution()
        change = (dW.reshape(prog.weight.shape), db, de)
        G, pts = np.asarray(rows.grad), np.asarray(rows.point, np.int64)
        M, Mb = _price(prog, G, pts, y)
        out_cols = _priced_out(master, np.abs(M).ravel())
        # keep points enter the program only when the change costs them their margin on the network itself (checked every
        # round, so that they enter while the repair points' rows are still being generated); their rows (margins and
        # pattern) are then generated like a repair point's
        entering = _keep_short(prog, change, active, tol)
        active[entering] = True
        found = _violations(prog, change, rows, tol, active)
        if len(out_cols):
            worst = out_cols[np.argsort(-np.abs(M).ravel()[out_cols])][:_per_round(n_w)]
            master.add_cols(np.sort(worst))
            prog.warm["cols"] = np.asarray(master.entries)
        if found:
            first = len(rows)
            _add_rows(prog, rows, found)
            master.add_rows(rows, first)
        if not len(out_cols) and not found:
            if (short > 1e-9).any() and master.price < master.max_price:  # short rows may only be too cheap: raise their price
                master.raise_price(1000.0)
                continue
            break
    else:
        status = "iteration_limit"
    cols = np.asarray(master.entries)
    size = {"rows": len(rows), "columns": int(len(cols)) + (0 if prog.freeze_bias else O) + len(de), "weights": int(n_w),
            "rounds": rounds, "pattern_rows": int(sum(1 for w in rows.what if w[0] != "margin")),
            "pattern_bounds": int((np.asarray(master.row_col, np.int64) >= 0).sum())}  # pattern rows written as column bounds
    if prog.later:
        size["later_bias_entries"] = len(de)
    seconds = time.perf_counter() - t0
    zero = (np.zeros(prog.weight.shape), np.zeros(O))
    if status != "optimal":
        return MarginSolution(status, *zero, float("nan"), float("nan"), seconds, rounds, size)
    if (short > 1e-9).any():  # the elastic rows stayed short: prove infeasibility on those rows with every column
        bad = np.flatnonzero(short > 1e-9)
        everything = np.arange(len(rows))
        # the short rows alone, or only with the pattern rows of every point in the program (then all of those points are
        # part of the conflict, the keep points whose patterns were fixed included)
        for which in (bad, everything):
            if _infeasible(prog, rows, which):
                return MarginSolution("infeasible", *zero, float("nan"), float("nan"), time.perf_counter() - t0, rounds, size,
                                      conflicts=np.unique(np.asarray(rows.point, np.int64)[which]))
        return MarginSolution("failed", *zero, float("nan"), float("nan"), time.perf_counter() - t0, rounds, size)
    objective = prog.change_cost(dW, db, de)
    G, pts = np.asarray(rows.grad), np.asarray(rows.point, np.int64)
    M, Mb = _price(prog, G, pts, y)
    Me = y @ _later_coef(prog, G) if len(de) else np.zeros(0)
    zz = np.concatenate([np.abs(M).ravel(), [] if prog.freeze_bias else np.abs(Mb), np.abs(Me)])
    a, b = prog.norm_coefficients()
    lower = min(dual_bound(float(np.asarray(rows.rhs) @ y), zz, a, b, bound), objective)  # over every entry, in the program or not
    return MarginSolution("optimal", dW.reshape(prog.weight.shape), db, objective, lower, time.perf_counter() - t0, rounds, size,
                          delta_later=de if prog.later else None)


def _per_round(n_w: int) -> int:
    """Weight entries a round of column generation adds (at most), for a weight of ``n_w`` entries."""
    return max(COLUMNS_PER_ROUND, n_w // COLUMN_SHARE)


def _priced_out(master: _Master, price: np.ndarray) -> np.ndarray:
    """Weight entries outside the program whose column would lower the cost (``price``: ``|sum_r y_r A_re|`` of every
    entry, weight units): under L1 each one with a price above its cost ``a``; with an L-infinity part only once their
    total excess over ``a`` is more than the largest change ``t`` can absorb (else the program is optimal as it is)."""
    a, b = master.a, master.b
    out = np.setdiff1d(np.flatnonzero(price > a * (1 + 1e-7)), master.entries)
    if b > 0 and len(out) and float((price[out] - a).sum()) <= master.slack_of_t() + 1e-7 * b:
        return out[:0]
    return out


def _infeasible(prog: HiddenProgram, rows: _Rows, which: np.ndarray) -> bool:
    """Are these generated rows infeasible together, over every weight and bias column (HiGHS, exact feasibility)?"""
    G = np.asarray(rows.grad)[which]
    pts = np.asarray(rows.point, np.int64)[which]
    rhs = np.asarray(rows.rhs)[which]
    Aw = _row_weight_coef(prog, G, pts, np.arange(prog.weight.size))
    Ab = _bias_coef(prog, G) if not prog.freeze_bias else np.zeros((len(G), 0))
    Ae = _later_coef(prog, G)
    norm = np.maximum(np.abs(np.hstack([Aw, Ab, Ae])).max(1), 1e-300)
    A = sp.csc_matrix(np.hstack([Aw, -Aw, Ab, -Ab, Ae, -Ae]) / norm[:, None])
    n = A.shape[1]
    upper = np.full(n, np.inf if prog.max_change is None else prog.max_change)
    h = new_highs(None, "simplex")
    pass_lp(h, np.zeros(n), A, upper, rhs / norm, np.full(len(G), np.inf))
    run(h)
    return highs_status(h) == "infeasible"


def written(prog: HiddenProgram, model: nn.Module, dW: np.ndarray, db: np.ndarray, de: np.ndarray | None = None) -> nn.Module:
    """A deep copy of ``model`` with the layer's weight (and bias) changed by (dW, db), and the later biases by ``de``
    (when they may move), in each tensor's own dtype."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        new = copy.deepcopy(model)
    changes = [(prog.weight_param, prog.weight, dW), (prog.bias_param, prog.bias, db)]
    at = 0
    for _, bias, size in prog.later:
        if de is not None:
            changes.append((bias, prog.later_bias[at:at + size], de[at:at + size]))
        at += size
    for param, base, delta in changes:
        if param is None:
            continue
        t = get_tensor(new, param)
        with torch.no_grad():
            t.copy_(torch.as_tensor(base + delta, dtype=t.dtype).to(t.device))
    return new
