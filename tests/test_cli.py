import json
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from cnnrepair.cli import main
from cnnrepair.paper.pipeline import load_models
from tests.helpers import copy_run, last_error_line


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line"
    return err[-1]


def test_reproduce_on_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["--quiet", "reproduce", "--out", str(out), "--epochs", "10", "--attacks", "fgsm,pgd", "--eps", "0.05,0.15",
               "--pgd-steps", "5", "--k", "1,20", "--pgd-images", "100"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    for key in ("dataset", "seed", "params", "accuracy", "timings_s", "attack", "repair"):
        assert key in res
    assert res["dataset"] == "digits" and set(res["accuracy"]) >= {"nn", "lh", "kh"}
    assert res["attack"]["fgsm"]["eps"] == [0.05, 0.15] and res["attack"]["pgd"]["n_images"] == 100
    assert set(res["attack"]["fgsm"]["transfer"]["nn"]) == {"nn", "lh", "kh"}
    entries = [e for e in res["repair"]["entries"] if "accuracy" in e]
    assert len(entries) == 8 and all(e["lp"]["status"] == "optimal" for e in entries)
    for e in entries:  # the saved LH set splits into true adversaries and clean errors, and nothing else
        saved = np.load(out / "adversarial" / "fgsm" / f"lh_eps{e['eps']:g}.npz")
        assert e["unseen_lh_adversaries"] + e["lh_attack_successes_on_clean_errors"] == len(saved["index"])
        assert 0 <= e["efficacy"] <= 1
    for name in ("figures/attack_curves.png", "figures/examples_fgsm.png", "figures/repair.png", "summary.md",
                 "config.json", "export/nn.pt2", "export/lh.pt2", "export/kh.pt2", "export/rlh.pt2", "models/rlh.pt"):
        assert (out / name).is_file(), name
    e = entries[-1]
    lp = np.load(out / "repair" / f"eps{e['eps']:g}_k{e['k']}_{e['selection']}" / "repair_problem.npz")
    dec = lp["X"] @ (lp["W"] + lp["gamma"]).T + lp["b"]
    assert np.all(np.abs(dec - lp["Y"]) <= lp["delta"] + 1e-6)
    assert float(lp["objective"]) == pytest.approx(np.abs(lp["gamma"]).sum() + lp["delta"].sum(), rel=1e-9)
    assert "## FGSM" in (out / "summary.md").read_text() and "## main repair" in (out / "summary.md").read_text()
    assert not list(out.rglob("*.tmp*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "digits" and cfg["seed"] == 0 and "torch" in cfg["versions"]


def test_help_is_readable():
    proc = subprocess.run([sys.executable, "-m", "cnnrepair.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "reproduce" in proc.stdout and "examples:" in proc.stdout


def test_missing_dataset_exits_2_with_one_line(tmp_path, capsys):
    rc = main(["--quiet", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert rc == 2
    line = _err(capsys)
    assert line.startswith("cnnrepair: error:") and "nope" in line and "--data-dir" in line
    assert not (tmp_path / "r" / "results.json").exists()


def test_wrong_image_size_for_architecture(tmp_path, capsys):
    from tests.test_data import _write_idx_folder

    _write_idx_folder(tmp_path / "m", size=10)
    rc = main(["--quiet", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "m"), "--out", str(tmp_path / "r")])
    assert rc == 2 and "mnist-nn takes 1x28x28 images but the data has 1x10x10" in _err(capsys)


def test_run_directory_from_another_dataset(digits_run, tmp_path, capsys):
    from tests.test_data import _write_idx_folder

    _write_idx_folder(tmp_path / "m", size=28)
    rc = main(["--quiet", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "m"), "--out", str(digits_run)])
    assert rc == 2 and "was made for dataset 'digits', not 'mnist'" in _err(capsys)


def test_unreadable_checkpoint_and_corrupt_results(digits_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(digits_run, run)
    (run / "models" / "lh.pt").write_bytes(b"\x00garbage")
    rc = main(["--quiet", "attack", "--out", str(run), "--attacks", "fgsm", "--eps", "0.1"])
    assert rc == 2 and "lh.pt: unreadable SVM head" in _err(capsys)
    before = (run / "results.json").read_bytes()
    (run / "models" / "nn.pt").write_bytes(b"\x00garbage")
    rc = main(["--quiet", "hybrid", "--out", str(run)])
    assert rc == 2 and "nn.pt: unreadable model weights" in _err(capsys)
    assert (run / "results.json").read_bytes() == before


def test_bad_attack_arguments(digits_run, capsys):
    assert main(["--quiet", "attack", "--out", str(digits_run), "--eps", "-0.1"]) == 2
    assert "epsilon -0.1 is outside [0, 1]" in _err(capsys)
    assert main(["--quiet", "attack", "--out", str(digits_run), "--models", "nn,rlh2"]) == 2
    assert "no model rlh2 in this run" in _err(capsys)
    assert main(["--quiet", "attack", "--out", str(digits_run), "--attacks", "cw"]) == 2
    assert "unknown attack 'cw'" in _err(capsys)


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["--quiet", "hybrid", "--out", str(tmp_path)]) == 2
    assert "not a cnnrepair run directory" in _err(capsys)
    assert main(["--quiet", "repair-sweep", "--out", str(tmp_path)]) == 2


def test_bad_repair_arguments(digits_run, capsys):
    assert main(["--quiet", "repair-sweep", "--out", str(digits_run), "--selection", "lasso"]) == 2
    assert "unknown --selection 'lasso'" in _err(capsys)
    assert main(["--quiet", "repair-sweep", "--out", str(digits_run), "--k", "0"]) == 2
    assert "--k needs positive integers" in _err(capsys)


@pytest.mark.parametrize("bad, message", [(["--k", "0"], "--k needs positive integers"), (["--eps", "2"], "epsilon 2.0 is outside"),
                                          (["--pgd-steps", "0"], "at least one step"), (["--eval-images", "0"], "--eval-images"),
                                          (["--selection", "lasso"], "unknown --selection"), (["--device", "tpu"], "not a device"),
                                          (["--variant", "Bad Name"], "--variant")])
def test_reproduce_rejects_bad_values_before_any_work(tmp_path, capsys, bad, message):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert main(["--quiet", "reproduce", "--out", str(out), *bad]) == 2
    assert message in last_error_line(capsys) and time.perf_counter() - t0 < 5
    assert not out.exists()


@pytest.mark.parametrize("content, message", [("[1, 2, 3]", "holds a JSON list"), ('{"dataset": "dig', "not valid JSON")])
def test_a_broken_results_file_is_reported_before_any_work(digits_run, tmp_path, capsys, content, message):
    run = copy_run(digits_run, tmp_path)
    (run.path / "results.json").write_text(content)
    before = sorted(p.name for p in run.path.rglob("*"))
    for cmd in (["repair-sweep", "--k", "3"], ["attack"], ["hybrid"], ["export"]):
        assert main(["--quiet", *cmd, "--out", str(run.path)]) == 2
        line = last_error_line(capsys)
        assert line.startswith("cnnrepair: error:") and message in line and "results.json" in line
    assert sorted(p.name for p in run.path.rglob("*")) == before


def test_results_never_hold_bare_nan(tmp_path):
    from cnnrepair.io import write_json

    write_json(tmp_path / "r.json", {"a": float("nan"), "b": [np.float64("inf"), 1.5], "c": {"d": np.array([np.nan, 2.0])}})
    text = (tmp_path / "r.json").read_text()
    obj = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert obj == {"a": None, "b": [None, 1.5], "c": {"d": [None, 2.0]}}


def test_quiet_after_the_command_and_version(capsys, digits_run):
    assert main(["repair-sweep", "--out", str(digits_run), "--quiet", "--k", "0"]) == 2  # parsed: the error is about K
    assert "--k needs positive integers" in last_error_line(capsys)
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("cnnrepair 0.")


def test_a_failed_start_leaves_no_config_that_blocks_the_folder(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["--quiet", "train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert not (out / "config.json").exists()
    assert main(["--quiet", "train", "--out", str(out), "--epochs", "1"]) == 0  # the folder is still usable for digits


def test_export_prints_no_warning(digits_run, tmp_path):
    from cnnrepair.paper.pipeline import export_models

    run = copy_run(digits_run, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_models(run, load_models(run), (1, 8, 8))
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
