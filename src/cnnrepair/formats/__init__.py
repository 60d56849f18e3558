"""Model files in and out: a repaired model goes back in the format it came in.

Formats, by file suffix: ``torch.export`` programs (``.pt2``, :mod:`cnnrepair.formats.pt2`), ONNX
graphs (``.onnx``, :mod:`cnnrepair.formats.onnx`), TorchScript files (``.ts`` / ``.torchscript``
plus the input shape, :mod:`cnnrepair.formats.torchscript`) and state dicts with the factory that
builds the model (``.pt`` / ``.pth`` plus ``module:function``, :mod:`cnnrepair.formats.state_dict`). Each loader gives a torch module that runs
the model (so attacks get gradients and repair finds the last linear layer); each saver writes
the *source* file again with only the repaired layer's tensors replaced, so the tools a user
already has (``torch.export.load``, onnxruntime, a verifier) read the result without cnnrepair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from cnnrepair.errors import CnnRepairError

RUNTIME_AGREEMENT = 1e-5  # a format's own runtime and the torch model must agree this well (relative to 1 + max|logit|)

FORMATS = {".pt2": "torch.export", ".onnx": "onnx", ".pt": "state_dict", ".pth": "state_dict", ".ts": "torchscript",
           ".torchscript": "torchscript"}


@dataclass
class LoadedModel:
    """A model read from ``path``: ``module`` runs it; ``input_shape`` excludes the batch dimension."""

    path: Path
    format: str
    module: nn.Module
    input_shape: tuple[int, ...] | None
    program: object = None
    factory: str | None = None

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


def _check_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise CnnRepairError(f"{path}: unknown model format {suffix or '(none)'}; give a torch.export program (.pt2), "
                             "an ONNX file (.onnx), a TorchScript file (.ts) or a state dict (.pt/.pth) with --factory")
    if not path.is_file():
        raise CnnRepairError(f"{path}: no such model file")
    return suffix


def _module(fmt: str):
    import importlib

    return importlib.import_module(f"cnnrepair.formats.{'pt2' if fmt == 'torch.export' else fmt}")


def load_model(path: Path, factory: str | None = None, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Read a model file (``.pt2``, ``.onnx``, ``.ts`` with ``input_shape`` (per example), or a
    ``.pt``/``.pth`` state dict with ``factory`` = ``module:function``), with a one-line error when
    it cannot be used. ``input_shape`` is used only where the file does not record it."""
    path = Path(path)
    fmt = FORMATS[_check_path(path)]
    if fmt == "state_dict":
        module, shape, program = _module(fmt).load(path, factory)
        shape = shape or (tuple(input_shape) if input_shape else None)
    elif fmt == "torchscript":
        module, shape, program = _module(fmt).load(path, input_shape)
    else:
        module, shape, program = _module(fmt).load(path)
    return LoadedModel(path, fmt, module, shape, program, factory)


def save_model(loaded: LoadedModel, repaired: nn.Module, tensors: list[str], path: Path) -> str | None:
    """Write ``repaired`` in ``loaded``'s format: the source file with ``tensors`` taken from ``repaired``. Returns a note
    when saving had to do more than that (an ONNX graph exported for one example), else None."""
    return _module(loaded.format).save(loaded, repaired, tensors, Path(path))


def runtime_fn(path: Path):
    """A batch -> float64 logits function running the saved file in its format's own runtime (one
    onnxruntime session, one ``torch.jit.load``), or None where that runtime is the loaded torch module."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt == "onnx":
        from cnnrepair.formats.onnx import onnxruntime_fn

        return onnxruntime_fn(Path(path))
    if fmt == "torchscript":
        from cnnrepair.formats.torchscript import file_fn

        return file_fn(Path(path))
    return None


def disagreement(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest difference between a runtime's outputs and the torch model's, relative to each
    input's logit scale ``1 + max|ref row|`` (float32 rounding grows with the logits, not with each
    entry); infinite when the shapes differ. Compared with RUNTIME_AGREEMENT."""
    if got.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    ref2, got2 = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    scale = 1 + np.abs(ref2).max(1, keepdims=True)
    return float(np.max(np.abs(got2 - ref2) / scale, initial=0.0))
