"""Tiled prediction, stitching and MC dropout, without Ray (plain callables on one batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from instantdl_ray.predict.stitch import ImageAccumulator
from instantdl_ray.tasks import get_task, mc_samples, set_mc_dropout
from instantdl_ray.data.tile import read_tile, tile_grid

torch.set_num_threads(1)


def _stitch(image: np.ndarray, tile, overlap, fn, scratch=None):
    """Tile ``image (C, *sp)``, apply ``fn`` to each padded tile, blend back."""
    sp = image.shape[1:]
    tiles = tile_grid(sp, tile, overlap)
    acc = ImageAccumulator(sp, tiles, tile, scratch=scratch)
    done = False
    for i, t in enumerate(tiles):
        done = acc.add(i, {"value": fn(read_tile(image, t))})
    assert done
    return acc.result()["value"]


@pytest.mark.parametrize("shape,tile,overlap", [((1, 100, 130), (32, 48), (8, 12)), ((2, 9, 40, 33), (8, 16, 16), (2, 4, 4)),
                                                ((1, 20, 20), (32, 32), (8, 8))])
def test_identity_model_tiled_and_stitched_reproduces_input(shape, tile, overlap):
    img = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = _stitch(img, tile, overlap, lambda x: x)
    np.testing.assert_allclose(out, img, rtol=1e-5, atol=1e-5)


def test_stitching_in_zarr_scratch_matches_memory(tmp_path, monkeypatch):
    import instantdl_ray.predict.stitch as stitch

    img = np.random.default_rng(1).normal(size=(1, 70, 90)).astype(np.float32)
    mem = _stitch(img, (32, 32), (8, 8), lambda x: x * 2)
    monkeypatch.setattr(stitch, "IN_MEMORY_LIMIT", 10)  # force the on-disk accumulator
    disk = _stitch(img, (32, 32), (8, 8), lambda x: x * 2, scratch=tmp_path / "s")
    np.testing.assert_allclose(disk, mem, rtol=1e-6)
    assert not (tmp_path / "s").exists()  # scratch removed after the result is read


def test_tiled_and_whole_image_predictions_of_a_dense_model_agree():
    from instantdl_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("unet", in_channels=1, out_channels=1, spatial_dims=2, dropout=0.0).eval()
    img = np.random.default_rng(2).normal(size=(1, 96, 96)).astype(np.float32)
    with torch.no_grad():
        whole = model(torch.from_numpy(img)[None])[0].numpy()
        tiled = _stitch(img, (64, 64), (32, 32), lambda x: model(torch.from_numpy(x)[None])[0].numpy())
    # a U-Net's receptive field exceeds the tile context, so borders differ a little; the bulk agrees
    core = (slice(None), slice(16, -16), slice(16, -16))
    assert np.corrcoef(whole[core].ravel(), tiled[core].ravel())[0, 1] > 0.95
    assert np.median(np.abs(whole - tiled)) < 0.1 * np.std(whole)


def test_mc_passes_differ_and_batchnorm_statistics_stay_unchanged():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Dropout(0.5),
        torch.nn.Conv2d(4, 1, 1),
    )
    model.train()
    model(torch.randn(8, 1, 16, 16))  # give BatchNorm non-trivial running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 1, 16, 16)
    samples = mc_samples(model, x, passes=2)
    assert samples.shape == (2, 2, 1, 16, 16)
    assert not torch.allclose(samples[0], samples[1])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model[1].training and model[3].training
    set_mc_dropout(model, False)
    det = mc_samples(model, x, passes=1)
    assert torch.equal(det[0], mc_samples(model, x, passes=1)[0])


def test_mc_passes_are_batched_not_looped():
    calls = []

    class Counter(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x

    mc_samples(Counter(), torch.zeros(2, 1, 4, 4), passes=20, max_batch=40)
    assert calls == [40]
    calls.clear()  # the CPU default: batches of 4 tile-passes (2 passes of 2 tiles), the last one short
    out = mc_samples(Counter(), torch.zeros(2, 1, 4, 4), passes=5)
    assert calls == [4, 4, 2] and out.shape == (5, 2, 1, 4, 4)


def test_border_crossing_instance_comes_out_once():
    """A nucleus on a tile border: kept only by the tile whose core holds its centroid."""
    shape = (64, 64)
    tiles = tile_grid(shape, (40, 40), (16, 16))
    lab = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:64, :64]
    lab[(yy - 32) ** 2 + (xx - 31) ** 2 <= 36] = 1  # straddles the core boundary at 32
    lab[(yy - 8) ** 2 + (xx - 8) ** 2 <= 9] = 2
    acc = ImageAccumulator(shape, tiles, (40, 40))
    for i, t in enumerate(tiles):
        tile_lab = read_tile(lab[None], t)[0].astype(np.int32)
        # relabel per tile as a detector would (ids are local to the tile)
        local = np.zeros_like(tile_lab)
        for j, v in enumerate(np.unique(tile_lab[tile_lab > 0]), start=1):
            local[tile_lab == v] = j
        acc.add(i, {"labels": local[None], "scores": np.full(8, 0.9, np.float32)})
    out = acc.result()["labels"]
    assert len(np.unique(out[out > 0])) == 2
    assert set(np.unique(out[lab == 1])) == {np.unique(out[lab == 1])[0]}  # one id covers the nucleus
    assert (out[lab == 1] > 0).all()


@pytest.mark.parametrize("task,model,out", [("semantic", "unet", 1), ("regression", "unet", 1),
                                            ("classification", "resnet18", 3), ("instance", "unet", 3)])
def test_predict_batch_outputs_are_averageable_arrays(task, model, out):
    from instantdl_ray.models import build_model

    t = get_task(task)
    net = build_model(model, in_channels=1, out_channels=out, spatial_dims=2, dropout=0.3)
    x = torch.randn(2, 1, 32, 32)
    res = t.predict_batch(net, x, passes=3)
    for k, v in res.items():
        assert isinstance(v, np.ndarray) and v.shape[0] == 2 and np.isfinite(v).all(), k
    if task == "classification":
        np.testing.assert_allclose(res["prob"].sum(1), 1, rtol=1e-5)
        assert ((res["uncertainty"] >= 0) & (res["uncertainty"] <= 1)).all()
