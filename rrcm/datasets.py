"""The datasets rrcm knows: name, classes, image shape, standard folder (light to import: no torch)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    default_dir: str | None = None
    class_names: tuple[str, ...] | None = None


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), "/usr/share/datasets/fashion-mnist",
                                 FASHION_MNIST_CLASSES),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32)),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224)),
}
