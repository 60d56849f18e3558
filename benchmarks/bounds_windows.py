"""alpha-CROWN with every walk's slopes optimised (``alpha-crown-full``) on the paper's MNIST CNN: a convolution's
neurons walked back in windows of their receptive field against the same walks written out over the whole map.

The paper's MNIST CNN of the bounds benchmark (trained here one epoch, seeded) and the first ``images`` test images at
eps 0.02, in one run: ``alpha-crown-full`` and ``crown`` with the walks in windows (slopes held only on the part of each
ReLU a walk's window covers) and with ``cnnrepair.bounds.propagate.WINDOWS`` off (rows and slopes over the whole map).
Per row: seconds per image, images certified, the mean lower bound of the margin and, for the whole-map rows, the largest
difference to the windowed bounds relative to their size (the two must agree to roundoff: the same slopes and steps on
the same non-zero entries).
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import registry
from cnnrepair.errors import CnnRepairError

IMAGES = 10
EPS = 0.02
METHODS = ("crown", "alpha-crown-full")


def run(mnist_dir: Path, images: int = IMAGES, seed: int = 0) -> Path:
    """Both methods, windows on and off, side by side; writes benchmarks/results/alpha_windows.json (another number of
    images: a file of its own, :func:`result_name`)."""
    from benchmarks.bounds import paper_cnn
    from benchmarks.common import machine, write_result
    from cnnrepair.certify import certify
    from cnnrepair.data import load_dataset
    from cnnrepair.runtime import accuracy

    if images < 1:  # before any training
        raise CnnRepairError(f"--images {images}: give at least 1 test image")
    propagate = importlib.import_module("cnnrepair.bounds.propagate")  # the module: the package's name is its function
    torch.set_num_threads(max(1, torch.get_num_threads()))
    name, model, x_test, y_test, _, info = paper_cnn(load_dataset("mnist", mnist_dir), seed)
    info["test_accuracy"] = accuracy(model, x_test, y_test)
    print(f"{name}: trained in {info['train_seconds']:.0f}s, test accuracy {100 * info['test_accuracy']:.2f}%", flush=True)
    x, y = x_test[:images], np.asarray(y_test[:images], np.int64)
    rows, found = [], {}
    for method in METHODS:
        for windows in (True, False):
            print(f"  {method}, {'windows' if windows else 'whole map'}: bounding {len(y)} images ...", flush=True)
            propagate.WINDOWS = windows
            try:
                t0 = time.perf_counter()
                m = certify(model, x, y, EPS, method).margins
                seconds = time.perf_counter() - t0
            finally:
                propagate.WINDOWS = True
            found[method, windows] = (m, seconds)
            row = {"method": method, "walks": "windows" if windows else "whole map", "images": int(len(y)),
                   "certified": int((m > 0).sum()), "mean_margin_bound": float(np.mean(m)), "seconds_per_image": seconds / len(y)}
            if not windows:
                ref, ref_seconds = found[method, True]
                row["largest_relative_difference"] = float(np.max(np.abs(m - ref) / np.maximum(np.abs(ref), 1e-12)))
                row["time_over_windows"] = seconds / ref_seconds
            rows.append(row)
            print(f"  {method}, {row['walks']}: {row['certified']}/{len(y)} certified, mean bound {row['mean_margin_bound']:.3f}, "
                  f"{row['seconds_per_image']:.2f} s/image", flush=True)
    command = f"python -m benchmarks.run bounds-windows --data-dir {mnist_dir}" + (f" --images {images}" if images != IMAGES else "")
    out = {"machine": machine(), "command": command, "task": {"images": images, "eps": EPS, "seed": seed, "model": name},
           "network": info, "rows": rows}
    return write_result(result_name(images), out)


def result_name(images: int = IMAGES) -> str:
    """The results file of a run: one on another number of images gets its own instead of replacing the table."""
    return "alpha_windows.json" if images == IMAGES else f"alpha_windows_images{images}.json"


def table(d: dict) -> str:
    lines = ["| method | walks | certified | mean margin bound | s / image | time / windows' | largest relative difference |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        ratio = f"{r['time_over_windows']:.2f}x" if "time_over_windows" in r else "-"
        diff = f"{r['largest_relative_difference']:.1e}" if "largest_relative_difference" in r else "-"
        lines.append(f"| {r['method']} | {r['walks']} | {r['certified']}/{r['images']} | {r['mean_margin_bound']:.3f} | "
                     f"{r['seconds_per_image']:.2f} | {ratio} | {diff} |")
    n = d["network"]
    return "\n".join(lines + ["", f"Network: {d['task']['model']}, {100 * n['test_accuracy']:.2f}% test accuracy ({n['epochs']} epoch, "
                              f"{n['train_seconds']:.0f} s); eps {d['task']['eps']:g}."])


registry.section("alpha_windows*.json", order=166,
                 title=lambda d: "### Bounds: alpha-CROWN's walks in windows against the whole map (the paper's MNIST CNN)",
                 intro=lambda d: f"{registry.measured_on(d)}; the first {d['task']['images']} test images; both "
                                 "ways in one run, the same bounds to roundoff.",
                 table=table)


@registry.command("bounds-windows", "alpha-crown-full and CROWN on the paper's MNIST CNN, walks in windows against the whole map",
                  order=166, arguments=registry.arguments(
                      registry.MNIST_DIR,
                      registry.arg("--images", type=int, default=IMAGES, help=f"test images (default {IMAGES})")))
def _cli(args):
    return run(args.data_dir, args.images)
