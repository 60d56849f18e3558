"""``torch.export`` programs (``.pt2``): the program runs as its ``GraphModule``; repair changes one
layer's tensors in the program's state and saves the same program, so ``torch.export.load`` reads
the result without cnnrepair."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write


def load(path: Path) -> tuple[nn.Module, tuple[int, ...] | None, object]:
    """(module, per-example input shape, program) of a ``torch.export`` file."""
    try:
        program = torch.export.load(str(path))
        module = program.module()
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise CnnRepairError(f"{path}: not a readable torch.export program ({type(exc).__name__}); re-export it with torch.export.save") from None
    return module, _input_shape(program), program


def _input_shape(program) -> tuple[int, ...] | None:
    """The per-example input shape of the program's single tensor input, when it is static."""
    users = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in program.graph_signature.user_inputs]
    if len(users) != 1:
        raise CnnRepairError(f"the program takes {len(users)} inputs; repair needs a classifier with one input tensor")
    val = users[0].meta.get("val")
    if val is None:
        return None
    dims = list(val.shape)
    if not isinstance(dims[0], torch.SymInt):
        raise CnnRepairError(f"the program was exported for a fixed batch of {dims[0]}; re-export it with a dynamic batch "
                             "dimension: torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))")
    return tuple(int(d) for d in dims[1:])


def save(loaded, repaired: nn.Module, tensors: list[str], path: Path) -> None:
    """Write ``repaired`` in ``loaded``'s format: the source program with ``tensors`` taken from ``repaired``."""
    program = torch.export.load(str(loaded.path))  # a fresh copy: the loaded one stays the original
    state = dict(repaired.named_parameters())
    state.update(dict(repaired.named_buffers()))
    for name in tensors:
        if name not in program.state_dict:
            raise CnnRepairError(f"the program has no tensor {name!r} to write; this layer cannot be saved in {loaded.format} form")
        old = program.state_dict[name]
        new = state[name].detach().to(old.dtype).cpu()
        program.state_dict[name] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    def write(p: Path) -> None:
        with warnings.catch_warnings():  # torch warns when a replaced tensor no longer shares storage with its old group (CPU tensors: harmless)
            warnings.filterwarnings("ignore", message="No complete tensor found in the group")
            torch.export.save(program, str(p))

    atomic_write(Path(path), write)
