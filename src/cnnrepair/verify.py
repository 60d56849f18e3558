"""``cnnrepair verify``: re-check every claim of a certificate from the files, trusting none of it.

What is recomputed (any difference is a problem, so an edited claim fails):

* always: the certificate's shape (:func:`cnnrepair.repair.certificate.check_schema`); the repaired
  model's, the points file's and the keep file's sha256; that the named layer exists in the
  repaired model with the recorded kind and shape; each point's index and label against the points
  file; each margin after the repair on the saved file in its own runtime, in every batch layout of
  :data:`cnnrepair.repair.measure.LAYOUTS` (the smallest counts), against the claims and against
  the spec's margin (and the keep points' against the keep margin); the per-layout smallest margins;
  the keep points' count, labels, smallest margin, labels kept and points below the keep margin;
  the gap from the objective and the lower bound; the consistency of claims with the spec (a
  ``targets`` certificate claims no margin, bound or gap; every required margin is at least the
  spec's); for the ball spec, every point's certified margin from freshly computed bounds.
* with ``--original``: the source model's sha256; that no tensor but the layer's (and the later
  biases a hidden-layer certificate lists) changed; the whole ``change`` block (and ``later_biases``),
  the objective, the bias freeze and ``max_change``; the lower bound from the stored multipliers (weak
  duality; not for a layer inside the network); every margin before the repair; the conditioning
  record; for a layer inside the network, the activation patterns after it at every repair point and
  listed keep point; for balls, the certified margins before and the keep balls certified before and
  after.

Not checked (informational; docs/trust.md lists them): file *names*, the ``solver`` block (name,
status, seconds, rounds, sizes), ``notes``, ``feature_noise`` and ``ball.bound_seconds``. Without
``--original`` the claims that need the original model are listed as not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import load_model
from cnnrepair.io import sha256
from cnnrepair.bounds import BallInputs
from cnnrepair.modelrepair import PointsFile, load_points, saved_logits_fn
from cnnrepair.repair import RepairSpec, last_layer
from cnnrepair.repair.float32 import layer_scale
from cnnrepair.repair.certificate import Certificate, below_margin, claims_off, witness_bound
from cnnrepair.repair.measure import change_norms, change_summary, layout_margins, module_logits_fn
from cnnrepair.repair.coincide import shared_features
from cnnrepair.repair.ending import ending_record
from cnnrepair.repair.outputs import OutputRows, program_rows, rows_record
from cnnrepair.repair.program import GAP, MarginProblem, box_margins, change_cost

RTOL = 1e-5  # relative tolerance for re-measured margins (float32 outputs)
NEEDS_ORIGINAL = ("source model hash", "only the layer changed", "change block", "objective", "lower bound", "margins before",
                  "conditioning")


@dataclass
class Verification:
    """What ``verify`` found: ``problems`` (empty: every checked claim holds), what it checked, what it could not."""

    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)

    @property
    def holds(self) -> bool:
        return not self.problems


def _close(claimed, measured, rtol: float = RTOL) -> bool:
    if claimed is None or measured is None:
        return claimed is None and measured is None
    return abs(float(claimed) - float(measured)) <= rtol * (1 + abs(float(measured)))


def _file(path: Path | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise CnnRepairError(f"{path}: no such {what}")
    return path


def verify_certificate(cert_path: Path, model_path: Path, points_path: Path, keep_path: Path | None = None,
                       original_path: Path | None = None, factory: str | None = None, *, properties=()) -> Verification:
    """Re-check a certificate against the repaired model file, the points (and keep points) and, with
    ``original_path``, the source model; ``properties``: the VNN-LIB files a property repair's certificate names (their
    boxes and labels are checked against the points and keep files). Malformed input raises CnnRepairError (one line)."""
    cert_path, model_path, points_path = _file(cert_path, "certificate"), _file(model_path, "model file"), _file(points_path, "points file")
    keep_path, original_path = _file(keep_path, "keep file"), _file(original_path, "original model file")
    cert = Certificate.read(cert_path)  # its shape checked first: a malformed field is a one-line error
    v = Verification()
    if cert.status != "repaired":
        v.problems.append(f"the certificate's status is {cert.status!r}: it certifies no repaired model")
        return v
    spec_d = cert.spec
    names = {f.name for f in fields(RepairSpec)}
    spec = RepairSpec(**{k: spec_d[k] for k in names if k in spec_d})  # validates the recorded spec
    if spec_d.get("keep") != ("soft" if spec.keep_price is not None else "hard"):
        v.problems.append(f"spec.keep is {spec_d.get('keep')!r} but keep_price {spec.keep_price!r} makes keep points "
                          f"{'soft' if spec.keep_price is not None else 'hard'}")
    _hashes(v, cert, model_path, points_path, keep_path, original_path)
    points = load_points(points_path, "points file")
    shape = tuple(points.x.shape[1:])
    model = load_model(model_path, factory, shape).module
    keep = load_points(keep_path, "keep file", labels_required=False) if keep_path is not None else None
    lay1 = _layer(v, cert, model, points)
    if lay1 is None:
        return v
    _points(v, cert, points)
    _output_rows(v, cert, points, keep)
    _properties(v, cert, [_file(p, "VNN-LIB file") for p in properties], points, keep)
    _margins_after(v, cert, spec, model_path, model, points, keep)
    _consistency(v, cert, spec)
    fb = None
    if spec.kind == "ball" and len(points.x) == len(cert.points):
        fb = _ball_bounds(cert, model, points)  # the frozen part is the original's (checked with --original)
        v.problems += _check_ball(cert, lay1, fb, points.rows)
        v.checked.append("certified ball margins (recomputed bounds)")
    if original_path is not None:
        original = load_model(original_path, factory, shape).module
        _against_original(v, cert, spec, original, (model, lay1), points, keep, fb)
    else:
        v.unchecked += [f"{what} (needs --original)" for what in NEEDS_ORIGINAL]
    v.unchecked += ["file names", "solver block", "notes", "feature_noise"] + (["ball.bound_seconds"] if spec.kind == "ball" else [])
    return v


def _hashes(v: Verification, cert: Certificate, model_path: Path, points_path: Path, keep_path, original_path) -> None:
    if cert.model.sha256 != sha256(model_path):
        v.problems.append(f"{model_path}: sha256 differs from the certificate's model (the file was altered or is another model)")
    if cert.points_file.sha256 != sha256(points_path):
        v.problems.append(f"{points_path}: sha256 differs from the points the certificate was made on")
    keep_cert = cert.keep_file
    if keep_path is not None:
        if keep_cert is None:
            v.problems.append(f"{keep_path}: the certificate was made without keep points, but a keep file was given")
        elif keep_cert.sha256 != sha256(keep_path):
            v.problems.append(f"{keep_path}: sha256 differs from the keep points the certificate was made on")
    elif cert.keep.count:
        v.problems.append(f"the certificate covers {cert.keep.count} keep points: pass them with --keep")
    if original_path is not None and cert.source_model.sha256 != sha256(original_path):
        v.problems.append(f"{original_path}: sha256 differs from the certificate's source model")
    v.checked.append("file hashes")


def _hidden(cert: Certificate) -> bool:
    """A repair of a layer inside the network (the pattern-preserving program)?"""
    return cert.layer_kind.startswith("hidden-")


def _find_layer(cert: Certificate, model: torch.nn.Module, sample: torch.Tensor):
    if _hidden(cert):
        from cnnrepair.repair.suffix import layer_ref

        return layer_ref(model, sample, cert.layer)
    return last_layer(model, sample, cert.layer)


def _layer(v: Verification, cert: Certificate, model: torch.nn.Module, points: PointsFile):
    try:
        lay = _find_layer(cert, model, points.x[:2])
    except CnnRepairError as exc:
        v.problems.append(f"layer {cert.layer!r}: {exc}")
        return None
    if lay.kind != cert.layer_kind or list(lay.shape) != list(cert.layer_shape):
        v.problems.append(f"layer {cert.layer!r} is a {lay.kind} layer of shape {list(lay.shape)}, the certificate says "
                          f"{cert.layer_kind} of shape {cert.layer_shape}")
    found = _ending_of(cert, model, points.x[:2], lay)
    if found != cert.ending_name:
        v.problems.append(f"the model applies {found!r} after its logits, the certificate says {cert.ending_name!r}")
    elif cert.ending is not None and cert.ending != ending_record(found):
        v.problems.append(f"the ending's note is not this version's note for {found!r}")
    v.checked.append("layer, and what follows it")
    return lay


def _ending_of(cert: Certificate, model: torch.nn.Module, sample: torch.Tensor, lay) -> str:
    """What ends the model after its logits: found by the last layer's probe, or, for a layer inside the network, where the
    network after it stops (:func:`cnnrepair.repair.suffix.suffix_ending`)."""
    if _hidden(cert):
        from cnnrepair.repair.suffix import suffix_ending

        return suffix_ending(model, cert.layer, sample)
    return lay.ending


def _points(v: Verification, cert: Certificate, points: PointsFile) -> None:
    entries = cert.points
    if len(entries) != len(points.x):
        v.problems.append(f"the certificate lists {len(entries)} repair points but the points file holds {len(points.x)}")
        return
    bad_index = [k for k, p in enumerate(entries) if p.index != k]
    if bad_index:
        v.problems.append(f"{len(bad_index)} repair point(s) carry another index than their position (point {bad_index[0]})")
    labels = np.array([p.label for p in entries], np.int64)
    off = np.flatnonzero(labels != points.y)
    if len(off):
        k = int(off[0])
        v.problems.append(f"{len(off)} repair point label(s) differ from the points file (point {k}: certificate {labels[k]}, "
                          f"file {points.y[k]})")
    v.checked.append("point labels")


def _properties(v: Verification, cert: Certificate, paths: list[Path], points: PointsFile, keep: PointsFile | None) -> None:
    """The VNN-LIB files a certificate names: each box and label recomputed from its file (needs the files)."""
    if not cert.properties:
        if paths:
            v.problems.append("VNN-LIB files were given, but the certificate names none (it was not made from properties)")
        return
    if not paths:
        v.unchecked.append(f"the {len(cert.properties)} VNN-LIB files' boxes and labels (needs --vnnlib)")
        return
    from cnnrepair.vnnlib.repair import check_property_files

    problems, checked = check_property_files(cert, paths, points, keep)
    v.problems += problems
    v.checked += checked


def _output_rows(v: Verification, cert: Certificate, points: PointsFile, keep: PointsFile | None) -> None:
    """The points and keep files' output rows are the ones the certificate's margins are over (or none has any)."""
    got = rows_record(points.rows, None if keep is None else keep.rows)
    claimed = cert.output_rows
    if (got is None) != (claimed is None):
        v.problems.append("the certificate's margins are over output rows, but neither file holds any" if got is None
                          else "the points or keep file holds output rows ('rows_coef', 'rows_offset'), but the certificate's margins "
                               "are labels'")
        return
    if got is None:
        return
    for key in ("repair_points", "keep_points"):
        if got.get(key) != claimed.get(key):
            v.problems.append(f"output_rows.{key} is {claimed.get(key)}, the files hold {got.get(key)}")
    v.checked.append("output rows (the points and keep files', counted)")


def _margins_after(v: Verification, cert: Certificate, spec: RepairSpec, model_path: Path, model, points: PointsFile, keep: PointsFile | None) -> None:
    fn = saved_logits_fn(model_path, model)
    by_layout = layout_margins(fn, points.x, points.y, cert.ending_name, points.rows)
    after = by_layout.min(0)
    v.problems += cert.check_claims(after, np.zeros(0) if keep is None else _keep_margins(v, cert, spec, fn, keep))
    claimed_layouts = cert.margins_by_layout
    if claimed_layouts is not None:
        measured = [float(row.min()) for row in by_layout] if len(after) else []
        if len(claimed_layouts) != len(measured) or not all(_close(c, m) for c, m in zip(claimed_layouts, measured)):
            v.problems.append(f"the smallest margins per batch layout are {measured}, the certificate says {claimed_layouts}")
    v.checked.append("margins after, on the saved file in its own runtime, in every batch layout")


def _keep_margins(v: Verification, cert: Certificate, spec: RepairSpec, fn, keep: PointsFile) -> np.ndarray:
    block = cert.keep
    labels = np.asarray(block.labels, np.int64)
    if len(keep.x) != block.count or len(labels) != len(keep.x):
        v.problems.append(f"the keep file holds {len(keep.x)} inputs, the certificate lists {block.count} keep points and "
                          f"{len(labels)} keep labels")
        return np.full(block.count, np.inf)
    if keep.y is not None and not np.array_equal(keep.y, labels):
        k = int(np.flatnonzero(keep.y != labels)[0])
        v.problems.append(f"keep label(s) differ from the keep file (keep point {k}: certificate {labels[k]}, file {keep.y[k]})")
    km = layout_margins(fn, keep.x, labels, cert.ending_name, keep.rows).min(0) if len(labels) else np.zeros(0)
    if len(km):
        if not _close(block.smallest_margin_after, float(km.min())):
            v.problems.append(f"the keep points' smallest margin is {km.min():.6g}, the certificate says {block.smallest_margin_after}")
        if block.labels_kept != int((km > 0).sum()):
            v.problems.append(f"{int((km > 0).sum())} keep points keep their label, the certificate says {block.labels_kept}")
        if block.below_keep_margin is not None and block.below_keep_margin != int((km < spec.keep_margin).sum()):
            v.problems.append(f"{int((km < spec.keep_margin).sum())} keep points lie below the keep margin, the certificate says "
                              f"{block.below_keep_margin}")
    v.checked.append("keep points")
    return km


def _consistency(v: Verification, cert: Certificate, spec: RepairSpec) -> None:
    """Claims that must agree with each other and with the spec."""
    if spec.kind == "targets":
        extra = [k for k in ("lower_bound", "gap") if getattr(cert, k) is not None]
        extra += ["required margins"] if any(p.required is not None for p in cert.points) else []
        extra += ["lower_bound_witness"] if cert.lower_bound_witness else []
        if extra:
            v.problems.append(f"a targets certificate guarantees no margin, yet claims {', '.join(extra)} (edited spec?)")
        v.checked.append("claims consistent with the targets spec (which guarantees nothing)")
        return
    required = np.array([p.required for p in cert.points], np.float64)
    v.problems += below_margin(required, spec.margin * (1 - 1e-12), "required margin(s) below the spec's margin {m:g}", "point {k}: {v:.6g}")
    keep_required = np.asarray(cert.keep.required or [], np.float64)
    if len(keep_required) != cert.keep.count:
        v.problems.append(f"the certificate lists {len(keep_required)} keep requirements for {cert.keep.count} keep points")
    elif spec.keep_price is None:
        v.problems += below_margin(keep_required, spec.keep_margin * (1 - 1e-12), "keep requirement(s) below the keep margin {m:g}",
                                   "keep point {k}: {v:.6g}")
    if spec.kind == "ball":
        for key in ("eps", "bounds"):
            if cert.ball.get(key) != getattr(spec, key):
                v.problems.append(f"ball.{key} is {cert.ball.get(key)!r}, the spec's {key} is {getattr(spec, key)!r}")
        if cert.ball.get("boxes") == "points file":  # the boxes are the file's: no radius or pixel convention was used
            used = [k for k in ("mean", "std", "domain", "point_eps") if cert.ball.get(k) is not None] + (["eps"] if spec.eps else [])
            if used:
                v.problems.append(f"the balls are the points file's boxes, yet the certificate claims a {used[0]} for them")
        if cert.ball.get("keep_boxes") == "keep file" and spec.keep_eps:
            v.problems.append("the keep balls are the keep file's boxes, yet the spec claims keep_eps")
    obj, lb, gap = cert.objective, cert.lower_bound, cert.gap
    if lb > obj * (1 + GAP) + 1e-12:  # the objective is measured on the float32-rounded saved change
        v.problems.append(f"the lower bound {lb:.9g} exceeds the objective {obj:.9g}")
    want = 0.0 if obj == 0 else max(0.0, (obj - lb) / obj)
    if not _close(gap, want, 1e-9):
        v.problems.append(f"the gap is {want:.6g} from the objective and lower bound, the certificate says {gap:.6g}")
    cond = cert.conditioning
    if not _close(cond["change_linf"], cert.change["linf"], 1e-9):
        v.problems.append(f"the conditioning record's change {cond['change_linf']:.6g} is not the change block's {cert.change['linf']:.6g}")
    if cond["max_ratio"] != spec.max_change_ratio:
        v.problems.append(f"the conditioning limit {cond['max_ratio']} is not the spec's max_change_ratio {spec.max_change_ratio}")
    if spec.max_change_ratio is not None and cond["ratio"] > spec.max_change_ratio:
        v.problems.append(f"the change is {cond['ratio']:.3g} times the layer's scale, beyond max_change_ratio {spec.max_change_ratio:g}: "
                          "an ill-conditioned repair is never certified")
    v.checked.append("objective / bound / gap / requirements consistent")


def _ball_from(cert: Certificate) -> tuple[BallInputs, object]:
    """The certificate's ball record: how to rebuild each point's input box."""
    ball = cert.ball
    tup = (lambda val: None if val is None else tuple(val))
    eps = cert.spec["eps"] if ball.get("point_eps") is None else np.asarray(ball["point_eps"], np.float64)
    layout = ball.get("layout", "nchw")  # a certificate from before layouts were recorded took the channels after the batch axis
    return BallInputs(tup(ball.get("mean")), tup(ball.get("std")), tup(ball.get("domain")), layout), eps


def _ball_bounds(cert: Certificate, model: torch.nn.Module, points: PointsFile):
    """The feature boxes of the certificate's balls (or of the points file's input boxes, where it says so), recomputed
    from a model file (its frozen part)."""
    from cnnrepair.bounds import feature_bounds

    return feature_bounds(model, cert.layer, *_input_boxes(cert, points, "boxes", "points file"), cert.spec["bounds"])


def _input_boxes(cert: Certificate, pts: PointsFile, key: str, source: str) -> tuple:
    """The input boxes a ball certificate covers: ``pts``' own boxes when ``cert.ball[key]`` names its file (``source``),
    else the balls of ``eps`` in the certificate's convention (repair points) or of ``keep_eps`` (keep points)."""
    if cert.ball.get(key) == source:
        if pts.boxes is None:
            raise CnnRepairError(f"{pts.path}: the certificate covers this file's input boxes ('lower', 'upper'), but it holds none")
        return tuple(torch.as_tensor(b) for b in pts.boxes)
    inputs, eps = _ball_from(cert)
    return inputs.boxes(pts.x, eps if key == "boxes" else cert.spec["keep_eps"])


