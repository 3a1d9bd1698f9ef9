"""Model builders: the seed report's CNN and ResNet-18 for transfer learning."""

from __future__ import annotations

from torch import nn

from fasttrain.models.cnn import SeedCNN
from fasttrain.models.resnet import ResNetClassifier, build_resnet

INPUT_SIZE = {"cnn": 32, "resnet": 224}  # default input side in pixels, per model
DEFAULT_CLASSES = {"cnn": 100, "resnet": 200}  # CIFAR-100; CUB-200-2011


def build_model(model: str, num_classes: int, recipe, weights: str | None = None) -> nn.Module:
    """The recipe's model on the CPU, in fp32; the caller moves and compiles it."""
    if model == "cnn":
        return SeedCNN(num_classes, dropout=recipe.dropout)
    return build_resnet(num_classes, weights=weights or recipe.weights, finetune=recipe.finetune)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["SeedCNN", "ResNetClassifier", "build_model", "build_resnet", "trainable_parameters",
           "INPUT_SIZE", "DEFAULT_CLASSES"]
