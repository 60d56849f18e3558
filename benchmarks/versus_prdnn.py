"""PRDNN itself against our solver on PRDNN's own program, side by side, on the sizes Gurobi's free licence accepts.

PRDNN (PLDI'21; pip ``prdnn`` 1.0) repairs a layer by one Gurobi LP: mean|change| + max|change|,
every change within +-3, each repair point's label ahead of every other class by 0.05. Its pip
package runs only with ``pysyrenn`` 1.1, the pure-Python protobuf runtime, ``np.float`` put back
and gurobipy, whose size-limited licence stops at 2,000 variables or constraints: PRDNN's LP has
2 C (n+1) + 1 variables and 9 K + 4 C (n+1) constraints for C = 10 classes, so only small last
layers fit. PRDNN therefore runs in its own interpreter (``--python``), on
:mod:`benchmarks.versus_prdnn_worker`; ours solves the same program (``l1+linf``, ``max_change`` 3, margin
0.05) on the same float32 numbers, and HiGHS the whole LP, in this process, one after another.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SIZES = [(30, 16), (60, 24), (100, 24), (50, 32), (75, 32), (40, 40), (100, 64)]  # (K, features); the last one is over the licence's limits
QUICK = [(10, 8)]
MARGIN, BOUND = 0.05, 3.0

from benchmarks import registry


def fits_licence(K: int, n: int, C: int = 10) -> bool:
    """Whether PRDNN's LP for this size stays within gurobipy's size-limited licence (2,000 variables and constraints)."""
    E = C * (n + 1)
    return 2 * E + 1 <= 2000 and 9 * K + 4 * E <= 2000


def _problem(K: int, n: int):
    """The margin benchmark's problem, rounded to float32 (PRDNN computes in float32)."""
    from benchmarks.margin_speed import problem
    from cnnrepair.repair import MarginProblem

    p = problem(K, n, 0, "l1+linf", BOUND)
    W, b, F = (np.asarray(a, np.float32).astype(np.float64) for a in (p.weight, p.bias, p.features))
    return MarginProblem(W, b, F, p.labels, np.full(K, MARGIN), None, "l1+linf", False, BOUND)


