"""Repair a model file and re-check a certificate: what ``cnnrepair repair`` and ``cnnrepair verify`` do.

``prepare`` reads and checks everything (model, points, spec, layer) before any file is written;
``run`` solves, saves ``repaired.pt2`` / ``repaired.onnx`` (the input's format; only when the spec
holds), reloads it, measures every margin on the saved file as its own runtime runs it
(onnxruntime for ONNX), and writes ``certificate.json``. ``verify`` re-checks a certificate
against a model file and the points, without trusting anything the certificate says about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import RUNTIME_AGREEMENT, LoadedModel, disagreement, load_model, runtime_logits, save_model
from cnnrepair.io import load_npz, read_json, write_json
from cnnrepair.repair import RepairSpec, last_layer, repair_classifier
from cnnrepair.repair.certificate import below_margin, check_claims, claims_off, model_logits, model_margins, sha256, witness_bound
from cnnrepair.repair.program import MarginProblem, margins_of

def _saved_margins(path: Path, module: torch.nn.Module, x: torch.Tensor, y: np.ndarray,
                   logits: np.ndarray | None = None) -> np.ndarray:
    """Margins of a saved model as its own format runs it (onnxruntime for ONNX, torch.jit for
    TorchScript, else the loaded torch module); ``logits``: the runtime's outputs when already at hand."""
    if len(y) == 0:
        return np.zeros(0)
    logits = runtime_logits(path, x) if logits is None else logits
    return model_margins(module, x, y) if logits is None else margins_of(logits, np.asarray(y, np.int64))


@dataclass
class Points:
    """Inputs ``x`` (model units) and labels ``y`` (None: the model's own predictions) read from an .npz."""

    path: Path
    x: torch.Tensor
    y: np.ndarray | None


def load_points(path: Path, what: str, labels_required: bool = True) -> Points:
    """Read ``x`` (float, N x input shape) and ``y`` (int) from an .npz, with one-line errors."""
    data = load_npz(Path(path), what)
    if "x" not in data:
        raise CnnRepairError(f"{path}: no array 'x' in the {what}; save it with np.savez(path, x=inputs, y=labels)")
    if labels_required and "y" not in data:
        raise CnnRepairError(f"{path}: no array 'y' in the {what}; save it with np.savez(path, x=inputs, y=labels)")
    x = data["x"]
    if not np.issubdtype(x.dtype, np.floating):
        raise CnnRepairError(f"{path}: 'x' must be float32 inputs in the model's units (got {x.dtype}); convert with x.astype(np.float32)")
    if not np.isfinite(x).all():
        raise CnnRepairError(f"{path}: 'x' contains NaN or infinite values; remove those inputs")
    y = data.get("y")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
        raise CnnRepairError(f"{path}: 'y' must hold one integer label per input ({len(x)}), got {y.dtype} of shape {y.shape}")
    return Points(Path(path), torch.from_numpy(np.ascontiguousarray(x, np.float32)), None if y is None else y.astype(np.int64))


