"""Repair of a classifier's last linear layer by linear programming.

* :mod:`cnnrepair.repair.targets`: the paper's program (equation 3): pull decision values toward targets.
* :mod:`cnnrepair.repair.program`: that program's data (layer, points, margins, norm) and its certified lower bound.
* :mod:`cnnrepair.repair.margins`: the exact minimal change that gives points their labels with a margin.
* :mod:`cnnrepair.repair.rows_ipm`: the structured interior point it takes first, for every norm and bound.
* :mod:`cnnrepair.repair.ball`: the same for points known only up to a box of features (certified repair of input balls).
* :mod:`cnnrepair.repair.layer`: any classifier as frozen features plus the linear layer that ends it.
* :mod:`cnnrepair.repair.api`: :func:`repair_classifier`, one call from a model and points to a repaired copy.
* :mod:`cnnrepair.repair.inputs`: what a repair is given (:class:`Points`, :class:`SolveOptions`).
* :mod:`cnnrepair.repair.measure`: how margins are measured (as the model runs, in several batch layouts).
* :mod:`cnnrepair.repair.certificate`: the claim (:class:`Certificate`), written as JSON, read back with its shape checked.
* :mod:`cnnrepair.repair.coincide`: points that are one point to float32 (shared features, their noise, conflicts).
* :mod:`cnnrepair.repair.highs`: our interface to HiGHS (quiet, interruptible by Ctrl-C).
"""

from cnnrepair.repair.api import ClassifierRepair, repair_classifier
from cnnrepair.repair.ball import solve_ball
from cnnrepair.repair.certificate import Certificate, FileRef, KeepClaim, PointClaim
from cnnrepair.repair.ending import ENDINGS, Ending, register_ending
from cnnrepair.repair.inputs import Points, SolveOptions
from cnnrepair.repair.layer import LastLayer, candidate_layers, last_layer
from cnnrepair.repair.margins import find_conflicts, solve_margins
from cnnrepair.repair.outputs import OutputRows
from cnnrepair.repair.program import NORMS, MarginProblem, MarginSolution, certified_lower_bound, margins_of
from cnnrepair.repair.spec import SPECS, RepairSpec
from cnnrepair.repair.targets import (
    AUTO_IPM_POINTS,
    SOLVERS,
    BoundConstraints,
    ClassLP,
    RepairProblem,
    RepairResult,
    TargetConstraints,
    default_threads,
    repair,
    wilcoxon_select,
)

__all__ = [
    "ENDINGS", "SPECS", "Certificate", "ClassifierRepair", "Ending", "FileRef", "KeepClaim", "LastLayer", "OutputRows", "PointClaim", "Points", "RepairSpec", "SolveOptions", "candidate_layers", "last_layer", "repair_classifier",
    "AUTO_IPM_POINTS", "NORMS", "SOLVERS", "BoundConstraints", "ClassLP", "MarginProblem", "MarginSolution",
    "RepairProblem", "RepairResult", "TargetConstraints", "certified_lower_bound", "default_threads",
    "find_conflicts", "margins_of", "register_ending", "repair", "solve_ball", "solve_margins", "wilcoxon_select",
]
