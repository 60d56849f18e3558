"""The commands on model files: points, repair, verify, evaluate, vnnlib.

Each checks every input before it writes, and writes its output folder as one unit (see
:mod:`cnnrepair.outdir`): an error or Ctrl-C leaves nothing half-written."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from cnnrepair.bounds import METHODS as BOUND_METHODS
from cnnrepair.cli.common import Bars, Command, say
from cnnrepair.errors import CnnRepairError
from cnnrepair.outdir import names


def _add_model_repair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the classifier: a torch.export program (.pt2) with a dynamic batch dimension, an ONNX "
                   "file (.onnx), or a state dict (.pt/.pth) with --factory")
    p.add_argument("--points", type=Path, default=None, help=".npz with x (float32, N x input shape, model units) and y (int64 labels); "
                   "optional 'lower' / 'upper' (x's shape): each point's input box for the ball spec")
    _add_property_args(p, "VNN-LIB robustness properties instead of --points: the ones the model violates (or that are not proved) "
                          "are repaired as boxes, the proved ones kept (with --keep points too)")
    p.add_argument("--drop-conflicts", action="store_true", help="with --vnnlib / --instances: when the properties cannot all be "
                   "repaired together, drop the most violated of each conflicting set and repair the rest (recorded as dropped)")
    p.add_argument("--out", type=Path, required=True, help="folder for repaired.pt2 / repaired.onnx (the model's format) and certificate.json")
    p.add_argument("--spec", choices=["pointwise", "ball", "targets"], default=None,
                   help="pointwise: every point gets its label with --margin (guaranteed, minimal change); ball: every input "
                        "within --eps of a point does (certified through sound bounds); targets: the paper's program (default: "
                        "pointwise; ball with --vnnlib / --instances)")
    p.add_argument("--eps", type=float, default=None, help="ball spec: L-infinity radius in pixels (an 'eps' array in the points file "
                   "gives one per point, 0 for a pointwise point)")
    p.add_argument("--bounds", choices=BOUND_METHODS, default="crown", help="ball spec: how the features are bounded "
                   "over each ball: crown (linear relaxation, back-substituted), alpha-crown (its last walk's slopes optimised: tighter, "
                   "slower), alpha-crown-full (every walk's slopes optimised, as auto_LiRPA's alpha-CROWN: tighter still, much slower) "
                   "or ibp (intervals, fastest) (default: crown)")
    p.add_argument("--keep-eps", type=float, default=0.0, help="ball spec: keep points whose ball of this radius is certified before "
                   "the repair stay certified (default: 0, keep points keep their own label)")
    p.add_argument("--mean", default=None, help="ball spec: per-channel mean the model subtracts from [0, 1] pixels (the ball is in pixels)")
    p.add_argument("--std", default=None, help="ball spec: per-channel std the model divides by")
    p.add_argument("--layout", choices=["auto", "nchw", "nhwc"], default="auto",
                   help="ball spec: where an image input holds the channels of --mean/--std: nchw (after the batch axis) or nhwc "
                        "(last); auto takes the one axis whose size fits and refuses when both do (default: auto)")
    p.add_argument("--range", default="0,1", help="ball spec: the pixel range the ball is clipped to, LOW,HIGH or none (default: 0,1)")
    p.add_argument("--layer", default=None, help="the layer to repair: the one whose output is the model's output (default), or any linear or "
                   "convolution layer inside the network, its activation patterns kept at every repair point and at each keep point the "
                   "change would otherwise cost its margin (`cnnrepair layers MODEL` lists them)")
    p.add_argument("--margin", type=float, default=0.05, help="required logit[y] - max other logit of each point (default: 0.05)")
    p.add_argument("--keep", type=Path, default=None, help=".npz with x (and optional y; default: the model's predictions) whose labels must survive")
    p.add_argument("--keep-margin", type=float, default=0.0, help="margin the keep points must keep (default: 0)")
    p.add_argument("--keep-price", type=float, default=None, help="make keep points soft: price per unit of margin shortfall (default: hard)")
    p.add_argument("--norm", choices=["l1", "linf", "l1+linf"], default="l1",
                   help="measure of the change to minimise; l1+linf is PRDNN's mean|d| + max|d| (default: l1)")
    p.add_argument("--freeze-bias", action="store_true", help="change the weights only")
    p.add_argument("--later-biases", action="store_true",
                   help="with --layer inside the network: the biases of the layers after it may move too (APRNN's choice)")
    p.add_argument("--max-change", type=float, default=None, help="bound on each weight's change")
    p.add_argument("--max-change-ratio", type=float, default=1000.0,
                   help="a change whose largest entry exceeds this multiple of the layer's largest weight is ill-conditioned and "
                        "not certified (default: 1000)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds the solver may take (default: 3600)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads of the solve (default: CNNREPAIR_THREADS or 1)")
    p.add_argument("--device", default="auto",
                   help="where the pointwise solver factors its matrices: cpu, cuda, cuda:N or auto (default: CUDA when present, "
                        "else the CPU)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier repair's files in --out (never any other file)")
    _add_factory_arg(p)


def _add_property_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--vnnlib", type=Path, nargs="+", default=None, metavar="PROPERTY", help=what)
    p.add_argument("--instances", type=Path, default=None, help="VNN-COMP's instances.csv: the properties it lists for this model "
                   "(instead of --vnnlib)")


def _property_paths(args: argparse.Namespace) -> tuple[tuple[Path, ...], tuple[float, ...]]:
    """The VNN-LIB files of --vnnlib or --instances (for the model named first), and their timeouts (none for --vnnlib)."""
    vnnlib, instances = getattr(args, "vnnlib", None), getattr(args, "instances", None)
    if vnnlib and instances:
        raise CnnRepairError("give the properties with --vnnlib or with --instances, not both")
    if instances is not None:
        from cnnrepair.vnnlib.repair import instances_for

        model = getattr(args, "original", None) or args.model
        return instances_for(instances, model)
    return tuple(vnnlib or ()), ()


def _add_images_args(p: argparse.ArgumentParser) -> None:
    """Where ``points`` and ``evaluate`` take images from, and the model's input convention."""
    from cnnrepair.data import DATASETS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=list(DATASETS), help="a dataset the project loads (with --data-dir)")
    src.add_argument("--npz", type=Path, help=".npz with x (uint8 N x C x H x W, or floats in [0, 1]) and y (int labels)")
    p.add_argument("--data-dir", type=Path, default=None, help="where --dataset lies (IDX folder, CIFAR tarball or pickles, image folder)")
    p.add_argument("--split", choices=["test", "train"], default="test", help="which split to draw from (default: test)")
    p.add_argument("--mean", default=None, help="per-channel mean the model subtracts from [0, 1] pixels, e.g. 0.4914,0.4822,0.4465")
    p.add_argument("--std", default=None, help="per-channel std the model divides by")
    p.add_argument("--layout", choices=["auto", "nchw", "nhwc"], default="auto",
                   help="how the model lays out an image: nchw (channel planes, torch) or nhwc (channels last, TensorFlow); "
                        "auto reads it from the model's input shape and refuses when the shape cannot tell (default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")


