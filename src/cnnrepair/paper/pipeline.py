"""The paper's stages as functions over a run directory: train, extract features, fit hybrids, export.

Each stage reads what earlier stages left in the run directory, writes its own outputs atomically,
and records its results and timings in ``results.json``; the CLI only wires them together.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnrepair.data import Dataset, load_dataset
from cnnrepair.errors import CnnRepairError
from cnnrepair.paper.hybrid import HybridNet, fit_linear_svm, fit_rbf_svm, load_head, save_head
from cnnrepair.io import atomic_write_bytes, load_npz, load_torch, save_npz, save_torch
from cnnrepair.paper.models import DEFAULT_ARCH, SplitNet, build_model, param_counts
from cnnrepair.paper.rundir import RunDir
from cnnrepair.paper.training import RECIPES, Progress, TrainConfig, accuracy, cpu_state, elapsed, model_device, outputs, train

NN_WEIGHTS = "models/nn.pt"
TRAIN_CKPT = "checkpoints/nn_train.pt"
FEATURES = "features.npz"


def open_dataset(run: RunDir) -> Dataset:
    """Load the dataset a run was made for."""
    cfg = run.require()
    return load_dataset(cfg["dataset"], cfg.get("data_dir"))


def train_config(dataset: str, overrides: dict[str, Any]) -> TrainConfig:
    """The dataset's recipe with the user's non-None overrides applied."""
    base = asdict(RECIPES.get(dataset, TrainConfig()))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**base)


def stage_train(run: RunDir, ds: Dataset, cfg: TrainConfig, arch: str | None = None, progress: Progress | None = None,
                device: torch.device | None = None) -> SplitNet:
    """Train (or resume, or reuse) the CNN on ``device`` and record its parameter counts and test accuracy."""
    arch = arch or DEFAULT_ARCH.get(ds.name, "mnist-nn")
    torch.manual_seed(cfg.seed)
    model = build_model(arch, ds.image_shape, ds.num_classes)
    weights = run.path / NN_WEIGHTS
    reused = weights.is_file()
    t0 = time.perf_counter()
    if reused:
        state = load_torch(weights, "model weights")
        if state.get("arch") != arch or state.get("train") != asdict(cfg):
            raise CnnRepairError(f"{weights}: trained with other settings ({state.get('arch')}, {state.get('train')}); use another --out")
        _load_weights(model, state, weights)
        model.to(device or "cpu")
        history = state.get("history", [])
    else:
        history = train(model, ds.x_train, ds.y_train, cfg, run.sub(TRAIN_CKPT), progress, device)
        save_torch(run.sub(NN_WEIGHTS), {"arch": arch, "model": cpu_state(model), "train": asdict(cfg), "history": history,
                                         "input_shape": list(ds.image_shape), "num_classes": ds.num_classes})
    train_s = time.perf_counter() - t0
    acc = accuracy(model, ds.x_test, ds.y_test)
    run.update_results(
        dataset=ds.name, seed=cfg.seed, arch=arch, classes=ds.classes, input_shape=list(ds.image_shape),
        params={"nn": param_counts(model)},
        accuracy={"nn": acc},
        training={"config": asdict(cfg), "history": history, "n_train": int(len(ds.y_train)), "n_test": int(len(ds.y_test))},
        **({} if reused else {"timings_s": {"train": train_s}}),
    )
    return model


def _load_weights(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CnnRepairError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0][:120]}); delete it and retrain") from None
    model.eval()


def load_nn(run: RunDir, device: torch.device | None = None) -> SplitNet:
    """The trained CNN of a run, on ``device`` (default: the CPU)."""
    path = run.path / NN_WEIGHTS
    state = load_torch(path, "model weights")
    try:
        model = build_model(state["arch"], tuple(state["input_shape"]), int(state["num_classes"]))
    except KeyError as exc:
        raise CnnRepairError(f"{path}: not a cnnrepair model file (missing {exc}); delete it and rerun `cnnrepair train`") from None
    _load_weights(model, state, path)
    return model.to(device or "cpu")


def _fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def stage_features(run: RunDir, model: SplitNet, ds: Dataset, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Extract train/test features once; reuse the cache while the CNN weights are unchanged."""
    path = run.path / FEATURES
    fp = _fingerprint(run.path / NN_WEIGHTS)
    if path.is_file():
        cached = load_npz(path, "feature cache")
        if str(cached.get("fingerprint")) == fp and len(cached["train"]) == len(ds.y_train) and len(cached["test"]) == len(ds.y_test):
            return cached
    t0 = time.perf_counter()
    feats = {
        "train": outputs(model.features, ds.x_train, 500, progress, "features train"),
        "test": outputs(model.features, ds.x_test, 500, progress, "features test"),
    }
    save_npz(path, train=feats["train"], test=feats["test"], fingerprint=np.array(fp))
    run.update_results(timings_s={"features": time.perf_counter() - t0})
    return feats


