"""cnnrepair: repair CNN classifiers against adversarial examples with convex optimization.

Implements and extends Guidotti & Leofante, "Repair of Convolutional Neural Networks using
Convex Optimization" (2020): CNNs, hybrid CNN+SVM networks, attacks, and LP repair of the
linear head.
"""

from cnnrepair.errors import CnnRepairError
from cnnrepair.repair import (
    ClassifierRepair,
    MarginProblem,
    MarginSolution,
    RepairSpec,
    last_layer,
    repair_classifier,
    solve_margins,
)

__version__ = "0.1.0"
__all__ = ["ClassifierRepair", "CnnRepairError", "MarginProblem", "MarginSolution", "RepairSpec", "__version__",
           "last_layer", "repair_classifier", "solve_margins"]
