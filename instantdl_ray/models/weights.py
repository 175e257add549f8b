"""Transfer learning: load pretrained weights into a freshly built model, by name and shape.

``pretrained_weights`` in the config may name

- an earlier run directory (``<run>/checkpoints/best/model.pt``) or a checkpoint folder
  holding ``model.pt``;
- a PyTorch state-dict file (``.pt``, ``.pth``, ``.ckpt``): a raw state dict, or a dict with
  the state dict under ``model`` or ``state_dict``; ``module.`` (DDP) and ``_orig_mod.``
  (``torch.compile``) key prefixes are stripped;
- ``imagenet`` (resnet50, resnet18, and the backbones of both Mask R-CNNs) or ``coco``
  (maskrcnn): torchvision's published weights, read from the torch hub cache. Nothing is
  downloaded when the file is cached, so clusters without internet work once it is copied there.

Files are read with ``torch.load(weights_only=True)`` (tensors and plain data). A file that
pickled other Python objects needs the full unpickler, which runs code from the file: it is
refused unless the config opts in with ``trust_pretrained_weights: true`` (logged as a warning).

Parameters are matched by name *and* shape, so a head trained for another class count is
skipped and reported instead of failing the whole load (Keras' ``by_name=True,
skip_mismatch=True`` that InstantDL used, made explicit).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from instantdl_ray.errors import WeightsError

logger = logging.getLogger(__name__)
TRUST_KEY = "trust_pretrained_weights"

RUN_CHECKPOINT = Path("checkpoints") / "best" / "model.pt"
CHECKPOINT_FILE = "model.pt"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".ckpt")
KERAS_SUFFIXES = (".h5", ".hdf5")
# Leading key prefixes added by wrappers, not by the model: DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# (source, canonical model name) -> (torchvision weights name, key prefix in our model)
NAMED_WEIGHTS: dict[tuple[str, str], tuple[str, str]] = {
    ("imagenet", "resnet50"): ("ResNet50_Weights.IMAGENET1K_V1", ""),
    ("imagenet", "resnet18"): ("ResNet18_Weights.IMAGENET1K_V1", ""),
    ("imagenet", "maskrcnn"): ("ResNet50_Weights.IMAGENET1K_V1", "backbone.body."),
    ("imagenet", "maskrcnn_resnet18_fpn"): ("ResNet18_Weights.IMAGENET1K_V1", "backbone.body."),
    ("coco", "maskrcnn"): ("MaskRCNN_ResNet50_FPN_Weights.COCO_V1", ""),
}
_NAMED_SOURCES = ("imagenet", "coco")


def _canonical_model(model_name: str) -> str:
    from instantdl_ray.models import MODELS

    return MODELS.canonical(model_name) if model_name in MODELS else str(model_name).lower()


def resolve_weights(spec: str | Path, model_name: str) -> Path | str:
    """Turn a ``pretrained_weights`` value into what to load, without loading it.

    Args:
        spec: run directory, checkpoint directory, state-dict file, ``"imagenet"`` or ``"coco"``.
        model_name: the model the weights are for (name or alias), used for named weights.

    Returns:
        the state-dict ``Path`` for files and folders, or the torchvision weights name
        (e.g. ``"ResNet50_Weights.IMAGENET1K_V1"``) for ``imagenet``/``coco``.

    Raises:
        WeightsError: missing path, a folder without a checkpoint, a Keras file, an unknown
            file type, or named weights that do not exist for ``model_name``.
    """
    if isinstance(spec, bool) or spec is None:
        raise WeightsError([
            f"pretrained_weights: {spec!r} is not a source; use false (train from scratch), "
            f"'imagenet', 'coco', a run directory or a .pt file."
        ])
    text = str(spec)
    if text.lower() in _NAMED_SOURCES:
        model = _canonical_model(model_name)
        key = (text.lower(), model)
        if key not in NAMED_WEIGHTS:
            offered = sorted({s for s, m in NAMED_WEIGHTS if m == model})
            choices = f"this model offers {offered}" if offered else "this model has no published weights"
            raise WeightsError([
                f"pretrained_weights: '{text}' weights do not exist for model '{model_name}' ({choices}; "
                f"'imagenet' fits {sorted(m for s, m in NAMED_WEIGHTS if s == 'imagenet')}, "
                f"'coco' fits {sorted(m for s, m in NAMED_WEIGHTS if s == 'coco')}). "
                f"Use false to train from scratch, or a run directory / .pt file."
            ])
        return NAMED_WEIGHTS[key][0]

    path = Path(text).expanduser()
    # Checked before existence: a Keras file is the wrong kind whether or not it is there.
    if path.suffix.lower() in KERAS_SUFFIXES:
        raise WeightsError([
            f"pretrained_weights: '{text}' is a Keras file (original InstantDL). Keras weights cannot "
            f"be carried over to these PyTorch models (other layer layout and names). Set "
            f"pretrained_weights: false to train from scratch, or give a PyTorch file "
            f"({', '.join(STATE_DICT_SUFFIXES)}) or a run directory of instantdl_ray."
        ])
    if not path.exists():
        raise WeightsError([
            f"pretrained_weights: '{text}' does not exist; give a run directory, a checkpoint folder "
            f"holding {CHECKPOINT_FILE}, a {'/'.join(STATE_DICT_SUFFIXES)} file, 'imagenet' or 'coco'."
        ])
    if path.is_dir():
        for candidate in (path / RUN_CHECKPOINT, path / CHECKPOINT_FILE):
            if candidate.is_file():
                return candidate
        raise WeightsError([
            f"pretrained_weights: folder '{text}' holds no checkpoint; looked for "
            f"'{path / RUN_CHECKPOINT}' (run directory) and '{path / CHECKPOINT_FILE}' (checkpoint folder)."
        ])
    if path.suffix.lower() not in STATE_DICT_SUFFIXES:
        raise WeightsError([
            f"pretrained_weights: '{text}' has suffix '{path.suffix}'; expected a PyTorch state dict "
            f"({', '.join(STATE_DICT_SUFFIXES)}), a run directory, 'imagenet' or 'coco'."
        ])
    return path


def hub_checkpoint_path(weights_name: str) -> tuple[Path, str]:
    """Where torch keeps the file for torchvision weights ``weights_name``, and its URL.

    Returns:
        ``(torch.hub.get_dir()/checkpoints/<file name of the URL>, url)``; the file may not exist.
    """
    from torchvision.models import get_weight

    url = get_weight(weights_name).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path), url


def _named_state_dict(weights_name: str, log: Callable[[str], Any]) -> tuple[dict, str]:
    """State dict of torchvision weights: the hub cache first, then a download attempt."""
    from torchvision.models import get_weight

    path, url = hub_checkpoint_path(weights_name)
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True), f"{weights_name} ({path})"
    try:
        state = get_weight(weights_name).get_state_dict(progress=False)
    except Exception as e:  # offline clusters end here: say exactly how to fix it
        raise WeightsError([
            f"pretrained weights {weights_name}: '{path.name}' is not in the torch cache "
            f"'{path.parent}' and could not be downloaded ({type(e).__name__}: {e}). On a machine "
            f"with internet download {url} and copy it to '{path}' (the folder follows "
            f"$TORCH_HOME/hub/checkpoints; set TORCH_HOME to use another cache), or set "
            f"pretrained_weights: false to train from scratch."
        ]) from e
    log(f"downloaded {url} to the torch cache")
    return state, f"{weights_name} ({url})"


def _unsupported_global(e: Exception) -> str:
    """`` It pickled numpy._core.multiarray.scalar.`` from torch's long weights-only message, or ''."""
    import re

    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    return f" It pickled {m.group(1)}." if m else ""


