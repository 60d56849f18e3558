"""Running a model: the device it lives on, batched forward passes, eval mode, progress reports.

The core (model files, repair, bounds, certificates) and the paper's pipeline both run models this
way; it lives here so that neither has to import the other for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cnnrepair.data import to_float
from cnnrepair.errors import CnnRepairError

Progress = Callable[[str, int, int], None]


@contextmanager
def elapsed(progress: Progress | None, desc: str, every: float = 15.0):
    """Report ``desc`` with its elapsed seconds every ``every`` s while a silent blocking call runs.

    The callback gets ``(f"{desc}: {s}s elapsed", 0, 1)`` from a background thread and a final
    ``(desc, 1, 1)``; nothing is reported without a callback.
    """
    if progress is None:
        yield
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            progress(f"{desc}: {time.monotonic() - t0:.0f}s elapsed", 0, 1)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        progress(f"{desc}: done in {time.monotonic() - t0:.0f}s", 1, 1)


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else the CPU; otherwise the named device, checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise CnnRepairError(f"--device {name!r} is not a device; use cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CnnRepairError(f"--device {name}: this machine has no CUDA device; use --device cpu (or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CnnRepairError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0")
    return dev


def first_output(out):
    """A model's output tensor: the first of a tuple or list (nested ones too), or the output itself."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters and buffers live (the CPU for a model that has none)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1000) -> np.ndarray:
    """Predicted labels for uint8 or [0, 1] float images."""
    return np.concatenate([batch.argmax(1).numpy() for batch in _batched(model, x, batch_size)]) if len(x) else np.zeros(0, np.int64)


@torch.no_grad()
def outputs(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 1000, progress: Progress | None = None, desc: str = "") -> np.ndarray:
    """Model outputs (logits, decision values or features) for uint8 or [0, 1] float images."""
    chunks = list(_batched(model, x, batch_size, progress, desc))
    return torch.cat(chunks).numpy() if chunks else np.zeros((0,), np.float32)


def _batched(model: nn.Module, x, batch_size: int, progress: Progress | None = None, desc: str = ""):
    was_training = model.training
    model.eval()
    dev = model_device(model)
    total = (len(x) + batch_size - 1) // batch_size
    for i in range(total):  # batches go to the model's device, results come back to the CPU
        yield model(to_float(x[i * batch_size:(i + 1) * batch_size]).to(dev)).cpu()
        if progress:
            progress(desc, i + 1, total)
    model.train(was_training)


def accuracy(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray) -> float:
    """Share of images classified correctly."""
    return float((predict(model, x) == np.asarray(y)).mean()) if len(y) else float("nan")


def eval_mode(model: nn.Module) -> nn.Module:
    """Put a model in eval mode; a ``torch.export`` module has no modes (its program was exported in one)."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


def check_threads(threads: int | None, name: str = "threads") -> int | None:
    """``threads`` (BLAS/OpenMP threads of a solve) if it is None or an integer >= 1, else a one-line error."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise CnnRepairError(f"{name} must be an integer >= 1 (got {threads!r})")
    return threads
