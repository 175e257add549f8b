"""Large images: streaming stitching and blockwise finalisation equal the whole-image path, and
``predict`` on a 20000² zarr runs in bounded driver memory (slow)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

import instantdl_ray.predict.stitch as stitch
from instantdl_ray.io import read
from instantdl_ray.config.plan import Plan
from instantdl_ray.predict.pool import write_image
from instantdl_ray.predict.stitch import ImageAccumulator
from instantdl_ray.tasks import get_task
from instantdl_ray.data.tile import read_tile, tile_grid

SHAPE = (1000, 1000)
TILE = (128, 128)
OVERLAP = (32, 32)


def _plan(task: str, out_channels: int = 1, **kw) -> Plan:
    fields = dict(task=task, spatial_dims=2, axes="YX", target_axes="YX", in_channels=1,
                  out_channels=out_channels, num_classes=out_channels, class_names=[], tile_shape=list(TILE),
                  image_size=None, model="unet", loss="mse", dropout=0.2)
    fields.update(kw)
    return Plan(**fields)


def _field(rng: np.random.Generator, channels: int, shape=SHAPE) -> np.ndarray:
    """A smooth random field ``(C, *shape)`` in [0, 1] (a plausible probability map)."""
    from scipy import ndimage as ndi

    x = rng.normal(size=(channels,) + tuple(shape)).astype(np.float32)
    x = ndi.gaussian_filter(x, sigma=(0,) + (12,) * len(shape))
    return (1 / (1 + np.exp(-x / x.std() * 2))).astype(np.float32)


def _tile_outputs(fields: dict[str, np.ndarray], shape=SHAPE, tile=TILE, overlap=OVERLAP, seed=0):
    """Per tile: each field read through the tile, plus tile-specific noise (so blending matters)."""
    rng = np.random.default_rng(seed)
    tiles = tile_grid(shape, tile, overlap)
    outs = []
    for t in tiles:
        outs.append({k: np.clip(read_tile(v, t) + rng.normal(0, 0.02, (v.shape[0],) + tuple(tile)), 0, 1)
                     .astype(np.float32) for k, v in fields.items()})
    return tiles, outs


def _accumulate(tiles, outs, scratch, keys=None, order=None, shape=SHAPE, tile=TILE):
    acc = ImageAccumulator(shape, tiles, tile, scratch=scratch, keys=keys)
    order = range(len(tiles)) if order is None else order
    done = [acc.add(i, outs[i]) for i in order]
    assert done[-1] and not any(done[:-1])
    return acc


def _both(tmp_path, monkeypatch, task_name, plan, fields, block=None, order=None, shape=SHAPE, tile=TILE,
          overlap=OVERLAP):
    """Write the same tiles through the in-memory path and the streaming path; return both records."""
    task = get_task(task_name)
    tiles, outs = _tile_outputs(fields, shape, tile, overlap)
    sample = read.Sample("img", Path("img.tif"), None)
    mem = _accumulate(tiles, outs, None, shape=shape, tile=tile)
    assert not mem.streaming
    rec_mem = write_image(sample, mem, task, plan, tmp_path / "mem" / "predictions", tmp_path / "mem" / "uncertainty")
    monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
    if block is not None:
        monkeypatch.setattr(stitch, "STREAM_BLOCK", block)
        monkeypatch.setattr(stitch, "STREAM_BLOCK_Z", 3)
    big = _accumulate(tiles, outs, tmp_path / "scratch", keys=getattr(task, "finalize_inputs", None), order=order,
                      shape=shape, tile=tile)
    assert big.streaming
    rec_big = write_image(sample, big, task, plan, tmp_path / "big" / "predictions", tmp_path / "big" / "uncertainty")
    assert not (tmp_path / "scratch").exists()  # scratch removed once the image is written
    return rec_mem, rec_big


@pytest.mark.parametrize("block,rule", [(None, "otsu"), (192, "otsu"), (192, 0.4)])
def test_blockwise_binary_semantic_equals_whole_image(tmp_path, monkeypatch, block, rule):
    rng = np.random.default_rng(0)
    fields = {"prob": _field(rng, 1), "expected_entropy": 0.5 * _field(rng, 1)}
    plan = _plan("semantic", extra={"decision": {"threshold": rule}})
    rec_mem, rec_big = _both(tmp_path, monkeypatch, "semantic", plan, fields, block=block)
    assert rec_big["threshold"] == rec_mem["threshold"]  # same 256 bins, same counts: the same Otsu threshold
    assert 0.25 <= rec_big["threshold"] <= 0.75
    if rule != "otsu":
        assert rec_big["threshold"] == rule
    ma, mb = tifffile.imread(rec_mem["mutual_information"]), tifffile.imread(rec_big["mutual_information"])
    np.testing.assert_array_equal(ma, mb)
    a, b = tifffile.imread(rec_mem["prediction"]), tifffile.imread(rec_big["prediction"])
    assert a.dtype == b.dtype == np.uint8 and a.shape == b.shape == SHAPE
    np.testing.assert_array_equal(a, b)
    assert 0.05 < a.mean() < 0.95
    np.testing.assert_array_equal(np.asarray(read.open_array(rec_big["prediction_zarr"])[...]), b)
    ua, ub = tifffile.imread(rec_mem["uncertainty"]), tifffile.imread(rec_big["uncertainty"])
    np.testing.assert_array_equal(ua, ub)
    assert rec_big["mean_uncertainty"] == pytest.approx(rec_mem["mean_uncertainty"], rel=1e-5)
    with tifffile.TiffFile(rec_big["prediction"]) as f:  # large images: tiled BigTIFF
        assert f.is_bigtiff and f.pages[0].is_tiled and f.pages[0].tilewidth == 512
    with tifffile.TiffFile(rec_mem["prediction"]) as f:  # small images: unchanged plain TIFF
        assert not f.is_bigtiff and not f.pages[0].is_tiled


def test_blockwise_multiclass_argmax_equals_whole_image(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    fields = {"prob": _field(rng, 3)}
    rec_mem, rec_big = _both(tmp_path, monkeypatch, "semantic", _plan("semantic", 3), fields, block=192)
    np.testing.assert_array_equal(tifffile.imread(rec_mem["prediction"]), tifffile.imread(rec_big["prediction"]))
    assert "threshold" not in rec_big and rec_big["uncertainty"] is None


def test_blockwise_regression_equals_whole_image(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    fields = {"value": _field(rng, 1) * 4 - 2, "std": _field(rng, 1)}
    plan = _plan("regression", target_mean=[100.0], target_std=[15.0])
    rec_mem, rec_big = _both(tmp_path, monkeypatch, "regression", plan, fields)
    a, b = tifffile.imread(rec_mem["prediction"]), tifffile.imread(rec_big["prediction"])
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(tifffile.imread(rec_mem["uncertainty"]), tifffile.imread(rec_big["uncertainty"]))


def test_blockwise_3d_multichannel_regression_equals_whole_image(tmp_path, monkeypatch):
    shape, tile, overlap = (10, 150, 170), (8, 64, 64), (2, 16, 16)
    rng = np.random.default_rng(3)
    fields = {"value": _field(rng, 2, shape)}
    plan = _plan("regression", 2, spatial_dims=3, axes="ZYX", tile_shape=list(tile), target_mean=[1.0, 2.0],
                 target_std=[3.0, 4.0])
    rec_mem, rec_big = _both(tmp_path, monkeypatch, "regression", plan, fields, block=64, shape=shape, tile=tile,
                             overlap=overlap)
    a, b = tifffile.imread(rec_mem["prediction"]), tifffile.imread(rec_big["prediction"])
    assert a.shape == b.shape == (2,) + shape
    np.testing.assert_array_equal(a, b)


def test_out_of_order_tiles_spill_to_disk_and_still_stitch(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    fields = {"value": _field(rng, 2)}
    tiles, outs = _tile_outputs(fields)
    mem = _accumulate(tiles, outs, None).result()["value"]
    monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
    monkeypatch.setattr(stitch, "STREAM_BLOCK", 128)
    monkeypatch.setattr(stitch, "MAX_OPEN_BYTES", 4 * 128 * 128 * 3 * 4)  # four open blocks at most
    order = np.random.default_rng(5).permutation(len(tiles))
    acc = ImageAccumulator(SHAPE, tiles, TILE, scratch=tmp_path / "s")
    spilled = 0
    for i in order:
        acc.add(int(i), outs[int(i)])
        spilled = max(spilled, len(acc._blocks.spilled))
        assert acc._blocks.open_bytes <= stitch.MAX_OPEN_BYTES
    assert spilled > 0
    np.testing.assert_allclose(acc.result()["value"], mem, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "s").exists()


def test_streaming_keeps_only_the_finalize_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
    tiles = tile_grid(SHAPE, TILE, OVERLAP)
    acc = ImageAccumulator(SHAPE, tiles, TILE, scratch=tmp_path / "s", keys=("prob",))
    z = np.zeros((1,) + TILE, np.float32)
    acc.add(0, {"prob": z, "mutual_information": z})
    assert set(acc.stitched()) == {"prob"}
    acc.cleanup()


def test_blockwise_maskrcnn_labels_equal_whole_image(tmp_path, monkeypatch):
    """Label tiles merged in a zarr label image: same TIFF and objects table as in memory."""
    from skimage.measure import label

    rng = np.random.default_rng(6)
    truth = label(_field(rng, 1)[0] > 0.7).astype(np.int32)
    tiles = tile_grid(SHAPE, TILE, OVERLAP)
    outs = []
    for t in tiles:
        lab = label(read_tile(truth[None], t)[0] > 0).astype(np.int32)  # ids local to the tile
        outs.append({"labels": lab[None], "scores": np.linspace(0.99, 0.5, 64).astype(np.float32)})
    task, plan = get_task("instance"), _plan("instance", 2, model="maskrcnn")
    sample = read.Sample("img", Path("img.tif"), None)
    recs = {}
    for name in ("mem", "big"):
        if name == "big":
            monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 1000)
        acc = _accumulate(tiles, outs, tmp_path / "scratch")
        assert acc.streaming == (name == "big")
        recs[name] = write_image(sample, acc, task, plan, tmp_path / name / "predictions", tmp_path / name / "unc")
    a, b = tifffile.imread(recs["mem"]["prediction"]), tifffile.imread(recs["big"]["prediction"])
    assert a.dtype == b.dtype == np.uint16 and a.max() > 5
    np.testing.assert_array_equal(a, b)
    rows = {n: list(csv.reader(open(tmp_path / n / "predictions" / "img_objects.csv"))) for n in ("mem", "big")}
    assert rows["mem"] == rows["big"] and len(rows["mem"]) == a.max() + 1


# ---------------------------------------------------------------- end to end, 20000²

BIG = 20000


def _peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM) so it measures only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _make_big_zarr(path: Path, n: int = BIG, chunk: int = 2000) -> None:
    """A uint8 ``n``² zarr with bright discs, written band by band (never whole in RAM)."""
    import zarr

    z = zarr.create_array(store=str(path), shape=(n, n), chunks=(chunk, chunk), dtype="uint8", overwrite=True)
    yy, xx = np.mgrid[:chunk, :n]
    rng = np.random.default_rng(0)
    for y0 in range(0, n, chunk):
        band = rng.integers(10, 40, size=(chunk, n), dtype=np.uint8)
        disc = ((yy % 97 - 48) ** 2 + (xx % 89 - 44) ** 2) < 20 ** 2
        band[disc] = 200
        z[y0:y0 + chunk] = band


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_predict_20000_square_zarr_in_bounded_memory(tmp_path, ray_session):
    """``predict_new`` on a 20000² zarr with a tiny U-Net (never trained) on 2 CPUs: a 20000² mask
    comes out, and the driver's peak RSS stays far below the 1.6 GB one float32 copy would take."""
    import torch

    from instantdl_ray.config import schema as config_mod
    from instantdl_ray import pipeline
    from instantdl_ray.models import build_model

    src = tmp_path / "slide.zarr"
    _make_big_zarr(src)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "best").mkdir(parents=True)
    data = tmp_path / "data"
    (data / "train" / "image").mkdir(parents=True)
    cfg = config_mod.from_dict({"use_algorithm": "SemanticSegmentation", "path": str(data), "batchsize": 4})
    config_mod.dump(cfg, run_dir / "config.yaml")
    features = [4, 4, 8, 8, 16, 4]
    plan = _plan("semantic", loss="dice_crossentropy", tile_shape=[512, 512], class_names=["background", "foreground"],
                 extra={"model_options": {"features": features}})
    plan.to_json(run_dir / "plan.json")
    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, out_channels=1, spatial_dims=2, dropout=0.2, features=features)
    torch.save(model.state_dict(), run_dir / "checkpoints" / "best" / "model.pt")

    exact = _peak_rss_reset()
    before = _vm("VmRSS")
    out = pipeline.predict_new(run_dir, src, out=tmp_path / "out", overrides=["calculate_uncertainty=false"])
    peak = _vm("VmHWM")
    grown = peak - before if exact else peak
    print(f"driver RSS before {before / 2**20:.0f} MiB, peak during predict {peak / 2**20:.0f} MiB "
          f"({'reset' if exact else 'process lifetime'} peak)")

    with tifffile.TiffFile(out / "predictions" / "slide.tif") as f:
        assert f.series[0].shape == (BIG, BIG) and f.series[0].dtype == np.uint8
        assert f.is_bigtiff and f.pages[0].is_tiled
    pred = read.open_array(out / "predictions" / "slide.zarr")
    assert pred.shape == (BIG, BIG)
    block = np.asarray(pred[9000:9512, 9000:9512])
    assert set(np.unique(block)) <= {0, 1}
    assert not (out / ".scratch" / "slide").exists()
    assert not (out / "uncertainty" / "slide.tif").exists()
    # one float32 copy of the image would be 1.6 GB; the driver grows by a small fraction of it
    assert grown < 700 * 2**20, f"driver peak RSS grew by {grown / 2**20:.0f} MiB"
    assert os.path.getsize(out / "predictions" / "slide.tif") >= BIG * BIG  # uint8, uncompressed
