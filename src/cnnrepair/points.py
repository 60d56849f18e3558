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
from cnnrepair.training import Progress, predict

KINDS = ("misclassified", "fgsm", "pgd", "fog")


@dataclass(frozen=True)
class InputSpec:
    """Model input = ``(image - mean) / std`` per channel (images in [0, 1]), reshaped to ``shape``."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    shape: tuple[int, ...] | None = None

    def check(self, image_shape: tuple[int, ...]) -> None:
        """One-line errors for a convention that does not fit the images or the model."""
        channels = image_shape[0]
        for name, v in (("mean", self.mean), ("std", self.std)):
            if v is not None and len(v) not in (1, channels):
                raise CnnRepairError(f"--{name} has {len(v)} values but the images have {channels} channel(s); "
                                     f"give 1 or {channels} comma-separated values")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise CnnRepairError(f"--std must be positive (got {self.std})")
        if self.shape is not None and int(np.prod(self.shape)) != int(np.prod(image_shape)):
            raise CnnRepairError(f"the model takes inputs of shape {self.shape} but the images are {image_shape}; "
                                 "give a dataset of the model's input size")

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W) as model inputs."""
        c = x01.shape[1]
        x = x01
        if self.mean is not None:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        if self.std is not None:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        return x.reshape(len(x), *self.shape) if self.shape is not None else x


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
        out = self.model(self.spec.to_model(x))
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out


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

    def check(self) -> None:
        if self.kind not in KINDS:
            raise CnnRepairError(f"unknown kind of points {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind in ("fgsm", "pgd"):
            if self.eps is None:
                raise CnnRepairError(f"--kind {self.kind} needs --eps (in pixel units, e.g. 0.1)")
            check_eps(self.eps)
        if self.n < 1 or self.keep < 0 or self.held_out < 0:
            raise CnnRepairError(f"--n must be >= 1, --keep and --held-out >= 0 (got {self.n}, {self.keep}, {self.held_out})")
        if self.split not in ("train", "test"):
            raise CnnRepairError(f"--split must be train or test (got {self.split!r})")


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
                progress: Progress | None = None) -> MadePoints:
    """Points of ``settings.kind`` from uint8 ``images`` (N x C x H x W) with true ``labels``."""
    settings.check()
    spec.check(tuple(images.shape[1:]))
    pix = PixelModel(model, spec).eval()
    want = settings.n + settings.held_out
    order = np.random.default_rng(settings.seed).permutation(len(labels))
    pred = predict(pix, images[order])
    right = order[pred == labels[order]]
    wrong = order[pred != labels[order]]
    info = {"settings": asdict(settings), "input": asdict(spec), "images": int(len(labels)),
            "clean_accuracy": float(len(right) / max(len(labels), 1))}
    if settings.kind == "misclassified":
        src = wrong[:want]
        x01 = to_float(images[src])
    elif settings.kind == "fog":
        from cnnrepair.corruptions import fog

        foggy = fog(images[order], settings.severity, settings.seed)
        pred_fog = predict(pix, foggy)
        hit = np.flatnonzero(pred_fog != labels[order])[:want]
        src = order[hit]
        x01 = to_float(foggy[hit])
        info["fog_accuracy"] = float((pred_fog == labels[order]).mean())
    else:
        src_list, adv_list, tried = [], [], 0
        chunk = max(200, 2 * want)
        torch.manual_seed(settings.seed)  # PGD's random starts: the same points from the same seed
        while tried < len(right) and sum(len(s) for s in src_list) < want:
            take = right[tried:tried + chunk]
            tried += len(take)
            method = settings.kind if settings.kind == "fgsm" else _pgd(settings)
            adv, ok = attack(pix, images[take], labels[take], settings.eps, method, progress=progress,
                             desc=f"{settings.kind} eps={settings.eps:g}")
            ok = ok.numpy()
            src_list.append(take[ok])
            adv_list.append(adv[torch.from_numpy(ok)])
        src = np.concatenate(src_list)[:want] if src_list else np.zeros(0, np.int64)
        x01 = torch.cat(adv_list)[:want] if adv_list else torch.zeros((0, *images.shape[1:]))
        info["attacked"] = int(tried)
        info["attack_success_rate"] = float(len(np.concatenate(src_list)) / tried) if tried else 0.0
    if len(src) == 0:
        raise CnnRepairError(f"no {settings.kind} points: the model gets every tried image right; try another --kind or a larger --eps")
    used = set(src.tolist())
    keep_src = np.array([i for i in right if i not in used][:settings.keep], np.int64)
    with torch.no_grad():
        x = spec.to_model(x01).numpy().astype(np.float32)
        kx = spec.to_model(to_float(images[keep_src])).numpy().astype(np.float32) if len(keep_src) else np.zeros((0, *x.shape[1:]), np.float32)
    n = min(settings.n, len(src))
    info.update(points=int(n), held_out=int(len(src) - n), keep=int(len(keep_src)))
    y = labels[src].astype(np.int64)
    return MadePoints(x[:n], y[:n], src[:n].astype(np.int64), kx, labels[keep_src].astype(np.int64), keep_src, info,
                      x[n:], y[n:], src[n:].astype(np.int64))


def _pgd(settings: PointsSettings):
    from cnnrepair.attacks import get_attack

    return get_attack("pgd", steps=settings.pgd_steps)
