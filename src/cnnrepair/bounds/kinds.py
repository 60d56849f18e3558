"""How the bound methods cross each kind of operation: one registered object per kind.

The rules of :mod:`cnnrepair.bounds.graph` sort every ATen node of the frozen part into a kind
(``input``, ``affine``, ``sum``, ``relu``, ``maxpool``); a :class:`Kind` says, for its operations,

* ``ibp``: a box holding the operation's image of its input's box (interval bound propagation);
* ``backward``: the coefficients and constant on its input that bound a linear function of its
  output from below (the first ``n_low`` rows) and above (the rest): CROWN's back-substitution
  step. ReLU also takes ``slopes``, one lower slope per row and neuron in [0, 1] (alpha-CROWN's
  optimised relaxation; any value there is sound).

A new non-linearity is one subclass registered with :func:`bound_kind`; one that defines only
``ibp`` is still crossed soundly by CROWN, through its box as constant bounds (the defaults below).
All arithmetic is float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cnnrepair.bounds.graph import Op, maxpool, pair
from cnnrepair.bounds.window import Window, crop

KINDS: dict[str, Kind] = {}


def bound_kind(cls: type[Kind]) -> type[Kind]:
    """Register a :class:`Kind` subclass under its ``name`` (a class decorator); it replaces any kind of that name."""
    KINDS[cls.name] = cls()
    return cls


class Kind:
    """The relaxations of one kind of operation. ``nonlinear``: values after it are no longer exact linear
    functions of the input; ``linear_map``: an affine map or sum, whose float64 results are widened against
    roundoff and which CROWN bounds by back-substitution where a relaxation after it needs a tight box."""

    name = ""
    nonlinear = True
    linear_map = False

    def ibp(self, op: Op, bounds: dict, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"bound kind {self.name!r} has no interval rule")

    def backward(self, op: Op, a: Tensor, bounds: dict, n_low: int, slopes: Tensor | None = None) -> list[tuple]:
        """[(source node, coefficients on it, constant B x rows)] for rows ``a`` (B x rows x shape) on the
        operation's output, the first ``n_low`` bounded from below and the rest from above; by default the
        operation's box as constants."""
        src = op.inputs[0]
        const = box_constant(a, *bounds[op.node], n_low)
        return [(src, torch.zeros(a.shape[0], a.shape[1], *bounds[src][0].shape[1:], dtype=a.dtype, device=a.device), const)]

    def backward_window(self, op: Op, win: Window, bounds: dict, n_low: int, slopes: Tensor | None = None) -> list[tuple] | None:
        """:meth:`backward` for rows that sit in one spatial window of the output (:mod:`cnnrepair.bounds.window`),
        returning windows where it can; None (the default): the rows are written out whole and :meth:`backward` takes
        them. Either way the numbers are the same."""
        return None

    def window_extent(self, op: Op, size: tuple[int, int], src_shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (height, width) on the input (of shape ``src_shape``) of a window of ``size`` on the output, when
        :meth:`backward_window` crosses it; None: it does not."""
        return None


@bound_kind
class Input(Kind):
    """The network's input: its box, and the identity as its linear bounds."""

    name = "input"
    nonlinear = False

    def ibp(self, op, bounds, lower, upper):
        return lower, upper

    def backward(self, op, a, bounds, n_low, slopes=None):
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

    def backward(self, op, a, bounds, n_low, slopes=None):
        zero = torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
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

    def backward(self, op, a, bounds, n_low, slopes=None):
        src = op.inputs[0]
        return [(src, *_affine_back(op, a, src_shape=bounds[src][0].shape[1:]))]

    def backward_window(self, op, win, bounds, n_low, slopes=None):
        if op.window is None:
            return None
        src = op.inputs[0]
        return [(src, *op.window(win, bounds[src][0].shape[1:]))]

    def window_extent(self, op, size, src_shape):
        if op.window is None:
            return None
        kh, kw, sh, sw = op.window.extent
        return min(src_shape[1], (size[0] - 1) * sh + kh), min(src_shape[2], (size[1] - 1) * sw + kw)


@bound_kind
class Relu(Kind):
    """ReLU: exact where a neuron is stable; between the chord above and a line through 0 below elsewhere (slope 1
    or 0, whichever is closer to the chord, or the row's own slope from alpha-CROWN)."""

    name = "relu"

    def ibp(self, op, bounds, lower, upper):
        lo, hi = bounds[op.inputs[0]]
        return lo.clamp(min=0), hi.clamp(min=0)

    def backward(self, op, a, bounds, n_low, slopes=None):
        lo, hi = bounds[op.inputs[0]]
        return [(op.inputs[0], *self._back(a, lo, hi, n_low, slopes))]

    def backward_window(self, op, win, bounds, n_low, slopes=None):
        lo, hi = bounds[op.inputs[0]]
        coef, const = self._back(win.a, win.crop(lo), win.crop(hi), n_low, None if slopes is None else _in_window(slopes, win))
        return [(op.inputs[0], win.like(coef), const)]

    def window_extent(self, op, size, src_shape):
        return size

    @staticmethod
    def _back(a: Tensor, lo: Tensor, hi: Tensor, n_low: int, slopes: Tensor | None) -> tuple[Tensor, Tensor]:
        up_slope, up_const, low_slope = relu_lines(lo.unsqueeze(1), hi.unsqueeze(1))
        if slopes is not None:  # rows' own lower slopes where the neuron is unstable
            low_slope = torch.where((lo < 0).unsqueeze(1) & (hi > 0).unsqueeze(1), slopes, low_slope)
            low_l, low_u = low_slope[:, :n_low], low_slope[:, n_low:]
        else:
            low_l = low_u = low_slope
        al, au = a[:, :n_low], a[:, n_low:]
        # a lower-bound row takes the line below where its coefficient is positive, an upper-bound row where it is negative
        coef = torch.cat([torch.where(al >= 0, low_l, up_slope) * al, torch.where(au >= 0, up_slope, low_u) * au], 1)
        B, n = a.shape[0], up_const[0].numel()
        c = up_const.reshape(B, n, 1)
        const = torch.cat([torch.bmm(al.clamp(max=0).reshape(B, -1, n), c), torch.bmm(au.clamp(min=0).reshape(B, -1, n), c)], 1)
        return coef, const[:, :, 0]


def _in_window(slopes: Tensor | Window, win: Window) -> Tensor:
    """The slopes of the rows of ``win`` on its window: held for that window already (a walk's slopes are made for
    the windows it crosses), or cropped from slopes over the whole map."""
    if isinstance(slopes, Window):
        if (slopes.top, slopes.left, slopes.size) != (win.top, win.left, win.size):
            raise ValueError("alpha-CROWN slopes were made for another window than the walk crosses")
        return slopes.a
    return win.crop(slopes)


@bound_kind
class MaxPool(Kind):
    """Max-pooling: each window above its input with the largest lower bound, below the largest upper bound
    (or equal to that input, when its lower bound beats every other input's upper bound)."""

    name = "maxpool"

    def ibp(self, op, bounds, lower, upper):
        lo, hi = bounds[op.inputs[0]]
        return maxpool(lo, op.run), maxpool(hi, op.run)

    def backward(self, op, a, bounds, n_low, slopes=None):
        lo, hi = bounds[op.inputs[0]]
        return [(op.inputs[0], *self._back(op, a, lo, hi, n_low))]

    def backward_window(self, op, win, bounds, n_low, slopes=None):
        lo, hi = bounds[op.inputs[0]]
        k = pool_disjoint(op)
        if k is None:
            return None  # windows of the input overlap or run past it: the rows are written out whole
        top, left, size = win.top * k[0], win.left * k[1], (win.size[0] * k[0], win.size[1] * k[1])  # the input's window
        coef, const = self._back(op, win.a, crop(lo, top, left, size), crop(hi, top, left, size), n_low)
        return [(op.inputs[0], Window(coef, top, left, tuple(lo.shape[1:])), const)]

    def window_extent(self, op, size, src_shape):
        k = pool_disjoint(op)
        return None if k is None else (size[0] * k[0], size[1] * k[1])

    @staticmethod
    def _back(op: Op, a: Tensor, lo: Tensor, hi: Tensor, n_low: int) -> tuple[Tensor, Tensor]:
        idx, exact, hi_out = pool_choice(op, lo, hi)
        B = lo.shape[0]
        exact = exact.unsqueeze(1).to(a.dtype)
        sign = row_signs(a, n_low)
        pos = (a * sign).clamp(min=0) * sign  # the part of each row that takes the selected input (below the max)
        coef = pos + (a - pos) * exact
        const = ((a - pos) * hi_out.unsqueeze(1) * (1 - exact)).flatten(2).sum(-1)
        R, C = coef.shape[1], lo.shape[1]
        out = torch.zeros(B, R, C, lo.shape[2] * lo.shape[3], dtype=a.dtype, device=a.device)
        out = out.scatter_add(3, idx.flatten(2).unsqueeze(1).expand(B, R, C, -1), coef.flatten(3))
        return out.reshape(B, R, *lo.shape[1:]), const


def pool_disjoint(op: Op) -> tuple[int, int] | None:
    """A max-pool's kernel when its windows tile the input (stride = kernel, no padding or dilation, floor mode), else None."""
    kernel, stride, padding, dilation, ceil = op.run
    k = pair(kernel)
    if k != pair(stride) or any(pair(padding)) or pair(dilation) != (1, 1) or ceil:
        return None
    return k


def row_signs(a: Tensor, n_low: int) -> Tensor:
    """1 x rows x 1... (to broadcast against ``a``): +1 for the first ``n_low`` rows (bounded from below), -1 for the rest."""
    sign = torch.ones(a.shape[1], dtype=a.dtype, device=a.device)
    sign[n_low:] = -1.0
    return sign.reshape(1, -1, *([1] * (a.ndim - 2)))


def box_constant(a: Tensor, lo: Tensor, hi: Tensor, n_low: int) -> Tensor:
    """B x rows: the smallest value of each lower-bound row's (the first ``n_low``) linear function over the box
    ``[lo, hi]`` (B x shape), and the largest of each other row's."""
    B, R = a.shape[:2]
    flat = a.reshape(B, R, -1)
    mid, rad = ((hi + lo) / 2).reshape(B, -1, 1), ((hi - lo) / 2).reshape(B, -1, 1)  # centre -+ |a| . radius
    return (torch.bmm(flat, mid) - row_signs(flat, n_low) * torch.bmm(flat.abs(), rad))[:, :, 0]


def _affine_back(op: Op, a: Tensor, src_shape) -> tuple[Tensor, Tensor]:
    B, R = a.shape[:2]
    fast = op.transpose(a.reshape(B * R, *a.shape[2:]), src_shape) if op.transpose is not None else None
    if fast is not None:
        grad, const = fast
        b = a.reshape(B, R, -1) @ const.reshape(-1) if const is not None else torch.zeros(B, R, dtype=a.dtype, device=a.device)
        return grad.reshape(B, R, *src_shape), b
    x = torch.zeros((B * R, *src_shape), dtype=a.dtype, device=a.device, requires_grad=True)
    with torch.enable_grad():
        out = op.run(x)
        # alpha-CROWN differentiates through this step: keep the graph when the rows carry one
        grad, = torch.autograd.grad(out, x, grad_outputs=a.reshape(B * R, *out.shape[1:]), create_graph=a.requires_grad)
    const = out.detach()[:1]  # the map at 0: the same for every row
    b = a.reshape(B, R, -1) @ const.reshape(-1)
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
