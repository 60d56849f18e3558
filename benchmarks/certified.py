"""Certified repair: whole L-infinity balls repaired, IBP against the linear relaxation (CROWN), before and after.

For each run (digits, MNIST), each of its models' last layer (the NN's last fully connected layer
and LH's head, both from the run's ``export/*.pt2``), each eps and each bound method:

* repair points: the first ``k`` images of the first half of the test set whose ball CROWN (the
  tighter method) does not certify with their true label (misclassified images included), the same
  for both methods;
* keep points: ``keep`` images of that half the model classifies correctly (hard, margin 0): as
  points (their label kept), and with CROWN also as balls (``keep_eps = eps``: those whose ball was
  certified stay certified);
* ``cnnrepair``'s ``ball`` spec repairs the layer (L1, margin 0.01); then, on ``eval`` unseen images
  of the second half: certified accuracy before and after (the same method, the specification itself bounded),
  PGD accuracy after (50 steps, 5 restarts, in the same boxes; never below the certified accuracy
  when the bounds are sound), and clean accuracy (drawdown) on the whole second half.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

MODELS = {"nn": "the NN's last layer", "lh": "LH's head"}

from benchmarks import registry


def run(runs: list[Path], eps_grid: tuple[float, ...], k: int = 20, keep: int = 200, eval_n: int = 100, candidates: int = 100,
        margin: float = 0.01, time_limit: float = 300.0) -> list[Path]:
    """Every (model, eps, bounds, keep) repair of each run; writes benchmarks/results/certified_<dataset>.json per run."""
    from benchmarks.common import load_run, machine, write_result
    from cnnrepair.bounds import ball_box
    from cnnrepair.certify import certify, pgd_accuracy
    from cnnrepair.formats import load_model
    from cnnrepair.paper.pipeline import open_dataset
    from cnnrepair.repair import Points, RepairSpec, SolveOptions, repair_classifier
    from cnnrepair.paper.rundir import RunDir

    paths = []
    for run_dir in runs:
        rows = []
        res = load_run(run_dir)
        ds = open_dataset(RunDir(run_dir))
        x = torch.as_tensor(ds.x_test).float() / 255
        y = np.asarray(ds.y_test, np.int64)
        half = len(y) // 2
        xe, ye = x[half:], y[half:]
        for name in MODELS:
            model = load_model(run_dir / "export" / f"{name}.pt2").module
            with torch.no_grad():
                pred_pool = model(x[:half]).argmax(1).numpy()
                clean_before = float((model(xe).argmax(1).numpy() == ye).mean())
            right = np.flatnonzero(pred_pool == y[:half])
            for eps in eps_grid:
                # the same repair points for both methods: the first k images whose ball CROWN (the tighter) does not certify
                tight = certify(model, x[:candidates], y[:candidates], eps, "crown")
                idx = np.flatnonzero(~tight.certified)[:k]
                keep_idx = np.setdiff1d(right, idx)[:keep]
                for method in ("ibp", "crown"):
                    cand = tight if method == "crown" else certify(model, x[:candidates], y[:candidates], eps, method)
                    ev = certify(model, xe[:eval_n], ye[:eval_n], eps, method)
                    lo, hi = ball_box(xe[:eval_n], eps)
                    if len(idx) == 0:  # CROWN certifies every candidate: nothing to repair at this eps
                        rows.append({"dataset": res["dataset"], "model": name, "eps": eps, "bounds": method, "keep": "points",
                                     "repair_points": 0, "candidates_certified_before": int(cand.certified.sum()),
                                     "candidates": candidates, "keep_points": 0, "status": "every candidate certified", "seconds": 0.0,
                                     "bound_seconds_per_point": ev.seconds / max(1, eval_n), "clean_before": clean_before,
                                     "certified_before": ev.accuracy, "eval_points": eval_n})
                        continue
                    for keep_kind in ("points", "balls") if method == "crown" else ("points",):
                        spec = RepairSpec(kind="ball", eps=eps, bounds=method, margin=margin, keep_eps=eps if keep_kind == "balls" else 0.0)
                        t0 = time.perf_counter()
                        result = repair_classifier(model, x[idx], y[idx], spec, keep=Points(x[keep_idx], y[keep_idx]),
                                                   options=SolveOptions(time_limit=time_limit))
                        seconds = time.perf_counter() - t0
                        row = {"dataset": res["dataset"], "model": name, "eps": eps, "bounds": method, "keep": keep_kind,
                               "repair_points": int(len(idx)), "candidates_certified_before": int(cand.certified.sum()),
                               "candidates": candidates, "keep_points": int(len(keep_idx)), "status": result.status, "seconds": seconds,
                               "bound_seconds_per_point": ev.seconds / max(1, eval_n), "clean_before": clean_before,
                               "certified_before": ev.accuracy, "eval_points": eval_n}
                        if result.ok:
                            after = certify(result.model, xe[:eval_n], ye[:eval_n], eps, method)
                            robust = pgd_accuracy(result.model, lo, hi, ye[:eval_n])
                            with torch.no_grad():
                                clean_after = float((result.model(xe).argmax(1).numpy() == ye).mean())
                            cert = result.certificate
                            row.update({
                                "repair_points_certified": int(sum(p.certified_margin_after >= margin * (1 - 1e-9) for p in cert.points)),
                                "certified_after": after.accuracy, "pgd_after": float(robust.mean()),
                                "pgd_not_below_certified": bool((robust | ~after.certified).all()),
                                "clean_after": clean_after, "drawdown": clean_before - clean_after,
                                "change_l1": cert.change["l1"], "changed": cert.change["nonzero"], "gap": cert.gap,
                                "keep_labels_kept": cert.keep.labels_kept,
                                "keep_balls_certified": [cert.keep.balls_certified_after, cert.keep.balls_certified_before]})
                        rows.append(row)
                        print(f"{res['dataset']} {name} eps={eps:g} {method} keep {keep_kind}: {row['status']} in {seconds:.1f}s; certified "
                              f"{100 * row['certified_before']:.0f}% -> {100 * row.get('certified_after', float('nan')):.0f}%, "
                              f"pgd {100 * row.get('pgd_after', float('nan')):.0f}%, drawdown {100 * row.get('drawdown', float('nan')):.2f} pts",
                              flush=True)
        command = f"python -m benchmarks.run certified {run_dir} --eps " + ",".join(f"{e:g}" for e in eps_grid)
        if (k, eval_n) != (20, 100):
            command += f" --k {k} --eval {eval_n}"
        if time_limit != 300.0:
            command += f" --time-limit {time_limit:g}"
        if keep != 200:
            command += f" --keep {keep}"
        out = {"machine": machine(), "command": command, "dataset": res["dataset"],
               "task": {"k": k, "keep": keep, "eval": eval_n, "candidates": candidates, "margin": margin, "norm": "l1", "time_limit_s": time_limit,
                        "pgd": {"steps": 50, "restarts": 5}}, "rows": rows}
        paths.append(write_result(f"certified_{res['dataset']}.json", out))
    return paths


def table(result: dict) -> str:
    """Markdown: per dataset, model, eps and bound method."""
    lines = ["| data | layer | eps | bounds | keep | repaired (certified) | s | certified acc. before -> after | PGD acc. after | "
             "clean drawdown (pts) | L1 change |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        keep = r["keep"] if r["keep"] == "points" else f"balls ({r['keep_balls_certified'][0]}/{r['keep_balls_certified'][1]} stay)" \
            if r.get("keep_balls_certified") else r["keep"]
        if r["status"] != "repaired":
            lines.append(f"| {r['dataset']} | {MODELS[r['model']]} | {r['eps']:g} | {r['bounds']} | {keep} | {r['status']} ({r['repair_points']} points) "
                         f"| {r['seconds']:.1f} | {100 * r['certified_before']:.0f}% | - | - | - |")
            continue
        lines.append(f"| {r['dataset']} | {MODELS[r['model']]} | {r['eps']:g} | {r['bounds']} | {keep} | {r['repair_points_certified']}/{r['repair_points']} "
                     f"| {r['seconds']:.1f} | {100 * r['certified_before']:.0f}% -> {100 * r['certified_after']:.0f}% | "
                     f"{100 * r['pgd_after']:.0f}% | {100 * r['drawdown']:.2f} | {r['change_l1']:.3g} |")
    return "\n".join(lines)


registry.section("certified_*.json", order=160,
                 title=lambda d: f"### Certified repair on {d['dataset']}: every input of an L-infinity ball, IBP against CROWN",
                 intro=lambda d: f"{registry.measured_on(d)}; per repair: the first {d['task']['k']} of {d['task']['candidates']} test "
                                 f"images (first half of the test set) whose ball CROWN does not certify (the same points for both "
                                 f"methods), up to {d['task']['keep']} keep points (correctly classified images of the "
                                 "first half; hard; as points, or with CROWN also as balls), "
                                 f"margin {d['task']['margin']:g}, L1, {d['task']['time_limit_s']:g} s per repair; certified and PGD "
                                 f"accuracy (50 steps, 5 restarts) on {d['task']['eval']} unseen test images (second half), drawdown "
                                 "on the whole second half; seconds include bounding the repair (and keep-ball) points.", table=table)


@registry.command("certified", "certified repair of L-infinity balls: IBP against CROWN, certified accuracy", order=140,
                  arguments=registry.arguments(
                      registry.arg("runs", nargs="+", type=Path, help="finished run directories with export/nn.pt2 and export/lh.pt2"),
                      registry.arg("--eps", default="0.005,0.01,0.02", help="comma-separated radii in pixels"),
                      registry.arg("--k", type=int, default=20, help="repair points per repair (default 20)"),
                      registry.arg("--eval", type=int, default=100, help="unseen test images certified before and after (default 100)"),
                      registry.arg("--time-limit", type=float, default=300.0, help="seconds one repair may take, bounding included (default 300)"),
                      registry.arg("--keep", type=int, default=200, help="keep points per repair (default 200)")))
def _cli(args):
    eps = tuple(float(v) for v in args.eps.split(","))
    return run(args.runs, eps, k=args.k, keep=args.keep, eval_n=args.eval, time_limit=args.time_limit)
