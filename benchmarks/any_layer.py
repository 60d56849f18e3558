"""Repair of a layer inside the network against the last layer, on APRNN's task (issue 23).

Task (APRNN, PLDI'23, and PRDNN before it): MNIST MLPs of the field's shapes, trained here (seeded,
Adam, a few CPU minutes): ``3x100`` = 784-100-100-10, ``9x100`` = 784-100x8-10, ``9x200`` =
784-200x8-10 (``NxW``: N linear layers, the N-1 hidden ones W wide, ReLU), the shapes of ERAN's
networks. The MNIST test set corrupted with fog (``cnnrepair.corruptions.fog``, severity 5, seed 0):
the first 100 fog images are the repair set, the other 9,900 measure generalisation, the clean test
set measures drawdown. For each network: the last layer and the two linear layers before it (never
the input layer, 784 inputs wide), each without and with 1,000 keep points (clean training images the network classifies correctly, hard,
margin 0), and a layer inside the network also with the later layers' biases free (APRNN's choice).
Spec: pointwise, L1, margin 0.05; a layer inside the network keeps every repair point's activation
pattern, and a keep point's when the change would cost it its margin (``cnnrepair.repair.hidden``).

* efficacy: accuracy on the 100 repair images after repair (100% by construction);
* drawdown: clean test accuracy lost (points);
* generalisation: accuracy gained on the 9,900 held-out fog images (points).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from benchmarks import registry

if TYPE_CHECKING:
    from cnnrepair import RepairSpec, SolveOptions

SHAPES = {"3x100": (3, 100), "9x100": (9, 100), "9x200": (9, 200)}
KEEP_IMAGES = 1000  # keep points in the whole table's runs with keep points


def mlp(depth: int, width: int) -> nn.Sequential:
    """``depth`` linear layers, the hidden ones ``width`` wide, ReLU between them (flatten first)."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = 784
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, 10))
    return nn.Sequential(*layers)


def train(shape: str, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> tuple[nn.Sequential, float]:
    """A seeded MLP of ``shape`` trained with Adam (lr 1e-3, batch 128); (model, seconds)."""
    from benchmarks.common import fit

    depth, width = SHAPES[shape]
    torch.manual_seed(seed)
    model = mlp(depth, width)
    return model, fit(model, x, y, epochs, seed)


def fog_task(data_dir: Path, keep_images: int, seed: int):
    """(dataset, training images as floats, their labels as a tensor, the fog test images, the fog seconds, the order the
    keep candidates are drawn in): what every case of the task shares."""
    from cnnrepair.corruptions import fog
    from cnnrepair.data import load_dataset, to_float

    ds = load_dataset("mnist", data_dir)
    xtr, ytr = to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long)
    t0 = time.perf_counter()
    x_fog = to_float(fog(ds.x_test, severity=5, seed=seed))
    fog_s = time.perf_counter() - t0
    order = np.random.default_rng(seed).permutation(len(ds.y_train))[:3 * keep_images]
    return ds, xtr, ytr, x_fog, fog_s, order


def keep_set(model: nn.Module, xtr: torch.Tensor, labels: np.ndarray, order: np.ndarray, keep_images: int):
    """The first ``keep_images`` training images of ``order`` that ``model`` classifies correctly, with their labels."""
    with torch.no_grad():
        ok = model(xtr[order]).argmax(1).numpy() == labels[order]
    return xtr[order][ok][:keep_images], labels[order][ok][:keep_images]


@dataclass(frozen=True)
class Sets:
    """What every case of a network is measured on: the repair points, the held-out images whose accuracy is the
    generalisation, the clean test set (drawdown), the keep points, and the network's accuracies before repair."""

    xr: torch.Tensor
    yr: np.ndarray
    xg: torch.Tensor
    yg: np.ndarray
    x_clean: torch.Tensor
    y_clean: np.ndarray
    xk: torch.Tensor
    yk: np.ndarray
    before: dict


@dataclass(frozen=True)
class Case:
    """One row of a table: which network and layer (and where it sits), with the keep points or not, later biases free or not."""

    network: str
    layer: str
    where: str
    keep: bool
    later: bool


