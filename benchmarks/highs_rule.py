"""Which HiGHS algorithm the margin program's HiGHS path runs: dual simplex against HiGHS's interior point, side by side.

The HiGHS path (:func:`cnnrepair.repair.solve_margins` with ``method="highs"``, and what the structured interior
point hands over to when it cannot certify an answer, as on an infeasible program) generates rows and entries
round after round. :func:`cnnrepair.repair.margins.highs_algorithm` picks one algorithm for every round from the
number of points short at the start. Here each program is solved both ways in the same run, each solve in its own
spawned process under a cap, so the rule can be read off the table:

* keep-heavy programs of the keep-speed benchmark's networks (``benchmarks.keep_speed``: 3x100, 256x2 and 9x200
  MLPs trained here, 100 repair + 1,000 keep points; L1 and PRDNN's mean + max with bound 3);
* random programs of the margin speed benchmark (``benchmarks.margin_speed.problem``): 100 and 1,000 repair
  points, no keep points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import registry

ALGORITHMS = ("simplex", "ipm")
RANDOM = [(100, 800, "L1"), (100, 800, "PRDNN"), (1000, 512, "L1")]
QUICK = [(20, 64, "L1"), (20, 64, "PRDNN")]
CAP_S = 150.0


def _solve(p, algorithm: str):
    import cnnrepair.repair.margins as margins

    margins._IPM_POINTS = 0 if algorithm == "ipm" else np.iinfo(np.int64).max  # this algorithm in every round
    s = margins.solve_margins(p, method="highs")
    if not s.ok:
        raise RuntimeError(s.status)
    return s.objective, {"seconds": s.seconds, "rounds": s.rounds, "rows": s.size.get("rows"), "entries": s.size.get("entries"),
                         "algorithm": s.size.get("highs_algorithm")}


def _programs(data_dir: Path | None, quick: bool):
    """(name, problem) pairs: the trained networks' keep-heavy programs (not in a quick run), then the random ones."""
    from benchmarks.keep_speed import PROGRAMS
    from benchmarks.margin_speed import problem

    if not quick:
        from benchmarks.keep_speed import _problem, trained

        for shape, model, xr, yr, xk, yk, _ in trained(data_dir):
            for program in ("L1", "PRDNN"):
                yield f"{shape}, {len(yr)} repair + {len(yk):,} keep points", program, _problem(model, xr, yr, xk, yk, program, 0.05)
    for K, n, program in QUICK if quick else RANDOM:
        norm, bound = PROGRAMS[program]
        yield f"random, {K:,} repair points on {n} features", program, problem(K, n, 0, norm, bound)


def run(data_dir: Path | None = None, quick: bool = False, cap: float = CAP_S) -> Path:
    """Every program with each algorithm in every round; highs_rule.json (a quick run: random programs only, elsewhere)."""
    from benchmarks.common import machine, write_result
    from benchmarks.lp_scaling import timed
    from benchmarks.margin_speed import write_quick
    from cnnrepair.repair.margins import highs_algorithm

    rows = []
    for name, program, p in _programs(data_dir, quick):
        short = int((p.row_shortfall().max(1) > 0).sum())
        row = {"problem": name, "program": program, "points": len(p.labels), "short_at_start": short,
               "features": int(p.features.shape[1]), "rule": highs_algorithm(short)}
        for algorithm in ALGORITHMS:
            row[algorithm] = timed(_solve, p, algorithm, cap, start="spawn")
        a, b = row["simplex"], row["ipm"]
        if a["status"] == b["status"] == "ok":
            row["ipm_over_simplex"] = b["seconds"] / a["seconds"]
            row["relative_difference"] = abs(a["objective"] - b["objective"]) / max(abs(a["objective"]), 1e-300)
        rows.append(row)
        print(f"{name} {program}: simplex {a.get('seconds')} s, interior point {b.get('seconds')} s (rule: {row['rule']})", flush=True)
    command = "python -m benchmarks.run highs-rule" + (" --quick" if quick else f" --data-dir {data_dir}") + f" --cap {cap:g}"
    out = {"machine": machine(), "command": command, "cap_s": cap, "quick": quick, "rows": rows}
    return write_quick(out, "highs_rule_quick.json") if quick else write_result("highs_rule.json", out)


def table(d: dict) -> str:
    """Markdown: seconds with dual simplex and with HiGHS's interior point in every round, their ratio, the rule's pick."""
    from benchmarks.margin_speed import seconds_cell

    out = ["| problem | program | points short at the start | dual simplex (s) | HiGHS interior point (s) | interior point / simplex | "
           "the rule takes | optima agree |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        ratio = f"{r['ipm_over_simplex']:.1f}x" if "ipm_over_simplex" in r else "-"
        agree = f"{r['relative_difference']:.0e}" if "relative_difference" in r else "-"
        pick = "interior point" if r["rule"] == "ipm" else "dual simplex"
        out.append(f"| {r['problem']} | {r['program']} | {r['short_at_start']:,} | {seconds_cell(r['simplex'])} | "
                   f"{seconds_cell(r['ipm'])} | {ratio} | {pick} | {agree} |")
    return "\n".join(out)


def _intro(d: dict) -> str:
    from cnnrepair.repair.margins import _IPM_POINTS

    return (f"The margin program's HiGHS path (`solve_margins(method=\"highs\")`, and the hand-over when the structured "
            f"interior point cannot certify an answer), with one algorithm in every round of its row and entry generation; "
            f"each solve in its own process under a {d['cap_s']:g} s cap; {registry.measured_on(d)}. The rule "
            f"(`cnnrepair.repair.margins.highs_algorithm`) takes HiGHS's interior point from {_IPM_POINTS} points short at the "
            "start on, dual simplex (warm-started round after round) below. Keep-heavy programs: the keep-speed benchmark's "
            "networks and points; random: the margin speed benchmark's problems.")


registry.section("highs_rule.json", order=96, title=lambda d: "### The HiGHS path: dual simplex or HiGHS's interior point",
                 intro=_intro, table=table)


@registry.command("highs-rule", "the margin program's HiGHS path with dual simplex and with HiGHS's interior point, side by side", order=83,
                  arguments=registry.arguments(
                      registry.MNIST_DIR,
                      registry.arg("--quick", action="store_true", help="small random programs only (a smoke test)"),
                      registry.arg("--cap", type=float, default=CAP_S, help=f"seconds each solve may take (default {CAP_S:g})")))
def _cli(args):
    return run(args.data_dir, args.quick, args.cap)
