"""Classification data for the aux-logit suite: sklearn's digits or any ``.npz`` with ``X`` and ``y``.

A split is stratified by class (test share 0.25, ``random_state = seed``) and standardised with the training
mean and standard deviation, as in Cloud et al.'s MNIST experiment. Labels are remapped to ``0 … C-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from purify.data import DataError
from purify.types import first_line

TEST_SHARE = 0.25


@dataclass
class Split:
    """One seed's train/test split, standardised; ``n_classes`` labels ``0 … C-1``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def dim(self) -> int:
        return int(self.x_train.shape[1])


def read_arrays(path: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``(X float64 (N, D), y int64 (N,))`` from an ``.npz`` (``None``: sklearn's digits), validated.

    Raises:
        DataError: (a ``ValueError``) one line naming the problem (missing key, shapes, lengths, NaN/inf, fewer than
            2 classes).
        FileNotFoundError: when ``path`` does not exist.
    """
    if path is None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        return x.astype(np.float64), y.astype(np.int64)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data: file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as err:  # zip or pickle problems
        raise DataError(f"{path}: cannot read as .npz ({first_line(err)})") from None
    for key in ("X", "y"):
        if key not in arrays:
            raise DataError(f"{path}: missing array {key!r}; expected X (float, N×D) and y (int, N), found "
                             f"{sorted(arrays) or 'no arrays'}")
    x, y = arrays["X"], arrays["y"]
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"{path}: X must be a non-empty numeric N×D array, got dtype {x.dtype} shape {x.shape}")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"{path}: y must be a 1-D array of integer class labels, got dtype {y.dtype} shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"{path}: X has {len(x)} rows but y has {len(y)} labels; they must match")
    if not np.isfinite(x).all():
        raise DataError(f"{path}: X contains {int((~np.isfinite(x)).sum())} NaN or infinite values; remove or "
                         "impute them")
    if not np.isfinite(y).all() or (y != np.round(y)).any():
        raise DataError(f"{path}: y must hold integer class labels (found NaN or non-integer values)")
    classes = np.unique(y)
    if len(classes) < 2:
        raise DataError(f"{path}: y has {len(classes)} class; a classification set needs at least 2")
    counts = np.bincount(np.searchsorted(classes, y))
    if counts.min() < 2:
        raise DataError(f"{path}: class {classes[counts.argmin()].item()!r} has {counts.min()} example; every class "
                        "needs at least 2 (one for training, one for testing)")
    return x.astype(np.float64), np.searchsorted(classes, y).astype(np.int64)


def split(x: np.ndarray, y: np.ndarray, seed: int) -> Split:
    """Stratified train/test split (test share 0.25, ``random_state=seed``), standardised on the training part."""
    from sklearn.model_selection import train_test_split

    try:
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=TEST_SHARE, random_state=seed, stratify=y)
    except ValueError as err:  # e.g. fewer test examples than classes
        raise DataError(f"cannot split {len(y)} examples of {int(y.max()) + 1} classes into train and test: "
                         f"{first_line(err)}") from None
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6

    def tensor(a: np.ndarray) -> Tensor:
        return torch.tensor((a - mu) / sd, dtype=torch.float32)

    return Split(tensor(x_tr), torch.tensor(y_tr), tensor(x_te), torch.tensor(y_te), int(y.max()) + 1)


def noise(n: int, dim: int, generator: torch.Generator) -> Tensor:
    """``(n, dim)`` inputs uniform on ``[-1, 1]``: the student's only training data."""
    return torch.rand(n, dim, generator=generator) * 2 - 1


def task_function(seed: int, k: int, dim: int, width: int = 64):
    """The shared function every teacher of a seed learns on its first ``k`` aux logits (the task to distil).

    ``f(x) = 2 tanh(x W1) W2`` with ``W1 ~ N(0, 1/dim)`` ``(dim, width)`` and ``W2 ~ N(0, 1/width)`` ``(width, k)``.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, width, generator=g) / dim ** 0.5
    w2 = torch.randn(width, k, generator=g) / width ** 0.5

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x @ w1) @ w2 * 2.0

    return f
