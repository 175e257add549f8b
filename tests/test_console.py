"""What a user sees (issue 18, item 1, first part): a tiny ``run`` on the command line prints the
package's own lines (stages, one line per epoch, the run directory), not Ray Train's per-epoch
``Reporting training result ...``, Ray Data's ``Dataset ... execution finished`` / ``Progress bars
disabled``, Ray's token-authentication notice or a RayDeprecationWarning about Ray's own options.
(Still shown, not yet handled: the C++ core worker's "has constructor arguments in the object
store" lines, which Python's logging cannot reach.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RAY_CONSOLE_NOISE as RAY_INTERNALS
from conftest import make_run_config

# slow: a whole run in a fresh process (~1.5 min); the default suite checks the per-epoch lines of
# an in-process run (tests/test_pipeline.py::test_semantic_run_end_to_end)
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(400)]


def test_console_shows_the_packages_lines_not_rays(tmp_path):
    cfg = make_run_config(tmp_path, epochs=2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    r = subprocess.run([sys.executable, "-m", "instantdl_ray", "run", str(cfg), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=380, env=env, cwd=tmp_path)
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-3000:]
    for n in (1, 2):
        assert f"epoch {n}/2" in console, console[-3000:]
    noise = [line for line in console.splitlines() if any(s in line for s in RAY_INTERNALS)]
    assert not noise, "\n".join(noise[:10])
    assert r.stdout.strip().splitlines()[-1].endswith(str(tmp_path / "run")), r.stdout[-2000:]  # where it is
    assert (Path(tmp_path / "run") / "evaluation" / "results.json").exists()
