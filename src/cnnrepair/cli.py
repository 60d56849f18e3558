"""The ``cnnrepair`` command: argument parsing, progress bars and error reporting around the library."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cnnrepair.errors import CnnRepairError
from cnnrepair.outdir import disk_error, names
from cnnrepair.runtime import check_threads

EPILOG = """examples:
  cnnrepair reproduce                                   # whole pipeline on the embedded 8x8 digits
  cnnrepair reproduce --dataset mnist --data-dir ../shared/datasets/mnist --out runs/mnist
  cnnrepair train --dataset cifar10 --data-dir ../shared/datasets/cifar10-jpeg.tar.gz --out runs/cifar10 --epochs 12
  cnnrepair hybrid --out runs/cifar10 --kh-train-size 10000
  cnnrepair repair model.pt2 --points wrong.npz --keep clean.npz --out repaired/   # any classifier's last layer
  cnnrepair verify repaired/certificate.json --model repaired/repaired.pt2 --points wrong.npz --keep clean.npz
  cnnrepair repair model.onnx --points wrong.npz --out repaired/                   # ONNX in, repaired/repaired.onnx out
  cnnrepair vnnlib repaired/repaired.onnx --points wrong.npz --eps 0.01 --out props/  # properties for any VNN-COMP verifier
"""


class _Bars:
    """Maps the library's ``progress(desc, done, total)`` calls onto tqdm bars on stderr."""

    def __init__(self, enabled: bool, tty: bool):
        self.enabled = enabled
        self.tty = tty
        self.bar = None
        self.desc = None
        self.last = 0.0

    def __call__(self, desc: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if not self.tty:  # logs: one line every 15 s and at the end of each step
            now = time.monotonic()
            if done >= total or now - self.last > 15:
                self.last = now
                _say(f"  {desc}: {done}/{total}")
            return
        from tqdm import tqdm

        if desc != self.desc or self.bar is None:
            self.close()
            self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
            self.desc = desc
        self.bar.n = done
        self.bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar, self.desc = None, None


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from cnnrepair.data import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default="digits", help="dataset (default: digits, embedded, needs no files)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="dataset location: IDX folder (MNIST-style), cifar-10-batches-py folder, image-folder tree or its .tar.gz "
                        "(default: $CNNREPAIR_DATA/<dataset>, ./data/<dataset>, ../shared/datasets/...)")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where networks run: cpu, cuda, cuda:N or auto (default: CUDA when present, else the CPU)")


def _device(args: argparse.Namespace, run, stage: str):
    """The checked --device, recorded in the run's results for ``stage`` (figures name the hardware that made them)."""
    import torch

    from cnnrepair.training import resolve_device

    dev = resolve_device(getattr(args, "device", None))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    run.update_results(devices={**run.results.get("devices", {}), stage: f"{dev} ({name})"})
    return dev


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, help="mnist-nn, cifar10-nn or digits-nn (default: the dataset's)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the dataset's recipe)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and augmentation (default 0)")


def _add_hybrid_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lh-c", type=float, default=0.01, help="C of the linear SVM (LH), on standardised features (default 0.01)")
    p.add_argument("--kh-c", type=float, default=10.0, help="C of the RBF SVM (KH) (default 10)")
    p.add_argument("--kh-train-size", type=int, default=None,
                   help="fit KH on a stratified subset of this many training features (faster; default: all, exact)")
    p.add_argument("--no-kh", action="store_true", help="skip KH (exact RBF SVC is slow on large feature sets)")
    p.add_argument("--svm-jobs", type=int, default=1,
                   help="processes fitting LH's one-vs-rest classes in parallel (same weights; default 1, -1: every core)")


def _list_of(kind: type, what: str, example: str) -> Callable[[str], list]:
    """An argparse type for comma-separated lists of ``kind``."""

    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {what} (e.g. {example})") from None

    return parse


_eps_list = _list_of(float, "numbers", "0.025,0.05")
_int_list = _list_of(int, "integers", "1,50")