def _add_factory_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--factory", default=None, help="for a state dict (.pt/.pth): module:function that builds the model")
    p.add_argument("--input-shape", default=None, help="for a TorchScript file (.ts): the per-example input shape, e.g. 1,28,28 "
                   "(default: the shape of the points or images given)")


def _input_shape(args: argparse.Namespace, fallback) -> tuple[int, ...] | None:
    if getattr(args, "input_shape", None):
        try:
            return tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise CnnRepairError(f"--input-shape {args.input_shape!r}: give comma-separated sizes, e.g. 1,28,28") from None
    return tuple(fallback) if fallback is not None else None


def _model_repair_job(args: argparse.Namespace):
    """Check every input of ``cnnrepair repair MODEL`` (nothing is written before this passes)."""
    from cnnrepair.bounds import BallInputs
    from cnnrepair.modelrepair import RepairFiles, output_dir, prepare
    from cnnrepair.repair import SolveOptions

    args.options = SolveOptions(args.time_limit, args.threads, device=args.device)
    props, timeouts = _property_paths(args)
    if props or args.points is None:
        return _property_job(args, props, timeouts)
    if args.drop_conflicts:
        raise CnnRepairError("--drop-conflicts drops VNN-LIB properties (--vnnlib / --instances) that conflict; with --points, "
                             "drop it (the certificate of an infeasible repair names the conflicting points)")
    args.spec = args.spec or "pointwise"
    output_dir(args.out, [args.model, args.points, args.keep], args.overwrite).check()
    if args.spec != "ball" and (args.eps is not None or args.mean is not None or args.std is not None or args.layout != "auto"):
        raise CnnRepairError("--eps, --mean, --std and --layout describe the ball spec's input balls; add --spec ball or drop them")
    mean, std = _convention(args)
    domain = _vnnlib_range(args.range)
    spec = _spec(args, args.spec)
    ball = BallInputs(mean, std, domain, args.layout) if args.spec == "ball" else None
    files = RepairFiles(args.model, args.points, args.keep, args.factory, _input_shape(args, None))
    args.job = prepare(files, spec, args.layer, ball)
    return args.job


