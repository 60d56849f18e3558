"""The targets program with tens of thousands of repair points: our interior point against HiGHS.

Problems are the paper's program at scale: the repair points are FGSM adversarial examples of the
first K training images (a seeded order), whatever the attack's outcome, their features X those
of LH's frozen feature map, their targets LH's decision values on the clean images, slack price 1,
every feature allowed to change. ``random`` problems (ReLU-like features of the same shapes, a
random head) stand in where no run directory exists (the GPU machine).

Paths, each solve in its own spawned process under a cap: ``ours`` (``repair(p, "ipm", threads=all
cores)``, the cheaper normal-equation side picked for each shape), ``highs`` (HiGHS dual simplex on each whole
class LP), and where CUDA is present ``ours (cuda)`` with the CPU figure of the same machine beside
it. Memory: the peak resident memory a solve added beyond its input (CPU) or the peak CUDA
allocation. A second table times one interior-point iteration's matrix (form + factor) on each
side, to show where the choice flips.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REAL = [("mnist", 2_000, 0.1), ("mnist", 10_000, 0.1), ("mnist", 60_000, 0.1), ("cifar10", 10_000, 0.01)]
QUICK = [("random", 600, 40), ("random", 300, 120)]

from benchmarks import registry


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def real_problem(run: Path, K: int, eps: float, seed: int = 0):
    """The paper's program on K FGSM examples of the run's training images (cached in the run, keyed)."""
    import torch

    from cnnrepair.attacks import attack
    from cnnrepair.data import load_dataset, to_float
    from cnnrepair.paper.hybrid import load_head
    from cnnrepair.io import load_npz, save_npz
    from cnnrepair.paper.pipeline import load_models
    from cnnrepair.repair import RepairProblem
    from cnnrepair.paper.rundir import RunDir
    from cnnrepair.paper.training import outputs, resolve_device

    rd = RunDir(run)
    cfg = rd.require()
    lh_file = run / "models" / "lh.pt"
    key = hashlib.sha256(lh_file.read_bytes() + (run / "models" / "nn.pt").read_bytes()
                         + f"|fgsm|{eps!r}|{K}|{seed}".encode()).hexdigest()[:16]
    cache = run / "bench" / f"large_k_fgsm_eps{eps:g}_K{K}.npz"
    arrays = load_npz(cache, "large-K problem") if cache.is_file() else None
    if arrays is None or str(arrays["key"]) != key:
        ds = load_dataset(cfg["dataset"], cfg.get("data_dir"))
        if len(ds.y_train) < K:
            raise SystemExit(f"{run}: {len(ds.y_train)} training images, fewer than K={K}")
        lh = load_models(rd, ["lh"], resolve_device(None))["lh"]
        take = np.random.default_rng(seed).permutation(len(ds.y_train))[:K]
        torch.manual_seed(seed)
        clean, adv = [], []
        t0 = time.perf_counter()
        for i in range(0, K, 5000):
            x = to_float(ds.x_train[take[i:i + 5000]])
            a, _ = attack(lh, x, ds.y_train[take[i:i + 5000]], eps, "fgsm")
            clean.append(outputs(lh.features, x))
            adv.append(outputs(lh.features, a))
            _log(f"  {run.name}: attacked {min(i + 5000, K)}/{K} training images ({time.perf_counter() - t0:.0f}s)")
        arrays = {"clean": np.concatenate(clean), "adv": np.concatenate(adv), "key": np.array(key)}
        save_npz(cache, **arrays)
    head = load_head(lh_file)
    W, b = head.weight.numpy(), head.bias.numpy()
    return RepairProblem(W, b, arrays["adv"], head.decision_values(arrays["clean"]))


def random_problem(K: int, d: int, seed: int = 0):
    """ReLU-like features (60% zeros) with targets a little off the head's own values."""
    from cnnrepair.repair import RepairProblem

    rng = np.random.default_rng(seed)
    X = np.maximum(rng.normal(size=(K, d)), 0) * (rng.random((K, d)) > 0.6)
    W = rng.normal(size=(10, d)) / np.sqrt(d)
    b = 0.1 * rng.normal(size=10)
    return RepairProblem(W, b, X, X @ W.T + b + 0.3 * rng.normal(size=(K, 10)))


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak resident size to the current one
    except OSError:
        pass


