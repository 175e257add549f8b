"""Slides at the model's resolution, only where there is tissue (issue 14, items 2-4 in part).

The resampled view, the choice of pyramid level, tissue detection on synthetic slides with a known
tissue area, tissue-only normalisation, manifests, partial tile grids in the stitcher, the model's
pixel size in the plan, and (with Ray) ``predict --input`` on a folder holding an Aperio ``.svs``
and an OME-TIFF pyramid, both written by the tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from conftest import tissue_image, write_aperio_svs, write_dicom_wsi, write_ome_pyramid
from instantdl_ray.config.plan import Plan, image_percentiles, model_mpp
from instantdl_ray.data.tile import tile_grid
from instantdl_ray.data.tissue import TissueMask, detect_tissue, mask_for
from instantdl_ray.errors import ConfigError, RunFailed
from instantdl_ray.io import read
from instantdl_ray.io.slide import Resampled, SlideInfo, View, choose_view
from instantdl_ray.predict.inputs import Input, gather, prepare, read_manifest
from instantdl_ray.predict.stitch import ImageAccumulator


def _plan(axes="YX", in_channels=1, mpp=None, tile=(128, 128)) -> Plan:
    return Plan(task="semantic", spatial_dims=2, axes=axes, target_axes="YX", in_channels=in_channels,
                out_channels=1, num_classes=1, class_names=["background", "foreground"], tile_shape=list(tile),
                image_size=None, model="unet", loss="dice_crossentropy", dropout=0.2,
                extra={"model_options": {"features": [4, 4, 8, 8, 16, 4]}}, mpp=mpp)


def _grey_slide(shape=(2048, 2048), boxes=((200, 300, 256, 256), (1400, 1500, 256, 300)), seed=0):
    """Dark fluorescence 'glass' (camera noise) with bright textured patches at ``boxes``."""
    rng = np.random.default_rng(seed)
    img = rng.normal(8, 2, shape)
    truth = np.zeros(shape, bool)
    for y, x, h, w in boxes:
        img[y:y + h, x:x + w] += 60 + 30 * rng.random((h, w))
        truth[y:y + h, x:x + w] = True
    return np.clip(img, 0, 255).astype(np.uint8), truth


# ---------------------------------------------------------------- resampling and levels


def test_resampled_view_equals_skimage_rescale_and_any_region_equals_the_whole():
    from skimage.transform import rescale

    a = np.random.default_rng(0).random((300, 200, 3)).astype(np.float32)
    r = Resampled(a, 0.5, "YXC")
    whole = r[:, :]
    assert whole.shape == r.shape == (150, 100, 3)
    ref = rescale(a, 0.5, channel_axis=2, order=1, anti_aliasing=True)
    np.testing.assert_allclose(whole[4:-4, 4:-4], ref[4:-4, 4:-4], atol=1e-5)
    # every region (a tile of any origin) holds exactly the pixels of the whole: no resampling seams
    for idx in [(slice(40, 90), slice(10, 77)), (slice(None, None, 3), slice(5, 50, 2), 1), (7, 3),
                (slice(80, 10, -7),), (Ellipsis, 2), (-1, -3), (slice(None), -1)]:
        np.testing.assert_array_equal(r[idx], whole[idx])
    with pytest.raises(IndexError):
        r[150, 0]
    up = Resampled(a[..., 0], 1.5, "YX")
    np.testing.assert_array_equal(up[30:60, 20:40], up[:, :][30:60, 20:40])


def test_choose_view_reads_the_nearest_finer_level_and_resamples_only_when_it_differs():
    info = SlideInfo("s", "aperio", ((4000, 4000), (1000, 1000), (250, 250)), (1.0, 4.0, 16.0), {"y": 0.25, "x": 0.25})
    assert choose_view(info, 0.25, 1.0) == View(1, 1.0, 1.0)  # level 1 is exactly 1 µm/px
    assert choose_view(info, 0.25, 0.5) == View(0, 0.5, 0.5)  # between levels: the finer one, shrunk
    assert choose_view(info, 0.25, 4.0) == View(2, 1.0, 4.0)
    assert choose_view(info, 0.25, 8.0) == View(2, 0.5, 8.0)
    assert choose_view(info, 0.25, 0.252) == View(0, 1.0, 0.25)  # within 2 %: read as stored
    assert choose_view(info, 0.25, 0.125) == View(0, 2.0, 0.125)  # finer than the scan: enlarged
    assert choose_view(info, None, 0.5) == View(0, 1.0, None)  # no pixel size: as stored
    assert choose_view(None, 0.3, 0.6) == View(0, 0.5, 0.6)  # a one-level image


def test_model_mpp_comes_from_the_setting_or_the_training_images_metadata(tmp_path):
    samples = []
    for k in range(3):
        p = tmp_path / f"im{k}.tif"
        tifffile.imwrite(p, np.zeros((8, 8), np.uint8), imagej=True, resolution=(1 / 0.5, 1 / 0.5), metadata={"unit": "um"})
        samples.append(read.Sample(p.stem, p))
    assert model_mpp(None, samples) == (pytest.approx(0.5), "metadata")
    assert model_mpp(0.5, samples) == (0.5, "config")
    with pytest.raises(ConfigError, match=r"mpp: 0.25 .*im0.tif.*0.5 µm/px"):
        model_mpp(0.25, samples)
    png = tmp_path / "print.png"  # 72 dpi: a print resolution, not a microscope's pixel size
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, dpi=(72, 72))
    assert read.pixel_size(png)["x"] == pytest.approx(352.78, rel=1e-3)
    assert model_mpp(None, [read.Sample("p", png)]) == (None, None)
    assert model_mpp(None, samples + [read.Sample("p", png)]) == (None, None)  # not every image states one


# ---------------------------------------------------------------- tissue


def test_detect_tissue_finds_the_known_tissue_of_a_colour_slide_and_none_on_glass():
    rng = np.random.default_rng(1)
    img = tissue_image()
    noisy = np.clip(img.astype(int) + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    truth = np.zeros(img.shape[:2], bool)
    truth[300:900, 400:1300] = truth[1000:1400, 1500:1900] = True
    m = detect_tissue(noisy[::4, ::4])
    t = truth[::4, ::4]
    assert (m & t).sum() / (m | t).sum() > 0.97
    glass = np.clip(236 + rng.normal(0, 4, (384, 512, 3)), 0, 255).astype(np.uint8)
    assert not detect_tissue(glass).any()
    assert not detect_tissue(np.clip(rng.normal(10, 2, (384, 512)), 0, 255)).any()  # grey noise only


@pytest.mark.parametrize("stored_as_rgb", [False, True])
@pytest.mark.parametrize("dark_background", [True, False])
def test_detect_tissue_on_one_channel_finds_the_side_the_tissue_lies_on(dark_background, stored_as_rgb):
    """Bug (``stored_as_rgb``): a grey scan saved with three equal channels has no saturation, so
    no tissue was found and the whole slide, glass and all, was predicted."""
    img, truth = _grey_slide((512, 512), ((50, 60, 100, 150), (300, 300, 120, 100)))
    img = img if dark_background else 255 - img  # fluorescence vs grey bright-field
    m = detect_tissue(np.repeat(img[..., None], 3, axis=2) if stored_as_rgb else img)
    assert (m & truth).sum() / (m | truth).sum() > 0.95


def test_a_grey_slide_in_an_rgb_svs_has_its_tissue_found(tmp_path):
    img, truth = _grey_slide((1024, 1024), ((100, 200, 256, 256), (600, 500, 300, 256)))
    path = write_aperio_svs(tmp_path / "grey.svs", np.repeat(img[..., None], 3, axis=2), mpp=0.5)
    m = mask_for(path, (1024, 1024), "auto", (256, 256))
    region = m.region((slice(0, 1024), slice(0, 1024)))
    assert region[truth].mean() > 0.99 and region[~truth].mean() < 0.1  # the tissue (and a 32 px margin)


def test_tissue_mask_selects_the_tiles_that_touch_tissue_and_maps_blocks():
    mask = np.zeros((64, 64), bool)
    mask[10:20, 40:50] = True
    tm = TissueMask(mask, (1024, 1024))  # 16 image px per mask px
    assert tm.fraction == pytest.approx(100 / 64**2)
    tiles = tile_grid((1024, 1024), (256, 256), (64, 64))
    keep = tm.tiles(tiles)
    want = [k for k, t in enumerate(tiles) if t.read[0].start < 320 and t.read[0].stop > 160
            and t.read[1].start < 800 and t.read[1].stop > 640]
    assert keep == want and 0 < len(keep) < len(tiles)
    region = tm.region((slice(150, 170), slice(630, 650)))
    assert region.shape == (20, 20)
    assert not region[:10].any() and region[10:, 10:].all()


def test_grey_slide_prepared_at_the_models_resolution_with_statistics_of_its_tissue(tmp_path):
    """0.02 % of the slide is tissue: the whole slide's percentiles are those of the glass noise
    (the issue's failure: noise stretched to the full range, every glass tile called nuclei); the
    prepared slide's come from the tissue and its margin, as a training tile's do."""
    img, truth = _grey_slide(boxes=((1000, 1000, 32, 32),))
    path = write_ome_pyramid(tmp_path / "fluo.ome.tif", img, mpp=0.25, downsamples=(2, 4))
    plan = _plan(mpp=0.5)
    lines = []
    samples, shapes, masks, problems = prepare([Input(path, "fluo")], plan, "auto", tmp_path / "out", log=lines.append)
    assert problems == []
    assert [s.stem for s in samples] == ["fluo"] and shapes[str(path)] == (1024, 1024)  # level 1: 0.5 µm/px
    assert plan.extra["views"][str(path)] == {"level": 1, "scale": 1.0, "mpp": 0.5}
    m = masks[str(path)]
    assert m.shape == (1024, 1024)
    region = m.region((slice(0, 1024), slice(0, 1024)))
    half = truth[::2, ::2]
    assert region[half].all()  # all tissue kept ...
    assert region[~half].mean() < 0.02  # ... and the glass left out, but for a margin
    lo, hi = plan.image_norm[str(path)][0]
    whole_lo, whole_hi = image_percentiles(path, "YX")[0]
    assert whole_hi < 20  # the glass's noise
    assert hi > 60 and lo < 20  # the tissue's brightest, the darkest of its surroundings
    assert (tmp_path / "out" / "tissue" / "fluo.png").exists()
    thumb = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "out" / "tissue" / "fluo_thumbnail.png"))
    assert thumb.ndim == 3 and ((thumb == (0, 220, 0)).all(-1)).any()  # the mask's outline drawn
    assert any("tissue covers" in ln for ln in lines)


def test_slide_without_pixel_size_is_refused_naming_the_manifest_fix(tmp_path):
    img, _ = _grey_slide((512, 512), ((100, 100, 200, 200),))
    path = write_ome_pyramid(tmp_path / "nompp.ome.tif", img, mpp=None)
    samples, _, _, problems = prepare([Input(path, "nompp")], _plan(mpp=0.5), "auto", tmp_path / "out", log=print)
    assert samples == [] and len(problems) == 1
    assert "nompp.ome.tif" in problems[0] and "no pixel size" in problems[0] and "slide,mpp" in problems[0]
    # the manifest's mpp fixes it
    samples, _, _, problems = prepare([Input(path, "nompp", mpp=0.25)], _plan(mpp=0.5), "none", tmp_path / "o2", log=print)
    assert problems == [] and len(samples) == 1


def test_manifest_rows_paths_names_and_problems(tmp_path):
    img, _ = _grey_slide((256, 256), ())
    write_ome_pyramid(tmp_path / "a.ome.tif", img, mpp=0.5)
    (tmp_path / "sub").mkdir()
    write_ome_pyramid(tmp_path / "sub" / "b.ome.tif", img, mpp=None)
    man = tmp_path / "m.csv"
    man.write_text("Slide,MPP,name\na.ome.tif,,\nsub/b.ome.tif,0.5,bee\n")
    found, problems = read_manifest(man)
    assert problems == [] and [(i.path.name, i.name, i.mpp) for i in found] == [("a.ome.tif", "a", None), ("b.ome.tif", "bee", 0.5)]
    assert gather(man)[0] == found
    man.write_text("slide,mpp\nmissing.svs,\na.ome.tif,zero\na.ome.tif,\n")
    found, problems = read_manifest(man)
    text = "\n".join(problems)
    assert "line 2: slide 'missing.svs' not found" in text and "line 3: mpp 'zero'" in text
    assert "name 'a' is used for more than one slide" in text
    man.write_text("file\nx.svs\n")
    assert "needs a 'slide' column" in read_manifest(man)[1][0]


def test_missing_mask_in_a_mask_folder_is_reported(tmp_path):
    img, _ = _grey_slide((512, 512), ((100, 100, 200, 200),))
    path = write_ome_pyramid(tmp_path / "s.ome.tif", img, mpp=0.5)
    (tmp_path / "masks").mkdir()
    _, _, _, problems = prepare([Input(path, "s")], _plan(), str(tmp_path / "masks"), tmp_path / "out", log=print)
    assert len(problems) == 1 and "holds no mask named 's.*'" in problems[0]
    m = np.zeros((32, 32), np.uint8)
    m[4:12, 4:12] = 255
    from PIL import Image

    Image.fromarray(m).save(tmp_path / "masks" / "s.png")
    tm = mask_for(path, (512, 512), str(tmp_path / "masks"), (128, 128))
    assert tm.fraction == pytest.approx(64 / 1024) and tm.region((slice(64, 65), slice(64, 65))).all()


def test_plain_images_and_ome_zarr_are_read_as_stored_and_duplicate_names_refused(tmp_path):
    """Only slides (vendor files, TIFF pyramids) are resampled to the model's pixel size: a plain
    TIFF at 0.25 µm/px and a multiscale OME-Zarr keep their shape, as the run's own test set does."""
    import zarr

    tif = tmp_path / "plain.tif"
    tifffile.imwrite(tif, np.full((300, 200), 50, np.uint8), imagej=True, resolution=(4, 4), metadata={"unit": "um"})
    z = zarr.open_group(str(tmp_path / "ms.zarr"), mode="w")
    z.create_array("0", data=np.full((256, 256), 9, np.uint8))
    z.create_array("1", data=np.full((128, 128), 9, np.uint8))
    z.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}, {"path": "1"}]}]
    plan = _plan(mpp=0.5)
    inputs = [Input(tif, "plain"), Input(tmp_path / "ms.zarr", "ms")]
    samples, shapes, masks, problems = prepare(inputs, plan, "auto", tmp_path / "out", log=print)
    assert problems == [] and masks == {} and plan.extra["views"] == {}
    assert shapes[str(tif)] == (300, 200) and shapes[str(tmp_path / "ms.zarr")] == (256, 256)
    tifffile.imwrite(tmp_path / "plain.png.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "x.ome.tif").write_bytes(tif.read_bytes())
    (tmp_path / "x.tif").write_bytes(tif.read_bytes())
    found, problems = gather(tmp_path)
    assert len(problems) == 1 and "x.ome.tif and x.tif would write the same outputs 'x'" in problems[0]


@pytest.mark.parametrize("task", ["semantic", "classification"])
def test_predict_again_keeps_what_the_same_model_and_settings_finished(tmp_path, monkeypatch, task):
    """``predict_new``'s bookkeeping, with the prediction itself replaced (no Ray): index.json
    lists every input (classification too); the same command again predicts nothing; other
    settings (or another model file) predict everything again; an image of the same name from
    another folder is not taken for a finished one."""
    import json

    from PIL import Image

    import instantdl_ray._ray as ray_mod
    import instantdl_ray.predict.pool as pool
    from instantdl_ray import pipeline
    from instantdl_ray.config import schema as config_mod

    calls = []

    def fake_predict(cfg, plan, samples, shapes, model_path, out_dir, resources, log=print, reuse=False,
                     masks=None, on_record=None):
        calls.append(sorted(s.stem for s in samples))
        recs = []
        for s in samples:
            if task == "classification":
                rec = {"name": s.image.name, "image": str(s.image), "prediction": 1, "prob": [0.2, 0.8],
                       "uncertainty": 0.1, "groundtruth": None}
            else:
                path = out_dir / "predictions" / f"{s.stem}.tif"
                path.parent.mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(path, np.zeros((4, 4), np.uint8))
                rec = {"name": s.stem, "image": str(s.image), "prediction": str(path), "uncertainty": None,
                       "groundtruth": None}
                on_record(rec)
            recs.append(rec)
        return recs

    monkeypatch.setattr(pool, "predict", fake_predict)
    monkeypatch.setattr(ray_mod, "init", lambda *a, **k: None)
    monkeypatch.setattr(ray_mod, "plan_now", lambda *a, **k: None)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "best").mkdir(parents=True)
    (run_dir / "checkpoints" / "best" / "model.pt").write_bytes(b"weights")
    (tmp_path / "data" / "train" / "image").mkdir(parents=True)
    algo = "Classification" if task == "classification" else "SemanticSegmentation"
    config_mod.dump(config_mod.from_dict({"use_algorithm": algo, "path": str(tmp_path / "data")}), run_dir / "config.yaml")
    plan = _plan()
    if task == "classification":
        plan.task, plan.class_names, plan.image_size, plan.num_classes = "classification", ["a", "b"], [64, 64], 2
    plan.to_json(run_dir / "plan.json")
    for d in ("imgs", "other/imgs"):
        (tmp_path / d).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.full((32, 32), 40 * k + 10, np.uint8)).save(tmp_path / d / f"im{k}.png")

    out = pipeline.predict_new(run_dir, tmp_path / "imgs")
    assert out == run_dir / "predict" / "imgs" and calls == [["im0", "im1"]]
    assert len(json.loads((out / "predictions" / "index.json").read_text())) == 2
    pipeline.predict_new(run_dir, tmp_path / "imgs")
    # nothing predicted again (classification records are named by file, a.png: redone, one forward pass each)
    assert len(calls) == (2 if task == "classification" else 1)
    n = len(calls)
    pipeline.predict_new(run_dir, tmp_path / "imgs", overrides=["calculate_uncertainty=false"])
    assert len(calls) == n + 1 and calls[-1] == ["im0", "im1"]  # other settings: everything again
    pipeline.predict_new(run_dir, tmp_path / "other" / "imgs", out=out, overrides=["calculate_uncertainty=false"])
    assert calls[-1] == ["im0", "im1"]  # same names, other files
    assert len(json.loads((out / "predictions" / "index.json").read_text())) == 2


