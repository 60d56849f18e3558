"""Hybrid networks: the CNN's frozen feature extractor with a one-vs-rest SVM head.

The SVMs are fitted with scikit-learn and then re-expressed as torch modules whose decision
values equal ``decision_function`` (computed in float64), so gradient attacks reach the input
through the real SVM, not a surrogate.

* LH: ``StandardScaler`` + ``LinearSVC`` (one-vs-rest). The scaler is folded into the weights, so
  LH's head is ``W x + b`` on the raw CNN features: the form the repair LP edits.
* KH: ``StandardScaler`` + ``OneVsRestClassifier(SVC(kernel="rbf"))``. The union of the binary
  machines' support vectors is stored once; the head computes ``A K(s(x), SV)^T + b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import load_torch, save_torch
from cnnrepair.repair.layer import HeadKind, register_head


class LinearHead(nn.Module):
    """One-vs-rest linear decision values ``x W^T + b`` on raw features (float64 inside)."""

    kind = "linear"

    def __init__(self, weight: np.ndarray | Tensor, bias: np.ndarray | Tensor):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(np.asarray(weight), dtype=torch.float64).clone())
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias), dtype=torch.float64).clone())

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return (x.double() @ self.weight.T + self.bias).float()

    def decision_values(self, x: np.ndarray) -> np.ndarray:
        """Decision values in float64 for a feature matrix."""
        return np.asarray(x, np.float64) @ self.weight.cpu().numpy().T + self.bias.cpu().numpy()


class RBFHead(nn.Module):
    """One-vs-rest RBF-kernel SVM decision values on standardised features (float64 inside)."""

    kind = "rbf"

    def __init__(self, mean, scale, support_vectors, coef, bias, gamma: float):
        super().__init__()
        f64 = torch.float64
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=f64).clone())
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=f64).clone())
        self.register_buffer("support_vectors", torch.as_tensor(np.asarray(support_vectors), dtype=f64).clone())
        self.register_buffer("coef", torch.as_tensor(np.asarray(coef), dtype=f64).clone())
        self.register_buffer("bias", torch.as_tensor(np.asarray(bias), dtype=f64).clone())
        self.register_buffer("gamma", torch.tensor(float(gamma), dtype=f64))
        self.register_buffer("sv_sqnorm", (self.support_vectors ** 2).sum(1))

    def kernel(self, x: Tensor) -> Tensor:
        """RBF kernel values between the standardised inputs and the support vectors (float64, N x n_sv).

        The head is ``kernel(x) @ coef.T + bias``: linear in ``coef`` and ``bias``, which is what
        lets repair edit KH with the same program as a linear layer.
        """
        z = (x.double() - self.mean) / self.scale
        sq = (z * z).sum(1, keepdim=True) + self.sv_sqnorm[None] - 2.0 * z @ self.support_vectors.T
        return torch.exp(-self.gamma * sq.clamp_min(0.0))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return (self.kernel(x) @ self.coef.T + self.bias).float()


class HybridNet(nn.Module):
    """``head(features(x))`` with a frozen CNN extractor and an SVM head."""

    def __init__(self, features: nn.Module, head: nn.Module):
        super().__init__()
        self.features = features
        self.head = head
        for p in self.features.parameters():
            p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.features(x))


@dataclass
class FitInfo:
    """What fitting an SVM head cost and used."""

    seconds: float
    n_train: int
    n_support: int | None = None
    converged: bool = True


def fit_linear_svm(x: np.ndarray, y: np.ndarray, C: float = 0.01, seed: int = 0, max_iter: int = 5000, n_jobs: int = 1):
    """Fit LH's head; returns (LinearHead, fitted sklearn pipeline, FitInfo).

    ``n_jobs`` != 1 fits the one-vs-rest classes in parallel processes (``OneVsRestClassifier``
    around a binary ``LinearSVC``): liblinear solves the same binary problem per class either way,
    so the weights agree with ``LinearSVC``'s own one-vs-rest (to 1e-15 in our check), in a
    fraction of the time on many cores.
    """
    import time
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    _check_features(x, y)
    t0 = time.perf_counter()
    svc = LinearSVC(C=C, dual="auto", max_iter=max_iter, random_state=seed)
    parallel = n_jobs != 1 and len(np.unique(y)) > 2
    pipe = make_pipeline(StandardScaler(), OneVsRestClassifier(svc, n_jobs=n_jobs) if parallel else svc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        pipe.fit(np.asarray(x, np.float64), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    scaler, svm = pipe[0], pipe[1]
    if parallel:
        coef = np.vstack([est.coef_ for est in svm.estimators_])
        intercept = np.concatenate([est.intercept_ for est in svm.estimators_])
    else:
        coef, intercept = svm.coef_, svm.intercept_
    if coef.shape[0] == 1:  # binary: make it two one-vs-rest rows so argmax works
        coef, intercept = np.vstack([-coef, coef]), np.concatenate([-intercept, intercept])
    weight = coef / scaler.scale_[None]
    bias = intercept - weight @ scaler.mean_
    return LinearHead(weight, bias), pipe, FitInfo(time.perf_counter() - t0, len(y), None, converged)


def fit_rbf_svm(x: np.ndarray, y: np.ndarray, C: float = 10.0, gamma: str | float = "scale", n_jobs: int = -1, cache_mb: int = 1000):
    """Fit KH's head (exact ``SVC``, one binary machine per class); returns (RBFHead, pipeline, FitInfo)."""
    import time

    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    _check_features(x, y)
    if len(np.unique(y)) < 3:
        raise CnnRepairError("KH needs at least 3 classes in its training labels; use a larger training slice")
    t0 = time.perf_counter()
    pipe = make_pipeline(StandardScaler(), OneVsRestClassifier(SVC(kernel="rbf", C=C, gamma=gamma, cache_size=cache_mb), n_jobs=n_jobs))
    pipe.fit(np.asarray(x, np.float64), y)
    scaler, ovr = pipe[0], pipe[1]
    support = np.unique(np.concatenate([est.support_ for est in ovr.estimators_]))
    pos = {int(s): i for i, s in enumerate(support)}
    coef = np.zeros((len(ovr.estimators_), len(support)))
    for c, est in enumerate(ovr.estimators_):
        coef[c, [pos[int(s)] for s in est.support_]] = est.dual_coef_[0]
    bias = np.array([est.intercept_[0] for est in ovr.estimators_])
    sv = scaler.transform(np.asarray(x, np.float64)[support])
    head = RBFHead(scaler.mean_, scaler.scale_, sv, coef, bias, ovr.estimators_[0]._gamma)
    return head, pipe, FitInfo(time.perf_counter() - t0, len(y), len(support))