def _load_file(path: Path, log: Callable[[str], Any], trust: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # extra Python objects (a config, a class instance) need the full unpickler, which runs
        # code from the file: only for a file the user said they trust
        if not trust:
            raise WeightsError([
                f"pretrained_weights: '{path}' holds Python objects besides tensors; loading it needs the "
                f"full unpickler, which runs code from the file. If you trust where it comes from, set "
                f"{TRUST_KEY}: true; else re-save only its state dict "
                f"(torch.save(model.state_dict(), 'weights.pt')).{_unsupported_global(e)}"
            ]) from e
        msg = f"{path}: not a plain tensor file; {TRUST_KEY}: true, so loading it with full unpickling (runs its code)"
        logger.warning(msg)
        log(f"WARNING: {msg}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise WeightsError([
                f"pretrained_weights: cannot read '{path}' as a PyTorch file ({type(e2).__name__}: {e2})."
            ]) from e2
    except Exception as e:
        raise WeightsError([
            f"pretrained_weights: cannot read '{path}' as a PyTorch file ({type(e).__name__}: {e})."
        ]) from e


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The ``name -> tensor`` mapping inside a loaded checkpoint, wrapper prefixes stripped."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for _ in range(2):  # {"model": {"state_dict": ...}} occurs in the wild
        if isinstance(obj, Mapping):
            for key in ("model", "state_dict"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
    if not isinstance(obj, Mapping) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError([
            f"pretrained_weights: '{path}' holds no state dict (found {keys}); expected a dict of "
            f"tensors, or one under the key 'model' or 'state_dict'."
        ])
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        state[name] = value
    return state


def _adapt_input_conv(src: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """RGB stem conv ``(O, 3, k, k)`` -> ``(O, C, k, k)`` for a C-channel model, else None.

    For C == 1 the RGB kernels are summed (a grey image repeated to RGB gives the same output);
    otherwise they are cycled and scaled by 3/C to keep the activation scale (timm's approach).
    """
    if src.ndim != 4 or src.shape[1] != 3 or src.shape[0] != shape[0] or src.shape[2:] != shape[2:]:
        return None
    c = shape[1]
    if c == 1:
        return src.sum(dim=1, keepdim=True)
    reps = -(-c // 3)
    return src.repeat(1, reps, 1, 1)[:, :c] * (3.0 / c)


def check_file(spec: str | Path, model_name: str, trust: bool = False) -> list[str]:
    """Problems of a ``pretrained_weights`` file or folder that show without a model: not there,
    not a PyTorch file, no state dict in it (validation calls this before anything starts)."""
    try:
        resolved = resolve_weights(spec, model_name)
        if isinstance(resolved, Path):
            _extract_state_dict(_load_file(resolved, lambda m: None, trust), resolved)
    except WeightsError as e:
        return e.problems
    return []


def load_pretrained(
    model: nn.Module, spec: str | Path, *, model_name: str, log: Callable[[str], Any] = print, trust: bool = False
) -> dict:
    """Copy matching tensors from ``spec`` into ``model`` in place.

    A tensor is loaded when its name (after the named-weights prefix, e.g. ``backbone.body.``
    for an ImageNet backbone in Mask R-CNN) exists in the model with the same shape. For
    ``imagenet``/``coco`` an RGB stem conv is adapted to the model's input channels.

    Args:
        model: a model from ``build_model``.
        spec: see :func:`resolve_weights`.
        model_name: the registered name of ``model``.
        log: receives one summary line plus one line per skipped tensor.
        trust: the config's ``trust_pretrained_weights``: allow files that need the full
            unpickler (it runs code from the file); off, such a file raises ``WeightsError``.

    Returns:
        ``{"source": str, "loaded": [names], "skipped": [(name, reason)], "missing": [names],
        "adapted": [names]}``; reasons read ``"shape (8, 2048) != (2, 2048)"`` (file != model)
        or ``"not in model"``; ``missing`` lists model tensors the file did not provide.

    Raises:
        WeightsError: everything :func:`resolve_weights` raises, unreadable files, files with
            pickled Python objects unless ``trust``, and a file of which not a single tensor fits
            the model (surely the wrong file).
    """
    resolved = resolve_weights(spec, model_name)
    adapt = False
    if isinstance(resolved, Path):
        state = _extract_state_dict(_load_file(resolved, log, trust), resolved)
        source, prefix = str(resolved), ""
    else:
        state, source = _named_state_dict(resolved, log)
        prefix = NAMED_WEIGHTS[(str(spec).lower(), _canonical_model(model_name))][1]
        adapt = True

    target = model.state_dict()
    merged = dict(target)
    loaded, skipped, adapted = [], [], []
    for name, tensor in state.items():
        key = prefix + name
        if key not in target:
            skipped.append((key, "not in model"))
            continue
        want = target[key].shape
        if tensor.shape != want:
            fitted = _adapt_input_conv(tensor, want) if adapt else None
            if fitted is None:
                skipped.append((key, f"shape {tuple(tensor.shape)} != {tuple(want)}"))
                continue
            tensor = fitted
            adapted.append(key)
        merged[key] = tensor.to(dtype=target[key].dtype)
        loaded.append(key)
    if not loaded:
        raise WeightsError([
            f"pretrained_weights: no tensor of '{source}' fits model '{model_name}' "
            f"({len(state)} tensors in the file, e.g. {list(state)[:3]}; the model expects e.g. "
            f"{list(target)[:3]}). It is probably the checkpoint of another model."
        ])
    model.load_state_dict(merged, strict=True)
    done = set(loaded)
    missing = [k for k in target if k not in done]
    log(
        f"pretrained weights from {source}: loaded {len(loaded)}/{len(target)} tensors of "
        f"'{model_name}'" + (f" ({len(adapted)} adapted to the input channels)" if adapted else "")
        + f"; skipped {len(skipped)} from the file; {len(missing)} model tensors keep their random init"
    )
    for name, reason in skipped:
        log(f"  skipped {name}: {reason}")
    return {"source": source, "loaded": loaded, "skipped": skipped, "missing": missing, "adapted": adapted}


__all__ = ["check_file", "hub_checkpoint_path", "load_pretrained", "resolve_weights"]
