"""MONAI BasicUNet (2D or 3D) with dropout, for semantic segmentation and pixel regression."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNet

from instantdl_ray.errors import ConfigError
from instantdl_ray.models import MODELS

# Four 2x poolings: tile sizes that are multiples of 16 reach the bottleneck without rounding.
# Other sizes still run (MONAI pads inside the decoder), but the padded border is not learned
# the same way, so the planner should pick tile shapes divisible by this. Training also needs
# more than one voxel at the 1/16 bottleneck (instance norm), i.e. a tile of at least 32 along
# one axis.
UNET_DIVISOR = 16

# Half MONAI's default widths: measured 7 img/s vs 2 img/s (2D, 256², batch 4, 2 CPU cores),
# and still enough capacity for the InstantDL example sets.
DEFAULT_UNET_FEATURES = (16, 16, 32, 64, 128, 16)


@MODELS.register("unet", aliases=("basicunet", "basic_unet"))
def build_unet(
    *,
    in_channels: int,
    out_channels: int,
    spatial_dims: int = 2,
    dropout: float = 0.0,
    features: tuple[int, ...] | None = None,
) -> torch.nn.Module:
    """U-Net: ``(N, in_channels, [Z,] Y, X) -> (N, out_channels, [Z,] Y, X)`` raw logits/values.

    No final activation: the loss applies sigmoid/softmax, and stitching averages whatever the
    task's ``postprocess`` expects. Every conv block carries an ``nn.Dropout`` (p = ``dropout``),
    which MC-dropout prediction switches on at inference. Spatial sizes should be multiples of
    ``UNET_DIVISOR`` (16).

    Args:
        features: 6 widths ``(enc1, enc2, enc3, enc4, bottleneck, final)``;
            default ``DEFAULT_UNET_FEATURES`` = (16, 16, 32, 64, 128, 16).
    """
    features = DEFAULT_UNET_FEATURES if features is None else tuple(features)
    problems = []
    if spatial_dims not in (2, 3):
        problems.append(f"model 'unet': spatial_dims must be 2 or 3, got {spatial_dims}.")
    if len(features) != 6 or any(f < 1 for f in features):
        problems.append(
            f"model 'unet': features must be 6 positive widths "
            f"(enc1, enc2, enc3, enc4, bottleneck, final), got {features}; "
            f"default {DEFAULT_UNET_FEATURES}."
        )
    if problems:
        raise ConfigError(problems)
    return BasicUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        features=features,
        dropout=dropout,
    )
