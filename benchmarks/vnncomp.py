"""VNN-COMP's workflow on networks of its shapes: properties checked, the violated ones repaired, all proved after (issue 26).

Networks, trained here (seeded, Adam, as the other MNIST benchmarks): ``256x2`` = 784-256-256-10 and
``256x4`` = 784-256x4-10 (VNN-COMP 2021's mnistfc shapes) on MNIST, and ``convsmall`` (ERAN's and
VNN-COMP's cifar2020 ConvSmall: conv 16x4x4 stride 2, conv 32x4x4 stride 2, 100, 10; pixels in
[0, 1]) on CIFAR-10 (JPEG q75). Each is exported to ONNX. Properties are generated the way
VNN-COMP's mnistfc and oval21 generators do: test images drawn at random (seeded) among those the
network classifies correctly, the L-infinity ball of ``eps`` around each (clipped to [0, 1]) must
keep the true label (``eps`` 0.02 and 0.05 for MNIST, 2/255 for CIFAR-10), written as VNN-LIB files
with an ``instances.csv``; keep points: training images the network classifies correctly (a seeded
draw, ``--keep``). ``32x2`` (784-32-32-10) is there for Marabou: small enough for it to decide a
property within the cap. Then, as a user runs it, in its own process::

    cnnrepair repair model.onnx --instances instances.csv --keep keep.npz --out fixed/

(all the properties not proved, repaired together) and each such property alone in a run of its own
(``--alone``: as one edits one violated property), and from the files: how many properties were violated (a PGD counterexample), proved (CROWN) or
unknown before, how many are proved after on the saved model, the change, the seconds per
property, the drawdown (clean accuracy on 2,000 other test images, before and after, onnxruntime)
and, for the properties the repair made true on the MNIST networks, Marabou (an independent complete
verifier) on the repaired file, each run capped (``--marabou-cap``): ``unsat`` proves the property,
``sat`` would refute the repair, a time-out decides nothing.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import registry

NETWORKS = {"256x2": ("mnist", (3, 256), (0.02, 0.05)), "256x4": ("mnist", (5, 256), (0.02, 0.05)),
            "convsmall": ("cifar10", None, (2 / 255,)), "32x2": ("mnist", (3, 32), (0.02, 0.05))}


def convsmall() -> nn.Sequential:
    """ERAN's ConvSmall for 3 x 32 x 32 inputs."""
    return nn.Sequential(nn.Conv2d(3, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 6 * 6, 100), nn.ReLU(), nn.Linear(100, 10))


def _network(name: str, data_dirs: dict, epochs: int, seed: int, keep: int):
    """(model, test inputs in [0, 1], test labels, ``keep`` training inputs it classifies correctly (a seeded draw), training
    seconds)."""
    from benchmarks.any_layer import mlp
    from benchmarks.common import fit
    from cnnrepair.data import load_dataset, to_float

    dataset, shape, _ = NETWORKS[name]
    ds = load_dataset(dataset, data_dirs[dataset])
    torch.manual_seed(seed)
    model = mlp(*shape) if shape is not None else convsmall()
    xtr, ytr = to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long)
    seconds = fit(model, xtr, ytr, epochs, seed)
    pool = torch.as_tensor(np.random.default_rng(seed + 1).permutation(len(ytr))[:3 * keep])
    with torch.no_grad():
        right = pool[model.eval()(xtr[pool]).argmax(1) == ytr[pool]][:keep]
    return model, to_float(ds.x_test), np.asarray(ds.y_test, np.int64), xtr[right].numpy(), seconds


