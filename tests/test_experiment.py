import numpy as np
import pytest

from cnnrepair.errors import CnnRepairError
from cnnrepair.experiment import RepairSettings, _with_anchors, order_points, targets
from cnnrepair.hybrid import LinearHead
from cnnrepair.repair import RepairProblem, repair


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

    import cnnrepair.experiment as exp
    from cnnrepair.pipeline import open_dataset, stage_repair
    from cnnrepair.repair import RepairResult
    from cnnrepair.rundir import RunDir

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

    from cnnrepair.pipeline import open_dataset, stage_repair
    from cnnrepair.rundir import RunDir

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
