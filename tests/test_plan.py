"""Statistics for normalisation come from a bounded sample, never from every chunk of a slide."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from instantdl_ray.config.plan import NORM_PERCENTILES, _subsample, image_percentiles


class CountingArray:
    """A chunked lazy array that records which chunks a read touches."""

    def __init__(self, arr: np.ndarray, chunks: tuple[int, ...]):
        self.arr, self.chunks, self.shape, self.dtype = arr, chunks, arr.shape, arr.dtype
        self.touched: set[tuple[int, ...]] = set()

    def __getitem__(self, idx):
        view = np.zeros(self.shape, bool)
        view[idx] = True
        for pos in np.argwhere(view):
            self.touched.add(tuple(int(p // c) for p, c in zip(pos, self.chunks)))
        return self.arr[idx]


def test_chunked_slide_is_sampled_by_a_few_whole_chunks():
    rng = np.random.default_rng(0)
    arr = CountingArray(rng.integers(0, 255, (1024, 1024), dtype=np.uint8), (64, 64))  # 256 chunks
    sample = _subsample(arr, "YX", max_pixels=20_000)
    assert 20_000 <= sample.size <= 2 * 20_000 + 64 * 64  # about max_pixels, whole chunks
    assert len(arr.touched) == sample.size // (64 * 64) < 16  # only the chunks it returns
    # the same seed draws the same chunks
    assert np.array_equal(sample, _subsample(arr, "YX", max_pixels=20_000))


def test_channels_stay_whole_and_small_arrays_are_read_entirely():
    a = np.arange(2 * 512 * 512, dtype=np.float32).reshape(2, 512, 512)
    arr = CountingArray(a, (2, 64, 64))
    s = _subsample(arr, "CYX", max_pixels=30_000)
    assert s.shape[0] == 2 and s.shape[1] == 64
    assert np.array_equal(_subsample(a[:, :50, :50], "CYX"), a[:, :50, :50])
    # in-memory arrays: strided view
    assert _subsample(a, "CYX", max_pixels=30_000).shape == (2, 103, 103)


@pytest.mark.timeout(60)
def test_percentiles_of_a_zarr_slide_match_the_whole_image(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.normal(100, 20, (2048, 2048)).clip(0, 255).astype(np.uint8)
    z = zarr.create_array(store=str(tmp_path / "s.zarr"), shape=img.shape, chunks=(128, 128), dtype="uint8")
    z[...] = img
    (lo, hi), = image_percentiles(tmp_path / "s.zarr", "YX")
    ref_lo, ref_hi = np.percentile(img, NORM_PERCENTILES)
    assert abs(lo - ref_lo) <= 2 and abs(hi - ref_hi) <= 3
