"""Whole-slide images (issue 14, item 1): slide files written here with tifffile (an Aperio-style
``.svs`` that OpenSlide opens as vendor ``aperio``, an OME-TIFF pyramid with sub-IFDs) are read
by region through the package's readers, with their levels and pixel size; a broken slide is
reported by name, never skipped."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tissue_image, write_aperio_svs, write_ome_pyramid
from instantdl_ray.io import read
from instantdl_ray.io.slide import SlideLevel, slide_info

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def rgb():
    return tissue_image()


def test_aperio_svs_levels_pixel_size_and_regions(tmp_path, rgb):
    path = write_aperio_svs(tmp_path / "a.svs", rgb, mpp=0.5)
    info = slide_info(path)
    assert info.vendor == "aperio"
    assert info.levels == ((1536, 2048), (384, 512), (96, 128))
    assert info.downsamples == (1.0, 4.0, 16.0)
    assert info.mpp == {"y": 0.5, "x": 0.5}
    assert read.pixel_size(path) == {"y": 0.5, "x": 0.5}
    assert info.level_for(0.5) == 0 and info.level_for(2.0) == 1 and info.level_for(10.0) == 2
    assert info.level_for(0.25) == 0  # finer than the slide: the finest level

    arr = read.open_array(path)
    assert isinstance(arr, SlideLevel) and arr.shape == (1536, 2048, 3) and arr.dtype == np.uint8
    region = arr[300:556, 400:656]
    assert region.shape == (256, 256, 3)
    # JPEG (Q 90) is lossy: the region matches the written pixels closely
    assert np.abs(region.astype(int) - rgb[300:556, 400:656]).mean() < 4
    # indexing as numpy does: ints drop axes, steps subsample, channel picks, outside is white
    assert arr[310, 410].shape == (3,) and arr[300:310, 410, 1].shape == (10,)
    np.testing.assert_array_equal(arr[300:340:4, 400:440][..., 0], arr[300:340, 400:440][::4, :, 0])
    np.testing.assert_array_equal(arr[339:299:-1, 400:410], arr[300:340, 400:410][::-1])
    level1 = read.open_array(path, level=1)
    assert level1.shape == (384, 512, 3)
    assert np.abs(level1[100:150, 125:250].astype(int) - rgb[400:600:4, 500:1000:4]).mean() < 6


def test_ome_tiff_pyramid_levels_and_pixel_size(tmp_path, rgb):
    path = write_ome_pyramid(tmp_path / "b.ome.tif", rgb, mpp=0.25)
    info = slide_info(path)
    assert info.vendor == "ome-tiff"
    assert info.levels == ((1536, 2048), (768, 1024), (384, 512))
    assert info.downsamples == (1.0, 2.0, 4.0)
    assert info.mpp == pytest.approx({"y": 0.25, "x": 0.25})
    np.testing.assert_array_equal(read.open_array(path)[200:300, 300:400], rgb[200:300, 300:400])  # lossless
    np.testing.assert_array_equal(read.open_array(path, level=2)[10:20, 10:20], rgb[40:80:4, 40:80:4])


def test_slide_without_pixel_size(tmp_path, rgb):
    assert slide_info(write_aperio_svs(tmp_path / "nompp.svs", rgb, mpp=None)).mpp is None
    assert slide_info(write_ome_pyramid(tmp_path / "nompp.ome.tif", rgb, mpp=None)).mpp is None


def test_slides_are_discovered_and_a_broken_one_is_reported(tmp_path, rgb):
    image = tmp_path / "data" / "test" / "image"
    image.mkdir(parents=True)
    write_aperio_svs(image / "a.svs", rgb)
    write_ome_pyramid(image / "b.ome.tif", rgb)
    good = (image / "a.svs").read_bytes()
    (image / "c.svs").write_bytes(good[: len(good) // 3])  # truncated mid-file
    samples, problems = read.discover(tmp_path / "data", "test", "semantic")
    assert sorted(s.image.name for s in samples) == ["a.svs", "b.ome.tif", "c.svs"]
    assert not [p for p in problems if "unsupported" in p]
    assert read.check_pixels(image / "a.svs") is None and read.check_pixels(image / "b.ome.tif") is None
    why = read.check_pixels(image / "c.svs")
    assert why is not None and why  # OpenSlide's own words for the damage


def test_a_slide_level_pickles_by_path(tmp_path, rgb):
    import pickle

    arr = read.open_array(write_aperio_svs(tmp_path / "a.svs", rgb), level=1)
    again = pickle.loads(pickle.dumps(arr))
    assert again.shape == arr.shape and again.level == 1
    np.testing.assert_array_equal(again[0:64, 0:64], arr[0:64, 0:64])


def test_a_large_slide_is_never_read_whole(tmp_path, monkeypatch, rgb):
    monkeypatch.setattr(read, "FULL_DECODE_BYTES", 1000)
    with pytest.raises(ValueError, match="read region by region"):
        read.read_raw(write_aperio_svs(tmp_path / "a.svs", rgb))


def test_slide_indexing_is_numpys_and_a_subsampled_view_reads_chunk_by_chunk(tmp_path, monkeypatch):
    from instantdl_ray.io import slide as slide_mod

    img = tissue_image((300, 400))
    arr = read.open_array(write_aperio_svs(tmp_path / "a.svs", img, downsamples=(4,)))
    full = arr[...]
    for a in (0, -1, slice(None), slice(3, 250, 7), slice(None, None, -1), slice(250, 3, -5), slice(10, 10)):
        for b in (7, slice(2, 390, 9), slice(None, None, -3), slice(399, 0, -128)):
            for c in (slice(None), 0, slice(0, 2)):
                np.testing.assert_array_equal(arr[a, b, c], full[a, b, c])
    # a thumbnail-like view of the whole level (as evaluation figures take) never reads it whole
    sizes = []
    real = SlideLevel.read_region
    monkeypatch.setattr(slide_mod, "READ_CHUNK", 64)
    monkeypatch.setattr(SlideLevel, "read_region", lambda self, y, x, h, w: sizes.append(h * w) or real(self, y, x, h, w))
    view = arr[::8, ::8]
    np.testing.assert_array_equal(view, full[::8, ::8])
    assert max(sizes) <= 64 * 64 < 300 * 400


def test_a_folder_with_a_slide_converts_to_zarr(tmp_path, monkeypatch, rgb):
    """A slide is copied region by region (as every large image), not decoded whole."""
    from instantdl_ray.io import convert

    monkeypatch.setattr(read, "FULL_DECODE_BYTES", 1000)  # this slide counts as large

    src = tmp_path / "src"
    src.mkdir()
    write_aperio_svs(src / "a.svs", rgb)
    out = convert.to_zarr(src, tmp_path / "out", chunks=512, progress=lambda d, t: None)
    import zarr

    z = zarr.open(str(out[0]), mode="r")
    assert z.shape == (1536, 2048, 3)
    np.testing.assert_array_equal(z[300:400, 500:600], read.open_array(src / "a.svs")[300:400, 500:600])
