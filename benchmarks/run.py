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
  highs-rule  the pointwise program's HiGHS path with dual simplex and with HiGHS's interior point, side by side
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

from benchmarks import common, registry


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


_pct = registry.pct


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


def _accuracy_section(acc: dict, link) -> list[str]:
    """The accuracy table of the paper's section 3.1 and the pipeline timings, from accuracy.json."""
    lines = []
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
    return lines


def _attack_section(att: dict, link) -> list[str]:
    """Figure 2 and its tables, from attack.json."""
    lines = []
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
    return lines


def _repair_section(rep: dict, link) -> list[str]:
    """Figure 3, its tables and the targets table, from repair.json."""
    lines = []
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
    return lines


registry.section("accuracy.json", order=10, render=_accuracy_section)
registry.section("attack.json", order=20, render=_attack_section)
registry.section("repair.json", order=30, render=_repair_section)


def readme_section(base: Path | None = None) -> str:
    """The results section, generated from benchmarks/results/*.json by every registered section in
    order; figure links relative to ``base`` (the folder of the file it goes into; default the README's)."""
    base = common.README.parent if base is None else base

    def link(p: Path) -> str:
        return Path(os.path.relpath(p, base)).as_posix()

    load_benchmarks()
    return "\n".join(registry.render_sections(link)).rstrip() + "\n"


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
    lines += registry.headline_lines()
    rel = Path(os.path.relpath(results_doc, base)).as_posix()
    lines += ["Every table, with the command that made it, in [" + rel + "](" + rel + "):", ""]
    lines += [f"- [{t}]({rel}#{_anchor(t)})" for t in tables]
    return "\n".join(lines) + "\n"


def _replace(text: str, markers: tuple[str, str], body: str) -> str:
    begin, end = markers
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def cli_reference() -> str:
    """docs/cli.md: every ``cnnrepair`` command's ``--help``, formatted at 100 columns."""
    import contextlib
    import io

    from cnnrepair.cli import build_parser

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # argparse keeps them only here
        lines = ["# Command-line reference", "", "Generated from the parser by `python -m benchmarks.run readme`; "
                 "`cnnrepair COMMAND --help` prints the same.", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, child in sub.choices.items():
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                child.print_help()
            lines += [f"## cnnrepair {name}", "", "```text", buf.getvalue().rstrip(), "```", ""]
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(lines)


def readme() -> Path:
    """Regenerate, from benchmarks/results/*.json, the results section (between the results markers:
    docs/results.md) and the README's headline results (between the headline markers); and
    docs/cli.md from the command's parser."""
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
    cli_doc = common.README.parent / "docs" / "cli.md"
    if cli_doc.parent.is_dir():
        text = cli_reference()
        if not cli_doc.is_file() or cli_doc.read_text() != text:
            cli_doc.write_text(text)
    return common.README


# every benchmark module, imported so that it registers its command and its results sections
MODULES = ("any_layer", "any_layer_cifar", "attack_overhead", "bounds", "bounds_windows", "certified", "field", "highs_rule", "keep_speed", "k1_ceiling", "kh_scaling", "large_k", "linear_ceiling", "lp_scaling",
           "margin_speed", "threads", "versus_prdnn", "vnncomp", "workflow")


def load_benchmarks() -> None:
    """Import every benchmark module (each registers itself with :mod:`benchmarks.registry`)."""
    import importlib

    for name in MODULES:
        importlib.import_module(f"benchmarks.{name}")


@registry.command("collect", "copy figures from finished run directories into benchmarks/results", order=10,
                  arguments=registry.arguments(registry.arg("runs", nargs="+", type=Path)))
def _collect(args):
    return collect(args.runs)


@registry.command("readme", "regenerate docs/results.md and the README's headline results", order=20)
def _readme(args):
    return readme()


def main(argv: list[str] | None = None) -> int:
    load_benchmarks()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True)
    for cmd in sorted(registry.COMMANDS.values(), key=lambda c: c.order):
        cmd.arguments(sub.add_parser(cmd.name, help=cmd.help))
    args = parser.parse_args(argv)
    from cnnrepair.errors import CnnRepairError

    try:
        written = registry.COMMANDS[args.name].run(args)
    except CnnRepairError as exc:
        print(f"benchmarks: error: {exc}", file=sys.stderr)
        return 2
    for path in [written] if isinstance(written, Path) else list(written or []):
        print(f"{'updated' if args.name == 'readme' else 'wrote'} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
