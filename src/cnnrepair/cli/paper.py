"""The paper's commands (Guidotti & Leofante 2020): reproduce, train, hybrid, attack, repair-sweep, export, download.

Each works in one run directory (``--out``), resumes from its checkpoints, and records its command
line in the run's results."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from cnnrepair.cli.common import EPILOG, Bars, Command, say
from cnnrepair.errors import CnnRepairError


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

    from cnnrepair.paper.training import resolve_device

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
    p.add_argument("--lh-c", type=_float_list, default=None,
                   help="C of the linear SVM (LH), on standardised features; several (comma-separated): the one with the best "
                        "accuracy on a held-out share of the training set, then refitted on all of it (default 0.001,0.01,0.1; "
                        "one value skips the search)")
    p.add_argument("--kh-c", type=_float_list, default=None, help="C of the RBF SVM (KH), chosen the same way (default 1,10,100)")
    p.add_argument("--kh-gamma", type=_gamma_list, default=None,
                   help="gamma of the RBF SVM (KH): numbers or 'scale' (1 / features), chosen with --kh-c (default scale)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="share of the training set held out to choose --lh-c / --kh-c / --kh-gamma among several (default 0.1)")
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

_float_list = _list_of(float, "numbers", "0.001,0.01,0.1")


def _gamma(text: str) -> float | str:
    return "scale" if text.strip() == "scale" else float(text)


_gamma_list = _list_of(_gamma, "numbers or 'scale'", "scale,0.001")

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
    """The training recipe with the user's overrides (TrainConfig checks them)."""
    from cnnrepair.paper.pipeline import train_config

    return train_config(args.dataset, {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed})


def _hybrid_settings(args: argparse.Namespace, seed: int = 0):
    """The hybrid options gathered into HybridSettings, which checks them."""
    from cnnrepair.paper.pipeline import HybridSettings

    grids = {k: tuple(v) for k, v in (("lh_c", args.lh_c), ("kh_c", args.kh_c), ("kh_gamma", args.kh_gamma)) if v is not None}
    return HybridSettings(kh_train_size=args.kh_train_size, kinds=("lh",) if args.no_kh else ("lh", "kh"), svm_jobs=args.svm_jobs,
                          seed=seed, holdout=args.holdout, **grids)


def _attack_plan(args: argparse.Namespace, dataset: str, seed: int = 0) -> list:
    """One checked AttackSweep per --attacks name, over --eps (default: the dataset's paper grid)."""
    from cnnrepair.attacks import PAPER_EPS
    from cnnrepair.paper.pipeline import AttackSweep

    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    if not names:
        raise CnnRepairError("--attacks names no attack; give e.g. fgsm,pgd")
    eps = args.eps if args.eps is not None else PAPER_EPS.get(dataset, PAPER_EPS["mnist"])
    return [AttackSweep(name, tuple(eps), args.pgd_images if name == "pgd" and args.pgd_images else args.attack_images,
                        args.pgd_steps if name == "pgd" else None, seed) for name in names]


def _repair_settings(args: argparse.Namespace, dataset: str, seed: int):
    """The repair options gathered into RepairSettings, which checks them (before any work starts)."""
    from cnnrepair.attacks import PAPER_EPS
    from cnnrepair.paper.experiment import RepairSettings

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


def check(args: argparse.Namespace) -> None:
    """Check every option and the run directory before any long work starts (one-line errors)."""
    from cnnrepair.paper.pipeline import check_repair_target
    from cnnrepair.paper.rundir import RunDir

    cmd = args.command
    if cmd == "reproduce":
        args.out = args.out or Path("runs") / args.dataset
    run = RunDir(args.out)
    if hasattr(args, "device"):
        from cnnrepair.paper.training import resolve_device

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
        _hybrid_settings(args, seed)
    if cmd in ("reproduce", "attack"):
        _attack_plan(args, dataset, seed)
    if cmd in ("reproduce", "repair-sweep"):
        settings = _repair_settings(args, dataset, seed)
        check_repair_target(run, settings, args.variant, args.overwrite)


