import numpy as np
import pytest
import torch
from torch import nn

from cnnrepair.attacks import (
    attack,
    decode_perturbation,
    encode_perturbation,
    get_attack,
)
from cnnrepair.errors import CnnRepairError
from cnnrepair.paper.evaluation import sweep
from cnnrepair.paper.hybrid import HybridNet, fit_linear_svm
from cnnrepair.paper.pipeline import load_models, load_nn
from cnnrepair.paper.rundir import RunDir
from cnnrepair.paper.training import outputs


class Linear(nn.Module):
    def __init__(self, d=64, k=10, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, d, generator=g))
        self.b = nn.Parameter(torch.randn(k, generator=g))

    def forward(self, x):
        return x.flatten(1) @ self.w.T + self.b


@pytest.fixture(scope="module")
def models(digits_run):
    return load_models(RunDir(digits_run))


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_eps_zero_changes_nothing_and_bounds_hold(models, digits, method):
    x = torch.as_tensor(digits.x_test[:64]).float() / 255
    y = digits.y_test[:64]
    adv0, succ0 = attack(models["lh"], x, y, 0.0, method)
    assert torch.equal(adv0, x)
    with torch.no_grad():
        assert torch.equal(succ0, models["lh"](x).argmax(1) != torch.as_tensor(y))
    for eps in (0.05, 0.2):
        adv, _ = attack(models["nn"], x, y, eps, method)
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_fgsm_on_linear_model_equals_closed_form():
    torch.manual_seed(0)
    model = Linear().eval()
    x = torch.rand(32, 1, 8, 8)
    y = torch.randint(0, 10, (32,))
    eps = 0.1
    adv, _ = attack(model, x, y.numpy(), eps, "fgsm")
    xg = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xg), y, reduction="sum").backward()
    expected = (x + eps * xg.grad.sign()).clamp(0, 1)
    assert torch.allclose(adv, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["nn", "lh", "kh"])
def test_success_mask_agrees_with_predictions(models, digits, name):
    x = torch.as_tensor(digits.x_test[:100]).float() / 255
    adv, succ = attack(models[name], x, digits.y_test[:100], 0.15, "pgd")
    with torch.no_grad():
        pred = models[name](adv).argmax(1).numpy()
    np.testing.assert_array_equal(succ.numpy(), pred != digits.y_test[:100])
    assert succ.any() and not succ.all()


def test_attacking_lh_through_torch_agrees_with_sklearn(digits_run, digits):
    run = RunDir(digits_run)
    nn_model = load_nn(run)
    xtr = outputs(nn_model.features, digits.x_train)
    head, pipe, _ = fit_linear_svm(xtr, digits.y_train)
    lh = HybridNet(nn_model.features, head).eval()
    x = torch.as_tensor(digits.x_test).float() / 255
    adv, succ = attack(lh, x, digits.y_test, 0.1, "fgsm")
    feats = outputs(nn_model.features, adv)
    sk_pred = pipe.predict(feats.astype(np.float64))
    with torch.no_grad():
        torch_pred = lh(adv).argmax(1).numpy()
    np.testing.assert_array_equal(sk_pred, torch_pred)
    np.testing.assert_array_equal(succ.numpy(), sk_pred != digits.y_test)


def test_bad_attack_input(models, digits, digits_run):
    x = torch.as_tensor(digits.x_test[:4]).float() / 255
    with pytest.raises(CnnRepairError, match="epsilon -0.1 is outside"):
        attack(models["nn"], x, digits.y_test[:4], -0.1)
    with pytest.raises(CnnRepairError, match="epsilon 8.0 is outside"):
        attack(models["nn"], x, digits.y_test[:4], 8.0)
    with pytest.raises(CnnRepairError, match=r"images must lie in \[0, 1\]"):
        attack(models["nn"], x * 255, digits.y_test[:4], 0.1)
    with pytest.raises(CnnRepairError, match="unknown attack"):
        attack(models["nn"], x, digits.y_test[:4], 0.1, "deepfool")
    with pytest.raises(CnnRepairError, match="no model rlh in this run"):
        load_models(RunDir(digits_run), ["nn", "rlh"])


def test_perturbation_codec_stays_within_eps(digits):
    x = torch.as_tensor(digits.x_test[:10]).float() / 255
    eps = 0.013
    adv = (x + eps * torch.sign(torch.randn_like(x))).clamp(0, 1)
    rec = decode_perturbation(digits.x_test[:10], encode_perturbation(x, adv, eps), eps)
    assert float((rec - adv).abs().max()) <= eps / 254 + 1e-6
    assert float((rec - x).abs().max()) <= eps + 1e-6


def test_sweep_transfer_matrix_and_saved_sets(models, digits, tmp_path):
    res = sweep(models, digits.x_test[:120], digits.y_test[:120], [0.05, 0.15], get_attack("fgsm"), tmp_path)
    assert set(res["transfer"]) == set(models) and all(len(v) == 2 for t in res["transfer"].values() for v in t.values())
    from cnnrepair.paper.evaluation import load_set
    from cnnrepair.paper.training import predict

    y = digits.y_test[:120]
    for m in models:
        for i, eps in enumerate([0.05, 0.15]):  # each model on its own saved set, recomputed from the file alone
            full = load_set(tmp_path, "fgsm", m, eps, 120).full(digits.x_test[:120])
            assert res["own"][m][i] == pytest.approx(float((predict(models[m], full) == y).mean()), abs=1e-12)
        assert res["own"][m][1] <= res["clean"][m]
        assert abs(1 - res["success_rate"][m][0] - res["own"][m][0]) < 0.03
    again = sweep(models, digits.x_test[:120], digits.y_test[:120], [0.05, 0.15], get_attack("fgsm"), tmp_path)
    assert again["transfer"] == res["transfer"] and again["seconds_per_10k_images"] == {}
    assert len(list((tmp_path / "adversarial" / "fgsm").glob("*.npz"))) == 6


@pytest.mark.parametrize("steps", [5, 10, 20, 40])
def test_pgd_step_is_two_and_a_half_eps_over_the_steps(steps):
    from cnnrepair.attacks import get_attack

    assert get_attack("pgd", steps=steps).rel_stepsize == pytest.approx(2.5 / steps)
    assert get_attack("pgd", steps=steps, rel_stepsize=0.3).rel_stepsize == 0.3
    with pytest.raises(CnnRepairError, match="at least one step"):
        get_attack("pgd", steps=0)


def test_attack_stays_on_the_models_device_when_cuda_is_reported(monkeypatch):
    from cnnrepair.attacks import attack

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # Foolbox alone would now pick cuda:0
    x = torch.rand(8, 1, 4, 4)
    adv, success = attack(model, x, np.zeros(8, np.int64), 0.1, "fgsm")
    assert adv.device.type == "cpu" and next(model.parameters()).device.type == "cpu"
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6 and success.dtype == torch.bool
