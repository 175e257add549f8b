"""Augmentations on tiny synthetic images: alignment, label integrity, seeding, batching."""

from __future__ import annotations

import numpy as np
import pytest

from instantdl_ray.data import augment as A
from instantdl_ray.data.augment import AUGMENT_KEYS, DEFAULTS, AugmentParams

ALL_ON = dict(
    horizontal_flip=True,
    vertical_flip=True,
    rotation_range=45,
    zoom_range=2,
    poission_noise=1,
    contrast_range=0.2,
    brightness_range=0.2,
    gamma_shift=0.2,
    gaussian_blur=1.0,
)


def square_pair(spatial=(64, 64), box=(slice(18, 42), slice(22, 46)), label_value=1):
    """Dark noisy image with one bright square and its label; (1, [Z,] Y, X)."""
    rng = np.random.default_rng(0)
    image = (0.05 * rng.random((1,) + spatial)).astype(np.float32)
    label = np.zeros((1,) + spatial, dtype=np.float32)
    index = (slice(None),) * (len(spatial) - 2) + box
    image[(0,) + index] = 1.0
    label[(0,) + index] = label_value
    return image, label


def iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


GEOMETRIC = [
    ("hflip", lambda i, t: A.flip(i, t, -1)),
    ("vflip", lambda i, t: A.flip(i, t, -2)),
    ("rot30", lambda i, t: A.rotate(i, t, 30.0, 0)),
    ("rot-75", lambda i, t: A.rotate(i, t, -75.0, 0)),
    ("rot180", lambda i, t: A.rotate(i, t, 180.0, 0)),
    ("zoom1.6", lambda i, t: A.zoom(i, t, 1.6, 0)),
    ("zoom0.6", lambda i, t: A.zoom(i, t, 0.6, 0)),
]


@pytest.mark.parametrize("name,fn", GEOMETRIC, ids=[g[0] for g in GEOMETRIC])
@pytest.mark.parametrize("spatial", [(64, 64), (5, 64, 64)], ids=["2d", "3d"])
def test_geometric_keeps_alignment(name, fn, spatial):
    image, label = square_pair(spatial)
    out_i, out_t = fn(image, label)
    assert out_i.shape == image.shape and out_t.shape == label.shape
    assert out_i.dtype == np.float32
    assert out_t.sum() > 0
    assert iou(out_i > 0.5, out_t > 0) > 0.9, name
    if len(spatial) == 3:  # every Z slice transformed alike
        for z in range(1, spatial[0]):
            np.testing.assert_array_equal(out_t[0, z], out_t[0, 0])


def test_geometric_moves_off_centre_object():
    # a flip / rotation that did nothing would pass the alignment test; make sure they move it
    image, label = square_pair(box=(slice(5, 20), slice(8, 25)))
    for _, fn in GEOMETRIC:
        _, out_t = fn(image, label)
        assert iou(out_t > 0, label > 0) < 0.9


@pytest.mark.parametrize("seed", range(6))
def test_augment_keeps_alignment_all_geometric(seed):
    image, label = square_pair((64, 64))
    params = AugmentParams.from_dict(
        dict(horizontal_flip=True, vertical_flip=True, rotation_range=180, zoom_range=1.5), prob=1.0
    )
    out_i, out_t = A.augment(image, label, params, np.random.default_rng(seed), "label")
    assert iou(out_i > 0.5, out_t > 0) > 0.9


def test_labels_stay_integer_valued():
    rng = np.random.default_rng(1)
    label = rng.integers(0, 4, size=(1, 32, 32)).astype(np.float32)
    image = rng.random((1, 32, 32)).astype(np.float32)
    for _, fn in GEOMETRIC:
        _, out = fn(image, label)
        assert set(np.unique(out)) <= {0.0, 1.0, 2.0, 3.0}
    params = AugmentParams.from_dict(ALL_ON, prob=1.0)
    for seed in range(4):
        _, out = A.augment(image, label, params, np.random.default_rng(seed), "label")
        assert set(np.unique(out)) <= {0.0, 1.0, 2.0, 3.0}
    # integer dtype is kept as well
    _, out = A.rotate(image, label.astype(np.int32), 33.0, 0)
    assert out.dtype == np.int32


