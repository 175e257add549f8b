"""Tile grid, tile reading, stitching and blend weights on tiny synthetic arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from instantdl_ray.data import dataset
from instantdl_ray.io import read
from instantdl_ray.data.tile import (
    Tile,
    blend_weights,
    grid_tile_origins,
    random_tile_origins,
    read_tile,
    tile_grid,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the seeded-loop tests below still cover the same properties
    given = None


def check_grid(shape, tile, overlap):
    """Every property a grid must have, for one (shape, tile, overlap)."""
    tiles = tile_grid(shape, tile, overlap)
    tile_t = (tile,) * len(shape) if isinstance(tile, int) else tuple(tile)
    count = np.zeros(shape, dtype=np.int32)
    for t in tiles:
        count[t.core] += 1
        assert t.shape == tile_t
        for d, (r, c, cit, p) in enumerate(zip(t.read, t.core, t.core_in_tile, t.pad)):
            assert 0 <= r.start < r.stop <= shape[d]  # read inside the image
            assert r.start <= c.start < c.stop <= r.stop  # core inside read
            assert (cit.start, cit.stop) == (c.start - r.start, c.stop - r.start)
            assert p[0] == 0 and p[1] >= 0
            # padding only where the image is smaller than the tile; else full-size reads
            if shape[d] >= tile_t[d]:
                assert p == (0, 0) and r.stop - r.start == tile_t[d]
            else:
                assert (r.start, r.stop) == (0, shape[d]) and p[1] == tile_t[d] - shape[d]
    np.testing.assert_array_equal(count, 1)  # cores partition the image
    return tiles


if given is not None:

    @settings(max_examples=50, deadline=None)
    @given(
        ndim=st.sampled_from([2, 3]),
        data=st.data(),
    )
    def test_grid_partitions_image_property(ndim, data):
        shape = tuple(data.draw(st.integers(1, 40)) for _ in range(ndim))
        tile = tuple(data.draw(st.integers(1, 24)) for _ in range(ndim))
        overlap = tuple(data.draw(st.integers(0, t - 1)) for t in tile)
        check_grid(shape, tile, overlap)


def test_grid_partitions_image_seeded():
    rng = np.random.default_rng(0)
    for _ in range(100):
        ndim = int(rng.integers(2, 4))
        shape = tuple(int(s) for s in rng.integers(1, 40, ndim))
        tile = tuple(int(t) for t in rng.integers(1, 24, ndim))
        overlap = tuple(int(rng.integers(0, t)) for t in tile)
        check_grid(shape, tile, overlap)


def test_grid_known_layout():
    tiles = tile_grid((10,) * 2, 4, 2)
    starts = sorted({t.read[0].start for t in tiles})
    assert starts == [0, 2, 4, 6]  # stride 2, last start 10 - 4 = 6
    cores = sorted({(t.core[0].start, t.core[0].stop) for t in tiles})
    assert cores == [(0, 3), (3, 5), (5, 7), (7, 10)]
    # last tile shifted back inside: 11 px, tile 4, no overlap -> starts 0, 4, 7
    assert [o[0] for o in grid_tile_origins((11, 4), 4)] == [0, 4, 7]


def test_image_smaller_than_tile_pads_at_end():
    (t,) = tile_grid((3, 5), (8, 8), 2)
    assert t.read == (slice(0, 3), slice(0, 5))
    assert t.pad == ((0, 5), (0, 3))
    assert t.core_in_tile == (slice(0, 3), slice(0, 5))


def test_invalid_arguments():
    with pytest.raises(ValueError):
        tile_grid((10, 10), 4, 4)  # overlap must be < tile
    with pytest.raises(ValueError):
        tile_grid((10, 10), (4, 4, 4), 0)
    with pytest.raises(ValueError):
        tile_grid((10,), 4, 0)


@pytest.mark.parametrize(
    "shape,tile,overlap", [((37, 29), (16, 16), 4), ((9, 23, 30), (4, 16, 8), (1, 6, 3))]
)
def test_read_equals_numpy_slicing(shape, tile, overlap):
    rng = np.random.default_rng(1)
    image = rng.random((2,) + shape).astype(np.float32)
    for t in tile_grid(shape, tile, overlap):
        out = read_tile(image, t)
        assert out.shape == (2,) + tuple(tile)
        np.testing.assert_array_equal(out, image[(slice(None),) + t.read])
        # channel-last storage and channel-less arrays read the same window
        last = read_tile(np.moveaxis(image, 0, -1), t, channel_first=False)
        np.testing.assert_array_equal(last, out)
        np.testing.assert_array_equal(read_tile(image[0], t), out[0])


def test_read_equals_zarr_slicing(tmp_path):
    zarr = pytest.importorskip("zarr")
    rng = np.random.default_rng(2)
    image = rng.random((1, 7, 50, 45)).astype(np.float32)
    z = zarr.create_array(
        store=str(tmp_path / "img.zarr"), shape=image.shape, chunks=(1, 4, 16, 16), dtype="float32"
    )
    z[...] = image
    for t in tile_grid(image.shape[1:], (4, 20, 20), (2, 6, 6)):
        np.testing.assert_array_equal(read_tile(z, t), image[(slice(None),) + t.read])


def test_read_pads_reflect_or_zero():
    image = np.arange(3 * 5, dtype=np.float32).reshape(1, 3, 5)
    (t,) = tile_grid((3, 5), (6, 8), 0)
    out = read_tile(image, t)
    assert out.shape == (1, 6, 8)
    np.testing.assert_array_equal(out[0, :3, :5], image[0])
    np.testing.assert_array_equal(out[0, :, :5], np.pad(image[0], ((0, 3), (0, 0)), mode="reflect"))
    # a single-pixel axis cannot be mirrored: zeros
    (t1,) = tile_grid((1, 5), (4, 5), 0)
    out1 = read_tile(image[:, :1], t1)
    np.testing.assert_array_equal(out1[0, 1:], 0)


@pytest.mark.parametrize(
    "shape,tile,overlap",
    [((64, 50), (16, 16), 6), ((5, 7), (16, 16), 4), ((10, 33, 21), (4, 8, 8), (1, 3, 2))],
)
def test_stitch_cores_reproduces_image(shape, tile, overlap):
    rng = np.random.default_rng(3)
    image = rng.random((3,) + shape).astype(np.float32)
    out = np.full_like(image, np.nan)
    for t in tile_grid(shape, tile, overlap):
        pred = read_tile(image, t)  # identity "network"
        out[(slice(None),) + t.core] = pred[(slice(None),) + t.core_in_tile]
    np.testing.assert_array_equal(out, image)


def test_blend_weighted_stitch_reproduces_image():
    rng = np.random.default_rng(4)
    shape, tile = (40, 37), (16, 16)
    image = rng.random((1,) + shape).astype(np.float32)
    w = blend_weights(tile, "gaussian")
    acc = np.zeros(shape, np.float64)
    wsum = np.zeros(shape, np.float64)
    for t in tile_grid(shape, tile, 8):
        pred = read_tile(image, t)[0]
        valid = tuple(slice(0, r.stop - r.start) for r in t.read)
        acc[t.read] += (pred * w)[valid]
        wsum[t.read] += w[valid]
    np.testing.assert_allclose(acc / wsum, image[0], rtol=1e-5)


@pytest.mark.parametrize("tile", [(16, 16), (15, 20), (5, 12, 9)])
def test_blend_weights_positive_symmetric(tile):
    w = blend_weights(tile, "gaussian")
    assert w.shape == tile and w.dtype == np.float32
    assert np.all(w > 0) and w.max() == pytest.approx(1.0)
    for ax in range(len(tile)):
        np.testing.assert_array_equal(w, np.flip(w, ax))
    # peak in the centre, smaller at the corner
    assert w[tuple(t // 2 for t in tile)] > w[(0,) * len(tile)]
    np.testing.assert_array_equal(blend_weights(tile, "constant"), 1.0)
    assert blend_weights(8, ndim=3).shape == (8, 8, 8)
    with pytest.raises(ValueError):
        blend_weights(tile, "linear")


def test_random_origins_uniform_in_bounds_and_seeded():
    shape, tile = (50, 30, 40), (8, 16, 16)
    a = random_tile_origins(shape, tile, 200, np.random.default_rng(5))
    b = random_tile_origins(shape, tile, 200, np.random.default_rng(5))
    assert a == b
    arr = np.array(a)
    assert arr.min() >= 0
    assert np.all(arr <= np.array(shape) - np.array(tile))
    assert len({tuple(o) for o in a}) > 50
    # smaller than the tile: origin 0, read_tile pads
    assert random_tile_origins((4, 40), (8, 8), 5, np.random.default_rng(0))[0][0] == 0


def test_random_origins_foreground_weighted():
    shape, tile = (128, 128), (16, 16)
    weights = np.zeros((8, 8))
    weights[6, 1] = 1.0  # foreground only in the block rows 96..112, cols 16..32
    origins = random_tile_origins(shape, tile, 100, np.random.default_rng(6), weights=weights)
    for y, x in origins:
        # the tile centre lies in the weighted block
        assert 96 <= y + 8 < 112 and 16 <= x + 8 < 32
    # all-zero weights: uniform
    assert len(random_tile_origins(shape, tile, 5, np.random.default_rng(0), np.zeros((8, 8)))) == 5
    with pytest.raises(ValueError):
        random_tile_origins(shape, tile, 5, np.random.default_rng(0), np.ones((4,)))


def test_tile_is_frozen():
    t = tile_grid((8, 8), 4, 0)[0]
    assert isinstance(t, Tile)
    with pytest.raises(Exception):
        t.read = ()  # type: ignore[misc]
    assert t.origin == (0, 0)


def test_foreground_map_of_a_chunked_label_marks_exactly_the_labelled_cells(tmp_path):
    import zarr

    from instantdl_ray.data import dataset

    lab = np.zeros((5000, 3000), np.uint8)
    lab[10:20, 2990:3000] = 1  # in the last (partial) cell column
    lab[4100:4101, 100:101] = 3
    z = zarr.create_array(store=str(tmp_path / "l.zarr"), shape=lab.shape, chunks=(512, 512), dtype="uint8")
    z[...] = lab
    fg = dataset.foreground_map(str(tmp_path / "l.zarr"), "YX", [64, 64])
    assert fg.shape == (79, 47)
    assert set(map(tuple, np.argwhere(fg > 0))) == {(0, 46), (64, 1)}


def test_foreground_sampling_centres_tiles_on_sparse_labels():
    from types import SimpleNamespace

    from instantdl_ray.data import dataset
    from instantdl_ray.io import read

    plan = SimpleNamespace(tile_shape=[64, 64], image_size=None, axes="YX", task="semantic")
    samples = [read.Sample(name="a", image="a.tif", groundtruth="a_gt.tif")]
    shapes = {"a.tif": (2048, 2048)}
    fg = np.zeros((128, 128), np.float32)
    fg[100, 20] = 1  # one labelled 16x16 cell at y 1600..1616, x 320..336

    def hits(rows):
        return sum(1 for r in rows if 1600 - 64 < r["origin"][0] <= 1616 and 320 - 64 < r["origin"][1] <= 336)

    uniform = dataset.training_rows(samples, shapes, plan, 0, range(4), tiles=100)
    half = dataset.training_rows(samples, shapes, plan, 0, range(4), tiles=100, foreground={"a.tif": fg},
                                 foreground_fraction=0.5)
    assert len(half) == len(uniform) == 400
    assert hits(uniform) < 10 and 150 < hits(half) < 250
    # the default (no maps) draws exactly the rows it drew before the option existed
    assert uniform == dataset.training_rows(samples, shapes, plan, 0, range(4), tiles=100, foreground={"a.tif": fg})


def test_foreground_maps_read_only_labels_of_images_larger_than_a_tile(tmp_path):
    from types import SimpleNamespace

    import tifffile

    from instantdl_ray.data import dataset
    from instantdl_ray.io import read

    lab = np.zeros((200, 100), np.uint8)
    lab[150, 50] = 1
    tifffile.imwrite(tmp_path / "big_gt.tif", lab)
    plan = SimpleNamespace(tile_shape=[64, 64], axes="YX", target_axes="YX", task="semantic")
    samples = [read.Sample(name="big", image="big.tif", groundtruth=tmp_path / "big_gt.tif"),
               read.Sample(name="small", image="small.tif", groundtruth=tmp_path / "missing.tif")]
    maps = dataset.foreground_maps(samples, {"big.tif": (200, 100), "small.tif": (64, 64)}, plan)
    assert list(maps) == ["big.tif"]  # the small image's label is never opened
    assert set(map(tuple, np.argwhere(maps["big.tif"] > 0))) == {(9, 3)}


def test_training_epochs_hold_whole_batches_only():
    """A remainder of one row made a BatchNorm batch of one (InstantDL's own classification example,
    batch size 2): each epoch is filled up to a multiple of batch size x workers."""
    from instantdl_ray.config.plan import Plan

    plan = Plan(task="classification", spatial_dims=2, axes="YXC", target_axes=None, in_channels=3, out_channels=2,
                num_classes=2, class_names=["a", "b"], tile_shape=[64, 64], image_size=[64, 64], model="resnet50",
                loss="categorical_crossentropy", dropout=0.5)
    samples = [read.Sample(f"c{i}", Path(f"c{i}.png"), i % 2) for i in range(5)]
    shapes = {str(s.image): (28, 28, 3) for s in samples}
    for multiple in (1, 2, 4, 8):
        rows = dataset.training_rows(samples, shapes, plan, 0, range(3), multiple=multiple)
        per_epoch = [sum(r["epoch"] == e for r in rows) for e in range(3)]
        assert all(n % multiple == 0 and n >= max(5, multiple) for n in per_epoch), (multiple, per_epoch)
        assert {r["image"] for r in rows} == {str(s.image) for s in samples}  # every image still seen
        assert len({r["seed"] for r in rows}) == len(rows)  # filled-up rows get their own augmentation
    assert len(dataset.training_rows(samples, shapes, plan, 0, range(1))) == 5  # nothing added without need


@pytest.mark.parametrize("tile", [(64, 64), (48, 80), (16, 32, 32)])
def test_gaussian_blend_weights_are_monais_importance_map(tile):
    """blend_weights("gaussian") is MONAI's compute_importance_map (sigma 1/8 of the tile), scaled
    to a maximum of 1 (kept in NumPy: the stitching process never imports torch)."""
    from monai.data.utils import compute_importance_map

    ours = blend_weights(tile)
    theirs = np.asarray(compute_importance_map(tile, mode="gaussian", sigma_scale=0.125, device="cpu"))
    # the two differ only in where the 1e-3 floor is applied (before or after scaling to max 1): < 1e-4
    np.testing.assert_allclose(ours, theirs / theirs.max(), atol=1e-4)
