"""Certificates: what a repair claims, as a typed record; written as plain JSON, read back only after
its shape is checked, and its margin claims checked against margins measured on a model.

A certificate names the repaired model file by sha256 and lists, per repair point, its margin
before and after on the saved model (float32, as it runs, the smallest over the batch layouts of
:mod:`cnnrepair.repair.measure`). A third party re-checks it (:mod:`cnnrepair.verify`) by running
the model on the points (``margin >= spec.margin`` for each), recomputing the change from the
original model, and recomputing the lower bound from the stored multipliers with the closed form
of :func:`cnnrepair.repair.program.certified_lower_bound` (weak duality; documented in docs/guide.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from cnnrepair.io import read_json, sha256, write_json
from cnnrepair.repair.measure import layouts_record
from cnnrepair.repair.program import MarginProblem, certified_lower_bound

FORMAT = "cnnrepair-certificate/2"
STATUSES = ("repaired", "infeasible", "failed", "ill-conditioned")


def _record(obj, always: tuple[str, ...] = ()) -> dict:
    """A record's fields in order as JSON values, leaving out unset (None) optional ones not in ``always``."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.name not in always:
            continue
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
    return out


def _known(cls, data: dict, where: str) -> dict:
    """``data`` restricted to ``cls``'s fields; an unknown key is a claim nothing checks, so it is refused."""
    names = {f.name for f in fields(cls)}
    extra = sorted(set(data) - names)
    if extra:
        raise _Malformed(f"{where} has unknown field(s) {', '.join(map(repr, extra))}: this version checks no such claim")
    return data


@dataclass(frozen=True)
class FileRef:
    """A file a certificate is about, by name (informational) and sha256 (checked)."""

    file: str
    sha256: str

    @classmethod
    def of(cls, path: Path) -> FileRef:
        return cls(Path(path).name, sha256(path))

    def to_dict(self) -> dict:
        return {"file": self.file, "sha256": self.sha256}


@dataclass(kw_only=True)
class PointClaim:
    """One repair point: its label, margin before and after (on the saved model), the margin it was required to reach
    (None: the targets spec requires none) and, for the ball spec, its certified (worst-case) margins."""

    index: int
    label: int
    margin_before: float
    margin_after: float
    required: float | None
    certified_margin_before: float | None = None
    certified_margin_after: float | None = None

    def to_dict(self) -> dict:
        return _record(self, always=("required",))


@dataclass(kw_only=True)
class KeepClaim:
    """The keep points: their labels (the ones kept), smallest margins before and after, how many keep their label,
    the margins required of them (None: the targets spec) and, with keep balls, how many stay certified."""

    count: int
    smallest_margin_before: float | None
    smallest_margin_after: float | None
    labels_kept: int
    below_keep_margin: int | None = None
    required: list[float] | None = None
    labels: list[int] = field(default_factory=list)
    balls_certified_before: int | None = None
    balls_certified_after: int | None = None

    def to_dict(self) -> dict:
        balls = ("balls_certified_after",) if self.balls_certified_before is not None else ()
        return _record(self, always=("smallest_margin_before", "smallest_margin_after") + balls)


