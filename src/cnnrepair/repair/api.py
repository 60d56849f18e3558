"""Repair the last layer of any torch classifier: one call, a repaired copy and its certificate.

    from cnnrepair import RepairSpec, repair_classifier
    result = repair_classifier(model, x, y, RepairSpec(margin=0.1), keep_x=x_clean)
    result.model          # a copy of ``model``; only the last linear layer differs
    result.certificate    # JSON-ready claim: margins before/after, change, certified lower bound
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.ball import solve_ball
from cnnrepair.repair.certificate import FORMAT, change_summary, layouts_record, robust_margins
from cnnrepair.repair.coincide import TOLERANCE, conflicting_pairs, feature_noise, shared_features
from cnnrepair.repair.layer import LastLayer, last_layer
from cnnrepair.repair.margins import solve_margins
from cnnrepair.repair.program import MarginProblem, MarginSolution
from cnnrepair.repair.spec import RepairSpec
from cnnrepair.runtime import check_threads, eval_mode

FLOAT32_ROUNDS = 5  # re-solves with a raised margin for points that float32 rounding left short
DEFAULT_TIME_LIMIT = 3600.0  # seconds a repair's solve may take when no limit is given (math.inf: none)


@dataclass
class ClassifierRepair:
    """A repair's outcome. ``model`` is None unless ``status == "repaired"``."""

    status: str
    model: nn.Module | None
    layer: str
    certificate: dict
    solution: object = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    tensors: tuple[str, ...] = ()  # names of the model tensors the repair wrote (the layer's weight, bias)

    @property
    def ok(self) -> bool:
        return self.status == "repaired"


def _as_points(x, y, name: str, num_classes: int | None, input_shape: tuple | None,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, np.ndarray | None]:
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
        _check_labels(ya, num_classes, name)
    return xt, ya


def _check_labels(y: np.ndarray, num_classes: int, name: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise CnnRepairError(f"{name} labels must lie in 0..{num_classes - 1} (got {y.min()}..{y.max()})")


def input_dtype(model: nn.Module, x) -> torch.dtype | None:
    """The floating dtype the model takes: a ``torch.export`` graph's recorded input dtype; else the
    given inputs' own dtype if the model runs on them, or the first of float32 / float64 that it runs on."""
    if isinstance(model, torch.fx.GraphModule):
        for node in model.graph.nodes:
            val = node.meta.get("val") if node.op == "placeholder" else None
            if isinstance(val, torch.Tensor) and torch.is_floating_point(val):
                return val.dtype
    try:
        xt = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError, RuntimeError):
        return None
    if not torch.is_floating_point(xt) or xt.ndim < 2 or not len(xt):
        return None
    candidates = [xt.dtype] + [d for d in (torch.float32, torch.float64) if d != xt.dtype]
    for dtype in candidates:
        try:
            with torch.no_grad():
                model(xt[:1].to(dtype))
            return dtype
        except Exception:  # noqa: BLE001 - this dtype does not fit the model; try the next
            continue
    return None


