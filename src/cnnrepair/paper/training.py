"""Seeded, resumable training of a SplitNet, batched evaluation and feature extraction.

Recipe: AdamW with a one-cycle learning-rate schedule (cosine annealing after a warm-up) and
cross-entropy; for colour images random 4-pixel-padded crops and horizontal flips. Each epoch's
shuffle and augmentation come from a generator seeded by (seed, epoch), so a run resumed from its
checkpoint takes exactly the same steps as one that never stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnrepair.data import to_float
from cnnrepair.errors import CnnRepairError
from cnnrepair.io import load_torch, save_torch
from cnnrepair.runtime import Progress, accuracy, elapsed, model_device, outputs, predict, resolve_device  # noqa: F401 - re-exported

@dataclass
class TrainConfig:
    """Hyper-parameters of one training run; checked when made (a one-line CnnRepairError)."""

    epochs: int = 6
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    augment: bool = False
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.epochs, self.batch_size, self.seed))
        if not ints or self.epochs < 1 or self.batch_size < 1 or not (self.lr > 0 and np.isfinite(self.lr)):
            raise CnnRepairError(f"epochs and batch size must be integers >= 1 and the learning rate a number > 0 "
                                 f"(got epochs {self.epochs!r}, batch size {self.batch_size!r}, lr {self.lr!r})")
        if not (self.weight_decay >= 0 and np.isfinite(self.weight_decay)):
            raise CnnRepairError(f"weight decay must be a number >= 0 (got {self.weight_decay!r})")


RECIPES: dict[str, TrainConfig] = {
    "digits": TrainConfig(epochs=40, batch_size=64, lr=3e-3),
    "mnist": TrainConfig(epochs=6, batch_size=128, lr=2e-3),
    "fashion-mnist": TrainConfig(epochs=10, batch_size=128, lr=2e-3),
    "kmnist": TrainConfig(epochs=10, batch_size=128, lr=2e-3),
    "cifar10": TrainConfig(epochs=12, batch_size=128, lr=1e-3, augment=True),
}


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded (reflect) crop and horizontal flip, batched."""
    n, c, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (n,), generator=g)
    dx = torch.randint(0, 9, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def train(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``device`` (default: where it is), resuming from ``checkpoint``.

    Batches are drawn and augmented on the CPU from the seeded generator, then moved, so the
    steps taken do not depend on the device. Returns the per-epoch history (loss, accuracy on
    the training batches, learning rate).
    """
    dev = torch.device(device) if device is not None else model_device(model)
    model.to(dev)
    n = len(y_train)
    if n == 0:
        raise CnnRepairError("training set is empty; check the dataset")
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2)
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_torch(checkpoint, "training checkpoint")
        saved = state.get("config", {})
        if {k: saved.get(k) for k in ("epochs", "batch_size", "lr", "seed")} != {k: getattr(cfg, k) for k in ("epochs", "batch_size", "lr", "seed")}:
            raise CnnRepairError(f"{checkpoint}: checkpoint was trained with {saved}, not the requested settings; use another --out or the same settings")
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CnnRepairError(f"{checkpoint}: checkpoint does not fit this model ({str(exc).splitlines()[0][:120]}); delete it or use another --out") from None
        start, history = int(state["epoch"]), list(state.get("history", []))
    x_all = torch.as_tensor(x_train)
    y_all = torch.as_tensor(y_train, dtype=torch.long)
    for epoch in range(start, cfg.epochs):
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        perm = torch.randperm(n, generator=g)
        tot_loss, tot_correct = 0.0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = to_float(x_all[idx]), y_all[idx]
            if cfg.augment:
                xb = _augment(xb, g)
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            tot_correct += int((logits.argmax(1) == yb).sum())
            if progress:
                progress(f"train epoch {epoch + 1}/{cfg.epochs}", step + 1, steps_per_epoch)
        history.append({"epoch": epoch + 1, "loss": tot_loss / n, "train_acc": tot_correct / n, "lr": sched.get_last_lr()[0]})
        if checkpoint is not None:
            save_torch(Path(checkpoint), {
                "model": cpu_state(model), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "epoch": epoch + 1, "config": asdict(cfg), "history": history,
            })
    model.eval()
    return history


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict on the CPU, so saved weights load anywhere."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