def test_a_truncated_pyramid_is_reported_once_without_tifffile_warnings(tmp_path, caplog):
    img, _ = _grey_slide((1024, 1024), ((100, 100, 200, 200),))
    path = write_ome_pyramid(tmp_path / "cut.ome.tif", img, mpp=0.5)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 10])
    with caplog.at_level("WARNING"):
        why = read.check_pixels(path)
    assert why is not None and "truncated" in why
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]


# ---------------------------------------------------------------- stitching a partial grid


@pytest.mark.parametrize("streaming", [False, True])
def test_accumulator_with_tissue_tiles_only_gives_background_elsewhere(tmp_path, monkeypatch, streaming):
    import instantdl_ray.predict.stitch as stitch

    if streaming:
        monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
        monkeypatch.setattr(stitch, "STREAM_BLOCK", 128)
    shape, tile = (512, 512), (128, 128)
    tiles = tile_grid(shape, tile, (32, 32))
    mask = np.zeros((16, 16), bool)
    mask[2:6, 2:6] = True  # image px 64..192
    tm = TissueMask(mask, shape)
    active = tm.tiles(tiles)
    acc = ImageAccumulator(shape, tiles, tile, scratch=tmp_path / "s", active=active, mask=tm)
    done = [acc.add(k, {"prob": np.full((1,) + tile, 0.8, np.float32)}) for k in active]
    assert done[-1] and not any(done[:-1])
    assert acc.streaming == streaming
    out = np.asarray(acc.stitched()["prob"][...]) if streaming else acc.result()["prob"]
    inside = tm.region((slice(0, 512), slice(0, 512)))
    np.testing.assert_allclose(out[0][inside], 0.8, rtol=1e-5)
    assert not out[0][~inside].any()
    if streaming:
        assert acc.stitched()["prob"].attrs["min"] == [0.0]
        acc.cleanup()