def repair_classifier(model: nn.Module, x, y, spec: RepairSpec | None = None, *, layer: str | None = None,
                      keep_x=None, keep_y=None, targets: np.ndarray | None = None, time_limit: float | None = None,
                      threads: int | None = None, boxes: tuple | None = None, keep_input_boxes: tuple | None = None) -> ClassifierRepair:
    """Repair the linear layer that ends ``model`` so that inputs ``x`` get labels ``y``.

    ``layer`` names it (default: the ``nn.Linear``, SVM head or ``aten.linear`` whose output is the
    model's output). ``keep_x`` are inputs whose label must survive (``keep_y``, default: the
    model's current prediction). With the ``pointwise`` spec every repair point's margin is checked
    on the returned model as it runs (float32 included), in several batch layouts: points that
    rounding left short are re-solved with a slightly higher margin, recorded in the certificate
    as ``required``. Points whose features coincide within the float32 noise of computing them but
    whose labels differ are reported as conflicts before any solve; a change far beyond the layer's
    own weights (``spec.max_change_ratio``) is reported as ill-conditioned, never certified.
    ``targets`` (K x C) are the target logits of the ``targets`` spec (default: +1 for the label,
    -1 elsewhere, the paper's label targets). ``threads`` caps BLAS/OpenMP threads of the solve;
    ``time_limit`` (seconds, default :data:`DEFAULT_TIME_LIMIT`) bounds the solve.
    With the ``ball`` spec, ``boxes`` = (lower, upper) input boxes per repair point (model units;
    default: :func:`cnnrepair.bounds.ball_box` of ``x`` with ``spec.eps``, pixels in [0, 1]); a box
    of zero width is a pointwise point; ``keep_input_boxes`` likewise for the keep points' balls of
    ``spec.keep_eps`` (default: :func:`cnnrepair.bounds.ball_box`). ``model`` is not changed (its
    train/eval modes included).
    """
    if not isinstance(model, nn.Module):
        raise CnnRepairError(f"model must be a torch.nn.Module (got {type(model).__name__}); "
                             "read a model file with cnnrepair.load_model(path).module")
    if spec is not None and not isinstance(spec, RepairSpec):
        hint = "RepairSpec(**spec)" if isinstance(spec, dict) else "RepairSpec(margin=0.1)"
        raise CnnRepairError(f"spec must be a cnnrepair.RepairSpec (got {type(spec).__name__}); pass e.g. {hint}")
    check_threads(threads)
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float)) or not time_limit > 0):
        raise CnnRepairError(f"time limit must be a number of seconds > 0 (got {time_limit!r})")
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _repair(model, x, y, spec or RepairSpec(), layer, keep_x, keep_y, targets,
                       DEFAULT_TIME_LIMIT if time_limit is None else float(time_limit), threads, (boxes, keep_input_boxes))
    finally:
        for m, mode in modes:  # the caller's model keeps its modes (finding the layer runs it in eval mode)
            m.training = mode


def _repair(model, x, y, spec, layer, keep_x, keep_y, targets, time_limit, threads, all_boxes) -> ClassifierRepair:
    from threadpoolctl import threadpool_limits

    from cnnrepair.repair.targets import default_threads

    t0 = time.perf_counter()
    boxes, keep_input_boxes = all_boxes
    eval_mode(model)  # the caller's modes are restored by repair_classifier
    dtype = input_dtype(model, x)
    xt, ya = _as_points(x, y, "repair points", None, None, dtype)
    if len(xt) == 0:
        raise CnnRepairError("no repair points given; pass at least one input and label")
    lay = last_layer(model, xt, layer)
    C = lay.shape[0]
    _check_labels(ya, C, "repair points")
    kx, ky = (None, None)
    if keep_x is not None:
        kx, ky = _as_points(keep_x, keep_y, "keep points", C, tuple(xt.shape[1:]), dtype)
    F, FK = shared_features(lay, xt, kx)  # one feature vector per distinct input, wherever it appears
    base = robust_margins(model, xt, ya)
    if kx is not None and len(kx):
        logits_k = FK @ lay.weight.T + lay.bias
        ky = logits_k.argmax(1) if ky is None else ky
        keep_before = robust_margins(model, kx, ky)
    else:
        FK, ky, keep_before = np.zeros((0, F.shape[1])), np.zeros(0, np.int64), np.zeros(0)
    if spec.freeze_bias is False and not lay.has_bias:
        spec = RepairSpec(**{**spec.__dict__, "freeze_bias": True})
    with threadpool_limits(limits=threads or default_threads()):
        if spec.kind == "targets":
            return _targets(lay, spec, F, ya, FK, ky, xt, kx, targets, base, keep_before, t0)
        eps = float(torch.finfo(dtype).eps) if dtype is not None else float(np.finfo(np.float32).eps)
        noise = feature_noise(lay, xt, F, eps)
        clash = _coinciding(lay, spec, F, ya, FK, ky, base, keep_before, noise, t0)
        if clash is not None:
            return clash
        box = keep_box = None
        if spec.kind == "ball":
            lo, hi = _input_boxes(spec, xt, boxes)
            graph = _frozen(model, lay, xt)  # traced once for the repair points' and the keep points' balls
            box = _feature_boxes(graph, lay, spec, lo, hi, F)
            keep_box = keep_boxes(graph, lay, spec, kx, ky, FK, keep_input_boxes) if spec.keep_eps > 0 and len(ky) else None
        result = _pointwise(lay, spec, F, ya, FK, ky, xt, kx, base, keep_before, time_limit, t0, box, keep_box)
        result.certificate["feature_noise"] = {"linf": noise, "tolerance": TOLERANCE * noise,
                                               "note": "largest difference between an input's features computed in a batch and alone "
                                                       "(measured on a sample, floored at float32 rounding); points closer than the "
                                                       "tolerance count as one point"}
        return result