def test_continuous_target_is_interpolated_linearly():
    image, target = square_pair()
    _, out = A.rotate(image, target * 0.7, 30.0, target_order=1)
    inner = out[(out > 0.01) & (out < 0.69)]
    assert inner.size > 0  # intermediate values exist at the rotated edges
    params = AugmentParams.from_dict({"rotation_range": 40}, prob=1.0)
    _, out2 = A.augment(image, target * 0.7, params, np.random.default_rng(3), "continuous")
    assert out2.dtype == np.float32 and out2.shape == target.shape


def test_intensity_only_touches_image():
    image, label = square_pair()
    params = AugmentParams.from_dict(
        dict(horizontal_flip=False, vertical_flip=False, poission_noise=1, contrast_range=0.3,
             brightness_range=0.3, gamma_shift=0.3, gaussian_blur=1.5,
             threshold_background_image=True),
        prob=1.0,
    )
    out_i, out_t = A.augment(image, label, params, np.random.default_rng(0), "label")
    np.testing.assert_array_equal(out_t, label)
    assert not np.array_equal(out_i, image)


def test_same_seed_same_output_different_seed_differs():
    image, label = square_pair()
    params = AugmentParams.from_dict(ALL_ON)
    a = A.augment(image, label, params, np.random.default_rng(7), "label")
    b = A.augment(image, label, params, np.random.default_rng(7), "label")
    c = A.augment(image, label, params, np.random.default_rng(8), "label")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_inputs_are_not_modified():
    image, label = square_pair()
    i0, l0 = image.copy(), label.copy()
    extra = dict(threshold_background_image=True, threshold_background_groundtruth=True,
                 binarize_mask=True)
    params = AugmentParams.from_dict({**ALL_ON, **extra}, prob=1.0)
    A.augment(image, label, params, np.random.default_rng(0), "label")
    np.testing.assert_array_equal(image, i0)
    np.testing.assert_array_equal(label, l0)


def test_3d_multichannel_augment():
    rng = np.random.default_rng(2)
    image = rng.random((2, 6, 32, 40)).astype(np.float32)
    label = (rng.random((1, 6, 32, 40)) > 0.5).astype(np.float32)
    params = AugmentParams.from_dict(ALL_ON, prob=1.0)
    out_i, out_t = A.augment(image, label, params, np.random.default_rng(0), "label")
    assert out_i.shape == image.shape and out_t.shape == label.shape
    assert out_i.dtype == np.float32 and np.isfinite(out_i).all()


def test_classification_target_passes_through():
    image = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)
    params = AugmentParams.from_dict(ALL_ON, prob=1.0)
    out_i, out_t = A.augment(image, None, params, np.random.default_rng(0), "none")
    assert out_t is None and out_i.shape == image.shape
    _, t = A.augment(image, np.int64(2), params, np.random.default_rng(0), "none")
    assert t == 2


def test_mismatched_target_shape_raises():
    params = AugmentParams.from_dict({})
    with pytest.raises(ValueError):
        A.augment(np.zeros((1, 8, 8), np.float32), np.zeros((1, 8, 9)), params,
                  np.random.default_rng(0), "label")
    with pytest.raises(ValueError):
        A.augment(np.zeros((8, 8), np.float32), None, params, np.random.default_rng(0), "label")


# --- individual intensity functions ----------------------------------------------------------