def _prdnn(python: str, p, cap: float) -> dict:
    """PRDNN in its own interpreter on problem p; its change evaluated on our side."""
    from cnnrepair.repair import margins_of

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.json"
        np.savez(src, weight=p.weight, bias=p.bias, features=p.features, labels=p.labels)
        env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([python, str(ROOT / "versus_prdnn_worker.py"), str(src), str(dst)], env=env,
                                  capture_output=True, text=True, timeout=cap)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "cap_s": cap}
        if proc.returncode != 0 or not dst.exists():
            return {"status": "error", "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        out = json.loads(dst.read_text())
    out["wall_s"] = time.perf_counter() - t0
    if "delta_weight" in out:
        dW, db = np.asarray(out.pop("delta_weight")), np.asarray(out.pop("delta_bias"))
        out["objective"] = p.change_cost(dW, db)
        out["smallest_margin"] = float(margins_of(p.logits(dW, db), p.labels).min())
        out["largest_change"] = float(np.abs(np.concatenate([dW.ravel(), db])).max())
    return out


def _ours(p) -> dict:
    from cnnrepair.repair import solve_margins, margins_of

    t0 = time.perf_counter()
    s = solve_margins(p)
    seconds = time.perf_counter() - t0
    out = {"status": s.status, "seconds": seconds, "gap": s.gap}
    if s.ok:
        out.update(objective=s.objective, lower_bound=s.lower_bound,
                   smallest_margin=float(margins_of(p.logits(s.delta_weight, s.delta_bias), p.labels).min()))
    return out


def _highs(p) -> dict:
    from benchmarks.margin_speed import full_lp_highs

    t0 = time.perf_counter()
    try:
        obj = full_lp_highs(p)
    except RuntimeError as exc:
        return {"status": str(exc), "seconds": time.perf_counter() - t0}
    return {"status": "ok", "objective": obj, "seconds": time.perf_counter() - t0}


def run(python: str, quick: bool = False, cap: float = 300.0) -> Path:
    """Every size: PRDNN (its own interpreter), ours and HiGHS on the whole LP; objectives compared."""
    from benchmarks.common import compare, machine, write_result
    from benchmarks.margin_speed import write_quick

    rows = []
    for K, n in QUICK if quick else SIZES:
        p = _problem(K, n)
        row = {"K": K, "features": n, "variables": 2 * p.num_entries + 1, "constraints": 9 * K + 4 * p.num_entries,
               "fits_licence": fits_licence(K, n),
               "prdnn": _prdnn(python, p, cap), "ours": _ours(p), "highs-lp": _highs(p)}
        compare(row, "prdnn", "prdnn_over_ours_seconds")
        rows.append(row)
        print(f"K={K} n={n}: prdnn {row['prdnn']['status']} {row['prdnn'].get('seconds')}, ours {row['ours']['status']} "
              f"{row['ours']['seconds']:.3f}, highs {row['highs-lp']['status']} {row['highs-lp']['seconds']:.3f}", flush=True)
    versions = next((r["prdnn"]["versions"] for r in rows if "versions" in r["prdnn"]), {})
    out = {"machine": machine(), "prdnn_versions": versions, "cap_s": cap, "quick": quick,
           "command": "python -m benchmarks.run prdnn --python PRDNN_PYTHON" + (" --quick" if quick else ""),
           "program": f"PRDNN's: mean|d| + max|d| over weights and biases, |d| <= {BOUND:g}, margin {MARGIN:g}; "
                      "features max(0, N(0,1)), head N(0, 1/n), points labelled with their runner-up class, float32",
           "rows": rows}
    return write_quick(out, "prdnn_quick.json") if quick else write_result("prdnn.json", out)


def table(rows: list[dict]) -> str:
    """Markdown: seconds of PRDNN (Gurobi), ours and HiGHS on the whole LP, and how the optima agree."""
    out = ["| K | features | LP size (vars / cons) | PRDNN + Gurobi (s) | of which Gurobi (s) | ours (s) | HiGHS, whole LP (s) | PRDNN / ours | optima agree |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        pr = r["prdnn"]
        prs = f"{pr['seconds']:.2f}" if pr.get("status") == "ok" else ("refused (licence size limit)" if not r["fits_licence"] else pr.get("status", "-"))
        gur = f"{pr['timing']['solver']:.2f}" if pr.get("timing") else "-"
        ratio = f"{r['prdnn_over_ours_seconds']:.1f}x" if "prdnn_over_ours_seconds" in r else "-"
        agree = f"{r['relative_difference']:.0e}" if "relative_difference" in r else "-"
        out.append(f"| {r['K']} | {r['features']} | {r['variables']:,} / {r['constraints']:,} | {prs} | {gur} | "
                   f"{r['ours']['seconds']:.2f} | {r['highs-lp']['seconds']:.2f} | {ratio} | {agree} |")
    return "\n".join(out)


registry.section("prdnn.json", order=110, title=lambda d: "### PRDNN itself (Gurobi) against our solver, on PRDNN's program",
                 intro=lambda d: f"`{d['command']}` on {d['machine']['cores']} CPU cores, {d['machine']['measured']}; PRDNN "
                                 f"{d['prdnn_versions'].get('prdnn', '?')} with pysyrenn {d['prdnn_versions'].get('pysyrenn', '?')} "
                                 f"and gurobipy {d['prdnn_versions'].get('gurobipy', '?')} (size-limited licence: 2,000 variables "
                                 f"or constraints) in its own interpreter. {d['program']}. PRDNN's time is its whole `compute()` "
                                 "(Jacobian, model, Gurobi); \"optima agree\" compares the cost of PRDNN's change with our "
                                 "certified optimum.", table=lambda d: table(d["rows"]))


@registry.command("prdnn", "PRDNN itself (Gurobi) against our solver on PRDNN's program, where its licence allows", order=100,
                  arguments=registry.arguments(
                      registry.arg("--python", required=True, help="an interpreter with prdnn 1.0, pysyrenn 1.1 and gurobipy installed"),
                      registry.arg("--quick", action="store_true", help="one tiny size, written to a temporary folder (a smoke check)"),
                      registry.arg("--cap", type=float, default=300.0, help="seconds PRDNN may take per size (default 300)")))
def _cli(args):
    return run(args.python, quick=args.quick, cap=args.cap)
