"""Quality and time of a trained run on a whole slide vs on the same images as plain files (issue 14).

    python benchmarks/slide_quality.py --run RUN_DIR [--data DIR] [--side 4096] [--tiles 24]
                                       [--mpp 0.5] [--out DIR] [--json PATH]

``RUN_DIR`` is a semantic run (``python -m instantdl_ray run configs/dsb2018_semantic.yaml``).

1. A synthetic slide: ``--tiles`` test images of ``<data>/test`` (256² fluorescence nuclei for the
   DSB set) pasted at random, non-touching places of a ``side``² background of camera noise (the
   mean and spread of the darkest pixels of those images), written as a tiled pyramidal OME-TIFF
   (levels 1, 1/2, 1/4, 1/8) with its pixel size, as a scanner writes one. The pasted images
   cover about ``tiles * 256² / side²`` of the slide (~9 % at the defaults).
2. ``python -m instantdl_ray predict RUN --input slide.ome.tif`` (in-process, ``predict_new``)
   with the defaults (``tissue_mask: auto``) and again with ``tissue_mask=none``, and the same
   images as plain PNGs (``--input`` their folder). One deterministic pass (no uncertainty), the
   run's own decision rule, for all three.
3. Pooled pixel Jaccard over the pasted images on the slide vs over the plain predictions (the
   bound: within 0.03), the share of the glass called foreground, the tiles predicted and the
   seconds of each slide prediction (the ratio is what tissue detection saves).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, machine, uptime  # noqa: E402


def build_slide(data: Path, out: Path, side: int, n: int, mpp: float, seed: int = 0, name: str = "slide",
                plain_copies: bool = True):
    """The slide, its label canvas, the pasted boxes and the folder of the same images as PNGs."""
    from PIL import Image

    from instantdl_ray.io import write

    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in (data / "test" / "image").iterdir())
    picks = [names[int(k)] for k in rng.choice(len(names), size=n, replace=n > len(names))]
    images = [np.asarray(Image.open(data / "test" / "image" / k).convert("L")) for k in picks]
    masks = [np.asarray(Image.open(data / "test" / "groundtruth" / k)) > 0 for k in picks]
    dark = np.concatenate([im[im <= np.percentile(im, 20)] for im in images]).astype(np.float64)
    slide = np.clip(rng.normal(dark.mean(), max(dark.std(), 0.5), (side, side)), 0, 255).astype(np.uint8)
    label = np.zeros((side, side), bool)
    cell = 320  # pasted images sit in cells of 320 px: never touching, at least 64 px of glass apart
    free = [(y, x) for y in range(0, side - cell + 1, cell) for x in range(0, side - cell + 1, cell)]
    boxes = []
    plain = out / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    for k, (im, m) in enumerate(zip(images, masks)):
        y, x = free.pop(int(rng.integers(len(free))))
        y, x = y + int(rng.integers(0, cell - im.shape[0] + 1)), x + int(rng.integers(0, cell - im.shape[1] + 1))
        slide[y:y + im.shape[0], x:x + im.shape[1]] = im
        label[y:y + im.shape[0], x:x + im.shape[1]] = m
        boxes.append((y, x, im.shape[0], im.shape[1], picks[k]))
        if plain_copies:
            Image.fromarray(im).save(plain / picks[k])
    path = write.write_ome_pyramid(out / f"{name}.ome.tif", slide, mpp=mpp, downsamples=(2, 4, 8, 16))
    return path, label, boxes, plain


def jaccard(pred: np.ndarray, gt: np.ndarray) -> float:
    inter, union = int(np.sum(pred & gt)), int(np.sum(pred | gt))
    return inter / union if union else float("nan")


def predict(run: Path, inputs: Path, out: Path, *sets: str) -> tuple[Path, float, str]:
    from instantdl_ray import pipeline

    t0 = time.time()
    pipeline.predict_new(run, inputs, out=out, overrides=["calculate_uncertainty=false", *sets])
    log = (out / "predict.log").read_text()
    return out, time.time() - t0, log


def tiles_predicted(log: str) -> int:
    for line in log.splitlines():
        if "predicting" in line and "tiles)" in line:
            return int(line.split("(")[1].split(" tiles")[0])
    return -1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "dsb2018_fluo256" / "semantic")
    ap.add_argument("--side", type=int, default=4096)
    ap.add_argument("--tiles", type=int, default=24)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    import tifffile

    out = args.out or Path(tempfile.mkdtemp(prefix="idl_slide_quality_"))
    shutil.rmtree(out / "pred", ignore_errors=True)
    print(f"machine: {machine()}; {uptime()}")
    slide, label, boxes, plain = build_slide(args.data, out, args.side, args.tiles, args.mpp)
    print(f"slide {args.side}² with {len(boxes)} pasted images ({100 * len(boxes) * 256**2 / args.side**2:.1f} % of it)")
    import ray

    try:
        d_plain, s_plain, _ = predict(args.run, plain, out / "pred" / "plain")  # first: it pays Ray's start
        d_auto, s_auto, log_auto = predict(args.run, slide, out / "pred" / "auto")
        d_none, s_none, log_none = predict(args.run, slide, out / "pred" / "none", "tissue_mask=none")
    finally:
        ray.shutdown()
    res = {"machine": machine(), "load": uptime(), "side": args.side, "images": len(boxes)}
    inside = np.zeros_like(label)
    for y, x, h, w, _ in boxes:
        inside[y:y + h, x:x + w] = True
    for key, d in (("auto", d_auto), ("none", d_none)):
        pred = tifffile.imread(d / "predictions" / "slide.tif") > 0
        res[f"jaccard_slide_{key}"] = jaccard(pred[inside], label[inside])
        res[f"glass_called_foreground_{key}"] = float(pred[~inside].mean())
    p_all, g_all = [], []
    for y, x, h, w, name in boxes:
        p_all.append(tifffile.imread(d_plain / "predictions" / (Path(name).stem + ".tif")).reshape(h, w) > 0)
        g_all.append(label[y:y + h, x:x + w])
    res["jaccard_plain"] = jaccard(np.concatenate([p.ravel() for p in p_all]), np.concatenate([g.ravel() for g in g_all]))
    res["gap_auto"] = res["jaccard_plain"] - res["jaccard_slide_auto"]
    res["tiles_auto"], res["tiles_none"] = tiles_predicted(log_auto), tiles_predicted(log_none)
    res["seconds_auto"], res["seconds_none"], res["seconds_plain"] = round(s_auto, 1), round(s_none, 1), round(s_plain, 1)
    res["time_ratio_none_over_auto"] = s_none / s_auto
    for k, v in res.items():
        print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
