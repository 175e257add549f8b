"""Every config or data problem is reported, all at once and naming the file or key, before any training."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from conftest import make_semantic_set
from instantdl_ray.config import schema as cfgmod
from instantdl_ray.config.schema import from_dict
from instantdl_ray.errors import ConfigError, DataError
from instantdl_ray.config.validate import validate

REPO = Path(__file__).resolve().parents[1]


def _cfg(path: Path, task: str = "SemanticSegmentation", **kw):
    return from_dict({"use_algorithm": task, "path": str(path), **kw})


def _problems(root: Path, task: str = "SemanticSegmentation", **kw) -> list[str]:
    with pytest.raises(DataError) as e:
        validate(_cfg(root, task, **kw))
    return e.value.problems


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _tif(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array)
    return path


def _regression_set(root: Path, n=3, shape=(16, 16), dtype=np.float32) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for i in range(n):
            _tif(root / split / "image" / f"r{i}.tif", rng.random(shape).astype(dtype))
            _tif(root / split / "groundtruth" / f"r{i}.tif", rng.random(shape).astype(dtype))
    return root


def _classification_set(root: Path, n=4, rgb=True) -> Path:
    rng = np.random.default_rng(2)
    for split in ("train", "test"):
        rows = ["filename,groundtruth"]
        for i in range(n):
            shape = (12, 12, 3) if rgb else (12, 12)
            _png(root / split / "image" / f"c{i}.png", rng.integers(0, 255, shape, dtype=np.uint8))
            rows.append(f"c{i}.png,{i % 2}")
        (root / split / "groundtruth").mkdir(parents=True, exist_ok=True)
        (root / split / "groundtruth" / "groundtruth.csv").write_text("\n".join(rows) + "\n")
    return root


# ---------------------------------------------------------------- good data


def test_good_semantic_set(semantic_set):
    inv = validate(_cfg(semantic_set))
    assert inv.axes == "YX" and inv.spatial_dims == 2
    assert {k: len(v) for k, v in inv.samples.items()} == {"train": 6, "test": 3}
    assert inv.label_values == {0, 255}
    assert all(inv.image_shapes[str(s.image)] == (64, 64) for s in inv.samples["train"])
    assert all(inv.target_shapes[str(s.image)] == (64, 64) for s in inv.samples["train"])


def test_good_regression_and_classification_sets(tmp_path):
    inv = validate(_cfg(_regression_set(tmp_path / "r"), "Regression"))
    assert inv.axes == "YX"
    inv = validate(_cfg(_classification_set(tmp_path / "c"), "Classification", num_classes=2))
    assert inv.axes == "YXC" and inv.label_values == {0, 1}


def test_rgb_png_mask_matches_a_grey_image(tmp_path):
    """Masks saved as RGB PNGs are common; their colour axis is not a spatial axis."""
    root = tmp_path / "d"
    for split in ("train", "test"):
        for i in range(2):
            _png(root / split / "image" / f"a{i}.png", np.full((20, 24), 50, np.uint8))
            m = np.zeros((20, 24, 3), np.uint8)
            m[5:10, 5:10] = 255
            _png(root / split / "groundtruth" / f"a{i}.png", m)
    inv = validate(_cfg(root))
    assert inv.axes == "YX" and inv.label_values == {0, 255}


def test_rgb_to_rgb_regression_is_not_a_volume(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        _png(root / split / "image" / "a.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        _png(root / split / "groundtruth" / "a.png", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
    inv = validate(_cfg(root, "Regression"))
    assert inv.axes == "YXC" and inv.spatial_dims == 2


def test_grey_images_among_colour_ones_for_classification(tmp_path):
    """InstantDL's MNIST example trains on RGB and tests on grey PNGs."""
    root = _classification_set(tmp_path / "c")
    shutil.rmtree(root / "test" / "image")
    for i in range(4):
        _png(root / "test" / "image" / f"c{i}.png", np.zeros((12, 12), np.uint8))
    inv = validate(_cfg(root, "Classification"))
    assert inv.axes == "YXC"


