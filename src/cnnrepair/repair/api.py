"""Repair the last layer of any torch classifier: one call, a repaired copy and its certificate.

    from cnnrepair import RepairSpec, repair_classifier
    result = repair_classifier(model, x, y, RepairSpec(margin=0.1), keep=x_clean)
    result.model          # a copy of ``model``; only the last linear layer differs
    result.certificate    # a Certificate: margins before/after, change, certified lower bound (to_dict(): JSON)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.ball import solve_ball
from cnnrepair.repair.certificate import Certificate, KeepClaim, PointClaim
from cnnrepair.repair.outcome import ClassifierRepair
from cnnrepair.repair.coincide import TOLERANCE, conflicting_pairs, feature_noise, shared_features
from cnnrepair.repair.float32 import change_linf, conditioning, ill_conditioned, solve_in_float32
from cnnrepair.repair.inputs import DEFAULT_TIME_LIMIT, Points, SolveOptions, as_inputs, check_labels  # noqa: F401 - DEFAULT_TIME_LIMIT re-exported
from cnnrepair.repair.layer import LastLayer, ending_layer, last_layer
from cnnrepair.repair.margins import solve_margins
from cnnrepair.repair.measure import change_summary, robust_margins
from cnnrepair.repair.outputs import OutputRows, as_rows, program_rows, rows_record
from cnnrepair.repair.program import MarginProblem, MarginSolution, box_margins
from cnnrepair.repair.spec import RepairSpec
from cnnrepair.runtime import eval_mode


# 0.1's keyword arguments of repair_classifier -> where they live now
_OLD_KEYWORDS = {"keep_x": "keep=Points(x, y) (or keep=x)", "keep_y": "keep=Points(x, y)", "keep_input_boxes": "keep=Points(x, y, boxes=...)",
                 "boxes": "Points(x, y, boxes=...) as the points", "targets": "Points(x, y, targets=...) as the points",
                 "time_limit": "options=SolveOptions(time_limit=...)", "threads": "options=SolveOptions(threads=...)"}


@dataclass
class _Work:
    """One repair's data once prepared: the layer, the spec, each point's features, label and margin before."""

    lay: LastLayer
    spec: RepairSpec
    xt: torch.Tensor
    F: np.ndarray
    ya: np.ndarray
    kx: torch.Tensor | None
    FK: np.ndarray
    ky: np.ndarray
    base: np.ndarray
    keep_before: np.ndarray
    options: SolveOptions
    t0: float
    rows: OutputRows | None = None  # the repair points' own output rows (as measured on the model's output), if any
    keep_rows: OutputRows | None = None  # the keep points' own output rows, if any

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


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



def repair_classifier(model: nn.Module, x, y=None, spec: RepairSpec | None = None, *, keep=None, layer: str | None = None,
                      options: SolveOptions | None = None, **old) -> ClassifierRepair:
    """Repair the linear layer that ends ``model`` so that inputs ``x`` get labels ``y``.

    ``x`` and ``y`` are the repair points (or ``x`` is a :class:`Points`, with input boxes for the
    ``ball`` spec or target logits for the ``targets`` spec). ``keep`` are inputs whose label must
    survive: a :class:`Points`, a pair ``(x, y)``, or inputs alone (each keeps the model's current
    prediction). ``layer`` names the layer (default: the ``nn.Linear``, SVM head or ``aten.linear``
    whose output is the model's output). ``options`` (:class:`SolveOptions`) caps the solve's time
    (default :data:`cnnrepair.repair.inputs.DEFAULT_TIME_LIMIT` seconds) and BLAS/OpenMP threads.

    With the ``pointwise`` spec every repair point's margin is checked on the returned model as it
    runs (float32 included), in several batch layouts: points that rounding left short are
    re-solved with a slightly higher margin, recorded in the certificate as ``required``. Points
    whose features coincide within the float32 noise of computing them but whose labels differ are
    reported as conflicts before any solve; a change far beyond the layer's own weights
    (``spec.max_change_ratio``) is reported as ill-conditioned, never certified. With the ``ball``
    spec, a point's input box defaults to :func:`cnnrepair.bounds.ball_box` of ``spec.eps`` (pixels
    in [0, 1]; a box of zero width is a pointwise point), a keep point's to that of ``spec.keep_eps``
    (keep points given with boxes keep those, whatever ``spec.keep_eps`` says).
    ``model`` is not changed (its train/eval modes included). The keyword arguments of 0.1
    (``keep_x``, ``keep_y``, ``boxes``, ``keep_input_boxes``, ``targets``, ``time_limit``,
    ``threads``) still work for one release, with a DeprecationWarning.
    """
    if not isinstance(model, nn.Module):
        raise CnnRepairError(f"model must be a torch.nn.Module (got {type(model).__name__}); "
                             "read a model file with cnnrepair.load_model(path).module")
    if spec is not None and not isinstance(spec, RepairSpec):
        hint = "RepairSpec(**spec)" if isinstance(spec, dict) else "RepairSpec(margin=0.1)"
        raise CnnRepairError(f"spec must be a cnnrepair.RepairSpec (got {type(spec).__name__}); pass e.g. {hint}")
    points, keep, options = _gather(x, y, keep, options, old)
    modes = [(m, m.training) for m in model.modules()]
    try:
        return _repair(model, points, spec or RepairSpec(), keep, layer, options)
    finally:
        for m, mode in modes:  # the caller's model keeps its modes (finding the layer runs it in eval mode)
            m.training = mode


def _gather(x, y, keep, options, old: dict) -> tuple[Points, Points | None, SolveOptions]:
    """The call's points, keep points and options, with 0.1's keyword arguments mapped (and warned about)."""
    unknown = sorted(set(old) - set(_OLD_KEYWORDS))
    if unknown:
        raise TypeError(f"repair_classifier() got an unexpected keyword argument {unknown[0]!r}")
    for name in old:
        warnings.warn(f"repair_classifier({name}=...) is deprecated: pass {_OLD_KEYWORDS[name]}", DeprecationWarning, stacklevel=3)
    if options is not None and not isinstance(options, SolveOptions):
        raise CnnRepairError(f"options must be a cnnrepair.SolveOptions (got {type(options).__name__})")
    if "time_limit" in old or "threads" in old:
        base = options or SolveOptions()
        options = replace(base, time_limit=old.get("time_limit", base.time_limit), threads=old.get("threads", base.threads))
    if isinstance(x, Points):
        if y is not None:
            raise CnnRepairError("give the labels in Points(x, y) or as y, not both")
        points = x
    else:
        points = Points(x, y)
    if "boxes" in old or "targets" in old:
        points = replace(points, boxes=old.get("boxes", points.boxes), targets=old.get("targets", points.targets))
    if points.y is None:
        raise CnnRepairError("repair points need labels: repair_classifier(model, x, y) or Points(x, y)")
    if keep is not None and ("keep_x" in old or "keep_y" in old):
        raise CnnRepairError("give the keep points once: keep=Points(x, y)")
    if "keep_x" in old:
        keep = None if old["keep_x"] is None else Points(old["keep_x"], old.get("keep_y"), old.get("keep_input_boxes"))
    else:
        keep = Points.of(keep)
        if keep is not None and "keep_input_boxes" in old:
            keep = replace(keep, boxes=old["keep_input_boxes"])
    if keep is not None and keep.targets is not None:
        raise CnnRepairError("keep points take no targets: they keep the model's own logits under the targets spec")
    return points, keep, options or SolveOptions()


def _repair(model: nn.Module, points: Points, spec: RepairSpec, keep: Points | None, layer: str | None,
            options: SolveOptions) -> ClassifierRepair:
    from threadpoolctl import threadpool_limits

    from cnnrepair.repair.targets import default_threads

    t0 = time.perf_counter()
    eval_mode(model)  # the caller's modes are restored by repair_classifier
    dtype = input_dtype(model, points.x)
    xt, ya = as_inputs(points.x, points.y, "repair points", None, None, dtype)
    if len(xt) == 0:
        raise CnnRepairError("no repair points given; pass at least one input and label")
    if layer is not None and layer != ending_layer(model, xt):
        from cnnrepair.repair.hidden_api import repair_hidden

        if points.rows is not None or (keep is not None and keep.rows is not None):
            raise CnnRepairError("points with their own output rows are repaired in the layer that ends the model; drop --layer")
        return repair_hidden(model, xt, ya, keep, spec, layer, options)
    if spec.later_biases:
        raise CnnRepairError("later biases move only in a repair of a layer inside the network; name one with --layer (`cnnrepair layers MODEL` lists them)")
    lay = last_layer(model, xt, layer)
    C = lay.shape[0]
    check_labels(ya, C, "repair points")
    rows = _point_rows(points.rows, len(ya), C, lay.ending, spec)
    kx, ky = (None, None)
    if keep is not None:
        kx, ky = as_inputs(keep.x, keep.y, "keep points", C, tuple(xt.shape[1:]), dtype)
    keep_rows = None if keep is None else _point_rows(keep.rows, len(kx), C, lay.ending, spec)
    F, FK = shared_features(lay, xt, kx)  # one feature vector per distinct input, wherever it appears
    base = robust_margins(model, xt, ya, lay.ending, rows)
    if kx is not None and len(kx):
        logits_k = FK @ lay.weight.T + lay.bias
        ky = logits_k.argmax(1) if ky is None else ky
        keep_before = robust_margins(model, kx, ky, lay.ending, keep_rows)
    else:
        FK, ky, keep_before, keep_rows = np.zeros((0, F.shape[1])), np.zeros(0, np.int64), np.zeros(0), None
    if spec.freeze_bias is False and not lay.has_bias:
        spec = replace(spec, freeze_bias=True)
    work = _Work(lay, spec, xt, F, ya, kx, FK, ky, base, keep_before, options, t0, rows, keep_rows)
    with threadpool_limits(limits=options.threads or default_threads()):
        if spec.kind == "targets":
            if lay.ending != "none":
                raise CnnRepairError(f"the targets spec fits the layer's logits, but a {lay.ending} follows layer {lay.name!r}; "
                                     "use --spec pointwise (its margins hold through the model's ending)")
            return _targets(work, points.targets)
        eps = float(torch.finfo(dtype).eps) if dtype is not None else float(np.finfo(np.float32).eps)
        noise = feature_noise(lay, xt, F, eps)
        clash = _coinciding(work, noise) if rows is None and keep_rows is None else None  # (labels say nothing of whom rows separate)
        if clash is not None:
            return clash
        box = keep_box = None
        if spec.kind == "ball":
            lo, hi = _input_boxes(spec, xt, points.boxes)
            graph = _frozen(model, lay, xt)  # traced once for the repair points' and the keep points' balls
            box = _feature_boxes(graph, lay, spec, lo, hi, F)
            given = keep is not None and keep.boxes is not None  # keep boxes given are kept whatever spec.keep_eps says
            keep_box = (keep_boxes(graph, lay, spec, kx, ky, FK, keep.boxes if given else None, keep_rows)
                        if (spec.keep_eps > 0 or given) and len(ky) else None)
        result = _pointwise(work, box, keep_box)
        result.certificate.feature_noise = {"linf": noise, "tolerance": TOLERANCE * noise,
                                            "note": "largest difference between an input's features computed in a batch and alone "
                                                    "(measured on a sample, floored at float32 rounding); points closer than the "
                                                    "tolerance count as one point"}
        return result


def _point_rows(value, n: int, classes: int, ending: str, spec: RepairSpec) -> OutputRows | None:
    """The repair points' output rows (None: their labels'), checked against the layer, its ending and the spec."""
    rows = as_rows(value, n, classes)
    if rows is None:
        return None
    if spec.kind == "targets":
        raise CnnRepairError("output rows are margins the pointwise or ball spec enforces; the targets spec fits logits (drop it)")
    if ending != "none" and not rows.pairwise():
        raise CnnRepairError(f"a {ending} follows the repaired layer: only rows 'Y_label > Y_j' keep their meaning through it; "
                             "general linear output rows need a model whose last linear layer gives its output")
    return rows


def _coinciding(w: _Work, noise: float) -> ClassifierRepair | None:
    """An infeasible repair naming the hard points whose features coincide (within the noise) but whose labels differ, or None."""
    lay, spec, ya, ky = w.lay, w.spec, w.ya, w.ky
    K = len(ya)
    labels = np.concatenate([ya, ky])
    hard = np.concatenate([np.ones(K, bool), np.full(len(ky), spec.keep_price is None)])
    feats = np.vstack([w.F, w.FK])
    pairs = conflicting_pairs(feats, labels, hard, TOLERANCE * noise)
    if not pairs:
        return None
    where = (lambda k: {"set": "points" if k < K else "keep", "index": int(k if k < K else k - K), "label": int(labels[k])})
    members = list(pairs[0][:2])  # one pair is an irreducible conflict; every pair is listed under "coinciding"
    problem = MarginProblem(lay.weight, lay.bias, feats, labels, 0.0, zero_rival=lay.zero_rival)
    sol = MarginSolution("infeasible", np.zeros_like(lay.weight), np.zeros_like(lay.bias), float("nan"), float("nan"),
                         w.elapsed(), conflicts=np.asarray(members, np.int64))
    required = np.concatenate([np.full(K, spec.margin), np.full(len(ky), spec.keep_margin)])
    cert = _certificate(w, "infeasible", sol, problem, required)
    cert.coinciding = [{"a": where(i), "b": where(j), "linf_distance": d} for i, j, d in pairs[:100]]
    cert.feature_noise = {"linf": noise, "tolerance": TOLERANCE * noise}
    cert.solver.update(name="cnnrepair.repair.coincide (found before solving)", conflicts_irreducible=True)
    note = (f"{len(pairs)} pair(s) of points have features equal within float32 noise ({TOLERANCE * noise:.2g}) but different labels "
            f"(first: {where(pairs[0][0])['set']}[{where(pairs[0][0])['index']}] and {where(pairs[0][1])['set']}"
            f"[{where(pairs[0][1])['index']}]); no change of this layer can separate them")
    return ClassifierRepair("infeasible", None, lay.name, cert, sol, w.elapsed(), [note], _written(lay))


def _frozen(model: nn.Module, lay: LastLayer, xt: torch.Tensor):
    """The graph the bounds walk: the model up to ``lay``'s input (refused for an RBF head)."""
    from cnnrepair.bounds import frozen_graph

    if lay.kind == "svm-rbf":
        raise CnnRepairError("the ball spec needs a layer that is linear in the features; an RBF head's kernel values are not bounded "
                             "(repair LH or the network's last layer, or use --spec pointwise)")
    return frozen_graph(model, lay.name, xt[:2].float())