def _check_ball(cert: Certificate, lay, fb, rows: OutputRows | None = None) -> list[str]:
    """Every point's worst-case margin over its recomputed feature box ``fb`` under the repaired layer (over its own output
    ``rows`` when it has them)."""
    labels = np.array([p.label for p in cert.points], np.int64)
    worst = box_margins(lay.weight, lay.bias, fb.centre, fb.radius, labels, lay.zero_rival, rows)
    claimed = np.array([p.certified_margin_after for p in cert.points], np.float64)
    return (below_margin(worst, cert.spec["margin"], "ball(s) not certified to keep their label with margin {m:g}",
                         "point {k}: worst case {v:.6g}")
            + claims_off(claimed, worst, 1e-6, "certified margin(s) differ from the recomputed bounds",
                         "point {k}: certificate {c:.6g}, recomputed {v:.6g}"))


def _any_batch_target(before: torch.Tensor, after: torch.Tensor) -> bool:
    """A reshape target of a graph exported for one example, changed only as saving makes such a graph take any batch:
    an integer vector whose leading 1 became 0 (the input's batch) or -1, every other entry the same."""
    if before.dtype not in (torch.int64, torch.int32) or before.ndim != 1 or before.shape != after.shape or not len(before):
        return False
    return int(before[0]) == 1 and int(after[0]) in (0, -1) and torch.equal(before[1:], after[1:])


