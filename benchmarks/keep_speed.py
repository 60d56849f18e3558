"""Speed on the programs people run: keep-heavy margin programs from networks the benchmark trains (issue 24).

Networks, trained here (seeded, Adam, 3 epochs on the MNIST training set, as in the any-layer
benchmark): ``3x100`` = 784-100-100-10 and ``9x200`` = 784-200x8-10 (ERAN's shapes), ``256x2`` =
784-256-256-10 (VNN-COMP's mnist-net_256x2). Repair points: the first 100 fog test images
(``cnnrepair.corruptions.fog``, severity 5, seed 0: APRNN's task) for 3x100 and 9x200, the first 100
test images the network gets wrong for 256x2; keep points: 1,000 training images (a seeded draw)
the network gets right, hard, margin 0. Programs on the last layer (its features computed once):

* ``L1``: the default spec (margin 0.05);
* ``L-inf``: ``--norm linf``;
* ``PRDNN``: PRDNN's and APRNN's objective, mean|d| + max|d| with |d| <= 3 (``--norm l1+linf --max-change 3``).

Each program is solved by ours (:func:`cnnrepair.repair.solve_margins`, the default) and by HiGHS on
the whole LP (every row and entry written out), each in its own spawned process, one after the
other in the same run; the ratio is HiGHS's seconds over ours. Then the whole command, as a user
runs it in its own process: ``cnnrepair repair MODEL.onnx --points P.npz --keep K.npz --out DIR``
(L1), wall seconds from starting Python to the verified file (the second of two runs: the first
also compiles byte code; both are recorded).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from benchmarks import registry

NETWORKS = {"3x100": ((3, 100), "fog"), "256x2": ((3, 256), "misclassified"), "9x200": ((9, 200), "fog")}
CAP_S = 300.0  # seconds each solve may take in the committed table's run
PROGRAMS = {"L1": ("l1", None), "L-inf": ("linf", None), "PRDNN": ("l1+linf", 3.0)}


def _points(shape: str, ds, x_fog: torch.Tensor, order: np.ndarray, epochs: int, seed: int, repair: int, keep: int):
    """(model, repair inputs, their labels, keep inputs, keep labels, training seconds)."""
    from benchmarks.any_layer import mlp
    from benchmarks.common import fit
    from cnnrepair.data import to_float

    (depth, width), kind = NETWORKS[shape]
    torch.manual_seed(seed)
    model = mlp(depth, width)
    xtr, ytr = to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long)
    train_s = fit(model, xtr, ytr, epochs, seed)
    with torch.no_grad():
        if kind == "fog":
            xr, yr = x_fog[:repair], ds.y_test[:repair]
        else:
            xte = to_float(ds.x_test)
            wrong = np.flatnonzero(model(xte).argmax(1).numpy() != ds.y_test)[:repair]
            xr, yr = xte[wrong], ds.y_test[wrong]
        pool = xtr[order]
        right = np.flatnonzero(model(pool).argmax(1).numpy() == ds.y_train[order])[:keep]
    return model, xr, np.asarray(yr), pool[right], ds.y_train[order][right], train_s


def trained(data_dir: Path, shapes: tuple[str, ...] = tuple(NETWORKS), repair: int = 100, keep: int = 1000, epochs: int = 3,
            seed: int = 0):
    """For each network, trained here: (shape, model in eval mode, repair inputs, their labels, keep inputs, keep labels,
    training seconds), the task of this benchmark's table."""
    from cnnrepair.corruptions import fog
    from cnnrepair.data import load_dataset, to_float

    ds = load_dataset("mnist", data_dir)
    x_fog = to_float(fog(ds.x_test[:repair], severity=5, seed=seed))
    order = np.random.default_rng(seed).permutation(len(ds.y_train))[:3 * keep]
    for shape in shapes:
        model, xr, yr, xk, yk, train_s = _points(shape, ds, x_fog, order, epochs, seed, repair, keep)
        yield shape, model.eval(), xr, yr, xk, yk, train_s


def _problem(model, xr, yr, xk, yk, program: str, margin: float):
    from cnnrepair.repair import MarginProblem

    norm, bound = PROGRAMS[program]
    with torch.no_grad():
        F = model[:-1](torch.cat([xr, xk])).double().numpy()
    head = model[-1]
    labels = np.concatenate([yr, yk]).astype(np.int64)
    margins = np.concatenate([np.full(len(yr), margin), np.zeros(len(yk))])
    return MarginProblem(head.weight.detach().double().numpy(), head.bias.detach().double().numpy(), F, labels, margins,
                         None, norm, False, bound)


def _ours(p, _arg):
    from cnnrepair.repair import solve_margins

    s = solve_margins(p)
    if not s.ok:
        raise RuntimeError(s.status)
    return s.objective, {"seconds": s.seconds, "rounds": s.rounds, "rows": s.size.get("rows"),
                         "method": s.size.get("method", "row and column generation on HiGHS"), "gap": s.gap}