def test_intensity_functions():
    rng = np.random.default_rng(3)
    x = (rng.random((2, 20, 20)) * 100 + 10).astype(np.float32)
    mean = x.mean(axis=(1, 2))
    np.testing.assert_allclose(A.adjust_contrast(x, 1.5).mean(axis=(1, 2)), mean, rtol=1e-5)
    assert A.adjust_contrast(x, 1.5).std() > x.std()
    rng_span = x.max(axis=(1, 2)) - x.min(axis=(1, 2))
    np.testing.assert_allclose(A.adjust_brightness(x, 0.1) - x,
                               np.broadcast_to(0.1 * rng_span[:, None, None], x.shape), rtol=1e-4)
    g = A.gamma_shift(x, 0.5)
    np.testing.assert_allclose(g.min(axis=(1, 2)), x.min(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(g.max(axis=(1, 2)), x.max(axis=(1, 2)), rtol=1e-5)
    assert g.mean() > x.mean()  # gamma < 1 brightens
    noisy = A.poisson_noise(x, 1.0, np.random.default_rng(0))
    assert noisy.shape == x.shape and noisy.dtype == np.float32
    assert not np.array_equal(noisy, x)
    assert abs(noisy.mean() - x.mean()) < 0.05 * x.mean()
    more = A.poisson_noise(x, 10.0, np.random.default_rng(0))
    assert np.abs(more - x).mean() > np.abs(noisy - x).mean()
    blurred = A.gaussian_blur(x, 2.0)
    assert blurred.std() < x.std() and blurred.shape == x.shape
    t = A.threshold_background(x)
    assert np.all(t[x < x.mean(axis=(1, 2), keepdims=True)] == 0)
    np.testing.assert_array_equal(A.binarize(np.array([[[0, 2, 5, -1]]])), [[[0, 1, 1, 0]]])


def test_blur_3d_is_in_plane():
    x = np.zeros((1, 5, 9, 9), np.float32)
    x[0, 2, 4, 4] = 1.0
    out = A.gaussian_blur(x, 1.0)
    assert out[0, 1].sum() == 0 and out[0, 3].sum() == 0
    assert out[0, 2].sum() == pytest.approx(1.0, rel=1e-3)


# --- normalize / params ------------------------------------------------------------------------


def test_params_from_dict():
    p = AugmentParams.from_dict({})
    expected = {k: (0.0 if v is False and k in A.ON_VALUES else v) for k, v in DEFAULTS.items()}
    assert p.to_dict() == expected
    p = AugmentParams.from_dict(
        {"rotation_range": True, "zoom_range": 2, "resample_images": [64, 64],
         "poission_noise": False}
    )
    assert p.rotation_range == A.ON_VALUES["rotation_range"] and p.zoom_range == 2.0
    assert p.resample_images == (64, 64) and p.poission_noise == 0.0
    with pytest.raises(ValueError) as err:
        AugmentParams.from_dict({"rotation_rnage": 10, "zoom_range": -1, "binarize_mask": "yes"})
    msg = str(err.value)
    assert "rotation_rnage" in msg and "zoom_range" in msg and "binarize_mask" in msg
    assert set(AUGMENT_KEYS) == set(DEFAULTS)


def test_keys_match_config():
    config = pytest.importorskip("instantdl_ray.config.schema")
    assert set(AUGMENT_KEYS) == set(config.AUGMENT_DEFAULTS)
    assert DEFAULTS == config.AUGMENT_DEFAULTS


def test_sample_zoom_ranges():
    rng = np.random.default_rng(0)
    big = [A.sample_zoom(2, rng) for _ in range(500)]
    assert 0.5 <= min(big) < 0.7 and 1.5 < max(big) <= 2.0
    small = [A.sample_zoom(0.2, rng) for _ in range(500)]
    assert 0.8 <= min(small) and max(small) <= 1.2
    assert A.sample_zoom(0, rng) == 1.0


def test_clean_target():
    t = np.array([[[0.0, 0.1, 2.0, 3.0]]], dtype=np.float32)  # mean 1.275, 0.8 * mean = 1.02
    p = AugmentParams.from_dict({"threshold_background_groundtruth": True})
    np.testing.assert_array_equal(A.clean_target(t, p), [[[0, 0, 2, 3]]])
    # the whole image's threshold, given, wins over the tile's own mean
    np.testing.assert_array_equal(A.clean_target(t, p, [2.5]), [[[0, 0, 0, 3]]])
    p = AugmentParams.from_dict({"threshold_background_groundtruth": True, "binarize_mask": True})
    np.testing.assert_array_equal(A.clean_target(t, p), [[[0, 0, 1, 1]]])
    assert A.interp_order("continuous", p) == 0 and A.interp_order("continuous") == 1


# --- batches -----------------------------------------------------------------------------------


def make_batch(n=4, spatial=(24, 24), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.random((n, 2) + spatial).astype(np.float32),
        "target": (rng.random((n, 1) + spatial) > 0.6).astype(np.float32),
        "seed": np.arange(100, 100 + n, dtype=np.int64),
        "path": np.array([f"img{i}.tif" for i in range(n)]),
    }


def split(batch, sl):
    return {k: v[sl] for k, v in batch.items()}


@pytest.mark.parametrize("spatial", [(24, 24), (4, 24, 24)], ids=["2d", "3d"])
def test_augment_batch_independent_of_batching(spatial):
    batch = make_batch(spatial=spatial)
    params = AugmentParams.from_dict(ALL_ON)
    whole = A.augment_batch(batch, params, "label")
    halves = [A.augment_batch(split(batch, s), params, "label") for s in (slice(0, 2), slice(2, 4))]
    assert set(whole) == set(batch)
    for key in ("image", "target"):
        np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
    np.testing.assert_array_equal(whole["path"], batch["path"])
    assert whole["image"].shape == batch["image"].shape and whole["image"].dtype == np.float32
    # rows differ from each other (own seeds) and from the input
    assert not np.array_equal(whole["image"][0], whole["image"][1])
    # a row's result equals augment() with the row's seed
    img, tgt = A.augment(batch["image"][2], batch["target"][2], params,
                         np.random.default_rng(102), "label")
    np.testing.assert_array_equal(whole["image"][2], img)
    np.testing.assert_array_equal(whole["target"][2], tgt)


def test_augment_batch_object_arrays_of_different_shapes():
    rng = np.random.default_rng(1)
    shapes = [(20, 30), (16, 16), (25, 17)]
    images = np.empty(3, dtype=object)
    targets = np.empty(3, dtype=object)
    for i, s in enumerate(shapes):
        images[i] = rng.random((1,) + s).astype(np.float32)
        targets[i] = (rng.random((1,) + s) > 0.5).astype(np.float32)
    batch = {"image": images, "target": targets, "seed": np.array([5, 6, 7])}
    params = AugmentParams.from_dict(ALL_ON)
    out = A.augment_batch(batch, params, "label")
    assert out["image"].dtype == object
    for i, s in enumerate(shapes):
        assert out["image"][i].shape == (1,) + s and out["target"][i].shape == (1,) + s
    single = A.augment_batch({k: v[1:2] for k, v in batch.items()}, params, "label")
    np.testing.assert_array_equal(single["image"][0], out["image"][1])


def test_augment_batch_classification_and_missing_seed():
    batch = make_batch()
    batch["target"] = np.array([0, 1, 2, 1])
    out = A.augment_batch(batch, AugmentParams.from_dict(ALL_ON), "none")
    np.testing.assert_array_equal(out["target"], batch["target"])
    del batch["target"]
    out = A.augment_batch(batch, AugmentParams.from_dict(ALL_ON), "none")
    assert "target" not in out
    with pytest.raises(KeyError):
        A.augment_batch({"image": batch["image"]}, AugmentParams.from_dict({}))


def test_save_examples(tmp_path):
    batch = make_batch(n=3)
    paths = A.save_examples(batch["image"], batch["target"], tmp_path / "aug", n=2)
    assert len(paths) == 2 and all(p.exists() and p.stat().st_size > 0 for p in paths)
    rgb = np.random.default_rng(0).random((2, 3, 4, 16, 16)).astype(np.float32)
    assert len(A.save_examples(rgb, [0, 1], tmp_path / "cls")) == 2
    assert len(A.save_examples(rgb, None, tmp_path / "none")) == 2
