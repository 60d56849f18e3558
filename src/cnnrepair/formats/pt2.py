"""``torch.export`` programs (``.pt2``): the program runs as its ``GraphModule``; repair changes one
layer's tensors in the program's state and saves the same program, so ``torch.export.load`` reads
the result without cnnrepair."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import threading
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.io import atomic_write_bytes

# members torch.export.load would unpickle: sample inputs and anything saved with torch.save / pickle
_PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle")
_CODE_PREFIXES = ("custom_obj_", "opaque_obj_")  # ScriptObjects and arbitrary pickled constants
_QUIET = ("torch.export", "torch._export.serde.serialize", "torch.export.pt2_archive._package")
_LOCK = threading.Lock()


def _refuse(path: Path, member: str, why: str) -> CnnRepairError:
    return CnnRepairError(f"{path}: refused to load: archive member {member!r} {why}; loading it could run code from the file. "
                          "Re-export the model with torch.export.save from plain tensors (no sample inputs of other types)")


def check_archive(path: Path, data: bytes) -> None:
    """Refuse a ``.pt2`` archive any of whose pickled members would need more than tensors to unpickle.

    ``torch.export.load`` unpickles the sample inputs (retrying with ``weights_only=False``) and any
    weight or constant stored with pickle; each such member is first loaded here with torch's
    restricted (``weights_only``) unpickler, which builds tensors and containers and calls nothing
    else. Custom-object and opaque constants are arbitrary pickles and refused outright."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CnnRepairError(f"{path}: not a readable torch.export program (not a zip archive); re-export it with torch.export.save") from None
    pickled = []
    for name in names:
        rel = name.split("/", 1)[1] if "/" in name else name
        if rel.lower().endswith(_PICKLE_SUFFIXES) or "sample_inputs/" in rel:
            pickled.append(name)
        if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith("_config.json"):
            try:
                config = json.loads(zf.read(name)).get("config", {})
            except (ValueError, AttributeError):
                raise CnnRepairError(f"{path}: archive member {name!r} is not valid JSON; re-export the model") from None
            folder = name.rsplit("/", 1)[0]
            for meta in config.values():
                member = posixpath.normpath(f"{folder}/{meta.get('path_name', '')}")
                if str(meta.get("path_name", "")).startswith(_CODE_PREFIXES):
                    raise _refuse(path, member, "is a pickled object, not a tensor")
                if meta.get("use_pickle"):
                    pickled.append(member)
    for name in dict.fromkeys(pickled):
        if name not in names:
            continue
        try:
            torch.load(io.BytesIO(zf.read(name)), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - anything the restricted unpickler refuses
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise _refuse(path, name, f"holds more than tensors ({first[:120]})") from None


@contextmanager
def _no_code_execution():
    """While torch.export.load runs: every torch.load is restricted to tensors, raw pickle and
    ScriptObject loading raise, and torch's own logged tracebacks are silenced."""
    from torch.export.pt2_archive import _package

    real_load, real_obj, real_pickle = torch.load, torch._C._pickle_load_obj, _package.pickle

    def tensors_only(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def no_objects(*_args, **_kwargs):
        raise RuntimeError("cnnrepair refuses to unpickle objects from a model file")

    class NoPickle:
        loads = load = staticmethod(no_objects)

    loggers = [logging.getLogger(name) for name in _QUIET]
    levels = [lg.level for lg in loggers]
    with _LOCK:
        torch.load, torch._C._pickle_load_obj, _package.pickle = tensors_only, no_objects, NoPickle
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            torch.load, torch._C._pickle_load_obj, _package.pickle = real_load, real_obj, real_pickle
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def read_program(path: Path):
    """The ``ExportedProgram`` of a ``.pt2`` file, read from one in-memory copy (checked, then loaded,
    so the file cannot change in between) without ever running code from it."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CnnRepairError(f"{path}: cannot read the model file ({exc.strerror or type(exc).__name__})") from None
    check_archive(path, data)
    try:
        with _no_code_execution(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except CnnRepairError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise CnnRepairError(f"{path}: not a readable torch.export program ({type(exc).__name__}); re-export it with torch.export.save") from None


def load(path: Path) -> tuple[nn.Module, tuple[int, ...] | None, object]:
    """(module, per-example input shape, program) of a ``torch.export`` file."""
    program = read_program(path)
    try:
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
    program = read_program(loaded.path)  # a fresh copy: the loaded one stays the original
    state = dict(repaired.named_parameters())
    state.update(dict(repaired.named_buffers()))
    for name in tensors:
        if name not in program.state_dict:
            raise CnnRepairError(f"the program has no tensor {name!r} to write; this layer cannot be saved in {loaded.format} form")
        old = program.state_dict[name]
        new = state[name].detach().to(old.dtype).cpu()
        program.state_dict[name] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
    buffer = io.BytesIO()  # serialised in memory: a full disk is then a Python error, never an abort inside torch's writer
    with warnings.catch_warnings():  # torch warns when a replaced tensor no longer shares storage with its old group (CPU tensors: harmless)
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())