@dataclass(frozen=True)
class BallInputs:
    """How the ball spec's balls are taken: in pixels, for a model taking ``(pixels - mean) / std``, clipped to ``domain``."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    domain: tuple[float, float] | None = (0.0, 1.0)

    def boxes(self, x: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor]:
        from cnnrepair.bounds import ball_box

        lo, hi = self.domain if self.domain is not None else (-np.inf, np.inf)
        return ball_box(x, eps, self.mean, self.std, (lo, hi))

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "domain": self.domain}


@dataclass
class RepairJob:
    """Everything ``cnnrepair repair`` needs, checked: the model, points, keep points, spec and layer."""

    model: LoadedModel
    points: Points
    keep: Points | None
    spec: RepairSpec
    layer: str
    ball: BallInputs | None = None
    point_eps: np.ndarray | None = None  # ball spec: the points file's per-point eps, if it has one


def prepare(model_path: Path, points_path: Path, spec: RepairSpec, layer: str | None = None, keep_path: Path | None = None,
            factory: str | None = None, input_shape: tuple[int, ...] | None = None, ball: BallInputs | None = None) -> RepairJob:
    """Load and check every input (raises CnnRepairError naming the problem); writes nothing.

    ``factory`` (``module:function``) builds the model when ``model_path`` is a state dict; a
    TorchScript file takes its input shape from ``input_shape`` or else the points."""
    points = load_points(points_path, "points file")
    model = load_model(model_path, factory, input_shape or tuple(points.x.shape[1:]))
    keep = load_points(keep_path, "keep file", labels_required=False) if keep_path is not None else None
    for pts in (points, keep):
        if pts is None:
            continue
        if len(pts.x) == 0 and pts is points:
            raise CnnRepairError(f"{pts.path}: no points; give at least one input to repair")
        if model.input_shape is not None and tuple(pts.x.shape[1:]) != model.input_shape:
            raise CnnRepairError(f"{pts.path}: inputs of shape {tuple(pts.x.shape[1:])} but the model takes {model.input_shape}; "
                                 "reshape them to the model's input shape")
    try:
        lay = last_layer(model.module, points.x[:2], layer)
    except CnnRepairError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model cannot run on these inputs
        raise CnnRepairError(f"{points.path}: the model cannot run on these inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    C = lay.shape[0]
    for pts in (points, keep):
        if pts is not None and pts.y is not None and len(pts.y) and (pts.y.min() < 0 or pts.y.max() >= C):
            raise CnnRepairError(f"{pts.path}: labels must lie in 0..{C - 1} for this {C}-class model (got {pts.y.min()}..{pts.y.max()})")
    point_eps = None
    if spec.kind == "ball":
        ball = ball or BallInputs()
        point_eps = _point_eps(points_path, len(points.x))
        ball.boxes(points.x, spec.eps if point_eps is None else point_eps)  # checks the convention against the points now
    return RepairJob(model, points, keep, spec, lay.name, ball, point_eps)


def _point_eps(path: Path, n: int) -> np.ndarray | None:
    data = load_npz(Path(path), "points file")
    if "eps" not in data:
        return None
    eps = np.asarray(data["eps"], np.float64).reshape(-1)
    if len(eps) != n or not np.isfinite(eps).all() or (eps < 0).any() or (eps > 1).any():
        raise CnnRepairError(f"{path}: 'eps' must hold one radius in [0, 1] (pixels) per point ({n}); got {eps.shape[0]} values")
    return eps


def run(job: RepairJob, out: Path, time_limit: float | None = None, threads: int | None = None) -> dict:
    """Repair, save ``out/repaired.<format>`` if the spec holds, re-measure on the saved file, write the certificate."""
    out = Path(out)
    keep = job.keep
    boxes = _boxes(job, job.points.x) if job.spec.kind == "ball" else None
    result = repair_classifier(job.model.module, job.points.x, job.points.y, job.spec, layer=job.layer,
                               keep_x=None if keep is None else keep.x, keep_y=None if keep is None else keep.y,
                               time_limit=time_limit, threads=threads, boxes=boxes)
    cert = result.certificate
    if "ball" in cert:
        cert["ball"].update(job.ball.as_dict())
        cert["ball"]["point_eps"] = None if job.point_eps is None else job.point_eps.tolist()
    cert["source_model"] = {"file": job.model.path.name, "sha256": sha256(job.model.path)}
    cert["points_file"] = {"file": job.points.path.name, "sha256": sha256(job.points.path)}
    if keep is not None:
        cert["keep_file"] = {"file": keep.path.name, "sha256": sha256(keep.path)}
    cert["notes"] = result.notes
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"repaired{job.model.suffix}"
    if result.ok:
        save_model(job.model, result.model, list(result.tensors), target)
        saved = load_model(target, job.model.factory, job.model.input_shape).module
        logits = runtime_logits(target, job.points.x)  # the file's own runtime, where it has one: run once
        after = _saved_margins(target, saved, job.points.x, job.points.y, logits)
        for p, m in zip(cert["points"], after):
            p["margin_after"] = float(m)
        if keep is not None and cert["keep"]["count"]:
            km = _saved_margins(target, saved, keep.x, np.asarray(cert["keep"]["labels"], np.int64))  # the labels repair kept
            cert["keep"]["smallest_margin_after"] = float(km.min())
            cert["keep"]["labels_kept"] = int((km > 0).sum())
        else:
            km = np.zeros(0)
        problems = check_claims(cert, after, km)
        if logits is not None:
            worst = disagreement(logits, model_logits(result.model, job.points.x))
            if worst > RUNTIME_AGREEMENT:
                problems.append(f"{target.name}: its runtime's outputs differ from the repaired torch model by {worst:.2g} "
                                f"(relative), more than {RUNTIME_AGREEMENT:g}")
        if problems:  # the saved file does not do what the solve promised: never certify it
            target.unlink()
            cert["status"] = "failed"
            cert["notes"] = cert["notes"] + problems
        else:
            cert["model"] = {"file": target.name, "sha256": sha256(target)}
    elif target.exists():
        target.unlink()  # an old repaired model must not sit beside a certificate that does not cover it
    write_json(out / "certificate.json", cert)
    return cert


def _boxes(job: RepairJob, x: torch.Tensor):
    return job.ball.boxes(x, job.spec.eps if job.point_eps is None else job.point_eps)


def _ball_from(cert: dict) -> tuple[BallInputs, object]:
    """The certificate's ball record: how to rebuild each point's input box."""
    ball = cert["ball"]
    tup = (lambda v: None if v is None else tuple(v))
    eps = cert["spec"]["eps"] if ball.get("point_eps") is None else np.asarray(ball["point_eps"], np.float64)
    return BallInputs(tup(ball.get("mean")), tup(ball.get("std")), tup(ball.get("domain"))), eps


def _ball_bounds(cert: dict, model: torch.nn.Module, points: Points):
    """The feature boxes of the certificate's balls, recomputed from a model file (its frozen part)."""
    from cnnrepair.bounds import feature_bounds

    inputs, eps = _ball_from(cert)
    return feature_bounds(model, cert["layer"], *inputs.boxes(points.x, eps), cert["spec"]["bounds"])