def test_predict_only_with_weights_needs_no_training_labels(tmp_path):
    root = make_semantic_set(tmp_path / "d", n_train=2, n_test=2)
    shutil.rmtree(root / "train")
    weights = tmp_path / "model.pt"
    import torch

    from instantdl_ray.models.unet import build_unet

    torch.save(build_unet(in_channels=1, out_channels=1).state_dict(), weights)  # validation reads it
    inv = validate(_cfg(root, iterations_over_dataset=0, pretrained_weights=str(weights)))
    assert len(inv.samples["test"]) == 2 and inv.samples["train"] == []


# ---------------------------------------------------------------- config problems


def test_typo_key_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": str(tmp_path), "batch_size": 2})
    assert e.value.problems[0].startswith("batch_size: unknown key") and "Did you mean 'batchsize'?" in str(e.value)


def test_misspelt_task_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'SemanticSegmentation'"):
        from_dict({"use_algorithm": "SemantcSegmentation", "path": str(tmp_path)})


def test_keras_weights_get_a_clear_message(semantic_set, tmp_path):
    h5 = tmp_path / "weights.hdf5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n")
    for w in (str(h5), "logs/pretrained_weights_Lung_SemanticSegmentation.h5"):  # existing or not
        (p,) = _problems(semantic_set, pretrained_weights=w)
        assert p.startswith("pretrained_weights:") and w in p
        assert "Keras" in p and "pretrained_weights: false" in p


def test_missing_weights_file(semantic_set, tmp_path):
    (p,) = _problems(semantic_set, pretrained_weights=str(tmp_path / "nope.pt"))
    assert p.startswith("pretrained_weights:") and "nope.pt" in p and "not found" in p


def test_pretrained_weights_true_is_not_a_source(semantic_set):
    (p,) = _problems(semantic_set, pretrained_weights=True)
    assert p.startswith("pretrained_weights: true")


def test_zero_epochs_without_weights(semantic_set):
    (p,) = _problems(semantic_set, iterations_over_dataset=0)
    assert p.startswith("iterations_over_dataset: 0") and "pretrained_weights" in p


def test_loss_that_does_not_fit_the_task(tmp_path):
    root = _classification_set(tmp_path / "c")
    (p,) = _problems(root, "Classification", loss_function="mse")
    assert p.startswith("loss_function: 'mse'") and "Classification" in p and "binary_crossentropy" in p


def test_foreground_sampling_needs_label_images(tmp_path, semantic_set):
    root = _classification_set(tmp_path / "c")
    (p,) = _problems(root, "Classification", foreground_sampling=0.5)
    assert p.startswith("foreground_sampling: 0.5") and "Classification" in p


def test_loss_typo_suggests(semantic_set):
    (p,) = _problems(semantic_set, loss_function="dice_crossentropi")
    assert "Did you mean 'dice_crossentropy'?" in p


def test_model_not_for_this_task(semantic_set):
    (p,) = _problems(semantic_set, model="resnet50")
    assert p.startswith("model: 'resnet50'")


def test_path_not_a_folder(tmp_path):
    (p,) = _problems(tmp_path / "missing")
    assert p.startswith("path:") and str(tmp_path / "missing") in p


# ---------------------------------------------------------------- data problems


def test_missing_groundtruth_file(semantic_set):
    gt = semantic_set / "train" / "groundtruth" / "img03.png"
    gt.unlink()
    (p,) = _problems(semantic_set)
    assert str(semantic_set / "train" / "image" / "img03.png") in p and str(gt) in p
    assert "no groundtruth partner" in p


def test_groundtruth_without_image(semantic_set):
    (semantic_set / "train" / "image" / "img01.png").unlink()
    (p,) = _problems(semantic_set)
    assert str(semantic_set / "train" / "groundtruth" / "img01.png") in p and "without an image" in p


def test_unreadable_image(semantic_set):
    bad = semantic_set / "train" / "image" / "img02.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    (p,) = _problems(semantic_set)
    assert p.startswith(str(bad)) and "cannot be read" in p


def test_unreadable_groundtruth(semantic_set):
    bad = semantic_set / "test" / "groundtruth" / "img00.png"
    bad.write_bytes(b"\x00\x01garbage")
    (p,) = _problems(semantic_set)
    assert p.startswith(str(bad)) and "cannot be read as groundtruth" in p


