"""Repair the VNN-LIB properties a model violates, keep the ones it satisfies: ``cnnrepair repair MODEL --vnnlib ...``.

The verification workflow is "a verifier found this property violated; fix the network so that it
holds; verify again". :func:`plan_properties` reads each property (the input box and its output rows:
the robustness form, a targeted one, or general linear output constraints; a case of several
comparisons is refused by name) and checks it on the model
(:func:`cnnrepair.vnnlib.check.check_properties`: a PGD counterexample makes it ``violated``, our
bounds prove it ``holds``, neither is ``unknown``). :func:`repair_properties` then runs one ball
repair in the output folder: the violated and unknown properties are its repair points (each box
exactly as the file states it, a float32 point inside it as the point), the ones that hold are its
keep points (their boxes kept certified), followed by any keep points the user gives (clean inputs,
boxes of zero width: the drawdown control of any repair). It writes ``points.npz`` and ``keep.npz`` (inputs,
labels, ``lower`` / ``upper`` boxes: what ``cnnrepair verify`` recomputes the bounds from; when some
property is not the robustness form, every point's output rows too, ``rows_coef`` and
``rows_offset``, the extra keep points' labels written as rows), the repaired model and its certificate (which names every property file by sha256, so that
``verify --vnnlib`` recomputes each box and label from the files), ``properties.json`` (each
property's status before and after, rechecked on the saved model) and, for every property the
repaired model is proved to satisfy, a copy ``proved_<i>_<name>`` with ``instances.csv`` beside it,
so that any VNN-COMP verifier can re-check the repaired file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import LoadedModel, load_model
from cnnrepair.io import atomic_write, sha256, write_json
from cnnrepair.modelrepair import REPAIR_OUTPUTS, RepairFiles, prepare, repair_into
from cnnrepair.outdir import OutputDir
from cnnrepair.repair import RepairSpec, SolveOptions
from cnnrepair.repair.certificate import Certificate
from cnnrepair.repair.outputs import OutputRows
from cnnrepair.vnnlib.check import PropertyCheck, float32_inside, check_properties, property_set
from cnnrepair.vnnlib.read import VnnlibProperty, read_instances, read_vnnlib

OUTPUTS = frozenset(REPAIR_OUTPUTS | {"points.npz", "keep.npz", "properties.json", "instances.csv"})
DEFAULT_TIMEOUT = 60.0  # seconds per instance in the instances.csv written for the proved properties (VNN-COMP's field)


def owns(name: str) -> bool:
    """The file names a property repair writes into its folder."""
    return name in OUTPUTS or (name.startswith("proved_") and (name.endswith(".vnnlib") or name.endswith(".vnnlib.gz")))


@dataclass(frozen=True)
class PropertyFiles:
    """What ``cnnrepair repair MODEL --vnnlib`` reads: the model (a state dict needs ``factory``; a graph that does not
    record its input shape needs ``input_shape``), the property files and each one's timeout (for the instances written)."""

    model: Path
    properties: tuple[Path, ...]
    timeouts: tuple[float, ...] = ()
    factory: str | None = None
    input_shape: tuple[int, ...] | None = None
    keep: Path | None = None  # more keep points (an .npz with x, optional y): clean inputs whose labels must survive


def instances_for(csv: Path, model: Path) -> tuple[tuple[Path, ...], tuple[float, ...]]:
    """The properties (and timeouts) that VNN-COMP's ``instances.csv`` lists for ``model`` (the same file, or its name)."""
    rows = read_instances(csv)
    target = os.path.realpath(model)
    mine = [(prop, timeout) for onnx, prop, timeout in rows if os.path.realpath(onnx) == target or Path(onnx).name == Path(model).name]
    if not mine:
        listed = ", ".join(sorted({Path(onnx).name for onnx, _, _ in rows}))
        raise CnnRepairError(f"{csv}: no instance names the model {Path(model).name} (it lists {listed}); give the model it lists")
    return tuple(p for p, _ in mine), tuple(t for _, t in mine)