def _whole_lp(p, _arg):
    from benchmarks.margin_speed import full_lp_highs

    t0 = time.perf_counter()
    obj = full_lp_highs(p)
    return obj, {"seconds": time.perf_counter() - t0}


def _imports_seconds() -> float:
    """Wall seconds of starting Python and importing what an ONNX repair needs (cnnrepair's CLI, torch, onnx,
    onnxruntime), in a process of its own: the floor under any such command on this machine (the best of two)."""
    import subprocess
    import sys

    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import cnnrepair.cli, cnnrepair.repair.api, onnx, onnxruntime"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def _command(model, xr, yr, xk, work: Path) -> dict:
    """``cnnrepair repair`` on the network's ONNX file, in its own process: wall seconds and what the certificate says."""
    from benchmarks.common import run_cnnrepair

    src = work / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (xr[:1],), str(src), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    np.savez(work / "points.npz", x=xr.numpy().astype(np.float32), y=np.asarray(yr, np.int64))
    np.savez(work / "keep.npz", x=xk.numpy().astype(np.float32))
    walls = []
    for attempt in range(2):  # the first run also compiles Python's byte code and warms the file cache: the second is the one a user sees
        args = ["repair", str(src), "--points", str(work / "points.npz"), "--keep", str(work / "keep.npz"), "--out", str(work / f"fixed{attempt}")]
        wall, proc = run_cnnrepair(args)
        walls.append(wall)
        if proc.returncode != 0:
            return {"status": "failed", "wall_s": walls[-1], "error": proc.stderr.strip()[-300:]}
    cert = json.loads((work / "fixed1" / "certificate.json").read_text())
    return {"status": cert["status"], "wall_s": walls[-1], "first_wall_s": walls[0], "imports_s": _imports_seconds(),
            "solver_s": cert["solver"].get("seconds"),
            "method": cert["solver"].get("name"), "gap": cert["gap"],
            "command": "cnnrepair " + " ".join(a.replace(str(work), "WORK") for a in args)}


def run(data_dir: Path, shapes: tuple[str, ...] = tuple(NETWORKS), repair: int = 100, keep: int = 1000, margin: float = 0.05,
        epochs: int = 3, seed: int = 0, cap: float = CAP_S) -> Path:
    """Every (network, program): ours and HiGHS's whole LP side by side, then the whole command; keep_speed.json."""
    from benchmarks.common import compare, machine, write_result
    from benchmarks.lp_scaling import timed

    rows, commands = [], []
    for shape, model, xr, yr, xk, yk, train_s in trained(data_dir, shapes, repair, keep, epochs, seed):
        for program in PROGRAMS:
            p = _problem(model, xr, yr, xk, yk, program, margin)
            row = {"network": shape, "program": program, "points": len(yr), "keep": len(yk), "features": p.features.shape[1],
                   "full_rows": len(p.labels) * (p.num_classes - 1)}
            for solver, fn in (("ours", _ours), ("highs-lp", _whole_lp)):
                t0 = time.perf_counter()
                row[solver] = timed(fn, p, None, cap, start="spawn")
                row[solver]["wall_s"] = time.perf_counter() - t0
            compare(row, "highs-lp", "speedup")
            rows.append(row)
            print(f"{shape} {program}: ours {row['ours'].get('seconds')} s, HiGHS whole LP {row['highs-lp'].get('seconds')} s", flush=True)
        with tempfile.TemporaryDirectory(prefix="cnnrepair-keep-speed-") as tmp:
            commands.append({"network": shape, "train_seconds": train_s, **_command(model, xr, yr, xk, Path(tmp))})
        print(f"{shape}: cnnrepair repair {commands[-1]['wall_s']:.1f} s ({commands[-1]['status']})", flush=True)
    cmd = f"python -m benchmarks.run keep-speed --data-dir {data_dir} --cap {cap:g}" + (
        "" if tuple(shapes) == tuple(NETWORKS) else f" --shapes {','.join(shapes)}")
    return write_result(result_name(shapes, cap), {
        "machine": machine(), "command": cmd, "cap_s": cap,
        "task": {"repair": repair, "keep": keep, "margin": margin, "epochs": epochs, "seed": seed,
                 "programs": {k: {"norm": v[0], "max_change": v[1]} for k, v in PROGRAMS.items()}},
        "rows": rows, "commands": commands})


def result_name(shapes: tuple[str, ...] = tuple(NETWORKS), cap: float = CAP_S) -> str:
    """The results file of a run: one on some of the networks or under another cap gets a file of its own instead of
    replacing the whole table."""
    parts = ([] if tuple(shapes) == tuple(NETWORKS) else ["_".join(shapes)]) + ([] if cap == CAP_S else [f"cap{cap:g}"])
    return "_".join(["keep_speed", *parts]) + ".json"


