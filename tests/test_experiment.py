import json

import numpy as np
import pytest
import torch

from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.paper.experiment import (
    RepairSettings,
    _with_anchors,
    order_points,
    repair_pool,
    targets,
)
from cnnrepair.paper.hybrid import LinearHead
from cnnrepair.paper.pipeline import (
    load_models,
    model_fingerprints,
    open_dataset,
    stage_repair,
)
from cnnrepair.repair import RepairProblem, repair
from tests.helpers import copy_run, last_error_line


def _pool(rng, n=20, d=12):
    clean = rng.random((n, d))
    shift = np.zeros((n, d))
    shift[:, 0] = 1.0  # the shared adversarial pattern
    shift += rng.normal(scale=0.3, size=(n, d))
    shift[7] = 0.0
    shift[7, 0] = 1.0  # the most typical pair
    return {"index": np.arange(n), "clean": clean, "adv": clean + shift, "exhausted": np.array(False)}


def test_typical_order_puts_the_shared_pattern_first():
    rng = np.random.default_rng(0)
    pool = _pool(rng)
    ordered = order_points(pool, "typical")
    assert ordered["index"][0] == 7
    np.testing.assert_array_equal(ordered["adv"][0], pool["adv"][7])
    assert sorted(ordered["index"]) == list(range(20))
    assert order_points(pool, "random") is pool
    with pytest.raises(CnnRepairError, match="unknown repair point order"):
        order_points(pool, "best")


def test_targets_clean_and_label():
    head = LinearHead(np.eye(3), np.zeros(3))
    clean = np.array([[0.2, 0.9, 0.1]])
    np.testing.assert_allclose(targets(head, clean, np.array([1]), "clean"), clean)
    np.testing.assert_allclose(targets(head, clean, np.array([1]), "label"), [[-1, 1, -1]])
    with pytest.raises(CnnRepairError, match="unknown repair target"):
        targets(head, clean, np.array([1]), "soft")


def test_pair_anchors_keep_the_clean_image_where_it_was():
    rng = np.random.default_rng(1)
    k, d = 4, 15
    W, b = rng.normal(size=(k, d)), rng.normal(size=k)
    head = LinearHead(W, b)
    clean = rng.random((3, d))
    adv = clean + rng.random((3, d))
    Y = head.decision_values(clean)
    empty = {"x": np.zeros((0, d)), "y": np.zeros((0, k))}
    s = RepairSettings(eps=[0.1], ks=[3], selections=["none"], anchors="pairs", anchor_weight=1e3)
    X2, Y2, w, n_anchor = _with_anchors(adv, Y, clean, head, empty, s)
    assert n_anchor == 3 and X2.shape == (6, d) and list(w) == [1, 1, 1, 1e3, 1e3, 1e3]
    r = repair(RepairProblem(W, b, X2, Y2, point_weights=w, delta_weight=10.0))
    assert r.ok
    np.testing.assert_allclose(clean @ (W + r.gamma).T + b, Y, atol=1e-6)  # anchors held
    plain = repair(RepairProblem(W, b, adv, Y, delta_weight=10.0))
    assert np.abs(clean @ (W + plain.gamma).T + b - Y).max() > 1e-3  # without anchors the clean images move


def test_unsolved_lp_never_saves_a_repaired_model(digits_run, tmp_path, monkeypatch):
    import shutil

    import cnnrepair.paper.experiment as exp
    from cnnrepair.paper.pipeline import open_dataset, stage_repair
    from cnnrepair.repair import RepairResult
    from cnnrepair.paper.rundir import RunDir

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    run = RunDir(run_dir)

    def failing(problem, *args, **kwargs):
        k, d = problem.W.shape
        return RepairResult(np.zeros((k, d)), np.zeros((len(problem.X), k)), float("nan"), "time_limit (class 0)", "highs", 0.0,
                            {"variables": 1, "constraints": 1, "nonzeros": 1})

    monkeypatch.setattr(exp, "repair", failing)
    settings = RepairSettings(eps=[0.1], ks=[5], selections=["none"], eval_images=50)
    result = stage_repair(run, open_dataset(run), settings)
    entry = result["entries"][0]
    assert entry["lp"]["status"].startswith("time_limit") and "no RLH saved" in entry["error"]
    assert result["primary"] is None
    assert not (run_dir / "models" / "rlh.pt").exists()
    assert not list((run_dir / "repair").rglob("rlh.pt"))
    assert "accuracy" not in entry


