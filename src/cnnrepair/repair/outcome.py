"""What a repair returns: its status, the repaired copy of the model, and the certificate of what it did."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cnnrepair.repair.certificate import Certificate


@dataclass
class ClassifierRepair:
    """A repair's outcome. ``model`` is None unless ``status == "repaired"``."""

    status: str
    model: nn.Module | None
    layer: str
    certificate: Certificate
    solution: object = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    tensors: tuple[str, ...] = ()  # names of the model tensors the repair wrote (the layer's weight, bias)

    @property
    def ok(self) -> bool:
        return self.status == "repaired"
