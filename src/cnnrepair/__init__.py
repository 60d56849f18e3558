"""cnnrepair: repair CNN classifiers against adversarial examples with convex optimization.

Implements and extends Guidotti & Leofante, "Repair of Convolutional Neural Networks using
Convex Optimization" (2020): CNNs, hybrid CNN+SVM networks, attacks, and LP repair of the
linear head.
"""

from cnnrepair.errors import CnnRepairError

__version__ = "0.1.0"
__all__ = ["CnnRepairError", "__version__"]
