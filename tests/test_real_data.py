"""End-to-end runs on the real data sets in ../shared/data (skipped when absent), in the slow suite:
every bundled config shortened to 1 epoch, and InstantDL's semantic example with its report checked:
python -m pytest -m slow tests/test_real_data.py. (The default suite validates the real data sets,
tests/test_validate.py, and trains on real DSB images of the bundled example pasted into slides,
tests/test_annotations.py.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from instantdl_ray import pipeline
from instantdl_ray.config import schema as config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SHORT = ["iterations_over_dataset=1", "mc_passes=2"]


def _check_report(run_dir: Path) -> dict:
    res = json.loads((run_dir / "evaluation" / "results.json").read_text())
    html = (run_dir / "evaluation" / "report.html").read_text()
    refs = re.findall(r"(?:src|href)=[\'\"]([^'\"#:]+)[\'\"]", html)
    assert refs, "the report references no files"
    for ref in refs:
        assert (run_dir / "evaluation" / ref).exists(), ref
    assert any((run_dir / "evaluation" / "figures").glob("*.png"))
    return res


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_epoch_on_instantdl_semantic_example(ray_session, shared_data, tmp_path):
    cfg = config.from_dict({"use_algorithm": "SemanticSegmentation",
                            "path": str(shared_data / "instantdl_examples" / "SemanticSegmentation"),
                            "iterations_over_dataset": 1, "mc_passes": 2})
    run_dir = pipeline.run(cfg, out=tmp_path / "run")
    res = _check_report(run_dir)
    assert res["n_images"] == 6 and 0 <= res["summary"]["jaccard"] <= 1
    assert len(pd.read_csv(run_dir / "evaluation" / "per_image.csv")) == 6


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("cfg_path", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_end_to_end(ray_session, shared_data, tmp_path, cfg_path):
    cfg = config.load(cfg_path, SHORT)
    if not Path(cfg.path).exists():
        pytest.skip(f"{cfg.path} not available")
    run_dir = pipeline.run(cfg, out=tmp_path / "run")
    res = _check_report(run_dir)
    assert res["n_images"] > 0
    assert res["headline"]["value"] is not None
