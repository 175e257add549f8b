"""Seams of tiled prediction (issue 12, "Measure"): does a trained run predict worse where one tile
hands over to the next?

    python benchmarks/seams.py --semantic-run RUN_DIR --instance-run RUN_DIR [--data DIR] [--grid 3]
                               [--mosaics N] [--quick] [--json PATH]

``RUN_DIR`` is what ``python -m instantdl_ray run CONFIG --out RUN_DIR`` wrote (``plan.json``,
``config.yaml``, ``checkpoints/best/model.pt``). Everything runs in this process, without Ray, with
the package's own prediction pieces as ``predict.predict`` chains them: ``dataset.grid_rows`` ->
``dataset.ReadTiles`` -> ``predict.Predictor`` -> ``stitch.ImageAccumulator`` (Gaussian blending)
-> ``task.finalize`` (``predict.write_image``'s in-memory path). One deterministic pass per tile
(``passes=1``, no Monte-Carlo dropout), to keep it fast; the decision rule is the run's own
(``plan.extra["decision"]``, semantic; watershed, instance).

1. Mosaics: ``grid`` x ``grid`` consecutive test images (``<data>/{semantic,instance}/test``, 256²
   each, so 768² for 3) pasted into one TIFF, with their groundtruth (semantic masks binarised
   ``> 0``; instance labels offset so ids stay unique), in a temporary folder. Each mosaic gets
   its own normalisation (``plan.image_percentiles``), as a new test image of the run would.
2. Prediction with the run's tile (``plan.tile_shape``) and overlap (``config.yaml``
   ``tile_overlap`` through ``tile.grid_overlap``, which for instance runs is at least what the
   training objects need).
3. Seams: the borders between the tile cores of that grid (``Tile.core``), per axis: the lines
   where ownership passes from one tile to the next. Mosaic borders (between pasted images) are
   not seams; what touches them is left out of both groups.

   * instance: groundtruth objects crossed by a seam (pixels on both sides of a seam line) vs all
     other objects (objects touching a mosaic border excluded from both): recall at IoU >= 0.5
     per group, the gap (other - seam), and the share of seam objects split into >= 2 predicted
     objects that each cover >= 10 % of the object. Bounds (issue): gap <= 0.03, split < 5 %.
   * semantic: pooled pixel Jaccard within ``BAND`` (16) px of a seam line vs elsewhere (the band
     of 16 px around mosaic borders excluded from both), and the gap (elsewhere - seam).
     Where the seam band lies (a fixed distance from the pasted images' borders) is a confound, so
     two references follow: each mosaic as one whole tile (no seams; but a larger InstanceNorm
     field), and the clean one, the paired figure the bound is read on: the same mosaic predicted
     on a grid of the same tiles shifted by half a tile step, every pixel near a seam of one grid
     (and not of the other) scored with and without its seam (``measure_semantic_shifted``).
   * consistency (the semantic run; the instance run's probabilities when only that is given): a
     2x2 mosaic (512²) predicted tiled (run's tile and overlap, Gaussian blending) vs as one
     whole 512² tile (a copy of the plan with ``tile_shape=[512, 512]``; the U-Net is fully
     convolutional): max and mean |difference| of the stitched probabilities, and the share of
     pixels whose thresholded mask differs (semantic: ``finalize``'s mask; instance: the
     foreground, background probability < 0.5, what the watershed is masked with); both also
     within ``BAND`` px of a seam vs elsewhere. MONAI's BasicUNet normalises with InstanceNorm
     (statistics of the whole input tile), so a tile's output is not a function of a local
     window alone and tiled and whole predictions differ everywhere, not only at seams; the
     script names the model's normalisation layers next to the numbers.

Prints a table per part and a final ``RESULT {json}`` line; the JSON is also written to
``benchmarks/results/seams_<date>.json`` (``--json`` to change). ``--quick``: one mosaic per run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see predict.Predictor)

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, SHARED_DATA, machine, uptime  # noqa: E402

BAND = 16  # px either side of a seam / mosaic border line (semantic)
IOU_MATCH = 0.5  # an object is found when some prediction has IoU >= this with it
SPLIT_COVER = 0.10  # a prediction counts as a piece of an object when it covers >= this share of it
GAP_BOUND = 0.03  # issue 12: recall(other) - recall(seam) <= 0.03
SPLIT_BOUND = 0.05  # issue 12: share of seam objects split < 5 %


# ---------------------------------------------------------------- pure geometry and scoring


def seam_lines(tiles, shape) -> list[list[int]]:
    """Per spatial axis, the sorted positions ``b`` where one tile's core ends and the next one's
    starts (a line between pixel ``b - 1`` and pixel ``b``); image borders (0, n) are not seams."""
    lines = []
    for d, n in enumerate(shape):
        cuts = {t.core[d].start for t in tiles} | {t.core[d].stop for t in tiles}
        lines.append(sorted(b for b in cuts if 0 < b < n))
    return lines


def mosaic_lines(shape, cell) -> list[list[int]]:
    """Per axis, the borders between pasted images of ``cell`` pixels (not the outer border)."""
    return [list(range(c, n, c)) for n, c in zip(shape, cell)]


def band_mask(shape, lines, width: int) -> np.ndarray:
    """Pixels within ``width`` px of a line (along its axis): ``[b - width, b + width)`` for each
    line ``b`` of axis ``d``, any axis."""
    out = np.zeros(tuple(shape), bool)
    for d, bs in enumerate(lines):
        for b in bs:
            idx = [slice(None)] * len(shape)
            idx[d] = slice(max(b - width, 0), min(b + width, shape[d]))
            out[tuple(idx)] = True
    return out


def object_groups(gt: np.ndarray, seams, borders) -> dict[int, str]:
    """Groundtruth object id -> ``"seam"`` (pixels on both sides of some seam line, i.e. its
    extent along that axis runs from ``< b`` to ``>= b``), ``"excluded"`` (a pixel next to a mosaic
    border line: on row/column ``b - 1`` or ``b``; wins over seam) or ``"other"``."""
    from scipy import ndimage as ndi

    out = {}
    for i, sl in enumerate(ndi.find_objects(gt.astype(np.int64)), start=1):
        if sl is None:
            continue
        lo = [s.start for s in sl]
        hi = [s.stop - 1 for s in sl]  # inclusive
        if any(lo[d] <= b and hi[d] >= b - 1 for d, bs in enumerate(borders) for b in bs):
            out[i] = "excluded"
        elif any(lo[d] < b <= hi[d] for d, bs in enumerate(seams) for b in bs):
            out[i] = "seam"
        else:
            out[i] = "other"
    return out


def match_objects(gt: np.ndarray, pred: np.ndarray) -> dict[int, dict]:
    """Per groundtruth object: ``best_iou`` with any predicted object and ``pieces``, the number of
    predicted objects that each cover >= ``SPLIT_COVER`` of its pixels."""
    g = gt.astype(np.int64).ravel()
    p = pred.astype(np.int64).ravel()
    g_area = np.bincount(g)
    p_area = np.bincount(p)
    both = (g > 0) & (p > 0)
    k = int(p.max()) + 1 if p.size else 1
    pairs, inter = np.unique(g[both] * k + p[both], return_counts=True)
    gi, pi = pairs // k, pairs % k
    iou = inter / (g_area[gi] + p_area[pi] - inter)
    out = {int(i): {"best_iou": 0.0, "pieces": 0} for i in np.nonzero(g_area)[0] if i > 0}
    for a, b_iou, n, area in zip(gi.tolist(), iou.tolist(), inter.tolist(), g_area[gi].tolist()):
        r = out[a]
        r["best_iou"] = max(r["best_iou"], b_iou)
        r["pieces"] += int(n >= SPLIT_COVER * area)
    return out


def instance_counts(gt: np.ndarray, pred: np.ndarray, seams, borders) -> dict:
    """Counts of one image: objects, found (IoU >= ``IOU_MATCH``) and split (>= 2 pieces) per group."""
    groups = object_groups(gt, seams, borders)
    match = match_objects(gt, pred)
    area = np.bincount(gt.astype(np.int64).ravel())
    c = {f"{k}_{g}": 0 for g in ("seam", "other", "excluded") for k in ("n", "found", "split", "area")}
    for i, g in groups.items():
        m = match.get(i, {"best_iou": 0.0, "pieces": 0})
        c[f"n_{g}"] += 1
        c[f"area_{g}"] += int(area[i])
        c[f"found_{g}"] += int(m["best_iou"] >= IOU_MATCH)
        c[f"split_{g}"] += int(m["pieces"] >= 2)
    return c


def instance_summary(c: dict) -> dict:
    def ratio(a, b):
        return a / b if b else float("nan")

    rs, ro = ratio(c["found_seam"], c["n_seam"]), ratio(c["found_other"], c["n_other"])
    split = ratio(c["split_seam"], c["n_seam"])
    return {**c, "recall_seam": rs, "recall_other": ro, "gap": ro - rs, "split_share_seam": split,
            "mean_area_seam": ratio(c["area_seam"], c["n_seam"]),
            "mean_area_other": ratio(c["area_other"], c["n_other"]),
            "split_share_other": ratio(c["split_other"], c["n_other"]),
            "gap_ok": bool(ro - rs <= GAP_BOUND), "split_ok": bool(split < SPLIT_BOUND)}


def semantic_counts(gt: np.ndarray, pred: np.ndarray, seams, borders, width: int = BAND) -> dict:
    """Intersection / union / pixel counts near seams and elsewhere (mosaic-border bands out)."""
    g, p = gt > 0, pred > 0
    near_border = band_mask(gt.shape, borders, width)
    near_seam = band_mask(gt.shape, seams, width) & ~near_border
    other = ~band_mask(gt.shape, seams, width) & ~near_border
    out = {}
    for name, m in (("seam", near_seam), ("other", other)):
        out[f"inter_{name}"] = int(np.sum(g & p & m))
        out[f"union_{name}"] = int(np.sum((g | p) & m))
        out[f"pixels_{name}"] = int(np.sum(m))
    return out


def semantic_summary(c: dict) -> dict:
    js = c["inter_seam"] / c["union_seam"] if c["union_seam"] else float("nan")
    jo = c["inter_other"] / c["union_other"] if c["union_other"] else float("nan")
    return {**c, "jaccard_seam": js, "jaccard_other": jo, "gap": jo - js}


def paired_semantic_counts(gt: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, lines_a, lines_b, borders,
                           width: int = BAND) -> dict:
    """The seam cost on the SAME pixels: ``pred_a`` and ``pred_b`` are one image predicted on two
    tile grids whose seam lines (``lines_a``, ``lines_b``) lie apart. Pixels within ``width`` of an
    A seam and not of a B seam are scored with seam (``pred_a``) and without (``pred_b``); likewise
    the B seam band, the other way round (mosaic-border bands out). Pooled counts:
    ``{inter,union}_{seam,noseam}`` and the pixel count."""
    g = gt > 0
    a, b = pred_a > 0, pred_b > 0
    out_border = ~band_mask(gt.shape, borders, width)
    band_a, band_b = band_mask(gt.shape, lines_a, width), band_mask(gt.shape, lines_b, width)
    only_a, only_b = band_a & ~band_b & out_border, band_b & ~band_a & out_border
    c = {"inter_seam": 0, "union_seam": 0, "inter_noseam": 0, "union_noseam": 0, "pixels_paired": 0}
    for m, with_seam, without in ((only_a, a, b), (only_b, b, a)):
        c["inter_seam"] += int(np.sum(g & with_seam & m))
        c["union_seam"] += int(np.sum((g | with_seam) & m))
        c["inter_noseam"] += int(np.sum(g & without & m))
        c["union_noseam"] += int(np.sum((g | without) & m))
        c["pixels_paired"] += int(np.sum(m))
    return c


def paired_summary(c: dict) -> dict:
    js = c["inter_seam"] / c["union_seam"] if c["union_seam"] else float("nan")
    jn = c["inter_noseam"] / c["union_noseam"] if c["union_noseam"] else float("nan")
    return {**c, "jaccard_seam": js, "jaccard_noseam": jn, "gap": jn - js, "gap_ok": bool(jn - js <= GAP_BOUND)}


def shifted_lines(shape, tile, overlap, shift) -> list[list[int]]:
    """Seam lines, in the original image's coordinates, of the tile grid of the image padded by
    ``shift`` px before each spatial axis (lines that fall in the padding dropped)."""
    from instantdl_ray.data.tile import tile_grid

    padded = [n + s for n, s in zip(shape, shift)]
    lines = seam_lines(tile_grid(padded, tile, overlap), padded)
    return [[b - s for b in bs if b - s > 0] for bs, s in zip(lines, shift)]


def pick_shift(shape, tile, overlap, lines, width: int = BAND) -> list[int]:
    """The smallest shift (same on every axis, from half the tile step upwards) whose grid's seam
    lines lie at least ``2 * width`` px from every line of ``lines`` on the same axis, so the two
    seam bands do not touch."""
    step = min(t - o for t, o in zip(tile, overlap))
    for s in [step // 2] + list(range(width, step, 8)):
        other = shifted_lines(shape, tile, overlap, [s] * len(shape))
        if all(abs(p - q) >= 2 * width for ls, os_ in zip(lines, other) for p in ls for q in os_):
            return [s] * len(shape)
    raise SystemExit(f"no shift of the {list(tile)} grid keeps its seams {2 * width} px from {lines}")


def add_counts(total: dict, c: dict) -> dict:
    for k, v in c.items():
        total[k] = total.get(k, 0) + v
    return total


# ---------------------------------------------------------------- mosaics


def build_mosaics(samples, grid: int, n: int, folder: Path, kind: str, axes: str, first: int = 0) -> list[dict]:
    """``n`` mosaics of ``grid`` x ``grid`` consecutive samples (from ``first``) as TIFFs in
    ``folder``: ``{"image", "groundtruth", "cell", "names"}`` each. The images keep their stored
    layout (axes ``axes``); groundtruth: semantic ``> 0`` as uint8, instance labels offset per
    pasted image (uint32)."""
    from instantdl_ray.io import read, write

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for m in range(n):
        group = samples[first + m * grid * grid: first + (m + 1) * grid * grid]
        if len(group) < grid * grid:
            break
        imgs = [read.read_raw(s.image) for s in group]
        ax = read.image_axes(imgs[0].shape, axes)
        yd, xd = ax.index("Y"), ax.index("X")
        gts, offset = [], 0
        for s in group:
            g = read.read_raw(s.groundtruth)
            if g.ndim == 3:
                g = g[..., 0] if g.shape[-1] <= 4 else g[0]
            if kind == "instance":
                g = g.astype(np.uint32)
                g[g > 0] += offset
                offset = max(offset, int(g.max()))
            else:
                g = (g > 0).astype(np.uint8)
            gts.append(g)
        shapes = {i.shape for i in imgs}
        if len(shapes) != 1 or {g.shape for g in gts} != {(imgs[0].shape[yd], imgs[0].shape[xd])}:
            raise SystemExit(f"mosaic {m}: test images and groundtruth need one common shape, got {shapes}")
        rows = [np.concatenate(imgs[r * grid:(r + 1) * grid], axis=xd) for r in range(grid)]
        image = np.concatenate(rows, axis=yd)
        gt = np.concatenate([np.concatenate(gts[r * grid:(r + 1) * grid], axis=1) for r in range(grid)], axis=0)
        ip = write.write_tiff(folder / f"{kind}_mosaic{m}.tif", image)
        gp = write.write_tiff(folder / f"{kind}_mosaic{m}_gt.tif", gt)
        out.append({"image": Path(ip), "groundtruth": Path(gp), "cell": (imgs[0].shape[yd], imgs[0].shape[xd]),
                    "names": [s.stem for s in group]})
    return out


# ---------------------------------------------------------------- prediction as predict.predict does it


class Run:
    """A trained run: plan, task, overlap fraction, batch size and one ``Predictor`` (passes=1)."""

    def __init__(self, run_dir: Path):
        import torch

        from instantdl_ray.config import schema as config_mod
        from instantdl_ray.config.plan import Plan
        from instantdl_ray.predict.pool import Predictor, load_state_dict
        from instantdl_ray.tasks import get_task

        self.dir = Path(run_dir)
        for f in ("plan.json", "config.yaml", "checkpoints/best/model.pt"):
            if not (self.dir / f).exists():
                raise SystemExit(f"{self.dir}: no {f}; give a run directory of 'python -m instantdl_ray run'")
        self.plan = Plan.from_json(self.dir / "plan.json")
        if self.plan.spatial_dims != 2:
            raise SystemExit(f"{self.dir}: a {self.plan.spatial_dims}D run; this benchmark pastes 2D mosaics")
        self.task = get_task(self.plan.task)
        try:
            cfg = config_mod.load(self.dir / "config.yaml")
            self.tile_overlap, self.batchsize = float(cfg.tile_overlap), int(cfg.batchsize)
        except Exception as e:  # a config another version wrote: the two keys are enough
            import yaml

            raw = yaml.safe_load((self.dir / "config.yaml").read_text()) or {}
            self.tile_overlap, self.batchsize = float(raw.get("tile_overlap", 0.25)), int(raw.get("batchsize", 4))
            print(f"  ({self.dir}/config.yaml not loadable as a Config ({type(e).__name__}); "
                  f"tile_overlap {self.tile_overlap}, batchsize {self.batchsize} read directly)")
        use_gpu = torch.cuda.is_available()
        self.predictor = Predictor(self.plan.to_dict(), load_state_dict(self.dir / "checkpoints/best/model.pt"),
                                   passes=1, torch_threads=os.cpu_count() or 1, use_gpu=use_gpu)

    def add_image(self, path: Path, plan=None) -> None:
        from instantdl_ray.config.plan import image_percentiles

        plan = plan or self.plan
        plan.image_norm[str(path)] = image_percentiles(path, plan.axes, plan.extra.get("augment"))

    def predict(self, path: Path, plan=None) -> tuple[dict, dict, list]:
        """One image -> (stitched outputs, finalised outputs, tile grid), the in-memory path of
        ``predict.predict`` + ``predict.write_image``."""
        from instantdl_ray.io import read
        from instantdl_ray.data.dataset import ReadTiles, grid_rows, spatial_shape
        from instantdl_ray.predict.stitch import ImageAccumulator
        from instantdl_ray.data.tile import grid_overlap, tile_grid

        plan = plan or self.plan
        shape = tuple(int(s) for s in read.open_array(path).shape)
        sample = read.Sample(Path(path).stem, Path(path), None)
        rows = grid_rows([sample], {str(path): shape}, plan, self.tile_overlap)
        sp = tuple(spatial_shape(shape, plan.axes))
        tiles = tile_grid(sp, tuple(plan.tile_shape), grid_overlap(plan, self.tile_overlap))
        assert len(tiles) == len(rows)
        acc = ImageAccumulator(sp, tiles, tuple(plan.tile_shape), scratch=None,
                               keys=getattr(self.task, "finalize_inputs", None))
        reader = ReadTiles(plan, with_target=False)
        done = False
        for i in range(0, len(rows), self.batchsize):
            chunk = rows[i:i + self.batchsize]
            batch = {"image": np.asarray([r["image"] for r in chunk]),
                     "origin": np.asarray([r["origin"] for r in chunk]),
                     "image_index": np.asarray([r["image_index"] for r in chunk]),
                     "tile_index": np.asarray([r["tile_index"] for r in chunk])}
            out = self.predictor(reader(batch))
            for j in range(len(chunk)):
                outputs = {k: v[j] for k, v in out.items() if k not in ("image_index", "tile_index")}
                done = acc.add(int(out["tile_index"][j]), outputs)
        assert done, "not every tile of the grid was added"
        stitched = acc.result()
        return stitched, self.task.finalize(stitched, plan), tiles

    def grid_text(self) -> str:
        from instantdl_ray.data.tile import grid_overlap

        return f"tile {list(self.plan.tile_shape)}, overlap {list(grid_overlap(self.plan, self.tile_overlap))} px"


# ---------------------------------------------------------------- the three measurements


def _measure(run: Run, mosaics: list[dict], counts, summary, prediction=lambda fin: fin["prediction"],
             extra=lambda fin: {}) -> dict:
    """Predict every mosaic, count per seam/other group with ``counts``, sum, summarise."""
    from instantdl_ray.io import read

    total: dict = {}
    per = []
    for m in mosaics:
        run.add_image(m["image"])
        _, fin, tiles = run.predict(m["image"])
        gt = read.read_raw(m["groundtruth"])
        seams = seam_lines(tiles, gt.shape)
        c = counts(gt, prediction(fin), seams, mosaic_lines(gt.shape, m["cell"]))
        add_counts(total, c)
        per.append({"mosaic": m["image"].name, "seams": seams, **summary(c), **extra(fin)})
    return {**summary(total), "per_mosaic": per}


def measure_instance(run: Run, mosaics: list[dict]) -> dict:
    return _measure(run, mosaics, instance_counts, instance_summary)


def measure_semantic(run: Run, mosaics: list[dict]) -> dict:
    def foreground_of(fin):  # multi-class: foreground = any class > 0
        return fin["prediction"] if run.plan.num_classes == 1 else fin["prediction"] > 0

    return _measure(run, mosaics, semantic_counts, semantic_summary, foreground_of,
                    lambda fin: {"threshold": fin.get("threshold")})


def measure_semantic_reference(run: Run, mosaics: list[dict], seams: list) -> dict:
    """The same bands (``seams``: each mosaic's seam lines of the tiled grid, as ``measure_semantic``
    found them) scored on each mosaic predicted as ONE whole tile (no seams at all): where the seam
    band lies (a fixed distance from the pasted images' borders, where nuclei are cut) may be harder
    by itself. The seams' own cost is the tiled band's Jaccard below this one."""
    from instantdl_ray.io import read
    from instantdl_ray.config.plan import Plan, round_up

    total: dict = {}
    for m, lines in zip(mosaics, seams):
        gt = read.read_raw(m["groundtruth"])
        whole = Plan.from_json(run.plan.to_dict())
        whole.tile_shape = [round_up(n, 16) for n in gt.shape]
        _, fin, tiles_w = run.predict(m["image"], plan=whole)
        assert len(tiles_w) == 1
        pred = fin["prediction"] if run.plan.num_classes == 1 else fin["prediction"] > 0
        add_counts(total, semantic_counts(gt, pred, lines, mosaic_lines(gt.shape, m["cell"])))
    return semantic_summary(total)


def measure_semantic_shifted(run: Run, mosaics: list[dict], seams: list, tmp: Path) -> dict:
    """The clean no-seam reference: each mosaic predicted again with the SAME tile size and overlap
    on a grid shifted so that its seams fall between the first grid's (the mosaic reflect-padded
    before each axis by the shift, normalised with the mosaic's own percentiles, the prediction
    cropped back). Every pixel near a seam of one grid is scored with that seam and, on the other
    grid, without one (``paired_semantic_counts``): same pixels, same tile context size, the
    seam the only difference."""
    from instantdl_ray.io import read, write
    from instantdl_ray.data.tile import grid_overlap

    tile, overlap = tuple(run.plan.tile_shape), grid_overlap(run.plan, run.tile_overlap)
    total: dict = {}
    shifts = []
    for m, lines in zip(mosaics, seams):
        gt = read.read_raw(m["groundtruth"])
        shift = pick_shift(gt.shape, tile, overlap, lines)
        shifts.append(shift)
        image = read.read_raw(m["image"])
        yx = read.image_axes(image.shape, run.plan.axes)
        pad = [(0, 0)] * image.ndim
        pad[yx.index("Y")], pad[yx.index("X")] = (shift[0], 0), (shift[1], 0)
        padded = Path(write.write_tiff(tmp / f"shifted_{m['image'].name}", np.pad(image, pad, mode="reflect")))
        run.add_image(m["image"])
        run.plan.image_norm[str(padded)] = run.plan.image_norm[str(m["image"])]
        _, fin_a, _ = run.predict(m["image"])
        _, fin_b, tiles_b = run.predict(padded)
        lines_b = [[b - s for b in bs if b - s > 0]
                   for bs, s in zip(seam_lines(tiles_b, [n + s for n, s in zip(gt.shape, shift)]), shift)]
        assert lines_b == shifted_lines(gt.shape, tile, overlap, shift)
        fg = (lambda p: p) if run.plan.num_classes == 1 else (lambda p: p > 0)
        pa = fg(fin_a["prediction"])
        pb = fg(fin_b["prediction"])[shift[0]:, shift[1]:]
        add_counts(total, paired_semantic_counts(gt, pa, pb, lines, lines_b, mosaic_lines(gt.shape, m["cell"])))
    return {**paired_summary(total), "shifts": shifts}


def mosaic_shape(mosaic: dict) -> list[int]:
    from instantdl_ray.io import read

    return [int(n) for n in read.read_raw(mosaic["groundtruth"]).shape]


def foreground(run: Run, stitched: dict, fin: dict) -> np.ndarray:
    if run.plan.task == "instance":
        return np.asarray(stitched["prob"])[0] < 0.5  # split_objects' watershed mask
    return np.asarray(fin["prediction"]) > 0


def measure_consistency(run: Run, mosaic: dict) -> dict:
    """The same 512² mosaic predicted tiled and as one whole tile."""
    from instantdl_ray.config.plan import Plan, round_up

    run.add_image(mosaic["image"])
    st_t, fin_t, tiles = run.predict(mosaic["image"])
    whole = Plan.from_json(run.plan.to_dict())
    whole.tile_shape = [round_up(n, 16) for n in mosaic_shape(mosaic)]  # the whole mosaic (512² for DSB)
    st_w, fin_w, tiles_w = run.predict(mosaic["image"], plan=whole)
    assert len(tiles_w) == 1
    pt, pw = np.asarray(st_t["prob"]), np.asarray(st_w["prob"])
    diff = np.abs(pt.astype(np.float64) - pw)
    mt, mw = foreground(run, st_t, fin_t), foreground(run, st_w, fin_w)
    near = band_mask(pt.shape[1:], seam_lines(tiles, pt.shape[1:]), BAND)
    px = diff.max(0)  # per pixel, the largest difference over the channels
    norms = sorted({type(m).__name__ for m in run.predictor.model.modules() if "Norm" in type(m).__name__})
    return {"run": run.plan.task, "mosaic_shape": list(pt.shape[1:]), "tiles": len(tiles),
            "whole_tile": list(whole.tile_shape),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_abs_diff_near_seam": float(px[near].mean()) if near.any() else None,
            "mean_abs_diff_elsewhere": float(px[~near].mean()) if (~near).any() else None,
            "mask_differs_share": float(np.mean(mt != mw)),
            "mask_differs_share_near_seam": float(np.mean((mt != mw)[near])) if near.any() else None,
            "mask_differs_share_elsewhere": float(np.mean((mt != mw)[~near])) if (~near).any() else None,
            "norm_layers": norms,
            "mask": "background prob < 0.5" if run.plan.task == "instance" else "finalize prediction",
            "threshold_tiled": fin_t.get("threshold"), "threshold_whole": fin_w.get("threshold")}


# ---------------------------------------------------------------- output


def plain(x):
    """JSON-safe copy: NaN -> None (an empty group), numpy scalars -> Python numbers."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def _f(x, fmt="{:.3f}") -> str:
    return "nan" if x is None or (isinstance(x, float) and np.isnan(x)) else fmt.format(x)


