"""``repair_classifier`` on a layer inside the network: the pattern-preserving program of
:mod:`cnnrepair.repair.hidden`, re-measured on the float32 model, and its certificate.

The same contract as a last-layer repair: every repair point gets its label with the margin on the
returned model as it runs (in every batch layout; points that float32 rounding leaves short are
re-solved with a slightly higher margin, recorded as ``required``), every keep point keeps its label
with the keep margin, only the named layer changes, and the change is the minimal one in the spec's
norm (L1, L-infinity or PRDNN's mean + max) among changes that keep the activation pattern of every repair point and of every keep point the program
took in (those the change would otherwise cost their margin; certified lower bound, gap).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.certificate import Certificate, KeepClaim, PointClaim
from cnnrepair.repair.float32 import change_linf, conditioning, ill_conditioned, solve_in_float32
from cnnrepair.repair.hidden import HiddenProgram, LayerChange, hidden_program, solve_hidden, written
from cnnrepair.repair.ending import ending_record
from cnnrepair.repair.inputs import Points, SolveOptions, as_inputs, check_labels
from cnnrepair.repair.outcome import ClassifierRepair
from cnnrepair.repair.program import MarginSolution
from cnnrepair.repair.measure import change_norms, change_summary, model_logits, robust_margins
from cnnrepair.repair.spec import RepairSpec



def refuse_unsupported(spec: RepairSpec, layer: str) -> None:
    """What a repair of a layer inside the network does not do yet: a one-line error naming it."""
    if spec.kind != "pointwise":
        raise CnnRepairError(f"layer {layer!r} is inside the network: the {spec.kind} spec repairs the last layer only; use the "
                             "pointwise spec (or repair the last layer)")
    if spec.keep_price is not None:
        raise CnnRepairError("repair of a layer inside the network takes hard keep points only; drop --keep-price")


def repair_hidden(model: nn.Module, xt: torch.Tensor, ya: np.ndarray, keep: Points | None, spec: RepairSpec, layer: str,
                  options: SolveOptions) -> ClassifierRepair:
    """Repair layer ``layer`` (not the one that ends the model) so that ``xt`` get labels ``ya``."""
    t0 = time.perf_counter()
    refuse_unsupported(spec, layer)
    C = model_logits(model, xt[:1]).shape[1]
    check_labels(ya, C, "repair points")
    kx, ky = None, np.zeros(0, np.int64)
    if keep is not None:
        kx, ky = as_inputs(keep.x, keep.y, "keep points", C, tuple(xt.shape[1:]), xt.dtype)
        if ky is None:
            ky = model_logits(model, kx).argmax(1)
    K, NK = len(ya), len(ky)
    X = xt if kx is None else torch.cat([xt, kx])
    labels = np.concatenate([ya, ky]).astype(np.int64)
    required = np.concatenate([np.full(K, spec.margin), np.full(NK, spec.keep_margin)])
    prog = hidden_program(model, layer, X, labels, required, K, LayerChange(spec.norm, spec.freeze_bias, spec.max_change, spec.later_biases))
    ending = prog.suffix.ending  # margins are measured through a ReLU / softmax that ends the model
    base = robust_margins(model, xt, ya, ending)
    keep_before = robust_margins(model, kx, ky, ending) if NK else np.zeros(0)
    if spec.later_biases and not prog.later:
        raise CnnRepairError(f"--later-biases: no linear or convolution layer with a bias comes after layer {layer!r}")

    spent = {"seconds": 0.0, "rounds": 0}

    def solve(req: np.ndarray):  # the solver's seconds and rounds over every float32 re-solve
        prog.required = req
        sol = solve_hidden(prog, max(1e-3, options.seconds - (time.perf_counter() - t0)))
        spent["seconds"] += sol.seconds
        spent["rounds"] += sol.rounds
        return replace(sol, seconds=spent["seconds"], rounds=spent["rounds"], size={**sol.size, "rounds": spent["rounds"]})

    def measure(sol):
        repaired = written(prog, model, sol.delta_weight, sol.delta_bias, sol.delta_later)
        after = robust_margins(repaired, xt, ya, ending)
        keep_after = robust_margins(repaired, kx, ky, ending) if NK else np.zeros(0)
        return repaired, np.concatenate([after, keep_after]), (after, keep_after)

    rounding = 8 * np.finfo(np.float32).eps * (1 + np.abs(prog.outs0[0].numpy()).max(1))
    out = solve_in_float32(solve, lambda sol: ill_conditioned(prog.weight, prog.bias, spec, sol), measure, required,
                           np.ones(K + NK, bool), rounding)
    status, sol, repaired, notes = out.status, out.sol, out.repaired, out.notes
    after, keep_after = out.measured if out.measured is not None else (base, keep_before)
    dW, db, de = (_saved_change(prog, repaired) if repaired is not None else
                  (np.zeros_like(prog.weight), np.zeros_like(prog.bias), np.zeros_like(prog.later_bias)))
    cert = _certificate(prog, spec, status, sol, (dW, db, de), (base, after), (ky, keep_before, keep_after), ya)
    if status == "failed" and sol.status not in ("optimal", "failed"):
        notes.append(f"the solver stopped: {sol.status}")
    if status == "infeasible":
        notes.append(f"no change of layer {layer!r} that keeps the activation pattern of every repair point (and of the keep "
                     "points the program took in) meets the spec")
    tensors = tuple(t for t in (prog.weight_param, None if prog.freeze_bias else prog.bias_param) if t) + tuple(b for _, b, _ in prog.later)
    return ClassifierRepair(status, repaired, layer, cert, sol, time.perf_counter() - t0, notes, tensors)


def _keep_in_program(prog: HiddenProgram) -> list[int]:
    """Indices (among the keep points) of those the program has rows for."""
    active = prog.warm.get("active")
    if active is None:
        return []
    return [int(k) for k in np.flatnonzero(active[prog.n_repair:])]


def _saved_change(prog: HiddenProgram, repaired: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The change as stored (rounded to each tensor's dtype), float64: the layer's weight and bias, the later biases."""
    from cnnrepair.repair.layer import get_tensor

    W = get_tensor(repaired, prog.weight_param).detach().double().cpu().numpy()
    b = get_tensor(repaired, prog.bias_param).detach().double().cpu().numpy() if prog.bias_param else prog.bias
    later = [get_tensor(repaired, name).detach().double().cpu().numpy().ravel() for _, name, _ in prog.later]
    de = np.concatenate(later) - prog.later_bias if later else np.zeros(0)
    return W - prog.weight, b - prog.bias, de


