"""A solved change made to hold on the model as it runs: float32 re-solves, and the conditioning test.

Every margin program (the last layer's, a ball's, a layer inside the network's) is solved in float64
on float64 data, but the saved model runs in float32. :func:`solve_in_float32` measures the repaired
model, and when rounding left hard points a hair below their margin, asks the LP for a little more
(hard points are asked for a rounding-sized offset from the first solve; it is doubled on each
re-solve: points raised alone would let their neighbours become the binding, rounded-down ones). A change orders of magnitude beyond the layer's own weights is
reported as ill-conditioned instead of certified (:func:`ill_conditioned`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cnnrepair.repair.program import MarginSolution
from cnnrepair.repair.spec import RepairSpec

FLOAT32_ROUNDS = 5  # re-solves with a raised margin for points that float32 rounding left short


def layer_scale(weight: np.ndarray, bias: np.ndarray) -> float:
    """The layer's largest weight or bias in absolute value: what a change is compared with."""
    return float(max(np.abs(weight).max(initial=0.0), np.abs(bias).max(initial=0.0)))


def change_linf(sol: MarginSolution) -> float:
    """The largest entry of a solved change, weights and biases together."""
    return float(np.abs(np.concatenate([sol.delta_weight.ravel(), sol.delta_bias.ravel()])).max(initial=0.0))


def conditioning(weight: np.ndarray, bias: np.ndarray, spec: RepairSpec, linf: float) -> dict:
    """The certificate's conditioning record: the change's largest entry against the layer's scale."""
    scale = layer_scale(weight, bias)
    return {"layer_scale": scale, "change_linf": linf, "ratio": linf / scale if scale > 0 else float("inf"),
            "max_ratio": spec.max_change_ratio}


def ill_conditioned(weight: np.ndarray, bias: np.ndarray, spec: RepairSpec, sol: MarginSolution) -> str | None:
    """A note when the solved change is orders of magnitude beyond the layer's own weights, else None."""
    if spec.max_change_ratio is None:
        return None
    linf = change_linf(sol)
    scale = layer_scale(weight, bias)
    if linf <= spec.max_change_ratio * scale:
        return None
    return (f"ill-conditioned: the change's largest entry {linf:.3g} is {linf / scale if scale else float('inf'):.3g} times the layer's "
            f"largest weight ({scale:.3g}), beyond max_change_ratio {spec.max_change_ratio:g}; margins bought this way hinge on "
            "float32 noise (points with nearly equal features and different labels?), so no model is certified. Remove the "
            "conflicting points, or raise --max-change-ratio if such a change is intended")


@dataclass
class Float32Solve:
    """The outcome: ``status`` (repaired, infeasible, ill-conditioned or failed), the last solution, the repaired model
    (None unless repaired), what ``measure`` returned for it, and notes."""

    status: str
    sol: MarginSolution
    repaired: Any = None
    measured: Any = None
    notes: list[str] = field(default_factory=list)


def solve_in_float32(solve: Callable[[np.ndarray], MarginSolution], ill: Callable[[MarginSolution], str | None],
                     measure: Callable[[MarginSolution], tuple[Any, np.ndarray, Any]], required: np.ndarray, hard: np.ndarray,
                     rounding: np.ndarray) -> Float32Solve:
    """Solve with ``required`` margins (``solve(required)``), build and measure the repaired model (``measure(sol)``:
    the model, every point's margin on it as it runs, and anything the caller keeps), and re-solve while a hard point
    is below its requirement; ``ill(sol)`` vetoes a change as ill-conditioned. ``rounding``: each point's float32
    rounding scale. Hard points are asked for it from the first solve: at an optimum many of them bind exactly,
    and float32 rounds about half of those down, so asking for the bare requirement cost a second solve
    nearly every time."""
    extra = np.where(hard, rounding, 0.0)
    notes: list[str] = []
    sol, repaired, kept, note = None, None, None, None
    for _ in range(FLOAT32_ROUNDS):
        sol = solve(required + extra)
        if not sol.ok:
            break
        note = ill(sol)
        if note:
            notes.append(note)
            break
        repaired, measured, kept = measure(sol)
        short = np.flatnonzero(hard & (measured < required))
        if len(short) == 0:
            break
        worst = float(np.max(required[short] - measured[short]))
        extra = np.where(hard, np.maximum(2 * extra, rounding + 2 * worst), 0.0)
    else:
        notes.append(f"float32 rounding kept {len(short)} point(s) below their margin after {FLOAT32_ROUNDS} re-solves")
        sol = replace(sol, status="failed", witness={}, conflicts=None)
    status = "ill-conditioned" if note else {"optimal": "repaired", "infeasible": "infeasible"}.get(sol.status, "failed")
    if status != "repaired":
        repaired, kept = None, None
    return Float32Solve(status, sol, repaired, kept, notes)