def _spec(args: argparse.Namespace, kind: str):
    from cnnrepair.repair import RepairSpec

    return RepairSpec(kind=kind, margin=args.margin, keep_margin=args.keep_margin, keep_price=args.keep_price,
                      norm=args.norm, freeze_bias=args.freeze_bias, max_change=args.max_change, eps=args.eps or 0.0, bounds=args.bounds,
                      keep_eps=args.keep_eps, max_change_ratio=args.max_change_ratio, later_biases=args.later_biases)


def _property_job(args: argparse.Namespace, props: tuple, timeouts: tuple):
    """``cnnrepair repair MODEL --vnnlib ...``: the properties read and checked on the model (nothing written yet)."""
    from cnnrepair.outdir import OutputDir
    from cnnrepair.vnnlib.repair import PropertyFiles, owns, plan_properties

    if args.points is not None:
        raise CnnRepairError("give the repair points with --points or as VNN-LIB properties (--vnnlib / --instances), not both")
    if not props:
        raise CnnRepairError("give the repair points: --points P.npz, or VNN-LIB properties with --vnnlib P.vnnlib (or --instances instances.csv)")
    if args.spec not in (None, "ball"):
        raise CnnRepairError(f"VNN-LIB properties are input boxes, repaired with the ball spec; drop --spec {args.spec}")
    for flag, value in (("--eps", args.eps), ("--mean", args.mean), ("--std", args.std), ("--layer", args.layer),
                        ("--keep-eps", args.keep_eps or None), ("--layout", None if args.layout == "auto" else args.layout)):
        if value is not None:
            raise CnnRepairError(f"{flag} does not apply to VNN-LIB properties (their boxes are in the model's units and repair the "
                                 "last layer); drop it")
    args.spec = "ball"
    OutputDir(args.out, owns, args.overwrite, [args.model, *props, args.keep]).check()
    args.property_spec = _spec(args, "ball")
    args.plan = plan_properties(PropertyFiles(args.model, tuple(props), tuple(timeouts), args.factory, _input_shape(args, None),
                                              args.keep), args.bounds)
    return args.plan


def _cmd_property_repair(args: argparse.Namespace, bars: Bars) -> int:
    from cnnrepair.vnnlib.repair import repair_properties

    plan = args.plan
    counts = {s: sum(c.status == s for c in plan.checks) for s in ("violated", "holds", "unknown")}
    say(f"{len(plan.checks)} propert{'y' if len(plan.checks) == 1 else 'ies'} on {plan.model.path.name}: {counts['violated']} violated (a counterexample), "
        f"{counts['holds']} proved ({args.bounds} bounds), {counts['unknown']} unknown")
    t0 = time.perf_counter()
    done = repair_properties(plan, args.property_spec, args.out, replace(args.options, progress=bars), args.overwrite,
                             args.drop_conflicts)
    if done.certificate is None:
        say(f"every property is proved on the model already: nothing to repair; wrote {args.out / 'properties.json'}")
        return 0
    cert = done.certificate
    if cert.status != "repaired":
        say(f"not repaired ({cert.status}; {'; '.join(cert.notes or []) or 'see the certificate'}); no model written; "
            f"details in {args.out / 'certificate.json'}")
        return 1
    proved = sum(r.get("after") == "holds" for r in done.records)
    dropped = sum(r["role"] == "dropped" for r in done.records)
    say(f"repaired in {time.perf_counter() - t0:.1f}s: change {args.norm} {cert.objective:.6g} (certified >= {cert.lower_bound:.6g}); "
        f"{len(cert.points)} properties repaired, {cert.keep.count} kept" + (f", {dropped} dropped (they conflicted)" if dropped else ""))
    say(f"after: {proved} of {len(done.records)} properties proved on the saved model; wrote {args.out / cert.model.file}, "
        f"certificate.json, properties.json and proved_*.vnnlib with instances.csv (for any VNN-COMP verifier)")
    return 0


