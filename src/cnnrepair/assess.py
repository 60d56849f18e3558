"""Evaluation of any model before and after repair: one report, one plot.

Clean accuracy and accuracy under attack at each eps (pixel units, through the model's input
convention) for the original and the repaired model on the same images and the same attack, and
the repair field's measures: efficacy (repair points classified correctly), drawdown (clean
accuracy lost, points) and generalisation (accuracy gained on held-out points of the same kind,
points), as PRDNN and APRNN report them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from cnnrepair.attacks import attack, check_eps, get_attack
from cnnrepair.bounds import METHODS
from cnnrepair.errors import CnnRepairError
from cnnrepair.data import to_float
from cnnrepair.points import InputSpec, PixelModel, chance_warning
from cnnrepair.runtime import Progress, first_output, outputs, predict


@dataclass
class AssessSettings:
    """Which attack at which eps on how many images (a seeded slice)."""

    eps: list[float] = field(default_factory=lambda: [0.05, 0.1])
    attack: str = "fgsm"
    n: int = 1000
    seed: int = 0
    pgd_steps: int = 40
    certify: str | None = None  # a bound method (cnnrepair.bounds.METHODS): also the certified accuracy at each eps (sound bounds over each ball)
    split: str | None = None  # which split the images are (recorded; matched against the point sets' recorded split)
    scheduler: str | None = None  # a Dask scheduler's address: certified accuracy bounded on its workers

    def check(self) -> None:
        for e in self.eps:
            check_eps(e)
        if self.attack not in ("fgsm", "pgd"):
            raise CnnRepairError(f"--attack must be fgsm or pgd (got {self.attack!r})")
        if self.n < 1:
            raise CnnRepairError(f"--n must be >= 1 (got {self.n})")
        if self.certify is not None and self.certify not in METHODS:
            raise CnnRepairError(f"--certify must be one of {', '.join(METHODS)} (got {self.certify!r})")
        if self.scheduler is not None and self.certify is None:
            raise CnnRepairError("--scheduler spreads certification over a Dask cluster: give --certify too")


@torch.no_grad()
def accuracy_on(model: nn.Module, x: torch.Tensor | np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    """Share of inputs (model units) classified as ``y``."""
    x = torch.as_tensor(x)
    if len(x) == 0:
        return float("nan")
    pred = np.concatenate([first_output(model(x[i:i + batch])).argmax(1).cpu().numpy() for i in range(0, len(x), batch)])
    return float((pred == np.asarray(y)).mean())


@dataclass
class PointSet:
    """A points file: inputs ``x`` (model units), labels ``y``, and, when ``cnnrepair points`` made it,
    the ``index`` of each point's source image in ``split``."""

    x: np.ndarray
    y: np.ndarray | None
    index: np.ndarray | None = None
    split: str | None = None


def source_indices(images: np.ndarray, spec: InputSpec, pset: PointSet, split: str | None) -> np.ndarray:
    """Indices of ``images`` that ``pset`` was made from: its recorded indices when it was made from
    this split, and every image whose model input equals one of its points bit for bit (a file
    without indices; an adversarial point has no equal and is matched by index only)."""
    return sources_of(images, spec, {"set": pset}, split)["set"]


def sources_of(images: np.ndarray, spec: InputSpec, sets: dict[str, PointSet], split: str | None) -> dict[str, np.ndarray]:
    """:func:`source_indices` of every set, the images converted to model inputs once for all of them."""
    found: dict[str, set] = {name: set() for name in sets}
    owners: dict[bytes, list[str]] = {}
    for name, pset in sets.items():
        if pset.index is not None and pset.split is not None and pset.split == split:
            found[name].update(int(i) for i in np.asarray(pset.index).reshape(-1) if 0 <= i < len(images))
        for row in np.asarray(pset.x, np.float32):
            owners.setdefault(np.ascontiguousarray(row, np.float32).tobytes(), []).append(name)
    if owners:
        with torch.no_grad():
            for i in range(0, len(images), 2000):
                xb = spec.to_model(to_float(images[i:i + 2000])).numpy().astype(np.float32)
                for k, row in enumerate(xb):
                    for name in owners.get(np.ascontiguousarray(row).tobytes(), ()):
                        found[name].add(i + k)
    return {name: np.array(sorted(idx), np.int64) for name, idx in found.items()}