def _check_features(x: np.ndarray, y: np.ndarray) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise CnnRepairError(f"features must be an N x d matrix with N labels, got {x.shape} and {len(y)} labels")
    if not np.isfinite(x).all():
        raise CnnRepairError("features contain NaN or infinite values; the CNN diverged, retrain it")


def save_head(path: Path, head: nn.Module, meta: dict | None = None) -> None:
    """Save an SVM head as plain tensors plus its kind (loadable with weights_only=True)."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items() if k != "sv_sqnorm"}
    save_torch(Path(path), {"kind": head.kind, "state": state, "meta": meta or {}})


def load_head(path: Path) -> nn.Module:
    """Load a head written by :func:`save_head`."""
    obj = load_torch(Path(path), "SVM head")
    try:
        kind, s = obj["kind"], obj["state"]
        if kind == "linear":
            return LinearHead(s["weight"], s["bias"])
        if kind == "rbf":
            return RBFHead(s["mean"], s["scale"], s["support_vectors"], s["coef"], s["bias"], float(s["gamma"]))
    except (KeyError, TypeError) as exc:
        raise CnnRepairError(f"{path}: not a cnnrepair SVM head (missing {exc}); delete it and rerun `cnnrepair hybrid`") from None
    raise CnnRepairError(f"{path}: unknown head kind {kind!r}; delete it and rerun `cnnrepair hybrid`")


# the SVM heads are repairable last layers: LH directly, KH through its kernel values (linear in its coefficients)
register_head(LinearHead, HeadKind("svm-linear"))
register_head(RBFHead, HeadKind("svm-rbf", weight="coef", kernel=True))