def _coinciding(lay, spec, F, ya, FK, ky, base, keep_before, noise, t0) -> ClassifierRepair | None:
    """An infeasible repair naming the hard points whose features coincide (within the noise) but whose labels differ, or None."""
    K = len(ya)
    labels = np.concatenate([ya, ky])
    hard = np.concatenate([np.ones(K, bool), np.full(len(ky), spec.keep_price is None)])
    feats = np.vstack([F, FK])
    pairs = conflicting_pairs(feats, labels, hard, TOLERANCE * noise)
    if not pairs:
        return None
    where = (lambda k: {"set": "points" if k < K else "keep", "index": int(k if k < K else k - K), "label": int(labels[k])})
    members = list(pairs[0][:2])  # one pair is an irreducible conflict; every pair is listed under "coinciding"
    problem = MarginProblem(lay.weight, lay.bias, feats, labels, 0.0)
    sol = MarginSolution("infeasible", np.zeros_like(lay.weight), np.zeros_like(lay.bias), float("nan"), float("nan"),
                         time.perf_counter() - t0, conflicts=np.asarray(members, np.int64))
    zeros = (np.zeros_like(lay.weight), np.zeros_like(lay.bias))
    cert = _certificate(lay, spec, "infeasible", sol, problem, *zeros, ya, base, base,
                        np.concatenate([np.full(K, spec.margin), np.full(len(ky), spec.keep_margin)]), ky, keep_before, keep_before)
    cert["coinciding"] = [{"a": where(i), "b": where(j), "linf_distance": d} for i, j, d in pairs[:100]]
    cert["feature_noise"] = {"linf": noise, "tolerance": TOLERANCE * noise}
    cert["solver"].update(name="cnnrepair.repair.coincide (found before solving)", conflicts_irreducible=True)
    note = (f"{len(pairs)} pair(s) of points have features equal within float32 noise ({TOLERANCE * noise:.2g}) but different labels "
            f"(first: {where(pairs[0][0])['set']}[{where(pairs[0][0])['index']}] and {where(pairs[0][1])['set']}"
            f"[{where(pairs[0][1])['index']}]); no change of this layer can separate them")
    return ClassifierRepair("infeasible", None, lay.name, cert, sol, time.perf_counter() - t0, [note], _written(lay))


def _frozen(model: nn.Module, lay: LastLayer, xt: torch.Tensor):
    """The graph the bounds walk: the model up to ``lay``'s input (refused for an RBF head)."""
    from cnnrepair.bounds import frozen_graph

    if lay.kind == "svm-rbf":
        raise CnnRepairError("the ball spec needs a layer that is linear in the features; an RBF head's kernel values are not bounded "
                             "(repair LH or the network's last layer, or use --spec pointwise)")
    return frozen_graph(model, lay.name, xt[:2].float())