def _cmd_train(args: argparse.Namespace, bars: Bars, run=None):
    from cnnrepair.data import load_dataset
    from cnnrepair.paper.pipeline import stage_train
    from cnnrepair.paper.rundir import RunDir

    cfg = _train_settings(args)
    run = run or RunDir(args.out)
    say(f"loading {args.dataset} ...")
    ds = load_dataset(args.dataset, args.data_dir)  # before the run directory is made: a bad dataset leaves nothing behind
    run.init(args.dataset, {"data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None, "seed": args.seed})
    say(f"{ds.name}: {len(ds.y_train)} train / {len(ds.y_test)} test images of {'x'.join(map(str, ds.image_shape))}, {ds.num_classes} classes")
    model = stage_train(run, ds, cfg, args.arch, bars, _device(args, run, "train"))
    res = run.results
    p = res["params"]["nn"]
    say(f"{res['arch']}: {p['total']:,} parameters ({p['features']:,} features + {p['head']:,} head); "
        f"NN test accuracy {100 * res['accuracy']['nn']:.2f}%")
    return run, ds, model


def _cmd_hybrid(args: argparse.Namespace, bars: Bars, run=None, ds=None, model=None):
    from cnnrepair.paper.pipeline import describe_params, load_nn, open_dataset, stage_features, stage_hybrid
    from cnnrepair.paper.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    ds = ds or open_dataset(run)
    model = model or load_nn(run, _device(args, run, "hybrid"))
    settings = _hybrid_settings(args, cfg.get("seed", 0))
    say("extracting features ...")
    feats = stage_features(run, model, ds, bars)
    kinds = settings.kinds
    say(f"fitting {' and '.join(k.upper() for k in kinds)} on {feats['train'].shape[1]} features ...")
    n_kh = min(args.kh_train_size or len(ds.y_train), len(ds.y_train))
    if "kh" in kinds and n_kh > 20000:
        say(f"note: the exact KH fit on {n_kh:,} training features can take minutes to an hour on 2 cores "
            f"(MNIST: 3.5 min, Fashion-MNIST: 43 min); --kh-train-size 10000 or --no-kh shortens it")
    hybrids = stage_hybrid(run, model, ds, feats, settings, bars)
    res = run.results
    for k in kinds:
        h = res["hybrid"][k]
        if h.get("search"):
            shown = "; ".join(f"{describe_params(g)}: {100 * g['holdout_accuracy']:.2f}%" for g in h["search"]["grid"])
            say(f"{k.upper()}: held-out accuracy ({h['search']['holdout']:,} training samples) {shown}")
        say(f"{k.upper()}: test accuracy {100 * res['accuracy'][k]:.2f}% (fit {res['timings_s'][f'fit_{k}']:.1f}s on {h['n_train']} samples, "
            f"max |torch - sklearn| = {h['max_abs_diff_vs_sklearn']:.1e})")
    return run, ds, model, hybrids


def _cmd_attack(args: argparse.Namespace, bars: Bars, run=None, ds=None):
    from cnnrepair.paper.pipeline import load_models, open_dataset, stage_attack
    from cnnrepair.paper.report import plot_attack_curves
    from cnnrepair.paper.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    plan = _attack_plan(args, cfg["dataset"], cfg.get("seed", 0))
    models = load_models(run, [m.strip() for m in args.models.split(",")] if getattr(args, "models", None) else None,
                         _device(args, run, "attack"))
    ds = ds or open_dataset(run)
    for sweep in plan:
        say(f"{sweep.attack.upper()} sweep over eps {', '.join(f'{e:g}' for e in sweep.eps)} on {', '.join(m.upper() for m in models)} ...")
        r = stage_attack(run, ds, models, sweep, bars)
        for m, accs in r["own"].items():
            say(f"  {m.upper()}: clean {100 * r['clean'][m]:.2f}% -> own adversarial set " + " ".join(f"{100 * a:.1f}" for a in accs))
    fig = plot_attack_curves(run.results["attack"], cfg["dataset"], run.sub("figures/attack_curves.png"))
    _write_examples(run, ds, models, plan[0].attack, plan[0].eps[-1])
    say(f"figure: {fig}")
    return models


def _write_examples(run, ds, models, attack_name: str, eps: float) -> None:
    """Figure of a few clean/adversarial pairs on the first hybrid (or NN) at the largest eps."""
    import numpy as np
    import torch

    from cnnrepair.data import to_float
    from cnnrepair.paper.evaluation import load_set
    from cnnrepair.paper.report import plot_examples
    from cnnrepair.paper.training import predict

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


def _cmd_repair(args: argparse.Namespace, bars: Bars, run=None, ds=None):
    from cnnrepair.paper.pipeline import open_dataset, stage_repair
    from cnnrepair.paper.report import plot_repair
    from cnnrepair.paper.rundir import RunDir

    run = run or RunDir(args.out)
    cfg = run.require()
    settings = _repair_settings(args, cfg["dataset"], cfg.get("seed", 0))
    eps, selections = settings.eps, settings.selections
    ds = ds or open_dataset(run)
    say(f"repairing LH at eps {', '.join(f'{e:g}' for e in eps)} with K={settings.ks}, selection {selections}, solver {args.solver} ...")
    if args.variant is None and not args.overwrite and "rlh" in run.results.get("accuracy", {}):
        say("the main repair replaces models/rlh.pt; its export, RLH attack results and summary.md are refreshed with it")
    result = stage_repair(run, ds, settings, bars, args.variant, args.overwrite, _device(args, run, "repair"))
    for e in result["entries"]:
        if "lp" not in e:
            say(f"  eps={e['eps']:g} K={e['k']} {e['selection']}: skipped, {e['error']}")
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
            say(f"{head}: Data LH {100 * a['lh']['data']:.2f} -> RLH {100 * a['rlh']['data']:.2f}, "
                f"unseen LH adversaries fixed {100 * e['generalisation']:.1f}%, efficacy {100 * e['efficacy']:.0f}%, "
                f"RHADV RLH {100 * a['rlh']['rhadv']:.2f} vs HADV LH {100 * a['lh']['hadv']:.2f}")
        else:
            say(f"{head}: {e['error']}")
        if "warning" in e:
            say(f"  warning: eps={e['eps']:g} K={e['k']} {e['selection']}: {e['warning']}")
    fig = plot_repair(result["entries"], cfg["dataset"], run.sub(f"figures/repair{'_' + args.variant if args.variant else ''}.png"))
    say(f"figure: {fig}")
    return result


def _cmd_export(args: argparse.Namespace, bars: Bars, run=None, models=None):
    from cnnrepair.paper.pipeline import export_models, load_models, open_dataset
    from cnnrepair.paper.rundir import RunDir

    run = run or RunDir(args.out)
    run.require()
    models = models or load_models(run)  # NN and every head the run has, on the CPU
    shape = tuple(run.results.get("input_shape") or open_dataset(run).image_shape)
    written = export_models(run, models, shape)
    say("exported " + ", ".join(f"{k} -> {v} (and .onnx)" for k, v in written.items()))
    return written


def _cmd_reproduce(args: argparse.Namespace, bars: Bars):
    t0 = time.perf_counter()
    run, ds, model = _cmd_train(args, bars)
    run, ds, model, hybrids = _cmd_hybrid(args, bars, run, ds, model)
    _cmd_attack(args, bars, run, ds)
    _cmd_repair(args, bars, run, ds)
    _cmd_export(args, bars, run)
    run.update_results(timings_s={"reproduce_total": time.perf_counter() - t0})
    say(f"done in {time.perf_counter() - t0:.0f}s; results: {run.path / 'results.json'}; summary: {run.path / 'summary.md'}")


def _cmd_download(args: argparse.Namespace, bars: Bars):
    from cnnrepair.data import download_dataset

    folder = download_dataset(args.name, args.dest)
    say(f"{args.name} verified in {folder}")


def record_command(args: argparse.Namespace, argv: list[str], seconds: float) -> None:
    """Append the command line and its wall time to the run's results, so every figure can be traced to a command.

    summary.md is rewritten after every command, so it never lags behind results.json.
    """
    from cnnrepair.paper.report import write_summary
    from cnnrepair.paper.rundir import RunDir

    out = getattr(args, "out", None)
    if out is None or not (Path(out) / "results.json").is_file():
        return
    run = RunDir(out)
    history = run.results.get("commands", [])
    history.append({"command": "cnnrepair " + " ".join(argv), "wall_s": round(seconds, 2),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    run.update_results(commands=history)
    write_summary(run)


def _configure_reproduce(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<dataset>)")
    _add_train_args(p)
    _add_hybrid_args(p)
    _add_attack_args(p)
    _add_repair_args(p)


def _configure_train(p: argparse.ArgumentParser) -> None:
    _add_data_args(p)
    _add_device_arg(p)
    p.add_argument("--out", type=Path, required=True, help="run directory")
    _add_train_args(p)


def _configure_hybrid(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory of a trained CNN")
    _add_device_arg(p)
    _add_hybrid_args(p)


def _configure_attack(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory with a trained CNN (and hybrids)")
    p.add_argument("--models", default=None, help="comma-separated models to attack: nn, lh, kh, rlh (default: all in the run)")
    _add_device_arg(p)
    _add_attack_args(p)


def _configure_repair_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory with NN and LH")
    _add_device_arg(p)
    _add_repair_args(p)


def _configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory")


def _configure_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=["mnist", "cifar10"], help="dataset to fetch (cifar10: the canonical python tarball)")
    p.add_argument("--dest", type=Path, default=Path("data"), help="parent folder (default: data)")


COMMANDS: list[Command] = [
    Command("reproduce", "run every stage: train, hybrids (LH, KH), attack sweeps, export", _configure_reproduce, _cmd_reproduce, check,
            parser_options={"epilog": EPILOG, "formatter_class": argparse.RawDescriptionHelpFormatter}),
    Command("train", "train the dataset's CNN (resumes from the run's checkpoint)", _configure_train, _cmd_train, check),
    Command("hybrid", "fit LH (linear SVM) and KH (RBF SVM) heads on a trained run's features", _configure_hybrid, _cmd_hybrid, check),
    Command("attack", "sweep attacks over epsilon on every model of a run (paper figure 2) with the transfer matrix", _configure_attack,
            _cmd_attack, check),
    Command("repair-sweep", "the paper's experiment: repair LH's head over (eps, K), evaluate RLH (paper figure 3)",
            _configure_repair_sweep, _cmd_repair, check),
    Command("export", "export a run's models with torch.export (.pt2), loadable without cnnrepair", _configure_export, _cmd_export, check),
    Command("download", "download a dataset and verify its checksums (needs internet)", _configure_download, _cmd_download),
]