@dataclass(kw_only=True)
class Certificate:
    """What one repair claims, field by field as ``certificate.json`` holds it (docs/trust.md says which fields
    ``cnnrepair verify`` recomputes and which are informational).

    ``Certificate.read(path)`` checks the file's shape before it builds one (a malformed or unknown
    field is a one-line error); ``write(path)`` writes it atomically; ``check_claims`` compares its
    margin claims with margins measured on a model."""

    format: str = FORMAT
    model: FileRef | None = None
    source_model: FileRef | None = None
    layer: str
    layer_kind: str
    layer_shape: list[int]
    spec: dict[str, Any]
    status: str
    objective: float | None = None
    lower_bound: float | None = None
    gap: float | None = None
    change: dict[str, Any]
    points: list[PointClaim]
    keep: KeepClaim
    batch_layouts: list[dict] = field(default_factory=layouts_record)
    solver: dict[str, Any] = field(default_factory=dict)
    lower_bound_witness: dict[str, Any] | None = None
    note: str | None = None
    conflicts: list[dict] | None = None
    coinciding: list[dict] | None = None
    feature_noise: dict[str, Any] | None = None
    ball: dict[str, Any] | None = None
    conditioning: dict[str, Any] | None = None
    margins_by_layout: list[float] | None = None
    patterns: dict[str, Any] | None = None
    later_biases: dict[str, Any] | None = None
    ending: dict[str, Any] | None = None  # what follows the layer (name, note; absent: nothing): cnnrepair.repair.ending
    properties: list[dict] | None = None  # VNN-LIB files the points came from: file, sha256, set (points / keep), index
    output_rows: dict[str, Any] | None = None  # the repair points' own output rows (cnnrepair.repair.outputs), if any
    points_file: FileRef | None = None
    keep_file: FileRef | None = None
    notes: list[str] | None = None

    @property
    def repaired(self) -> bool:
        return self.status == "repaired"

    @property
    def ending_name(self) -> str:
        """What follows the layer (:mod:`cnnrepair.repair.ending`): the margins claimed are measured through it."""
        return (self.ending or {}).get("name", "none")

    def to_dict(self) -> dict:
        """The JSON object ``certificate.json`` holds."""
        d = _record(self, always=("model", "source_model", "objective", "lower_bound", "gap"))
        d["points"] = [p.to_dict() for p in self.points]
        return d

    def write(self, path: Path) -> None:
        """Write ``path`` atomically (never half-written)."""
        write_json(Path(path), self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> Certificate:
        """A certificate from its JSON object, after :func:`check_schema` (raises CnnRepairError, one line)."""
        check_schema(data)
        ref = (lambda v: None if v is None else FileRef(**v))
        d = dict(data)
        d["points"] = [PointClaim(**p) for p in d["points"]]
        d["keep"] = KeepClaim(**d["keep"])
        for key in ("model", "source_model", "points_file", "keep_file"):
            d[key] = ref(d.get(key))
        return cls(**d)

    @classmethod
    def read(cls, path: Path) -> Certificate:
        """Read and check a ``certificate.json``."""
        return cls.from_dict(read_json(Path(path)))

    def check_claims(self, margins_after: np.ndarray, keep_margins_after: np.ndarray) -> list[str]:
        """Problems with the margin claims, given margins measured on the model (empty: they hold)."""
        if not self.repaired:
            return []
        spec = self.spec
        if len(margins_after) != len(self.points):
            return [f"the certificate lists {len(self.points)} repair points but {len(margins_after)} were given"]
        problems = []
        if spec["kind"] in ("pointwise", "ball"):
            problems += below_margin(margins_after, spec["margin"], "repair point(s) below the margin {m:g} on this model",
                                     "point {k}: {v:.6g}")
        claimed = np.array([p.margin_after for p in self.points], np.float64)
        problems += claims_off(claimed, margins_after, 1e-5, "repair point margin(s) differ from the certificate",
                               "point {k}: certified {c:.6g}, measured {v:.6g}")
        keep = self.keep
        if keep.count:
            if len(keep_margins_after) != keep.count:
                problems.append(f"the certificate lists {keep.count} keep points but {len(keep_margins_after)} were given")
            elif spec["keep"] == "hard" and spec["kind"] in ("pointwise", "ball") and (keep_margins_after < spec["keep_margin"]).any():
                problems.append(f"{int((keep_margins_after < spec['keep_margin']).sum())} keep point(s) below the keep margin "
                                f"{spec['keep_margin']:g}")
        return problems

    def __getitem__(self, key: str):
        """Read access as the dict of 0.1 (``certificate["status"]``), for one release, with a warning."""
        warnings.warn("a certificate is a cnnrepair.repair.Certificate now: read certificate.status (or to_dict()[key]), "
                      "not certificate[key]", DeprecationWarning, stacklevel=2)
        return self.to_dict()[key]


def witness_bound(problem: MarginProblem, witness: dict) -> float:
    """Recompute the certified lower bound from a certificate's multipliers."""
    if not witness or not witness.get("point"):
        return 0.0
    point, cls = np.asarray(witness["point"], np.int64), np.asarray(witness["class"], np.int64)
    rows = None
    if problem.has_boxes and (witness.get("directions") is not None or witness.get("pairs") is not None):
        from cnnrepair.repair.ball import pair_directions, sigma_rows

        C, n = problem.weight.shape
        dirs = (np.asarray(witness["directions"], np.float64).reshape(-1, C) if witness.get("directions") is not None
                else pair_directions(witness["pairs"], C))  # (a certificate from before output rows: class pairs)
        rows = sigma_rows(problem, point, cls, dirs, np.asarray(witness["sigma"], np.float64).reshape(-1, n))
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


# -- the certificate's shape -------------------------------------------------------------------------
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


def _file_ref(block: dict, where: str) -> None:
    _known(FileRef, block, where)
    _need(block, "file", str, where)
    _need(block, "sha256", str, where)


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
    _known(Certificate, cert, "certificate")
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
    if spec.get("later_biases", True) is not True:
        raise _Malformed("spec.later_biases is recorded only as true")
    if set(spec) - {"later_biases"} != used | {"keep"}:
        raise _Malformed(f"spec of kind {kind} must hold exactly {', '.join(sorted(used | {'keep'}))}")
    _need(spec, "keep", str, "spec")
    for key in used - {"kind"}:
        _need(spec, key, types[key], "spec", optional=key in ("keep_price", "max_change", "max_change_ratio"))
    _need(cert, "layer", str, "certificate")
    _need(cert, "layer_kind", str, "certificate")
    _numbers(_need(cert, "layer_shape", list, "certificate"), "layer_shape", int)
    for key in ("source_model", "points_file"):
        block = _need(cert, key, dict, "certificate")
        _file_ref(block, key)
    if status == "repaired":
        _file_ref(_need(cert, "model", dict, "certificate"), "model")
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
        _known(PointClaim, p, where)
        _need(p, "label", int, where)
        _need(p, "margin_before", float, where)
        _need(p, "margin_after", float, where)
        _need(p, "required", float, where, optional=targets)
        if spec["kind"] == "ball":
            _need(p, "certified_margin_before", float, where)
            _need(p, "certified_margin_after", float, where)
    keep = _known(KeepClaim, _need(cert, "keep", dict, "certificate"), "keep")
    count = _need(keep, "count", int, "keep")
    _numbers(_need(keep, "labels", list, "keep"), "keep.labels", int)
    if not targets:
        _numbers(_need(keep, "required", list, "keep"), "keep.required")
    for key in ("smallest_margin_before", "smallest_margin_after"):
        _need(keep, key, float, "keep", optional=not count)
    _need(keep, "labels_kept", int, "keep")
    if len(keep["labels"]) != count or (not targets and len(keep["required"]) != count):
        raise _Malformed(f"keep lists {len(keep['labels'])} labels and {len(keep.get('required', []))} requirements for {count} points")
    for key in ("balls_certified_before", "balls_certified_after", "below_keep_margin"):
        _need(keep, key, int, "keep", optional=True)
    if count or cert.get("keep_file") is not None:
        _file_ref(_need(cert, "keep_file", dict, "certificate"), "keep_file")
    if cert.get("margins_by_layout") is not None:
        _numbers(cert["margins_by_layout"], "margins_by_layout")
    _need(cert, "note", str, "certificate", optional=True)
    notes = _need(cert, "notes", list, "certificate", optional=True)
    if notes is not None and not all(isinstance(n, str) for n in notes):
        raise _Malformed("notes must be a list of strings")
    for key in ("lower_bound_witness", "feature_noise", "ball", "conditioning", "patterns", "output_rows"):
        _need(cert, key, dict, "certificate", optional=True)
    later = _need(cert, "later_biases", dict, "certificate", optional=True)
    if later is not None:
        tensors = _need(later, "tensors", list, "later_biases")
        if not all(isinstance(t, str) for t in tensors):
            raise _Malformed("later_biases.tensors must be a list of tensor names")
        for key in ("l1", "linf"):
            _need(later, key, float, "later_biases")
        _need(later, "nonzero", int, "later_biases")
    listed = (cert.get("patterns") or {}).get("keep_points_with_patterns")
    if listed is not None and not (isinstance(listed, list) and all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < count
                                                                    for k in listed)):
        raise _Malformed(f"patterns.keep_points_with_patterns must list keep point indices below {count}")
    for key in ("conflicts", "coinciding"):
        _need(cert, key, list, "certificate", optional=True)
    props = _need(cert, "properties", list, "certificate", optional=True)
    for k, entry in enumerate(props or []):
        where = f"properties[{k}]"
        if not isinstance(entry, dict) or set(entry) != {"file", "sha256", "set", "index"}:
            raise _Malformed(f"{where} must hold exactly file, sha256, set and index")
        _need(entry, "file", str, where)
        _need(entry, "sha256", str, where)
        if _need(entry, "set", str, where) not in ("points", "keep") or _need(entry, "index", int, where) < 0:
            raise _Malformed(f"{where}: set is points or keep, index a position in that file")
    ending = _need(cert, "ending", dict, "certificate", optional=True)
    if ending is not None:
        from cnnrepair.repair.ending import ENDINGS

        if set(ending) != {"name", "note"} or _need(ending, "name", str, "ending") not in ENDINGS:
            raise _Malformed(f"ending must hold exactly name (one of {', '.join(ENDINGS)}) and note")
        _need(ending, "note", str, "ending")
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
        if ball.get("boxes", "eps") not in ("eps", "points file") or ball.get("keep_boxes", "keep file") != "keep file":
            raise _Malformed("ball.boxes is 'eps' or 'points file' (where the input boxes come from), ball.keep_boxes only 'keep file'")
        for key in ("mean", "std", "domain", "point_eps"):
            value = _need(ball, key, list, "ball", optional=True)
            if value is not None:
                _numbers(value, f"ball.{key}")
        if ball.get("layout", "nchw") not in ("auto", "nchw", "nhwc"):
            raise _Malformed("ball.layout is 'nchw' or 'nhwc' (where the channels of mean / std are), or 'auto' for non-image inputs")
