"""One test (or more) per finding of the trust review (issue 10); each failed on the main it was filed against."""

from __future__ import annotations

import json
import shutil
import time
import warnings

import numpy as np
import pytest
import torch

from cnnrepair.cli import main
from cnnrepair.errors import CnnRepairError
from cnnrepair.experiment import RepairSettings, repair_pool
from cnnrepair.pipeline import load_models, model_fingerprints, open_dataset, stage_repair
from cnnrepair.rundir import RunDir


def _copy(digits_run, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(digits_run, dest)
    return RunDir(dest)


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "expected an error line"
    return lines[-1]


# 1. generalisation counts true adversarial examples only ------------------------------------------

def test_fixed_is_measured_on_true_adversarial_examples_only(digits_run, tmp_path):
    from cnnrepair.evaluation import load_set
    from cnnrepair.hybrid import load_head
    from cnnrepair.training import outputs, predict

    run = _copy(digits_run, tmp_path)
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


# 5. PGD step follows the step count -----------------------------------------------------------------

@pytest.mark.parametrize("steps", [5, 10, 20, 40])
def test_pgd_step_is_two_and_a_half_eps_over_the_steps(steps):
    from cnnrepair.attacks import get_attack

    assert get_attack("pgd", steps=steps).rel_stepsize == pytest.approx(2.5 / steps)
    assert get_attack("pgd", steps=steps, rel_stepsize=0.3).rel_stepsize == 0.3
    with pytest.raises(CnnRepairError, match="at least one step"):
        get_attack("pgd", steps=0)


# 6. BLAS/OpenMP threads are set where the LP work is ----------------------------------------------

def test_repair_caps_blas_threads_and_the_knob_is_checked(monkeypatch):
    from threadpoolctl import threadpool_info

    import cnnrepair.repair.targets as R

    seen = []
    real = R._repair

    def spy(*args, **kwargs):
        seen.append(max(p["num_threads"] for p in threadpool_info()))  # the most any BLAS/OpenMP pool may use
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "_repair", spy)
    p = R.RepairProblem(np.eye(3), np.zeros(3), np.ones((2, 3)), np.zeros((2, 3)))
    assert R.repair(p).ok and seen[-1] == 1  # default: every pool capped at one thread
    monkeypatch.setenv("CNNREPAIR_THREADS", "2")
    assert R.repair(p).ok and seen[-1] == 2
    monkeypatch.setenv("CNNREPAIR_THREADS", "two")
    with pytest.raises(CnnRepairError, match="CNNREPAIR_THREADS"):
        R.repair(p)
    with pytest.raises(CnnRepairError, match="threads must be an integer >= 1"):
        R.repair(p, threads=0)


# 7. Foolbox never moves the model ------------------------------------------------------------------

def test_attack_stays_on_the_models_device_when_cuda_is_reported(monkeypatch):
    from cnnrepair.attacks import attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Foolbox alone would now pick cuda:0
    x = torch.rand(8, 1, 4, 4)
    adv, success = attack(model, x, np.zeros(8, np.int64), 0.1, "fgsm")
    assert adv.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and success.dtype == torch.bool


# 8. a failed re-solve leaves no repaired head behind ----------------------------------------------

def test_a_failed_resolve_removes_the_old_rlh_and_what_derives_from_it(digits_run, tmp_path, monkeypatch):
    import cnnrepair.experiment as exp
    from cnnrepair.pipeline import export_models, load_hybrid
    from cnnrepair.repair import RepairResult

    run = _copy(digits_run, tmp_path)
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


# 9. results of other settings are never overwritten; derived files never stale --------------------

def test_variants_keep_their_own_results_and_the_main_repair_refreshes_derived_files(digits_run, tmp_path, capsys):
    run = _copy(digits_run, tmp_path)
    base = ["--quiet", "repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--eval-images", "60", "--selection", "none"]
    assert main([*base, "--k", "5"]) == 0
    main_entries = run.results["repair"]["entries"]
    rlh_bytes = (run.path / "models" / "rlh.pt").read_bytes()
    assert main([*base, "--k", "8", "--extra-anchors", "10"]) == 2
    assert "made with other settings" in _err(capsys) and run.results["repair"]["entries"] == main_entries
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


# 10. the repair-point cache is keyed by the head it was made for ----------------------------------

def test_repair_pool_is_rebuilt_for_another_head(digits_run, tmp_path, monkeypatch):
    import cnnrepair.experiment as exp

    run = _copy(digits_run, tmp_path)
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
    from cnnrepair.training import predict

    run = _copy(digits_run, tmp_path)
    assert main(["--quiet", "repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--k", "10", "--selection", "none",
                 "--eval-images", "40"]) == 0
    assert main(["--quiet", "hybrid", "--out", str(run.path), "--lh-c", "10", "--no-kh"]) == 0
    ds = open_dataset(run)
    lh = load_models(run, ["lh"])["lh"]
    pool = repair_pool(run, ds, lh, 0.1, 10, "fgsm", 0, lh_fingerprint=model_fingerprints(run, ["lh"])["lh"])
    adv_pred = lh.head.decision_values(pool["adv"]).argmax(1)
    assert np.all(adv_pred != ds.y_train[pool["index"]])
    assert np.all(predict(lh, ds.x_train[pool["index"]]) == ds.y_train[pool["index"]])


# 11. bad values are rejected before the long work --------------------------------------------------

