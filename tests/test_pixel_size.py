"""Outputs keep the input's pixel size, and binary masks show in Fiji (issue 17 item 13)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from instantdl_ray.config.plan import Plan
from instantdl_ray.io import read, write
from instantdl_ray.io.write import write_tiff_tiles
from instantdl_ray.predict.pool import _write_pixel


def _read_size(path):
    """The pixel size a TIFF reader such as Fiji finds: ImageJ unit and spacing, or the tags."""
    return read.pixel_size(path)


def test_pixel_size_from_imagej_ome_resolution_tags_and_png(tmp_path):
    a = np.zeros((32, 48), np.uint16)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata={"unit": "um"})
    assert _read_size(tmp_path / "ij.tif") == pytest.approx({"y": 0.5, "x": 0.25})
    tifffile.imwrite(tmp_path / "ome.tif", a, ome=True,
                     metadata={"axes": "YX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4, "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeYUnit": "µm"})
    assert _read_size(tmp_path / "ome.tif") == pytest.approx({"y": 0.4, "x": 0.4})
    tifffile.imwrite(tmp_path / "cm.tif", a, resolution=(20000, 20000), resolutionunit="CENTIMETER")  # 0.5 µm
    assert _read_size(tmp_path / "cm.tif") == pytest.approx({"y": 0.5, "x": 0.5})
    tifffile.imwrite(tmp_path / "none.tif", a)
    assert _read_size(tmp_path / "none.tif") is None
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "a.png", dpi=(25400 / 0.65, 25400 / 0.65))
    assert _read_size(tmp_path / "a.png") == pytest.approx({"y": 0.65, "x": 0.65}, rel=1e-3)
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "b.png")
    assert _read_size(tmp_path / "b.png") is None


def test_3d_spacing_round_trips(tmp_path):
    v = np.zeros((4, 32, 32), np.float32)
    write.write_tiff(tmp_path / "v.tif", v, pixel_size={"z": 2.0, "y": 0.3, "x": 0.3})
    assert _read_size(tmp_path / "v.tif") == pytest.approx({"z": 2.0, "y": 0.3, "x": 0.3})
    with tifffile.TiffFile(tmp_path / "v.tif") as tf:
        assert tf.series[0].shape == (4, 32, 32)


def test_predictions_and_uncertainty_keep_the_input_pixel_size_and_masks_show_in_fiji(tmp_path):
    img = tmp_path / "in.tif"
    tifffile.imwrite(img, np.zeros((32, 32), np.uint8), imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"unit": "um"})
    s = read.Sample("in", img, None)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:10, 4:10] = 1
    out = {"prediction": mask, "threshold": 0.4, "uncertainty": np.full((32, 32), 0.1, np.float32),
           "mutual_information": np.zeros((32, 32), np.float32)}
    plan = Plan(task="semantic", spatial_dims=2, axes="YX", target_axes="YX", in_channels=1, out_channels=1,
                num_classes=1, class_names=["background", "foreground"], tile_shape=[32, 32], image_size=None,
                model="unet", loss="dice_crossentropy", dropout=0.2)
    rec = _write_pixel(s, out, plan, tmp_path / "pred", tmp_path / "unc")
    for key in ("prediction", "uncertainty", "mutual_information"):
        assert _read_size(rec[key]) == pytest.approx({"y": 0.5, "x": 0.5}), key
    with tifffile.TiffFile(rec["prediction"]) as tf:
        np.testing.assert_array_equal(tf.asarray(), mask)  # values stay 0/1 for programs
        luts = tf.imagej_metadata.get("LUTs")
        assert luts is not None
        lut = luts[0] if isinstance(luts, list) else luts  # tifffile gives one LUT as the array itself
        assert lut.shape == (3, 256) and lut[:, 0].tolist() == [0, 0, 0] and lut[:, 1].tolist() == [255, 255, 255]


def test_instance_labels_without_imagej_dtype_get_resolution_tags(tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(img, dpi=(25400 / 0.25, 25400 / 0.25))
    labels = np.zeros((32, 32), np.int32)
    labels[2:6, 2:6] = 70000
    path = write.write_tiff(tmp_path / "l.tif", labels, pixel_size=read.pixel_size(img))
    assert _read_size(path) == pytest.approx({"y": 0.25, "x": 0.25}, rel=1e-3)


def test_large_tiled_outputs_keep_the_pixel_size(tmp_path):
    z = zarr.create_array(store=str(tmp_path / "p.zarr"), shape=(600, 700), chunks=(512, 512), dtype="uint8")
    z[:] = 1
    path = write_tiff_tiles(tmp_path / "p.tif", z, {"y": 0.5, "x": 0.5})
    assert _read_size(path) == pytest.approx({"y": 0.5, "x": 0.5})
    with tifffile.TiffFile(path) as tf:
        assert tf.is_bigtiff and tf.pages[0].is_tiled
