"""cnnrepair: repair CNN classifiers against adversarial examples with convex optimization.

Implements and extends Guidotti & Leofante, "Repair of Convolutional Neural Networks using
Convex Optimization" (2020): CNNs, hybrid CNN+SVM networks, attacks, and LP repair of the
linear head; beyond it, provable repair of any classifier's last layer, for points and for whole
L-infinity balls (sound bounds, certified accuracy).
"""

from cnnrepair.assess import AssessSettings, assess
from cnnrepair.bounds import FeatureBounds, ball_box, feature_bounds
from cnnrepair.certify import Certification, certify, pgd_accuracy
from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import LoadedModel, load_model, save_model
from cnnrepair.points import InputSpec, MadePoints, PointsSettings, make_points
from cnnrepair.repair import (
    ClassifierRepair,
    MarginProblem,
    MarginSolution,
    RepairSpec,
    last_layer,
    repair_classifier,
    solve_margins,
)
from cnnrepair.verify import Verification, verify_certificate
from cnnrepair.vnnlib import BallProperty, write_properties

__version__ = "0.1.0"
__all__ = ["AssessSettings", "BallProperty", "Certification", "ClassifierRepair", "CnnRepairError", "FeatureBounds", "InputSpec",
           "LoadedModel", "MadePoints", "MarginProblem", "MarginSolution", "PointsSettings", "RepairSpec", "__version__", "assess",
           "ball_box", "certify", "feature_bounds", "last_layer", "load_model", "make_points", "pgd_accuracy", "repair_classifier",
           "save_model", "solve_margins", "Verification", "verify_certificate", "write_properties"]
