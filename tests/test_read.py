"""Readers, axis inference, channel-first conversion and InstantDL folder-layout discovery."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from instantdl_ray.io import read
from instantdl_ray.io.write import write_tiff
from instantdl_ray.io.read import (
    discover,
    infer_axes,
    open_array,
    read_instance_masks,
    read_label_csv,
    read_raw,
    to_channel_first,
)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def _rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------- readers


def test_png_grey(tmp_path):
    a = _rng().integers(0, 255, (20, 30), dtype=np.uint8)
    out = read_raw(_png(tmp_path / "g.png", a))
    assert out.dtype == np.uint8 and out.shape == (20, 30)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(open_array(tmp_path / "g.png"), a)


def test_png_grey_16bit(tmp_path):
    a = _rng().integers(0, 60000, (20, 30)).astype(np.uint16)
    out = read_raw(_png(tmp_path / "g16.png", a))
    assert out.shape == (20, 30)
    np.testing.assert_array_equal(out.astype(np.int64), a.astype(np.int64))


def test_png_rgb(tmp_path):
    a = _rng().integers(0, 255, (20, 30, 3), dtype=np.uint8)
    out = read_raw(_png(tmp_path / "c.png", a))
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, a)


def test_png_rgba_alpha_dropped_on_conversion(tmp_path):
    a = _rng().integers(0, 255, (20, 30, 4), dtype=np.uint8)
    raw = read_raw(_png(tmp_path / "a.png", a))
    assert raw.shape == (20, 30, 4)  # read as stored
    axes = infer_axes(raw.shape, (20, 30))
    assert axes == "YXC"
    chw = to_channel_first(raw, axes)
    assert chw.shape == (3, 20, 30) and chw.dtype == np.float32
    np.testing.assert_array_equal(chw, np.moveaxis(a[..., :3], -1, 0).astype(np.float32))


def test_palette_png_reads_as_rgb(tmp_path):
    im = Image.fromarray(_rng().integers(0, 4, (10, 12), dtype=np.uint8), mode="L").convert("P")
    im.save(tmp_path / "p.png")
    assert read_raw(tmp_path / "p.png").shape == (10, 12, 3)


def test_jpg(tmp_path):
    a = np.full((16, 24, 3), (200, 50, 20), np.uint8)
    Image.fromarray(a).save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(a).save(tmp_path / "c2.JPEG", quality=95)
    for name in ("c.jpg", "c2.JPEG"):
        out = read_raw(tmp_path / name)
        assert out.shape == (16, 24, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - a.astype(int)).max() <= 3  # lossy


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_2d(tmp_path, dtype):
    a = (_rng().random((20, 30)) * 200).astype(dtype)
    tifffile.imwrite(tmp_path / "t.tif", a)
    out = read_raw(tmp_path / "t.tif")
    assert out.dtype == dtype and out.shape == (20, 30)
    np.testing.assert_array_equal(out, a)
    lazy = open_array(tmp_path / "t.tif")  # zarr view: sliceable without reading everything
    assert tuple(lazy.shape) == (20, 30) and np.dtype(lazy.dtype) == dtype
    np.testing.assert_array_equal(np.asarray(lazy[5:10, 2:7]), a[5:10, 2:7])


def test_tiff_multipage_stack(tmp_path):
    a = _rng().integers(0, 4000, (6, 20, 30)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "s.tiff", a)
    out = read_raw(tmp_path / "s.tiff")
    assert out.shape == (6, 20, 30)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(np.asarray(open_array(tmp_path / "s.tiff")[2]), a[2])
    # a stack written page by page by another tool (PIL) reads as one 3-D array too
    pages = [Image.fromarray(p.astype(np.uint8)) for p in a]
    pages[0].save(tmp_path / "pil.tif", save_all=True, append_images=pages[1:])
    assert read_raw(tmp_path / "pil.tif").shape == (6, 20, 30)
    assert tuple(open_array(tmp_path / "pil.tif").shape) == (6, 20, 30)


def test_npy(tmp_path):
    a = _rng().random((3, 8, 9)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(read_raw(tmp_path / "a.npy"), a)
    np.testing.assert_array_equal(open_array(tmp_path / "a.npy"), a)


def test_npy_with_pickled_objects_refused(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        read_raw(tmp_path / "o.npy")


def test_zarr_array(tmp_path):
    zarr = pytest.importorskip("zarr")
    a = _rng().integers(0, 1000, (2, 30, 40)).astype(np.uint16)
    z = zarr.open_array(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, dtype=a.dtype, chunks=(1, 16, 16))
    z[...] = a
    np.testing.assert_array_equal(read_raw(tmp_path / "a.zarr"), a)
    lazy = open_array(tmp_path / "a.zarr")
    assert tuple(lazy.shape) == a.shape
    np.testing.assert_array_equal(np.asarray(lazy[1, 3:9, :5]), a[1, 3:9, :5])


def test_zarr_multiscale_group(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    full = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    g.create_array("0", shape=(64, 64), dtype="f4")[...] = full
    g.create_array("1", shape=(32, 32), dtype="f4")[...] = full[::2, ::2]
    assert tuple(open_array(tmp_path / "g.zarr").shape) == (64, 64)  # level 0 by default
    assert tuple(open_array(tmp_path / "g.zarr", level=1).shape) == (32, 32)
    np.testing.assert_array_equal(np.asarray(open_array(tmp_path / "g.zarr", level="1")[...]), full[::2, ::2])
    np.testing.assert_array_equal(read_raw(tmp_path / "g.zarr"), full)


def test_zarr_ome_multiscales_metadata(tmp_path):
    zarr = pytest.importorskip("zarr")
    g = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    g.create_array("s0", shape=(64, 64), dtype="u1")
    g.create_array("s1", shape=(32, 32), dtype="u1")
    g.attrs["multiscales"] = [{"datasets": [{"path": "s0"}, {"path": "s1"}]}]
    assert tuple(open_array(tmp_path / "ome.zarr").shape) == (64, 64)
    assert tuple(open_array(tmp_path / "ome.zarr", level=1).shape) == (32, 32)


def test_unsupported_suffix(tmp_path):
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(ValueError, match="unsupported file type '.bmp'"):
        read_raw(tmp_path / "x.bmp")


# ---------------------------------------------------------------- axes


@pytest.mark.parametrize(
    "image, target, dims, expected",
    [
        ((256, 256), (256, 256), None, "YX"),
        ((256, 256), None, None, "YX"),
        ((256, 256, 3), (256, 256), None, "YXC"),
        ((256, 256, 4), (256, 256), None, "YXC"),  # RGBA PNG (InstantDL's instance example)
        ((28, 28, 3), None, None, "YXC"),  # classification: no pixel target
        ((13, 256, 256), (256, 256), None, "CYX"),  # isl_dapi: 13 z-slices -> 13 channels of a 2-D target
        ((2, 64, 64), (64, 64), None, "CYX"),
        ((16, 128, 128), (16, 128, 128), None, "ZYX"),  # 3-D regression example: same-shape target
        ((16, 128, 128), (16, 128, 128), 3, "ZYX"),
        ((16, 128, 128), (16, 128, 128), 2, "CYX"),  # hint: 16 channels of a 2-D image, 16-channel target
        ((5, 64, 64), None, None, "CYX"),  # ambiguous without a hint: channels
        ((5, 64, 64), None, 3, "ZYX"),  # the hint settles it
        ((5, 64, 64), None, 2, "CYX"),
        ((64, 64, 3), (64, 64, 3), None, "YXC"),  # RGB -> RGB target (virtual staining), not Z=64, X=3
        ((16, 64, 64, 2), None, None, "ZYXC"),
        ((2, 16, 64, 64), None, None, "CZYX"),
    ],
)
def test_infer_axes(image, target, dims, expected):
    assert infer_axes(image, target, dims) == expected


def test_infer_axes_gives_up_on_5d():
    with pytest.raises(ValueError, match="set 'axes'"):
        infer_axes((1, 2, 3, 4, 5), None)


@pytest.mark.parametrize(
    "shape, axes, out_shape",
    [
        ((20, 30), "YX", (1, 20, 30)),
        ((20, 30, 3), "YXC", (3, 20, 30)),
        ((20, 30, 4), "YXC", (3, 20, 30)),  # alpha dropped
        ((13, 20, 30), "CYX", (13, 20, 30)),
        ((4, 20, 30), "CYX", (4, 20, 30)),  # 4 real channels (not colour) are kept
        ((6, 20, 30), "ZYX", (1, 6, 20, 30)),
        ((6, 20, 30, 2), "ZYXC", (2, 6, 20, 30)),
        ((2, 6, 20, 30), "CZYX", (2, 6, 20, 30)),
        ((20, 30, 6), "YXZ", (1, 6, 20, 30)),
        ((30, 20), "XY", (1, 20, 30)),
    ],
)
def test_to_channel_first(shape, axes, out_shape):
    a = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    out = to_channel_first(a, axes)
    assert out.shape == out_shape and out.dtype == np.float32 and out.flags.c_contiguous
    # values land where the axis names say
    names = axes.upper()
    idx = {ax: 1 for ax in names}
    src = tuple(idx[ax] for ax in names)
    dst = tuple(idx.get(ax, 0) for ax in "CZYX" if ax in names or ax == "C")
    assert out[dst] == a[src]


def test_to_channel_first_lowercase_and_mismatch():
    a = np.zeros((5, 6, 3), np.uint8)
    assert to_channel_first(a, "yxc").shape == (3, 5, 6)
    with pytest.raises(ValueError, match="does not match axes 'ZYX'"):
        to_channel_first(np.zeros((5, 6)), "ZYX")


# ---------------------------------------------------------------- discovery: default layout


def _touch_png(path: Path, shape=(8, 8)) -> Path:
    return _png(path, np.zeros(shape, np.uint8))


def test_discover_default_layout_pairs_by_file_name(semantic_set):
    samples, problems = discover(semantic_set, "train", "semantic")
    assert problems == []
    assert [s.name for s in samples] == [f"img{i:02d}" for i in range(6)]
    for s in samples:
        assert s.image.parent.name == "image" and s.groundtruth.parent.name == "groundtruth"
        assert s.image.name == s.groundtruth.name and s.stem == s.name
    test, problems = discover(semantic_set, "test", "semantic")
    assert len(test) == 3 and problems == []


def test_discover_pairs_by_stem_across_formats(tmp_path):
    _touch_png(tmp_path / "train" / "image" / "a.png")
    (tmp_path / "train" / "groundtruth").mkdir()
    tifffile.imwrite(tmp_path / "train" / "groundtruth" / "a.tif", np.zeros((8, 8), np.uint8))
    samples, problems = discover(tmp_path, "train", "regression")
    assert problems == [] and samples[0].groundtruth.name == "a.tif"


def test_discover_missing_partner_and_orphan_groundtruth(tmp_path):
    for n in ("a", "b"):
        _touch_png(tmp_path / "train" / "image" / f"{n}.png")
    _touch_png(tmp_path / "train" / "groundtruth" / "a.png")
    _touch_png(tmp_path / "train" / "groundtruth" / "zz.png")
    samples, problems = discover(tmp_path, "train", "semantic")
    assert len(samples) == 2 and samples[1].groundtruth is None
    assert len(problems) == 2
    assert any("b.png: no groundtruth partner" in p and str(tmp_path / "train" / "groundtruth" / "b.png") in p
               for p in problems)
    assert any(str(tmp_path / "train" / "groundtruth" / "zz.png") in p and "without an image" in p for p in problems)


def test_discover_test_split_may_lack_groundtruth(tmp_path):
    _touch_png(tmp_path / "test" / "image" / "a.png")
    samples, problems = discover(tmp_path, "test", "semantic")
    assert problems == [] and samples[0].groundtruth is None
    _touch_png(tmp_path / "train" / "image" / "a.png")
    samples, problems = discover(tmp_path, "train", "semantic")
    assert len(problems) == 1 and "groundtruth" in problems[0] and "folder missing" in problems[0]


def test_discover_missing_and_empty_folders(tmp_path):
    samples, problems = discover(tmp_path, "train", "semantic")
    assert samples == [] and "folder missing" in problems[0] and str(tmp_path / "train") in problems[0]
    (tmp_path / "train" / "image").mkdir(parents=True)
    samples, problems = discover(tmp_path, "train", "semantic")
    assert samples == [] and "no images found" in problems[0]


def test_discover_skips_hidden_and_names_unsupported_files(tmp_path):
    _touch_png(tmp_path / "train" / "image" / "a.png")
    _touch_png(tmp_path / "train" / "groundtruth" / "a.png")
    (tmp_path / "train" / "image" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "image" / "notes.txt").write_text("x")
    samples, problems = discover(tmp_path, "train", "semantic")
    assert len(samples) == 1
    assert len(problems) == 1 and "notes.txt" in problems[0] and "unsupported" in problems[0]


# ---------------------------------------------------------------- discovery: classification CSV


def _class_set(root: Path, names: list[str], rows: list[str], split="train", header=True) -> Path:
    for n in names:
        _touch_png(root / split / "image" / n)
    (root / split / "groundtruth").mkdir(parents=True, exist_ok=True)
    text = ("filename,groundtruth\n" if header else "") + "".join(r + "\n" for r in rows)
    (root / split / "groundtruth" / "groundtruth.csv").write_text(text)
    return root


def test_discover_classification_csv(tmp_path):
    _class_set(tmp_path, ["a.png", "b.png", "c.png"], ["a.png,0", "b.png,1", "c.png,2"])
    samples, problems = discover(tmp_path, "train", "classification")
    assert problems == []
    assert [(s.name, s.groundtruth) for s in samples] == [("a", 0), ("b", 1), ("c", 2)]


def test_discover_classification_headerless_csv_and_float_integers(tmp_path):
    _class_set(tmp_path, ["a.png", "b.png"], ["a.png,1.0", "b.png,0"], header=False)
    samples, problems = discover(tmp_path, "train", "classification")
    assert problems == [] and [s.groundtruth for s in samples] == [1, 0]


def test_discover_classification_file_without_row(tmp_path):
    _class_set(tmp_path, ["a.png", "b.png"], ["a.png,0"])
    samples, problems = discover(tmp_path, "train", "classification")
    assert len(problems) == 1
    assert str(tmp_path / "train" / "image" / "b.png") in problems[0] and "no row" in problems[0]
    assert samples[1].groundtruth is None


def test_discover_classification_row_without_file(tmp_path):
    _class_set(tmp_path, ["a.png", "b.png"], ["a.png,0", "b.png,1", "c.png,1"])
    samples, problems = discover(tmp_path, "train", "classification")
    assert len(problems) == 1 and "'c.png'" in problems[0] and "missing" in problems[0]
    assert str(tmp_path / "train" / "groundtruth" / "groundtruth.csv") in problems[0]


def test_discover_classification_typo_both_directions(tmp_path):
    _class_set(tmp_path, ["cell_01.png", "cell_02.png"], ["cell_01.png,0", "cel_02.png,1"])
    _, problems = discover(tmp_path, "train", "classification")
    assert any("cell_02.png" in p and "no row" in p for p in problems)
    assert any("'cel_02.png'" in p and "missing" in p for p in problems)


def test_discover_classification_master_list_csv_is_accepted(tmp_path):
    """InstantDL's own example ships a CSV for thousands of MNIST digits beside a few dozen images."""
    rows = [f"{i:06d}.png,{i % 2}" for i in range(100)]
    _class_set(tmp_path, ["000003.png", "000010.png"], rows)
    samples, problems = discover(tmp_path, "train", "classification")
    assert problems == [] and [s.groundtruth for s in samples] == [1, 0]


