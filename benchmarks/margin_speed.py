"""Speed of the pointwise (margin) repair program: our solver against HiGHS on the whole LP, side by side.

Problems: 10 classes, ReLU-like random features (max(0, N(0,1))), a random head, and repair points
labelled with their runner-up class (an adversarial example's true class is usually the runner-up),
margin 0.05; keep points hold their current label (margin 0). Three programs on each:

* ``ours``: :func:`cnnrepair.repair.solve_margins`, L1 (the default spec);
* ``highs-lp``: the same L1 program written out in full (every row, every entry) for HiGHS;
* ``prdnn``: PRDNN's program (mean|d| + max|d|, |d| <= 3, margin 0.05) in full for HiGHS, and the
  same program through ``ours`` (``--norm l1+linf --max-change 3``).

Each solve runs in its own spawned process under a cap; a program that timed out is not tried on
larger sizes. Objectives of the same program are compared (relative difference) where both finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

SIZES = [(100, 800, 0), (1000, 512, 0), (1000, 800, 0), (1000, 800, 2000), (1000, 800, 5000), (1000, 800, 10000), (1000, 4096, 0)]
QUICK = [(20, 64, 0), (40, 64, 40)]

from benchmarks import registry


def problem(K: int, n: int, keep: int, norm: str = "l1", max_change: float | None = None, seed: int = 0):
    from cnnrepair.repair import MarginProblem

    rng = np.random.default_rng(seed)
    C = 10
    W = rng.normal(size=(C, n)) / np.sqrt(n)
    b = 0.1 * rng.normal(size=C)
    F = np.maximum(rng.normal(size=(K + keep, n)), 0.0)
    L = F @ W.T + b
    labels = L.argmax(1)
    labels[:K] = np.argsort(-L[:K], 1)[:, 1]
    margins = np.concatenate([np.full(K, 0.05), np.zeros(keep)])
    return MarginProblem(W, b, F, labels, margins, None, norm, False, max_change)


def full_lp_highs(p, time_limit: float | None = None) -> float:
    """The whole program (all N(C-1) margin rows, all entries) handed to HiGHS; returns the optimum."""
    from cnnrepair.repair.program import margin_rows
    from cnnrepair.repair.highs import highs_status, new_highs, pass_lp, run as run_highs

    A, rhs = margin_rows(p, np.arange(len(p.labels)))
    m = len(rhs)
    C = p.num_classes
    nc = A.shape[1] // C
    a, b = p.norm_coefficients()
    E = C * nc
    blocks = [A, -A]
    cost = [np.full(2 * E, a)]
    row_lo, row_hi = [rhs], [np.full(m, np.inf)]
    if b > 0:  # d+ + d- - t <= 0
        blocks.append(sp.csc_matrix((m, 1)))
        I = sp.identity(E, format="csc")
        lin = sp.hstack([I, I, -sp.csc_matrix(np.ones((E, 1)))], format="csc")
        A_all = sp.vstack([sp.hstack(blocks, format="csc"), lin], format="csc")
        cost.append([b])
        row_lo.append(np.full(E, -np.inf))
        row_hi.append(np.zeros(E))
    else:
        A_all = sp.hstack(blocks, format="csc")
    c = np.concatenate(cost)
    upper = np.full(A_all.shape[1], np.inf)
    if p.max_change is not None:
        upper[:2 * E] = p.max_change
    h = new_highs(time_limit, "simplex")
    pass_lp(h, c, A_all, upper, np.concatenate(row_lo), np.concatenate(row_hi))
    run_highs(h)
    if highs_status(h) != "optimal":
        raise RuntimeError(highs_status(h))
    return float(h.getInfo().objective_function_value)


def _ours(p, device: str | None = None):
    from cnnrepair.repair import solve_margins

    s = solve_margins(p, device=device)
    if not s.ok:
        raise RuntimeError(s.status)
    return s.objective


def _full(p, _arg):
    return full_lp_highs(p)


def _ours_threads(p, threads: int):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        return _ours(p, None)


THREAD_SIZES = [(1000, 512, 0), (1000, 800, 2000)]


def run_device(cap: float = 300.0, quick: bool = False, device: str = "cuda") -> Path:
    """Our solve with the normal matrix on the CPU and on ``device`` (CUDA), side by side on the speed table's
    programs, each solve in its own process; the ratio CPU / device and both machines recorded."""
    import torch

    from benchmarks.common import machine, write_result
    from benchmarks.lp_scaling import timed
    from cnnrepair.errors import CnnRepairError
    from cnnrepair.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type != "cuda":
        raise CnnRepairError(f"margin-device compares the CPU with a CUDA device, and {device!r} is not one; run it where a GPU is")
    rows = []
    for K, n, keep in QUICK if quick else SIZES:
        for program, norm, bound in (("l1", "l1", None), ("prdnn", "l1+linf", 3.0)):
            p = problem(K, n, keep, norm, bound)
            row = {"K": K, "features": n, "keep": keep, "program": program,
                   "cpu": timed(_ours, p, None, cap, start="spawn"), "cuda": timed(_ours, p, str(dev), cap, start="spawn")}
            if row["cpu"]["status"] == row["cuda"]["status"] == "ok":
                row["cpu_over_cuda"] = row["cpu"]["seconds"] / row["cuda"]["seconds"]
                row["relative_difference"] = abs(row["cpu"]["objective"] - row["cuda"]["objective"]) / abs(row["cpu"]["objective"])
            rows.append(row)
            print(f"K={K} n={n} keep={keep} {program}: cpu {row['cpu']['status']} {row['cpu'].get('seconds')}, "
                  f"cuda {row['cuda']['status']} {row['cuda'].get('seconds')}", flush=True)
    out = {"machine": machine(), "device": f"{dev} ({torch.cuda.get_device_name(dev)})", "cap_s": cap, "quick": quick,
           "command": "python -m benchmarks.run margin-device" + (" --quick" if quick else "") + f" --cap {cap:g}",
           "problems": "the speed table's problems", "rows": rows}
    return write_quick(out, "margin_device_quick.json") if quick else write_result("margin_device.json", out)


def seconds_cell(r: dict) -> str:
    """A timed solve's table cell: its seconds, "> cap (cap)" for a timeout, else its status."""
    if r["status"] == "ok":
        return f"{r['seconds']:.2f}"
    if r["status"] == "timeout":
        return f"> {r['cap_s']:g} (cap)"
    return r["status"]


