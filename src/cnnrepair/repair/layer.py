"""Any classifier as frozen features plus the linear layer that ends it.

Repair edits one layer: an ``nn.Linear``, a hybrid's SVM head (``LinearHead``, or ``RBFHead``,
which is linear in its dual coefficients given the kernel values), or the ``aten.linear`` call of a
``torch.export`` graph. :func:`last_layer` finds it (by name, or the one whose output is the
model's output), :meth:`LastLayer.features` computes what it receives, and
:meth:`LastLayer.replaced` returns a copy of the model with new weights in that layer only.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.graph_linear import linear_nodes as _linear_nodes
from cnnrepair.repair.ending import ENDINGS, ending_record, find_ending, matches, probe_like
from cnnrepair.runtime import eval_mode, first_output, model_device


def _is_graph(model: nn.Module) -> bool:
    return isinstance(model, torch.fx.GraphModule)


@dataclass(frozen=True)
class HeadKind:
    """How repair treats a module class as a last layer: ``logits = features @ weight.T + bias``.

    ``kind`` is the name certificates record; ``weight`` / ``bias`` name the tensors repair writes;
    with ``kernel`` the layer's input first goes through ``module.kernel(x)`` (an RBF SVM head is
    linear in its dual coefficients given the kernel values)."""

    kind: str
    weight: str = "weight"
    bias: str = "bias"
    kernel: bool = False


HEADS: dict[type, HeadKind] = {nn.Linear: HeadKind("linear")}


def register_head(cls: type, head: HeadKind) -> None:
    """Make modules of ``cls`` repairable last layers (an application registers its own heads, e.g. the
    paper's SVM heads in :mod:`cnnrepair.paper.hybrid`)."""
    HEADS[cls] = head


def head_kind(module: nn.Module) -> HeadKind | None:
    """The registered kind of a module (by its class or the nearest registered base class), or None."""
    for cls in type(module).__mro__:
        if cls in HEADS:
            return HEADS[cls]
    return None


def candidate_layers(model: nn.Module) -> list[str]:
    """Names of the layers repair can edit, in the model's order."""
    if _is_graph(model):
        return list(_linear_nodes(model))
    return [name for name, m in model.named_modules() if head_kind(m) is not None]


@dataclass
class LastLayer:
    """The layer ``name`` of ``model``: ``logits = features(x) @ weight.T + bias``."""

    model: nn.Module
    name: str
    kind: str  # linear | svm-linear | svm-rbf | graph-linear
    weight: np.ndarray
    bias: np.ndarray
    has_bias: bool
    ending: str = "none"  # what follows the layer (:mod:`cnnrepair.repair.ending`): none | relu | softmax | log_softmax

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def zero_rival(self) -> bool:
        """Must each label's logit also beat a rival fixed at 0 (a ReLU after the layer)?"""
        return ENDINGS[self.ending].zero_rival

    def ending_record(self) -> dict | None:
        """What a certificate records of the ending (None: nothing follows the layer)."""
        return ending_record(self.ending)

    def _module(self) -> nn.Module:
        return self.model.get_submodule(self.name)

    def _capture(self, x: Tensor, probe: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(layer input, layer output, model output) for a batch; with ``probe`` the layer's output is replaced by
        :func:`~cnnrepair.repair.ending.probe_like` of it on the way (and that is what comes back as its output)."""
        if _is_graph(self.model):
            lin = _linear_nodes(self.model)[self.name]
            seen = {}

            class Catch(torch.fx.Interpreter):
                def run_node(self, n):
                    out = super().run_node(n)
                    if n is lin.inp:  # kept when made: the interpreter frees values after their last use
                        seen["in"] = out
                    if n is lin.out:
                        out = probe_like(out) if probe else out
                        seen["out"] = out
                    return out

            res = first_output(Catch(self.model).run(x))  # fills seen as it runs
            return seen["in"], seen["out"], res
        module, seen = self._module(), {}

        def hook(_m, args, out):
            seen["in"], seen["out"] = args[0], (probe_like(out) if probe else out)
            return seen["out"] if probe else None

        handle = module.register_forward_hook(hook)
        try:
            res = self.model(x)
        finally:
            handle.remove()
        if "in" not in seen:
            raise CnnRepairError(f"layer {self.name!r} is not used by the model's forward pass; name the layer that ends it (--layer)")
        return seen["in"], seen["out"], res

    def features(self, x: Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
        """What the layer multiplies by its weight, for each input (float64, N x n).

        Checks on every batch that the layer's output is the model's output, so margins computed
        from these features are the model's margins.
        """
        x = torch.as_tensor(x)
        device = model_device(self.model)
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size].to(device)
                inp, lay, res = self._capture(xb)
                if not matches(ENDINGS[self.ending], lay, res):
                    after = "" if self.ending == "none" else f" through its {self.ending}"
                    raise CnnRepairError(f"layer {self.name!r} does not end the classifier (its output{after} is not the model's output); "
                                         f"repair the last linear layer instead (choose from: {', '.join(candidate_layers(self.model))})")
                head = None if _is_graph(self.model) else head_kind(self._module())
                if head is not None and head.kernel:
                    inp = self._module().kernel(inp)
                if inp.ndim != 2:
                    raise CnnRepairError(f"layer {self.name!r} receives {inp.ndim}-d inputs; repair needs a layer applied to one feature vector per input")
                out.append(inp.detach().double().cpu().numpy())
        n = self.weight.shape[1]
        return np.concatenate(out) if out else np.zeros((0, n))

    def replaced(self, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
        """A deep copy of the model whose layer holds ``weight`` and ``bias`` (in the layer's own dtype)."""
        with warnings.catch_warnings():  # copying a torch.export module warns about its own pytree internals
            warnings.simplefilter("ignore", FutureWarning)
            model = copy.deepcopy(self.model)
        for param, value in zip(self.parameter_names(), (weight, bias)):
            if param is None:
                continue
            t = get_tensor(model, param)
            with torch.no_grad():
                t.copy_(torch.as_tensor(np.asarray(value), dtype=t.dtype).to(t.device))
        return model

    def parameter_names(self) -> tuple[str, str | None]:
        """Names (in the model's state) of the tensors repair writes: weight (or dual coefficients), bias."""
        if self.kind == "graph-linear":
            lin = _linear_nodes(self.model)[self.name]
            return lin.weight, lin.bias
        prefix = f"{self.name}." if self.name else ""
        head = head_kind(self._module()) or HeadKind(self.kind)
        return f"{prefix}{head.weight}", (f"{prefix}{head.bias}" if self.has_bias else None)


def get_tensor(model: nn.Module, name: str) -> Tensor:
    """The tensor (parameter or buffer) that ``name`` (dotted, as in a state dict) names in ``model``."""
    owner, _, attr = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    return getattr(mod, attr)


def last_layer(model: nn.Module, sample: Tensor | np.ndarray, name: str | None = None) -> LastLayer:
    """The linear layer that ends ``model`` (``name``, or found by running ``sample`` through it)."""
    eval_mode(model)
    names = candidate_layers(model)
    if name is not None and name not in names:
        known = ", ".join(names) or "none"
        raise CnnRepairError(f"no linear layer named {name!r} in the model (linear layers: {known}); pass one of them as the layer")
    if not names:
        raise CnnRepairError("the model has no linear layer to repair (nn.Linear, an SVM head or an aten.linear call)")
    sample = torch.as_tensor(sample)[:2]
    if name is None:
        name = _ending_layer(model, names, sample)
    end = _ending_of(model, name, sample)
    if _is_graph(model):
        lin = _linear_nodes(model)[name]
        w = get_tensor(model, lin.weight)
        has_bias = lin.bias is not None
        b = get_tensor(model, lin.bias) if has_bias else None
        kind = "graph-linear"
    else:
        mod = model.get_submodule(name)
        head = head_kind(mod)
        w, b = getattr(mod, head.weight), getattr(mod, head.bias, None)
        has_bias, kind = b is not None, head.kind
    W = w.detach().double().cpu().numpy().copy()
    B = b.detach().double().cpu().numpy().copy() if b is not None else np.zeros(W.shape[0])
    layer = LastLayer(model, name, kind, W, B, has_bias, end or "none")
    layer.features(sample)  # checks that it ends the classifier and takes flat features
    return layer


def ending_layer(model: nn.Module, sample: Tensor | np.ndarray) -> str | None:
    """The name of the repairable layer whose output is the model's output, or None if no layer ends it."""
    eval_mode(model)
    names = candidate_layers(model)
    if not names:
        return None
    try:
        return _ending_layer(model, names, torch.as_tensor(sample)[:2])
    except CnnRepairError:
        return None


def _ending_of(model: nn.Module, name: str, sample: Tensor) -> str | None:
    """Which registered ending turns layer ``name``'s output into the model's output (None: none does), found by
    handing the model a probe in the layer's place (:func:`cnnrepair.repair.ending.find_ending`)."""
    probe = LastLayer(model, name, "graph-linear" if _is_graph(model) else "linear", np.zeros((1, 1)), np.zeros(1), True)
    with torch.no_grad():
        try:
            _, lay, res = probe._capture(sample.to(model_device(model)), probe=True)
        except (CnnRepairError, RuntimeError):
            return None
    found = find_ending(lay, res)
    return None if found is None else found.name


def _ending_layer(model: nn.Module, names: list[str], sample: Tensor) -> str:
    """The candidate whose output, through one registered ending, is the model's output (the last one if several are)."""
    for name in reversed(names):
        if _ending_of(model, name, sample) is not None:
            return name
    raise CnnRepairError(f"no linear layer ends this model (its output is not any linear layer's output, nor that through "
                         f"{', '.join(e for e in ENDINGS if e != 'none')}; linear layers: {', '.join(names)}); "
                         "a layer after the last linear one that is none of these must be removed before repair")