def _check_ball(cert: dict, model: torch.nn.Module, points: Points, fb) -> list[str]:
    """Every point's worst-case margin over its recomputed feature box ``fb`` under the repaired layer."""
    lay = last_layer(model, points.x[:2], cert["layer"])
    worst = MarginProblem(lay.weight, lay.bias, fb.centre, points.y, 0.0, radii=fb.radius).point_margins()
    claimed = np.array([p["certified_margin_after"] for p in cert["points"]], np.float64)
    return (below_margin(worst, cert["spec"]["margin"], "ball(s) not certified to keep their label with margin {m:g}",
                         "point {k}: worst case {v:.6g}")
            + claims_off(claimed, worst, 1e-6, "certified margin(s) differ from the recomputed bounds",
                         "point {k}: certificate {c:.6g}, recomputed {v:.6g}"))


def verify(cert_path: Path, model_path: Path, points_path: Path, keep_path: Path | None = None,
           original_path: Path | None = None, factory: str | None = None) -> list[str]:
    """Re-check a certificate; returns the problems found (empty: every claim holds)."""
    cert = read_json(Path(cert_path))
    if not isinstance(cert, dict) or "spec" not in cert or "status" not in cert:
        raise CnnRepairError(f"{cert_path}: not a cnnrepair certificate (no spec/status); give the certificate.json that repair wrote")
    problems = []
    if cert["status"] != "repaired":
        return [f"the certificate's status is {cert['status']!r}: it certifies no repaired model"]
    claimed = (cert.get("model") or {}).get("sha256")
    if claimed != sha256(Path(model_path)):
        problems.append(f"{model_path}: sha256 differs from the certificate's model (the file was altered or is another model)")
    if cert.get("points_file") and cert["points_file"]["sha256"] != sha256(Path(points_path)):
        problems.append(f"{points_path}: sha256 differs from the points the certificate was made on")
    points = load_points(points_path, "points file")
    shape = tuple(points.x.shape[1:])
    model = load_model(model_path, factory, shape).module
    after = _saved_margins(Path(model_path), model, points.x, points.y)
    keep_after = np.zeros(0)
    if keep_path is not None:
        keep = load_points(keep_path, "keep file", labels_required=False)
        ky = keep.y if keep.y is not None else np.asarray(cert["keep"].get("labels", []), np.int64)
        if len(ky) != len(keep.x):
            problems.append(f"{keep_path}: {len(keep.x)} keep inputs but the certificate lists {len(ky)} keep labels")
            ky = np.zeros(len(keep.x), np.int64)
        keep_after = _saved_margins(Path(model_path), model, keep.x, ky)
    elif (cert.get("keep") or {}).get("count"):
        problems.append(f"the certificate covers {cert['keep']['count']} keep points: pass them with --keep")
        keep_after = None
    problems += check_claims(cert, after, keep_after if keep_after is not None else np.zeros(cert["keep"]["count"]) + np.inf)
    fb = None
    if cert["spec"]["kind"] == "ball" and points.y is not None and len(after) == len(cert["points"]):
        fb = _ball_bounds(cert, model, points)  # the frozen part is the original's (checked below with --original)
        problems += _check_ball(cert, model, points, fb)
    if original_path is not None:
        problems += _check_optimality(cert, load_model(original_path, factory, shape).module, model, points, keep_path, keep_after, fb)
    return problems


