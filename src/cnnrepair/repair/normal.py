"""The normal matrix of the margin rows' interior point, built and factored on the CPU or on a torch device.

Each iteration of :class:`cnnrepair.repair.rows_ipm.RowsIPM` solves with

    M = A diag(theta) A^T + B diag(De) B^T + diag(Ds) (+ kappa g g^T)

over the margin rows (rows x rows). A row touches only its label's and its rival's entries, so
``A diag(theta) A^T`` is a sum over classes of ``S_c G_c diag(theta_c) G_c^T S_c`` on the rows that
touch class ``c`` (``G_c`` their features, ``S_c`` the row's sign for that class); ``B diag(De) B^T``
couples the rows of one point (they share its shortfall). Forming M (rows^2 x features) and its
Cholesky factor (rows^3 / 3) are the two costs that grow fastest, and the only ones moved to a GPU:
every vector of the iteration stays on the CPU, so a step moves O(rows + entries) numbers each way.

* :class:`CpuNormal`: SciPy's BLAS (a symmetric rank-k update per class, one triangle) and LAPACK's
  Cholesky in place (NumPy's own OpenBLAS is avoided: see :mod:`cnnrepair.repair.rows_ipm`).
* :class:`TorchNormal`: the same matrix in float64 on any torch device (CUDA; the CPU for tests),
  factored by ``torch.linalg.cholesky_ex``.

Both retry a failed factorisation (late, ill-conditioned iterations) with the diagonal raised, no more
than needed, and return False when even 1e-4 of the largest diagonal entry does not make it factor.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import scipy.linalg as sla
from scipy.linalg.blas import dsyrk
from scipy.linalg.lapack import dpotrf

ClassBlock = tuple[np.ndarray, np.ndarray, np.ndarray]  # rows touching the class, their signed features on its free entries, those entries


class NormalMatrix(Protocol):
    """What the interior point needs of its normal matrix: factor it for one iteration's weights, then solve with it."""

    device: str

    def factor(self, theta: np.ndarray, De: np.ndarray, Ds: np.ndarray, rank_one: tuple[float, np.ndarray] | None = None) -> bool:
        """Build and factor M for these weights (True), or say it cannot be factored (False)."""

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """M^-1 rhs with the last factor."""


