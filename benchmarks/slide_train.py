"""Training on annotated slides vs training on the same images as plain files (issue 14, item 5).

The training images of an InstantDL data set (default: the bundled ``examples/dsb2018_small``)
are pasted into a few whole slides (OME-TIFF pyramids, 0.5 µm/px, on camera-noise 'glass'), and
their masks become QuPath GeoJSON: a ``Region*`` rectangle per pasted image and one ``Nucleus``
polygon per object. Two runs with the **default** settings then train, one on the plain images,
one on the annotated slides, and both predict and evaluate the same plain test images. Printed:
each run's test Jaccard (pooled), its wall time, training tiles per epoch, and the differences.

    python benchmarks/slide_train.py [--data DIR] [--per-slide 10] [--out DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EXAMPLE_DATA, machine, uptime  # noqa: E402

CELL = 320  # px per pasted image's cell: 256² images at least 64 px of glass apart


def build_slides(data: Path, out: Path, per_slide: int, mpp: float = 0.5, seed: int = 0) -> Path:
    """``out/train/{image,groundtruth}`` with the training images of ``data`` pasted into slides
    of ``per_slide`` images each and their GeoJSON; ``out/test`` links to ``data/test``."""
    from PIL import Image
    from scipy import ndimage as ndi
    from shapely.geometry import box, mapping

    from instantdl_ray.io import write
    from instantdl_ray.predict.shapes import label_features, write_geojson

    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in (data / "train" / "image").iterdir())
    for sub in ("image", "groundtruth"):
        (out / "train" / sub).mkdir(parents=True, exist_ok=True)
    if not (out / "test").exists():
        (out / "test").symlink_to((data / "test").resolve())
    for k in range(0, len(names), per_slide):
        group = names[k:k + per_slide]
        images = [np.asarray(Image.open(data / "train" / "image" / n).convert("L")) for n in group]
        side = CELL * math.ceil(math.sqrt(len(group)))
        dark = np.concatenate([im[im <= np.percentile(im, 20)] for im in images]).astype(np.float64)
        slide = np.clip(rng.normal(dark.mean(), max(dark.std(), 0.5), (side, side)), 0, 255).astype(np.uint8)
        feats = []
        for j, (n, im) in enumerate(zip(group, images)):
            y, x = CELL * (j // (side // CELL)), CELL * (j % (side // CELL))
            h, w = min(im.shape[0], CELL), min(im.shape[1], CELL)
            slide[y:y + h, x:x + w] = im[:h, :w]
            mask = np.asarray(Image.open(data / "train" / "groundtruth" / n))[:h, :w] > 0
            feats.append({"type": "Feature", "geometry": mapping(box(x, y, x + w, y + h)),
                          "properties": {"objectType": "annotation", "classification": {"name": "Region*", "color": [0, 0, 180]}}})
            feats += list(label_features(ndi.label(mask)[0], "Nucleus", y, x))
        stem = f"slide{k // per_slide:02d}"
        write.write_ome_pyramid(out / "train" / "image" / f"{stem}.ome.tif", slide, mpp=mpp, downsamples=(2, 4))
        write_geojson(out / "train" / "groundtruth" / f"{stem}.geojson", feats)
    return out


def run(data: Path, out: Path) -> dict:
    """``python -m instantdl_ray run`` with the defaults (and the README example's epochs) on ``data``."""
    cfg = out.with_suffix(".yaml")
    cfg.write_text(f"use_algorithm: SemanticSegmentation\npath: {data}\niterations_over_dataset: 40\n")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "instantdl_ray", "run", str(cfg), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.time() - t0
    summary = json.loads((out / "evaluation" / "results.json").read_text())["summary"]
    log = (out / "logs" / "train.log").read_text() if (out / "logs" / "train.log").exists() else ""
    hist = json.loads((out / "logs" / "history.json").read_text())
    return {"jaccard": summary["jaccard"], "dice": summary.get("dice"), "seconds": round(seconds, 1),
            "epochs": len(hist), "tiles_per_epoch": _tiles(out), "log_lines": len(log.splitlines())}


def _tiles(run_dir: Path) -> int:
    for line in (run_dir / "logs" / "run.log").read_text().splitlines():
        if "tiles/epoch" in line:
            return int(line.split("(")[1].split(" tiles/epoch")[0])
    return -1


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=EXAMPLE_DATA)
    ap.add_argument("--per-slide", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="idl_slide_train_"))
    for d in ("plain_run", "slide_run"):
        shutil.rmtree(out / d, ignore_errors=True)
    print(f"machine: {machine()}; {uptime()}")
    slides = build_slides(args.data, out / "slides", args.per_slide)
    n = len(list((slides / "train" / "image").iterdir()))
    print(f"{n} annotated slides of up to {args.per_slide} images from {args.data / 'train'}")
    res = {"machine": machine(), "load_before": uptime(), "data": str(args.data), "slides": n}
    res["plain"] = run(args.data.resolve(), out / "plain_run")
    print("plain:", res["plain"])
    res["slides_run"] = run(slides.resolve(), out / "slide_run")
    print("slides:", res["slides_run"])
    res["jaccard_gap"] = res["plain"]["jaccard"] - res["slides_run"]["jaccard"]
    res["time_ratio_slides_over_plain"] = res["slides_run"]["seconds"] / res["plain"]["seconds"]
    res["load_after"] = uptime()
    for k in ("jaccard_gap", "time_ratio_slides_over_plain", "load_after"):
        print(f"{k}: {res[k]:.4f}" if isinstance(res[k], float) else f"{k}: {res[k]}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
