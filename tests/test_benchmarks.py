import fnmatch
import json
import os

import numpy as np
import pytest

import benchmarks.run as bench
from benchmarks import common
from benchmarks.lp_scaling import PATHS, _solve_ours, grow_pool, random_problem, real_problem, timed
from cnnrepair.repair import AUTO_IPM_POINTS


def test_collect_and_readme_from_a_run(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\noutro\n")
    monkeypatch.setattr(common, "README", readme)
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
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    assert bench.main(["lp", "--quick", "--real", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a cnnrepair run directory" in err[0] and "nope" in err[0]
    assert not (tmp_path / "results").exists()


def test_one_point_ceiling_changes_one_column_and_lands_in_the_readme(digits_run, tmp_path, monkeypatch):
    import shutil

    from cnnrepair.cli import main

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    assert main(["--quiet", "attack", "--out", str(run), "--attacks", "fgsm", "--eps", "0.05,0.1", "--models", "lh"]) == 0
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    monkeypatch.setattr(common, "README", readme)
    assert bench.main(["k1", str(run), "--candidates", "4"]) == 0
    res = json.loads((tmp_path / "k1_ceiling.json").read_text())
    assert {(r["eps"], r["target"]) for r in res["rows"]} <= {(e, t) for e in (0.05, 0.1) for t in ("clean", "label")}
    assert res["rows"]
    for r in res["rows"]:
        assert 1 <= r["candidates"] <= 4 and 0 <= r["fixed_median"] <= r["fixed_max"] <= 100
        assert r["columns_changed_max"] == 1  # one point: the L1 optimum moves a single feature column
        assert r["fixed_max_within_budget"] is None or r["fixed_max_within_budget"] <= r["fixed_max"]
    bench.readme()
    assert "One repair point: the ceiling" in readme.read_text()


def test_one_point_ceiling_needs_attack_results(digits_run, capsys):
    assert bench.main(["k1", str(digits_run)]) == 2
    assert "no FGSM attack results" in capsys.readouterr().err


def test_target_table_and_plot_mark_where_both_targets_hold(tmp_path):
    def entry(eps, k, fixed, dd):
        return {"eps": eps, "k": k, "selection": "none", "accuracy": {}, "generalisation": fixed, "drawdown": dd}

    rep = {"m-cal": {"_": {"dataset": "mnist"}, "entries": [entry(0.1, 1, 0.05, 0.001), entry(0.1, 1000, 0.3, 0.004),
                                                          entry(0.2, 1000, 0.4, 0.006), {"eps": 0.2, "k": 1, "selection": "none", "error": "x"}]},
           "c": {"_": {"dataset": "cifar10"}, "entries": [entry(0.1, 1, 0.5, 0.0)]}}
    text = "\n".join(bench._target_table(rep))
    assert "| K = 1 | 5.0 / 0.10 | - |" in text
    assert "| K = 1000 | **30.0 / 0.40** | 40.0 / 0.60 |" in text  # 0.6 points of drawdown misses the target
    k1 = {"dataset": "mnist", "rows": [{"eps": 0.1, "fixed_max_within_budget": 12.0}, {"eps": 0.2, "fixed_max_within_budget": None}]}
    path = bench.plot_targets(rep, "mnist", tmp_path / "t.png", k1=k1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench.plot_targets(rep, "svhn", tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_threads_benchmark_times_both_counts_idle_and_busy(tmp_path, monkeypatch):
    from benchmarks.threads import run, table

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    res = json.loads(run(sizes=(12,), d=30, cap=60).read_text())
    assert [(r["load"], r["threads"]) for r in res["rows"]] == [("idle", 1), ("idle", 2), ("busy", 1), ("busy", 2)]
    done = [r for r in res["rows"] if r["status"] == "ok"]
    assert all(r["seconds"] > 0 for r in done) and [r["threads"] for r in done[:2]] == [1, 2]  # idle: both finish
    assert all(r["status"] == "timeout" and r["cap_s"] == 60 for r in res["rows"] if r not in done)  # busy: spinning may hit the cap
    objectives = {round(r["objective"], 9) for r in done}
    assert len(objectives) == 1  # the thread count never changes the answer
    assert "| busy | 12 x 30 |" in table(res)


def test_collect_labels_repair_variants_by_run_and_name(digits_run, tmp_path, monkeypatch):
    import shutil

    from cnnrepair.cli import main

    run = tmp_path / "digits"
    shutil.copytree(digits_run, run)
    for extra in ([], ["--variant", "anchored", "--extra-anchors", "5"]):
        assert main(["--quiet", "repair-sweep", "--out", str(run), "--repair-eps", "0.1", "--k", "4", "--selection", "none",
                     "--eval-images", "30", *extra]) == 0
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    bench.collect([run])
    rep = json.loads((tmp_path / "results" / "repair.json").read_text())["datasets"]
    assert list(rep) == ["digits", "digits-anchored"]
    assert rep["digits-anchored"]["settings"]["extra_anchors"] == 5 and rep["digits"]["settings"]["extra_anchors"] == 0


def test_margin_speed_benchmark_agrees_with_highs_on_the_whole_lp():
    from benchmarks.margin_speed import run

    out = json.loads(run(quick=True, cap=60).read_text())
    assert out["rows"] and {r["program"] for r in out["rows"]} == {"l1", "prdnn"}
    for row in out["rows"]:
        assert row["ours"]["status"] == "ok" and row["highs-lp"]["status"] == "ok"
        assert row["relative_difference"] <= 1e-6  # the same program, the same optimum


def test_highs_rule_benchmark_solves_each_program_both_ways_to_the_same_optimum():
    from benchmarks.highs_rule import run, table

    out = json.loads(run(quick=True, cap=60).read_text())
    assert [r["program"] for r in out["rows"]] == ["L1", "PRDNN"]
    for row in out["rows"]:
        assert row["simplex"]["status"] == "ok" and row["ipm"]["status"] == "ok"
        assert (row["simplex"]["algorithm"], row["ipm"]["algorithm"]) == ("simplex", "ipm")  # each ran what it says
        assert row["relative_difference"] <= 1e-6 and row["rule"] == "simplex"  # 20 points short: below the rule's threshold
    assert "| dual simplex |" in table(out)


def test_large_k_benchmark_agrees_with_highs_and_times_both_sides():
    import torch

    from benchmarks.large_k import run, table

    out = json.loads(run(quick=True, cap=120, highs_cap=120).read_text())
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        paths = row["paths"]
        assert all(r["status"] == "ok" for r in paths.values()), paths
        assert row["relative_difference"] <= 1e-7  # the same program, the same optimum
        ours = next(iter(paths.values()))
        assert ours["sides"] == ["features"] and ours["worst_certified_gap"] <= 1e-7
    if not torch.cuda.is_available():
        assert set(out["rows"][0]["paths"]) == {f"ours ({os.cpu_count()} threads)", "highs"}
    assert [s["picked"] for s in out["side_timing"]] == ["features", "points"]
    assert all(s["points_s"] > 0 and s["features_s"] > 0 for s in out["side_timing"])
    assert "| random K=600 d=40 |" in table(out)


def test_fog_is_reproducible_and_keeps_images_in_range():
    from cnnrepair.corruptions import fog

    x = (np.random.default_rng(0).random((3, 1, 28, 28)) * 255).astype(np.uint8)
    a, b = fog(x, severity=5, seed=1), fog(x, severity=5, seed=1)
    assert a.dtype == np.uint8 and a.shape == x.shape and np.array_equal(a, b)
    assert not np.array_equal(a, fog(x, severity=5, seed=2)) and not np.array_equal(a, x)
    with pytest.raises(ValueError, match="severity"):
        fog(x, severity=6)


def test_certified_benchmark_repairs_balls_with_both_bound_methods(digits_run, tmp_path, monkeypatch):
    from benchmarks import certified, common
    from cnnrepair.cli import main

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert main(["--quiet", "export", "--out", str(digits_run)]) == 0
    path, = certified.run([digits_run], (0.01,), k=3, keep=20, eval_n=10, candidates=30)
    result = json.loads(path.read_text())
    rows = result["rows"]
    assert {(r["model"], r["bounds"], r["keep"]) for r in rows} == {(m, b, k) for m in ("nn", "lh") for b, k in
                                                                  (("ibp", "points"), ("crown", "points"), ("crown", "balls"))}
    assert any(r["status"] == "repaired" for r in rows)
    for r in rows:
        if r["status"] == "repaired":
            assert r["repair_points_certified"] == r["repair_points"] and r["pgd_not_below_certified"]
            assert r["pgd_after"] >= r["certified_after"]
    assert "| digits |" in certified.table(result)


def test_prdnn_benchmark_records_a_missing_prdnn_and_still_times_ours():
    """Without PRDNN in the given interpreter (CI's), its column says so; ours and HiGHS still solve the same program."""
    import sys

    from benchmarks.versus_prdnn import fits_licence, run, table

    assert fits_licence(40, 40) and not fits_licence(100, 64)  # 2,000 constraints exactly fit; 3,500 do not
    out = json.loads(run(sys.executable, quick=True).read_text())
    row = out["rows"][0]
    assert row["prdnn"]["status"] == "error" and "prdnn" in " ".join(row["prdnn"]["error"]).lower()
    assert row["ours"]["status"] == "optimal" and row["highs-lp"]["status"] == "ok"
    assert row["ours"]["objective"] == pytest.approx(row["highs-lp"]["objective"], rel=1e-6)
    assert row["ours"]["smallest_margin"] >= 0.05 - 1e-8  # the solvers' feasibility tolerance (1e-8 of the largest required change)
    assert "| 10 | 8 |" in table(out["rows"])


def test_margin_threads_benchmark_times_one_and_two_threads_on_the_same_problems():
    from benchmarks.margin_speed import QUICK, run_threads, threads_table

    out = json.loads(run_threads(cap=60, quick=True).read_text())
    assert [(r["K"], r["features"], r["keep"]) for r in out["rows"]] == QUICK
    for row in out["rows"]:
        one, two = row["threads_1"], row["threads_2"]
        assert one["status"] == two["status"] == "ok" and one["objective"] == pytest.approx(two["objective"], rel=1e-6)
    assert threads_table(out["rows"]).count("\n") == len(QUICK) + 1


def test_margin_device_benchmark_compares_the_cpu_with_cuda_or_refuses_in_one_line():
    import torch

    from benchmarks.margin_speed import QUICK, device_table, run_device
    from cnnrepair.errors import CnnRepairError

    with pytest.raises(CnnRepairError, match="not one; run it where a GPU is"):
        run_device(cap=60, quick=True, device="cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the CPU / CUDA table is made on a GPU only")
    out = json.loads(run_device(cap=60, quick=True).read_text())
    assert len(out["rows"]) == 2 * len(QUICK) and "cuda" in out["device"]
    for row in out["rows"]:
        assert row["cpu"]["status"] == row["cuda"]["status"] == "ok" and row["relative_difference"] <= 1e-9
    assert device_table(out["rows"]).count("\n") == 2 * len(QUICK) + 1


def test_the_committed_readme_and_results_page_regenerate_byte_identically(tmp_path, monkeypatch):
    """`python -m benchmarks.run readme` on the committed results rewrites README.md and docs/results.md unchanged."""
    import shutil

    root = common.README.parent
    shutil.copytree(common.RESULTS, tmp_path / "benchmarks" / "results")
    (tmp_path / "docs").mkdir()
    for name in ("README.md", "docs/results.md", "docs/cli.md"):
        shutil.copyfile(root / name, tmp_path / name)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(common, "README", tmp_path / "README.md")
    bench.readme()
    for name in ("README.md", "docs/results.md", "docs/cli.md"):
        assert (tmp_path / name).read_text() == (root / name).read_text(), name
    assert len((root / "README.md").read_text().splitlines()) < 250


def test_vnncomp_benchmark_checks_repairs_and_reproves_generated_properties(tmp_path):
    """One (network, eps) case of the VNN-COMP benchmark on a small 784-32-32-10 net: the whole command as a user runs it,
    every count read back from its files, and Marabou on a repaired property where maraboupy is installed."""
    import numpy as np
    import torch

    from benchmarks import vnncomp
    from benchmarks.any_layer import mlp

    torch.manual_seed(0)
    model = mlp(3, 32).eval()
    x = torch.rand(40, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    rec = vnncomp._case(model, "32x2", 0.002, (x, y, x[30:].numpy()), np.arange(30), 4, tmp_path / "case", 1, 20.0)
    assert rec["properties"] == 4 and sum(rec["before"].values()) == 4 and rec["keep_points"] == 10
    assert rec["status"] == "repaired" and rec["before"]["violated"] >= 1  # this seeded case has a violated property
    assert rec["repaired"] == rec["before"]["violated"] + rec["before"]["unknown"] and rec["kept"] == rec["before"]["holds"]
    assert rec["repaired_proved_after"] == rec["repaired"]  # what the repair certified is proved on the saved file
    assert rec["keep_labels_kept"] == 10 and 0 <= rec["accuracy_after"] <= 1
    alone = rec["alone"]  # each property not proved before, repaired on its own: here each one repairs
    assert alone["tried"] == rec["repaired"] and alone["repaired"] == alone["proved_after"] == alone["tried"]
    if rec["marabou"][0].get("status") != "not run":
        assert rec["marabou"][0]["answer"] in ("unsat", "timeout")  # never sat: that would refute the repair
    table = vnncomp.table({"rows": [rec]})
    assert table.count("\n") == 2 and "32x2" in table


def test_targeted_benchmark_repairs_both_forms_side_by_side(tmp_path):
    """One (network, eps) case of the targeted benchmark on a small 784-32-32-10 net: the same properties repaired as they
    are (the label against its runner-up) and against every class, each by the whole command, read back from its files."""
    import numpy as np
    import torch

    from benchmarks import vnncomp
    from benchmarks.any_layer import mlp

    torch.manual_seed(0)
    model = mlp(3, 32).eval()
    x = torch.rand(40, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    rec = vnncomp._targeted_case(model, "32x2", 0.004, (x, y, x[30:].numpy()), np.arange(30), 4, tmp_path / "case", 1, 20.0, 60.0)
    t, e = rec["targeted"], rec["every class"]
    assert rec["properties"] == 4 and sum(t["before"].values()) == sum(e["before"].values()) == 4
    assert t["before"]["violated"] <= e["before"]["violated"] and t["before"]["violated"] >= 1  # a weaker property: fewer violated
    assert t["status"] == e["status"] == "repaired"
    for f in (t, e):  # the properties not proved before are repaired, and proved after on the saved file
        assert f["repaired"] == f["before"]["violated"] + f["before"]["unknown"] and f["proved_after"] >= f["repaired"]
    assert rec["change_ratio"] > 1  # this seeded case: the stronger property needs more change
    assert t["keep_labels_kept"] == e["keep_labels_kept"] == 10
    if rec.get("marabou") and rec["marabou"][0].get("status") != "not run":
        assert rec["marabou"][0]["answer"] in ("unsat", "timeout")
    table = vnncomp.targeted_table({"rows": [rec]})
    assert table.count("\n") == 2 and "32x2" in table


def test_bounds_and_keep_speed_runs_with_other_settings_get_their_own_files():
    """A bounds run on fewer images or without CIFAR-10, and a keep-speed run on some networks or under another cap, write
    files of their own instead of replacing the committed tables; the README picks up each committed table."""
    from benchmarks import bounds, keep_speed, registry

    assert bounds.result_name() == "bounds.json"
    assert bounds.result_name(20) == "bounds_images20.json"
    assert bounds.result_name(cifar=False) == "bounds_mnist_only.json"
    assert bounds.result_name(20, False) == "bounds_images20_mnist_only.json"
    assert bounds.result_name(lirpa=False) == "bounds_no_lirpa.json"  # a run without auto_LiRPA keeps the side-by-side table
    assert keep_speed.result_name() == "keep_speed.json"
    assert keep_speed.result_name(("9x200",)) == "keep_speed_9x200.json"
    assert keep_speed.result_name(cap=60.0) == "keep_speed_cap60.json"
    assert keep_speed.result_name(("3x100", "256x2"), 60.0) == "keep_speed_3x100_256x2_cap60.json"
    patterns = [sec.pattern for sec in registry.SECTIONS]
    for module in (bounds, keep_speed):
        assert sum(fnmatch.fnmatch(module.result_name(), p) for p in patterns) == 1  # the committed table has one section


def test_the_auto_lirpa_worker_rebuilds_each_benchmark_model_and_its_rows_and_reports_a_missing_library():
    """The auto_LiRPA worker runs in an interpreter of its own, so it gets the models as layer lists: rebuilt there, each of
    the bounds benchmark's models (MLP, the paper's CNN, the CIFAR-10 cnn_4layer) computes the same logits, and its rows are
    margin_rows; an interpreter without auto_LiRPA is a failure that says so, not a crash of the benchmark."""
    import sys

    import torch

    from benchmarks import bounds, bounds_lirpa_worker as worker
    from benchmarks.any_layer import mlp
    from cnnrepair.bounds import margin_rows
    from cnnrepair.paper.models import mnist_nn

    torch.manual_seed(0)
    for model, shape in ((mlp(3, 16), (1, 28, 28)), (mnist_nn(), (1, 28, 28)), (bounds.small_cifar_cnn(), (3, 32, 32))):
        model.eval()
        x = torch.rand(3, *shape)
        specs, arrays = bounds.layer_list(model)
        rebuilt = worker.build(specs, arrays)
        with torch.no_grad():
            assert torch.allclose(rebuilt(x), model(x), atol=1e-5)
    labels = np.array([3, 0, 9])
    assert torch.equal(worker.rows(labels, 10).double(), margin_rows(labels, 10))
    x = torch.rand(2, 1, 28, 28)
    got = bounds.lirpa_bounds(sys.executable, mlp(2, 8).eval(), x, x + 0.01, np.array([1, 2]), 1, timeout=120)
    assert got["status"] == "error" and "auto_LiRPA" in " ".join(got["error"])
    assert bench.main(["bounds", "--data-dir", "nowhere", "--lirpa-python", "/no/such/python"]) == 2  # before any training
    with pytest.raises(ValueError, match="does not rebuild"):
        bounds.layer_list(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2), torch.nn.Tanh()))


def test_any_layer_run_on_some_networks_gets_its_own_file_and_title():
    """A run of the any-layer benchmark on some of the networks (say one, with a longer time limit) writes a file of its
    own instead of replacing the whole table, and its section says which networks and what limit."""
    from benchmarks import any_layer

    assert any_layer.result_name("l1") == "any_layer.json"
    assert any_layer.result_name("l1+linf") == "any_layer_l1_linf.json"
    assert any_layer.result_name("l1", ("9x200",)) == "any_layer_9x200.json"
    assert any_layer.result_name("l1+linf", ("3x100", "9x100")) == "any_layer_l1_linf_3x100_9x100.json"
    assert any_layer.result_name("l1", keep_images=500) == "any_layer_keep500.json"  # another keep set: not the table's file
    whole = {"networks": dict.fromkeys(any_layer.SHAPES), "task": {"norm": "l1", "time_limit": 120.0}}
    some = {"networks": {"9x200": None}, "task": {"norm": "l1", "time_limit": 300.0}}
    assert any_layer._title(whole) == "### Repair of a layer inside the network (APRNN's MNIST fog task)"
    assert any_layer._title(some).endswith("fog task, 9x200, time limit 300 s)")
    fewer = {"networks": dict.fromkeys(any_layer.SHAPES), "task": {"norm": "l1", "time_limit": 120.0, "keep_images": 500}}
    assert any_layer._title(fewer).endswith("fog task, 500 keep points)")


def test_alpha_windows_benchmark_times_both_walks_on_the_same_bounds(tmp_path, monkeypatch):
    """The windows / whole-map benchmark runs each method both ways on the same images (here a small stand-in for the
    paper's CNN): the whole-map rows carry their time over the windows' and the same margin bounds, and the table renders
    under a section of its own (not the bounds table's)."""
    import fnmatch

    import torch
    from torch import nn

    from benchmarks import bounds, bounds_windows, registry

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 3 * 3, 10)).eval()
    x = torch.rand(3, 1, 12, 12)
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    monkeypatch.setattr(bounds, "paper_cnn", lambda ds, seed: ("stand-in CNN", model, x, y, (0.02,), {"train_seconds": 0.0, "epochs": 1}))
    monkeypatch.setattr("cnnrepair.data.load_dataset", lambda name, path: None)
    d = json.loads(bounds_windows.run(tmp_path / "mnist", images=2).read_text())
    rows = d["rows"]
    assert [(r["method"], r["walks"]) for r in rows] == [(m, w) for m in bounds_windows.METHODS for w in ("windows", "whole map")]
    for windows, whole in zip(rows[::2], rows[1::2]):
        assert whole["time_over_windows"] > 0 and whole["largest_relative_difference"] < 1e-9
        assert (windows["certified"], windows["images"]) == (whole["certified"], 2)
    assert rows[2]["mean_margin_bound"] >= rows[0]["mean_margin_bound"] - 1e-9  # every walk optimised: never looser than CROWN
    patterns = [sec.pattern for sec in registry.SECTIONS]
    assert [p for p in patterns if fnmatch.fnmatch("alpha_windows.json", p)] == ["alpha_windows*.json"]
    assert bounds_windows.result_name() == "alpha_windows.json" and bounds_windows.result_name(2) == "alpha_windows_images2.json"
    assert (tmp_path / "alpha_windows_images2.json").is_file()  # a run on other images leaves the committed table alone
    for name in ("bounds", "bounds-windows"):  # a bad count is refused in one line before any training
        assert bench.main([name, "--data-dir", "nowhere", "--images", "0"]) == 2
    assert "| alpha-crown-full | whole map |" in bounds_windows.table(d)


def test_any_layer_cifar_benchmark_repairs_a_convolution_on_fgsm_images(tmp_path, monkeypatch, capsys):
    """The CIFAR-10 any-layer benchmark's pieces on a small seeded CNN: the FGSM split holds only images the network got
    right and the attack fooled, inside the eps-ball; a case repairs the second convolution with keep points and measures
    it; the table names the held-out set; too few fooled images and a bad --eps are one-line errors before any training."""
    import torch

    from benchmarks import any_layer_cifar as alc
    from benchmarks.any_layer import Case, Sets
    from cnnrepair import RepairSpec, SolveOptions
    from cnnrepair.errors import CnnRepairError
    from cnnrepair.runtime import accuracy

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    x = torch.rand(60, 1, 1, 1) * torch.rand(60, 3, 8, 8)
    common.fit(model, x, (x.mean((1, 2, 3)) * 20).long().clamp(0, 9), 30, 0)  # a network the attack can fool
    with torch.no_grad():
        y = model(x).argmax(1).numpy()
    eps = 0.1
    xr, yr, xg, yg, fooled = alc.adversarial_sets(model, x, y, eps, 4)
    assert len(yr) == 4 and len(yg) == fooled - 4 >= 1
    with torch.no_grad():
        assert (model(xr).argmax(1).numpy() != yr).all() and (model(xg).argmax(1).numpy() != yg).all()
    assert float(xr.min()) >= 0 and float(xr.max()) <= 1
    with pytest.raises(CnnRepairError, match="--eps"):
        alc.adversarial_sets(model, x, y, eps, fooled)
    before = {"repair": 0.0, "generalisation": accuracy(model, xg, yg), "clean": accuracy(model, x, y)}
    sets = Sets(xr, yr, xg, yg, x, y, x[:10], y[:10], before)
    row = alc.repair_case(model, Case("tiny", "2", "hidden (the second convolution)", False, False), sets, RepairSpec(margin=0.05), SolveOptions(time_limit=60.0))
    assert row["status"] == "repaired" and row["efficacy"] == 1.0 and row["keep_points"] == 0
    assert row["lp"]["rows"] > 0 and row["l1"] > 0 and row["generalisation"] > 0
    # with these keep points no change of the convolution keeps every pattern: the row says so and carries no measures
    stuck = alc.repair_case(model, Case("tiny", "2", "hidden (the second convolution)", True, False), sets, RepairSpec(margin=0.05), SolveOptions(time_limit=60.0))
    assert stuck["status"] == "infeasible" and stuck["keep_points"] == 10 and "drawdown" not in stuck
    d = {"machine": {"cores": 2, "measured": "today"}, "command": "cmd",
         "task": {"eps": eps, "held_out": "adversarial", "repair_images": 4, "keep_images": 10, "time_limit": 60.0,
                  "generalisation_images": len(yg), "margin": 0.05, "training": "none"},
         "networks": {"cnn_4layer": {"accuracy": before}}, "rows": [{**r, "network": "cnn_4layer"} for r in (row, stuck)]}
    table = alc.any_layer_table(d)
    assert "clean / adversarial acc." in table and table.count("\n") == 3 and "APRNN" not in table
    assert "| infeasible |" in table
    assert "2 (hidden (the second convolution)) infeasible (0 s)." in alc.headline(d)[0]  # the case with keep points
    assert alc.result_name() == "cifar10_any_layer.json" and alc.result_name(0.02) == "cifar10_any_layer_eps0.02.json"
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    assert bench.main(["any-layer-cifar", "--cifar-dir", str(tmp_path / "nowhere"), "--eps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "epsilon 3" in err[0] and not (tmp_path / "results").exists()
    assert bench.main(["any-layer-cifar", "--cifar-dir", str(tmp_path / "nowhere"), "--time-limit", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the settings are checked before the data is read
    assert len(err) == 1 and "time limit" in err[0] and not (tmp_path / "results").exists()