def print_instance(r: dict, header: str) -> None:
    print(f"\n{header}")
    print(f"  {'group':10s} {'objects':>8s} {'found':>7s} {'recall@0.5':>11s} {'split>=2':>9s} {'mean px':>8s}")
    for g in ("seam", "other"):
        print(f"  {g:10s} {r[f'n_{g}']:8d} {r[f'found_{g}']:7d} {_f(r[f'recall_{g}']):>11s} "
              f"{r[f'split_{g}']:9d} {_f(r[f'mean_area_{g}'], '{:.0f}'):>8s}")
    print(f"  {'excluded':10s} {r['n_excluded']:8d}   (touching a mosaic border, in neither group)")
    print(f"  gap (other - seam): {_f(r['gap'])}   bound <= {GAP_BOUND}: {'ok' if r['gap_ok'] else 'NOT MET'}")
    print(f"  seam objects split into >= 2 predictions: {r['split_seam']}/{r['n_seam']} = "
          f"{_f(100 * r['split_share_seam'], '{:.1f}')} %   bound < {100 * SPLIT_BOUND:.0f} %: "
          f"{'ok' if r['split_ok'] else 'NOT MET'}")
    print("  (a line crosses large objects more often than small ones: compare the groups' mean sizes)")


def print_semantic(r: dict, header: str) -> None:
    print(f"\n{header}")
    print(f"  {'region':22s} {'pixels':>10s} {'jaccard':>8s}")
    print(f"  {f'<= {BAND} px of a seam':22s} {r['pixels_seam']:10d} {_f(r['jaccard_seam']):>8s}")
    print(f"  {'elsewhere':22s} {r['pixels_other']:10d} {_f(r['jaccard_other']):>8s}")
    print(f"  gap (elsewhere - seam): {_f(r['gap'])}   ({BAND} px around mosaic borders in neither region)")
    if "whole_tile_reference" in r:
        ref = r["whole_tile_reference"]
        print(f"  no-seam reference (each mosaic as one whole tile, same bands): seam band {_f(ref['jaccard_seam'])}, "
              f"elsewhere {_f(ref['jaccard_other'])}, gap {_f(ref['gap'])}")
        print(f"  cost of the seams (reference - tiled, in the seam band): {_f(r['seam_cost'])}")
    if "shifted_grid_reference" in r:
        sh = r["shifted_grid_reference"]
        print(f"  paired, same pixels (grid shifted by {sh['shifts'][0]} px, same tile and overlap): "
              f"{sh['pixels_paired']} px near a seam of one grid and not of the other: Jaccard with the seam "
              f"{_f(sh['jaccard_seam'])}, without {_f(sh['jaccard_noseam'])}, gap {_f(sh['gap'])}   "
              f"bound <= {GAP_BOUND}: {'ok' if sh['gap_ok'] else 'NOT MET'}")