@pytest.mark.parametrize("label", ["cat", "1.5", ""])
def test_discover_classification_non_integer_label(tmp_path, label):
    _class_set(tmp_path, ["a.png", "b.png"], ["a.png,0", f"b.png,{label}"])
    samples, problems = discover(tmp_path, "train", "classification")
    assert len(problems) == 1 and "line 3" in problems[0] and "not an integer class" in problems[0]
    assert "groundtruth.csv" in problems[0]


def test_read_label_csv_rows(tmp_path):
    p = tmp_path / "g.csv"
    p.write_text("filename,groundtruth\n a.png ,3\n\nb.png,-1\nc.png\n")
    with pytest.raises(ValueError, match="line 5.*no label column"):
        read_label_csv(p)
    p.write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_label_csv(p)
    p.write_text("filename,groundtruth\n a.png ,3\n\nb.png,-1\n")
    assert read_label_csv(p) == {"a.png": 3, "b.png": -1}


def test_discover_classification_missing_csv(tmp_path):
    _touch_png(tmp_path / "train" / "image" / "a.png")
    samples, problems = discover(tmp_path, "train", "classification")
    assert len(samples) == 1 and "groundtruth.csv: missing" in problems[0]
    _touch_png(tmp_path / "test" / "image" / "a.png")
    samples, problems = discover(tmp_path, "test", "classification")
    assert len(samples) == 1 and problems == []  # test labels are optional