def _cmd_model_repair(args: argparse.Namespace, bars: Bars) -> int:
    from cnnrepair.modelrepair import run

    job = getattr(args, "job", None) or getattr(args, "plan", None) or _model_repair_job(args)
    if getattr(args, "plan", None) is not None:  # VNN-LIB properties in place of points
        return _cmd_property_repair(args, bars)
    say(f"repairing layer {job.layer!r} of {job.model.path.name} on {len(job.points.x)} points"
        + (f" (+{len(job.keep.x)} keep)" if job.keep is not None else "") + f", spec {job.spec.kind}, norm {job.spec.norm} ...")
    t0 = time.perf_counter()
    cert = run(job, args.out, replace(args.options, progress=bars), args.overwrite)
    dt = time.perf_counter() - t0
    notes = "; ".join(cert.notes or [])
    if cert.status == "repaired":
        ch, keep = cert.change, cert.keep
        low = min(p.margin_after for p in cert.points)
        if cert.ball is not None:
            worst = min(p.certified_margin_after for p in cert.points)
            say(f"every input of the {len(cert.points)} balls (eps {job.spec.eps:g}, {job.spec.bounds} bounds) keeps its label: "
                f"smallest certified margin {worst:.4g}")
        bound = ("the paper's program: nothing guaranteed" if cert.lower_bound is None else
                 f"certified >= {cert.lower_bound:.6g}, gap {cert.gap:.1e}")
        say(f"repaired in {dt:.1f}s: {len(cert.points)} points, smallest margin {low:.4g} on the saved model; "
            f"change {job.spec.norm} {ch['l1'] if cert.lower_bound is None else cert.objective:.6g} ({bound}), "
            f"{ch['nonzero']} numbers changed")
        if keep.count:
            say(f"keep points: {keep.labels_kept}/{keep.count} keep their label, smallest margin {keep.smallest_margin_after:.4g}")
        if keep.balls_certified_before is not None:
            say(f"keep balls (eps {job.spec.keep_eps:g}): {keep.balls_certified_after}/{keep.balls_certified_before} "
                "certified before stay certified")
        say(f"wrote {args.out / cert.model.file} and {args.out / 'certificate.json'}")
        return 0
    if cert.status == "infeasible":
        conf = ", ".join(f"{c['set']}[{c['index']}] (label {c['label']})" for c in (cert.conflicts or [])[:12])
        minimal = ("" if cert.solver.get("conflicts_irreducible", True) else
                   f" ({cert.solver.get('conflicts_note', 'the search for a smaller set stopped at its time limit')})")
        which = (f"these points conflict{minimal}: {conf}" if conf else
                 "the program is infeasible as a whole, and no smaller conflicting set was isolated")
        kept = ""
        if cert.patterns is not None:  # a layer inside the network: infeasible with the activation patterns kept
            n = len(cert.patterns.get("keep_points_with_patterns") or [])
            kept = f" that keeps the activation patterns of the repair points{f' and of {n} keep points' if n else ''}"
        say(f"infeasible: no change of layer {job.layer!r}{kept} meets the spec; {which}. "
            f"No model written; details in {args.out / 'certificate.json'}")
        return 1
    if cert.status == "ill-conditioned":
        say(f"not certified: {notes}. Details in {args.out / 'certificate.json'}")
        return 1
    say(f"repair failed ({cert.solver['status']}; {notes}); no model written; see {args.out / 'certificate.json'}")
    return 1