def print_consistency(r: dict, header: str) -> None:
    print(f"\n{header}")
    print(f"  max |p_tiled - p_whole| {r['max_abs_diff']:.4g}, mean {r['mean_abs_diff']:.3g}; "
          f"mask ({r['mask']}) differs on {100 * r['mask_differs_share']:.3f} % of pixels")
    if r.get("mean_abs_diff_near_seam") is not None:
        print(f"  per pixel (largest over channels): mean |dp| {r['mean_abs_diff_near_seam']:.3g} within {BAND} px "
              f"of a seam, {r['mean_abs_diff_elsewhere']:.3g} elsewhere; mask differs "
              f"{100 * r['mask_differs_share_near_seam']:.3f} % / {100 * r['mask_differs_share_elsewhere']:.3f} %")
    if any(n.startswith("InstanceNorm") for n in r.get("norm_layers", [])):
        print(f"  note: the model normalises with {', '.join(r['norm_layers'])}: statistics of each input tile, "
              "so a tile's output depends on the whole tile (not only on a local receptive field); "
              "tiled and whole predictions differ everywhere, not only at seams")


def test_samples(data: Path, kind: str) -> list:
    from instantdl_ray.io import read

    samples, problems = read.discover(data / kind, "test", kind)
    samples = [s for s in samples if s.groundtruth is not None and not isinstance(s.groundtruth, (int, list))]
    if not samples:
        raise SystemExit(f"{data / kind}/test: no test images with a groundtruth file ({problems[:3]})")
    return samples