def _certificate(prog: HiddenProgram, spec: RepairSpec, status: str, sol: MarginSolution, change: tuple, margins: tuple,
                 keep: tuple, ya: np.ndarray) -> Certificate:
    dW, db, de = change
    base, after = margins
    ky, keep_before, keep_after = keep
    K, NK = len(ya), len(ky)
    repaired = status == "repaired"
    flat = dW.reshape(dW.shape[0], -1)
    summary = change_summary(flat, db, prog.freeze_bias)
    objective = prog.change_cost(flat, db, de) if repaired else None
    lower = float(min(sol.lower_bound, objective)) if repaired else None
    gap = (0.0 if objective == 0 else max(0.0, (objective - lower) / objective)) if repaired else None
    required = prog.required
    cert = Certificate(
        layer=prog.name, layer_kind=prog.kind, layer_shape=list(prog.weight.shape), spec=spec.as_dict(), status=status,
        objective=objective, lower_bound=lower, gap=gap, change=summary,
        points=[PointClaim(index=k, label=int(ya[k]), margin_before=float(base[k]), margin_after=float(after[k]),
                           required=float(required[k])) for k in range(K)],
        keep=KeepClaim(count=int(NK), smallest_margin_before=float(keep_before.min()) if NK else None,
                       smallest_margin_after=float(keep_after.min()) if NK else None, labels_kept=int((keep_after > 0).sum()),
                       below_keep_margin=int((keep_after < spec.keep_margin).sum()), required=[float(r) for r in required[K:]],
                       labels=[int(v) for v in ky]),
        solver={"name": "cnnrepair.repair.hidden (pattern-preserving LP on HiGHS, row and column generation)", "status": sol.status,
                "seconds": sol.seconds, **sol.size},
        lower_bound_witness={}, ending=ending_record(prog.suffix.ending),
        conditioning=conditioning(prog.weight, prog.bias, spec, summary["linf"] if repaired else change_linf(sol)),
        patterns={"kept": True, "relu_values": len(prog.suffix.relus), "maxpool_values": len(prog.suffix.pools),
                  "keep_points_with_patterns": _keep_in_program(prog),
                  "note": "every ReLU's on/off state and every max-pool window's chosen input after the layer are the original "
                          "network's at every repair point and at the keep points listed in keep_points_with_patterns (those "
                          "whose margin the change would otherwise have cost; the other keep points keep their labels, as "
                          "measured, with whatever pattern they take); cnnrepair verify --original recomputes them"})
    if prog.later:
        cert.later_biases = {"tensors": [b for _, b, _ in prog.later], **change_norms(de),
                             "note": "the biases of the layers after the repaired one moved too; the objective counts their L1 change"}
    if status == "infeasible" and sol.conflicts is not None:
        cert.conflicts = [{"index": int(k) if k < K else int(k - K), "set": "points" if k < K else "keep",
                           "label": int(prog.labels[k])} for k in sol.conflicts]
        cert.solver["conflicts_irreducible"] = False
        cert.solver["conflicts_note"] = "the points of the rows no change meets with those patterns; not searched for a smaller set"
    return cert
