import json

import pytest

import benchmarks.run as bench
from benchmarks.lp_scaling import _solve_cvxpy, _solve_ours, random_problem, timed


def test_collect_and_readme_from_a_run(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\noutro\n")
    monkeypatch.setattr(bench, "README", readme)
    written = bench.collect([digits_run])
    acc = json.loads((tmp_path / "accuracy.json").read_text())
    assert [p.name for p in written] == ["accuracy.json"]
    assert acc["machine"]["cores"] >= 1 and "torch" in acc["machine"]["versions"]
    label = digits_run.name  # datasets are labelled by their run directory's name
    assert acc["datasets"][label]["accuracy"]["lh"] > 0.85
    bench.readme()
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("outro")
    lh = f"{100 * acc['datasets'][label]['accuracy']['lh']:.2f}"
    assert f"| {label} |" in text and lh in text


def test_lp_benchmark_paths_agree_and_cap_is_recorded():
    p = random_problem(60, 5, k=3)
    ours = timed(_solve_ours, p, "highs", 60)
    for fn, arg in ((_solve_ours, "cvxopt"), (_solve_ours, "highs-cg"), (_solve_cvxpy, "CLARABEL")):
        res = timed(fn, p, arg, 60)
        assert res["status"] == "ok" and res["objective"] == pytest.approx(ours["objective"], rel=1e-5)
    slow = timed(lambda *_: __import__("time").sleep(5), p, None, 0.2)
    assert slow["status"] == "timeout" and slow["cap_s"] == 0.2
