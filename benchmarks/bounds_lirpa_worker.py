"""auto_LiRPA's IBP, CROWN and alpha-CROWN on one model and one set of input boxes, in auto_LiRPA's own interpreter.

Run by :mod:`benchmarks.bounds` (``--lirpa-python``), never imported by it: this file needs only torch, numpy and
auto_LiRPA (0.3, the one release on PyPI: Python <= 3.10, torch 1.12), not cnnrepair. Input: an ``.npz`` with the
boxes ``lower`` / ``upper`` (N x input shape), the labels ``labels`` and the model's layers as ``layer{i}_*`` arrays,
and a JSON of the layers' kinds and settings; output: a JSON with, per method, each input's smallest lower bound
over the rows ``e_y - e_j`` (the same rows as ``cnnrepair.bounds.margin_rows``) and the seconds of
``compute_bounds`` alone (building the bounded module, done once, is not counted).

    python bounds_lirpa_worker.py IN.npz LAYERS.json OUT.json --threads 2 --batch 50 --alpha-steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch import nn

METHODS = {"IBP": "IBP", "CROWN": "CROWN", "alpha-CROWN": "CROWN-Optimized"}


def build(layers: list[dict], arrays) -> nn.Sequential:
    """The model from its layer list (linear, conv2d, relu, maxpool2d, flatten), in float32."""
    out = []
    for i, spec in enumerate(layers):
        kind = spec["kind"]
        if kind == "linear":
            w, b = arrays[f"layer{i}_weight"], arrays[f"layer{i}_bias"]
            m = nn.Linear(w.shape[1], w.shape[0])
        elif kind == "conv2d":
            w, b = arrays[f"layer{i}_weight"], arrays[f"layer{i}_bias"]
            m = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=tuple(spec["stride"]), padding=tuple(spec["padding"]))
        elif kind == "relu":
            out.append(nn.ReLU())
            continue
        elif kind == "maxpool2d":
            out.append(nn.MaxPool2d(tuple(spec["kernel"]), tuple(spec["stride"]), tuple(spec["padding"])))
            continue
        elif kind == "flatten":
            out.append(nn.Flatten())
            continue
        else:
            raise SystemExit(f"unknown layer kind {kind!r}")
        with torch.no_grad():
            m.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
            m.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        out.append(m)
    return nn.Sequential(*out).eval()


def rows(labels: np.ndarray, classes: int) -> torch.Tensor:
    """N x (classes - 1) x classes: e_y - e_j for every other class j, in class order."""
    c = torch.zeros(len(labels), classes - 1, classes)
    for n, y in enumerate(labels):
        others = [j for j in range(classes) if j != y]
        c[n, :, int(y)] = 1.0
        c[n, range(classes - 1), others] = -1.0
    return c


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("inputs")
    ap.add_argument("layers")
    ap.add_argument("out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--alpha-steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import auto_LiRPA
    from auto_LiRPA import BoundedModule, BoundedTensor, PerturbationLpNorm

    d = np.load(a.inputs)
    layers = json.loads(open(a.layers).read())
    model = build(layers, d)
    lower, upper = torch.as_tensor(d["lower"], dtype=torch.float32), torch.as_tensor(d["upper"], dtype=torch.float32)
    labels = d["labels"]
    with torch.no_grad():
        classes = model(lower[:1]).shape[1]
    # sparse_features_alpha off: with it, 0.3's alpha-CROWN fails on a 784-256-256-10 MLP ("shape mismatch: value tensor of
    # shape [9, 1, 256] cannot be broadcast to indexing result of shape [9, 1, 243]"); it saves memory, the bounds are the same
    opts = {"optimize_bound_args": {"iteration": a.alpha_steps}, "sparse_features_alpha": False}
    spec = rows(labels, classes)
    out = {"auto_LiRPA": auto_LiRPA.__version__, "torch": torch.__version__, "python": sys.version.split()[0], "dtype": "float32",
           "threads": a.threads, "batch": a.batch, "alpha_steps": a.alpha_steps, "bound_opts": opts, "methods": {}}
    for name, method in METHODS.items():
        t0 = time.perf_counter()  # a bounded module of its own per method: 0.3 keeps state from one method's calls to the next
        bounded = BoundedModule(model, torch.zeros_like(lower[:1]), bound_opts=opts, device="cpu", verbose=False)
        build_s = time.perf_counter() - t0

        def bound(lo: torch.Tensor, hi: torch.Tensor, c: torch.Tensor) -> np.ndarray:
            x = BoundedTensor((lo + hi) / 2, PerturbationLpNorm(norm=float("inf"), x_L=lo, x_U=hi))
            lb, _ = bounded.compute_bounds(x=(x,), C=c, method=method, bound_upper=False)
            return lb.detach().double().numpy().min(1)

        try:
            bound(lower[:1], upper[:1], spec[:1])  # warm-up on one input, not counted
            t0 = time.perf_counter()
            margins = np.concatenate([bound(lower[i:i + a.batch], upper[i:i + a.batch], spec[i:i + a.batch])
                                      for i in range(0, len(lower), a.batch)])
        except Exception as e:  # auto_LiRPA's own failure on this model, recorded as such (the other methods still run)
            where = traceback.extract_tb(e.__traceback__)[-1]
            out["methods"][name] = {"error": f"{type(e).__name__} {str(e)[:160]}".strip() +
                                    f" (auto_LiRPA/{Path(where.filename).name}:{where.lineno})"}
            continue
        out["methods"][name] = {"margins": margins.tolist(), "seconds": time.perf_counter() - t0, "build_seconds": build_s}
    with open(a.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
