"""Small models for dbs-train and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn


def mlp(in_features: int, classes: int = 10, hidden: int = 128, depth: int = 2) -> nn.Module:
    """A ReLU MLP; wide hidden layers make it allreduce-bound, narrow ones compute-bound."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(nn.Flatten(), *layers)


def small_cnn(in_channels: int, image_size: int, classes: int = 10, width: int = 32) -> nn.Module:
    """Two conv blocks and a linear head (about 60k parameters at 3x32x32, width 32)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, classes),
    )


def build(name: str, sample_shape: torch.Size, classes: int = 10, hidden: int = 128) -> nn.Module:
    """The model dbs-train's ``--model`` names, sized for the data set's samples.

    Args:
        name: ``"mlp"`` or ``"cnn"``.
        sample_shape: the shape of one input sample; the CNN needs (C, H, W).
        classes: the number of output classes.
        hidden: the MLP's hidden width (``--hidden``).

    Returns:
        The model, on the CPU.

    Raises:
        ValueError: for an unknown name, or a CNN asked for flat inputs.
    """
    if name == "mlp":
        return mlp(int(torch.tensor(sample_shape).prod()), classes, hidden)
    if name == "cnn":
        if len(sample_shape) != 3:
            raise ValueError(f"the cnn needs image inputs (C, H, W), got shape {tuple(sample_shape)}")
        return small_cnn(sample_shape[0], sample_shape[1], classes)
    raise ValueError(f"unknown model {name!r}: choose mlp or cnn")
