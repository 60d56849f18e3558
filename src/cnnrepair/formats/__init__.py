"""Model files in and out: a repaired model goes back in the format it came in.

Formats, by file suffix: ``torch.export`` programs (``.pt2``, :mod:`cnnrepair.formats.pt2`) and
ONNX graphs (``.onnx``, :mod:`cnnrepair.formats.onnx`). Each loader gives a torch module that runs
the model (so attacks get gradients and repair finds the last linear layer); each saver writes
the *source* file again with only the repaired layer's tensors replaced, so the tools a user
already has (``torch.export.load``, onnxruntime, a verifier) read the result without cnnrepair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError

FORMATS = {".pt2": "torch.export", ".onnx": "onnx"}


@dataclass
class LoadedModel:
    """A model read from ``path``: ``module`` runs it; ``input_shape`` excludes the batch dimension."""

    path: Path
    format: str
    module: nn.Module
    input_shape: tuple[int, ...] | None
    program: object = None

    @property
    def suffix(self) -> str:
        return self.path.suffix.lower()


def _check_path(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise CnnRepairError(f"{path}: unknown model format {suffix or '(none)'}; give a torch.export program (.pt2) or an ONNX file (.onnx)")
    if not path.is_file():
        raise CnnRepairError(f"{path}: no such model file")
    return suffix


def load_model(path: Path) -> LoadedModel:
    """Read a model file (``.pt2`` or ``.onnx``), with a one-line error when it cannot be used."""
    path = Path(path)
    if _check_path(path) == ".onnx":
        from cnnrepair.formats import onnx as fmt
    else:
        from cnnrepair.formats import pt2 as fmt
    module, shape, program = fmt.load(path)
    return LoadedModel(path, FORMATS[path.suffix.lower()], module, shape, program)


def save_model(loaded: LoadedModel, repaired: nn.Module, tensors: list[str], path: Path) -> None:
    """Write ``repaired`` in ``loaded``'s format: the source file with ``tensors`` taken from ``repaired``."""
    if loaded.suffix == ".onnx":
        from cnnrepair.formats import onnx as fmt
    else:
        from cnnrepair.formats import pt2 as fmt
    fmt.save(loaded, repaired, tensors, Path(path))


def runtime_logits(path: Path, x: torch.Tensor | np.ndarray) -> np.ndarray | None:
    """The saved file's outputs from the format's own runtime where it has one besides torch
    (onnxruntime for ONNX), else None: what the certificate's margins are measured on."""
    if Path(path).suffix.lower() == ".onnx":
        from cnnrepair.formats.onnx import run_onnxruntime

        return run_onnxruntime(Path(path), x)
    return None