LH_GRID = (0.001, 0.01, 0.1)  # C of LH tried on the held-out split by default
KH_GRID = (1.0, 10.0, 100.0)  # C of KH tried by default (gamma "scale": 1 / features, on standardised features)


def _grid(values, what: str) -> tuple:
    """A grid option as a tuple (one number is a grid of one: no search)."""
    grid = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    if not grid:
        raise CnnRepairError(f"{what} names no value; give one, or several to choose among on a held-out split")
    return grid


@dataclass(frozen=True)
class HybridSettings:
    """How the hybrids are fitted.

    ``lh_c``, ``kh_c``, ``kh_gamma``: one value each fixes it; several are a grid, each point fitted on the training
    features less a stratified ``holdout`` share and scored on that share, the best (ties: the first in grid order)
    refitted on the whole training set (``results.json`` records every score). ``kh_train_size``: KH's training subset
    (None: every training feature; the search uses the same size), ``kinds``: which heads, ``svm_jobs``: LH's parallel
    jobs (-1: every core), ``seed``: the subsets' and splits' seed."""

    lh_c: float | tuple[float, ...] = LH_GRID
    kh_c: float | tuple[float, ...] = KH_GRID
    kh_train_size: int | None = None
    kinds: tuple[str, ...] = ("lh", "kh")
    svm_jobs: int = 1
    seed: int = 0
    kh_gamma: float | str | tuple[float | str, ...] = ("scale",)
    holdout: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lh_c", _grid(self.lh_c, "--lh-c"))
        object.__setattr__(self, "kh_c", _grid(self.kh_c, "--kh-c"))
        object.__setattr__(self, "kh_gamma", _grid(self.kh_gamma, "--kh-gamma"))
        for c in self.lh_c + self.kh_c:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (c > 0 and np.isfinite(c)):
                raise CnnRepairError(f"the SVMs' C must be > 0 (--lh-c, --kh-c; got {c!r})")
        for g in self.kh_gamma:
            if g != "scale" and (isinstance(g, bool) or not isinstance(g, (int, float)) or not (g > 0 and np.isfinite(g))):
                raise CnnRepairError(f"--kh-gamma must be > 0 or 'scale' (got {g!r})")
        for name, grid in (("--lh-c", self.lh_c), ("--kh-c", self.kh_c), ("--kh-gamma", self.kh_gamma)):
            if len(set(grid)) != len(grid):
                raise CnnRepairError(f"{name} repeats a value ({', '.join(map(str, grid))}); give each once")
        if isinstance(self.svm_jobs, bool) or not isinstance(self.svm_jobs, int) or self.svm_jobs == 0 or self.svm_jobs < -1:
            raise CnnRepairError(f"--svm-jobs must be >= 1, or -1 for every core (got {self.svm_jobs})")
        if self.kh_train_size is not None and self.kh_train_size < 20:
            raise CnnRepairError(f"--kh-train-size {self.kh_train_size} is too small; use at least 10 per class (e.g. 1000)")
        if not self.kinds or len(set(self.kinds)) != len(self.kinds) or not set(self.kinds) <= {"lh", "kh"}:
            raise CnnRepairError(f"hybrid kinds must be lh and/or kh, each once (got {self.kinds!r})")
        if not 0.0 < self.holdout < 0.5:
            raise CnnRepairError(f"--holdout must lie between 0 and 0.5 (a share of the training set; got {self.holdout})")

    def grid(self, kind: str) -> list[dict]:
        """The hyper-parameters tried for ``kind`` (``lh``: C; ``kh``: C x gamma), in grid order."""
        if kind == "lh":
            return [{"C": float(c)} for c in self.lh_c]
        return [{"C": float(c), "gamma": g if g == "scale" else float(g)} for c in self.kh_c for g in self.kh_gamma]


