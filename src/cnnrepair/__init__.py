"""cnnrepair: repair image classifiers with convex optimization, and prove what the repair did.

The public API, one level: repair a model (``repair_classifier``, ``RepairSpec``, ``Points``,
``SolveOptions``; the outcome's ``Certificate``), read and write
model files (``load_model``, ``save_model``), make points and evaluate (``make_points``,
``assess``), bound and certify (``feature_bounds``: a box on a layer's input; ``frozen_graph`` and
``margin_bounds``: the logit differences themselves; ``certify``), re-check a certificate
(``verify_certificate``), read, check and write VNN-LIB properties (``read_vnnlib``, ``check_properties``,
``write_properties``). The solvers and their
data (``MarginProblem``, ``solve_margins``, ...) live in :mod:`cnnrepair.repair`; the paper's
pipeline (Guidotti & Leofante, 2020) is one application on top, in :mod:`cnnrepair.paper`, beside
the ``cnnrepair`` command (:mod:`cnnrepair.cli`).
"""

from cnnrepair.assess import AssessSettings, assess
from cnnrepair.bounds import BallInputs, FeatureBounds, ball_box, feature_bounds, frozen_graph, margin_bounds
from cnnrepair.certify import Certification, certify, pgd_accuracy
from cnnrepair.errors import CnnRepairError
from cnnrepair.formats import LoadedModel, load_model, save_model
from cnnrepair.points import InputSpec, MadePoints, PointsSettings, make_points
from cnnrepair.repair import Certificate, ClassifierRepair, OutputRows, Points, RepairSpec, SolveOptions, last_layer, repair_classifier
from cnnrepair.verify import Verification, verify_certificate
from cnnrepair.vnnlib import BallProperty, PropertyCheck, VnnlibProperty, check_properties, read_vnnlib, write_properties

__version__ = "0.2.0"

from cnnrepair import moved as _moved_modules  # noqa: E402 - old module paths (cnnrepair.training, ...) for one release

_moved_modules.install()
__all__ = ["AssessSettings", "BallInputs", "BallProperty", "Certificate", "Certification", "ClassifierRepair", "CnnRepairError", "FeatureBounds", "InputSpec",
           "LoadedModel", "MadePoints", "OutputRows", "Points", "PointsSettings", "PropertyCheck", "RepairSpec", "SolveOptions", "Verification", "VnnlibProperty",
           "__version__", "assess", "ball_box", "certify", "check_properties",
           "feature_bounds", "frozen_graph", "last_layer", "load_model", "make_points", "margin_bounds", "pgd_accuracy", "read_vnnlib", "repair_classifier",
           "save_model",
           "verify_certificate", "write_properties"]

_MOVED = {"MarginProblem": "cnnrepair.repair", "MarginSolution": "cnnrepair.repair", "solve_margins": "cnnrepair.repair"}


def __getattr__(name: str):
    """Names that moved out of the top-level API: still found there for one release, with a warning."""
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"cnnrepair.{name} moved to {_MOVED[name]}.{name}; import it from there", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'cnnrepair' has no attribute {name!r}")
