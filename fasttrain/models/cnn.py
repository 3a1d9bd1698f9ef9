"""The seed report's VGG-style CNN for 32x32 images, layer for layer as its summary table shows.

71,345,252 parameters for 100 classes; 94% of them in the 32768 -> 2048 linear layer.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _linear_bn_relu(f_in: int, f_out: int) -> list[nn.Module]:
    return [nn.Linear(f_in, f_out), nn.BatchNorm1d(f_out), nn.ReLU(inplace=True)]


class SeedCNN(nn.Module):
    def __init__(self, num_classes: int = 100, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn_relu(3, 64),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2),                       # 32 -> 16
            *_conv_bn_relu(128, 256),
            *_conv_bn_relu(256, 512),
            nn.MaxPool2d(2),                       # 16 -> 8
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),                          # 512 * 8 * 8 = 32768, in NCHW order like the report
            nn.Dropout(dropout),
            *_linear_bn_relu(512 * 8 * 8, 2048),
            *_linear_bn_relu(2048, 1024),
            *_linear_bn_relu(1024, 512),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