# ---------------------------------------------------------------- outputs pathology tools open


def check_ome_zarr(path: Path, shape: tuple[int, int], mpp: float, labels: bool = True) -> None:
    """``path`` reads back with ``ome-zarr``'s reader: an NGFF 0.4 pyramid of ``shape`` at ``mpp``
    µm/px (micrometre axes) and, for segmentations, the mask under ``labels/prediction``."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    image = nodes[0]
    assert tuple(image.data[0].shape[-2:]) == shape
    ms = image.metadata
    assert ms["coordinateTransformations"][0][0]["scale"][-2:] == [mpp, mpp]
    assert [a.get("unit") for a in ms["axes"]][-2:] == ["micrometer", "micrometer"]
    assert len(image.data) > 1  # a pyramid
    names = [n.zarr.path.rstrip("/").rsplit("/", 1)[-1] for n in nodes]
    assert ("prediction" in names) == labels


def check_qupath_geojson(path: Path, object_type: str) -> list:
    """A valid GeoJSON FeatureCollection with the fields QuPath's importer reads; its polygons."""
    import geojson
    from shapely.geometry import shape

    fc = geojson.loads(path.read_text())
    assert fc["type"] == "FeatureCollection" and fc.is_valid and fc["features"]
    polys = []
    for feat in fc["features"]:
        props = feat["properties"]
        assert props["objectType"] == object_type
        assert isinstance(props["classification"]["name"], str) and len(props["classification"]["color"]) == 3
        assert any(k.startswith("Area") for k in props["measurements"])
        g = shape(feat["geometry"])
        assert g.is_valid and g.area > 0 and g.geom_type in ("Polygon", "MultiPolygon")
        polys.append(g)
    return polys


