"""Benchmarks and the committed results: `python -m benchmarks.run NAME [options]`.

NAME is one of:
  collect   copy measured figures from run directories into benchmarks/results/*.json
  readme    regenerate docs/results.md and the README's headline results from benchmarks/results/*.json
  kh        exact KH fit time against training-set size (power-law extrapolation to the full set)
  attack-overhead  FGSM through our wrapper against Foolbox called directly (the wrapper's cost)
  k1        one-point repair ceiling: every candidate repair point tried, scored on the test set
  lp        repair-LP scaling: our default path against cvxopt and one generic cvxpy model
  threads   LP solve time with one and two BLAS threads, on an idle machine and beside a busy process
  field     the repair field's measures on MNIST-C fog (efficacy, drawdown, generalisation)
  margins   pointwise repair program: our solver against HiGHS on the whole LP (L1 and PRDNN's program)
  margin-threads  the pointwise program with one and two BLAS threads
  prdnn     PRDNN itself (pip prdnn 1.0 on Gurobi, its own interpreter) against our solver on its program
  large-k   the targets program with 2,000-60,000 repair points: our interior point against HiGHS (and on CUDA)
  workflow  cnnrepair points + repair + verify on the MNIST run's models exported as ONNX, timed
  linear-ceiling  the best softmax head on a run's frozen features, beside its NN and LH
  certified certified (ball) repair on digits and MNIST: IBP against CROWN, certified accuracy before and after

Every JSON written here records the machine's core count, the library versions and the commands
that produced its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from benchmarks import common


def collect(runs: list[Path]) -> list[Path]:
    """accuracy.json, attack.json and repair.json from finished run directories.

    A run's main repair is labelled with the run's name, each of its repair variants (``cnnrepair
    repair --variant NAME``) as ``<run>-<NAME>``.
    """
    acc, att, rep = {}, {}, {}
    out_figs: list[Path] = []
    for run in runs:
        r = common.load_run(run)
        jpeg = " (JPEG q75)" if r["dataset"] == "cifar10" and "jpeg" in str(r["_config"].get("data_dir", "")) else ""
        label = run.name + jpeg
        shared = {"run": str(run), "dataset": r["dataset"], "commands": r.get("commands", []), "seed": r["seed"],
                  "devices": r.get("devices", {})}
        acc[label] = {
            "accuracy": r["accuracy"], "params": r["params"], "epochs": r["training"]["config"]["epochs"],
            "training": r["training"]["config"], "n_train": r["training"]["n_train"], "n_test": r["training"]["n_test"],
            "hybrid": r.get("hybrid", {}), "timings_s": r["timings_s"], **shared,
        }

        for fig in ("attack_curves", "repair"):
            src = run / "figures" / f"{fig}.png"
            if src.is_file():
                import shutil

                dest = common.RESULTS / f"{run.name}_{fig}.png"
                shutil.copyfile(src, dest)
                out_figs.append(dest)
        if "attack" in r:
            att[label] = {name: {k: v for k, v in a.items()} for name, a in r["attack"].items()} | {"_": shared}
        if "repair" in r:
            rep[label] = {**r["repair"], "_": shared}
        for variant, v in r.get("repair_variants", {}).items():
            rep[f"{run.name}-{variant}{jpeg}"] = {**v, "_": shared}
    out = list(out_figs)
    machine = common.machine()
    if acc:
        out.append(common.write_result("accuracy.json", {"machine": machine, "datasets": acc}))
    if att:
        out.append(common.write_result("attack.json", {"machine": machine, "datasets": att}))
    if rep:
        out.append(common.write_result("repair.json", {"machine": machine, "datasets": rep}))
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _compare_sentence(a: dict) -> str:
    """How LH fares against NN (the paper: LH more vulnerable), computed from the curves."""
    own, eps = a["own"], a["eps"]
    if "lh" not in own or "nn" not in own:
        return ""

    def where(flags: list[bool]) -> str:
        hits = [f"{e:g}" for e, f in zip(eps, flags) if f]
        return "every eps" if len(hits) == len(eps) else ("eps " + ", ".join(hits) if hits else "no eps")

    parts = [f"LH is more vulnerable than NN at {where([lh < nn for lh, nn in zip(own['lh'], own['nn'])])} (the paper found LH more vulnerable)",
             f"LH is below its clean accuracy at {where([lh < a['clean']['lh'] for lh in own['lh']])}"]
    if "kh" in own:
        parts.append(f"KH is more robust than NN at {where([k > n for k, n in zip(own['kh'], own['nn'])])}")
    return "; ".join(parts) + "."


def _plain_entries(r: dict) -> list[dict]:
    """A repair run's evaluated entries without feature selection."""
    return [e for e in r["entries"] if "accuracy" in e and e["selection"] == "none"]


