"""Writing VNN-LIB properties: hand a repaired model to any VNN-COMP verifier.

One file per input: the L-infinity ball of radius ``eps`` around it (intersected with the input
domain) and, as VNN-LIB states properties, the *violation*: some other class scores at least as
high as the label. A verifier that answers ``unsat`` has proved that every input in the ball is
classified as the label. Inputs are numbered in C order of the model's input (``X_0`` ...), outputs
``Y_0`` ...; ``instances.csv`` lists (model, property, timeout) as the VNN-COMP benchmarks do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write


@dataclass(frozen=True)
class BoxProperty:
    """Every input in the box ``[lower, upper]`` (the model's input units) keeps label ``label`` (against ``rivals`` only,
    a targeted property as oval21 states them, when given; default: every other class)."""

    lower: np.ndarray
    upper: np.ndarray
    label: int
    num_classes: int
    note: str = "every input of the box"
    rivals: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.rivals is not None and (not self.rivals or any(not 0 <= j < self.num_classes or j == self.label for j in self.rivals)):
            raise CnnRepairError(f"rivals must be other classes than the label {self.label}, in 0..{self.num_classes - 1} "
                                 f"(got {self.rivals})")

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of every input variable (flattened, C order)."""
        return np.asarray(self.lower, np.float64).reshape(-1), np.asarray(self.upper, np.float64).reshape(-1)

    def text(self) -> str:
        """The property in VNN-LIB."""
        lo, hi = self.bounds()
        against = "" if self.rivals is None else f" against class(es) {', '.join(map(str, self.rivals))}"
        lines = [f"; {self.note} keeps label {self.label}{against}",
                 "; the assertions describe a violation: unsat means the property holds"]
        lines += [f"(declare-const X_{i} Real)" for i in range(len(lo))]
        lines += [f"(declare-const Y_{j} Real)" for j in range(self.num_classes)]
        for i, (a, b) in enumerate(zip(lo, hi)):
            lines += [f"(assert (>= X_{i} {float(a)!r}))", f"(assert (<= X_{i} {float(b)!r}))"]
        others = [j for j in range(self.num_classes) if j != self.label] if self.rivals is None else sorted(set(self.rivals))
        lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{self.label}))" for j in others) + "))")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class BallProperty:
    """Every input within ``eps`` (L-inf) of ``x``, clipped to ``domain``, keeps label ``label``."""

    x: np.ndarray
    label: int
    eps: float
    num_classes: int
    domain: tuple[float, float] | None = (0.0, 1.0)
    rivals: tuple[int, ...] | None = None  # a targeted property: the label against these classes only

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Lower and upper bounds of every input variable (flattened, C order)."""
        flat = np.asarray(self.x, np.float64).reshape(-1)
        lo, hi = flat - self.eps, flat + self.eps
        if self.domain is not None:
            lo, hi = np.clip(lo, *self.domain), np.clip(hi, *self.domain)
        return lo, hi

    def text(self) -> str:
        """The property in VNN-LIB."""
        lo, hi = self.bounds()
        note = f"every input within {self.eps!r} (L-inf) of the point, in {self.domain},"
        return BoxProperty(lo, hi, self.label, self.num_classes, note, self.rivals).text()


def check_timeout(timeout: float) -> float:
    """A verifier's timeout per property: seconds > 0, finite (else a one-line error)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (np.isfinite(timeout) and timeout > 0):
        raise CnnRepairError(f"--timeout must be a number of seconds > 0 (got {timeout})")
    return float(timeout)


def _check_labels(labels: np.ndarray, n: int, num_classes: int, timeout: float) -> None:
    check_timeout(timeout)
    if n != len(labels):
        raise CnnRepairError(f"{n} inputs but {len(labels)} labels; give one label per input")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise CnnRepairError(f"labels must lie in 0..{num_classes - 1} for this {num_classes}-class model")


def _write(model_path: Path, props: list, out: Path, timeout: float) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, prop in enumerate(props):
        path = out / f"point_{i}.vnnlib"
        text = prop.text()
        atomic_write(path, lambda p, t=text: Path(p).write_text(t))
        paths.append(path)
    rows = "".join(f"{Path(model_path).resolve()},{p.name},{timeout:g}\n" for p in paths)
    atomic_write(out / "instances.csv", lambda p: Path(p).write_text(rows))
    return paths


def write_boxes(model_path: Path, lower: np.ndarray, upper: np.ndarray, labels: np.ndarray, num_classes: int, out: Path,
                timeout: float = 60.0) -> list[Path]:
    """``out/point_<i>.vnnlib`` for every box (model units, e.g. a pixel ball mapped through the
    model's normalisation by :func:`cnnrepair.bounds.ball_box`) and ``out/instances.csv``."""
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    labels = np.asarray(labels)
    if lower.shape != upper.shape or (lower > upper).any():
        raise CnnRepairError("each box's lower corner must lie below its upper corner, in the same shape")
    _check_labels(labels, len(lower), num_classes, timeout)
    props = [BoxProperty(lo, hi, int(yi), num_classes) for lo, hi, yi in zip(lower, upper, labels)]
    return _write(model_path, props, out, timeout)


def write_properties(model_path: Path, x: np.ndarray, labels: np.ndarray, eps: float, num_classes: int, out: Path,
                     domain: tuple[float, float] | None = (0.0, 1.0), timeout: float = 60.0) -> list[Path]:
    """``out/point_<i>.vnnlib`` for every input and ``out/instances.csv``; returns the property files."""
    if not np.isfinite(eps) or eps < 0:
        raise CnnRepairError(f"--eps must be a non-negative number (got {eps})")
    _check_labels(np.asarray(labels), len(x), num_classes, timeout)
    if domain is not None and domain[0] >= domain[1]:
        raise CnnRepairError(f"the input range {domain} is empty; give low,high with low < high (e.g. 0,1)")
    props = [BallProperty(np.asarray(xi), int(yi), float(eps), num_classes, domain) for xi, yi in zip(x, labels)]
    return _write(model_path, props, out, timeout)
