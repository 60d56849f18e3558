"""TorchScript files (``.ts`` / ``.torchscript``): run through an ONNX export of the module, saved back into it.

A ``torch.jit`` module takes no forward hooks and has no ``get_submodule``, so its last linear layer
cannot be found or fed the way an ``nn.Module``'s is. It is exported to ONNX in memory (the
TorchScript-based exporter keeps the module's parameter names as initializer names) and run by
:class:`cnnrepair.formats.onnx.OnnxModule`; saving writes the repaired tensors into the TorchScript
module's own parameters and saves it with ``torch.jit.save``, and the certificate measures the
saved file with ``torch.jit.load`` itself. The export needs the per-example input shape, which a
TorchScript file does not record: it comes from ``--input-shape`` or the points' shape.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write_bytes


def _read(path: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own notice; the user chose the format
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise CnnRepairError(f"{path}: not a readable TorchScript file ({type(exc).__name__}); save it with torch.jit.save") from None


def load(path: Path, input_shape: tuple[int, ...] | None) -> tuple[nn.Module, tuple[int, ...], object]:
    """(module running the graph, the input shape, the TorchScript module)."""
    from cnnrepair.formats.onnx import OnnxModule, import_onnx

    if not input_shape:
        raise CnnRepairError(f"{path}: a TorchScript file does not record its input shape; pass --input-shape C,H,W (e.g. 1,28,28)")
    scripted = _read(path).eval()
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notice
            torch.onnx.export(scripted, (torch.zeros(2, *input_shape),), buf, dynamo=False, do_constant_folding=False,
                              input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - the module cannot run on that shape, or uses what ONNX cannot express
        raise CnnRepairError(f"{path}: cannot trace the TorchScript module on inputs of shape {tuple(input_shape)} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); check --input-shape") from None
    proto = import_onnx().load_from_string(buf.getvalue())
    return OnnxModule(proto, path).eval(), tuple(input_shape), scripted


def save(loaded, repaired: nn.Module, tensors: list[str], path: Path) -> None:
    """The source TorchScript module with the repaired layer's parameters replaced."""
    scripted = _read(loaded.path)
    own = {**dict(scripted.named_parameters()), **dict(scripted.named_buffers())}
    state = dict(repaired.named_parameters())
    for tensor in tensors:
        layer, _, kind = tensor.rpartition(".")
        src = loaded.module.linear_sources.get(layer)
        target = None if src is None else (src.weight if kind == "weight" else src.bias)
        if target is None or target not in own:
            raise CnnRepairError(f"the TorchScript module has no parameter behind layer {layer!r} ({kind}); it cannot be saved in place")
        value = state[tensor].detach().cpu()
        if kind == "weight" and src.weight_transposed:
            value = value.T
        with torch.no_grad():
            own[target].copy_(value.reshape(own[target].shape).to(own[target].dtype))
    buffer = io.BytesIO()  # in memory first: a full disk is a Python error, never an abort in torch's writer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def file_fn(path: Path):
    """A batch -> float64 outputs function on the saved TorchScript file itself (not our interpreter)."""
    scripted = _read(path).eval()

    def run(x: torch.Tensor | np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return scripted(torch.as_tensor(x)).double().numpy()

    return run
