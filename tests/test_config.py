"""The config surface: InstantDL's JSON (Python-style literals) and YAML, defaults, every problem at once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from instantdl_ray.config import schema as cfgmod
from instantdl_ray.config.schema import AUGMENT_DEFAULTS, Config, apply_overrides, dump, from_dict, load, load_raw
from instantdl_ray.errors import ConfigError

# InstantDL's SemanticSegmentation_example_config.json, byte for byte (tabs, Python True/False and all),
# so the compatibility is tested even where the shared data folder is absent.
INSTANTDL_SEMANTIC_JSON = """{
\t"use_algorithm": "SemanticSegmentation",
\t"path": "examples/data/SemanticSegmentation",
\t"pretrained_weights": False,
\t"batchsize": 1,
\t"iterations_over_dataset": 200,
\t"data_gen_args": {
\t\t\t"save_augmented_images": False,
\t\t            "resample_images": False,
\t\t            "std_normalization": False,
\t\t            "feature_scaling": False,
\t\t            "horizontal_flip": False,
\t\t            "vertical_flip": False,
\t\t            "poission_noise": 0,
\t\t            "rotation_range": 45,
\t\t            "zoom_range": 2,
\t\t            "contrast_range": False,
\t\t            "brightness_range": False,
\t\t            "gamma_shift": False,
\t\t            "threshold_background_image": False,
\t\t            "threshold_background_groundtruth": False,
\t\t            "binarize_mask": False
\t},
\t"loss_function": "mse",
\t"num_classes": 1,
\t"image_size": False,
\t"calculate_uncertainty": False,
\t"evaluation": False
}
"""

# What each of InstantDL's example configs must map to (file name -> expected values).
ORIGINAL_CONFIGS = {
    "SemanticSegmentation_example_config.json": dict(
        use_algorithm="SemanticSegmentation", task="semantic", epochs=200, batchsize=1, loss_function="mse",
        num_classes=1, evaluation=False, rotation_range=45, zoom_range=2, horizontal_flip=False, pretrained=False,
    ),
    "InstanceSegmentation_example_config.json": dict(
        use_algorithm="InstanceSegmentation", task="instance", epochs=200, batchsize=1, loss_function="mse",
        num_classes=1, evaluation=True, rotation_range=45, zoom_range=2, horizontal_flip=False, pretrained=False,
    ),
    "Regression_example_config.json": dict(
        use_algorithm="Regression", task="regression", epochs=200, batchsize=1, loss_function="mse",
        num_classes=1, evaluation=True, rotation_range=45, zoom_range=2, horizontal_flip=True,
        pretrained="examples/data/Regression/logs/pretrained_weights_NucEnvelope_Regression.hdf5",
    ),
    "Classification_example_config.json": dict(
        use_algorithm="Classification", task="classification", epochs=0, batchsize=2,
        loss_function="binary_crossentropy", num_classes=2, evaluation=True, rotation_range=20, zoom_range=False,
        horizontal_flip=False, pretrained=False,
    ),
    "config.json": dict(
        use_algorithm="Classification", task="classification", epochs=1, batchsize=1,
        loss_function="binary_crossentropy", num_classes=2, evaluation=True, rotation_range=False, zoom_range=False,
        horizontal_flip=True, pretrained=False,  # no data_gen_args: InstantDL's defaults
    ),
}


def _problems(excinfo) -> list[str]:
    return excinfo.value.problems


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading


def test_instantdl_json_with_python_literals_loads_unchanged(tmp_path):
    (tmp_path / "examples" / "data" / "SemanticSegmentation").mkdir(parents=True)
    p = _write(tmp_path / "SemanticSegmentation_example_config.json", INSTANTDL_SEMANTIC_JSON)
    raw = load_raw(p)
    assert raw["pretrained_weights"] is False and raw["data_gen_args"]["binarize_mask"] is False
    cfg = load(p)
    assert cfg.use_algorithm == "SemanticSegmentation" and cfg.task == "semantic"
    assert cfg.epochs == cfg.iterations_over_dataset == 200
    assert cfg.batchsize == 1 and cfg.loss_function == "mse" and cfg.num_classes == 1
    assert cfg.pretrained_weights is False and cfg.image_size is False
    assert cfg.calculate_uncertainty is False and cfg.evaluation is False
    aug = cfg.data_gen_args
    assert aug.rotation_range == 45 and aug.zoom_range == 2 and aug.poission_noise == 0
    assert aug.horizontal_flip is False and aug.vertical_flip is False and aug.contrast_range is False
    # "path" is relative to the config file's folder
    assert Path(cfg.path) == (tmp_path / "examples" / "data" / "SemanticSegmentation").resolve()


def test_python_literals_inside_strings_are_left_alone(tmp_path):
    p = _write(tmp_path / "c.json", '{"use_algorithm": "Regression", "path": "/data/True False None",'
                                    ' "pretrained_weights": False, "evaluation": True}')
    cfg = load(p)
    assert cfg.path == "/data/True False None"
    assert cfg.pretrained_weights is False and cfg.evaluation is True


def test_strict_json_and_yaml_load_the_same(tmp_path):
    data = {"use_algorithm": "Regression", "path": "/data/x", "batchsize": 3,
            "data_gen_args": {"rotation_range": 10, "horizontal_flip": False}, "ray": {"num_workers": 2}}
    a = load(_write(tmp_path / "c.json", json.dumps(data)))
    b = load(_write(tmp_path / "c.yaml", yaml.safe_dump(data)))
    c = load(_write(tmp_path / "c.yml", yaml.safe_dump(data)))
    assert a.model_dump() == b.model_dump() == c.model_dump()
    assert a.batchsize == 3 and a.ray.num_workers == 2 and a.data_gen_args.rotation_range == 10


def test_yaml_accepts_python_style_booleans(tmp_path):
    cfg = load(_write(tmp_path / "c.yaml", "use_algorithm: Classification\npath: /d\nevaluation: False\n"
                                           "data_gen_args:\n  vertical_flip: False\n"))
    assert cfg.evaluation is False and cfg.data_gen_args.vertical_flip is False


@pytest.mark.parametrize("name", sorted(ORIGINAL_CONFIGS))
def test_every_original_instantdl_config_loads(shared_data, name):
    src = shared_data / "instantdl_examples" / "original_configs" / name
    exp = ORIGINAL_CONFIGS[name]
    cfg = load(src)  # unchanged file, Python literals and all
    assert cfg.use_algorithm == exp["use_algorithm"] and cfg.task == exp["task"]
    assert cfg.epochs == exp["epochs"] and cfg.batchsize == exp["batchsize"]
    assert cfg.loss_function == exp["loss_function"] and cfg.num_classes == exp["num_classes"]
    assert cfg.evaluation is exp["evaluation"] and cfg.calculate_uncertainty is False
    assert cfg.pretrained_weights == exp["pretrained"]
    assert cfg.data_gen_args.rotation_range == exp["rotation_range"]
    assert cfg.data_gen_args.zoom_range == exp["zoom_range"]
    assert cfg.data_gen_args.horizontal_flip is exp["horizontal_flip"]
    if name != "config.json":
        assert cfg.path.endswith(f"examples/data/{exp['use_algorithm']}")


def test_original_configs_listed(shared_data):
    found = {p.name for p in (shared_data / "instantdl_examples" / "original_configs").glob("*.json")}
    assert found == set(ORIGINAL_CONFIGS)


def test_embedded_json_is_the_original(shared_data):
    src = shared_data / "instantdl_examples" / "original_configs" / "SemanticSegmentation_example_config.json"
    assert src.read_text() == INSTANTDL_SEMANTIC_JSON


def test_only_task_and_path_needed_and_defaults():
    cfg = from_dict({"use_algorithm": "Regression", "path": "/data"})
    assert cfg.path == "/data"
    assert cfg.seed == 42 and cfg.pretrained_weights is False and cfg.batchsize == 4
    assert cfg.iterations_over_dataset == 50 == cfg.epochs
    assert cfg.loss_function is None and cfg.num_classes is None and cfg.image_size is False
    assert cfg.calculate_uncertainty is True and cfg.evaluation is True
    assert cfg.model is None and cfg.learning_rate == 1e-3 and cfg.early_stopping_patience == 10
    assert cfg.validation_split == 0.2 and cfg.dropout is None and cfg.mc_passes == 20
    assert cfg.tiles_per_image is None and cfg.tile_overlap == 0.25
    assert cfg.dimensions is None and cfg.axes is None
    assert cfg.data_gen_args.model_dump() == {**AUGMENT_DEFAULTS}
    assert cfg.data_gen_args.horizontal_flip is True and cfg.data_gen_args.vertical_flip is True
    r = cfg.ray
    assert r.address is None and r.num_workers == 1 and r.use_gpu is False and r.cpus_per_worker is None
    assert r.storage_path is None and r.max_failures == 2 and r.predict_actors is None


def test_augment_defaults_match_the_model():
    assert set(AUGMENT_DEFAULTS) == set(cfgmod.AugmentConfig.model_fields)
    assert cfgmod.AugmentConfig().model_dump() == AUGMENT_DEFAULTS


@pytest.mark.parametrize(
    "alias, display, task",
    [
        ("SemanticSegmentation", "SemanticSegmentation", "semantic"),
        ("semantic", "SemanticSegmentation", "semantic"),
        ("semantic_segmentation", "SemanticSegmentation", "semantic"),
        ("Semantic-Segmentation", "SemanticSegmentation", "semantic"),
        ("semantic segmentation", "SemanticSegmentation", "semantic"),
        ("SEGMENTATION", "SemanticSegmentation", "semantic"),
        ("InstanceSegmentation", "InstanceSegmentation", "instance"),
        ("instance", "InstanceSegmentation", "instance"),
        ("instance_segmentation", "InstanceSegmentation", "instance"),
        ("Regression", "Regression", "regression"),
        ("regression", "Regression", "regression"),
        ("Classification", "Classification", "classification"),
        ("classification", "Classification", "classification"),
    ],
)
def test_task_aliases(alias, display, task):
    cfg = from_dict({"use_algorithm": alias, "path": "/d"})
    assert cfg.use_algorithm == display and cfg.task == task


# ---------------------------------------------------------------- problems


def test_misspelt_task_suggests_the_right_one():
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "SemanticSegmentaion", "path": "/d"})
    (p,) = _problems(e)
    assert p.startswith("use_algorithm:") and "SemanticSegmentaion" in p
    assert "Did you mean 'SemanticSegmentation'?" in p


def test_misspelt_task_with_underscores_suggests_the_display_name():
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "Semantic_Segmentaton", "path": "/d"})
    assert "Did you mean 'SemanticSegmentation'?" in _problems(e)[0]


def test_unknown_top_level_key_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": "/d", "iteration_over_dataset": 5})
    (p,) = _problems(e)
    assert p.startswith("iteration_over_dataset: unknown key")
    assert "Did you mean 'iterations_over_dataset'?" in p


def test_unknown_data_gen_args_key_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": "/d", "data_gen_args": {"horizontall_flip": True}})
    (p,) = _problems(e)
    assert p.startswith("data_gen_args.horizontall_flip: unknown key")
    assert "Did you mean 'horizontal_flip'?" in p


def test_correct_spelling_of_poission_noise_is_instantdls():
    """InstantDL spells it 'poission_noise'; the dictionary spelling is a typo here, with a hint."""
    assert from_dict({"use_algorithm": "semantic", "path": "/d",
                      "data_gen_args": {"poission_noise": 1}}).data_gen_args.poission_noise == 1
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": "/d", "data_gen_args": {"poisson_noise": 1}})
    assert "Did you mean 'poission_noise'?" in _problems(e)[0]


def test_unknown_ray_key_path_and_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": "/d", "ray": {"num_worker": 2}})
    (p,) = _problems(e)
    assert p.startswith("ray.num_worker: unknown key") and "Did you mean 'num_workers'?" in p


@pytest.mark.parametrize(
    "data, key",
    [
        ({"batchsize": "four"}, "batchsize"),
        ({"batchsize": 0}, "batchsize"),
        ({"iterations_over_dataset": -1}, "iterations_over_dataset"),
        ({"pretrained_weights": 3}, "pretrained_weights"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"dimensions": 4}, "dimensions"),
        ({"axes": "YXQ"}, "axes"),
        ({"image_size": True}, "image_size"),
        ({"image_size": [1, 2, 3, 4]}, "image_size"),
        ({"image_size": "big"}, "image_size"),
        ({"data_gen_args": {"rotation_range": "lots"}}, "data_gen_args.rotation_range"),
        ({"data_gen_args": {"horizontal_flip": "sometimes"}}, "data_gen_args.horizontal_flip"),
        ({"data_gen_args": "flip"}, "data_gen_args"),
        ({"ray": {"num_workers": "two"}}, "ray.num_workers"),
        ({"ray": {"num_workers": 0}}, "ray.num_workers"),
        ({"ray": {"cpus_per_worker": -1}}, "ray.cpus_per_worker"),
    ],
)
def test_wrong_type_names_the_key_once(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict({"use_algorithm": "semantic", "path": "/d", **data})
    probs = _problems(e)
    # one line for the key (a Union type reports once, not once per member), spelled as the user wrote it
    assert len(probs) == 1, probs
    assert probs[0].startswith(f"{key}: "), probs
    assert "got " in probs[0]


def test_missing_required_keys():
    with pytest.raises(ConfigError) as e:
        from_dict({})
    probs = _problems(e)
    assert len(probs) == 2
    assert probs[0].startswith("use_algorithm: required") and probs[1].startswith("path: required")


def test_all_problems_reported_at_once():
    data = {
        "use_algorithm": "semantic",
        "path": "/d",
        "iteration_over_dataset": 3,  # unknown key
        "batchsize": "four",  # wrong type
        "data_gen_args": {"horizontall_flip": True, "rotation_range": "lots"},  # unknown + wrong type
        "ray": {"num_worker": 2, "max_failures": -1},  # unknown + out of range
        "axes": "QQ",  # invalid value
    }
    with pytest.raises(ConfigError) as e:
        from_dict(data)
    probs = _problems(e)
    keys = sorted(p.split(":", 1)[0] for p in probs)
    assert keys == sorted([
        "iteration_over_dataset", "batchsize", "data_gen_args.horizontall_flip", "data_gen_args.rotation_range",
        "ray.num_worker", "ray.max_failures", "axes",
    ])
    assert str(e.value).startswith("Invalid configuration: 7 problems found")


def test_missing_task_does_not_hide_other_problems():
    with pytest.raises(ConfigError) as e:
        from_dict({"path": "/d", "batchsize": 0, "colour": "red"})
    keys = sorted(p.split(":", 1)[0] for p in _problems(e))
    assert keys == ["batchsize", "colour", "use_algorithm"]


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot parse"):
        load(_write(tmp_path / "bad.json", '{"use_algorithm": "semantic", '))
    with pytest.raises(ConfigError, match="cannot parse"):
        load(_write(tmp_path / "bad.yaml", "use_algorithm: [semantic\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load(_write(tmp_path / "list.yaml", "- semantic\n- /d\n"))


# ---------------------------------------------------------------- --set overrides


def test_overrides_parse_values_as_yaml():
    base = {"use_algorithm": "semantic", "path": "/d", "pretrained_weights": "imagenet", "ray": {"use_gpu": True}}
    out = apply_overrides(base, [
        "pretrained_weights=false",
        "ray.num_workers=2",
        "learning_rate=1e-4",
        "model=unet",
        "image_size=[128, 128]",
        "data_gen_args.rotation_range=30",  # nested dict created
        "ray.address=",  # empty value -> None
    ])
    assert out["pretrained_weights"] is False
    assert out["ray"] == {"use_gpu": True, "num_workers": 2, "address": None}
    assert out["model"] == "unet" and out["image_size"] == [128, 128]
    assert out["data_gen_args"] == {"rotation_range": 30}
    assert base == {"use_algorithm": "semantic", "path": "/d", "pretrained_weights": "imagenet",
                    "ray": {"use_gpu": True}}  # input untouched
    cfg = from_dict(out)
    assert cfg.pretrained_weights is False and cfg.ray.num_workers == 2 and cfg.ray.use_gpu is True
    assert cfg.data_gen_args.rotation_range == 30 and cfg.data_gen_args.horizontal_flip is True
    assert cfg.learning_rate == 1e-4  # PyYAML reads '1e-4' as a string; the config still gets the number


def test_overrides_replace_a_non_mapping_and_create_deep_paths():
    out = apply_overrides({"ray": None}, ["ray.num_workers=3", "a.b.c=1"])
    assert out["ray"] == {"num_workers": 3} and out["a"] == {"b": {"c": 1}}


def test_override_without_equals_is_a_config_error():
    with pytest.raises(ConfigError) as e:
        apply_overrides({}, ["batchsize", "ray.num_workers"])
    assert len(_problems(e)) == 2 and "KEY=VALUE" in _problems(e)[0]


def test_overrides_through_load_and_typos_caught(tmp_path):
    p = _write(tmp_path / "c.yaml", "use_algorithm: semantic\npath: /d\npretrained_weights: imagenet\n")
    cfg = load(p, ["pretrained_weights=false", "ray.num_workers=2", "iterations_over_dataset=5"])
    assert cfg.pretrained_weights is False and cfg.ray.num_workers == 2 and cfg.epochs == 5
    with pytest.raises(ConfigError) as e:
        load(p, ["ray.num_wrkers=2"])
    assert "ray.num_wrkers" in _problems(e)[0] and "Did you mean 'num_workers'?" in _problems(e)[0]


# ---------------------------------------------------------------- path resolution, dump


def test_relative_path_resolved_beside_the_config_first(tmp_path, monkeypatch):
    cfg_dir, cwd = tmp_path / "configs", tmp_path / "cwd"
    (cfg_dir / "data").mkdir(parents=True)
    (cwd / "data").mkdir(parents=True)
    (cwd / "only_cwd").mkdir()
    monkeypatch.chdir(cwd)
    p = _write(cfg_dir / "c.yaml", "use_algorithm: semantic\npath: data\n")
    assert Path(load(p).path) == (cfg_dir / "data").resolve()
    # not beside the config: the working directory
    p2 = _write(cfg_dir / "c2.yaml", "use_algorithm: semantic\npath: only_cwd\n")
    assert Path(load(p2).path) == (cwd / "only_cwd").resolve()
    # neither exists: beside the config (where the message will point)
    p3 = _write(cfg_dir / "c3.yaml", "use_algorithm: semantic\npath: nowhere\n")
    assert Path(load(p3).path) == (cfg_dir / "nowhere").resolve()


def test_absolute_and_home_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert from_dict({"use_algorithm": "semantic", "path": "/abs/data"}).path == "/abs/data"
    p = _write(tmp_path / "sub" / "c.yaml", "use_algorithm: semantic\npath: ~/mydata\n")
    assert Path(load(p).path) == tmp_path / "mydata"


def test_dump_round_trips_through_load(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    src = _write(tmp_path / "c.json", INSTANTDL_SEMANTIC_JSON.replace("examples/data/SemanticSegmentation", "data"))
    cfg = load(src, ["ray.num_workers=2", "image_size=[64, 64]", "axes=yx", "dropout=0.1"])
    out = tmp_path / "run" / "config.yaml"
    out.parent.mkdir()
    dump(cfg, out)
    text = out.read_text()
    assert "use_algorithm: SemanticSegmentation" in text and "poission_noise" in text  # every default spelled out
    again = load(out)
    assert again.model_dump() == cfg.model_dump()
    assert again.axes == "YX" and again.ray.num_workers == 2 and again.image_size == [64, 64]
    # the dumped path is absolute, so the run folder can move away from the working directory
    monkeypatch.chdir(out.parent)
    assert load(out).path == cfg.path and os.path.isabs(cfg.path)


def test_dump_of_defaults_is_valid_yaml(tmp_path):
    cfg = from_dict({"use_algorithm": "classification", "path": str(tmp_path)})
    dump(cfg, tmp_path / "c.yaml")
    raw = yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert set(raw) == set(Config.model_fields)
    assert raw["use_algorithm"] == "Classification" and raw["ray"]["num_workers"] == 1


@pytest.mark.parametrize("setting,expected", [
    ("image_size=[1,2", "--set 'image_size=[1,2': the value '[1,2' is not valid YAML"),
    ("ray.num_worker=2", "allowed keys: ray.address, ray.num_workers,"),
    ("image_size=abc", "image_size: must be false, an integer or a list of integers; got 'abc'"),
    ("batchsize=x", "batchsize: must be an integer; got 'x'"),
    ("image_size=true", "true is not a size"),
])
def test_command_line_errors_are_plain_words_without_a_traceback(setting, expected, capsys):
    """Issue 17 item 11: a malformed --set, an unknown key, a wrong type: exit 2, one readable message."""
    from instantdl_ray import cli

    cfg = Path(__file__).resolve().parents[1] / "configs" / "example_dsb2018_small.yaml"
    assert cli.main(["validate", str(cfg), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_evaluate_before_prediction_says_what_to_run(tmp_path, capsys):
    from instantdl_ray import cli

    (tmp_path / "config.yaml").write_text("use_algorithm: semantic\npath: .\n")
    assert cli.main(["evaluate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run prediction first" in err and f"--resume {tmp_path}" in err


def test_an_unknown_task_is_named_as_the_user_spelled_it():
    from instantdl_ray.registry import UnknownNameError
    from instantdl_ray.tasks import task_key

    assert task_key("Semantic_Segmentation") == task_key("semanticsegmentation") == "semantic"
    with pytest.raises(UnknownNameError, match="'object detection'"):
        task_key("object detection")
