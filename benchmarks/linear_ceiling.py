"""How well can any linear head do on a run's frozen conv features? (Why LH trails the NN on CIFAR-10.)

A multinomial logistic regression (softmax) head, trained with L-BFGS (150 iterations, float32) on all training features for
a small grid of L2 strengths, on the raw and on standardised features, scored on the test set; beside
it the run's own NN (its fully connected layers on the same features) and LH (one-vs-rest linear
SVM). If the best linear head lands near LH, the gap to the NN is the features' linear
separability, not the SVM fit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import registry


def _softmax_head(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 150) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * (head.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def run(run_dir: Path, l2_grid: tuple[float, ...] = (1e-4, 1e-3)) -> Path:
    """Every (features, l2) head; writes benchmarks/results/linear_ceiling_<dataset>.json."""
    from benchmarks.common import load_run as _load, machine as _machine, write_result as _write
    from cnnrepair.io import load_npz
    from cnnrepair.paper.pipeline import open_dataset
    from cnnrepair.paper.rundir import RunDir

    res = _load(run_dir)
    ds = open_dataset(RunDir(run_dir))
    feats = load_npz(run_dir / "features.npz", "feature cache")
    xtr, xte = torch.as_tensor(feats["train"], dtype=torch.float32), torch.as_tensor(feats["test"], dtype=torch.float32)
    ytr, yte = torch.as_tensor(ds.y_train), torch.as_tensor(ds.y_test)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    rows = []
    for name, (a, b) in {"raw": (xtr, xte), "standardised": ((xtr - mean) / std, (xte - mean) / std)}.items():
        for l2 in l2_grid:
            t0 = time.perf_counter()
            head = _softmax_head(a, ytr, l2)
            with torch.no_grad():
                acc_tr = float((head(a).argmax(1) == ytr).float().mean())
                acc_te = float((head(b).argmax(1) == yte).float().mean())
            rows.append({"features": name, "l2": l2, "train_accuracy": acc_tr, "test_accuracy": acc_te, "seconds": time.perf_counter() - t0})
            print(f"{name} l2={l2:g}: train {100 * acc_tr:.2f}%, test {100 * acc_te:.2f}%", flush=True)
    out = {"machine": _machine(), "command": f"python -m benchmarks.run linear-ceiling {run_dir}", "dataset": res["dataset"],
           "features": int(xtr.shape[1]), "n_train": int(len(ytr)), "n_test": int(len(yte)),
           "run_accuracy": {k: res["accuracy"][k] for k in ("nn", "lh", "kh") if k in res["accuracy"]}, "rows": rows}
    return _write(f"linear_ceiling_{res['dataset']}.json", out)


def table(result: dict) -> str:
    """Markdown: each softmax head's test accuracy beside the run's NN, LH and KH."""
    acc = result["run_accuracy"]
    lines = ["| head on the frozen features | test accuracy |", "| --- | --- |"]
    lines += [f"| NN's own fully connected layers | {100 * acc['nn']:.2f}% |", f"| LH (one-vs-rest linear SVM) | {100 * acc['lh']:.2f}% |"]
    if "kh" in acc:
        lines.append(f"| KH (RBF SVM) | {100 * acc['kh']:.2f}% |")
    for r in result["rows"]:
        lines.append(f"| softmax, {r['features']} features, L2 {r['l2']:g} (train {100 * r['train_accuracy']:.2f}%) | {100 * r['test_accuracy']:.2f}% |")
    return "\n".join(lines)


registry.section("linear_ceiling_*.json", order=140, title=lambda d: f"### The best linear head on {d['dataset']}'s frozen conv features",
                 intro=lambda d: f"{registry.measured_on(d)}; a softmax head trained with L-BFGS on all {d['n_train']:,} training "
                                 f"features ({d['features']:,} of them), scored on the {d['n_test']:,} test images, "
                                 "beside the run's own heads.", table=table)


@registry.command("linear-ceiling", "the best linear (softmax) head on a run's frozen features", order=130,
                  arguments=registry.arguments(registry.arg("run", type=Path, help="a finished run directory (features.npz, NN and LH)")))
def _cli(args):
    return run(args.run)