def keep_boxes(model, lay: LastLayer, spec: RepairSpec, kx: torch.Tensor, ky: np.ndarray, FK: np.ndarray,
               input_boxes: tuple | None = None, rows: OutputRows | None = None):
    """(centres, radii, certified-before mask) of the keep points: boxes where their ball is certified, the point elsewhere.

    ``model``: the model, or its graph from :func:`cnnrepair.bounds.frozen_graph`; ``input_boxes``:
    (lower, upper) of each keep point's ball in model units (default: :func:`cnnrepair.bounds.ball_box`
    of ``spec.keep_eps``, pixels in [0, 1], no normalisation); ``rows``: the keep points' own output rows (None: labels)."""
    from cnnrepair.bounds import ball_box, feature_bounds

    lo, hi = ball_box(kx, spec.keep_eps) if input_boxes is None else input_boxes
    fb = feature_bounds(model, lay.name, lo, hi, spec.bounds)
    worst = box_margins(lay.weight, lay.bias, fb.centre, fb.radius, ky, lay.zero_rival, rows)
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


def _pointwise(w: _Work, box=None, keep_box=None) -> ClassifierRepair:
    lay, spec, ya, ky = w.lay, w.spec, w.ya, w.ky
    K, NK = len(ya), len(ky)
    keep_centre, keep_radius = (w.FK, np.zeros_like(w.FK)) if keep_box is None else keep_box[:2]
    feats = np.vstack([w.F if box is None else box.centre, keep_centre])
    radii = None if box is None else np.vstack([box.radius, keep_radius])
    labels = np.concatenate([ya, ky])
    rows = program_rows([(w.rows, ya), (w.keep_rows, ky)], lay.shape[0], lay.zero_rival)
    required = np.concatenate([np.full(K, spec.margin), np.full(NK, spec.keep_margin)])
    prices = np.concatenate([np.full(K, np.inf), np.full(NK, np.inf if spec.keep_price is None else spec.keep_price)])
    hard = np.isinf(prices)
    last: list[MarginProblem] = []

    previous: list[MarginSolution] = []

    def solve(req: np.ndarray) -> MarginSolution:
        last[:] = [MarginProblem(lay.weight, lay.bias, feats, labels, req, prices, spec.norm, spec.freeze_bias, spec.max_change, radii,
                                 lay.zero_rival and rows is None, rows)]
        remaining = max(1e-3, w.options.seconds - w.elapsed())
        if last[0].has_boxes or last[0].rows is not None:  # (output rows of any direction: the box program, boxes of zero width)
            return solve_ball(last[0], time_limit=remaining)
        sol = solve_margins(last[0], time_limit=remaining, start=previous[0] if previous else None,  # a re-solve starts from the rows that bound
                            progress=w.options.progress, device=w.options.solver_device)
        previous[:] = [sol] if sol.ok else []
        return sol

    def measure(sol: MarginSolution):
        repaired = lay.replaced(lay.weight + sol.delta_weight, lay.bias + sol.delta_bias)
        after = robust_margins(repaired, w.xt, ya, lay.ending, w.rows)  # the smallest over several batch layouts
        keep_after = robust_margins(repaired, w.kx, ky, lay.ending, w.keep_rows) if NK else np.zeros(0)
        if box is None:
            return repaired, np.concatenate([after, keep_after]), (after, keep_after)
        worst = last[0].point_margins(*_saved_change(lay, repaired))  # the guarantee: the worst case over each box, as stored
        measured = np.concatenate([worst[:K], keep_after if keep_box is None else np.minimum(keep_after, worst[K:])])
        return repaired, measured, (after, keep_after)

    rounding = 8 * np.finfo(np.float32).eps * (np.abs(feats).sum(1) * np.abs(lay.weight).max() + np.abs(lay.bias).max())
    out = solve_in_float32(solve, lambda sol: ill_conditioned(lay.weight, lay.bias, spec, sol), measure, required, hard, rounding)
    status, sol, repaired, notes, problem = out.status, out.sol, out.repaired, out.notes, last[0]
    after, keep_after = out.measured if out.measured is not None else (w.base, w.keep_before)
    saved_dW, saved_db = (_saved_change(lay, repaired) if repaired is not None else (np.zeros_like(lay.weight), np.zeros_like(lay.bias)))
    cert = _certificate(w, status, sol, problem, problem.margins, (saved_dW, saved_db), (after, keep_after))
    if box is not None:
        worst_before = problem.point_margins()[:K]
        worst_saved = problem.point_margins(saved_dW, saved_db) if status == "repaired" else None
        worst_after = worst_before if worst_saved is None else worst_saved[:K]
        for k, entry in enumerate(cert.points):
            entry.certified_margin_before = float(worst_before[k])
            entry.certified_margin_after = float(worst_after[k])
        if keep_box is not None:
            cert.keep.balls_certified_before = int(keep_box[2].sum())
            cert.keep.balls_certified_after = (None if worst_saved is None
                                               else int((worst_saved[K:][keep_box[2]] >= spec.keep_margin).sum()))
        cert.ball = {"eps": spec.eps, "bounds": spec.bounds, "bound_seconds": box.seconds,
                     "note": "certified margins: the worst case of the logit difference over each point's feature box, "
                             "which holds every input of its ball (sound bounds; cnnrepair verify recomputes them)"}
    cert.conditioning = conditioning(lay.weight, lay.bias, spec, cert.change["linf"] if status == "repaired" else change_linf(sol))
    if status == "failed" and sol.status not in ("optimal",):
        notes.append(f"the solver stopped: {sol.status}")
    return ClassifierRepair(status, repaired, lay.name, cert, sol, w.elapsed(), notes, _written(lay))


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
    if problem.has_boxes or problem.rows is not None:
        return "cnnrepair.repair.ball (box LP on HiGHS, row generation)"
    if sol.size.get("method") == "interior point":
        return "cnnrepair.repair.rows_ipm (structured interior point, row generation)"
    return "cnnrepair.repair.margins (row and column generation on HiGHS)"


