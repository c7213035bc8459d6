"""A small CNN (convolutions, batch norm with fitted-looking statistics, pooling, a linear head)
for the tests that carry models between formats (ONNX import and export)."""
from __future__ import annotations

import torch
import torch.nn as nn


class SmallCNN(nn.Module):
    """[B, 3, 16, 16] images -> [B, 10] logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def make_cnn(seed: int = 0) -> SmallCNN:
    """Random weights, and batch-norm statistics that matter (not the 0/1 of a fresh layer)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN().eval()
        for norm in (model.features[1], model.features[5]):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    return model
