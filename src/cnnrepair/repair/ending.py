"""What may follow the repaired layer at a classifier's end: nothing, a ReLU, a softmax or a log-softmax.

Networks of the verification community often end in one of these after their last linear layer
(ERAN's ONNX models end in a ReLU; exported classifiers in a softmax). Each :class:`Ending` says
how the model's output follows from the layer's logits ``z`` and how repair stays sound with it:

* ``none``: the output is ``z``; margins are logit differences.
* ``log_softmax``: the output is ``z - logsumexp(z)``: the same differences, so the same margins.
* ``softmax``: the argmax is ``z``'s; margins are logit differences, measured on the output as
  differences of log-probabilities (each floored at the log of float32's smallest positive number,
  which only lowers a margin of a point whose rivals all underflow).
* ``relu``: the output is ``max(z, 0)``. A label wins by ``m > 0`` only if ``z_y - z_j >= m`` for
  every rival *and* ``z_y >= m`` (a rival's output never drops below 0): the program gets one more
  rival per point, a logit fixed at 0 (``zero_rival``), and margins measured on the output after the
  ReLU are exactly what it requires.

:func:`find_ending` tells which one a model applies by handing the model a probe in place of the
layer's output (mixed signs, distinct per row), so a sample whose logits are all positive cannot
make a ReLU look like nothing. Endings are a registry (:func:`register_ending`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from cnnrepair.errors import CnnRepairError

_LOG_FLOOR = float(np.log(np.finfo(np.float32).smallest_subnormal))


@dataclass(frozen=True)
class Ending:
    """How a model's output follows from the repaired layer's logits, and what margins mean through it."""

    name: str
    apply: Callable[[Tensor], Tensor]  # logits (batch x classes) -> the model's output
    scores: Callable[[np.ndarray], np.ndarray]  # the model's output (float64) -> values whose differences are the margins
    zero_rival: bool = False  # the label's logit must also beat a rival fixed at 0 (a final ReLU)
    note: str = ""


ENDINGS: dict[str, Ending] = {}


def register_ending(ending: Ending) -> None:
    """Accept ``ending`` after the repaired layer (tried in registration order by :func:`find_ending`)."""
    ENDINGS[ending.name] = ending


def _same(scores: np.ndarray) -> np.ndarray:
    return scores


def _log_probabilities(out: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(np.asarray(out, np.float64)), _LOG_FLOOR)


register_ending(Ending("none", lambda z: z, _same, note="the layer's output is the model's output; margins are logit differences"))
register_ending(Ending("relu", torch.relu, _same, zero_rival=True,
                       note="a ReLU follows the layer: each label's logit must also reach the margin over a rival fixed at 0, so "
                            "margins measured on the model's output (after the ReLU) are the ones required"))
register_ending(Ending("log_softmax", lambda z: torch.log_softmax(z, -1), _same,
                       note="a log-softmax follows the layer: it keeps logit differences, so margins are the same on its output"))
register_ending(Ending("softmax", lambda z: torch.softmax(z, -1), _log_probabilities,
                       note="a softmax follows the layer: it keeps the argmax; margins are logit differences, measured on the "
                            "output as differences of log-probabilities (floored at log of float32's smallest positive number)"))


def ending(name: str) -> Ending:
    """The registered ending ``name`` (a one-line error naming the known ones otherwise)."""
    if name not in ENDINGS:
        raise CnnRepairError(f"unknown model ending {name!r}; known: {', '.join(ENDINGS)}")
    return ENDINGS[name]


def ending_record(name: str) -> dict | None:
    """What a certificate records of an ending (None: nothing follows the layer)."""
    return None if name == "none" else {"name": name, "note": ending(name).note}


def probe_like(out: Tensor) -> Tensor:
    """A stand-in for a layer's output: mixed signs, no two rows alike, so every registered ending gives another output."""
    rows, cols = out.shape[0], int(np.prod(out.shape[1:])) if out.ndim > 1 else 1
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    p = torch.remainder(3.0 * j + 5.0 * i + 1.0, 7.0) - 3.5 + 0.25 * j / max(cols, 1)
    return p.reshape(out.shape).to(out.dtype).to(out.device)


def matches(e: Ending, logits: Tensor, output: Tensor) -> bool:
    """Does ``output`` equal ``e`` applied to ``logits`` (exactly for ``none``; to float rounding otherwise)?"""
    try:
        want = e.apply(logits)
    except (RuntimeError, ValueError, IndexError):
        return False
    if want.shape != output.shape:
        return False
    want = want.to(output.dtype)
    if torch.equal(want, output):
        return True
    if e.name == "none" or not torch.is_floating_point(output):
        return False
    eps = float(torch.finfo(output.dtype).eps)
    return bool(torch.allclose(want, output, rtol=64 * eps, atol=64 * eps))


def find_ending(logits: Tensor, output: Tensor) -> Ending | None:
    """The first registered ending that turns ``logits`` into ``output``, or None."""
    for e in ENDINGS.values():
        if matches(e, logits, output):
            return e
    return None
