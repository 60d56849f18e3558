import subprocess
import sys

import numpy as np
import pytest
import torch

from cnnrepair.paper.hybrid import fit_linear_svm, fit_rbf_svm, load_head, save_head
from cnnrepair.paper.pipeline import load_hybrid, load_nn, open_dataset
from cnnrepair.paper.rundir import RunDir
from cnnrepair.paper.training import outputs
from tests.helpers import copy_run


@pytest.fixture(scope="module")
def feats(digits_run, digits):
    model = load_nn(RunDir(digits_run))
    return model, outputs(model.features, digits.x_train), outputs(model.features, digits.x_test)


@pytest.mark.parametrize("kind", ["lh", "kh"])
def test_torch_head_matches_sklearn_decision_function(feats, digits, kind, tmp_path):
    model, xtr, xte = feats
    fit = fit_linear_svm if kind == "lh" else fit_rbf_svm
    head, pipe, info = fit(xtr, digits.y_train)
    sk = pipe.decision_function(xte.astype(np.float64))
    with torch.no_grad():
        ours = head(torch.as_tensor(xte)).double().numpy()
    assert np.abs(ours - sk).max() < 1e-5
    assert (ours.argmax(1) == pipe.predict(xte.astype(np.float64))).all()
    assert info.n_train == len(digits.y_train) and info.seconds > 0
    save_head(tmp_path / "h.pt", head)
    with torch.no_grad():
        again = load_head(tmp_path / "h.pt")(torch.as_tensor(xte)).double().numpy()
    np.testing.assert_array_equal(again, ours)


@pytest.mark.parametrize("kind", ["lh", "kh"])
def test_gradients_reach_the_input_through_the_svm(digits_run, digits, kind):
    hybrid = load_hybrid(RunDir(digits_run), kind)
    x = torch.as_tensor(digits.x_test[:4]).float().div(255).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(hybrid(x), torch.as_tensor(digits.y_test[:4]))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in hybrid.features.parameters())


def test_run_records_accuracy_and_agreement(digits_run):
    res = RunDir(digits_run).results
    assert set(res["accuracy"]) >= {"nn", "lh", "kh"}
    assert all(0.85 < res["accuracy"][k] <= 1 for k in ("nn", "lh", "kh"))
    for k in ("lh", "kh"):
        assert res["hybrid"][k]["max_abs_diff_vs_sklearn"] < 1e-5

    assert res["params"]["nn"]["total"] == 13_706 and res["timings_s"]["fit_kh"] > 0


def test_exported_models_load_without_cnnrepair(digits_run, digits, tmp_path):
    from cnnrepair.paper.pipeline import export_models, load_models

    run = RunDir(digits_run)
    models = load_models(run)
    written = export_models(run, models, (1, 8, 8))
    assert set(written) == {"nn", "lh", "kh"}
    x = torch.as_tensor(digits.x_test[:5]).float().div(255)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, torch\n"
        "sys.modules['cnnrepair'] = None\n"  # importing the package would now fail
        f"x = torch.as_tensor(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "for name in sys.argv[1:]:\n"
        "    m = torch.export.load(name).module()\n"
        "    print(','.join(str(v) for v in m(x).argmax(1).tolist()))\n"
    )
    paths = [str(digits_run / written[k]) for k in ("nn", "lh", "kh")]
    out = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, check=True).stdout.split()
    for line, k in zip(out, ("nn", "lh", "kh")):
        with torch.no_grad():
            expected = models[k](x).argmax(1).tolist()
        assert line == ",".join(map(str, expected))


