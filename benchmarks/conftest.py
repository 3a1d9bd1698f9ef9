"""Fixtures for the benchmark suites: generated data sets (the measured limits are in ../conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.common import SIZES
from fasttrain.data.splits import ArraySplit, DataSet


@pytest.fixture(scope="session")
def photo_data(tmp_path_factory):
    """Bird-photo-sized JPEGs (500x375), 8 classes, in train/ and val/ folders."""
    from benchmarks.photos import write_photos
    from fasttrain.data import open_dataset

    return open_dataset("resnet", write_photos(tmp_path_factory.mktemp("photos"), SIZES.photos))


@pytest.fixture(scope="session")
def cifar_data():
    """CIFAR-shaped uint8 arrays; loaders neither decode nor look at content, so random pixels do."""
    rng = np.random.default_rng(0)
    def split(n):
        return ArraySplit(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n))
    return DataSet("cifar", "generated", [str(i) for i in range(100)], split(SIZES.cifar_images), split(1000))
