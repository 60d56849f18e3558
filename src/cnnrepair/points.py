"""Repair points from data: what ``cnnrepair points`` writes for ``cnnrepair repair`` to fix.

Images come in [0, 1]; a model expects its own units, ``(x - mean) / std`` per channel and its own
input shape. :class:`InputSpec` holds that convention (recorded with every result) and attacks run
in pixel space through it (what Foolbox calls preprocessing), so an ``eps`` is always in pixels.
Kinds of points: the model's ``misclassified`` images, its ``fgsm`` or ``pgd`` adversarial examples
of images it gets right, or images it gets wrong under MNIST-C ``fog``. Keep points are clean
images it gets right, never the source of a repair point.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from cnnrepair.attacks import attack, check_eps
from cnnrepair.data import to_float
from cnnrepair.errors import CnnRepairError
from cnnrepair.runtime import Progress, first_output, outputs, predict

KINDS = ("misclassified", "fgsm", "pgd", "fog")
KEEP_KINDS = ("clean", "fgsm", "pgd")
LAYOUTS = ("auto", "nchw", "nhwc")
NEAR_CHANCE = 3.0  # a clean accuracy below this many times chance (1 / classes) is reported as near chance


@dataclass(frozen=True)
class InputSpec:
    """Model input = ``(image - mean) / std`` per channel (images in [0, 1], N x C x H x W), laid out
    as the model takes it: ``shape`` (per example) and ``layout`` (``nchw``, ``nhwc``, or ``auto``:
    read from ``shape``). A layout is never guessed from element counts alone: a flat input of a
    multi-channel image needs ``layout`` given."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    shape: tuple[int, ...] | None = None
    layout: str = "auto"

    def resolved_layout(self, image_shape: tuple[int, ...]) -> str:
        """``nchw`` or ``nhwc`` (flattened or not, as ``shape`` says), or a one-line error."""
        if self.layout not in LAYOUTS:
            raise CnnRepairError(f"--layout must be one of {', '.join(LAYOUTS)} (got {self.layout!r})")
        c, h, w = (tuple(image_shape) + (1, 1, 1))[:3]
        if self.shape is None or tuple(self.shape) == (c, h, w):
            if self.layout == "nhwc" and self.shape is not None and c != 1:
                raise CnnRepairError(f"--layout nhwc, but the model takes {self.shape} = the images' C x H x W; drop --layout")
            return "nchw"
        if tuple(self.shape) == (h, w, c):
            if self.layout == "nchw":
                raise CnnRepairError(f"--layout nchw, but the model takes {self.shape} = the images' H x W x C; drop --layout")
            return "nhwc"
        if int(np.prod(self.shape)) != c * h * w:
            raise CnnRepairError(f"the model takes inputs of shape {self.shape} but the images are {tuple(image_shape)}; "
                                 "give a dataset of the model's input size")
        if c == 1 or self.layout != "auto":  # one channel: every layout flattens the same way
            return "nchw" if self.layout == "auto" else self.layout
        raise CnnRepairError(f"the model takes inputs of shape {self.shape} from {c}-channel images of {h}x{w}: the pixel order "
                             "cannot be read from the shapes; give --layout nchw (channel planes first, torch's order) or "
                             "--layout nhwc (pixels with their channels together, TensorFlow's order)")

    def check(self, image_shape: tuple[int, ...]) -> None:
        """One-line errors for a convention that does not fit the images or the model."""
        channels = image_shape[0]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and len(v) not in (1, channels):
                raise CnnRepairError(f"--{name} has {len(v)} values but the images have {channels} channel(s); "
                                     f"give 1 or {channels} comma-separated values")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise CnnRepairError(f"--std must be positive (got {self.std})")
        self.resolved_layout(image_shape)

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W) as model inputs."""
        c = x01.shape[1]
        x = x01
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        if self.resolved_layout(tuple(x01.shape[1:])) == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return x.reshape(len(x), *self.shape) if self.shape is not None else x

    def record(self, image_shape: tuple[int, ...]) -> dict:
        """JSON-ready, with the layout as resolved for these images."""
        return {**asdict(self), "layout": self.resolved_layout(image_shape)}


def chance_warning(accuracy: float, num_classes: int) -> str | None:
    """A warning when a clean accuracy is near chance (the usual cause: the wrong input convention)."""
    if num_classes < 2 or accuracy >= NEAR_CHANCE / num_classes:
        return None
    return (f"clean accuracy {100 * accuracy:.1f}% is near chance ({100 / num_classes:.1f}% for {num_classes} classes): the model "
            "probably expects another input convention (--mean/--std, 0-255 pixels: --std 0.00392156862745098, or --layout) "
            "or was trained on other data")


class PixelModel(nn.Module):
    """``model`` seen from pixel space: the input convention first (so attacks step in pixels)."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model, self.spec = model, spec

    def train(self, mode: bool = True) -> "PixelModel":
        """Modes pass through; a ``torch.export`` module has none (its program was exported in one)."""
        self.training = mode
        try:
            self.model.train(mode)
        except NotImplementedError:
            pass
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return first_output(self.model(self.spec.to_model(x)))