def describe_params(params: dict) -> str:
    """A grid point as ``C 0.01, gamma scale`` (its hyper-parameters only, not its scores)."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items() if k in ("C", "gamma"))


def select_hyperparameters(kind: str, fit, x: np.ndarray, y: np.ndarray, settings: HybridSettings,
                           progress: Progress | None = None) -> tuple[dict, dict | None]:
    """(the chosen hyper-parameters, the search's record or None when the grid has one point): each grid point fitted
    (``fit(x, y, **params)`` -> head, pipeline, FitInfo) on ``x, y`` less a stratified held-out share and scored on it."""
    grid = settings.grid(kind)
    if len(grid) == 1:
        return grid[0], None
    from sklearn.model_selection import train_test_split

    fit_idx, held_idx = train_test_split(np.arange(len(y)), test_size=settings.holdout, random_state=settings.seed, stratify=y)
    fit_idx, held_idx = np.sort(fit_idx), np.sort(held_idx)
    scores = []
    for i, params in enumerate(grid):
        with elapsed(progress, f"choosing {kind.upper()}: {i + 1}/{len(grid)} ({describe_params(params)}) on {len(fit_idx):,}, scoring on {len(held_idx):,}"):
            _, pipe, info = fit(x[fit_idx], y[fit_idx], **params)
        acc = float((pipe.predict(np.asarray(x[held_idx], np.float64)) == y[held_idx]).mean())
        scores.append({**params, "holdout_accuracy": acc, "seconds": info.seconds, "converged": info.converged})
    best = max(range(len(grid)), key=lambda i: (scores[i]["holdout_accuracy"], -i))
    record = {"fit_on": int(len(fit_idx)), "holdout": int(len(held_idx)), "seed": settings.seed, "grid": scores,
              "chosen": grid[best], "rule": "best held-out accuracy (ties: first in grid order), refitted on the whole training set"}
    return grid[best], record


def stage_hybrid(run: RunDir, model: SplitNet, ds: Dataset, feats: dict[str, np.ndarray], settings: HybridSettings | None = None,
                 progress: Progress | None = None) -> dict[str, HybridNet]:
    """Fit LH and KH on the cached features (their hyper-parameters chosen on a held-out split when a grid is given);
    record accuracy, the search, agreement with scikit-learn and timings."""
    s = settings or HybridSettings()
    if s.kh_train_size is not None and "kh" in s.kinds and s.kh_train_size < 10 * ds.num_classes:
        raise CnnRepairError(f"--kh-train-size {s.kh_train_size} is too small; use at least {10 * ds.num_classes}")
    out, acc, timing, info = {}, {}, {}, {}

    def fit_lh(x, y, C):
        return fit_linear_svm(x, y, C=C, seed=s.seed, n_jobs=s.svm_jobs)

    def fit_kh(x, y, C, gamma):
        return fit_rbf_svm(x, y, C=C, gamma=gamma)

    for kind in s.kinds:
        xtr, ytr = feats["train"], ds.y_train
        if kind == "kh" and s.kh_train_size and s.kh_train_size < len(ytr):
            idx = stratified_subset(ytr, s.kh_train_size, s.seed)
            xtr, ytr = xtr[idx], ytr[idx]
        fit = fit_lh if kind == "lh" else fit_kh
        t0 = time.perf_counter()
        params, search = select_hyperparameters(kind, fit, xtr, ytr, s, progress)
        search_s = time.perf_counter() - t0
        with elapsed(progress, f"fitting {kind.upper()} on {len(ytr):,} x {xtr.shape[1]:,} features"):
            head, pipe, fitted = fit(xtr, ytr, **params)
        with torch.no_grad():
            torch_dec = head(torch.as_tensor(feats["test"])).double().numpy()
        with elapsed(progress, f"checking {kind.upper()} against scikit-learn on {len(feats['test']):,} test features"):
            sk_dec = pipe.decision_function(np.asarray(feats["test"], np.float64))
        if sk_dec.ndim == 1:
            sk_dec = np.stack([-sk_dec, sk_dec], 1)
        hybrid = HybridNet(model.features, head.to(model_device(model))).eval()
        acc[kind] = float((torch_dec.argmax(1) == ds.y_test).mean())
        timing[f"fit_{kind}"] = fitted.seconds
        if search is not None:
            search["seconds"] = search_s
        info[kind] = {**params, "n_train": fitted.n_train, "n_support": fitted.n_support,
                      "converged": fitted.converged, "sklearn_accuracy": float((pipe.classes_[sk_dec.argmax(1)] == ds.y_test).mean()),
                      "max_abs_diff_vs_sklearn": float(np.abs(torch_dec - sk_dec).max()), "search": search}
        save_head(run.sub(f"models/{kind}.pt"), head, info[kind])
        out[kind] = hybrid
    params_count = {k: sum(b.numel() for b in h.head.buffers()) for k, h in out.items()}
    run.update_results(accuracy=acc, timings_s=timing, hybrid=info, params=params_count)
    return out


def stratified_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import train_test_split

    idx, _ = train_test_split(np.arange(len(y)), train_size=n, random_state=seed, stratify=y)
    return np.sort(idx)


def load_hybrid(run: RunDir, kind: str, model: SplitNet | None = None) -> HybridNet:
    """A fitted hybrid (``lh``, ``kh`` or ``rlh``) of a run."""
    path = run.path / f"models/{kind}.pt"
    if not path.is_file():
        raise CnnRepairError(f"{path}: no {kind.upper()} in this run; run `cnnrepair hybrid --out {run.path}` first")
    model = model or load_nn(run)
    return HybridNet(model.features, load_head(path).to(model_device(model))).eval()


def export_models(run: RunDir, models: dict[str, torch.nn.Module], input_shape: tuple[int, int, int]) -> dict[str, str]:
    """Export each model to ``export/<name>.pt2`` (``torch.export``) and ``export/<name>.onnx``, loadable without cnnrepair.

    Each ONNX file is checked with onnxruntime against the torch model (outputs agree to 1e-5,
    relative) before it is kept. Returns the ``.pt2`` paths; results record both.
    """
    from cnnrepair.formats.onnx import export_onnx

    written, onnx_written = {}, {}
    for name, model in models.items():
        example = torch.zeros(2, *input_shape)
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
        path = run.sub(f"export/{name}.pt2")
        with warnings.catch_warnings():  # torch warns about shared CPU tensors (the heads share one extractor): harmless here
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            buffer = io.BytesIO()  # in memory first: a full disk is a Python error, not an abort in torch's writer
            torch.export.save(program, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        written[name] = str(path.relative_to(run.path))
        onnx_path = run.sub(f"export/{name}.onnx")
        export_onnx(model, input_shape, onnx_path)
        onnx_written[name] = str(onnx_path.relative_to(run.path))
    run.update_results(exports=written, exports_onnx=onnx_written)
    return written


def model_fingerprints(run: RunDir, names: list[str]) -> dict[str, str]:
    """Short content hashes of each model file (NN plus its heads), so cached attacks notice retraining."""
    nn_fp = _fingerprint(run.path / NN_WEIGHTS)
    return {n: nn_fp if n == "nn" else nn_fp + _fingerprint(run.path / f"models/{n}.pt") for n in names}


def load_models(run: RunDir, names: list[str] | None = None, device: torch.device | None = None) -> dict[str, torch.nn.Module]:
    """NN and every hybrid the run has (or exactly ``names``), sharing one feature extractor, on ``device``."""
    nn = load_nn(run, device)
    available = ["nn"] + [k for k in ("lh", "kh", "rlh") if (run.path / f"models/{k}.pt").is_file()]
    if names is None:
        names = available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise CnnRepairError(f"{run.path}: no model {', '.join(unknown)} in this run (it has {', '.join(available)}); "
                             f"fit it first or choose from those")
    return {n: nn if n == "nn" else load_hybrid(run, n, nn) for n in names}


@dataclass(frozen=True)
class AttackSweep:
    """One attack swept over ``eps`` (pixels, [0, 1]) on the test set, or a seeded slice of ``images`` of it;
    ``steps``: PGD's iterations (None: the attack's default). Checked when made."""

    attack: str
    eps: tuple[float, ...]
    images: int | None = None
    steps: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from cnnrepair.attacks import check_eps

        self.spec()  # the name and the steps
        if not self.eps:
            raise CnnRepairError("an attack sweep needs at least one epsilon (--eps, e.g. 0.05,0.1)")
        object.__setattr__(self, "eps", tuple(check_eps(e) for e in self.eps))
        if self.images is not None and (isinstance(self.images, bool) or not isinstance(self.images, int) or self.images < 1):
            raise CnnRepairError(f"--attack-images/--pgd-images must be >= 1 (got {self.images})")

    def spec(self):
        """The attack's :class:`cnnrepair.attacks.AttackSpec`."""
        from cnnrepair.attacks import get_attack

        return get_attack(self.attack, **({"steps": self.steps} if self.steps is not None else {}))


