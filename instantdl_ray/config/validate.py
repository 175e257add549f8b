"""Check a config against its data before any cluster starts; report every problem at once.

``python -m instantdl_ray validate CONFIG`` runs exactly this and exits 2 on problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from instantdl_ray.io import annotations, read
from instantdl_ray.io.annotations import is_annotation
from instantdl_ray.config.schema import Config
from instantdl_ray.errors import DataError


@dataclass
class Inventory:
    """What validation learned about the data set, for planning."""

    samples: dict[str, list[read.Sample]] = field(default_factory=dict)
    image_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # image path -> shape as stored
    target_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    axes: str = ""
    target_axes: str | None = None
    spatial_dims: int = 2
    label_values: set = field(default_factory=set)
    class_names: dict[int, str] | None = None
    empty_masks: list[str] = field(default_factory=list)  # training masks with background only
    label_max: dict[str, float] = field(default_factory=dict)  # groundtruth path -> largest value
    warnings: list[str] = field(default_factory=list)  # fine to train with, but the user should know
    annotation_classes: dict[str, int] = field(default_factory=dict)  # GeoJSON class name -> label value
    label_downsample: dict[str, int] = field(default_factory=dict)  # slide path -> factor of its label image


def _shape(path: Path) -> tuple[int, ...]:
    arr = read.open_array(path)
    return tuple(int(s) for s in arr.shape)


def _check_finite(path: Path, problems: list[str]) -> None:
    arr = read.open_array(path)
    if np.issubdtype(np.dtype(arr.dtype), np.floating):
        from instantdl_ray.config.plan import _subsample

        if not np.all(np.isfinite(_subsample(arr))):
            problems.append(f"{path}: contains NaN or infinite values; replace them (e.g. with 0) before training")


def _spatial(shape: tuple[int, ...], axes: str) -> tuple[int, ...]:
    return tuple(s for s, a in zip(shape, axes) if a in "ZYX")


def check_config_choices(cfg: Config) -> list[str]:
    """Problems in config values that only make sense per task (loss, model, weights)."""
    from instantdl_ray.losses import ALLOWED_LOSSES
    from instantdl_ray.tasks import get_task

    problems = []
    task = get_task(cfg.task)
    if cfg.loss_function is not None and task.losses is not None:  # None: any loss (instance: its own)
        allowed = ALLOWED_LOSSES[task.name]
        from instantdl_ray.registry import did_you_mean

        if cfg.loss_function.lower() not in allowed:
            problems.append(
                f"loss_function: '{cfg.loss_function}' does not fit {cfg.use_algorithm}; choose one of "
                f"{list(allowed)}." + did_you_mean(cfg.loss_function, allowed)
            )
    if cfg.model is not None:
        from instantdl_ray.models import MODELS

        if cfg.model not in MODELS or MODELS.canonical(cfg.model) not in task.models:
            problems.append(f"model: '{cfg.model}' is not available for {cfg.use_algorithm}; choose one of {list(task.models)}")
    w = cfg.pretrained_weights
    if isinstance(w, str) and w.lower() not in ("imagenet", "coco"):
        p = Path(w).expanduser()
        if p.suffix.lower() in (".h5", ".hdf5"):
            problems.append(
                f"pretrained_weights: '{w}' is a Keras file from the original InstantDL; its weights cannot be "
                "carried over to these PyTorch models. Set pretrained_weights: false to train from scratch, or name "
                "a run directory / PyTorch .pt file of instantdl_ray"
            )
        elif not p.exists():
            problems.append(f"pretrained_weights: '{w}' not found; give a run directory, a checkpoint folder or a .pt file")
        else:  # reads as a PyTorch checkpoint with a state dict (whether it fits the model: after planning)
            from instantdl_ray.models.weights import check_file

            problems += check_file(p, cfg.model or task.models[0], trust=cfg.trust_pretrained_weights)
    if w is True:
        problems.append("pretrained_weights: true is not a source; use false, 'imagenet', 'coco' or a path")
    if cfg.foreground_sampling > 0 and task.target_kind != "label":
        problems.append(
            f"foreground_sampling: {cfg.foreground_sampling} needs label images (SemanticSegmentation or "
            f"InstanceSegmentation); {cfg.use_algorithm} has none. Remove the key or set it to 0"
        )
    if cfg.data_gen_args.resample_images not in (False, 0, None):
        problems.append(
            f"data_gen_args.resample_images: {cfg.data_gen_args.resample_images!r} is not supported (tiles are read "
            "at the files' own resolution and InstantDL's resampling would change it silently); set it to false and "
            "resize the images beforehand, or, for classification, set image_size"
        )
    problems += tissue_mask_problems(cfg.tissue_mask)
    if cfg.iterations_over_dataset == 0 and not w:
        problems.append(
            "iterations_over_dataset: 0 means 'predict only' and needs pretrained_weights (a trained run); "
            "set iterations_over_dataset to e.g. 50 to train"
        )
    return problems


def tissue_mask_problems(setting: str) -> list[str]:
    """``tissue_mask`` is ``auto``, ``none`` or an existing folder of masks."""
    if setting in ("auto", "none") or Path(setting).expanduser().is_dir():
        return []
    return [f"tissue_mask: '{setting}' is neither 'auto', 'none' nor a folder; give 'auto' (find the tissue on each "
            "slide), 'none' (predict the whole slide) or a folder of masks named like the slides (<slide>.png)"]


def validate(cfg: Config) -> Inventory:
    """Validate ``cfg`` and its data folder. Raises ``DataError`` with every problem found."""
    from instantdl_ray.tasks import get_task

    problems: list[str] = []
    try:
        problems += check_config_choices(cfg)
    except Exception as e:  # a bad model name etc. must still be reported with the rest
        problems.append(str(e))
    root = Path(cfg.path)
    inv = Inventory()
    if not root.is_dir():
        raise DataError(problems + [f"path: '{cfg.path}' is not a folder; expected {cfg.path}/train/image/ etc."])
    task = get_task(cfg.task)
    need_train = cfg.iterations_over_dataset > 0
    for split in read.SPLITS:
        samples, probs = read.discover(root, split, cfg.task)
        if split == "test" or need_train:
            problems += probs
        elif probs and samples:
            problems += [p for p in probs if "groundtruth" not in p]
        if not samples and (split == "test" or need_train):
            if not any(str(root / split) in p for p in probs):
                problems.append(f"{root / split}: no samples found")
        inv.samples[split] = samples

    # every image reads; shapes agree with their partners
    for split, samples in inv.samples.items():
        for s in samples:
            why = read.check_pixels(s.image)
            if why is not None:
                problems.append(f"{s.image}: cannot be read as an image: truncated or corrupt ({why}); replace or remove it")
                continue
            try:
                inv.image_shapes[str(s.image)] = _shape(s.image)
                _check_finite(s.image, problems)
            except Exception as e:
                problems.append(f"{s.image}: cannot be read as an image ({type(e).__name__}: {e}); replace or remove it")
                continue
            gt = s.groundtruth
            if gt is None or isinstance(gt, int):
                continue
            if isinstance(gt, Path) and is_annotation(gt):  # QuPath GeoJSON: polygons on the image's pixels
                from instantdl_ray.data.tissue import yx_shape

                yx = yx_shape(inv.image_shapes[str(s.image)])
                found = annotations.problems(gt, s.image, yx)
                problems += found
                if not found:
                    inv.target_shapes[str(s.image)] = tuple(yx)
                    _note_annotations(inv, annotations.load(gt))
                continue
            paths = gt if isinstance(gt, list) else [gt]
            broken = [(p, why) for p in paths if (why := read.check_pixels(p)) is not None]
            for p, why in broken:
                problems.append(f"{p}: cannot be read as groundtruth: truncated or corrupt ({why}); replace or remove it")
            if broken:
                continue
            try:
                shapes = {p: _shape(p) for p in paths}
            except Exception as e:
                problems.append(f"{paths[0]}: cannot be read as groundtruth ({type(e).__name__}: {e})")
                continue
            if isinstance(gt, list):
                bad = [p for p, sh in shapes.items() if sh[:2] != inv.image_shapes[str(s.image)][:2]]
                for p in bad:
                    problems.append(f"{p}: mask shape {shapes[p]} differs from image {s.image} {inv.image_shapes[str(s.image)]}")
                inv.target_shapes[str(s.image)] = inv.image_shapes[str(s.image)][:2]
            else:
                inv.target_shapes[str(s.image)] = shapes[gt]
                _check_finite(gt, problems)

    all_samples = [s for ss in inv.samples.values() for s in ss if str(s.image) in inv.image_shapes]
    if not all_samples:
        raise DataError(problems or [f"{root}: no readable images"])
    first = all_samples[0]
    try:
        inv.axes = cfg.axes or read.infer_axes(
            inv.image_shapes[str(first.image)], inv.target_shapes.get(str(first.image)), cfg.dimensions
        )
    except ValueError as e:
        problems.append(f"{first.image}: {e}")
        raise DataError(problems)
    inv.spatial_dims = sum(a in "ZYX" for a in inv.axes)
    if cfg.dimensions and inv.spatial_dims != cfg.dimensions:
        problems.append(
            f"dimensions: {cfg.dimensions} but images like {first.image} have axes '{inv.axes}'; set 'axes' explicitly"
        )
    if len(inv.axes) != len(inv.image_shapes[str(first.image)]):
        problems.append(f"axes: '{inv.axes}' has {len(inv.axes)} axes but {first.image} has shape {inv.image_shapes[str(first.image)]}")
    n_channels = set()
    min_side = read.MIN_IMAGE_SIDE if task.pixelwise else read.MIN_CLASSIFIED_SIDE
    for s in all_samples:
        shp = inv.image_shapes[str(s.image)]
        yx = _spatial(shp, read.image_axes(shp, inv.axes))[-2:]
        if len(yx) == 2 and min(yx) < min_side:
            problems.append(f"{s.image}: {yx[0]}x{yx[1]} pixels (Y x X); images need at least {min_side} "
                            "pixels along Y and X (smaller ones are padded to the tile or resized, but a line or a "
                            "thumbnail strip holds nothing to learn); remove it or crop/resize it beforehand")
            continue
        if len(shp) == len(inv.axes) - 1 and inv.axes.endswith("C"):
            n_channels.add(1)  # a grey image among colour ones: promoted to colour when read
            continue
        if len(shp) != len(inv.axes):
            problems.append(f"{s.image}: shape {shp} does not fit axes '{inv.axes}' of the other images ({first.image})")
            continue
        n_channels.add(shp[inv.axes.index("C")] if "C" in inv.axes else 1)
        tshape = inv.target_shapes.get(str(s.image))
        if tshape is None or not task.pixelwise:
            continue
        sp = _spatial(shp, inv.axes)
        try:  # the groundtruth's own channel axis (e.g. an RGB PNG mask: YXC), as the plan reads it
            from instantdl_ray.config.plan import _target_axes

            tsp = _spatial(tshape, _target_axes(tshape, "".join(a for a in inv.axes if a in "ZYX")))
        except ValueError:
            tsp = tuple(tshape)
        if tsp != sp:
            from instantdl_ray.io.slide import is_pyramid, label_downsample

            d = label_downsample(sp, tsp) if task.target_kind == "label" and is_pyramid(s.image) else None
            if d is not None:  # a slide's label stored at a downsample: read upsampled (nearest)
                inv.label_downsample[str(s.image)] = d
                inv.warnings.append(f"{s.groundtruth}: a label at 1/{d} of {s.image.name} ({tsp} vs {sp} px); "
                                    f"read {d}x upsampled (nearest) on the slide's pixels")
                continue
            problems.append(
                f"{s.groundtruth}: groundtruth shape {tshape} does not match image {s.image.name} spatial shape {sp}; "
                "image and groundtruth must cover the same pixels (a whole slide's label may also be stored at an "
                "integer downsample of its full resolution)"
            )
    if len(n_channels - {1}) > 1 or (len(n_channels) > 1 and not inv.axes.endswith("C")):
        problems.append(f"images have different channel counts {sorted(n_channels)}; all images need the same channels")

    # label values
    inv.class_names = read.read_class_names(root)
    problems += _annotation_classes(inv)
    problems += task.check_labels(cfg, inv)
    if task.target_kind == "label":
        problems += _check_foreground(inv)
    if problems:
        raise DataError(problems)
    return inv


def _note_annotations(inv: Inventory, ann) -> None:
    """Warnings about what of a GeoJSON file is not used as drawn."""
    if ann.skipped:
        inv.warnings.append(f"{ann.path}: {', '.join(f'{n} {k}' for k, n in ann.skipped.items())} without area "
                            "skipped (only polygons label pixels)")
    if ann.repaired:
        inv.warnings.append(f"{ann.path}: {ann.repaired} self-intersecting polygon(s) repaired (shapely make_valid)")


def annotation_num_classes(inv: Inventory) -> int:
    """Semantic classes the GeoJSON classes give: 1 (a binary mask) for one class, else the
    largest label value + 1 (background included)."""
    top = max(inv.annotation_classes.values(), default=1)
    return 1 if top <= 1 else top + 1


def _annotation_classes(inv: Inventory) -> list[str]:
    """The label value of every class named in the data set's GeoJSON files (``classes.txt``'s
    index where it names the class, else 1, 2, ... alphabetically), in ``inv.annotation_classes``."""
    files = [s.groundtruth for ss in inv.samples.values() for s in ss
             if isinstance(s.groundtruth, Path) and is_annotation(s.groundtruth) and str(s.image) in inv.target_shapes]
    if not files:
        return []
    names = sorted({c for f in files for c in annotations.load(f).classes})
    inv.annotation_classes = annotations.class_index(names, inv.class_names)
    missing = [n for n in names if n not in inv.annotation_classes]
    if missing:
        return [f"classes.txt: no index for the annotation class(es) {', '.join(repr(n) for n in missing)} of "
                f"{files[0].parent}; add a line '<index> <name>' for each"]
    return []


MAX_LABEL_PIXELS = 5e7  # label images read whole at validation; larger ones (slides) are not


def _check_foreground(inv: Inventory) -> list[str]:
    """Training masks with no foreground: some are fine (counted in ``inv.empty_masks`` and the
    log); all of them leave nothing to learn and are refused."""
    checked = 0
    for s in inv.samples.get("train", []):
        if (not isinstance(s.groundtruth, Path) or str(s.image) not in inv.target_shapes  # unreadable: reported
                or is_annotation(s.groundtruth)  # polygons: a file without any is refused in validate
                or np.prod(inv.target_shapes[str(s.image)]) >= MAX_LABEL_PIXELS):
            continue
        checked += 1
        top = inv.label_max.get(str(s.groundtruth))  # already read for the label values (semantic)
        if top is None:
            top = float(np.max(np.asarray(read.open_array(s.groundtruth)[...])))
        if not top > 0:
            inv.empty_masks.append(str(s.groundtruth))
    if checked and len(inv.empty_masks) == checked:
        return [f"{Path(inv.empty_masks[0]).parent}: all {checked} training masks are background only (no value > 0); "
                "a model cannot learn objects from them. Check that the groundtruth folder holds the masks "
                "(0 = background, > 0 = object)"]
    return []


def check_class_labels(cfg: Config, inv: Inventory) -> list[str]:
    """Classification (``Classification.check_labels``): the classes of groundtruth.csv."""
    problems = []
    labels = {s.groundtruth for ss in inv.samples.values() for s in ss if isinstance(s.groundtruth, int)}
    counts: dict[int, int] = {}
    for s in inv.samples.get("train", []):
        if isinstance(s.groundtruth, int):
            counts[s.groundtruth] = counts.get(s.groundtruth, 0) + 1
    # the model's outputs cover every class named anywhere (test-only ones included, so the
    # evaluation can count them as the errors they are)
    inv.label_values = labels
    only_test = sorted(labels - set(counts)) if counts else []
    if only_test:
        inv.warnings.append(f"class(es) {only_test} appear only in test/ (never trained); the model cannot "
                            "predict them — add training images of them, or they count as errors")
    rare = sorted(c for c, n in counts.items() if n < 2)
    if rare:
        inv.warnings.append(f"class(es) {rare} have fewer than 2 training images; expect the model to miss them")
    if cfg.num_classes is not None and labels and (max(labels) >= cfg.num_classes or min(labels) < 0):
        bad = sorted(v for v in labels if v >= cfg.num_classes or v < 0)
        problems.append(
            f"num_classes: {cfg.num_classes} but groundtruth.csv has class(es) {bad}; classes must be "
            f"0..{cfg.num_classes - 1} (or remove num_classes to infer it)"
        )
    return problems


def check_label_values(cfg: Config, inv: Inventory) -> list[str]:
    """Semantic segmentation (``Semantic.check_labels``): mask values are classes that fit num_classes."""
    problems = []
    values: set = set()
    for ss in inv.samples.values():
        for s in ss:
            if not isinstance(s.groundtruth, Path) or str(s.image) not in inv.target_shapes or is_annotation(s.groundtruth):
                continue  # GeoJSON classes: _annotation_classes
            arr = np.asarray(read.open_array(s.groundtruth)[...]) if np.prod(inv.target_shapes[str(s.image)]) < MAX_LABEL_PIXELS else None
            if arr is None:
                continue
            u = np.unique(arr)
            if len(u) > 256 or not np.allclose(u, np.round(u)):
                problems.append(
                    f"{s.groundtruth}: {len(u)} distinct values, not class labels; semantic groundtruth must hold "
                    "integer classes (0/1 or 0/255 for binary masks)"
                )
                continue
            values |= set(int(v) for v in u)
            inv.label_max[str(s.groundtruth)] = float(u[-1])
    drawn = set(inv.annotation_classes.values())  # GeoJSON classes (_annotation_classes)
    n = cfg.num_classes or annotation_num_classes(inv)
    if n == 1 and len(values) > 2:
        problems.append(
            f"num_classes: 1 (binary, the default) but the masks hold {len(values)} values {sorted(values)[:10]}; "
            f"set num_classes: {max(values) + 1} for multi-class segmentation"
        )
    if n == 1 and len(drawn) > 1:
        problems.append(f"num_classes: 1 (binary) but the GeoJSON annotations name {len(drawn)} classes; remove "
                        "num_classes to segment each class")
    # a binary set may mix 0/255 masks with annotations of one class (both are foreground where > 0)
    values |= drawn | ({0} if drawn else set())
    if n > 1 and values and max(values) >= n:
        problems.append(f"num_classes: {n} but masks contain class {max(values)}; set num_classes: {max(values) + 1}")
    inv.label_values = values
    return problems
