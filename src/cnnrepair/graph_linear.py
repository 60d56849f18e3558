"""Linear maps on stored weights in an exported (``torch.fx``) graph, by the weight's module path.

Shared by repair (which edits the layer) and the bound propagation (which bounds what it receives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraphLinear:
    """A linear map in an exported graph: ``out = inp @ weight.T (+ bias)``, weight and bias stored tensors."""

    out: torch.fx.Node
    inp: torch.fx.Node
    weight: str
    bias: str | None


_TRANSPOSES = {torch.ops.aten.t.default, torch.ops.aten.numpy_T.default}


def _attr(node) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def linear_nodes(gm: torch.fx.GraphModule) -> dict[str, GraphLinear]:
    """Linear maps on stored weights, by the weight's module path: ``aten.linear`` calls, and
    ``x @ W.T + b`` as ``torch.export`` writes our SVM heads' float64 matmul."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        lin = None
        if node.target in (torch.ops.aten.linear.default, torch.nn.functional.linear):
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            lin = GraphLinear(node, node.args[0], _attr(node.args[1]), _attr(b))
        elif node.target == torch.ops.aten.add.Tensor and isinstance(node.args[0], torch.fx.Node) and _attr(node.args[1]):
            mm = node.args[0]
            if mm.op == "call_function" and mm.target == torch.ops.aten.matmul.default and isinstance(mm.args[1], torch.fx.Node) \
                    and mm.args[1].target in _TRANSPOSES:
                lin = GraphLinear(node, mm.args[0], _attr(mm.args[1].args[0]), _attr(node.args[1]))
        if lin is not None and lin.weight and lin.weight.rpartition(".")[2] in ("weight", "coef"):
            found[lin.weight.rpartition(".")[0]] = lin  # "coef": an RBF head's dual coefficients on its kernel values
    return found


