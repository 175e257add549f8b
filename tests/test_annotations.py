"""Training from annotated slides (issue 14, item 5): QuPath GeoJSON or a label image as groundtruth.

GeoJSON is read in the forms QuPath writes, rasterised exactly (a label written as polygons by
``predict.shapes.outline`` comes back pixel for pixel), checked before training with messages that
name the file, mapped to classes in the plan, and tiles are sampled and validated only where the
annotations are. A slide's label image may be stored at an integer downsample; tiles of a slide
with a label image come from its tissue. With Ray: a run trains on ``.svs`` slides annotated with GeoJSON and evaluates
against a rasterised GeoJSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, annotated_slide, tissue_image, write_aperio_svs
from instantdl_ray.config import schema
from instantdl_ray.config.plan import channel_stats, image_percentiles, make_plan
from instantdl_ray.config.validate import validate
from instantdl_ray.data.dataset import (ReadTiles, region_maps, region_tiles, coverage_cell, grid_rows,
                                        training_rows)
from instantdl_ray.errors import DataError
from instantdl_ray.io import annotations, read
from instantdl_ray.predict.shapes import label_features

EXAMPLE = REPO / "examples" / "dsb2018_small" / "train"


def _label(shape=(300, 400), seed=0) -> np.ndarray:
    """Objects of many shapes (ellipses at angles, touching the border, one with a hole, one
    inside another's hole), labelled 1..n."""
    from skimage.draw import ellipse
    from skimage.measure import label

    rng = np.random.default_rng(seed)
    m = np.zeros(shape, bool)
    for _ in range(25):
        rr, cc = ellipse(rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 20),
                         rng.integers(2, 20), shape, rotation=rng.uniform(0, 3))
        m[rr, cc] = True
    m[100:160, 100:160] = True
    m[110:150, 110:150] = False  # a hole ...
    m[125:135, 125:135] = True  # ... with an island in it
    return label(m)


def _write(path: Path, features, collection=True) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features} if collection else features))
    return path


def _feature(geom: dict, name=None, object_type="annotation") -> dict:
    props = {"objectType": object_type}
    if name:
        props["classification"] = {"name": name, "color": [1, 2, 3]}
    return {"type": "Feature", "geometry": geom, "properties": props}


def _rect(x0, y0, x1, y1) -> dict:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}


# ---------------------------------------------------------------- reading and rasterising


def test_polygons_written_from_a_label_rasterise_back_to_it_pixel_for_pixel(tmp_path):
    lab = _label()
    path = _write(tmp_path / "a.geojson", list(label_features(lab, "Nucleus")))
    classes = annotations.Labels(path, lab.shape, {"Nucleus": 1})
    np.testing.assert_array_equal(classes[:, :], (lab > 0).astype(np.uint16))
    objects = annotations.Labels(path, lab.shape)[:, :]  # one id per polygon
    assert objects.max() == lab.max()
    np.testing.assert_array_equal(objects > 0, lab > 0)
    for i in range(1, lab.max() + 1):  # the same objects, whatever their ids
        assert len(np.unique(objects[lab == i])) == 1
    # any window equals that part of the whole, also one reaching past the image
    for ys, xs in [(slice(50, 170), slice(90, 260)), (slice(0, 7), slice(399, 400)), (slice(250, 400), slice(350, 500))]:
        np.testing.assert_array_equal(classes[ys, xs], (lab[ys, xs] > 0).astype(np.uint16))
    # numpy's indexing: integers, negative indices, steps, reversed, Ellipsis
    for idx in [(120, 130), (-1, slice(None)), (slice(None, None, 3), slice(5, 300, 7)), (slice(200, 20, -9), 4),
                (Ellipsis, 7), (slice(10, 10), slice(None))]:
        np.testing.assert_array_equal(classes[idx], (lab > 0).astype(np.uint16)[idx])
    np.testing.assert_array_equal(np.asarray(classes), (lab > 0))