class _Shape:
    """The index structure both implementations build M from."""

    def __init__(self, m: int, by_class: list[ClassBlock], same: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.m, self.by_class = m, by_class
        self.same_i, self.same_j, self.same_point = same  # pairs (i >= j) of rows of one point, and that point


class CpuNormal(_Shape):
    """M on the CPU: only the upper triangle is built, in C order, which is the lower triangle in the Fortran order LAPACK
    factors in place (no copy of the rows x rows matrix)."""

    device = "cpu"

    def __init__(self, m: int, by_class: list[ClassBlock], same: tuple[np.ndarray, np.ndarray, np.ndarray]):
        super().__init__(m, by_class, same)
        self.flat_index = [(idx[:, None] * m + idx[None, :]).reshape(-1) for idx, _, _ in by_class]
        self._buffer: np.ndarray | None = None
        self._factor: np.ndarray | None = None

    def factor(self, theta: np.ndarray, De: np.ndarray, Ds: np.ndarray, rank_one: tuple[float, np.ndarray] | None = None) -> bool:
        m = self.m
        if self._buffer is None:
            self._buffer = np.empty((m, m))
        M = self._buffer
        flat = M.reshape(-1)
        reg, top = 0.0, None
        while True:
            M.fill(0.0)
            for c, (idx, Gc, pos) in enumerate(self.by_class):
                if len(idx) and len(pos):  # the block's lower triangle, transposed: C order, upper triangle
                    block = dsyrk(1.0, Gc * np.sqrt(theta[pos]), lower=1).T
                    at = self.flat_index[c]
                    flat[at] = flat[at] + block.reshape(-1)
            M[self.same_j, self.same_i] += De[self.same_point]
            if rank_one is not None:  # added before factoring: Sherman-Morrison on an ill-conditioned M lost every digit late
                M += rank_one[0] * np.outer(rank_one[1], rank_one[1])
            diag = M.diagonal() + Ds
            top = float(diag.max()) if top is None else top
            M[np.diag_indices(m)] = diag + reg
            factor, info = dpotrf(M.T, lower=1, clean=0, overwrite_a=1)
            if info == 0:
                self._factor = factor
                return True
            if reg > 1e-4 * top:
                self._factor = None
                return False
            reg = 1e-14 * top if reg == 0.0 else reg * 100.0

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        return sla.cho_solve((self._factor, True), rhs, check_finite=False)


class TorchNormal(_Shape):
    """M in float64 on a torch device: the class blocks' features are moved there once; each iteration moves the weights
    there and each solve's right-hand side there and back."""

    def __init__(self, m: int, by_class: list[ClassBlock], same: tuple[np.ndarray, np.ndarray, np.ndarray], device):
        import torch

        super().__init__(m, by_class, same)
        self.torch = torch
        self.dev = torch.device(device)
        self.device = f"{self.dev} (torch)" if self.dev.type == "cpu" else str(self.dev)

        def put(a, dtype=torch.float64):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=self.dev)

        self.blocks = [(put((idx[:, None] * m + idx[None, :]).reshape(-1), torch.int64), put(Gc), put(pos, torch.int64))
                       for idx, Gc, pos in by_class if len(idx) and len(pos)]
        off = self.same_i != self.same_j  # both triangles: torch's Cholesky is given the whole symmetric matrix
        self.pair_index = put(np.concatenate([self.same_i * m + self.same_j, (self.same_j * m + self.same_i)[off]]), torch.int64)
        self.pair_point = put(np.concatenate([self.same_point, self.same_point[off]]), torch.int64)
        self._factor = None

    def factor(self, theta: np.ndarray, De: np.ndarray, Ds: np.ndarray, rank_one: tuple[float, np.ndarray] | None = None) -> bool:
        torch, m = self.torch, self.m
        th = torch.as_tensor(theta, dtype=torch.float64, device=self.dev).sqrt()
        M = torch.zeros(m * m, dtype=torch.float64, device=self.dev)
        for at, Gc, pos in self.blocks:
            S = Gc * th[pos]
            M.index_add_(0, at, (S @ S.T).reshape(-1))
        M.index_add_(0, self.pair_index, torch.as_tensor(De, dtype=torch.float64, device=self.dev)[self.pair_point])
        M = M.reshape(m, m)
        if rank_one is not None:
            g = torch.as_tensor(rank_one[1], dtype=torch.float64, device=self.dev)
            M.addr_(g, g, alpha=float(rank_one[0]))
        M.diagonal().add_(torch.as_tensor(Ds, dtype=torch.float64, device=self.dev))
        top, reg = float(M.diagonal().max()), 0.0
        while True:
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                self._factor = L
                return True
            if reg > 1e-4 * top:
                self._factor = None
                return False
            step = 1e-14 * top if reg == 0.0 else 99.0 * reg  # the diagonal ends at reg * 100, as on the CPU
            M.diagonal().add_(step)
            reg += step

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        torch = self.torch
        b = torch.as_tensor(rhs, dtype=torch.float64, device=self.dev)
        return torch.cholesky_solve(b[:, None], self._factor)[:, 0].cpu().numpy()


def normal_matrix(m: int, by_class: list[ClassBlock], same: tuple[np.ndarray, np.ndarray, np.ndarray], device=None) -> NormalMatrix:
    """The normal matrix on ``device`` (None or ``cpu``: SciPy on the CPU; anything else a torch device, float64).
    ``torch:cpu`` runs the torch implementation on the CPU (the tests compare it with SciPy's)."""
    name = None if device is None else str(device)
    if name in (None, "cpu"):
        return CpuNormal(m, by_class, same)
    return TorchNormal(m, by_class, same, "cpu" if name == "torch:cpu" else name)