def stage_attack(run: RunDir, ds: Dataset, models: dict[str, torch.nn.Module], plan: AttackSweep,
                 progress: Progress | None = None) -> dict:
    """Sweep ``plan.attack`` over ``plan.eps`` on the test set (or a seeded slice of ``plan.images``)."""
    from cnnrepair.paper.evaluation import sweep

    spec, attack_name, eps_list, n_images, seed = plan.spec(), plan.attack, list(plan.eps), plan.images, plan.seed
    x, y = ds.x_test, ds.y_test
    if n_images is not None and n_images < len(y):
        idx = np.sort(np.random.default_rng(seed).permutation(len(y))[:n_images])
        x, y = x[idx], y[idx]
    t0 = time.perf_counter()
    result = sweep(models, x, y, eps_list, spec, run.path, model_fingerprints(run, list(models)), seed, progress)
    result["seconds"] = time.perf_counter() - t0
    prev = run.results.get("attack", {})
    old = prev.get(attack_name, {})
    if old.get("settings") == result["settings"] and old.get("n_images") == result["n_images"]:
        # sets reused from disk cost no attack time: keep the throughput measured when they were made
        result["seconds_per_10k_images"] = {**old.get("seconds_per_10k_images", {}), **result["seconds_per_10k_images"]}
    run.update_results(attack={**prev, attack_name: result}, timings_s={f"attack_{attack_name}": result["seconds"]})
    return result