def _program_name(row: dict) -> str:
    return "L1" if row["program"] == "l1" else "PRDNN's (mean + max, bound 3)"


def device_table(rows: list[dict]) -> str:
    """Markdown: seconds on the CPU and on CUDA, the ratio, and whether the optima agree."""
    out = ["| K | features | keep | program | CPU (s) | CUDA (s) | CPU / CUDA | optima agree |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ratio = f"{r['cpu_over_cuda']:.1f}x" if "cpu_over_cuda" in r else "-"
        agree = f"{r['relative_difference']:.0e}" if "relative_difference" in r else "-"
        out.append(f"| {r['K']:,} | {r['features']:,} | {r['keep']:,} | {_program_name(r)} | {seconds_cell(r['cpu'])} | "
                   f"{seconds_cell(r['cuda'])} | {ratio} | {agree} |")
    return "\n".join(out)


def run_threads(cap: float = 300.0, quick: bool = False) -> Path:
    """Our L1 solve with one BLAS thread (what ``cnnrepair repair`` and ``repair_classifier`` use unless told
    otherwise) and with two, on the same problems in the same run, each in its own process."""
    from benchmarks.common import machine, write_result
    from benchmarks.lp_scaling import timed

    rows = []
    for K, n, keep in QUICK if quick else THREAD_SIZES:
        p = problem(K, n, keep)
        row = {"K": K, "features": n, "keep": keep}
        for threads in (1, 2):
            row[f"threads_{threads}"] = timed(_ours_threads, p, threads, cap, start="spawn")
        rows.append(row)
        print(f"K={K} n={n} keep={keep}: 1 thread {row['threads_1'].get('seconds')}, 2 threads {row['threads_2'].get('seconds')}", flush=True)
    out = {"machine": machine(), "cap_s": cap, "quick": quick,
           "command": "python -m benchmarks.run margin-threads" + (" --quick" if quick else "") + f" --cap {cap:g}",
           "problems": "the speed table's problems (L1)", "rows": rows}
    return write_quick(out, "margin_threads_quick.json") if quick else write_result("margin_threads.json", out)


def threads_table(rows: list[dict]) -> str:
    """Markdown: seconds with one and two BLAS threads, and their ratio."""
    out = ["| K | features | keep | 1 thread (s) | 2 threads (s) | 1 / 2 |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        one, two = r["threads_1"], r["threads_2"]
        cell = (lambda x: f"{x['seconds']:.2f}" if x["status"] == "ok" else x["status"])
        ratio = f"{one['seconds'] / two['seconds']:.2f}x" if one["status"] == two["status"] == "ok" else "-"
        out.append(f"| {r['K']:,} | {r['features']:,} | {r['keep']:,} | {cell(one)} | {cell(two)} | {ratio} |")
    return "\n".join(out)


def run(quick: bool = False, cap: float = 300.0) -> Path:
    """Every program on every size, each solve in its own process under ``cap`` seconds."""
    from benchmarks.lp_scaling import timed
    from benchmarks.common import compare, machine as _machine, write_result as _write

    sizes = QUICK if quick else SIZES
    rows = []
    gave_up: set[str] = set()
    for K, n, keep in sizes:
        for program, norm, bound in (("l1", "l1", None), ("prdnn", "l1+linf", 3.0)):
            p = problem(K, n, keep, norm, bound)
            row = {"K": K, "features": n, "keep": keep, "program": program}
            for solver, fn in (("ours", _ours), ("highs-lp", _full)):
                key = f"{program}/{solver}/{keep > 0}"
                if key in gave_up:
                    row[solver] = {"status": "skipped", "seconds": None, "objective": None, "note": "timed out on a smaller size"}
                    continue
                t0 = time.perf_counter()
                row[solver] = timed(fn, p, None, cap, start="spawn")
                row[solver]["wall_s"] = time.perf_counter() - t0
                if row[solver]["status"] == "timeout":
                    gave_up.add(key)
            compare(row, "highs-lp", "speedup")
            rows.append(row)
            print(f"K={K} n={n} keep={keep} {program}: ours {row['ours']['status']} {row['ours'].get('seconds')}, "
                  f"highs-lp {row['highs-lp']['status']} {row['highs-lp'].get('seconds')}", flush=True)
    out = {"machine": _machine(), "cap_s": cap, "quick": quick,
           "command": "python -m benchmarks.run margins" + (" --quick" if quick else "") + f" --cap {cap:g}",
           "problems": "10 classes, features max(0, N(0,1)), head N(0, 1/n), repair points labelled with their runner-up class, margin 0.05; keep points keep their label",
           "rows": rows}
    return write_quick(out) if quick else _write("margin_speed.json", out)


def write_quick(out: dict, name: str = "margin_speed_quick.json") -> Path:
    """Quick runs are for tests and smoke checks: they never replace the committed table."""
    import tempfile

    from cnnrepair.io import write_json

    path = Path(tempfile.mkdtemp(prefix="cnnrepair-bench-")) / name
    write_json(path, out)
    return path


def table(rows: list[dict]) -> str:
    """Markdown: seconds per program and solver, the ratio, and whether the optima agree."""
    out = ["| K | features | keep | program | ours (s) | HiGHS, whole LP (s) | HiGHS / ours | optima agree |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    for row in rows:
        agree = f"{row['relative_difference']:.0e}" if "relative_difference" in row else "-"
        ratio = f"{row['speedup']:.1f}x" if "speedup" in row else (
            f"> {row['highs-lp']['cap_s'] / row['ours']['seconds']:.0f}x" if row["highs-lp"]["status"] == "timeout" and row["ours"]["status"] == "ok" else "-")
        out.append(f"| {row['K']:,} | {row['features']:,} | {row['keep']:,} | {_program_name(row)} | {seconds_cell(row['ours'])} | "
                   f"{seconds_cell(row['highs-lp'])} | {ratio} | {agree} |")
    return "\n".join(out)


registry.section("margin_speed.json", order=90, title=lambda d: "### Pointwise repair: our solver against HiGHS on the whole program",
                 intro=lambda d: f"{registry.measured_on(d)}; each solve in its own process under a {d['cap_s']:g} s cap (a program "
                                 f"that timed out is not tried on larger sizes). {d['problems']}.", table=lambda d: table(d["rows"]))
registry.section("margin_threads.json", order=100, title=lambda d: "### Pointwise repair with one and two BLAS threads",
                 intro=lambda d: f"{registry.measured_on(d)}; {d['problems']}, each solve in its own process; `cnnrepair repair` and "
                                 "`repair_classifier` use one thread unless `--threads` / `threads=` / `CNNREPAIR_THREADS` "
                                 "say otherwise.", table=lambda d: threads_table(d["rows"]))

registry.section("margin_device.json", order=105, title=lambda d: "### Pointwise repair on the CPU and on CUDA",
                 intro=lambda d: f"{registry.measured_on(d)}, CUDA device {d['device']}; {d['problems']}, each solve in its own "
                                 "process; `--device` (`SolveOptions(device=)`) moves the interior point's normal matrix there.",
                 table=lambda d: device_table(d["rows"]))

_QUICK = registry.arg("--quick", action="store_true", help="tiny sizes, written to a temporary folder (a smoke check)")
_CAP = registry.arg("--cap", type=float, default=300.0, help="seconds each solve may take (default 300)")


@registry.command("margins", "pointwise repair program: our solver against HiGHS on the whole LP", order=80,
                  arguments=registry.arguments(_QUICK, _CAP))
def _cli(args):
    return run(quick=args.quick, cap=args.cap)


@registry.command("margin-threads", "pointwise repair program with one and two BLAS threads (the CLI's default is one)", order=90,
                  arguments=registry.arguments(_QUICK, _CAP))
def _cli_threads(args):
    return run_threads(cap=args.cap, quick=args.quick)


@registry.command("margin-device", "pointwise repair program with its normal matrix on the CPU and on CUDA, side by side (needs a GPU)",
                  order=95, arguments=registry.arguments(_QUICK, _CAP))
def _cli_device(args):
    return run_device(cap=args.cap, quick=args.quick)