def table(d: dict) -> str:
    """Markdown: seconds of ours and of HiGHS on the whole LP per (network, program), the ratio, agreement."""
    out = ["| network | features | program | ours (s) | rows ours kept | HiGHS, whole LP (s) | HiGHS / ours | optima agree |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    from benchmarks.margin_speed import seconds_cell as cell

    for r in d["rows"]:
        ratio = f"{r['speedup']:.0f}x" if "speedup" in r else "-"
        agree = f"{r['relative_difference']:.0e}" if "relative_difference" in r else "-"
        kept = f"{r['ours']['rows']:,} of {r['full_rows']:,}" if r["ours"].get("rows") else "-"
        out.append(f"| {r['network']} | {r['features']} | {r['program']} | {cell(r['ours'])} | {kept} | {cell(r['highs-lp'])} | {ratio} | {agree} |")
    out += ["", "| network | `cnnrepair repair` (s, wall; first run) | starting Python + imports (s) | its solve (s) | status | certified gap |",
            "| --- | --- | --- | --- | --- | --- |"]
    for c in d["commands"]:
        solver = f"{c['solver_s']:.2f}" if c.get("solver_s") is not None else "-"
        gap = f"{c['gap']:.0e}" if c.get("gap") is not None else "-"
        first = f"; {c['first_wall_s']:.1f}" if c.get("first_wall_s") is not None else ""
        imports = f"{c['imports_s']:.1f}" if c.get("imports_s") is not None else "-"
        out.append(f"| {c['network']} | {c['wall_s']:.1f}{first} | {imports} | {solver} | {c['status']} | {gap} |")
    return "\n".join(out)


def headline(d: dict) -> list[str]:
    t = d["task"]
    rows = {(r["network"], r["program"]): r for r in d["rows"]}

    def cell(net: str, prog: str) -> str:
        r = rows.get((net, prog))
        if r is None or r["ours"]["status"] != "ok":
            return "-"
        other = r["highs-lp"]
        h = f"{other['seconds']:.1f}" if other["status"] == "ok" else f"> {other['cap_s']:g}"
        return f"{r['ours']['seconds']:.2f} s (HiGHS {h} s)"

    nets = list(dict.fromkeys(r["network"] for r in d["rows"]))
    out = [f"**Keep-heavy repairs** ({t['repair']} repair + {t['keep']:,} keep points on networks the benchmark trains; "
           f"`{d['command']}`, {d['machine']['cores']} cores): in the solver, against HiGHS on the whole LP in the same run:", "",
           "| network | L1 | PRDNN's mean + max, bound 3 | whole `cnnrepair repair` (L1) |", "| --- | --- | --- | --- |"]
    cmds = {c["network"]: c for c in d["commands"]}

    def whole(c: dict) -> str:
        return f"{c['wall_s']:.1f} s" + (f" ({c['imports_s']:.1f} s of it starting Python and importing)" if c.get("imports_s") else "")

    for net in nets:
        c = cmds.get(net)
        out.append(f"| {net} | {cell(net, 'L1')} | {cell(net, 'PRDNN')} | {whole(c)} |" if c else f"| {net} | {cell(net, 'L1')} | {cell(net, 'PRDNN')} | - |")
    return out + [""]


def _intro(d: dict) -> str:
    t = d["task"]
    return (f"Networks trained here (3 epochs, seed {t['seed']}); {t['repair']} repair points (fog test images, "
            f"or misclassified ones for 256x2), {t['keep']:,} keep points (training images the network gets right, hard, margin 0), "
            f"margin {t['margin']:g}; each solve in its own process under a {d['cap_s']:g} s cap; {registry.measured_on(d)}. "
            "The whole command includes starting Python, loading the ONNX file, the features, the solve, saving and the "
            "saved file's check in onnxruntime.")


registry.section("keep_speed*.json", order=95, title=lambda d: "### Keep-heavy repairs on the benchmark's own networks",
                 intro=_intro, table=table, headline=headline)


@registry.command("keep-speed", "keep-heavy margin programs from trained MLPs (3x100, 256x2, 9x200): ours against HiGHS on the whole LP", order=82,
                  arguments=registry.arguments(
                      registry.MNIST_DIR,
                      registry.arg("--shapes", default=",".join(NETWORKS), help="comma-separated networks (3x100,256x2,9x200)"),
                      registry.arg("--cap", type=float, default=CAP_S, help=f"seconds each solve may take (default {CAP_S:g})")))
def _cli(args):
    return run(args.data_dir, registry.names(args.shapes, NETWORKS, "network"), cap=args.cap)
