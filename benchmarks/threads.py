"""BLAS/OpenMP threads for the repair LP: one against two, on an idle machine and beside a busy process.

Each solve runs in its own freshly started process under a cap (``benchmarks.lp_scaling.timed``;
spawned, since a forked child of a process whose OpenMP pool is up can hang), after torch has
started its own thread pool as it has in the pipeline. "busy" starts a second process that multiplies
NumPy matrices with its default threads for the whole measurement, as a concurrent job on a shared
machine does. Both thread counts solve the same problems in the same run, so their ratio is what to
read.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

from benchmarks import registry


def _solve(p, threads: int):
    import torch

    from cnnrepair.repair import repair

    torch.ones(500, 500) @ torch.ones(500, 500)  # torch's pool is up, as after training or attacks
    r = repair(p, threads=threads)
    return r.objective if r.ok else float("nan")


def _busy(stop) -> None:
    import numpy as np

    a = np.random.default_rng(0).random((1500, 1500))
    while not stop.is_set():
        a = a @ a
        a /= abs(a).max()


def run(sizes: tuple[int, ...] = (400, 1000), d: int = 800, cap: float = 120.0) -> Path:
    """Time threads=1 and threads=2 on random repair LPs, idle and beside a busy process."""
    from benchmarks.lp_scaling import random_problem, timed
    from benchmarks.common import RESULTS, machine as _machine, write_result as _write

    rows = []
    for load in ("idle", "busy"):
        ctx = mp.get_context("spawn")
        stop, hog = ctx.Event(), None
        if load == "busy":
            hog = ctx.Process(target=_busy, args=(stop,), daemon=True)
            hog.start()
            time.sleep(1.0)
        try:
            for K in sizes:
                p = random_problem(d, K)
                for threads in (1, 2):
                    rows.append({"load": load, "K": K, "d": d, "threads": threads, **timed(_solve, p, threads, cap, "spawn")})
        finally:
            stop.set()
            if hog is not None:
                hog.join(10)
                if hog.is_alive():
                    hog.kill()
    _write("threads.json", {"machine": _machine(), "command": f"python -m benchmarks.run threads --cap {cap:g}",
                            "cap_s": cap, "rows": rows})
    return RESULTS / "threads.json"


def table(res: dict) -> str:
    """Markdown: seconds per (load, K) for 1 and 2 threads, and their ratio."""
    lines = ["| machine | K x d | 1 thread | 2 threads | 2 threads / 1 thread |", "| --- | --- | --- | --- | --- |"]
    rows = res["rows"]
    for load in ("idle", "busy"):
        for K in sorted({r["K"] for r in rows}):
            one = next(r for r in rows if (r["load"], r["K"], r["threads"]) == (load, K, 1))
            two = next(r for r in rows if (r["load"], r["K"], r["threads"]) == (load, K, 2))

            def cell(r: dict) -> str:
                return f"{r['seconds']:.2f} s" if r["seconds"] is not None else f"> {res['cap_s']:g} s (cap)"

            ratio = (f"x{two['seconds'] / one['seconds']:.2f}" if one["seconds"] and two["seconds"] is not None
                     else f"> x{res['cap_s'] / one['seconds']:.0f}" if one["seconds"] else "-")
            lines.append(f"| {load} | {K} x {one['d']} | {cell(one)} | {cell(two)} | {ratio} |")
    return "\n".join(lines)


registry.section("threads.json", order=70, title=lambda d: "### Threads for the repair LP (random ReLU-like features, 10 classes)",
                 intro=lambda d: f"{registry.measured_on(d)}; \"busy\": a second process multiplies NumPy matrices with its default "
                                 "threads meanwhile. The default is one thread.", table=table)


@registry.command("threads", "LP time with 1 and 2 BLAS threads, idle and beside a busy process", order=60,
                  arguments=registry.arguments(registry.arg("--cap", type=float, default=120.0, help="seconds a solve may take (default 120)")))
def _cli(args):
    return run(cap=args.cap)