def test_the_forms_qupath_writes_are_read_with_classes_regions_and_what_is_skipped(tmp_path):
    feats = [
        _feature(_rect(0, 0, 100, 100), "Region*"),
        _feature(_rect(10, 10, 20, 20), "Tumor"),
        _feature(_rect(30, 30, 40, 40), "Stroma", "detection"),
        _feature(_rect(50, 50, 60, 60), "Ignore*"),
        _feature({"type": "Point", "coordinates": [5, 5]}, "Tumor"),
        _feature({"type": "LineString", "coordinates": [[1, 1], [9, 9]]}),
        # a bow tie: a hand-drawn outline that crosses itself
        _feature({"type": "Polygon", "coordinates": [[[70, 70], [90, 90], [90, 70], [70, 90], [70, 70]]]}, "Tumor"),
    ]
    ann = annotations.load(_write(tmp_path / "fc.geojson", feats))
    assert len(ann.regions) == 1 and ann.classes == ["Tumor", "Stroma", "Tumor"]
    assert ann.skipped == {"Point": 1, "LineString": 1} and ann.repaired == 1
    assert ann.class_names == ["Stroma", "Tumor"]
    lab = annotations.Labels(tmp_path / "fc.geojson", (100, 100), annotations.class_index(ann.class_names))
    assert lab[15, 15] == 2 and lab[35, 35] == 1 and lab[55, 55] == 0 and lab[80, 74] == 2  # Ignore* is not drawn

    # QuPath 0.2: a JSON list of features, "id" naming the object type, classification with colorRGB;
    # an unclassified annotation around detections is the annotated region
    old = [{"type": "Feature", "id": "PathAnnotationObject", "geometry": _rect(0, 0, 50, 50), "properties": {"isLocked": False}},
           {"type": "Feature", "id": "PathDetectionObject", "geometry": _rect(5, 5, 9, 9),
            "properties": {"classification": {"name": "Nucleus", "colorRGB": -3670016}}},
           {"type": "Feature", "id": "PathCellObject", "geometry": _rect(20, 20, 25, 25), "properties": {}}]
    ann = annotations.load(_write(tmp_path / "old.json", old, collection=False))  # as gson.toJson(objects) writes
    assert len(ann.regions) == 1 and ann.classes == ["Nucleus", annotations.UNCLASSIFIED]
    # a single unclassified annotation is itself the object
    ann = annotations.load(_write(tmp_path / "one.geojson", _feature(_rect(0, 0, 5, 5)), collection=False))
    assert ann.regions == [] and ann.classes == [annotations.UNCLASSIFIED]


def test_nested_polygons_stay_visible_whatever_their_order_in_the_file(tmp_path):
    big, small = _feature(_rect(0, 0, 100, 100), "Tumor"), _feature(_rect(40, 40, 60, 60), "Necrosis")
    for order in ([big, small], [small, big]):
        path = _write(tmp_path / "n.geojson", order)
        lab = annotations.Labels(path, (100, 100), {"Necrosis": 1, "Tumor": 2})[:, :]
        assert lab[50, 50] == 1 and lab[10, 10] == 2


@pytest.mark.parametrize("text,expect", [
    ("{not json", "cannot be read as GeoJSON"),
    ('{"type": "Topology"}', "not GeoJSON features"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]}',
     "no polygon to learn from (1 Point without area)"),
])
def test_unusable_geojson_is_reported_by_file_with_the_fix(tmp_path, text, expect):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    found = annotations.problems(path, "slide.svs", (100, 100))
    assert len(found) == 1 and str(path) in found[0] and expect in found[0]
    assert "Export objects as GeoJSON" in found[0] or "polygons" in found[0]


def test_annotations_outside_the_image_or_from_a_bigger_image_are_refused(tmp_path):
    far = _write(tmp_path / "far.geojson", [_feature(_rect(500, 500, 600, 600), "Tumor")])
    assert "outside slide.svs (100 x 100 px)" in annotations.problems(far, "slide.svs", (100, 100))[0]
    big = _write(tmp_path / "big.geojson", [_feature(_rect(0, 0, 390, 390), "Tumor")])
    assert "downsampled copy" in annotations.problems(big, "slide.svs", (100, 100))[0]
    ok = _write(tmp_path / "ok.geojson", [_feature(_rect(-2, 0, 100, 100.4), "Tumor")])  # QuPath's edge slop
    assert annotations.problems(ok, "slide.svs", (100, 100)) == []


