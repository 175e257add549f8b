"""torchvision Mask R-CNN (ResNet-50-FPN or ResNet-18-FPN), for instance segmentation.

Input/output contract (torchvision's):

- train mode: ``model(images, targets) -> dict`` of 5 scalar losses, where ``images`` is a list of
  ``(3, Y, X)`` float tensors in [0, 1] and each target holds ``boxes (n, 4)`` xyxy float,
  ``labels (n,)`` int64 (1..K-1), ``masks (n, Y, X)`` uint8.
- eval mode: ``model(images) -> list`` of dicts with ``boxes (n, 4)``, ``labels (n,)``,
  ``scores (n,)``, ``masks (n, 1, Y, X)`` float probabilities.

The network always sees 3 channels: 1-channel microscopy is repeated to 3 by the caller (the
instance task), which keeps COCO/ImageNet weights usable. Images must already be scaled to
[0, 1]; the model then normalises with ImageNet mean/std, the statistics its pretrained
backbones were trained with. Mask R-CNN has no dropout layer: ``dropout`` is accepted and
ignored, so its uncertainty comes from per-instance scores rather than MC dropout.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

from instantdl_ray.errors import ConfigError
from instantdl_ray.models import MODELS, _only_2d

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision resizes every image so its short side is min_size (default 800). Tiles of 256²
# would be upscaled ~10x in pixels and run ~10x slower on CPU, so the default keeps them as is.
DEFAULT_MIN_SIZE = 256
DEFAULT_MAX_SIZE = 1024
# torchvision keeps 100 detections; a 256² tile of dense nuclei can hold more.
DEFAULT_DETECTIONS_PER_IMG = 300


def _check(name: str, in_channels: int, out_channels: int, spatial_dims: int, features) -> None:
    _only_2d(name, spatial_dims, features)
    problems = []
    if in_channels not in (1, 3):
        problems.append(
            f"model '{name}': in_channels must be 1 or 3 (1-channel images are repeated to 3), "
            f"got {in_channels}."
        )
    if out_channels < 2:
        problems.append(
            f"model '{name}': out_channels counts the background class, so it must be >= 2 "
            f"(2 for one object class such as nuclei), got {out_channels}."
        )
    if problems:
        raise ConfigError(problems)


def _kwargs(min_size: int, max_size: int, detections_per_img: int) -> dict:
    return dict(
        min_size=min_size, max_size=max_size, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), box_detections_per_img=detections_per_img,
    )


@MODELS.register("maskrcnn", aliases=("maskrcnn_resnet50_fpn", "mask_rcnn"))
def build_maskrcnn_resnet50_fpn(
    *, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
    features: tuple[int, ...] | None = None, min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE, detections_per_img: int = DEFAULT_DETECTIONS_PER_IMG,
) -> nn.Module:
    """Mask R-CNN ResNet-50-FPN (torchvision layout, so COCO weights load by name).

    ``out_channels`` = classes including background. ``min_size``/``max_size``: the internal
    resize range (set ``min_size`` to the tile size to avoid any resizing). ``dropout`` ignored.
    """
    _check("maskrcnn", in_channels, out_channels, spatial_dims, features)
    return maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=out_channels,
        **_kwargs(min_size, max_size, detections_per_img),
    )


@MODELS.register("maskrcnn_resnet18_fpn")
def build_maskrcnn_resnet18_fpn(
    *, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
    features: tuple[int, ...] | None = None, min_size: int = DEFAULT_MIN_SIZE,
    max_size: int = DEFAULT_MAX_SIZE, detections_per_img: int = DEFAULT_DETECTIONS_PER_IMG,
) -> nn.Module:
    """Mask R-CNN ResNet-18-FPN: the light variant (31M parameters vs 44M for ResNet-50-FPN).

    Same contract as ``maskrcnn``. The backbone uses trainable BatchNorm, as torchvision does for
    a backbone without pretrained weights (frozen BatchNorm with untrained statistics would be an
    identity and the backbone would train without normalisation). ``dropout`` ignored.
    """
    _check("maskrcnn_resnet18_fpn", in_channels, out_channels, spatial_dims, features)
    backbone = resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, trainable_layers=5, norm_layer=nn.BatchNorm2d
    )
    return MaskRCNN(backbone, num_classes=out_channels, **_kwargs(min_size, max_size, detections_per_img))


__all__ = ["build_maskrcnn_resnet18_fpn", "build_maskrcnn_resnet50_fpn"]
