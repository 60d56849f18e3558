"""Check VNN-LIB properties on a model: a counterexample (PGD), a proof (our bounds), or unknown.

This is the first step of "a verifier found this property violated; fix the network so that it
holds; verify again". Each property is read as output rows (:meth:`VnnlibProperty.output_rows`:
each case of its violation, ``a . Y <= b``, is ruled out by ``a . Y > b``): the robustness form, a
targeted one (the label against some classes), or general linear output constraints (``Y_0 >= 3.99``);
a case of several comparisons is refused by name. Each property is tried by PGD inside its box (a
counterexample, checked by running the model on it against the property's own formula, makes it
``violated``) and bounded (a positive lower bound on every row's ``a . Y - b`` over the box makes it
``holds``: the larger of the bound through the network and the last layer's worst case over the
feature box, both sound); neither gives ``unknown``. Through a final ReLU, softmax or log-softmax only
rows ``Y_label - Y_j`` keep their meaning on the logits (with a ReLU, the label's logit must also beat
0); other rows there are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.outputs import OutputRows, program_rows
from cnnrepair.vnnlib.read import VnnlibProperty

STATUSES = ("violated", "holds", "unknown")


@dataclass(frozen=True)
class PropertyCheck:
    """What was found for one property: ``status`` (violated / holds / unknown), its label (None: not a label's property),
    the certified lower bound of its margin over the box (``bound``: the smallest row value), and the counterexample PGD
    found (model input shape), if any."""

    name: str
    status: str
    label: int | None
    bound: float
    counterexample: np.ndarray | None = None
    rivals: tuple[int, ...] | None = None  # a targeted property's classes (None: every other class, or not a label's)


@dataclass(frozen=True)
class PropertySet:
    """Properties as the repair takes them: the boxes in the model's input shape, a label per property (the robustness or
    targeted form's; 0 where it has none), each property's output rows, and which properties are a label's against
    every other class (those can be kept as keep points; the others are repaired and kept through their rows)."""

    lower: np.ndarray
    upper: np.ndarray
    labels: np.ndarray
    rows: OutputRows
    full_label: np.ndarray


def property_boxes(props: list[VnnlibProperty], input_shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, labels): each property's box in the model's input shape and its label; a one-line error for a
    property without one (:func:`property_set` takes every property the repair can, with its output rows)."""
    for p in props:
        if p.robustness() is None:
            raise CnnRepairError(f"{p.name}: its output constraint is not the robustness form (some Y_j >= Y_label, over every "
                                 "other class or some of them), so it has no label; property_set reads its output rows")
    ps = property_set(props, input_shape, num_classes)
    return ps.lower, ps.upper, ps.labels


def property_set(props: list[VnnlibProperty], input_shape: tuple[int, ...], num_classes: int) -> PropertySet:
    """Each property's box, label and output rows (:class:`PropertySet`); a one-line error for a property the repair cannot
    take (not this model's sizes, or a case of several comparisons)."""
    n_in = int(np.prod(input_shape))
    lower, upper, labels, coefs, offsets, full = [], [], [], [], [], []
    for p in props:
        if p.num_inputs != n_in:
            raise CnnRepairError(f"{p.name}: declares {p.num_inputs} inputs but the model takes {n_in} ({' x '.join(map(str, input_shape))})")
        if p.num_outputs != num_classes:
            raise CnnRepairError(f"{p.name}: declares {p.num_outputs} outputs but the model has {num_classes}")
        A, b = p.output_rows()
        form = p.robustness()
        lower.append(p.lower.reshape(input_shape))
        upper.append(p.upper.reshape(input_shape))
        labels.append(0 if form is None else form[0])
        full.append(p.label() is not None)
        coefs.append(A)
        offsets.append(b)
    R = max(len(b) for b in offsets)
    coef = np.zeros((len(props), R, num_classes))
    offset = np.full((len(props), R), -np.inf)
    for i, (A, b) in enumerate(zip(coefs, offsets)):
        coef[i, :len(b)], offset[i, :len(b)] = A, b
    rows = OutputRows.of(coef, offset)
    return PropertySet(np.stack(lower), np.stack(upper), np.asarray(labels, np.int64), rows, np.asarray(full, bool))


def check_properties(model: nn.Module, props: list[VnnlibProperty], input_shape: tuple[int, ...], method: str = "crown",
                     seed: int = 0) -> list[PropertyCheck]:
    """Each property's status on ``model`` (see the module docstring). ``method``: the bound (ibp, crown, alpha-crown)."""
    from cnnrepair.bounds import frozen_graph
    from cnnrepair.repair.layer import last_layer
    from cnnrepair.runtime import eval_mode, first_output, model_device

    if not props:
        return []
    eval_mode(model)
    with torch.no_grad():
        C = first_output(model(torch.zeros((1, *input_shape), device=model_device(model)))).shape[1]
    ps = property_set(props, input_shape, C)
    sample = torch.as_tensor((ps.lower[:2] + ps.upper[:2]) / 2, dtype=torch.float32)
    lay = last_layer(model, sample)
    if lay.ending != "none" and not ps.rows.pairwise():
        bad = next(p.name for i, p in enumerate(props) if not ps.rows.subset([i]).pairwise())
        raise CnnRepairError(f"{bad}: a {lay.ending} ends the model, and only comparisons 'Y_label > Y_j' keep their meaning on the "
                             "logits through it; general linear output constraints need a model whose last linear layer is its output")
    logit_rows = program_rows([(ps.rows, ps.labels)], C, lay.zero_rival)  # rows over the logits (a final ReLU's label rows added)
    graph = frozen_graph(model, lay.name, sample, through=True)
    bound = np.maximum(_row_bounds(graph, ps, logit_rows, method), _box_margins(model, lay, ps, logit_rows, method))
    found = _counterexamples(model, ps, seed, props)
    out = []
    for i, p in enumerate(props):
        form = p.robustness()
        label = None if form is None else form[0]
        rivals = None if form is None or len(form[1]) == C - 1 else form[1]
        if found[i] is not None:
            out.append(PropertyCheck(p.name, "violated", label, float(bound[i]), found[i], rivals))
        else:
            out.append(PropertyCheck(p.name, "holds" if bound[i] > 0 else "unknown", label, float(bound[i]), rivals=rivals))
    return out


def _row_bounds(graph, ps: PropertySet, rows: OutputRows, method: str) -> np.ndarray:
    """Per box, a lower bound of its smallest row value through the network (one bound pass over every row of every box)."""
    from cnnrepair.bounds import batch_for, spec_bounds

    lower, upper = torch.as_tensor(ps.lower), torch.as_tensor(ps.upper)
    coef = torch.as_tensor(rows.coef)
    size = batch_for(graph, method, graph.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(lower), size):
            sl = slice(i, i + size)
            out.append(spec_bounds(graph, lower[sl].to(graph.device), upper[sl].to(graph.device), coef[sl].to(graph.device), method).cpu().numpy())
    lb = np.concatenate(out) - np.where(rows.live, rows.offset, 0.0)
    return np.where(rows.live, lb, np.inf).min(1)


def _box_margins(model: nn.Module, lay, ps: PropertySet, rows: OutputRows, method: str) -> np.ndarray:
    """The other sound bound: the last layer's worst case over the feature box (what the ball repair constrains, so a
    box the repair certified is proved here too; the bound through the network is tighter on most boxes, not all)."""
    from cnnrepair.bounds import feature_bounds

    if lay.kind == "svm-rbf":
        return np.full(len(ps.labels), -np.inf)
    fb = feature_bounds(model, lay.name, torch.as_tensor(ps.lower), torch.as_tensor(ps.upper), method)
    return rows.box_margins(lay.weight, lay.bias, fb.centre, fb.radius)


def _counterexamples(model: nn.Module, ps: PropertySet, seed: int, props: list[VnnlibProperty]) -> list[np.ndarray | None]:
    """Per box, an input inside it that violates its property (:func:`cnnrepair.certify.pgd_counterexamples` on the
    property's rows, in the box rounded inward to float32, then checked again by running the model on it alone against
    the property's own formula); None where none was found."""
    from cnnrepair.certify import pgd_counterexamples
    from cnnrepair.runtime import first_output, model_device

    dev = model_device(model)
    lower, upper = ps.lower, ps.upper
    lo, hi = float32_inside(np.asarray(lower, np.float64), np.asarray(upper, np.float64))
    found = pgd_counterexamples(model, lo, hi, ps.rows, seed=seed)
    with torch.no_grad():  # each one checked again, alone, as the model runs: inside its box, the violation holds
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
