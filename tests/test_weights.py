"""Transfer learning with weights the tests make themselves (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models._api import WeightsEnum

from instantdl_ray.errors import DataError, WeightsError
from instantdl_ray.models import build_model
from instantdl_ray.models.weights import hub_checkpoint_path, load_pretrained, resolve_weights

torch.set_num_threads(1)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that always fails."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))

    def no_network(self, *args, **kwargs):
        raise ConnectionError("network blocked in tests")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_network)
    return hub


def test_other_class_count_skips_head_and_loads_the_rest(tmp_path):
    torch.manual_seed(0)
    src = build_model("resnet18", in_channels=3, out_channels=2)
    path = tmp_path / "weights.pt"
    torch.save(src.state_dict(), path)
    dst = build_model("resnet18", in_channels=3, out_channels=5)
    report = load_pretrained(dst, path, model_name="resnet18", log=_quiet)

    skipped = dict(report["skipped"])
    assert set(skipped) == {"fc.1.weight", "fc.1.bias"}
    assert skipped["fc.1.weight"] == "shape (2, 512) != (5, 512)"
    assert set(report["missing"]) == {"fc.1.weight", "fc.1.bias"}
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for name in report["loaded"]:
        assert torch.equal(src_sd[name], dst_sd[name]), name
    assert "conv1.weight" in report["loaded"] and report["source"] == str(path)


def test_run_directory_and_checkpoint_folder_resolve(tmp_path):
    model = build_model("resnet18", in_channels=1, out_channels=2)
    best = tmp_path / "run" / "checkpoints" / "best"
    best.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 3}, best / "model.pt")
    assert resolve_weights(tmp_path / "run", "resnet18") == best / "model.pt"
    assert resolve_weights(best, "resnet18") == best / "model.pt"
    report = load_pretrained(build_model("resnet18", in_channels=1, out_channels=2), tmp_path / "run",
                             model_name="resnet18", log=_quiet)
    assert not report["skipped"] and not [k for k in report["missing"] if "num_batches" not in k]


def test_empty_folder_names_what_was_looked_for(tmp_path):
    with pytest.raises(WeightsError, match="checkpoints"):
        resolve_weights(tmp_path, "unet")


def test_ddp_prefix_and_state_dict_key_stripped(tmp_path):
    torch.manual_seed(1)
    src = build_model("unet", in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}
    path = tmp_path / "ddp.ckpt"
    torch.save(wrapped, path)
    dst = build_model("unet", in_channels=1, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    report = load_pretrained(dst, path, model_name="unet", log=_quiet)
    assert not report["skipped"]
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])


def test_keras_file_is_explained(tmp_path):
    with pytest.raises(WeightsError) as e:
        resolve_weights(tmp_path / "pretrained_weights_nuclei.hdf5", "unet")
    msg = str(e.value)
    assert "Keras" in msg and "pretrained_weights: false" in msg and "PyTorch" in msg


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsError, match="nope.pt"):
        resolve_weights(missing, "unet")


def test_file_of_another_model_raises(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"foo.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="another model"):
        load_pretrained(build_model("resnet18", in_channels=3, out_channels=2), path,
                        model_name="resnet18", log=_quiet)


def test_imagenet_offline_names_file_and_folder(offline_hub):
    model = build_model("resnet18", in_channels=3, out_channels=2)
    with pytest.raises(WeightsError) as e:
        load_pretrained(model, "imagenet", model_name="resnet18", log=_quiet)
    msg = str(e.value)
    assert "resnet18-f37072fd.pth" in msg
    assert str(offline_hub / "checkpoints") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg


def test_imagenet_from_cache_is_used(offline_hub):
    torch.manual_seed(2)
    fake = torchvision.models.resnet18(weights=None).state_dict()
    path, _ = hub_checkpoint_path("ResNet18_Weights.IMAGENET1K_V1")
    path.parent.mkdir(parents=True)
    torch.save(fake, path)

    model = build_model("resnet18", in_channels=3, out_channels=4)
    report = load_pretrained(model, "ImageNet", model_name="resnet18", log=_quiet)
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], fake["layer4.1.conv2.weight"])
    assert ("fc.weight", "not in model") in report["skipped"]  # our head is fc.1

    # a grey-scale classifier keeps the stem: RGB kernels summed
    grey = build_model("resnet18", in_channels=1, out_channels=4)
    report = load_pretrained(grey, "imagenet", model_name="resnet18", log=_quiet)
    assert report["adapted"] == ["conv1.weight"]
    assert torch.allclose(grey.conv1.weight, fake["conv1.weight"].sum(1, keepdim=True))

    # the same file is the backbone of the light Mask R-CNN
    mrcnn = build_model("maskrcnn_resnet18_fpn", in_channels=1, out_channels=2)
    load_pretrained(mrcnn, "imagenet", model_name="maskrcnn_resnet18_fpn", log=_quiet)
    loaded = mrcnn.state_dict()["backbone.body.layer1.0.conv1.weight"]
    assert torch.equal(loaded, fake["layer1.0.conv1.weight"])


def test_named_weights_that_do_not_exist():
    with pytest.raises(WeightsError, match="coco"):
        resolve_weights("coco", "resnet50")
    with pytest.raises(WeightsError, match="no published weights"):
        resolve_weights("imagenet", "unet")
    assert resolve_weights("coco", "maskrcnn_resnet50_fpn") == "MaskRCNN_ResNet50_FPN_Weights.COCO_V1"


class TrainingMeta:
    """A custom object a training script pickled beside its weights (needs the full unpickler)."""

    def __init__(self, note: str):
        self.note = note


def _pickled_checkpoint(tmp_path):
    torch.manual_seed(3)
    src = build_model("resnet18", in_channels=3, out_channels=2)
    path = tmp_path / "with_meta.pt"
    torch.save({"model": src.state_dict(), "meta": TrainingMeta("lr 1e-3")}, path)
    return src, path


def test_pickled_objects_are_refused_unless_trusted(tmp_path):
    _, path = _pickled_checkpoint(tmp_path)
    with pytest.raises(WeightsError) as e:
        load_pretrained(build_model("resnet18", in_channels=3, out_channels=2), path,
                        model_name="resnet18", log=_quiet)
    msg = str(e.value)
    assert "trust_pretrained_weights: true" in msg and str(path) in msg and "runs code" in msg


def test_trusted_pickled_checkpoint_loads_with_a_warning(tmp_path, caplog):
    import logging

    src, path = _pickled_checkpoint(tmp_path)
    dst = build_model("resnet18", in_channels=3, out_channels=2)
    lines = []
    with caplog.at_level(logging.WARNING, logger="instantdl_ray.models.weights"):
        report = load_pretrained(dst, path, model_name="resnet18", log=lines.append, trust=True)
    assert not report["skipped"]
    assert torch.equal(dst.state_dict()["conv1.weight"], src.state_dict()["conv1.weight"])
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "trust_pretrained_weights" in warned[0].getMessage()
    assert any("trust_pretrained_weights" in line for line in lines)


def test_plain_tensor_file_needs_no_trust(tmp_path, caplog):
    import logging

    path = tmp_path / "plain.pt"
    torch.save(build_model("resnet18", in_channels=3, out_channels=2).state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="instantdl_ray.models.weights"):
        load_pretrained(build_model("resnet18", in_channels=3, out_channels=2), path, model_name="resnet18",
                        log=_quiet, trust=True)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # the opt-in was not needed


def test_trust_key_defaults_to_false():
    from instantdl_ray.config.schema import from_dict

    assert from_dict({"use_algorithm": "semantic", "path": "."}).trust_pretrained_weights is False
    assert from_dict({"use_algorithm": "semantic", "path": ".", "trust_pretrained_weights": True}).trust_pretrained_weights


def test_predict_only_runs_pass_the_trust_key(tmp_path):
    """``iterations_over_dataset: 0`` loads the weights on the driver: the opt-in must reach it too."""
    from conftest import make_classification_set
    from instantdl_ray import pipeline
    from instantdl_ray.config import schema as config
    from instantdl_ray.config.plan import make_plan
    from instantdl_ray.config.validate import validate

    _, path = _pickled_checkpoint(tmp_path)
    data = make_classification_set(tmp_path / "data")
    base = {"use_algorithm": "classification", "path": str(data), "model": "resnet18",
            "iterations_over_dataset": 0, "pretrained_weights": str(path)}
    # without the opt-in the file is refused already at validation, naming the key
    with pytest.raises(DataError, match="trust_pretrained_weights"):
        validate(config.from_dict({**base, "trust_pretrained_weights": False}))
    cfg = config.from_dict({**base, "trust_pretrained_weights": True})
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    assert pipeline._predict_only_model(cfg, plan, tmp_path / "run", _quiet).exists()