def _solve(p, arg):
    """One path; returns (objective, details); ``seconds`` covers the repair alone (CUDA warmed up first)."""
    import torch

    from cnnrepair.repair import repair

    solver, device, threads = arg
    if device == "cuda":  # the CUDA context and the solver libraries load before the clock starts
        torch.linalg.cholesky(torch.eye(4, dtype=torch.float64, device="cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak()
    before = _rss_mb()
    t0 = time.perf_counter()
    r = repair(p, solver, device=device, threads=threads)
    detail = {"seconds": time.perf_counter() - t0, "solver_status": r.status, "iterations": [c["rounds"] for c in r.per_class],
              "sides": sorted({c.get("side", "-") for c in r.per_class}), "extra_rss_mb": _rss_mb() - before}
    if device == "cuda":
        detail["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    if r.ok:
        gaps = [(c["objective"] - c["lower_bound"]) / max(c["objective"], 1e-300) for c in r.per_class if c.get("lower_bound") is not None]
        detail["worst_certified_gap"] = max(gaps) if gaps else None
    return (r.objective if r.ok else float("nan")), detail


def side_timing(shapes: list[tuple[int, int]], device: str = "cpu", repeats: int = 3) -> list[dict]:
    """Seconds to form and factor one iteration's matrix on each side, for ReLU-like X of each shape."""
    import torch

    from cnnrepair.repair.ipm import Newton, pick_side

    rows = []
    rng = np.random.default_rng(0)
    for K, m in shapes:
        X = torch.as_tensor(np.maximum(rng.normal(size=(K, m)), 0) * (rng.random((K, m)) > 0.6), device=device)
        P = [torch.as_tensor(rng.uniform(0.1, 2, n), device=device) for n in (m, m, K, K)]
        Z = [torch.as_tensor(rng.uniform(0.1, 2, n), device=device) for n in (m, m, K, K)]
        D = [x / z for x, z in zip(P, Z)]
        row = {"K": K, "features": m, "picked": pick_side(K, m), "device": device}
        for side in ("points", "features"):
            best = float("inf")
            for _ in range(repeats):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                Newton(X, side, P, Z, D, None, None)
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            row[f"{side}_s"] = best
        rows.append(row)
        _log(f"  side timing K={K} m={m}: points {row['points_s']:.3f}s, features {row['features_s']:.3f}s (picked {row['picked']})")
    return rows


def run(runs: dict[str, Path] | None = None, cap: float = 900.0, highs_cap: float = 600.0, quick: bool = False,
        random_sizes: list[tuple[int, int]] | None = None, out_name: str | None = None) -> Path:
    """Every problem with every path; HiGHS is not tried again on a larger problem once it timed out."""
    import torch

    from benchmarks.common import machine as _machine, write_result as _write
    from benchmarks.lp_scaling import timed

    problems = []
    if quick:
        problems = [(f"random K={K} d={d}", lambda K=K, d=d: random_problem(K, d)) for _, K, d in QUICK]
    else:
        for name, K, eps in REAL:
            if runs and name in runs:
                problems.append((f"{name} FGSM eps={eps:g} K={K}", lambda r=runs[name], K=K, e=eps: real_problem(r, K, e)))
        for K, d in random_sizes or []:
            problems.append((f"random K={K} d={d}", lambda K=K, d=d: random_problem(K, d)))
    import os

    cuda = torch.cuda.is_available()
    cores = os.cpu_count() or 1
    if cuda:
        paths = {"ours (cpu, all cores)": ("ipm", "cpu", cores), "ours (cuda)": ("ipm", "cuda", None)}
    else:  # HiGHS' dual simplex is single-threaded; ours gets every core (--threads / CNNREPAIR_THREADS)
        paths = {f"ours ({cores} threads)": ("ipm", "cpu", cores), "highs": ("highs", "cpu", None)}
    cmd = "python -m benchmarks.run large-k" + (" --quick" if quick else "") + (
        " " + " ".join(str(r) for r in runs.values()) if runs and not quick else "") + f" --cap {cap:g} --highs-cap {highs_cap:g}"
    if random_sizes:
        cmd += " --random " + ",".join(f"{K}x{d}" for K, d in random_sizes)

    def write(rows: list[dict], sides: list[dict], complete: bool) -> Path:
        """Written after every problem, so a run stopped early keeps what it measured."""
        out = {"machine": _machine(), "command": cmd, "cap_s": cap, "highs_cap_s": highs_cap, "complete": complete,
               "device": torch.cuda.get_device_name(0) if cuda else "cpu", "rows": rows, "side_timing": sides}
        if quick:
            import tempfile

            from cnnrepair.io import write_json

            path = Path(tempfile.mkdtemp(prefix="large-k-")) / "large_k_quick.json"
            write_json(path, out)
            return path
        return _write(out_name or ("large_k_gpu.json" if cuda else "large_k.json"), out)

    rows, highs_out = [], None  # (K, live features) of the problem HiGHS timed out on
    for label, make in problems:
        t0 = time.perf_counter()
        p = make()
        live = int((np.abs(p.X).max(0) > 0).sum())
        row = {"problem": label, "K": int(p.X.shape[0]), "features": int(p.X.shape[1]), "live_features": live,
               "classes": int(p.W.shape[0]), "build_s": time.perf_counter() - t0, "paths": {}}
        for name, arg in paths.items():
            if name == "highs" and highs_out is not None and row["K"] >= highs_out[0] and live >= highs_out[1]:
                row["paths"][name] = {"status": "skipped", "seconds": None, "objective": None,
                                      "reason": f"timed out at K={highs_out[0]:,}, {highs_out[1]:,} features"}
                continue
            res = timed(_solve, p, arg, highs_cap if name == "highs" else cap, start="spawn")
            if name == "highs" and res["status"] == "timeout":
                highs_out = (row["K"], live)
            row["paths"][name] = res
            _log(f"{label:34s} {name:22s} {res.get('status')} {res.get('seconds')}")
        done = [r for r in row["paths"].values() if r.get("objective") is not None]
        if len(done) > 1:
            objs = [r["objective"] for r in done]
            row["relative_difference"] = (max(objs) - min(objs)) / max(abs(min(objs)), 1e-300)
        rows.append(row)
        write(rows, [], False)
    shapes = [(2000, 800), (5000, 800), (10000, 800)] if not quick else [(200, 40), (40, 200)]
    return write(rows, side_timing(shapes, "cuda" if cuda else "cpu"), True)


def _cell(res: dict, base: float | None) -> str:
    if res["status"] == "timeout":
        return f"> {res['cap_s']:.0f} s (cap)" + (f", > x{res['cap_s'] / base:.1f}" if base else "")
    if res["status"] == "skipped":
        return f"skipped ({res['reason']})"
    if res["status"] != "ok":
        return res["status"]
    ratio = f" (x{res['seconds'] / base:.1f})" if base and res["seconds"] != base else ""
    return f"{res['seconds']:.1f} s{ratio}"


def table(result: dict) -> str:
    """Markdown: seconds per path with the ratio to ours (on CUDA where it ran), iterations, side, memory, agreement."""
    rows = result["rows"]
    paths = list(dict.fromkeys(p for r in rows for p in r["paths"]))
    base_name = "ours (cuda)" if "ours (cuda)" in paths else paths[0]
    paths = [base_name] + [p for p in paths if p != base_name]
    head = ["problem", "live features"] + paths + ["iterations (per class)", "side", "memory", "relative difference of optima"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        base = r["paths"][base_name]
        b = base["seconds"] if base["status"] == "ok" else None
        cells = [r["problem"], f"{r['live_features']:,}"] + [_cell(r["paths"][p], b) for p in paths]
        its = base.get("iterations") or []
        cells.append(f"{min(its)}-{max(its)}" if its else "-")
        cells.append(", ".join(base.get("sides", [])) or "-")
        if base.get("cuda_peak_mb") is not None:
            cells.append(f"{base['cuda_peak_mb']:,.0f} MB on the GPU")
        elif base.get("extra_rss_mb") is not None:
            cells.append(f"{base['extra_rss_mb']:,.0f} MB")
        else:
            cells.append("-")
        rel = r.get("relative_difference")
        cells.append(f"{rel:.0e}" if rel is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "One iteration's matrix, formed and factored (best of 3):", "",
              "| K x features | points side (K x K) | features side | picked |", "| --- | --- | --- | --- |"]
    for s in result["side_timing"]:
        lines.append(f"| {s['K']:,} x {s['features']:,} | {s['points_s']:.4f} s | {s['features_s']:.4f} s | {s['picked']} |")
    return "\n".join(lines)


registry.section("large_k.json", order=120, title=lambda d: "### The targets program with tens of thousands of repair points",
                 intro=lambda d: f"{registry.measured_on(d)}; each solve in its own process (ours capped at {d['cap_s']:g} s, HiGHS at "
                                 f"{d['highs_cap_s']:g} s; HiGHS is not tried again on a problem at least as large as one it "
                                 "timed out on). Times are ratios to ours; memory is what the solve added beyond its input.", table=table)
registry.section("large_k_gpu.json", order=130, title=lambda d: f"### The same solver on a GPU ({d['device']})",
                 intro=lambda d: f"{d['about']} Commands: `{d['rows'][0]['command']}` (first call) and `{d['command']}`; "
                                 "times are ratios to CUDA.", table=table)


@registry.command("large-k", "targets program with tens of thousands of points: our interior point against HiGHS", order=110,
                  arguments=registry.arguments(
                      registry.arg("runs", nargs="*", type=Path, help="finished run directories (named mnist / cifar10) whose LH gives real problems"),
                      registry.arg("--random", default="", help="extra random problems, e.g. 10000x800,60000x800 (K x features)"),
                      registry.arg("--quick", action="store_true", help="tiny random problems, written to a temporary folder (a smoke check)"),
                      registry.arg("--cap", type=float, default=900.0, help="seconds our solve may take on one problem (default 900)"),
                      registry.arg("--highs-cap", type=float, default=600.0, help="seconds HiGHS may take on one problem (default 600)")))
def _cli(args):
    from cnnrepair.errors import CnnRepairError

    runs = {}
    for r in args.runs:
        if r.name not in ("mnist", "cifar10") or not (r / "results.json").is_file():
            raise CnnRepairError(f"{r}: not a finished run directory named mnist or cifar10; give e.g. runs/mnist")
        runs[r.name] = r
    try:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.random.split(",") if s]
    except ValueError:
        raise CnnRepairError(f"--random {args.random!r}: give K x features pairs such as 10000x800,60000x800") from None
    return run(runs, args.cap, args.highs_cap, args.quick, sizes)