def test_instance_geojson_one_detection_per_object_with_holes_and_measurements(tmp_path):
    from instantdl_ray.io import write
    from instantdl_ray.predict.shapes import instance_features, write_geojson

    lab = np.zeros((300, 400), np.uint16)
    yy, xx = np.mgrid[:300, :400]
    lab[(yy - 100) ** 2 + (xx - 100) ** 2 < 40 ** 2] = 1
    lab[(yy - 100) ** 2 + (xx - 100) ** 2 < 10 ** 2] = 0  # a ring: one hole
    lab[200:260, 250:380] = 2
    write.write_csv(tmp_path / "o.csv", ["id", "score", "area", "y_min", "x_min", "y_max", "x_max"],
                    [[1, "0.9", int((lab == 1).sum()), 60, 60, 141, 141], [2, "nan", 60 * 130, 200, 250, 260, 380]])
    unc = np.full(lab.shape, 0.25, np.float32)
    feats = list(instance_features(lab, tmp_path / "o.csv", factor=2.0, mpp=0.5, name="nucleus", uncertainty=unc))
    write_geojson(tmp_path / "o.geojson", feats)
    polys = check_qupath_geojson(tmp_path / "o.geojson", "detection")
    assert len(polys) == 2
    ring, box = polys
    assert len(ring.interiors) == 1  # the hole kept
    assert ring.area == pytest.approx(np.pi * (40**2 - 10**2) * 4, rel=0.05)  # level-0 px: factor 2
    # pixel corners, as QuPath's (not centres: 499, 399); simplification moves a corner by < 1/2 px
    assert box.bounds[:2] == pytest.approx((500, 400), abs=1e-6)
    assert box.bounds[2:] == pytest.approx((760, 520), abs=1.0)
    m = feats[0]["properties"]["measurements"]
    assert m["Area µm^2"] == pytest.approx((lab == 1).sum() * 0.25) and m["score"] == 0.9
    assert m["mean uncertainty"] == pytest.approx(0.25)
    assert feats[1]["properties"]["measurements"]["score"] is None


