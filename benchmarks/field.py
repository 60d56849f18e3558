"""The repair field's measures on a distribution shift: MNIST-C fog, repaired on a trained MNIST run.

Task (as PRDNN and APRNN set it): the MNIST test set corrupted with fog (``cnnrepair.corruptions.fog``,
severity 5, seed 0); the first 100 fog images are the repair set, the other 9,900 measure
generalisation, the clean test set measures drawdown. Repaired: the NN's last layer (``head.2``)
and LH's linear SVM head, each without and with keep points (1,000 clean training images each
model classifies correctly, hard, margin 0). Spec: pointwise, L1, at margins 0.05, 0.5 and 2 (a larger
margin moves the boundary further past the repair images).

* efficacy: accuracy on the 100 repair images after repair (100% by construction);
* drawdown: clean test accuracy lost (points);
* generalisation: accuracy gained on the 9,900 held-out fog images (points).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import registry


def run(run_dir: Path, repair_images: int = 100, keep_images: int = 1000, margins: tuple[float, ...] = (0.05, 0.5, 2.0),
        seed: int = 0) -> Path:
    """Every (model, keep) case on one fog set; writes benchmarks/results/field_fog.json."""
    from benchmarks.common import machine as _machine, write_result as _write
    from cnnrepair import RepairSpec, repair_classifier
    from cnnrepair.corruptions import fog
    from cnnrepair.data import to_float
    from cnnrepair.paper.pipeline import load_models, open_dataset
    from cnnrepair.paper.rundir import RunDir
    from cnnrepair.runtime import accuracy

    run = RunDir(run_dir)
    ds = open_dataset(run)
    models = load_models(run, ["nn", "lh"])
    t0 = time.perf_counter()
    x_fog = to_float(fog(ds.x_test, severity=5, seed=seed))
    fog_s = time.perf_counter() - t0
    x_clean, y_test = to_float(ds.x_test), ds.y_test
    xr, yr = x_fog[:repair_images], y_test[:repair_images]
    xg, yg = x_fog[repair_images:], y_test[repair_images:]
    order = np.random.default_rng(seed).permutation(len(ds.y_train))[:3 * keep_images]
    rows = []
    for name, layer in (("nn", "head.2"), ("lh", "head")):
        model = models[name].eval()
        xk_all = to_float(ds.x_train[order])
        with torch.no_grad():
            ok = model(xk_all).argmax(1).numpy() == ds.y_train[order]
        xk, yk = xk_all[ok][:keep_images], ds.y_train[order][ok][:keep_images]
        before = {"repair": accuracy(model, xr, yr), "generalisation": accuracy(model, xg, yg), "clean": accuracy(model, x_clean, y_test)}
        for margin in margins:
            for keep in (False, True):
                t1 = time.perf_counter()
                r = repair_classifier(model, xr, yr, RepairSpec(margin=margin), layer=layer, keep=(xk, yk) if keep else None)
                seconds = time.perf_counter() - t1
                row = {"model": name, "layer": layer, "margin": margin, "keep_points": int(len(yk)) if keep else 0, "status": r.status,
                       "seconds": seconds, "before": before}
                if r.ok:
                    after = {"repair": accuracy(r.model, xr, yr), "generalisation": accuracy(r.model, xg, yg),
                             "clean": accuracy(r.model, x_clean, y_test)}
                    c = r.certificate
                    row.update(after=after, efficacy=after["repair"], drawdown=100 * (before["clean"] - after["clean"]),
                               generalisation=100 * (after["generalisation"] - before["generalisation"]),
                               change=c.change, objective=c.objective, gap=c.gap,
                               repair_points_wrong_before=int(round(repair_images * (1 - before["repair"]))))
                rows.append(row)
                print(f"{name} margin={margin:g} keep={keep}: {r.status} in {seconds:.1f}s" + (
                    f", efficacy {100 * row['efficacy']:.0f}%, drawdown {row['drawdown']:.2f}, generalisation {row['generalisation']:+.2f}"
                    if r.ok else ""), flush=True)
    out = {"machine": _machine(), "run": str(run_dir), "command": f"python -m benchmarks.run field {run_dir}",
           "task": {"corruption": "fog", "severity": 5, "seed": seed, "repair_images": repair_images,
                    "generalisation_images": int(len(yg)), "keep_images": keep_images, "margins": list(margins), "spec": "pointwise", "norm": "l1",
                    "fog_seconds": fog_s},
           "peers": {"APRNN (PLDI'23), MNIST fog, as reported": {"drawdown": 1.28, "generalisation": 31.5}},
           "rows": rows}
    return _write("field_fog.json", out)


def table(fg: dict) -> str:
    """Markdown: per model, margin and keep set, the field's three measures and the change."""
    out = ["| model (layer) | margin | keep | efficacy | drawdown (points) | generalisation (points) | fog acc. before -> after | weights changed | s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in fg["rows"]:
        if r["status"] != "repaired":
            out.append(f"| {r['model'].upper()} ({r['layer']}) | {r['margin']:g} | {r['keep_points']:,} | {r['status']} | - | - | - | - | {r['seconds']:.1f} |")
            continue
        b, a = r["before"], r["after"]
        out.append(f"| {r['model'].upper()} ({r['layer']}) | {r['margin']:g} | {r['keep_points']:,} | {100 * r['efficacy']:.0f}% "
                   f"(from {100 * b['repair']:.0f}%) | {r['drawdown']:.2f} | {r['generalisation']:+.2f} | "
                   f"{100 * b['generalisation']:.2f} -> {100 * a['generalisation']:.2f} | {r['change']['nonzero']:,} | {r['seconds']:.1f} |")
    peer = fg["peers"]["APRNN (PLDI'23), MNIST fog, as reported"]
    out += ["", f"For scale, APRNN reports {peer['drawdown']}% drawdown for {peer['generalisation']}% generalisation on its MNIST fog task "
                "(its own network and fog set, not rerun here)."]
    return "\n".join(out)


def _intro(fg: dict) -> str:
    t = fg["task"]
    return (f"`{fg['command']}`: fog severity {t['severity']} on the MNIST test set (seed {t['seed']}); repair the first "
            f"{t['repair_images']} fog images (pointwise, L1), generalisation on the other {t['generalisation_images']:,}, "
            f"drawdown on the clean test set; keep points: {t['keep_images']:,} clean training images the model gets right.")


registry.section("field_fog.json", order=170, title=lambda d: f"### The field's measures on MNIST-C fog ({d['run']})", intro=_intro, table=table)


@registry.command("field", "efficacy, drawdown and generalisation of pointwise repair on MNIST-C fog", order=70,
                  arguments=registry.arguments(registry.arg("run", type=Path, help="a finished MNIST run directory (NN and LH)")))
def _cli(args):
    return run(args.run)