def seam_part(kind: str, run: Run, args, tmp: Path) -> dict:
    """Mosaics of the test set, predicted and scored near seams vs elsewhere; prints the table."""
    from instantdl_ray.data.tile import grid_overlap

    t0 = time.time()
    samples = test_samples(args.data, kind)
    n_max = len(samples) // args.grid**2
    n = 1 if args.quick else (min(args.mosaics, n_max) if args.mosaics else n_max)
    if n < 1:
        raise SystemExit(f"{args.data / kind}/test: {len(samples)} images, too few for a "
                         f"{args.grid}x{args.grid} mosaic")
    mosaics = build_mosaics(samples, args.grid, n, tmp / kind, kind, run.plan.axes)
    side = [c * args.grid for c in mosaics[0]["cell"]]
    r = measure_instance(run, mosaics) if kind == "instance" else measure_semantic(run, mosaics)
    r.update(run=str(run.dir), mosaics=len(mosaics), mosaic_shape=side, test_images=len(samples),
             tile=list(run.plan.tile_shape), tile_overlap=run.tile_overlap,
             overlap_px=[int(v) for v in grid_overlap(run.plan, run.tile_overlap)],
             seams_first_mosaic=r["per_mosaic"][0]["seams"], wall_s=round(time.time() - t0, 1))
    if kind == "semantic":
        r["decision"] = run.plan.extra.get("decision")
        ref = measure_semantic_reference(run, mosaics, [m["seams"] for m in r["per_mosaic"]])
        r["whole_tile_reference"] = {k: ref[k] for k in ("jaccard_seam", "jaccard_other", "gap")}
        r["seam_cost"] = ref["jaccard_seam"] - r["jaccard_seam"]  # what tiling costs in the seam band
        r["shifted_grid_reference"] = measure_semantic_shifted(run, mosaics, [m["seams"] for m in r["per_mosaic"]],
                                                               tmp)
    header = (f"{kind} run {run.dir}: {len(mosaics)} mosaic(s) of {args.grid}x{args.grid} test images "
              f"({side[0]}x{side[1]}), {run.grid_text()}; {r['wall_s']} s")
    (print_instance if kind == "instance" else print_semantic)(r, header)
    print(f"  seam lines (first mosaic): y {r['seams_first_mosaic'][0]}, x {r['seams_first_mosaic'][1]}", flush=True)
    return r


