"""Certificates: what a repair claims, in plain JSON, and an independent re-check of the claim.

A certificate names the repaired model file by sha256 and lists, per repair point, its margin
before and after on the saved model (float32, as it runs). A third party re-checks it by running
the model on the points (``margin >= spec.margin`` for each), recomputing the change from the
original model, and recomputing the lower bound from the stored multipliers with the closed form
of :func:`cnnrepair.repair.margins.certified_lower_bound` (weak duality; documented in docs/guide.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnrepair.repair.program import MarginProblem, certified_lower_bound, margins_of
from cnnrepair.runtime import eval_mode, model_device

FORMAT = "cnnrepair-certificate/2"

# The batch layouts every margin is measured in, on the repaired model and on the saved file: a
# float32 forward pass may give an input other outputs in another batch (BLAS picks kernels by
# shape), so a margin counts only as its smallest over these (batch size, reversed order) layouts.
LAYOUTS: tuple[tuple[int, bool], ...] = ((512, False), (1, False), (61, True))


def layouts_record() -> list[dict]:
    """The layouts as the certificate records them."""
    return [{"batch_size": b, "order": "reversed" if r else "given"} for b, r in LAYOUTS]


def in_layout(logits_of, x, batch_size: int, reverse: bool) -> np.ndarray:
    """``logits_of(batch)`` over ``x`` in batches of ``batch_size``, in reversed order if asked, returned in ``x``'s order."""
    n = len(x)
    order = np.arange(n)[::-1] if reverse else np.arange(n)
    outs = [np.asarray(logits_of(x[torch.as_tensor(order[i:i + batch_size].copy())]), np.float64) for i in range(0, n, batch_size)]
    if not outs:
        return np.zeros((0, 0))
    out = np.concatenate(outs)
    res = np.empty_like(out)
    res[order] = out
    return res


def layout_margins(logits_of, x, y: np.ndarray) -> np.ndarray:
    """Margins (len(LAYOUTS) x N) of ``logits_of`` in every layout of :data:`LAYOUTS`."""
    y = np.asarray(y, np.int64)
    if len(y) == 0:
        return np.zeros((len(LAYOUTS), 0))
    x = torch.as_tensor(x)
    return np.stack([margins_of(in_layout(logits_of, x, b, r), y) for b, r in LAYOUTS])