def test_image_groundtruth_shape_mismatch(semantic_set):
    gt = semantic_set / "train" / "groundtruth" / "img04.png"
    _png(gt, np.zeros((32, 64), np.uint8))
    (p,) = _problems(semantic_set)
    assert str(gt) in p and "img04.png" in p and "(32, 64)" in p and "(64, 64)" in p


def test_images_of_different_channel_layouts(semantic_set):
    img = semantic_set / "train" / "image" / "img05.png"
    _png(img, np.zeros((64, 64, 3), np.uint8))
    probs = _problems(semantic_set)
    assert any(str(img) in p and "(64, 64, 3)" in p for p in probs)


def test_csv_row_names_a_missing_file(tmp_path):
    root = _classification_set(tmp_path / "c")
    csv = root / "train" / "groundtruth" / "groundtruth.csv"
    csv.write_text(csv.read_text() + "c9.png,1\n")
    (p,) = _problems(root, "Classification")
    assert str(csv) in p and "'c9.png'" in p and "missing" in p


def test_file_without_csv_row(tmp_path):
    root = _classification_set(tmp_path / "c")
    extra = _png(root / "train" / "image" / "new.png", np.zeros((12, 12, 3), np.uint8))
    (p,) = _problems(root, "Classification")
    assert str(extra) in p and "no row" in p and "new.png,<class>" in p


def test_non_integer_class_in_csv(tmp_path):
    root = _classification_set(tmp_path / "c")
    csv = root / "train" / "groundtruth" / "groundtruth.csv"
    csv.write_text(csv.read_text().replace("c1.png,1", "c1.png,one"))
    (p,) = _problems(root, "Classification")
    assert str(csv) in p and "line 3" in p and "'one'" in p


def test_csv_class_beyond_num_classes(tmp_path):
    root = _classification_set(tmp_path / "c")
    (p,) = _problems(root, "Classification", num_classes=1)
    assert p.startswith("num_classes: 1") and "[1]" in p


def test_nan_in_float_tiff(tmp_path):
    root = _regression_set(tmp_path / "r")
    a = np.ones((16, 16), np.float32)
    a[3, 4] = np.nan
    bad = _tif(root / "train" / "image" / "r1.tif", a)
    (p,) = _problems(root, "Regression")
    assert p.startswith(str(bad)) and "NaN" in p


def test_inf_in_float_groundtruth(tmp_path):
    root = _regression_set(tmp_path / "r")
    a = np.ones((16, 16), np.float32)
    a[0, 0] = np.inf
    bad = _tif(root / "test" / "groundtruth" / "r2.tif", a)
    (p,) = _problems(root, "Regression")
    assert p.startswith(str(bad)) and "infinite" in p


def test_empty_train_split(semantic_set):
    for sub in ("image", "groundtruth"):
        shutil.rmtree(semantic_set / "train" / sub)
        (semantic_set / "train" / sub).mkdir()
    probs = _problems(semantic_set)
    assert any(str(semantic_set / "train" / "image") in p and "no images" in p for p in probs)


def test_missing_train_split(semantic_set):
    shutil.rmtree(semantic_set / "train")
    probs = _problems(semantic_set)
    assert any(str(semantic_set / "train") in p and "missing" in p for p in probs)


def test_multiclass_mask_under_binary_default_suggests_num_classes(tmp_path):
    root = make_semantic_set(tmp_path / "d", n_train=2, n_test=1)
    m = np.zeros((64, 64), np.uint8)
    m[:10] = 1
    m[20:30] = 2
    for gt in (root / "train" / "groundtruth").glob("*.png"):
        _png(gt, m)
    shutil.rmtree(root / "test" / "groundtruth")
    (p,) = _problems(root)
    assert p.startswith("num_classes: 1") and "3 values" in p and "set num_classes: 3" in p
    validate(_cfg(root, num_classes=3))  # and the suggestion works


def test_mask_class_beyond_num_classes(tmp_path):
    root = make_semantic_set(tmp_path / "d", n_train=2, n_test=1)
    m = np.zeros((64, 64), np.uint8)
    m[:10] = 4
    for gt in root.glob("*/groundtruth/*.png"):
        _png(gt, m)
    (p,) = _problems(root, num_classes=3)
    assert p.startswith("num_classes: 3") and "set num_classes: 5" in p