def _onnx(model: nn.Module, sample: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (sample[:1],), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pred = np.concatenate([sess.run(None, {"x": x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).mean())


def _marabou(onnx_path: str, prop_path: str) -> tuple[str, dict]:
    """Marabou on one property (in a child process: the caller caps it); its answer as the objective."""
    from maraboupy import Marabou

    t0 = time.perf_counter()
    net = Marabou.read_onnx(onnx_path)
    code, _, _ = net.solve(verbose=False, options=Marabou.createOptions(verbosity=0), propertyFilename=prop_path)
    return 0.0, {"answer": code, "seconds": time.perf_counter() - t0}


def _marabou_checks(fixed: Path, report: list[dict], limit: int, cap: float) -> list[dict]:
    """Marabou on the first ``limit`` properties the repair made true, each capped at ``cap`` seconds."""
    from benchmarks.lp_scaling import timed

    try:
        import maraboupy  # noqa: F401
    except ImportError:
        return [{"status": "not run", "reason": "maraboupy is not installed (CPython 3.11 wheels only)"}]
    proved = {line.split(",")[1] for line in (fixed / "instances.csv").read_text().splitlines()} if (fixed / "instances.csv").exists() else set()
    out = []
    for i, rec in enumerate(report):
        if len(out) >= limit:
            break
        name = f"proved_{i}_{rec['file']}"
        if rec["role"] != "repaired" or name not in proved:
            continue
        res = timed(_marabou, str(fixed / "repaired.onnx"), str(fixed / name), cap, start="spawn")
        out.append({"property": rec["file"], "answer": res.get("answer", res["status"]), "seconds": res.get("seconds"),
                    **({"error": res["error"][-200:]} if res.get("error") else {})})
    return out


def _alone(src: Path, work: Path, report: list[dict], limit: int, time_limit: float) -> dict:
    """The properties not proved before, each repaired on its own (with every proved property and the keep points kept),
    the first ``limit`` of them: how many are repaired and proved after, and the seconds each whole command took."""
    from benchmarks.common import run_cnnrepair

    held = [work / r["file"] for r in report if r["before"] == "holds"]
    todo = [r["file"] for r in report if r["before"] != "holds"][:limit]
    runs = []
    for i, name in enumerate(todo):
        out = work / f"alone_{i}"
        args = ["repair", str(src), "--vnnlib", str(work / name), *map(str, held), "--keep", str(work / "keep.npz"), "--out", str(out),
                "--time-limit", f"{time_limit:g}"]
        wall, _ = run_cnnrepair(args)
        cert = json.loads((out / "certificate.json").read_text()) if (out / "certificate.json").exists() else {}
        props = json.loads((out / "properties.json").read_text())["properties"] if (out / "properties.json").exists() else []
        runs.append({"property": name, "status": cert.get("status", "failed"), "wall_s": wall,
                     "proved_after": bool(props) and props[0].get("after") == "holds",
                     "kept_proved_after": sum(p.get("after") == "holds" for p in props[1:]), "kept": len(props) - 1})
    return {"tried": len(runs), "repaired": sum(r["status"] == "repaired" for r in runs),
            "proved_after": sum(r["proved_after"] for r in runs), "median_wall_s": float(np.median([r["wall_s"] for r in runs])) if runs else None,
            "runs": runs}


def _case(model, name: str, eps: float, data: tuple, order: np.ndarray, n: int, work: Path, marabou: int, marabou_cap: float,
          time_limit: float = 300.0, alone: int = 5, flags: tuple[str, ...] = ()) -> dict:
    """One (network, eps): properties written, ``cnnrepair repair --instances --keep`` run, its files read. ``data``: test
    inputs, test labels, keep inputs."""
    from benchmarks.common import run_cnnrepair
    from cnnrepair.vnnlib import BallProperty

    x, y, xk = data
    work.mkdir(parents=True)
    np.savez(work / "keep.npz", x=xk.astype(np.float32))
    src = work / "model.onnx"
    _onnx(model, x, src)
    with torch.no_grad():
        pred = model(x[torch.as_tensor(order)]).argmax(1).numpy()
    picked = order[pred == y[order]][:n]  # correctly classified test images, in the seeded random order
    rows = []
    for i, k in enumerate(picked):
        (work / f"prop_{i}.vnnlib").write_text(BallProperty(x[k].numpy().reshape(-1), int(y[k]), eps, 10, (0.0, 1.0)).text())
        rows.append(f"model.onnx,prop_{i}.vnnlib,60\n")
    (work / "instances.csv").write_text("".join(rows))
    args = ["repair", str(src), "--instances", str(work / "instances.csv"), "--keep", str(work / "keep.npz"), "--out", str(work / "fixed"),
            "--time-limit", f"{time_limit:g}", *flags]
    wall, proc = run_cnnrepair(args)
    rec = {"network": name, "eps": eps, "properties": len(picked), "keep_points": len(xk), "wall_s": wall,
           "command": "cnnrepair " + " ".join(a.replace(str(work), "WORK") for a in args)}
    report_path = work / "fixed" / "properties.json"
    if not report_path.exists():
        return {**rec, "status": "failed", "error": proc.stderr.strip()[-300:]}
    report = json.loads(report_path.read_text())["properties"]
    before = {s: sum(r["before"] == s for r in report) for s in ("violated", "holds", "unknown")}
    rec.update(before=before, seconds_per_property=wall / max(len(report), 1))
    if alone:
        rec["alone"] = _alone(src, work, report, alone, time_limit)
    cert_path = work / "fixed" / "certificate.json"
    if not cert_path.exists():
        return {**rec, "status": "every property held", "proved_after": before["holds"]}
    cert = json.loads(cert_path.read_text())
    rec.update(status=cert["status"], repaired=len(cert["points"]), kept=cert["keep"]["count"] - len(xk),
               dropped=sum(r["role"] == "dropped" for r in report))
    if cert["status"] != "repaired":
        return {**rec, "notes": cert.get("notes"), "solver": cert["solver"].get("status")}
    held_out = np.setdiff1d(np.arange(len(y)), picked)[:2000]
    xh = x[torch.as_tensor(held_out)].numpy()
    rec.update(proved_after=sum(r.get("after") == "holds" for r in report),
               repaired_proved_after=sum(r.get("after") == "holds" for r in report if r["role"] == "repaired"),
               kept_proved_after=sum(r.get("after") == "holds" for r in report if r["role"] == "kept"),
               keep_labels_kept=cert["keep"]["labels_kept"] - (cert["keep"]["count"] - len(xk)),
               change_l1=cert["objective"], gap=cert["gap"], solver_s=cert["solver"].get("seconds"),
               accuracy_before=_accuracy(src, xh, y[held_out]), accuracy_after=_accuracy(work / "fixed" / "repaired.onnx", xh, y[held_out]))
    rec["drawdown"] = rec["accuracy_before"] - rec["accuracy_after"]
    if marabou and NETWORKS[name][0] == "mnist":
        rec["marabou"] = _marabou_checks(work / "fixed", report, marabou, marabou_cap)
    return rec


def run(data_dirs: dict, networks: tuple[str, ...] = tuple(NETWORKS), n: int = 15, epochs: int = 3, seed: int = 0,
        marabou: int = 3, marabou_cap: float = 120.0, keep: int = 500, time_limit: float = 300.0, alone: int = 5) -> Path:
    """Every (network, eps) of :data:`NETWORKS`; vnncomp.json."""
    from benchmarks.common import machine, write_result

    rows, trained = [], {}
    for name in networks:
        model, x, y, xk, train_s = _network(name, data_dirs, epochs, seed, keep)
        trained[name] = {"train_seconds": train_s}
        order = np.random.default_rng(seed).permutation(len(y))[:5 * n]
        for eps in NETWORKS[name][2]:
            with tempfile.TemporaryDirectory(prefix="cnnrepair-vnncomp-") as tmp:
                rows.append(_case(model, name, eps, (x, y, xk), order, n, Path(tmp) / "case", marabou, marabou_cap, time_limit, alone))
            r = rows[-1]
            print(f"{name} eps {eps:.4g}: {r.get('before')} -> {r.get('status')}, proved after {r.get('proved_after')}, "
                  f"{r['wall_s']:.1f} s", flush=True)
    used = {NETWORKS[m][0] for m in networks}
    dirs = " ".join(f"{flag} {data_dirs[k]}" for k, flag in (("mnist", "--data-dir"), ("cifar10", "--cifar-dir")) if k in used)
    cmd = (f"python -m benchmarks.run vnncomp {dirs} --networks {','.join(networks)} --n {n} --keep {keep} --marabou {marabou} "
           f"--marabou-cap {marabou_cap:g} --time-limit {time_limit:g} --alone {alone}")
    return write_result("vnncomp.json", {"machine": machine(), "command": cmd,
                                         "task": {"properties": n, "keep": keep, "epochs": epochs, "seed": seed, "marabou": marabou,
                                                  "time_limit_s": time_limit, "alone": alone,
                                                  "marabou_cap_s": marabou_cap}, "networks": trained, "rows": rows})


def _marabou_cell(r: dict) -> str:
    runs = r.get("marabou")
    if not runs:
        return "-"
    if runs[0].get("status") == "not run":
        return "not run"
    answers = [m["answer"] for m in runs]
    return ", ".join(f"{answers.count(a)} {a}" for a in sorted(set(answers)))


def _alone_cell(r: dict) -> str:
    a = r.get("alone")
    if not a or not a["tried"]:
        return "-"
    return f"{a['proved_after']}/{a['tried']} ({a['median_wall_s']:.1f} s)"


def table(d: dict) -> str:
    lines = ["| network | eps | properties | violated / proved / unknown before | status | proved after (repaired, kept) | "
             "keep points keeping their label | change (L1) | s / property | accuracy before -> after | Marabou on repaired | "
             "each alone: repaired and proved (median s) |",
             "| --- | ---: | ---: | --- | --- | --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in d["rows"]:
        b = r.get("before", {})
        after = ("-" if r.get("proved_after") is None else
                 f"{r['proved_after']}/{r['properties']} ({r.get('repaired_proved_after', '-')}/{r.get('repaired', '-')}, "
                 f"{r.get('kept_proved_after', '-')}/{r.get('kept', '-')})")
        kept = f"{r['keep_labels_kept']}/{r['keep_points']}" if r.get("keep_labels_kept") is not None else "-"
        acc = (f"{100 * r['accuracy_before']:.2f} -> {100 * r['accuracy_after']:.2f}" if "accuracy_after" in r else "-")
        change = f"{r['change_l1']:.4g}" if r.get("change_l1") is not None else "-"
        lines.append(f"| {r['network']} | {r['eps']:.4g} | {r['properties']} | {b.get('violated', '-')} / {b.get('holds', '-')} / "
                     f"{b.get('unknown', '-')} | {r.get('status', '-')} | {after} | {kept} | {change} | "
                     f"{r.get('seconds_per_property', float('nan')):.2f} | {acc} | {_marabou_cell(r)} | {_alone_cell(r)} |")
    return "\n".join(lines)


def _intro(d: dict) -> str:
    t = d["task"]
    return (f"{registry.measured_on(d)}. Networks trained here ({t['epochs']} epochs, seed {t['seed']}); {t['properties']} "
            f"properties per row and {t['keep']} keep points (training images the network gets right), properties generated as VNN-COMP's mnistfc / oval21 generators do (random correctly classified test "
            "images, the eps-ball clipped to [0, 1]); the whole `cnnrepair repair --instances` command in its own process "
            "(seconds per property: its wall time over the properties, loading, checking, repairing, saving and re-checking "
            "included). Proved after: on the saved file (CROWN); accuracy on 2,000 other test images (onnxruntime); Marabou: "
            f"the first {t['marabou']} repaired properties on the repaired MNIST file, each capped at {t['marabou_cap_s']:g} s "
            f"(unsat: proved; a time-out decides nothing). Each repair runs with `--time-limit {t['time_limit_s']:g}`. "
            f"Each alone: the first {t['alone']} properties not proved before, each repaired in a run of its own (the proved "
            "properties and the keep points kept), as one edits one violated property; how many are repaired and proved after, "
            "and the median seconds of the whole command.")


def headline(d: dict) -> list[str]:
    t = d["task"]
    out = [f"**VNN-COMP's workflow** (networks of its shapes trained by the benchmark, {t['properties']} generated properties per "
           f"row, {t['keep']} keep points; `{d['command']}`, {d['machine']['cores']} cores): `cnnrepair repair --instances` on all "
           "the properties not proved, then each of them alone:", "",
           "| network | eps | violated / proved / unknown before | all together: status, proved after | accuracy before -> after | "
           "each alone: repaired and proved (median s) | Marabou on repaired |", "| --- | ---: | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        b = r.get("before", {})
        together = r.get("status", "-") + (f", {r['proved_after']}/{r['properties']}" if r.get("proved_after") is not None else "")
        acc = f"{100 * r['accuracy_before']:.2f} -> {100 * r['accuracy_after']:.2f}" if "accuracy_after" in r else "-"
        out.append(f"| {r['network']} | {r['eps']:.4g} | {b.get('violated', '-')} / {b.get('holds', '-')} / {b.get('unknown', '-')} | "
                   f"{together} | {acc} | {_alone_cell(r)} | {_marabou_cell(r)} |")
    return out + [""]


registry.section("vnncomp.json", order=96, title=lambda d: "### VNN-COMP's workflow: violated properties repaired, then proved",
                 intro=_intro, table=table, headline=headline)


@registry.command("vnncomp", "VNN-COMP-shaped networks (256x2, 256x4, ConvSmall) with generated properties: check, repair, prove",
                  order=96, arguments=registry.arguments(
                      registry.MNIST_DIR,
                      registry.arg("--cifar-dir", type=Path, default=Path("../shared/datasets/cifar10-jpeg.tar.gz"),
                                   help="the CIFAR-10 data (default ../shared/datasets/cifar10-jpeg.tar.gz)"),
                      registry.arg("--networks", default=",".join(NETWORKS), help="comma-separated (256x2,256x4,convsmall)"),
                      registry.arg("--n", type=int, default=15, help="properties per network and eps (default 15)"),
                      registry.arg("--keep", type=int, default=500, help="keep points: training images the network gets right (default 500)"),
                      registry.arg("--marabou", type=int, default=3, help="repaired properties Marabou re-checks per MNIST row"),
                      registry.arg("--marabou-cap", type=float, default=120.0, help="seconds per Marabou run (default 120)"),
                      registry.arg("--time-limit", type=float, default=300.0, help="the repair's --time-limit per row (default 300)"),
                      registry.arg("--alone", type=int, default=5, help="properties not proved before, each also repaired on its own "
                                   "(default: the first 5 per row)")))
def _cli(args):
    return run({"mnist": args.data_dir, "cifar10": args.cifar_dir}, registry.names(args.networks, NETWORKS, "network"), args.n,
               marabou=args.marabou, marabou_cap=args.marabou_cap, keep=args.keep, time_limit=args.time_limit, alone=args.alone)


MNIST_NETWORKS = {k: v for k, v in NETWORKS.items() if v[0] == "mnist"}


def _mnist_arguments(marabou: int, marabou_cap: float, time_limit: float):
    """The arguments of a benchmark over :data:`MNIST_NETWORKS` with generated properties (its defaults as given)."""
    return registry.arguments(
        registry.MNIST_DIR,
        registry.arg("--networks", default="256x2,32x2", help="comma-separated (256x2,256x4,32x2)"),
        registry.arg("--n", type=int, default=15, help="properties per network and eps (default 15)"),
        registry.arg("--keep", type=int, default=500, help="keep points: training images the network gets right (default 500)"),
        registry.arg("--marabou", type=int, default=marabou, help="repaired properties Marabou re-checks per row"),
        registry.arg("--marabou-cap", type=float, default=marabou_cap, help=f"seconds per Marabou run (default {marabou_cap:g})"),
        registry.arg("--time-limit", type=float, default=time_limit, help=f"the repair's --time-limit per run (default {time_limit:g})"))


# Targeted properties (oval21's form: the label against one class), repaired exactly and as the stronger property ----------

FORMS = ("targeted", "every class")  # how each property is written: against its target only, or against every other class


def _form_run(model_path: Path, work: Path, props: list, form: str, time_limit: float, held: tuple) -> dict:
    """The properties written in one ``form`` into ``work`` and ``cnnrepair repair --instances --keep`` run on them (its own
    process); what its files say. ``held``: (held-out inputs, labels) for the accuracy after."""
    from benchmarks.common import run_cnnrepair

    work.mkdir(parents=True)
    rows = []
    for i, p in enumerate(props):
        (work / f"prop_{i}.vnnlib").write_text(p.text() if form == "targeted" else replace(p, rivals=None).text())
        rows.append(f"model.onnx,prop_{i}.vnnlib,60\n")
    (work / "instances.csv").write_text("".join(rows))
    args = ["repair", str(model_path), "--instances", str(work / "instances.csv"), "--keep", str(model_path.parent / "keep.npz"),
            "--out", str(work / "fixed"), "--time-limit", f"{time_limit:g}"]
    wall, proc = run_cnnrepair(args)
    rec: dict = {"form": form, "wall_s": wall}
    if not (work / "fixed" / "properties.json").exists():
        return {**rec, "status": "failed", "error": proc.stderr.strip()[-300:]}
    report = json.loads((work / "fixed" / "properties.json").read_text())["properties"]
    rec["before"] = {s: sum(r["before"] == s for r in report) for s in ("violated", "holds", "unknown")}
    if not (work / "fixed" / "certificate.json").exists():
        return {**rec, "status": "every property held", "proved_after": rec["before"]["holds"]}
    cert = json.loads((work / "fixed" / "certificate.json").read_text())
    rec.update(status=cert["status"], repaired=len(cert["points"]), solver_s=cert["solver"].get("seconds"))
    if cert["status"] == "repaired":
        rec.update(proved_after=sum(r.get("after") == "holds" for r in report), change_l1=cert["objective"], gap=cert["gap"],
                   keep_labels_kept=cert["keep"]["labels_kept"] - (cert["keep"]["count"] - len(np.load(model_path.parent / "keep.npz")["x"])),
                   accuracy_after=_accuracy(work / "fixed" / "repaired.onnx", *held))
    rec["report"] = report
    return rec


def _targeted_case(model, name: str, eps: float, data: tuple, order: np.ndarray, n: int, work: Path, marabou: int, marabou_cap: float,
                   time_limit: float) -> dict:
    """One (network, eps): ``n`` targeted properties (each correctly classified test image against its runner-up class, the
    class PGD reaches first) repaired as they are and, side by side, written against every other class (what the repair did
    with them before output rows): the change each needs, its ratio, the drawdown, the seconds."""
    from cnnrepair.vnnlib import BallProperty

    x, y, xk = data
    work.mkdir(parents=True)
    np.savez(work / "keep.npz", x=xk.astype(np.float32))
    src = work / "model.onnx"
    _onnx(model, x, src)
    with torch.no_grad():
        logits = model(x[torch.as_tensor(order)]).numpy()
    right = logits.argmax(1) == y[order]
    picked, runner = order[right][:n], np.argsort(-logits[right], 1)[:n, 1]
    props = [BallProperty(x[k].numpy().reshape(-1), int(y[k]), eps, 10, (0.0, 1.0), (int(t),)) for k, t in zip(picked, runner)]
    held_out = np.setdiff1d(np.arange(len(y)), picked)[:2000]
    held = (x[torch.as_tensor(held_out)].numpy(), y[held_out])
    rec = {"network": name, "eps": eps, "properties": len(props), "keep_points": len(xk), "accuracy_before": _accuracy(src, *held),
           "command": f"cnnrepair repair WORK/model.onnx --instances WORK/<form>/instances.csv --keep WORK/keep.npz --out WORK/<form>/fixed "
                      f"--time-limit {time_limit:g}"}
    for form in FORMS:
        rec[form] = _form_run(src, work / form.replace(" ", "_"), props, form, time_limit, held)
    t, e = rec["targeted"], rec["every class"]
    if t.get("change_l1") and e.get("change_l1") is not None:
        rec["change_ratio"] = e["change_l1"] / t["change_l1"]  # above 1: the stronger property needs more change
    if marabou and NETWORKS[name][0] == "mnist" and t.get("status") == "repaired":
        rec["marabou"] = _marabou_checks(work / "targeted" / "fixed", t["report"], marabou, marabou_cap)
    for form in FORMS:
        rec[form].pop("report", None)
    return rec


def run_targeted(data_dirs: dict, networks: tuple[str, ...] = ("256x2", "32x2"), n: int = 15, epochs: int = 3, seed: int = 0,
                 marabou: int = 3, marabou_cap: float = 120.0, keep: int = 500, time_limit: float = 300.0) -> Path:
    """Every (network, eps) of ``networks``: vnncomp_targeted.json."""
    from benchmarks.common import machine, write_result

    rows, trained = [], {}
    for name in networks:
        model, x, y, xk, train_s = _network(name, data_dirs, epochs, seed, keep)
        trained[name] = {"train_seconds": train_s}
        order = np.random.default_rng(seed).permutation(len(y))[:5 * n]
        for eps in NETWORKS[name][2]:
            with tempfile.TemporaryDirectory(prefix="cnnrepair-targeted-") as tmp:
                rows.append(_targeted_case(model, name, eps, (x, y, xk), order, n, Path(tmp) / "case", marabou, marabou_cap, time_limit))
            r = rows[-1]
            print(f"{name} eps {eps:.4g}: targeted {r['targeted'].get('status')} L1 {r['targeted'].get('change_l1')}, every class "
                  f"{r['every class'].get('status')} L1 {r['every class'].get('change_l1')}", flush=True)
    used = {NETWORKS[m][0] for m in networks}
    dirs = " ".join(f"{flag} {data_dirs[k]}" for k, flag in (("mnist", "--data-dir"), ("cifar10", "--cifar-dir")) if k in used)
    cmd = (f"python -m benchmarks.run vnncomp-targeted {dirs} --networks {','.join(networks)} --n {n} --keep {keep} "
           f"--marabou {marabou} --marabou-cap {marabou_cap:g} --time-limit {time_limit:g}")
    return write_result("vnncomp_targeted.json", {"machine": machine(), "command": cmd,
                                                  "task": {"properties": n, "keep": keep, "epochs": epochs, "seed": seed, "marabou": marabou,
                                                           "time_limit_s": time_limit, "marabou_cap_s": marabou_cap},
                                                  "networks": trained, "rows": rows})


def _form_cell(f: dict, n: int) -> str:
    b = f.get("before", {})
    head = f"{b.get('violated', '-')} / {b.get('holds', '-')} / {b.get('unknown', '-')}"
    if f.get("status") != "repaired":
        return f"{head}; {f.get('status', '-')}"
    acc = f"{100 * f['accuracy_after']:.2f}"
    return f"{head}; {f['proved_after']}/{n} proved after, L1 {f['change_l1']:.4g}, {acc} % after, {f['wall_s']:.1f} s"


def targeted_table(d: dict) -> str:
    lines = ["| network | eps | properties | accuracy before (%) | targeted, repaired as it is: violated / proved / unknown before; after | "
             "the same against every class | change ratio (every class / targeted) | Marabou on repaired |",
             "| --- | ---: | ---: | ---: | --- | --- | ---: | --- |"]
    for r in d["rows"]:
        ratio = f"{r['change_ratio']:.2f}" if r.get("change_ratio") is not None else "-"
        lines.append(f"| {r['network']} | {r['eps']:.4g} | {r['properties']} | {100 * r['accuracy_before']:.2f} | "
                     f"{_form_cell(r['targeted'], r['properties'])} | {_form_cell(r['every class'], r['properties'])} | {ratio} | "
                     f"{_marabou_cell(r)} |")
    return "\n".join(lines)


def _targeted_intro(d: dict) -> str:
    t = d["task"]
    return (f"{registry.measured_on(d)}. `{d['command']}`. Networks trained here ({t['epochs']} epochs, seed {t['seed']}); "
            f"{t['properties']} properties per row in oval21's targeted form: a correctly classified test image (a seeded random "
            "draw), its eps-ball clipped to [0, 1], and its label against one class, the runner-up at the image. Side by side in "
            "one run, on the same images and the same keep points "
            f"({t['keep']} training images the network gets right): the properties repaired as they are (output rows: the label "
            "against its target) and written against every other class (the stronger property a repair took in their place "
            "before output rows). Each cell: violated / proved / unknown before; proved after on the saved file (CROWN); the "
            "change (L1 of the last layer); accuracy on 2,000 other test images after (onnxruntime); the whole command's "
            f"seconds. Marabou: the first {t['marabou']} repaired targeted properties on the repaired MNIST file, each capped "
            f"at {t['marabou_cap_s']:g} s.")


def targeted_headline(d: dict) -> list[str]:
    ratios = [f"{r['network']} eps {r['eps']:.4g}: {r['change_ratio']:.2f}x" for r in d["rows"] if r.get("change_ratio") is not None]
    if not ratios:
        return []
    rest = [f"{r['network']} eps {r['eps']:.4g}: {r['targeted'].get('status')} / {r['every class'].get('status')}"
            for r in d["rows"] if r.get("change_ratio") is None]
    tail = f"; not repaired in the last layer, targeted / every class: {'; '.join(rest)}" if rest else ""
    return [f"**Targeted VNN-LIB properties** (oval21's form) are repaired against their own class: the stronger property "
            f"against every class needed this much more change (L1) in one side-by-side run ({'; '.join(ratios)}{tail}; "
            f"`{d['command']}`).", ""]


registry.section("vnncomp_targeted.json", order=97,
                 title=lambda d: "### Targeted properties: repaired against their own class, side by side with every class",
                 intro=_targeted_intro, table=targeted_table, headline=targeted_headline)


@registry.command("vnncomp-targeted", "oval21-style targeted properties on VNN-COMP-shaped MLPs: repaired as they are vs against "
                  "every class, side by side", order=97, arguments=_mnist_arguments(marabou=3, marabou_cap=120.0, time_limit=300.0))
def _cli_targeted(args):
    return run_targeted({"mnist": args.data_dir}, registry.names(args.networks, MNIST_NETWORKS, "network"), args.n, marabou=args.marabou,
                        marabou_cap=args.marabou_cap, keep=args.keep, time_limit=args.time_limit)


# The properties that conflict dropped (--drop-conflicts), where the whole set cannot be repaired together ---------------

def run_drop(data_dirs: dict, networks: tuple[str, ...] = ("256x2", "32x2"), n: int = 15, marabou: int = 2,
             marabou_cap: float = 60.0, keep: int = 500, time_limit: float = 120.0) -> Path:
    """Every (network, eps) of ``networks`` as :func:`run` measures it, with ``--drop-conflicts`` (and no runs alone):
    vnncomp_drop.json. The networks, images and properties are :func:`run`'s (same seed, same epochs)."""
    from benchmarks.common import machine, write_result

    rows, trained, epochs, seed = [], {}, 3, 0
    for name in networks:
        model, x, y, xk, train_s = _network(name, data_dirs, epochs, seed, keep)
        trained[name] = {"train_seconds": train_s}
        order = np.random.default_rng(seed).permutation(len(y))[:5 * n]
        for eps in NETWORKS[name][2]:
            with tempfile.TemporaryDirectory(prefix="cnnrepair-drop-") as tmp:
                rows.append(_case(model, name, eps, (x, y, xk), order, n, Path(tmp) / "case", marabou, marabou_cap, time_limit, 0,
                                  ("--drop-conflicts",)))
            r = rows[-1]
            print(f"{name} eps {eps:.4g}: {r.get('before')} -> {r.get('status')}, dropped {r.get('dropped')}, proved after "
                  f"{r.get('proved_after')}, {r['wall_s']:.1f} s", flush=True)
    cmd = (f"python -m benchmarks.run vnncomp-drop --data-dir {data_dirs['mnist']} --networks {','.join(networks)} --n {n} --keep {keep} "
           f"--marabou {marabou} --marabou-cap {marabou_cap:g} --time-limit {time_limit:g}")
    return write_result("vnncomp_drop.json", {"machine": machine(), "command": cmd,
                                              "task": {"properties": n, "keep": keep, "epochs": epochs, "seed": seed, "marabou": marabou,
                                                       "time_limit_s": time_limit, "marabou_cap_s": marabou_cap},
                                              "networks": trained, "rows": rows})


def drop_table(d: dict) -> str:
    lines = ["| network | eps | properties | violated / proved / unknown before | status | dropped | proved after (repaired, kept) | "
             "change (L1) | whole command (s) | accuracy before -> after | Marabou on repaired |",
             "| --- | ---: | ---: | --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
    for r in d["rows"]:
        b = r.get("before", {})
        after = ("-" if r.get("proved_after") is None else
                 f"{r['proved_after']}/{r['properties']} ({r.get('repaired_proved_after', '-')}/{r.get('repaired', '-')}, "
                 f"{r.get('kept_proved_after', '-')}/{r.get('kept', '-')})")
        acc = f"{100 * r['accuracy_before']:.2f} -> {100 * r['accuracy_after']:.2f}" if "accuracy_after" in r else "-"
        change = f"{r['change_l1']:.4g}" if r.get("change_l1") is not None else "-"
        lines.append(f"| {r['network']} | {r['eps']:.4g} | {r['properties']} | {b.get('violated', '-')} / {b.get('holds', '-')} / "
                     f"{b.get('unknown', '-')} | {r.get('status', '-')} | {r.get('dropped', '-')} | {after} | {change} | "
                     f"{r['wall_s']:.1f} | {acc} | {_marabou_cell(r)} |")
    return "\n".join(lines)


def _drop_intro(d: dict) -> str:
    t = d["task"]
    return (f"{registry.measured_on(d)}. `{d['command']}`. The networks, images, properties and {t['keep']} keep points of the "
            "table above (the same seed), the whole `cnnrepair repair --instances --drop-conflicts` command in its own process: "
            "where the properties not proved cannot all be repaired together, the most violated of each conflicting set is "
            "dropped and the rest repaired again (dropped: how many). Proved after: on the saved file (CROWN); accuracy on 2,000 "
            f"other test images (onnxruntime); Marabou: the first {t['marabou']} repaired properties, each capped at "
            f"{t['marabou_cap_s']:g} s; `--time-limit {t['time_limit_s']:g}` per repair.")


def drop_headline(d: dict) -> list[str]:
    cells = [f"{r['network']} eps {r['eps']:.4g}: {r['dropped']} of {r['dropped'] + r['repaired']} unproved properties dropped, the "
             f"other {r['repaired']} repaired ({r.get('repaired_proved_after', 0)} proved after), accuracy "
             f"{100 * r['accuracy_before']:.2f} -> {100 * r['accuracy_after']:.2f} %, {r['wall_s']:.0f} s"
             for r in d["rows"] if r.get("dropped") and r.get("status") == "repaired"]
    stuck = [f"{r['network']} eps {r['eps']:.4g}" for r in d["rows"] if r.get("status") not in ("repaired", "every property held")]
    if not cells:
        return []
    tail = f"; {', '.join(stuck)}: stopped at the time limit before naming a conflict, so nothing to drop" if stuck else ""
    return [f"**Conflicting properties dropped** (`--drop-conflicts`): {'; '.join(cells)}{tail} (`{d['command']}`).", ""]


registry.section("vnncomp_drop.json", order=98, title=lambda d: "### The properties that conflict dropped (--drop-conflicts)",
                 intro=_drop_intro, table=drop_table, headline=drop_headline)


@registry.command("vnncomp-drop", "the VNN-COMP workflow with --drop-conflicts: the properties that cannot be repaired together "
                  "dropped, the rest repaired", order=98, arguments=_mnist_arguments(marabou=2, marabou_cap=60.0, time_limit=120.0))
def _cli_drop(args):
    return run_drop({"mnist": args.data_dir}, registry.names(args.networks, MNIST_NETWORKS, "network"), args.n, args.marabou, args.marabou_cap,
                    args.keep, args.time_limit)
