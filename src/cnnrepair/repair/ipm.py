"""Certified interior point for one class of the targets program, in torch, on any device.

The class LP is an L1-penalised least-absolute-deviations fit:

    min_g  |g|_1 + w^T |X g - r|        (X: K points x m features, w > 0)

written in standard form with g = g+ - g-, X g - r = e- - e+ and all four blocks >= 0. Its dual is
``max r^T y  s.t.  |X^T y| <= 1, |y| <= w``. Mehrotra's predictor-corrector solves one linear system
per step in one of two equivalent forms, whichever is cheaper:

* points side (K <= m): ``(D_e + X D_g X^T) dy = rhs``, a K x K matrix (K^2 m to form, K^2 memory);
* features side (K > m): the same system solved for the change of the weights u (the Woodbury
  identity), ``(D_g^-1 + X^T D_e^-1 X) u = ...``, an m x m matrix (K m^2 to form, m^2 memory),
  built in row blocks so the extra memory is one block, not another copy of X. Every primal step
  is then a ratio in [0, 1] times u or times ``X u - rhs``, and ``X^T dy`` of a moving weight comes
  from u: written the textbook way (dy first, by dividing by D_e) the late iterations lost their
  digits and stalled short of the certificate the points side reached.

Either way the stop is a certificate, computed the same way: g is feasible by construction (its
slacks are |X g - r|), and the dual iterate scaled into ``|X^T y| <= 1, |y| <= w`` is dual feasible,
so ``r^T y`` (scaled) is a lower bound on the optimum. The Gram products on the CPU go through
NumPy's BLAS (a symmetric rank-k update: half the multiplications of torch's general product); on
CUDA everything stays on the device in float64.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

GAP = 1e-9  # certified relative duality gap aimed for ...
GAP_STALLED = 1e-7  # ... and accepted when the late, ill-conditioned iterations stall
BLOCK_ROWS = 8192  # rows of X scaled at a time when forming the features-side matrix


@dataclass
class IPMResult:
    """Outcome of one class: ``status`` optimal / not_converged / time_limit, the change ``g``
    (None unless optimal), its objective, the certified lower bound, iterations, the side used."""

    status: str
    g: np.ndarray | None
    objective: float
    lower_bound: float
    iterations: int
    side: str


def pick_side(K: int, m: int) -> str:
    """The cheaper normal-equation form: flops to form and factor K x K against m x m."""
    return "points" if K * K * m + K ** 3 / 3 <= K * m * m + m ** 3 / 3 else "features"


def _gram(A: torch.Tensor) -> torch.Tensor:
    """A^T A, through NumPy's symmetric rank-k update on the CPU."""
    if A.device.type == "cpu":
        a = A.numpy()
        return torch.from_numpy(a.T @ a)
    return A.T @ A


def _max_step(v: list[torch.Tensor], dv: list[torch.Tensor]) -> torch.Tensor:
    """Largest step in [0, 1] keeping every block of ``v + step * dv`` non-negative (a 0-d tensor)."""
    one = torch.ones((), dtype=v[0].dtype, device=v[0].device)
    ratios = [torch.where(dx < 0, -x / dx, torch.inf).min() for x, dx in zip(v, dv)]
    return torch.minimum(one, torch.stack(ratios).min())


class Newton:
    """One iteration's factored system; ``direction`` solves it for a complementarity right-hand side."""

    def __init__(self, X: torch.Tensor, side: str, P, Z, D, rp, rd):
        self.X, self.side, self.P, self.Z, self.D, self.rp, self.rd = X, side, P, Z, D, rp, rd
        self.Dg = D[0] + D[1]
        self.De = D[2] + D[3]
        if side == "points":
            M = _gram((X * self.Dg.sqrt()).T)
            M.diagonal().add_(self.De)
        else:
            s = self.De.rsqrt()
            M = torch.zeros(X.shape[1], X.shape[1], dtype=X.dtype, device=X.device)
            for i in range(0, X.shape[0], BLOCK_ROWS):
                M += _gram(X[i:i + BLOCK_ROWS] * s[i:i + BLOCK_ROWS, None])
            M.diagonal().add_(1.0 / self.Dg)
        self.factor = self._cholesky(M)

    @staticmethod
    def _cholesky(M: torch.Tensor) -> torch.Tensor | None:
        """Cholesky factor, regularised only as much as the late ill-conditioned iterations need."""
        top = float(M.diagonal().max())
        reg = 1e-14 * top
        while True:
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                return L
            if reg > 1e-4 * top:
                return None
            M.diagonal().add_(reg)
            reg *= 100.0

    def direction(self, comp: list[torch.Tensor]):
        """Steps (dy, dP, dZ) for complementarity right-hand sides ``comp`` (one per block)."""
        P, Z, D, rd, X = self.P, self.Z, self.D, self.rd, self.X
        q = [(c - x * r) / z for c, x, r, z in zip(comp, P, rd, Z)]
        if self.side == "points":
            dy = torch.cholesky_solve((self.rp - (X @ (q[0] - q[1]) - q[2] + q[3]))[:, None], self.factor)[:, 0]
            Xtdy = X.T @ dy
            dP = [q[0] + D[0] * Xtdy, q[1] - D[1] * Xtdy, q[2] - D[2] * dy, q[3] + D[3] * dy]
        else:  # solve for the change of g, u = q0 - q1 + D_g X^T dy; every primal step is then a bounded ratio times it
            q01, b = q[0] - q[1], self.rp + q[2] - q[3]
            u = torch.cholesky_solve((q01 / self.Dg + X.T @ (b / self.De))[:, None], self.factor)[:, 0]
            e = b - X @ u  # = D_e dy
            dy = e / self.De
            Xtdy = torch.where(self.Dg >= 1.0, (u - q01) / self.Dg, X.T @ dy)
            dP = [q[0] + D[0] / self.Dg * (u - q01), q[1] - D[1] / self.Dg * (u - q01),
                  q[2] - D[2] / self.De * e, q[3] + D[3] / self.De * e]
        dZ = [rd[0] - Xtdy, rd[1] + Xtdy, rd[2] + dy, rd[3] - dy]
        return dy, dP, dZ