def test_continuous_values_are_not_semantic_masks(tmp_path):
    root = make_semantic_set(tmp_path / "d", n_train=2, n_test=1)
    bad = _tif(root / "train" / "groundtruth" / "img00.tif", np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
    (root / "train" / "groundtruth" / "img00.png").unlink()
    probs = _problems(root)
    assert any(p.startswith(str(bad)) and "not class labels" in p for p in probs)


def test_several_problems_reported_together(tmp_path):
    root = make_semantic_set(tmp_path / "d", n_train=4, n_test=2)
    (root / "train" / "groundtruth" / "img00.png").unlink()  # missing partner
    (root / "train" / "image" / "img01.png").write_bytes(b"garbage")  # unreadable
    _png(root / "train" / "groundtruth" / "img02.png", np.zeros((10, 10), np.uint8))  # shape mismatch
    _png(root / "test" / "groundtruth" / "orphan.png", np.zeros((64, 64), np.uint8))  # orphan groundtruth
    with pytest.raises(DataError) as e:
        validate(_cfg(root, loss_function="hinge", pretrained_weights="old.h5"))
    probs = e.value.problems
    text = str(e.value)
    assert text.startswith(f"Invalid data: {len(probs)} problems found")
    for needle in ("loss_function: 'hinge'", "pretrained_weights: 'old.h5'", "img00.png: no groundtruth partner",
                   "img01.png: cannot be read", "orphan.png: groundtruth without an image"):
        assert any(needle in p for p in probs), (needle, probs)
    assert any("img02.png" in p and "(10, 10)" in p for p in probs)
    assert len(probs) == 6


def test_run_stops_before_any_directory_or_cluster(tmp_path, monkeypatch):
    from instantdl_ray import pipeline

    root = make_semantic_set(tmp_path / "d", n_train=2, n_test=1)
    (root / "train" / "groundtruth" / "img00.png").unlink()

    def must_not_run(*a, **k):
        raise AssertionError("stage ran after a validation problem")

    monkeypatch.setattr(pipeline, "make_run_dir", must_not_run)
    monkeypatch.setattr(pipeline, "make_plan", must_not_run)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="img00.png"):
        pipeline.run(_cfg(root), out=out)
    assert not out.exists()


# ---------------------------------------------------------------- the real InstantDL and public data sets

REAL_SETS = [
    ("instantdl_examples/SemanticSegmentation", "SemanticSegmentation", "YX"),
    ("instantdl_examples/InstanceSegmentation", "InstanceSegmentation", "YXC"),  # RGBA PNG
    ("instantdl_examples/Regression", "Regression", "ZYX"),  # 16x128x128 stacks -> same-shape targets
    ("instantdl_examples/Classification", "Classification", "YXC"),  # RGB train, grey test, big CSV
    ("dsb2018_fluo256/semantic", "semantic", "YX"),
    ("dsb2018_fluo256/instance", "instance", "YX"),
    ("pbc_blood", "classification", "YXC"),
    ("isl_dapi", "regression", "CYX"),  # 13 z-slices -> 13 channels of a 2-D target
]


@pytest.mark.parametrize("rel, task, axes", REAL_SETS, ids=[r[0] for r in REAL_SETS])
def test_real_data_sets_validate(shared_data, rel, task, axes):
    inv = validate(_cfg(shared_data / rel, task))
    assert inv.axes == axes
    assert inv.samples["train"] and inv.samples["test"]
    if rel == "instantdl_examples/Regression":
        assert inv.spatial_dims == 3
    if rel == "pbc_blood":
        assert inv.label_values == set(range(8)) and len(inv.class_names) == 8
    if rel == "isl_dapi":
        assert all(inv.image_shapes[str(s.image)] == (13, 256, 256) for s in inv.samples["train"])
    if rel.startswith("instantdl_examples/Instance"):
        assert all(isinstance(s.groundtruth, list) for s in inv.samples["train"])


def test_real_sets_through_config_files(shared_data, tmp_path):
    """A config file in tmp pointing at the read-only data (nothing copied)."""
    p = tmp_path / "isl.yaml"
    p.write_text(yaml.safe_dump({"use_algorithm": "Regression", "path": str(shared_data / "isl_dapi")}))
    assert validate(cfgmod.load(p)).axes == "CYX"