def repair_case(model: nn.Module, case: Case, sets: Sets, spec: RepairSpec, options: SolveOptions) -> dict:
    """Repair ``case.layer`` of ``model`` on the repair points (with the keep points when ``case.keep``), timed, and the case's
    row (status, seconds, LP size, and when repaired efficacy, drawdown, generalisation and the change); prints one line."""
    from cnnrepair import repair_classifier
    from cnnrepair.runtime import accuracy

    network, layer, where, keep, later = case.network, case.layer, case.where, case.keep, case.later
    t1 = time.perf_counter()
    r = repair_classifier(model, sets.xr, sets.yr, spec, layer=layer, keep=(sets.xk, sets.yk) if keep else None,
                          options=options)
    seconds = time.perf_counter() - t1
    nkeep = int(len(sets.yk)) if keep else 0
    row = {"network": network, "layer": layer, "position": where, "keep_points": nkeep, "later_biases": later, "status": r.status,
           "seconds": seconds, "notes": list(r.notes)}
    solver = r.certificate.solver if r.certificate is not None else {}
    row["lp"] = {k: solver.get(k) for k in ("rows", "columns", "pattern_rows", "pattern_bounds", "rounds", "weights")}
    if r.ok:
        after = {"repair": accuracy(r.model, sets.xr, sets.yr), "generalisation": accuracy(r.model, sets.xg, sets.yg),
                 "clean": accuracy(r.model, sets.x_clean, sets.y_clean)}
        c = r.certificate
        extra = c.later_biases or {"l1": 0.0, "linf": 0.0}
        before = sets.before
        row.update(after=after, efficacy=after["repair"], drawdown=100 * (before["clean"] - after["clean"]),
                   generalisation=100 * (after["generalisation"] - before["generalisation"]),
                   l1=c.change["l1"] + extra["l1"], linf=max(c.change["linf"], extra["linf"]), nonzero=c.change["nonzero"], gap=c.gap)
    print(f"  {layer} ({where}) keep={nkeep}{' later biases' if later else ''}: {r.status} in {seconds:.1f}s" + (
        f", efficacy {100 * row['efficacy']:.0f}%, drawdown {row['drawdown']:.2f}, generalisation {row['generalisation']:+.2f}, "
        f"L1 {row['l1']:.3g}" if r.ok else f" ({'; '.join(r.notes)[:120]})"), flush=True)
    return row


def run(data_dir: Path, shapes: tuple[str, ...] = tuple(SHAPES), repair_images: int = 100, keep_images: int = KEEP_IMAGES,
        margin: float = 0.05, epochs: int = 3, seed: int = 0, time_limit: float = 600.0, norm: str = "l1") -> Path:
    """Every (network, layer, keep) case; writes benchmarks/results/any_layer.json (``any_layer_<norm>.json`` for a norm
    other than L1)."""
    from benchmarks.common import machine, write_result
    from cnnrepair import RepairSpec, SolveOptions
    from cnnrepair.data import to_float
    from cnnrepair.runtime import accuracy

    options = SolveOptions(time_limit=time_limit)  # checked before the data loads and any network trains
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds, xtr, ytr, x_fog, fog_s, order = fog_task(data_dir, keep_images, seed)
    x_clean, y_test = to_float(ds.x_test), ds.y_test
    xr, yr = x_fog[:repair_images], y_test[:repair_images]
    xg, yg = x_fog[repair_images:], y_test[repair_images:]
    nets, rows = {}, []
    for shape in shapes:
        model, train_s = train(shape, xtr, ytr, epochs, seed)
        before = {"repair": accuracy(model, xr, yr), "generalisation": accuracy(model, xg, yg), "clean": accuracy(model, x_clean, y_test)}
        nets[shape] = {"train_seconds": train_s, "epochs": epochs, "accuracy": before}
        print(f"{shape}: trained in {train_s:.0f}s, clean {100 * before['clean']:.2f}%, fog {100 * before['generalisation']:.2f}%", flush=True)
        xk, yk = keep_set(model, xtr, ds.y_train, order, keep_images)
        linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        cases = [(layer, keep, later) for layer in reversed(linear[1:][-3:])  # the last layer and the two before it (not the input)
                 for later in ((False,) if layer == linear[-1] else (False, True)) for keep in (False, True)]
        sets = Sets(xr, yr, xg, yg, x_clean, y_test, xk, yk, before)
        for layer, keep, later in cases:
            where = "last" if layer == linear[-1] else f"hidden ({len(linear) - 1 - linear.index(layer)} before the last)"
            rows.append(repair_case(model, Case(shape, layer, where, keep, later), sets,
                                    RepairSpec(margin=margin, later_biases=later, norm=norm), options))
    command = f"python -m benchmarks.run any-layer --data-dir {data_dir} --time-limit {time_limit:g}" + "".join(
        f" {option} {value}" for option, value, _ in _variant(norm, shapes, keep_images))
    out = {"machine": machine(), "command": command,
           "task": {"corruption": "fog", "severity": 5, "seed": seed, "repair_images": repair_images,
                    "generalisation_images": int(len(yg)), "keep_images": keep_images, "margin": margin, "spec": "pointwise",
                    "norm": norm, "time_limit": time_limit, "fog_seconds": fog_s, "training": f"Adam lr 1e-3, batch 128, {epochs} epochs, seed {seed}"},
           "networks": nets,
           "peers": {"APRNN (PLDI'23), 9x200, as reported": {"drawdown": 1.38, "generalisation": 24.7, "seconds": 455,
                                                             "machine": "Gurobi, 32 cores"},
                     "PRDNN (PLDI'21), 9x200, as reported": {"drawdown": 3.92, "generalisation": 6.55}},
           "rows": rows}
    return write_result(result_name(norm, shapes, keep_images), out)