def _check_inputs(models: dict[str, nn.Module], images: np.ndarray, spec: InputSpec, sets: dict) -> int:
    """Every model gives the same number of classes (returned); the points fit the model and carry labels of those classes."""
    classes = {}
    for name, model in models.items():
        with torch.no_grad():
            try:
                classes[name] = int(outputs(PixelModel(model, spec).eval(), images[:2]).shape[-1])
            except Exception as exc:  # noqa: BLE001 - the model cannot take these images
                raise CnnRepairError(f"the {name} model cannot run on the images ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    if len(set(classes.values())) > 1:
        raise CnnRepairError(f"the models give different numbers of classes ({', '.join(f'{k} {v}' for k, v in classes.items())}); "
                             "give the repaired file of this very model")
    first = next(iter(models.values()))
    num = next(iter(classes.values()))
    for what, pair in sets.items():
        if pair is None:
            continue
        px, py = pair
        if py is None:
            raise CnnRepairError(f"the {what} need labels (an array y)")
        py = np.asarray(py)
        if len(py) and (py.min() < 0 or py.max() >= num):
            raise CnnRepairError(f"the {what} carry labels {py.min()}..{py.max()}, but the model has {num} classes (0..{num - 1})")
        with torch.no_grad():
            try:
                first_output(first(torch.as_tensor(px[:2])))
            except Exception as exc:  # noqa: BLE001 - wrong shape or dtype for the model
                raise CnnRepairError(f"the {what} (inputs of shape {tuple(px.shape[1:])}) cannot run on the model "
                                     f"({type(exc).__name__}); give points made for it by cnnrepair points") from None
    return num


def assess(models: dict[str, nn.Module], images: np.ndarray, labels: np.ndarray, spec: InputSpec, settings: AssessSettings,
           point_sets: dict[str, PointSet] | None = None, progress: Progress | None = None) -> dict:
    """The report: per model clean and attacked accuracy; with the repair's ``points`` (and ``held_out``
    points) among ``point_sets``, the repair measures of every model after the first (the original) against it.

    The evaluation images are a seeded slice of ``settings.n`` images that excludes every image a
    set in ``point_sets`` (``points``, ``keep``, ``held_out``: a repair fixes or holds those) was made
    from, so drawdown is measured on images the repair never saw; ``report["images_used"]`` lists
    them and their overlap with each set (zero)."""
    settings.check()
    spec.check(tuple(images.shape[1:]))
    avoid = dict(point_sets or {})
    unknown = sorted(set(avoid) - {"points", "keep", "held_out"})
    if unknown:
        raise CnnRepairError(f"unknown point set {unknown[0]!r}; give points, keep or held_out")
    labelled = {name: None if avoid.get(name) is None else (avoid[name].x, avoid[name].y) for name in ("points", "held_out")}
    for name, pair in labelled.items():
        if pair is not None and pair[1] is None:
            raise CnnRepairError(f"the {name.replace('_', '-')} points need labels (y) to be measured")
    points, held_out = labelled["points"], labelled["held_out"]
    num_classes = _check_inputs(models, images, spec, {"points": points, "held-out points": held_out})
    sources = sources_of(images, spec, avoid, settings.split)
    banned = np.unique(np.concatenate([np.zeros(0, np.int64), *sources.values()]))
    pool = np.random.default_rng(settings.seed).permutation(len(labels))
    pool = pool[~np.isin(pool, banned)]
    take = np.sort(pool[:settings.n])
    x, y = images[take], labels[take]
    method = settings.attack if settings.attack == "fgsm" else get_attack("pgd", steps=settings.pgd_steps)
    report = {"settings": asdict(settings), "input": spec.record(tuple(images.shape[1:])), "images": int(len(y)), "models": {},
              "images_used": {"split": settings.split, "count": int(len(take)), "indices": take.tolist(),
                              "excluded": {name: int(len(idx)) for name, idx in sources.items()},
                              "overlap": {name: int(np.isin(take, idx).sum()) for name, idx in sources.items()}},
              "warnings": []}
    if len(take) < settings.n:
        report["warnings"].append(f"asked for {settings.n} images, {len(take)} remain once the points' source images are excluded")
    for name, model in models.items():
        pix = PixelModel(model, spec).eval()
        row = {"clean_accuracy": float((predict(pix, x) == y).mean()), "attack": {}}
        chance = chance_warning(row["clean_accuracy"], num_classes) if len(x) else None
        if chance:
            report["warnings"].append(f"{name}: {chance}")
        for eps in settings.eps:
            torch.manual_seed(settings.seed)
            _, success = attack(pix, x, y, eps, method, progress=progress, desc=f"{name}: {settings.attack} eps={eps:g}")
            row["attack"][f"{eps:g}"] = float(1.0 - success.float().mean())
        if settings.certify:
            row["certified"] = _certified(model, x, y, spec, settings, progress, name)
        if points is not None:
            row["repair_points_accuracy"] = accuracy_on(model, points[0], points[1])
        if held_out is not None:
            row["held_out_accuracy"] = accuracy_on(model, held_out[0], held_out[1])
        report["models"][name] = row
    names = list(models)
    if len(names) > 1:
        base = report["models"][names[0]]
        for name in names[1:]:
            r = report["models"][name]
            r["drawdown"] = 100 * (base["clean_accuracy"] - r["clean_accuracy"])
            r["robustness_change"] = {e: 100 * (a - base["attack"][e]) for e, a in r["attack"].items()}  # points, per eps
            lost = {e: d for e, d in r["robustness_change"].items() if d < 0}
            if lost:
                fell = ", ".join(f"eps {e}: {d:+.2f}" for e, d in lost.items())
                report["warnings"].append(f"{name}: accuracy under {settings.attack} fell ({fell} points); repair "
                                          "points do not hold robustness by themselves: keep adversarial examples the model "
                                          "still gets right (cnnrepair points --keep-kind fgsm --keep-eps E)")
            if points is not None:
                r["efficacy"] = r["repair_points_accuracy"]
            if held_out is not None:
                r["generalisation"] = 100 * (r["held_out_accuracy"] - base["held_out_accuracy"])
    return report


def _certified(model: nn.Module, images: np.ndarray, labels: np.ndarray, spec: InputSpec, settings: AssessSettings,
               progress: Progress | None, name: str) -> dict:
    """Certified accuracy per eps: the share of images whose whole ball (pixels, in [0, 1]) provably keeps the label."""
    from cnnrepair.certify import certify_boxes
    from cnnrepair.data import to_float

    x01 = to_float(images).double()
    out = {}
    for eps in settings.eps:  # the box in pixels, through the input convention (monotone: std > 0)
        lo, hi = spec.to_model((x01 - eps).clamp(0, 1)), spec.to_model((x01 + eps).clamp(0, 1))
        tell = None if progress is None else (lambda desc, i, n, e=eps: progress(f"{name}: {desc} eps={e:g}", i, n))
        out[f"{eps:g}"] = certify_boxes(model, lo, hi, labels, settings.certify, eps=eps, progress=tell,
                                      scheduler=settings.scheduler).accuracy
    return out


def plot_report(report: dict, path) -> None:
    """Accuracy under attack against eps, one line per model, the clean accuracy at eps 0."""
    from cnnrepair.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in report["models"].items():
        eps = [0.0] + [float(e) for e in r["attack"]]
        acc = [r["clean_accuracy"]] + list(r["attack"].values())
        label = name + (f" (drawdown {r['drawdown']:.2f}, generalisation {r['generalisation']:+.2f})" if "generalisation" in r else "")
        line, = ax.plot(eps, [100 * a for a in acc], marker="o", label=label)
        if "certified" in r:
            ax.plot([float(e) for e in r["certified"]], [100 * a for a in r["certified"].values()], marker="s", linestyle="--",
                    color=line.get_color(), label=f"{name}: certified ({report['settings']['certify']})")
    ax.set_xlabel(f"eps ({report['settings']['attack'].upper()}, pixel units)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['images']} test images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from cnnrepair.io import atomic_write

    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
