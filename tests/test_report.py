"""report.write_report: figures from prepared inputs, an HTML page whose links all resolve."""

from __future__ import annotations

import re
from urllib.parse import unquote

import numpy as np
import pandas as pd

from instantdl_ray.evaluation.report import FigureInputs, Panel, write_report


def _refs(html: str) -> list[str]:
    return [unquote(r) for r in re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", html)]


def test_report_files_and_links(tmp_path):
    rng = np.random.default_rng(0)
    ev = tmp_path / "evaluation"
    (ev / "figures").mkdir(parents=True)
    (ev / "figures" / "image_07_stale.png").write_bytes(b"old")
    (ev / "results.json").write_text("{}")
    (ev / "per_image.csv").write_text("name\n")
    vol = {"yx": rng.random((16, 20)), "xz": rng.random((5, 20))}
    labels = {"yx": rng.integers(0, 4, (16, 20)), "xz": rng.integers(0, 4, (5, 20))}
    panels = [
        Panel("a <odd> name/1", {"input": {"yx": rng.random((16, 20, 3))}, "groundtruth": labels, "prediction": labels,
                                 "error": {"yx": rng.integers(-1, 2, (16, 20))}, "uncertainty": vol}),
    ]
    per_image = pd.DataFrame({"name": ["a <odd> name/1", "b"], "jaccard": [0.5, np.nan], "ap_55": [0.1, 0.2]})
    results = {
        "task": "instance",
        "n_images": 2,
        "headline": {"metric": "jaccard", "value": 0.5, "aggregation": "pooled"},
        "summary": {"jaccard": 0.5, "confusion_matrix": [[1, 2], [3, 4]], "class_names": ["x", "<y>"]},
        "per_image_mean": {"jaccard": 0.5},
        "bootstrap": {"jaccard": {"median": 0.5, "p25": 0.4, "p75": 0.6}, "ap_55": {"median": 0.1, "p25": 0.1, "p75": 0.2}},
        "uncertainty": {"spearman_uncertainty_vs_error": None},
    }
    figs = FigureInputs(
        panels=panels,
        label_kind="instances",
        uncertainty=np.array([0.1, 0.2]),
        error=np.array([0.5, 0.7]),
        roc={"x": (np.array([0, 0.5, 1]), np.array([0, 1, 1]))},
        roc_auc={"x": 0.75},
        confusion=np.array([[1, 2], [3, 4]]),
        class_names=["x", "<y>"],
        thumbnails=[("t", rng.random((8, 8)), "x", "<y>")],
    )
    written = write_report(tmp_path, results, per_image, figs)
    names = sorted(p.name for p in written)
    assert names == sorted(
        ["image_00_a_odd_name_1.png", "per_image_metrics.png", "roc.png", "confusion_matrix.png", "examples.png", "uncertainty_vs_error.png"]
    )
    assert not (ev / "figures" / "image_07_stale.png").exists()
    html = (ev / "report.html").read_text()
    assert "<odd>" not in html and "&lt;odd&gt;" in html
    refs = _refs(html)
    assert all((ev / r).is_file() for r in refs)
    assert {f"figures/{n}" for n in names} <= set(refs)


def test_report_without_figures(tmp_path):
    written = write_report(tmp_path, {"task": "semantic", "summary": {}}, pd.DataFrame({"name": []}))
    assert written == []
    assert (tmp_path / "evaluation" / "report.html").is_file()