def _variant(norm: str, shapes: tuple[str, ...], keep_images: int) -> list[tuple[str, str, str]]:
    """The settings of a run that differ from the whole L1 table's: (option, its value on the command line, its part of
    the results file's name), so that the command and the file name always name the same settings."""
    out = []
    if norm != "l1":
        out.append(("--norm", norm, norm.replace("+", "_")))
    if tuple(shapes) != tuple(SHAPES):
        out.append(("--shapes", ",".join(shapes), "_".join(shapes)))
    if keep_images != KEEP_IMAGES:
        out.append(("--keep", str(keep_images), f"keep{keep_images}"))
    return out


def result_name(norm: str, shapes: tuple[str, ...] = tuple(SHAPES), keep_images: int = KEEP_IMAGES) -> str:
    """The results file of a run: a run in another norm, on some of the networks (for example with a longer time limit)
    or with another number of keep points gets a file of its own instead of replacing the whole table."""
    return "_".join(["any_layer"] + [part for _, _, part in _variant(norm, shapes, keep_images)]) + ".json"


def _norm_words(d: dict) -> str:
    norm = d["task"].get("norm", "l1")
    return {"l1": "L1", "linf": "L-infinity", "l1+linf": "mean + max |change|, APRNN's and PRDNN's objective"}[norm]


def status_word(row: dict) -> str:
    """A row's status as its tables print it: ``time limit`` where the solver stopped there, else the status."""
    return "time limit" if any("time_limit" in n for n in row.get("notes", [])) else row["status"]


