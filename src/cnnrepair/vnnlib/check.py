"""Check VNN-LIB robustness properties on a model: a counterexample (PGD), a proof (our bounds), or unknown.

This is the first step of "a verifier found this property violated; fix the network so that it
holds; verify again": each property is tried by PGD inside its box (a counterexample, checked by
running the model on it, makes it ``violated``) and bounded by :func:`cnnrepair.certify.certify_boxes`
(a positive lower bound on every logit difference makes it ``holds``: the larger of the bound on the
logit differences and the last layer's worst case over the feature box, both sound); neither gives
``unknown``.
The properties must be in the robustness form (:meth:`VnnlibProperty.robustness`); others are
refused by name. A targeted property (label against some of the other classes) is proved by the
larger of those bounds and the bound on its own logit differences only, and is violated only by an
input its own formula rejects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.vnnlib.read import VnnlibProperty

STATUSES = ("violated", "holds", "unknown")


@dataclass(frozen=True)
class PropertyCheck:
    """What was found for one property: ``status`` (violated / holds / unknown), its label, the certified lower bound of
    the margin over the box (``bound``), and the counterexample PGD found (model input shape), if any."""

    name: str
    status: str
    label: int
    bound: float
    counterexample: np.ndarray | None = None
    rivals: tuple[int, ...] | None = None  # a targeted property's classes (None: every other class)


def property_boxes(props: list[VnnlibProperty], input_shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, labels): each property's box in the model's input shape and its label; a one-line error for a
    property the repair cannot take (not the robustness form, or not this model's sizes)."""
    n_in = int(np.prod(input_shape))
    lower, upper, labels = [], [], []
    for p in props:
        if p.num_inputs != n_in:
            raise CnnRepairError(f"{p.name}: declares {p.num_inputs} inputs but the model takes {n_in} ({' x '.join(map(str, input_shape))})")
        if p.num_outputs != num_classes:
            raise CnnRepairError(f"{p.name}: declares {p.num_outputs} outputs but the model has {num_classes}")
        form = p.robustness()
        if form is None:
            raise CnnRepairError(f"{p.name}: its output constraint is not the robustness form (some Y_j >= Y_label, over every "
                                 "other class or some of them); only that form is checked and repaired")
        lower.append(p.lower.reshape(input_shape))
        upper.append(p.upper.reshape(input_shape))
        labels.append(form[0])
    return np.stack(lower), np.stack(upper), np.asarray(labels, np.int64)


def check_properties(model: nn.Module, props: list[VnnlibProperty], input_shape: tuple[int, ...], method: str = "crown",
                     seed: int = 0) -> list[PropertyCheck]:
    """Each property's status on ``model`` (see the module docstring). ``method``: the bound (ibp, crown, alpha-crown)."""
    from cnnrepair.bounds import frozen_graph, rival_bounds
    from cnnrepair.repair.layer import last_layer
    from cnnrepair.runtime import eval_mode, first_output, model_device

    if not props:
        return []
    eval_mode(model)
    with torch.no_grad():
        C = first_output(model(torch.zeros((1, *input_shape), device=model_device(model)))).shape[1]
    lower, upper, labels = property_boxes(props, input_shape, C)
    forms = [p.robustness() for p in props]
    sample = torch.as_tensor((lower[:2] + upper[:2]) / 2, dtype=torch.float32)
    lay = last_layer(model, sample)
    graph = frozen_graph(model, lay.name, sample, through=True)
    rows = rival_bounds(graph, torch.as_tensor(lower), torch.as_tensor(upper), labels, method, zero_rival=lay.zero_rival)
    bound = np.maximum(_own_rows(rows, forms, lay.zero_rival), _box_margins(model, lay, lower, upper, labels, method))
    found = _counterexamples(model, lower, upper, labels, seed, props)
    out = []
    for i, p in enumerate(props):
        rivals = None if len(forms[i][1]) == C - 1 else forms[i][1]
        if found[i] is not None:
            out.append(PropertyCheck(p.name, "violated", int(labels[i]), float(bound[i]), found[i], rivals))
        else:
            out.append(PropertyCheck(p.name, "holds" if bound[i] > 0 else "unknown", int(labels[i]), float(bound[i]), rivals=rivals))
    return out


def _own_rows(rows: np.ndarray, forms: list[tuple[int, tuple[int, ...]]], zero_rival: bool) -> np.ndarray:
    """Per box, the smallest bound (``rows``: :func:`cnnrepair.bounds.rival_bounds`) over the rows of its property's
    own classes (every other class: the margin bound itself), and of the zero rival when a ReLU ends the model."""
    classes = rows.shape[1] + 1 - int(zero_rival)
    out = np.empty(len(forms))
    for i, (label, rivals) in enumerate(forms):
        others = [j for j in range(classes) if j != label]  # the row order of margin_rows
        keep = [r for r, j in enumerate(others) if j in rivals] + ([len(others)] if zero_rival else [])
        out[i] = rows[i, keep].min()
    return out


def _box_margins(model: nn.Module, lay, lower: np.ndarray, upper: np.ndarray, labels: np.ndarray, method: str) -> np.ndarray:
    """The other sound bound: the last layer's worst case over the feature box (what the ball repair constrains, so a
    box the repair certified is proved here too; the bound on the logit differences is tighter on most boxes, not all)."""
    from cnnrepair.bounds import feature_bounds
    from cnnrepair.certify import worst_margins

    if lay.kind == "svm-rbf":
        return np.full(len(labels), -np.inf)
    fb = feature_bounds(model, lay.name, torch.as_tensor(lower), torch.as_tensor(upper), method)
    return worst_margins(fb, labels, lay.weight, lay.bias, lay.zero_rival)


def _counterexamples(model: nn.Module, lower: np.ndarray, upper: np.ndarray, labels: np.ndarray, seed: int,
                     props: list[VnnlibProperty]) -> list[np.ndarray | None]:
    """Per box, an input inside it that violates its property (:func:`cnnrepair.certify.pgd_counterexamples` in the box
    rounded inward to float32, then checked again by running the model on it alone against the property's own formula:
    a targeted property is violated only when one of its classes wins); None where none was found."""
    from cnnrepair.certify import pgd_counterexamples
    from cnnrepair.runtime import first_output, model_device

    dev = model_device(model)
    lo, hi = float32_inside(np.asarray(lower, np.float64), np.asarray(upper, np.float64))
    found = pgd_counterexamples(model, lo, hi, labels, seed=seed)
    with torch.no_grad():  # each one checked again, alone, as the model runs: inside its box, some class at least as high
        for i, f in enumerate(found):
            if f is None:
                continue
            out = first_output(model(torch.as_tensor(f[None]).to(dev)))[0].double().cpu().numpy()
            inside = bool((f >= lower[i]).all() and (f <= upper[i]).all())
            if not inside or not props[i].violated_by(out[None])[0]:
                found[i] = None
    return found


def float32_inside(lower: np.ndarray, upper: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 box inside ``[lower, upper]`` (float64): each bound rounded toward the inside. Where a coordinate
    holds no float32 number, lower ends above upper."""
    lo, hi = lower.astype(np.float32), upper.astype(np.float32)
    lo = np.where(lo < lower, np.nextafter(lo, np.float32(np.inf)), lo)
    hi = np.where(hi > upper, np.nextafter(hi, np.float32(-np.inf)), hi)
    return torch.from_numpy(lo), torch.from_numpy(hi)