# ---------------------------------------------------------------- discovery: instance folders


def _instance_folder(split_dir: Path, sid: str, masks: list[np.ndarray], shape=(32, 32)) -> None:
    _png(split_dir / sid / "image" / f"{sid}.png", _rng().integers(0, 255, (*shape, 4), dtype=np.uint8))
    (split_dir / sid / "mask").mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(masks):
        _png(split_dir / sid / "mask" / f"m{i}.png", m)


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) * 255).astype(np.uint8)


def test_discover_instance_folder_layout(tmp_path):
    s = (32, 32)
    _instance_folder(tmp_path / "train", "id1", [_disc(s, 8, 8, 4), _disc(s, 20, 20, 5)])
    _instance_folder(tmp_path / "train", "id2", [_disc(s, 10, 20, 3)])
    samples, problems = discover(tmp_path, "train", "instance")
    assert problems == []
    assert [x.name for x in samples] == ["id1", "id2"]
    assert samples[0].image == tmp_path / "train" / "id1" / "image" / "id1.png"
    assert [p.name for p in samples[0].groundtruth] == ["m0.png", "m1.png"]
    lab = read_instance_masks(samples[0].groundtruth)
    assert lab.dtype == np.uint16 and lab.shape == s and set(np.unique(lab)) == {0, 1, 2}