def _cmd_verify(args: argparse.Namespace, bars: Bars) -> int:
    from cnnrepair.verify import verify_certificate

    report = verify_certificate(args.certificate, args.model, args.points, args.keep, args.original, args.factory,
                                properties=_property_paths(args)[0])
    if report.problems:
        for p in report.problems:
            say(f"FAILED: {p}")
        return 1
    say(f"certificate holds (checked: {'; '.join(report.checked)})")
    if report.unchecked:
        say(f"not checked: {'; '.join(report.unchecked)}")
    return 0


def _vnnlib_range(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise CnnRepairError(f"--range {text!r}: give LOW,HIGH (e.g. 0,1) or none") from None
    return lo, hi


def _cmd_vnnlib(args: argparse.Namespace, bars: Bars) -> int:
    from cnnrepair.bounds import BallInputs
    from cnnrepair.formats import load_model
    from cnnrepair.modelrepair import load_points
    from cnnrepair.repair.measure import model_logits
    from cnnrepair.vnnlib import check_timeout, write_boxes

    outdir = _out(args, names("instances.csv", suffixes=(".vnnlib",)), [args.model, args.points], "properties")
    check_timeout(args.timeout)
    mean, std = _convention(args)
    ball = BallInputs(mean, std, _vnnlib_range(args.range), args.layout)  # checks the range before anything is loaded
    points = load_points(args.points, "points file", labels_required=False)
    model = load_model(args.model, args.factory, _input_shape(args, points.x.shape[1:]))
    if model.input_shape is not None and tuple(points.x.shape[1:]) != model.input_shape:
        raise CnnRepairError(f"{args.points}: inputs of shape {tuple(points.x.shape[1:])} but the model takes {model.input_shape}")
    logits = model_logits(model.module, points.x[:1] if points.y is not None else points.x)
    labels = points.y if points.y is not None else logits.argmax(1)
    lo, hi = ball.boxes(points.x, args.eps)  # the pixel ball, in the model's units, per channel (eps checked there)
    with outdir as stage:
        paths = write_boxes(args.model, lo.numpy(), hi.numpy(), labels, logits.shape[1], stage, args.timeout)
    say(f"wrote {len(paths)} properties and instances.csv to {args.out} (unsat = every input of the ball keeps its label)")
    return 0


def _floats(text: str | None, name: str, example: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise CnnRepairError(f"--{name} {text!r}: give comma-separated numbers, e.g. {example}") from None


def _convention(args: argparse.Namespace) -> tuple:
    """The model's per-channel --mean and --std, parsed before anything is loaded."""
    return _floats(args.mean, "mean", "0.4914,0.4822,0.4465"), _floats(args.std, "std", "0.247,0.243,0.261")


def _out(args: argparse.Namespace, owns, inputs: list, what: str):
    """The command's --out, checked before any work: new or empty, or (with --overwrite) holding only
    this command's earlier results, never an input (see cnnrepair.outdir)."""
    from cnnrepair.outdir import OutputDir

    outdir = OutputDir(args.out, owns, args.overwrite, inputs, what=what)
    outdir.check()
    return outdir


def _points_images(args: argparse.Namespace, split: str | None = None) -> tuple:
    """uint8 images and labels of the chosen split (``split``, default ``--split``), and where they came from."""
    import numpy as np

    from cnnrepair.data import load_dataset
    from cnnrepair.io import load_npz

    if args.npz is not None:
        data = load_npz(args.npz, "image file")
        if "x" not in data or "y" not in data:
            raise CnnRepairError(f"{args.npz}: needs arrays x (images) and y (labels)")
        x, y = data["x"], data["y"]
        if x.ndim != 4 or len(x) != len(y):
            raise CnnRepairError(f"{args.npz}: x must be N x C x H x W with one label per image (got {x.shape}, {y.shape})")
        if np.issubdtype(x.dtype, np.floating):
            if x.min() < 0 or x.max() > 1:
                raise CnnRepairError(f"{args.npz}: float images must lie in [0, 1]; the model's own normalisation goes in --mean/--std")
            x = np.round(x * 255).astype(np.uint8)
        return x.astype(np.uint8), y.astype(np.int64), str(args.npz)
    ds = load_dataset(args.dataset, args.data_dir)
    if (split or args.split) == "test":
        return ds.x_test, ds.y_test, f"{ds.name} test ({ds.source})"
    return ds.x_train, ds.y_train, f"{ds.name} train ({ds.source})"


def _cmd_points(args: argparse.Namespace, bars: Bars) -> int:
    import numpy as np

    from cnnrepair.formats import load_model
    from cnnrepair.io import save_npz, sha256, write_json
    from cnnrepair.points import InputSpec, PointsSettings, make_points

    outdir = _out(args, names("points.npz", "keep.npz", "held_out.npz", "points.json"),
                  [args.model, getattr(args, "npz", None)], "points (points.json / *.npz)")
    mean, std = _convention(args)
    keep_split = args.keep_split if args.npz is None else args.split  # one image file: keep points from it, never a repair source
    settings = PointsSettings(args.kind, args.n, args.keep, args.held_out, args.eps, args.split, args.seed, keep_split=keep_split,
                              keep_kind=args.keep_kind, keep_eps=args.keep_eps)
    settings.check()
    images, labels, source = _points_images(args)
    model = load_model(args.model, args.factory, _input_shape(args, images.shape[1:]))
    spec = InputSpec(mean, std, model.input_shape, args.layout)
    spec.check(tuple(images.shape[1:]))
    keep_pool = None
    if keep_split != args.split:
        keep_images, keep_labels, _ = _points_images(args, keep_split)
        keep_pool = (keep_images, keep_labels)
    made = make_points(model.module, images, labels, spec, settings, bars, keep_pool)
    here = args.split if args.npz is None else f"npz:{args.npz.name}"  # what evaluate matches recorded indices against
    split, kept = np.array(here), np.array(here if keep_pool is None else made.info["keep_split"])
    with outdir as stage:
        save_npz(stage / "points.npz", x=made.x, y=made.y, index=made.index, split=split)
        save_npz(stage / "keep.npz", x=made.keep_x, y=made.keep_y, index=made.keep_index, split=kept)
        if settings.held_out:
            save_npz(stage / "held_out.npz", x=made.held_x, y=made.held_y, index=made.held_index, split=split)
        write_json(stage / "points.json", {**made.info, "model": {"file": args.model.name, "sha256": sha256(args.model)},
                                           "data": source, "split": args.split})
    for warning in made.info["warnings"]:
        say(f"warning: {warning}")
    say(f"wrote {len(made.y)} {args.kind} points and {len(made.keep_y)} keep points to {args.out} "
        f"(clean accuracy {100 * made.info['clean_accuracy']:.2f}%); next: cnnrepair repair {args.model} "
        f"--points {args.out / 'points.npz'} --keep {args.out / 'keep.npz'} --out DIR")
    return 0


def _cmd_evaluate(args: argparse.Namespace, bars: Bars) -> int:
    from cnnrepair.assess import AssessSettings, assess, plot_report
    from cnnrepair.formats import load_model
    from cnnrepair.io import sha256, write_json
    from cnnrepair.points import InputSpec

    outdir = _out(args, names("report.json", "report.png"), [args.model, args.repaired, args.points, args.held_out, args.keep,
                                                              getattr(args, "npz", None)], "a report (report.json / report.png)")
    mean, std = _convention(args)
    eps = list(_floats(args.eps, "eps", "0.05,0.1") or ())
    settings = AssessSettings(eps, args.attack, args.n, args.seed, certify=args.certify,
                              split=args.split if args.npz is None else f"npz:{args.npz.name}", scheduler=args.scheduler)
    settings.check()
    images, labels, source = _points_images(args)
    shape = _input_shape(args, images.shape[1:])
    models = {"original": load_model(args.model, args.factory, shape)}
    if args.repaired is not None:
        models["repaired"] = load_model(args.repaired, args.factory, shape)
    spec = InputSpec(mean, std, models["original"].input_shape, args.layout)
    sets = {name: _point_set(path, what, name != "keep") for name, path, what in (("points", args.points, "points file"),
                                                                               ("keep", args.keep, "keep file"),
                                                                               ("held_out", args.held_out, "held-out file"))
            if path is not None}  # each file read once
    report = assess({k: m.module for k, m in models.items()}, images, labels, spec, settings, sets, bars)
    report.update(data=source, split=args.split, files={k: {"file": m.path.name, "sha256": sha256(m.path)} for k, m in models.items()})
    with outdir as stage:
        write_json(stage / "report.json", report)
        plot_report(report, stage / "report.png")
    for name, r in report["models"].items():
        extra = "".join(f", {k} {r[k]:.2f}" for k in ("drawdown", "generalisation") if k in r)
        eff = f", efficacy {100 * r['efficacy']:.1f}%" if "efficacy" in r else ""
        attacked = ", ".join(f"eps {e}: {100 * a:.2f}%" for e, a in r["attack"].items())
        cert = "; certified " + ", ".join(f"eps {e}: {100 * a:.2f}%" for e, a in r["certified"].items()) if "certified" in r else ""
        say(f"{name}: clean {100 * r['clean_accuracy']:.2f}%, {args.attack} {attacked}{cert}{eff}{extra}")
    used = report["images_used"]
    left = ", ".join(f"{n} {c}" for n, c in used["excluded"].items())
    say(f"measured on {used['count']} {source} images" + (f" that no point set was made from (left out: {left})" if left else ""))
    for warning in report["warnings"]:
        say(f"warning: {warning}")
    say(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 0


def _point_set(path: Path, what: str, labels_required: bool):
    """A points file as evaluate measures and avoids it: inputs, labels, and the source indices and split `cnnrepair points` recorded."""
    from cnnrepair.assess import PointSet
    from cnnrepair.io import load_npz
    from cnnrepair.modelrepair import load_points

    pts = load_points(path, what, labels_required=labels_required)
    data = load_npz(path, what)
    split = str(data["split"]) if "split" in data and data["split"].ndim == 0 else None
    index = data["index"].reshape(-1) if "index" in data and len(data["index"].reshape(-1)) == len(pts.x) else None
    return PointSet(pts.x.numpy(), pts.y, index, split)


def _cmd_layers(args: argparse.Namespace, bars: Bars) -> int:
    import json

    import torch

    from cnnrepair.formats import load_model
    from cnnrepair.repair.suffix import repairable_layers
    from cnnrepair.repair.layer import ending_layer

    model = load_model(args.model, args.factory, _input_shape(args, None))
    shape = _input_shape(args, model.input_shape)
    if shape is None:
        raise CnnRepairError(f"{args.model}: the file does not record its input shape; give it with --input-shape, e.g. 1,28,28")
    sample = torch.zeros(2, *shape)
    infos = repairable_layers(model.module, sample)
    last = ending_layer(model.module, sample)
    if args.json:
        print(json.dumps([{**info.as_dict(), "ends_model": info.name == last} for info in infos]))
        return 0
    for info in infos:
        mark = "  (ends the model: the default layer)" if info.name == last else ""
        after = f"; before {', '.join(info.after)}" if info.after else ""
        print(f"{info.name}\t{info.kind}\tweight {'x'.join(map(str, info.weight_shape))}{after}{mark}")
    return 0


def _configure_layers(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the classifier (.pt2, .onnx, .ts, or .pt/.pth with --factory)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects (name, kind, weight_shape, after, ends_model)")
    _add_factory_arg(p)


def _configure_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("certificate", type=Path, help="certificate.json written by cnnrepair repair")
    p.add_argument("--model", type=Path, required=True, help="the repaired model file the certificate names")
    p.add_argument("--points", type=Path, required=True, help="the repair points (.npz with x, y)")
    p.add_argument("--keep", type=Path, default=None, help="the keep points, if the repair had any")
    p.add_argument("--original", type=Path, default=None, help="the model before repair: also checks that only the layer changed, "
                   "the change's norm, and the certified lower bound")
    _add_property_args(p, "the VNN-LIB files a property repair was made from (checks each box and label against the points files)")
    _add_factory_arg(p)


def _configure_points(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the classifier (.pt2 or .onnx)")
    _add_images_args(p)
    p.add_argument("--kind", choices=["misclassified", "fgsm", "pgd", "fog"], default="misclassified",
                   help="which images become repair points (default: misclassified)")
    p.add_argument("--eps", type=float, default=None, help="attack radius in pixel units (fgsm, pgd)")
    p.add_argument("--n", type=int, default=100, help="repair points to make (default 100)")
    p.add_argument("--keep", type=int, default=1000, help="keep points: clean images the model gets right (default 1000)")
    p.add_argument("--keep-split", choices=["train", "test"], default="train",
                   help="the split keep points come from (default: train, so an evaluation on the test split never sees them)")
    p.add_argument("--keep-kind", choices=["clean", "fgsm", "pgd"], default="clean",
                   help="keep points: clean images, or adversarial examples at --keep-eps the model still gets right, which hold "
                        "its robustness there (default: clean)")
    p.add_argument("--keep-eps", type=float, default=None, help="attack radius of adversarial keep points, pixels")
    p.add_argument("--held-out", type=int, default=0, help="more points of the same kind, not repaired, to measure generalisation (held_out.npz)")
    p.add_argument("--out", type=Path, required=True, help="folder for points.npz, keep.npz and points.json")
    _add_factory_arg(p)


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the original classifier (.pt2, .onnx, or .pt/.pth with --factory)")
    p.add_argument("--repaired", type=Path, default=None, help="the repaired model, compared with the original on the same images")
    _add_images_args(p)
    p.add_argument("--eps", default="0.05,0.1", help="attack radii in pixel units, comma-separated (default 0.05,0.1)")
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="fgsm")
    p.add_argument("--certify", choices=BOUND_METHODS, default=None,
                   help="also report certified accuracy at each --eps: images whose whole ball provably keeps the label")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="with --certify: a Dask scheduler (tcp://host:8786) whose workers bound batches of the images")
    p.add_argument("--n", type=int, default=1000, help="test images (a seeded slice; default 1000)")
    p.add_argument("--points", type=Path, default=None, help="the repair points (efficacy)")
    p.add_argument("--held-out", type=Path, default=None, help="held-out points of the same kind (generalisation)")
    p.add_argument("--keep", type=Path, default=None, help="the repair's keep points: their images are left out of the evaluation")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.png")
    _add_factory_arg(p)


def _configure_vnnlib(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the model the properties are about (.onnx for most verifiers, or .pt2)")
    p.add_argument("--points", type=Path, required=True, help=".npz with x (model units) and optional y (default: the model's labels)")
    p.add_argument("--eps", type=float, required=True, help="L-inf radius of each ball, in pixels (the model's input units when "
                   "it takes pixels as they are)")
    p.add_argument("--mean", default=None, help="per-channel mean the model subtracts from [0, 1] pixels: the ball is taken in "
                   "pixels and written in the model's units")
    p.add_argument("--std", default=None, help="per-channel std the model divides by")
    p.add_argument("--layout", choices=["auto", "nchw", "nhwc"], default="auto",
                   help="where an image input holds the channels of --mean/--std: nchw or nhwc; auto takes the one axis whose size "
                        "fits and refuses when both do (default: auto)")
    p.add_argument("--range", default="0,1", help="pixel range the balls are clipped to, LOW,HIGH, or 'none' (default: 0,1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per property written to instances.csv (default 60)")
    p.add_argument("--out", type=Path, required=True, help="folder for point_<i>.vnnlib and instances.csv")
    p.add_argument("--overwrite", action="store_true", help="replace properties already in --out")
    _add_factory_arg(p)


COMMANDS: list[Command] = [
    Command("repair", "repair the last linear layer of a model file so that given points get their labels (certified)",
            _add_model_repair_args, _cmd_model_repair, _model_repair_job, on_files=True),
    Command("layers", "list the layers repair can edit (--layer NAME): name, kind, weight shape, the layers after it",
            _configure_layers, _cmd_layers, on_files=True),
    Command("verify", "re-check a repair certificate against a model file and the points", _configure_verify, _cmd_verify, on_files=True),
    Command("points", "make POINTS.npz (and KEEP.npz) for cnnrepair repair from a model and a dataset", _configure_points, _cmd_points,
            on_files=True),
    Command("evaluate", "clean and attacked accuracy of a model and its repair, with efficacy, drawdown and generalisation",
            _configure_evaluate, _cmd_evaluate, on_files=True),
    Command("vnnlib", "write VNN-LIB robustness properties (one L-inf ball per point) for any VNN-COMP verifier", _configure_vnnlib,
            _cmd_vnnlib, on_files=True),
]
