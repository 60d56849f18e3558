"""Exact RBF-SVM (KH) fitting time against training-set size on a run's cached CNN features.

Fits KH on stratified subsets of growing size, records seconds and test accuracy, fits a power
law t = a * n^p to the measured points and extrapolates to the full training set. Used where an
exact fit on every training feature would take hours (CIFAR-10: 50,000 x 4,096).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import registry


def run(run_dir: Path, sizes: list[int], C: float = 10.0) -> Path:
    import torch

    from benchmarks.common import machine as _machine, write_result as _write
    from cnnrepair.paper.hybrid import fit_rbf_svm
    from cnnrepair.io import load_npz
    from cnnrepair.paper.pipeline import stratified_subset
    from cnnrepair.paper.rundir import RunDir

    run = RunDir(run_dir)
    res = run.results
    feats = load_npz(run.path / "features.npz", "feature cache")
    from cnnrepair.paper.pipeline import open_dataset

    ds = open_dataset(run)
    points = []
    for n in sizes:
        idx = stratified_subset(ds.y_train, n, res.get("seed", 0)) if n < len(ds.y_train) else np.arange(len(ds.y_train))
        head, pipe, info = fit_rbf_svm(feats["train"][idx], ds.y_train[idx], C=C)
        with torch.no_grad():  # the torch head equals decision_function to 1e-5 (tested) and is far faster on 10,000 points
            dec = head(torch.as_tensor(feats["test"])).numpy()
        acc = float((dec.argmax(1) == ds.y_test).mean())
        points.append({"n_train": int(n), "seconds": info.seconds, "n_support": info.n_support, "test_accuracy": acc})
    kh = res.get("hybrid", {}).get("kh")
    if kh and kh["n_train"] not in sizes and kh.get("C") == C:  # the run's own KH is one more measured point
        points.append({"n_train": kh["n_train"], "seconds": res["timings_s"]["fit_kh"], "n_support": kh["n_support"],
                       "test_accuracy": res["accuracy"]["kh"], "from": "the run's own `cnnrepair hybrid`"})
    points.sort(key=lambda p: p["n_train"])
    ns = np.array([p["n_train"] for p in points], float)
    ts = np.array([p["seconds"] for p in points], float)
    slope, icpt = np.polyfit(np.log(ns), np.log(ts), 1) if len(ns) > 1 else (float("nan"), float("nan"))
    full = len(ds.y_train)
    out = {"machine": _machine(), "dataset": res["dataset"], "C": C, "points": points, "power_law_exponent": float(slope),
           "extrapolated_full_seconds": float(np.exp(icpt) * full ** slope) if len(ns) > 1 else None, "n_full": full,
           "command": f"python -m benchmarks.run kh {run_dir} --sizes {','.join(map(str, sizes))}"}
    return _write(f"kh_scaling_{res['dataset']}.json", out)


def _section(kh: dict, link) -> list[str]:
    lines = [f"### Exact KH fitting time on {kh['dataset']} features", "",
             "| training features | fit s | support vectors | KH test accuracy |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['n_train']:,} | {p['seconds']:.0f} | {p['n_support']:,} | {registry.pct(p['test_accuracy'])} |" for p in kh["points"]]
    if kh.get("extrapolated_full_seconds"):
        lines += ["", f"Fit time grows as n^{kh['power_law_exponent']:.2f} here; the exact fit on all {kh['n_full']:,} "
                      f"training features would take about {kh['extrapolated_full_seconds'] / 3600:.1f} hours on this machine "
                      f"(`{kh['command']}`)."]
    return lines + [""]


registry.section("kh_scaling_*.json", order=50, render=_section)


@registry.command("kh", "exact KH fit time against training-set size on a run's features", order=30,
                  arguments=registry.arguments(registry.arg("run", type=Path),
                                               registry.arg("--sizes", default="2500,5000,10000", help="comma-separated training-set sizes")))
def _cli(args):
    return run(args.run, [int(v) for v in args.sizes.split(",")])