def keep_boxes(model, lay: LastLayer, spec: RepairSpec, kx: torch.Tensor, ky: np.ndarray, FK: np.ndarray,
               input_boxes: tuple | None = None):
    """(centres, radii, certified-before mask) of the keep points: boxes where their ball is certified, the point elsewhere.

    ``model``: the model, or its graph from :func:`cnnrepair.bounds.frozen_graph`; ``input_boxes``:
    (lower, upper) of each keep point's ball in model units (default: :func:`cnnrepair.bounds.ball_box`
    of ``spec.keep_eps``, pixels in [0, 1], no normalisation)."""
    from cnnrepair.bounds import ball_box, feature_bounds

    lo, hi = ball_box(kx, spec.keep_eps) if input_boxes is None else input_boxes
    fb = feature_bounds(model, lay.name, lo, hi, spec.bounds)
    worst = MarginProblem(lay.weight, lay.bias, fb.centre, ky, 0.0, radii=fb.radius).point_margins()
    held = worst >= spec.keep_margin
    centre = np.where(held[:, None], fb.centre, FK)
    radius = np.where(held[:, None], fb.radius, 0.0)
    return centre, radius, held


def _input_boxes(spec: RepairSpec, xt: torch.Tensor, boxes) -> tuple[torch.Tensor, torch.Tensor]:
    """Each repair point's input box (given, or its ball), checked to fit the points and hold them."""
    from cnnrepair.bounds import ball_box

    lo, hi = ball_box(xt, spec.eps) if boxes is None else (torch.as_tensor(np.asarray(boxes[0])).double(), torch.as_tensor(np.asarray(boxes[1])).double())
    if lo.shape != xt.shape or hi.shape != xt.shape:
        raise CnnRepairError(f"boxes must have the repair points' shape {tuple(xt.shape)}; got {tuple(lo.shape)} and {tuple(hi.shape)}")
    if ((xt.double() < lo - 1e-6) | (xt.double() > hi + 1e-6)).any():
        raise CnnRepairError("every repair point must lie in its own box; check the boxes' order (lower, upper)")
    return lo, hi


def _feature_boxes(graph, lay: LastLayer, spec: RepairSpec, lo: torch.Tensor, hi: torch.Tensor, F: np.ndarray):
    """Sound feature bounds over each repair point's input box (FeatureBounds), checked to hold the point's own features."""
    from cnnrepair.bounds import feature_bounds

    fb = feature_bounds(graph, lay.name, lo, hi, spec.bounds)
    tol = 1e-5 * (1 + np.abs(F))
    if ((F < fb.lower - tol) | (F > fb.upper + tol)).any():
        raise CnnRepairError("the feature bounds do not contain the points' own features: the bound propagation does not support "
                             "this model soundly; report it with the model")
    return fb