def test_calibration_keeps_the_boldest_anchor_weight_within_budget(digits_run, tmp_path):
    import shutil

    from cnnrepair.paper.pipeline import open_dataset, stage_repair
    from cnnrepair.paper.rundir import RunDir

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    run = RunDir(run_dir)
    ds = open_dataset(run)
    common = dict(eps=[0.1], ks=[20], selections=["none"], eval_images=60, extra_anchors=30, anchor_weights=[0.01, 1.0, 100.0],
                  val_images=200, delta_weight=10.0)

    loose = stage_repair(run, ds, RepairSettings(**common, drawdown_budget=100.0, min_point_eps=0.2))["entries"][0]
    assert loose["eps"] == 0.1 and loose["point_eps"] == 0.2  # repair points from the larger ball
    assert (run_dir / "repair" / "pool_fgsm_eps0.2.npz").is_file() and not (run_dir / "repair" / "pool_fgsm_eps0.1.npz").exists()
    cal = loose["calibration"]
    assert cal["anchor_weight"] == 0.01 and cal["budget_met"] and len(cal["tried"]) == 1
    assert cal["val_images"] <= 200 and "val_drawdown" in cal["tried"][0]

    with pytest.raises(CnnRepairError, match="made with other settings"):  # never replaced silently
        stage_repair(run, ds, RepairSettings(**common, drawdown_budget=-1.0))
    strict = stage_repair(run, ds, RepairSettings(**common, drawdown_budget=-1.0), overwrite=True)["entries"][0]
    cal = strict["calibration"]
    assert [t["anchor_weight"] for t in cal["tried"]] == [0.01, 1.0, 100.0]
    assert cal["anchor_weight"] == 100.0 and not cal["budget_met"]
    saved = np.load(run_dir / "repair" / "eps0.1_k20_none" / "repair_problem.npz")
    assert saved["X"].shape[0] == strict["k_used"] + 30  # the kept solve's rows, anchors included
    assert list(saved["point_weights"][-30:]) == [100.0] * 30
    objective = np.abs(saved["gamma"]).sum() + saved["delta_weight"] * (saved["point_weights"][:, None] * saved["delta"]).sum()
    assert objective == pytest.approx(float(saved["objective"]), rel=1e-6)  # the export alone re-checks the objective
    # a bolder weight never keeps the clean validation images better than the most cautious one
    dd = [t["val_drawdown"] for t in cal["tried"]]
    assert dd[0] >= dd[-1] - 1e-9


def test_calibration_needs_anchors(digits_run, tmp_path, capsys):
    import shutil

    from cnnrepair.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(digits_run, run_dir)
    assert main(["--quiet", "repair-sweep", "--out", str(run_dir), "--anchor-weight", "0.1,1"]) == 2
    assert "need anchors" in capsys.readouterr().err


def test_fixed_is_measured_on_true_adversarial_examples_only(digits_run, tmp_path):
    from cnnrepair.paper.evaluation import load_set
    from cnnrepair.paper.hybrid import load_head
    from cnnrepair.paper.training import outputs, predict

    run = copy_run(digits_run, tmp_path)
    ds = open_dataset(run)
    entry = stage_repair(run, ds, RepairSettings(eps=[0.15], ks=[20], selections=["none"]))["entries"][0]
    lh = load_models(run, ["lh"])["lh"]
    aset = load_set(run.path, "fgsm", "lh", 0.15, len(ds.y_test))
    clean_ok = predict(lh, ds.x_test)[aset.index] == ds.y_test[aset.index]
    assert (~clean_ok).sum() > 0, "the check needs LH clean errors among the attack's successes"
    assert entry["unseen_lh_adversaries"] == int(clean_ok.sum())
    assert entry["lh_attack_successes_on_clean_errors"] == int((~clean_ok).sum())
    rlh_head = load_head(run.path / "repair" / entry["name"] / "rlh.pt")
    feats = outputs(lh.features, aset.images(ds.x_test)[torch.as_tensor(np.flatnonzero(clean_ok))])
    fixed = float((rlh_head.decision_values(feats).argmax(1) == ds.y_test[aset.index][clean_ok]).mean())
    assert entry["generalisation"] == pytest.approx(fixed, abs=1e-12)
    assert entry["accuracy"]["lh"]["adv"] == 0.0 and entry["accuracy"]["lh"]["hadv"] < entry["accuracy"]["lh"]["data"]