def _keep_claim(w: _Work, keep_after: np.ndarray, required: np.ndarray | None) -> KeepClaim:
    NK = len(w.ky)
    return KeepClaim(count=int(NK), smallest_margin_before=float(w.keep_before.min()) if NK else None,
                     smallest_margin_after=float(keep_after.min()) if NK else None, labels_kept=int((keep_after > 0).sum()),
                     below_keep_margin=None if required is None else int((keep_after < w.spec.keep_margin).sum()),
                     required=None if required is None else [float(r) for r in required], labels=[int(v) for v in w.ky])


def _certificate(w: _Work, status: str, sol: MarginSolution, problem: MarginProblem, required: np.ndarray,
                 change: tuple[np.ndarray, np.ndarray] | None = None, after: tuple[np.ndarray, np.ndarray] | None = None) -> Certificate:
    """The certificate of a margin program's outcome: ``change`` (dW, db) as saved (default none), margins ``after``
    (repair points, keep points; default: as before)."""
    lay, spec, ya = w.lay, w.spec, w.ya
    K = len(ya)
    dW, db = change if change is not None else (np.zeros_like(lay.weight), np.zeros_like(lay.bias))
    margins, keep_after = after if after is not None else (w.base, w.keep_before)
    repaired = status == "repaired"
    objective = float(problem.objective(dW, db)) if repaired else None
    lower = float(sol.lower_bound) if repaired else None
    gap = (max(0.0, (objective - lower) / objective) if objective > 0 else 0.0) if repaired else None
    cert = Certificate(
        layer=lay.name, layer_kind=lay.kind, layer_shape=list(lay.shape), spec=spec.as_dict(), status=status,
        objective=objective, lower_bound=lower, gap=gap, change=change_summary(dW, db, spec.freeze_bias),
        points=[PointClaim(index=k, label=int(ya[k]), margin_before=float(w.base[k]), margin_after=float(margins[k]),
                           required=float(required[k])) for k in range(K)],
        keep=_keep_claim(w, keep_after, required[K:]),
        solver={"name": _solver_name(problem, sol), "status": sol.status, "seconds": sol.seconds, "rounds": sol.rounds, **sol.size,
                "lp_objective": float(sol.objective) if np.isfinite(sol.objective) else None, "lp_gap": sol.gap if sol.ok else None},
        lower_bound_witness={key: np.asarray(val).tolist() for key, val in sol.witness.items()}, ending=lay.ending_record())
    cert.output_rows = rows_record(w.rows, w.keep_rows)
    if status == "infeasible":
        cert.conflicts = [{"index": int(k) if k < K else int(k - K), "set": "points" if k < K else "keep",
                           "label": int(problem.labels[k])} for k in (sol.conflicts if sol.conflicts is not None else [])]
        if not cert.conflicts:  # an empty set is no irreducible conflict: say none was isolated
            cert.solver["conflicts_irreducible"] = False
    return cert