@dataclass
class PropertyPlan:
    """The properties read and checked on the model, before any repair."""

    model: LoadedModel
    input_shape: tuple[int, ...]
    files: tuple[Path, ...]
    timeouts: tuple[float, ...]
    properties: list[VnnlibProperty]
    checks: list[PropertyCheck]
    lower: np.ndarray
    upper: np.ndarray
    labels: np.ndarray
    keep: tuple[np.ndarray, np.ndarray] | None = None  # the extra keep points (x float32, labels), after the kept properties
    rows: OutputRows | None = None  # each property's output rows, when some property is not a label's against every class

    @property
    def to_repair(self) -> np.ndarray:
        """The properties not proved on the model (violated or unknown): the repair points."""
        return np.array([i for i, c in enumerate(self.checks) if c.status != "holds"], np.int64)

    @property
    def held(self) -> np.ndarray:
        """The properties our bounds prove on the model: the keep points (their boxes stay certified)."""
        return np.array([i for i, c in enumerate(self.checks) if c.status == "holds"], np.int64)


def plan_properties(files: PropertyFiles, bounds: str = "crown") -> PropertyPlan:
    """Read the model and every property and check each property on the model (raises CnnRepairError, one line)."""
    if not files.properties:
        raise CnnRepairError("no VNN-LIB property given; pass at least one file with --vnnlib (or an --instances file)")
    model = load_model(Path(files.model), files.factory, files.input_shape)
    shape = files.input_shape or model.input_shape
    if shape is None:
        raise CnnRepairError(f"{Path(files.model).name} does not record its input shape; give it with --input-shape (e.g. 1,28,28)")
    props = [read_vnnlib(Path(p)) for p in files.properties]
    checks = check_properties(model.module, props, tuple(shape), bounds)
    ps = property_set(props, tuple(shape), props[0].num_outputs)
    timeouts = tuple(files.timeouts) or (DEFAULT_TIMEOUT,) * len(props)
    keep = _keep_points(model, files.keep, tuple(shape)) if files.keep is not None else None
    rows = None if ps.full_label.all() else ps.rows  # all in the robustness form: labels say it all, as before
    return PropertyPlan(model, tuple(shape), tuple(Path(p) for p in files.properties), timeouts, props, checks, ps.lower, ps.upper,
                        ps.labels, keep, rows)


def _keep_points(model: LoadedModel, path: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The keep file's inputs and labels (default: the model's predictions), checked against the model's input shape."""
    from cnnrepair.modelrepair import load_points
    from cnnrepair.repair.measure import model_logits

    pts = load_points(Path(path), "keep file", labels_required=False)
    if tuple(pts.x.shape[1:]) != shape:
        raise CnnRepairError(f"{path}: inputs of shape {tuple(pts.x.shape[1:])} but the model takes {shape}; reshape them")
    if pts.boxes is not None:
        raise CnnRepairError(f"{path}: keep points with boxes next to VNN-LIB properties; give boxes as properties, or drop 'lower' / 'upper'")
    y = pts.y if pts.y is not None else model_logits(model.module, pts.x).argmax(1)
    return pts.x.numpy(), np.asarray(y, np.int64)


def _points(plan: PropertyPlan, idx: np.ndarray, path: Path, extra: tuple[np.ndarray, np.ndarray] | None = None,
            rows: bool = False) -> None:
    """An .npz of the properties ``idx``: a float32 input inside each box (its centre, rounded inward), the label, the box
    (and with ``rows`` each property's output rows, 'rows_coef' and 'rows_offset'); ``extra`` (inputs, labels) follow,
    each its own box of zero width."""
    lo32, hi32 = float32_inside(plan.lower[idx], plan.upper[idx])
    lo32, hi32 = lo32.numpy(), hi32.numpy()
    empty = np.flatnonzero((lo32 > hi32).reshape(len(idx), -1).any(1)) if len(idx) else np.zeros(0, np.int64)
    if len(empty):
        raise CnnRepairError(f"{plan.files[idx[empty[0]]].name}: its input box holds no float32 number in some coordinate; "
                             "the model runs in float32, so widen the box")
    x = np.clip(((lo32.astype(np.float64) + hi32) / 2).astype(np.float32), lo32, hi32)
    y, lower, upper = plan.labels[idx], plan.lower[idx], plan.upper[idx]
    if extra is not None:
        x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
        lower, upper = np.concatenate([lower, extra[0].astype(np.float64)]), np.concatenate([upper, extra[0].astype(np.float64)])
    extra_rows = {}
    if rows and plan.rows is not None:  # the properties' own rows; the extra keep points' labels as rows
        sub = plan.rows.subset(idx)
        if extra is not None:
            sub = OutputRows.stack([sub, OutputRows.from_labels(extra[1], plan.rows.num_classes)])
        extra_rows = {"rows_coef": sub.coef, "rows_offset": sub.offset}
    atomic_write(path, lambda p: np.savez(p, x=x, y=y, lower=lower, upper=upper, **extra_rows))