def _add_attack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--attacks", default="fgsm,pgd", help="comma-separated attacks: fgsm (the paper's), pgd (default: fgsm,pgd)")
    p.add_argument("--eps", type=_eps_list, default=None,
                   help="comma-separated epsilons on the [0, 1] pixel scale (default: the paper's grid for the dataset)")
    p.add_argument("--attack-images", type=int, default=None, help="attack a seeded slice of this many test images (default: all)")
    p.add_argument("--pgd-images", type=int, default=None, help="slice for PGD alone, which costs --pgd-steps times FGSM (default: --attack-images)")
    p.add_argument("--pgd-steps", type=int, default=20, help="PGD iterations (default 20, step 2.5*eps/steps, random start)")


def _add_repair_args(p: argparse.ArgumentParser) -> None:
    from cnnrepair.repair import SOLVERS

    p.add_argument("--repair-eps", type=_eps_list, default=None, help="epsilons to repair at (default: the attack grid)")
    p.add_argument("--k", type=_int_list, default=[1, 50], help="numbers of repair points, comma-separated (default 1,50; the paper used 1)")
    p.add_argument("--selection", default="none,wilcoxon", help="feature selection variants: none, wilcoxon (default: both)")
    p.add_argument("--select-p", type=float, default=0.1, help="Wilcoxon p-value threshold (default 0.1, the paper's)")
    p.add_argument("--target", choices=["clean", "label"], default="clean",
                   help="target decision values: LH's on the clean image (default) or +-1 one-vs-rest margins")
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="LP solver (default auto: HiGHS simplex for few points, our certified interior point for many; cvxopt is the paper's)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per class LP before giving up")
    p.add_argument("--eval-images", type=int, default=None, help="evaluate on a seeded slice of this many test images (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="class LPs solved in parallel (default 1)")
    p.add_argument("--anchors", choices=["none", "pairs"], default="none",
                   help="pairs: also keep each repair point's clean image at LH's values (beyond the paper; default none)")
    p.add_argument("--points", choices=["random", "typical"], default="random",
                   help="which repair points come first: random (seeded; default) or typical (feature shift closest to the pool's mean)")
    p.add_argument("--spec", choices=["targets", "pointwise"], default="targets",
                   help="targets: the paper's program (default); pointwise: every repair point gets its label with --margin, "
                        "anchors keep LH's label, minimal L1 change (needs --selection none)")
    p.add_argument("--margin", type=float, default=0.05, help="margin of the pointwise spec (default 0.05)")
    p.add_argument("--extra-anchors", type=int, default=0, help="clean training images whose LH values the repair must keep (default 0)")
    p.add_argument("--delta-weight", type=float, default=1.0,
                   help="price of one unit of slack against one unit of |gamma| (lambda; default 1, the paper's objective)")
    p.add_argument("--anchor-weight", type=_eps_list, default=[1.0],
                   help="slack price of anchor points relative to repair points (default 1); several, comma-separated, are "
                        "calibrated: the smallest within --drawdown-budget on held-out training images is kept")
    p.add_argument("--drawdown-budget", type=float, default=0.5,
                   help="points of clean accuracy calibration may lose on held-out training images (default 0.5)")
    p.add_argument("--min-point-eps", type=float, default=0.0,
                   help="attack training images for repair points at no less than this epsilon (default 0: the repair epsilon)")
    p.add_argument("--val-images", type=int, default=10000, help="held-out clean training images for calibration (default 10000)")
    p.add_argument("--threads", type=int, default=None,
                   help="BLAS/OpenMP threads for the LP solves (default: $CNNREPAIR_THREADS, else 1; see docs/results.md, Threads)")
    p.add_argument("--variant", default=None,
                   help="keep this repair beside the run's main one under this name (e.g. anchored): its own entries, "
                        "results and figure, nothing promoted to models/rlh.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace repair results made with other settings (default: refuse, so no result is lost)")


def _train_settings(args: argparse.Namespace):
    """The training recipe with the user's overrides, checked."""
    from cnnrepair.pipeline import train_config

    cfg = train_config(args.dataset, {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed})
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise CnnRepairError(f"--epochs and --batch-size must be >= 1 and --lr > 0 (got {cfg.epochs}, {cfg.batch_size}, {cfg.lr})")
    return cfg


def _check_hybrid(args: argparse.Namespace) -> None:
    if args.lh_c <= 0 or args.kh_c <= 0:
        raise CnnRepairError(f"--lh-c and --kh-c must be > 0 (got {args.lh_c}, {args.kh_c})")
    if args.svm_jobs == 0 or args.svm_jobs < -1:
        raise CnnRepairError(f"--svm-jobs must be >= 1, or -1 for every core (got {args.svm_jobs})")
    if args.kh_train_size is not None and args.kh_train_size < 20:
        raise CnnRepairError(f"--kh-train-size {args.kh_train_size} is too small; use at least 10 per class (e.g. 1000)")


def _attack_plan(args: argparse.Namespace, dataset: str) -> tuple[list[str], list[float]]:
    """Checked attack names and epsilons (the dataset's paper grid unless --eps is given)."""
    from cnnrepair.attacks import PAPER_EPS, check_eps, get_attack

    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    if not names:
        raise CnnRepairError("--attacks names no attack; give e.g. fgsm,pgd")
    for n in names:
        get_attack(n, steps=args.pgd_steps)
    for n in (args.attack_images, args.pgd_images):
        if n is not None and n < 1:
            raise CnnRepairError(f"--attack-images/--pgd-images must be >= 1 (got {n})")
    eps = args.eps if args.eps is not None else PAPER_EPS.get(dataset, PAPER_EPS["mnist"])
    if not eps:
        raise CnnRepairError("--eps names no epsilon; give e.g. 0.05,0.1")
    return names, [check_eps(e) for e in eps]


def _repair_settings(args: argparse.Namespace, dataset: str, seed: int):
    """The repair options gathered into RepairSettings, which checks them (before any work starts)."""
    from cnnrepair.attacks import PAPER_EPS
    from cnnrepair.experiment import RepairSettings

    eps = args.repair_eps or getattr(args, "eps", None) or PAPER_EPS.get(dataset, PAPER_EPS["mnist"])
    selections = [v.strip() for v in args.selection.split(",") if v.strip()]
    weights = sorted(set(args.anchor_weight or []))
    several = len(weights) > 1
    if several and args.drawdown_budget < 0:  # the library takes a negative budget as "never met"; the command refuses it
        raise CnnRepairError("--drawdown-budget must be >= 0 and --val-images >= 1")
    return RepairSettings(eps=list(eps), ks=sorted(set(args.k or [])), selections=selections, solver=args.solver, target=args.target,
                          select_p=args.select_p, eval_images=args.eval_images, time_limit=args.time_limit,
                          n_jobs=args.jobs, seed=seed, spec=args.spec, margin=args.margin, anchors=args.anchors, points=args.points,
                          extra_anchors=args.extra_anchors, anchor_weight=max(weights) if weights else 0.0,
                          anchor_weights=weights if several else [],
                          drawdown_budget=args.drawdown_budget, val_images=args.val_images, delta_weight=args.delta_weight,
                          min_point_eps=args.min_point_eps or 0.0, threads=args.threads)


def validate(args: argparse.Namespace) -> None:
    """Check every option and the run directory before any long work starts (one-line errors)."""
    from cnnrepair.pipeline import check_repair_target
    from cnnrepair.rundir import RunDir

    cmd = args.command
    if cmd in ("download", "verify", "vnnlib", "points", "evaluate"):
        return
    if cmd == "repair":
        _model_repair_job(args)
        return
    if cmd == "reproduce":
        args.out = args.out or Path("runs") / args.dataset
    run = RunDir(args.out)
    if hasattr(args, "device"):
        from cnnrepair.training import resolve_device

        resolve_device(args.device)
    if cmd in ("reproduce", "train"):
        run.check(args.dataset)
        _train_settings(args)
        dataset, seed = args.dataset, args.seed
    else:
        cfg = run.require()
        run.check()
        dataset, seed = cfg["dataset"], cfg.get("seed", 0)
    if cmd in ("reproduce", "hybrid"):
        _check_hybrid(args)
    if cmd in ("reproduce", "attack"):
        _attack_plan(args, dataset)
    if cmd in ("reproduce", "repair-sweep"):
        settings = _repair_settings(args, dataset, seed)
        check_repair_target(run, settings, args.variant, args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="cnnrepair",
        description="Repair the last linear layer of any classifier's model file with a certificate anyone can re-check "
                    "(points, repair, verify, evaluate, vnnlib), and reproduce Guidotti & Leofante 2020 (reproduce, train, "
                    "hybrid, attack, repair-sweep, export: each writes into one run directory, --out).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from cnnrepair import __version__

    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--version", action="version", version=f"cnnrepair {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:  # --quiet works before or after the command
        return sub.add_parser(name, parents=[common], **kw)

    p = add_parser("reproduce", help="run every stage: train, hybrids (LH, KH), attack sweeps, export", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<dataset>)")
    _add_train_args(p)
    _add_hybrid_args(p)
    _add_attack_args(p)
    _add_repair_args(p)

    p = add_parser("train", help="train the dataset's CNN (resumes from the run's checkpoint)")
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    _add_train_args(p)

    p = add_parser("hybrid", help="fit LH (linear SVM) and KH (RBF SVM) heads on a trained run's features")
    p.add_argument("--out", type=Path, required=True, help="run directory of a trained CNN")
    _add_device_arg(p)
    _add_hybrid_args(p)

    p = add_parser("attack", help="sweep attacks over epsilon on every model of a run (paper figure 2) with the transfer matrix")
    p.add_argument("--out", type=Path, required=True, help="run directory with a trained CNN (and hybrids)")
    p.add_argument("--models", default=None, help="comma-separated models to attack: nn, lh, kh, rlh (default: all in the run)")
    _add_device_arg(p)
    _add_attack_args(p)

    p = add_parser("repair", help="repair the last linear layer of a model file so that given points get their labels (certified)")
    _add_model_repair_args(p)

    p = add_parser("verify", help="re-check a repair certificate against a model file and the points")
    p.add_argument("certificate", type=Path, help="certificate.json written by cnnrepair repair")
    p.add_argument("--model", type=Path, required=True, help="the repaired model file the certificate names")
    p.add_argument("--points", type=Path, required=True, help="the repair points (.npz with x, y)")
    p.add_argument("--keep", type=Path, default=None, help="the keep points, if the repair had any")
    p.add_argument("--original", type=Path, default=None, help="the model before repair: also checks that only the layer changed, "
                   "the change's norm, and the certified lower bound")
    _add_factory_arg(p)

    p = add_parser("points", help="make POINTS.npz (and KEEP.npz) for cnnrepair repair from a model and a dataset")
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

    p = add_parser("evaluate", help="clean and attacked accuracy of a model and its repair, with efficacy, drawdown and generalisation")
    p.add_argument("model", type=Path, help="the original classifier (.pt2, .onnx, or .pt/.pth with --factory)")
    p.add_argument("--repaired", type=Path, default=None, help="the repaired model, compared with the original on the same images")
    _add_images_args(p)
    p.add_argument("--eps", default="0.05,0.1", help="attack radii in pixel units, comma-separated (default 0.05,0.1)")
    p.add_argument("--attack", choices=["fgsm", "pgd"], default="fgsm")
    p.add_argument("--certify", choices=["ibp", "crown"], default=None,
                   help="also report certified accuracy at each --eps: images whose whole ball provably keeps the label")
    p.add_argument("--n", type=int, default=1000, help="test images (a seeded slice; default 1000)")
    p.add_argument("--points", type=Path, default=None, help="the repair points (efficacy)")
    p.add_argument("--held-out", type=Path, default=None, help="held-out points of the same kind (generalisation)")
    p.add_argument("--keep", type=Path, default=None, help="the repair's keep points: their images are left out of the evaluation")
    p.add_argument("--out", type=Path, required=True, help="folder for report.json and report.png")
    _add_factory_arg(p)

    p = add_parser("vnnlib", help="write VNN-LIB robustness properties (one L-inf ball per point) for any VNN-COMP verifier")
    p.add_argument("model", type=Path, help="the model the properties are about (.onnx for most verifiers, or .pt2)")
    p.add_argument("--points", type=Path, required=True, help=".npz with x (model units) and optional y (default: the model's labels)")
    p.add_argument("--eps", type=float, required=True, help="L-inf radius of each ball, in pixels (the model's input units when "
                   "it takes pixels as they are)")
    p.add_argument("--mean", default=None, help="per-channel mean the model subtracts from [0, 1] pixels: the ball is taken in "
                   "pixels and written in the model's units")
    p.add_argument("--std", default=None, help="per-channel std the model divides by")
    p.add_argument("--range", default="0,1", help="pixel range the balls are clipped to, LOW,HIGH, or 'none' (default: 0,1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per property written to instances.csv (default 60)")
    p.add_argument("--out", type=Path, required=True, help="folder for point_<i>.vnnlib and instances.csv")
    p.add_argument("--overwrite", action="store_true", help="replace properties already in --out")
    _add_factory_arg(p)

    p = add_parser("repair-sweep", help="the paper's experiment: repair LH's head over (eps, K), evaluate RLH (paper figure 3)")
    p.add_argument("--out", type=Path, required=True, help="run directory with NN and LH")
    _add_device_arg(p)
    _add_repair_args(p)

    p = add_parser("export", help="export a run's models with torch.export (.pt2), loadable without cnnrepair")
    p.add_argument("--out", type=Path, required=True, help="run directory")

    p = add_parser("download", help="download a dataset and verify its checksums (needs internet)")
    p.add_argument("name", choices=["mnist", "cifar10"], help="dataset to fetch (cifar10: the canonical python tarball)")
    p.add_argument("--dest", type=Path, default=Path("data"), help="parent folder (default: data)")
    return parser


def _cmd_train(args: argparse.Namespace, bars: _Bars, run=None):
    from cnnrepair.data import load_dataset
    from cnnrepair.pipeline import stage_train
    from cnnrepair.rundir import RunDir

    cfg = _train_settings(args)
    run = run or RunDir(args.out)
    _say(f"loading {args.dataset} ...")
    ds = load_dataset(args.dataset, args.data_dir)  # before the run directory is made: a bad dataset leaves nothing behind
    run.init(args.dataset, {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None, "seed": args.seed})
    _say(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images of {'x'.join(map(str, ds.image_shape))}, {ds.num_classes} classes")
    model = stage_train(run, ds, cfg, args.arch, bars, _device(args, run, "train"))
    res = run.results
    p = res["params"]["nn"]
    _say(f"{res['arch']}: {p['total']:,} parameters ({p['features']:,} features + {p['head']:,} head); "
         f"NN test accuracy {100 * res['accuracy']['nn']:.2f}%")
    return run, ds, model


def _cmd_hybrid(args: argparse.Namespace, bars: _Bars, run=None, ds=None, model=None):
    from cnnrepair.pipeline import load_nn, open_dataset, stage_features, stage_hybrid
    from cnnrepair.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    ds = ds or open_dataset(run)
    model = model or load_nn(run, _device(args, run, "hybrid"))
    if args.kh_train_size is not None and args.kh_train_size < 10 * ds.num_classes:
        raise CnnRepairError(f"--kh-train-size {args.kh_train_size} is too small; use at least {10 * ds.num_classes}")
    _say("extracting features ...")
    feats = stage_features(run, model, ds, bars)
    kinds = ("lh",) if args.no_kh else ("lh", "kh")
    _say(f"fitting {' and '.join(k.upper() for k in kinds)} on {feats['train'].shape[1]} features ...")
    n_kh = min(args.kh_train_size or len(ds.y_train), len(ds.y_train))
    if "kh" in kinds and n_kh > 20000:
        _say(f"note: the exact KH fit on {n_kh:,} training features can take minutes to an hour on 2 cores "
             f"(MNIST: 3.5 min, Fashion-MNIST: 43 min); --kh-train-size 10000 or --no-kh shortens it")
    hybrids = stage_hybrid(run, model, ds, feats, args.lh_c, args.kh_c, args.kh_train_size, cfg.get("seed", 0), kinds,
                           args.svm_jobs, bars)
    res = run.results
    for k in kinds:
        h = res["hybrid"][k]
        _say(f"{k.upper()}: test accuracy {100 * res['accuracy'][k]:.2f}% (fit {res['timings_s'][f'fit_{k}']:.1f}s on {h['n_train']} samples, "
             f"max |torch - sklearn| = {h['max_abs_diff_vs_sklearn']:.1e})")
    return run, ds, model, hybrids


def _cmd_attack(args: argparse.Namespace, bars: _Bars, run=None, ds=None):
    from cnnrepair.pipeline import load_models, open_dataset, stage_attack
    from cnnrepair.report import plot_attack_curves
    from cnnrepair.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    names, eps = _attack_plan(args, cfg["dataset"])
    models = load_models(run, [m.strip() for m in args.models.split(",")] if getattr(args, "models", None) else None,
                         _device(args, run, "attack"))
    ds = ds or open_dataset(run)
    for name in names:
        n_images = args.pgd_images if name == "pgd" and args.pgd_images else args.attack_images
        _say(f"{name.upper()} sweep over eps {', '.join(f'{e:g}' for e in eps)} on {', '.join(m.upper() for m in models)} ...")
        r = stage_attack(run, ds, models, name, eps, n_images, args.pgd_steps if name == "pgd" else None, cfg.get("seed", 0), bars)
        for m, accs in r["own"].items():
            _say(f"  {m.upper()}: clean {100 * r['clean'][m]:.2f}% -> own adversarial set " + " ".join(f"{100 * a:.1f}" for a in accs))
    fig = plot_attack_curves(run.results["attack"], cfg["dataset"], run.sub("figures/attack_curves.png"))
    _write_examples(run, ds, models, names[0], eps[-1])
    _say(f"figure: {fig}")
    return models


def _write_examples(run, ds, models, attack_name: str, eps: float) -> None:
    """Figure of a few clean/adversarial pairs on the first hybrid (or NN) at the largest eps."""
    import numpy as np
    import torch

    from cnnrepair.data import to_float
    from cnnrepair.evaluation import load_set
    from cnnrepair.report import plot_examples
    from cnnrepair.training import predict

    res = run.results["attack"][attack_name]
    source = "lh" if "lh" in models else next(iter(models))
    n = res["n_images"]
    idx = np.arange(len(ds.y_test))
    if n < len(ds.y_test):
        idx = np.sort(np.random.default_rng(run.config.get("seed", 0)).permutation(len(ds.y_test))[:n])
    aset = load_set(run.path, attack_name, source, eps, n)
    pick = aset.index[:8]
    clean = to_float(ds.x_test[idx][pick])
    adv = aset.images(ds.x_test[idx])[:8]
    with torch.no_grad():
        cp, ap = predict(models[source], clean), predict(models[source], adv)
    plot_examples(clean.numpy(), adv.numpy(), ds.y_test[idx][pick], cp, ap, ds.classes,
                  f"{attack_name.upper()} on {source.upper()}, eps={eps:g}: clean (top) and adversarial (bottom)",
                  run.sub(f"figures/examples_{attack_name}.png"))


def _add_model_repair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, help="the classifier: a torch.export program (.pt2) with a dynamic batch dimension, an ONNX "
                   "file (.onnx), or a state dict (.pt/.pth) with --factory")
    p.add_argument("--points", type=Path, required=True, help=".npz with x (float32, N x input shape, model units) and y (int64 labels)")
    p.add_argument("--out", type=Path, required=True, help="folder for repaired.pt2 / repaired.onnx (the model's format) and certificate.json")
    p.add_argument("--spec", choices=["pointwise", "ball", "targets"], default="pointwise",
                   help="pointwise: every point gets its label with --margin (guaranteed, minimal change); ball: every input "
                        "within --eps of a point does (certified through sound bounds); targets: the paper's program (default: pointwise)")
    p.add_argument("--eps", type=float, default=None, help="ball spec: L-infinity radius in pixels (an 'eps' array in the points file "
                   "gives one per point, 0 for a pointwise point)")
    p.add_argument("--bounds", choices=["crown", "ibp"], default="crown", help="ball spec: how the features are bounded over each ball: "
                   "crown (linear relaxation, tighter) or ibp (intervals, faster) (default: crown)")
    p.add_argument("--keep-eps", type=float, default=0.0, help="ball spec: keep points whose ball of this radius is certified before "
                   "the repair stay certified (default: 0, keep points keep their own label)")
    p.add_argument("--mean", default=None, help="ball spec: per-channel mean the model subtracts from [0, 1] pixels (the ball is in pixels)")
    p.add_argument("--std", default=None, help="ball spec: per-channel std the model divides by")
    p.add_argument("--range", default="0,1", help="ball spec: the pixel range the ball is clipped to, LOW,HIGH or none (default: 0,1)")
    p.add_argument("--layer", default=None, help="the linear layer to repair (default: the one whose output is the model's output)")
    p.add_argument("--margin", type=float, default=0.05, help="required logit[y] - max other logit of each point (default: 0.05)")
    p.add_argument("--keep", type=Path, default=None, help=".npz with x (and optional y; default: the model's predictions) whose labels must survive")
    p.add_argument("--keep-margin", type=float, default=0.0, help="margin the keep points must keep (default: 0)")
    p.add_argument("--keep-price", type=float, default=None, help="make keep points soft: price per unit of margin shortfall (default: hard)")
    p.add_argument("--norm", choices=["l1", "linf", "l1+linf"], default="l1",
                   help="measure of the change to minimise; l1+linf is PRDNN's mean|d| + max|d| (default: l1)")
    p.add_argument("--freeze-bias", action="store_true", help="change the weights only")
    p.add_argument("--max-change", type=float, default=None, help="bound on each weight's change")
    p.add_argument("--max-change-ratio", type=float, default=1000.0,
                   help="a change whose largest entry exceeds this multiple of the layer's largest weight is ill-conditioned and "
                        "not certified (default: 1000)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds the solver may take (default: 3600)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/OpenMP threads of the solve (default: CNNREPAIR_THREADS or 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier repair's files in --out (never any other file)")
    _add_factory_arg(p)


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
    from cnnrepair.modelrepair import BallInputs, output_dir, prepare
    from cnnrepair.repair import RepairSpec

    check_threads(args.threads, "--threads")
    if args.time_limit is not None and not args.time_limit > 0:
        raise CnnRepairError(f"--time-limit must be > 0 seconds (got {args.time_limit})")
    output_dir(args.out, [args.model, args.points, args.keep], args.overwrite).check()
    if args.spec != "ball" and (args.eps is not None or args.mean is not None or args.std is not None):
        raise CnnRepairError("--eps, --mean and --std describe the ball spec's input balls; add --spec ball or drop them")
    if args.spec == "ball" and args.eps is None:
        raise CnnRepairError("the ball spec needs --eps (the L-infinity radius in pixels, e.g. --eps 0.01)")
    mean, std = _convention(args)
    domain = _vnnlib_range(args.range)
    spec = RepairSpec(kind=args.spec, margin=args.margin, keep_margin=args.keep_margin, keep_price=args.keep_price,
                      norm=args.norm, freeze_bias=args.freeze_bias, max_change=args.max_change, eps=args.eps or 0.0, bounds=args.bounds,
                      keep_eps=args.keep_eps, max_change_ratio=args.max_change_ratio)
    ball = BallInputs(mean, std, domain) if args.spec == "ball" else None
    args.job = prepare(args.model, args.points, spec, args.layer, args.keep, args.factory, _input_shape(args, None), ball)
    return args.job


def _cmd_model_repair(args: argparse.Namespace, bars: _Bars) -> int:
    from cnnrepair.modelrepair import run

    job = getattr(args, "job", None) or _model_repair_job(args)
    _say(f"repairing layer {job.layer!r} of {job.model.path.name} on {len(job.points.x)} points"
         + (f" (+{len(job.keep.x)} keep)" if job.keep is not None else "") + f", spec {job.spec.kind}, norm {job.spec.norm} ...")
    t0 = time.perf_counter()
    cert = run(job, args.out, args.time_limit, args.threads, args.overwrite)
    dt = time.perf_counter() - t0
    if cert["status"] == "repaired":
        ch = cert["change"]
        low = min(p["margin_after"] for p in cert["points"])
        if "ball" in cert:
            worst = min(p["certified_margin_after"] for p in cert["points"])
            _say(f"every input of the {len(cert['points'])} balls (eps {job.spec.eps:g}, {job.spec.bounds} bounds) keeps its label: "
                 f"smallest certified margin {worst:.4g}")
        bound = ("the paper's program: nothing guaranteed" if cert["lower_bound"] is None else
                 f"certified >= {cert['lower_bound']:.6g}, gap {cert['gap']:.1e}")
        _say(f"repaired in {dt:.1f}s: {len(cert['points'])} points, smallest margin {low:.4g} on the saved model; "
             f"change {job.spec.norm} {ch['l1'] if cert['lower_bound'] is None else cert['objective']:.6g} ({bound}), "
             f"{ch['nonzero']} numbers changed")
        if cert["keep"]["count"]:
            _say(f"keep points: {cert['keep']['labels_kept']}/{cert['keep']['count']} keep their label, smallest margin {cert['keep']['smallest_margin_after']:.4g}")
        if cert["keep"].get("balls_certified_before") is not None:
            _say(f"keep balls (eps {job.spec.keep_eps:g}): {cert['keep']['balls_certified_after']}/{cert['keep']['balls_certified_before']} "
                 "certified before stay certified")
        _say(f"wrote {args.out / cert['model']['file']} and {args.out / 'certificate.json'}")
        return 0
    if cert["status"] == "infeasible":
        conf = ", ".join(f"{c['set']}[{c['index']}] (label {c['label']})" for c in cert.get("conflicts", [])[:12])
        minimal = "" if cert["solver"].get("conflicts_irreducible", True) else " (the search for a smaller set stopped at its time limit)"
        which = (f"these points conflict{minimal}: {conf}" if conf else
                 "the program is infeasible as a whole, and no smaller conflicting set was isolated")
        _say(f"infeasible: no change of layer {job.layer!r} meets the spec; {which}. "
             f"No model written; details in {args.out / 'certificate.json'}")
        return 1
    if cert["status"] == "ill-conditioned":
        _say(f"not certified: {'; '.join(cert.get('notes', []))}. Details in {args.out / 'certificate.json'}")
        return 1
    _say(f"repair failed ({cert['solver']['status']}; {'; '.join(cert.get('notes', []))}); no model written; see {args.out / 'certificate.json'}")
    return 1


def _cmd_verify(args: argparse.Namespace, bars: _Bars) -> int:
    from cnnrepair.verify import verify_certificate

    report = verify_certificate(args.certificate, args.model, args.points, args.keep, args.original, args.factory)
    if report.problems:
        for p in report.problems:
            _say(f"FAILED: {p}")
        return 1
    _say(f"certificate holds (checked: {'; '.join(report.checked)})")
    if report.unchecked:
        _say(f"not checked: {'; '.join(report.unchecked)}")
    return 0


def _vnnlib_range(text: str) -> tuple[float, float] | None:
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise CnnRepairError(f"--range {text!r}: give LOW,HIGH (e.g. 0,1) or none") from None
    return lo, hi


def _cmd_vnnlib(args: argparse.Namespace, bars: _Bars) -> int:
    from cnnrepair.formats import load_model
    from cnnrepair.modelrepair import BallInputs, load_points
    from cnnrepair.repair.certificate import model_logits
    from cnnrepair.vnnlib import write_boxes

    outdir = _out(args, names("instances.csv", suffixes=(".vnnlib",)), [args.model, args.points], "properties")
    if not (args.timeout > 0 and args.timeout < float("inf")):
        raise CnnRepairError(f"--timeout must be a number of seconds > 0 (got {args.timeout})")
    domain = _vnnlib_range(args.range)
    points = load_points(args.points, "points file", labels_required=False)
    model = load_model(args.model, args.factory, _input_shape(args, points.x.shape[1:]))
    if model.input_shape is not None and tuple(points.x.shape[1:]) != model.input_shape:
        raise CnnRepairError(f"{args.points}: inputs of shape {tuple(points.x.shape[1:])} but the model takes {model.input_shape}")
    logits = model_logits(model.module, points.x[:1] if points.y is not None else points.x)
    labels = points.y if points.y is not None else logits.argmax(1)
    mean, std = _convention(args)
    if domain is not None and not domain[0] < domain[1]:
        raise CnnRepairError(f"--range {args.range}: the range is empty; give LOW,HIGH with LOW < HIGH (e.g. 0,1)")
    if not (args.eps >= 0 and args.eps < float("inf")):
        raise CnnRepairError(f"--eps must be a non-negative number of pixels (got {args.eps})")
    lo, hi = BallInputs(mean, std, domain).boxes(points.x, args.eps)  # the pixel ball, in the model's units, per channel
    with outdir as stage:
        paths = write_boxes(args.model, lo.numpy(), hi.numpy(), labels, logits.shape[1], stage, args.timeout)
    _say(f"wrote {len(paths)} properties and instances.csv to {args.out} (unsat = every input of the ball keeps its label)")
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


def _cmd_points(args: argparse.Namespace, bars: _Bars) -> int:
    import numpy as np

    from cnnrepair.formats import load_model
    from cnnrepair.io import save_npz, write_json
    from cnnrepair.points import InputSpec, PointsSettings, make_points
    from cnnrepair.repair.certificate import sha256

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
        _say(f"warning: {warning}")
    _say(f"wrote {len(made.y)} {args.kind} points and {len(made.keep_y)} keep points to {args.out} "
         f"(clean accuracy {100 * made.info['clean_accuracy']:.2f}%); next: cnnrepair repair {args.model} "
         f"--points {args.out / 'points.npz'} --keep {args.out / 'keep.npz'} --out DIR")
    return 0


def _cmd_evaluate(args: argparse.Namespace, bars: _Bars) -> int:
    from cnnrepair.assess import AssessSettings, assess, plot_report
    from cnnrepair.formats import load_model
    from cnnrepair.io import write_json
    from cnnrepair.modelrepair import load_points
    from cnnrepair.points import InputSpec
    from cnnrepair.repair.certificate import sha256

    outdir = _out(args, names("report.json", "report.png"), [args.model, args.repaired, args.points, args.held_out, args.keep,
                                                              getattr(args, "npz", None)], "a report (report.json / report.png)")
    mean, std = _convention(args)
    eps = list(_floats(args.eps, "eps", "0.05,0.1") or ())
    settings = AssessSettings(eps, args.attack, args.n, args.seed, certify=args.certify,
                              split=args.split if args.npz is None else f"npz:{args.npz.name}")
    settings.check()
    images, labels, source = _points_images(args)
    shape = _input_shape(args, images.shape[1:])
    models = {"original": load_model(args.model, args.factory, shape)}
    if args.repaired is not None:
        models["repaired"] = load_model(args.repaired, args.factory, shape)
    spec = InputSpec(mean, std, models["original"].input_shape, args.layout)
    pts = load_points(args.points, "points file") if args.points else None
    held = load_points(args.held_out, "held-out file") if args.held_out else None
    avoid = {name: _point_set(path, what) for name, path, what in (("points", args.points, "points file"),
                                                                    ("keep", args.keep, "keep file"),
                                                                    ("held_out", args.held_out, "held-out file")) if path is not None}
    report = assess({k: m.module for k, m in models.items()}, images, labels, spec, settings,
                    None if pts is None else (pts.x, pts.y), None if held is None else (held.x, held.y), bars, avoid)
    report.update(data=source, split=args.split, files={k: {"file": m.path.name, "sha256": sha256(m.path)} for k, m in models.items()})
    with outdir as stage:
        write_json(stage / "report.json", report)
        plot_report(report, stage / "report.png")
    for name, r in report["models"].items():
        extra = "".join(f", {k} {r[k]:.2f}" for k in ("drawdown", "generalisation") if k in r)
        eff = f", efficacy {100 * r['efficacy']:.1f}%" if "efficacy" in r else ""
        attacked = ", ".join(f"eps {e}: {100 * a:.2f}%" for e, a in r["attack"].items())
        cert = "; certified " + ", ".join(f"eps {e}: {100 * a:.2f}%" for e, a in r["certified"].items()) if "certified" in r else ""
        _say(f"{name}: clean {100 * r['clean_accuracy']:.2f}%, {args.attack} {attacked}{cert}{eff}{extra}")
    used = report["images_used"]
    left = ", ".join(f"{n} {c}" for n, c in used["excluded"].items())
    _say(f"measured on {used['count']} {source} images" + (f" that no point set was made from (left out: {left})" if left else ""))
    for warning in report["warnings"]:
        _say(f"warning: {warning}")
    _say(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 0


def _point_set(path: Path, what: str):
    """A points file as evaluate avoids it: inputs, labels, and the source indices and split `cnnrepair points` recorded."""
    from cnnrepair.assess import PointSet
    from cnnrepair.io import load_npz
    from cnnrepair.modelrepair import load_points

    pts = load_points(path, what, labels_required=False)
    data = load_npz(path, what)
    split = str(data["split"]) if "split" in data and data["split"].ndim == 0 else None
    index = data["index"].reshape(-1) if "index" in data and len(data["index"].reshape(-1)) == len(pts.x) else None
    return PointSet(pts.x.numpy(), pts.y, index, split)


def _cmd_repair(args: argparse.Namespace, bars: _Bars, run=None, ds=None):
    from cnnrepair.pipeline import open_dataset, stage_repair
    from cnnrepair.report import plot_repair
    from cnnrepair.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    settings = _repair_settings(args, cfg["dataset"], cfg.get("seed", 0))
    eps, selections = settings.eps, settings.selections
    ds = ds or open_dataset(run)
    _say(f"repairing LH at eps {', '.join(f'{e:g}' for e in eps)} with K={settings.ks}, selection {selections}, solver {args.solver} ...")
    if args.variant is None and not args.overwrite and "rlh" in run.results.get("accuracy", {}):
        _say("the main repair replaces models/rlh.pt; its export, RLH attack results and summary.md are refreshed with it")
    result = stage_repair(run, ds, settings, bars, args.variant, args.overwrite, _device(args, run, "repair"))
    for e in result["entries"]:
        if "lp" not in e:
            _say(f"  eps={e['eps']:g} K={e['k']} {e['selection']}: skipped, {e['error']}")
            continue
        lp = e["lp"]
        k = f"{e['k']}" if e["k_used"] == e["k"] else f"{e['k_used']} (of {e['k']} asked: all there are)"
        head = f"  eps={e['eps']:g} K={k} {e['selection']:8s} LP {lp['size']['variables']:,} vars {lp['status']} {lp['seconds']:.2f}s"
        if "calibration" in e:
            c = e["calibration"]
            head += (f", anchor weight {c['anchor_weight']:g} of {len(c['tried'])} tried"
                     + ("" if c["budget_met"] else f" (none within {c['budget']:g} points on held-out training images)"))
        if "accuracy" in e:
            a = e["accuracy"]
            _say(f"{head}: Data LH {100 * a['lh']['data']:.2f} -> RLH {100 * a['rlh']['data']:.2f}, "
                 f"unseen LH adversaries fixed {100 * e['generalisation']:.1f}%, efficacy {100 * e['efficacy']:.0f}%, "
                 f"RHADV RLH {100 * a['rlh']['rhadv']:.2f} vs HADV LH {100 * a['lh']['hadv']:.2f}")
        else:
            _say(f"{head}: {e['error']}")
        if "warning" in e:
            _say(f"  warning: eps={e['eps']:g} K={e['k']} {e['selection']}: {e['warning']}")
    fig = plot_repair(result["entries"], cfg["dataset"], run.sub(f"figures/repair{'_' + args.variant if args.variant else ''}.png"))
    _say(f"figure: {fig}")
    return result


def _cmd_export(args: argparse.Namespace, bars: _Bars, run=None, models=None):
    from cnnrepair.pipeline import export_models, load_models, open_dataset
    from cnnrepair.rundir import RunDir

    run = run or RunDir(args.out)
    run.require()
    models = models or load_models(run)  # NN and every head the run has, on the CPU
    shape = tuple(run.results.get("input_shape") or open_dataset(run).image_shape)
    written = export_models(run, models, shape)
    _say("exported " + ", ".join(f"{k} -> {v} (and .onnx)" for k, v in written.items()))
    return written


def _cmd_reproduce(args: argparse.Namespace, bars: _Bars):
    t0 = time.perf_counter()
    run, ds, model = _cmd_train(args, bars)
    run, ds, model, hybrids = _cmd_hybrid(args, bars, run, ds, model)
    _cmd_attack(args, bars, run, ds)
    _cmd_repair(args, bars, run, ds)
    _cmd_export(args, bars, run)
    run.update_results(timings_s={"reproduce_total": time.perf_counter() - t0})
    _say(f"done in {time.perf_counter() - t0:.0f}s; results: {run.path / 'results.json'}; summary: {run.path / 'summary.md'}")


def _cmd_download(args: argparse.Namespace, bars: _Bars):
    from cnnrepair.data import download_dataset

    folder = download_dataset(args.name, args.dest)
    _say(f"{args.name} verified in {folder}")


COMMANDS: dict[str, Callable] = {
    "reproduce": _cmd_reproduce, "train": _cmd_train, "hybrid": _cmd_hybrid, "attack": _cmd_attack, "repair-sweep": _cmd_repair,
    "repair": _cmd_model_repair, "verify": _cmd_verify, "vnnlib": _cmd_vnnlib, "points": _cmd_points, "evaluate": _cmd_evaluate, "export": _cmd_export, "download": _cmd_download,
}


MODEL_COMMANDS = ("repair", "verify", "vnnlib", "points", "evaluate")  # commands on model files: no checkpoints, nothing half-written


def _record_command(args: argparse.Namespace, argv: list[str], seconds: float) -> None:
    """Append the command line and its wall time to the run's results, so every figure can be traced to a command.

    summary.md is rewritten after every command, so it never lags behind results.json.
    """
    from cnnrepair.report import write_summary
    from cnnrepair.rundir import RunDir

    out = getattr(args, "out", None)
    if out is None or not (Path(out) / "results.json").is_file():
        return
    run = RunDir(out)
    history = run.results.get("commands", [])
    history.append({"command": "cnnrepair " + " ".join(argv), "wall_s": round(seconds, 2),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run.update_results(commands=history)
    write_summary(run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns 0 on success, 2 on bad input (one line on stderr), 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    bars = _Bars(not args.quiet, sys.stderr.isatty())
    t0 = time.perf_counter()
    try:
        validate(args)
        code = COMMANDS[args.command](args, bars)
        if args.command in ("repair", "verify"):
            bars.close()
            return int(code)
        _record_command(args, list(sys.argv[1:] if argv is None else argv), time.perf_counter() - t0)
    except CnnRepairError as exc:
        bars.close()
        print(f"cnnrepair: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        bars.close()
        if args.command in MODEL_COMMANDS:
            print(f"cnnrepair: interrupted; nothing was written into {getattr(args, 'out', None) or 'any folder'}", file=sys.stderr)
        else:
            print("cnnrepair: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only folder: one line, the run's files removed by their writers
        bars.close()
        print(f"cnnrepair: error: {disk_error(exc, getattr(args, 'out', None) or Path('.'))}", file=sys.stderr)
        return 2
    bars.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