REPAIR_KEYS_WITHOUT_EFFECT = ("n_jobs", "threads", "lp_device")  # settings that cannot change a repair's results


def repair_section(run: RunDir, variant: str | None) -> dict | None:
    """The recorded repair of ``variant`` (None: the run's main repair), or None."""
    res = run.results
    return res.get("repair") if not variant else res.get("repair_variants", {}).get(variant)


def check_repair_target(run: RunDir, settings, variant: str | None, overwrite: bool) -> None:
    """Refuse to replace repair results made with other settings (unless ``overwrite``), before any work."""
    import re

    if variant is not None and not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,39}", variant):
        raise CnnRepairError(f"--variant {variant!r}: use 1-40 lower-case letters, digits, '-' or '_' (e.g. anchored)")
    old = repair_section(run, variant)
    if overwrite or not old or "settings" not in old:
        return
    new = asdict(settings)
    diff = [f"{k}: {old['settings'].get(k)!r} -> {v!r}" for k, v in new.items()
            if k not in REPAIR_KEYS_WITHOUT_EFFECT and old["settings"].get(k) != v]
    if diff:
        what = f"repair variant {variant!r}" if variant else "main repair"
        raise CnnRepairError(f"{run.path}: its {what} was made with other settings ({'; '.join(diff[:4])}"
                             f"{'; ...' if len(diff) > 4 else ''}); pass --variant NAME to keep both, or --overwrite to replace it")