def objective(X: torch.Tensor, r: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> float:
    """The class objective at g, slacks taken as |X g - r| (always feasible)."""
    return float(g.abs().sum() + w @ (X @ g - r).abs())


def _certificate(r, w, g, y, Xg, Xty) -> tuple[float, float]:
    """(objective at g, lower bound from y scaled into the dual feasible set), from X g and X^T y."""
    upper = float(g.abs().sum() + w @ (Xg - r).abs())
    scale = max(1.0, float(Xty.abs().max()), float((y.abs() / w).max()))
    return upper, float(r @ y) / scale


def solve_l1(X: torch.Tensor, r: torch.Tensor, w: torch.Tensor, side: str = "auto", tol: float = GAP,
             accept: float = GAP_STALLED, patience: int = 8, max_iter: int = 150,
             deadline: float | None = None) -> IPMResult:
    """Mehrotra predictor-corrector for ``min |g|_1 + w^T |X g - r|`` on X's device (float64).

    Returns the best certified iterate: status "optimal" when (objective - lower bound) <= tol *
    objective, or <= ``accept`` * objective once ``patience`` iterations brought no better
    certificate. Numerical trouble ends the iterations the same way, with the best certificate.
    ``deadline`` (time.perf_counter()) gives "time_limit".
    """
    K, m = X.shape
    side = pick_side(K, m) if side == "auto" else side
    t = 1.0 + float(r.abs().mean())
    P = [torch.full((m,), t, dtype=X.dtype, device=X.device), torch.full((m,), t, dtype=X.dtype, device=X.device),
         r.neg().clamp(min=0) + t, r.clamp(min=0) + t]  # g+, g-, e+, e-
    Z = [torch.ones(m, dtype=X.dtype, device=X.device), torch.ones(m, dtype=X.dtype, device=X.device), w.clone(), w.clone()]
    y = torch.zeros(K, dtype=X.dtype, device=X.device)
    n = 2 * m + 2 * K
    best = (None, float("inf"), -float("inf"), 0)  # g, upper, lower, iteration

    def result(status: str | None, it: int) -> IPMResult:
        g, upper, lower, _ = best
        ok = upper - lower <= accept * abs(upper)
        status = status or ("optimal" if ok else "not_converged")
        g_out = g.cpu().numpy() if g is not None and status == "optimal" else None
        return IPMResult(status, g_out, upper, lower, it, side)

    for it in range(max_iter):
        g = P[0] - P[1]
        Xg, Xty = X @ g, X.T @ y  # each used twice: certificate and residuals
        upper, lower = _certificate(r, w, g, y, Xg, Xty)
        if not (np.isfinite(upper) and np.isfinite(lower)):
            return result(None, it)
        if upper - lower < best[1] - best[2]:
            best = (g, upper, lower, it)
        if upper - lower <= tol * abs(upper) or it - best[3] >= patience:
            return result(None, it)
        if deadline is not None and time.perf_counter() > deadline:
            return result("time_limit", it)
        rd = [1.0 - Xty - Z[0], 1.0 + Xty - Z[1], w + y - Z[2], w - y - Z[3]]
        rp = r - (Xg - P[2] + P[3])
        mu = sum(x @ z for x, z in zip(P, Z)) / n
        D = [x / z for x, z in zip(P, Z)]
        newton = Newton(X, side, P, Z, D, rp, rd)
        if newton.factor is None:
            return result(None, it)
        dy, dP, dZ = newton.direction([-x * z for x, z in zip(P, Z)])
        ap, ad = _max_step(P, dP), _max_step(Z, dZ)
        mu_aff = sum((x + ap * dx) @ (z + ad * dz) for x, dx, z, dz in zip(P, dP, Z, dZ)) / n
        sigma = (mu_aff / mu) ** 3
        dy, dP, dZ = newton.direction([-x * z + sigma * mu - dx * dz for x, z, dx, dz in zip(P, Z, dP, dZ)])
        ap, ad = 0.995 * _max_step(P, dP), 0.995 * _max_step(Z, dZ)
        P = [x + ap * dx for x, dx in zip(P, dP)]
        Z = [z + ad * dz for z, dz in zip(Z, dZ)]
        y = y + ad * dy
    return result(None, max_iter)


def sparsify(X: torch.Tensor, r: torch.Tensor, w: torch.Tensor, res: IPMResult) -> np.ndarray:
    """An interior point does not land exactly on zeros: weight changes below 1e-6 (else 1e-8,
    1e-10) of the largest are set to zero when the certificate still holds after it."""
    g = res.g
    allowed = max(GAP, (res.objective - res.lower_bound) / abs(res.objective))
    for threshold in (1e-6, 1e-8, 1e-10):
        g2 = np.where(np.abs(g) <= threshold * float(np.abs(g).max(initial=0.0)), 0.0, g)
        upper2 = objective(X, r, w, torch.as_tensor(g2, device=X.device))
        if upper2 - res.lower_bound <= allowed * abs(upper2):
            return g2
    return g