def _target_table(rep: dict, fixed_min: float = 0.2, drawdown_max: float = 0.5) -> list[str]:
    """Per repair run and K: "fixed / drawdown" at each eps, marked where both targets are met."""
    lines = [f"**Repair targets at a glance**: fixed % / drawdown points for each run and K; "
             f"**bold** where at least {100 * fixed_min:g}% of unseen LH adversaries are fixed and at most "
             f"{drawdown_max:g} points of clean accuracy are lost (selection none).", ""]
    for ds, r in rep.items():
        entries = _plain_entries(r)
        eps = sorted({e["eps"] for e in entries})
        if not eps:
            continue
        lines += [f"| {ds} | " + " | ".join(f"eps {x:g}" for x in eps) + " |", "| --- |" + " --- |" * len(eps)]
        for k in sorted({e["k"] for e in entries}):
            cells = []
            for x in eps:
                e = next((e for e in entries if e["eps"] == x and e["k"] == k), None)
                if e is None:
                    cells.append("-")
                    continue
                cell = f"{100 * e['generalisation']:.1f} / {100 * e['drawdown']:.2f}"
                cells.append(f"**{cell}**" if e["generalisation"] >= fixed_min and 100 * e["drawdown"] <= drawdown_max else cell)
            lines.append(f"| K = {k} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def plot_targets(rep: dict, dataset: str, path: Path, fixed_min: float = 0.2, drawdown_max: float = 0.5,
                 k1: dict | None = None) -> Path | None:
    """Fixed share and drawdown against eps for every repair run and K of one dataset, with the targets drawn in.

    ``k1`` (a ``k1_ceiling.json`` of the same dataset) adds the best single repair point within budget.
    """
    from cnnrepair.io import atomic_write
    from cnnrepair.plotting import pyplot

    runs = {label: r for label, r in rep.items() if r["_"].get("dataset") == dataset}
    if not runs:
        return None
    plt = pyplot()
    fig, (ax_f, ax_d) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, r in runs.items():
        entries = _plain_entries(r)
        for k in sorted({e["k"] for e in entries}):
            pts = sorted((e["eps"], 100 * e["generalisation"], 100 * e["drawdown"]) for e in entries if e["k"] == k)
            style = "--" if k == 1 else "-"
            line, = ax_f.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle=style, label=f"{label} K={k}")
            ax_d.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", linestyle=style, color=line.get_color())
    if k1 is not None and k1["dataset"] == dataset:
        best: dict[float, float] = {}
        for row in k1["rows"]:
            if row["fixed_max_within_budget"] is not None:
                best[row["eps"]] = max(best.get(row["eps"], 0.0), row["fixed_max_within_budget"])
        ax_f.plot(sorted(best), [best[e] for e in sorted(best)], color="k", linestyle=":", marker="x",
                  label="K=1, best point picked on the test set")
    ax_f.axhline(100 * fixed_min, color="k", linewidth=0.8)
    ax_d.axhline(drawdown_max, color="k", linewidth=0.8)
    ax_f.set(xlabel="epsilon", ylabel="unseen LH adversaries fixed (%)", title="generalisation (target: above the line)")
    ax_d.set(xlabel="epsilon", ylabel="clean accuracy lost (points)", title="drawdown (target: below the line)")
    ax_d.set_ylim(-0.5, max(3.0, drawdown_max * 2))
    for ax in (ax_f, ax_d):
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=7)
    fig.suptitle(f"Repair of LH on {dataset}: every run and K (selection none)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def readme_section(base: Path | None = None) -> str:
    """The results section, generated from benchmarks/results/*.json; figure links relative to ``base``
    (the folder of the file it goes into; default the README's)."""
    base = common.README.parent if base is None else base

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, base)).as_posix()

    lines = []
    acc_path = common.RESULTS / "accuracy.json"
    if acc_path.is_file():
        acc = json.loads(acc_path.read_text())
        lines += ["### Accuracy on the full test sets (paper section 3.1)", "",
                  "| dataset | NN | LH | KH | paper NN / LH / KH | epochs | train s (device) | LH fit s | KH fit s (training samples) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        paper = {"mnist": "97.12 / 98.72 / 98.86", "cifar10 (JPEG q75)": "85.4 / 85.6 / 85.51", "cifar10": "85.4 / 85.6 / 85.51"}
        for ds, r in acc["datasets"].items():
            a, t = r["accuracy"], r["timings_s"]
            kh_n = r.get("hybrid", {}).get("kh", {}).get("n_train", "-")
            dev = r.get("devices", {}).get("train", "cpu").split(" (")[-1].rstrip(")")
            lines.append(f"| {ds} | {_pct(a.get('nn'))} | {_pct(a.get('lh'))} | {_pct(a.get('kh'))} | {paper.get(ds, '-')} | {r['epochs']} | "
                         f"{t.get('train', 0):.0f} ({dev}) | {t.get('fit_lh', 0):.0f} | {t.get('fit_kh', 0):.0f} ({kh_n}) |")
        lines += ["", f"Everything but the training marked with a GPU ran on {acc['machine']['cores']} CPU cores, "
                      f"{acc['machine']['measured']}; commands in `benchmarks/results/accuracy.json`.", "",
                  "Pipeline timings (seconds per stage, as recorded in each run's `results.json`; stages that ran while "
                  "other jobs shared the 2 cores are slower than they would be alone):", ""]
        stages = ["train", "features", "fit_lh", "fit_kh", "attack_fgsm", "attack_pgd", "repair"]
        lines += ["| dataset | " + " | ".join(stages) + " |", "|" + " --- |" * (len(stages) + 1)]
        for ds, r in acc["datasets"].items():
            t = r["timings_s"]
            lines.append(f"| {ds} | " + " | ".join(f"{t[k]:.0f}" if k in t else "-" for k in stages) + " |")
        lines.append("")
    att_path = common.RESULTS / "attack.json"
    if att_path.is_file():
        att = json.loads(att_path.read_text())
        lines += ["### Accuracy under attack (paper figure 2): each model on its own adversarial test set", ""]
        lines += [f"![{p.stem}]({link(p)})" for p in sorted(common.RESULTS.glob("*_attack_curves.png"))] + [""]
        for ds, attacks in att["datasets"].items():
            for name, a in attacks.items():
                if name == "_":
                    continue
                lines += [f"**{ds}, {name.upper()}** ({a['n_images']} test images"
                          + (f", {a['settings']['steps']} steps" if a['settings']['steps'] > 1 else "") + ")", "",
                          "| model | clean | " + " | ".join(f"eps {e:g}" for e in a["eps"]) + " | s / 10k images |",
                          "| --- | --- | " + " | ".join("---" for _ in a["eps"]) + " | --- |"]
                for m, accs in a["own"].items():
                    sec = a["seconds_per_10k_images"].get(m)
                    lines.append(f"| {m.upper()} | {_pct(a['clean'][m])} | " + " | ".join(_pct(v) for v in accs)
                                 + f" | {'-' if sec is None else f'{sec:.1f}'} |")
                lines += ["", _compare_sentence(a), ""]
    rep_path = common.RESULTS / "repair.json"
    if rep_path.is_file():
        rep = json.loads(rep_path.read_text())
        lines += ["### Repair of the linear head (paper figure 3)", ""]
        lines += [f"![{p.stem}]({link(p)})" for p in sorted(common.RESULTS.glob("*_repair.png"))] + [""]
        lines += [
                  "Data: clean test accuracy; fixed: share of LH's unseen test adversaries RLH gets right (generalisation), "
                  "counting only true adversarial examples, images LH classifies correctly when clean (LH adv.: how many); "
                  "HADV / RHADV: LH on its adversarial test set, RLH on a fresh attack on itself.", ""]
        for ds, r in rep["datasets"].items():
            s = r["settings"]
            extra = (f", {s['extra_anchors']} extra clean anchors at slack weight {s.get('anchor_weight', 1.0):g}"
                     if s.get("extra_anchors") else "")
            dw = f", slack weight {s['delta_weight']:g}" if s.get("delta_weight", 1.0) != 1.0 else ""
            if s.get("anchor_weights"):
                extra = (f", {s['extra_anchors']} extra clean anchors, slack weight calibrated over {', '.join(f'{w:g}' for w in s['anchor_weights'])} "
                         f"to {s['drawdown_budget']:g} points of drawdown on {s['val_images']:,} held-out training images")
            if s.get("min_point_eps"):
                extra += f", repair points attacked at eps >= {s['min_point_eps']:g}"
            cal = any("calibration" in e for e in r["entries"])
            if s.get("spec") == "pointwise":
                lines += [f"**{ds}** (pointwise spec: every repair point labelled with margin {s['margin']:g}, "
                          f"{s['extra_anchors']} extra clean anchors as hard keep points, minimal L1 change of W)", "",
                          "| eps | K | selection | LP variables | LP s | Data LH | Data RLH | drawdown | fixed | LH adv. | efficacy | HADV LH | RHADV RLH |",
                          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            else:
                lines += [f"**{ds}** (target {s['target']}, anchors {s.get('anchors', 'none')}{extra}{dw}, points {s.get('points', 'random')}, "
                          f"solver {s['solver']})", "",
                          "| eps | K | selection | LP variables | LP s | Data LH | Data RLH | drawdown | fixed | LH adv. | efficacy | HADV LH | RHADV RLH |"
                          + (" anchor weight (held-out drawdown) |" if cal else ""),
                          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if cal else "")]
            for e in r["entries"]:
                if "accuracy" not in e:
                    lines.append(f"| {e['eps']:g} | {e['k']} | {e['selection']} | - | - | - | - | - | - | - | - | - | {e.get('error', '')} |"
                                 + (" - |" if cal else ""))
                    continue
                a = e["accuracy"]
                row = (f"| {e['eps']:g} | {e['k_used']} | {e['selection']} | {e['lp']['size']['variables']:,} | {e['lp']['seconds']:.2f} | "
                       f"{_pct(a['lh']['data'])} | {_pct(a['rlh']['data'])} | {100 * e['drawdown']:.2f} | {_pct(e['generalisation'])} | "
                       f"{e['unseen_lh_adversaries']:,} | {_pct(e['efficacy'])} | {_pct(a['lh']['hadv'])} | {_pct(a['rlh']['rhadv'])} |")
                if cal:
                    c = e.get("calibration")
                    kept = c["tried"][-1] if c else {}  # calibration keeps the last weight it tried
                    row += (f" {c['anchor_weight']:g} ({kept.get('val_drawdown', float('nan')):.2f})"
                            + ("" if c["budget_met"] else ", over budget") + " |") if c else " - |"
                lines.append(row)
            lines.append("")
        lines += _target_table(rep["datasets"])
        k1_file = common.RESULTS / "k1_ceiling.json"
        fig = plot_targets(rep["datasets"], "mnist", common.RESULTS / "mnist_repair_targets.png",
                           k1=json.loads(k1_file.read_text()) if k1_file.is_file() else None)
        if fig is not None:
            lines += [f"![{fig.stem}]({link(fig)})", ""]
    k1_path = common.RESULTS / "k1_ceiling.json"
    if k1_path.is_file():
        from benchmarks.k1_ceiling import table as k1_table

        k1 = json.loads(k1_path.read_text())
        lines += [f"### One repair point: the ceiling ({k1['dataset']})", "",
                  f"`{k1['command']}`: each of the first {max(r['candidates'] for r in k1['rows'])} adversarial training examples "
                  f"of LH is tried as the single repair point (K = 1); the repaired head is scored on the unseen LH test "
                  f"adversaries (fixed, %) and on clean test images (drawdown, budget {k1['budget_points']:g} points). "
                  "The best candidate is chosen *on the test set*, so it bounds any rule that picks one point. "
                  "Columns changed: the most feature columns of W any single-point repair touched.", "",
                  k1_table(k1), ""]
    for kh_path in sorted(common.RESULTS.glob("kh_scaling_*.json")):
        kh = json.loads(kh_path.read_text())
        lines += [f"### Exact KH fitting time on {kh['dataset']} features", "",
                  "| training features | fit s | support vectors | KH test accuracy |", "| --- | --- | --- | --- |"]
        lines += [f"| {p['n_train']:,} | {p['seconds']:.0f} | {p['n_support']:,} | {_pct(p['test_accuracy'])} |" for p in kh["points"]]
        if kh.get("extrapolated_full_seconds"):
            lines += ["", f"Fit time grows as n^{kh['power_law_exponent']:.2f} here; the exact fit on all {kh['n_full']:,} "
                          f"training features would take about {kh['extrapolated_full_seconds'] / 3600:.1f} hours on this machine "
                          f"(`{kh['command']}`)."]
        lines.append("")
    ov_path = common.RESULTS / "attack_overhead.json"
    if ov_path.is_file():
        ov = json.loads(ov_path.read_text())
        lines += [f"### Attack wrapper overhead ({ov['dataset']}, FGSM eps {ov['eps']}, median of {ov['rounds']} rounds)", "",
                  "| model | Foolbox direct (images/s) | cnnrepair.attack (images/s) | overhead |", "| --- | --- | --- | --- |"]
        for m, r in ov["models"].items():
            lines.append(f"| {m.upper()} | {r['images_per_s']['foolbox']:.0f} | {r['images_per_s']['cnnrepair']:.0f} | {100 * r['overhead']:+.1f}% |")
        lines.append("")
    from benchmarks.field import table as field_table
    from benchmarks.lp_scaling import rows_table as lp_table  # regenerated, so table changes apply to old runs too
    from benchmarks.margin_speed import table as margin_table
    from benchmarks.threads import table as threads_table

    def on(d: dict) -> str:
        return f"`{d['command']}` on {d['machine']['cores']} CPU cores, {d['machine']['measured']}"

    def fog_intro(fg: dict) -> str:
        t = fg["task"]
        return (f"`{fg['command']}`: fog severity {t['severity']} on the MNIST test set (seed {t['seed']}); repair the first "
                f"{t['repair_images']} fog images (pointwise, L1), generalisation on the other {t['generalisation_images']:,}, "
                f"drawdown on the clean test set; keep points: {t['keep_images']:,} clean training images the model gets right.")

    lines += _table_section("threads.json", lambda d: "### Threads for the repair LP (random ReLU-like features, 10 classes)",
                            lambda d: f"{on(d)}; \"busy\": a second process multiplies NumPy matrices with its default threads "
                                      "meanwhile. The default is one thread.", threads_table)
    lines += _table_section("lp_scaling.json", lambda d: "### Repair LP scaling (10 classes; random ReLU-like and real repair-pool features)",
                            lambda d: f"{on(d)}; each path runs in its own process under a {d['cap_s']:g} s cap. "
                                      "`ours (auto)` is the default `repair()` path.", lambda d: lp_table(d["rows"]))
    lines += _table_section("margin_speed.json", lambda d: "### Pointwise repair: our solver against HiGHS on the whole program",
                            lambda d: f"{on(d)}; each solve in its own process under a {d['cap_s']:g} s cap (a program that timed "
                                      f"out is not tried on larger sizes). {d['problems']}.", lambda d: margin_table(d["rows"]))
    from benchmarks.margin_speed import threads_table as margin_threads_table

    lines += _table_section("margin_threads.json", lambda d: "### Pointwise repair with one and two BLAS threads",
                            lambda d: f"{on(d)}; {d['problems']}, each solve in its own process; `cnnrepair repair` and "
                                      "`repair_classifier` use one thread unless `--threads` / `threads=` / `CNNREPAIR_THREADS` "
                                      "say otherwise.", lambda d: margin_threads_table(d["rows"]))
    from benchmarks.versus_prdnn import table as prdnn_table

    lines += _table_section("prdnn.json", lambda d: "### PRDNN itself (Gurobi) against our solver, on PRDNN's program",
                            lambda d: f"`{d['command']}` on {d['machine']['cores']} CPU cores, {d['machine']['measured']}; PRDNN "
                                      f"{d['prdnn_versions'].get('prdnn', '?')} with pysyrenn {d['prdnn_versions'].get('pysyrenn', '?')} "
                                      f"and gurobipy {d['prdnn_versions'].get('gurobipy', '?')} (size-limited licence: 2,000 variables "
                                      f"or constraints) in its own interpreter. {d['program']}. PRDNN's time is its whole `compute()` "
                                      "(Jacobian, model, Gurobi); \"optima agree\" compares the cost of PRDNN's change with our "
                                      "certified optimum.", lambda d: prdnn_table(d["rows"]))
    from benchmarks.large_k import table as large_table

    lines += _table_section("large_k.json", lambda d: "### The targets program with tens of thousands of repair points",
                            lambda d: f"{on(d)}; each solve in its own process (ours capped at {d['cap_s']:g} s, HiGHS at "
                                      f"{d['highs_cap_s']:g} s; HiGHS is not tried again on a problem at least as large as one it "
                                      "timed out on). Times are ratios to ours; memory is what the solve added beyond its input.",
                            large_table)
    lines += _table_section("large_k_gpu.json", lambda d: f"### The same solver on a GPU ({d['device']})",
                            lambda d: f"{d['about']} Commands: `{d['rows'][0]['command']}` (first call) and `{d['command']}`; "
                                      "times are ratios to CUDA.", large_table)
    from benchmarks.linear_ceiling import table as ceiling_table
    from benchmarks.workflow import table as workflow_table

    for path in sorted(common.RESULTS.glob("linear_ceiling_*.json")):
        lines += _table_section(path.name, lambda d: f"### The best linear head on {d['dataset']}'s frozen conv features",
                                lambda d: f"{on(d)}; a softmax head trained with L-BFGS on all {d['n_train']:,} training "
                                          f"features ({d['features']:,} of them), scored on the {d['n_test']:,} test images, "
                                          "beside the run's own heads.", ceiling_table)

    lines += _table_section("workflow_onnx.json", lambda d: "### Your model from a file: points, repair and verify on ONNX",
                            lambda d: f"{on(d)}; the MNIST run's NN and LH exported as ONNX and used as a user's files, points "
                                      "from the MNIST test set, each command in its own process (wall seconds, start-up "
                                      "included).", workflow_table)
    from benchmarks.certified import table as certified_table

    for path in sorted(common.RESULTS.glob("certified_*.json")):
        lines += _table_section(path.name, lambda d: f"### Certified repair on {d['dataset']}: every input of an L-infinity ball, IBP against CROWN",
                                lambda d: f"{on(d)}; per repair: the first {d['task']['k']} of {d['task']['candidates']} test images "
                                          f"(first half of the test set) whose ball CROWN does not certify (the same points for both "
                                          f"methods), up to {d['task']['keep']} keep points (correctly classified images of the "
                                          "first half; hard; as points, or with CROWN also as balls), "
                                          f"margin {d['task']['margin']:g}, L1, {d['task']['time_limit_s']:g} s per repair; certified and PGD accuracy (50 steps, 5 restarts) on "
                                          f"{d['task']['eval']} unseen test images (second half), drawdown on the whole second half; "
                                          "seconds include bounding the repair (and keep-ball) points.", certified_table)
    lines += _table_section("field_fog.json", lambda d: f"### The field's measures on MNIST-C fog ({d['run']})", fog_intro, field_table)
    return "\n".join(lines).rstrip() + "\n"


def _table_section(name: str, title, intro, table) -> list[str]:
    """Title, one sentence saying how it was measured, and the table of ``benchmarks/results/NAME`` (nothing if absent)."""
    path = common.RESULTS / name
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    return [title(data), "", intro(data), "", table(data), ""]


RESULTS_MARKERS = ("<!-- results:begin -->", "<!-- results:end -->")
HEADLINE_MARKERS = ("<!-- headline:begin -->", "<!-- headline:end -->")


def _anchor(title: str) -> str:
    """The anchor a Markdown renderer gives a heading (GitHub's rule: lower case, punctuation dropped, spaces to hyphens)."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def headline_section(results_doc: Path, base: Path) -> str:
    """The README's headline results: the accuracy table and a link to every table of the results page."""
    section = readme_section(base)
    lines, tables = [], []
    for line in section.splitlines():
        if line.startswith("### "):
            tables.append(line[4:])
    acc = section.split("### Accuracy on the full test sets (paper section 3.1)", 1)
    if len(acc) == 2:
        body = acc[1].split("\n\n", 2)
        lines += ["**Accuracy on the full test sets** (the paper's section 3.1):", "", body[1].strip(), ""]
    rel = Path(os.path.relpath(results_doc, base)).as_posix()
    lines += ["Every table, with the command that made it, in [" + rel + "](" + rel + "):", ""]
    lines += [f"- [{t}]({rel}#{_anchor(t)})" for t in tables]
    return "\n".join(lines) + "\n"


def _replace(text: str, markers: tuple[str, str], body: str) -> str:
    begin, end = markers
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def readme() -> Path:
    """Regenerate, from benchmarks/results/*.json, the results section (between the results markers:
    docs/results.md) and the README's headline results (between the headline markers)."""
    results_doc = common.README.parent / "docs" / "results.md"
    done = []
    for target in (common.README, results_doc):
        if not target.is_file():
            continue
        text = target.read_text()
        new = text
        if all(m in new for m in RESULTS_MARKERS):
            new = _replace(new, RESULTS_MARKERS, readme_section(target.parent))
        if all(m in new for m in HEADLINE_MARKERS):
            new = _replace(new, HEADLINE_MARKERS, headline_section(results_doc, target.parent))
        if new != text or any(m in text for m in RESULTS_MARKERS + HEADLINE_MARKERS):
            done.append(target)
            if new != text:
                target.write_text(new)
    if not done:
        raise SystemExit(f"{common.README}: results markers missing; add {RESULTS_MARKERS[0]} and {RESULTS_MARKERS[1]}")
    return common.README


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    p = sub.add_parser("collect", help="copy figures from finished run directories into benchmarks/results")
    p.add_argument("runs", nargs="+", type=Path)
    sub.add_parser("readme", help="regenerate docs/results.md and the README's headline results")
    p = sub.add_parser("kh", help="exact KH fit time against training-set size on a run's features")
    p.add_argument("run", type=Path)
    p.add_argument("--sizes", default="2500,5000,10000", help="comma-separated training-set sizes")
    p = sub.add_parser("attack-overhead", help="FGSM through cnnrepair's wrapper against Foolbox called directly")
    p.add_argument("--run", type=Path, default=None, help="run directory whose NN and LH to attack (default: an untrained DIGITS-NN)")
    p.add_argument("--images", type=int, default=2000)
    p = sub.add_parser("k1", help="ceiling of one-point repair: every candidate point tried, scored on the test set")
    p.add_argument("run", type=Path)
    p.add_argument("--candidates", type=int, default=200, help="adversarial training examples tried as the one point (default 200)")
    p.add_argument("--budget", type=float, default=0.5, help="drawdown budget in points of clean accuracy (default 0.5)")
    p = sub.add_parser("threads", help="LP time with 1 and 2 BLAS threads, idle and beside a busy process")
    p.add_argument("--cap", type=float, default=120.0, help="seconds a solve may take (default 120)")
    p = sub.add_parser("field", help="efficacy, drawdown and generalisation of pointwise repair on MNIST-C fog")
    p.add_argument("run", type=Path, help="a finished MNIST run directory (NN and LH)")
    p = sub.add_parser("margins", help="pointwise repair program: our solver against HiGHS on the whole LP")
    p.add_argument("--quick", action="store_true", help="tiny sizes, written to a temporary folder (a smoke check)")
    p.add_argument("--cap", type=float, default=300.0, help="seconds each solve may take (default 300)")
    p = sub.add_parser("margin-threads", help="pointwise repair program with one and two BLAS threads (the CLI's default is one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, written to a temporary folder (a smoke check)")
    p.add_argument("--cap", type=float, default=300.0, help="seconds each solve may take (default 300)")
    p = sub.add_parser("prdnn", help="PRDNN itself (Gurobi) against our solver on PRDNN's program, where its licence allows")
    p.add_argument("--python", required=True, help="an interpreter with prdnn 1.0, pysyrenn 1.1 and gurobipy installed")
    p.add_argument("--quick", action="store_true", help="one tiny size, written to a temporary folder (a smoke check)")
    p.add_argument("--cap", type=float, default=300.0, help="seconds PRDNN may take per size (default 300)")
    p = sub.add_parser("large-k", help="targets program with tens of thousands of points: our interior point against HiGHS")
    p.add_argument("runs", nargs="*", type=Path, help="finished run directories (named mnist / cifar10) whose LH gives real problems")
    p.add_argument("--random", default="", help="extra random problems, e.g. 10000x800,60000x800 (K x features)")
    p.add_argument("--quick", action="store_true", help="tiny random problems, written to a temporary folder (a smoke check)")
    p.add_argument("--cap", type=float, default=900.0, help="seconds our solve may take on one problem (default 900)")
    p.add_argument("--highs-cap", type=float, default=600.0, help="seconds HiGHS may take on one problem (default 600)")
    p = sub.add_parser("workflow", help="the two-command workflow (points, repair) on a run's models exported as ONNX")
    p.add_argument("run", type=Path, help="a finished MNIST run directory")
    p.add_argument("--data-dir", type=Path, required=True, help="where the MNIST IDX files lie")
    p.add_argument("--work", type=Path, default=Path("runs/workflow"), help="folder for the points and repaired files")
    p = sub.add_parser("linear-ceiling", help="the best linear (softmax) head on a run's frozen features")
    p.add_argument("run", type=Path, help="a finished run directory (features.npz, NN and LH)")
    p = sub.add_parser("certified", help="certified repair of L-infinity balls: IBP against CROWN, certified accuracy")
    p.add_argument("runs", nargs="+", type=Path, help="finished run directories with export/nn.pt2 and export/lh.pt2")
    p.add_argument("--eps", default="0.005,0.01,0.02", help="comma-separated radii in pixels")
    p.add_argument("--k", type=int, default=20, help="repair points per repair (default 20)")
    p.add_argument("--eval", type=int, default=100, help="unseen test images certified before and after (default 100)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds one repair may take, bounding included (default 300)")
    p.add_argument("--keep", type=int, default=200, help="keep points per repair (default 200)")
    p = sub.add_parser("lp", help="repair-LP scaling benchmark")
    p.add_argument("--quick", action="store_true", help="small sizes only (K up to 100)")
    p.add_argument("--cap", type=float, default=120.0, help="seconds each solver path may take on one problem (default 120)")
    p.add_argument("--real", nargs="*", type=Path, default=[], help="run directories whose LH and repair pools give real problems")
    args = parser.parse_args(argv)
    from cnnrepair.errors import CnnRepairError

    try:
        _dispatch(args)
    except CnnRepairError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _dispatch(args: argparse.Namespace) -> None:
    """Run the benchmark ``args.name`` names."""
    if args.name == "collect":
        for path in collect(args.runs):
            print(f"wrote {path}")
    elif args.name == "readme":
        print(f"updated {readme()}")
    elif args.name == "linear-ceiling":
        from benchmarks.linear_ceiling import run as run_ceiling

        print(f"wrote {run_ceiling(args.run)}")
    elif args.name == "certified":
        from benchmarks.certified import run as run_certified

        eps = tuple(float(v) for v in args.eps.split(","))
        for path in run_certified(args.runs, eps, k=args.k, keep=args.keep, eval_n=args.eval, time_limit=args.time_limit):
            print(f"wrote {path}")
    elif args.name == "workflow":
        from benchmarks.workflow import run as run_workflow

        print(f"wrote {run_workflow(args.run, args.data_dir, args.work)}")
    elif args.name == "large-k":
        from benchmarks.large_k import run as run_large
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
        print(f"wrote {run_large(runs, args.cap, args.highs_cap, args.quick, sizes)}")
    elif args.name == "kh":
        from benchmarks.kh_scaling import run as run_kh

        print(f"wrote {run_kh(args.run, [int(v) for v in args.sizes.split(',')])}")
    elif args.name == "attack-overhead":
        from benchmarks.attack_overhead import run as run_overhead

        print(f"wrote {run_overhead(args.run, args.images)}")
    elif args.name == "k1":
        from benchmarks.k1_ceiling import run as run_k1

        print(f"wrote {run_k1(args.run, args.candidates, args.budget)}")
    elif args.name == "threads":
        from benchmarks.threads import run as run_threads

        print(f"wrote {run_threads(cap=args.cap)}")
    elif args.name == "field":
        from benchmarks.field import run as run_field

        print(f"wrote {run_field(args.run)}")
    elif args.name == "margins":
        from benchmarks.margin_speed import run as run_margins

        print(f"wrote {run_margins(quick=args.quick, cap=args.cap)}")
    elif args.name == "margin-threads":
        from benchmarks.margin_speed import run_threads as run_margin_threads

        print(f"wrote {run_margin_threads(cap=args.cap, quick=args.quick)}")
    elif args.name == "prdnn":
        from benchmarks.versus_prdnn import run as run_prdnn

        print(f"wrote {run_prdnn(args.python, quick=args.quick, cap=args.cap)}")
    elif args.name == "lp":
        from benchmarks.lp_scaling import run as run_lp

        print(f"wrote {run_lp(quick=args.quick, runs={p.name: p for p in args.real}, cap=args.cap)}")


if __name__ == "__main__":
    sys.exit(main())
