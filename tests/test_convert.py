"""convert.py: binary masks -> instance labels, images -> chunked zarr (tiny synthetic data, seconds)."""

from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from instantdl_ray.io import convert
from instantdl_ray.io import read

SHARED_DSB = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018_fluo256"


def quiet(done, total):
    pass


def disc(shape, centre, r):
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r**2


def touching_discs(shape=(64, 96)):
    """Two discs of radius 12 overlapping by 4 px: one connected component, two objects."""
    return disc(shape, (32, 30), 12) | disc(shape, (32, 50), 12)


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def semantic_set(root: Path, masks: dict[str, np.ndarray], test: int = 1) -> Path:
    """InstantDL semantic layout: train images + 0/255 PNG masks, ``test`` test images without masks."""
    rng = np.random.default_rng(0)
    for name, m in masks.items():
        save_png(root / "train" / "image" / f"{name}.png", rng.integers(0, 255, m.shape, dtype=np.uint8))
        save_png(root / "train" / "groundtruth" / f"{name}.png", (m > 0).astype(np.uint8) * 255)
    for i in range(test):
        save_png(root / "test" / "image" / f"t{i}.png", rng.integers(0, 255, (32, 32), dtype=np.uint8))
    return root


# ---------------------------------------------------------------- binary_to_labels


def test_watershed_splits_touching_discs():
    mask = touching_discs()
    assert convert.binary_to_labels(mask).max() == 1
    labels = convert.binary_to_labels(mask, watershed=True)
    assert labels.max() == 2
    assert np.array_equal(labels > 0, mask)  # watershed only splits, never loses foreground


def test_small_specks_dropped_and_labels_sequential():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px speck
    mask[10:20, 10:20] = 1
    mask[30, 30] = 1  # 1 px speck
    mask[25:35, 2:12] = 1
    labels = convert.binary_to_labels(mask, min_size=8)
    assert labels.dtype == np.uint16
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[2, 2] == 0 and labels[30, 30] == 0
    assert convert.binary_to_labels(mask, min_size=1).max() == 4


def test_diagonal_pixels_are_one_object():
    mask = np.eye(12, dtype=bool)  # 8-connected in 2D
    assert convert.binary_to_labels(mask, min_size=1).max() == 1
    vol = np.zeros((6, 6, 6), bool)
    vol[np.arange(6), np.arange(6), np.arange(6)] = True  # 26-connected in 3D
    assert convert.binary_to_labels(vol, min_size=1).max() == 1


def test_3d_masks():
    vol = np.zeros((20, 40, 40), bool)
    vol |= disc(vol.shape, (10, 12, 12), 6)
    vol |= disc(vol.shape, (10, 30, 30), 5)
    vol |= disc(vol.shape, (10, 20, 20), 0)  # single voxel: dropped
    labels = convert.binary_to_labels(vol, min_size=8)
    assert labels.shape == vol.shape and labels.dtype == np.uint16
    assert labels.max() == 2
    balls = disc((24, 32, 56), (12, 16, 18), 9) | disc((24, 32, 56), (12, 16, 34), 9)
    assert convert.binary_to_labels(balls).max() == 1
    assert convert.binary_to_labels(balls, watershed=True).max() == 2


# ---------------------------------------------------------------- instances_from_binary


def test_instances_from_binary_layout(tmp_path):
    masks = {"a": touching_discs(), "b": np.pad(np.ones((10, 10), bool), 20)}
    src = semantic_set(tmp_path / "sem", masks)
    (src / "train" / "image" / "notes.txt").write_text("ignored")
    dst = tmp_path / "inst"
    calls = []
    counts = convert.instances_from_binary(src, dst, watershed=True, progress=lambda d, t: calls.append((d, t)))

    assert counts == {"train": {"images": 2, "groundtruth": 2, "objects": 3},
                      "test": {"images": 1, "groundtruth": 0, "objects": 0}}
    assert calls[-1] == (3, 3)
    for name in ("a.png", "b.png"):  # images copied byte for byte
        assert (dst / "train" / "image" / name).read_bytes() == (src / "train" / "image" / name).read_bytes()
    assert (dst / "test" / "image" / "t0.png").exists() and not (dst / "test" / "groundtruth").exists()
    assert sorted(p.name for p in (dst / "train" / "groundtruth").iterdir()) == ["a.tif", "b.tif"]
    a = tifffile.imread(dst / "train" / "groundtruth" / "a.tif")
    assert a.dtype == np.uint16 and sorted(np.unique(a)) == [0, 1, 2]
    # the package's own discovery pairs a.png with a.tif
    samples, problems = read.discover(dst, "train", "instance")
    assert not problems and [s.groundtruth.name for s in samples] == ["a.tif", "b.tif"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_instances_from_binary_refuses_geojson_which_holds_objects_already(tmp_path):
    src = tmp_path / "sem"
    save_png(src / "train" / "image" / "a.png", np.zeros((64, 96), np.uint8))
    (src / "train" / "groundtruth").mkdir(parents=True)
    (src / "train" / "groundtruth" / "a.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(ValueError, match="a.geojson: GeoJSON polygons are objects already; train InstanceSegmentation"):
        convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)


def test_instances_from_binary_without_watershed_and_01_tiff_masks(tmp_path):
    src = tmp_path / "sem"
    save_png(src / "train" / "image" / "a.png", np.zeros((64, 96), np.uint8))
    (src / "train" / "groundtruth").mkdir(parents=True)
    tifffile.imwrite(src / "train" / "groundtruth" / "a.tif", touching_discs().astype(np.uint8))  # 0/1
    counts = convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)
    assert counts["train"]["objects"] == 1