def test_a_failed_resolve_removes_the_old_rlh_and_what_derives_from_it(digits_run, tmp_path, monkeypatch):
    import cnnrepair.paper.experiment as exp
    from cnnrepair.paper.pipeline import export_models, load_hybrid
    from cnnrepair.repair import RepairResult

    run = copy_run(digits_run, tmp_path)
    ds = open_dataset(run)
    settings = RepairSettings(eps=[0.1], ks=[5], selections=["none"], eval_images=60)
    first = stage_repair(run, ds, settings)
    assert first["primary"] == "eps0.1_k5_none" and (run.path / "models" / "rlh.pt").is_file()
    export_models(run, {"rlh": load_hybrid(run, "rlh")}, (1, 8, 8))

    def failing(problem, *args, **kwargs):
        k, d = problem.W.shape
        return RepairResult(np.zeros((k, d)), np.zeros((len(problem.X), k)), float("nan"), "time_limit (class 0)", "highs", 0.0,
                            {"variables": 1, "constraints": 1, "nonzeros": 1})

    monkeypatch.setattr(exp, "repair", failing)
    again = stage_repair(run, ds, settings)  # same settings: a re-solve
    assert again["primary"] is None and "error" in again["entries"][0]
    assert not (run.path / "repair" / "eps0.1_k5_none" / "rlh.pt").exists()
    assert not (run.path / "models" / "rlh.pt").exists() and not (run.path / "export" / "rlh.pt2").exists()
    res = run.results
    assert "rlh" not in res["accuracy"] and "rlh" not in res.get("exports", {})
    json.loads((run.path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))


def test_variants_keep_their_own_results_and_the_main_repair_refreshes_derived_files(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path)
    base = ["--quiet", "repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--eval-images", "60", "--selection", "none"]
    assert main([*base, "--k", "5"]) == 0
    main_entries = run.results["repair"]["entries"]
    rlh_bytes = (run.path / "models" / "rlh.pt").read_bytes()
    assert main([*base, "--k", "8", "--extra-anchors", "10"]) == 2
    assert "made with other settings" in last_error_line(capsys) and run.results["repair"]["entries"] == main_entries
    assert main([*base, "--k", "8", "--extra-anchors", "10", "--variant", "anchored"]) == 0
    res = run.results
    assert res["repair"]["entries"] == main_entries  # the main repair is untouched
    variant = res["repair_variants"]["anchored"]
    assert variant["settings"]["extra_anchors"] == 10 and variant["entries"][0]["n_anchor_points"] == 10
    assert (run.path / "repair" / "variants" / "anchored" / "eps0.1_k8_none" / "rlh.pt").is_file()
    assert (run.path / "figures" / "repair_anchored.png").is_file()
    assert (run.path / "models" / "rlh.pt").read_bytes() == rlh_bytes  # a variant promotes nothing
    assert "repair variant anchored" in (run.path / "summary.md").read_text()

    assert main(["--quiet", "export", "--out", str(run.path)]) == 0
    assert main([*base, "--k", "8", "--overwrite"]) == 0  # a new main repair: its RLH and every derived file follow
    new_rlh = (run.path / "models" / "rlh.pt").read_bytes()
    assert new_rlh != rlh_bytes
    assert (run.path / "models" / "rlh.pt").read_bytes() == (run.path / "repair" / "eps0.1_k8_none" / "rlh.pt").read_bytes()
    program = torch.export.load(str(run.path / "export" / "rlh.pt2")).module()
    rlh = load_models(run, ["rlh"])["rlh"]
    x = torch.as_tensor(open_dataset(run).x_test[:20]).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(program(x), rlh(x))
    assert "| 0.1 | 8 | none |" in (run.path / "summary.md").read_text()