def test_discover_instance_folder_problems(tmp_path):
    s = (16, 16)
    _instance_folder(tmp_path / "train", "ok", [_disc(s, 8, 8, 3)], shape=s)
    _instance_folder(tmp_path / "train", "nomask", [], shape=s)
    (tmp_path / "train" / "noimage" / "image").mkdir(parents=True)
    (tmp_path / "train" / "noimage" / "mask").mkdir(parents=True)
    samples, problems = discover(tmp_path, "train", "instance")
    assert [x.name for x in samples] == ["nomask", "ok"]
    assert any("nomask" in p and "no mask files" in p for p in problems)
    assert any("noimage" in p and "exactly one image, found 0" in p for p in problems)
    # on the test split, images without masks are fine
    _instance_folder(tmp_path / "test", "t", [], shape=s)
    samples, problems = discover(tmp_path, "test", "instance")
    assert problems == [] and samples[0].groundtruth is None


def test_instance_task_also_reads_the_default_layout(tmp_path):
    _touch_png(tmp_path / "train" / "image" / "a.png")
    (tmp_path / "train" / "groundtruth").mkdir()
    tifffile.imwrite(tmp_path / "train" / "groundtruth" / "a.tif", np.zeros((8, 8), np.uint16))
    samples, problems = discover(tmp_path, "train", "instance")
    assert problems == [] and samples[0].groundtruth.name == "a.tif"


