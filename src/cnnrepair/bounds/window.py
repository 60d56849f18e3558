"""Rows whose coefficients live in one spatial window of a feature map: CROWN's walk from convolution neurons, cropped.

A neuron of a convolution depends on a small window of the input (its receptive field), so the
rows that walk back from it are zero outside that window at every layer they cross. Written out
whole (B x rows x C x H x W), most of every tensor of the walk is those zeros. A :class:`Window`
holds only the crop (B x rows x C x h x w) and where it sits in the map; ReLU, disjoint max-pooling
and 2-d convolution cross it on the crop (the kinds' ``backward_window``), and anything else
takes it written out whole (:meth:`Window.dense`), so the bounds are the same numbers either way
(the same operations on the same non-zero entries). This is the role of auto_LiRPA's "patches"
mode, in the simplest form that covers convolution / ReLU / max-pool stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Window:
    """Rows ``a`` (B x rows x C x h x w) of coefficients on a value of shape ``full`` (C x H x W) that are zero outside
    the window whose corner is at (``top``, ``left``)."""

    a: Tensor
    top: int
    left: int
    full: tuple[int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.a.shape[-2]), int(self.a.shape[-1])

    def crop(self, x: Tensor) -> Tensor:
        """The window's part of ``x`` (any leading dims, then C x H x W)."""
        return crop(x, self.top, self.left, self.size)

    def dense(self) -> Tensor:
        """The rows written out whole (B x rows x C x H x W)."""
        h, w = self.size
        C, H, W = self.full
        out = torch.zeros(*self.a.shape[:2], C, H, W, dtype=self.a.dtype, device=self.a.device)
        out[..., self.top:self.top + h, self.left:self.left + w] = self.a
        return out

    def like(self, a: Tensor) -> Window:
        """Other rows in this window."""
        return Window(a, self.top, self.left, self.full)


def crop(x: Tensor, top: int, left: int, size: tuple[int, int]) -> Tensor:
    """The part of ``x`` (any leading dims, then C x H x W) in the window of ``size`` whose corner is at (top, left)."""
    return x[..., top:top + size[0], left:left + size[1]]


def add(x: Tensor | Window, y: Tensor | Window) -> Tensor | Window:
    """The sum of two sets of rows on the same value (a window when both sit in the same one)."""
    if isinstance(x, Window) and isinstance(y, Window) and (x.top, x.left, x.size) == (y.top, y.left, y.size):
        return x.like(x.a + y.a)
    return dense(x) + dense(y)


def dense(x: Tensor | Window) -> Tensor:
    """Rows written out whole, whether they come as a window or not."""
    return x.dense() if isinstance(x, Window) else x


class ConvWindow:
    """The adjoint of a 2-d convolution (groups 1, dilation 1) on a window: called with (rows on its output, input
    shape), gives (the rows on its input, a window again, clipped to the map; their constant from the bias, B x rows).
    ``extent``: (kernel height, width, stride height, width), how far a window grows on the way back."""

    def __init__(self, weight: Tensor, bias: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]):
        self.weight, self.bias, self.stride, self.padding = weight, bias, stride, padding
        self.extent = (int(weight.shape[-2]), int(weight.shape[-1]), int(stride[0]), int(stride[1]))

    def __call__(self, win: Window, shape) -> tuple[Window, Tensor]:
        weight, bias, stride, padding = self.weight, self.bias, self.stride, self.padding
        B, R = win.a.shape[:2]
        C, h, w = win.a.shape[2:]
        grad = F.conv_transpose2d(win.a.reshape(B * R, C, h, w), weight, None, stride)  # on the padded input, from the corner
        top, left = win.top * stride[0] - padding[0], win.left * stride[1] - padding[1]
        H, W = shape[-2:]
        y0, x0 = max(0, top), max(0, left)
        y1, x1 = min(H, top + grad.shape[-2]), min(W, left + grad.shape[-1])
        grad = grad[..., y0 - top:y1 - top, x0 - left:x1 - left]  # what falls on the padding multiplies zeros
        const = (win.a.sum((-2, -1)) @ bias) if bias is not None else torch.zeros(B, R, dtype=win.a.dtype, device=win.a.device)
        return Window(grad.reshape(B, R, *grad.shape[1:]), y0, x0, tuple(int(v) for v in shape)), const
