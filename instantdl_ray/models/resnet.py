"""torchvision ResNet classifiers with a dropout head, for image classification."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18, resnet50

from instantdl_ray.models import MODELS, _only_2d


def _resnet(
    factory, name: str, in_channels: int, out_channels: int, spatial_dims: int, dropout: float,
    features: tuple[int, ...] | None,
) -> nn.Module:
    _only_2d(name, spatial_dims, features)
    model = factory(weights=None)
    if in_channels != 3:
        # Same hyperparameters as torchvision's stem; only the input count changes. ImageNet
        # weights for this layer are adapted by weights.load_pretrained rather than dropped.
        old = model.conv1
        model.conv1 = nn.Conv2d(
            in_channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
            padding=old.padding, bias=old.bias is not None,
        )
    # Dropout before the classifier is what MC dropout samples at inference.
    model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, out_channels))
    return model


@MODELS.register("resnet50")
def build_resnet50(
    *, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
    features: tuple[int, ...] | None = None,
) -> nn.Module:
    """ResNet-50 (classification default): ``(N, in_channels, Y, X) -> (N, out_channels)`` logits."""
    return _resnet(resnet50, "resnet50", in_channels, out_channels, spatial_dims, dropout, features)


@MODELS.register("resnet18")
def build_resnet18(
    *, in_channels: int, out_channels: int, spatial_dims: int = 2, dropout: float = 0.0,
    features: tuple[int, ...] | None = None,
) -> nn.Module:
    """ResNet-18 (light: 11M parameters vs 23.5M): ``(N, in_channels, Y, X) -> (N, out_channels)`` logits."""
    return _resnet(resnet18, "resnet18", in_channels, out_channels, spatial_dims, dropout, features)


__all__ = ["build_resnet18", "build_resnet50"]
