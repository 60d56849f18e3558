"""Repair of a layer inside a CIFAR-10 CNN against its last layer, in the paper's adversarial setting (issue 23).

Network: the CROWN papers' ``cnn_4layer`` shape (conv 16 4x4 stride 2, conv 32 4x4 stride 2, FC 100, FC 10, ReLU;
``benchmarks.bounds.small_cifar_cnn``), trained here (seeded, Adam, a CPU minute) on CIFAR-10 as shipped in
``../shared/datasets`` (JPEG q75). It is not the paper's CIFAR-10 CNN: that one takes a GPU to train to the paper's
accuracy. Setting (the paper's): FGSM at one epsilon on the test images the network classifies correctly; the first
100 it fools are the repair set (each gets its true label back), the other fooled test images measure generalisation
(all misclassified before repair), the clean test set measures drawdown. Layers: the last FC, the FC before it and the
second convolution (weight sharing: one variable per kernel entry), each without and with 1,000 keep points (clean
training images the network gets right), a layer inside the network also with the later biases free.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import registry
from benchmarks.any_layer import KEEP_IMAGES, Case, Sets, repair_case, status_word
from benchmarks.any_layer import table as any_layer_table

EPS = 0.01  # FGSM's epsilon on the [0, 1] pixel scale (the paper's CIFAR-10 grid runs 0.001 to 0.025)
LAYERS = (("7", "last"), ("5", "hidden (1 before the last, FC)"), ("2", "hidden (the second convolution)"))
RESULT = "cifar10_any_layer.json"


def result_name(eps: float = EPS) -> str:
    """The results file of a run: one at another epsilon gets a file of its own instead of replacing the committed table."""
    return RESULT if eps == EPS else f"cifar10_any_layer_eps{eps:g}.json"


def adversarial_sets(model: torch.nn.Module, x: torch.Tensor, y: np.ndarray, eps: float, repair_images: int):
    """(repair images, their labels, held-out images, their labels, how many were fooled): FGSM on the images ``model``
    classifies correctly; the first ``repair_images`` it fools to repair, the other fooled ones held out."""
    from cnnrepair.attacks import attack
    from cnnrepair.errors import CnnRepairError

    adv, fooled = attack(model, x, y, eps, "fgsm")
    with torch.no_grad():
        right = model(x).argmax(1).numpy() == y
    idx = np.flatnonzero(right & fooled.numpy())
    if len(idx) <= repair_images:
        raise CnnRepairError(f"FGSM at eps {eps:g} fooled {len(idx)} correctly classified test images; "
                         f"the task needs more than {repair_images}: give a larger --eps")
    r, g = idx[:repair_images], idx[repair_images:]
    return adv[r], y[r], adv[g], y[g], len(idx)


def run(cifar_dir: Path, repair_images: int = 100, keep_images: int = KEEP_IMAGES, eps: float = EPS, epochs: int = 10, seed: int = 0,
        time_limit: float = 300.0, margin: float = 0.05) -> Path:
    """Every (layer, keep, later biases) case on one seeded network; writes benchmarks/results/cifar10_any_layer.json."""
    from benchmarks.any_layer import keep_set
    from benchmarks.bounds import small_cifar_cnn
    from benchmarks.common import fit, machine, write_result
    from cnnrepair import RepairSpec, SolveOptions
    from cnnrepair.attacks import check_eps
    from cnnrepair.data import load_dataset, to_float
    from cnnrepair.runtime import accuracy

    check_eps(eps)  # the settings, before the data loads and the network trains
    options = SolveOptions(time_limit=time_limit)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ds = load_dataset("cifar10", cifar_dir)
    xtr, ytr = to_float(ds.x_train), torch.as_tensor(ds.y_train, dtype=torch.long)
    x_clean, y_clean = to_float(ds.x_test), ds.y_test
    torch.manual_seed(seed)
    model = small_cifar_cnn()
    train_s = fit(model, xtr, ytr, epochs, seed)
    t0 = time.perf_counter()
    xr, yr, xg, yg, fooled = adversarial_sets(model, x_clean, y_clean, eps, repair_images)
    attack_s = time.perf_counter() - t0
    before = {"repair": accuracy(model, xr, yr), "generalisation": accuracy(model, xg, yg), "clean": accuracy(model, x_clean, y_clean)}
    print(f"cnn_4layer: trained in {train_s:.0f}s, clean {100 * before['clean']:.2f}%; FGSM eps {eps:g} fooled {fooled} "
          f"correctly classified test images", flush=True)
    order = np.random.default_rng(seed).permutation(len(ds.y_train))[:3 * keep_images]
    xk, yk = keep_set(model, xtr, ds.y_train, order, keep_images)
    sets = Sets(xr, yr, xg, yg, x_clean, y_clean, xk, yk, before)
    rows = []
    for layer, where in LAYERS:
        for later in ((False,) if where == "last" else (False, True)):
            for keep in (False, True):
                rows.append(repair_case(model, Case("cnn_4layer", layer, where, keep, later), sets,
                                        RepairSpec(margin=margin, later_biases=later), options))
    out = {"machine": machine(),
           "command": f"python -m benchmarks.run any-layer-cifar --cifar-dir {cifar_dir} --time-limit {time_limit:g} --eps {eps:g}",
           "task": {"attack": "fgsm", "eps": eps, "seed": seed, "repair_images": repair_images, "generalisation_images": int(len(yg)),
                    "held_out": "adversarial", "keep_images": keep_images, "margin": margin, "spec": "pointwise", "norm": "l1",
                    "time_limit": time_limit, "attack_seconds": attack_s,
                    "training": f"Adam lr 1e-3, batch 128, {epochs} epochs, seed {seed}"},
           "networks": {"cnn_4layer": {"train_seconds": train_s, "epochs": epochs, "accuracy": before}},
           "rows": rows}
    return write_result(result_name(eps), out)


def _intro(d: dict) -> str:
    t = d["task"]
    return (f"`{d['command']}`: CIFAR-10 (JPEG q75), the cnn_4layer shape trained here ({t['training']}), not the paper's CNN "
            f"(a GPU's job); FGSM at eps {t['eps']:g} on the test images it gets right: the first {t['repair_images']} it fools "
            f"are repaired (pointwise, minimal L1, margin {t['margin']:g}), the other {t['generalisation_images']:,} fooled "
            "images measure generalisation (0% before repair), the clean test set drawdown; keep points: "
            f"{t['keep_images']:,} clean training images it gets right; a hidden layer keeps every repair point's ReLU pattern, "
            "and a keep point's when the change would cost it its margin; time limit "
            f"{t['time_limit']:g} s per repair; {d['machine']['cores']} cores, {d['machine']['measured']}.")


def headline(d: dict) -> list[str]:
    """README lines: one sentence, each layer with the keep points (drawdown / generalisation / seconds), the last first."""
    parts = []
    for r in d["rows"]:
        if not r["keep_points"]:
            continue
        lb = ", later biases free" if r["later_biases"] else ""
        if r["status"] != "repaired":
            parts.append(f"{r['layer']} ({r['position']}{lb}) {status_word(r)} ({r['seconds']:.0f} s)")
        else:
            parts.append(f"{r['layer']} ({r['position']}{lb}) {r['drawdown']:.2f} / {r['generalisation']:+.2f} in {r['seconds']:.0f} s")
    return [f"**Repair of a layer inside a CIFAR-10 CNN** (the paper's adversarial setting on a cnn_4layer trained by the "
            f"benchmark, clean {100 * d['networks']['cnn_4layer']['accuracy']['clean']:.1f}%; {d['task']['repair_images']} FGSM "
            f"images repaired, {d['task']['keep_images']:,} keep points, minimal L1; `{d['command']}`, {d['machine']['cores']} cores), "
            "drawdown on the clean test set / generalisation on the held-out FGSM images, in points: " + "; ".join(parts) + ".", ""]


registry.section("cifar10_any_layer*.json", order=176,
                 title=lambda d: f"### Repair of a layer inside a CIFAR-10 CNN (the paper's adversarial setting, FGSM eps {d['task']['eps']:g})",
                 intro=_intro, table=any_layer_table, headline=headline)


@registry.command("any-layer-cifar", "last-layer against hidden FC and convolution repair on a CIFAR-10 CNN, FGSM images", order=76,
                  arguments=registry.arguments(
                      registry.arg("--cifar-dir", type=Path, default=Path("../shared/datasets/cifar10-jpeg.tar.gz"),
                                   help="the CIFAR-10 data"),
                      registry.arg("--time-limit", type=float, default=300.0, help="seconds per repair"),
                      registry.arg("--eps", type=float, default=EPS, help="FGSM's epsilon on the [0, 1] pixel scale")))
def _cli(args):
    return run(args.cifar_dir, eps=args.eps, time_limit=args.time_limit)
