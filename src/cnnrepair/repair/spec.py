"""What a repair must achieve: the spec, checked once, recorded in every certificate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cnnrepair.bounds import METHODS as BOUND_METHODS
from cnnrepair.errors import CnnRepairError
from cnnrepair.repair.program import NORMS

SPECS = ("pointwise", "ball", "targets")


@dataclass(frozen=True)
class RepairSpec:
    """A repair spec on the last layer's logits.

    * ``pointwise`` (the guarantee): every repair point gets ``logit[y] - max_{j != y} logit[j] >=
      margin``; keep points keep their label with ``keep_margin`` (hard, or soft at ``keep_price``
      per unit of shortfall); the change is minimal in ``norm`` (``l1``, ``linf`` or ``l1+linf`` =
      PRDNN's mean|d| + max|d|), over weights and biases unless ``freeze_bias``, each within
      ``max_change`` if set.
    * ``ball`` (certified): as ``pointwise``, but every input within L-infinity distance ``eps`` (pixels,
      clipped to [0, 1]; or the boxes given to the repair call) of a repair point gets its label with
      ``margin``, proven through sound bounds (``bounds``: ``crown``, ``alpha-crown``, ``alpha-crown-full`` or ``ibp``) on the features the
      frozen part of the network computes over the ball; exact for those feature boxes. With
      ``keep_eps`` > 0, keep points whose ball of that radius is certified before the repair must
      stay certified after it (the others keep their own label, as pointwise keep points).
    * ``targets``: the paper's equation 3: logits pulled toward targets with slack priced at
      ``delta_weight``; keep points are anchors (targets = their current logits) weighted by
      ``keep_price`` (1 if unset). L1 on the weights only; nothing is guaranteed.

    ``later_biases``: in a repair of a layer inside the network, the biases of the linear and convolution
    layers after it may move too (APRNN's choice; their change counts in the L1 objective).

    ``max_change_ratio``: a pointwise or ball solution whose largest change exceeds this multiple of
    the layer's largest weight is reported as ill-conditioned and not certified (None: no limit).
    """

    kind: str = "pointwise"
    margin: float = 0.05
    keep_margin: float = 0.0
    keep_price: float | None = None
    norm: str = "l1"
    freeze_bias: bool = False
    max_change: float | None = None
    delta_weight: float = 1.0
    eps: float = 0.0
    bounds: str = "crown"
    keep_eps: float = 0.0
    max_change_ratio: float | None = 1000.0
    later_biases: bool = False

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) and name not in ("freeze_bias", "later_biases"):
                raise CnnRepairError(f"{name.replace('_', ' ')} must be {'a name' if name in ('kind', 'norm', 'bounds') else 'a number'}, "
                                     f"not {value}")
        for name in ("freeze_bias", "later_biases"):
            if not isinstance(getattr(self, name), bool):
                raise CnnRepairError(f"{name.replace('_', ' ')} must be True or False (got {getattr(self, name)!r})")
        if self.later_biases and self.kind != "pointwise":
            raise CnnRepairError("later biases move in a repair of a layer inside the network: it needs the pointwise spec")
        for name in ("kind", "norm", "bounds"):
            if not isinstance(getattr(self, name), str):
                raise CnnRepairError(f"{name} must be a name (got {getattr(self, name)!r})")
        for name in ("margin", "keep_margin", "keep_price", "max_change", "delta_weight", "eps", "keep_eps", "max_change_ratio"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (int, float)):
                raise CnnRepairError(f"{name.replace('_', ' ')} must be a number (got {type(v).__name__} {v!r})")
        if self.kind not in SPECS:
            raise CnnRepairError(f"unknown spec {self.kind!r}; choose one of {', '.join(SPECS)}")
        for name in ("margin", "keep_margin"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise CnnRepairError(f"{name.replace('_', ' ')} must be a finite number >= 0 (got {v}); margins are logit differences")
        if self.norm not in NORMS:
            raise CnnRepairError(f"unknown change norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        for name in ("keep_price", "max_change", "max_change_ratio"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise CnnRepairError(f"{name.replace('_', ' ')} must be a finite number > 0 (got {v})")
        if not (math.isfinite(self.delta_weight) and self.delta_weight > 0):
            raise CnnRepairError(f"delta weight must be > 0 (got {self.delta_weight})")
        for name in ("eps", "keep_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise CnnRepairError(f"{name.replace('_', ' ')} must lie in [0, 1] (pixels; got {v})")
        if self.keep_eps > 0 and self.kind != "ball":
            raise CnnRepairError("keep eps keeps keep points' balls certified: it needs the ball spec")
        if self.bounds not in BOUND_METHODS:
            raise CnnRepairError(f"unknown bound method {self.bounds!r}; choose one of {', '.join(BOUND_METHODS)}")
        if self.kind == "targets" and self.norm != "l1":
            raise CnnRepairError("the targets spec (the paper's program) measures change in L1 only; use --norm l1 or --spec pointwise")

    def used_fields(self) -> tuple[str, ...]:
        """The fields this spec's kind reads (the others keep their defaults and are not recorded)."""
        common = ("kind", "keep_price", "max_change", "freeze_bias")
        if self.kind == "targets":
            return (*common, "norm", "delta_weight")
        fields = (*common, "margin", "keep_margin", "norm", "max_change_ratio")
        return (*fields, "eps", "bounds", "keep_eps") if self.kind == "ball" else fields

    def as_dict(self) -> dict:
        """JSON-ready: the fields the kind uses, and whether keep points are hard or soft."""
        d = {k: v for k, v in asdict(self).items() if k in self.used_fields()}
        d["keep"] = "soft" if self.keep_price is not None else "hard"
        if self.later_biases:  # recorded only when set (certificates without it read as before)
            d["later_biases"] = True
        return d