def test_semantic_geojson_joins_regions_cut_by_block_edges(tmp_path, monkeypatch):
    import instantdl_ray.predict.shapes as shapes_mod

    monkeypatch.setattr(shapes_mod, "BLOCK", 64)  # the big regions cross block edges both ways
    mask = np.zeros((200, 200), np.uint8)
    mask[20:180, 20:60] = 1
    mask[50:70, 100:120] = 1
    mask[100:120, 30:190] = 2  # an L with class 1 beside it: classes stay apart
    mask[130:190, 150:190] = 2
    mask[140:150, 160:170] = 0  # a hole, inside one block
    feats = list(shapes_mod.class_features(mask, ["background", "tumour", "stroma"], factor=2.0, mpp=0.5))
    shapes_mod.write_geojson(tmp_path / "s.geojson", feats)
    polys = check_qupath_geojson(tmp_path / "s.geojson", "annotation")
    by: dict = {}
    for f, p in zip(feats, polys):
        by.setdefault(f["properties"]["classification"]["name"], []).append((p, f["properties"]["measurements"]))
    # tumour: the bar (still joined by its 10 px left strip where the stroma crosses it, and cut by
    # block edges at 64 and 128) and the square; stroma: its bar and the block with a hole
    assert len(by["tumour"]) == 2 and len(by["stroma"]) == 2
    bar, m = max(by["tumour"], key=lambda pm: pm[0].area)
    assert bar.geom_type == "Polygon"  # one polygon across the block edges
    n = int(((mask == 1)[:, :80]).sum())  # the bar's pixels
    assert bar.area == pytest.approx(n * 4, rel=0.03)  # level-0 coordinates: factor 2
    assert m["Area µm^2"] == pytest.approx(n * 0.25, rel=0.03)  # pixels of the model's grid x 0.5²
    assert len(max(by["stroma"], key=lambda pm: len(pm[0].interiors))[0].interiors) == 1  # the hole kept


def test_ome_zarr_writer_round_trip(tmp_path):
    from instantdl_ray.io import write

    img = np.random.default_rng(0).random((2, 1500, 1100)).astype(np.float32)
    write.write_ome_zarr(tmp_path / "x.ome.zarr", img, ["prediction", "uncertainty"], mpp=0.5,
                         labels={"prediction": (img[0] > 0.5).astype(np.uint8)})
    check_ome_zarr(tmp_path / "x.ome.zarr", (1500, 1100), 0.5)
    import zarr

    np.testing.assert_array_equal(np.asarray(zarr.open_group(str(tmp_path / "x.ome.zarr"), mode="r")["s0"]), img)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


# ---------------------------------------------------------------- end to end, with Ray


def _untrained_run(tmp_path: Path, task: str, plan: Plan, model: str, **model_kwargs) -> Path:
    """A run folder of ``task`` with ``plan`` and a ``model`` that was never trained (seeded)."""
    import torch

    from instantdl_ray.config import schema as config_mod
    from instantdl_ray.models import build_model

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "best").mkdir(parents=True)
    (tmp_path / "data" / "train" / "image").mkdir(parents=True)
    cfg = config_mod.from_dict({"use_algorithm": task, "path": str(tmp_path / "data")})
    config_mod.dump(cfg, run_dir / "config.yaml")
    plan.to_json(run_dir / "plan.json")
    torch.manual_seed(0)
    net = build_model(model, in_channels=plan.in_channels, out_channels=plan.out_channels, spatial_dims=2, dropout=0.2,
                      **model_kwargs)
    torch.save(net.state_dict(), run_dir / "checkpoints" / "best" / "model.pt")
    return run_dir