def test_instances_from_binary_3d(tmp_path):
    src = tmp_path / "sem"
    vol = disc((16, 32, 32), (8, 10, 10), 5) | disc((16, 32, 32), (8, 24, 24), 5)
    (src / "train" / "image").mkdir(parents=True)
    (src / "train" / "groundtruth").mkdir(parents=True)
    tifffile.imwrite(src / "train" / "image" / "v.tif", np.zeros(vol.shape, np.uint16))
    tifffile.imwrite(src / "train" / "groundtruth" / "v.tif", vol.astype(np.uint8) * 255)
    counts = convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)
    labels = tifffile.imread(tmp_path / "inst" / "train" / "groundtruth" / "v.tif")
    assert labels.shape == vol.shape and labels.dtype == np.uint16 and labels.max() == 2
    assert counts["train"]["objects"] == 2


def test_instances_from_binary_refuses_existing_dst(tmp_path):
    src = semantic_set(tmp_path / "sem", {"a": touching_discs()})
    dst = tmp_path / "inst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="inst"):
        convert.instances_from_binary(src, dst, progress=quiet)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is fine
    convert.instances_from_binary(src, empty, progress=quiet)
    assert (empty / "train" / "groundtruth" / "a.tif").exists()


def test_instances_from_binary_reports_unpaired_and_writes_nothing(tmp_path):
    src = semantic_set(tmp_path / "sem", {"a": touching_discs()})
    save_png(src / "train" / "image" / "orphan.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="orphan.png"):
        convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sem"]


def test_instances_from_binary_refuses_shared_stems(tmp_path):
    src = semantic_set(tmp_path / "sem", {"a": touching_discs()}, test=0)
    tifffile.imwrite(src / "train" / "image" / "a.tif", np.zeros((64, 96), np.uint8))
    with pytest.raises(ValueError, match="a.tif"):
        convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)