def _against_original(v: Verification, cert: Certificate, spec: RepairSpec, original, repaired_layer: tuple, points: PointsFile,
                      keep: PointsFile | None, fb=None) -> None:
    """Only the layer changed; the change block, objective, bound, margins before and conditioning recomputed.

    ``repaired_layer``: (the repaired model, its layer as already found)."""
    layer = cert.layer
    repaired, lay1 = repaired_layer
    lay0 = _find_layer(cert, original, points.x[:2])
    found0 = _ending_of(cert, original, points.x[:2], lay0)
    if found0 != cert.ending_name:
        v.problems.append(f"the original model applies {found0!r} after its logits, the certificate says {cert.ending_name!r}")
    names = set(lay0.parameter_names())
    later = list((cert.later_biases or {}).get("tensors", []))
    if later and not spec.later_biases:
        v.problems.append("the certificate lists later biases that moved, but its spec keeps them")
    s0 = {**dict(original.named_parameters()), **dict(original.named_buffers())}
    s1 = {**dict(repaired.named_parameters()), **dict(repaired.named_buffers())}
    batch_targets = 0
    for name, t in s0.items():
        if name not in names | set(later) and (name not in s1 or not torch.equal(t, s1[name])):
            if name in s1 and _any_batch_target(t, s1[name]):
                batch_targets += 1
                continue
            v.problems.append(f"tensor {name!r} differs from the original model: repair may change layer {layer!r}"
                              + (" and the later biases it lists" if later else "") + " only")
            break
    if batch_targets:
        v.checked.append(f"{batch_targets} reshape target(s) of a batch-1 graph changed only to take the batch from their input")
    missing = [t for t in later if t not in s0 or t not in s1]
    if missing:
        v.problems.append(f"later bias {missing[0]!r} is not a tensor of both models")
        later = []
    de = np.concatenate([(s1[t].detach().double() - s0[t].detach().double()).cpu().numpy().ravel() for t in later]) if later else np.zeros(0)
    if later:
        for key, value in change_norms(de).items():
            if not _close(cert.later_biases[key], value, 1e-9):
                v.problems.append(f"later_biases.{key} is {value:.9g}, the certificate says {cert.later_biases[key]}")
    dW, db = lay1.weight - lay0.weight, lay1.bias - lay0.bias
    if spec.freeze_bias and np.any(db != 0):
        v.problems.append("the bias changed, but the spec froze it")
    if spec.max_change is not None and np.abs(dW).max(initial=0.0) > spec.max_change * (1 + 1e-6):
        v.problems.append(f"a weight changed by {np.abs(dW).max():.6g}, beyond max_change {spec.max_change:g}")
    change = change_summary(dW.reshape(len(dW), -1), db, spec.freeze_bias or spec.kind == "targets" or _hidden(cert) and lay0.params[1] is None)
    for key, value in change.items():
        if not _close(cert.change[key], value, 1e-9):
            v.problems.append(f"change.{key} is {value:.9g}, the certificate says {cert.change[key]}")
    before = layout_margins(module_logits_fn(original), points.x, points.y, cert.ending_name, points.rows).min(0)
    claimed_before = np.array([p.margin_before for p in cert.points], np.float64)
    v.problems += claims_off(claimed_before, before, RTOL, "margin(s) before the repair differ from the original model",
                             "point {k}: certificate {c:.6g}, measured {v:.6g}")
    if keep is not None and cert.keep.count and len(keep.x) == cert.keep.count:
        kb = layout_margins(module_logits_fn(original), keep.x, np.asarray(cert.keep.labels, np.int64), cert.ending_name,
                            keep.rows).min(0)
        if not _close(cert.keep.smallest_margin_before, float(kb.min())):
            v.problems.append(f"the keep points' smallest margin before is {kb.min():.6g}, the certificate says "
                              f"{cert.keep.smallest_margin_before}")
    if spec.kind == "targets":  # its objective is the paper's LP value (change plus priced slack): recorded, not checked
        v.checked.append("against the original: only the layer changed, change block, margins before")
        v.unchecked.append("objective (the targets program's LP value, slack included)")
        return
    cond = cert.conditioning
    scale = layer_scale(lay0.weight, lay0.bias)
    if not _close(cond["layer_scale"], scale, 1e-9) or not _close(cond["ratio"], change["linf"] / scale if scale else float("inf"), 1e-9):
        v.problems.append(f"the conditioning record (layer scale {cond['layer_scale']}, ratio {cond['ratio']}) is not the original "
                          f"layer's ({scale:.9g}, {change['linf'] / scale if scale else float('inf'):.9g})")
    if _hidden(cert):
        v.problems += _patterns_kept(cert, original, repaired, points, keep)
        moved = [dW.ravel(), [] if spec.freeze_bias or lay0.params[1] is None else db.ravel(), de]
        objective = change_cost(np.concatenate(moved), spec.norm)
        if abs(objective - cert.objective) > 1e-6 * max(1.0, abs(cert.objective)):
            v.problems.append(f"the change's {spec.norm} norm is {objective:.9g}, the certificate says {cert.objective:.9g}")
        v.checked.append("against the original: only the layer" + (" and the listed later biases" if later else "") + " changed, change "
                         "block" + (", later biases' change" if later else "") + ", objective, margins before, conditioning, every "
                         "activation pattern after the layer kept at every repair point and listed keep point")
        v.unchecked.append("lower bound of a repair inside the network (its multipliers are on rows verify does not rebuild)")
        return
    v.problems += _optimality(cert, spec, original, lay0, dW, db, points, keep, fb)
    v.checked.append("against the original: only the layer changed, change block, objective, lower bound, margins before, conditioning")