def _pointwise(lay: LastLayer, spec: RepairSpec, F, ya, FK, ky, xt, kx, base, keep_before, time_limit, t0, box=None,
               keep_box=None) -> ClassifierRepair:
    K, NK = len(ya), len(ky)
    keep_centre, keep_radius = (FK, np.zeros_like(FK)) if keep_box is None else keep_box[:2]
    feats = np.vstack([F if box is None else box.centre, keep_centre])
    radii = None if box is None else np.vstack([box.radius, keep_radius])
    labels = np.concatenate([ya, ky])
    required = np.concatenate([np.full(K, spec.margin), np.full(NK, spec.keep_margin)])
    prices = np.concatenate([np.full(K, np.inf), np.full(NK, np.inf if spec.keep_price is None else spec.keep_price)])
    hard = np.isinf(prices)
    extra = np.zeros(K + NK)
    notes = []
    sol: MarginSolution | None = None
    repaired = None
    ill = None
    for _ in range(FLOAT32_ROUNDS):
        problem = MarginProblem(lay.weight, lay.bias, feats, labels, required + extra, prices, spec.norm,
                                spec.freeze_bias, spec.max_change, radii)
        remaining = None if time_limit is None else max(1e-3, time_limit - (time.perf_counter() - t0))
        sol = (solve_ball if problem.has_boxes else solve_margins)(problem, time_limit=remaining)
        if not sol.ok:
            break
        ill = _ill_conditioned(lay, spec, sol)
        if ill:
            notes.append(ill)
            break
        repaired = lay.replaced(lay.weight + sol.delta_weight, lay.bias + sol.delta_bias)
        after = robust_margins(repaired, xt, ya)  # the smallest over several batch layouts
        keep_after = robust_margins(repaired, kx, ky) if NK else np.zeros(0)
        if box is not None:  # the guarantee is the worst case over each box, with the weights as stored
            sdW, sdb = _saved_change(lay, repaired)
            worst = problem.point_margins(sdW, sdb)
            measured = np.concatenate([worst[:K], keep_after if keep_box is None else np.minimum(keep_after, worst[K:])])
        else:
            measured = np.concatenate([after, keep_after])
        short = np.flatnonzero(hard & (measured < required))
        if len(short) == 0:
            break
        # float32 rounding of the saved weights and of the forward pass left some just below: every hard
        # point asks the LP for a little more (a rounding-sized offset, doubled each time); points raised
        # alone would let their neighbours become the binding, rounded-down ones
        worst = float(np.max(required[short] - measured[short]))
        rounding = 8 * np.finfo(np.float32).eps * (np.abs(feats).sum(1) * np.abs(lay.weight).max() + np.abs(lay.bias).max())
        extra = np.where(hard, np.maximum(2 * extra, rounding + 2 * worst), 0.0)
    else:
        notes.append(f"float32 rounding kept {len(short)} point(s) below their margin after {FLOAT32_ROUNDS} re-solves")
        sol = MarginSolution("failed", sol.delta_weight, sol.delta_bias, sol.objective, sol.lower_bound, sol.seconds, sol.rounds, sol.size)
    status = {"optimal": "repaired", "infeasible": "infeasible"}.get(sol.status, "failed")
    if ill:
        status = "ill-conditioned"
    if status != "repaired":
        repaired = None
        after, keep_after = base, keep_before
    saved_dW, saved_db = (_saved_change(lay, repaired) if repaired is not None else (np.zeros_like(lay.weight), np.zeros_like(lay.bias)))
    cert = _certificate(lay, spec, status, sol, problem, saved_dW, saved_db, ya, base, after, problem.margins, ky, keep_before, keep_after)
    if box is not None:
        worst_before = problem.point_margins()[:K]
        worst_saved = problem.point_margins(saved_dW, saved_db) if status == "repaired" else None
        worst_after = worst_before if worst_saved is None else worst_saved[:K]
        for k, entry in enumerate(cert["points"]):
            entry["certified_margin_before"] = float(worst_before[k])
            entry["certified_margin_after"] = float(worst_after[k])
        if keep_box is not None:
            cert["keep"]["balls_certified_before"] = int(keep_box[2].sum())
            cert["keep"]["balls_certified_after"] = (None if worst_saved is None
                                                     else int((worst_saved[K:][keep_box[2]] >= spec.keep_margin).sum()))
        cert["ball"] = {"eps": spec.eps, "bounds": spec.bounds, "bound_seconds": box.seconds,
                        "note": "certified margins: the worst case of the logit difference over each point's feature box, "
                                "which holds every input of its ball (sound bounds; cnnrepair verify recomputes them)"}
    cert["conditioning"] = _conditioning(lay, spec, cert["change"]["linf"] if status == "repaired" else _linf(sol))
    if status == "failed" and sol.status not in ("optimal",):
        notes.append(f"the solver stopped: {sol.status}")
    return ClassifierRepair(status, repaired, lay.name, cert, sol, time.perf_counter() - t0, notes, _written(lay))


def layer_scale(weight: np.ndarray, bias: np.ndarray) -> float:
    """The layer's largest weight or bias in absolute value: what a change is compared with."""
    return float(max(np.abs(weight).max(initial=0.0), np.abs(bias).max(initial=0.0)))


