"""Model registry and builders: shapes, dropout layers, Mask R-CNN contract, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from instantdl_ray.errors import ConfigError
from instantdl_ray.models import MODELS, UNET_DIVISOR, build_model

torch.set_num_threads(1)


def _n_dropout(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_builds(name):
    in_ch = 3 if name.startswith("maskrcnn") else 2
    model = build_model(name, in_channels=in_ch, out_channels=2)
    assert isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_unet_2d_shape_and_dropout():
    model = build_model("unet", in_channels=1, out_channels=3, dropout=0.2)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 2 * UNET_DIVISOR, 2 * UNET_DIVISOR))
    assert out.shape == (2, 3, 32, 32)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(d.p == pytest.approx(0.2) for d in drops)


def test_unet_3d_shape():
    model = build_model("unet", in_channels=1, out_channels=2, spatial_dims=3, features=(4, 4, 8, 8, 16, 4))
    with torch.no_grad():
        # train mode: instance norm needs > 1 voxel at the 1/16 bottleneck
        out = model(torch.rand(1, 1, 16, 32, 32))
    assert out.shape == (1, 2, 16, 32, 32)


def test_unet_many_input_channels():
    model = build_model("unet", in_channels=13, out_channels=1)
    with torch.no_grad():
        out = model(torch.rand(1, 13, 32, 32))
    assert out.shape == (1, 1, 32, 32)


def test_unet_bad_features_is_config_error():
    with pytest.raises(ConfigError, match="features"):
        build_model("unet", in_channels=1, out_channels=1, features=(8, 16))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_one_channel_logits_and_dropout(name):
    model = build_model(name, in_channels=1, out_channels=4, dropout=0.5).eval()
    assert model.conv1.in_channels == 1
    assert _n_dropout(model) == 1
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 4)


def test_resnet_rejects_3d():
    with pytest.raises(ConfigError, match="2D only"):
        build_model("resnet18", in_channels=1, out_channels=2, spatial_dims=3)


def _maskrcnn_batch(size: int = 64):
    image = torch.rand(3, size, size)
    masks = torch.zeros(2, size, size, dtype=torch.uint8)
    masks[0, 8:24, 8:24] = 1
    masks[1, 36:56, 30:50] = 1
    target = {
        "boxes": torch.tensor([[8.0, 8.0, 24.0, 24.0], [30.0, 36.0, 50.0, 56.0]]),
        "labels": torch.tensor([1, 1]),
        "masks": masks,
    }
    return [image], [target]


@pytest.mark.parametrize("name", ["maskrcnn_resnet18_fpn", "maskrcnn"])
def test_maskrcnn_train_and_eval(name):
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, out_channels=2, min_size=64, max_size=64)
    images, targets = _maskrcnn_batch(64)
    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert expected <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model(images)
    n = out["boxes"].shape[0]
    assert out["boxes"].shape == (n, 4)
    assert out["scores"].shape == (n,) and out["labels"].shape == (n,)
    assert out["masks"].shape == (n, 1, 64, 64)


def test_maskrcnn_default_sizes_keep_256_tiles():
    model = build_model("maskrcnn_resnet18_fpn", in_channels=3, out_channels=2)
    assert model.transform.min_size == (256,) and model.transform.max_size == 1024


def test_maskrcnn_input_and_class_checks():
    with pytest.raises(ConfigError) as e:
        build_model("maskrcnn", in_channels=4, out_channels=1)
    assert "in_channels" in str(e.value) and "background" in str(e.value)


def test_unknown_model_did_you_mean():
    with pytest.raises(ConfigError) as e:
        build_model("resnet5O", in_channels=1, out_channels=2)
    msg = str(e.value)
    assert "resnet5O" in msg and "Did you mean 'resnet50'" in msg


def test_alias_resolves():
    assert MODELS.canonical("MaskRCNN_ResNet50_FPN") == "maskrcnn"
