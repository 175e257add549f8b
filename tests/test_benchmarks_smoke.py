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
