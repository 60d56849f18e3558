"""Adversarial attacks behind one small interface, backed by Foolbox 3.

``attack(model, images, labels, eps)`` returns adversarial images in [0, 1], within ``eps`` of the
originals in L-infinity, and a success mask (the model misclassifies the returned image). The
attack library is hidden behind :data:`ATTACKS` so another (torchattacks, ART) can be swapped in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from cnnrepair.data import to_float
from cnnrepair.errors import CnnRepairError
from cnnrepair.runtime import Progress, model_device

PAPER_EPS = {
    "mnist": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15],
    "fashion-mnist": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15],
    "kmnist": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15],
    "digits": [0.025, 0.05, 0.075, 0.1, 0.125, 0.15],
    "cifar10": [0.001, 0.005, 0.01, 0.015, 0.02, 0.025],
}


@dataclass(frozen=True)
class AttackSpec:
    """An attack's name and settings, as recorded in results.json."""

    name: str
    steps: int = 1
    rel_stepsize: float = 0.0
    random_start: bool = False
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "rel_stepsize": self.rel_stepsize, "random_start": self.random_start,
                "library": "foolbox"}


ATTACKS: dict[str, Callable[..., AttackSpec]] = {
    "fgsm": lambda **_: AttackSpec("fgsm"),
    "pgd": lambda steps=20, rel_stepsize=None, **_: AttackSpec("pgd", steps=steps, rel_stepsize=_pgd_step(steps, rel_stepsize),
                                                               random_start=True),
}


def _pgd_step(steps: int, rel_stepsize: float | None) -> float:
    """PGD's step relative to eps: 2.5 / steps unless given (Madry et al.'s rule, so the walk can cross the ball)."""
    if steps < 1:
        raise CnnRepairError(f"PGD needs at least one step (got --pgd-steps {steps})")
    return 2.5 / steps if rel_stepsize is None else float(rel_stepsize)


def get_attack(name: str, **kwargs) -> AttackSpec:
    """Look up an attack by name (``fgsm`` or ``pgd``)."""
    if name not in ATTACKS:
        raise CnnRepairError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name](**kwargs)


def _foolbox_attack(spec: AttackSpec):
    import foolbox as fb

    if spec.name == "fgsm":
        return fb.attacks.FGSM()
    return fb.attacks.LinfPGD(steps=spec.steps, rel_stepsize=spec.rel_stepsize, random_start=spec.random_start)


def check_eps(eps: float) -> float:
    """Reject an epsilon outside [0, 1] (pixel scale) with a one-line error."""
    if not np.isfinite(eps) or eps < 0 or eps > 1:
        raise CnnRepairError(f"epsilon {eps} is outside [0, 1]; give epsilons on the [0, 1] pixel scale (e.g. 0.1, not 25)")
    return float(eps)


def attack(model: nn.Module, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, eps: float,
           method: str | AttackSpec = "fgsm", batch_size: int = 500, progress: Progress | None = None, desc: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Attack ``model`` on images in [0, 1] (uint8 accepted); returns (adversarial images, success mask)."""
    import foolbox as fb

    spec = get_attack(method) if isinstance(method, str) else method
    eps = check_eps(eps)
    x = to_float(images)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if x.ndim != 4 or len(x) != len(y):
        raise CnnRepairError(f"attack needs N x C x H x W images with N labels, got {tuple(x.shape)} and {len(y)} labels")
    if len(x) and (x.min() < 0 or x.max() > 1):
        raise CnnRepairError(f"images must lie in [0, 1] (got [{float(x.min()):.3g}, {float(x.max()):.3g}]); divide pixel values by 255")
    model.eval()
    device = model_device(model)
    fmodel = fb.PyTorchModel(model, bounds=(0.0, 1.0), device=device)  # never let Foolbox move the model
    atk = _foolbox_attack(spec)
    advs, succ = [], []
    total = (len(x) + batch_size - 1) // batch_size
    for i in range(total):
        xb, yb = x[i * batch_size:(i + 1) * batch_size].to(device), y[i * batch_size:(i + 1) * batch_size].to(device)
        if eps == 0:
            adv = xb.clone()
            with torch.no_grad():
                success = model(adv).argmax(1) != yb
        else:  # Foolbox clips to the eps-ball and [0, 1] and reports success on exactly those images
            _, adv, success = atk(fmodel, xb, yb, epsilons=eps)
            adv = adv.detach()
        succ.append(success.cpu())
        advs.append(adv.cpu())
        if progress:
            progress(desc or f"{spec.name} eps={eps:g}", i + 1, total)
    if not advs:
        return x.clone(), torch.zeros(0, dtype=torch.bool)
    return torch.cat(advs), torch.cat(succ)


def encode_perturbation(x: torch.Tensor, adv: torch.Tensor, eps: float) -> np.ndarray:
    """Perturbations as int8 multiples of eps/127: one byte a pixel, error at most eps/254."""
    if eps == 0:
        return np.zeros(tuple(x.shape), np.int8)
    return torch.round((adv - x) / eps * 127).clamp_(-127, 127).to(torch.int8).numpy()


def decode_perturbation(x_uint8: np.ndarray, delta: np.ndarray, eps: float) -> torch.Tensor:
    """Rebuild adversarial images in [0, 1] from uint8 originals and an encoded perturbation."""
    x = to_float(x_uint8)
    return (x + torch.as_tensor(delta, dtype=torch.float32) * (eps / 127)).clamp_(0.0, 1.0)