def test_coverage_map_marks_every_cell_an_annotation_touches(tmp_path):
    path = _write(tmp_path / "c.geojson", [_feature(_rect(130, 5, 133, 8), "Tumor"),  # 3 px: inside cell (0, 2)
                                          _feature(_rect(0, 64, 64, 200), "Tumor")])
    cov = annotations.coverage_map(path, (256, 256), (64, 64))
    want = np.zeros((4, 4), np.float32)
    want[0, 2] = 1
    want[1:3, 0] = 1
    want[3, 0] = 1  # 192..200 reaches into the fourth row of cells
    np.testing.assert_array_equal(cov, want)


# ---------------------------------------------------------------- the data folder, the plan, the rows


def _slide_set(root: Path, n_train=3, classes=None, side=768) -> Path:
    names = sorted(p.name for p in (EXAMPLE / "image").iterdir())
    for split, n in (("train", n_train), ("test", 1)):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            k = 4 * j + (12 if split == "test" else 0)
            annotated_slide(EXAMPLE, names[k:k + 4], root / split / "image" / f"{split}{j}.svs",
                            root / split / "groundtruth" / f"{split}{j}.geojson", side=side, seed=j)
    if classes:  # rename the objects of the first training slide to another class
        gj = root / "train" / "groundtruth" / "train0.geojson"
        doc = json.loads(gj.read_text())
        for f in doc["features"]:
            if f["properties"]["classification"]["name"] == "Nucleus":
                f["properties"]["classification"]["name"] = classes
        gj.write_text(json.dumps(doc))
    return root


def _cfg(root: Path, task="semantic", **kw) -> schema.Config:
    return schema.Config(use_algorithm=task, path=str(root), iterations_over_dataset=1, batchsize=2,
                         calculate_uncertainty=False, **kw)


def test_slides_with_geojson_are_found_validated_and_planned(tmp_path):
    root = _slide_set(tmp_path / "d", classes="Mitosis")
    inv = validate(_cfg(root))
    assert {Path(s.groundtruth).suffix for s in inv.samples["train"]} == {".geojson"}
    assert inv.annotation_classes == {"Mitosis": 1, "Nucleus": 2}
    plan = make_plan(_cfg(root), inv)
    assert plan.num_classes == 3 and plan.class_names == ["background", "Mitosis", "Nucleus"]
    assert plan.extra["annotation_classes"] == {"Mitosis": 1, "Nucleus": 2} and plan.target_axes == "YX"
    assert plan.mpp == 0.5
    # classes.txt sets the indices; a class it does not name is refused before training
    (root / "classes.txt").write_text("0 background\n1 Nucleus\n")
    with pytest.raises(DataError, match=r"classes.txt: no index for the annotation class\(es\) 'Mitosis'"):
        validate(_cfg(root))
    (root / "classes.txt").write_text("0 background\n1 Nucleus\n2 Mitosis\n")
    assert validate(_cfg(root)).annotation_classes == {"Nucleus": 1, "Mitosis": 2}


def test_geojson_slides_and_0_255_png_masks_make_one_binary_set(tmp_path):
    """Bug: a set of annotated slides (class value 1) with 0/255 PNG test masks was refused as
    'masks hold 3 values [0, 1, 255]; set num_classes: 256'."""
    import shutil

    root = _slide_set(tmp_path / "d", n_train=2)
    shutil.rmtree(root / "test")
    shutil.copytree(EXAMPLE.parent / "test", root / "test")
    cfg = _cfg(root)
    plan = make_plan(cfg, validate(cfg))
    assert plan.num_classes == 1 and plan.class_names == ["background", "Nucleus"]
    with pytest.raises(DataError, match="GeoJSON annotations name 2 classes"):
        _slide_set(tmp_path / "e", n_train=2, classes="Mitosis")
        validate(_cfg(tmp_path / "e", num_classes=1))