def test_instances_from_binary_crash_leaves_nothing(tmp_path, monkeypatch):
    src = semantic_set(tmp_path / "sem", {"a": touching_discs(), "b": touching_discs()})

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert.write, "write_tiff", boom)
    with pytest.raises(RuntimeError):
        convert.instances_from_binary(src, tmp_path / "inst", progress=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sem"]


def test_default_progress_prints_final_line(tmp_path, capsys):
    src = semantic_set(tmp_path / "sem", {"a": touching_discs()}, test=0)
    convert.instances_from_binary(src, tmp_path / "inst")
    assert capsys.readouterr().out.strip().splitlines() == ["converted 1/1 images"]


@pytest.mark.skipif(not (SHARED_DSB / "semantic").is_dir(), reason="dsb2018_fluo256 not available")
def test_dsb2018_counts_match_reference(tmp_path):
    sem = SHARED_DSB / "semantic" / "train"
    names = sorted(p.name for p in (sem / "image").iterdir())[:3]
    src = tmp_path / "sem"
    for sub in ("image", "groundtruth"):
        (src / "train" / sub).mkdir(parents=True)
        for n in names:
            shutil.copy(sem / sub / n, src / "train" / sub / n)
    dst = tmp_path / "inst"
    convert.instances_from_binary(src, dst, watershed=True, progress=quiet)
    for n in names:
        stem = Path(n).stem
        ours = int(tifffile.imread(dst / "train" / "groundtruth" / f"{stem}.tif").max())
        ref = len(np.unique(read.read_raw(SHARED_DSB / "instance" / "train" / "groundtruth" / f"{stem}.tif"))) - 1
        assert abs(ours - ref) <= 0.3 * ref, (n, ours, ref)


# ---------------------------------------------------------------- to_zarr


def zread(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")


def test_zarr_chunks_rules():
    assert convert.zarr_chunks((1000, 700), "YX", 512) == (512, 512)
    assert convert.zarr_chunks((100, 700), None, 512) == (100, 512)
    assert convert.zarr_chunks((1000, 700, 3), "YXC", 256) == (256, 256, 3)
    assert convert.zarr_chunks((8, 1000, 700), "CYX", 256) == (8, 256, 256)
    assert convert.zarr_chunks((100, 1000, 700), "ZYX", 256) == (convert.DEPTH_CHUNK, 256, 256)
    assert convert.zarr_chunks((2, 1000, 700), None, (128, 64)) == (2, 128, 64)
    assert convert.zarr_chunks((10, 100, 100), "ZYX", (4, 50, None)) == (4, 50, 100)
    with pytest.raises(ValueError, match="chunks"):
        convert.zarr_chunks((10, 100, 100), "ZYX", (1, 2, 3, 4))


def test_to_zarr_png_roundtrip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    src = save_png(tmp_path / "rgb.png", rgb)
    out = convert.to_zarr(src, tmp_path / "rgb.zarr", chunks=128, progress=quiet)
    assert out == [tmp_path / "rgb.zarr"]
    z = zread(out[0])
    assert np.array_equal(z[...], rgb) and z.dtype == np.uint8
    assert z.chunks == (128, 128, 3)
    assert z.attrs["axes"] == "YXC"
    assert np.array_equal(read.read_raw(out[0]), rgb)  # the package reader opens it


def test_to_zarr_tiff_roundtrip_and_chunks(tmp_path):
    img = np.random.default_rng(2).integers(0, 60000, (700, 520), dtype=np.uint16)
    src = tmp_path / "big.tif"
    tifffile.imwrite(src, img, bigtiff=True)
    calls = []
    z = zread(convert.to_zarr(src, tmp_path / "big.zarr", chunks=256, progress=lambda d, t: calls.append((d, t)))[0])
    assert np.array_equal(z[...], img) and z.dtype == np.uint16
    assert z.chunks == (256, 256) and z.attrs["axes"] == "YX"
    assert calls[-1] == (9, 9)  # one call per 256x256 block


def test_to_zarr_tiled_compressed_tiff(tmp_path):
    img = np.random.default_rng(3).integers(0, 255, (600, 500), dtype=np.uint8)
    src = tmp_path / "tiled.tif"
    tifffile.imwrite(src, img, tile=(128, 128), compression="zlib")
    z = zread(convert.to_zarr(src, tmp_path / "tiled.zarr", chunks=(256, 128), progress=quiet)[0])
    assert np.array_equal(z[...], img) and z.chunks == (256, 128)


def test_to_zarr_3d_tiff(tmp_path):
    vol = np.random.default_rng(4).random((40, 70, 90), dtype=np.float32)
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol)
    z = zread(convert.to_zarr(src, tmp_path / "vol.zarr", chunks=32, axes="ZYX", progress=quiet)[0])
    assert np.array_equal(z[...], vol) and z.dtype == np.float32
    assert z.chunks == (32, 32, 32) and z.attrs["axes"] == "ZYX"
    imagej = tmp_path / "ij.tif"
    hyper = (np.stack([vol, 1 - vol], axis=1) * 1000).astype(np.uint16)  # (Z, C, Y, X)
    tifffile.imwrite(imagej, hyper, imagej=True, metadata={"axes": "ZCYX"})
    z = zread(convert.to_zarr(imagej, tmp_path / "ij.zarr", chunks=64, progress=quiet)[0])
    assert np.array_equal(z[...], hyper)
    assert z.attrs["axes"] == "ZCYX" and z.chunks == (32, 2, 64, 64)  # axes from the TIFF metadata


def test_to_zarr_npy_and_bad_arguments(tmp_path):
    arr = np.arange(2 * 50 * 60, dtype=np.int32).reshape(2, 50, 60)
    np.save(tmp_path / "a.npy", arr)
    z = zread(convert.to_zarr(tmp_path / "a.npy", tmp_path / "a.zarr", chunks=16, progress=quiet)[0])
    assert np.array_equal(z[...], arr) and z.chunks == (2, 16, 16)
    assert "axes" not in z.attrs  # (2, 50, 60): channels or slices? unknown, so not stored
    with pytest.raises(ValueError, match=r"\.zarr"):
        convert.to_zarr(tmp_path / "a.npy", tmp_path / "a.out", progress=quiet)
    with pytest.raises(ValueError, match="axes"):
        convert.to_zarr(tmp_path / "a.npy", tmp_path / "b.zarr", axes="ZYQ", progress=quiet)
    with pytest.raises(FileExistsError, match="a.zarr"):
        convert.to_zarr(tmp_path / "a.npy", tmp_path / "a.zarr", progress=quiet)
    assert not (tmp_path / "b.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_to_zarr_instantdl_folder(tmp_path):
    rng = np.random.default_rng(5)
    src = tmp_path / "data"
    imgs = {}
    for split in ("train", "test"):
        for i in range(2):
            im = rng.integers(0, 255, (40, 50), dtype=np.uint8)
            gt = (im > 128).astype(np.uint8)
            save_png(src / split / "image" / f"{split}{i}.png", im)
            (src / split / "groundtruth").mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(src / split / "groundtruth" / f"{split}{i}.tif", gt)
            imgs[f"{split}/image/{split}{i}.zarr"] = im
            imgs[f"{split}/groundtruth/{split}{i}.zarr"] = gt
    (src / "train" / "groundtruth" / "groundtruth.csv").write_text("filename,groundtruth\ntrain0.png,1\n")
    (src / "classes.txt").write_text("0 background\n1 cell\n")
    (src / ".DS_Store").write_text("junk")
    dst = tmp_path / "zarr"
    calls = []
    out = convert.to_zarr(src, dst, chunks=32, progress=lambda d, t: calls.append((d, t)))
    assert sorted(str(p.relative_to(dst)) for p in out) == sorted(imgs)
    for rel, expected in imgs.items():
        z = zread(dst / rel)
        assert np.array_equal(z[...], expected) and z.chunks == (32, 32)
    assert (dst / "train" / "groundtruth" / "groundtruth.csv").read_text() == \
        (src / "train" / "groundtruth" / "groundtruth.csv").read_text()
    assert (dst / "classes.txt").exists() and not (dst / ".DS_Store").exists()
    assert calls[-1] == (8, 8)
    # the converted set is still an InstantDL data set: images pair with groundtruth by stem
    samples, problems = read.discover(dst, "train", "semantic")
    assert not problems and len(samples) == 2


def test_to_zarr_plain_folder_and_name_clash(tmp_path):
    src = tmp_path / "plain"
    a = np.full((20, 30), 7, np.uint8)
    save_png(src / "a.png", a)
    tifffile.imwrite(src / "b.tif", a.astype(np.uint16))
    out = convert.to_zarr(src, tmp_path / "out", progress=quiet)
    assert sorted(p.name for p in out) == ["a.zarr", "b.zarr"]
    assert np.array_equal(zread(tmp_path / "out" / "b.zarr")[...], a)
    tifffile.imwrite(src / "a.tif", a)
    with pytest.raises(ValueError, match="a.zarr"):
        convert.to_zarr(src, tmp_path / "out2", progress=quiet)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("layout", ["contiguous", "tiled-zlib"])
def test_to_zarr_large_tiff_streams(tmp_path, layout):
    n = 4096
    src = tmp_path / "large.tif"
    kwargs = {} if layout == "contiguous" else {"tile": (256, 256), "compression": "zlib"}
    with tifffile.TiffWriter(src, bigtiff=True) as tw:  # written tile-row by tile-row: never whole here
        def rows():
            for y in range(0, n, 256):
                band = (np.arange(y, y + 256, dtype=np.uint32)[:, None] * 3 + np.arange(n, dtype=np.uint32)) % 251
                if layout == "contiguous":
                    yield band.astype(np.uint8)
                else:
                    for x in range(0, n, 256):
                        yield np.ascontiguousarray(band[:, x:x + 256].astype(np.uint8))
        tw.write(rows(), shape=(n, n), dtype=np.uint8, **kwargs)
    image_bytes = n * n
    # import zarr and its codecs before measuring: first-use imports alone allocate ~13 MiB
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((256, 256), np.uint8), **kwargs)
    convert.to_zarr(small, tmp_path / "small.zarr", progress=quiet)

    tracemalloc.start()
    try:
        convert.to_zarr(src, tmp_path / "large.zarr", chunks=512, progress=quiet)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < image_bytes / 4, f"peak {peak / 2**20:.1f} MiB for a {image_bytes / 2**20:.0f} MiB image"

    z = zread(tmp_path / "large.zarr")
    assert z.chunks == (512, 512)
    for y, x in [(0, 0), (1000, 3000), (3584, 3584)]:
        expected = ((np.arange(y, y + 512)[:, None] * 3 + np.arange(x, x + 512)) % 251).astype(np.uint8)
        assert np.array_equal(z[y:y + 512, x:x + 512], expected)