def _check_optimality(cert: dict, original, repaired, points: Points, keep_path, keep_after, fb=None) -> list[str]:
    """Only the layer changed, the change's norm is the certified objective, and the witness bounds it from below.

    ``fb``: the ball spec's feature boxes, when already recomputed (from the repaired file: the same frozen part)."""
    problems = []
    layer = cert["layer"]
    lay0 = last_layer(original, points.x[:2], layer)
    lay1 = last_layer(repaired, points.x[:2], layer)
    names = set(lay0.parameter_names())
    s0 = {**dict(original.named_parameters()), **dict(original.named_buffers())}
    s1 = {**dict(repaired.named_parameters()), **dict(repaired.named_buffers())}
    for name, t in s0.items():
        if name not in names and (name not in s1 or not torch.equal(t, s1[name])):
            problems.append(f"tensor {name!r} differs from the original model: repair may change layer {layer!r} only")
            break
    spec = cert["spec"]
    if spec["kind"] not in ("pointwise", "ball"):
        return problems
    dW, db = lay1.weight - lay0.weight, lay1.bias - lay0.bias
    feats = lay0.features(points.x)
    radii = None
    if spec["kind"] == "ball":
        fb = fb if fb is not None else _ball_bounds(cert, original, points)
        feats, radii = fb.centre, fb.radius
    labels = points.y
    required = np.array([p["required"] for p in cert["points"]])
    prices = np.full(len(labels), np.inf)
    if keep_path is not None and cert["keep"]["count"]:
        keep = load_points(keep_path, "keep file", labels_required=False)
        kf = lay0.features(keep.x)
        ky = keep.y if keep.y is not None else np.asarray(cert["keep"]["labels"], np.int64)
        keep_radii = np.zeros_like(kf)
        if radii is not None and spec.get("keep_eps"):  # the keep balls certified before the repair, as repair chose them
            from dataclasses import fields

            from cnnrepair.repair.api import keep_boxes

            names = {f.name for f in fields(RepairSpec)}
            kf, keep_radii, _ = keep_boxes(original, lay0, RepairSpec(**{k: v for k, v in spec.items() if k in names}), keep.x, ky, kf)
        feats = np.vstack([feats, kf])
        radii = None if radii is None else np.vstack([radii, keep_radii])
        labels = np.concatenate([labels, ky])
        required = np.concatenate([required, cert["keep"]["required"]])
        prices = np.concatenate([prices, np.full(len(ky), np.inf if spec["keep_price"] is None else spec["keep_price"])])
    problem = MarginProblem(lay0.weight, lay0.bias, feats, labels, required, prices, spec["norm"], spec["freeze_bias"], spec["max_change"],
                            radii)
    objective = problem.objective(dW, db)
    if abs(objective - cert["objective"]) > 1e-6 * max(1.0, abs(cert["objective"])):
        problems.append(f"the change's {spec['norm']} norm is {objective:.9g}, the certificate says {cert['objective']:.9g}")
    bound = witness_bound(problem, cert.get("lower_bound_witness") or {})
    if bound < cert["lower_bound"] * (1 - 1e-9) - 1e-12:
        problems.append(f"the multipliers prove a lower bound of {bound:.9g}, not the certified {cert['lower_bound']:.9g}")
    return problems