def test_a_task_without_labels_refuses_geojson_and_a_bad_file_is_named(tmp_path):
    root = _slide_set(tmp_path / "d", n_train=2)
    (root / "train" / "groundtruth" / "train1.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(DataError) as e:
        validate(_cfg(root))
    assert any("train1.geojson: no polygon to learn from" in p for p in e.value.problems)
    with pytest.raises(DataError) as e:
        validate(_cfg(root, task="regression"))
    assert any("train0.geojson: GeoJSON annotations give label images" in p for p in e.value.problems)


def test_training_tiles_come_from_the_annotated_regions_and_read_their_polygons(tmp_path):
    root = _slide_set(tmp_path / "d")
    cfg = _cfg(root)
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    train = [s for s in inv.samples["train"] if str(s.image) in plan.train_names]
    maps = region_maps(train, inv.image_shapes, plan)
    rows = training_rows(train, inv.image_shapes, plan, seed=0, epochs=range(3), regions=maps)
    regions = {str(s.image): [g.bounds for g in annotations.load(s.groundtruth).regions] for s in train}
    cell = coverage_cell(plan)
    # 4 pasted 256² images = 64 cells of 64² per slide: 4 tiles of 256² cover them once
    assert len(rows) == 3 * 4 * len(train)
    for r in rows:  # each tile centre lies in a cell that touches a region
        cy, cx = (o + t // 2 for o, t in zip(r["origin"], plan.tile_shape))
        assert any(x0 - cell[1] <= cx <= x1 + cell[1] and y0 - cell[0] <= cy <= y1 + cell[0]
                   for x0, y0, x1, y1 in regions[r["image"]]), r
    batch = ReadTiles(plan)({k: np.array([r[k] for r in rows[:6]]) for k in ("image", "target", "origin")})
    assert batch["image"].shape == (6, 3, 256, 256) and batch["target"].shape == (6, 1, 256, 256)
    for r, t in zip(rows[:6], batch["target"]):  # the rasterised polygons are the pasted masks
        truth = _truth(root, Path(r["image"]))
        y, x = r["origin"]
        np.testing.assert_array_equal(t[0], read_crop(truth, y, x, plan.tile_shape))


def _truth(root: Path, image: Path) -> np.ndarray:
    names = sorted(p.name for p in (EXAMPLE / "image").iterdir())
    j = int(image.stem[-1])
    return annotated_slide(EXAMPLE, names[4 * j:4 * j + 4], root / "x.svs", root / "x.geojson", side=768, seed=j)


def read_crop(a: np.ndarray, y: int, x: int, tile) -> np.ndarray:
    from instantdl_ray.data.dataset import read_window

    return read_window(a, "YX", (y, x), tile)[0]


def test_validation_reads_only_the_tiles_that_touch_annotations(tmp_path):
    root = _slide_set(tmp_path / "d", n_train=2, side=1024)
    inv = validate(_cfg(root))
    plan = make_plan(_cfg(root), inv)
    samples = inv.samples["train"]
    keep = region_tiles(samples, inv.image_shapes, plan, region_maps(samples, inv.image_shapes, plan))
    # Region* rectangles at (0, 0), (0, 320), (0, 640), (320, 0), 256² each, on a 4 x 4 grid of 256² tiles
    assert keep == {str(s.image): [0, 1, 2, 3, 4, 8] for s in samples}
    rows = grid_rows(samples, inv.image_shapes, plan, 0.0, keep=keep)
    assert len(rows) == 12


def test_instance_segmentation_gets_one_object_per_polygon(tmp_path):
    root = _slide_set(tmp_path / "d", n_train=2)
    cfg = _cfg(root, task="instance")
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    s = inv.samples["train"][0]
    from instantdl_ray.data.dataset import annotation_labels

    lab = annotation_labels(s.groundtruth, inv.image_shapes[str(s.image)], plan)[:, :]
    n = sum(1 for f in json.loads(Path(s.groundtruth).read_text())["features"]
            if f["properties"]["classification"]["name"] == "Nucleus")
    assert len(np.unique(lab)) == n + 1


def test_training_normalises_a_slide_by_its_tissue_as_prediction_does(tmp_path):
    """Bug: a slide's training statistics came from the whole slide, mostly glass, while prediction
    takes them from the tissue (``predict.inputs``): the model saw other intensities at prediction."""
    from instantdl_ray.data.tissue import mask_for

    root = tmp_path / "d"
    for split in ("train", "test"):
        (root / split / "image").mkdir(parents=True)
        (root / split / "groundtruth").mkdir(parents=True)
    img = tissue_image((1024, 1536))
    for split in ("train", "test"):
        write_aperio_svs(root / split / "image" / "s.svs", img, mpp=0.5)
        _write(root / split / "groundtruth" / "s.geojson", [_feature(_rect(420, 320, 1200, 880), "Tumor")])
    cfg = _cfg(root)
    plan = make_plan(cfg, validate(cfg))
    path = root / "train" / "image" / "s.svs"
    arr = read.open_array(path)
    mask = mask_for(path, arr.shape[:2], "auto", plan.tile_shape)
    tissue = channel_stats(mask.sample(arr, "YXC"), plan.extra["augment"])
    np.testing.assert_allclose(plan.image_norm[str(path)], tissue)
    assert not np.allclose(tissue, image_percentiles(path, "YXC"), atol=5)  # the glass would set another range


# ---------------------------------------------------------------- with Ray: a run on annotated slides


def test_a_run_trains_on_annotated_slides_and_evaluates_against_geojson(ray_session, tmp_path):
    from instantdl_ray import pipeline
    from instantdl_ray.io.read import open_array

    root = _slide_set(tmp_path / "d", n_train=2)
    cfg = _cfg(root)
    run = pipeline.run(cfg, out=tmp_path / "run", address=ray_session.get_runtime_context().gcs_address)
    log = (run / "logs" / "run.log").read_text() if (run / "logs" / "run.log").exists() else ""
    plan = json.loads((run / "plan.json").read_text())
    assert plan["class_names"] == ["background", "Nucleus"] and plan["extra"]["annotation_classes"] == {"Nucleus": 1}
    gt = run / "evaluation" / "groundtruth" / "test0.zarr"
    np.testing.assert_array_equal(np.asarray(open_array(gt)[...]), _truth_test(root))
    results = json.loads((run / "evaluation" / "results.json").read_text())
    assert 0 <= results["summary"]["jaccard"] <= 1
    assert "annotated with GeoJSON" in log + (run / "logs" / "train.log").read_text()
    # the test slide was predicted where it has tissue and got the slide outputs, which read back
    assert (run / "tissue" / "test0.png").exists() and "test0: tissue covers" in log
    assert (run / "predictions" / "test0.ome.zarr").is_dir()
    back = annotations.load(run / "predictions" / "test0.geojson")  # our own output is valid training input
    assert len(back.shapes) == len(back.classes) and set(back.classes) <= {"Nucleus"}


def _truth_test(root: Path) -> np.ndarray:
    names = sorted(p.name for p in (EXAMPLE / "image").iterdir())
    return annotated_slide(EXAMPLE, names[12:16], root / "y.svs", root / "y.geojson", side=768, seed=0)


# ---------------------------------------------------------------- slides with a label image


def _labelled_slide(root: Path, factor: int, shape=(1024, 1536)) -> tuple[Path, np.ndarray]:
    """An Aperio slide (``tissue_image``) whose nuclei are labelled in a TIFF at 1/``factor``."""
    import tifffile

    img = tissue_image(shape)
    full = (img[..., 0] < 120).astype(np.uint8)  # the dark nuclei
    small = full[::factor, ::factor]
    for split in ("train", "test"):
        for sub in ("image", "groundtruth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        write_aperio_svs(root / split / "image" / "s.svs", img, mpp=0.5)
        tifffile.imwrite(root / split / "groundtruth" / "s.tif", small)
    return root, np.repeat(np.repeat(small, factor, 0), factor, 1)[:shape[0], :shape[1]]


def test_a_label_at_a_downsample_of_the_slide_is_read_upsampled(tmp_path):
    from instantdl_ray.io.slide import Upsampled

    root, full = _labelled_slide(tmp_path / "d", 4)
    cfg = _cfg(root)
    inv = validate(cfg)
    path = str(root / "train" / "image" / "s.svs")
    assert inv.label_downsample == {path: 4, str(root / "test" / "image" / "s.svs"): 4}
    assert any("a label at 1/4 of s.svs" in w for w in inv.warnings)
    plan = make_plan(cfg, inv)
    rows = [{"image": path, "target": str(root / "train" / "groundtruth" / "s.tif"), "origin": o}
            for o in ([300, 400], [900, 1400], [0, 0])]  # the last reaches past the slide: reflected
    batch = ReadTiles(plan)({k: np.array([r[k] for r in rows]) for k in ("image", "target", "origin")})
    for r, t in zip(rows, batch["target"]):
        np.testing.assert_array_equal(t[0], read_crop(full, *r["origin"], plan.tile_shape))
    small = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(Upsampled(small, 2, (5, 7))[1:4, 2:7], np.repeat(np.repeat(small, 2, 0), 2, 1)[1:4, 2:7])


def test_a_label_of_another_size_is_refused_with_the_downsample_rule(tmp_path):
    import tifffile

    root, _ = _labelled_slide(tmp_path / "d", 4)
    tifffile.imwrite(root / "train" / "groundtruth" / "s.tif", np.zeros((300, 500), np.uint8))  # 1/3.4, 1/3.1
    with pytest.raises(DataError, match=r"s.tif: groundtruth shape \(300, 500\) does not match .* integer downsample"):
        validate(_cfg(root))


def test_tiles_of_a_slide_with_a_label_image_come_from_its_tissue(tmp_path):
    from instantdl_ray.data.dataset import region_maps, spatial_shape
    from instantdl_ray.data.tissue import mask_for

    root, _ = _labelled_slide(tmp_path / "d", 1)
    cfg = _cfg(root)
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    train = inv.samples["train"]
    path = str(train[0].image)
    maps = region_maps(train, inv.image_shapes, plan, "auto")
    assert region_maps(train, inv.image_shapes, plan, "none") == {}
    tissue = mask_for(path, (1024, 1536), "auto", plan.tile_shape)
    np.testing.assert_array_equal(maps[path], tissue.coverage(coverage_cell(plan)))
    assert 0.2 < maps[path].mean() < 0.6  # two patches of H&E on glass (with their margin)
    rows = training_rows(train, inv.image_shapes, plan, seed=0, epochs=range(2), regions=maps)
    cell = coverage_cell(plan)
    for r in rows:  # each tile is centred in a cell with tissue
        cy, cx = (o + t // 2 for o, t in zip(r["origin"], plan.tile_shape))
        assert maps[path][min(cy // cell[0], maps[path].shape[0] - 1), min(cx // cell[1], maps[path].shape[1] - 1)] \
            or any(maps[path][max(0, cy // cell[0] - 1):cy // cell[0] + 2, max(0, cx // cell[1] - 1):cx // cell[1] + 2].ravel())
    n_cells = int(np.count_nonzero(maps[path]))
    assert len(rows) == 2 * int(np.ceil(n_cells * np.prod(cell) / np.prod(plan.tile_shape)))
    assert len(rows) < 2 * int(np.prod([np.ceil(s / t) for s, t in zip(spatial_shape(inv.image_shapes[path], plan.axes), plan.tile_shape)]))


def test_evaluation_reads_a_slide_label_on_the_slide_pixels(tmp_path):
    from instantdl_ray import pipeline

    root, full = _labelled_slide(tmp_path / "d", 4)
    cfg = _cfg(root)
    plan = make_plan(cfg, validate(cfg))
    record = {"name": "s", "image": str(root / "test" / "image" / "s.svs"),
              "groundtruth": str(root / "test" / "groundtruth" / "s.tif")}
    out = pipeline.slide_groundtruth(tmp_path / "run", plan, record, log=lambda m: None)
    np.testing.assert_array_equal(np.asarray(read.open_array(out)[...]), full)
    plain = {"name": "p", "image": "x.png", "groundtruth": "x.png"}
    assert pipeline.slide_groundtruth(tmp_path / "run", plan, plain, log=lambda m: None) == "x.png"