def consistency_part(kind: str, run: Run, data: Path, tmp: Path) -> dict:
    """The first 2x2 test images as one mosaic, tiled vs one whole tile; prints the line."""
    t0 = time.time()
    mosaic = build_mosaics(test_samples(data, kind), 2, 1, tmp / "consistency", kind, run.plan.axes)
    if not mosaic:
        print("\nconsistency skipped: fewer than 4 test images")
        return {}
    c = measure_consistency(run, mosaic[0])
    c["wall_s"] = round(time.time() - t0, 1)
    shape = "x".join(map(str, c["mosaic_shape"]))
    print_consistency(c, f"consistency, {kind} run: a {shape} mosaic (2x2 test images) tiled ({c['tiles']} tiles, "
                         f"{run.grid_text()}, Gaussian) vs one {'x'.join(map(str, c['whole_tile']))} tile; "
                         f"{c['wall_s']} s")
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--semantic-run", type=Path, help="run directory of a semantic U-Net run")
    p.add_argument("--instance-run", type=Path, help="run directory of an instance U-Net run")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "dsb2018_fluo256",
                   help="folder with semantic/test and instance/test (default ../shared/data/dsb2018_fluo256)")
    p.add_argument("--grid", type=int, default=3, help="mosaics of GRID x GRID test images (default 3)")
    p.add_argument("--mosaics", type=int, help="mosaics per run (default: as many as the test set allows)")
    p.add_argument("--quick", action="store_true", help="one mosaic per run")
    p.add_argument("--json", type=Path, help="also write the JSON here (default benchmarks/results/seams_<date>.json)")
    args = p.parse_args(argv)
    if not args.semantic_run and not args.instance_run:
        p.error("give --semantic-run and/or --instance-run")
    if args.grid < 2:
        p.error("--grid needs at least 2 (a 1x1 mosaic is one image)")

    command = "python benchmarks/seams.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    load_before = uptime()
    print(f"command: {command}")
    print(f"machine: {machine()}")
    print(f"load before: {load_before}", flush=True)
    print("one deterministic pass per tile (passes=1, no Monte-Carlo dropout), Gaussian blending, no Ray")
    t_start = time.time()
    result: dict = {"command": command, "machine": machine(), "cpu_cores": os.cpu_count(), "load_before": load_before,
                    "loadavg_before": list(os.getloadavg()), "passes": 1, "blend": "gaussian", "grid": args.grid,
                    "band_px": BAND,
                    "bounds": {"instance_gap_max": GAP_BOUND, "instance_split_share_below": SPLIT_BOUND}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-seams-"))
    runs: dict[str, Run] = {}
    try:
        for kind, run_dir in (("semantic", args.semantic_run), ("instance", args.instance_run)):
            if run_dir is not None:
                runs[kind] = Run(run_dir)
                if runs[kind].plan.task != kind:
                    raise SystemExit(f"{run_dir}: a {runs[kind].plan.task} run given as --{kind}-run")
                result[kind] = seam_part(kind, runs[kind], args, tmp)
        kind = "semantic" if "semantic" in runs else "instance"
        result["consistency"] = consistency_part(kind, runs[kind], args.data, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result["wall_s"] = round(time.time() - t_start, 1)
    result["load_after"] = uptime()
    result["loadavg_after"] = list(os.getloadavg())
    print(f"\nwall {result['wall_s']} s")
    print(f"load after: {result['load_after']}")
    path = args.json or BENCH_DIR / "results" / f"seams_{_dt.datetime.now().strftime('%Y-%m-%d_%H%M')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = plain(result)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"json: {path}")
    print("RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
