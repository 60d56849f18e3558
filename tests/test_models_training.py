import time

import pytest
import torch

from cnnrepair.errors import CnnRepairError
from cnnrepair.paper.models import build_model, cifar10_nn, digits_nn, mnist_nn, param_counts
from cnnrepair.paper.training import TrainConfig, accuracy, train


@pytest.mark.parametrize("factory, shape, n_features, total", [
    (mnist_nn, (1, 28, 28), 800, 431_080),
    (cifar10_nn, (3, 32, 32), 4096, 5_851_338),
    (digits_nn, (1, 8, 8), 128, 13_706),
])
def test_architectures_split_into_features_and_head(factory, shape, n_features, total):
    model = factory()
    x = torch.rand(2, *shape)
    feats = model.features(x)
    assert feats.shape == (2, n_features) == (2, model.num_features)
    assert torch.allclose(model.head(feats), model(x))
    counts = param_counts(model)
    assert counts["total"] == total == counts["features"] + counts["head"]


def test_wrong_image_size_is_rejected():
    with pytest.raises(CnnRepairError, match="mnist-nn takes 1x28x28 images but the data has 3x32x32"):
        build_model("mnist-nn", (3, 32, 32), 10)
    with pytest.raises(CnnRepairError, match="unknown architecture"):
        build_model("resnet", (1, 28, 28), 10)


def test_short_training_learns(digits):
    torch.manual_seed(0)
    model = digits_nn()
    before = accuracy(model, digits.x_test, digits.y_test)
    history = train(model, digits.x_train, digits.y_train, TrainConfig(epochs=8, batch_size=64, lr=3e-3))
    after = accuracy(model, digits.x_test, digits.y_test)
    assert before < 0.3 and after > 0.85
    assert history[-1]["loss"] < history[0]["loss"]


def test_interrupted_training_resumes_to_identical_weights(digits, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=3e-3, augment=True, seed=5)
    small = digits.subset(400, seed=1)
    torch.manual_seed(0)
    ref = digits_nn()
    train(ref, small.x_train, small.y_train, cfg)

    class Stop(Exception):
        pass

    def interrupt(desc, done, total):
        if desc.startswith("train epoch 2") and done == 2:
            raise Stop

    ckpt = tmp_path / "ckpt.pt"
    torch.manual_seed(0)
    model = digits_nn()
    with pytest.raises(Stop):
        train(model, small.x_train, small.y_train, cfg, ckpt, progress=interrupt)
    torch.manual_seed(123)  # a resumed run must not depend on the global RNG
    resumed = digits_nn()
    history = train(resumed, small.x_train, small.y_train, cfg, ckpt)
    assert len(history) == 3
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)


def test_corrupt_or_foreign_checkpoint(digits, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CnnRepairError, match="ckpt.pt: unreadable training checkpoint"):
        train(digits_nn(), digits.x_train[:10], digits.y_train[:10], TrainConfig(epochs=1), ckpt)
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    ckpt.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CnnRepairError, match="unreadable training checkpoint"):
        train(digits_nn(), digits.x_train[:10], digits.y_train[:10], TrainConfig(epochs=1), ckpt)
    train(digits_nn(), digits.x_train[:10], digits.y_train[:10], TrainConfig(epochs=1, lr=1e-3), tmp_path / "ok.pt")
    with pytest.raises(CnnRepairError, match="checkpoint was trained with"):
        train(digits_nn(), digits.x_train[:10], digits.y_train[:10], TrainConfig(epochs=2, lr=1e-3), tmp_path / "ok.pt")


def test_elapsed_reports_while_a_blocking_call_runs():
    from cnnrepair.paper.training import elapsed

    seen = []
    with elapsed(lambda desc, done, total: seen.append((desc, done, total)), "fitting KH", every=0.05):
        time.sleep(0.3)
    assert any("elapsed" in d and done == 0 for d, done, _ in seen)
    assert seen[-1][0].startswith("fitting KH: done in") and seen[-1][1:] == (1, 1)