@dataclass
class PropertyRepair:
    """What :func:`repair_properties` did: the certificate (None when every property already held: nothing repaired) and
    each property's record as ``properties.json`` holds it."""

    certificate: Certificate | None
    records: list[dict]


def repair_properties(plan: PropertyPlan, spec: RepairSpec, out: Path, options: SolveOptions | None = None,
                      overwrite: bool = False, drop_conflicts: bool = False) -> PropertyRepair:
    """Repair the properties not proved on the model as ball specs, keeping the proved ones; write the folder ``out``
    (see the module docstring). ``spec``: the ball spec's margins, norm, bounds (its kind and eps are the boxes').

    ``drop_conflicts``: when they cannot all be repaired together (``infeasible``, with a set of properties that conflict),
    the most violated property of that set (the lowest bound before) is dropped and the rest repaired again, until they
    can be or none is left; each dropped property is recorded (``role: dropped``). A greedy choice: the properties repaired
    are a feasible set, not always the largest one."""
    if spec.kind != "ball":
        raise CnnRepairError(f"VNN-LIB properties are input boxes: they are repaired with the ball spec, not {spec.kind}; drop --spec")
    spec = replace(spec, eps=0.0, keep_eps=0.0)
    outdir = OutputDir(Path(out), owns, overwrite, [plan.model.path, *plan.files],  # (the keep file is read already)
                       what="a property repair (certificate.json, repaired.*, points.npz, properties.json, proved_*.vnnlib)")
    with outdir as stage:
        todo, held = plan.to_repair, plan.held
        if not len(todo):
            records = _records(plan, None)
            write_json(stage / "properties.json", {"model": plan.model.path.name, "repaired": False, "properties": records})
            return PropertyRepair(None, records)
        has_keep = len(held) or plan.keep is not None
        if has_keep:
            _points(plan, held, stage / "keep.npz", plan.keep, rows=True)
        dropped: list[int] = []
        while True:
            _points(plan, todo, stage / "points.npz", rows=True)
            files = RepairFiles(plan.model.path, stage / "points.npz", stage / "keep.npz" if has_keep else None,
                                plan.model.factory, plan.input_shape)
            job = prepare(files, spec, loaded=plan.model)  # the model read and checked by plan_properties
            cert = repair_into(job, stage, options)
            drop = _to_drop(plan, cert, todo) if drop_conflicts and len(todo) > 1 else None
            if drop is None:
                break
            dropped.append(drop)
            todo = todo[todo != drop]
        cert.properties = [{"file": plan.files[i].name, "sha256": sha256(plan.files[i]), "set": which, "index": k}
                           for which, idx in (("points", todo), ("keep", held)) for k, i in enumerate(idx)]
        if dropped:
            cert.notes = (cert.notes or []) + [f"{len(dropped)} propert{'y' if len(dropped) == 1 else 'ies'} dropped, in this order, "
                                               "as they conflicted with the others: " + ", ".join(plan.files[i].name for i in dropped)]
        after = None
        if cert.status == "repaired":
            repaired = load_model(stage / cert.model.file, job.model.factory, plan.input_shape).module
            after = check_properties(repaired, plan.properties, plan.input_shape, spec.bounds)
            _proved(plan, after, stage, cert.model.file)
        records = _records(plan, after, todo, dropped)
        write_json(stage / "properties.json", {"model": plan.model.path.name, "repaired": cert.status == "repaired",
                                               "properties": records})
        cert.write(stage / "certificate.json")
    return PropertyRepair(cert, records)


def _to_drop(plan: PropertyPlan, cert: Certificate, todo: np.ndarray) -> int | None:
    """The property to drop after an infeasible repair: of the repair points in its conflicting set, the most violated
    (the lowest bound before; the first of equals); None when the repair is not infeasible or names no repair point."""
    if cert.status != "infeasible":
        return None
    named = [int(todo[c["index"]]) for c in cert.conflicts or [] if c["set"] == "points" and 0 <= c["index"] < len(todo)]
    return min(named, key=lambda i: (plan.checks[i].bound, i)) if named else None