def _linf(sol: MarginSolution) -> float:
    """The largest entry of a solved change, weights and biases together."""
    return float(np.abs(np.concatenate([sol.delta_weight.ravel(), sol.delta_bias.ravel()])).max(initial=0.0))


def _conditioning(lay: LastLayer, spec: RepairSpec, change_linf: float) -> dict:
    scale = layer_scale(lay.weight, lay.bias)
    return {"layer_scale": scale, "change_linf": change_linf, "ratio": change_linf / scale if scale > 0 else float("inf"),
            "max_ratio": spec.max_change_ratio}


def _ill_conditioned(lay: LastLayer, spec: RepairSpec, sol: MarginSolution) -> str | None:
    """A note when the solved change is orders of magnitude beyond the layer's own weights, else None."""
    if spec.max_change_ratio is None:
        return None
    linf = _linf(sol)
    scale = layer_scale(lay.weight, lay.bias)
    if linf <= spec.max_change_ratio * scale:
        return None
    return (f"ill-conditioned: the change's largest entry {linf:.3g} is {linf / scale if scale else float('inf'):.3g} times the layer's "
            f"largest weight ({scale:.3g}), beyond max_change_ratio {spec.max_change_ratio:g}; margins bought this way hinge on "
            "float32 noise (points with nearly equal features and different labels?), so no model is certified. Remove the "
            "conflicting points, or raise --max-change-ratio if such a change is intended")


def _written(lay: LastLayer) -> tuple[str, ...]:
    return tuple(name for name in lay.parameter_names() if name)


