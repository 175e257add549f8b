"""Shared test setup: one session-scoped local Ray (2 CPUs), tiny synthetic data sets, markers."""

from __future__ import annotations

import os
from pathlib import Path

# Set before torch is imported anywhere, so intra-op pools and Ray workers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests on real data (minutes)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance with 2 CPUs for every test that needs Ray (as on a 2-core laptop)."""
    import ray

    from instantdl_ray import _ray

    if not ray.is_initialized():
        _ray.init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available at {SHARED_DATA}")
    return SHARED_DATA


def _blobs(rng: np.random.Generator, shape=(64, 64), n=4, r=6):
    """A grey image with bright discs and its label image (uint16, 0 = background)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = rng.normal(20, 5, shape)
    lab = np.zeros(shape, np.uint16)
    for i in range(1, n + 1):
        cy, cx = rng.integers(r + 1, shape[0] - r - 1), rng.integers(r + 1, shape[1] - r - 1)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[disc] += 150
        lab[disc & (lab == 0)] = i
    return np.clip(img, 0, 255).astype(np.uint8), lab


def make_semantic_set(root: Path, n_train=6, n_test=3, shape=(64, 64), seed=0) -> Path:
    """InstantDL layout with PNG images and 0/255 PNG masks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, lab = _blobs(rng, shape)
            Image.fromarray(img).save(root / split / "image" / f"img{i:02d}.png")
            Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(root / split / "groundtruth" / f"img{i:02d}.png")
    return root


@pytest.fixture
def semantic_set(tmp_path) -> Path:
    return make_semantic_set(tmp_path / "data")


@pytest.fixture
def blobs():
    return _blobs