@pytest.mark.parametrize("bad, message", [(["--k", "0"], "--k needs positive integers"), (["--eps", "2"], "epsilon 2.0 is outside"),
                                          (["--pgd-steps", "0"], "at least one step"), (["--eval-images", "0"], "--eval-images"),
                                          (["--selection", "lasso"], "unknown --selection"), (["--device", "tpu"], "not a device"),
                                          (["--variant", "Bad Name"], "--variant")])
def test_reproduce_rejects_bad_values_before_any_work(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["--quiet", "reproduce", "--out", str(out), *bad]) == 2
    assert message in _err(capsys) and time.perf_counter() - t0 < 5
    assert not out.exists()


@pytest.mark.parametrize("content, message", [("[1, 2, 3]", "holds a JSON list"), ('{"dataset": "dig', "not valid JSON")])
def test_a_broken_results_file_is_reported_before_any_work(digits_run, tmp_path, capsys, content, message):
    run = _copy(digits_run, tmp_path)
    (run.path / "results.json").write_text(content)
    before = sorted(p.name for p in run.path.rglob("*"))
    for cmd in (["repair-sweep", "--k", "3"], ["attack"], ["hybrid"], ["export"]):
        assert main(["--quiet", *cmd, "--out", str(run.path)]) == 2
        line = _err(capsys)
        assert line.startswith("cnnrepair: error:") and message in line and "results.json" in line
    assert sorted(p.name for p in run.path.rglob("*")) == before


# 12. long silent steps report elapsed time -------------------------------------------------------

def test_elapsed_reports_while_a_blocking_call_runs():
    from cnnrepair.training import elapsed

    seen = []
    with elapsed(lambda desc, done, total: seen.append((desc, done, total)), "fitting KH", every=0.05):
        time.sleep(0.3)
    assert any("elapsed" in d and done == 0 for d, done, _ in seen)
    assert seen[-1][0].startswith("fitting KH: done in") and seen[-1][1:] == (1, 1)


def test_hybrid_shows_progress_while_fitting(digits_run, tmp_path, monkeypatch):
    import cnnrepair.pipeline as P

    run = _copy(digits_run, tmp_path)
    seen = []
    model = P.load_nn(run)
    feats = P.stage_features(run, model, open_dataset(run))
    P.stage_hybrid(run, model, open_dataset(run), feats, kinds=("lh", "kh"), progress=lambda d, *a: seen.append(d))
    assert any(d.startswith("fitting LH") for d in seen) and any(d.startswith("fitting KH") for d in seen)


# 13. strict JSON ------------------------------------------------------------------------------------

def test_results_never_hold_bare_nan(tmp_path):
    from cnnrepair.io import write_json

    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [np.float64("inf"), 1.5], "c": {"d": np.array([np.nan, 2.0])}})
    text = (tmp_path / "r.json").read_text()
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert obj == {"a": None, "b": [None, 1.5], "c": {"d": [None, 2.0]}}


# 14. Fashion-MNIST and KMNIST by name ------------------------------------------------------------

@pytest.mark.parametrize("name, first, last", [("fashion-mnist", "T-shirt/top", "Ankle boot"), ("kmnist", "o", "wo")])
def test_fashion_mnist_and_kmnist_carry_their_class_names(tmp_path, name, first, last):
    from cnnrepair.data import load_dataset
    from tests.test_data import _write_idx_folder

    _write_idx_folder(tmp_path / name, size=6)
    ds = load_dataset(name, tmp_path / name)
    assert ds.name == name and ds.classes[0] == first and ds.classes[-1] == last and len(ds.classes) == 10


# 15. what a reader sees -------------------------------------------------------------------------------

def test_quiet_after_the_command_and_version(capsys, digits_run):
    assert main(["repair-sweep", "--out", str(digits_run), "--quiet", "--k", "0"]) == 2  # parsed: the error is about K
    assert "--k needs positive integers" in _err(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("cnnrepair 0.")


def test_a_failed_start_leaves_no_config_that_blocks_the_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--quiet", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert not (out / "config.json").exists()
    assert main(["--quiet", "train", "--out", str(out), "--epochs", "1"]) == 0  # the folder is still usable for digits


def test_a_repair_that_changes_nothing_says_so(digits_run, tmp_path, capsys):
    run = _copy(digits_run, tmp_path)
    assert main(["repair-sweep", "--out", str(run.path), "--repair-eps", "0.1", "--k", "1", "--selection", "none", "--eval-images", "40",
                 "--delta-weight", "1e-9"]) == 0
    err = capsys.readouterr().err
    entry = run.results["repair"]["entries"][0]
    assert entry["lp"]["gamma_nonzero"] == 0 and "changes no weight" in entry["warning"] and "warning:" in err


def test_repair_figure_is_readable_and_labels_k_as_used(digits_run, tmp_path):
    from PIL import Image

    from cnnrepair.report import plot_repair

    run = _copy(digits_run, tmp_path)
    entries = stage_repair(run, open_dataset(run), RepairSettings(eps=[0.05, 0.1], ks=[1, 5000], selections=["none"],
                                                                    eval_images=40))["entries"]
    assert all(e["k_used"] < 5000 for e in entries if e["k"] == 5000)
    path = plot_repair(entries, "digits", tmp_path / "repair.png")
    w, h = Image.open(path).size
    assert w / h < 2.5  # a grid, not a strip of five panels


def test_export_prints_no_warning(digits_run, tmp_path):
    from cnnrepair.pipeline import export_models

    run = _copy(digits_run, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_models(run, load_models(run), (1, 8, 8))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
