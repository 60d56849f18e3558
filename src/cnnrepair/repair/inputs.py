"""What a repair is given besides the model and the spec: its points and how long and wide it may solve.

:class:`Points` carries inputs with their labels and, where a spec needs them, an input box per point
(the ``ball`` spec) or target logits per point (the ``targets`` spec). :class:`SolveOptions` carries
the solve's time limit, thread cap, progress and device. Both check themselves when made.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.runtime import check_threads, resolve_device

DEFAULT_TIME_LIMIT = 3600.0  # seconds a repair's solve may take when no limit is given (math.inf: none)


@dataclass(frozen=True)
class Points:
    """Inputs ``x`` (N x input shape, the model's units) and integer labels ``y``.

    For keep points ``y`` may be None: each keeps the model's own prediction. ``boxes`` =
    (lower, upper), each of ``x``'s shape: the input box of each point's ball (the ``ball`` spec;
    default: :func:`cnnrepair.bounds.ball_box` of ``spec.eps`` or ``spec.keep_eps``, pixels in [0, 1]).
    ``targets`` (N x classes): the target logits of the ``targets`` spec (default: +1 for the label,
    -1 elsewhere, the paper's label targets); repair points only.
    ``rows``: each repair point's own linear rows over the outputs in place of its label's (an
    :class:`cnnrepair.repair.outputs.OutputRows`, or a pair (coef N x R x C, offset N x R)): point ``k``
    then needs ``coef[k, r] . z >= offset[k, r] + margin`` for each of its rows (a targeted property, a
    general linear output constraint); its margin is its smallest row value. Repair and keep points
    (a keep point then keeps its rows), pointwise and ball specs, the model's last layer; through a
    ReLU, softmax or log-softmax ending only rows ``z_y - z_j``.
    """

    x: Any
    y: Any = None
    boxes: tuple[Any, Any] | None = None
    targets: Any = None
    rows: Any = None

    def __post_init__(self) -> None:
        if self.boxes is not None and (not isinstance(self.boxes, (tuple, list)) or len(self.boxes) != 2):
            raise CnnRepairError("boxes must be a pair (lower, upper) of arrays shaped like the inputs")

    @classmethod
    def of(cls, value: Any) -> Points | None:
        """``value`` as Points: Points as they are, a pair as (x, y), an array as inputs whose labels are the model's own."""
        if value is None or isinstance(value, Points):
            return value
        if isinstance(value, tuple) and len(value) == 2:  # (x, y)
            return cls(*value)
        return cls(value)


@dataclass(frozen=True)
class SolveOptions:
    """How a repair's solve may run: ``time_limit`` seconds (None: :data:`DEFAULT_TIME_LIMIT`; ``math.inf``:
    none), at most ``threads`` BLAS/OpenMP threads (None: ``$CNNREPAIR_THREADS``, else 1),
    ``progress(desc, done, total)``, told each round of a long solve (its round, rows, gap, seconds), and
    ``device``: where the pointwise program's interior point factors its normal matrix (``cpu``, ``cuda``,
    ``cuda:N``; None or ``auto``: CUDA when present, else the CPU). The other programs solve on the CPU."""

    time_limit: float | None = None
    threads: int | None = None
    progress: Callable[[str, int, int], None] | None = None
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        t = self.time_limit
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not t > 0):
            raise CnnRepairError(f"time limit must be a number of seconds > 0 (got {t!r})")
        check_threads(self.threads)
        if self.progress is not None and not callable(self.progress):
            raise CnnRepairError(f"progress must be a function progress(desc, done, total) (got {type(self.progress).__name__})")
        if self.device is not None and not isinstance(self.device, (str, torch.device)):
            raise CnnRepairError(f"device must be a name such as cpu, cuda, cuda:1 or auto (got {type(self.device).__name__})")
        self.solver_device  # a device this machine lacks is refused here, before anything is loaded

    @property
    def solver_device(self) -> str | None:
        """The device the margin solver is given: None for the CPU (SciPy), else the torch device's name."""
        dev = resolve_device(None if self.device is None else str(self.device))
        return None if dev.type == "cpu" else str(dev)

    @property
    def seconds(self) -> float:
        """The time limit in force."""
        return DEFAULT_TIME_LIMIT if self.time_limit is None else float(self.time_limit)


def as_inputs(x, y, name: str, num_classes: int | None, input_shape: tuple | None,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
    """Inputs as a CPU tensor (the model's dtype) and labels as int64, checked; one-line errors naming ``name``."""
    try:
        xt = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CnnRepairError(f"{name} inputs must be an array of numbers (N x input shape): {str(exc).splitlines()[0][:100]}") from None
    if not torch.is_floating_point(xt):
        raise CnnRepairError(f"{name} inputs must be floating point in the model's input units (got {xt.dtype})")
    if xt.ndim < 2:
        raise CnnRepairError(f"{name} inputs must be N x input shape (got an array of shape {tuple(xt.shape)})")
    if dtype is not None and xt.dtype != dtype:
        xt = xt.to(dtype)  # the model's own precision (a float64 model takes float64 inputs)
    if len(xt) and not torch.isfinite(xt).all():
        raise CnnRepairError(f"{name} inputs contain NaN or infinite values; clean the file before repair")
    if input_shape is not None and tuple(xt.shape[1:]) != tuple(input_shape):
        raise CnnRepairError(f"{name} inputs have shape {tuple(xt.shape[1:])} but the model takes {tuple(input_shape)}; reshape them")
    if y is None:
        return xt, None
    ya = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)
    if ya.ndim != 1 or len(ya) != len(xt):
        raise CnnRepairError(f"{name}: {len(xt)} inputs but labels of shape {ya.shape}; give one integer label per input")
    if not np.issubdtype(ya.dtype, np.integer) or ya.dtype == np.bool_:
        raise CnnRepairError(f"{name} labels must be integers (got {ya.dtype})")
    ya = ya.astype(np.int64)
    if num_classes is not None:
        check_labels(ya, num_classes, name)
    return xt, ya


def check_labels(y: np.ndarray, num_classes: int, name: str) -> None:
    """Labels must name one of the model's classes."""
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise CnnRepairError(f"{name} labels must lie in 0..{num_classes - 1} (got {y.min()}..{y.max()})")
