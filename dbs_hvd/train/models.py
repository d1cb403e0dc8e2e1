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


def small_cnn(
    in_channels: int, image_size: int, classes: int = 10, width: int = 32, head: str = "pool"
) -> nn.Module:
    """Three conv blocks and a linear head (about 60k parameters at 3x32x32, width 32).

    Args:
        in_channels: channels of the input images.
        image_size: the side of the square input images.
        classes: the number of output classes.
        width: channels of the first conv block (the others have twice as many).
        head: ``"pool"`` averages the last feature map over all positions (few
            parameters, slow to train on small data); ``"flat"`` max-pools it once
            more and puts the linear layer over every position (learns digits in a
            few epochs).

    Returns:
        The model, on the CPU.

    Raises:
        ValueError: for an unknown head, or a flat head on images smaller than 8x8.
    """
    if head not in ("pool", "flat"):
        raise ValueError(f"unknown head {head!r}: choose pool or flat")
    if head == "flat" and image_size < 8:
        raise ValueError(f"the flat head needs images of at least 8x8, got {image_size}")
    blocks: list[nn.Module] = [
        nn.Conv2d(in_channels, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.ReLU(),
    ]
    if head == "pool":
        blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes)]
    else:
        side = image_size // 8
        blocks += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * side * side, classes)]
    return nn.Sequential(*blocks)


def build(name: str, sample_shape: torch.Size, classes: int = 10, hidden: int = 128) -> nn.Module:
    """The model dbs-train's ``--model`` names, sized for the data set's samples.

    Args:
        name: ``"mlp"``, ``"cnn"`` (pooled head) or ``"cnn-flat"`` (linear head over the
            whole feature map).
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
    if name in ("cnn", "cnn-flat"):
        if len(sample_shape) != 3:
            raise ValueError(f"the {name} needs image inputs (C, H, W), got shape {tuple(sample_shape)}")
        head = "flat" if name == "cnn-flat" else "pool"
        return small_cnn(sample_shape[0], sample_shape[1], classes, head=head)
    raise ValueError(f"unknown model {name!r}: choose mlp, cnn or cnn-flat")
