"""Human-readable summaries and figures written from a run's ``results.json``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnrepair.io import write_text
from cnnrepair.plotting import pyplot
from cnnrepair.paper.rundir import RunDir


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def write_summary(run: RunDir) -> Path:
    """Write ``summary.md`` from results.json and return its path."""
    res = run.results
    acc, params, t = res.get("accuracy", {}), res.get("params", {}), res.get("timings_s", {})
    lines = [f"# cnnrepair run: {res.get('dataset', '?')}", "",
             f"Architecture {res.get('arch', '?')}, seed {res.get('seed', '?')}, "
             f"{res.get('training', {}).get('n_train', '?')} train / {res.get('training', {}).get('n_test', '?')} test images.", "",
             "| model | test accuracy | parameters |", "| --- | --- | --- |"]
    nn_params = params.get("nn", {})
    if "nn" in acc:
        lines.append(f"| NN | {_pct(acc['nn'])} | {nn_params.get('total', 0):,} ({nn_params.get('features', 0):,} features + {nn_params.get('head', 0):,} head) |")
    for kind in ("lh", "kh", "rlh"):
        if kind in acc:
            lines.append(f"| {kind.upper()} | {_pct(acc[kind])} | {nn_params.get('features', 0):,} features + {params.get(kind, 0):,} head values |")
    for name, a in res.get("attack", {}).items():
        lines += ["", f"## {name.upper()}: accuracy on each model's own adversarial test set ({a['n_images']} images)", "",
                  "| model | clean | " + " | ".join(f"eps {e:g}" for e in a["eps"]) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in a["eps"]) + " |"]
        lines += [f"| {m.upper()} | {_pct(a['clean'][m])} | " + " | ".join(_pct(v) for v in accs) + " |" for m, accs in a["own"].items()]
    repairs = {"main repair": res["repair"]} if "repair" in res else {}
    repairs.update({f"repair variant {k}": v for k, v in res.get("repair_variants", {}).items()})
    for title, rep in repairs.items():
        lines += ["", f"## {title} (fixed: LH's true test adversaries RLH gets right)", "",
                  "| eps | K used | selection | status | Data RLH | drawdown | fixed | efficacy | note |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in rep.get("entries", []):
            if "accuracy" in e:
                lines.append(f"| {e['eps']:g} | {e['k_used']} | {e['selection']} | {e['lp']['status']} | {_pct(e['accuracy']['rlh']['data'])} | "
                             f"{100 * e['drawdown']:.2f} | {_pct(e['generalisation'])} | {_pct(e['efficacy'])} | {e.get('warning', '')} |")
            else:
                lines.append(f"| {e['eps']:g} | {e.get('k_used', '-')} | {e['selection']} | {e.get('lp', {}).get('status', '-')} | - | - | - | - | "
                             f"{e.get('error', '')} |")
    if t:
        lines += ["", "| step | seconds |", "| --- | --- |"] + [f"| {k} | {v:.1f} |" for k, v in t.items()]
    path = run.path / "summary.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


MODEL_STYLE = {"nn": ("NN", "tab:blue"), "lh": ("LH", "tab:orange"), "kh": ("KH", "tab:green"), "rlh": ("RLH", "tab:red")}


def plot_attack_curves(attack_results: dict, dataset: str, path: Path) -> Path:
    """Paper figure 2: accuracy on each model's own adversarial test set against epsilon, one panel per attack."""
    from cnnrepair.io import atomic_write

    plt = pyplot()
    names = list(attack_results)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = attack_results[name]
        for model, accs in r["own"].items():
            label, color = MODEL_STYLE.get(model, (model.upper(), None))
            ax.plot(r["eps"], [100 * a for a in accs], marker="o", label=label, color=color)
            ax.axhline(100 * r["clean"][model], color=color, linestyle=":", linewidth=1)
        ax.set_title(f"{name.upper()} on {dataset} ({r['n_images']} test images)")
        ax.set_xlabel("epsilon (L-inf, pixels in [0, 1])")
        ax.set_ylabel("accuracy on own adversarial test set (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def plot_examples(clean: np.ndarray, adv: np.ndarray, labels, clean_pred, adv_pred, classes: list[str], title: str, path: Path) -> Path:
    """A row of clean images over their adversarial versions, each with the model's prediction."""
    from cnnrepair.io import atomic_write

    plt = pyplot()
    n = len(clean)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.6 * max(n, 1), 3.6), squeeze=False)
    for i in range(n):
        for row, (img, pred) in enumerate(((clean[i], clean_pred[i]), (adv[i], adv_pred[i]))):
            ax = axes[row][i]
            im = img.transpose(1, 2, 0)
            ax.imshow(im[..., 0] if im.shape[2] == 1 else im, cmap="gray" if im.shape[2] == 1 else None, vmin=0, vmax=1)
            ok = pred == labels[i]
            ax.set_title(f"{'clean' if row == 0 else 'adv'}: {classes[pred]}", fontsize=8, color="black" if ok else "red")
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


SPLITS = [("data", "Data (clean test set)"), ("adv", "fixed: LH's true test adversaries"), ("nadv", "NADV (NN's adversarial set)"),
          ("hadv", "HADV (LH's adversarial set)"), ("rhadv", "RHADV (fresh attack on RLH)")]


def plot_repair(entries: list[dict], dataset: str, path: Path) -> Path:
    """Paper figure 3: accuracy of NN, LH and each RLH variant against epsilon on every evaluation set."""
    from cnnrepair.io import atomic_write

    plt = pyplot()
    ok = [e for e in entries if "accuracy" in e]
    fig, grid = plt.subplots(2, 3, figsize=(13, 7.6), squeeze=False)  # five panels and a legend, readable at page width
    axes = [grid.reshape(-1)[:len(SPLITS)]]
    variants = sorted({(e["k"], e["selection"]) for e in ok})
    used = {v: sorted({e["k_used"] for e in ok if (e["k"], e["selection"]) == v}) for v in variants}
    colours = plt.get_cmap("Reds")(np.linspace(0.45, 0.95, max(1, len(variants))))
    styles = ["-", "--", "-.", ":"]
    for ax, (split, title) in zip(axes[0], SPLITS):
        # RHADV differs per RLH variant, so NN and LH are drawn there on their own set (HADV) for reference
        ref_split = "hadv" if split == "rhadv" else split
        for model in ("nn", "lh") if split != "rhadv" else ("lh",):
            pts = sorted({(e["eps"], e["accuracy"][model][ref_split]) for e in ok if e["accuracy"][model][ref_split] is not None})
            if pts:
                label, color = MODEL_STYLE[model]
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", color=color,
                        label=label if split != "rhadv" else "LH on HADV", linestyle="-" if split != "rhadv" else "--")
        for i, (k, sel) in enumerate(variants):
            pts = sorted((e["eps"], e["accuracy"]["rlh"][split]) for e in ok if (e["k"], e["selection"]) == (k, sel)
                         and e["accuracy"]["rlh"][split] is not None)
            if pts:
                kk = f"{k}" if used[(k, sel)] == [k] else f"{'/'.join(map(str, used[(k, sel)]))} of {k}"
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="s", color=colours[i],
                        linestyle=styles[i % len(styles)], label=f"RLH K={kk}{'' if sel == 'none' else ', ' + sel}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epsilon")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    legend_ax = grid.reshape(-1)[-1]
    legend_ax.axis("off")
    legend_ax.legend(list(handles.values()), list(handles), loc="center", fontsize=9)
    fig.suptitle(f"Repair of the linear hybrid on {dataset}", fontsize=10)
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)
