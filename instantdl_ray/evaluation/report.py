"""Figures and ``report.html`` from what :mod:`.evaluate` computed; nothing new is computed here.

Everything lands in ``<run_dir>/evaluation/``: ``figures/*.png`` and ``report.html``, which links
its figures and tables with relative paths, so the folder can be moved or zipped as a whole.
Matplotlib is used through ``matplotlib.figure.Figure`` (Agg), never pyplot: no global backend
switch, no GUI, safe in worker threads.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

from instantdl_ray.io import write

FIGURES = "figures"
_LAYER_TITLES = {
    "input": "input",
    "groundtruth": "groundtruth",
    "prediction": "prediction",
    "error": "error",
    "uncertainty": "uncertainty",
}


@dataclass
class Panel:
    """Display views of one test image.

    ``layers``: ``{"input" | "groundtruth" | "prediction" | "error" | "uncertainty": views}`` in display
    order, each ``views`` a dict with ``"yx"`` (a strided middle plane, ``(Y', X')`` or ``(Y', X', 3)``)
    and, for volumes, ``"xz"`` (``(Z, X')`` at the middle Y).
    """

    name: str
    layers: dict[str, dict[str, np.ndarray]]


@dataclass
class FigureInputs:
    """What the figures show, prepared by :func:`.evaluate.evaluate`.

    ``label_kind``: how groundtruth / prediction are coloured: ``"classes"``, ``"instances"``, ``"values"``;
    ``error_legend``: what the error map's colours mean.
    ``uncertainty`` / ``error``: ``(N,)`` per image, for the uncertainty-vs-error plot.
    ``roc``: ``{class name: (fpr, tpr)}``; ``roc_auc``: ``{class name: auc}``; ``confusion``: ``(K, K)``
    counts, rows = truth; ``thumbnails``: ``(name, image view, true name, predicted name)``.
    """

    panels: list[Panel] = field(default_factory=list)
    label_kind: str = "values"
    error_legend: str = ""
    uncertainty: np.ndarray | None = None
    error: np.ndarray | None = None
    error_label: str = "error"
    roc: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
    roc_auc: dict[str, float] | None = None
    confusion: np.ndarray | None = None
    class_names: list[str] | None = None
    thumbnails: list[tuple[str, np.ndarray, str, str]] = field(default_factory=list)


def write_report(run_dir: Path, results: dict, per_image: Any, figures: FigureInputs | None = None) -> list[Path]:
    """Write ``evaluation/figures/*.png`` and ``evaluation/report.html``; returns the figure paths.

    ``results``: the dict of ``results.json``; ``per_image``: the ``per_image.csv`` DataFrame.
    """
    out = Path(run_dir) / "evaluation"
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    for old in fig_dir.glob("*.png"):
        old.unlink()  # a re-evaluation with fewer images must not leave stale figures behind
    figures = figures or FigureInputs()
    written: list[tuple[str, Path]] = []

    for i, panel in enumerate(figures.panels):
        p = fig_dir / f"image_{i:02d}_{_safe(panel.name)}.png"
        _panel_figure(panel, figures.label_kind, figures.error_legend, p)
        written.append((f"Test image {panel.name}", p))
    box = _boxplot_columns(results, per_image)
    if box:
        p = fig_dir / "per_image_metrics.png"
        _boxplots(per_image, box, p)
        written.append(("Per-image metrics", p))
    if figures.roc:
        p = fig_dir / "roc.png"
        _roc_figure(figures.roc, figures.roc_auc or {}, p)
        written.append(("ROC curves (one-vs-rest)", p))
    if figures.confusion is not None:
        p = fig_dir / "confusion_matrix.png"
        _confusion_figure(np.asarray(figures.confusion), figures.class_names, p)
        written.append(("Confusion matrix (rows normalised)", p))
    if figures.thumbnails:
        p = fig_dir / "examples.png"
        _thumbnail_figure(figures.thumbnails, p)
        written.append(("Test images: truth / prediction", p))
    if figures.uncertainty is not None and figures.error is not None:
        p = fig_dir / "uncertainty_vs_error.png"
        _scatter_figure(figures.uncertainty, figures.error, figures.error_label, results.get("uncertainty", {}), p)
        written.append(("Uncertainty vs error per image", p))

    write.write_text(out / "report.html", _html(results, per_image, written, out))
    return [p for _, p in written]


# ---------------------------------------------------------------- figures


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:80] or "image"


def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _instance_cmap(n: int):
    from matplotlib.colors import ListedColormap

    # fixed seed: the same label gets the same colour in every figure and run
    rng = np.random.default_rng(0)
    colours = rng.uniform(0.25, 1.0, size=(max(n, 1) + 1, 3))
    colours[0] = 0.0
    return ListedColormap(colours)


def _show(ax, img: np.ndarray, layer: str, kind: str, vrange: tuple[float, float] | None, fig, aspect: str = "equal") -> None:
    img = np.asarray(img)
    ax.set_xticks([])
    ax.set_yticks([])
    if layer == "input" or (img.ndim == 3 and img.shape[-1] == 3):
        if img.ndim == 3:
            f = img.astype(np.float64)
            hi = f.max() if f.size else 1.0
            ax.imshow(np.clip(f / (hi if hi > 0 else 1.0), 0, 1), aspect=aspect, interpolation="nearest")
        else:
            lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        return
    if layer == "error":
        a = float(np.abs(img).max()) if img.size else 1.0
        im = ax.imshow(img, cmap="bwr", vmin=-(a or 1.0), vmax=a or 1.0, aspect=aspect, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.7)
        return
    if layer == "uncertainty":
        im = ax.imshow(img, cmap="inferno", aspect=aspect, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.7)
        return
    if kind == "instances":
        n = int(vrange[1]) if vrange else int(img.max(initial=0))
        ax.imshow(img, cmap=_instance_cmap(n), vmin=0, vmax=max(n, 1), aspect=aspect, interpolation="nearest")
    elif kind == "classes":
        n = int(vrange[1]) if vrange else int(img.max(initial=0))
        ax.imshow(img, cmap="viridis", vmin=0, vmax=max(n, 1), aspect=aspect, interpolation="nearest")
    else:
        lo, hi = vrange if vrange else (float(img.min()), float(img.max()))
        im = ax.imshow(img, cmap="magma", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.7)


def _panel_figure(panel: Panel, kind: str, legend: str, path: Path) -> None:
    layers = list(panel.layers)
    has_xz = any("xz" in v for v in panel.layers.values())
    rows = 2 if has_xz else 1
    ncol = len(layers)
    yx0 = next(iter(panel.layers.values()))["yx"]
    aspect = yx0.shape[0] / max(yx0.shape[1], 1)
    fig = _new_figure(3.2 * ncol, 3.2 * aspect + (1.4 if has_xz else 0) + 0.5)
    gs = fig.add_gridspec(rows, ncol, height_ratios=[3, 1] if has_xz else [1])
    # groundtruth and prediction share one colour scale so they can be compared by eye
    shared = [np.asarray(panel.layers[k][v]) for k in ("groundtruth", "prediction") if k in panel.layers for v in panel.layers[k]]
    vrange = (float(min(a.min() for a in shared)), float(max(a.max() for a in shared))) if shared and all(a.size for a in shared) else None
    for c, layer in enumerate(layers):
        for r, view in enumerate(["yx", "xz"][:rows]):
            ax = fig.add_subplot(gs[r, c])
            img = panel.layers[layer].get(view)
            if img is None:
                ax.axis("off")
                continue
            # x-z views stretch: the z spacing is unknown here, and few slices would be a thin line
            aspect = "equal" if view == "yx" else "auto"
            _show(ax, img, layer, kind, vrange if layer in ("groundtruth", "prediction") else None, fig, aspect)
            if r == 0:
                title = _LAYER_TITLES.get(layer, layer)
                if layer == "error" and legend:
                    title += f"\n({legend})"
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_ylabel("Y" if view == "yx" else "Z (x-z view)", fontsize=8)
    fig.suptitle(panel.name, fontsize=11)
    write.write_figure(fig, path)


def _boxplot_columns(results: dict, per_image: Any) -> list[str]:
    keys = list(results.get("bootstrap", {}))
    cols = []
    for c in keys:
        if c not in per_image.columns:
            continue
        if c.startswith("ap_") and c not in ("ap_mean", "ap_50", "ap_75"):
            continue  # ten AP thresholds would crowd out the rest
        cols.append(c)
    if "prob_true" in per_image.columns:
        cols.insert(0, "prob_true")
    return cols[:12]


def _boxplots(per_image: Any, cols: Sequence[str], path: Path) -> None:
    n = len(cols)
    ncol = min(n, 4)
    nrow = math.ceil(n / ncol)
    fig = _new_figure(2.6 * ncol, 2.8 * nrow)
    for i, c in enumerate(cols):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        v = per_image[c].to_numpy(dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size:
            ax.boxplot(v, widths=0.5)
            ax.plot(np.random.default_rng(0).normal(1, 0.04, v.size), v, ".", alpha=0.5, color="tab:blue")
        ax.set_title(c, fontsize=10)
        ax.set_xticks([])
    write.write_figure(fig, path)


def _roc_figure(roc: dict, auc: dict, path: Path) -> None:
    fig = _new_figure(5, 5)
    ax = fig.add_subplot(1, 1, 1)
    for name, (fpr, tpr) in roc.items():
        a = auc.get(name)
        label = f"{name} (AUC {a:.3f})" if a is not None and not math.isnan(a) else str(name)
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=8, loc="lower right")
    write.write_figure(fig, path)


def _confusion_figure(cm: np.ndarray, names: Sequence[str] | None, path: Path) -> None:
    k = cm.shape[0]
    names = list(names) if names else [str(i) for i in range(k)]
    rows = cm.sum(axis=1, keepdims=True)
    shown = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)  # display scaling only
    fig = _new_figure(1.6 + 0.6 * k, 1.2 + 0.6 * k)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{shown[i, j]:.2f}\n({cm[i, j]})", ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 else "black")
    write.write_figure(fig, path)


def _thumbnail_figure(thumbs: list, path: Path) -> None:
    n = len(thumbs)
    ncol = min(n, 5)
    nrow = math.ceil(n / ncol)
    fig = _new_figure(2.2 * ncol, 2.5 * nrow)
    for i, (name, img, true, pred) in enumerate(thumbs):
        ax = fig.add_subplot(nrow, ncol, i + 1)
        _show(ax, img, "input", "values", None, fig)
        ax.set_title(f"{name}\ntrue {true} / pred {pred}", fontsize=7, color="green" if true == pred else "red")
    write.write_figure(fig, path)


def _scatter_figure(unc: np.ndarray, err: np.ndarray, label: str, stats: dict, path: Path) -> None:
    fig = _new_figure(5, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(np.asarray(unc, dtype=np.float64), np.asarray(err, dtype=np.float64), s=12, alpha=0.7)
    ax.set_xlabel("uncertainty (per image)")
    ax.set_ylabel(label)
    r = stats.get("spearman_uncertainty_vs_error")
    if r is not None:
        ax.set_title(f"Spearman r = {_fmt(r)}", fontsize=10)
    write.write_figure(fig, path)


# ---------------------------------------------------------------- HTML


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c) if not isinstance(c, str) else html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(results: dict, per_image: Any, figures: list[tuple[str, Path]], out: Path) -> str:
    task = results.get("task", "")
    h = results.get("headline", {})
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>instantdl_ray evaluation: {html.escape(task)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}"
        ".small{color:#666;font-size:0.9em}</style></head><body>",
        f"<h1>Evaluation: {html.escape(task)}</h1>",
        f"<p><b>{html.escape(str(h.get('metric', '')))} = {_fmt(h.get('value'))}</b> "
        f"<span class='small'>({html.escape(str(h.get('aggregation', '')))}; {results.get('n_images', 0)} test images)</span></p>",
    ]
    summary = results.get("summary", {})
    pim = results.get("per_image_mean", {})
    rows = []
    for k, v in summary.items():
        if isinstance(v, (list, dict, str)):
            continue
        rows.append([k, v, pim.get(k)])
    for k, v in pim.items():
        if k not in summary:
            rows.append([k, None, v])
    parts += ["<h2>Summary</h2>", _table(["metric", "test set (pooled)", "mean over images"], rows)]
    parts += [f"<p class='small'>{html.escape(k)}: {html.escape(v)}</p>" for k, v in summary.items() if isinstance(v, str)]
    if isinstance(summary.get("roc_auc_per_class"), dict):
        parts += ["<h3>ROC AUC per class</h3>", _table(["class", "AUC"], list(summary["roc_auc_per_class"].items()))]
    if isinstance(summary.get("confusion_matrix"), list):
        names = summary.get("class_names") or [str(i) for i in range(len(summary["confusion_matrix"]))]
        parts += [
            "<h3>Confusion matrix (rows: truth, columns: prediction)</h3>",
            _table(["", *names], [[n, *r] for n, r in zip(names, summary["confusion_matrix"])]),
        ]
    boot = results.get("bootstrap", {})
    if boot:
        st = results.get("bootstrap_settings", {})
        parts += [
            "<h2>Bootstrap</h2>",
            f"<p class='small'>Mean of a random half of the test images, {st.get('n_draws', '')} draws "
            f"(seed {st.get('seed', '')}); median and interquartile range, as in the InstantDL paper.</p>",
            _table(["metric", "median", "p25", "p75"], [[k, v.get("median"), v.get("p25"), v.get("p75")] for k, v in boot.items()]),
        ]
    unc = results.get("uncertainty")
    if unc:
        parts += ["<h2>Uncertainty</h2>", _table(["quantity", "value"], [[k, v] for k, v in unc.items()])]
    for note in results.get("notes", []):
        parts.append(f"<p class='small'>Note: {html.escape(str(note))}</p>")

    links = [("results.json", "results.json"), ("per_image.csv", "per_image.csv")]
    if (out / "predictions_stack.tif").exists():
        links.append(("predictions_stack.tif", "all predictions as one stack (Fiji / napari)"))
    parts.append("<h2>Files</h2><ul>" + "".join(f"<li><a href='{quote(f)}'>{html.escape(d)}</a></li>" for f, d in links) + "</ul>")

    if figures:
        parts.append("<h2>Figures</h2>")
        for title, p in figures:
            rel = p.relative_to(out).as_posix()
            parts.append(f"<h3>{html.escape(title)}</h3><a href='{quote(rel)}'><img src='{quote(rel)}' alt='{html.escape(title)}'></a>")

    if per_image is not None and len(per_image):
        parts.append("<h2>Per image</h2>")
        shown = per_image.head(500)
        if len(per_image) > 500:
            parts.append(f"<p class='small'>First 500 of {len(per_image)} rows; all rows in per_image.csv.</p>")
        parts.append(shown.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="n/a", border=0))
    parts.append("</body></html>")
    return "\n".join(parts)