def module_logits_fn(model: nn.Module):
    """A batch -> float64 logits function running ``model`` as it runs (its own dtype and device)."""
    device = model_device(model)
    eval_mode(model)

    def run(xb: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            res = model(xb.to(device))
        while isinstance(res, (tuple, list)):
            res = res[0]
        return res.detach().double().cpu().numpy()

    return run


def robust_margins(model: nn.Module, x, y: np.ndarray) -> np.ndarray:
    """Each input's smallest margin over the batch layouts of :data:`LAYOUTS`."""
    if len(y) == 0:
        return np.zeros(0)
    return layout_margins(module_logits_fn(model), x, y).min(0)


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """The model's outputs as it runs (its own dtype, eval mode), returned as float64."""
    x = torch.as_tensor(x)
    run = module_logits_fn(model)
    out = [run(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


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


# -- the certificate's shape ----------------------------------------------------------------------
STATUSES = ("repaired", "infeasible", "failed", "ill-conditioned")


class _Malformed(Exception):
    pass


def _need(obj: dict, key: str, kinds, where: str, optional: bool = False):
    if not isinstance(obj, dict):
        raise _Malformed(f"{where} must be an object")
    if key not in obj:
        if optional:
            return None
        raise _Malformed(f"{where} has no {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join({int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list",
                             bool: "true/false"}[k] for k in kinds)
        raise _Malformed(f"{where}.{key} must be {names} (got {type(value).__name__})")
    return value


def _numbers(values, where: str, kind=float, nullable: bool = False) -> None:
    if not isinstance(values, list):
        raise _Malformed(f"{where} must be a list")
    for v in values:
        if v is None and nullable:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            raise _Malformed(f"{where} must hold {'numbers' if kind is float else 'integers'} (got {type(v).__name__})")


def check_schema(cert) -> None:
    """Raise CnnRepairError (one line naming the field) unless ``cert`` has the shape repair writes."""
    from cnnrepair.errors import CnnRepairError

    try:
        _check_schema(cert)
    except _Malformed as exc:
        raise CnnRepairError(f"not a valid cnnrepair certificate: {exc}; give the certificate.json that repair wrote") from None


def _check_schema(cert) -> None:
    if not isinstance(cert, dict):
        raise _Malformed("the file must hold a JSON object")
    fmt = _need(cert, "format", str, "certificate")
    if fmt != FORMAT:
        raise _Malformed(f"format is {fmt!r}, this version reads {FORMAT!r}")
    status = _need(cert, "status", str, "certificate")
    if status not in STATUSES:
        raise _Malformed(f"status {status!r} is none of {', '.join(STATUSES)}")
    spec = _need(cert, "spec", dict, "certificate")
    kind = _need(spec, "kind", str, "spec")
    types = {"norm": str, "bounds": str, "margin": float, "keep_margin": float, "delta_weight": float, "eps": float,
             "keep_eps": float, "keep_price": float, "max_change": float, "max_change_ratio": float, "freeze_bias": bool}
    from cnnrepair.repair.spec import SPECS, RepairSpec

    if kind not in SPECS:
        raise _Malformed(f"spec.kind {kind!r} is none of {', '.join(SPECS)}")
    used = set(RepairSpec(kind=kind, norm="l1").used_fields())
    if set(spec) != used | {"keep"}:
        raise _Malformed(f"spec of kind {kind} must hold exactly {', '.join(sorted(used | {'keep'}))}")
    _need(spec, "keep", str, "spec")
    for key in used - {"kind"}:
        _need(spec, key, types[key], "spec", optional=key in ("keep_price", "max_change", "max_change_ratio"))
    _need(cert, "layer", str, "certificate")
    _need(cert, "layer_kind", str, "certificate")
    _numbers(_need(cert, "layer_shape", list, "certificate"), "layer_shape", int)
    for key in ("source_model", "points_file"):
        block = _need(cert, key, dict, "certificate")
        _need(block, "file", str, key)
        _need(block, "sha256", str, key)
    if status == "repaired":
        block = _need(cert, "model", dict, "certificate")
        _need(block, "file", str, "model")
        _need(block, "sha256", str, "model")
    targets = spec["kind"] == "targets"
    for key in ("objective", "lower_bound", "gap"):
        _need(cert, key, float, "certificate", optional=targets and key != "objective" or status != "repaired")
    change = _need(cert, "change", dict, "certificate")
    for key in ("l1", "linf"):
        _need(change, key, float, "change")
    for key in ("nonzero", "weights_changed", "biases_changed", "rows_changed"):
        _need(change, key, int, "change")
    points = _need(cert, "points", list, "certificate")
    for k, p in enumerate(points):
        where = f"points[{k}]"
        _need(p, "index", int, where)
        _need(p, "label", int, where)
        _need(p, "margin_before", float, where)
        _need(p, "margin_after", float, where)
        _need(p, "required", float, where, optional=targets)
        if spec["kind"] == "ball":
            _need(p, "certified_margin_before", float, where)
            _need(p, "certified_margin_after", float, where)
    keep = _need(cert, "keep", dict, "certificate")
    count = _need(keep, "count", int, "keep")
    _numbers(_need(keep, "labels", list, "keep"), "keep.labels", int)
    if not targets:
        _numbers(_need(keep, "required", list, "keep"), "keep.required")
    for key in ("smallest_margin_before", "smallest_margin_after"):
        _need(keep, key, float, "keep", optional=not count)
    _need(keep, "labels_kept", int, "keep")
    if len(keep["labels"]) != count or (not targets and len(keep["required"]) != count):
        raise _Malformed(f"keep lists {len(keep['labels'])} labels and {len(keep.get('required', []))} requirements for {count} points")
    if count:
        _need(cert, "keep_file", dict, "certificate")
        _need(cert["keep_file"], "sha256", str, "keep_file")
    layouts = _need(cert, "batch_layouts", list, "certificate")
    if layouts != layouts_record():
        raise _Malformed(f"batch_layouts must be {layouts_record()} (the layouts this version measures)")
    _need(cert, "solver", dict, "certificate")
    if status == "repaired" and not targets:
        _need(cert, "lower_bound_witness", dict, "certificate")
        cond = _need(cert, "conditioning", dict, "certificate")
        for key in ("layer_scale", "change_linf", "ratio"):
            _need(cond, key, float, "conditioning")
        _need(cond, "max_ratio", float, "conditioning", optional=True)
        _numbers(_need(cert, "margins_by_layout", list, "certificate"), "margins_by_layout")
    if spec["kind"] == "ball":
        ball = _need(cert, "ball", dict, "certificate")
        for key in ("mean", "std", "domain", "point_eps"):
            value = _need(ball, key, list, "ball", optional=True)
            if value is not None:
                _numbers(value, f"ball.{key}")