def table(d: dict) -> str:
    """Markdown: per network, layer and keep set, the field's three measures, the change, seconds and LP size."""
    held = d["task"].get("held_out", "fog")
    out = [f"| network (clean / {held} acc.) | layer | later biases | keep | status | efficacy | drawdown (points) | generalisation (points) | L1 | L-inf | s | LP rows (pattern) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        acc = d["networks"][r["network"]]["accuracy"]
        net = f"{r['network']} ({100 * acc['clean']:.1f} / {100 * acc['generalisation']:.1f})"
        lp = r["lp"]
        bounds = f", {lp['pattern_bounds']:,} as bounds" if lp.get("pattern_bounds") else ""
        size = f"{lp['rows']:,} ({lp['pattern_rows']:,}{bounds})" if lp.get("rows") is not None and lp.get("pattern_rows") is not None else (
            f"{lp['rows']:,}" if lp.get("rows") is not None else "-")
        lb = "free" if r.get("later_biases") else "kept"
        if r["status"] != "repaired":
            out.append(f"| {net} | {r['layer']} ({r['position']}) | {lb} | {r['keep_points']:,} | {status_word(r)} | - | - | - | - | - | {r['seconds']:.1f} | {size} |")
            continue
        out.append(f"| {net} | {r['layer']} ({r['position']}) | {lb} | {r['keep_points']:,} | repaired | {100 * r['efficacy']:.0f}% | "
                   f"{r['drawdown']:.2f} | {r['generalisation']:+.2f} | {r['l1']:.3g} | {r['linf']:.3g} | {r['seconds']:.1f} | {size} |")
    if "peers" not in d:
        return "\n".join(out)
    a = d["peers"]["APRNN (PLDI'23), 9x200, as reported"]
    p = d["peers"]["PRDNN (PLDI'21), 9x200, as reported"]
    out += ["", f"For scale (their own 9x200 network and fog set, not rerun here): APRNN reports {a['drawdown']}% drawdown for "
                f"{a['generalisation']}% generalisation in {a['seconds']} s ({a['machine']}); PRDNN {p['drawdown']}% / {p['generalisation']}%."]
    return "\n".join(out)


def headline(d: dict) -> list[str]:
    """README lines: per network, with 1,000 keep points, the last layer against the best hidden-layer repair (the L1
    table's; the other norms' tables are in docs/results.md only)."""
    if d["task"].get("norm", "l1") != "l1":
        return []
    out = ["**Repair of a layer inside the network** (APRNN's MNIST fog task, networks trained by the benchmark; "
           f"100 fog repair points, {d['task']['keep_images']:,} keep points, minimal {_norm_words(d)}; `{d['command']}`, "
           f"{d['machine']['cores']} cores):", "",
           "| network | last layer: drawdown / generalisation / s | hidden layer with the least drawdown: drawdown / generalisation / s |",
           "| --- | --- | --- |"]
    for net in d["networks"]:
        rows = [r for r in d["rows"] if r["network"] == net and r["keep_points"]]
        last = next((r for r in rows if r["position"] == "last"), None)
        hidden = [r for r in rows if r["position"] != "last" and r["status"] == "repaired"]
        best = min(hidden, key=lambda r: r["drawdown"], default=None)

        def cell(r):
            return "-" if r is None or r["status"] != "repaired" else f"{r['drawdown']:.2f} / {r['generalisation']:+.2f} / {r['seconds']:.0f}"

        stopped = [r for r in rows if r["position"] != "last" and r["status"] == "failed"]
        none = f"none within {d['task']['time_limit']:g} s" if stopped else "none repaired"
        hid = none if best is None else f"{best['layer']}, later biases {'free' if best['later_biases'] else 'kept'}, {cell(best)}"
        out.append(f"| {net} | {cell(last)} | {hid} |")
    a = d["peers"]["APRNN (PLDI'23), 9x200, as reported"]
    out += ["", f"Drawdown and generalisation in points of clean and held-out fog accuracy; APRNN reports {a['drawdown']} / "
                f"{a['generalisation']} in {a['seconds']} s on its own 9x200 network and fog set ({a['machine']}).", ""]
    return out


def _intro(d: dict) -> str:
    t = d["task"]
    return (f"`{d['command']}`: networks trained here ({t['training']}); fog severity {t['severity']} on the MNIST test set "
            f"(seed {t['seed']}); repair the first {t['repair_images']} fog images (pointwise, minimal {_norm_words(d)}, margin {t['margin']:g}), "
            f"generalisation on the other {t['generalisation_images']:,}, drawdown on the clean test set; keep points: "
            f"{t['keep_images']:,} clean training images the network gets right; a hidden layer's repair keeps every repair "
            "point's ReLU pattern and a keep point's when the change would cost it its margin; later biases free: the biases "
            f"of the layers after it may move too; time limit {t['time_limit']:g} s per repair; {d['machine']['cores']} cores, "
            f"{d['machine']['measured']}.")


def _title(d: dict) -> str:
    norm = d["task"].get("norm", "l1")
    nets = "" if tuple(d["networks"]) == tuple(SHAPES) else ", " + ", ".join(d["networks"]) + f", time limit {d['task']['time_limit']:g} s"
    keep = d["task"].get("keep_images", KEEP_IMAGES)
    return ("### Repair of a layer inside the network (APRNN's MNIST fog task" + ("" if norm == "l1" else f", norm {norm}") + nets
            + ("" if keep == KEEP_IMAGES else f", {keep:,} keep points") + ")")


registry.section("any_layer*.json", order=175, title=_title,
                 intro=_intro, table=table, headline=headline)


@registry.command("any-layer", "last-layer against hidden-layer repair on MNIST MLPs (3x100, 9x100, 9x200) with fog", order=75,
                  arguments=registry.arguments(
                      registry.MNIST_DIR,
                      registry.arg("--shapes", default=",".join(SHAPES), help="comma-separated network shapes (3x100,9x100,9x200)"),
                      registry.arg("--time-limit", type=float, default=600.0, help="seconds per repair"),
                      registry.arg("--keep", type=int, default=KEEP_IMAGES, help="keep points in the runs with keep points"),
                      registry.arg("--norm", choices=["l1", "linf", "l1+linf"], default="l1",
                                   help="the change's norm (l1+linf: APRNN's and PRDNN's mean + max; default: l1)")))
def _cli(args):
    return run(args.data_dir, registry.names(args.shapes, SHAPES, "shape"), keep_images=args.keep, time_limit=args.time_limit, norm=args.norm)


PATTERN_CASES = (("3x100", "3", False), ("3x100", "3", True), ("9x100", "15", False), ("9x100", "15", True))


def run_pattern_bounds(data_dir: Path, repeats: int = 2, keep_images: int = 1000, seed: int = 0, time_limit: float = 300.0) -> Path:
    """Side by side in one run: the hidden-layer repair with the single-unit pattern rows of points with u columns held as
    column bounds (``cnnrepair.repair.hidden.PATTERN_BOUNDS``) and as rows, alternating, on the any-layer task's layer
    before the last with 1,000 keep points; writes benchmarks/results/pattern_bounds.json."""
    import cnnrepair.repair.hidden as hidden
    from benchmarks.common import machine, write_result
    from cnnrepair import RepairSpec, SolveOptions, repair_classifier

    ds, xtr, ytr, x_fog, _, order = fog_task(data_dir, keep_images, seed)
    xr, yr = x_fog[:100], ds.y_test[:100]
    rows, models = [], {}
    try:
        for shape, layer, later in PATTERN_CASES:
            if shape not in models:
                models[shape] = train(shape, xtr, ytr, 3, seed)[0]
            model = models[shape]
            keep = keep_set(model, xtr, ds.y_train, order, keep_images)
            times: dict[str, list[float]] = {"bounds": [], "rows": []}
            l1: dict[str, float | None] = {}
            for _ in range(repeats):
                for mode in ("bounds", "rows"):
                    hidden.PATTERN_BOUNDS = mode == "bounds"
                    t0 = time.perf_counter()
                    r = repair_classifier(model, xr, yr, RepairSpec(margin=0.05, later_biases=later), layer=layer, keep=keep,
                                          options=SolveOptions(time_limit=time_limit))
                    times[mode].append(time.perf_counter() - t0)
                    l1[mode] = r.certificate.change["l1"] if r.ok else None
                    print(f"  {shape} layer {layer}{' later biases' if later else ''} {mode}: {r.status} in {times[mode][-1]:.1f}s", flush=True)
            rows.append({"network": shape, "layer": layer, "later_biases": later, "keep_points": len(keep[1]), "seconds": times,
                         "l1": l1, "ratio": float(np.median(times["rows"]) / np.median(times["bounds"]))})
    finally:
        hidden.PATTERN_BOUNDS = True
    command = f"python -m benchmarks.run pattern-bounds --data-dir {data_dir}"
    return write_result("pattern_bounds.json", {"machine": machine(), "command": command, "repeats": repeats, "rows": rows})


def pattern_table(d: dict) -> str:
    """Markdown: per case, the median seconds with bounds and with rows, their ratio, the L1 optimum of each."""
    out = ["| network | layer | later biases | keep | s, as bounds (median) | s, as rows (median) | rows / bounds | L1 of the layer (bounds / rows) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        l1 = " / ".join("-" if r["l1"][m] is None else f"{r['l1'][m]:.6g}" for m in ("bounds", "rows"))
        out.append(f"| {r['network']} | {r['layer']} | {'free' if r['later_biases'] else 'kept'} | {r['keep_points']:,} | "
                   f"{np.median(r['seconds']['bounds']):.1f} | {np.median(r['seconds']['rows']):.1f} | {r['ratio']:.2f} | {l1} |")
    return "\n".join(out)


registry.section("pattern_bounds.json", order=176,
                 title=lambda d: "### Pattern rows as column bounds (repair of a layer inside the network)",
                 intro=lambda d: (f"{registry.measured_on(d)}: the any-layer task's layer before the last with 1,000 keep points, "
                                  "the single-unit pattern rows (the ReLU right after the layer) of points with their own "
                                  "z-change columns held as column bounds or as rows, alternating, "
                                  f"{d['repeats']} runs each in one process."),
                 table=pattern_table)


@registry.command("pattern-bounds", "hidden-layer repair with single-unit pattern rows as column bounds against rows, side by side",
                  order=76, arguments=registry.arguments(registry.MNIST_DIR,
                                                         registry.arg("--repeats", type=int, default=2, help="runs of each mode")))
def _cli_pattern(args):
    return run_pattern_bounds(args.data_dir, repeats=args.repeats)
