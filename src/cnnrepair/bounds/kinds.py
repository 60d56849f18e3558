"""How the bound methods cross each kind of operation: one registered object per kind.

The rules of :mod:`cnnrepair.bounds.graph` sort every ATen node of the frozen part into a kind
(``input``, ``affine``, ``sum``, ``relu``, ``maxpool``); a :class:`Kind` says, for its operations,

* ``ibp``: a box holding the operation's image of its input's box (interval bound propagation);
* ``forward``: linear functions of the network's input below and above its output, from those of
  its input (CROWN's forward relaxation, DeepPoly without back-substitution);
* ``backward``: the coefficients and constant on its input that bound a linear function of its
  output from below (the first half of the rows) and above (the second half): CROWN's
  back-substitution step.

A new non-linearity is one subclass registered with :func:`bound_kind`; one that defines only
``ibp`` is still crossed soundly by CROWN, through its box as constant bounds (the defaults below).
All arithmetic is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cnnrepair.bounds.graph import Op, maxpool

KINDS: dict[str, Kind] = {}


def bound_kind(cls: type[Kind]) -> type[Kind]:
    """Register a :class:`Kind` subclass under its ``name`` (a class decorator); it replaces any kind of that name."""
    KINDS[cls.name] = cls()
    return cls


class Kind:
    """The relaxations of one kind of operation. ``nonlinear``: values after it are no longer exact linear
    functions of the input; ``linear_map``: an affine map or sum, whose float64 results are widened against
    roundoff and whose CROWN forward bound can tighten IBP's."""

    name = ""
    nonlinear = True
    linear_map = False

    def ibp(self, op: Op, bounds: dict, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"bound kind {self.name!r} has no interval rule")

    def forward(self, op: Op, linear: dict, bounds: dict, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(LA, La, UA, Ua): coefficients (B x D x shape) and constants below and above; by default the box as constants."""
        lo, hi = self.ibp(op, bounds, lower, upper)
        zero = torch.zeros(lower.shape[0], lower[0].numel(), *lo.shape[1:], dtype=torch.float64)
        return zero, lo, zero, hi

    def backward(self, op: Op, a: Tensor, bounds: dict, S: int) -> list[tuple]:
        """[(source node, coefficients on it, constant B x 2S)]; by default the operation's box as constants."""
        lo, hi = (t.unsqueeze(1) for t in bounds[op.node])
        al, au = a[:, :S], a[:, S:]
        bl = (al.clamp(min=0) * lo + al.clamp(max=0) * hi).flatten(2).sum(-1)
        bu = (au.clamp(min=0) * hi + au.clamp(max=0) * lo).flatten(2).sum(-1)
        src = op.inputs[0]
        zero = torch.zeros(a.shape[0], a.shape[1], *bounds[src][0].shape[1:], dtype=torch.float64)
        return [(src, zero, torch.cat([bl, bu], 1))]


@bound_kind
class Input(Kind):
    """The network's input: its box, and the identity as its linear bounds."""

    name = "input"
    nonlinear = False

    def ibp(self, op, bounds, lower, upper):
        return lower, upper

    def forward(self, op, linear, bounds, lower, upper):
        B, D = lower.shape[0], lower[0].numel()
        eye = torch.eye(D, dtype=torch.float64).reshape(1, D, *lower.shape[1:]).expand(B, D, *lower.shape[1:])
        zero = torch.zeros_like(lower)
        return eye, zero, eye, zero

    def backward(self, op, a, bounds, S):
        return []


@bound_kind
class Sum(Kind):
    """``s0 * x + s1 * y`` of two input-dependent values (residual connections)."""

    name = "sum"
    nonlinear = False
    linear_map = True

    def ibp(self, op, bounds, lower, upper):
        (l1, h1), (l2, h2) = (bounds[n] for n in op.inputs)
        s = op.signs[1]
        return (l1 + s * l2, h1 + s * h2) if s >= 0 else (l1 + s * h2, h1 + s * l2)

    def forward(self, op, linear, bounds, lower, upper):
        (LA1, La1, UA1, Ua1), (LA2, La2, UA2, Ua2) = (linear[n] for n in op.inputs)
        s = op.signs[1]
        if s >= 0:
            return LA1 + s * LA2, La1 + s * La2, UA1 + s * UA2, Ua1 + s * Ua2
        return LA1 + s * UA2, La1 + s * Ua2, UA1 + s * LA2, Ua1 + s * La2

    def backward(self, op, a, bounds, S):
        zero = torch.zeros(a.shape[0], 2 * S, dtype=torch.float64)
        return [(op.inputs[0], a * op.signs[0], zero), (op.inputs[1], a * op.signs[1], zero)]


@bound_kind
class Affine(Kind):
    """``L x + c``: centre +- ``|L|`` radius for boxes; exact for linear bounds."""

    name = "affine"
    nonlinear = False
    linear_map = True

    def ibp(self, op, bounds, lower, upper):
        lo, hi = bounds[op.inputs[0]]
        mid, rad = (lo + hi) / 2, (hi - lo) / 2
        with torch.no_grad():
            centre, radius = op.run(mid), op.abs_linear(rad)
        return centre - radius, centre + radius

    def forward(self, op, linear, bounds, lower, upper):
        LA, La, UA, Ua = linear[op.inputs[0]]
        B, D = LA.shape[:2]
        with torch.no_grad():
            c0 = op.run(torch.zeros_like(La[:1]))
            new_La, new_Ua = _combine(op, La.unsqueeze(1), Ua.unsqueeze(1), B, 1)
            if LA is UA:  # exact so far (no relaxation upstream): one linear map serves both
                new = op.linear(LA.reshape(B * D, *LA.shape[2:]))
                new = new.reshape(B, D, *new.shape[1:])
                return new, new_La[:, 0] + c0, new, new_Ua[:, 0] + c0
            new_LA, new_UA = _combine(op, LA, UA, B, D)
        return new_LA, new_La[:, 0] + c0, new_UA, new_Ua[:, 0] + c0

    def backward(self, op, a, bounds, S):
        src = op.inputs[0]
        return [(src, *_affine_back(op, a, src_shape=bounds[src][0].shape[1:]))]


@bound_kind
class Relu(Kind):
    """ReLU: exact where a neuron is stable; between the chord above and the identity or zero below elsewhere."""

    name = "relu"

    def ibp(self, op, bounds, lower, upper):
        lo, hi = bounds[op.inputs[0]]
        return lo.clamp(min=0), hi.clamp(min=0)

    def forward(self, op, linear, bounds, lower, upper):
        LA, La, UA, Ua = linear[op.inputs[0]]
        up_slope, up_const, low_slope = relu_lines(*bounds[op.inputs[0]])
        return LA * low_slope.unsqueeze(1), La * low_slope, UA * up_slope.unsqueeze(1), Ua * up_slope + up_const

    def backward(self, op, a, bounds, S):
        lo, hi = bounds[op.inputs[0]]
        up_slope, up_const, low_slope = relu_lines(lo.unsqueeze(1), hi.unsqueeze(1))
        al, au = a[:, :S], a[:, S:]
        new_l = al.clamp(min=0) * low_slope + al.clamp(max=0) * up_slope
        new_u = au.clamp(min=0) * up_slope + au.clamp(max=0) * low_slope
        bl = (al.clamp(max=0) * up_const).flatten(2).sum(-1)
        bu = (au.clamp(min=0) * up_const).flatten(2).sum(-1)
        return [(op.inputs[0], torch.cat([new_l, new_u], 1), torch.cat([bl, bu], 1))]


@bound_kind
class MaxPool(Kind):
    """Max-pooling: each window above its input with the largest lower bound, below the largest upper bound
    (or equal to that input, when its lower bound beats every other input's upper bound)."""

    name = "maxpool"

    def ibp(self, op, bounds, lower, upper):
        lo, hi = bounds[op.inputs[0]]
        return maxpool(lo, op.run), maxpool(hi, op.run)

    def forward(self, op, linear, bounds, lower, upper):
        LA, La, UA, Ua = linear[op.inputs[0]]
        B, D = LA.shape[:2]
        lo, hi = bounds[op.inputs[0]]
        idx, exact, hi_out = pool_choice(op, lo, hi)
        C = lo.shape[1]
        gi = idx.flatten(2)
        new_LA = LA.flatten(3).gather(3, gi.unsqueeze(1).expand(B, D, C, -1)).reshape(B, D, *idx.shape[1:])
        new_La = La.flatten(2).gather(2, gi).reshape(idx.shape)
        sel_UA = UA.flatten(3).gather(3, gi.unsqueeze(1).expand(B, D, C, -1)).reshape(B, D, *idx.shape[1:])
        sel_Ua = Ua.flatten(2).gather(2, gi).reshape(idx.shape)
        ex = exact.double()
        return new_LA, new_La, sel_UA * ex.unsqueeze(1), sel_Ua * ex + hi_out * (1 - ex)

    def backward(self, op, a, bounds, S):
        lo, hi = bounds[op.inputs[0]]
        idx, exact, hi_out = pool_choice(op, lo, hi)
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
        return [(op.inputs[0], out.reshape(B, R, *lo.shape[1:]), torch.cat([bl, bu], 1))]


def _combine(op: Op, LA: Tensor, UA: Tensor, B: int, D: int) -> tuple[Tensor, Tensor]:
    """(P LA + N UA, P UA + N LA) for coefficient tensors (B x D x shape), run as a batch of B*D inputs.

    With P = (L + |L|)/2 and N = (L - |L|)/2 (the linear part's positive and negative entries) this is
    (L S -+ |L| E)/2 for S = LA + UA, E = UA - LA: two applications of the map instead of four."""
    shape = LA.shape[2:]
    sym = op.linear((LA + UA).reshape(B * D, *shape))
    spread = op.abs_linear((UA - LA).reshape(B * D, *shape))
    out = sym.shape[1:]
    return ((sym - spread) / 2).reshape(B, D, *out), ((sym + spread) / 2).reshape(B, D, *out)


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


def relu_lines(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ReLU's relaxation on [lo, hi]: the line above (slope, constant: the chord where the neuron is unstable) and the
    slope of the line below (through 0: 1 or 0, whichever is closer to the chord; exact where the neuron is stable)."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    width = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(unstable, hi / width, active.double())
    up_const = torch.where(unstable, -hi * lo / width, torch.zeros_like(hi))
    low_slope = torch.where(unstable, (hi > -lo).double(), active.double())
    return up_slope, up_const, low_slope


def pool_choice(op: Op, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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