def _patterns_kept(cert: Certificate, original, repaired, points: PointsFile, keep: PointsFile | None) -> list[str]:
    """The activation pattern after the layer is the original's at every repair point and every keep point the
    certificate lists (all of them in a certificate without the list), up to float32 ties."""
    from cnnrepair.repair.suffix import pattern_changes

    x = points.x
    if keep is not None:
        listed = (cert.patterns or {}).get("keep_points_with_patterns")
        kx = keep.x if listed is None else keep.x[torch.as_tensor(np.asarray(listed, np.int64))]
        x = torch.cat([x, kx])
    changed, total = pattern_changes(original, repaired, cert.layer, x)
    if changed:
        return [f"{changed} of {total} activation states after layer {cert.layer!r} differ from the original's at the points: "
                "the certificate says every pattern was kept"]
    return []


def _optimality(cert: Certificate, spec: RepairSpec, original, lay0, dW, db, points: PointsFile, keep: PointsFile | None, fb) -> list[str]:
    """The change's norm is the certified objective, and the stored multipliers bound it from below."""
    problems = []
    feats, kf = shared_features(lay0, points.x, None if keep is None else keep.x)  # as repair computed them
    radii = None
    labels = points.y
    if spec.kind == "ball":
        fb = fb if fb is not None else _ball_bounds(cert, original, points)
        feats, radii = fb.centre, fb.radius
        worst0 = box_margins(lay0.weight, lay0.bias, feats, radii, labels, lay0.zero_rival, points.rows)
        claimed0 = np.array([p.certified_margin_before for p in cert.points], np.float64)
        problems += claims_off(claimed0, worst0, 1e-6, "certified margin(s) before differ from the recomputed bounds",
                               "point {k}: certificate {c:.6g}, recomputed {v:.6g}")
    required = np.array([p.required for p in cert.points])
    prices = np.full(len(labels), np.inf)
    if keep is not None and cert.keep.count and len(keep.x) == cert.keep.count:
        ky = np.asarray(cert.keep.labels, np.int64)
        keep_radii = np.zeros_like(kf)
        given = cert.ball is not None and cert.ball.get("keep_boxes") == "keep file"
        if radii is not None and (spec.keep_eps > 0 or given):  # the keep balls certified before the repair, as repair chose them
            from cnnrepair.repair.api import keep_boxes

            # the keep file's boxes, or the keep balls in the repair balls' convention
            kf, keep_radii, held = keep_boxes(original, lay0, spec, keep.x, ky, kf, _input_boxes(cert, keep, "keep_boxes", "keep file"),
                                              keep.rows)
            problems += _keep_balls(cert, spec, lay0, dW, db, (kf, keep_radii, ky, keep.rows), held)
        feats = np.vstack([feats, kf])
        radii = None if radii is None else np.vstack([radii, keep_radii])
        labels = np.concatenate([labels, ky])
        required = np.concatenate([required, cert.keep.required])
        prices = np.concatenate([prices, np.full(len(ky), np.inf if spec.keep_price is None else spec.keep_price)])
    with_keep = len(labels) > len(points.x)  # (the keep points joined the program above)
    rows = program_rows([(points.rows, points.y), (keep.rows if with_keep else None, labels[len(points.x):])], lay0.weight.shape[0],
                        lay0.zero_rival)
    problem = MarginProblem(lay0.weight, lay0.bias, feats, labels, required, prices, spec.norm, spec.freeze_bias, spec.max_change, radii,
                            lay0.zero_rival and rows is None, rows)
    achieved = problem.point_margins(dW, db)  # float64, exact for these features (the worst case over a box)
    scale = np.abs(feats).sum(1) * np.abs(lay0.weight + dW).max() + np.abs(lay0.bias + db).max(initial=0.0)
    short = np.flatnonzero(np.isinf(prices) & (achieved < required - 1e-5 * (1 + np.abs(required) + scale)))
    if len(short):
        k = int(short[0])
        where = f"point {k}" if k < len(points.x) else f"keep point {k - len(points.x)}"
        problems.append(f"{len(short)} hard point(s) do not meet their recorded requirement under the saved change ({where}: "
                        f"{achieved[k]:.6g} < {required[k]:.6g})")
    objective = problem.objective(dW, db)
    if abs(objective - cert.objective) > 1e-6 * max(1.0, abs(cert.objective)):
        problems.append(f"the change's {spec.norm} norm is {objective:.9g}, the certificate says {cert.objective:.9g}")
    try:
        bound = witness_bound(problem, cert.lower_bound_witness or {})
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        return problems + [f"the lower bound's multipliers do not fit the program ({type(exc).__name__}); the bound is not proven"]
    if bound < cert.lower_bound * (1 - GAP) - 1e-12:  # float32 features recomputed here may differ by rounding
        problems.append(f"the multipliers prove a lower bound of {bound:.9g}, not the certified {cert.lower_bound:.9g}")
    return problems


def _keep_balls(cert: Certificate, spec: RepairSpec, lay0, dW, db, boxes: tuple, held) -> list[str]:
    """The keep balls certified before (recomputed) and after (under the repaired layer) against the certificate's counts;
    ``boxes``: the keep points' (centres, radii, labels, output rows or None)."""
    kf, keep_radii, ky, keep_rows = boxes
    problems = []
    block = cert.keep
    if block.balls_certified_before != int(held.sum()):
        problems.append(f"{int(held.sum())} keep balls are certified before the repair, the certificate says {block.balls_certified_before}")
    worst = box_margins(lay0.weight + dW, lay0.bias + db, kf, keep_radii, ky, lay0.zero_rival, keep_rows)
    after = int((worst[held] >= spec.keep_margin).sum())
    if block.balls_certified_after != after:
        problems.append(f"{after} of those keep balls are certified after it, the certificate says {block.balls_certified_after}")
    return problems


def verify(cert_path: Path, model_path: Path, points_path: Path, keep_path: Path | None = None,
           original_path: Path | None = None, factory: str | None = None) -> list[str]:
    """The problems :func:`verify_certificate` finds (empty: every checked claim holds)."""
    return verify_certificate(cert_path, model_path, points_path, keep_path, original_path, factory).problems
