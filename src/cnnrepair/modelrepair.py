"""Repair a model file: what ``cnnrepair repair`` does (``cnnrepair verify`` is :mod:`cnnrepair.verify`).

``prepare`` reads and checks everything (model, points, spec, layer) before any file is written;
``run`` solves, saves ``repaired.pt2`` / ``repaired.onnx`` (the input's format; only when the spec
holds), reloads it, measures every margin on the saved file as its own runtime runs it
(onnxruntime for ONNX), and writes ``certificate.json``; :mod:`cnnrepair.verify` re-checks a
certificate against the files without trusting anything it says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnrepair.bounds import BallInputs  # noqa: F401 - where repair jobs took it from before 0.2
from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import FORMATS, RUNTIME_AGREEMENT, LoadedModel, disagreement, load_model, runtime_fn, save_model
from cnnrepair.io import load_npz
from cnnrepair.outdir import OutputDir
from cnnrepair.repair import Points, RepairSpec, SolveOptions, last_layer, repair_classifier
from cnnrepair.repair.layer import ending_layer
from cnnrepair.repair.certificate import Certificate, FileRef
from cnnrepair.repair.measure import layout_margins, model_logits, module_logits_fn
from cnnrepair.repair.outputs import OutputRows


@dataclass
class PointsFile:
    """Inputs ``x`` (model units) and labels ``y`` (None: the model's own predictions) read from an .npz; ``lower`` and
    ``upper`` (float64, x's shape), when the file holds them, are each input's box for the ball spec (as VNN-LIB states them)."""

    path: Path
    x: torch.Tensor
    y: np.ndarray | None
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    rows: OutputRows | None = None  # 'rows_coef' and 'rows_offset': each point's own output rows (cnnrepair.repair.outputs)

    @property
    def boxes(self) -> tuple[np.ndarray, np.ndarray] | None:
        return None if self.lower is None else (self.lower, self.upper)


def load_points(path: Path, what: str, labels_required: bool = True) -> PointsFile:
    """Read ``x`` (float, N x input shape) and ``y`` (int) from an .npz, with one-line errors."""
    data = load_npz(Path(path), what)
    if "x" not in data:
        raise CnnRepairError(f"{path}: no array 'x' in the {what}; save it with np.savez(path, x=inputs, y=labels)")
    if labels_required and "y" not in data:
        raise CnnRepairError(f"{path}: no array 'y' in the {what}; save it with np.savez(path, x=inputs, y=labels)")
    x = data["x"]
    if x.ndim < 2:
        raise CnnRepairError(f"{path}: 'x' must be N x input shape (got an array of shape {x.shape}); stack the inputs along a first axis")
    if not np.issubdtype(x.dtype, np.floating):
        raise CnnRepairError(f"{path}: 'x' must be float32 inputs in the model's units (got {x.dtype}); convert with x.astype(np.float32)")
    if not np.isfinite(x).all():
        raise CnnRepairError(f"{path}: 'x' contains NaN or infinite values; remove those inputs")
    y = data.get("y")
    if y is not None and (y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer)):
        raise CnnRepairError(f"{path}: 'y' must hold one integer label per input ({len(x)}), got {y.dtype} of shape {y.shape}")
    lower, upper = _input_boxes(path, data, x)
    return PointsFile(Path(path), torch.from_numpy(np.ascontiguousarray(x, np.float32)), None if y is None else y.astype(np.int64),
                      lower, upper, _output_rows(path, data, len(x)))


def _output_rows(path: Path, data: dict, n: int) -> OutputRows | None:
    """The file's 'rows_coef' (N x rows x outputs) and 'rows_offset' (N x rows; -inf: no such row), both or neither."""
    if "rows_coef" not in data and "rows_offset" not in data:
        return None
    if "rows_coef" not in data or "rows_offset" not in data:
        raise CnnRepairError(f"{path}: output rows need both 'rows_coef' and 'rows_offset'; save both or neither")
    try:
        rows = OutputRows.of(data["rows_coef"], data["rows_offset"])
    except CnnRepairError as exc:
        raise CnnRepairError(f"{path}: {exc}") from None
    if len(rows) != n:
        raise CnnRepairError(f"{path}: output rows for {len(rows)} points but 'x' holds {n}; give one set of rows per input")
    return rows


def _input_boxes(path: Path, data: dict, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The file's 'lower' and 'upper' input boxes (both or neither), checked to hold their inputs."""
    if "lower" not in data and "upper" not in data:
        return None, None
    if "lower" not in data or "upper" not in data:
        raise CnnRepairError(f"{path}: input boxes need both 'lower' and 'upper' (x's shape each); save both or neither")
    lower, upper = (np.asarray(data[k], np.float64) for k in ("lower", "upper"))
    if lower.shape != x.shape or upper.shape != x.shape:
        raise CnnRepairError(f"{path}: 'lower' and 'upper' must have x's shape {x.shape}; got {lower.shape} and {upper.shape}")
    if not (np.isfinite(lower).all() and np.isfinite(upper).all()) or (lower > upper).any():
        raise CnnRepairError(f"{path}: every box needs finite bounds with lower <= upper; check the order of 'lower' and 'upper'")
    xd = x.astype(np.float64)
    if ((xd < lower - 1e-6 * (1 + np.abs(lower))) | (xd > upper + 1e-6 * (1 + np.abs(upper)))).any():
        raise CnnRepairError(f"{path}: some input 'x' lies outside its own box [lower, upper]; give each box's centre (or any point in it) as x")
    return lower, upper


@dataclass
class RepairJob:
    """Everything ``cnnrepair repair`` needs, checked: the model, points, keep points, spec and layer."""

    model: LoadedModel
    points: PointsFile
    keep: PointsFile | None
    spec: RepairSpec
    layer: str
    ball: BallInputs | None = None
    point_eps: np.ndarray | None = None  # ball spec: the points file's per-point eps, if it has one


@dataclass(frozen=True)
class RepairFiles:
    """The files one repair reads: the model (a state dict needs ``factory``, ``module:function``; a TorchScript
    file takes its input shape from ``input_shape`` or else the points), the points and the keep points."""

    model: Path
    points: Path
    keep: Path | None = None
    factory: str | None = None
    input_shape: tuple[int, ...] | None = None


def prepare(files: RepairFiles, spec: RepairSpec, layer: str | None = None, ball: BallInputs | None = None, *,
            loaded: LoadedModel | None = None) -> RepairJob:
    """Load and check every input (raises CnnRepairError naming the problem); writes nothing.

    ``ball``: how the ball spec's balls are taken (default: pixels as they are, in [0, 1]); only
    the ball spec takes one. ``loaded``: ``files.model`` as the caller loaded it already (not read again)."""
    if ball is not None and spec.kind != "ball":
        raise CnnRepairError(f"input balls (a mean, std or range) describe the ball spec; the {spec.kind} spec takes none")
    model_path, points_path, keep_path = Path(files.model), Path(files.points), files.keep
    points = load_points(points_path, "points file")
    model = loaded or load_model(model_path, files.factory, files.input_shape or tuple(points.x.shape[1:]))
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
        if layer is not None and layer != ending_layer(model.module, points.x[:2]):
            name = _hidden_layer(model.module, points.x[:2], layer, spec)
            C = model_logits(model.module, points.x[:1]).shape[1]
        else:
            if spec.later_biases:
                raise CnnRepairError("later biases move only in a repair of a layer inside the network; name one with --layer (`cnnrepair layers MODEL` lists them)")
            lay = last_layer(model.module, points.x[:2], layer)
            name, C = lay.name, lay.shape[0]
    except CnnRepairError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model cannot run on these inputs
        raise CnnRepairError(f"{points.path}: the model cannot run on these inputs ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    for pts in (points, keep):
        if pts is not None and pts.rows is not None and pts.rows.num_classes != C:
            raise CnnRepairError(f"{pts.path}: its output rows are over {pts.rows.num_classes} outputs but the model has {C}")
    for pts in (points, keep):
        if pts is not None and pts.y is not None and len(pts.y) and (pts.y.min() < 0 or pts.y.max() >= C):
            raise CnnRepairError(f"{pts.path}: labels must lie in 0..{C - 1} for this {C}-class model (got {pts.y.min()}..{pts.y.max()})")
    point_eps = None
    given = [pts.path.name for pts in (points, keep) if pts is not None and pts.boxes is not None]
    if given and spec.kind != "ball":
        raise CnnRepairError(f"{given[0]} holds input boxes ('lower', 'upper'): they are the ball spec's; add --spec ball")
    if spec.kind == "ball" and points.boxes is None and spec.eps == 0:
        raise CnnRepairError("the ball spec needs --eps (the L-infinity radius in pixels, e.g. --eps 0.01) or input boxes "
                             "('lower', 'upper') in the points file")
    if spec.kind == "ball" and keep is not None and keep.boxes is not None and spec.keep_eps > 0:
        raise CnnRepairError(f"{keep.path.name}: its input boxes are the keep balls; drop --keep-eps")
    if spec.kind == "ball" and points.boxes is not None:
        if (ball is not None and (ball.mean is not None or ball.std is not None or ball.layout != "auto")) or spec.eps > 0:
            raise CnnRepairError(f"{points.path.name}: its input boxes are the balls, in the model's units already; drop --eps / --mean / "
                                 "--std / --layout")
        ball = BallInputs(None, None, None)  # recorded as such: no convention was used
    elif spec.kind == "ball":
        ball = (ball or BallInputs()).resolved(points.x)  # the layout as read from the points: what the certificate records
        point_eps = _point_eps(points_path, len(points.x))
        ball.boxes(points.x, spec.eps if point_eps is None else point_eps)  # checks the convention against the points now
    return RepairJob(model, points, keep, spec, name, ball, point_eps)


def _hidden_layer(module: torch.nn.Module, sample: torch.Tensor, layer: str, spec: RepairSpec) -> str:
    """``layer`` checked to be a linear or convolution layer inside the network that the spec can repair."""
    from cnnrepair.repair.suffix import repairable_layers
    from cnnrepair.repair.hidden_api import refuse_unsupported

    names = [info.name for info in repairable_layers(module, sample)]
    if layer not in names:
        raise CnnRepairError(f"no linear layer named {layer!r} in the model (linear and convolution layers: {', '.join(names) or 'none'}); "
                             "`cnnrepair layers MODEL` lists them")
    refuse_unsupported(spec, layer)
    return layer


def _point_eps(path: Path, n: int) -> np.ndarray | None:
    data = load_npz(Path(path), "points file")
    if "eps" not in data:
        return None
    eps = np.asarray(data["eps"], np.float64).reshape(-1)
    if len(eps) != n or not np.isfinite(eps).all() or (eps < 0).any() or (eps > 1).any():
        raise CnnRepairError(f"{path}: 'eps' must hold one radius in [0, 1] (pixels) per point ({n}); got {eps.shape[0]} values")
    return eps


REPAIR_OUTPUTS = frozenset({"certificate.json", *(f"repaired{suffix}" for suffix in FORMATS)})


def output_dir(out: Path, inputs: list[Path | None], overwrite: bool = False) -> OutputDir:
    """Where a repair writes: refused if it holds other files, earlier results (unless ``overwrite``) or an input."""
    return OutputDir(Path(out), REPAIR_OUTPUTS.__contains__, overwrite, inputs, what="a repair (certificate.json / repaired.*)")


def run(job: RepairJob, out: Path, options: SolveOptions | None = None, overwrite: bool = False) -> Certificate:
    """Repair, save ``out/repaired.<format>`` if the spec holds, re-measure on the saved file, write the certificate.

    ``out`` must be new, empty, or (with ``overwrite``) hold only an earlier repair's files; the model
    and its certificate appear there together (staged beside it, then renamed into place), and
    nothing is written if the run fails, is interrupted or runs out of disk."""
    keep = job.keep
    outdir = output_dir(out, [job.model.path, job.points.path, None if keep is None else keep.path], overwrite)
    with outdir as stage:
        cert = repair_into(job, stage, options)
        cert.write(stage / "certificate.json")
    return cert


def repair_into(job: RepairJob, stage: Path, options: SolveOptions | None = None) -> Certificate:
    """The repair of :func:`run` inside a folder being staged: ``stage/repaired.<format>`` written (when the spec holds on
    the saved file), the certificate returned for the caller to complete and write."""
    keep = job.keep
    boxes = keep_in = None
    if job.spec.kind == "ball":  # the files' boxes, or the balls (the keep balls in the same convention as the repair balls)
        boxes = job.points.boxes or _boxes(job, job.points.x)
        if keep is not None:
            keep_in = keep.boxes or (job.ball.boxes(keep.x, job.spec.keep_eps) if job.spec.keep_eps > 0 else None)
    result = repair_classifier(job.model.module, Points(job.points.x, job.points.y, boxes=boxes, rows=job.points.rows), spec=job.spec,
                               layer=job.layer,
                               keep=None if keep is None else Points(keep.x, keep.y, boxes=keep_in, rows=keep.rows), options=options)
    cert = result.certificate
    if cert.ball is not None:
        cert.ball.update(job.ball.as_dict())
        cert.ball["point_eps"] = None if job.point_eps is None else job.point_eps.tolist()
        cert.ball["boxes"] = "points file" if job.points.boxes is not None else "eps"
        if keep is not None and keep.boxes is not None:
            cert.ball["keep_boxes"] = "keep file"
    cert.source_model = FileRef.of(job.model.path)
    cert.points_file = FileRef.of(job.points.path)
    if keep is not None:
        cert.keep_file = FileRef.of(keep.path)
    cert.notes = list(result.notes)
    target = stage / f"repaired{job.model.suffix}"
    if result.ok:
        note = save_model(job.model, result.model, list(result.tensors), target)
        cert.notes = cert.notes + ([note] if note else [])
        problems = _measure_saved(cert, target, job, result.model)
        if problems:  # the saved file does not do what the solve promised: never certify it
            target.unlink()  # the staging copy this run just wrote
            cert.status = "failed"
            cert.notes = cert.notes + problems
        else:
            cert.model = FileRef.of(target)
    return cert


def saved_logits_fn(path: Path, module: torch.nn.Module):
    """A batch -> float64 logits function of a saved model as its own format runs it (one onnxruntime
    session for ONNX, torch.jit for TorchScript, else the loaded torch module): open it once, measure many sets."""
    return runtime_fn(path) or module_logits_fn(module)


def _measure_saved(cert: Certificate, target: Path, job: RepairJob, repaired: torch.nn.Module) -> list[str]:
    """Fill the certificate's margins from the saved file (every batch layout) and list what it does not keep."""
    own = runtime_fn(target)  # the format's own runtime, where it is not the loaded module (then the file is not loaded again)
    fn = own or module_logits_fn(load_model(target, job.model.factory, job.model.input_shape).module)
    by_layout = layout_margins(fn, job.points.x, job.points.y, cert.ending_name, job.points.rows)
    after = by_layout.min(0)
    for p, m in zip(cert.points, after):
        p.margin_after = float(m)
    cert.margins_by_layout = [float(row.min()) for row in by_layout]
    keep = job.keep
    km = np.zeros(0)
    if keep is not None and cert.keep.count:
        km = layout_margins(fn, keep.x, np.asarray(cert.keep.labels, np.int64), cert.ending_name, keep.rows).min(0)  # as repair kept them
        cert.keep.smallest_margin_after = float(km.min())
        cert.keep.labels_kept = int((km > 0).sum())
        if cert.keep.below_keep_margin is not None:
            cert.keep.below_keep_margin = int((km < job.spec.keep_margin).sum())
    problems = cert.check_claims(after, km)
    if own is not None:
        got, ref = own(job.points.x[:512]), model_logits(repaired, job.points.x[:512])
        worst = disagreement(got, ref)
        if worst > RUNTIME_AGREEMENT:
            problems.append(f"{target.name}: its runtime's outputs differ from the repaired torch model by {worst:.2g} of the logits' "
                            f"scale, more than {RUNTIME_AGREEMENT:g}; the margins above were measured on the file itself, so a "
                            "larger --margin lets the repair survive this difference")
    return problems


def _boxes(job: RepairJob, x: torch.Tensor):
    return job.ball.boxes(x, job.spec.eps if job.point_eps is None else job.point_eps)
