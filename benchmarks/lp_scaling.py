"""Repair-LP scaling: our solver paths against cvxopt (the paper's) and one generic cvxpy model.

Each problem is solved by every path in the same run, each in a child process under a time cap
(a path that exceeds it is recorded as ``timeout``, not left out); the table reports wall time,
objective, agreement with our default's objective and the ratio of each time to our default's.
Problems: random ReLU-like features (60% zeros) and, where run directories exist, real features
(adversarial training examples of LH and LH's own weights).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent

from benchmarks import registry


def random_problem(d: int, K: int, k: int = 10, seed: int = 0):
    from cnnrepair.repair import RepairProblem

    rng = np.random.default_rng(seed)
    X = np.maximum(rng.normal(size=(K, d)), 0) * (rng.random((K, d)) > 0.6)
    W = rng.normal(size=(k, d)) * 0.05
    return RepairProblem(W, rng.normal(size=k), X, X @ W.T + rng.normal(size=(K, k)))


def _largest_pool(run: Path) -> tuple[Path, int, float] | None:
    """The run's largest FGSM repair pool: (path, number of points, eps), or None if it has none."""
    sizes = {p: int(np.load(p)["index"].size) for p in (run / "repair").glob("pool_fgsm_eps*.npz")}
    if not sizes:
        return None
    path = max(sizes, key=sizes.get)
    return path, sizes[path], float(path.stem.split("eps")[-1])


def grow_pool(run: Path, K: int) -> None:
    """Make sure the run's largest repair pool holds K points: attack more training images if not.

    The pool is grown at the eps of the largest existing pool (else the run's largest attack eps),
    with the run's seed, exactly as ``cnnrepair repair-sweep`` would grow it.
    """
    from cnnrepair.attacks import PAPER_EPS
    from cnnrepair.data import load_dataset
    from cnnrepair.paper.experiment import repair_pool
    from cnnrepair.paper.pipeline import load_models
    from cnnrepair.paper.rundir import RunDir

    largest = _largest_pool(run)
    if largest is not None and largest[1] >= K:
        return
    rd = RunDir(run)
    cfg = rd.require()
    if largest is not None:
        eps = largest[2]
    else:
        grid = rd.results.get("attack", {}).get("fgsm", {}).get("eps")
        eps = max(grid or PAPER_EPS.get(cfg["dataset"], PAPER_EPS["mnist"]))
    repair_pool(rd, load_dataset(cfg["dataset"], cfg.get("data_dir")), load_models(rd, ["lh"])["lh"], eps, K, "fgsm", cfg["seed"])


def real_problem(run: Path, K: int):
    """LH of a run with its largest repair pool's adversarial features as X and clean decision values as Y.

    Returns (problem, eps of the pool) or None when no pool holds K points.
    """
    from cnnrepair.paper.hybrid import load_head
    from cnnrepair.repair import RepairProblem

    largest = _largest_pool(run)
    if largest is None or largest[1] < K:
        return None
    path, _, eps = largest
    pool = np.load(path)
    head = load_head(run / "models" / "lh.pt")
    W, b = head.weight.numpy(), head.bias.numpy()
    return RepairProblem(W, b, pool["adv"][:K], head.decision_values(pool["clean"][:K])), eps


def _solve_ours(p, solver):
    from cnnrepair.repair import repair

    r = repair(p, solver)
    return r.objective if r.ok else float("nan")


def _solve_cvxpy(p, solver):
    import cvxpy as cp

    k, d = p.W.shape
    gamma = cp.Variable((k, d))
    delta = cp.Variable((p.X.shape[0], k), nonneg=True)
    resid = p.X @ (p.W + gamma).T + p.b[None] - p.Y
    prob = cp.Problem(cp.Minimize(cp.sum(cp.abs(gamma)) + cp.sum(delta)), [resid <= delta, -resid <= delta])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an inaccurate solve is reported as not solved, below
        prob.solve(solver=solver)
    return float(prob.value) if prob.status == "optimal" else float("nan")


DEFAULT = "ours (auto)"
PATHS = {
    DEFAULT: (_solve_ours, "auto"),
    "ours (highs)": (_solve_ours, "highs"),
    "ours (highs-cg)": (_solve_ours, "highs-cg"),
    "cvxopt (paper)": (_solve_ours, "cvxopt"),
    "cvxpy+clarabel": (_solve_cvxpy, "CLARABEL"),
    "cvxpy+highs": (_solve_cvxpy, "HIGHS"),
}


def _child(conn, fn, problem, arg):
    t0 = time.perf_counter()
    try:
        out = fn(problem, arg)
        obj, detail = out if isinstance(out, tuple) else (out, {})
        conn.send(("ok" if np.isfinite(obj) else "not_optimal", obj, time.perf_counter() - t0, detail))
    except Exception as exc:  # recorded in the table, never hidden
        conn.send(("error", f"{type(exc).__name__}: {str(exc)[:100]}", time.perf_counter() - t0, {}))


def timed(fn, problem, arg, cap: float, start: str = "fork") -> dict:
    """``fn(problem, arg)`` in a child process (``start``: fork or spawn) under a cap of ``cap`` seconds.

    ``fn`` returns the objective, or (objective, details): details are merged into the record, and a
    ``seconds`` among them (what the solve itself took, set-up excluded) replaces the wall time.
    """
    ctx = mp.get_context(start)
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, fn, problem, arg))
    proc.start()
    if parent.poll(cap):
        status, value, seconds, detail = parent.recv()
        proc.join()
        return {"status": status, "objective": value if status == "ok" else None, "seconds": seconds,
                **({"error": value} if status == "error" else {}), **detail}
    proc.kill()
    proc.join()
    return {"status": "timeout", "objective": None, "seconds": None, "cap_s": cap}


