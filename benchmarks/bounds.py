"""Certified accuracy with our IBP, CROWN and alpha-CROWN, side by side with a textbook CROWN, on networks the benchmark trains.

Models (seeded, trained here on 2 cores): MLPs of VNN-COMP's mnistfc shapes (784-256x2-10 and
784-256x4-10, Adam, 3 epochs), the paper's MNIST CNN (1 epoch) and a small CIFAR-10 CNN (conv 16 4x4
stride 2, conv 32 4x4 stride 2, FC 100, FC 10: the "cnn_4layer" shape of the CROWN papers; 3 epochs on
the JPEG q75 set). Per model and eps (MNIST 0.02 and 0.05, CIFAR-10 2/255, VNN-COMP's radii) the first
``images`` test images: seconds per image, images certified (label kept over the whole ball; an
image the model gets wrong is never certified) and the mean lower bound of the margin, for

* ``ibp``, ``crown``, ``alpha-crown``: :func:`cnnrepair.certify` (the specification bounded itself), and on the MLPs
  ``alpha-crown-full`` (every walk's slopes optimised, as auto_LiRPA's alpha-CROWN; on the CNNs, about 16 s an image on
  the paper's, too long for this table: :mod:`benchmarks.bounds_windows` times it there);
* ``crown, rows written out whole`` (CNNs): the same CROWN with every convolution neuron's walk written
  out over the whole map instead of its receptive field's window (``cnnrepair.bounds.propagate.WINDOWS``
  off): the same bounds, the time side by side;
* ``crown, feature box``: CROWN's box on the last layer's input, then the last layer's worst case
  over it (what certification did before, and what the ball repair program still constrains);
* ``textbook CROWN`` (MLPs): an independent numpy CROWN (:func:`textbook_crown`), the reference
  the issue names; ours must certify at least as many.

* ``auto_LiRPA IBP``, ``auto_LiRPA CROWN``, ``auto_LiRPA alpha-CROWN`` (with ``--lirpa-python``): auto_LiRPA, the
  library behind alpha-beta-CROWN, on the same models (rebuilt from their weights), boxes and rows, in its own
  interpreter (:mod:`benchmarks.bounds_lirpa_worker`), right after ours, on the same cores and threads. Its one PyPI
  release, 0.3, needs torch < 1.13 and so Python <= 3.10 (0.7 is not on PyPI):
  ``python3.10 -m venv .venv-lirpa && .venv-lirpa/bin/pip install torch==1.12.1 torchvision==0.13.1 'numpy<2' tqdm
  auto-lirpa==0.3``. Its alpha-CROWN optimises the slopes of every walk, as our ``alpha-crown-full`` does.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from benchmarks import registry
from cnnrepair.errors import CnnRepairError

if TYPE_CHECKING:
    from cnnrepair.data import Dataset

DENSE = "crown, rows written out whole"
FULL = "alpha-crown-full"  # run on the MLPs only: about 16 s per image on the paper's CNN (benchmarks/results/alpha_windows.json)
LIRPA = "auto_LiRPA "  # the start of the methods auto_LiRPA ran
LIRPA_BATCH = 50  # auto_LiRPA's inputs per compute_bounds call
WORKER = Path(__file__).resolve().parent / "bounds_lirpa_worker.py"
IMAGES = 100  # test images per model in the committed table's run
MLPS = {"mnist 784-256x2-10": 2, "mnist 784-256x4-10": 4}


def textbook_crown(Ws: list[np.ndarray], bs: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """CROWN as in Zhang et al. (2018), in numpy, for one input box of an MLP ``W_k relu(... W_1 x + b_1 ...) + b_k``: every
    pre-activation bounded by back-substitution, lower ReLU slope 1 where u > -l else 0; the lower bounds of ``rows @ logits``."""
    L, U = [], []

    def back(k, A, lower):
        c = A @ bs[k]
        A = A @ Ws[k]
        for j in range(k - 1, -1, -1):
            lj, uj = L[j], U[j]
            unst, act = (lj < 0) & (uj > 0), lj >= 0
            w = np.where(unst, uj - lj, 1.0)
            su, iu = np.where(unst, uj / w, act * 1.0), np.where(unst, -uj * lj / w, 0.0)
            sl = np.where(unst, (uj > -lj) * 1.0, act * 1.0)
            P, N = np.maximum(A, 0), np.minimum(A, 0)
            A, c = (P * sl + N * su, c + N @ iu) if lower else (P * su + N * sl, c + P @ iu)
            c = c + A @ bs[j]
            A = A @ Ws[j]
        P, N = np.maximum(A, 0), np.minimum(A, 0)
        return c + (P @ lo + N @ hi if lower else P @ hi + N @ lo)

    for k in range(len(Ws) - 1):
        eye = np.eye(len(bs[k]))
        L.append(back(k, eye, True))
        U.append(back(k, eye, False))
    return back(len(Ws) - 1, rows, True)


def layer_list(model: nn.Module) -> tuple[list[dict], dict[str, np.ndarray]]:
    """The layers of a sequential model (or of the paper's ``head(features(x))``) in order, as the auto_LiRPA worker
    rebuilds them: each layer's kind and settings, and its weights as ``layer{i}_weight`` / ``layer{i}_bias``."""
    parts = [model.features, model.head] if isinstance(getattr(model, "head", None), nn.Sequential) else [model]
    from cnnrepair.bounds.graph import pair

    specs: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    for m in (m for part in parts for m in part):
        i = len(specs)
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            arrays[f"layer{i}_weight"] = m.weight.detach().float().numpy()
            arrays[f"layer{i}_bias"] = m.bias.detach().float().numpy()
            specs.append({"kind": "linear"} if isinstance(m, nn.Linear) else
                         {"kind": "conv2d", "stride": list(m.stride), "padding": list(m.padding)})
        elif isinstance(m, nn.ReLU):
            specs.append({"kind": "relu"})
        elif isinstance(m, nn.Flatten):
            specs.append({"kind": "flatten"})
        elif isinstance(m, nn.MaxPool2d):
            kernel, stride, padding = (list(pair(v)) for v in (m.kernel_size, m.stride, m.padding))
            specs.append({"kind": "maxpool2d", "kernel": kernel, "stride": stride, "padding": padding})
        else:
            raise ValueError(f"the auto_LiRPA worker does not rebuild {type(m).__name__}")
    return specs, arrays


def lirpa_bounds(python: str, model: nn.Module, lower, upper, labels: np.ndarray, threads: int, timeout: float = 3600) -> dict:
    """auto_LiRPA's IBP / CROWN / alpha-CROWN margins and seconds for these boxes, from its own interpreter ``python``
    (:mod:`benchmarks.bounds_lirpa_worker`); ``{"status": "error", ...}`` when it fails."""
    specs, arrays = layer_list(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, lay, dst = Path(tmp) / "in.npz", Path(tmp) / "layers.json", Path(tmp) / "out.json"
        np.savez(src, lower=np.asarray(lower, np.float64), upper=np.asarray(upper, np.float64), labels=np.asarray(labels, np.int64),
                 **arrays)
        lay.write_text(json.dumps(specs))
        try:
            proc = subprocess.run([python, str(WORKER), str(src), str(lay), str(dst), "--threads", str(threads),
                                   "--batch", str(LIRPA_BATCH)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "cap_s": timeout}
        if proc.returncode != 0 or not dst.exists():
            return {"status": "error", "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
        return {"status": "ok", **json.loads(dst.read_text())}


def small_cifar_cnn() -> nn.Sequential:
    """The CROWN papers' cnn_4layer shape for CIFAR-10."""
    return nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(2048, 100), nn.ReLU(), nn.Linear(100, 10))


def paper_cnn(ds: Dataset, seed: int) -> tuple[str, nn.Module, torch.Tensor, np.ndarray, tuple, dict]:
    """The paper's MNIST CNN trained one epoch on the dataset ``ds`` (seeded): (name, model, test images, labels, eps, info)."""
    from benchmarks.common import fit
    from cnnrepair.data import to_float
    from cnnrepair.paper.models import mnist_nn

    torch.manual_seed(seed)
    cnn = mnist_nn()
    s = fit(cnn, to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long), 1, seed)
    return "mnist CNN (the paper's)", cnn, to_float(ds.x_test), ds.y_test, (0.02, 0.05), {"train_seconds": s, "epochs": 1}


def _models(mnist_dir: Path, cifar_dir: Path | None, seed: int) -> list[tuple[str, nn.Module, torch.Tensor, np.ndarray, tuple, dict]]:
    from benchmarks.any_layer import mlp
    from benchmarks.common import fit
    from cnnrepair.data import load_dataset, to_float

    out = []
    ds = load_dataset("mnist", mnist_dir)
    xtr, ytr = to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long)
    xte = to_float(ds.x_test)
    for name, depth in MLPS.items():
        torch.manual_seed(seed)
        model = mlp(depth + 1, 256)
        s = fit(model, xtr, ytr, 3, seed)
        out.append((name, model, xte, ds.y_test, (0.02, 0.05), {"train_seconds": s, "epochs": 3}))
    out.append(paper_cnn(ds, seed))
    if cifar_dir is not None:
        cds = load_dataset("cifar10", cifar_dir)
        cx, cy = to_float(cds.x_train), torch.as_tensor(cds.y_train, dtype=torch.long)
        torch.manual_seed(seed)
        small = small_cifar_cnn()
        s = fit(small, cx, cy, 3, seed)
        out.append(("cifar10 CNN 2 conv + 2 FC", small, to_float(cds.x_test), cds.y_test, (2 / 255,), {"train_seconds": s, "epochs": 3}))
    return out


def run(mnist_dir: Path, cifar_dir: Path | None, images: int = IMAGES, seed: int = 0, lirpa_python: str | None = None) -> Path:
    """Every (model, eps, method), auto_LiRPA's too when ``lirpa_python`` (an interpreter with auto_LiRPA) is given;
    writes benchmarks/results/bounds.json."""
    from benchmarks.common import machine, write_result
    from cnnrepair.bounds import ball_box, feature_bounds, margin_rows
    from cnnrepair.certify import certify, worst_margins
    from cnnrepair.repair import last_layer
    from cnnrepair.runtime import accuracy

    if images < 1:  # before any training
        raise CnnRepairError(f"--images {images}: give at least 1 test image per model")
    if lirpa_python and shutil.which(lirpa_python) is None:  # before any training
        raise CnnRepairError(f"--lirpa-python {lirpa_python}: no such interpreter; give the python of an environment with auto_LiRPA "
                             "0.3 (docs/guide.md says how to make one)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows, nets, lirpa = [], {}, None
    for name, model, x_test, y_test, eps_grid, info in _models(mnist_dir, cifar_dir, seed):
        x, y = x_test[:images], np.asarray(y_test[:images], np.int64)
        with torch.no_grad():
            right = model(x).argmax(1).numpy() == y
        nets[name] = {**info, "test_accuracy": accuracy(model, x_test, y_test), "correct_of_images": int(right.sum())}
        print(f"{name}: trained in {info['train_seconds']:.0f}s, test accuracy {100 * nets[name]['test_accuracy']:.2f}%", flush=True)
        lay = last_layer(model, x[:2])
        for eps in eps_grid:
            found = {}
            for method in ("ibp", "crown", "alpha-crown") + (FULL,) * (name in MLPS):  # every walk optimised: slow on CNNs
                t0 = time.perf_counter()
                c = certify(model, x, y, eps, method)
                found[method] = (c.margins, time.perf_counter() - t0)
            if any(isinstance(m, nn.Conv2d) for m in model.modules()):  # the same CROWN, convolution neurons walked dense
                propagate = importlib.import_module("cnnrepair.bounds.propagate")  # the module: the package's name is its function
                propagate.WINDOWS = False
                try:
                    t0 = time.perf_counter()
                    c = certify(model, x, y, eps, "crown")
                    found[DENSE] = (c.margins, time.perf_counter() - t0)
                finally:
                    propagate.WINDOWS = True
            lo, hi = ball_box(x, eps)
            t0 = time.perf_counter()
            box = worst_margins(feature_bounds(model, lay.name, lo, hi, "crown"), y, lay.weight, lay.bias)
            found["crown, feature box"] = (box, time.perf_counter() - t0)
            if name in MLPS:
                Ws = [m.weight.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
                bs = [m.bias.detach().double().numpy() for m in model if isinstance(m, nn.Linear)]
                spec = margin_rows(y, 10).numpy()
                t0 = time.perf_counter()
                ref = np.array([textbook_crown(Ws, bs, lo[i].reshape(-1).numpy(), hi[i].reshape(-1).numpy(), spec[i]).min()
                                for i in range(len(y))])
                found["textbook CROWN (numpy)"] = (ref, time.perf_counter() - t0)
            if lirpa_python:
                got = lirpa_bounds(lirpa_python, model, lo, hi, y, torch.get_num_threads())
                if got["status"] != "ok":
                    raise RuntimeError(f"auto_LiRPA failed on {name}, eps {eps}: {got}")
                lirpa = lirpa or {k: got[k] for k in ("auto_LiRPA", "torch", "python", "dtype", "threads", "batch", "alpha_steps",
                                                      "bound_opts")} | {"failed": []}
                for method, r in got["methods"].items():
                    if "error" in r:
                        lirpa["failed"].append({"model": name, "eps": eps, "method": method, "error": r["error"]})
                        print(f"  eps {eps:.4g} {LIRPA}{method}: failed: {r['error']}", flush=True)
                    else:
                        found[LIRPA + method] = (np.asarray(r["margins"]), r["seconds"])
            for method, (m, s) in found.items():
                row = {"model": name, "eps": eps, "method": method, "images": int(len(y)), "certified": int((m > 0).sum()),
                       "mean_margin_bound": float(np.mean(m)), "seconds_per_image": s / len(y)}
                if method == DENSE:  # the windows must not change a bound: the largest difference, relative to the bound's size
                    crown = found["crown"][0]
                    row["largest_relative_difference_to_crown"] = float(np.max(np.abs(m - crown) / np.maximum(np.abs(crown), 1e-12)))
                rows.append(row)
                print(f"  eps {eps:.4g} {method}: {row['certified']}/{len(y)} certified, mean bound {row['mean_margin_bound']:.3f}, "
                      f"{1000 * row['seconds_per_image']:.1f} ms/image", flush=True)
    command = f"python -m benchmarks.run bounds --data-dir {mnist_dir}" + (f" --cifar-dir {cifar_dir}" if cifar_dir else "")
    if images != IMAGES:
        command += f" --images {images}"
    if lirpa_python:
        command += " --lirpa-python LIRPA_PYTHON"
    out = {"machine": machine(), "command": command, "task": {"images": images, "seed": seed, "training": "Adam lr 1e-3, batch 128"},
           "networks": nets, "rows": rows, "auto_LiRPA": lirpa or NO_LIRPA}
    return write_result(result_name(images, cifar_dir is not None, lirpa_python is not None), out)


NO_LIRPA = "not run: give --lirpa-python, an interpreter with auto_LiRPA 0.3 (see the module's docstring)"


def lirpa_note(d: dict) -> str:
    """What the auto_LiRPA rows are (or why there are none)."""
    a = d.get("auto_LiRPA")
    if not isinstance(a, dict):
        return f"auto_LiRPA: {a}"
    return (f"auto_LiRPA {a['auto_LiRPA']} (torch {a['torch']}, Python {a['python']}, {a['dtype']}, {a['threads']} thread(s), "
            f"{a['batch']} images per call, alpha-CROWN {a['alpha_steps']} steps) ran on the same models, boxes and rows in its "
            "own interpreter, right after ours; its time is compute_bounds alone, ours includes tracing the model"
            + "".join(f"; its {f['method']} failed on {f['model']} (eps {f['eps']:.4g}): {f['error']}" for f in a.get("failed", [])))


def result_name(images: int = IMAGES, cifar: bool = True, lirpa: bool = True) -> str:
    """The results file of a run: one on another number of images, without the CIFAR-10 model or without auto_LiRPA gets a
    file of its own instead of replacing the whole table."""
    parts = ([] if images == IMAGES else [f"images{images}"]) + ([] if cifar else ["mnist_only"]) + ([] if lirpa else ["no_lirpa"])
    return "_".join(["bounds", *parts]) + ".json"


def table(d: dict) -> str:
    lines = ["| model | eps | method | certified | mean margin bound | ms / image |", "| --- | --- | --- | --- | --- | --- |"]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['eps']:.4g} | {r['method']} | {r['certified']}/{r['images']} | {r['mean_margin_bound']:.3f} | "
                     f"{1000 * r['seconds_per_image']:.1f} |")
    nets = "; ".join(f"{k}: {100 * v['test_accuracy']:.2f}% test accuracy ({v['epochs']} epoch(s), {v['train_seconds']:.0f} s)"
                     for k, v in d["networks"].items())
    return "\n".join(lines + ["", f"Networks: {nets}. {lirpa_note(d)}."])


def headline(d: dict) -> list[str]:
    """README lines: per model and eps, images certified and ms per image, CROWN and alpha-CROWN against the references
    (auto_LiRPA's when it ran), and how many times faster our CROWN is than auto_LiRPA's."""
    ran = isinstance(d.get("auto_LiRPA"), dict)
    cols = ["ibp", "crown", "alpha-crown", FULL, "crown, feature box", "textbook CROWN (numpy)", DENSE]
    names = ["IBP", "CROWN", "alpha-CROWN", "alpha-CROWN, every walk", "CROWN via the feature box", "textbook CROWN",
             "CROWN, rows written out whole"]
    if ran:
        cols += [LIRPA + "CROWN", LIRPA + "alpha-CROWN"]
        names += ["auto_LiRPA CROWN", "auto_LiRPA alpha-CROWN", "auto_LiRPA's CROWN time / ours",
                  "auto_LiRPA's alpha-CROWN time / ours (every walk)"]
    out = [f"**Certified accuracy bounds** (networks trained by the benchmark, first {d['task']['images']} test images; "
           f"`{d['command']}`, {d['machine']['cores']} cores):", "",
           "| model | eps | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    keys = []
    for r in d["rows"]:
        if (r["model"], r["eps"]) not in keys:
            keys.append((r["model"], r["eps"]))
    for model, eps in keys:
        by = {r["method"]: r for r in d["rows"] if r["model"] == model and r["eps"] == eps}

        failed = {LIRPA + f["method"] for f in d["auto_LiRPA"].get("failed", []) if (f["model"], f["eps"]) == (model, eps)} if ran else set()

        def cell(m):
            r = by.get(m)
            return ("failed" if m in failed else "-") if r is None else f"{r['certified']} ({1000 * r['seconds_per_image']:.0f} ms)"

        cells = [cell(c) for c in cols]
        if ran:
            ours, theirs = by.get("crown"), by.get(LIRPA + "CROWN")
            cells.append("-" if not (ours and theirs) else f"{theirs['seconds_per_image'] / ours['seconds_per_image']:.2f}x")
            ours, theirs = by.get(FULL), by.get(LIRPA + "alpha-CROWN")
            cells.append("-" if not (ours and theirs) else f"{theirs['seconds_per_image'] / ours['seconds_per_image']:.2f}x")
        out.append(f"| {model} | {eps:.4g} | " + " | ".join(cells) + " |")
    note = (f"{lirpa_note(d)}." if ran else "auto_LiRPA was not run in this table (see docs/results.md).")
    return out + ["", "Images certified (time per image). On the CNNs CROWN walks each convolution neuron back in the window of its "
                  "receptive field; the column of rows written out whole is the same CROWN with those walks over the whole map, "
                  f"in the same run. {note}", ""]


registry.section("bounds*.json", order=165, title=lambda d: "### Bounds: certified accuracy with IBP, CROWN and alpha-CROWN",
                 intro=lambda d: f"`{d['command']}`; {registry.measured_on(d)}; the first {d['task']['images']} test images per model; "
                                 "an image is certified when every logit difference's lower bound over its ball is positive.",
                 table=table, headline=headline)


@registry.command("bounds", "certified accuracy with our IBP, CROWN, alpha-CROWN beside a textbook CROWN (MNIST MLPs and CNN, CIFAR-10 CNN)",
                  order=165, arguments=registry.arguments(
                      registry.arg("--data-dir", type=Path, default=Path("../shared/datasets/mnist"), help="the MNIST IDX folder"),
                      registry.arg("--cifar-dir", type=Path, default=None, help="the CIFAR-10 data (e.g. ../shared/datasets/cifar10-jpeg.tar.gz)"),
                      registry.arg("--images", type=int, default=IMAGES, help=f"test images per model (default {IMAGES})"),
                      registry.arg("--lirpa-python", default=None,
                                   help="an interpreter with auto_LiRPA 0.3 (torch 1.12, Python <= 3.10): its bounds side by side")))
def _cli(args):
    return run(args.data_dir, args.cifar_dir, args.images, lirpa_python=args.lirpa_python)
