"""The paper's pipeline (Guidotti & Leofante, 2020), one application on top of the core.

``models`` (the paper's CNNs), ``training``, ``hybrid`` (the LH/KH SVM heads; importing it
registers them with the core as repairable heads), ``evaluation`` (the FGSM/PGD sweeps),
``experiment`` (the repair experiment of figure 3), ``pipeline`` (the stages over a run
directory), ``rundir``, ``report``. Nothing in the core imports this package.
"""
