"""The two-command workflow on a model file: ``cnnrepair points`` then ``cnnrepair repair``, timed.

The MNIST run's NN and LH are exported as ONNX (``cnnrepair export``) and treated as a user's
files: points from the MNIST test set (FGSM adversarial examples at one eps, and the model's own
misclassified images), 1,000 keep points, a pointwise repair of the last layer, and
``cnnrepair verify --original`` on the result. Each command runs as a user would run it, in its own
process; wall seconds include starting Python and loading the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import registry


def _cnnrepair(args: list[str]) -> tuple[float, str]:
    from benchmarks.common import run_cnnrepair

    seconds, proc = run_cnnrepair(args)
    if proc.returncode != 0:
        raise SystemExit(f"cnnrepair {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return seconds, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""


def run(run_dir: Path, data_dir: Path, work: Path, eps: float = 0.1, n: int = 100, keep: int = 1000) -> Path:
    """Export, then points + repair + verify for each (model, kind); results to workflow_onnx.json."""
    from benchmarks.common import machine as _machine, write_result as _write

    seconds, _ = _cnnrepair(["export", "--out", str(run_dir)])
    rows = []
    for model in ("nn", "lh"):
        src = run_dir / "export" / f"{model}.onnx"
        for kind in ("fgsm", "misclassified"):
            out = work / f"{model}-{kind}"
            pts = ["points", str(src), "--dataset", "mnist", "--data-dir", str(data_dir), "--kind", kind, "--n", str(n),
                   "--keep", str(keep), "--out", str(out / "pts"), "--overwrite"] + (["--eps", str(eps)] if kind == "fgsm" else [])
            t_points, _ = _cnnrepair(pts)
            rep = ["repair", str(src), "--points", str(out / "pts" / "points.npz"), "--keep", str(out / "pts" / "keep.npz"),
                   "--out", str(out / "fixed"), "--overwrite"]
            t_repair, _ = _cnnrepair(rep)
            t_verify, _ = _cnnrepair(["verify", str(out / "fixed" / "certificate.json"), "--model", str(out / "fixed" / "repaired.onnx"),
                                      "--points", str(out / "pts" / "points.npz"), "--keep", str(out / "pts" / "keep.npz"),
                                      "--original", str(src)])
            cert = json.loads((out / "fixed" / "certificate.json").read_text())
            info = json.loads((out / "pts" / "points.json").read_text())
            rows.append({"model": f"{model}.onnx", "kind": kind, "eps": eps if kind == "fgsm" else None,
                         "points": info["points"], "keep": info["keep"], "points_s": t_points, "repair_s": t_repair,
                         "verify_s": t_verify, "status": cert["status"], "layer": cert["layer"],
                         "smallest_margin_after": min(p["margin_after"] for p in cert["points"]),
                         "keep_labels_kept": cert["keep"].get("labels_kept"), "changed": cert["change"]["nonzero"],
                         "gap": cert["gap"], "commands": ["cnnrepair " + " ".join(pts), "cnnrepair " + " ".join(rep)]})
            print(f"{model}.onnx {kind}: points {t_points:.1f}s, repair {t_repair:.1f}s, verify {t_verify:.1f}s", file=sys.stderr, flush=True)
    cmd = f"python -m benchmarks.run workflow {run_dir} --data-dir {data_dir}"
    return _write("workflow_onnx.json", {"machine": _machine(), "command": cmd, "export_s": seconds, "rows": rows})


def table(result: dict) -> str:
    """Markdown: seconds of each command and what the repair certified."""
    lines = ["| model | points | repair points | keep | points s | repair s | verify s | status | smallest margin | keep labels kept | numbers changed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        kind = f"FGSM eps {r['eps']:g}" if r["eps"] is not None else r["kind"]
        lines.append(f"| {r['model']} | {kind} | {r['points']} | {r['keep']:,} | {r['points_s']:.1f} | {r['repair_s']:.1f} | "
                     f"{r['verify_s']:.1f} | {r['status']} | {r['smallest_margin_after']:.3f} | {r['keep_labels_kept']:,} | {r['changed']:,} |")
    return "\n".join(lines)


registry.section("workflow_onnx.json", order=150, title=lambda d: "### Your model from a file: points, repair and verify on ONNX",
                 intro=lambda d: f"{registry.measured_on(d)}; the MNIST run's NN and LH exported as ONNX and used as a user's files, "
                                 "points from the MNIST test set, each command in its own process (wall seconds, start-up "
                                 "included).", table=table)


@registry.command("workflow", "the two-command workflow (points, repair) on a run's models exported as ONNX", order=120,
                  arguments=registry.arguments(
                      registry.arg("run", type=Path, help="a finished MNIST run directory"),
                      registry.arg("--data-dir", type=Path, required=True, help="where the MNIST IDX files lie"),
                      registry.arg("--work", type=Path, default=Path("runs/workflow"), help="folder for the points and repaired files")))
def _cli(args):
    return run(args.run, args.data_dir, args.work)
