"""FGSM throughput of cnnrepair's attack wrapper against calling Foolbox directly on the same model.

Both paths attack the same images of the same model, alternating, several rounds; the ratio of
the median times is the wrapper's cost (input checks, batching, clipping, success mask).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import registry


def run(run_dir: Path | None = None, n_images: int = 2000, rounds: int = 5, eps: float = 0.1) -> Path:
    import foolbox as fb

    from benchmarks.common import machine as _machine, write_result as _write
    from cnnrepair.attacks import attack
    from cnnrepair.data import load_dataset, to_float
    from cnnrepair.paper.pipeline import load_models
    from cnnrepair.paper.rundir import RunDir

    if run_dir is not None:
        run = RunDir(run_dir)
        models = load_models(run, ["nn", "lh"])
        ds = load_dataset(run.config["dataset"], run.config.get("data_dir"))
        label = run.config["dataset"]
    else:
        from cnnrepair.paper.models import digits_nn

        torch.manual_seed(0)
        models = {"nn": digits_nn().eval()}
        ds = load_dataset("digits")
        label = "digits (untrained)"
    x = to_float(ds.x_test[:n_images])
    y = torch.as_tensor(ds.y_test[:n_images])
    rows = {}
    for name, model in models.items():
        fmodel = fb.PyTorchModel(model.eval(), bounds=(0.0, 1.0))
        fgsm = fb.attacks.FGSM()

        def direct(fgsm=fgsm, fmodel=fmodel):
            for i in range(0, len(x), 500):
                fgsm(fmodel, x[i:i + 500], y[i:i + 500], epsilons=eps)

        def ours(model=model):
            attack(model, x, y.numpy(), eps, "fgsm", batch_size=500)

        times = {"foolbox": [], "cnnrepair": []}
        direct()  # warm-up
        for _ in range(rounds):
            for key, fn in (("foolbox", direct), ("cnnrepair", ours)):
                t0 = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        rows[name] = {"median_s": med, "images": len(x), "images_per_s": {k: len(x) / v for k, v in med.items()},
                      "overhead": med["cnnrepair"] / med["foolbox"] - 1.0, "all_s": times}
    cmd = "python -m benchmarks.run attack-overhead" + (f" --run {run_dir}" if run_dir else "") + f" --images {n_images}"
    return _write("attack_overhead.json", {"machine": _machine(), "command": cmd, "dataset": label, "eps": eps,
                                            "rounds": rounds, "models": rows})


def _section(ov: dict, link) -> list[str]:
    lines = [f"### Attack wrapper overhead ({ov['dataset']}, FGSM eps {ov['eps']}, median of {ov['rounds']} rounds)", "",
             "| model | Foolbox direct (images/s) | cnnrepair.attack (images/s) | overhead |", "| --- | --- | --- | --- |"]
    for m, r in ov["models"].items():
        lines.append(f"| {m.upper()} | {r['images_per_s']['foolbox']:.0f} | {r['images_per_s']['cnnrepair']:.0f} | {100 * r['overhead']:+.1f}% |")
    return lines + [""]


registry.section("attack_overhead.json", order=60, render=_section)


@registry.command("attack-overhead", "FGSM through cnnrepair's wrapper against Foolbox called directly", order=40,
                  arguments=registry.arguments(
                      registry.arg("--run", type=Path, default=None, help="run directory whose NN and LH to attack (default: an untrained DIGITS-NN)"),
                      registry.arg("--images", type=int, default=2000)))
def _cli(args):
    return run(args.run, args.images)
