"""State dicts (``.pt`` / ``.pth``) plus the Python factory that builds the model: ``module:function``.

The weights load with ``torch.load(weights_only=True)`` (never unpickling code); the factory is code
the user names explicitly. A checkpoint that nests its weights under ``state_dict`` or ``model`` is
read and written back with the same nesting; the repaired file is the same mapping with only the
repaired layer's tensors replaced.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write_bytes, torch_bytes

NESTED_KEYS = ("state_dict", "model")


def build(factory: str | None) -> nn.Module:
    """The model ``module:function`` returns (the module is imported from the current directory too)."""
    if not factory or ":" not in factory:
        raise CnnRepairError("a state dict needs the code that builds the model: pass --factory module:function "
                             "(e.g. --factory mynets:make_cnn, with mynets.py importable)")
    mod_name, _, fn_name = factory.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise CnnRepairError(f"--factory {factory}: cannot import it ({type(exc).__name__}: {exc}); "
                             "check the module is importable and defines the function") from None
    if not callable(fn):
        raise CnnRepairError(f"--factory {factory}: {fn_name} is not a function; name a function that returns the model")
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise CnnRepairError(f"--factory {factory}: calling it with no arguments failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120] if str(exc) else ''}); it must build the model by itself") from None
    if not isinstance(model, nn.Module):
        raise CnnRepairError(f"--factory {factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _weights(path: Path) -> tuple[dict, str | None]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        if "TorchScript" in str(exc) or "torch.jit.load" in str(exc):
            raise CnnRepairError(f"{path}: this is a TorchScript file, not a state dict; give it the suffix .ts") from None
        raise CnnRepairError(f"{path}: not a readable state dict ({type(exc).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                return obj[key], key
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CnnRepairError(f"{path}: not a state dict (a mapping of names to tensors); save it with torch.save(model.state_dict(), path)")
    return obj, None


def load(path: Path, factory: str | None) -> tuple[nn.Module, None, str | None]:
    """(model with the file's weights, no known input shape, the nesting key)."""
    state, key = _weights(path)
    model = build(factory)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CnnRepairError(f"{path}: the weights do not fit the model --factory builds ({str(exc).splitlines()[0][:140]})") from None
    return model.eval(), None, key


def save(loaded, repaired: nn.Module, tensors: list[str], path: Path) -> None:
    """The source file's mapping with ``tensors`` taken from ``repaired``."""
    obj = torch.load(str(loaded.path), map_location="cpu", weights_only=True)
    state = obj[loaded.program] if loaded.program else obj
    new = repaired.state_dict()
    for name in tensors:
        if name not in state:
            raise CnnRepairError(f"the state dict has no tensor {name!r} to write")
        state[name] = new[name].detach().cpu().to(state[name].dtype).clone()
    atomic_write_bytes(Path(path), torch_bytes(obj))