def run(quick: bool = False, runs: dict[str, Path] | None = None, cap: float = 120.0) -> Path:
    """Every path on every problem; a path that timed out is skipped (and recorded so) on larger K."""
    from benchmarks.common import machine as _machine, write_result as _write

    ks = [1, 10, 100] if quick else [1, 10, 100, 1000, 2000]
    problems = [(f"random d={d}", random_problem(d, K)) for d in (800, 4096) for K in ks]
    for name, run_dir in (runs or {}).items():
        grow_pool(run_dir, max(ks))
        for K in ks:
            found = real_problem(run_dir, K)
            if found is not None:
                problems.append((f"{name} real eps={found[1]:g} d={found[0].W.shape[1]}", found[0]))
    rows = []
    timed_out: dict[tuple[str, str], int] = {}
    for family, p in problems:
        K = int(p.X.shape[0])
        label = f"{family} K={K}"
        row = {"problem": label, "d": int(p.W.shape[1]), "K": K, "classes": int(p.W.shape[0]), "paths": {}}
        for path, (fn, arg) in PATHS.items():
            if (family, path) in timed_out:
                res = {"status": "skipped", "objective": None, "seconds": None, "cap_s": cap,
                       "reason": f"timed out at K={timed_out[family, path]}"}
            else:
                res = timed(fn, p, arg, cap)
                if res["status"] == "timeout":
                    timed_out[family, path] = K
            row["paths"][path] = res
            print(f"{label:40s} {path:18s} {res}", file=sys.stderr, flush=True)
        base = row["paths"][DEFAULT]
        for res in row["paths"].values():
            if res["seconds"] is not None and base["seconds"]:
                res["ratio_to_ours"] = res["seconds"] / base["seconds"]
            if res["objective"] is not None and base["objective"] is not None:
                res["rel_diff_objective"] = abs(res["objective"] - base["objective"]) / max(1.0, abs(base["objective"]))
        rows.append(row)
    table = rows_table(rows)
    cmd = "python -m benchmarks.run lp" + (" --quick" if quick else "") + f" --cap {cap:g}" + (" --real " + " ".join(str(p) for p in runs.values()) if runs else "")
    return _write("lp_scaling.json", {"machine": _machine(), "command": cmd, "cap_s": cap, "rows": rows, "table_md": table})


def rows_table(rows: list[dict]) -> str:
    paths = list(dict.fromkeys(p for r in rows for p in r["paths"]))  # as measured, in order
    head = "| problem | " + " | ".join(paths) + " |"
    lines = [head, "|" + " --- |" * (len(paths) + 1)]
    for r in rows:
        cells = []
        base = r["paths"].get(DEFAULT, {}).get("seconds")
        for pth in paths:
            res = r["paths"].get(pth, {"status": "missing"})
            if res["status"] == "missing":
                cells.append("-")
            elif res["status"] == "timeout":
                cells.append(f"> {res['cap_s']:.0f} s (cap" + (f", > x{res['cap_s'] / base:.0f})" if base else ")"))
            elif res["status"] == "skipped":
                cells.append(f"skipped ({res['reason']})")
            elif res["status"] == "error":
                cells.append("error")
            elif res["status"] == "not_optimal":
                cells.append(f"{res['seconds']:.2f} s, not solved")
            else:
                ratio = res.get("ratio_to_ours")
                agree = res.get("rel_diff_objective")
                cells.append(f"{res['seconds']:.2f} s" + (f" (x{ratio:.1f})" if ratio and pth != DEFAULT else "")
                             + (" DIFFERS" if agree is not None and agree > 1e-6 else ""))
        lines.append(f"| {r['problem']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nTimes are wall seconds for all 10 classes; (xN) is the ratio to our default; every finished path "
                               "reached our default's objective to 1e-6 relative unless marked DIFFERS; \"not solved\": the solver "
                               "stopped short of an optimal status (cvxopt: iteration limit or singular KKT system; Clarabel: "
                               "inaccurate); a path that hit the cap is skipped on larger K of the same problem.")


registry.section("lp_scaling.json", order=80, title=lambda d: "### Repair LP scaling (10 classes; random ReLU-like and real repair-pool features)",
                 intro=lambda d: f"{registry.measured_on(d)}; each path runs in its own process under a {d['cap_s']:g} s cap. "
                                 "`ours (auto)` is the default `repair()` path.",
                 table=lambda d: rows_table(d["rows"]))  # regenerated, so table changes apply to old runs too


@registry.command("lp", "repair-LP scaling benchmark", order=150, arguments=registry.arguments(
    registry.arg("--quick", action="store_true", help="small sizes only (K up to 100)"),
    registry.arg("--cap", type=float, default=120.0, help="seconds each solver path may take on one problem (default 120)"),
    registry.arg("--real", nargs="*", type=Path, default=[], help="run directories whose LH and repair pools give real problems")))
def _cli(args):
    return run(quick=args.quick, runs={p.name: p for p in args.real}, cap=args.cap)
