"""Stitching label tiles (Mask R-CNN) into one label image: every object exactly once, whole
(issue 12, item 5).

The tiles here are cut from a groundtruth label image and relabelled independently per tile, as a
per-tile model would produce them: ids local to the tile, objects truncated at the read window.
Stitched through the real ``tile.tile_grid`` + ``stitch.ImageAccumulator``, each groundtruth
object must come out as exactly one object with the same pixels (IoU 1), none split, none lost.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

import instantdl_ray.predict.stitch as stitch
from instantdl_ray.config.plan import Plan, object_extents, required_overlap
from instantdl_ray.predict.stitch import ImageAccumulator
from instantdl_ray.data.tile import grid_overlap, read_tile, tile_grid


def _plan(tile, min_overlap=None) -> Plan:
    extra = {} if min_overlap is None else {"min_overlap": list(min_overlap)}
    return Plan(task="instance", spatial_dims=len(tile), axes="ZYX"[-len(tile):], target_axes="ZYX"[-len(tile):],
                in_channels=1, out_channels=2, num_classes=1, class_names=["background", "object"],
                tile_shape=list(tile), image_size=None, model="maskrcnn_resnet18_fpn", loss="maskrcnn", dropout=0.0,
                extra=extra)


def _ellipsoid(shape, centre, radii) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum(((g - c) / max(r, 1e-6)) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0


def _corner(shape, centre, size, orientation) -> np.ndarray:
    """A right triangle (2D) / corner simplex (3D) with legs of ``size + 1`` pixels around
    ``centre``: convex, but its centroid lies a third (a quarter) of the way from the corner, so
    it reaches about 2/3 (3/4) of its extent from the centroid towards the tip."""
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    total = 0
    for d, (g, c) in enumerate(zip(grids, centre)):
        sign = 1 if (orientation >> d) & 1 else -1
        rel = sign * (g - c) + size / 2  # 0 .. size inside the bounding box
        total = total + np.where((rel >= 0) & (rel <= size), rel, np.inf)
    return total <= size


def _shape(shape, centre, spec) -> np.ndarray:
    if isinstance(spec, tuple) and spec[0] == "corner":
        return _corner(shape, centre, spec[1], spec[2])
    return _ellipsoid(shape, centre, spec)


def _lattice(shape, spacing, radii_cycle) -> np.ndarray:
    """Objects on a lattice of ``spacing`` (not touching): with ``spacing`` coprime to the grid
    stride, their positions relative to the tile borders run through every phase on every axis,
    so objects cross read-window edges, core boundaries and tile corners at every offset."""
    lab = np.zeros(shape, np.int32)
    starts = [range(spacing // 2, s - spacing // 2, spacing) for s in shape]
    k = 0
    for centre in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(shape), -1).T:
        spec = radii_cycle[k % len(radii_cycle)]
        k += 1
        sl = tuple(slice(max(0, c - spacing), min(c + spacing, s)) for c, s in zip(centre, shape))
        local = _shape(tuple(s.stop - s.start for s in sl), [c - s.start for c, s in zip(centre, sl)], spec)
        lab[sl][local] = k
    return lab


def _random_objects(shape, n, max_radius, rng) -> np.ndarray:
    """Random non-touching ellipses/ellipsoids with semi-axes up to ``max_radius`` per axis, and
    right triangles with legs up to ``2 * max_radius + 1``."""
    lab = np.zeros(shape, np.int32)
    k = 0
    for _ in range(n * 20):
        if k == n:
            break
        centre = [rng.uniform(0, s) for s in shape]
        if rng.random() < 0.4:
            size, orient = int(rng.integers(4, 2 * max_radius + 1)), int(rng.integers(0, 2 ** len(shape)))
            m = _corner(shape, centre, size, orient)
            grown = ndi.binary_dilation(m, iterations=2)
        else:
            radii = rng.uniform(2, max_radius, len(shape))
            m = _ellipsoid(shape, centre, radii)
            grown = _ellipsoid(shape, centre, radii + 1.5)
        if not m.any() or (lab[grown] > 0).any():
            continue
        k += 1
        lab[m] = k
    return lab


def _tile_outputs(truth: np.ndarray, tiles, seed: int = 0) -> list[dict]:
    """Per tile: the truth seen through the read window, ids relabelled at random (local to the tile)."""
    rng = np.random.default_rng(seed)
    outs = []
    for t in tiles:
        tl = read_tile(truth[None], t)[0]
        crop = tuple(slice(0, s.stop - s.start) for s in t.read)
        ids = np.unique(tl[crop])
        ids = ids[ids > 0]
        lut = np.zeros(int(truth.max()) + 1, np.int32)
        lut[ids] = rng.permutation(len(ids)) + 1
        local = np.zeros(tl.shape, np.int32)
        local[crop] = lut[tl[crop]]  # the padding (beyond the image) holds no objects
        outs.append({"labels": local[None], "scores": np.linspace(0.99, 0.6, max(len(ids), 1)).astype(np.float32)})
    return outs


def _stitch(truth, tile, overlap, scratch=None, order=None, seed=0) -> np.ndarray:
    tiles = tile_grid(truth.shape, tile, overlap)
    outs = _tile_outputs(truth, tiles, seed)
    acc = ImageAccumulator(truth.shape, tiles, tuple(tile), scratch=scratch)
    order = range(len(tiles)) if order is None else order
    done = [acc.add(i, outs[i]) for i in order]
    assert done[-1] and not any(done[:-1])
    assert acc.streaming == (scratch is not None)
    return acc.result()["labels"]


def _mismatches(truth: np.ndarray, out: np.ndarray) -> list[str]:
    """Groundtruth objects that do not come out as exactly one predicted object with the same pixels."""
    bad = []
    for i in np.unique(truth[truth > 0]):
        ids = np.unique(out[truth == i])
        if len(ids) != 1 or ids[0] == 0 or not np.array_equal(out == ids[0], truth == i):
            iou = max([np.sum((out == j) & (truth == i)) / np.sum((out == j) | (truth == i)) for j in ids if j]
                      or [0.0])
            bad.append(f"object {i}: predicted ids {ids.tolist()}, best IoU {iou:.3f}")
    extra = set(np.unique(out[out > 0]).tolist()) - set(np.unique(out[truth > 0]).tolist())
    if extra:
        bad.append(f"{len(extra)} predicted objects outside every groundtruth object")
    return bad


def _assert_exact(truth, out):
    bad = _mismatches(truth, out)
    n = len(np.unique(truth[truth > 0]))
    assert not bad, f"{len(bad)} of {n} objects not recovered exactly once: {bad[:5]}"
    assert set(np.unique(out[out > 0]).tolist()) == set(range(1, n + 1))  # numbered 1..n, no gaps


# ---------------------------------------------------------------- objects smaller than the overlap

# extent (bounding box) up to 21 px per axis; overlap 22 = extent + 1, the exact requirement.
# The triangles reach 14 px from their centroid, more than the 11 px of context the core of the
# tile holding the centroid has: the old centroid rule kept them truncated.
RADII_2D = [(10, 10), ("corner", 20, 0), (10, 6), ("corner", 20, 1), (6, 10), ("corner", 20, 2), (8, 8),
            ("corner", 20, 3), (10, 3), ("corner", 14, 1)]


@pytest.mark.parametrize("tile,overlap", [((64, 64), (22, 22)), ((64, 80), (30, 22))])
def test_every_object_comes_out_once_and_whole_at_every_position(tile, overlap):
    # lattice spacing 23 is coprime to the strides (42, 34, 58): all phases against the borders;
    # most objects are larger than half the overlap (the old centroid rule kept them truncated)
    truth = _lattice((560, 600), 23, RADII_2D)
    _assert_exact(truth, _stitch(truth, tile, overlap))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_objects_come_out_once_in_any_tile_order(seed):
    rng = np.random.default_rng(seed)
    truth = _random_objects((300, 340), 60, 11, rng)  # extents up to 23
    order = rng.permutation(len(tile_grid(truth.shape, (64, 64), (24, 24))))
    _assert_exact(truth, _stitch(truth, (64, 64), (24, 24), order=order, seed=seed))


def test_3d_objects_come_out_once():
    shapes = [(5, 5, 5), ("corner", 12, 0), (3, 6, 4), ("corner", 12, 5), (6, 3, 5), ("corner", 12, 3)]
    truth = _lattice((44, 96, 96), 13, shapes)  # extents up to 13 (neighbours touch)
    _assert_exact(truth, _stitch(truth, (24, 48, 48), (14, 14, 14)))


def test_streaming_label_path_stitches_the_same(tmp_path, monkeypatch):
    truth = _lattice((300, 330), 23, RADII_2D)
    mem = _stitch(truth, (64, 64), (22, 22))
    monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
    monkeypatch.setattr(stitch, "STREAM_BLOCK", 48)
    order = np.random.default_rng(3).permutation(len(tile_grid(truth.shape, (64, 64), (22, 22))))
    big = _stitch(truth, (64, 64), (22, 22), scratch=tmp_path / "s", order=order)
    _assert_exact(truth, big)
    np.testing.assert_array_equal(mem > 0, big > 0)
    assert not (tmp_path / "s").exists()


def test_objects_on_the_image_border_and_single_tile_axes():
    # an axis shorter than the tile (one padded tile) has no inner edge: objects touching its
    # read window's end are whole; objects on the image border are whole too
    truth = np.zeros((40, 200), np.int32)
    truth[0:12, 0:12] = 1
    truth[28:40, 60:90] = 2
    truth[10:30, 188:200] = 3
    truth[5:35, 100:121] = 4
    _assert_exact(truth, _stitch(truth, (64, 64), (22, 22)))


# ---------------------------------------------------------------- objects larger than the overlap


@pytest.mark.parametrize("overlap", [12, 6])
def test_objects_larger_than_the_overlap_at_every_position_are_merged_from_pieces(overlap):
    """Objects of extent 21 with an overlap of 12 or 6: many lie whole in no read window; their
    pieces share pixels in the overlap zones and are merged into the one object."""
    truth = _lattice((400, 420), 23, RADII_2D)
    order = np.random.default_rng(overlap).permutation(len(tile_grid(truth.shape, (64, 64), overlap)))
    _assert_exact(truth, _stitch(truth, (64, 64), (overlap, overlap), order=order))


@pytest.mark.parametrize("order_seed", [None, 0, 1])
def test_object_larger_than_the_overlap_is_one_object(order_seed):
    """Fallback: an object that touches an inner edge of every tile containing it (only possible
    when it is larger than the overlap) is merged from its pieces into one object, whatever the
    order the tiles arrive in; the smaller objects around it are unaffected."""
    truth = np.zeros((200, 200), np.int32)
    truth[_ellipsoid(truth.shape, (100, 96), (45, 60))] = 1  # spans a 3x4 block of tiles
    truth[_ellipsoid(truth.shape, (10, 10), (5, 5))] = 2
    truth[_ellipsoid(truth.shape, (180, 40), (6, 9))] = 3
    truth[_ellipsoid(truth.shape, (20, 170), (8, 6))] = 4
    tiles = tile_grid(truth.shape, (64, 64), (20, 20))
    order = None if order_seed is None else np.random.default_rng(order_seed).permutation(len(tiles))
    out = _stitch(truth, (64, 64), (20, 20), order=order)
    ids = np.unique(out[truth == 1])
    assert len(ids) == 1 and ids[0] > 0, f"the large object came out as {ids.tolist()}"
    assert np.array_equal(out == ids[0], truth == 1)
    _assert_exact(truth, out)  # and the small ones around it come out once each


# ---------------------------------------------------------------- the overlap the objects need


def test_required_overlap_and_grid_overlap():
    assert required_overlap([21, 9]) == [25, 11]  # ceil(1.1 * extent) + 1 >= extent + 1
    plan = _plan((128, 128), min_overlap=(40, 10))
    assert grid_overlap(plan, 0.25) == (40, 32)  # the larger of tile_overlap * tile and the objects' need
    assert grid_overlap(plan, 0.0) == (40, 10)
    assert grid_overlap(_plan((128, 128)), 0.25) == (32, 32)  # plans without it (other tasks, old runs)
    assert grid_overlap(_plan((128, 128), min_overlap=(300, 5)), 0.1) == (64, 12)  # capped at half the tile
    assert grid_overlap(_plan((128, 128), min_overlap=(5, 5)), 0.9) == (115, 115)  # always < tile
    tile_grid((500, 500), (128, 128), grid_overlap(_plan((128, 128), min_overlap=(999, 999)), 0.99))


def test_object_extents_from_training_groundtruth(tmp_path):
    from instantdl_ray.io import read

    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        truth = _random_objects((120, 150), 12, 9, rng)
        tifffile.imwrite(tmp_path / f"gt{i}.tif", truth.astype(np.uint16))
        samples.append(read.Sample(f"s{i}", tmp_path / f"img{i}.tif", tmp_path / f"gt{i}.tif"))
    # the instance folder layout: one binary mask per object
    (tmp_path / "masks").mkdir()
    masks = []
    for k, (y, x, h, w) in enumerate([(5, 5, 30, 12), (50, 60, 8, 33)]):
        m = np.zeros((100, 100), np.uint8)
        m[y:y + h, x:x + w] = 255
        tifffile.imwrite(tmp_path / "masks" / f"m{k}.tif", m)
        masks.append(tmp_path / "masks" / f"m{k}.tif")
    samples.append(read.Sample("folder", tmp_path / "folder.tif", masks))
    ext = object_extents(samples, "YX")
    assert ext is not None and len(ext) == 2
    # discs up to 2 * 9 + 1 px; the mask objects 30 x 33 are the largest
    assert 19 <= ext[0] <= 30 and 19 <= ext[1] <= 33
    assert object_extents([read.Sample("x", tmp_path / "x.tif", None)], "YX") is None


def test_overlap_derived_from_training_objects_stitches_them_exactly(tmp_path):
    from instantdl_ray.io import read

    rng = np.random.default_rng(5)
    truth = _random_objects((260, 300), 50, 12, rng)
    tifffile.imwrite(tmp_path / "gt.tif", truth.astype(np.uint16))
    ext = object_extents([read.Sample("s", tmp_path / "img.tif", tmp_path / "gt.tif")], "YX")
    plan = _plan((72, 72), min_overlap=required_overlap(ext))
    ov = grid_overlap(plan, 0.0)
    assert all(o > e for o, e in zip(ov, ext))
    _assert_exact(truth, _stitch(truth, (72, 72), ov))


def test_make_plan_stores_the_instance_min_overlap(tmp_path):
    from conftest import make_instance_set

    from instantdl_ray.config import schema as config
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.config.validate import validate

    data = make_instance_set(tmp_path / "data", n_train=3, n_test=1, shape=(64, 64))
    cfg = config.from_dict({"use_algorithm": "instance", "path": str(data), "iterations_over_dataset": 1,
                            "evaluation": False})
    plan = make_plan(cfg, validate(cfg))
    assert plan.extra["object_extent"] == [13, 13]  # the conftest discs, radius 6
    assert plan.extra["min_overlap"] == required_overlap([13, 13])
    assert Plan.from_json(plan.to_dict()).extra["min_overlap"] == plan.extra["min_overlap"]


def test_grid_rows_read_the_grid_the_accumulator_stitches():
    """``dataset.grid_rows`` (the tiles read) and ``predict`` (the tiles stitched) both take the
    overlap from ``tile.grid_overlap``: same grid, including the objects' minimum overlap."""
    from pathlib import Path

    from instantdl_ray.io import read
    from instantdl_ray.data.dataset import grid_rows

    plan = _plan((64, 64), min_overlap=(40, 22))
    shapes = {"a.tif": (300, 200)}
    rows = grid_rows([read.Sample("a", Path("a.tif"), None)], shapes, plan, 0.25)
    tiles = tile_grid((300, 200), (64, 64), grid_overlap(plan, 0.25))
    assert grid_overlap(plan, 0.25) == (32, 22)  # min_overlap 40 capped at half the tile
    assert [r["origin"] for r in rows] == [list(t.origin) for t in tiles]
    assert len(rows) > len(tile_grid((300, 200), (64, 64), (16, 16)))