def _original(shared_data: Path, name: str, task_dir: str):
    src = shared_data / "instantdl_examples" / "original_configs" / name
    return cfgmod.load(src, [f"path={shared_data / 'instantdl_examples' / task_dir}"])


@pytest.mark.parametrize("task_dir", ["SemanticSegmentation", "InstanceSegmentation"])
def test_original_configs_validate_unchanged_once_path_points_at_data(shared_data, task_dir):
    cfg = _original(shared_data, f"{task_dir}_example_config.json", task_dir)
    assert validate(cfg).samples["train"]


def test_original_regression_config_reports_its_keras_weights(shared_data):
    cfg = _original(shared_data, "Regression_example_config.json", "Regression")
    with pytest.raises(DataError) as e:
        validate(cfg)
    (p,) = e.value.problems
    assert "pretrained_weights_NucEnvelope_Regression.hdf5" in p and "Keras" in p


def test_original_classification_config_is_predict_only(shared_data):
    cfg = _original(shared_data, "Classification_example_config.json", "Classification")
    with pytest.raises(DataError) as e:
        validate(cfg)
    (p,) = e.value.problems
    assert p.startswith("iterations_over_dataset: 0")


# ---------------------------------------------------------------- the command line


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "instantdl_ray", *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Run the CLI cases concurrently. Only the two that reach data validation import torch (~5-10 s);
    config errors stop before that."""
    tmp = tmp_path_factory.mktemp("cli")
    good = make_semantic_set(tmp / "good", n_train=3, n_test=2)
    bad = make_semantic_set(tmp / "bad", n_train=3, n_test=2)
    (bad / "train" / "groundtruth" / "img01.png").unlink()
    (bad / "test" / "image" / "img00.png").write_bytes(b"not an image")
    cfgs = {}
    for name, data in {
        "good": {"use_algorithm": "SemanticSegmentation", "path": "good"},  # relative to the config file
        "bad_data": {"use_algorithm": "SemanticSegmentation", "path": str(bad)},
        "bad_key": {"use_algorithm": "SemanticSegmentation", "path": str(good), "batch_size": 2},
    }.items():
        cfgs[name] = tmp / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(data))
    workdir = tmp / "cwd"
    workdir.mkdir()
    cases = {
        "validate_good": ("validate", str(cfgs["good"])),
        "validate_bad_data": ("validate", str(cfgs["bad_data"])),
        "validate_bad_key": ("validate", str(cfgs["bad_key"])),
        "validate_bad_set": ("validate", str(cfgs["good"]), "--set", "ray.num_wokers=2"),
        "run_bad_key": ("run", str(cfgs["bad_key"]), "--out", str(tmp / "run_bad_key")),
    }
    procs = {k: _cli(*a, cwd=workdir) for k, a in cases.items()}
    results = {}
    for k, p in procs.items():
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results[k] = (p.returncode, out, err)
    results["tmp"] = tmp
    results["cfgs"] = cfgs
    return results


def test_cli_validate_good_data(cli_results):
    rc, out, err = cli_results["validate_good"]
    assert rc == 0, err
    assert out.startswith("OK: SemanticSegmentation, 3 train / 2 test images, axes YX")


def test_cli_validate_bad_data(cli_results):
    rc, out, err = cli_results["validate_bad_data"]
    assert rc == 2, (out, err)
    assert "Invalid data: 2 problems found" in err
    assert "img01.png: no groundtruth partner" in err and "img00.png: cannot be read" in err
    assert "Traceback" not in err and "OK" not in out


def test_cli_validate_bad_key(cli_results):
    rc, out, err = cli_results["validate_bad_key"]
    assert rc == 2 and "batch_size: unknown key" in err and "Did you mean 'batchsize'?" in err
    assert "Traceback" not in err


def test_cli_validate_bad_override(cli_results):
    rc, out, err = cli_results["validate_bad_set"]
    assert rc == 2 and "ray.num_wokers: unknown key" in err and "Did you mean 'num_workers'?" in err


def test_cli_run_with_bad_config_leaves_no_run_directory(cli_results):
    rc, out, err = cli_results["run_bad_key"]
    assert rc == 2, (out, err)
    assert "Invalid configuration: 1 problem found" in err and "batch_size" in err and "Traceback" not in err
    assert not (cli_results["tmp"] / "run_bad_key").exists()


def test_cli_run_with_bad_data_leaves_no_run_directory(cli_results, capsys):
    """In-process (the subprocess path is covered above): exit code 2, problems on stderr, no run folder."""
    from instantdl_ray import cli

    out = cli_results["tmp"] / "run_bad_data"
    assert cli.main(["run", str(cli_results["cfgs"]["bad_data"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Invalid data: 2 problems found" in err and "img01.png: no groundtruth partner" in err
    assert not out.exists()


def test_two_images_with_one_stem_are_refused_naming_both(tmp_path):
    """Issue 17 item 7: a.png and a.tif trained against one mask and overwrote each other's predictions."""
    import shutil

    from conftest import make_semantic_set
    from instantdl_ray.config import schema as config
    from instantdl_ray.errors import DataError
    from instantdl_ray.config.validate import validate

    data = make_semantic_set(tmp_path / "data")
    shutil.copy(data / "train" / "image" / "img01.png", data / "train" / "image" / "img01.tif")
    with pytest.raises(DataError) as e:
        validate(config.from_dict({"use_algorithm": "semantic", "path": str(data)}))
    msg = str(e.value)
    assert "img01.png and img01.tif" in msg and "rename" in msg


