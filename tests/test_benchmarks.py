import json

import pytest

import benchmarks.run as bench
from benchmarks.lp_scaling import PATHS, _solve_ours, grow_pool, random_problem, real_problem, timed
from cnnrepair.repair import AUTO_IPM_POINTS


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
    p = random_problem(60, AUTO_IPM_POINTS + 5, k=3)  # enough points for the default to take the interior point
    ours = timed(_solve_ours, p, "highs", 60)
    for name, (fn, arg) in PATHS.items():
        res = timed(fn, p, arg, 60)
        assert res["status"] == "ok" and res["objective"] == pytest.approx(ours["objective"], rel=1e-6), name
    slow = timed(lambda *_: __import__("time").sleep(5), p, None, 0.2)
    assert slow["status"] == "timeout" and slow["cap_s"] == 0.2


def test_real_lp_problems_grow_the_repair_pool_they_need(digits_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert real_problem(run, 30) is None  # no pool yet
    grow_pool(run, 30)
    problem, eps = real_problem(run, 30)
    assert problem.X.shape == (30, problem.W.shape[1]) and eps > 0
    grow_pool(run, 30)  # already big enough: nothing attacked again
    assert len(list((run / "repair").glob("pool_*.npz"))) == 1


def test_a_benchmark_on_a_folder_that_is_no_run_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    assert bench.main(["lp", "--quick", "--real", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a cnnrepair run directory" in err[0] and "nope" in err[0]
    assert not (tmp_path / "results").exists()