def test_recorded_accuracy_matches_an_independent_scikit_learn_fit(digits_run, digits):
    """LH and KH fitted again here with scikit-learn alone, on the run's cached features: same test accuracy."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    res = RunDir(digits_run).results
    feats = np.load(digits_run / "features.npz")
    xtr, xte = feats["train"].astype(np.float64), feats["test"].astype(np.float64)
    lh = make_pipeline(StandardScaler(), LinearSVC(C=res["hybrid"]["lh"]["C"], dual="auto", max_iter=5000, random_state=0))
    kh = make_pipeline(StandardScaler(), OneVsRestClassifier(SVC(kernel="rbf", C=res["hybrid"]["kh"]["C"], gamma=res["hybrid"]["kh"]["gamma"])))
    for name, pipe in (("lh", lh), ("kh", kh)):
        acc = float((pipe.fit(xtr, digits.y_train).predict(xte) == digits.y_test).mean())
        assert res["accuracy"][name] == pytest.approx(acc, abs=1e-12), name


def test_parallel_lh_fit_gives_the_same_weights(feats, digits):
    a, _, _ = fit_linear_svm(feats[1], digits.y_train)
    b, _, _ = fit_linear_svm(feats[1], digits.y_train, n_jobs=2)
    # the same one-vs-rest fits, in another order: equal up to roundoff (2.7e-11 relative was seen on a 16-core machine)
    np.testing.assert_allclose(b.weight.numpy(), a.weight.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(b.bias.numpy(), a.bias.numpy(), rtol=1e-9, atol=1e-10)


def test_hybrid_shows_progress_while_fitting(digits_run, tmp_path, monkeypatch):
    import cnnrepair.paper.pipeline as P

    run = copy_run(digits_run, tmp_path)
    seen = []
    model = P.load_nn(run)
    feats = P.stage_features(run, model, open_dataset(run))
    P.stage_hybrid(run, model, open_dataset(run), feats, P.HybridSettings(kinds=("lh", "kh")), progress=lambda d, *a: seen.append(d))
    assert any(d.startswith("fitting LH") for d in seen) and any(d.startswith("fitting KH") for d in seen)


def test_hyperparameters_are_chosen_on_a_held_out_split_and_recorded(digits_run, digits):
    """The default grids are searched: every score is recorded, the chosen C is the best held-out score, and one grid
    point's score is what scikit-learn alone gets on the same stratified split."""
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    from cnnrepair.paper.pipeline import KH_GRID, LH_GRID

    res = RunDir(digits_run).results
    feats = np.load(digits_run / "features.npz")["train"].astype(np.float64)
    for kind, grid in (("lh", LH_GRID), ("kh", KH_GRID)):
        search = res["hybrid"][kind]["search"]
        scores = [g["holdout_accuracy"] for g in search["grid"]]
        assert [g["C"] for g in search["grid"]] == list(grid) and len(scores) == len(grid)
        best = search["grid"][int(np.argmax(scores))]  # argmax: the first of equal scores, the documented tie rule
        assert res["hybrid"][kind]["C"] == best["C"] == search["chosen"]["C"]
        assert search["fit_on"] + search["holdout"] == len(digits.y_train) and search["seconds"] > 0
    search = res["hybrid"]["lh"]["search"]
    fit_idx, held_idx = train_test_split(np.arange(len(digits.y_train)), test_size=0.1, random_state=0, stratify=digits.y_train)
    assert len(held_idx) == search["holdout"]
    C = search["grid"][1]["C"]
    pipe = make_pipeline(StandardScaler(), LinearSVC(C=C, dual="auto", max_iter=5000, random_state=0))
    acc = float((pipe.fit(feats[fit_idx], digits.y_train[fit_idx]).predict(feats[held_idx]) == digits.y_train[held_idx]).mean())
    assert search["grid"][1]["holdout_accuracy"] == pytest.approx(acc, abs=1e-12)


def test_one_value_skips_the_search(digits_run, tmp_path):
    from cnnrepair.cli import main

    run = copy_run(digits_run, tmp_path)
    assert main(["--quiet", "hybrid", "--out", str(run.path), "--lh-c", "0.05", "--kh-c", "3", "--kh-gamma", "0.01"]) == 0
    res = run.results
    assert res["hybrid"]["lh"]["C"] == 0.05 and res["hybrid"]["lh"]["search"] is None
    assert (res["hybrid"]["kh"]["C"], res["hybrid"]["kh"]["gamma"]) == (3.0, 0.01) and res["hybrid"]["kh"]["search"] is None
    assert load_head(run.path / "models/kh.pt").gamma.item() == pytest.approx(0.01)


@pytest.mark.parametrize("args, message", [
    (["--lh-c", "0.1,0.1"], "repeats a value"), (["--kh-gamma", "auto"], "numbers or 'scale'"),
    (["--kh-gamma", "-1"], "must be > 0 or 'scale'"), (["--holdout", "0.7"], "--holdout must lie between"),
    (["--lh-c", "0"], "C must be > 0"),
])
def test_bad_search_options_are_refused_in_one_line(digits_run, tmp_path, capsys, args, message):
    from cnnrepair.cli import main

    run = copy_run(digits_run, tmp_path)
    before = (run.path / "results.json").read_bytes()
    try:
        code = main(["hybrid", "--out", str(run.path), *args])
    except SystemExit as exc:  # argparse's own refusal of a value it cannot read
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)
    assert (run.path / "results.json").read_bytes() == before
