"""The user's surface: InstantDL's config keys, loaded from YAML or (InstantDL) JSON.

Only ``use_algorithm`` and ``path`` are required. Every problem is reported at once, with
the key path, the bad value, the allowed values and a "did you mean".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from instantdl_ray.errors import ConfigError
from instantdl_ray.io.write import write_text
from instantdl_ray.registry import did_you_mean

Num = Union[bool, float]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(_Strict):
    """Advanced: where and how wide to run. Defaults fit a laptop."""

    address: Optional[str] = None  # None: local Ray (or $RAY_ADDRESS)
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Optional[float] = Field(None, gt=0)  # None: planned from the machine
    storage_path: Optional[str] = None  # None: <run_dir>/checkpoints (local runs)
    max_failures: int = Field(2, ge=0)
    predict_actors: Optional[int] = Field(None, ge=1)  # None: one per free CPU/GPU
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes
    # a joined cluster smaller than the run needs is asked to grow (Ray's autoscaler); seconds to
    # wait for its nodes before the run gives up (a local Ray never waits)
    autoscale_wait_s: float = Field(600, ge=0)
    # local Ray only: start Ray's dashboard. None: only when training (Ray Train's placement-group
    # cleaner polls Ray's state API, which the dashboard serves); prediction runs without (~200 MiB less)
    dashboard: Optional[bool] = None


class AugmentConfig(_Strict):
    """InstantDL's data_gen_args (its spelling and order, typo included) plus a few of ours: the one
    list of augmentation keys and their defaults (``data.augment`` reads it from here)."""

    save_augmented_images: bool = False
    resample_images: Union[bool, int, list[int]] = False
    std_normalization: bool = False
    feature_scaling: bool = False
    horizontal_flip: bool = True
    vertical_flip: bool = True
    poission_noise: Num = False
    rotation_range: Num = False
    zoom_range: Num = False
    contrast_range: Num = False
    brightness_range: Num = False
    gamma_shift: Num = False
    gaussian_blur: Num = False
    threshold_background_image: bool = False
    threshold_background_groundtruth: bool = False
    binarize_mask: bool = False


AUGMENT_DEFAULTS: dict[str, Any] = AugmentConfig().model_dump()


class Config(_Strict):
    """The resolved run configuration (InstantDL keys first, our additions after)."""

    use_algorithm: str
    path: str
    seed: int = 42
    pretrained_weights: Union[bool, str] = False
    batchsize: int = Field(4, ge=1)
    iterations_over_dataset: int = Field(50, ge=0)
    data_gen_args: AugmentConfig = Field(default_factory=AugmentConfig)
    loss_function: Optional[str] = None  # None: the task's default
    num_classes: Optional[int] = Field(None, ge=1)  # None: 1 (binary) / from the CSV
    image_size: Union[Literal[False], int, list[int]] = False  # classification resize / pixel-task tile size
    calculate_uncertainty: bool = True
    evaluation: bool = True
    # --- ours
    model: Optional[str] = None  # None: the task's default network
    # a pretrained_weights file that pickled Python objects besides tensors is loaded only with this
    # opt-in: the full unpickler runs code from the file (a warning is logged when it is used)
    trust_pretrained_weights: bool = False
    learning_rate: float = Field(1e-3, gt=0)
    early_stopping_patience: int = Field(10, ge=1)
    validation_split: float = Field(0.2, ge=0.0, lt=1.0)
    dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)  # None: 0.2 U-Net / 0.5 ResNet
    mc_passes: int = Field(20, ge=2)
    tiles_per_image: Optional[int] = Field(None, ge=1)  # training tiles drawn per image per epoch
    foreground_sampling: float = Field(0.0, ge=0.0, le=1.0)  # fraction of training tiles centred on labels
    tile_overlap: float = Field(0.25, ge=0.0, lt=1.0)
    # µm per pixel the model works at; None: the training images' pixel size (from their metadata).
    # Slides are read at the pyramid level nearest to it and resampled to it
    mpp: Optional[float] = Field(None, gt=0)
    # slides (whole-slide and pyramidal images): "auto" finds the tissue on a thumbnail and predicts
    # only there, "none" predicts everywhere, or a folder of masks named like the slides
    tissue_mask: str = "auto"
    # binary segmentation decision rule: "calibrated" (the validation Jaccard's best threshold,
    # stored in thresholds.json), "otsu" (InstantDL: per image), or a fixed probability
    threshold: Union[Literal["calibrated", "otsu"], float] = "calibrated"
    dimensions: Optional[Literal[2, 3]] = None  # None: inferred from image/groundtruth shapes
    axes: Optional[str] = None  # None: inferred, e.g. "YX", "YXC", "CYX", "ZYX"
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("use_algorithm")
    @classmethod
    def _task(cls, v: str) -> str:
        from instantdl_ray.registry import UnknownNameError
        from instantdl_ray.tasks import TASKS, get_task

        try:
            return get_task(v).display
        except UnknownNameError:
            choices = [TASKS.get(n).display for n in TASKS.names()]
            raise ValueError(
                f"unknown task '{v}'; choose one of {choices} (or {', '.join(TASKS.names())})."
                + did_you_mean(str(v), [*TASKS.names(), *TASKS.aliases(), *choices])
            ) from None

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        v = v.upper()
        if not set(v) <= set("CZYX") or len(set(v)) != len(v) or not {"Y", "X"} <= set(v):
            raise ValueError(f"axes '{v}' must use each of C, Z, Y, X at most once and contain Y and X, e.g. 'YXC'")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v):
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError(f"threshold must be 'calibrated', 'otsu' or a probability between 0 and 1; got {v}")
        return v

    @field_validator("image_size", mode="before")
    @classmethod
    def _size_not_true(cls, v):
        if v is True:  # before parsing: pydantic would read true as the integer 1
            raise ValueError("true is not a size; use false (automatic) or e.g. 256 or [256, 256]")
        return v

    @field_validator("image_size")
    @classmethod
    def _size(cls, v):
        if isinstance(v, list) and not (len(v) in (2, 3) and all(int(x) > 0 for x in v)):
            raise ValueError("image_size must be false, one int or a list of 2 (Y, X) or 3 (Z, Y, X) positive ints")
        if isinstance(v, bool) and v:
            raise ValueError("true is not a size; use false (automatic) or e.g. 256 or [256, 256]")
        if isinstance(v, int) and not isinstance(v, bool) and v <= 0:
            raise ValueError("image_size must be positive")
        return v

    # -- derived, read-only
    @property
    def task(self) -> str:
        from instantdl_ray.tasks import task_key

        return task_key(self.use_algorithm)

    @property
    def epochs(self) -> int:
        return self.iterations_over_dataset


# ---------------------------------------------------------------- loading

_PY_LITERAL = re.compile(r'("(?:\\.|[^"\\])*")|\b(True|False|None)\b')


def _json_with_python_literals(text: str) -> Any:
    """InstantDL's example configs write Python's ``True``/``False``; accept them unchanged."""
    fixed = _PY_LITERAL.sub(
        lambda m: m.group(1) or {"True": "true", "False": "false", "None": "null"}[m.group(2)], text
    )
    return json.loads(fixed)


def load_raw(path: str | Path) -> dict:
    """Parse a YAML or JSON config file to a dict (no validation)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: config file not found"])
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                data = _json_with_python_literals(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError([f"{path}: cannot parse: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of keys (use_algorithm, path, ...), got {type(data).__name__}"])
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    problems = []
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set iterations_over_dataset=5")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            where = getattr(e, "problem", None) or str(e).splitlines()[0]
            problems.append(f"--set {item!r}: the value {value!r} is not valid YAML ({where}); quote it, e.g. "
                            f"--set '{key}=[256, 256]' or --set {key}=true")
    if problems:
        raise ConfigError(problems)
    return data


def _unknown_keys(data: dict, model: type[BaseModel], prefix: str = "") -> list[str]:
    problems = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            allowed = [f"{prefix}{f}" for f in fields]
            problems.append(
                f"{prefix}{key}: unknown key; allowed keys: {', '.join(allowed)}." + did_you_mean(str(key), fields)
            )
            continue
        sub = fields[key].annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            problems += _unknown_keys(value, sub, f"{prefix}{key}.")
    return problems


def _key_path(loc: tuple) -> str:
    """pydantic's error location -> the user's key path (drops Union-member and validator tags)."""
    parts: list[str] = []
    model: Any = Config
    for x in loc:
        if isinstance(x, int):
            parts.append(str(x))
        elif model is not None and x in model.model_fields:
            parts.append(x)
            ann = model.model_fields[x].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return ".".join(parts) or "config"


def _annotation(key_path: str) -> Any:
    """The type annotation of a config key path such as ``ray.num_workers`` (None if unknown)."""
    model: Any = Config
    ann = None
    for part in key_path.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        ann = model.model_fields[part].annotation
        model = ann
    return ann


def _describe(ann: Any) -> str:
    """A type annotation in plain words: ``Union[bool, int, list[int]]`` -> "true/false, an integer
    or a list of integers"; "" where it has no simple description."""
    import typing

    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is Union:
        parts = [_describe(a) for a in args if a is not type(None)]
        if not all(parts):
            return ""
        if type(None) in args:
            parts.append("null (the default)")
        return ", ".join(parts[:-1]) + " or " + parts[-1] if len(parts) > 1 else parts[0]
    if origin is Literal:
        words = [str(a).lower() if isinstance(a, bool) else repr(a) for a in args]
        return words[0] if len(words) == 1 else "one of " + ", ".join(words)
    if origin is list:
        inner = _describe(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s" if inner else "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(ann, "")


def from_dict(data: dict, base_dir: str | Path | None = None) -> Config:
    """Validate a raw dict into a ``Config``; raises ``ConfigError`` listing every problem."""
    problems = _unknown_keys(data, Config)
    for req in ("use_algorithm", "path"):
        if req not in data:
            problems.append(f"{req}: required key missing (e.g. use_algorithm: SemanticSegmentation, path: data/)")
    clean = {k: v for k, v in data.items() if k in Config.model_fields}
    for sub in ("data_gen_args", "ray"):
        if isinstance(clean.get(sub), dict):
            model = Config.model_fields[sub].annotation
            clean[sub] = {k: v for k, v in clean[sub].items() if k in model.model_fields}
    cfg = None
    complete = "use_algorithm" in clean and "path" in clean
    try:
        # a missing required key is already reported; placeholders let every other key be checked too
        cfg = Config(**{"use_algorithm": "semantic", "path": ".", **clean})
    except ValidationError as e:
        # pydantic reports one error per Union member (loc ends in 'bool', 'str', ...): one line per key
        by_key: dict[str, tuple[list[str], Any]] = {}
        for err in e.errors():
            key = _key_path(err["loc"])
            msgs, _ = by_key.setdefault(key, ([], err.get("input")))
            msg = err["msg"].removeprefix("Value error, ")
            if msg not in msgs:
                msgs.append(msg)
        for key, (msgs, value) in by_key.items():
            if any(p.startswith(f"{key}:") for p in problems):
                continue
            desc = _describe(_annotation(key))
            if desc and all(m.startswith("Input should be") for m in msgs):  # a plain type error: say it plainly
                problems.append(f"{key}: must be {desc}; got {value!r}")
            else:
                problems.append(f"{key}: {'; or '.join(msgs)} (got {value!r})")
    if not complete:
        cfg = None
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    cfg.path = str(resolve_data_path(cfg.path, base_dir))
    return cfg


def resolve_data_path(path: str, base_dir: str | Path | None) -> Path:
    """Relative paths are tried beside the config file first, then from the working directory."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    candidates = ([Path(base_dir) / p] if base_dir else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    return candidates[0].resolve()


def load(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a config file."""
    data = apply_overrides(load_raw(path), overrides or [])
    return from_dict(data, base_dir=Path(path).resolve().parent)


def dump(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (every default spelled out) as YAML."""
    write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
