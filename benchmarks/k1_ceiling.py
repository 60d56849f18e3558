"""How far can the paper's repair go with one repair point (K = 1)? An upper bound, by brute force.

For each eps of a run's FGSM grid and each target (LH's clean values, the paper's; or +-1 label
margins), every one of ``candidates`` adversarial training examples of LH is tried as *the* repair
point: its K = 1 program is solved and the repaired head is scored on the unseen LH test
adversaries (share now right) and on the clean test set (drawdown). The best candidate is picked
*with the test set*, so the figure is a ceiling for any rule that picks one point, not a method.

It also records how many feature columns each repair changes: with one point, the L1-minimal
change of each class row sits on the point's largest feature (a weight change there buys the most
decision value per unit of |gamma|), so RLH differs from LH in one column, whatever the class.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent

from benchmarks import registry


def run(run_dir: Path, candidates: int = 200, budget: float = 0.5, out: Path | None = None) -> Path:
    """Write ``k1_ceiling.json``: per (eps, target), the spread of fixed shares and the best within ``budget``."""
    from cnnrepair.data import load_dataset
    from cnnrepair.errors import CnnRepairError
    from cnnrepair.paper.evaluation import AdversarialSet, set_path
    from cnnrepair.paper.experiment import repair_pool, targets
    from cnnrepair.io import load_npz, write_json
    from cnnrepair.paper.pipeline import load_models, model_fingerprints
    from cnnrepair.repair import RepairProblem, repair
    from cnnrepair.paper.rundir import RunDir
    from cnnrepair.paper.training import outputs

    from benchmarks.common import RESULTS, machine as _machine

    rd = RunDir(run_dir)
    cfg = rd.require()
    eps_grid = rd.results.get("attack", {}).get("fgsm", {}).get("eps")
    if not eps_grid:
        raise CnnRepairError(f"{run_dir}: no FGSM attack results; run `cnnrepair attack --out {run_dir} --attacks fgsm` first")
    ds = load_dataset(cfg["dataset"], cfg.get("data_dir"))
    lh = load_models(rd, ["lh"])["lh"]
    lh_fp = model_fingerprints(rd, ["lh"])["lh"]
    W, b = lh.head.weight.numpy().astype(np.float64), lh.head.bias.numpy().astype(np.float64)
    f_test = load_npz(rd.path / "features.npz", "feature cache")["test"].astype(np.float64)
    y_test = ds.y_test
    base = float(((f_test @ W.T + b).argmax(1) == y_test).mean())
    rows = []
    t0 = time.perf_counter()
    for eps in eps_grid:
        path = set_path(rd.path, "fgsm", "lh", eps)
        if not path.is_file():
            raise CnnRepairError(f"{path}: no LH adversarial test set at eps {eps:g}; run `cnnrepair attack --out {run_dir}` first")
        saved = load_npz(path, "adversarial set")
        if len(saved["index"]) == 0:
            continue
        adv_set = AdversarialSet(eps, saved["index"], saved["delta"], len(y_test))
        true_adv = adv_set.adversarial((f_test @ W.T + b).argmax(1), y_test)  # clean errors are no adversaries
        f_adv = outputs(lh.features, adv_set.images(ds.x_test)[true_adv]).astype(np.float64)
        y_adv = y_test[adv_set.index[true_adv]]
        pool = repair_pool(rd, ds, lh, eps, candidates, "fgsm", cfg.get("seed", 0), lh_fingerprint=lh_fp)
        n = min(candidates, len(pool["index"]))
        for kind in ("clean", "label"):
            fixed, drawdown, columns = [], [], []
            for i in range(n):
                Y = targets(lh.head, pool["clean"][i:i + 1], ds.y_train[pool["index"][i:i + 1]], kind)
                res = repair(RepairProblem(W, b, pool["adv"][i:i + 1], Y), "highs")
                if not res.ok:
                    raise CnnRepairError(f"K = 1 program for candidate {i} at eps {eps:g} not solved ({res.status})")
                W2 = W + res.gamma
                fixed.append(100 * float(((f_adv @ W2.T + b).argmax(1) == y_adv).mean()))
                drawdown.append(100 * (base - float(((f_test @ W2.T + b).argmax(1) == y_test).mean())))
                columns.append(int((np.abs(res.gamma).max(0) > 1e-9).sum()))
            fixed_a, dd_a = np.array(fixed), np.array(drawdown)
            ok = dd_a <= budget
            rows.append({"eps": eps, "target": kind, "candidates": n, "unseen_adversaries": int(len(y_adv)),
                         "fixed_median": float(np.median(fixed_a)), "fixed_p90": float(np.percentile(fixed_a, 90)),
                         "fixed_max": float(fixed_a.max()), "within_budget": float(ok.mean()),
                         "fixed_max_within_budget": float(fixed_a[ok].max()) if ok.any() else None,
                         "drawdown_median": float(np.median(dd_a)), "columns_changed_max": int(max(columns))})
    result = {"machine": _machine(), "run": str(run_dir), "dataset": cfg["dataset"], "budget_points": budget,
              "command": f"python -m benchmarks.run k1 {run_dir} --candidates {candidates}", "seconds": time.perf_counter() - t0,
              "rows": rows}
    path = (out or RESULTS) / "k1_ceiling.json"
    write_json(path, result)
    return path


def table(result: dict) -> str:
    """The README table of one ``k1_ceiling.json``."""
    lines = ["| eps | target | candidates | unseen LH adversaries | fixed: median | 90th pct | best | best within budget | "
             "share within budget | columns changed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        best = "-" if r["fixed_max_within_budget"] is None else f"{r['fixed_max_within_budget']:.1f}"
        lines.append(f"| {r['eps']:g} | {r['target']} | {r['candidates']} | {r['unseen_adversaries']:,} | {r['fixed_median']:.1f} | "
                     f"{r['fixed_p90']:.1f} | {r['fixed_max']:.1f} | {best} | {100 * r['within_budget']:.0f}% | {r['columns_changed_max']} |")
    return "\n".join(lines)


def _section(k1: dict, link) -> list[str]:
    return [f"### One repair point: the ceiling ({k1['dataset']})", "",
            f"`{k1['command']}`: each of the first {max(r['candidates'] for r in k1['rows'])} adversarial training examples "
            f"of LH is tried as the single repair point (K = 1); the repaired head is scored on the unseen LH test "
            f"adversaries (fixed, %) and on clean test images (drawdown, budget {k1['budget_points']:g} points). "
            "The best candidate is chosen *on the test set*, so it bounds any rule that picks one point. "
            "Columns changed: the most feature columns of W any single-point repair touched.", "",
            table(k1), ""]


registry.section("k1_ceiling.json", order=40, render=_section)


@registry.command("k1", "ceiling of one-point repair: every candidate point tried, scored on the test set", order=50,
                  arguments=registry.arguments(
                      registry.arg("run", type=Path),
                      registry.arg("--candidates", type=int, default=200, help="adversarial training examples tried as the one point (default 200)"),
                      registry.arg("--budget", type=float, default=0.5, help="drawdown budget in points of clean accuracy (default 0.5)")))
def _cli(args):
    return run(args.run, args.candidates, args.budget)