def test_read_instance_masks_labels(tmp_path):
    s = (24, 24)
    grey = _png(tmp_path / "m1.png", _disc(s, 6, 6, 3))
    rgb = _png(tmp_path / "m2.png", np.repeat(_disc(s, 16, 16, 4)[..., None], 3, axis=-1))  # RGB mask
    overlap = _png(tmp_path / "m3.png", _disc(s, 8, 8, 2))  # overlaps m1: the later object wins
    lab = read_instance_masks([grey, rgb, overlap])
    assert lab.dtype == np.uint16 and lab.shape == s
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert lab[16, 16] == 2 and lab[8, 8] == 3 and lab[4, 6] == 1 and lab[0, 0] == 0
    with pytest.raises(ValueError, match="no masks"):
        read_instance_masks([])


def test_read_instance_masks_many_objects(tmp_path):
    paths = []
    for i in range(300):  # more objects than uint8 holds
        m = np.zeros((20, 20), np.uint8)
        m.flat[i] = 255
        paths.append(_png(tmp_path / f"m{i:03d}.png", m))
    lab = read_instance_masks(paths)
    assert lab.max() == 300 and lab.flat[299] == 300


# ---------------------------------------------------------------- writer


def test_write_tiff_atomic(tmp_path):
    a = _rng().random((5, 16, 16)).astype(np.float32)
    out = write_tiff(tmp_path / "sub" / "pred.tif", a)
    assert out == tmp_path / "sub" / "pred.tif"
    np.testing.assert_array_equal(read_raw(out), a)
    assert os.listdir(tmp_path / "sub") == ["pred.tif"]  # no temp files left
    # overwriting replaces the file in one step
    write_tiff(out, np.ones((4, 4), np.uint16), compression="zlib")
    np.testing.assert_array_equal(read_raw(out), np.ones((4, 4), np.uint16))
    assert os.listdir(tmp_path / "sub") == ["pred.tif"]


def test_write_tiff_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(tmp_path / "pred.tif", np.zeros((4, 4)))
    assert os.listdir(tmp_path) == []


def test_image_suffixes_cover_the_readers():
    slides = {".svs", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide", ".dcm"}  # io.slide (OpenSlide 4)
    assert set(read.IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".npy", ".zarr"} | slides
    assert read.is_image(Path("a.TIF")) and not read.is_image(Path(".hidden.png"))
    assert read.is_image(Path("slide.SVS")) and read.is_slide(Path("b.ndpi")) and not read.is_slide(Path("c.tif"))
    assert read.is_slide(Path("level0.dcm"))  # one file of a DICOM WSI (its folder: tests/test_slide_predict.py)


def test_atomic_writes_get_usual_permissions_and_leave_nothing_on_failure(tmp_path):
    import os

    from instantdl_ray.io import write

    umask = os.umask(0o022)
    try:
        p = write.write_tiff(tmp_path / "a.tif", np.zeros((4, 4), np.uint8))
        assert (p.stat().st_mode & 0o777) == 0o644
        with pytest.raises(RuntimeError):
            with write.atomic_path(tmp_path / "b.tif") as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("crash while writing")
    finally:
        os.umask(umask)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.tif"]