def repair_folder(run: RunDir, variant: str | None) -> Path:
    """Where a repair's entries live: ``repair/`` for the main repair, ``repair/variants/NAME/`` for a variant."""
    return run.path / "repair" if not variant else run.path / "repair" / "variants" / variant


def stage_repair(run: RunDir, ds: Dataset, settings, progress: Progress | None = None, variant: str | None = None,
                 overwrite: bool = False, device: torch.device | None = None) -> dict:
    """Run the paper's repair experiment; the main repair installs its primary RLH as ``models/rlh.pt``.

    The primary RLH is the entry at the middle epsilon of the grid, the largest K, no selection,
    promoted only if that entry was solved in this run. Results made with other settings are never
    replaced silently (see :func:`check_repair_target`); a variant (``variant="anchored"``) keeps its
    own entries and results beside the main repair and promotes nothing. Everything derived from
    ``models/rlh.pt`` (its export, attack results and accuracy of RLH) is refreshed or removed with it.
    """
    import shutil

    from cnnrepair.paper.experiment import run_repair_experiment

    if device is not None and settings.lp_device is None:
        settings = replace(settings, lp_device=str(device))
    check_repair_target(run, settings, variant, overwrite)
    folder = repair_folder(run, variant)
    for old in folder.glob("eps*_k*_*"):  # a previous solve of this repair: never left to pass for this one's
        if old.is_dir():
            shutil.rmtree(old)
    models = load_models(run, ["nn", "lh"], device)
    feats = load_npz(run.path / FEATURES, "feature cache")
    t0 = time.perf_counter()
    entries = run_repair_experiment(run, ds, models, feats["test"], settings, model_fingerprints(run, ["nn", "lh"]), progress,
                                    folder)
    seconds = time.perf_counter() - t0
    primary_eps = settings.eps[len(settings.eps) // 2]
    sel = "none" if "none" in settings.selections else settings.selections[0]
    primary = f"eps{primary_eps:g}_k{max(settings.ks)}_{sel}"
    solved = any(e.get("name") == primary and "accuracy" in e for e in entries)
    result = {"settings": asdict(settings), "primary": primary if solved else None, "entries": entries, "seconds": seconds}
    if variant:
        run.update_results(repair_variants={**run.results.get("repair_variants", {}), variant: result})
        return result
    run.update_results(repair=result, timings_s={"repair": seconds})
    _promote_rlh(run, ds, folder / primary / "rlh.pt" if solved else None)
    return result


def _promote_rlh(run: RunDir, ds: Dataset, src: Path | None) -> None:
    """Install ``src`` as models/rlh.pt (or remove it when None) and refresh what derives from it."""
    import shutil

    from cnnrepair.io import atomic_write

    if src is not None:
        atomic_write(run.sub("models/rlh.pt"), lambda p: shutil.copyfile(src, p))
    else:
        (run.path / "models" / "rlh.pt").unlink(missing_ok=True)
    res = run.results
    res["attack"] = {name: _without_rlh(a) for name, a in res.get("attack", {}).items()}  # measured on the old RLH
    res.setdefault("accuracy", {}).pop("rlh", None)
    res.setdefault("exports", {}).pop("rlh", None)
    if src is not None:
        res["accuracy"]["rlh"] = accuracy(load_hybrid(run, "rlh"), ds.x_test, ds.y_test)
    run.write_results(res)
    export = run.path / "export" / "rlh.pt2"
    had_export = export.is_file()
    export.unlink(missing_ok=True)
    if src is not None and had_export:
        export_models(run, {"rlh": load_hybrid(run, "rlh")}, tuple(res["input_shape"]))


def _without_rlh(a: dict) -> dict:
    """An attack sweep's results with every RLH entry removed (they belong to a replaced model)."""
    out = dict(a)
    for key in ("clean", "own", "success_rate", "adv_only", "seconds_per_10k_images"):
        if isinstance(out.get(key), dict):
            out[key] = {m: v for m, v in out[key].items() if m != "rlh"}
    if isinstance(out.get("transfer"), dict):
        out["transfer"] = {src: {t: v for t, v in row.items() if t != "rlh"} for src, row in out["transfer"].items() if src != "rlh"}
    return out
