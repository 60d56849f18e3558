"""The paper's CNNs, each split into a fixed ``features`` extractor (conv+pool, flatten) and a ``head``.

The split is the whole point: hybrids replace ``head`` with an SVM, and repair edits that SVM,
while ``features`` stays frozen.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from cnnrepair.errors import CnnRepairError


class SplitNet(nn.Module):
    """A classifier ``head(features(x))`` whose two parts can be used on their own."""

    def __init__(self, features: nn.Module, head: nn.Module, input_shape: tuple[int, int, int], num_features: int):
        super().__init__()
        self.features = features
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.head(self.features(x))


def _conv_relu(cin: int, cout: int, k: int, pad: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=pad), nn.ReLU(inplace=True)]


def mnist_nn(num_classes: int = 10) -> SplitNet:
    """Paper's MNIST-NN: conv5x5(20) -> pool2 -> conv5x5(50) -> pool2 -> FC 800->500 -> FC 500->10."""
    features = nn.Sequential(
        *_conv_relu(1, 20, 5, 0), nn.MaxPool2d(2),
        *_conv_relu(20, 50, 5, 0), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(800, 500), nn.ReLU(inplace=True), nn.Linear(500, num_classes))
    return SplitNet(features, head, (1, 28, 28), 800)


def cifar10_nn(num_classes: int = 10) -> SplitNet:
    """Paper's CIFAR10-NN: 3x3 convs 32,64 | 128,128 | 256,256, pool2 after each pair, FC 4096->1024->512->10."""
    features = nn.Sequential(
        *_conv_relu(3, 32, 3, 1), *_conv_relu(32, 64, 3, 1), nn.MaxPool2d(2),
        *_conv_relu(64, 128, 3, 1), *_conv_relu(128, 128, 3, 1), nn.MaxPool2d(2),
        *_conv_relu(128, 256, 3, 1), *_conv_relu(256, 256, 3, 1), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    head = nn.Sequential(
        nn.Linear(4096, 1024), nn.ReLU(inplace=True),
        nn.Linear(1024, 512), nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
    return SplitNet(features, head, (3, 32, 32), 4096)


def digits_nn(num_classes: int = 10) -> SplitNet:
    """DIGITS-NN, MNIST-NN's shape for 8x8 inputs: conv3x3(16) -> pool2 -> conv3x3(32) -> pool2 -> FC 128->64->10."""
    features = nn.Sequential(
        *_conv_relu(1, 16, 3, 1), nn.MaxPool2d(2),
        *_conv_relu(16, 32, 3, 1), nn.MaxPool2d(2),
        nn.Flatten(),
    )
    head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes))
    return SplitNet(features, head, (1, 8, 8), 128)


ARCHITECTURES: dict[str, Callable[[int], SplitNet]] = {
    "mnist-nn": mnist_nn,
    "cifar10-nn": cifar10_nn,
    "digits-nn": digits_nn,
}
DEFAULT_ARCH = {"digits": "digits-nn", "mnist": "mnist-nn", "fashion-mnist": "mnist-nn", "kmnist": "mnist-nn", "cifar10": "cifar10-nn"}


def build_model(arch: str, image_shape: tuple[int, int, int], num_classes: int) -> SplitNet:
    """Build ``arch`` after checking that it accepts images of ``image_shape``."""
    if arch not in ARCHITECTURES:
        raise CnnRepairError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = ARCHITECTURES[arch](num_classes)
    if tuple(image_shape) != model.input_shape:
        c, h, w = model.input_shape
        raise CnnRepairError(
            f"{arch} takes {c}x{h}x{w} images but the data has {'x'.join(map(str, image_shape))}; "
            f"choose an architecture that matches (--arch) or resize the dataset"
        )
    return model


def param_counts(model: SplitNet) -> dict[str, int]:
    """Trainable parameter counts of the whole model and of its two parts."""
    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    return {"total": count(model), "features": count(model.features), "head": count(model.head)}