@dataclass
class PointsSettings:
    """What points to make: ``kind`` (one of KINDS), how many, from which split, attack and seed."""

    kind: str = "misclassified"
    n: int = 100
    keep: int = 1000
    held_out: int = 0
    eps: float | None = None
    split: str = "test"
    seed: int = 0
    pgd_steps: int = 40
    severity: int = 5
    keep_split: str = "train"  # keep points never come from the images an evaluation of the same split measures
    keep_kind: str = "clean"  # or fgsm / pgd: adversarial examples (at keep_eps) the model still gets right hold robustness
    keep_eps: float | None = None

    def check(self) -> None:
        if self.kind not in KINDS:
            raise CnnRepairError(f"unknown kind of points {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind in ("fgsm", "pgd"):
            if self.eps is None:
                raise CnnRepairError(f"--kind {self.kind} needs --eps (in pixel units, e.g. 0.1)")
            check_eps(self.eps)
        if self.n < 1 or self.keep < 0 or self.held_out < 0:
            raise CnnRepairError(f"--n must be >= 1, --keep and --held-out >= 0 (got {self.n}, {self.keep}, {self.held_out})")
        if self.split not in ("train", "test") or self.keep_split not in ("train", "test"):
            raise CnnRepairError(f"--split and --keep-split must be train or test (got {self.split!r}, {self.keep_split!r})")
        if self.keep_kind not in KEEP_KINDS:
            raise CnnRepairError(f"--keep-kind must be one of {', '.join(KEEP_KINDS)} (got {self.keep_kind!r})")
        if self.keep_kind != "clean":
            if self.keep_eps is None:
                raise CnnRepairError(f"--keep-kind {self.keep_kind} needs --keep-eps (pixels, e.g. 0.03)")
            check_eps(self.keep_eps)
        elif self.keep_eps is not None:
            raise CnnRepairError("--keep-eps is the radius of adversarial keep points: add --keep-kind fgsm or pgd")


@dataclass
class MadePoints:
    """Repair, held-out (same kind, for generalisation) and keep points in model units, their source
    image indices, and what made them."""

    x: np.ndarray
    y: np.ndarray
    index: np.ndarray
    keep_x: np.ndarray
    keep_y: np.ndarray
    keep_index: np.ndarray
    info: dict = field(default_factory=dict)
    held_x: np.ndarray | None = None
    held_y: np.ndarray | None = None
    held_index: np.ndarray | None = None


def make_points(model: nn.Module, images: np.ndarray, labels: np.ndarray, spec: InputSpec, settings: PointsSettings,
                progress: Progress | None = None, keep_pool: tuple[np.ndarray, np.ndarray] | None = None) -> MadePoints:
    """Points of ``settings.kind`` from uint8 ``images`` (N x C x H x W) with true ``labels``.

    Keep points come from ``keep_pool`` (images, labels of ``settings.keep_split``) when given, else
    from ``images`` without the repair and held-out points' sources: repair, held-out and keep points
    never share an image. ``info["warnings"]`` says when fewer points than asked were found or the
    clean accuracy is near chance."""
    settings.check()
    spec.check(tuple(images.shape[1:]))
    pix = PixelModel(model, spec).eval()
    want = settings.n + settings.held_out
    order = np.random.default_rng(settings.seed).permutation(len(labels))
    logits = outputs(pix, images[order])
    num_classes = int(logits.shape[-1]) if logits.ndim == 2 else 0
    pred = logits.argmax(1) if logits.ndim == 2 else np.zeros(0, np.int64)
    right = order[pred == labels[order]]
    info = {"settings": asdict(settings), "input": spec.record(tuple(images.shape[1:])), "images": int(len(labels)),
            "clean_accuracy": float(len(right) / max(len(labels), 1)), "split": settings.split, "warnings": []}
    chance = chance_warning(info["clean_accuracy"], num_classes)
    if chance:
        info["warnings"].append(chance)
    src, x01 = _sources(pix, images, labels, order, right, settings, want, info, progress)
    if len(src) == 0:
        raise CnnRepairError(f"no {settings.kind} points: the model gets every tried image right; try another --kind or a larger --eps")
    if keep_pool is None:
        used = set(src.tolist())
        keep_images, keep_labels, keep_right = images, labels, np.array([i for i in right if i not in used], np.int64)
        info["keep_split"] = settings.split
    else:
        keep_images, keep_labels = keep_pool
        korder = np.random.default_rng(settings.seed + 1).permutation(len(keep_labels))
        keep_right = korder[predict(pix, keep_images[korder]) == keep_labels[korder]] if len(korder) else np.zeros(0, np.int64)
        info["keep_split"] = settings.keep_split
    keep_src, keep01 = _keep(pix, keep_images, keep_labels, keep_right, settings, progress)
    with torch.no_grad():
        x = spec.to_model(x01).numpy().astype(np.float32)
        kx = spec.to_model(keep01).numpy().astype(np.float32) if len(keep_src) else np.zeros((0, *x.shape[1:]), np.float32)
    n = min(settings.n, len(src))
    info.update(points=int(n), held_out=int(len(src) - n), keep=int(len(keep_src)))
    for what, asked, made in (("repair", settings.n, n), ("held-out", settings.held_out, len(src) - n), ("keep", settings.keep, len(keep_src))):
        if made < asked:
            info["warnings"].append(f"asked for {asked} {what} points, found {made} ({_why(what, settings)})")
    y = labels[src].astype(np.int64)
    return MadePoints(x[:n], y[:n], src[:n].astype(np.int64), kx, keep_labels[keep_src].astype(np.int64), keep_src, info,
                      x[n:], y[n:], src[n:].astype(np.int64))


def _why(what: str, settings: PointsSettings) -> str:
    if what == "keep":
        return f"the model gets fewer {settings.keep_split} images right" + ("" if settings.keep_kind == "clean" else
                                                                            f" under {settings.keep_kind} at eps {settings.keep_eps:g}")
    return {"misclassified": "the model misclassifies no more images of the split",
            "fog": "the model misclassifies no more fogged images of the split"}.get(
        settings.kind, f"the attack found no more adversarial examples at eps {settings.eps}")


def _sources(pix, images, labels, order, right, settings: PointsSettings, want: int, info: dict, progress):
    """(source indices, images in [0, 1]) of the repair and held-out points."""
    if settings.kind == "misclassified":
        src = order[~np.isin(order, right)][:want]  # the misclassified ones, in the seeded order
        return src, to_float(images[src])
    if settings.kind == "fog":
        from cnnrepair.corruptions import fog

        foggy = fog(images[order], settings.severity, settings.seed)
        pred_fog = predict(pix, foggy)
        hit = np.flatnonzero(pred_fog != labels[order])[:want]
        info["fog_accuracy"] = float((pred_fog == labels[order]).mean())
        return order[hit], to_float(foggy[hit])
    torch.manual_seed(settings.seed)  # PGD's random starts: the same points from the same seed
    method = settings.kind if settings.kind == "fgsm" else _pgd(settings)
    src, adv, tried = _attack_until(right, want, True, lambda idx: attack(
        pix, images[idx], labels[idx], settings.eps, method, progress=progress, desc=f"{settings.kind} eps={settings.eps:g}"))
    info["attacked"] = int(tried)
    info["attack_success_rate"] = float(len(src) / tried) if tried else 0.0
    return src, adv


def _attack_until(candidates: np.ndarray, want: int, success: bool, run) -> tuple[np.ndarray, torch.Tensor, int]:
    """Attack ``candidates`` in order, in chunks (``run(indices)`` -> adversarial images, success mask),
    until ``want`` of them have ``success`` as asked; returns (their indices, their attacked images, how many were tried)."""
    src_list, adv_list, tried = [], [], 0
    chunk = max(200, 2 * want)
    while tried < len(candidates) and sum(len(s) for s in src_list) < want:
        take = candidates[tried:tried + chunk]
        tried += len(take)
        adv, ok = run(take)
        ok = ok.numpy() if success else ~ok.numpy()
        src_list.append(take[ok])
        adv_list.append(adv[torch.from_numpy(ok)])
    src = np.concatenate(src_list)[:want] if src_list else np.zeros(0, np.int64)
    return src, (torch.cat(adv_list)[:want] if adv_list else torch.zeros(0)), tried


def _keep(pix, images, labels, right, settings: PointsSettings, progress) -> tuple[np.ndarray, torch.Tensor]:
    """(source indices, images in [0, 1]) of the keep points: clean images the model gets right, or
    (``keep_kind`` fgsm / pgd) the attacked images it still gets right, so robustness there is kept."""
    if settings.keep_kind == "clean" or not len(right) or not settings.keep:
        src = right[:settings.keep]
        return src, to_float(images[src]) if len(src) else torch.zeros((0, *images.shape[1:]))
    method = settings.keep_kind if settings.keep_kind == "fgsm" else _pgd(settings)
    src, adv, _ = _attack_until(right, settings.keep, False, lambda idx: attack(
        pix, images[idx], labels[idx], settings.keep_eps, method, progress=progress,
        desc=f"keep {settings.keep_kind} eps={settings.keep_eps:g}"))
    return src, adv


def _pgd(settings: PointsSettings):
    from cnnrepair.attacks import get_attack

    return get_attack("pgd", steps=settings.pgd_steps)
