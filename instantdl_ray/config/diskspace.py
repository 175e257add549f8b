"""Will the run's files fit? Estimates of what training and prediction write, checked against the
free space of the file system they write to, before either starts (issue 17 item 5).

The estimates are upper bounds of the usual case, not exact: a run that is refused had too little
space by a clear margin, and one that passes can still meet a disk that fills up beside it, which
then fails the run cleanly (``OSError`` ENOSPC is recorded in ``run.json``; resume after freeing
space).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from instantdl_ray.errors import InstantDLError

MARGIN = 64 * 2**20  # logs, plan, figures, TensorBoard: small, but never nothing
CHECKPOINTS_KEPT = 3  # Ray Train keeps 2 (num_to_keep) and writes the next before deleting one
TENSORS_PER_CHECKPOINT = 4  # current weights, best weights, Adam's two moments


class DiskSpaceError(InstantDLError):
    def __init__(self, problems, title: str = "Not enough disk space"):
        super().__init__(problems, title)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def training_bytes(n_params: int) -> int:
    """Checkpoints of a model with ``n_params`` float32 parameters, plus the exported best model."""
    return int(n_params * 4 * (CHECKPOINTS_KEPT * TENSORS_PER_CHECKPOINT + 1))


def prediction_bytes(pixels: list[int], out_channels: int, uncertainty: bool, pixelwise: bool = True) -> int:
    """Prediction files of test images with ``pixels`` spatial pixels each: the prediction
    (float32 at most), with uncertainty two float32 maps (entropy, mutual information); twice, for
    the zarr copies of large images and the evaluation's stacks."""
    if not pixelwise:
        return 1024 * len(pixels)  # one CSV row per image
    per_pixel = 4 * max(1, out_channels) + (8 if uncertainty else 0)
    return int(2 * per_pixel * float(np.sum(pixels, dtype=np.float64)))


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a run directory may not exist yet)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    """Free bytes of the file system that holds ``path``."""
    return int(shutil.disk_usage(_existing(path)).free)


def check(needs: dict[str, tuple[Path, int]]) -> None:
    """``needs``: what -> (folder written to, bytes). Raises ``DiskSpaceError`` with the numbers for
    every file system that has less free space than what is written to it (plus ``MARGIN``)."""
    by_fs: dict[int, list[tuple[str, Path, int]]] = {}
    for what, (folder, n) in needs.items():
        by_fs.setdefault(_existing(folder).stat().st_dev, []).append((what, Path(folder), n))
    problems = []
    for items in by_fs.values():
        need = sum(n for *_, n in items) + MARGIN
        free = free_bytes(items[0][1])
        if free < need:
            parts = ", ".join(f"{what} ~{_fmt(n)} in {folder}" for what, folder, n in items)
            problems.append(f"the run will write about {_fmt(need)} ({parts}), but that file system has "
                            f"{_fmt(free)} free; free {_fmt(need - free)} or more, or write elsewhere "
                            "(run --out DIR, ray.storage_path for checkpoints), then run again")
    if problems:
        raise DiskSpaceError(problems)


def run_needs(cfg, plan, samples, shapes: dict, run_dir: Path, train: bool) -> dict[str, tuple[Path, int]]:
    """What a run writes where: checkpoints (when ``train``, to a local storage path) and the
    predictions of ``samples`` (``shapes``: image path -> shape as stored)."""
    from instantdl_ray.data.dataset import spatial_shape
    from instantdl_ray.tasks import get_task

    task = get_task(plan.task)
    needs: dict[str, tuple[Path, int]] = {}
    if train and not (cfg.ray.storage_path and "://" in cfg.ray.storage_path):
        import torch

        with torch.device("meta"):  # shapes only: no memory, no time
            n_params = sum(p.numel() for p in task.build_model(plan).parameters())
        storage = Path(cfg.ray.storage_path).expanduser() if cfg.ray.storage_path else run_dir / "checkpoints"
        needs["checkpoints"] = (storage, training_bytes(n_params))
    pixels = [int(np.prod(spatial_shape(shapes[str(s.image)], plan.axes))) for s in samples if str(s.image) in shapes]
    needs["predictions"] = (run_dir, prediction_bytes(pixels, plan.out_channels, bool(cfg.calculate_uncertainty),
                                                      task.pixelwise))
    return needs


__all__ = ["DiskSpaceError", "check", "free_bytes", "prediction_bytes", "run_needs", "training_bytes"]