def _colour_run(tmp_path: Path) -> Path:
    """A run folder with a tiny colour U-Net (never trained) working at 0.5 µm/px."""
    return _untrained_run(tmp_path, "SemanticSegmentation", _plan(axes="YXC", in_channels=3, mpp=0.5, tile=(256, 256)),
                          "unet", features=[4, 4, 8, 8, 16, 4])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_collection_run_again_predicts_only_the_missing_slides(ray_session, tmp_path, monkeypatch):
    """A manifest of three slides; the run is killed (KeyboardInterrupt, as Ctrl-C) once the first
    slide's files are written; the same command again keeps that slide and predicts the other two."""
    import csv

    import instantdl_ray.predict.pool as pool
    from instantdl_ray import pipeline

    run_dir = _colour_run(tmp_path)
    rgb = tissue_image((768, 1024))
    for k in range(3):
        write_ome_pyramid(tmp_path / f"s{k}.ome.tif", np.roll(rgb, 100 * k, axis=1), mpp=0.5)
    man = tmp_path / "collection.csv"
    man.write_text("slide,name\n" + "".join(f"s{k}.ome.tif,slide{k}\n" for k in range(3)))
    real, calls = pool.write_image, []

    def killed_after_one(*a, **kw):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(pool, "write_image", killed_after_one)
    sets = ["calculate_uncertainty=false"]
    with pytest.raises(KeyboardInterrupt):
        pipeline.predict_new(run_dir, man, overrides=sets)
    out = run_dir / "predict" / "collection"  # the same command, the same folder
    with open(out / "slides.csv", newline="") as f:
        assert sorted(r["status"] for r in csv.DictReader(f)) == ["done", "pending", "pending"]
    first = next(p for p in (out / "predictions").glob("slide*.ome.zarr"))
    monkeypatch.setattr(pool, "write_image", real)
    stamp = first.stat().st_mtime_ns
    assert pipeline.predict_new(run_dir, man, overrides=sets) == out
    with open(out / "slides.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * 3
    log = (out / "predict.log").read_text()
    assert "predicting 2 images" in log and first.stat().st_mtime_ns == stamp  # the first was kept
    assert len(json_load(out / "predictions" / "index.json")) == 3
    for k in range(3):
        assert (out / "predictions" / f"slide{k}.geojson").exists()


def json_load(path: Path):
    import json

    return json.loads(path.read_text())


def test_predict_a_folder_with_an_svs_and_an_ome_tiff_only_where_there_is_tissue(ray_session, tmp_path):
    """``predict --input`` on a folder holding an Aperio ``.svs`` (RGB, 0.25 µm/px, levels 1 and
    1/4), an OME-TIFF pyramid and a DICOM WSI folder (0.5 µm/px) with a colour model working at
    0.5 µm/px: the ``.svs`` is read at level 0 and resampled by 1/2 (its level 1 is coarser than
    the model), the others as stored; all only where there is tissue, background 0 elsewhere, the pixel size recorded;
    masks and thumbnails saved. A threshold near 0 marks every pixel the model saw. A truncated
    ``.svs`` beside them fails alone: named in the error and in ``slides.csv``."""
    from instantdl_ray import pipeline

    rgb = tissue_image((1024, 1536))
    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_svs(slides / "he.svs", np.repeat(np.repeat(rgb, 2, 0), 2, 1), mpp=0.25, downsamples=(4,))
    write_ome_pyramid(slides / "he2.ome.tif", rgb, mpp=0.5, downsamples=(2, 4))
    write_dicom_wsi(slides / "he3", rgb, mpp=0.5, downsamples=(1, 4))  # a DICOM WSI folder
    (slides / "notes.txt").write_text("not an image")
    broken = write_aperio_svs(slides / "broken.svs", rgb, mpp=0.5, downsamples=(4,))
    with open(broken, "r+b") as f:  # a scan cut short: its tiles lie past the end of the file
        f.truncate(broken.stat().st_size * 2 // 3)

    run_dir = _colour_run(tmp_path)

    out = tmp_path / "out"
    with pytest.raises(RunFailed) as e:  # the broken slide is reported by name; the others are done
        pipeline.predict_new(run_dir, slides, out=out, overrides=["calculate_uncertainty=false", "threshold=1e-9"])
    assert e.value.exit_code != 0 and "1 of 4 inputs failed" in str(e.value)
    assert "broken.svs: cannot be read (image data up to byte" in str(e.value)
    import csv

    with open(out / "slides.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert {k: r["status"] for k, r in table.items()} == {"broken": "failed", "he": "done", "he2": "done", "he3": "done"}
    assert "truncated" in table["broken"]["error"]
    assert table["he"]["level"] == "0" and float(table["he"]["mpp"]) == 0.5 and int(table["he"]["tiles"]) > 0
    assert 0 < float(table["he2"]["tissue_fraction"]) < 1 and float(table["he2"]["seconds"]) >= 0
    assert "predictions/he.ome.zarr" in table["he"]["outputs"] and "predictions/he.geojson" in table["he"]["outputs"]
    log = (out / "predict.log").read_text()
    truth = np.zeros(rgb.shape[:2], bool)
    truth[300:900, 400:1300] = True  # tissue_image's first patch (its second lies at the corner)
    for name in ("he", "he2", "he3"):
        pred = tifffile.imread(out / "predictions" / f"{name}.tif")
        assert pred.shape == (1024, 1536), name  # both at 0.5 µm/px
        assert read.pixel_size(out / "predictions" / f"{name}.tif") == pytest.approx({"y": 0.5, "x": 0.5})
        assert pred[truth].mean() > 0.99, name  # the tissue was predicted ...
        far = np.ones_like(truth)
        far[200:1024, 300:1536] = False
        assert not pred[far].any(), name  # ... the glass far from it was not: background 0
        assert (out / "tissue" / f"{name}.png").exists() and (out / "tissue" / f"{name}_thumbnail.png").exists()
        assert f"{name}: tissue covers" in log
        check_ome_zarr(out / "predictions" / f"{name}.ome.zarr", (1024, 1536), 0.5)
        polys = check_qupath_geojson(out / "predictions" / f"{name}.geojson", "annotation")
        # the tissue's region, in the slide's level-0 pixels (the .svs: 0.25 µm/px, twice the model's)
        f = 2 if name == "he" else 1
        x0, y0, x1, y1 = max(polys, key=lambda p: p.area).bounds
        assert abs(y0 - 300 * f) < 40 * f and abs(x0 - 400 * f) < 40 * f and abs(y1 - 900 * f) < 40 * f
    assert "he: level 0, resampled x0.500 -> 0.5 µm/px" in log
    assert "1 file(s) of an unsupported type not predicted: notes.txt" in log
    n_tiles = len(tile_grid((1024, 1536), (256, 256), (64, 64)))
    counts = [int(ln.split(": ")[1].split(" of ")[0]) for ln in log.splitlines() if "tiles touch tissue" in ln]
    assert len(counts) == 3 and all(c < n_tiles for c in counts)


# ---------------------------------------------------------------- DICOM WSI


def test_a_dicom_wsi_folder_reads_as_a_slide_with_its_levels_and_pixel_size(tmp_path):
    from instantdl_ray.io.slide import slide_info

    img = tissue_image((1024, 1536))
    case = write_dicom_wsi(tmp_path / "slides" / "case7", img, mpp=0.25, downsamples=(1, 4))
    info = slide_info(case)
    assert info.vendor == "dicom" and info.levels == ((1024, 1536), (256, 384)) and info.downsamples == (1.0, 4.0)
    assert info.mpp == {"y": 0.25, "x": 0.25} and read.pixel_size(case) == {"y": 0.25, "x": 0.25}
    np.testing.assert_array_equal(np.asarray(read.open_array(case)[300:364, 400:464]), img[300:364, 400:464])
    assert read.open_array(case, 1).shape == (256, 384, 3)
    assert read.is_image(case) and read._stem(case) == "case7" and read.check_pixels(case) is None
    assert slide_info(case / "level1.dcm").levels == info.levels  # any file of the series opens the slide
    # a folder of slides: the DICOM folder is one input beside an .svs; the DICOM folder itself is one
    write_aperio_svs(tmp_path / "slides" / "he.svs", img, mpp=0.5, downsamples=(4,))
    found, problems = gather(tmp_path / "slides")
    assert problems == [] and sorted(i.name for i in found) == ["case7", "he"]
    assert [i.name for i in gather(case)[0]] == ["case7"]
    dotted = case.rename(case.with_name("TCGA-01.2"))  # case IDs with dots are folder names, not suffixes
    assert read.is_image(dotted) and read._stem(dotted) == "TCGA-01.2" and slide_info(dotted).vendor == "dicom"
    case = dotted.rename(case)
    # read at the model's 0.5 µm/px: level 0 halved (level 1 is coarser), only where there is tissue
    plan = _plan(axes="YXC", in_channels=3, mpp=0.5, tile=(256, 256))
    samples, shapes, masks, problems = prepare([Input(case, "case7")], plan, "auto", tmp_path / "out")
    assert problems == [] and shapes[str(case)] == (512, 768, 3)
    assert plan.extra["views"][str(case)] == {"level": 0, "scale": 0.5, "mpp": 0.5}
    assert 0.2 < masks[str(case)].fraction < 0.6
    # training: a DICOM folder in image/ pairs with its annotations in groundtruth/
    for sub in ("image", "groundtruth"):
        (tmp_path / "d" / "train" / sub).mkdir(parents=True)
    case.rename(tmp_path / "d" / "train" / "image" / "case7")
    (tmp_path / "d" / "train" / "groundtruth" / "case7.geojson").write_text("{}")
    samples, problems = read.discover(tmp_path / "d", "train", "semantic")
    assert problems == [] and [(x.name, x.groundtruth.name) for x in samples] == [("case7", "case7.geojson")]


# ---------------------------------------------------------------- classification on a slide: a tile map


def _classifier_plan(mpp=0.5) -> Plan:
    return Plan(task="classification", spatial_dims=2, axes="YXC", target_axes=None, in_channels=3, out_channels=2,
                num_classes=2, class_names=["glass", "tissue"], tile_shape=[64, 64], image_size=[64, 64],
                model="resnet18", loss="categorical_crossentropy", dropout=0.2, mpp=mpp,
                extra={"patch_shape": [128, 128]})


def test_a_tile_map_writes_the_patch_table_the_ome_zarr_map_and_the_slide_summary(tmp_path):
    import csv

    from instantdl_ray.data.dataset import patch_grid
    from instantdl_ray.predict.tilemap import TileMap, write_tile_map

    plan = _classifier_plan()
    grid = patch_grid(plan, (300, 520, 3))  # 3 x 5 patches of 128² (the last row and column shifted inside)
    active = [0, 1, 6, 7, 14]
    tm = TileMap(grid, active, 2)
    for k in active:
        p = 0.9 if k in (6, 7) else 0.2  # two 'tissue' patches
        assert tm.add(k, {"prob": np.array([1 - p, p]), "uncertainty": np.float32(0.1 * k)}) == (k == active[-1])
    s = read.Sample("he", Path("he.svs"), 1)
    rec = write_tile_map(s, tm, plan, tmp_path, {"factor": 2.0, "mpp": 0.5})
    assert rec["name"] == "he" and rec["tiles"] == 5 and rec["class_tiles"] == {"glass": 3, "tissue": 2}
    np.testing.assert_allclose(rec["prob"], [0.52, 0.48], atol=1e-6)  # the mean over the classified patches
    assert rec["prediction"] == 0 and rec["groundtruth"] == 1 and abs(rec["uncertainty"] - 0.56) < 1e-6
    with open(rec["tile_table"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["tile"]) for r in rows] == active
    r7 = rows[3]  # grid tile 7: row 1, col 2 -> level-0 box at twice the model grid's pixels
    assert (int(r7["row"]), int(r7["col"]), int(r7["x"]), int(r7["y"]), int(r7["width"])) == (1, 2, 512, 256, 256)
    assert r7["class"] == "tissue" and float(r7["prob_tissue"]) == pytest.approx(0.9)
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(rec["ome_zarr"]))())
    image = np.asarray(nodes[0].data[0])
    assert image.shape == (3, 3, 5)  # prob_glass, prob_tissue, uncertainty; one pixel per patch
    scale = nodes[0].metadata["coordinateTransformations"][0][0]["scale"]
    assert scale[-1] == pytest.approx(64.0)  # µm per map pixel: 128 px x 0.5 µm
    assert image[1, 1, 2] == pytest.approx(0.9) and image[1, 2, 0] == 0  # no patch there: 0
    import zarr

    labels = np.asarray(zarr.open(rec["ome_zarr"], mode="r")["labels/prediction/s0"])  # class + 1; 0: none
    assert labels.shape == (3, 5) and labels[1, 2] == 2 and labels[0, 0] == 1 and labels[2, 0] == 0


def test_a_classifier_reads_patches_of_its_training_size_on_a_slide():
    from instantdl_ray.data.dataset import ReadTiles, grid_rows, patch_grid

    plan = _classifier_plan()
    slide = np.zeros((300, 520, 3), np.uint8)
    slide[128:256, 256:384] = 200  # patch row 1, col 2
    path = "mem.svs"
    plan.extra["slides"] = {path: {"factor": 1.0, "mpp": 0.5}}
    plan.image_norm = {path: [[0.0, 255.0]] * 3}
    s = read.Sample("mem", Path(path), None)
    grid = patch_grid(plan, slide.shape)
    rows = grid_rows([s], {path: slide.shape}, plan, 0.0, keep={path: [7, 8]}, grids={path: grid})
    assert [r["tile_index"] for r in rows] == [7, 8] and rows[0]["origin"] == [128, 256]
    import instantdl_ray.data.dataset as dataset

    reader = ReadTiles(plan, with_target=False)
    dataset._open.cache_clear()
    orig = dataset._open
    dataset._open = lambda p: slide  # an in-memory slide
    try:
        out = reader({k: np.array([r[k] for r in rows]) for k in ("image", "origin")})
    finally:
        dataset._open = orig
    assert out["image"].shape == (2, 3, 64, 64)  # 128² patches resized to the network's 64²
    assert out["image"][0].min() > 0.7 and out["image"][1].max() < 0.1


def _classifier_run(tmp_path: Path) -> Path:
    """A run folder with a ResNet-18 (never trained) classifying 128² patches at 0.5 µm/px."""
    return _untrained_run(tmp_path, "Classification", _classifier_plan(), "resnet18")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_classifier_predicts_a_tile_map_of_a_slide_where_there_is_tissue(ray_session, tmp_path):
    """``predict --input`` of a classification run on a folder with an ``.svs``: a map of 128²
    patches, only those touching tissue classified, the slide's summary in ``predictions.csv``,
    ``slides.csv`` complete; run again, the finished slide is kept."""
    import csv

    from instantdl_ray import pipeline

    slides = tmp_path / "slides"
    slides.mkdir()
    write_aperio_svs(slides / "he.svs", tissue_image((1024, 1536)), mpp=0.5, downsamples=(4,))
    run_dir = _classifier_run(tmp_path)
    out = pipeline.predict_new(run_dir, slides, out=tmp_path / "out", overrides=["calculate_uncertainty=false"])
    with open(out / "slides.csv", newline="") as f:
        table = {r["name"]: r for r in csv.DictReader(f)}
    assert table["he"]["status"] == "done" and "predictions/he_tiles.csv" in table["he"]["outputs"]
    with open(out / "predictions" / "he_tiles.csv", newline="") as f:
        tiles = list(csv.DictReader(f))
    assert 0 < len(tiles) == int(table["he"]["tiles"]) < 8 * 12  # the tissue's patches of the 8 x 12 grid
    truth = np.zeros((1024, 1536), bool)
    truth[300:900, 400:1300] = truth[1000:1400, 1500:1900] = True
    for t in tiles:  # every classified patch touches tissue (with the mask's margin)
        y, x, h, w = (int(t[k]) for k in ("y", "x", "height", "width"))
        assert truth[max(0, y - 64):y + h + 64, max(0, x - 64):x + w + 64].any(), t
    with open(out / "predictions" / "predictions.csv", newline="") as f:
        summary = {r["filename"]: r for r in csv.DictReader(f)}
    assert summary["he"]["prediction"] in ("0", "1")
    assert abs(float(summary["he"]["prob_glass"]) + float(summary["he"]["prob_tissue"]) - 1) < 1e-4
    before = (out / "predictions" / "he_tiles.csv").stat().st_mtime_ns
    pipeline.predict_new(run_dir, slides, out=tmp_path / "out", overrides=["calculate_uncertainty=false"])
    assert (out / "predictions" / "he_tiles.csv").stat().st_mtime_ns == before  # kept, not predicted again