def _targets(w: _Work, targets) -> ClassifierRepair:
    """The paper's program through the same front door: targets, anchors (keep points), L1 on the weights."""
    from cnnrepair.repair.targets import RepairProblem, repair

    lay, spec, ya, ky, F, FK = w.lay, w.spec, w.ya, w.ky, w.F, w.FK
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
    xs_margins = robust_margins(repaired, w.xt, ya) if repaired is not None else w.base
    keep_after = robust_margins(repaired, w.kx, ky) if repaired is not None and len(FK) else w.keep_before
    change = _saved_change(lay, repaired) if repaired is not None else (result.gamma, np.zeros(C))
    cert = Certificate(
        layer=lay.name, layer_kind=lay.kind, layer_shape=list(lay.shape), spec=spec.as_dict(), status=status,
        objective=float(result.objective) if result.ok else None, change=change_summary(*change, True),
        points=[PointClaim(index=k, label=int(ya[k]), margin_before=float(w.base[k]), margin_after=float(xs_margins[k]),
                           required=None) for k in range(len(ya))],
        keep=_keep_claim(w, keep_after, None),
        solver={"name": f"cnnrepair.repair.targets ({result.solver})", "status": result.status, "seconds": result.seconds},
        note="the targets spec (the paper's program) guarantees nothing: margins after are measured, not enforced")
    return ClassifierRepair(status, repaired, lay.name, cert, result, w.elapsed(), [], _written(lay))
