"""Corrupt, truncated and too-small images are refused at validation, naming the file and the fix
(issue 17 items 6 and 8); images smaller than the tile no longer shrink the tile of the data set."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import make_semantic_set
from instantdl_ray.io import read
from instantdl_ray.config.schema import from_dict
from instantdl_ray.errors import DataError
from instantdl_ray.config.plan import make_plan
from instantdl_ray.config.validate import validate


def _cfg(path: Path, **kw):
    return from_dict({"use_algorithm": "SemanticSegmentation", "path": str(path), **kw})


def _problems(root: Path, **kw) -> list[str]:
    with pytest.raises(DataError) as e:
        validate(_cfg(root, **kw))
    return e.value.problems


def _replace_image(data: Path, writer) -> Path:
    """Replace the first training image (and its mask) by what ``writer(path)`` writes."""
    img = sorted((data / "train" / "image").iterdir())[0]
    gt = data / "train" / "groundtruth" / img.name
    img.unlink()
    gt.unlink()
    new = writer(data / "train" / "image" / "bad")
    mask = np.zeros((64, 64), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(data / "train" / "groundtruth" / (new.stem + ".png"))  # found by its stem
    return new


def _truncate(path: Path, keep: float) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims ``width`` x ``height`` grey pixels."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    path.write_bytes(raw)
    return path


def _tiff_header_only(path: Path, width: int, height: int) -> Path:
    """A little-endian TIFF of ~120 bytes whose one strip claims ``width`` x ``height`` uint8 pixels."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, min(width * height, 2**32 - 1))]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        ifd += struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
    ifd += struct.pack("<I", 0)
    header = b"II*\x00" + struct.pack("<I", 8 + 16)
    path.write_bytes(header + b"\x00" * 16 + ifd)
    return path


def _expect_corrupt(problems: list[str], path: Path) -> None:
    hits = [p for p in problems if str(path) in p]
    assert hits, problems
    assert any("truncated or corrupt" in p and ("replace" in p or "remove" in p) for p in hits), hits


def test_a_truncated_uncompressed_tiff_is_refused(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)

    def write(stem):
        p = stem.with_suffix(".tif")
        tifffile.imwrite(p, np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
        _truncate(p, 0.5)
        return p

    bad = _replace_image(data, write)
    _expect_corrupt(_problems(data), bad)


def test_a_truncated_tile_of_a_compressed_tiled_tiff_is_refused(tmp_path):
    """A large tiled zlib TIFF with its last tiles cut off: a sample of tiles spread over the file
    (always including the last) finds it without decoding the whole image."""
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1, shape=(64, 64))

    def write(stem):
        p = stem.with_suffix(".tif")
        rng = np.random.default_rng(1)
        tifffile.imwrite(p, rng.integers(0, 255, (64, 64), dtype=np.uint8), tile=(16, 16), compression="zlib")
        raw = bytearray(p.read_bytes())
        with tifffile.TiffFile(p) as tf:
            page = tf.pages[0]
            off, n = page.dataoffsets[-1], page.databytecounts[-1]
        raw[off: off + n] = b"\xff" * n  # the last tile's compressed stream is garbage
        p.write_bytes(bytes(raw))
        return p

    bad = _replace_image(data, write)
    _expect_corrupt(_problems(data), bad)


def test_a_tiny_tiff_claiming_a_huge_image_is_refused_without_allocating_it(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    bad = _replace_image(data, lambda stem: _tiff_header_only(stem.with_suffix(".tif"), 100_000, 100_000))
    assert bad.stat().st_size < 200
    _expect_corrupt(_problems(data), bad)


def test_a_tiny_png_claiming_a_huge_image_is_refused(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    bad = _replace_image(data, lambda stem: _png_header_only(stem.with_suffix(".png"), 100_000, 100_000))
    _expect_corrupt(_problems(data), bad)


def test_a_truncated_png_and_a_truncated_mask_are_refused(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    img = sorted((data / "train" / "image").iterdir())[0]
    _truncate(img, 0.6)
    mask = sorted((data / "train" / "groundtruth").iterdir())[1]
    _truncate(mask, 0.6)
    problems = _problems(data)
    _expect_corrupt(problems, img)
    _expect_corrupt(problems, mask)


def test_a_truncated_npy_is_refused(tmp_path):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)

    def write(stem):
        p = stem.with_suffix(".npy")
        np.save(p, np.ones((64, 64), np.float32))
        _truncate(p, 0.5)
        return p

    bad = _replace_image(data, write)
    _expect_corrupt(_problems(data), bad)


def test_check_pixels_accepts_good_files(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (300, 200), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiled.tif", a, tile=(64, 64), compression="zlib")
    tifffile.imwrite(tmp_path / "plain.tif", a)
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((2000, 2000), np.uint8)).save(tmp_path / "black.png")  # compresses ~1000:1
    np.save(tmp_path / "a.npy", a)
    for name in ("tiled.tif", "plain.tif", "a.png", "black.png", "a.npy"):
        assert read.check_pixels(tmp_path / name) is None, name


# ------------------------------------------------------------------ item 8: small images


def _add_image(data: Path, name: str, shape: tuple[int, int], split: str = "train") -> Path:
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, shape, dtype=np.uint8)
    mask = np.zeros(shape, np.uint8)
    mask[: max(1, shape[0] // 2), : max(1, shape[1] // 2)] = 255
    Image.fromarray(img).save(data / split / "image" / name)
    Image.fromarray(mask).save(data / split / "groundtruth" / name)
    return data / split / "image" / name


@pytest.mark.parametrize("shape", [(1, 64), (64, 1), (8, 64)])
def test_images_thinner_than_the_minimum_are_refused_by_name(tmp_path, shape):
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1)
    thin = _add_image(data, "thin.png", shape)
    problems = [p for p in _problems(data) if str(thin) in p]
    assert problems and f"{read.MIN_IMAGE_SIDE} pixels" in problems[0], problems


def test_a_small_first_image_does_not_shrink_the_tile(tmp_path):
    """The tile comes from the largest images (capped), not from whichever image sorts first; the
    small one is padded into the tile."""
    data = make_semantic_set(tmp_path / "data", n_train=4, n_test=1, shape=(128, 128))
    _add_image(data, "000_small.png", (40, 48))  # sorts first
    cfg = _cfg(data)
    inv = validate(cfg)
    plan = make_plan(cfg, inv)
    assert plan.tile_shape == [128, 128]