@pytest.mark.parametrize("task", ["semantic", "instance"])
def test_training_masks_without_foreground(tmp_path, task):
    """Issue 17 item 10: all-empty training masks are refused; some empty ones are counted."""
    import numpy as np
    import tifffile
    from PIL import Image

    from conftest import make_instance_set, make_semantic_set
    from instantdl_ray.config import schema as config
    from instantdl_ray.errors import DataError
    from instantdl_ray.config.validate import validate

    data = (make_semantic_set if task == "semantic" else make_instance_set)(tmp_path / "data")
    masks = sorted((data / "train" / "groundtruth").iterdir())

    def blank(p):
        if p.suffix == ".png":
            Image.fromarray(np.zeros((64, 64), np.uint8)).save(p)
        else:
            tifffile.imwrite(p, np.zeros((64, 64), np.uint16))

    blank(masks[0])
    inv = validate(config.from_dict({"use_algorithm": task, "path": str(data)}))
    assert inv.empty_masks == [str(masks[0])]
    for p in masks:
        blank(p)
    with pytest.raises(DataError) as e:
        validate(config.from_dict({"use_algorithm": task, "path": str(data)}))
    assert f"all {len(masks)} training masks are background only" in str(e.value)


def test_classification_csv_conflicts_and_class_warnings(tmp_path):
    """Issue 17 item 9: conflicting duplicate rows refused (both quoted); a test-only class and a class
    with one training image are warnings, and the model's classes cover classes.txt."""
    from conftest import make_classification_set
    from instantdl_ray.config import schema as config
    from instantdl_ray.errors import DataError
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.config.validate import validate

    data = make_classification_set(tmp_path / "data")
    csv = data / "train" / "groundtruth" / "groundtruth.csv"
    original = csv.read_text()
    csv.write_text(original + "c00.png,1\n")  # c00.png is class 0 above
    with pytest.raises(DataError) as e:
        validate(config.from_dict({"use_algorithm": "classification", "path": str(data)}))
    assert "'c00.png,1' conflicts with 'c00.png,0'" in str(e.value)
    csv.write_text(original + "c00.png,0\n")  # a repeated, agreeing row is harmless
    validate(config.from_dict({"use_algorithm": "classification", "path": str(data)}))

    csv.write_text(original.replace("c01.png,1", "c01.png,2"))  # class 2: one training image
    test_csv = data / "test" / "groundtruth" / "groundtruth.csv"
    test_csv.write_text(test_csv.read_text().replace("c00.png,0", "c00.png,3"))  # class 3: test only
    (data / "classes.txt").write_text("0\tsingle\n1\tpair\n2\trare\n3\tunseen\n4\tnamed only\n")
    cfg = config.from_dict({"use_algorithm": "classification", "path": str(data)})
    inv = validate(cfg)
    text = " ".join(inv.warnings)
    assert "[3] appear only in test/" in text and "[2] have fewer than 2 training images" in text
    plan = make_plan(cfg, inv)
    assert plan.num_classes == 5 and plan.class_names[4] == "named only"