def _saved_change(lay: LastLayer, repaired: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """The change as stored (after rounding to the layer's dtype), float64."""
    new = last_layer_tensors(repaired, lay)
    return new[0] - lay.weight, new[1] - lay.bias


def last_layer_tensors(model: nn.Module, lay: LastLayer) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of ``lay``'s layer in another copy of the model, float64."""
    from cnnrepair.repair.layer import get_tensor

    wname, bname = lay.parameter_names()
    W = get_tensor(model, wname).detach().double().cpu().numpy()
    b = get_tensor(model, bname).detach().double().cpu().numpy() if bname else np.zeros(W.shape[0])
    return W, b


def _solver_name(problem: MarginProblem, sol: MarginSolution) -> str:
    """The module and method that solved the program, as the certificate records it."""
    if problem.has_boxes:
        return "cnnrepair.repair.ball (box LP on HiGHS, row generation)"
    if sol.size.get("method") == "interior point":
        return "cnnrepair.repair.rows_ipm (structured interior point, row generation)"
    return "cnnrepair.repair.margins (row and column generation on HiGHS)"


def _certificate(lay, spec, status, sol, problem, dW, db, ya, base, after, required, ky, keep_before, keep_after) -> dict:
    K = len(ya)
    cert = {
        "format": FORMAT,
        "model": None,
        "source_model": None,
        "layer": lay.name,
        "layer_kind": lay.kind,
        "layer_shape": list(lay.shape),
        "spec": spec.as_dict(),
        "status": status,
        "objective": float(problem.objective(dW, db)) if status == "repaired" else None,
        "lower_bound": float(sol.lower_bound) if status == "repaired" else None,
        "gap": None,
        "change": change_summary(dW, db, spec.freeze_bias),
        "points": [{"index": k, "label": int(ya[k]), "margin_before": float(base[k]), "margin_after": float(after[k]),
                    "required": float(required[k])} for k in range(K)],
        "keep": {"count": int(len(ky)), "smallest_margin_before": float(keep_before.min()) if len(ky) else None,
                 "smallest_margin_after": float(keep_after.min()) if len(ky) else None,
                 "labels_kept": int((keep_after > 0).sum()), "below_keep_margin": int((keep_after < spec.keep_margin).sum()),
                 "required": [float(r) for r in required[K:]], "labels": [int(v) for v in ky]},
        "batch_layouts": layouts_record(),
        "solver": {"name": _solver_name(problem, sol), "status": sol.status,
                   "seconds": sol.seconds, "rounds": sol.rounds, **sol.size,
                   "lp_objective": float(sol.objective) if np.isfinite(sol.objective) else None, "lp_gap": sol.gap if sol.ok else None},
        "lower_bound_witness": {key: np.asarray(val).tolist() for key, val in sol.witness.items()},
    }
    if status == "repaired" and cert["objective"] > 0:
        cert["gap"] = max(0.0, (cert["objective"] - cert["lower_bound"]) / cert["objective"])
    elif status == "repaired":
        cert["gap"] = 0.0
    if status == "infeasible":
        cert["conflicts"] = [{"index": int(k) if k < K else int(k - K), "set": "points" if k < K else "keep",
                              "label": int(problem.labels[k])} for k in (sol.conflicts if sol.conflicts is not None else [])]
        if not cert["conflicts"]:  # an empty set is no irreducible conflict: say none was isolated
            cert["solver"]["conflicts_irreducible"] = False
    return cert


def _targets(lay: LastLayer, spec: RepairSpec, F, ya, FK, ky, xt, kx, targets, base, keep_before, t0) -> ClassifierRepair:
    """The paper's program through the same front door: targets, anchors (keep points), L1 on the weights."""
    from cnnrepair.repair.targets import RepairProblem, repair

    C = lay.shape[0]
    if targets is None:
        targets = -np.ones((len(ya), C))
        targets[np.arange(len(ya)), ya] = 1.0
    targets = np.asarray(targets, np.float64)
    if targets.shape != (len(ya), C):
        raise CnnRepairError(f"targets must be {len(ya)} x {C} (one target logit per point and class), got {targets.shape}")
    X = np.vstack([F, FK])
    Y = np.vstack([targets, FK @ lay.weight.T + lay.bias])
    weights = np.concatenate([np.ones(len(F)), np.full(len(FK), spec.keep_price or 1.0)])
    result = repair(RepairProblem(lay.weight, lay.bias, X, Y, delta_weight=spec.delta_weight, max_change=spec.max_change,
                                  point_weights=weights))
    status = "repaired" if result.ok else "failed"
    repaired = lay.replaced(lay.weight + result.gamma, lay.bias) if result.ok else None
    xs_margins = robust_margins(repaired, xt, ya) if repaired is not None else base
    keep_after = robust_margins(repaired, kx, ky) if repaired is not None and len(FK) else keep_before
    cert = {
        "format": FORMAT, "model": None, "source_model": None, "layer": lay.name, "layer_kind": lay.kind,
        "layer_shape": list(lay.shape), "spec": spec.as_dict(), "status": status,
        "objective": float(result.objective) if result.ok else None, "lower_bound": None, "gap": None,
        "change": change_summary(*(_saved_change(lay, repaired) if repaired is not None else (result.gamma, np.zeros(C))), True),
        "points": [{"index": k, "label": int(ya[k]), "margin_before": float(base[k]), "margin_after": float(xs_margins[k]),
                    "required": None} for k in range(len(ya))],
        "keep": {"count": int(len(FK)), "smallest_margin_before": float(keep_before.min()) if len(FK) else None,
                 "smallest_margin_after": float(keep_after.min()) if len(FK) else None, "labels_kept": int((keep_after > 0).sum()),
                 "labels": [int(v) for v in ky]},
        "batch_layouts": layouts_record(),
        "solver": {"name": f"cnnrepair.repair.targets ({result.solver})", "status": result.status, "seconds": result.seconds},
        "note": "the targets spec (the paper's program) guarantees nothing: margins after are measured, not enforced",
    }
    return ClassifierRepair(status, repaired, lay.name, cert, result, time.perf_counter() - t0, [], _written(lay))
