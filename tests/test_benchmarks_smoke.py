"""Fast smoke checks of the benchmark helpers (no Ray; a few seconds). The benchmarks themselves
run with ``python benchmarks/<name>.py --quick`` (minutes, they start Ray)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.timeout(60)


def test_tree_memory_and_cpu_sampler_read_proc():
    import _common

    m = _common.TreeMemory.of(os.getpid())
    assert m.processes >= 1 and m.pss > 0 and m.rss_sum >= m.driver_rss > 0
    import time

    with _common.CpuSampler(interval=0.05) as cpu:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.5:  # half a CPU second of our own work
            sum(i * i for i in range(10_000))
    driver = cpu.by_role().get("driver", 0)
    assert 0.2 <= driver <= 5, cpu.by_role()  # the sampler sees this process's CPU time


def test_slide_writer_writes_blobs_and_labels(tmp_path):
    import _common
    import zarr

    _common.write_slide(tmp_path / "img.zarr", tmp_path / "lab.zarr", side=2048, chunk=256)
    img, lab = zarr.open(str(tmp_path / "img.zarr")), zarr.open(str(tmp_path / "lab.zarr"))
    assert img.shape == (2048, 2048) and img.chunks == (256, 256)
    assert set(np.unique(lab[...]).tolist()) <= {0, 1} and (img[...] > 20).mean() > 0.005
    assert np.array_equal(img[...] > 20, lab[...] == 1)


def test_tile_read_plain_worker_runs_without_ray(tmp_path):
    import _common

    data = _common.make_slide_set(tmp_path / "s", 1024, test_side=256)
    proc = subprocess.run([sys.executable, str(BENCH / "tile_read.py"), "--mode", "plain", "--data", str(data),
                           "--tiles", "24"], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    r = json.loads(line[7:])
    assert r["tiles"] == 24 and r["tiles_per_s"] > 0


def test_slide_train_builds_slides_whose_geojson_rasterises_to_the_masks(tmp_path):
    from PIL import Image

    import slide_train
    from instantdl_ray.io import annotations, read

    data = Path(__file__).resolve().parents[1] / "examples" / "dsb2018_small"
    out = slide_train.build_slides(data, tmp_path / "slides", per_slide=16)  # 40 images: 3 slides
    images = sorted((out / "train" / "image").iterdir())
    assert [p.name for p in images] == ["slide00.ome.tif", "slide01.ome.tif", "slide02.ome.tif"]
    slide = read.open_array(images[0])
    assert tuple(slide.shape) == (1280, 1280)
    gj = out / "train" / "groundtruth" / "slide00.geojson"
    ann = annotations.load(gj)
    assert len(ann.regions) == 16 and set(ann.classes) == {"Nucleus"}
    first = sorted(p.name for p in (data / "train" / "image").iterdir())[0]
    mask = np.asarray(Image.open(data / "train" / "groundtruth" / first)) > 0
    lab = annotations.Labels(gj, (1280, 1280), {"Nucleus": 1})[0:256, 0:256]
    np.testing.assert_array_equal(lab > 0, mask)  # the first image's cell: its mask, pixel for pixel
    np.testing.assert_array_equal(np.asarray(slide[0:256, 0:256]),
                                  np.asarray(Image.open(data / "train" / "image" / first).convert("L")))
