"""Data sets for dbs-train: digits (as shipped or shifted on a canvas), synthetic images, CIFAR-10.

All are returned as in-memory ``TensorDataset`` pairs (train, test). The digits
ship inside scikit-learn, so the default run needs no download; the synthetic
set is for throughput work; CIFAR-10 is read from the python-pickle batches of
a folder the user already has (``data_batch_1`` ... ``test_batch``).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset


def digits(
    flatten: bool, seed: int = 0, test_fraction: float = 0.2, image_size: int = 8
) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8x8 digits, scaled to [0, 1], split with a fixed seed.

    ``image_size`` > 8 upsamples the images (bilinear). On 8x8 inputs a small CNN
    does so little work per sample that fixed per-step costs dominate and no
    batch split can balance a slow rank; larger images give per-sample work
    like that of real image models.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.long)
    x = x.view(-1, 1, 8, 8)
    if image_size != 8:
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False
        )
    if flatten:
        x = x.flatten(1)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x)))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def shifted_digits(
    flatten: bool,
    canvas: int = 24,
    glyph: int = 16,
    noise: float = 0.1,
    train_copies: int = 4,
    test_copies: int = 10,
) -> tuple[TensorDataset, TensorDataset]:
    """The digits, each upsampled to ``glyph`` pixels and placed at random on a noisy canvas.

    Every training digit appears ``train_copies`` times and every test digit
    ``test_copies`` times, each copy at its own position with its own noise, so
    the test set is large (3,590 samples with the defaults) and the final
    accuracy of a model is stable to a fraction of a point across seeds; the
    shifts make the task need a convolutional model's work per sample. The
    data does not depend on dbs-train's ``--seed`` (the split and the
    placements use fixed seeds), so runs with different seeds differ only in
    the model's initialisation and the order of the samples.

    Args:
        flatten: flatten each sample to a vector (for the MLP).
        canvas: the side of the square image.
        glyph: the side each 8x8 digit is upsampled to before it is placed.
        noise: the standard deviation of the Gaussian noise added to the canvas.
        train_copies: placements of each training digit.
        test_copies: placements of each test digit.

    Returns:
        In-memory ``TensorDataset`` pairs (train, test) of shape (N, 1, canvas, canvas).
    """
    if not 8 <= glyph <= canvas:
        raise ValueError(f"shifted digits need 8 <= glyph <= canvas, got glyph {glyph}, canvas {canvas}")
    train, test = digits(flatten=False, seed=0, image_size=glyph)

    def place(source: TensorDataset, copies: int, seed: int) -> TensorDataset:
        images, labels = source.tensors
        gen = torch.Generator().manual_seed(seed)
        which = torch.arange(len(images)).repeat(copies)
        corners = torch.randint(0, canvas - glyph + 1, (len(which), 2), generator=gen)
        out = noise * torch.randn(len(which), 1, canvas, canvas, generator=gen)
        for k, (i, j) in enumerate(corners.tolist()):
            out[k, :, i : i + glyph, j : j + glyph] += images[which[k]]
        return TensorDataset(out.flatten(1) if flatten else out, labels[which])

    return place(train, train_copies, 1), place(test, test_copies, 2)


def synthetic(
    samples: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """Gaussian images labelled by a fixed random linear teacher: learnable, any size."""
    gen = torch.Generator().manual_seed(seed)
    n_test = max(samples // 8, classes)
    x = torch.randn(samples + n_test, *shape, generator=gen)
    teacher = torch.randn(int(np.prod(shape)), classes, generator=gen)
    y = (x.flatten(1) @ teacher).argmax(1)
    return (TensorDataset(x[:samples], y[:samples]), TensorDataset(x[samples:], y[samples:]))


def cifar10(folder: str | Path) -> tuple[TensorDataset, TensorDataset]:
    """CIFAR-10 from its python-pickle batches, normalised per channel."""
    folder = Path(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    missing = [n for n in names + ["test_batch"] if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a CIFAR-10 python folder: missing {', '.join(missing)} "
            "(expected the extracted cifar-10-batches-py directory)"
        )

    def load(files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for name in files:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0)
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    x_train, y_train = load(names)
    x_test, y_test = load(["test_batch"])
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    return (TensorDataset((x_train - mean) / std, y_train), TensorDataset((x_test - mean) / std, y_test))


def load(
    name: str,
    flatten: bool,
    seed: int = 0,
    samples: int = 4096,
    data_dir: str | None = None,
    image_size: int = 8,
) -> tuple[TensorDataset, TensorDataset]:
    """The (train, test) pair dbs-train's ``--dataset`` names.

    Args:
        name: ``"digits"``, ``"digits-shifted"``, ``"synthetic"`` or ``"cifar10"``.
        flatten: flatten each sample to a vector (for the MLP).
        seed: seeds the digits split and the synthetic data.
        samples: the synthetic training set's size.
        data_dir: the extracted ``cifar-10-batches-py`` folder (CIFAR-10 only).
        image_size: the digits' side after upsampling (8: as shipped).

    Returns:
        In-memory ``TensorDataset`` pairs (train, test).

    Raises:
        ValueError: for an unknown name, or CIFAR-10 without ``data_dir``.
        FileNotFoundError: if ``data_dir`` lacks a CIFAR-10 batch file.
    """
    if name == "digits":
        return digits(flatten, seed, image_size=image_size)
    if name == "digits-shifted":
        return shifted_digits(flatten)
    if name == "synthetic":
        shape = (3 * 32 * 32,) if flatten else (3, 32, 32)
        return synthetic(samples, shape, seed=seed)
    if name == "cifar10":
        if not data_dir:
            raise ValueError("--dataset cifar10 needs --data-dir pointing at cifar-10-batches-py")
        train, test = cifar10(data_dir)
        if flatten:
            train = TensorDataset(train.tensors[0].flatten(1), train.tensors[1])
            test = TensorDataset(test.tensors[0].flatten(1), test.tensors[1])
        return train, test
    raise ValueError(f"unknown data set {name!r}: choose digits, digits-shifted, synthetic or cifar10")
