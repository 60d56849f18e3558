"""Certificates: what a repair claims, in plain JSON, and an independent re-check of the claim.

A certificate names the repaired model file by sha256 and lists, per repair point, its margin
before and after on the saved model (float32, as it runs). A third party re-checks it by running
the model on the points (``margin >= spec.margin`` for each), recomputing the change from the
original model, and recomputing the lower bound from the stored multipliers with the closed form
of :func:`cnnrepair.repair.margins.certified_lower_bound` (weak duality; documented in the README).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnrepair.repair.program import MarginProblem, certified_lower_bound, margins_of

FORMAT = "cnnrepair-certificate/1"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """The model's outputs as it runs (its own dtype, eval mode), returned as float64."""
    from cnnrepair.repair.layer import eval_mode
    from cnnrepair.training import model_device

    x = torch.as_tensor(x)
    device = model_device(model)
    out = []
    eval_mode(model)
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            res = model(x[i:i + batch_size].to(device))
            while isinstance(res, (tuple, list)):
                res = res[0]
            out.append(res.detach().double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def model_margins(model: nn.Module, x, y: np.ndarray) -> np.ndarray:
    """logit[y] - max_{j != y} logit[j] of the model as it runs, per input."""
    if len(y) == 0:
        return np.zeros(0)
    return margins_of(model_logits(model, x), np.asarray(y, np.int64))


def change_summary(dW: np.ndarray, db: np.ndarray, freeze_bias: bool) -> dict:
    """L1, L-infinity and non-zeros of a change, weights and biases together."""
    d = np.concatenate([dW.ravel(), [] if freeze_bias else db.ravel()])
    return {"l1": float(np.abs(d).sum()), "linf": float(np.abs(d).max(initial=0.0)), "nonzero": int(np.count_nonzero(d)),
            "weights_changed": int(np.count_nonzero(dW)), "biases_changed": int(np.count_nonzero(db)),
            "rows_changed": int(np.count_nonzero(np.abs(np.hstack([dW, db[:, None]])).sum(1)))}


def witness_bound(problem: MarginProblem, witness: dict) -> float:
    """Recompute the certified lower bound from a certificate's multipliers."""
    if not witness or not witness.get("point"):
        return 0.0
    point, cls = np.asarray(witness["point"], np.int64), np.asarray(witness["class"], np.int64)
    rows = None
    if problem.has_boxes and witness.get("pairs") is not None:
        from cnnrepair.repair.ball import sigma_rows

        rows = sigma_rows(problem, point, cls, np.asarray(witness["pairs"], np.int64).reshape(-1, 2),
                          np.asarray(witness["sigma"], np.float64).reshape(-1, problem.weight.shape[1]))
    return certified_lower_bound(problem, point, cls, np.asarray(witness["multiplier"], np.float64), sigma_rows=rows)


def below_margin(values: np.ndarray, margin: float, what: str, detail: str) -> list[str]:
    """One problem naming how many ``values`` fall below ``margin`` and the first of them (empty: none do)."""
    low = np.flatnonzero(values < margin)
    if not len(low):
        return []
    k = int(low[0])
    return [f"{len(low)} {what.format(m=margin)} ({detail.format(k=k, v=values[k])})"]


def claims_off(claimed: np.ndarray, measured: np.ndarray, rtol: float, what: str, detail: str) -> list[str]:
    """One problem naming how many measured values differ from the claimed ones beyond ``rtol`` (relative), and the first."""
    off = np.flatnonzero(np.abs(claimed - measured) > rtol * (1 + np.abs(claimed)))
    if not len(off):
        return []
    k = int(off[0])
    return [f"{len(off)} {what} ({detail.format(k=k, c=claimed[k], v=measured[k])})"]


def check_claims(cert: dict, margins_after: np.ndarray, keep_margins_after: np.ndarray) -> list[str]:
    """Problems with a certificate's margin claims, given margins measured on the model (empty: it holds)."""
    problems = []
    spec = cert["spec"]
    if cert["status"] != "repaired":
        return problems
    if len(margins_after) != len(cert["points"]):
        return [f"the certificate lists {len(cert['points'])} repair points but {len(margins_after)} were given"]
    if spec["kind"] in ("pointwise", "ball"):
        problems += below_margin(margins_after, spec["margin"], "repair point(s) below the margin {m:g} on this model",
                                 "point {k}: {v:.6g}")
    claimed = np.array([p["margin_after"] for p in cert["points"]], np.float64)
    problems += claims_off(claimed, margins_after, 1e-5, "repair point margin(s) differ from the certificate",
                           "point {k}: certified {c:.6g}, measured {v:.6g}")
    keep = cert.get("keep") or {}
    if keep.get("count"):
        if len(keep_margins_after) != keep["count"]:
            problems.append(f"the certificate lists {keep['count']} keep points but {len(keep_margins_after)} were given")
        elif spec["keep"] == "hard" and spec["kind"] in ("pointwise", "ball") and (keep_margins_after < spec["keep_margin"]).any():
            problems.append(f"{int((keep_margins_after < spec['keep_margin']).sum())} keep point(s) below the keep margin {spec['keep_margin']:g}")
    return problems
