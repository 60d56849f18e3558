"""Run PRDNN (pip ``prdnn`` 1.0) on one last-layer problem; executed by PRDNN's own interpreter.

Not part of cnnrepair and imports nothing of it: PRDNN needs ``pysyrenn`` 1.1, an older protobuf
runtime (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``), ``np.float`` (gone from NumPy) and
gurobipy, so it lives in its own environment. Usage: ``python versus_prdnn_worker.py IN.npz OUT.json``;
IN holds ``weight`` (C x n), ``bias``, ``features`` (K x n) and ``labels``; OUT gets the timings,
Gurobi's status and the change PRDNN made (or the error it stopped with).
"""

import json
import os
import sys
import time

os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")

import numpy as np  # noqa: E402

np.float = float  # removed from NumPy; PRDNN 1.0 still uses it


def main(src: str, dst: str) -> None:
    from importlib.metadata import version

    from prdnn import ProvableRepair
    from pysyrenn.frontend import FullyConnectedLayer, Network

    data = np.load(src)
    W, b = data["weight"].astype(np.float32), data["bias"].astype(np.float32)
    net = Network([FullyConnectedLayer(W.T.copy(), b.copy())])
    out = {"versions": {name: version(name) for name in ("prdnn", "pysyrenn", "gurobipy")}}
    repair = ProvableRepair(net, 0, data["features"].astype(np.float32), data["labels"].astype(np.int64))
    t0 = time.perf_counter()
    try:
        patched = repair.compute()
    except Exception as exc:  # the size-limited licence refuses large models with an exception
        out.update(status="error", error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
    else:
        out.update(seconds=time.perf_counter() - t0, timing=repair.timing,
                   status="ok" if patched is not None else "not optimal")
        if patched is not None:
            layer = patched.value_layers[0]
            out["delta_weight"] = (np.asarray(layer.weights).T.astype(np.float64) - W.astype(np.float64)).tolist()
            out["delta_bias"] = (np.asarray(layer.biases).astype(np.float64) - b.astype(np.float64)).tolist()
    with open(dst, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