def _records(plan: PropertyPlan, after: list[PropertyCheck] | None, todo: np.ndarray | None = None,
             dropped: list[int] = ()) -> list[dict]:
    """Per property: its file, label, status and bound before, and after (on the saved repaired model) when repaired."""
    repaired = set() if todo is None else {int(i) for i in todo}
    out = []
    for i, (path, check) in enumerate(zip(plan.files, plan.checks)):
        rec = {"file": path.name, "label": check.label, "before": check.status, "bound_before": check.bound,
               "role": "repaired" if i in repaired else "dropped" if i in dropped else "kept"}
        if check.rivals is not None:  # targeted: bounded and repaired against its own classes (its output rows)
            rec.update(rivals=list(check.rivals), form="targeted: proved and repaired against its own classes")
        elif check.label is None:
            rec.update(form="linear output constraints: proved and repaired through its output rows")
        if after is not None:
            rec.update(after=after[i].status, bound_after=after[i].bound)
        out.append(rec)
    return out


def _proved(plan: PropertyPlan, after: list[PropertyCheck], stage: Path, model_name: str) -> None:
    """``proved_<i>_<name>``: a copy of every property the repaired model is proved to satisfy, and ``instances.csv``."""
    rows = []
    for i, (path, check) in enumerate(zip(plan.files, after)):
        if check.status != "holds":
            continue
        name = f"proved_{i}_{path.name}"
        data = path.read_bytes()
        atomic_write(stage / name, lambda p, d=data: Path(p).write_bytes(d))
        rows.append(f"{model_name},{name},{plan.timeouts[i]:g}\n")
    if rows:
        atomic_write(stage / "instances.csv", lambda p: Path(p).write_text("".join(rows)))


def check_property_files(cert: Certificate, paths: list[Path], points, keep) -> tuple[list[str], list[str]]:
    """(problems, what was checked): every property the certificate names is among ``paths`` (by sha256), and its box and
    label are exactly the points (or keep) file's entry it names."""
    problems = []
    by_hash = {}
    for p in paths:
        by_hash.setdefault(sha256(p), p)
    for entry in cert.properties or []:
        path = by_hash.get(entry["sha256"])
        if path is None:
            problems.append(f"property {entry['file']!r} (sha256 {entry['sha256'][:12]}...) is not among the files given with --vnnlib")
            continue
        pts = points if entry["set"] == "points" else keep
        k = entry["index"]
        if pts is None or pts.boxes is None or not 0 <= k < len(pts.x):
            problems.append(f"property {entry['file']!r}: the {entry['set']} file holds no box {k}")
            continue
        prop = read_vnnlib(path)
        lo, hi = pts.boxes[0][k].reshape(-1), pts.boxes[1][k].reshape(-1)
        form = prop.robustness()
        label = None if form is None else form[0]
        y = None if pts.y is None else int(pts.y[k])
        if prop.lower.shape != lo.shape or not (np.array_equal(prop.lower, lo) and np.array_equal(prop.upper, hi)):
            problems.append(f"property {entry['file']!r}: its box is not the {entry['set']} file's box {k}")
        elif pts.rows is not None:
            if not _same_rows(prop, pts.rows.subset([k])):
                problems.append(f"property {entry['file']!r}: its output rows are not the {entry['set']} file's rows {k}")
        elif label is None or label != y or (entry["set"] == "points" and prop.label() is None):
            problems.append(f"property {entry['file']!r}: its label {label} (against every other class) is not the {entry['set']} "
                            f"file's label {y}")
    return problems, [f"{len(cert.properties or [])} property file(s): boxes, labels and output rows against the points and keep files"]


def _same_rows(prop: VnnlibProperty, rows: OutputRows) -> bool:
    """Are the points file's rows (one point) exactly the property's, as the repair wrote them?"""
    A, b = prop.output_rows()
    own = OutputRows.of(A[None], b[None])
    live = rows.live[0]
    return bool(live.sum() == len(b) and np.array_equal(rows.coef[0, live], own.coef[0]) and np.array_equal(rows.offset[0, live], own.offset[0]))
