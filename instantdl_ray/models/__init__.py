"""Model registry and ``build_model``: one call builds any network the tasks use.

Builders live one family per file and register themselves on import:

- ``unet``                        MONAI BasicUNet, 2D or 3D, with dropout (semantic, regression)
- ``resnet50``, ``resnet18``      torchvision ResNet with a dropout + linear head (classification)
- ``maskrcnn`` (``maskrcnn_resnet50_fpn``), ``maskrcnn_resnet18_fpn``
                                  torchvision Mask R-CNN (instance segmentation)

Every model is built with random weights; pretrained weights are loaded afterwards, by name and
shape, with :func:`instantdl_ray.models.weights.load_pretrained`, so a model never downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch

from instantdl_ray.errors import ConfigError
from instantdl_ray.registry import Registry, UnknownNameError

MODELS = Registry("model")


def build_model(
    name: str,
    *,
    in_channels: int,
    out_channels: int,
    spatial_dims: int = 2,
    dropout: float = 0.0,
    features: tuple[int, ...] | None = None,
    **options: Any,
) -> torch.nn.Module:
    """Build the registered model ``name`` with random weights.

    Args:
        name: a registered model name or alias (case-insensitive), see ``MODELS.names()``.
        in_channels: image channels C of the input ``(N, C, [Z,] Y, X)``.
        out_channels: output channels (U-Net), classes (ResNet), or classes *including background*
            (Mask R-CNN: 2 for nuclei vs background).
        spatial_dims: 2 or 3; only the U-Net supports 3.
        dropout: dropout probability; the layers exist even at 0 so MC dropout can find them.
            Mask R-CNN has no dropout and ignores it.
        features: U-Net channel widths (6 numbers); only the U-Net takes it.
        **options: builder-specific keywords, e.g. ``min_size``/``max_size`` for Mask R-CNN.

    Returns:
        the model in train mode; outputs are described by each builder.

    Raises:
        ConfigError: unknown name (with a did-you-mean) or values the model cannot take.
    """
    try:
        builder = MODELS.get(name)
    except UnknownNameError as e:
        raise ConfigError([f"model: {e}"]) from None
    problems = []
    if int(in_channels) < 1:
        problems.append(f"model '{name}': in_channels must be >= 1, got {in_channels}.")
    if int(out_channels) < 1:
        problems.append(f"model '{name}': out_channels must be >= 1, got {out_channels}.")
    if not 0.0 <= float(dropout) < 1.0:
        problems.append(f"model '{name}': dropout must be in [0, 1), got {dropout}.")
    if problems:
        raise ConfigError(problems)
    return builder(
        in_channels=int(in_channels),
        out_channels=int(out_channels),
        spatial_dims=int(spatial_dims),
        dropout=float(dropout),
        features=None if features is None else tuple(int(f) for f in features),
        **options,
    )


def _only_2d(name: str, spatial_dims: int, features: tuple[int, ...] | None) -> None:
    """Raise for options a 2D-only model would otherwise silently ignore."""
    problems = []
    if spatial_dims != 2:
        problems.append(f"model '{name}' is 2D only, got spatial_dims={spatial_dims}; use 'unet' for 3D.")
    if features is not None:
        problems.append(f"model '{name}' has no 'features' option (only 'unet' does), got {features}.")
    if problems:
        raise ConfigError(problems)


# Imported last: the builder modules register themselves into MODELS.
from instantdl_ray.models import maskrcnn, resnet, unet  # noqa: E402,F401
from instantdl_ray.models.unet import UNET_DIVISOR  # noqa: E402

__all__ = ["MODELS", "UNET_DIVISOR", "build_model"]