def test_repair_pool_is_rebuilt_for_another_head(digits_run, tmp_path, monkeypatch):
    import cnnrepair.paper.experiment as exp

    run = copy_run(digits_run, tmp_path)
    ds = open_dataset(run)
    lh = load_models(run, ["lh"])["lh"]
    fp = model_fingerprints(run, ["lh"])["lh"]
    calls = []
    real = exp.attack
    monkeypatch.setattr(exp, "attack", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = repair_pool(run, ds, lh, 0.1, 5, "fgsm", 0, lh_fingerprint=fp)
    n = len(calls)
    again = repair_pool(run, ds, lh, 0.1, 5, "fgsm", 0, lh_fingerprint=fp)
    assert len(calls) == n and np.array_equal(first["index"], again["index"])  # same head: reused
    repair_pool(run, ds, lh, 0.1, 5, "fgsm", 0, lh_fingerprint=fp + "refit")
    assert len(calls) > n  # another head: attacked again


def test_refitted_lh_gets_repair_points_it_misclassifies(digits_run, tmp_path):
    from cnnrepair.paper.training import predict

    run = copy_run(digits_run, tmp_path)
    assert main(["--quiet", "repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--k", "10", "--selection", "none",
                 "--eval-images", "40"]) == 0
    assert main(["--quiet", "hybrid", "--out", str(run.path), "--lh-c", "10", "--no-kh"]) == 0
    ds = open_dataset(run)
    lh = load_models(run, ["lh"])["lh"]
    pool = repair_pool(run, ds, lh, 0.1, 10, "fgsm", 0, lh_fingerprint=model_fingerprints(run, ["lh"])["lh"])
    adv_pred = lh.head.decision_values(pool["adv"]).argmax(1)
    assert np.all(adv_pred != ds.y_train[pool["index"]])
    assert np.all(predict(lh, ds.x_train[pool["index"]]) == ds.y_train[pool["index"]])


def test_a_repair_that_changes_nothing_says_so(digits_run, tmp_path, capsys):
    run = copy_run(digits_run, tmp_path)
    assert main(["repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--k", "1", "--selection", "none", "--eval-images", "40",
                 "--delta-weight", "1e-9"]) == 0
    err = capsys.readouterr().err
    entry = run.results["repair"]["entries"][0]
    assert entry["lp"]["gamma_nonzero"] == 0 and "changes no weight" in entry["warning"] and "warning:" in err


def test_repair_figure_is_readable_and_labels_k_as_used(digits_run, tmp_path):
    from PIL import Image

    from cnnrepair.paper.report import plot_repair

    run = copy_run(digits_run, tmp_path)
    entries = stage_repair(run, open_dataset(run), RepairSettings(eps=[0.05, 0.1], ks=[1, 5000], selections=["none"],
                                                                    eval_images=40))["entries"]
    assert all(e["k_used"] < 5000 for e in entries if e["k"] == 5000)
    path = plot_repair(entries, "digits", tmp_path / "repair.png")
    w, h = Image.open(path).size
    assert w / h < 2.5  # a grid, not a strip of five panels


@pytest.mark.parametrize("bad, message", [({"ks": [0]}, "--k needs positive integers"), ({"eps": [2.0]}, "outside"),
                                          ({"selections": ["lasso"]}, "unknown --selection"), ({"n_jobs": 0}, "--jobs"),
                                          ({"threads": 0}, "--threads"), ({"spec": "pointwise", "selections": ["wilcoxon"]}, "pointwise")])
def test_repair_settings_check_themselves(bad, message):
    """The settings object refuses bad values itself (the CLI only turns its error into the one-line message)."""
    good = dict(eps=[0.1], ks=[5], selections=["none"])
    RepairSettings(**good)
    with pytest.raises(CnnRepairError, match=message):
        RepairSettings(**{**good, **bad})
